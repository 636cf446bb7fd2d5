"""Leader election on the Lease ``cluo-coord-leader`` (client-go's leaderelection, simplified).

Every write is a compare-and-swap on the Lease's resourceVersion. A candidate takes the
Lease when it is free or when its record (holder, renewTime) has not changed for
``lease_duration`` seconds *as observed by this process's own monotonic clock*, so clock
skew between replicas does not matter. The leader renews every ``renew_period`` and
considers itself leader only until ``renew_deadline`` after its last successful renewal.
On ``stop()`` the leader steps down: it clears ``holderIdentity`` so a standby takes over
at once instead of after ``lease_duration``.

Leader election only saves work and log noise: safety comes from the CAS writes of the
planner's changes, which hold with any number of coordinators.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from cluo.errors import KubeError
from cluo.kube.client import KubeClient
from cluo.kube.objects import micro_time
from cluo.kube.resources import CONNECT_TIMEOUT, Timeout, leases_path
from cluo.protocol import LEADER_LEASE_NAME
from cluo_coord.brake import FailedReboot, PausedBy, RollState

log = logging.getLogger(__name__)

LEASE_DURATION = 15.0
RENEW_DEADLINE = 10.0
RENEW_PERIOD = 5.0
RETRY_PERIOD = 2.0
# A renewal answered after the renew deadline comes too late to keep the lead.
ELECTION_TIMEOUT: Timeout = (CONNECT_TIMEOUT, RENEW_DEADLINE)


def lease_request(
    api: KubeClient, method: str, path: str, body: Mapping[str, Any] | None, action: str,
) -> Any:
    """One JSON request on a Lease (times keep the microseconds the API server requires)."""
    return api.call(action, method, path, body=dict(body) if body is not None else None,
                    timeout=ELECTION_TIMEOUT)


class LeaderElector:
    """Campaign for, hold and give up the leader Lease, in a thread."""

    def __init__(
        self,
        api: KubeClient,
        namespace: str,
        identity: str,
        *,
        on_change: Callable[[bool], None] = lambda _: None,
        lease_duration: float = LEASE_DURATION,
        renew_deadline: float = RENEW_DEADLINE,
        renew_period: float = RENEW_PERIOD,
        retry_period: float = RETRY_PERIOD,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not renew_period < renew_deadline < lease_duration:
            raise ValueError("need renew_period < renew_deadline < lease_duration")
        self._api = api
        self._namespace = namespace
        self.identity = identity
        self._on_change = on_change
        self._lease_duration = lease_duration
        self._renew_deadline = renew_deadline
        self._renew_period = renew_period
        self._retry_period = retry_period
        self._clock = clock
        self._path = leases_path(namespace, LEADER_LEASE_NAME)
        self._lock = threading.Lock()
        self._valid_until = 0.0  # monotonic; leader while now < this
        self._observed: tuple[str, str, float] | None = None  # (holder, renewTime, seen at)
        # The Lease as this process last wrote it while leading: a renewal is one PUT on
        # it, no GET first (a conflict means someone else wrote: read again next round).
        self._held: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._was_leader = False
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)

    @property
    def is_leader(self) -> bool:
        with self._lock:
            return time.monotonic() < self._valid_until

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop campaigning; if leader, step down (clear the holder) before returning."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._try_acquire_or_renew()
            except KubeError as err:
                log.warning("leader election request failed", extra={
                    "ERROR": str(err), "ERROR_KIND": err.kind})
            leader = self.is_leader
            if leader != self._was_leader:
                self._was_leader = leader
                log.info("leadership changed", extra={"LEADER": leader, "IDENTITY": self.identity})
                self._on_change(leader)
            self._stop.wait(self._renew_period if leader else self._retry_period)
        self._step_down()

    def _try_acquire_or_renew(self) -> None:
        now = self._clock()
        held, self._held = self._held, None
        if held is not None and self.is_leader:
            spec = {**(held.get("spec") or {}), "renewTime": micro_time(now),
                    "leaseDurationSeconds": int(self._lease_duration)}
            if self._write("PUT", self._path, {**held, "spec": spec}):
                return
            # Someone wrote the Lease (a pause, the brake's record): read it, renew now.
        action = f"reading leader lease {LEADER_LEASE_NAME!r}"
        try:
            current = lease_request(self._api, "GET", self._path, None, action)
        except KubeError as err:
            if err.kind != "not_found":
                raise
            current = None
        if current is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": LEADER_LEASE_NAME, "namespace": self._namespace},
                "spec": self._spec(now, acquired=True, transitions=0),
            }
            self._write("POST", leases_path(self._namespace), body)
            return
        spec = current.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        renewed = str(spec.get("renewTime") or "")
        seen_at = time.monotonic()
        if self._observed is None or self._observed[:2] != (holder, renewed):
            self._observed = (holder, renewed, seen_at)
        duration = float(spec.get("leaseDurationSeconds") or self._lease_duration)
        expired = seen_at - self._observed[2] > duration
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            spec = {**spec, "renewTime": micro_time(now),
                    "leaseDurationSeconds": int(self._lease_duration)}
        elif not holder or expired:
            spec = self._spec(now, acquired=True, transitions=transitions + 1)
        else:
            return  # someone else leads
        self._write("PUT", self._path, {**current, "spec": spec})

    def _spec(self, now: datetime, *, acquired: bool, transitions: int) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self._lease_duration),
            "renewTime": micro_time(now),
            "leaseTransitions": transitions,
        }
        if acquired:
            spec["acquireTime"] = micro_time(now)
        return spec

    def _write(self, method: str, path: str, body: Mapping[str, Any]) -> bool:
        """Whether the write went through (False: someone else wrote first)."""
        started = time.monotonic()
        try:
            written = lease_request(self._api, method, path, body,
                                    f"writing leader lease {LEADER_LEASE_NAME!r}")
        except KubeError as err:
            if err.kind == "conflict":
                return False  # someone else wrote first: not leader this round
            raise
        with self._lock:
            self._valid_until = started + self._renew_deadline
        self._held = written if isinstance(written, dict) else None
        return True

    def _step_down(self) -> None:
        with self._lock:
            was_leader = time.monotonic() < self._valid_until
            self._valid_until = 0.0
        if self._was_leader:
            self._was_leader = False
            self._on_change(False)
        if not was_leader:
            return
        try:
            current = lease_request(self._api, "GET", self._path, None, "reading leader lease")
            spec = current.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            spec = {**spec, "leaseDurationSeconds": 1, "renewTime": micro_time(self._clock())}
            spec.pop("holderIdentity", None)
            lease_request(self._api, "PUT", self._path, {**current, "spec": spec},
                          "stepping down from the leader lease")
            log.info("stepped down as leader", extra={"IDENTITY": self.identity})
        except KubeError as err:
            log.warning("could not step down cleanly", extra={
                "ERROR": str(err), "ERROR_KIND": err.kind})


def set_paused(api: KubeClient, namespace: str, paused: bool, *,
               at: datetime | None = None) -> RollState:
    """An admin's pause (``paused-by=admin``, since ``at``) or resume: a resume also
    clears the brake's record of failed reboots. Creates the leader Lease if needed."""
    when = at or datetime.now(UTC)
    if paused:
        return update_roll_state(api, namespace, lambda state: state.paused_as(
            PausedBy.ADMIN, "cluo-coord pause", when))[0]
    return update_roll_state(api, namespace, lambda state: state.resumed())[0]


