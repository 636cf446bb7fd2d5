"""The status view: what the roll is doing, for ``cluo-coord status`` and ``kubectl get``.

The queue, the holds and the drain backoff come from the planner, which only the leading
coordinator runs with its configuration; so the leader publishes its last plan's status
to the ConfigMap ``cluo-status`` in its namespace (``StatusPublisher``): a JSON document
under ``status.json`` and a few short keys (``state``, ``summary``, ``coordinator``,
``published-at``). It writes from a thread of its own, never on the grant's path: only
when the content changed, at most once every ``interval`` seconds. An idle coordinator
writes nothing, so the document's age says nothing about whether it is current.

Instead the document records what it was computed from (``inputs``): the resourceVersion
of each slot Lease, a digest of the nodes the plan depends on (``node_inputs``: those the
planner does not ignore, the very nodes whose changes make the coordinator plan again)
and of the roll state; and when the plan said to look again with no event
(``next_check_at``, the plan's ``recheck_after`` as a time: a window opening, a backoff
ending, a soak). The inputs are part of what "changed" compares, so a live coordinator
publishes again whenever they move; and it writes when its next check moved later.

``cluo-coord status`` reads that ConfigMap plus, live, the slot Leases, the leader Lease
(the pause, who paused, the brake's record) and the Nodes (by the recorded selector), and
computes the same inputs. Unchanged inputs with ``next_check_at`` not yet past: current,
whatever its age. Changed inputs: it waits up to ``CONFIRM_WAIT`` for the coordinator to
publish them; if it does not, the status is stale (the coordinator may be down), and so
it is once ``next_check_at`` is more than ``CONFIRM_WAIT`` past (``read_status``,
``merge_status``, ``render_text``, ``render_json``; the JSON schema is in
docs/coordinator.md). A document without inputs (an older coordinator's, which rewrote
it every minute) is judged by its age (``STALE_AFTER``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from cluo.errors import KubeError
from cluo.kube.client import KubeClient
from cluo.kube.objects import api_time, seconds_time
from cluo.kube.resources import NODES_PATH
from cluo.kube.watch import LIST_PAGE
from cluo.protocol import STATUS_CONFIGMAP_NAME, Keys
from cluo_coord.brake import FailedReboot, RollState
from cluo_coord.cluster import ClusterSnapshot, node_view
from cluo_coord.leases import lease_name
from cluo_coord.planner import NodeIndex, NodeView, Plan, SlotLease, ignored_while_unslotted

log = logging.getLogger(__name__)

SCHEMA = "cluo.flatcar-linux.net/status/v1"
DATA_KEY = "status.json"
LIST_CAP = 100  # names kept per list; the lengths are always exact
INTERVAL = 5.0  # s: at most one write this often
# s: how long a live coordinator may take to publish a change of its inputs (the watch
# event, the plan, the rate limit of INTERVAL, the write), and so how long ``cluo-coord
# status`` waits for it, and how far past next_check_at a status is still current.
CONFIRM_WAIT = INTERVAL + 10.0
CONFIRM_POLL = 1.0  # s: how often the status command looks for that publication
STALE_AFTER = timedelta(minutes=2)  # a document without inputs (an older coordinator's)
_TIMES = ("computed_at", "published_at", "next_check_at")


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


# --------------------------------------------------------------------------- inputs

# name: (resourceVersion, the view's digest; None: a node the planner ignores)
NodeDigests = dict[str, tuple[str, bytes | None]]


def node_inputs(views: Iterable[NodeView], holders: Collection[str],
                known: NodeDigests | None = None) -> tuple[str, int]:
    """A digest of the nodes the plan depends on, and how many there are: each node a
    slot names or the planner does not ignore (``ignored_while_unslotted``: it needs a
    reboot, shows a part of a cycle, or is unavailable), with all of its view but the
    resourceVersion. A kubelet's status report or an agent refreshing an ignored node
    leaves it as it is, as it leaves the plan (the coordinator does not plan again for
    them). ``known`` keeps each node's digest by resourceVersion from one call to the
    next, so a call looks again only at the nodes whose version moved (15,000 nodes in a
    roll: about 60 ms instead of 0.6 s, measured on a loaded 2-core machine)."""
    total = hashlib.sha256()
    count = 0
    fresh: NodeDigests = {}
    # The nodes not ignored are the index's nodes in a cycle and unavailable ones: the
    # others are not looked at (the cache keeps the index, so this is not a pass).
    index = NodeIndex.of(views)
    names = index.active | index.unavailable.keys() | (index.by_name.keys() & set(holders))
    for view in (index.by_name[name] for name in sorted(names)):
        cached = known.get(view.name) if known is not None else None
        if cached is None or not view.resource_version or cached[0] != view.resource_version:
            cached = (view.resource_version,
                      None if ignored_while_unslotted(view) else _view_digest(view))
        fresh[view.name] = cached
        digest = cached[1]
        if digest is None and view.name in holders:
            digest = _view_digest(view)
        if digest is not None:
            count += 1
            total.update(digest)
    if known is not None:
        known.clear()
        known.update(fresh)
    return total.hexdigest()[:16], count


def _view_digest(view: NodeView) -> bytes:
    """What the planner reads of a node, but its resourceVersion (its protocol state, OS
    version and ``reboot_needed_since`` are read from its annotations and labels)."""
    ready_since = view.ready_since.isoformat() if view.ready_since else None
    values = (view.name, view.uid, view.ready, ready_since, view.boot_id, view.unschedulable,
              view.deleting, sorted(view.labels.items()), sorted(view.annotations.items()))
    return hashlib.sha256(repr(values).encode()).digest()


def inputs_json(views: Iterable[NodeView], slots: Iterable[SlotLease], roll: RollState,
                node_selector: str, known: NodeDigests | None = None) -> dict[str, Any]:
    """What a plan was computed from, as the document records it (pure but for
    ``known``, see ``node_inputs``)."""
    slots = list(slots)
    nodes, counted = node_inputs(views, {s.holder for s in slots if s.holder}, known)
    state = json.dumps([pause_json(roll), [f.to_json() for f in roll.failed]], sort_keys=True)
    return {
        "node_selector": node_selector,
        "nodes": nodes,
        "nodes_counted": counted,
        "slots": {lease_name(s.index, s.group): s.resource_version
                  for s in slots if s.resource_version},
        "roll": hashlib.sha256(state.encode()).hexdigest()[:16],
    }


def input_changes(then: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between two ``inputs``, one phrase each (empty: nothing)."""
    found: list[str] = []
    slots_then, slots_now = then.get("slots") or {}, now.get("slots") or {}
    found += [f"slot Lease {name}" for name in sorted(set(slots_then) | set(slots_now))
              if slots_then.get(name) != slots_now.get(name)]
    if then.get("nodes") != now.get("nodes"):
        found.append(f"the nodes in the roll ({then.get('nodes_counted', '?')} then, "
                     f"{now.get('nodes_counted', '?')} now)")
    if then.get("roll") != now.get("roll"):
        found.append("the pause or the failed-reboot record")
    return found


