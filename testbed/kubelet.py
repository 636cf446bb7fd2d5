"""Kubelet emulator: KWOK plays the kubelet of many virtual nodes; this wrapper does the rest.

The test bed runs etcd, kube-apiserver and a kube-controller-manager with only the disruption
controller: no scheduler, no node lifecycle controller and no kubelet. Each KubeletEmulator
runs one KWOK process (``sigs.k8s.io/kwok`` v0.8.0, built by ``hack/build-kwok.sh``) that
plays the kubelet for the Nodes carrying this instance's label, with the Stages of
``testbed/kwok/config.yaml``:

* a new Node turns Ready (``node-initialize``), its node Lease in ``kube-node-lease`` is
  renewed every ``heartbeat_interval`` (KWOK renews every quarter of the lease duration, as
  the kubelet does) and its conditions' ``lastHeartbeatTime`` every
  ``status_report_interval`` (``node-heartbeat-with-lease``);
* pods bound to it (``spec.nodeName``) run and are Ready (``pod-ready``);
* a terminating pod is removed with a grace-0 delete once its grace period times
  ``grace_period_scale`` has passed, at once if it is not Ready
  (``pod-delete-after-scaled-grace``);
* a pod that lost Ready because its host went down runs again once the host is back, with
  every restartCount + 1 (``pod-restart-after-boot``).

KWOK does not register nodes and knows nothing of hosts going down, so this wrapper does:

* ``add_node(s)`` creates the Node as the kubelet registers it (``nodeInfo.bootID``, a
  Flatcar ``osImage`` and kernel, capacity, the API server's version as kubeletVersion) and
  waits until KWOK reports it Ready;
* ``shutdown()`` removes KWOK's label from the Node, and KWOK goes silent for it: no Lease
  renewals, no pod handling. The node lifecycle controller, which the test bed does not run,
  would notice after node-monitor-grace-period; the wrapper stands in for it at once, so a
  test sees a host go down exactly when it takes it down: the node's conditions become
  Unknown (``NodeStatusUnknown``), the ``node.kubernetes.io/unreachable`` NoSchedule and
  NoExecute taints are added and the node's pods get ``Ready=False``. A KWOK write already
  in flight when the label went could undo part of that, so the down state is written once
  more a moment later;
* ``boot()`` writes the new ``nodeInfo.bootID``, removes the taints, puts the label back and
  waits until KWOK reports the node Ready; KWOK then runs its pods again. A pod whose
  deletion began while the host was down is removed right after the boot.

With ``node_monitor_grace_period`` (seconds, 0 by default) the wrapper plays the controller
with its grace period instead: a host down for less than it is left as the kubelet last
reported it (still Ready, no taints, its pods Ready), as the real controller leaves a host
that reboots quickly, and one down for longer is marked down as above once the period has
passed. Booting a host that was never marked down is the kubelet's first status after a
short reboot: one status write with the new ``bootID`` and a Ready heartbeat, and the label
back; its pods keep their status (the kubelet restarting their containers is not modelled).

Requests the wrapper makes carry the user agent ``cluo-kubelet-emulator``; KWOK's carry its
own. A restarted KWOK process waits one lease duration before it takes over a node Lease
another process renewed, so nodes are served by the process that registered them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import signal
import string
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

Obj = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-kwok.sh"
KWOK_CONFIG_TEMPLATE = Path(__file__).resolve().parent / "kwok" / "config.yaml"

USER_AGENT = "cluo-kubelet-emulator"
NODE_LEASE_NAMESPACE = "kube-node-lease"
# On every Node an emulator registered: which instance made it (stop() deletes by it).
INSTANCE_LABEL = "kubelet-emulator.cluo.test/instance"
# KWOK's node selector: on the Node (value: the instance id) while its host is up.
KWOK_LABEL = "kubelet-emulator.cluo.test/kwok"
UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"
UNKNOWN_REASON = "NodeStatusUnknown"
UNKNOWN_MESSAGE = "Kubelet stopped posting node status."
# The conditions the node lifecycle controller turns Unknown (NetworkUnavailable it leaves).
KUBELET_CONDITION_TYPES = ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure")
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"

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

STATUS_REPORT_JITTER = 0.04  # as the kubelet's, on top of status_report_interval
READY_POLL_INTERVAL = 0.05
BOOT_TIMEOUT = 30.0  # for KWOK to report a booted node Ready
REASSERT_DOWN_AFTER = 1.0  # seconds after a shutdown: a KWOK write in flight has landed
KWOK_KILL_TIMEOUT = 10.0  # for a SIGKILLed kwok to be reaped
CONFLICT_RETRIES = 8
LOG_TAIL_CHARS = 3000


class KwokError(RuntimeError):
    """KWOK could not be built, found or started, or it died."""


def find_kwok() -> Path:
    """The kwok binary: ``$KWOK_BINARY``, else ``hack/build-kwok.sh``'s (built if missing)."""
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise KwokError(
            f"no kwok binary: `bash {BUILD_SCRIPT.relative_to(REPO_ROOT)}` (which builds it "
            f"into $CLUO_CACHE) failed:\n{result.stderr[-LOG_TAIL_CHARS:]}"
        )
    binary = Path(result.stdout.strip().splitlines()[-1])
    if not os.access(binary, os.X_OK):
        raise KwokError(
            f"{binary} is not an executable kwok; build it with "
            f"`bash {BUILD_SCRIPT.relative_to(REPO_ROOT)}`"
        )
    return binary


