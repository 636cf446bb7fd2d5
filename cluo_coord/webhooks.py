"""Webhooks: every roll event POSTed as JSON to each ``--webhook-url``, from a thread.

**The body** is a plain JSON object of the event's fields (`FIELDS`), or
``--webhook-template``: a JSON document in which ``$node``, ``${event}``, ... stand for the
fields (``string.Template``; ``$$`` is a dollar sign). Each value is JSON-escaped before it
goes in, so a field belongs inside a JSON string (``{"text": "$node: $message"}``), and a
quote or a newline in a node name or a message cannot break the document. The template
(inline, or ``@PATH`` for a file) is checked at start: an unknown field, a stray ``$`` or
a document that does not render to valid JSON stops the start, naming the problem.

**Delivery**: one thread and one bounded queue per URL, so a dead receiver delays no
other and never the reconcile loop: `Sender.submit` appends to the queue and returns
(when the queue is full, the oldest event is dropped, logged and counted). An attempt
that gets no answer (refused, reset, timed out) or a 429 or 5xx is retried with
`BACKOFF`, never sooner than the answer's ``Retry-After`` (delay-seconds, or an HTTP date
read against the sender's clock, a date gone by asking no wait; capped at
`RETRY_AFTER_MAX`), until ``--webhook-max-attempts``; then the event is dropped with a
log line. Any other answer but 2xx (a 4xx, a redirect, which is not followed) is final.
Events to one URL go out in order, one at a time. On stop the queue is given
`SHUTDOWN_GRACE` to empty, without further retries; what is left is dropped and counted.

**Secrets**: a webhook URL often is one (Slack's and Teams' carry their token in the
path), as are header values (``Authorization: Bearer ...``). Neither is logged nor put in
an error: logs and errors name a URL by its scheme and host only and a header by its
name. Both may come from a Secret through their variables (``CLUO_COORD_WEBHOOK_URL``,
``CLUO_COORD_WEBHOOK_HEADER``: one value per line).
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import re
import string
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Protocol

from cluo.backoff import Backoff, spread
from cluo.errors import ConfigError
from cluo.kube.config import user_agent
from cluo.settings import Setting, Values, positive_duration, positive_int, verbatim
from cluo_coord.planner import EmitEvent, NodeView, Plan, SlotLease
from cluo_coord.roll_events import RollEvent, RollEvents, from_posted_event

log = logging.getLogger(__name__)

FIELDS = ("event", "node", "reason", "message", "type", "time", "cluster", "coordinator",
          "namespace")
QUEUE_SIZE = 100  # events waiting per URL; a full queue drops its oldest
BACKOFF = Backoff(initial=1.0, maximum=60.0, jitter=spread(0.2, random.uniform))
RETRY_AFTER_MAX = 120.0  # s: the longest a Retry-After is honoured
SHUTDOWN_GRACE = 5.0  # s: on stop, for the queues to empty (each POST within its timeout)
ANSWER_LIMIT = 65536  # bytes of an answer's body read (and ignored)

# Delivery results (the label of cluo_webhook_deliveries_total).
DELIVERED = "delivered"
REFUSED = "refused"  # a final answer other than 2xx: not retried
FAILED = "failed"  # still no 2xx after the last attempt
DROPPED = "dropped"  # never attempted to the end: the queue was full, or the coordinator stopped
DELIVERY_RESULTS = (DELIVERED, REFUSED, FAILED, DROPPED)

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Rendered when the template is checked at start: every character a value must survive.
_CHECK_VALUE = 'a "quoted" \\ value,\nover two lines, with $dollar and </tag> \u00e9'


# --------------------------------------------------------------------------- the body


@dataclass(frozen=True)
class BodyTemplate:
    """``--webhook-template``; empty: the default body, the fields as a JSON object."""

    text: str = ""

    @classmethod
    def parse(cls, text: str) -> BodyTemplate:
        """A checked template; `ValueError` names what is wrong with it."""
        if not text.strip():
            return cls()
        template = string.Template(text)
        if not template.is_valid():
            raise ValueError("a '$' starts no field name (a dollar sign is written $$)")
        unknown = sorted(set(template.get_identifiers()) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown field ${unknown[0]} (the fields are "
                             f"{', '.join('$' + name for name in FIELDS)})")
        body = cls(text).render(dict.fromkeys(FIELDS, _CHECK_VALUE))
        try:
            json.loads(body)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"does not render to valid JSON ({err.msg}, line {err.lineno} column "
                f"{err.colno} once rendered); a $field goes inside a JSON string, as in "
                '{"text": "$node: $message"}') from None
        return cls(text)

    def render(self, fields: Mapping[str, str]) -> bytes:
        if not self.text:
            return json.dumps({name: fields[name] for name in FIELDS}).encode()
        escaped = {name: json.dumps(value)[1:-1] for name, value in fields.items()}
        return string.Template(self.text).substitute(escaped).encode()


def event_fields(event: RollEvent, *, cluster: str, coordinator: str, namespace: str
                 ) -> dict[str, str]:
    """The values of `FIELDS` for ``event``."""
    return {
        "event": event.event, "node": event.node, "reason": event.reason,
        "message": event.message, "type": event.type,
        "time": event.time.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "cluster": cluster, "coordinator": coordinator, "namespace": namespace,
    }


# --------------------------------------------------------------------------- settings


def redact_url(url: str) -> str:
    """``https://hooks.slack.com/services/T0/B0/secret`` -> ``https://hooks.slack.com/…``:
    how logs and errors name a URL (its path and query may hold a token)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(a URL that is not shown)"
    if not parts.scheme or not host:
        return "(a URL that is not shown)"
    return f"{parts.scheme}://{host}{port}/…"


