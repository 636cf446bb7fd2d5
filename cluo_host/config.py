"""cluo-agent's configuration: flags, then ``CLUO_AGENT_*`` environment, then defaults.

The unit's ``EnvironmentFile=`` (``/etc/cluo/agent.env``) reaches the agent as
environment variables, so every flag has an environment twin: ``--drain-timeout`` is
``CLUO_AGENT_DRAIN_TIMEOUT``. A flag given on the command line wins over the environment.
Bad values stop the start-up with a message that names the flag, the variable and the
value.
"""

from __future__ import annotations

import argparse
import math
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cluo.errors import ConfigError
from cluo.protocol import DEFAULT_PREFIX, Keys, ProtocolError
from cluo.settings import parse_duration
from cluo_host.agent_core import AgentConfig, DrainTimeoutPolicy
from cluo_host.drainer import DrainTuning

ENV_PREFIX = "CLUO_AGENT_"
NODE_NAME_FLAG = "--node-name"
NODE_NAME_VARIABLE = ENV_PREFIX + "NODE_NAME"
NODE_NAME_FROM_HOSTNAME = "hostname"
DEFAULT_KUBECONFIG = "/etc/cluo/kubeconfig"



@dataclass(frozen=True)
class AgentSettings:
    node_name: str
    # Where node_name came from, for the operator when no Node has that name:
    # NODE_NAME_FLAG, NODE_NAME_VARIABLE or NODE_NAME_FROM_HOSTNAME.
    node_name_source: str
    kubeconfig: Path
    keys: Keys
    core: AgentConfig
    drain: DrainTuning
    bus_address: str | None  # None: the system bus
    host_root: Path
    log_level: str
    log_target: str  # auto, journal, stderr
    startup_retry_max: float = 30.0
    extra: Mapping[str, str] = field(default_factory=dict)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluo-agent",
        description="Drain and reboot this node when update_engine needs a reboot and "
        "cluo-coord grants it. Every flag can also be set as CLUO_AGENT_<FLAG> in the "
        "environment (e.g. CLUO_AGENT_DRAIN_TIMEOUT=15m).",
    )
    add = parser.add_argument
    add("--node-name", help="this node's name in Kubernetes (default: the hostname)")
    add("--kubeconfig", help=f"kubeconfig file (default: {DEFAULT_KUBECONFIG})")
    add("--annotation-prefix",
        help=f"prefix of every annotation and label (default: {DEFAULT_PREFIX}; FLUO "
        "clusters use flatcar-linux-update.v1.flatcar-linux.net/)")
    add("--drain-timeout", help="how long the whole drain may take (default: 10m)")
    # No argparse `choices`: a bad value must give the same ConfigError as a bad
    # environment value, not an argparse exit (see `choice` in load_settings).
    add("--drain-timeout-policy",
        help="abort: uncordon and retry later (default); force: delete the remaining pods "
        "ignoring PodDisruptionBudgets")
    add("--drain-pods-without-controller", action="store_const", const="true",
        help="also evict pods that no controller manages (they are not recreated)")
    add("--eviction-concurrency", help="evictions in flight at once (default: 8)")
    add("--reboot-retry-base", help="wait after the first failed reboot, doubling (default: 10s)")
    add("--reboot-retry-max", help="longest wait between reboot attempts (default: 10m)")
    add("--reboot-timeout",
        help="how long the host may stay up after logind accepted the reboot (default: 5m)")
    add("--system-bus-address",
        help="D-Bus address of the system bus (default: DBUS_SYSTEM_BUS_ADDRESS or the "
        "standard socket)")
    add("--host-root", help="where the host's /etc, /usr and /proc are (default: /)")
    add("--log-level", help="debug, info (default), warning or error")
    add("--log-target",
        help="auto: journald when started by systemd with stderr to the journal (default); "
        "journal; stderr")
    return parser


def load_settings(argv: Sequence[str], env: Mapping[str, str]) -> AgentSettings:
    args = vars(_parser().parse_args(list(argv)))

    def value(flag: str, default: str) -> tuple[str, str]:
        variable = ENV_PREFIX + flag.upper()
        given = args.get(flag)
        if given is not None:
            return str(given), "--" + flag.replace("_", "-")
        if env.get(variable, "") != "":
            return env[variable], variable
        return default, "the default"

    def duration(flag: str, default: str) -> float:
        raw, source = value(flag, default)
        try:
            seconds = parse_duration(raw)
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ConfigError(f"{source}: {raw!r} must be a positive, finite duration")
        return seconds

    def boolean(flag: str) -> bool:
        raw, source = value(flag, "false")
        if raw.lower() in {"true", "1", "yes"}:
            return True
        if raw.lower() in {"false", "0", "no", ""}:
            return False
        raise ConfigError(f"{source}: {raw!r} is not true or false")

    def positive_int(flag: str, default: str) -> int:
        raw, source = value(flag, default)
        try:
            number = int(raw)
        except ValueError:
            raise ConfigError(f"{source}: {raw!r} is not a whole number") from None
        if number < 1:
            raise ConfigError(f"{source}: must be at least 1, not {number}")
        return number

    def choice(flag: str, default: str, allowed: Sequence[str]) -> str:
        raw, source = value(flag, default)
        if raw not in allowed:
            raise ConfigError(f"{source}: {raw!r} is not one of {', '.join(allowed)}")
        return raw

    prefix, prefix_source = value("annotation_prefix", DEFAULT_PREFIX)
    try:
        keys = Keys(prefix)
    except ProtocolError as err:
        raise ConfigError(f"{prefix_source}: {err}") from None

    policy = choice("drain_timeout_policy", "abort", [p.value for p in DrainTimeoutPolicy])
    try:
        core = AgentConfig(
            drain_timeout=duration("drain_timeout", "10m"),
            drain_timeout_policy=DrainTimeoutPolicy(policy),
            drain_pods_without_controller=boolean("drain_pods_without_controller"),
            reboot_retry_base=duration("reboot_retry_base", "10s"),
            reboot_retry_max=duration("reboot_retry_max", "10m"),
            reboot_timeout=duration("reboot_timeout", "5m"),
        )
    except ValueError as err:
        raise ConfigError(f"agent settings: {err}") from None

    # The kubelet's default node name is the lowercased hostname. A given name is taken
    # as it is: one with capitals is refused below, not lowercased.
    node_name, node_source = value("node_name", socket.gethostname().strip().lower())
    from_hostname = node_source == "the default"
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", node_name) or len(node_name) > 253:
        where = (f"the hostname (no {NODE_NAME_FLAG} nor {NODE_NAME_VARIABLE})"
                 if from_hostname else node_source)
        raise ConfigError(f"{where}: node name {node_name!r} is not a valid Kubernetes "
                          "node name")
    bus, _ = value("system_bus_address", env.get("DBUS_SYSTEM_BUS_ADDRESS", ""))
    kubeconfig, _ = value("kubeconfig", DEFAULT_KUBECONFIG)
    host_root, _ = value("host_root", "/")
    return AgentSettings(
        node_name=node_name,
        node_name_source=NODE_NAME_FROM_HOSTNAME if from_hostname else node_source,
        kubeconfig=Path(kubeconfig),
        keys=keys,
        core=core,
        drain=DrainTuning(concurrency=positive_int("eviction_concurrency", "8")),
        bus_address=bus or None,
        host_root=Path(host_root),
        log_level=choice("log_level", "info", ["debug", "info", "warning", "error"]),
        log_target=choice("log_target", "auto", ["auto", "journal", "stderr"]),
    )
