"""Kubelet emulator: plays the kubelet for many virtual nodes from one process.

The test bed runs etcd, kube-apiserver and a kube-controller-manager with only the disruption
controller: no scheduler, no node lifecycle controller and no kubelet. This module plays the
kubelet for virtual hosts (as KWOK does upstream), so the agent and the coordinator see what
they would see in a real cluster:

* a registered Node with a Ready condition, ``nodeInfo.bootID`` and a Flatcar ``osImage``;
* a node Lease in ``kube-node-lease`` renewed every ``heartbeat_interval`` while the host is up,
  and the conditions' ``lastHeartbeatTime`` refreshed every ``status_report_interval`` or on
  change (the kubelet's nodeStatusReportFrequency);
* pods bound to an up node (``spec.nodeName``) turned Running and Ready;
* deletions of such pods finished with a grace-0 delete once their grace period (times
  ``grace_period_scale``) has passed;
* silence while the host is down, and a fresh bootID on every boot.

When a host goes down the emulator also stands in for kube-controller-manager's **node
lifecycle controller**, which the test bed does not run: the node's conditions become Unknown
(``NodeStatusUnknown``), the ``node.kubernetes.io/unreachable`` taints are added and the
node's pods get ``Ready=False``. Unlike the real controller it does so at once, without
waiting out node-monitor-grace-period. On boot the kubelet part reports Ready again, the taints
go, and the pods run again with their restartCount incremented. A pod whose deletion started
while its host was down is removed right after the boot: its containers died with the host.

One process serves thousands of nodes: one pod watch over all namespaces (re-listed when the
watch expires), and a small pool of worker threads processing keys ``("node", name)``,
``("lease", name)`` and ``("pod", namespace, name)`` from one queue with delayed adds, one key
by one worker at a time (client-go's workqueue). Handlers are level-based: they compare what
the cluster shows with the emulated state and write the difference, every write is a
read-modify-write retried on 409 Conflict or a patch that cannot clobber others' fields, and a
failed key is retried with backoff, so the emulator rides out a briefly unavailable API server.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import heapq
import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kubernetes.client
import urllib3
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, ...]
PodKey = tuple[str, str]

USER_AGENT = "cluo-kubelet-emulator"
INSTANCE_LABEL = "kubelet-emulator.cluo.test/instance"
NODE_LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_SECONDS = 40
HEARTBEAT_JITTER = 0.04

OS_IMAGE = "Flatcar Container Linux by Kinvolk 4081.3.4 (Oklo)"
KERNEL_VERSION = "6.6.95-flatcar"
CONTAINER_RUNTIME_VERSION = "containerd://1.7.23"
NODE_RESOURCES = {
    "cpu": "4",
    "memory": "8146740Ki",
    "ephemeral-storage": "50620216Ki",
    "hugepages-2Mi": "0",
    "pods": "110",
}
UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"

# (type, status, reason, message) as the kubelet posts them for a healthy node.
KUBELET_CONDITIONS = (
    (
        "MemoryPressure",
        "False",
        "KubeletHasSufficientMemory",
        "kubelet has sufficient memory available",
    ),
    ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
    ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
    ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
)
NODE_CONDITION_TYPES = tuple(ctype for ctype, _, _, _ in KUBELET_CONDITIONS)
POD_CONDITION_TYPES = (
    "PodReadyToStartContainers",
    "Initialized",
    "ContainersReady",
    "Ready",
    "PodScheduled",
)
TERMINAL_PHASES = ("Succeeded", "Failed")

BOUND_PODS_SELECTOR = "spec.nodeName!="
LIST_PAGE_SIZE = 500
REQUEST_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds
WATCH_TIMEOUT_SECONDS = 60  # the API server ends each watch after this long; we re-watch
CONFLICT_RETRIES = 8
RETRY_BASE_DELAY = 0.05
RETRY_MAX_DELAY = 2.0


class WriteConflict(Exception):
    """A read-modify-write kept hitting 409 Conflict; the work queue retries it later."""


class _WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): re-list."""


# --------------------------------------------------------------------------------------------
# The public handle on one virtual host


@dataclass(eq=False)
class _Host:
    """Mutable state of one emulated host; fields guarded by KubeletEmulator._lock."""

    name: str
    index: int
    labels: dict[str, str]
    boot_id: str
    up: bool = True
    machine_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    system_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    registered: bool = False
    gone: bool = False  # someone deleted the Node object: the kubelet does not re-create it
    uid: str = ""
    last_error: str = ""
    # Only touched by the ("node", name) handler, which never runs twice at once.
    reported: tuple[bool, str] | None = None
    status_reported_at: float = 0.0
    # Held across a lease renewal, so a shutdown waits for one in flight: once shutdown()
    # returns, the lease's renewTime stays frozen.
    heartbeat_lock: threading.Lock = field(default_factory=threading.Lock)
    pod_ip_seq: Iterator[int] = field(default_factory=itertools.count)

    @property
    def host_ip(self) -> str:
        return f"100.{64 + self.index // 65536}.{self.index // 256 % 256}.{self.index % 256}"

    @property
    def pod_cidr(self) -> str:
        return f"10.{128 + self.index // 256}.{self.index % 256}.0/24"

    def next_pod_ip(self) -> str:
        return f"10.{128 + self.index // 256}.{self.index % 256}.{2 + next(self.pod_ip_seq) % 250}"


