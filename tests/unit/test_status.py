"""The status view: what the leader publishes, what ``cluo-coord status`` shows (terminal and
JSON), and when the published part is stale: by what it was computed from, not by its age
(an idle coordinator writes nothing)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from cluo.errors import ConfigError, KubeError
from cluo.kube.client import KubeClient
from cluo.protocol import STATUS_CONFIGMAP_NAME, Keys
from cluo_coord.brake import FailedReboot, PausedBy, RollState
from cluo_coord.cluster import ClusterSnapshot, node_view
from cluo_coord.config import load_admin_settings
from cluo_coord.planner import NodeView, Plan, SlotLease
from cluo_coord.status import (
    CONFIRM_WAIT,
    DATA_KEY,
    LIST_CAP,
    SCHEMA,
    StatusPublisher,
    build_status,
    inputs_json,
    merge_status,
    read_status,
    render_json,
    render_text,
)

KEYS = Keys()

NOW = datetime(2026, 12, 7, 4, 0, tzinfo=UTC)
HOLDER = SlotLease(0, "node-a", resource_version="5", acquired_at=NOW - timedelta(minutes=4,
                                                                                    seconds=10),
                   announced_version="4152.0.0")
STUCK = SlotLease(1, "node-s", resource_version="6", acquired_at=NOW - timedelta(hours=2),
                  stuck=True)
FREE = SlotLease(2, resource_version="7")
FAILURE = FailedReboot("node-x", "came back on 4081.2.0, older than the announced 4152.0.0",
                       NOW - timedelta(minutes=1))
PAUSED = RollState().with_failure(FAILURE).paused_as(PausedBy.BRAKE, "1 node(s) failed",
                                                    NOW - timedelta(minutes=1))
PLAN = Plan(changes=(), recheck_after=None, in_flight=("node-a", "node-s"),
            queue=("node-b", "node-c"), drain_backoff=("node-d",), out_of_roll=("node-e",),
            holds=("paused: the roll is paused, no new reboot slots are granted",))


def node_object(name: str, version: str, annotations: dict[str, str] | None = None,
                heartbeat: str = "2026-12-07T03:59:00Z") -> dict[str, Any]:
    """A Node as the API server sends it, Ready since 03:00, with a kubelet heartbeat."""
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": version,
                         "annotations": annotations or {}, "labels": {"pool": "a"}},
            "spec": {},
            "status": {"conditions": [{"type": "Ready", "status": "True",
                                       "lastHeartbeatTime": heartbeat,
                                       "lastTransitionTime": "2026-12-07T03:00:00Z"}],
                       "nodeInfo": {"bootID": f"boot-{name}"}}}


def views(*objects: dict[str, Any]) -> tuple[NodeView, ...]:
    return tuple(node_view(obj, KEYS) for obj in objects)


NEEDS = {KEYS.reboot_needed: "true", KEYS.last_checked_time: "1700000000"}
NODES = views(node_object("node-a", "11", NEEDS), node_object("node-b", "12", NEEDS),
              node_object("node-i", "13"))  # node-i: idle


def snapshot(roll: RollState = PAUSED, slots: tuple[SlotLease, ...] = (HOLDER, STUCK, FREE),
             nodes: tuple[NodeView, ...] = NODES) -> ClusterSnapshot:
    return ClusterSnapshot(nodes, slots, roll.paused, roll=roll)


# --------------------------------------------------------------------------- building


def test_the_published_document_says_state_holds_slots_queue_backoff_and_failures() -> None:
    document = build_status(PLAN, snapshot(), NOW, "coord-1")
    assert document["schema"] == SCHEMA
    assert document["coordinator"] == "coord-1"
    assert document["computed_at"] == "2026-12-07T04:00:00Z"
    assert document["state"] == "paused"
    assert document["paused"] == {"by": "brake", "reason": "1 node(s) failed",
                                  "since": "2026-12-07T03:59:00Z"}
    assert document["holds"] == list(PLAN.holds)
    assert [s["holder"] for s in document["slots"]] == ["node-a", "node-s"]  # free: left out
    assert document["slots"][0] == {
        "slot": "cluo-reboot-slot-0", "holder": "node-a", "since": "2026-12-07T03:55:50Z",
        "held_seconds": 250, "stuck": False, "announced_version": "4152.0.0"}
    assert document["queue"] == ["node-b", "node-c"] and document["queue_length"] == 2
    assert document["drain_backoff"] == ["node-d"] and document["out_of_roll"] == ["node-e"]
    # The brake's record first, then the stuck holder that is not on it.
    assert [(f["node"], f["why"][:20]) for f in document["failed"]] == [
        ("node-x", "came back on 4081.2."), ("node-s", "stuck: holds cluo-re")]


def test_state_is_held_by_a_hold_running_with_work_idle_without() -> None:
    running = RollState()
    held = Plan((), None, queue=("b",), holds=("window: outside every reboot window",))
    assert build_status(held, snapshot(running), NOW, "c")["state"] == "held"
    assert build_status(Plan((), None, queue=("b",)), snapshot(running), NOW, "c")[
        "state"] == "running"
    assert build_status(Plan((), None), snapshot(running, ()), NOW, "c")["state"] == "idle"


def test_the_document_records_its_inputs_and_when_the_plan_looks_again() -> None:
    plan = Plan((), timedelta(minutes=10, microseconds=1), queue=("node-b",))
    document = build_status(plan, snapshot(), NOW, "c", node_selector="pool=a")
    inputs = document["inputs"]
    assert inputs["node_selector"] == "pool=a"
    assert inputs["slots"] == {"cluo-reboot-slot-0": "5", "cluo-reboot-slot-1": "6",
                               "cluo-reboot-slot-2": "7"}
    assert inputs["nodes_counted"] == 2  # node-a and node-b need a reboot; node-i is idle
    assert document["next_check_at"] == "2026-12-07T04:10:01Z"  # rounded up
    assert build_status(Plan((), None), snapshot(), NOW, "c")["next_check_at"] is None


def test_node_inputs_move_when_a_node_starts_needing_a_reboot_not_for_a_kubelet_report(
) -> None:
    def nodes_digest(*objects: dict[str, Any]) -> str:
        return str(inputs_json(views(*objects), (HOLDER,), PAUSED, "")["nodes"])

    before = nodes_digest(node_object("node-a", "11", NEEDS), node_object("node-i", "13"))
    reported = nodes_digest(node_object("node-a", "11", NEEDS),
                            node_object("node-i", "20", heartbeat="2026-12-07T04:05:00Z"))
    refreshed = nodes_digest(node_object("node-a", "11", NEEDS), node_object(
        "node-i", "21", {KEYS.last_checked_time: "1700009999"}))
    needing = nodes_digest(node_object("node-a", "11", NEEDS),
                           node_object("node-i", "22", NEEDS))
    moved_on = nodes_digest(node_object("node-a", "23", {**NEEDS, KEYS.reboot_ok: "true"}),
                            node_object("node-i", "13"))
    assert before == reported == refreshed  # the plan ignores node-i either way
    assert before not in (needing, moved_on)


def test_a_long_queue_is_capped_with_its_length() -> None:
    queue = tuple(f"n{i:05d}" for i in range(15_000))
    document = build_status(Plan((), None, queue=queue), snapshot(RollState()), NOW, "c")
    assert document["queue"] == list(queue[:LIST_CAP])
    assert document["queue_length"] == 15_000
    assert len(json.dumps(document)) < 10_000  # far below the 1 MiB object limit


# --------------------------------------------------------------------------- reading


def published(at: datetime = NOW, plan: Plan = PLAN) -> dict[str, Any]:
    return {**build_status(plan, snapshot(), at, "coord-1"),
            "published_at": at.strftime("%Y-%m-%dT%H:%M:%SZ")}


def live(nodes: tuple[NodeView, ...] = NODES, slots: tuple[SlotLease, ...] = (HOLDER, STUCK, FREE),
         roll: RollState = PAUSED) -> dict[str, Any]:
    """The inputs as the status command computes them from what it reads now."""
    return inputs_json(nodes, slots, roll, "")


def test_live_pause_and_slots_go_over_the_published_ones() -> None:
    view = merge_status(published(), "", (HOLDER, FREE), RollState(), NOW + timedelta(seconds=5))
    assert view["stale"] is False and view["note"] == ""
    assert view["paused"] is None  # resumed since the coordinator published
    assert view["state"] == "held"  # the published holds are still current
    assert [s["holder"] for s in view["slots"]] == ["node-a"]
    assert view["slots"][0]["held_seconds"] == 255
    assert view["queue"] == ["node-b", "node-c"]


def test_unchanged_inputs_keep_a_status_current_whatever_its_age() -> None:
    view = merge_status(published(), "", (HOLDER, STUCK), PAUSED, NOW + timedelta(hours=5),
                        live=live())
    assert view["stale"] is False and view["note"] == "" and view["changed_since"] == []
    assert view["state"] == "paused" and view["queue"] == ["node-b", "node-c"]
    assert "Computed:  2026-12-07T04:00:00Z by coord-1 (nothing changed since)" in render_text(
        view).splitlines()


def test_changed_inputs_the_coordinator_did_not_publish_make_it_stale_naming_them() -> None:
    needing = views(*(node_object(n, "11", NEEDS) for n in ("node-a", "node-b", "node-i")))
    moved = SlotLease(2, "node-b", resource_version="8")
    view = merge_status(published(), "", (HOLDER, STUCK, moved), RollState(),
                        NOW + timedelta(minutes=1),
                        live=live(needing, (HOLDER, STUCK, moved), RollState()))
    assert view["stale"] is True and view["state"] == "unknown"
    assert view["changed_since"] == [
        "slot Lease cluo-reboot-slot-2", "the nodes in the roll (2 then, 3 now)",
        "the pause or the failed-reboot record"]
    assert view["note"].startswith(
        "the published status is 1m00s old and since then slot Lease cluo-reboot-slot-2, ")
    assert "did not publish within 15s: it may be down" in view["note"]


def test_changed_inputs_the_coordinator_published_again_are_current() -> None:
    moved = SlotLease(2, "node-b", resource_version="8")
    view = merge_status(published(), "", (HOLDER, STUCK, moved), PAUSED, NOW,
                        live=live(slots=(HOLDER, STUCK, moved)), republished=True)
    assert view["stale"] is False and view["note"] == ""
    assert view["changed_since"] == ["slot Lease cluo-reboot-slot-2"]


def test_a_next_check_long_past_with_nothing_published_is_stale() -> None:
    plan = Plan((), timedelta(minutes=10), queue=("node-b",))  # e.g. a window opens then
    document = published(plan=plan)
    on_time = NOW + timedelta(minutes=10, seconds=CONFIRM_WAIT)
    assert merge_status(document, "", (HOLDER,), RollState(), on_time, live=live())[
        "stale"] is False
    view = merge_status(document, "", (HOLDER,), RollState(), on_time + timedelta(seconds=1),
                        live=live())
    assert view["stale"] is True
    assert view["note"].startswith("the coordinator was to plan again at 2026-12-07T04:10:00Z "
                                   "and has not published since (10m16s ago)")


def test_a_document_without_inputs_older_than_two_minutes_is_stale_and_says_so() -> None:
    """An older coordinator's: it rewrote the document every minute."""
    document = published(NOW - timedelta(minutes=3))
    del document["inputs"]
    view = merge_status(document, "", (HOLDER,), RollState(), NOW, live=live())
    assert view["stale"] is True and view["state"] == "unknown"
    assert "3m00s old" in view["note"] and "may be down" in view["note"]
    text = render_text(view)
    assert text.splitlines()[0].startswith("WARNING: the published status is 3m00s old")
    assert "Held by:" not in text  # holds are not shown as current
    assert "Held by (then):  paused: the roll is paused" in text