@dataclass(frozen=True)
class WebhookConfig:
    """The ``--webhook-*`` settings. URLs and headers stay out of the repr."""

    urls: tuple[str, ...] = field(default=(), repr=False)
    template: BodyTemplate = BodyTemplate()
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    timeout: float = 5.0
    max_attempts: int = 5
    cluster: str = ""


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


WEBHOOK_URL = Setting(
    "--webhook-url", _lines, "POST every roll event as JSON to this http(s) URL; repeat for "
    "more (its variable: one URL a line) (default: none)", repeated=True)
WEBHOOK_TEMPLATE = Setting(
    "--webhook-template", verbatim, "JSON body with $node, $event, $reason, $message, $type, "
    "$time, $cluster, $coordinator, $namespace; @PATH reads it from a file "
    "(default: a JSON object of these fields)")
WEBHOOK_HEADER = Setting(
    "--webhook-header", _lines, "'Name: value' header sent with each webhook; repeat for more "
    "(its variable: one a line; values are never logged)", repeated=True)
WEBHOOK_TIMEOUT = Setting("--webhook-timeout", positive_duration,
                          "each webhook attempt's time limit (default: 5s)", default="5s")
WEBHOOK_MAX_ATTEMPTS = Setting(
    "--webhook-max-attempts", positive_int,
    "attempts per event and URL before it is dropped (default: 5)", default="5")
CLUSTER_NAME = Setting("--cluster-name", verbatim,
                       "this cluster's name in notifications, $cluster (default: empty)")
WEBHOOK_SETTINGS = (WEBHOOK_URL, WEBHOOK_TEMPLATE, WEBHOOK_HEADER, WEBHOOK_TIMEOUT,
                    WEBHOOK_MAX_ATTEMPTS, CLUSTER_NAME)


def webhook_config(values: Values) -> WebhookConfig:
    """The checked ``--webhook-*`` settings; `ConfigError` names the setting and the
    problem, never a URL's path or a header's value."""
    urls: tuple[str, ...] = values[WEBHOOK_URL]
    for url in urls:
        problem = _url_problem(url)
        if problem:
            raise ConfigError(f"{values.source(WEBHOOK_URL)}: {redact_url(url)}: {problem}")
    headers = tuple(_header(values, line) for line in values[WEBHOOK_HEADER])
    template_text: str = values[WEBHOOK_TEMPLATE]
    if template_text.startswith("@"):
        path = Path(template_text[1:])
        try:
            template_text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{values.source(WEBHOOK_TEMPLATE)}: cannot read {path}: "
                              f"{getattr(err, 'strerror', None) or err}") from None
    try:
        template = BodyTemplate.parse(template_text)
    except ValueError as err:
        raise ConfigError(f"{values.source(WEBHOOK_TEMPLATE)}: {err}") from None
    if not urls:
        for setting in (WEBHOOK_TEMPLATE, WEBHOOK_HEADER):
            if not values.from_default(setting):
                raise ConfigError(f"{values.source(setting)} is set but no "
                                  f"{WEBHOOK_URL.flag}: nothing would be sent")
    return WebhookConfig(urls=urls, template=template, headers=headers,
                         timeout=values[WEBHOOK_TIMEOUT],
                         max_attempts=values[WEBHOOK_MAX_ATTEMPTS],
                         cluster=values[CLUSTER_NAME])