class EmulatedNode:
    """One virtual host served by a KubeletEmulator: power it off and boot it again."""

    def __init__(self, emulator: KubeletEmulator, host: _Host) -> None:
        self._emulator = emulator
        self._host = host

    def __repr__(self) -> str:
        return f"EmulatedNode({self.name!r}, up={self.is_up}, boot_id={self.boot_id!r})"

    @property
    def name(self) -> str:
        return self._host.name

    @property
    def is_up(self) -> bool:
        return self._host.up

    @property
    def boot_id(self) -> str:
        return self._host.boot_id

    def shutdown(self) -> None:
        """The host goes down: heartbeats and pod handling stop; the node turns NotReady.

        Returns once no heartbeat is in flight; the API objects follow asynchronously.
        """
        self._emulator._power(self._host, up=False, boot_id=None)

    def boot(self, boot_id: str | None = None) -> str:
        """The host (re)boots with `boot_id` (a random one if None); returns the boot id.

        Heartbeats resume, the node reports Ready with the new bootID and its pods run again.
        Booting a host that is up counts as a reboot nobody noticed in between.
        """
        new_boot_id = boot_id or str(uuid.uuid4())
        self._emulator._power(self._host, up=True, boot_id=new_boot_id)
        return new_boot_id


# --------------------------------------------------------------------------------------------
# Plumbing: raw JSON requests and a work queue


class _Rest:
    """Raw JSON requests through the official client's transport (auth, TLS, user agent).

    The typed API methods coerce bodies into models that forbid unknown fields and parse every
    response into models; a kubelet-sized load wants neither, so objects stay plain dicts.
    """

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self._client = api_client

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Obj | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        response = self._send(
            method,
            path,
            query=query,
            body=body,
            content_type=content_type,
            timeout=REQUEST_TIMEOUT,
        )
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(
                http_resp=response, body=data.decode("utf-8", "replace"), data=None
            )
        return json.loads(data) if data else {}

    def stream(self, path: str, query: dict[str, str], read_timeout: float) -> Any:
        """Start a streaming GET (a watch); returns the urllib3 response to iterate by line."""
        response = self._send(
            "GET",
            path,
            query=query,
            body=None,
            content_type="",
            timeout=(REQUEST_TIMEOUT[0], read_timeout),
        )
        if not 200 <= response.status <= 299:
            data = response.read()
            raise ApiException.from_response(
                http_resp=response, body=data.decode("utf-8", "replace"), data=None
            )
        return response.response

    def _send(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None,
        body: Obj | None,
        content_type: str,
        timeout: tuple[float, float],
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query.items()) if query else None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        return self._client.call_api(*request, _request_timeout=timeout)


class _WorkQueue:
    """Keys to process, each by one worker at a time, with delayed adds and retry backoff.

    A key added while it is being processed is processed again afterwards; a key added twice
    while queued is processed once; of several delayed adds of one key the earliest wins.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: deque[Key] = deque()
        self._queued: set[Key] = set()
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._seq = itertools.count()
        self._failures: dict[Key, int] = {}
        self._closed = False

    def add(self, key: Key) -> None:
        with self._cond:
            self._add_locked(key)

    def add_after(self, key: Key, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            due = time.monotonic() + delay
            if self._closed or self._due.get(key, float("inf")) <= due:
                return
            self._due[key] = due
            heapq.heappush(self._timers, (due, next(self._seq), key))
            self._cond.notify()

    def retry(self, key: Key) -> tuple[float, int]:
        """Add `key` again after an exponential backoff; returns (delay, failures so far)."""
        with self._cond:
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
        delay = min(RETRY_BASE_DELAY * 2 ** (failures - 1), RETRY_MAX_DELAY)
        self.add_after(key, delay)
        return delay, failures

    def forget(self, key: Key) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def get(self) -> Key | None:
        """The next key to process (blocking); None once the queue is closed."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    due, _, key = heapq.heappop(self._timers)
                    if self._due.get(key) == due:
                        del self._due[key]
                        self._add_locked(key)
                if self._ready:
                    key = self._ready.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                self._cond.wait(self._timers[0][0] - now if self._timers else None)
            return None

    def done(self, key: Key) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add_locked(key)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _add_locked(self, key: Key) -> None:
        if self._closed:
            return
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)
            self._cond.notify()