class FakeApi:
    """The ConfigMap calls of the status view, recorded (a missing ConfigMap is a 404, each
    write a new resourceVersion), and the Node list, two per page."""

    def __init__(self, nodes: tuple[dict[str, Any], ...] = ()) -> None:
        self.configmap: dict[str, Any] | None = None
        self.nodes = list(nodes)
        self.calls: list[str] = []
        self.queries: list[dict[str, Any]] = []
        self.fail: KubeError | None = None
        self.version = 100

    def call(self, action: str, method: str, path: str, *, body: Any = None,
             query: dict[str, Any] | None = None, **_: Any) -> Any:
        self.calls.append(method)
        if self.fail is not None:
            raise self.fail
        if path == "/api/v1/nodes":
            self.queries.append(dict(query or {}))
            start = int((query or {}).get("continue") or 0)
            more = start + 2 < len(self.nodes)
            return {"metadata": {"continue": str(start + 2) if more else ""},
                    "items": self.nodes[start:start + 2]}
        if method == "GET" or (method == "PUT" and self.configmap is None):
            if self.configmap is None:
                raise KubeError(action, "not found", kind="not_found", status=404)
            return self.configmap
        self.publish(body)
        return body

    def publish(self, body: dict[str, Any]) -> None:
        self.version += 1
        self.configmap = {**body, "metadata": {**body.get("metadata", {}),
                                               "resourceVersion": str(self.version)}}


