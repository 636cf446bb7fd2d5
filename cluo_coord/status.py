"""The status view: what the roll is doing, for ``cluo-coord status`` and ``kubectl get``.

The queue, the holds and the drain backoff come from the planner, which only the leading
coordinator runs with its configuration; so the leader publishes its last plan's status
to the ConfigMap ``cluo-status`` in its namespace (``StatusPublisher``): a JSON document
under ``status.json`` and a few short keys (``state``, ``summary``, ``coordinator``,
``published-at``). It writes from a thread of its own, never on the grant's path: only
when the content changed, at most once every ``interval`` seconds, and again every
``heartbeat`` seconds while the loop is alive, so a reader tells a live status from one a
stopped coordinator left (``STALE_AFTER``). A failed write is logged and retried later.

``cluo-coord status`` reads that ConfigMap plus, live, the slot Leases and the leader
Lease (the pause, who paused, the brake's record), and says so when the published part
is missing or stale instead of showing it as current (``read_status``, ``render_text``,
``render_json``; the JSON schema is in docs/coordinator.md).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from cluo.errors import KubeError
from cluo.kube.client import KubeClient
from cluo.kube.objects import api_time, seconds_time
from cluo.protocol import STATUS_CONFIGMAP_NAME
from cluo_coord.brake import FailedReboot, RollState
from cluo_coord.cluster import ClusterSnapshot
from cluo_coord.leases import lease_name
from cluo_coord.planner import Plan, SlotLease

log = logging.getLogger(__name__)

SCHEMA = "cluo.flatcar-linux.net/status/v1"
DATA_KEY = "status.json"
LIST_CAP = 100  # names kept per list; the lengths are always exact
INTERVAL = 5.0  # s: at most one write this often
HEARTBEAT = 60.0  # s: rewritten this often while the loop is alive, changed or not
STALE_AFTER = timedelta(minutes=2)
_TIMES = ("computed_at", "published_at")


def configmap_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    return f"{base}/{name}" if name else base


# --------------------------------------------------------------------------- building


def roll_state_name(paused: bool, holds: Sequence[str], busy: bool) -> str:
    """paused, held (a hold keeps the queue from a free slot), running, idle."""
    if paused:
        return "paused"
    if holds:
        return "held"
    return "running" if busy else "idle"


def pause_json(roll: RollState) -> dict[str, str] | None:
    if not roll.paused:
        return None
    return {"by": roll.paused_by or "admin", "reason": roll.reason,
            "since": seconds_time(roll.since) if roll.since else ""}


def slot_json(slot: SlotLease, now: datetime) -> dict[str, Any]:
    since = slot.acquired_at if slot.holder else None
    return {
        "slot": lease_name(slot.index, slot.group),
        "holder": slot.holder or "",
        "since": seconds_time(since) if since else "",
        "held_seconds": int((now - since).total_seconds()) if since else None,
        "stuck": bool(slot.holder) and slot.stuck,
        "announced_version": slot.announced_version if slot.holder else "",
    }


def failed_json(roll: RollState, slots: Sequence[SlotLease]) -> list[dict[str, str]]:
    """The brake's record, then each stuck holder not on it."""
    failed = [failure.to_json() for failure in roll.failed]
    recorded = roll.failed_nodes
    for slot in slots:
        if slot.holder and slot.stuck and slot.holder not in recorded:
            failed.append(FailedReboot(
                slot.holder, f"stuck: holds {lease_name(slot.index, slot.group)} past "
                "--reboot-timeout").to_json())
    return failed


def _capped(names: Sequence[str]) -> list[str]:
    return list(names[:LIST_CAP])


def build_status(plan: Plan, snapshot: ClusterSnapshot, at: datetime, identity: str
                 ) -> dict[str, Any]:
    """The document the leader publishes, from its last plan (pure)."""
    roll = snapshot.roll
    paused = roll.paused or any(hold.startswith("paused") for hold in plan.holds)
    return {
        "schema": SCHEMA,
        "coordinator": identity,
        "computed_at": seconds_time(at),
        "state": roll_state_name(paused, plan.holds, bool(plan.queue or plan.in_flight)),
        "paused": pause_json(roll),
        "holds": list(plan.holds),
        "slots": [slot_json(slot, at) for slot in snapshot.slots if slot.holder],
        "in_flight": _capped(plan.in_flight),
        "in_flight_count": len(plan.in_flight),
        "queue": _capped(plan.queue),
        "queue_length": len(plan.queue),
        "drain_backoff": _capped(plan.drain_backoff),
        "drain_backoff_count": len(plan.drain_backoff),
        "out_of_roll": _capped(plan.out_of_roll),
        "out_of_roll_count": len(plan.out_of_roll),
        "failed": failed_json(roll, snapshot.slots),
    }