# --------------------------------------------------------------------------------------------
# The emulator


class KubeletEmulator:
    """Plays the kubelet (and, for down hosts, the node lifecycle controller) for many nodes.

    Use as a context manager, or call start() and stop(). Requests carry the user agent
    ``cluo-kubelet-emulator``, so benchmarks can tell its load apart at the API server.
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        heartbeat_interval: float = 10.0,
        status_report_interval: float = 300.0,
        grace_period_scale: float = 1.0,
        workers: int = 8,
    ) -> None:
        if heartbeat_interval <= 0 or status_report_interval <= 0:
            raise ValueError("heartbeat and status report intervals must be positive")
        if grace_period_scale < 0:
            raise ValueError("grace_period_scale must not be negative")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        configuration = copy.deepcopy(api_client.configuration)
        configuration.connection_pool_maxsize = workers + 2
        # Fail fast while the API server is down: the work queue retries with backoff. One
        # retry still covers a pooled keep-alive connection that the server closed.
        configuration.retries = urllib3.Retry(total=1, connect=0, redirect=0)
        self._client = kubernetes.client.ApiClient(configuration)
        self._client.default_headers.update(api_client.default_headers)
        self._client.user_agent = USER_AGENT
        self._rest = _Rest(self._client)
        self._heartbeat_interval = heartbeat_interval
        self._status_report_interval = status_report_interval
        self._grace_period_scale = grace_period_scale
        self._worker_count = workers
        self._instance = uuid.uuid4().hex[:12]
        self._kubelet_version = ""

        self._lock = threading.Lock()
        self._registered = threading.Condition(self._lock)
        self._hosts: dict[str, _Host] = {}
        self._host_index = itertools.count(1)
        self._pods: dict[PodKey, Obj] = {}
        self._pods_by_node: dict[str, set[PodKey]] = {}
        self._started_in_boot: dict[str, str] = {}  # pod uid -> boot id its containers run in
        self._deletion_due: dict[str, tuple[str, float]] = {}  # pod uid -> (boot id, deadline)
        self._deleted: set[str] = set()  # pod uids we sent the grace-0 delete for

        self._queue = _WorkQueue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_response: Any = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> KubeletEmulator:
        if self._threads:
            raise RuntimeError("kubelet emulator already started")
        self._kubelet_version = self._rest.request("GET", "/version")["gitVersion"]
        self._threads.append(
            threading.Thread(target=self._run_pod_watch, name="kubelet-emulator-watch", daemon=True)
        )
        for number in range(self._worker_count):
            self._threads.append(
                threading.Thread(
                    target=self._run_worker, name=f"kubelet-emulator-{number}", daemon=True
                )
            )
        for thread in self._threads:
            thread.start()
        log.info("kubelet emulator started", extra={"INSTANCE": self._instance})
        return self

    def stop(self, *, delete_nodes: bool = False, timeout: float = 10.0) -> None:
        """Stop all threads (waiting at most `timeout` seconds in all).

        With `delete_nodes`, also delete the Nodes and node Leases this emulator registered
        (pods bound to them stay: nothing garbage-collects pods in the test bed).
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._queue.close()
        with self._lock:
            response = self._watch_response
        if response is not None:
            with contextlib.suppress(OSError):  # the watch may have ended meanwhile
                response.shutdown()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        if alive:
            log.warning("kubelet emulator threads did not stop in time", extra={"THREADS": alive})
        try:
            if delete_nodes:
                selector = {"labelSelector": f"{INSTANCE_LABEL}={self._instance}"}
                self._rest.request(
                    "DELETE",
                    f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases",
                    query=selector,
                )
                self._rest.request("DELETE", "/api/v1/nodes", query=selector)
        finally:
            self._client.close()
        log.info("kubelet emulator stopped", extra={"INSTANCE": self._instance})

    def __enter__(self) -> KubeletEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- nodes -------------------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        boot_id: str | None = None,
        timeout: float = 60.0,
    ) -> EmulatedNode:
        """Register a Node that is up and start heartbeating it; returns once registered."""
        return self._add_hosts([(name, boot_id)], labels, timeout)[0]

    def add_nodes(
        self,
        names: Iterable[str],
        *,
        labels: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> list[EmulatedNode]:
        """Register many Nodes in parallel; returns once all are registered."""
        return self._add_hosts([(name, None) for name in names], labels, timeout)

    def node(self, name: str) -> EmulatedNode:
        with self._lock:
            return EmulatedNode(self, self._hosts[name])

    def _add_hosts(
        self,
        specs: list[tuple[str, str | None]],
        labels: dict[str, str] | None,
        timeout: float,
    ) -> list[EmulatedNode]:
        if not self._threads or self._stopping.is_set():
            raise RuntimeError("kubelet emulator is not running")
        names = [name for name, _ in specs]
        if len(set(names)) != len(names):
            raise ValueError("node names must be unique")
        with self._lock:
            taken = [name for name in names if name in self._hosts]
            if taken:
                raise ValueError(f"nodes already emulated: {taken}")
            hosts = [
                _Host(
                    name=name,
                    index=next(self._host_index),
                    labels=dict(labels or {}),
                    boot_id=boot_id or str(uuid.uuid4()),
                )
                for name, boot_id in specs
            ]
            for host in hosts:
                self._hosts[host.name] = host
                self._pods_by_node.setdefault(host.name, set())
        for host in hosts:
            self._queue.add(("node", host.name))
        with self._registered:
            done = self._registered.wait_for(
                lambda: self._stopping.is_set() or all(h.registered or h.gone for h in hosts),
                timeout,
            )
        pending = [host for host in hosts if not host.registered]
        if not done or pending:
            errors = sorted({host.last_error for host in pending if host.last_error})
            raise TimeoutError(
                f"kubelet emulator: {len(pending)} node(s) not registered within {timeout:g}s "
                f"(first: {[host.name for host in pending[:5]]}, errors: {errors[:3]})"
            )
        return [EmulatedNode(self, host) for host in hosts]

    def _power(self, host: _Host, *, up: bool, boot_id: str | None) -> None:
        with host.heartbeat_lock, self._lock:
            if not up and not host.up:
                return
            host.up = up
            if boot_id is not None:
                host.boot_id = boot_id
            pods = list(self._pods_by_node.get(host.name, ()))
        if up:
            log.info("emulated host booted", extra={"NODE": host.name, "BOOT_ID": boot_id})
        else:
            log.info("emulated host shut down", extra={"NODE": host.name})
        self._queue.add(("node", host.name))
        if up:
            self._queue.add(("lease", host.name))
        for namespace, name in pods:
            self._queue.add(("pod", namespace, name))

    # -- workers -----------------------------------------------------------------------------

    def _run_worker(self) -> None:
        while (key := self._queue.get()) is not None:
            try:
                self._sync(key)
            except Exception as err:
                delay, failures = self._queue.retry(key)
                self._note_failure(key, err, delay, first=failures == 1)
            else:
                self._queue.forget(key)
            finally:
                self._queue.done(key)

    def _sync(self, key: Key) -> None:
        kind = key[0]
        if kind == "node":
            self._sync_node(key[1])
        elif kind == "lease":
            self._sync_lease(key[1])
        elif kind == "pod":
            self._sync_pod((key[1], key[2]))
        else:
            raise ValueError(f"unknown work key {key!r}")

    def _note_failure(self, key: Key, err: Exception, delay: float, first: bool) -> None:
        fields = {"KEY": "/".join(key), "ERROR": repr(err), "RETRY_IN": delay}
        if key[0] in ("node", "lease"):
            with self._lock:
                host = self._hosts.get(key[1])
                if host is not None:
                    host.last_error = repr(err)
        if not isinstance(
            err, ApiException | urllib3.exceptions.HTTPError | OSError | WriteConflict
        ):
            log.error("kubelet emulator handler crashed, will retry", extra=fields, exc_info=err)
        elif first:  # one warning per failing key, not one per retry during an outage
            log.warning("kubelet emulator request failed, will retry", extra=fields)
        else:
            log.debug("kubelet emulator request failed again, will retry", extra=fields)

    # -- node objects and heartbeats ----------------------------------------------------------

    def _sync_node(self, name: str) -> None:
        with self._lock:
            host = self._hosts.get(name)
            if host is None or host.gone:
                return
            registered, up, boot_id = host.registered, host.up, host.boot_id
        try:
            if not registered:
                self._register(host, boot_id)
            now = time.monotonic()
            if host.reported != (up, boot_id):
                self._write_node_state(host, up, boot_id)
                host.reported = (up, boot_id)
                host.status_reported_at = now
            elif up and now - host.status_reported_at >= self._status_report_interval:
                self._post_status_heartbeat(host)
                host.status_reported_at = now
        except ApiException as err:
            if err.status != 404 or not registered:
                raise
            with self._lock:
                host.gone = True
            log.warning("node object was deleted, no longer emulating it", extra={"NODE": name})
            return
        if up:
            next_report = host.status_reported_at + self._status_report_interval
            self._queue.add_after(("node", name), next_report - time.monotonic())

    def _register(self, host: _Host, boot_id: str) -> None:
        """Create the Node (Ready, as the kubelet registers it) and its Lease."""
        now = _now()
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": host.name,
                "labels": self._node_labels(host),
                "annotations": {
                    "node.alpha.kubernetes.io/ttl": "0",
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                },
            },
            "spec": {"podCIDR": host.pod_cidr, "podCIDRs": [host.pod_cidr]},
            "status": self._kubelet_status({}, host, boot_id, now),
        }
        try:
            node = self._rest.request("POST", "/api/v1/nodes", body=body)
            host.reported = (True, boot_id)
        except ApiException as err:
            if err.status != 409:
                raise
            # A Node of that name exists (an earlier run): adopt it and rewrite its state.
            node = self._rest.request(
                "PATCH",
                f"/api/v1/nodes/{host.name}",
                body={"metadata": {"labels": self._node_labels(host)}},
                content_type="application/merge-patch+json",
            )
            host.reported = None
        host.status_reported_at = time.monotonic()
        host.uid = node["metadata"]["uid"]
        self._heartbeat(host)
        with self._registered:
            host.registered = True
            host.last_error = ""
            self._registered.notify_all()
            pods = list(self._pods_by_node.get(host.name, ()))
        log.debug("node registered", extra={"NODE": host.name, "BOOT_ID": boot_id})
        self._queue.add_after(("lease", host.name), self._next_heartbeat_delay())
        for namespace, name in pods:
            self._queue.add(("pod", namespace, name))

    def _node_labels(self, host: _Host) -> dict[str, str]:
        return {
            "kubernetes.io/hostname": host.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": "amd64",
            **host.labels,
            INSTANCE_LABEL: self._instance,
        }

    def _kubelet_status(self, old_status: Obj, host: _Host, boot_id: str, now: str) -> Obj:
        """The Node status the kubelet posts for a healthy host, keeping fields it does not own."""
        status = dict(old_status)
        conditions = copy.deepcopy(old_status.get("conditions", []))
        for ctype, cstatus, reason, message in KUBELET_CONDITIONS:
            _set_condition(
                conditions,
                ctype,
                cstatus,
                now,
                reason=reason,
                message=message,
                lastHeartbeatTime=now,
            )
        status.update(
            conditions=conditions,
            capacity=dict(NODE_RESOURCES),
            allocatable=dict(NODE_RESOURCES),
            addresses=[
                {"type": "InternalIP", "address": host.host_ip},
                {"type": "Hostname", "address": host.name},
            ],
            daemonEndpoints={"kubeletEndpoint": {"Port": 10250}},
            nodeInfo={
                "machineID": host.machine_id,
                "systemUUID": host.system_uuid,
                "bootID": boot_id,
                "kernelVersion": KERNEL_VERSION,
                "osImage": OS_IMAGE,
                "containerRuntimeVersion": CONTAINER_RUNTIME_VERSION,
                "kubeletVersion": self._kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        )
        return status

    def _write_node_state(self, host: _Host, up: bool, boot_id: str) -> None:
        """Make the Node show the host's state: Ready, or (node lifecycle controller) Unknown."""
        path = f"/api/v1/nodes/{host.name}"
        now = _now()

        def post_status(node: Obj) -> bool:
            if up:
                node["status"] = self._kubelet_status(node.get("status", {}), host, boot_id, now)
                return True
            conditions = node.setdefault("status", {}).setdefault("conditions", [])
            changed = False
            for ctype in NODE_CONDITION_TYPES:
                changed |= _set_condition(
                    conditions,
                    ctype,
                    "Unknown",
                    now,
                    reason="NodeStatusUnknown",
                    message="Kubelet stopped posting node status.",
                )
            return changed

        def set_taints(node: Obj) -> bool:
            spec = node.setdefault("spec", {})
            taints = [t for t in spec.get("taints", []) if t.get("key") != UNREACHABLE_TAINT]
            if not up:
                taints.append({"key": UNREACHABLE_TAINT, "effect": "NoSchedule"})
                taints.append({"key": UNREACHABLE_TAINT, "effect": "NoExecute", "timeAdded": now})
            if _unreachable_effects(spec.get("taints", [])) == _unreachable_effects(taints):
                return False
            spec["taints"] = taints
            return True

        node = self._rest.request("GET", path)
        node = self._read_modify_write(node, path, f"{path}/status", post_status)
        self._read_modify_write(node, path, path, set_taints)
        log.debug(
            "node state posted",
            extra={"NODE": host.name, "READY": "True" if up else "Unknown", "BOOT_ID": boot_id},
        )

    def _post_status_heartbeat(self, host: _Host) -> None:
        now = _now()
        self._rest.request(
            "PATCH",
            f"/api/v1/nodes/{host.name}/status",
            body={
                "status": {
                    "conditions": [
                        {"type": ctype, "lastHeartbeatTime": now} for ctype in NODE_CONDITION_TYPES
                    ]
                }
            },
            content_type="application/strategic-merge-patch+json",
        )

    def _sync_lease(self, name: str) -> None:
        with self._lock:
            host = self._hosts.get(name)
        if host is not None and self._heartbeat(host):
            self._queue.add_after(("lease", name), self._next_heartbeat_delay())

    def _heartbeat(self, host: _Host) -> bool:
        """Renew (or create) the node Lease if the host is up; returns whether it was."""
        with host.heartbeat_lock:
            with self._lock:
                if not host.up or host.gone or not host.uid:
                    return False
            path = f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases"
            lease: Obj = {
                "metadata": {"labels": {INSTANCE_LABEL: self._instance}},
                "spec": {
                    "holderIdentity": host.name,
                    "leaseDurationSeconds": LEASE_DURATION_SECONDS,
                    "renewTime": _now_micro(),
                },
            }
            try:
                self._rest.request(
                    "PATCH",
                    f"{path}/{host.name}",
                    body=lease,
                    content_type="application/merge-patch+json",
                )
            except ApiException as err:
                if err.status != 404:
                    raise
                lease["apiVersion"] = "coordination.k8s.io/v1"
                lease["kind"] = "Lease"
                lease["metadata"].update(
                    name=host.name,
                    namespace=NODE_LEASE_NAMESPACE,
                    ownerReferences=[
                        {"apiVersion": "v1", "kind": "Node", "name": host.name, "uid": host.uid}
                    ],
                )
                self._rest.request("POST", path, body=lease)
            return True

    def _next_heartbeat_delay(self) -> float:
        return self._heartbeat_interval * (1.0 - HEARTBEAT_JITTER * random.random())

    # -- pods --------------------------------------------------------------------------------

    def _sync_pod(self, key: PodKey) -> None:
        with self._lock:
            pod = self._pods.get(key)
            host = self._hosts.get(_node_name(pod)) if pod is not None else None
            if pod is None or host is None or not host.registered or host.gone:
                return
            up, boot_id = host.up, host.boot_id
            uid = pod["metadata"]["uid"]
            started_in = self._started_in_boot.get(uid)
        if not up:
            # Stand-in for the node lifecycle controller's MarkPodsNotReady.
            self._update_pod_status(pod, _mark_not_ready)
        elif pod["metadata"].get("deletionTimestamp"):
            self._finish_deletion(key, pod, boot_id, started_in)
        elif pod.get("status", {}).get("phase") in TERMINAL_PHASES:
            return
        elif _is_ready(pod) and started_in in (boot_id, None):
            with self._lock:  # running in this boot, or adopted from an earlier emulator
                self._started_in_boot[uid] = boot_id
        else:
            restarted = _has_run(pod) if started_in is None else started_in != boot_id
            now = _now()
            self._update_pod_status(
                pod, lambda p: _mark_running(p, host, restarted=restarted, now=now)
            )
            with self._lock:
                self._started_in_boot[uid] = boot_id
            log.debug(
                "pod running",
                extra={"POD": "/".join(key), "NODE": host.name, "RESTARTED": restarted},
            )

    def _finish_deletion(self, key: PodKey, pod: Obj, boot_id: str, started_in: str | None) -> None:
        """Delete a terminating pod for good once its (scaled) grace period has passed."""
        uid = pod["metadata"]["uid"]
        grace = (pod["metadata"].get("deletionGracePeriodSeconds") or 0) * self._grace_period_scale
        now = time.monotonic()
        with self._lock:
            if uid in self._deleted:
                return
            recorded = self._deletion_due.get(uid)
            if recorded is not None and recorded[0] == boot_id:
                due = min(recorded[1], now + grace)  # a second delete may shorten the grace
            elif started_in == boot_id:
                due = now + grace  # its containers get their grace period to stop
            else:
                due = now  # no container of it runs in this boot: nothing to wait for
            self._deletion_due[uid] = (boot_id, due)
        if due > now:
            self._queue.add_after(("pod", *key), due - now)
            return
        namespace, name = key
        try:
            self._rest.request(
                "DELETE",
                f"/api/v1/namespaces/{namespace}/pods/{name}",
                body={
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": uid},
                },
            )
        except ApiException as err:
            if err.status not in (404, 409):  # gone already, or replaced by a new pod
                raise
        with self._lock:
            self._deleted.add(uid)
        log.debug("pod deletion finished", extra={"POD": "/".join(key), "NODE": _node_name(pod)})

    def _update_pod_status(self, pod: Obj, mutate: Callable[[Obj], bool]) -> None:
        namespace, name = _pod_key(pod)
        uid = pod["metadata"]["uid"]
        path = f"/api/v1/namespaces/{namespace}/pods/{name}"

        def same_pod_mutate(current: Obj) -> bool:
            return current["metadata"]["uid"] == uid and mutate(current)

        try:
            self._read_modify_write(pod, path, f"{path}/status", same_pod_mutate)
        except ApiException as err:
            if err.status != 404:
                raise

    def _read_modify_write(
        self, obj: Obj, read_path: str, write_path: str, mutate: Callable[[Obj], bool]
    ) -> Obj:
        """PUT mutate(obj) to write_path, re-reading and retrying on 409; returns the latest."""
        for _ in range(CONFLICT_RETRIES):
            candidate = copy.deepcopy(obj)
            if not mutate(candidate):
                return obj
            try:
                return self._rest.request("PUT", write_path, body=candidate)
            except ApiException as err:
                if err.status != 409:
                    raise
            obj = self._rest.request("GET", read_path)
        raise WriteConflict(f"updating {write_path}")

    # -- the pod watch -------------------------------------------------------------------------

    def _run_pod_watch(self) -> None:
        resource_version: str | None = None
        failures = 0
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist_pods()
                resource_version = self._watch_pods(resource_version)
                failures = 0
            except _WatchExpired:
                log.info("pod watch expired, re-listing")
                resource_version = None
            except Exception as err:
                if self._stopping.is_set():
                    break
                delay = min(RETRY_BASE_DELAY * 2**failures, RETRY_MAX_DELAY)
                failures += 1
                log.warning(
                    "pod watch failed, will retry",
                    extra={"ERROR": repr(err), "RETRY_IN": delay},
                )
                self._stopping.wait(delay)

    def _relist_pods(self) -> str:
        """Replace the pod cache with a fresh list; returns the list's resourceVersion."""
        pods: dict[PodKey, Obj] = {}
        query = {"fieldSelector": BOUND_PODS_SELECTOR, "limit": str(LIST_PAGE_SIZE)}
        while True:
            try:
                page = self._rest.request("GET", "/api/v1/pods", query=query)
            except ApiException as err:
                if err.status == 410:  # the continue token expired
                    raise _WatchExpired from err
                raise
            for pod in page.get("items") or []:
                pods[_pod_key(pod)] = _with_kind(pod)
            token = page["metadata"].get("continue")
            if not token:
                resource_version: str = page["metadata"]["resourceVersion"]
                break
            query["continue"] = token
        with self._lock:
            for key in set(self._pods) - set(pods):
                self._drop_pod_locked(key)
            for key, pod in pods.items():
                self._store_pod_locked(key, pod)
            ours = [key for key, pod in pods.items() if _node_name(pod) in self._hosts]
        for namespace, name in ours:
            self._queue.add(("pod", namespace, name))
        log.info("pods listed", extra={"PODS": len(pods), "RESOURCE_VERSION": resource_version})
        return resource_version

    def _watch_pods(self, resource_version: str) -> str:
        """Follow pod events until the server ends the watch; returns the last resourceVersion."""
        query = {
            "watch": "true",
            "fieldSelector": BOUND_PODS_SELECTOR,
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_SECONDS),
        }
        try:
            response = self._rest.stream("/api/v1/pods", query, WATCH_TIMEOUT_SECONDS + 30.0)
        except ApiException as err:
            if err.status == 410:
                raise _WatchExpired from err
            raise
        with self._lock:
            self._watch_response = response
        try:
            for line in response:
                if self._stopping.is_set():
                    break
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _WatchExpired
                    raise RuntimeError(f"pod watch error: {obj.get('message')}")
                resource_version = obj["metadata"]["resourceVersion"]
                if kind != "BOOKMARK":
                    self._on_pod_event(kind, _with_kind(obj))
        finally:
            with self._lock:
                self._watch_response = None
            response.release_conn()
        return resource_version

    def _on_pod_event(self, kind: str, pod: Obj) -> None:
        key = _pod_key(pod)
        with self._lock:
            if kind == "DELETED":
                self._drop_pod_locked(key)
                return
            self._store_pod_locked(key, pod)
            ours = _node_name(pod) in self._hosts
        if ours:
            self._queue.add(("pod", *key))

    def _store_pod_locked(self, key: PodKey, pod: Obj) -> None:
        old = self._pods.get(key)
        if old is not None and old["metadata"]["uid"] != pod["metadata"]["uid"]:
            self._drop_pod_locked(key)
        self._pods[key] = pod
        self._pods_by_node.setdefault(_node_name(pod), set()).add(key)

    def _drop_pod_locked(self, key: PodKey) -> None:
        pod = self._pods.pop(key, None)
        if pod is None:
            return
        uid = pod["metadata"]["uid"]
        self._started_in_boot.pop(uid, None)
        self._deletion_due.pop(uid, None)
        self._deleted.discard(uid)
        self._pods_by_node.get(_node_name(pod), set()).discard(key)


