"""cluo-coord's settings: each flag, its ``CLUO_COORD_*`` twin, its default and its help.

Every flag has an environment twin: ``--max-concurrent`` is ``CLUO_COORD_MAX_CONCURRENT``.
The rules (a flag beats its variable, an empty variable is not set, one boolean and one
duration syntax, errors naming where a bad value came from) are cluo.settings', shared
with cluo-agent; this module only declares the flags and builds `CoordSettings` (and
`AdminSettings` for ``cluo-coord release|pause|resume``) from them.

The Deployment's downward API gives ``POD_NAMESPACE``, ``POD_NAME`` and ``NODE_NAME``;
they are read after the twins of ``--namespace``, ``--identity`` and ``--node-name``.

FLUO's and CLUO's update-operator spellings (Go flags, ``-reboot-window-start``, and
their ``UPDATE_OPERATOR_*`` variables) are aliases of the same settings; their flags
without an equivalent are refused by name (`ALIASES`, `REFUSED`; docs/migration.md).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cluo.errors import ConfigError
from cluo.protocol import DEFAULT_PREFIX, Keys, parse_hook_annotations
from cluo.settings import (
    KLOG_FLAGS,
    Alias,
    AliasUse,
    Setting,
    SettingsLoader,
    Values,
    as_timedelta,
    boolean,
    choice,
    go_aliases,
    go_refusals,
    optional_text,
    parse_duration,
    positive_duration,
    positive_int,
    verbatim,
)
from cluo_coord.fleetlock_config import FLEETLOCK_SETTINGS, FleetLockConfig, fleetlock_config
from cluo_coord.group_settings import GROUP_SETTINGS, group_policy
from cluo_coord.health_config import HEALTH_SETTINGS, HealthConfig, health_config
from cluo_coord.planner import Policy
from cluo_coord.webhooks import WEBHOOK_SETTINGS, WebhookConfig, webhook_config
from cluo_coord.windows import RebootWindows, Window, WindowError, parse_windows, parse_zone

ENV_PREFIX = "CLUO_COORD_"
FLUO_ENV_PREFIX = "UPDATE_OPERATOR"  # FLUO's and CLUO's update-operator
DEFAULT_NAMESPACE = "cluo-system"
DEFAULT_METRICS_ADDRESS = ":8080"
METRICS_OFF = "off"
LOG_LEVELS = ("debug", "info", "warning", "error")
ADMIN_COMMANDS = ("release", "slots", "retry", "pause", "resume", "status")
OUTPUTS = ("text", "json")
DEFAULT_MAX_FAILED_REBOOTS = "2"
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class CoordSettings:
    """Everything the composition root needs, parsed and checked."""

    kubeconfig: str | None  # None: in-cluster credentials
    namespace: str
    policy: Policy
    node_selector: str
    node_name: str  # the node this coordinator runs on ("" when unknown)
    metrics_host: str
    metrics_port: int  # 0: pick a free port; -1: no metrics server
    leader_elect: bool
    identity: str
    resync_period: float = 0.0  # s; 0: never
    log_level: str = "info"
    aliases_used: tuple[AliasUse, ...] = ()  # FLUO/CLUO spellings read, to log once
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)  # --webhook-*
    health: HealthConfig = field(default_factory=HealthConfig)  # gate and blockers
    fleetlock: FleetLockConfig = field(default_factory=FleetLockConfig)  # --fleetlock-*


@dataclass(frozen=True)
class AdminSettings:
    """``cluo-coord release NODE`` / ``slots [--free SLOT|NODE]`` / ``retry NODE`` /
    ``pause`` / ``resume``, with an admin's kubeconfig."""

    command: str  # one of ADMIN_COMMANDS
    kubeconfig: str
    namespace: str
    keys: Keys
    node: str = ""  # release and retry only
    free: str = ""  # slots only: a slot Lease's name or a holder's node name
    output: str = "text"  # status only: text or json


# --- parsers of the coordinator's own value types ---------------------------------------


_any_duration = as_timedelta(parse_duration)
_positive_duration = as_timedelta(positive_duration)


def _count_or_zero(value: str) -> int:
    """A positive whole number, or 0 (off)."""
    if value.strip() == "0":
        return 0
    try:
        return positive_int(value)
    except ValueError as err:
        raise ValueError(f"{err} (or 0: never)") from None