def _content(document: Mapping[str, Any]) -> dict[str, Any]:
    """The document without its times: what "changed" compares."""
    content = {key: value for key, value in document.items() if key not in _TIMES}
    content["slots"] = [{k: v for k, v in slot.items() if k != "held_seconds"}
                        for slot in document.get("slots", [])]
    return content


def summary(document: Mapping[str, Any]) -> str:
    """One line for the ConfigMap's ``summary`` key."""
    holders = ", ".join(slot["holder"] for slot in document.get("slots", [])) or "none"
    return (f"{document.get('state', '?')}; holders: {holders}; queued: "
            f"{document.get('queue_length', 0)}; failed: {len(document.get('failed', []))}")


def configmap_data(document: Mapping[str, Any]) -> dict[str, str]:
    return {
        DATA_KEY: json.dumps(document, indent=1, sort_keys=True),
        "state": str(document.get("state", "")),
        "summary": summary(document),
        "coordinator": str(document.get("coordinator", "")),
        "published-at": str(document.get("published_at", "")),
    }


# --------------------------------------------------------------------------- publishing


class StatusPublisher:
    """Writes the leader's status to the ConfigMap, from its own thread."""

    def __init__(
        self,
        api: KubeClient,
        namespace: str,
        identity: str,
        *,
        alive: Callable[[], bool],
        interval: float = INTERVAL,
        heartbeat: float = HEARTBEAT,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``alive``: whether the loop runs and leads (only then the heartbeat writes)."""
        self._api = api
        self._namespace = namespace
        self._identity = identity
        self._alive = alive
        self._interval = interval
        self._heartbeat = heartbeat
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._offered: tuple[Plan, ClusterSnapshot, datetime] | None = None
        self._document: dict[str, Any] | None = None  # the last one built
        self._written: dict[str, Any] | None = None  # the content last written
        self._written_at = float("-inf")  # monotonic
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.writes = 0
        self._thread = threading.Thread(target=self._run, name="status", daemon=True)

    def offer(self, plan: Plan, snapshot: ClusterSnapshot, at: datetime) -> None:
        """The latest plan (never blocks on I/O, never raises)."""
        with self._lock:
            self._offered = (plan, snapshot, at)
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.publish_once()

    def publish_once(self) -> bool:
        """Write the status if it changed (and ``interval`` passed since the last write)
        or the heartbeat is due; returns whether it wrote. Errors are logged."""
        with self._lock:
            offered, self._offered = self._offered, None
        if offered is not None:
            self._document = build_status(*offered, self._identity)
        document = self._document
        now = self._monotonic()
        if document is None or now - self._written_at < self._interval:
            if offered is not None:
                with self._lock:  # try again at the next round
                    self._offered = self._offered or offered
            return False
        changed = _content(document) != self._written
        if not changed and (now - self._written_at < self._heartbeat or not self._alive()):
            return False
        document = {**document, "published_at": seconds_time(self._clock())}
        try:
            self._write(configmap_data(document))
        except KubeError as err:
            log.warning("could not publish the status", extra={
                "ERROR": str(err), "ERROR_KIND": err.kind})
            self._written_at = now  # retry after the interval, not at once
            return False
        self._written, self._written_at = _content(document), now
        self.writes += 1
        return True

    def _write(self, data: Mapping[str, str]) -> None:
        name = STATUS_CONFIGMAP_NAME
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": self._namespace,
                             "labels": {"app.kubernetes.io/name": "cluo-coord"}},
                "data": dict(data)}
        action = f"publishing the status to ConfigMap {name!r}"
        try:
            self._api.call(action, "PUT", configmap_path(self._namespace, name), body=body)
        except KubeError as err:
            if err.kind != "not_found":
                raise
            self._api.call(action, "POST", configmap_path(self._namespace), body=body)


# --------------------------------------------------------------------------- reading


def read_status(api: KubeClient, namespace: str, slots: Sequence[SlotLease],
                roll: RollState, now: datetime) -> dict[str, Any]:
    """What ``cluo-coord status`` shows: the published status with the live slots, pause
    and record over it, and ``stale``/``note`` saying whether the published part is
    current."""
    published: dict[str, Any] | None = None
    note = ""
    try:
        obj = api.call("reading the status ConfigMap", "GET",
                       configmap_path(namespace, STATUS_CONFIGMAP_NAME))
        raw = ((obj or {}).get("data") or {}).get(DATA_KEY, "")
        published = json.loads(raw) if raw else None
        if not isinstance(published, dict):
            published, note = None, f"ConfigMap {namespace}/{STATUS_CONFIGMAP_NAME} has no status"
    except KubeError as err:
        if err.kind != "not_found":
            raise
        note = (f"no status published (ConfigMap {namespace}/{STATUS_CONFIGMAP_NAME} not "
                "found): is a coordinator running?")
    except ValueError:
        note = f"ConfigMap {namespace}/{STATUS_CONFIGMAP_NAME} holds no readable status"
    return merge_status(published, note, slots, roll, now)


def merge_status(published: Mapping[str, Any] | None, note: str,
                 slots: Sequence[SlotLease], roll: RollState, now: datetime
                 ) -> dict[str, Any]:
    """The published document, the live parts over it, and whether it is stale (pure)."""
    stale = published is None
    if published is not None:
        at = api_time(published.get("published_at")) or api_time(published.get("computed_at"))
        if at is None or now - at > STALE_AFTER:
            stale = True
            age = _duration(now - at) if at else "unknown"
            note = (f"the published status is {age} old (limit {_duration(STALE_AFTER)}): "
                    "the coordinator may be down; queue, holds and backoff are as of then")
    view: dict[str, Any] = dict(published or {"schema": SCHEMA, "holds": [], "queue": [],
                                              "queue_length": 0, "in_flight": [],
                                              "drain_backoff": [], "out_of_roll": []})
    held = [slot for slot in slots if slot.holder]
    view.update({
        "stale": stale,
        "note": note,
        "paused": pause_json(roll),
        "slots": [slot_json(slot, now) for slot in held],
        "failed": failed_json(roll, slots),
    })
    busy = bool(held or view.get("queue_length"))
    holds = [] if stale else list(view.get("holds") or [])
    view["state"] = roll_state_name(roll.paused, holds, busy)
    if stale and not roll.paused:
        view["state"] = "unknown"
    return view


# --------------------------------------------------------------------------- rendering


def render_json(view: Mapping[str, Any]) -> str:
    return json.dumps(view, indent=2, sort_keys=True)


def render_text(view: Mapping[str, Any]) -> str:
    """Aligned columns for a terminal; no colour."""
    lines: list[str] = []
    if view.get("note"):
        lines.append(f"WARNING: {view['note']}")
    paused = view.get("paused")
    state = str(view.get("state", "unknown"))
    if paused:
        state = (f"paused by {paused['by']}"
                 + (f" since {paused['since']}" if paused.get("since") else "")
                 + (f": {paused['reason']}" if paused.get("reason") else ""))
    rows = [("Roll:", state)]
    held_by = "Held by (then):" if view.get("stale") else "Held by:"
    rows += [(held_by, hold) for hold in view.get("holds") or ()]
    if view.get("computed_at"):
        rows.append(("Computed:", f"{view['computed_at']} by {view.get('coordinator', '?')}"
                     + (" (stale)" if view.get("stale") else "")))
    lines += _columns(rows)
    lines.append("")
    slot_rows = [("SLOT", "HOLDER", "SINCE", "FOR", "STUCK", "ANNOUNCED")]
    for slot in view.get("slots") or ():
        held = slot.get("held_seconds")
        slot_rows.append((slot["slot"], slot["holder"], slot["since"] or "-",
                          _duration(timedelta(seconds=held)) if held is not None else "-",
                          "yes" if slot["stuck"] else "no", slot["announced_version"] or "-"))
    if len(slot_rows) == 1:
        lines.append("Slots: none held")
    else:
        lines += _columns(slot_rows)
    lines.append("")
    queue = list(view.get("queue") or ())
    length = int(view.get("queue_length") or 0)
    lines.append(f"Queue ({length}):" + ("" if queue else " empty"))
    lines += [f"  {i:>3}  {name}" for i, name in enumerate(queue, 1)]
    if length > len(queue):
        lines.append(f"  ... and {length - len(queue)} more")
    lines += _columns([
        ("In drain backoff:", _names(view, "drain_backoff")),
        ("Out of the roll:", _names(view, "out_of_roll")),
    ])
    failed = view.get("failed") or []
    lines.append("")
    if failed:
        lines.append("Failed reboots:")
        lines += ["  " + line for line in _columns(
            [("NODE", "AT", "WHY")]
            + [(f["node"], f["at"] or "-", f["why"]) for f in failed])]
    else:
        lines.append("Failed reboots: none")
    return "\n".join(lines)


def _names(view: Mapping[str, Any], key: str) -> str:
    names = list(view.get(key) or ())
    total = int(view.get(f"{key}_count") or len(names))
    text = ", ".join(names) or "none"
    return text + (f" (and {total - len(names)} more)" if total > len(names) else "")


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)),
                       row[-1]]).rstrip() for row in rows]


def _duration(delta: timedelta) -> str:
    seconds = max(int(delta.total_seconds()), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"