# --------------------------------------------------------------------------------------------
# Pure helpers on API objects (plain dicts)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pod_key(pod: Obj) -> PodKey:
    return pod["metadata"]["namespace"], pod["metadata"]["name"]


def _node_name(pod: Obj) -> str:
    return str(pod.get("spec", {}).get("nodeName") or "")


def _with_kind(pod: Obj) -> Obj:
    """List items lack apiVersion/kind; a PUT of the object wants them."""
    pod.setdefault("apiVersion", "v1")
    pod.setdefault("kind", "Pod")
    return pod


def _set_condition(conditions: list[Obj], ctype: str, status: str, now: str, **fields: Any) -> bool:
    """Set one condition in place (lastTransitionTime moves only on a status change).

    Returns whether the condition's status, reason or message changed.
    """
    for condition in conditions:
        if condition.get("type") == ctype:
            changed = condition.get("status") != status or any(
                condition.get(name) != fields[name]
                for name in ("reason", "message")
                if name in fields
            )
            if condition.get("status") != status:
                condition["lastTransitionTime"] = now
            condition["status"] = status
            condition.update(fields)
            return changed
    conditions.append({"type": ctype, "status": status, "lastTransitionTime": now, **fields})
    return True


def _condition_status(obj: Obj, ctype: str) -> str | None:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition.get("type") == ctype:
            return str(condition.get("status"))
    return None