def read_roll_state(api: KubeClient, namespace: str) -> RollState:
    """The pause and the brake's record, from the leader Lease (uncached)."""
    try:
        current = lease_request(api, "GET", leases_path(namespace, LEADER_LEASE_NAME), None,
                                "reading leader lease")
    except KubeError as err:
        if err.kind != "not_found":
            raise
        return RollState()
    return RollState.from_annotations((current.get("metadata") or {}).get("annotations"))


def update_roll_state(api: KubeClient, namespace: str,
                      mutate: Callable[[RollState], RollState]
                      ) -> tuple[RollState, dict[str, Any]]:
    """Read-modify-write of the roll state on the leader Lease, a compare-and-swap
    retried on conflict (the leader renews the Lease every few seconds); creates the
    Lease when missing. Returns the state written and the Lease as written."""
    path = leases_path(namespace, LEADER_LEASE_NAME)
    action = "writing the roll state on the leader lease"
    for _ in range(5):
        try:
            current = lease_request(api, "GET", path, None, "reading leader lease")
        except KubeError as err:
            if err.kind != "not_found":
                raise
            state = mutate(RollState())
            annotations = {k: v for k, v in state.annotations().items() if v is not None}
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": LEADER_LEASE_NAME, "namespace": namespace,
                                 "annotations": annotations},
                    "spec": {}}
            try:
                return state, lease_request(api, "POST", leases_path(namespace), body, action)
            except KubeError as create_err:
                if create_err.kind == "conflict":
                    continue
                raise
        metadata = dict(current.get("metadata") or {})
        annotations = dict(metadata.get("annotations") or {})
        state = mutate(RollState.from_annotations(annotations))
        for key, value in state.annotations().items():
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value
        metadata["annotations"] = annotations
        try:
            return state, lease_request(api, "PUT", path, {**current, "metadata": metadata},
                                        action)
        except KubeError as err:
            if err.kind != "conflict":
                raise
    raise KubeError(action, "the lease kept changing", kind="conflict", status=409)


class KubeRollState:
    """The driver's writes of the brake (planner rule 14) on the leader Lease; each
    Lease as written goes to ``written`` (the cluster cache), so the next plan sees it."""

    def __init__(self, api: KubeClient, namespace: str, *,
                 written: Callable[[dict[str, Any]], None] = lambda _: None) -> None:
        self._api = api
        self._namespace = namespace
        self._written = written

    def record_failed_reboot(self, failure: FailedReboot) -> RollState:
        state, obj = update_roll_state(self._api, self._namespace,
                                       lambda current: current.with_failure(failure))
        self._written(obj)
        return state

    def pause(self, reason: str, at: datetime) -> RollState:
        state, obj = update_roll_state(self._api, self._namespace,
                                       lambda current: current.paused_as(
                                           PausedBy.BRAKE, reason, at))
        self._written(obj)
        return state