def _resync_period(value: str) -> float:
    """A duration of at least 1s, or 0: never."""
    seconds = parse_duration(value)
    if seconds == 0:
        return 0.0
    if seconds < 1:
        raise ValueError("must be at least 1s (or 0: never)")
    return seconds


def _namespace(value: str) -> str:
    if not _NAMESPACE.fullmatch(value):
        raise ValueError("not a namespace name")
    return value


def _metrics_address(value: str) -> tuple[str, int]:
    """':8080', '0.0.0.0:8080', '127.0.0.1:0'; empty or 'off': ("", -1), no server."""
    if not value or value.lower() == METRICS_OFF:
        return "", -1
    host, sep, port_text = value.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = -2
    if not sep or not 0 <= port <= 65535:
        raise ValueError("not HOST:PORT (e.g. ':8080') nor 'off'")
    return host.strip("[]"), port


def _window_list(value: str) -> tuple[Window, ...]:
    return parse_windows(value).windows  # the zone is --time-zone's, applied below


# --- the coordinator's flags ------------------------------------------------------------

KUBECONFIG = Setting("--kubeconfig", optional_text,
                     "kubeconfig file (default: $KUBECONFIG, else in-cluster ServiceAccount)",
                     also_from=("KUBECONFIG",))
NAMESPACE = Setting(
    "--namespace", _namespace,
    f"namespace of the slot Leases (default: $POD_NAMESPACE or {DEFAULT_NAMESPACE})",
    default=DEFAULT_NAMESPACE, also_from=("POD_NAMESPACE",))
MAX_CONCURRENT = Setting("--max-concurrent", positive_int, "nodes rebooting at once (default: 1)",
                         default="1")
ANNOTATION_PREFIX = Setting("--annotation-prefix", Keys,
                            f"annotation and label prefix (default: {DEFAULT_PREFIX})",
                            default=DEFAULT_PREFIX)
BEFORE_REBOOT_ANNOTATIONS = Setting(
    "--before-reboot-annotations", parse_hook_annotations,
    "comma list of annotations that must be 'true' before reboot-ok is granted")
AFTER_REBOOT_ANNOTATIONS = Setting(
    "--after-reboot-annotations", parse_hook_annotations,
    "comma list of annotations that must be 'true' before the slot is released")
REBOOT_WINDOW_START = Setting("--reboot-window-start", verbatim,
                              "CLUO window start, e.g. 'Mon 14:00' or '14:00'")
REBOOT_WINDOW_LENGTH = Setting("--reboot-window-length", verbatim,
                               "CLUO window length, e.g. 1h (needs the start)")
REBOOT_WINDOWS = Setting("--reboot-windows", _window_list,
                         "several windows: 'Mon 14:00 1h, Sat 02:00 1h30m'")
TIME_ZONE = Setting("--time-zone", parse_zone,
                    "IANA time zone of the windows (default: UTC)", default="UTC")
REBOOT_TIMEOUT = Setting("--reboot-timeout", _positive_duration,
                         "a holder not done after this is reported stuck (default: 1h)",
                         default="1h")
MIN_READY = Setting("--min-ready", _any_duration,
                    "how long a rebooted node must be Ready (default: 0s)", default="0s")
DELAY_BETWEEN_REBOOTS = Setting("--delay-between-reboots", _any_duration,
                                "rest of a released slot (default: 0s)", default="0s")
DRAIN_BACKOFF = Setting(
    "--drain-backoff", _positive_duration,
    "a node whose drain failed waits this long before its next slot, doubling per "
    "failure in a row (default: 10m)", default="10m")
DRAIN_BACKOFF_MAX = Setting("--drain-backoff-max", _positive_duration,
                            "the longest drain backoff (default: 2h)", default="2h")
MAX_DRAIN_ATTEMPTS = Setting(
    "--max-drain-attempts", positive_int,
    "after this many failed drains in a row a node gets no slot until "
    "'cluo-coord retry NODE' (default: 5)", default="5")