def _unreachable_effects(taints: list[Obj]) -> list[str]:
    return sorted(t.get("effect", "") for t in taints if t.get("key") == UNREACHABLE_TAINT)


def _is_ready(pod: Obj) -> bool:
    return (
        pod.get("status", {}).get("phase") == "Running"
        and _condition_status(pod, "Ready") == "True"
    )


def _has_run(pod: Obj) -> bool:
    """Whether the pod's containers were started before (by an earlier boot or emulator)."""
    return any(
        "running" in (status.get("state") or {})
        for status in pod.get("status", {}).get("containerStatuses") or []
    )


def _mark_not_ready(pod: Obj) -> bool:
    if _condition_status(pod, "Ready") != "True":
        return False
    _set_condition(pod["status"]["conditions"], "Ready", "False", _now())
    return True


def _mark_running(pod: Obj, host: _Host, *, restarted: bool, now: str) -> bool:
    """Status of a pod whose containers all run and are ready; False if nothing to change."""
    if _is_ready(pod) and not restarted:
        return False
    status = pod.setdefault("status", {})
    spec = pod["spec"]
    previous = {s["name"]: s for s in status.get("containerStatuses") or []}
    status["containerStatuses"] = [
        _running_container(container, previous.get(container["name"]), restarted, now)
        for container in spec["containers"]
    ]
    if spec.get("initContainers"):
        status["initContainerStatuses"] = [
            _finished_init_container(container, now) for container in spec["initContainers"]
        ]
    conditions = status.setdefault("conditions", [])
    for ctype in POD_CONDITION_TYPES:
        _set_condition(conditions, ctype, "True", now)
    pod_ip = status.get("podIP") or host.next_pod_ip()
    status.update(
        phase="Running",
        hostIP=host.host_ip,
        hostIPs=[{"ip": host.host_ip}],
        podIP=pod_ip,
        podIPs=[{"ip": pod_ip}],
    )
    status.setdefault("startTime", now)
    return True


