"""The status view: what the leader publishes, what ``cluo-coord status`` shows (terminal and
JSON), and when the published part is stale."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from cluo.errors import ConfigError, KubeError
from cluo.kube.client import KubeClient
from cluo.protocol import STATUS_CONFIGMAP_NAME
from cluo_coord.brake import FailedReboot, PausedBy, RollState
from cluo_coord.cluster import ClusterSnapshot
from cluo_coord.config import load_admin_settings
from cluo_coord.planner import Plan, SlotLease
from cluo_coord.status import (
    DATA_KEY,
    LIST_CAP,
    SCHEMA,
    StatusPublisher,
    build_status,
    merge_status,
    read_status,
    render_json,
    render_text,
)

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


def snapshot(roll: RollState = PAUSED, slots: tuple[SlotLease, ...] = (HOLDER, STUCK, FREE)
             ) -> ClusterSnapshot:
    return ClusterSnapshot((), slots, roll.paused, roll=roll)


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


def test_a_long_queue_is_capped_with_its_length() -> None:
    queue = tuple(f"n{i:05d}" for i in range(15_000))
    document = build_status(Plan((), None, queue=queue), snapshot(RollState()), NOW, "c")
    assert document["queue"] == list(queue[:LIST_CAP])
    assert document["queue_length"] == 15_000
    assert len(json.dumps(document)) < 10_000  # far below the 1 MiB object limit


# --------------------------------------------------------------------------- reading


def published(at: datetime = NOW) -> dict[str, Any]:
    return {**build_status(PLAN, snapshot(), at, "coord-1"),
            "published_at": at.strftime("%Y-%m-%dT%H:%M:%SZ")}


def test_live_pause_and_slots_go_over_the_published_ones() -> None:
    view = merge_status(published(), "", (HOLDER, FREE), RollState(), NOW + timedelta(seconds=5))
    assert view["stale"] is False and view["note"] == ""
    assert view["paused"] is None  # resumed since the coordinator published
    assert view["state"] == "held"  # the published holds are still current
    assert [s["holder"] for s in view["slots"]] == ["node-a"]
    assert view["slots"][0]["held_seconds"] == 255
    assert view["queue"] == ["node-b", "node-c"]


def test_a_status_older_than_two_minutes_is_stale_and_says_so() -> None:
    view = merge_status(published(NOW - timedelta(minutes=3)), "", (HOLDER,), RollState(), NOW)
    assert view["stale"] is True and view["state"] == "unknown"
    assert "3m00s old" in view["note"] and "may be down" in view["note"]
    text = render_text(view)
    assert text.splitlines()[0].startswith("WARNING: the published status is 3m00s old")
    assert "Held by:" not in text  # holds are not shown as current
    assert "Held by (then):  paused: the roll is paused" in text


class FakeApi:
    """The ConfigMap calls of the status view, recorded; a missing ConfigMap is a 404."""

    def __init__(self) -> None:
        self.configmap: dict[str, Any] | None = None
        self.calls: list[str] = []
        self.fail: KubeError | None = None

    def call(self, action: str, method: str, path: str, *, body: Any = None,
             **_: Any) -> Any:
        self.calls.append(method)
        if self.fail is not None:
            raise self.fail
        if method == "GET" or (method == "PUT" and self.configmap is None):
            if self.configmap is None:
                raise KubeError(action, "not found", kind="not_found", status=404)
            return self.configmap
        self.configmap = body
        return body


def test_a_missing_status_says_the_coordinator_may_not_be_running() -> None:
    view = read_status(cast(KubeClient, FakeApi()), "cluo-system", (HOLDER,), PAUSED, NOW)
    assert view["stale"] is True and view["state"] == "paused"
    assert f"cluo-system/{STATUS_CONFIGMAP_NAME} not found" in view["note"]
    assert [s["holder"] for s in view["slots"]] == ["node-a"]  # the live part still shows


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


def publisher(api: FakeApi, clock: Clock, *, alive: bool = True) -> StatusPublisher:
    return StatusPublisher(cast(KubeClient, api), "cluo-system", "coord-1",
                           alive=lambda: alive, interval=5.0, heartbeat=60.0,
                           clock=lambda: NOW, monotonic=clock)


def test_publishes_only_changes_at_most_once_per_interval_and_a_heartbeat() -> None:
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

    clock.t += 61  # nothing changed, but the heartbeat is due
    assert status.publish_once() and status.writes == 4


def test_no_heartbeat_while_the_loop_is_not_alive_so_the_status_goes_stale() -> None:
    api, clock = FakeApi(), Clock()
    status = publisher(api, clock, alive=False)
    status.offer(PLAN, snapshot(), NOW)
    assert status.publish_once()
    clock.t += 120
    assert not status.publish_once()


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
