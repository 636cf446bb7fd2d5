"""Node groups and unavailability budgets: the values of ``--group``, ``--max-unavailable``
and their kin, parsed once, and which group a node is in. Pure: no I/O, no clock.

A node is in the first ``--group`` whose label selector matches its labels (in flag
order); else in the group its agent's ``group`` label names (Flatcar's update group);
else in ``DEFAULT_GROUP``. Selectors are Kubernetes label selectors, equality- and
set-based (``LabelSelector.parse``).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_GROUP = "default"  # the group of a node no --group matches and without a group label
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"
# The control-plane nodes' own one slot; not a name a --group or a label value can spell.
CONTROL_PLANE_SLOTS = ":control-plane"

_GROUP_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_GROUP_NAME_MAX = 40
# A label key: an optional DNS subdomain prefix and a name of at most 63 characters.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(rf"({_LABEL_NAME})?")
_SET_REQUIREMENT = re.compile(r"^(\S+)\s+(in|notin)\s*\((.*)\)$")
_EQUALITY = re.compile(r"^([^!=\s]+)\s*(==|!=|=)\s*(\S*)$")


# --------------------------------------------------------------------------- selectors


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector: ``key`` with an operator and values."""

    key: str
    operator: str  # "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "exists":
            return self.key in labels
        if self.operator == "!exists":
            return self.key not in labels
        if self.operator == "in":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values


@dataclass(frozen=True)
class LabelSelector:
    """A Kubernetes label selector: every requirement must match (an empty one matches all).

    ``key=v`` (or ``key==v``), ``key!=v``, ``key in (a,b)``, ``key notin (a,b)``, ``key``,
    ``!key``; requirements separated by commas. ``!=`` and ``notin`` match nodes without
    the key, as in Kubernetes.
    """

    requirements: tuple[Requirement, ...] = ()
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """Raises ``ValueError`` naming the term that is wrong."""
        terms = _split_terms(text)
        return cls(tuple(_requirement(term) for term in terms), text.strip())

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)


def _split_terms(text: str) -> list[str]:
    """Split at the commas outside parentheses."""
    terms: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in label selector {text.strip()!r}")
        if char == "," and depth == 0:
            terms.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"unbalanced '(' in label selector {text.strip()!r}")
    terms.append("".join(current).strip())
    if terms == [""]:
        return []
    if "" in terms:
        raise ValueError(f"empty term in label selector {text.strip()!r}")
    return terms


def _requirement(term: str) -> Requirement:
    if match := _SET_REQUIREMENT.match(term):
        key, operator, listed = match.groups()
        values = frozenset(value.strip() for value in listed.split(","))
        for value in values:
            _check_value(value, term)
        return Requirement(_checked_key(key, term), operator, values)
    if match := _EQUALITY.match(term):
        key, operator, value = match.groups()
        _check_value(value, term)
        return Requirement(_checked_key(key, term), "notin" if operator == "!=" else "in",
                           frozenset({value}))
    if term.startswith("!"):
        return Requirement(_checked_key(term[1:].strip(), term), "!exists")
    return Requirement(_checked_key(term, term), "exists")


def _checked_key(key: str, term: str) -> str:
    if not _LABEL_KEY.fullmatch(key):
        raise ValueError(f"{key!r} in {term!r} is not a label key")
    return key


def _check_value(value: str, term: str) -> None:
    if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        raise ValueError(f"{value!r} in {term!r} is not a label value")