def _url_problem(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as err:
        return f"not a URL ({err})" if "port" in str(err) else "not a URL"
    if parts.scheme not in ("http", "https"):
        return "not an http:// or https:// URL"
    if not parts.hostname:
        return "names no host"
    if parts.username is not None or parts.password is not None:
        return (f"credentials in a URL are not sent: use {WEBHOOK_HEADER.flag} "
                "'Authorization: ...'")
    return ""


def _header(values: Values, line: str) -> tuple[str, str]:
    name, colon, value = line.partition(":")
    if not colon or not _HEADER_NAME.fullmatch(name.strip()):
        raise ConfigError(f"{values.source(WEBHOOK_HEADER)}: a header is 'Name: value' "
                          "(the text given is not shown: it may hold a secret)")
    if not value.isascii() or any(ord(char) < 32 and char != "\t" for char in value):
        raise ConfigError(f"{values.source(WEBHOOK_HEADER)}: header {name.strip()}: its "
                          "value must be printable ASCII (the value is not shown)")
    return name.strip(), value.strip()


# --------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class Target:
    """Where one sender POSTs; its repr shows neither the URL nor the headers."""

    url: str = field(repr=False)
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    timeout: float = 5.0

    @property
    def redacted(self) -> str:
        return redact_url(self.url)


@dataclass(frozen=True)
class Answer:
    """How one attempt ended: an HTTP status, or None with ``error`` (no answer)."""

    status: int | None
    retry_after: float | datetime | None = None  # a 429's or a 5xx's Retry-After: seconds or a date
    error: str = ""

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500

    def describe(self) -> str:
        return f"HTTP {self.status}" if self.status is not None else self.error

    def asked_wait(self, now: datetime) -> float | None:
        """Seconds the ``Retry-After`` asks to wait from ``now``; a date gone by asks none."""
        if isinstance(self.retry_after, datetime):
            return max(0.0, (self.retry_after - now).total_seconds())
        return self.retry_after


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff: Backoff = BACKOFF
    retry_after_max: float = RETRY_AFTER_MAX

    def delay(self, attempts: int, answer: Answer, now: datetime) -> float | None:
        """Seconds before attempt ``attempts + 1`` after ``answer``, received at ``now``;
        None: no further attempt (delivered, a final answer, or that was the last attempt)."""
        if answer.delivered or not answer.retryable or attempts >= self.max_attempts:
            return None
        delay = self.backoff.delay(attempts)
        asked = answer.asked_wait(now)
        if asked is not None:
            delay = max(delay, min(asked, self.retry_after_max))
        return delay


Post = Callable[[Target, bytes], Answer]


class DeliveryMetrics(Protocol):
    """Counters of deliveries (``CoordMetrics``)."""

    def webhook_delivery(self, result: str) -> None: ...

    def webhook_retry(self) -> None: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a redirect is a final answer: urllib raises it as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect())  # honours HTTPS_PROXY and NO_PROXY
_USER_AGENT = user_agent("cluo-coord")


def urllib_post(target: Target, body: bytes) -> Answer:
    """POST ``body`` to ``target`` once. Never raises; what went wrong is in the answer,
    without the URL."""
    headers = {"Content-Type": "application/json", "User-Agent": _USER_AGENT,
               **dict(target.headers)}
    request = urllib.request.Request(target.url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=target.timeout) as response:
            response.read(ANSWER_LIMIT)
            return Answer(int(response.status))
    except urllib.error.HTTPError as err:
        retry_after = parse_retry_after(err.headers.get("Retry-After") if err.headers else None)
        err.close()
        return Answer(err.code, retry_after if err.code == 429 or err.code >= 500 else None)
    except urllib.error.URLError as err:
        return Answer(None, error=str(err.reason))
    except TimeoutError:
        return Answer(None, error="timed out")
    except (OSError, http.client.HTTPException, ValueError) as err:
        return Answer(None, error=f"{type(err).__name__}: {err}")


def parse_retry_after(header: str | None) -> float | datetime | None:
    """A ``Retry-After`` (RFC 9110): delay-seconds, or an HTTP date (aware, in UTC when
    it names no zone); None for none, zero seconds or nonsense."""
    text = (header or "").strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if seconds > 0 else None
    try:
        date = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return date if date.tzinfo is not None else date.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Item:
    body: bytes
    event: str
    node: str


