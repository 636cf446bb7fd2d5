"""cluo-coord's flags of the health gate and the blockers (cluo_coord.health).

Declared here, listed by cluo_coord.config's loader (``HEALTH_SETTINGS``) and read into a
`HealthConfig` (``health_config``). ``--blocking-pod-selector`` and ``--prometheus-query``
are repeated flags, as kured's: one item per flag (their variables: one a line).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from cluo.errors import ConfigError
from cluo.settings import Setting, Values, as_timedelta, boolean, parse_duration
from cluo_coord.health import BudgetScope

DEFAULT_BLOCKER_INTERVAL = "30s"
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class HealthConfig:
    """The health gate (on by default, every PodDisruptionBudget) and the blockers
    (none by default)."""

    gate: bool = True
    pdbs: BudgetScope = field(default_factory=BudgetScope)
    blocking_pod_selectors: tuple[str, ...] = ()
    blocking_pod_namespace: str = ""  # "": every namespace
    prometheus_url: str = ""
    prometheus_queries: tuple[str, ...] = ()
    alert_filter: re.Pattern[str] | None = None
    blocker_interval: timedelta = timedelta(seconds=30)

    @property
    def blockers(self) -> bool:
        return bool(self.blocking_pod_selectors or self.prometheus_url)


def _items(value: str) -> tuple[str, ...]:
    """A repeated flag's values, one a line."""
    return tuple(item.strip() for item in value.splitlines() if item.strip())


def _url(value: str) -> str:
    if not value:
        return ""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("not an http:// or https:// URL")
    return value


def _regexp(value: str) -> re.Pattern[str] | None:
    if not value:
        return None
    try:
        return re.compile(value)
    except re.error as err:
        raise ValueError(f"not a regular expression ({err})") from None


def _namespace(value: str) -> str:
    if value and not _NAMESPACE.fullmatch(value):
        raise ValueError("not a namespace name")
    return value


def _at_least_a_second(value: str) -> float:
    seconds = parse_duration(value)
    if seconds < 1:
        raise ValueError("must be at least 1s")
    return seconds


_interval = as_timedelta(_at_least_a_second)


HEALTH_GATE = boolean(
    "--health-gate", "true: a rebooted node's slot is released only once the controllers "
    "of the pods evicted from it have all their replicas available again and their "
    "PodDisruptionBudgets allow as many disruptions as before the drain (default: true)",
    default=True)
HEALTH_GATE_PDBS = Setting(
    "--health-gate-pdbs", BudgetScope.parse,
    "the PodDisruptionBudgets the health gate waits for: all, none, or a label selector "
    "of them (default: all)", default="all")
BLOCKING_POD_SELECTOR = Setting(
    "--blocking-pod-selector", _items,
    "no new reboot slot while pods matching this label selector exist (not finished); "
    "repeat the flag for several (default: none)", repeated=True)
BLOCKING_POD_NAMESPACE = Setting(
    "--blocking-pod-namespace", _namespace,
    "where --blocking-pod-selector looks (default: every namespace)")
PROMETHEUS_URL = Setting(
    "--prometheus-url", _url,
    "Prometheus to ask (http://HOST:PORT): no new reboot slot while an alert fires "
    "there (but those --alert-filter-regexp matches) or a --prometheus-query has a "
    "result (default: none)")
PROMETHEUS_QUERY = Setting(
    "--prometheus-query", _items,
    "no new reboot slot while this PromQL query has a non-empty result; repeat the "
    "flag for several (needs --prometheus-url; default: none)", repeated=True)
ALERT_FILTER_REGEXP = Setting(
    "--alert-filter-regexp", _regexp,
    "alerts whose name this regular expression matches are ignored, as kured's flag "
    "(default: none ignored)")
BLOCKER_INTERVAL = Setting(
    "--blocker-interval", _interval,
    f"how often the blockers are evaluated (default: {DEFAULT_BLOCKER_INTERVAL})",
    default=DEFAULT_BLOCKER_INTERVAL)

HEALTH_SETTINGS: tuple[Setting[Any], ...] = (
    HEALTH_GATE, HEALTH_GATE_PDBS, BLOCKING_POD_SELECTOR, BLOCKING_POD_NAMESPACE,
    PROMETHEUS_URL, PROMETHEUS_QUERY, ALERT_FILTER_REGEXP, BLOCKER_INTERVAL,
)


def health_config(values: Values) -> HealthConfig:
    """The `HealthConfig` of loaded ``values``; `ConfigError` for a Prometheus flag
    without --prometheus-url."""
    url = values[PROMETHEUS_URL]
    needing_url = ((PROMETHEUS_QUERY, bool(values[PROMETHEUS_QUERY])),
                   (ALERT_FILTER_REGEXP, values[ALERT_FILTER_REGEXP] is not None))
    for setting, given in needing_url:
        if given and not url:
            raise ConfigError(f"{values.describe(setting)}: needs {PROMETHEUS_URL.flag}")
    return HealthConfig(
        gate=values[HEALTH_GATE],
        pdbs=values[HEALTH_GATE_PDBS],
        blocking_pod_selectors=values[BLOCKING_POD_SELECTOR],
        blocking_pod_namespace=values[BLOCKING_POD_NAMESPACE],
        prometheus_url=url,
        prometheus_queries=values[PROMETHEUS_QUERY],
        alert_filter=values[ALERT_FILTER_REGEXP],
        blocker_interval=values[BLOCKER_INTERVAL],
    )

