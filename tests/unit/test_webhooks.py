"""Notifications by webhook: which roll events are sent (cluo_coord/roll_events.py), how
their body is rendered, how --webhook-* is checked, and how a sender retries, drops and
stops (cluo_coord/webhooks.py) — the sender on fake time and a fake POST."""

from __future__ import annotations

import json
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cluo.backoff import Backoff
from cluo.errors import ConfigError
from cluo.protocol import NodeProtocolState
from cluo_coord.config import load_settings
from cluo_coord.planner import EmitEvent, EventType, NodeView, Plan, Reason, SlotLease
from cluo_coord.roll_events import (
    DONE,
    DRAINED,
    FAILED,
    GRANTED,
    PAUSED,
    RESUMED,
    RollEvent,
    RollEvents,
    from_posted_event,
)
from cluo_coord.webhooks import (
    DELIVERED,
    DROPPED,
    REFUSED,
    Answer,
    BodyTemplate,
    RetryPolicy,
    Sender,
    Target,
    WebhookNotifier,
    event_fields,
    parse_retry_after,
    redact_url,
)
from testbed.waiting import wait_for
from tests.unit.coord_fakes import KEYS, T0, CoordRig, Journal, unavailable

SECRET_URL = "https://hooks.example.com/services/T000/B000/s3cr3t-t0ken"
NO_JITTER = Backoff(initial=1.0, maximum=8.0)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "coordinator.md"


def documented_templates() -> list[str]:
    """The ```json blocks of docs/coordinator.md's Notifications section."""
    section = DOCS.read_text().split("\n## Notifications\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```json\n(.*?)\n```", section, flags=re.DOTALL)


SLACK, TEAMS, MATTERMOST = documented_templates()


# -- rendering ---------------------------------------------------------------------------


def fields(**values: str) -> dict[str, str]:
    event = RollEvent(GRANTED, "node-a", "RebootApproved", "granted", "Normal", T0)
    return {**event_fields(event, cluster="prod", coordinator="coord-0", namespace="ops"),
            **values}


def test_the_default_body_is_a_json_object_of_every_field() -> None:
    assert json.loads(BodyTemplate().render(fields())) == {
        "event": "granted", "node": "node-a", "reason": "RebootApproved",
        "message": "granted", "type": "Normal", "time": "2026-03-02T09:00:00Z",
        "cluster": "prod", "coordinator": "coord-0", "namespace": "ops"}


@pytest.mark.parametrize("template", [SLACK, TEAMS, MATTERMOST])  # as documented
def test_quotes_newlines_and_backslashes_in_values_cannot_break_the_document(
    template: str,
) -> None:
    node = 'we"ird\\node'
    message = 'line one\nline "two"\t$node ${event} </script>'
    body = json.loads(BodyTemplate.parse(template).render(fields(node=node, message=message)))
    text = json.dumps(body)
    assert json.dumps(node)[1:-1] in text and json.dumps(message)[1:-1] in text


def test_a_field_is_substituted_once_and_dollars_are_written_twice() -> None:
    body = BodyTemplate.parse('{"text": "$$5 on $node"}').render(fields(node="$message"))
    assert json.loads(body) == {"text": "$5 on $message"}


@pytest.mark.parametrize(("template", "problem"), [
    ('{"text": "$nod"}', "unknown field $nod"),
    ('{"text": "cost: 5$"}', "a '$' starts no field name"),
    ('{"node": $node}', "does not render to valid JSON"),
    ('{"text": "$node"', "does not render to valid JSON"),
])
def test_a_bad_template_stops_the_start_naming_the_problem(template: str, problem: str
                                                           ) -> None:
    with pytest.raises(ConfigError, match="--webhook-template: ") as raised:
        load_settings(["--webhook-url", SECRET_URL, "--webhook-template", template], {})
    assert problem in str(raised.value)


def test_a_template_is_read_from_a_file_given_with_an_at(tmp_path: Path) -> None:
    path = tmp_path / "slack.json"
    path.write_text(SLACK)
    settings = load_settings(["--webhook-url", SECRET_URL, "--webhook-template", f"@{path}"],
                             {})
    assert settings.webhooks.template == BodyTemplate(SLACK)
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.json"):
        load_settings(["--webhook-url", SECRET_URL,
                       "--webhook-template", f"@{tmp_path / 'missing.json'}"], {})


# -- settings ----------------------------------------------------------------------------