# --------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Budget:
    """A count of nodes, or a percentage of a total: ``3`` or ``25%``."""

    count: int | None = None
    percent: int | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        value = text.strip()
        digits = value.removesuffix("%")
        if not digits.isdigit():
            raise ValueError("not a number of nodes or a percentage (examples: 2, 25%)")
        if value.endswith("%"):
            if int(digits) > 100:
                raise ValueError("a percentage is at most 100%")
            return cls(percent=int(digits))
        return cls(count=int(digits))

    def of(self, total: int) -> int:
        """How many nodes of ``total``: a percentage is rounded up, as a
        PodDisruptionBudget's maxUnavailable is (25% of 5 nodes is 2)."""
        if self.count is not None:
            return self.count
        return math.ceil((self.percent or 0) * total / 100)

    def __str__(self) -> str:
        return f"{self.percent}%" if self.percent is not None else str(self.count)


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class GroupSpec:
    """One ``--group NAME:SELECTOR[;max-concurrent=N][;max-unavailable=N|P%]``."""

    name: str
    selector: LabelSelector
    max_concurrent: int | None = None
    max_unavailable: Budget | None = None

    @classmethod
    def parse(cls, text: str) -> GroupSpec:
        """Raises ``ValueError`` saying which part is wrong."""
        name, colon, rest = text.partition(":")
        name = name.strip()
        if not colon:
            raise ValueError("not NAME:SELECTOR[;max-concurrent=N][;max-unavailable=N|P%] "
                             "(example: workers:role=worker;max-concurrent=2)")
        check_group_name(name)
        selector_text, *options = rest.split(";")
        try:
            selector = LabelSelector.parse(selector_text)
        except ValueError as err:
            raise ValueError(f"group {name!r}: {err}") from None
        limits = _limits(name, options)
        return cls(name, selector, limits.get("max-concurrent"),  # type: ignore[arg-type]
                   limits.get("max-unavailable"))  # type: ignore[arg-type]


def _limits(name: str, options: list[str]) -> dict[str, int | Budget]:
    limits: dict[str, int | Budget] = {}
    for option in options:
        key, equals, value = (part.strip() for part in option.partition("="))
        if not equals or key not in ("max-concurrent", "max-unavailable"):
            raise ValueError(f"group {name!r}: {option.strip()!r} is not max-concurrent=N "
                             "or max-unavailable=N|P%")
        if key in limits:
            raise ValueError(f"group {name!r}: {key} given twice")
        try:
            limits[key] = (Budget.parse(value) if key == "max-unavailable"
                           else _at_least_one(value))
        except ValueError as err:
            raise ValueError(f"group {name!r}: {key}={value!r}: {err}") from None
    return limits


def _at_least_one(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError("must be a whole number, at least 1")
    return int(value)


def check_group_name(name: str) -> str:
    if len(name) > _GROUP_NAME_MAX or not _GROUP_NAME.fullmatch(name):
        raise ValueError(
            f"group name {name!r} must be lower-case letters, digits and '-', at most "
            f"{_GROUP_NAME_MAX} characters, starting and ending with a letter or digit")
    return name


def parse_groups(text: str) -> tuple[GroupSpec, ...]:
    """The repeated ``--group``: one group a line; names must differ."""
    specs = tuple(GroupSpec.parse(line) for line in text.splitlines() if line.strip())
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"group {spec.name!r} is defined twice")
        seen.add(spec.name)
    return specs


@dataclass(frozen=True)
class Groups:
    """The group configuration: the explicit groups, the defaults for every group, the
    canary. With nothing set (the default) no node is limited by its group."""

    specs: tuple[GroupSpec, ...] = ()
    max_concurrent: int | None = None  # --group-max-concurrent: each group's default
    max_unavailable: Budget | None = None  # --group-max-unavailable: likewise
    canary: str = ""  # --canary-group

    def __post_init__(self) -> None:
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"a group's max-concurrent must be at least 1, not "
                             f"{self.max_concurrent}")

    def group_of(self, labels: Mapping[str, str], group_label: str) -> str:
        for spec in self.specs:
            if spec.selector.matches(labels):
                return spec.name
        return labels.get(group_label, "").strip() or DEFAULT_GROUP

    def limits(self, group: str) -> tuple[int | None, Budget | None]:
        """The group's max-concurrent and max-unavailable (None: unlimited)."""
        for spec in self.specs:
            if spec.name == group:
                return (spec.max_concurrent or self.max_concurrent,
                        spec.max_unavailable or self.max_unavailable)
        return self.max_concurrent, self.max_unavailable


def is_control_plane(labels: Mapping[str, str]) -> bool:
    return CONTROL_PLANE_LABEL in labels


def group_slot_lease_name(group: str, index: int) -> str:
    """``cluo-reboot-group-<group>-<hash>-<index>``: a Lease name for any group name
    (a label value may hold upper case, '_' and '.'); the hash keeps "A" and "a" apart.
    The Lease also records the group itself."""
    readable = re.sub(r"[^a-z0-9-]", "-", group.lower()).strip("-")[:30].strip("-") or "g"
    digest = hashlib.sha256(group.encode()).hexdigest()[:8]
    return f"cluo-reboot-group-{readable}-{digest}-{index}"
