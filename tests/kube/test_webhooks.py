"""Webhooks under the real coordinator: a roll told to real HTTP receivers.

The rig of tests/kube/test_coordinator.py (the real ``cluo-coord`` as a process with its
ServiceAccount, KWOK-emulated nodes, ``FakeAgents`` standing in for the agents) with
``--webhook-url`` pointing at receivers of the test bed (testbed/http_receiver.py: a
threaded HTTP server on a loopback port that records every request). A roll paused and
resumed reaches a receiver event by event, in order; a receiver that answers 500 at
first gets the event on a later attempt; receivers that refuse connections or never
answer do not hold up the roll, and their failures are counted. The HTTP adapter itself
(``urllib_post``) is checked against the same receivers first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cluo_coord.webhooks import Answer, Target, urllib_post
from testbed.http_receiver import HttpReceiver, refused_url
from testbed.waiting import wait_for
from tests.kube import test_coordinator as coordinator_tests

pytestmark = pytest.mark.kube

Rig = coordinator_tests.Rig
coord_kubeconfig = coordinator_tests.coord_kubeconfig  # fixtures, shared with that file
rig = coordinator_tests.rig

ROLL_TIMEOUT = 60.0
NODE_EVENTS = ["granted", "drained", "rebooted", "done"]  # one reboot, in this order
SLACK = '{"text": "$cluster: $node $event ($reason): $message"}'
TOKEN = "Bearer webhook-test-token"
RETRY_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"  # Retry-After as an HTTP date


def _of(bodies: list[Any], node: str) -> list[str]:
    return [body["event"] for body in bodies if body["node"] == node]


def _slack_events(receiver: HttpReceiver) -> list[str]:
    """The events of the bodies delivered with the SLACK template ("$cluster: $node $event ...")."""
    return [body["text"].split()[2] for body in receiver.delivered()]


def _done(receiver: HttpReceiver, names: list[str]) -> bool:
    return all("done" in _of(receiver.delivered(), name) for name in names)


def test_the_http_adapter_tells_an_answer_from_no_answer() -> None:
    with HttpReceiver(fail_first=1, fail_status=503, retry_after="7") as receiver:
        target = Target(receiver.url, (("X-Test", "1"),), timeout=5.0)
        assert urllib_post(target, b'{"a": 1}') == Answer(503, retry_after=7.0)
        assert urllib_post(target, b'{"a": 2}') == Answer(200)
        assert [r.json() for r in receiver.received()] == [{"a": 1}, {"a": 2}]
        assert receiver.received()[0].headers["x-test"] == "1"
        assert receiver.received()[0].headers["user-agent"].startswith("cluo-coord/")
    with HttpReceiver(fail_first=1, fail_status=429, retry_after=RETRY_DATE) as receiver:
        answer = urllib_post(Target(receiver.url, timeout=5.0), b"{}")
    assert answer == Answer(429, retry_after=datetime(2015, 10, 21, 7, 28, tzinfo=UTC))
    with HttpReceiver(hang=True) as hanging:
        answer = urllib_post(Target(hanging.url, timeout=0.5), b"{}")
    assert (answer.status, answer.retryable) == (None, True) and "timed out" in answer.error
    answer = urllib_post(Target(refused_url(), timeout=5.0), b"{}")
    assert answer.status is None and "refused" in answer.error.lower()


def test_a_paused_then_resumed_roll_reaches_the_receiver_event_by_event(rig: Rig) -> None:
    names = rig.add_nodes(2)
    result = rig.admin_command("pause")
    assert result.returncode == 0, result.stderr
    with HttpReceiver() as receiver, rig.agents() as agents:
        coord = rig.start("--webhook-url", receiver.url, "--cluster-name", "test-cluster")
        wait_for(lambda: any(b["event"] == "paused" for b in receiver.delivered()), 30,
                 "the 'paused' roll event")
        result = rig.admin_command("resume")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: _done(receiver, names), ROLL_TIMEOUT,
                 "the 'done' roll event of both nodes")
    assert not agents.errors
    bodies = receiver.delivered()
    for name in names:
        assert _of(bodies, name) == NODE_EVENTS, name
    roll = [(body["event"], body["reason"]) for body in bodies if not body["node"]]
    assert roll[:2] == [("paused", "paused"), ("resumed", "paused")]
    first_grant = next(i for i, body in enumerate(bodies) if body["event"] == "granted")
    assert bodies.index(next(b for b in bodies if b["event"] == "resumed")) < first_grant
    granted = next(b for b in bodies if b["event"] == "granted")
    assert granted == {
        "event": "granted", "node": names[0], "reason": "RebootApproved",
        "message": granted["message"], "type": "Normal", "time": granted["time"],
        "cluster": "test-cluster", "coordinator": coord.identity, "namespace": "cluo-system"}
    assert granted["time"].endswith("Z")
    assert all(request.headers["content-type"] == "application/json"
               for request in receiver.received())
    wait_for(lambda: coord.metric('cluo_webhook_deliveries_total{result="delivered"}')
             == len(bodies), 10, "every delivery counted")


def test_a_receiver_that_fails_at_first_gets_the_event_on_a_later_attempt(rig: Rig) -> None:
    (name,) = rig.add_nodes(1)
    with HttpReceiver(fail_first=2, retry_after="1") as receiver, rig.agents() as agents:
        coord = rig.start("--webhook-url", receiver.url, "--webhook-template", SLACK,
                          "--cluster-name", "test-cluster",
                          "--webhook-header", f"Authorization: {TOKEN}")
        wait_for(lambda: rig.done(name), ROLL_TIMEOUT, f"{name} to reboot and finish")
        wait_for(lambda: "done" in _slack_events(receiver), 30,
                 "the 'done' roll event, after the retries")
    assert not agents.errors
    requests = receiver.received()
    assert [request.status for request in requests[:3]] == [500, 500, 200]
    assert requests[0].body == requests[1].body == requests[2].body  # the same event
    assert requests[2].json()["text"].startswith(
        f"test-cluster: {name} granted (RebootApproved): ")
    assert _slack_events(receiver) == NODE_EVENTS
    assert all(request.headers["authorization"] == TOKEN for request in requests)
    assert coord.metric("cluo_webhook_retries_total") == 2
    log = coord.log_path.read_text()
    assert "webhook attempt failed, retrying" in log
    assert "webhook-test-token" not in log and "/hook" not in log  # secrets stay out


def test_receivers_that_are_down_neither_stop_nor_slow_the_roll(rig: Rig) -> None:
    names = rig.add_nodes(2)
    with (HttpReceiver(hang=True) as hanging, HttpReceiver() as working,
          rig.agents() as agents):
        coord = rig.start("--webhook-url", refused_url(), "--webhook-url", hanging.url,
                          "--webhook-url", working.url, "--webhook-timeout", "3s",
                          "--webhook-max-attempts", "3")
        wait_for(lambda: all(rig.done(name) for name in names), ROLL_TIMEOUT,
                 "both nodes to reboot and finish while two receivers are down")
        # The receiver that is up got every event, whatever the other two did.
        wait_for(lambda: _done(working, names), 30, "the working receiver's 'done' events")
        assert hanging.received(), "the hanging receiver was tried"
        wait_for(lambda: (coord.metric('cluo_webhook_deliveries_total{result="failed"}')
                          or 0) >= 1, 30, "a delivery counted as failed")
    assert not agents.errors
    assert coord.metric("cluo_grants_total") == len(names)
    assert (coord.metric("cluo_webhook_retries_total") or 0) >= 1
    for name in names:
        assert _of(working.delivered(), name) == NODE_EVENTS