def test_a_missing_status_says_the_coordinator_may_not_be_running() -> None:
    view = read_status(cast(KubeClient, FakeApi()), "cluo-system", (HOLDER,), PAUSED, NOW,
                       keys=KEYS)
    assert view["stale"] is True and view["state"] == "paused"
    assert f"cluo-system/{STATUS_CONFIGMAP_NAME} not found" in view["note"]
    assert [s["holder"] for s in view["slots"]] == ["node-a"]  # the live part still shows


NODE_OBJECTS = (node_object("node-a", "11", NEEDS), node_object("node-b", "12", NEEDS),
                node_object("node-i", "13"))
SLOTS = (HOLDER, STUCK, FREE)


def published_by_a_coordinator(api: FakeApi) -> StatusPublisher:
    status = StatusPublisher(cast(KubeClient, api), "cluo-system", "coord-1",
                             node_selector="pool=a", clock=lambda: NOW, monotonic=Clock())
    status.offer(PLAN, snapshot(), NOW)
    assert status.publish_once()
    return status


def test_the_status_command_lists_the_nodes_by_the_selector_and_does_not_wait_when_nothing_changed(
) -> None:
    api = FakeApi(NODE_OBJECTS)
    published_by_a_coordinator(api)
    waits: list[float] = []
    view = read_status(cast(KubeClient, api), "cluo-system", SLOTS, PAUSED,
                       NOW + timedelta(hours=3), keys=KEYS, sleep=waits.append)
    assert view["stale"] is False and view["changed_since"] == [] and waits == []
    assert [q["labelSelector"] for q in api.queries] == ["pool=a", "pool=a"]  # two pages
    assert api.queries[1]["continue"] == "2"