MAX_FAILED_REBOOTS = Setting(
    "--max-failed-reboots", _count_or_zero,
    "the brake: pause the whole roll once this many nodes failed the reboot proof (not "
    "back within --reboot-timeout, back NotReady, or back on an older version than "
    "announced) until 'cluo-coord resume'; 0: never (default: "
    f"{DEFAULT_MAX_FAILED_REBOOTS})", default=DEFAULT_MAX_FAILED_REBOOTS)
PAUSE = boolean("--pause", "true: grant no new slots (default: false)")
NODE_SELECTOR = Setting("--node-selector", verbatim,
                        "label selector of the nodes to manage (default: all)")
NODE_NAME = Setting("--node-name", verbatim,
                    "the node this coordinator runs on (default: $NODE_NAME); it reboots last",
                    also_from=("NODE_NAME",))
METRICS_ADDRESS = Setting(
    "--metrics-address", _metrics_address,
    f"host:port of /metrics, /healthz, /readyz (default: {DEFAULT_METRICS_ADDRESS}; "
    f"'{METRICS_OFF}' or an empty flag value: no server)",
    default=DEFAULT_METRICS_ADDRESS)
LEADER_ELECT = boolean(
    "--leader-elect", "true: only the holder of the leader Lease acts, for running two "
    "replicas (default: false: one replica, no renewals)")
IDENTITY = Setting("--identity", verbatim,
                   "leader election identity (default: $POD_NAME or the hostname)",
                   default=socket.gethostname, also_from=("POD_NAME",))
RESYNC_PERIOD = Setting("--resync-period", _resync_period,
                        "a full re-list of Nodes and Leases this often, as a safety net "
                        "beyond the watches (default: 0: never; the watches resume from "
                        "their resourceVersion and re-list when it expired)", default="0")
LOG_LEVEL = Setting("--log-level", choice(*LOG_LEVELS),
                    "debug, info, warning or error (default: info)", default="info")

# FLUO's and CLUO's update-operator: its flags with a cluo equivalent, then the others.
ALIASES = (
    *go_aliases(KUBECONFIG, "kubeconfig", FLUO_ENV_PREFIX),
    *go_aliases(BEFORE_REBOOT_ANNOTATIONS, "before-reboot-annotations", FLUO_ENV_PREFIX),
    *go_aliases(AFTER_REBOOT_ANNOTATIONS, "after-reboot-annotations", FLUO_ENV_PREFIX),
    *go_aliases(REBOOT_WINDOW_START, "reboot-window-start", FLUO_ENV_PREFIX),
    *go_aliases(REBOOT_WINDOW_LENGTH, "reboot-window-length", FLUO_ENV_PREFIX),
)
REFUSED = (
    *go_refusals(("version",), FLUO_ENV_PREFIX, "cluo-coord has no version flag; the "
                 "image tag and the user agent cluo-coord/<version> name the version"),
    *go_refusals(("auto-label-container-linux",), FLUO_ENV_PREFIX, "CLUO's node labelling "
                 "has no equivalent: cluo manages the nodes of --node-selector, all by default"),
    *go_refusals(("manage-agent", "agent-image-repo"), FLUO_ENV_PREFIX, "CLUO's managed "
                 "agent DaemonSet has no equivalent: cluo-agent is a host service, "
                 "installed by Ignition (docs/install.md)"),
    *go_refusals(("analytics",), FLUO_ENV_PREFIX, "CLUO's deprecated analytics flag has "
                 "no equivalent (it sent nothing): remove it"),
    *go_refusals(KLOG_FLAGS, FLUO_ENV_PREFIX, "a klog logging flag of FLUO and CLUO has no "
                 "equivalent: cluo-coord writes JSON lines to stdout at --log-level"),
)

