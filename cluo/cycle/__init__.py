"""One node's reboot cycle, shared by both programs: the agent's pure decision core
(``agent_core.decide``), the drain it runs (``drain_plan``, ``drainer``, ``eviction``) and
the update_engine status it reads (``update_status``). cluo-agent drives it for its own
host; cluo-coord drives it for a FleetLock client's node (docs/fleetlock.md)."""