def _next_check(at: datetime, recheck_after: timedelta | None) -> str | None:
    """When the plan looks again with no event, rounded up to the second."""
    if recheck_after is None:
        return None
    moment = at + recheck_after
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return seconds_time(moment)


def build_status(plan: Plan, snapshot: ClusterSnapshot, at: datetime, identity: str, *,
                 node_selector: str = "", known: NodeDigests | None = None
                 ) -> dict[str, Any]:
    """The document the leader publishes, from its last plan (pure but for ``known``,
    the cache of node digests)."""
    roll = snapshot.roll
    paused = roll.paused or any(hold.startswith("paused") for hold in plan.holds)
    return {
        "schema": SCHEMA,
        "coordinator": identity,
        "computed_at": seconds_time(at),
        "next_check_at": _next_check(at, plan.recheck_after),
        "inputs": inputs_json(snapshot.nodes, snapshot.slots, roll, node_selector, known),
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
        node_selector: str = "",
        interval: float = INTERVAL,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``node_selector``: the coordinator's --node-selector, recorded in the inputs so
        the status command lists the same Nodes."""
        self._api = api
        self._namespace = namespace
        self._identity = identity
        self._node_selector = node_selector
        self._interval = interval
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._offered: tuple[Plan, ClusterSnapshot, datetime] | None = None
        self._document: dict[str, Any] | None = None  # the last one built
        self._known: NodeDigests = {}
        self._written: dict[str, Any] | None = None  # the content last written
        self._written_next: datetime | None = None  # and its next_check_at
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
        """Write the status if it is due (``_due``) and ``interval`` passed since the last
        write; returns whether it wrote. Errors are logged."""
        with self._lock:
            offered, self._offered = self._offered, None
        if offered is not None:
            self._document = build_status(*offered, self._identity,
                                          node_selector=self._node_selector, known=self._known)
        document = self._document
        now = self._monotonic()
        if document is None or now - self._written_at < self._interval:
            if offered is not None:
                with self._lock:  # try again at the next round
                    self._offered = self._offered or offered
            return False
        if not self._due(document):
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
        self._written_next = api_time(document.get("next_check_at"))
        self.writes += 1
        return True

    def _due(self, document: Mapping[str, Any]) -> bool:
        """Whether ``document`` must be written: its content (inputs included) changed, or
        its next check moved later than the written one's (or went away), for a reader
        would then hold a check that does not come against the coordinator. An earlier
        next check waits for the next change: the plan at that time writes a later one."""
        if _content(document) != self._written:
            return True
        written = self._written_next
        if written is None:
            return False
        upcoming = api_time(document.get("next_check_at"))
        return upcoming is None or upcoming > written

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
                roll: RollState, now: datetime, *, keys: Keys, wait: float = CONFIRM_WAIT,
                sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """What ``cluo-coord status`` shows: the published status with the live slots, pause
    and record over it, and ``stale``/``note`` saying whether the published part is
    current. When the live inputs differ from the recorded ones it waits up to ``wait``
    seconds for the coordinator to publish again (a live one does within that)."""
    published, note, version = _read_published(api, namespace)
    recorded = (published or {}).get("inputs")
    live = None
    if isinstance(recorded, Mapping):
        live = inputs_json(_list_node_views(api, keys, str(recorded.get("node_selector", ""))),
                           slots, roll, str(recorded.get("node_selector", "")))
    republished, waited = False, 0.0
    if live is not None and isinstance(recorded, Mapping) and input_changes(recorded, live):
        while waited < wait and not republished:
            sleep(CONFIRM_POLL)
            waited += CONFIRM_POLL
            again, again_note, again_version = _read_published(api, namespace)
            if again_version != version:
                published, note, republished = again, again_note, True
    return merge_status(published, note, slots, roll, now + timedelta(seconds=waited),
                        live=live, republished=republished)


def _read_published(api: KubeClient, namespace: str
                    ) -> tuple[dict[str, Any] | None, str, str]:
    """The published document (None if there is none), a note why not, and the
    ConfigMap's resourceVersion ("" if absent)."""
    try:
        obj = api.call("reading the status ConfigMap", "GET",
                       configmap_path(namespace, STATUS_CONFIGMAP_NAME))
    except KubeError as err:
        if err.kind != "not_found":
            raise
        return None, (f"no status published (ConfigMap {namespace}/{STATUS_CONFIGMAP_NAME} "
                      "not found): is a coordinator running?"), ""
    version = str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")
    raw = ((obj or {}).get("data") or {}).get(DATA_KEY, "")
    try:
        published = json.loads(raw) if raw else None
    except ValueError:
        return None, (f"ConfigMap {namespace}/{STATUS_CONFIGMAP_NAME} holds no readable "
                      "status"), version
    if not isinstance(published, dict):
        return None, f"ConfigMap {namespace}/{STATUS_CONFIGMAP_NAME} has no status", version
    return published, "", version


def _list_node_views(api: KubeClient, keys: Keys, selector: str) -> Iterator[NodeView]:
    """The Nodes the coordinator manages, as its planner views them, a page at a time
    (as large as the reflector's)."""
    token: str | None = None
    while True:
        page = api.call("listing nodes", "GET", NODES_PATH, query={
            "labelSelector": selector or None, "limit": str(LIST_PAGE), "continue": token})
        for obj in (page or {}).get("items") or []:
            yield node_view(obj, keys)
        token = ((page or {}).get("metadata") or {}).get("continue") or None
        if token is None:
            return


def merge_status(published: Mapping[str, Any] | None, note: str,
                 slots: Sequence[SlotLease], roll: RollState, now: datetime, *,
                 live: Mapping[str, Any] | None = None, republished: bool = False
                 ) -> dict[str, Any]:
    """The published document, the live parts over it, and whether it is stale (pure).

    ``live``: the inputs as the status command computed them now; ``republished``: the
    coordinator published again while the command waited (it is alive)."""
    stale, changed = published is None, None
    if published is not None:
        stale, note, changed = _freshness(published, live, now, republished)
    view: dict[str, Any] = dict(published or {"schema": SCHEMA, "holds": [], "queue": [],
                                              "queue_length": 0, "in_flight": [],
                                              "drain_backoff": [], "out_of_roll": []})
    held = [slot for slot in slots if slot.holder]
    view.update({
        "stale": stale,
        "note": note,
        "changed_since": changed,
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


def _freshness(published: Mapping[str, Any], live: Mapping[str, Any] | None, now: datetime,
               republished: bool) -> tuple[bool, str, list[str] | None]:
    """``(stale, note, what changed since it was computed)`` of a published document
    (None: not known, the document records no inputs or none were read)."""
    at = api_time(published.get("published_at")) or api_time(published.get("computed_at"))
    age = _duration(now - at) if at else "unknown"
    as_of = "queue, holds and backoff are as of then"
    recorded = published.get("inputs")
    if not isinstance(recorded, Mapping) or live is None:  # an older coordinator's: by age
        if at is None or now - at > STALE_AFTER:
            return True, (f"the published status is {age} old (limit "
                          f"{_duration(STALE_AFTER)}): the coordinator may be down; "
                          f"{as_of}"), None
        return False, "", None
    changed = input_changes(recorded, live)
    if changed and not republished:
        return True, (f"the published status is {age} old and since then "
                      f"{', '.join(changed)} changed, which the coordinator did not publish "
                      f"within {_duration(timedelta(seconds=CONFIRM_WAIT))}: it may be "
                      f"down; {as_of}"), changed
    next_check = api_time(published.get("next_check_at"))
    if next_check is not None and now - next_check > timedelta(seconds=CONFIRM_WAIT):
        return True, (f"the coordinator was to plan again at {seconds_time(next_check)} and "
                      f"has not published since ({age} ago): it may be down; {as_of}"
                      ), changed
    return False, "", changed


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
                     + _freshness_words(view)))
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


def _freshness_words(view: Mapping[str, Any]) -> str:
    if view.get("stale"):
        return " (stale)"
    changed = view.get("changed_since")
    if changed is None:
        return ""
    return " (changed since, published again)" if changed else " (nothing changed since)"


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