LOADER = SettingsLoader(
    prog="cluo-coord",
    env_prefix=ENV_PREFIX,
    description="Grant reboot slots to Flatcar nodes, a few at a time. Every flag can "
    "also be set as CLUO_COORD_<FLAG> in the environment (CLUO_COORD_MAX_CONCURRENT=2); "
    "the flag wins, an empty variable counts as unset. FLUO's and CLUO's update-operator "
    "flags and UPDATE_OPERATOR_* variables are read where cluo has them, refused where "
    "it does not (docs/migration.md).",
    epilog="admin commands, with an admin's kubeconfig (each has --help):\n"
    "  cluo-coord release NODE   free the slot of a node that did not come back\n"
    "  cluo-coord slots          list the reboot slots; --free SLOT|NODE frees one\n"
    "  cluo-coord retry NODE     put a node whose drains failed back in the roll\n"
    "  cluo-coord pause          grant no new reboot slots\n"
    "  cluo-coord resume         grant reboot slots again, clear the failed reboots\n"
    "  cluo-coord status         the roll: paused or why held, slots, queue, failures",
    settings=(
        KUBECONFIG, NAMESPACE, MAX_CONCURRENT, ANNOTATION_PREFIX, BEFORE_REBOOT_ANNOTATIONS,
        AFTER_REBOOT_ANNOTATIONS, REBOOT_WINDOW_START, REBOOT_WINDOW_LENGTH, REBOOT_WINDOWS,
        TIME_ZONE, REBOOT_TIMEOUT, MIN_READY, DELAY_BETWEEN_REBOOTS, DRAIN_BACKOFF,
        DRAIN_BACKOFF_MAX, MAX_DRAIN_ATTEMPTS, MAX_FAILED_REBOOTS, PAUSE, NODE_SELECTOR,
        NODE_NAME, METRICS_ADDRESS, LEADER_ELECT, IDENTITY, RESYNC_PERIOD, LOG_LEVEL,
        *WEBHOOK_SETTINGS, *GROUP_SETTINGS, *HEALTH_SETTINGS, *FLEETLOCK_SETTINGS,
    ),
    aliases=ALIASES,
    refused=REFUSED,
)


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> CoordSettings:
    """The coordinator's settings; `ConfigError` names what is wrong, `CommandLineExit`
    is --help or a bad command line (cluo.settings)."""
    values = LOADER.load(argv, environ)
    try:
        policy = Policy(
            max_concurrent=values[MAX_CONCURRENT],
            before_reboot_annotations=values[BEFORE_REBOOT_ANNOTATIONS],
            after_reboot_annotations=values[AFTER_REBOOT_ANNOTATIONS],
            reboot_timeout=values[REBOOT_TIMEOUT],
            min_ready=values[MIN_READY],
            delay_between_reboots=values[DELAY_BETWEEN_REBOOTS],
            paused=values[PAUSE],
            windows=_windows(values),
            keys=values[ANNOTATION_PREFIX],
            drain_backoff=values[DRAIN_BACKOFF],
            drain_backoff_max=values[DRAIN_BACKOFF_MAX],
            max_drain_attempts=values[MAX_DRAIN_ATTEMPTS],
            max_failed_reboots=values[MAX_FAILED_REBOOTS],
            **group_policy(values),
        )
    except WindowError as err:
        raise ConfigError(f"{values.describe(REBOOT_WINDOW_START)}, "
                          f"{values.describe(REBOOT_WINDOW_LENGTH)}: {err}") from None
    except ValueError as err:  # the parsers make it unreachable, but for the backoff pair
        if values[DRAIN_BACKOFF] > values[DRAIN_BACKOFF_MAX]:
            raise ConfigError(f"{values.describe(DRAIN_BACKOFF)}: longer than "
                              f"{values.describe(DRAIN_BACKOFF_MAX)}") from None
        raise ConfigError(f"coordinator settings: {err}") from None
    host, port = values[METRICS_ADDRESS]
    return CoordSettings(
        kubeconfig=values[KUBECONFIG],
        namespace=values[NAMESPACE],
        policy=policy,
        node_selector=values[NODE_SELECTOR],
        node_name=values[NODE_NAME],
        metrics_host=host,
        metrics_port=port,
        leader_elect=values[LEADER_ELECT],
        identity=values[IDENTITY],
        resync_period=values[RESYNC_PERIOD],
        log_level=values[LOG_LEVEL],
        aliases_used=values.aliases_used,
        webhooks=webhook_config(values),
        health=health_config(values),
        fleetlock=fleetlock_config(values),
    )


