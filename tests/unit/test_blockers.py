"""Blockers: their flags, and how their answers are handed to the reconcile loop (fail
safe before the first evaluation and when one cannot tell; a new version and a wake-up
only when what fires changes)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cluo.errors import ConfigError
from cluo_coord.blockers import BlockerWatch, QueryBlocker, evaluate
from cluo_coord.config import load_settings
from cluo_coord.health import BudgetScope
from cluo_coord.prometheus import PrometheusError


class Answer:
    """A blocker whose answer the test sets; raising ``error`` when it is set."""

    def __init__(self, name: str, answer: str | None = None) -> None:
        self.name = name
        self.answer = answer
        self.error: Exception | None = None

    def check(self) -> str | None:
        if self.error is not None:
            raise self.error
        return self.answer


def test_health_flags_have_their_documented_defaults() -> None:
    health = load_settings([], {}).health
    assert health.gate is True
    assert health.pdbs == BudgetScope("")
    assert not health.blockers
    assert health.blocker_interval == timedelta(seconds=30)


def test_health_flags_are_read_and_the_list_flags_may_be_repeated() -> None:
    health = load_settings([
        "--health-gate=false", "--health-gate-pdbs", "gate=true",
        "--blocking-pod-selector", "app=backup,tier in (a,b)",
        "--blocking-pod-selector", " job-name ",
        "--blocking-pod-namespace", "ops", "--prometheus-url", "http://prom:9090",
        "--prometheus-query", "up == 0", "--prometheus-query", "etcd_server_has_leader == 0",
        "--alert-filter-regexp", "^Watchdog$", "--blocker-interval", "5s"], {}).health
    assert health.gate is False
    assert health.pdbs == BudgetScope("gate=true")
    assert health.blocking_pod_selectors == ("app=backup,tier in (a,b)", "job-name")
    assert health.blocking_pod_namespace == "ops"
    assert health.prometheus_queries == ("up == 0", "etcd_server_has_leader == 0")
    assert health.alert_filter is not None and health.alert_filter.search("Watchdog")
    assert health.blocker_interval == timedelta(seconds=5)
    assert health.blockers


def test_a_repeated_flags_variable_has_one_item_a_line() -> None:
    settings = load_settings([], {"CLUO_COORD_BLOCKING_POD_SELECTOR": "app=backup\njob-name"})
    assert settings.health.blocking_pod_selectors == ("app=backup", "job-name")


@pytest.mark.parametrize(("argv", "message"), [
    (["--prometheus-query", "up"], "--prometheus-query 'up': needs --prometheus-url"),
    (["--alert-filter-regexp", "x"], "--alert-filter-regexp 'x': needs --prometheus-url"),
    (["--prometheus-url", "prom:9090"], "not an http:// or https:// URL"),
    (["--prometheus-url", "http://p", "--alert-filter-regexp", "("],
     "not a regular expression"),
    (["--health-gate-pdbs", ""], "'all', 'none' or a label selector, not an empty value"),
    (["--blocker-interval", "0s"], "must be at least 1s"),
    (["--blocking-pod-namespace", "Bad_NS"], "not a namespace name"),
])
def test_bad_health_flags_stop_the_start_naming_them(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(argv, {})


def test_every_blocker_fires_until_its_first_evaluation() -> None:
    watch = BlockerWatch([Answer("pods matching app=backup")])
    assert watch.firing() == ("pods matching app=backup not evaluated yet",)
    assert BlockerWatch([]).firing() == () and not BlockerWatch([]).active


def test_a_change_of_what_fires_moves_the_version_and_wakes_the_loop_once() -> None:
    woken: list[int] = []
    blocker = Answer("b", "b fires")
    watch = BlockerWatch([blocker, Answer("quiet")], on_change=lambda: woken.append(1))
    assert watch.check_now() and watch.firing() == ("b fires",)
    version = watch.version
    assert not watch.check_now() and watch.version == version and len(woken) == 1
    blocker.answer = None
    assert watch.check_now() and watch.firing() == () and watch.version == version + 1
    assert len(woken) == 2


def test_a_blocker_that_cannot_tell_fires_saying_why() -> None:
    blocker = Answer("prometheus query 'up'")
    blocker.error = PrometheusError("querying 'up' on Prometheus at http://p: refused")
    assert evaluate(blocker) == ("prometheus query 'up' cannot be evaluated (querying 'up' "
                                 "on Prometheus at http://p: refused)")
    blocker.error = ValueError("bad_data: parse error")
    assert evaluate(blocker) == "prometheus query 'up' cannot be evaluated (bad_data: parse error)"


def test_a_query_blocker_reads_the_answer_of_prometheus() -> None:
    class Server:
        def __init__(self, result: list[object]) -> None:
            self.result = result

        def query(self, promql: str) -> dict[str, object]:
            return {"status": "success", "data": {"resultType": "vector", "result": self.result}}

    server = Server([])
    blocker = QueryBlocker(server, "up == 0")  # type: ignore[arg-type]
    assert blocker.check() is None
    server.result = [{"metric": {"job": "etcd"}, "value": [0, "0"]}]
    assert blocker.check() == "prometheus query 'up == 0' has a result"
