"""cluo-agent's composition root: settings, logging, the real adapters, the agent."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cluo.errors import CluoError
from cluo.kube.config import kubeconfig_client
from cluo.kube.nodes import KubeNodes
from cluo.settings import CommandLineExit, log_aliases_used
from cluo_host.agent import Agent
from cluo_host.config import AgentSettings, load_settings
from cluo_host.host_facts import read_host_facts
from cluo_host.journal import setup_logging
from cluo_host.logind import Logind
from cluo_host.notify import Notifier, watchdog_interval
from cluo_host.update_engine import UpdateEngine, UpdateEngineEvent

if TYPE_CHECKING:
    from cluo.cycle.eviction import PodApi

log = logging.getLogger("cluo_host")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(args, os.environ)
    except CommandLineExit as done:  # --help (0), or a bad or unknown flag (2)
        return done.show(sys.stdout, sys.stderr)
    except CluoError as err:
        print(f"cluo-agent: {err}", file=sys.stderr)
        return EXIT_CONFIG
    use_journal = {"auto": None, "journal": True, "stderr": False}[settings.log_target]
    setup_logging("cluo-agent", getattr(logging, settings.log_level.upper()),
                  use_journal=use_journal)
    log_aliases_used(log, settings.aliases_used)
    try:
        return asyncio.run(_run(settings))
    except CluoError as err:
        log.error("cluo-agent cannot start", extra={"ERROR": str(err), "ERROR_KIND": err.kind})
        return EXIT_CONFIG if err.kind in ("invalid", "not_found", "forbidden") else EXIT_FAILURE


async def _run(settings: AgentSettings) -> int:
    host = read_host_facts(settings.host_root)
    api = kubeconfig_client(settings.kubeconfig, "cluo-agent")

    def engine(on_event: Callable[[UpdateEngineEvent], None]) -> UpdateEngine:
        return UpdateEngine(on_event)

    def pods() -> PodApi:
        # Imported when the first drain starts (NodeActions), with the drain it serves:
        # an agent that is not draining needs neither (docs/agent.md, Footprint).
        from cluo.cycle.eviction import KubePods  # noqa: PLC0415

        return KubePods(api)

    notifier = Notifier()
    agent = Agent(
        settings,
        host=host,
        nodes=KubeNodes(api, settings.keys),
        pods_factory=pods,
        engine_factory=engine,
        rebooter=Logind(settings.bus_address),
        notifier=notifier,
        watchdog_interval=watchdog_interval(),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # The manual reboot trigger only root on the host can pull (docs/agent.md).
    loop.add_signal_handler(signal.SIGUSR1, agent.request_reboot)
    try:
        return await agent.run(stop)
    finally:
        notifier.close()
        api.close()