def test_the_status_command_waits_for_a_change_to_be_published_then_shows_it_current() -> None:
    api = FakeApi((*NODE_OBJECTS, node_object("node-n", "14", NEEDS)))  # a new one to reboot
    published_by_a_coordinator(api)
    waits: list[float] = []

    def coordinator_publishes_on_the_third_second(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            assert api.configmap is not None
            api.publish(api.configmap)

    view = read_status(cast(KubeClient, api), "cluo-system", SLOTS, PAUSED, NOW, keys=KEYS,
                       sleep=coordinator_publishes_on_the_third_second)
    assert view["stale"] is False and view["note"] == ""
    assert sum(waits) == 3


def test_the_status_command_calls_a_change_nobody_published_stale_after_waiting() -> None:
    api = FakeApi((*NODE_OBJECTS, node_object("node-n", "14", NEEDS)))
    published_by_a_coordinator(api)
    waits: list[float] = []
    view = read_status(cast(KubeClient, api), "cluo-system", SLOTS, PAUSED, NOW, keys=KEYS,
                       sleep=waits.append)
    assert sum(waits) == CONFIRM_WAIT
    assert view["stale"] is True and view["state"] == "paused"  # the pause is live
    assert view["changed_since"] == ["the nodes in the roll (2 then, 3 now)"]
    assert "it may be down" in view["note"]


# --------------------------------------------------------------------------- rendering


def test_terminal_output_has_aligned_columns_and_every_section() -> None:
    view = merge_status(published(), "", (HOLDER, STUCK), PAUSED, NOW)
    text = render_text(view)
    lines = text.splitlines()
    assert lines[0] == ("Roll:      paused by brake since 2026-12-07T03:59:00Z: "
                        "1 node(s) failed")
    assert lines[1] == "Held by:   paused: the roll is paused, no new reboot slots are granted"
    assert lines[2] == "Computed:  2026-12-07T04:00:00Z by coord-1"
    header = lines[lines.index("") + 1]
    assert header.split() == ["SLOT", "HOLDER", "SINCE", "FOR", "STUCK", "ANNOUNCED"]
    row = lines[lines.index(header) + 1]
    assert row.split() == ["cluo-reboot-slot-0", "node-a", "2026-12-07T03:55:50Z", "4m10s",
                           "no", "4152.0.0"]
    assert row.index("node-a") == header.index("HOLDER")  # aligned
    assert "Queue (2):" in lines and "    1  node-b" in lines and "    2  node-c" in lines
    assert "In drain backoff:  node-d" in lines and "Out of the roll:   node-e" in lines
    failed = lines[lines.index("Failed reboots:") + 1:]
    assert failed[0].split() == ["NODE", "AT", "WHY"]
    assert failed[1].split()[:2] == ["node-x", "2026-12-07T03:59:00Z"]
    assert failed[2].startswith("  node-s") and "stuck" in failed[2]


def test_json_output_is_the_view_as_documented() -> None:
    view = merge_status(published(), "", (HOLDER,), PAUSED, NOW)
    parsed = json.loads(render_json(view))
    assert {"schema", "coordinator", "computed_at", "published_at", "stale", "note", "state",
            "paused", "holds", "slots", "in_flight", "queue", "queue_length", "drain_backoff",
            "out_of_roll", "failed"} <= parsed.keys()
    assert parsed["state"] == "paused" and parsed["paused"]["by"] == "brake"


# --------------------------------------------------------------------------- publishing


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class WallClock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def publisher(api: FakeApi, clock: Clock, wall: WallClock | None = None) -> StatusPublisher:
    return StatusPublisher(cast(KubeClient, api), "cluo-system", "coord-1", interval=5.0,
                           clock=wall or (lambda: NOW), monotonic=clock)


def test_publishes_only_changes_at_most_once_per_interval_and_nothing_while_idle() -> None:
    api, clock = FakeApi(), Clock()
    status = publisher(api, clock)
    status.offer(PLAN, snapshot(), NOW)
    assert status.publish_once()  # created
    data = api.configmap["data"]  # type: ignore[index]
    assert json.loads(data[DATA_KEY])["queue"] == ["node-b", "node-c"]
    assert data["state"] == "paused" and data["coordinator"] == "coord-1"
    assert data["published-at"] == "2026-12-07T04:00:00Z"

    clock.t += 10
    status.offer(PLAN, snapshot(), NOW + timedelta(seconds=10))  # same content, later
    assert not status.publish_once()

    changed = Plan((), None, queue=("node-c",))
    status.offer(changed, snapshot(), NOW)
    clock.t += 1
    status.publish_once()
    clock.t += 1  # within the interval: kept for later, not written
    status.offer(Plan((), None), snapshot(), NOW)
    assert not status.publish_once()
    clock.t += 5
    assert status.publish_once()
    assert json.loads(api.configmap["data"][DATA_KEY])["queue"] == []  # type: ignore[index]

    for _ in range(60):  # an idle hour, planned once a minute: no write
        clock.t += 60
        status.offer(Plan((), None), snapshot(), NOW)
        assert not status.publish_once()
    assert status.writes == 3


def test_inputs_that_moved_are_published_though_the_rest_is_the_same() -> None:
    api, clock = FakeApi(), Clock()
    status = publisher(api, clock)
    status.offer(PLAN, snapshot(), NOW)
    assert status.publish_once()
    clock.t += 10
    recorded = SlotLease(2, resource_version="9")  # e.g. the health gate's record on it
    status.offer(PLAN, snapshot(slots=(HOLDER, STUCK, recorded)), NOW)
    assert status.publish_once()
    inputs = json.loads(api.configmap["data"][DATA_KEY])["inputs"]  # type: ignore[index]
    assert inputs["slots"]["cluo-reboot-slot-2"] == "9"


def test_a_next_check_moved_later_or_gone_is_published_an_earlier_one_is_not() -> None:
    api, clock, wall = FakeApi(), Clock(), WallClock()
    status = publisher(api, clock, wall)

    def plan_at(minutes: float, recheck: timedelta | None) -> bool:
        clock.t += 10
        wall.now = NOW + timedelta(minutes=minutes)
        status.offer(Plan((), recheck, queue=("node-b",)), snapshot(), wall.now)
        return status.publish_once()

    assert plan_at(0, timedelta(minutes=10))  # next check 04:10
    assert not plan_at(1, timedelta(minutes=9))  # 04:10 again
    assert not plan_at(2, timedelta(minutes=3))  # 04:05, earlier: the plan then writes
    assert plan_at(5, timedelta(minutes=10))  # 04:15: later than the written 04:10
    assert plan_at(6, None)  # gone: a reader would wait for 04:15
    assert not plan_at(7, timedelta(minutes=1))
    assert status.writes == 3


def test_a_failed_write_is_logged_and_retried_later_never_raised() -> None:
    api, clock = FakeApi(), Clock()
    status = publisher(api, clock)
    api.fail = KubeError("publishing", "forbidden", kind="forbidden", status=403)
    status.offer(PLAN, snapshot(), NOW)
    assert not status.publish_once()
    api.fail = None
    assert not status.publish_once()  # not at once: after the interval
    clock.t += 5
    assert status.publish_once() and api.configmap is not None


def test_status_takes_o_json_and_output_json_and_refuses_other_formats() -> None:
    assert load_admin_settings(["status", "-o", "json"], {}).output == "json"
    assert load_admin_settings(["status", "--output", "json"], {}).output == "json"
    assert load_admin_settings(["status"], {}).output == "text"
    with pytest.raises(ConfigError, match="not one of text, json"):
        load_admin_settings(["status", "-o", "yaml"], {})
