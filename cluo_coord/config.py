"""cluo-coord's configuration: flags, then ``CLUO_COORD_*`` environment, then defaults.

Every flag has an environment twin: ``--max-concurrent`` is ``CLUO_COORD_MAX_CONCURRENT``.
A flag given on the command line wins over the environment. Bad values raise
``ConfigError`` naming the flag, the variable and the value (the entry point exits 2).

The Deployment's downward API gives ``POD_NAMESPACE``, ``POD_NAME`` and ``NODE_NAME``;
they are the defaults of ``--namespace``, ``--identity`` and ``--node-name``.
"""

from __future__ import annotations

import argparse
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from cluo.errors import ConfigError
from cluo.protocol import DEFAULT_PREFIX, Keys, ProtocolError, parse_hook_annotations
from cluo.settings import parse_duration
from cluo_coord.planner import Policy
from cluo_coord.windows import RebootWindows, Window, WindowError, parse_windows, parse_zone

T = TypeVar("T")

ENV_PREFIX = "CLUO_COORD_"
DEFAULT_NAMESPACE = "cluo-system"
DEFAULT_METRICS_ADDRESS = ":8080"
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_LOG_LEVELS = ("debug", "info", "warning", "error")


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
    resync_period: float = 600.0
    log_level: str = "info"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluo-coord",
        description="Grant reboot slots to Flatcar nodes, a few at a time. Every flag can "
        "also be set as CLUO_COORD_<FLAG> in the environment (CLUO_COORD_MAX_CONCURRENT=2).",
    )
    add = parser.add_argument
    add("--kubeconfig", help="kubeconfig file (default: in-cluster ServiceAccount)")
    add("--namespace", help=f"namespace of the slot Leases (default: $POD_NAMESPACE or "
        f"{DEFAULT_NAMESPACE})")
    add("--max-concurrent", help="nodes rebooting at once (default: 1)")
    add("--annotation-prefix", help=f"annotation and label prefix (default: {DEFAULT_PREFIX})")
    add("--before-reboot-annotations",
        help="comma list of annotations that must be 'true' before reboot-ok is granted")
    add("--after-reboot-annotations",
        help="comma list of annotations that must be 'true' before the slot is released")
    add("--reboot-window-start", help="CLUO window start, e.g. 'Mon 14:00' or '14:00'")
    add("--reboot-window-length", help="CLUO window length, e.g. 1h (needs the start)")
    add("--reboot-windows", help="several windows: 'Mon 14:00 1h, Sat 02:00 1h30m'")
    add("--time-zone", help="IANA time zone of the windows (default: UTC)")
    add("--reboot-timeout", help="a holder not done after this is reported stuck (default: 1h)")
    add("--min-ready", help="how long a rebooted node must be Ready (default: 0s)")
    add("--delay-between-reboots", help="rest of a released slot (default: 0s)")
    add("--pause", help="true: grant no new slots (default: false)")
    add("--node-selector", help="label selector of the nodes to manage (default: all)")
    add("--node-name", help="the node this coordinator runs on (default: $NODE_NAME); it "
        "reboots last")
    add("--metrics-address", help=f"host:port of /metrics, /healthz, /readyz (default: "
        f"{DEFAULT_METRICS_ADDRESS}; empty: off)")
    add("--leader-elect", help="true: only the holder of the leader Lease acts, for running "
        "two replicas (default: false: one replica, no renewals)")
    add("--identity", help="leader election identity (default: $POD_NAME or the hostname)")
    add("--resync-period", help="full re-list as a safety net (default: 10m)")
    add("--log-level", help="debug, info, warning or error (default: info)")
    return parser


