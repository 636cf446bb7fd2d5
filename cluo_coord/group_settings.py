"""cluo-coord's flags for groups, unavailability budgets and the canary (planner rule 15),
declared for cluo.settings' one loader like every other flag in cluo_coord.config.

- ``--group 'NAME:SELECTOR[;max-concurrent=N][;max-unavailable=N|P%]'``, repeatable: the
  first group (in flag order) whose Kubernetes label selector matches a node has it;
  a node no ``--group`` matches is in the group its ``group`` label names (Flatcar's
  update group, written by the agent), else in group ``default``.
- ``--group-max-concurrent N`` and ``--group-max-unavailable N|P%``: the limits of every
  group that does not set its own (default: none).
- ``--max-unavailable N|P%``: of all the nodes cluo-coord sees (default: unlimited).
- ``--canary-group NAME`` and ``--canary-soak DURATION``.
"""

from __future__ import annotations

import re
from typing import Any

from cluo.errors import ConfigError
from cluo.settings import Setting, Values, as_timedelta, parse_duration
from cluo_coord.groups import Budget, Groups, GroupSpec, parse_groups

_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def _optional_budget(value: str) -> Budget | None:
    return Budget.parse(value) if value.strip() else None


def _optional_count(value: str) -> int | None:
    if not value.strip():
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError("must be a whole number, at least 1")
    return int(value)


def _canary(value: str) -> str:
    value = value.strip()
    if value and not _LABEL_VALUE.fullmatch(value):
        raise ValueError("not a group name (a --group NAME or a group label's value)")
    return value


_soak = as_timedelta(parse_duration)


def _groups(text: str) -> tuple[GroupSpec, ...]:
    return parse_groups(text)


GROUP = Setting(
    "--group", _groups,
    "a group of nodes: 'NAME:SELECTOR[;max-concurrent=N][;max-unavailable=BUDGET]', "
    "SELECTOR a label selector, BUDGET a number of nodes or a percentage; repeatable, the "
    "first match wins (default: groups by the nodes' group label, 'default' without one)",
    repeated=True)
GROUP_MAX_CONCURRENT = Setting(
    "--group-max-concurrent", _optional_count,
    "nodes of one group rebooting at once, for groups that set none (default: no limit)")
GROUP_MAX_UNAVAILABLE = Setting(
    "--group-max-unavailable", _optional_budget,
    "nodes of one group unavailable at once (a number, or a percentage of the group's "
    "nodes), for groups that set none (default: no limit)")
MAX_UNAVAILABLE = Setting(
    "--max-unavailable", _optional_budget,
    "no new slot that would leave more nodes unavailable than this (a number, or a "
    "percentage of the nodes, rounded up): NotReady, cordoned, being deleted or rebooting "
    "(default: no limit)")
CANARY_GROUP = Setting(
    "--canary-group", _canary,
    "this group reboots first; no other group takes a slot until it is done and has "
    "soaked (default: none)")
CANARY_SOAK = Setting(
    "--canary-soak", _soak,
    "how long the other groups wait after the canary group's last reboot (default: 0s)",
    default="0s")

GROUP_SETTINGS = (GROUP, GROUP_MAX_CONCURRENT, GROUP_MAX_UNAVAILABLE, MAX_UNAVAILABLE,
                  CANARY_GROUP, CANARY_SOAK)


def group_policy(values: Values) -> dict[str, Any]:
    """The Policy fields of rule 15 (keyword arguments), checked together."""
    canary = values[CANARY_GROUP]
    if not canary and not values.from_default(CANARY_SOAK):
        raise ConfigError(f"{values.describe(CANARY_SOAK)}: needs --canary-group")
    return {
        "groups": Groups(specs=values[GROUP], max_concurrent=values[GROUP_MAX_CONCURRENT],
                         max_unavailable=values[GROUP_MAX_UNAVAILABLE], canary=canary),
        "max_unavailable": values[MAX_UNAVAILABLE],
        "canary_soak": values[CANARY_SOAK],
    }
