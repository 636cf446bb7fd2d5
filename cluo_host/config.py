"""cluo-agent's settings: each flag, its ``CLUO_AGENT_*`` twin, its default and its help.

The unit's ``EnvironmentFile=`` (``/etc/cluo/agent.env``) reaches the agent as
environment variables, so every flag has an environment twin: ``--drain-timeout`` is
``CLUO_AGENT_DRAIN_TIMEOUT``. The rules (a flag beats its variable, an empty variable
is not set, one boolean and one duration syntax, errors naming where a bad value came
from) are cluo.settings', shared with cluo-coord; this module only declares the flags
and builds `AgentSettings` from them.

FLUO's and CLUO's update-agent spellings (Go flags, ``-node``, and their
``UPDATE_AGENT_*`` variables) are aliases of the same settings; their flags without an
equivalent are refused by name (`ALIASES`, `REFUSED`; docs/migration.md).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cluo.cycle.config import AgentConfig, DrainTimeoutPolicy, DrainTuning
from cluo.errors import ConfigError
from cluo.protocol import DEFAULT_PREFIX, Keys
from cluo.settings import (
    KLOG_FLAGS,
    AliasUse,
    Setting,
    SettingsLoader,
    boolean,
    choice,
    go_aliases,
    go_refusals,
    optional_text,
    positive_duration,
    positive_int,
)

ENV_PREFIX = "CLUO_AGENT_"
FLUO_ENV_PREFIX = "UPDATE_AGENT"  # FLUO's and CLUO's update-agent
NODE_NAME_FLAG = "--node-name"
NODE_NAME_VARIABLE = ENV_PREFIX + "NODE_NAME"
NODE_NAME_FROM_HOSTNAME = "hostname"
DEFAULT_KUBECONFIG = "/etc/cluo/kubeconfig"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_TARGETS = ("auto", "journal", "stderr")
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


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
    reboot_required_trigger: bool = True  # watch host_root/run/reboot-required
    extra: Mapping[str, str] = field(default_factory=dict)
    aliases_used: tuple[AliasUse, ...] = ()  # FLUO/CLUO spellings read, to log once


def _node_name(value: str) -> str:
    # Taken as it is: a name with capitals is refused, not lowercased.
    if not _NODE_NAME.fullmatch(value) or len(value) > 253:
        raise ValueError("not a valid Kubernetes node name")
    return value


def _hostname() -> str:
    # The kubelet's default node name is the lowercased hostname.
    return socket.gethostname().strip().lower()


def _drain_timeout_policy(value: str) -> DrainTimeoutPolicy:
    return DrainTimeoutPolicy(choice(*(p.value for p in DrainTimeoutPolicy))(value))


NODE_NAME = Setting(
    NODE_NAME_FLAG, _node_name, "this node's name in Kubernetes (default: the hostname)",
    default=_hostname,
    default_source=f"the hostname (no {NODE_NAME_FLAG} nor {NODE_NAME_VARIABLE})")
KUBECONFIG = Setting("--kubeconfig", Path, f"kubeconfig file (default: {DEFAULT_KUBECONFIG})",
                     default=DEFAULT_KUBECONFIG)
ANNOTATION_PREFIX = Setting(
    "--annotation-prefix", Keys,
    f"prefix of every annotation and label (default: {DEFAULT_PREFIX}; FLUO clusters use "
    "flatcar-linux-update.v1.flatcar-linux.net/)",
    default=DEFAULT_PREFIX)
DRAIN_TIMEOUT = Setting("--drain-timeout", positive_duration,
                        "how long the whole drain may take (default: 10m)", default="10m")
DRAIN_TIMEOUT_POLICY = Setting(
    "--drain-timeout-policy", _drain_timeout_policy,
    "abort: uncordon and retry later (default); force: delete the remaining pods ignoring "
    "PodDisruptionBudgets",
    default="abort")
DRAIN_PODS_WITHOUT_CONTROLLER = boolean(
    "--drain-pods-without-controller",
    "also evict pods that no controller manages (they are not recreated; default: false)")
EVICTION_CONCURRENCY = Setting("--eviction-concurrency", positive_int,
                               "evictions in flight at once (default: 8)", default="8")
REBOOT_RETRY_BASE = Setting("--reboot-retry-base", positive_duration,
                            "wait after the first failed reboot, doubling (default: 10s)",
                            default="10s")
REBOOT_RETRY_MAX = Setting("--reboot-retry-max", positive_duration,
                           "longest wait between reboot attempts (default: 10m)", default="10m")
REBOOT_TIMEOUT = Setting(
    "--reboot-timeout", positive_duration,
    "how long the host may stay up after logind accepted the reboot (default: 5m)",
    default="5m")
SYSTEM_BUS_ADDRESS = Setting(
    "--system-bus-address", optional_text,
    "D-Bus address of the system bus (default: DBUS_SYSTEM_BUS_ADDRESS or the standard "
    "socket)",
    also_from=("DBUS_SYSTEM_BUS_ADDRESS",))
HOST_ROOT = Setting("--host-root", Path,
                    "where the host's /etc, /usr and /proc are (default: /)", default="/")
REBOOT_REQUIRED_TRIGGER = boolean(
    "--reboot-required-trigger",
    "treat /run/reboot-required (below --host-root) as a request for a reboot, as "
    "update_engine's NEED_REBOOT (default: true; --reboot-required-trigger=false turns it off)",
    default=True)
LOG_LEVEL = Setting("--log-level", choice(*LOG_LEVELS),
                    "debug, info (default), warning or error", default="info")
LOG_TARGET = Setting(
    "--log-target", choice(*LOG_TARGETS),
    "auto: journald when started by systemd with stderr to the journal (default); "
    "journal; stderr",
    default="auto")

# FLUO's and CLUO's update-agent: its flags with a cluo equivalent, then the others.
# -grace-period (whole seconds) bounded the drain: it is --drain-timeout, whose plain
# numbers are seconds; -force-drain (FLUO) also deleted pods that no controller manages.
ALIASES = (
    *go_aliases(NODE_NAME, "node", FLUO_ENV_PREFIX),
    *go_aliases(DRAIN_TIMEOUT, "grace-period", FLUO_ENV_PREFIX),
    *go_aliases(DRAIN_PODS_WITHOUT_CONTROLLER, "force-drain", FLUO_ENV_PREFIX),
)
REFUSED = (
    *go_refusals(("version",), FLUO_ENV_PREFIX, "cluo-agent has no version flag; its "
                 "user agent cluo-agent/<version> names the version"),
    *go_refusals(KLOG_FLAGS, FLUO_ENV_PREFIX, "a klog logging flag of FLUO and CLUO has no "
                 "equivalent: cluo-agent logs to the journal at --log-level (--log-target)"),
)

LOADER = SettingsLoader(
    prog="cluo-agent",
    env_prefix=ENV_PREFIX,
    description="Drain and reboot this node when update_engine needs a reboot and "
    "cluo-coord grants it. Every flag can also be set as CLUO_AGENT_<FLAG> in the "
    "environment (e.g. CLUO_AGENT_DRAIN_TIMEOUT=15m); the flag wins, an empty variable "
    "counts as unset. FLUO's and CLUO's update-agent flags and UPDATE_AGENT_* variables "
    "are read where cluo has them, refused where it does not (docs/migration.md).",
    settings=(
        NODE_NAME, KUBECONFIG, ANNOTATION_PREFIX, DRAIN_TIMEOUT, DRAIN_TIMEOUT_POLICY,
        DRAIN_PODS_WITHOUT_CONTROLLER, EVICTION_CONCURRENCY, REBOOT_RETRY_BASE,
        REBOOT_RETRY_MAX, REBOOT_TIMEOUT, SYSTEM_BUS_ADDRESS, HOST_ROOT,
        REBOOT_REQUIRED_TRIGGER, LOG_LEVEL, LOG_TARGET,
    ),
    aliases=ALIASES,
    refused=REFUSED,
)


def load_settings(argv: Sequence[str], env: Mapping[str, str]) -> AgentSettings:
    """The agent's settings; `ConfigError` for a bad value, `CommandLineExit` for --help
    or a bad command line (cluo.settings)."""
    values = LOADER.load(argv, env)
    if values[REBOOT_RETRY_MAX] < values[REBOOT_RETRY_BASE]:
        raise ConfigError(
            f"{values.describe(REBOOT_RETRY_MAX)} is below {values.describe(REBOOT_RETRY_BASE)}:"
            " the longest wait between reboot attempts must not be below the first")
    try:
        core = AgentConfig(
            drain_timeout=values[DRAIN_TIMEOUT],
            drain_timeout_policy=values[DRAIN_TIMEOUT_POLICY],
            drain_pods_without_controller=values[DRAIN_PODS_WITHOUT_CONTROLLER],
            reboot_retry_base=values[REBOOT_RETRY_BASE],
            reboot_retry_max=values[REBOOT_RETRY_MAX],
            reboot_timeout=values[REBOOT_TIMEOUT],
        )
    except ValueError as err:  # the checks above and the parsers should make it unreachable
        raise ConfigError(f"agent settings: {err}") from None
    return AgentSettings(
        node_name=values[NODE_NAME],
        node_name_source=(NODE_NAME_FROM_HOSTNAME if values.from_default(NODE_NAME)
                          else values.source(NODE_NAME)),
        kubeconfig=values[KUBECONFIG],
        keys=values[ANNOTATION_PREFIX],
        core=core,
        drain=DrainTuning(concurrency=values[EVICTION_CONCURRENCY]),
        bus_address=values[SYSTEM_BUS_ADDRESS],
        host_root=values[HOST_ROOT],
        reboot_required_trigger=values[REBOOT_REQUIRED_TRIGGER],
        log_level=values[LOG_LEVEL],
        log_target=values[LOG_TARGET],
        aliases_used=values.aliases_used,
    )