def load_settings(
    argv: Sequence[str], environ: Mapping[str, str]
) -> CoordSettings:
    """Parse flags and environment into settings; ``ConfigError`` names what is wrong."""
    parser = _parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as err:  # argparse already printed the usage error
        raise ConfigError(f"bad command line: {' '.join(argv)}") from err
    given = vars(args)

    def raw(flag: str) -> tuple[str | None, str]:
        dest = flag.removeprefix("--").replace("-", "_")
        where = f"{flag} / {ENV_PREFIX}{dest.upper()}"
        value = given.get(dest)
        if value is None:
            value = environ.get(ENV_PREFIX + dest.upper())
        return value, where

    def text(flag: str, default: str) -> str:
        value, _ = raw(flag)
        return default if value is None else value.strip()

    def parsed(flag: str, default: str, convert: Callable[[str], T]) -> T:
        value, where = raw(flag)
        value = default if value is None else value
        try:
            return convert(value)
        except (ValueError, ProtocolError, WindowError) as err:
            raise ConfigError(f"{where}={value!r}: {err}") from None

    def duration(flag: str, default: str) -> timedelta:
        return timedelta(seconds=parsed(flag, default, parse_duration))

    def boolean(flag: str, default: bool) -> bool:
        value, where = raw(flag)
        if value is None:
            return default
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{where}={value!r}: not true or false")

    max_concurrent = parsed("--max-concurrent", "1", _positive_int)
    keys = parsed("--annotation-prefix", DEFAULT_PREFIX, lambda v: Keys(v.strip()))
    before = parsed("--before-reboot-annotations", "", parse_hook_annotations)
    after = parsed("--after-reboot-annotations", "", parse_hook_annotations)
    windows = _windows(raw)
    reboot_timeout = duration("--reboot-timeout", "1h")
    if reboot_timeout <= timedelta(0):
        _, where = raw("--reboot-timeout")
        raise ConfigError(f"{where}: the reboot timeout must be positive")
    host, port = _address(*raw("--metrics-address"))
    log_level = text("--log-level", "info").lower()
    if log_level not in _LOG_LEVELS:
        _, where = raw("--log-level")
        raise ConfigError(f"{where}={log_level!r}: not one of {', '.join(_LOG_LEVELS)}")
    resync = duration("--resync-period", "10m").total_seconds()
    if resync < 1:
        _, where = raw("--resync-period")
        raise ConfigError(f"{where}: the resync period must be at least 1s")
    policy = Policy(
        max_concurrent=max_concurrent,
        before_reboot_annotations=before,
        after_reboot_annotations=after,
        reboot_timeout=reboot_timeout,
        min_ready=duration("--min-ready", "0s"),
        delay_between_reboots=duration("--delay-between-reboots", "0s"),
        paused=boolean("--pause", False),
        windows=windows,
        keys=keys,
    )
    namespace = text("--namespace", environ.get("POD_NAMESPACE") or DEFAULT_NAMESPACE)
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", namespace):
        _, where = raw("--namespace")
        raise ConfigError(f"{where}={namespace!r}: not a namespace name")
    kubeconfig = text("--kubeconfig", "") or None
    return CoordSettings(
        kubeconfig=kubeconfig,
        namespace=namespace,
        policy=policy,
        node_selector=text("--node-selector", ""),
        node_name=text("--node-name", environ.get("NODE_NAME", "")),
        metrics_host=host,
        metrics_port=port,
        leader_elect=boolean("--leader-elect", False),
        identity=text("--identity", environ.get("POD_NAME") or socket.gethostname()),
        resync_period=resync,
        log_level=log_level,
    )


def _positive_int(value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError("not a whole number") from None
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _windows(raw: Callable[[str], tuple[str | None, str]]) -> RebootWindows:
    """--reboot-window-start/-length (CLUO) and --reboot-windows, in --time-zone."""
    start, start_where = raw("--reboot-window-start")
    length, length_where = raw("--reboot-window-length")
    several, several_where = raw("--reboot-windows")
    zone_name, zone_where = raw("--time-zone")
    try:
        zone = parse_zone(zone_name or "UTC")
    except WindowError as err:
        raise ConfigError(f"{zone_where}={zone_name!r}: {err}") from None
    windows: list[Window] = []
    if bool(start and start.strip()) != bool(length and length.strip()):
        raise ConfigError(
            f"{start_where} and {length_where} go together (got start={start!r}, "
            f"length={length!r})"
        )
    if start and length and start.strip():
        try:
            windows.append(Window.parse(start.strip(), length.strip()))
        except WindowError as err:
            raise ConfigError(f"{start_where}={start!r}, {length_where}={length!r}: {err}") \
                from None
    if several:
        try:
            windows.extend(parse_windows(several, zone_name or "UTC").windows)
        except WindowError as err:
            raise ConfigError(f"{several_where}={several!r}: {err}") from None
    return RebootWindows(windows=tuple(windows), zone=zone)


def _address(value: str | None, where: str) -> tuple[str, int]:
    """':8080', '0.0.0.0:8080', '127.0.0.1:0'; empty: (\"\", -1), no server."""
    if value is None:
        value = DEFAULT_METRICS_ADDRESS
    if not value.strip():
        return "", -1
    host, sep, port_text = value.strip().rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = -2
    if not sep or not 0 <= port <= 65535:
        raise ConfigError(f"{where}={value!r}: not HOST:PORT (e.g. ':8080')")
    return host.strip("[]"), port