class Sender:
    """One URL's queue and the thread that delivers it, in order.

    ``sleep(seconds)`` waits between attempts and returns True when the sender is
    stopping (default: on the stop flag); ``clock`` is the time an answer's ``Retry-After``
    date is read against. Tests pass both on fake time and call `deliver` directly."""

    def __init__(
        self,
        target: Target,
        policy: RetryPolicy,
        metrics: DeliveryMetrics,
        *,
        post: Post = urllib_post,
        queue_size: int = QUEUE_SIZE,
        sleep: Callable[[float], bool] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.target = target
        self._policy = policy
        self._metrics = metrics
        self._post = post
        self._size = queue_size
        self._stopping = threading.Event()
        self._sleep = sleep if sleep is not None else self._stopping.wait
        self._monotonic = monotonic
        self._clock = clock
        self._queue: deque[_Item] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._closed = False
        self._close_by = 0.0
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Give the queue ``grace`` seconds to empty (no retries any more), drop the rest."""
        self.close(grace)
        self.join(grace)

    def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Take no more events; what is queued has ``grace`` seconds, without retries."""
        with self._lock:
            self._closed = True
            self._close_by = self._monotonic() + grace
            self._ready.notify()
        self._stopping.set()

    def join(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Until the thread is done: ``grace`` and the attempt under way at most."""
        if self._thread.is_alive():
            self._thread.join(grace + self.target.timeout + 1.0)

    def submit(self, body: bytes, event: str, node: str) -> None:
        """Queue one event; never blocks. A full queue drops its oldest event."""
        with self._lock:
            if self._closed:
                dropped: _Item | None = _Item(body, event, node)
            else:
                dropped = self._queue.popleft() if len(self._queue) >= self._size else None
                self._queue.append(_Item(body, event, node))
                self._ready.notify()
        if dropped is not None:
            log.warning("webhook queue full or stopped, event dropped", extra={
                "WEBHOOK": self.target.redacted, "EVENT": dropped.event, "NODE": dropped.node})
            self._metrics.webhook_delivery(DROPPED)

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                if self._closed and self._monotonic() >= self._close_by:
                    left = len(self._queue)
                    self._queue.clear()
                    break
                item = self._queue.popleft()
            try:
                self.deliver(item.body, item.event, item.node)
            except Exception:  # a bug here must not end the deliveries that follow
                log.exception("webhook delivery failed unexpectedly", extra={
                    "WEBHOOK": self.target.redacted, "EVENT": item.event})
                self._metrics.webhook_delivery(FAILED)
        log.warning("coordinator stopping, webhook events dropped", extra={
            "WEBHOOK": self.target.redacted, "EVENTS": left})
        for _ in range(left):
            self._metrics.webhook_delivery(DROPPED)

    def deliver(self, body: bytes, event: str, node: str) -> str:
        """Attempt until delivered, refused or out of attempts; returns the result."""
        fields = {"WEBHOOK": self.target.redacted, "EVENT": event, "NODE": node}
        attempts = 0
        while True:
            attempts += 1
            answer = self._post(self.target, body)
            if answer.delivered:
                log.debug("webhook delivered", extra={**fields, "ATTEMPTS": attempts})
                result = DELIVERED
                break
            delay = self._policy.delay(attempts, answer, self._clock())
            if delay is None:
                result = FAILED if answer.retryable else REFUSED
                log.warning("webhook not delivered, event dropped", extra={
                    **fields, "ERROR": answer.describe(), "ATTEMPTS": attempts})
                break
            log.info("webhook attempt failed, retrying", extra={
                **fields, "ERROR": answer.describe(), "ATTEMPT": attempts,
                "RETRY_IN": round(delay, 2)})
            self._metrics.webhook_retry()
            if self._sleep(delay):
                log.warning("coordinator stopping, webhook event not retried", extra={
                    **fields, "ERROR": answer.describe(), "ATTEMPTS": attempts})
                result = DROPPED
                break
        self._metrics.webhook_delivery(result)
        return result


# --------------------------------------------------------------------------- the notifier


class WebhookNotifier:
    """The driver's `RollNotifier`: turns what it is told into roll events and queues
    each, rendered, for every URL."""

    def __init__(
        self,
        config: WebhookConfig,
        metrics: DeliveryMetrics,
        *,
        coordinator: str,
        namespace: str,
        post: Post = urllib_post,
    ) -> None:
        self._config = config
        self._identity = {"cluster": config.cluster, "coordinator": coordinator,
                          "namespace": namespace}
        self._events = RollEvents()
        policy = RetryPolicy(config.max_attempts)
        self.senders = [
            Sender(Target(url, config.headers, config.timeout), policy, metrics, post=post)
            for url in config.urls
        ]

    def start(self) -> None:
        for sender in self.senders:
            sender.start()
        if self.senders:
            log.info("webhooks on", extra={
                "WEBHOOKS": ", ".join(sender.target.redacted for sender in self.senders)})

    def stop(self) -> None:
        """All senders at once: `SHUTDOWN_GRACE` and one attempt's timeout at most."""
        for sender in self.senders:
            sender.close()
        for sender in self.senders:
            sender.join()

    def posted(self, change: EmitEvent, now: datetime) -> None:
        event = from_posted_event(change, now) if self.senders else None
        if event is not None:
            self._queue([event])

    def planned(self, nodes: Sequence[NodeView], slots: Sequence[SlotLease], plan: Plan,
                now: datetime) -> None:
        if self.senders:  # else not even a look at the nodes
            self._queue(self._events.from_plan(nodes, slots, plan, now))

    def _queue(self, events: Iterable[RollEvent]) -> None:
        for event in events:
            body = self._config.template.render(event_fields(event, **self._identity))
            for sender in self.senders:
                sender.submit(body, event.event, event.node)