def _running_container(container: Obj, previous: Obj | None, restarted: bool, now: str) -> Obj:
    restart_count = (previous or {}).get("restartCount", 0) + (1 if restarted and previous else 0)
    status: Obj = {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": _image_id(container.get("image", "")),
        "containerID": f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}",
        "ready": True,
        "started": True,
        "restartCount": restart_count,
        "state": {"running": {"startedAt": now}},
    }
    if restarted and previous is not None:
        # What the kubelet reports for a container that died with its host.
        last_run = (previous.get("state") or {}).get("running") or {}
        status["lastState"] = {
            "terminated": {
                "exitCode": 255,
                "reason": "Unknown",
                "startedAt": last_run.get("startedAt"),
                "finishedAt": now,
                "containerID": previous.get("containerID"),
            }
        }
    return status


def _finished_init_container(container: Obj, now: str) -> Obj:
    if container.get("restartPolicy") == "Always":  # a sidecar keeps running
        return _running_container(container, None, False, now)
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": _image_id(container.get("image", "")),
        "containerID": f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}",
        "ready": True,
        "restartCount": 0,
        "state": {
            "terminated": {
                "exitCode": 0,
                "reason": "Completed",
                "startedAt": now,
                "finishedAt": now,
            }
        },
    }


def _image_id(image: str) -> str:
    return f"sha256:{hashlib.sha256(image.encode()).hexdigest()}"