def kwok_config(
    *,
    lease_duration_seconds: int,
    parallelism: int,
    status_report_interval: float,
    grace_period_scale: float,
) -> str:
    """``testbed/kwok/config.yaml`` with its parameters filled in."""
    status_report_ms = max(1, round(status_report_interval * 1000))
    return _KwokTemplate(KWOK_CONFIG_TEMPLATE.read_text()).substitute(
        lease_duration_seconds=lease_duration_seconds,
        parallelism=parallelism,
        status_report_ms=status_report_ms,
        status_report_jitter_ms=round(status_report_ms * (1 + STATUS_REPORT_JITTER)) + 1,
        grace_ms_per_second=f"{grace_period_scale * 1000:g}",
    )


class _KwokTemplate(string.Template):
    """``@{name}`` placeholders: ``$`` is taken by Go templates and jq."""

    delimiter = "@"


def kubeconfig_json(configuration: kubernetes.client.Configuration) -> str:
    """A kubeconfig (JSON is YAML) reaching the API server as `configuration` does."""
    cluster: Obj = {"server": configuration.host}
    if not configuration.verify_ssl:
        cluster["insecure-skip-tls-verify"] = True
    elif configuration.ssl_ca_cert:
        cluster["certificate-authority"] = str(configuration.ssl_ca_cert)
    user: Obj = {}
    if configuration.cert_file:
        user["client-certificate"] = str(configuration.cert_file)
        user["client-key"] = str(configuration.key_file)
    authorization = configuration.get_api_key_with_prefix("authorization") or ""
    if authorization.startswith("Bearer "):
        user["token"] = authorization.removeprefix("Bearer ")
    return json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test-bed", "cluster": cluster}],
        "users": [{"name": "kubelet-emulator", "user": user}],
        "contexts": [
            {"name": "test-bed", "context": {"cluster": "test-bed", "user": "kubelet-emulator"}}
        ],
        "current-context": "test-bed",
    }, indent=2)


# --------------------------------------------------------------------------------------------
# The public handle on one virtual host


@dataclass(eq=False)
class _Host:
    """One emulated host. `up`, `boot_id` and `downs` change only under `lock`."""

    name: str
    index: int
    boot_id: str
    up: bool = True
    downs: int = 0  # shutdowns so far: a late re-assert of an earlier one is dropped
    marked_down: bool = False  # the down state was written since the last boot
    machine_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    system_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def host_ip(self) -> str:
        return f"100.{64 + self.index // 65536}.{self.index // 256 % 256}.{self.index % 256}"

    @property
    def pod_cidr(self) -> str:
        return f"10.{128 + self.index // 256}.{self.index % 256}.0/24"


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
        """The host goes down: KWOK goes silent for it; the node turns Unknown and tainted
        and its pods lose Ready (written before this returns, and once more a moment later).
        """
        self._emulator._shut_down(self._host)

    def boot(self, boot_id: str | None = None) -> str:
        """The host (re)boots with `boot_id` (a random one if None); returns the boot id.

        Returns once the node reports Ready with the new bootID; KWOK then runs its pods
        again. Booting a host that is up counts as a reboot nobody noticed in between.
        """
        new_boot_id = boot_id or str(uuid.uuid4())
        self._emulator._boot(self._host, new_boot_id)
        return new_boot_id