def test_urls_and_headers_repeat_as_flags_or_one_a_line_in_their_variable() -> None:
    settings = load_settings(
        ["--webhook-url", SECRET_URL, "--webhook-url", "http://receiver:8080/hook",
         "--webhook-header", "Authorization: Bearer abc", "--cluster-name", "prod"], {})
    assert settings.webhooks.urls == (SECRET_URL, "http://receiver:8080/hook")
    assert settings.webhooks.headers == (("Authorization", "Bearer abc"),)
    assert settings.webhooks.cluster == "prod"
    from_env = load_settings([], {"CLUO_COORD_WEBHOOK_URL": f"{SECRET_URL}\nhttp://r/h\n",
                                  "CLUO_COORD_WEBHOOK_HEADER": "X-A: 1\nX-B: 2"})
    assert from_env.webhooks.urls == (SECRET_URL, "http://r/h")
    assert from_env.webhooks.headers == (("X-A", "1"), ("X-B", "2"))
    assert load_settings([], {}).webhooks.urls == ()


@pytest.mark.parametrize(("argv", "problem"), [
    (["--webhook-url", "ftp://hooks.example.com/s3cr3t-t0ken"], "not an http:// or https://"),
    (["--webhook-url", "https://user:s3cr3t-t0ken@hooks.example.com/"], "credentials"),
    (["--webhook-url", SECRET_URL, "--webhook-header", "Bearer s3cr3t-t0ken"],
     "a header is 'Name: value'"),
    (["--webhook-header", "Authorization: Bearer s3cr3t-t0ken"], "no --webhook-url"),
    (["--webhook-url", SECRET_URL, "--webhook-header", "X-Key: s3cr3t-t0ken\u00e9"],
     "printable ASCII"),
    (["--webhook-url", SECRET_URL, "--webhook-timeout", "0s"], "positive duration"),
])
def test_bad_webhook_settings_are_refused_without_showing_a_secret(argv: list[str],
                                                                   problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(argv, {})
    assert problem in str(raised.value)
    assert "s3cr3t" not in str(raised.value)


def test_logs_name_a_url_by_scheme_and_host_only() -> None:
    assert redact_url(SECRET_URL) == "https://hooks.example.com/…"
    assert redact_url("http://10.0.0.1:8080/x?token=1") == "http://10.0.0.1:8080/…"
    assert "s3cr3t" not in repr(Target(SECRET_URL, (("Authorization", "s3cr3t"),)))
    settings = load_settings(["--webhook-url", SECRET_URL], {})
    assert "s3cr3t" not in repr(settings)


# -- which roll events are sent ---------------------------------------------------------


def posted(reason: Reason, type_: EventType = EventType.NORMAL) -> RollEvent | None:
    return from_posted_event(EmitEvent("node-a", type_, reason, "text"), T0)


def test_posted_events_map_to_roll_events_through_one_table() -> None:
    assert [getattr(posted(reason), "event", None) for reason in (
        Reason.SLOT_ACQUIRED, Reason.REBOOT_APPROVED, Reason.REBOOT_FINISHED)] == [
        None, GRANTED, DONE]
    failed = posted(Reason.DRAIN_BLOCKED, EventType.WARNING)
    assert failed == RollEvent(FAILED, "node-a", "DrainBlocked", "text", "Warning", T0)
    # The Normal DrainBlocked is the release after a failure already reported.
    assert posted(Reason.DRAIN_BLOCKED) is None


def test_a_warning_event_of_a_reason_not_in_the_table_is_sent_as_a_warning() -> None:
    class NewReason:  # a reason another part of the planner added
        value = "SomethingNew"

    change = EmitEvent("node-a", EventType.WARNING, NewReason(), "text")  # type: ignore[arg-type]
    assert getattr(from_posted_event(change, T0), "event", None) == "warning"
    normal = EmitEvent("node-a", EventType.NORMAL, NewReason(), "text")  # type: ignore[arg-type]
    assert from_posted_event(normal, T0) is None


def view(name: str, **state: object) -> NodeView:
    return NodeView(name, NodeProtocolState(**state), "1", boot_id=f"boot-{name}")  # type: ignore[arg-type]


def test_drained_is_sent_once_when_the_holder_records_its_boot_id_before_reboot() -> None:
    events = RollEvents()
    slots = [SlotLease(0, "a", "1")]
    granted = view("a", reboot_ok=True, reboot_needed=True)
    drained = view("a", reboot_ok=True, reboot_needed=True, boot_id_before_reboot="boot-a")
    plan = Plan((), None)
    assert events.from_plan([granted], slots, plan, T0) == []
    (event,) = events.from_plan([drained], slots, plan, T0)
    assert (event.event, event.node) == (DRAINED, "a")
    assert events.from_plan([drained], slots, plan, T0) == []  # once
    # Not for a node that holds no slot, nor once its reboot is proven.
    assert RollEvents().from_plan([drained], [SlotLease(0)], plan, T0) == []
    proven = view("a", reboot_ok=True, boot_id_before_reboot="boot-a", after_reboot=True)
    assert RollEvents().from_plan([proven], slots, plan, T0) == []


def test_a_hold_is_sent_when_it_appears_and_its_end_only_while_nodes_queue() -> None:
    events = RollEvents()
    paused = Plan((), None, queue=("a",), holds=("paused: the roll is paused",))
    (event,) = events.from_plan([], [], paused, T0)
    assert (event.event, event.node, event.reason) == (PAUSED, "", "paused")
    assert events.from_plan([], [], paused, T0) == []
    (event,) = events.from_plan([], [], Plan((), None, queue=("a",)), T0)
    assert (event.event, event.reason) == (RESUMED, "paused")
    # A window holds the queue: blocked; the queue empties meanwhile: no "unblocked".
    window = Plan((), None, queue=("a",), holds=("window: outside every reboot window",))
    assert [e.event for e in events.from_plan([], [], window, T0)] == ["blocked"]
    assert events.from_plan([], [], Plan((), None), T0) == []


# -- the driver notifies what it applied --------------------------------------------------


class JournaledNotifier:
    """Writes each Event it is told of to the rig's journal."""

    journal: Journal | None = None

    def posted(self, change: EmitEvent, now: datetime) -> None:
        assert self.journal is not None
        self.journal.add("notified", change.node, change.reason.value)

    def planned(self, nodes: object, slots: object, plan: Plan, now: datetime) -> None:
        return None


def test_the_driver_notifies_an_event_only_once_its_change_was_applied() -> None:
    notifier = JournaledNotifier()
    rig = CoordRig(notifier=notifier)  # type: ignore[arg-type]
    notifier.journal = rig.journal
    rig.cluster.add_node("a", **{KEYS.reboot_needed: "false"})
    rig.cluster.hold(0, "a", acquired_at=T0 - timedelta(minutes=5), holder_boot_id="boot-old")
    rig.cluster.fail("release", unavailable("releasing reboot slot 0"))
    journal = rig.run(until=30)
    (failed,) = journal.of("release", ok=False)
    (release,) = journal.of("release", ok=True)
    (notified,) = journal.of("notified")
    assert notified.detail == "RebootFinished"
    assert journal.index(failed) < journal.index(release) < journal.index(notified)


# -- delivery: retries on fake time -------------------------------------------------------


class Counted:
    def __init__(self) -> None:
        self.results: list[str] = []
        self.retries = 0

    def webhook_delivery(self, result: str) -> None:
        self.results.append(result)

    def webhook_retry(self) -> None:
        self.retries += 1


class Receiver:
    """A fake POST: answers from a script, then 200."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.bodies: list[bytes] = []

    def __call__(self, target: Target, body: bytes) -> Answer:
        self.bodies.append(body)
        return self.answers.pop(0) if self.answers else Answer(200)


def sender(receiver: Receiver, *, attempts: int = 4, slept: list[float] | None = None,
           metrics: Counted | None = None, queue_size: int = 10) -> Sender:
    waits = slept if slept is not None else []
    return Sender(Target("http://receiver/hook"), RetryPolicy(attempts, NO_JITTER),
                  metrics or Counted(), post=receiver, queue_size=queue_size,
                  sleep=lambda seconds: bool(waits.append(seconds)), clock=lambda: T0)


RETRIES = [  # the answers, the waits between attempts, the result
    ([Answer(500), Answer(None, error="connection refused"), Answer(200)], [1.0, 2.0],
     DELIVERED),
    ([Answer(429, retry_after=30.0)], [30.0], DELIVERED),  # Retry-After beats the backoff
    ([Answer(503, retry_after=9999.0)], [120.0], DELIVERED),  # capped
    ([Answer(503, retry_after=T0 + timedelta(seconds=30))], [30.0], DELIVERED),  # a date
    ([Answer(429, retry_after=T0 + timedelta(days=1))], [120.0], DELIVERED),  # capped too
    ([Answer(503, retry_after=T0 - timedelta(hours=1))], [1.0], DELIVERED),  # gone by: no wait
    ([Answer(404)], [], REFUSED),  # a 4xx is final
    ([Answer(302)], [], REFUSED),  # so is a redirect
    ([Answer(500)] * 4, [1.0, 2.0, 4.0], "failed"),  # out of attempts
]


@pytest.mark.parametrize(("answers", "waits", "result"), RETRIES)
def test_retries_back_off_on_no_answer_429_and_5xx_only(
    answers: list[Answer], waits: list[float], result: str
) -> None:
    slept: list[float] = []
    metrics = Counted()
    receiver = Receiver(*answers)
    assert sender(receiver, slept=slept, metrics=metrics).deliver(b"{}", "granted", "a") == result
    assert slept == waits
    assert len(receiver.bodies) == len(waits) + 1
    assert metrics.results == [result] and metrics.retries == len(waits)


@pytest.mark.parametrize(("header", "asked"), [
    ("120", 120.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", datetime(2015, 10, 21, 7, 28, tzinfo=UTC)),
    ("Wednesday, 21-Oct-15 07:28:00 GMT", datetime(2015, 10, 21, 7, 28, tzinfo=UTC)),  # RFC 850
    ("Wed Oct 21 07:28:00 2015", datetime(2015, 10, 21, 7, 28, tzinfo=UTC)),  # asctime
    ("0", None),
    ("soon", None),
    (None, None),
])
def test_retry_after_is_read_as_delay_seconds_or_an_http_date(
    header: str | None, asked: float | datetime | None
) -> None:
    assert parse_retry_after(header) == asked


def test_a_full_queue_drops_its_oldest_event() -> None:
    receiver, metrics = Receiver(), Counted()
    queue = sender(receiver, metrics=metrics, queue_size=2)
    for body in (b"1", b"2", b"3"):
        queue.submit(body, "granted", "a")
    assert metrics.results == [DROPPED] and queue.pending() == 2
    queue.start()
    queue.stop(grace=10.0)
    assert receiver.bodies == [b"2", b"3"]
    assert metrics.results == [DROPPED, DELIVERED, DELIVERED]


def test_submitting_never_waits_for_a_receiver_that_does_not_answer() -> None:
    release = threading.Event()
    entered = threading.Event()
    metrics = Counted()

    def hanging(target: Target, body: bytes) -> Answer:
        entered.set()
        release.wait(10.0)
        return Answer(None, error="timed out")

    queue = Sender(Target("http://receiver/hook"), RetryPolicy(1, NO_JITTER), metrics,
                   post=hanging, queue_size=3)
    queue.start()
    queue.submit(b"0", "granted", "a")
    wait_for(entered.is_set, 10.0, "the sender's first attempt")
    for i in range(5):
        queue.submit(str(i + 1).encode(), "done", "a")
    assert not release.is_set() and queue.pending() == 3  # 2 dropped, none waited for
    assert metrics.results == [DROPPED, DROPPED]
    release.set()
    queue.stop(grace=0.0)
    # Each of the six ends once: failed after its one attempt, or dropped.
    assert len(metrics.results) == 6 and set(metrics.results) <= {DROPPED, "failed"}


def test_stopping_ends_a_retry_wait_and_drops_the_event() -> None:
    metrics = Counted()
    queue = Sender(Target("http://receiver/hook"), RetryPolicy(5, NO_JITTER), metrics,
                   post=Receiver(*[Answer(500)] * 5))
    queue.start()
    queue.submit(b"{}", "granted", "a")
    queue.stop(grace=1.0)
    assert metrics.results == [DROPPED]


# -- the notifier ------------------------------------------------------------------------


def test_the_notifier_renders_each_event_once_for_every_url() -> None:
    first, second = Receiver(), Receiver()
    settings = load_settings(["--webhook-url", "http://one/h", "--webhook-url", "http://two/h",
                              "--webhook-template", SLACK, "--cluster-name", "prod"], {})
    posts = {"http://one/h": first, "http://two/h": second}
    notifier = WebhookNotifier(settings.webhooks, Counted(), coordinator="coord-0",
                               namespace="ops",
                               post=lambda target, body: posts[target.url](target, body))
    notifier.start()
    notifier.posted(EmitEvent("node-a", EventType.NORMAL, Reason.REBOOT_VERIFIED,
                              'back with "boot-2"'), T0)
    notifier.posted(EmitEvent("node-a", EventType.NORMAL, Reason.SLOT_ACQUIRED, "x"), T0)
    notifier.stop()
    expected = {"text": 'prod: node-a rebooted (RebootVerified): back with "boot-2"'}
    assert [json.loads(body) for body in first.bodies] == [expected]
    assert second.bodies == first.bodies


def test_no_url_no_sender() -> None:
    notifier = WebhookNotifier(load_settings([], {}).webhooks, Counted(), coordinator="c",
                               namespace="n")
    assert notifier.senders == []