def _windows(values: Values) -> RebootWindows:
    """--reboot-window-start/-length (CLUO) and --reboot-windows, in --time-zone.

    Raises `WindowError` for a CLUO pair that is not a window."""
    start, length = values[REBOOT_WINDOW_START], values[REBOOT_WINDOW_LENGTH]
    if bool(start) != bool(length):
        given = REBOOT_WINDOW_START if start else REBOOT_WINDOW_LENGTH
        raise ConfigError(f"{values.describe(given)}: {REBOOT_WINDOW_START.flag} and "
                          f"{REBOOT_WINDOW_LENGTH.flag} go together")
    cluo_pair = (Window.parse(start, length),) if start else ()
    return RebootWindows(windows=cluo_pair + values[REBOOT_WINDOWS], zone=values[TIME_ZONE])


# --- the admin commands' flags -----------------------------------------------------------

ADMIN_KUBECONFIG = Setting(
    "--kubeconfig", verbatim, "kubeconfig (default: $KUBECONFIG or ~/.kube/config)",
    default=lambda: str(Path.home() / ".kube" / "config"), also_from=("KUBECONFIG",))


def _node(value: str) -> str:
    if not value:
        raise ValueError("a node name is needed")
    return value


RELEASED_NODE = Setting("node", _node, "the node whose reboot slot to release")
RETRIED_NODE = Setting("node", _node, "the node to put back in the roll")
FREE_SLOT = Setting("--free", verbatim, "free this slot: a slot Lease's name "
                    "(cluo-reboot-slot-0) or the name of the node that holds it "
                    "(default: only list)")
_ADMIN_DESCRIPTIONS = {
    "release": "Free the reboot slot of a node that did not come back (sets release-slot=true "
    "on it; the coordinator frees the slot). If the Node is gone, its slots are freed "
    "directly.",
    "slots": "List the reboot slots (holder, since when, stuck), or free one with --free: "
    "as release does for its holder.",
    "retry": "Put a node whose drains failed back in the roll: removes its drain-failures "
    "and drain-retry-at annotations, so it queues again at once.",
    "pause": "Grant no new reboot slots (an annotation on the leader Lease, with who "
    "paused and since when) until resume.",
    "resume": "Grant reboot slots again after a pause, an admin's or the brake's "
    "(--max-failed-reboots). Also clears the brake's record of the nodes that failed the "
    "reboot proof, so the brake counts from zero again.",
    "status": "Show the roll: running, paused (by whom, why, since when) or held (by "
    "what), who holds each reboot slot and for how long, the queue in order, the nodes in "
    "drain backoff or out of the roll, and the nodes that failed the reboot proof. Reads "
    "the status the leading coordinator publishes (ConfigMap cluo-status) and, live, the "
    "slot Leases and the leader Lease; says so when the published status is missing or "
    "older than 2 minutes.",
}
OUTPUT = Setting("--output", choice(*OUTPUTS), "text (aligned columns) or json "
                 "(docs/coordinator.md has its schema); -o is short for it (default: text)",
                 default="text")


def admin_loader(command: str) -> SettingsLoader:
    """The command line of ``cluo-coord COMMAND`` (one of ADMIN_COMMANDS)."""
    return SettingsLoader(
        prog=f"cluo-coord {command}",
        env_prefix=ENV_PREFIX,
        description=_ADMIN_DESCRIPTIONS[command],
        settings=(
            *((RELEASED_NODE,) if command == "release" else ()),
            *((RETRIED_NODE,) if command == "retry" else ()),
            *((FREE_SLOT,) if command == "slots" else ()),
            *((OUTPUT,) if command == "status" else ()),
            ADMIN_KUBECONFIG, NAMESPACE, ANNOTATION_PREFIX,
        ),
        aliases=(Alias("-o", OUTPUT),) if command == "status" else (),
    )


def load_admin_settings(argv: Sequence[str], environ: Mapping[str, str]) -> AdminSettings:
    """``argv`` starts with the command (``release NODE --kubeconfig k``)."""
    command = argv[0]
    loader = admin_loader(command)
    values = loader.load(argv[1:], environ)
    return AdminSettings(
        command=command,
        kubeconfig=values[ADMIN_KUBECONFIG],
        namespace=values[NAMESPACE],
        keys=values[ANNOTATION_PREFIX],
        node=(values[RELEASED_NODE] if command == "release"
              else values[RETRIED_NODE] if command == "retry" else ""),
        free=values[FREE_SLOT] if command == "slots" else "",
        output=values[OUTPUT] if command == "status" else "text",
    )