# --------------------------------------------------------------------------------------------
# The emulator


class KubeletEmulator:
    """KWOK plus the registration and the node lifecycle controller's part, for many nodes.

    Use as a context manager, or call start() and stop(). `workers` is KWOK's parallelism
    (and the wrapper's when it registers many nodes at once). A host is marked down
    `node_monitor_grace_period` seconds after it went down (at once with 0, the default),
    unless it booted in between.
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        heartbeat_interval: float = 10.0,
        status_report_interval: float = 300.0,
        grace_period_scale: float = 1.0,
        workers: int = 8,
        node_monitor_grace_period: float = 0.0,
    ) -> None:
        if heartbeat_interval <= 0 or status_report_interval <= 0:
            raise ValueError("heartbeat and status report intervals must be positive")
        if grace_period_scale < 0 or node_monitor_grace_period < 0:
            raise ValueError("grace_period_scale and node_monitor_grace_period must not be "
                             "negative")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        configuration = copy.deepcopy(api_client.configuration)
        configuration.connection_pool_maxsize = workers + 2
        self._client = kubernetes.client.ApiClient(configuration)
        self._client.default_headers.update(api_client.default_headers)
        self._client.user_agent = USER_AGENT
        self._core = kubernetes.client.CoreV1Api(self._client)
        self._leases = kubernetes.client.CoordinationV1Api(self._client)
        self._kubeconfig = kubeconfig_json(configuration)
        # KWOK renews every quarter of the lease duration, in whole seconds.
        self._lease_duration_seconds = max(1, math.ceil(4 * heartbeat_interval))
        self._status_report_interval = status_report_interval
        self._grace_period_scale = grace_period_scale
        self._workers = workers
        self._node_monitor_grace_period = node_monitor_grace_period
        self._instance = uuid.uuid4().hex[:12]
        self._kubelet_version = ""

        self._lock = threading.Lock()
        self._hosts: dict[str, _Host] = {}
        self._next_index = 1
        self._timers: set[threading.Timer] = set()
        self._workdir: Path | None = None
        self._kwok: subprocess.Popen[bytes] | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> KubeletEmulator:
        if self._kwok is not None:
            raise RuntimeError("kubelet emulator already started")
        binary = find_kwok()
        self._kubelet_version = kubernetes.client.VersionApi(self._client).get_code().git_version
        workdir = Path(tempfile.mkdtemp(prefix="cluo-kwok-"))
        try:
            self._kwok = self._spawn_kwok(binary, workdir)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self._workdir = workdir
        log.info(
            "kubelet emulator started",
            extra={"INSTANCE": self._instance, "KWOK_PID": self._kwok.pid, "WORKDIR": workdir},
        )
        return self

    def _spawn_kwok(self, binary: Path, workdir: Path) -> subprocess.Popen[bytes]:
        """Write kwok's kubeconfig and configuration into `workdir` and start it there."""
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.touch(mode=0o600)
        kubeconfig.write_text(self._kubeconfig)
        config = workdir / "config.yaml"
        config.write_text(
            kwok_config(
                lease_duration_seconds=self._lease_duration_seconds,
                parallelism=self._workers,
                status_report_interval=self._status_report_interval,
                grace_period_scale=self._grace_period_scale,
            )
        )
        argv = [
            str(binary),
            f"--kubeconfig={kubeconfig}",
            f"--config={config}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-label-selector={KWOK_LABEL}={self._instance}",
        ]
        with (workdir / "kwok.log").open("ab") as logfile:
            return subprocess.Popen(
                argv, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self, *, delete_nodes: bool = False, timeout: float = 10.0) -> None:
        """Stop KWOK (SIGTERM; SIGKILL if it has not exited after `timeout` seconds).

        With `delete_nodes`, also delete the Nodes and node Leases this emulator registered
        (pods bound to them stay: nothing garbage-collects pods in the test bed).
        """
        with self._lock:
            self._stopping = True
            timers, self._timers = self._timers, set()
            names = list(self._hosts)
        for timer in timers:
            timer.cancel()
        try:
            self._stop_kwok(timeout)
            if delete_nodes:
                self._core.delete_collection_node(
                    label_selector=f"{INSTANCE_LABEL}={self._instance}"
                )
                for name in names:
                    _unless_gone(lambda name=name: self._leases.delete_namespaced_lease(
                        name, NODE_LEASE_NAMESPACE))
        finally:
            self._client.close()
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
        log.info("kubelet emulator stopped", extra={"INSTANCE": self._instance})

    def __enter__(self) -> KubeletEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _stop_kwok(self, timeout: float) -> None:
        process = self._kwok
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("kwok did not stop on SIGTERM, killing it", extra={"PID": process.pid})
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(KWOK_KILL_TIMEOUT)

    def _check_kwok(self) -> None:
        """Raise KwokError (with its log) if the KWOK process is not running."""
        process = self._kwok
        if process is None or self._stopping:
            raise RuntimeError("kubelet emulator is not running")
        code = process.poll()
        if code is not None:
            raise KwokError(f"kwok exited with status {code}:\n{self._kwok_log_tail()}")

    def _kwok_log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        if self._workdir is None:
            return ""
        try:
            return (self._workdir / "kwok.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- nodes -------------------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        boot_id: str | None = None,
        timeout: float = 60.0,
    ) -> EmulatedNode:
        """Register a Node that is up; returns once KWOK reports it Ready."""
        return self._add_hosts([(name, boot_id)], labels or {}, timeout)[0]

    def add_nodes(
        self,
        names: Iterable[str],
        *,
        labels: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> list[EmulatedNode]:
        """Register many Nodes in parallel; returns once KWOK reports all Ready."""
        return self._add_hosts([(name, None) for name in names], labels or {}, timeout)

    def node(self, name: str) -> EmulatedNode:
        with self._lock:
            return EmulatedNode(self, self._hosts[name])

    def _add_hosts(
        self, specs: list[tuple[str, str | None]], labels: dict[str, str], timeout: float
    ) -> list[EmulatedNode]:
        self._check_kwok()
        names = [name for name, _ in specs]
        if len(set(names)) != len(names):
            raise ValueError("node names must be unique")
        with self._lock:
            taken = [name for name in names if name in self._hosts]
            if taken:
                raise ValueError(f"nodes already emulated: {taken}")
            hosts = []
            for name, boot_id in specs:
                hosts.append(_Host(name, self._next_index, boot_id or str(uuid.uuid4())))
                self._next_index += 1
            for host in hosts:
                self._hosts[host.name] = host
        self._delete_stale_leases(set(names))
        with ThreadPoolExecutor(self._workers, thread_name_prefix="kubelet-emulator") as pool:
            list(pool.map(lambda host: self._register(host, labels), hosts))
        self._wait_ready(names, timeout, "to be registered and reported Ready")
        return [EmulatedNode(self, host) for host in hosts]

    def _delete_stale_leases(self, names: set[str]) -> None:
        """Delete node Leases of these names an earlier KWOK left: a Lease another process
        renewed keeps ours off the node for one lease duration."""
        leases = self._leases.list_namespaced_lease(NODE_LEASE_NAMESPACE).items
        for lease in leases:
            if lease.metadata.name in names:
                _unless_gone(lambda name=lease.metadata.name: self._leases.delete_namespaced_lease(
                    name, NODE_LEASE_NAMESPACE))

    def _register(self, host: _Host, labels: dict[str, str]) -> None:
        """Create the Node as the kubelet registers it; KWOK then makes it Ready."""
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": host.name,
                "labels": self._node_labels(host, labels),
                "annotations": {
                    "node.alpha.kubernetes.io/ttl": "0",
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                },
            },
            "spec": {"podCIDR": host.pod_cidr, "podCIDRs": [host.pod_cidr]},
            "status": self._kubelet_status(host),
        }
        try:
            self._core.create_node(body)
        except ApiException as err:
            if err.status != 409:
                raise
            # A Node of that name exists (an earlier run): adopt it, as a kubelet would.
            self._core.patch_node(
                host.name, {"metadata": {"labels": self._node_labels(host, labels)}}
            )
            self._core.patch_node_status(
                host.name, {"status": self._kubelet_status(host)}, _content_type=STRATEGIC_MERGE
            )
            self._set_unreachable_taints(host.name, present=False)
        log.debug("node registered", extra={"NODE": host.name, "BOOT_ID": host.boot_id})

    def _node_labels(self, host: _Host, labels: dict[str, str]) -> dict[str, str]:
        return {
            "kubernetes.io/hostname": host.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": "amd64",
            **labels,
            INSTANCE_LABEL: self._instance,
            KWOK_LABEL: self._instance,
        }

    def _kubelet_status(self, host: _Host) -> Obj:
        """What the kubelet posts about itself; KWOK adds the conditions and keeps the rest."""
        return {
            "capacity": dict(NODE_RESOURCES),
            "allocatable": dict(NODE_RESOURCES),
            "addresses": [
                {"type": "InternalIP", "address": host.host_ip},
                {"type": "Hostname", "address": host.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": host.machine_id,
                "systemUUID": host.system_uuid,
                "bootID": host.boot_id,
                "kernelVersion": KERNEL_VERSION,
                "osImage": OS_IMAGE,
                "containerRuntimeVersion": CONTAINER_RUNTIME_VERSION,
                "kubeletVersion": self._kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def _wait_ready(self, names: list[str], timeout: float, what: str) -> None:
        """Wait until every node of `names` shows Ready=True; the error names the others."""
        deadline = time.monotonic() + timeout
        wanted = set(names)
        # One node (a boot) is read alone, not among all of this emulator's nodes.
        selector = (
            {"field_selector": f"metadata.name={names[0]}"} if len(names) == 1
            else {"label_selector": f"{INSTANCE_LABEL}={self._instance}"}
        )
        while True:
            self._check_kwok()
            nodes = self._core.list_node(**selector).items
            ready = {node.metadata.name for node in nodes if _ready_status(node) == "True"}
            pending = sorted(wanted - ready)
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"kubelet emulator: {len(pending)} node(s) not Ready within {timeout:g}s "
                    f"waiting for them {what} (first: {pending[:5]}); kwok's log ends:\n"
                    f"{self._kwok_log_tail()}"
                )
            time.sleep(READY_POLL_INTERVAL)

    # -- down and up -------------------------------------------------------------------------

    def _shut_down(self, host: _Host) -> None:
        with host.lock:
            if not host.up:
                return
            self._check_kwok()
            # KWOK's watch drops the node: no more Lease renewals, status or pod handling.
            self._core.patch_node(host.name, {"metadata": {"labels": {KWOK_LABEL: None}}})
            host.up = False
            host.downs += 1
            if not self._node_monitor_grace_period:
                self._write_down_state(host)
                host.marked_down = True
            downs = host.downs
        log.info("emulated host shut down", extra={"NODE": host.name})
        # At once, the down state again once a KWOK write in flight has landed; with a grace
        # period, the down state once the host has been down that long.
        timer = threading.Timer(
            self._node_monitor_grace_period or REASSERT_DOWN_AFTER,
            lambda: self._write_down_state_later(host, downs, timer),
        )
        timer.daemon = True
        with self._lock:
            if self._stopping:
                return
            self._timers.add(timer)
        timer.start()

    def _write_down_state_later(self, host: _Host, downs: int, timer: threading.Timer) -> None:
        """Write the down state of a host still down since shutdown number `downs`: again
        (undoing what a KWOK write in flight at the shutdown did), or for the first time
        once the node monitor grace period has passed."""
        try:
            with host.lock:
                if host.up or host.downs != downs or self._stopping:
                    return
                if self._write_down_state(host):
                    log.info("down state written", extra={
                        "NODE": host.name, "AGAIN": host.marked_down})
                host.marked_down = True
        except Exception as err:
            log.warning("could not re-check a down node", extra={"NODE": host.name,
                                                                 "ERROR": repr(err)})
        finally:
            with self._lock:
                self._timers.discard(timer)

    def _write_down_state(self, host: _Host) -> bool:
        """The node lifecycle controller's part for a node whose kubelet went silent: its
        conditions Unknown, the unreachable taints, its pods not Ready. Returns whether
        anything had to change."""
        changed = self._mark_conditions_unknown(host.name)
        changed |= self._set_unreachable_taints(host.name, present=True)
        changed |= self._mark_pods_not_ready(host.name)
        return changed

    def _boot(self, host: _Host, boot_id: str) -> None:
        if host.up:  # a reboot nobody saw: down for an instant
            self._shut_down(host)
        with host.lock:
            self._check_kwok()
            if host.marked_down:
                self._core.patch_node_status(
                    host.name, {"status": {"nodeInfo": {"bootID": boot_id}}},
                    _content_type=STRATEGIC_MERGE,
                )
                self._set_unreachable_taints(host.name, present=False)
                ready = None
            else:  # down too briefly to be marked: the kubelet posts its status at once
                ready = _ready_status(self._core.patch_node_status(
                    host.name, {"status": {
                        "nodeInfo": {"bootID": boot_id},
                        "conditions": [{"type": "Ready", "status": "True",
                                        "lastHeartbeatTime": _now()}],
                    }},
                    _content_type=STRATEGIC_MERGE,
                ))
            self._core.patch_node(
                host.name, {"metadata": {"labels": {KWOK_LABEL: self._instance}}}
            )
            host.boot_id = boot_id
            host.up = True
            host.marked_down = False
        log.info("emulated host booted", extra={"NODE": host.name, "BOOT_ID": boot_id})
        if ready != "True":
            self._wait_ready([host.name], BOOT_TIMEOUT, f"to report Ready after boot {boot_id}")

    def _mark_conditions_unknown(self, name: str) -> bool:
        node = self._core.read_node_status(name)
        stale = [
            c.type for c in node.status.conditions or []
            if c.type in KUBELET_CONDITION_TYPES and c.status != "Unknown"
        ]
        if not stale:
            return False
        now = _now()
        self._core.patch_node_status(
            name,
            {"status": {"conditions": [
                {"type": ctype, "status": "Unknown", "reason": UNKNOWN_REASON,
                 "message": UNKNOWN_MESSAGE, "lastTransitionTime": now}
                for ctype in stale
            ]}},
            _content_type=STRATEGIC_MERGE,
        )
        return True

    def _set_unreachable_taints(self, name: str, *, present: bool) -> bool:
        """Add or remove the two unreachable taints, leaving other taints alone: a merge
        patch carrying the resourceVersion it was computed from, retried on 409. Returns
        whether anything had to change."""
        for _ in range(CONFLICT_RETRIES):
            node = self._core.read_node(name)
            current = node.spec.taints or []
            effects = sorted(t.effect for t in current if t.key == UNREACHABLE_TAINT)
            if effects == (["NoExecute", "NoSchedule"] if present else []):
                return False
            taints = [
                self._client.sanitize_for_serialization(t)
                for t in current if t.key != UNREACHABLE_TAINT
            ]
            if present:
                taints.append({"key": UNREACHABLE_TAINT, "effect": "NoSchedule"})
                taints.append({"key": UNREACHABLE_TAINT, "effect": "NoExecute",
                               "timeAdded": _now()})
            try:
                self._core.patch_node(
                    name,
                    {"metadata": {"resourceVersion": node.metadata.resource_version},
                     "spec": {"taints": taints}},
                    _content_type=MERGE,
                )
                return True
            except ApiException as err:
                if err.status != 409:
                    raise
        raise RuntimeError(f"setting the unreachable taints of node {name!r}: kept conflicting")

    def _mark_pods_not_ready(self, name: str) -> bool:
        """The node lifecycle controller's MarkPodsNotReady: Ready=False on the node's pods."""
        pods = self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}")
        changed = False
        for pod in pods.items:
            if pod.status.phase in ("Succeeded", "Failed"):
                continue
            if not any(c.type == "Ready" and c.status == "True"
                       for c in pod.status.conditions or []):
                continue
            body = {"status": {"conditions": [
                {"type": "Ready", "status": "False", "lastTransitionTime": _now()}
            ]}}
            changed |= _unless_gone(
                lambda pod=pod, body=body: self._core.patch_namespaced_pod_status(
                    pod.metadata.name, pod.metadata.namespace, body,
                    _content_type=STRATEGIC_MERGE,
                )
            )
        return changed


def _unless_gone(call: Callable[[], object]) -> bool:
    """Make an API call; False instead of the error if its object is gone (404)."""
    try:
        call()
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


def _ready_status(node: kubernetes.client.V1Node) -> str | None:
    for condition in node.status.conditions or [] if node.status else []:
        if condition.type == "Ready":
            return str(condition.status)
    return None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

