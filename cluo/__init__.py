"""What cluo-agent (cluo_host) and cluo-coord (cluo_coord) share: the wire contract
(`protocol`), errors, settings, and the Kubernetes client and adapters (`kube`).

Neither program is imported from here (.importlinter): an agent change never becomes a
coordinator change unless it changes this package."""
