"""The node adapter and the client configuration against a real kube-apiserver."""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import pytest
from kubernetes.client import CoreV1Api

from cluo.errors import ConfigError, KubeError, WatchExpired
from cluo.kube.client import KubeClient
from cluo.kube.config import in_cluster_client, kubeconfig_client, user_agent
from cluo.kube.nodes import (
    EVENT_NAMESPACE,
    KubeNodes,
    NodeChange,
    NodeEvent,
    NodeSnapshot,
    NodeWatch,
)
from cluo.protocol import Keys
from testbed.controlplane import ControlPlane
from testbed.kubelet import EmulatedNode, KubeletEmulator
from testbed.waiting import wait_for

pytestmark = pytest.mark.kube

KEYS = Keys()
FOREIGN = "example.com/owned-by-someone-else"


@pytest.fixture
def kubelet(kube_admin: kubernetes.client.ApiClient) -> Iterator[KubeletEmulator]:
    emulator = KubeletEmulator(kube_admin, grace_period_scale=0.0).start()
    yield emulator
    emulator.stop(delete_nodes=True)


@pytest.fixture
def node(kubelet: KubeletEmulator, namespace: str) -> EmulatedNode:
    return kubelet.add_node(f"{namespace}-node")


@pytest.fixture
def nodes(kube_client: KubeClient) -> KubeNodes:
    return KubeNodes(kube_client, KEYS)


def admin_patch(api: kubernetes.client.ApiClient, name: str, annotations: dict[str, str]) -> None:
    """Another writer (an admin, the coordinator) sets annotations of its own."""
    CoreV1Api(api).patch_node(
        name, {"metadata": {"annotations": annotations}},
        _content_type="application/merge-patch+json",
    )


def annotations_of(api: kubernetes.client.ApiClient, name: str) -> dict[str, str]:
    return dict(CoreV1Api(api).read_node(name).metadata.annotations or {})


class EventCollector:
    """Runs a NodeWatch in a thread and hands its events over through a queue."""

    def __init__(self, watch: NodeWatch) -> None:
        self.watch = watch
        self.events: queue.Queue[NodeEvent | BaseException | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.watch:
                self.events.put(event)
        except BaseException as err:
            self.events.put(err)
        self.events.put(None)

    def next_matching(self, predicate: object, timeout: float, what: str) -> NodeEvent:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
            try:
                item = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            if item is None:
                raise AssertionError(f"the watch ended before {what}")
            if callable(predicate) and predicate(item):
                return item


# -- reading ---------------------------------------------------------------------------------


def test_get_reads_the_node_as_the_kubelet_reports_it(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, nodes: KubeNodes
) -> None:
    admin_patch(kube_admin, node.name, {KEYS.reboot_ok: "true", KEYS.reboot_paused: "yes"})
    snapshot = nodes.get(node.name)
    assert snapshot.name == node.name
    assert snapshot.uid and snapshot.resource_version
    assert snapshot.ready
    assert snapshot.boot_id == node.boot_id
    assert not snapshot.unschedulable
    assert snapshot.annotations[KEYS.reboot_ok] == "true"
    # The protocol reading of the metadata comes with it, complaints included.
    assert snapshot.state.reboot_ok
    assert not snapshot.state.reboot_paused
    assert any("reboot-paused" in complaint for complaint in snapshot.state.complaints)
    with pytest.raises(TypeError):
        snapshot.annotations[KEYS.reboot_ok] = "false"  # type: ignore[index]


def test_get_follows_the_node_down_and_through_a_reboot(
    node: EmulatedNode, nodes: KubeNodes
) -> None:
    first_boot = node.boot_id
    node.shutdown()
    wait_for(lambda: not nodes.get(node.name).ready, timeout=30, what="the node to turn NotReady")
    new_boot = node.boot()
    after = wait_for(
        lambda: (s := nodes.get(node.name)).ready and s.boot_id == new_boot and s,
        timeout=30, what="the node to come back Ready with the new boot id",
    )
    assert after.boot_id != first_boot


def test_get_of_a_missing_node_is_not_found(nodes: KubeNodes, namespace: str) -> None:
    with pytest.raises(KubeError) as caught:
        nodes.get(f"{namespace}-no-such-node")
    assert caught.value.kind == "not_found"
    assert caught.value.status == 404
    assert f"reading node '{namespace}-no-such-node'" in str(caught.value)


def test_an_unreachable_api_server_is_unavailable(control_plane: ControlPlane) -> None:
    tls = ssl.create_default_context(cafile=control_plane.pki.ca_cert)
    # Nothing listens on port 1.
    with KubeClient("https://127.0.0.1:1", user_agent="test", tls=tls) as api, \
            pytest.raises(KubeError) as caught:
        KubeNodes(api, KEYS).get("n1")
    assert caught.value.kind == "unavailable"
    assert caught.value.transient
    assert "reading node 'n1'" in str(caught.value)


# -- writing ---------------------------------------------------------------------------------


def test_patch_metadata_touches_only_the_given_keys(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, nodes: KubeNodes
) -> None:
    admin_patch(kube_admin, node.name, {FOREIGN: "keep", KEYS.status: "old"})
    CoreV1Api(kube_admin).patch_node(
        node.name, {"metadata": {"labels": {"example.com/pool": "a"}}},
        _content_type="application/merge-patch+json",
    )
    after = nodes.patch_metadata(
        node.name,
        annotations={KEYS.reboot_needed: "true", KEYS.status: "UPDATE_STATUS_IDLE"},
        labels={KEYS.reboot_needed: "true"},
    )
    assert after.annotations[FOREIGN] == "keep"
    assert after.annotations[KEYS.reboot_needed] == "true"
    assert after.annotations[KEYS.status] == "UPDATE_STATUS_IDLE"
    assert after.labels["example.com/pool"] == "a"
    assert after.labels[KEYS.reboot_needed] == "true"

    after = nodes.patch_metadata(node.name, annotations={KEYS.status: None})
    assert KEYS.status not in after.annotations
    assert after.annotations[FOREIGN] == "keep"
    assert after.annotations[KEYS.reboot_needed] == "true"
    assert annotations_of(kube_admin, node.name) == dict(after.annotations)


def test_concurrent_writers_never_clobber_each_other(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, nodes: KubeNodes
) -> None:
    rounds = 25
    errors: list[BaseException] = []

    def ours() -> None:
        try:
            for i in range(rounds):
                nodes.patch_metadata(node.name, annotations={KEYS.last_checked_time: str(i)})
        except BaseException as err:
            errors.append(err)

    def theirs() -> None:
        try:
            for i in range(rounds):
                admin_patch(kube_admin, node.name, {FOREIGN: str(i)})
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=ours), threading.Thread(target=theirs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert not any(thread.is_alive() for thread in threads)
    final = annotations_of(kube_admin, node.name)
    assert final[KEYS.last_checked_time] == str(rounds - 1)
    assert final[FOREIGN] == str(rounds - 1)


def test_update_recomputes_from_a_fresh_read_after_a_conflict(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, nodes: KubeNodes
) -> None:
    counter = "example.com/counter"
    admin_patch(kube_admin, node.name, {counter: "1"})
    seen: list[str] = []

    def increment(current: NodeSnapshot) -> NodeChange:
        seen.append(current.annotations[counter])
        if len(seen) == 1:
            # Someone else writes between our read and our write.
            admin_patch(kube_admin, node.name, {counter: "5", FOREIGN: "theirs"})
        value = int(current.annotations[counter]) + 1
        return NodeChange(annotations={counter: str(value), KEYS.reboot_needed: "true"})

    result = nodes.update(node.name, increment)
    # The first write (1 -> 2) was refused with 409; the second started from 5.
    assert seen == ["1", "5"]
    assert result.annotations[counter] == "6"
    final = annotations_of(kube_admin, node.name)
    assert final[counter] == "6"
    assert final[FOREIGN] == "theirs"
    assert final[KEYS.reboot_needed] == "true"


def test_update_gives_up_after_bounded_attempts(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, nodes: KubeNodes
) -> None:
    calls: list[int] = []

    def always_overtaken(current: NodeSnapshot) -> NodeChange:
        calls.append(1)
        admin_patch(kube_admin, node.name, {FOREIGN: str(len(calls))})
        return NodeChange(annotations={KEYS.reboot_in_progress: "true"})

    with pytest.raises(KubeError) as caught:
        nodes.update(node.name, always_overtaken, attempts=3)
    assert caught.value.kind == "conflict"
    assert f"updating node '{node.name}'" in str(caught.value)
    assert len(calls) == 3
    assert KEYS.reboot_in_progress not in annotations_of(kube_admin, node.name)


def test_update_writes_nothing_when_nothing_changes(
    node: EmulatedNode, nodes: KubeNodes
) -> None:
    before = nodes.patch_metadata(node.name, annotations={KEYS.reboot_needed: "false"})
    same = nodes.update(node.name, lambda n: NodeChange(annotations={KEYS.reboot_needed: "false"}))
    none = nodes.update(node.name, lambda n: None)
    assert same.resource_version == none.resource_version
    assert same.annotations[KEYS.reboot_needed] == "false"
    assert int(same.resource_version) >= int(before.resource_version)


def test_cordon_and_uncordon_touch_only_spec_unschedulable(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, nodes: KubeNodes
) -> None:
    admin_patch(kube_admin, node.name, {FOREIGN: "keep"})
    cordoned = nodes.set_unschedulable(node.name, True)
    assert cordoned.unschedulable
    assert CoreV1Api(kube_admin).read_node(node.name).spec.unschedulable is True
    assert cordoned.annotations[FOREIGN] == "keep"

    uncordoned = nodes.set_unschedulable(node.name, False)
    assert not uncordoned.unschedulable
    assert not CoreV1Api(kube_admin).read_node(node.name).spec.unschedulable
    assert uncordoned.annotations[FOREIGN] == "keep"


def test_patch_writes_annotations_and_spec_unschedulable_in_one_version(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, nodes: KubeNodes
) -> None:
    """The agent's grant (mark + cordon) and its end (uncordon + unmark): no watcher ever
    sees the node with one half and not the other."""
    admin_patch(kube_admin, node.name, {FOREIGN: "keep"})
    before = nodes.get(node.name)
    mark = KEYS.agent_made_unschedulable

    cordoned = nodes.patch(node.name, NodeChange(annotations={mark: "true"}, unschedulable=True))
    uncordoned = nodes.patch(node.name, NodeChange(
        annotations={mark: "false", KEYS.boot_id_before_reboot: None}, unschedulable=False))

    assert cordoned.unschedulable and cordoned.annotations[mark] == "true"
    assert not uncordoned.unschedulable and uncordoned.annotations[mark] == "false"
    assert uncordoned.annotations[FOREIGN] == "keep"
    seen: list[tuple[bool, str | None]] = []
    with nodes.watch(node.name, before.resource_version, timeout_seconds=30) as watch:
        for event in watch:
            seen.append((event.node.unschedulable, event.node.annotations.get(mark)))
            if event.node.resource_version == uncordoned.resource_version:
                break
    assert seen[-1] == (False, "false"), f"the watch never reached the uncordon: {seen}"
    assert (True, "true") in seen
    assert (True, "false") not in seen and (False, "true") not in seen, seen


def test_update_cordons_and_records_it_in_one_write_unless_an_admin_cordoned_first(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, nodes: KubeNodes
) -> None:
    def cordon(current: NodeSnapshot) -> NodeChange | None:
        if current.unschedulable:
            return None  # an admin's cordon: not ours to undo later
        return NodeChange(
            unschedulable=True, annotations={KEYS.agent_made_unschedulable: "true"}
        )

    ours = nodes.update(node.name, cordon)
    assert ours.unschedulable and ours.state.agent_made_unschedulable

    other = f"{node.name}-admin-cordoned"
    admin_node = kubernetes.client.V1Node(
        metadata=kubernetes.client.V1ObjectMeta(name=other),
        spec=kubernetes.client.V1NodeSpec(unschedulable=True),
    )
    CoreV1Api(kube_admin).create_node(admin_node)
    try:
        theirs = nodes.update(other, cordon)
        assert theirs.unschedulable and not theirs.state.agent_made_unschedulable
    finally:
        CoreV1Api(kube_admin).delete_node(other)


def test_a_rejected_value_is_invalid(node: EmulatedNode, nodes: KubeNodes) -> None:
    with pytest.raises(KubeError) as caught:
        nodes.patch_metadata(node.name, labels={KEYS.version: "not a label value!"})
    assert caught.value.kind == "invalid"
    assert caught.value.status == 422
    assert f"node '{node.name}'" in str(caught.value)


# -- watching --------------------------------------------------------------------------------


def test_watch_sees_a_change_and_resumes_from_its_resource_version(
    node: EmulatedNode, nodes: KubeNodes
) -> None:
    start = nodes.get(node.name)
    watch = nodes.watch(node.name, start.resource_version, timeout_seconds=30)
    collector = EventCollector(watch)
    nodes.patch_metadata(node.name, annotations={KEYS.reboot_ok: "true"})
    event = collector.next_matching(
        lambda e: e.node.annotations.get(KEYS.reboot_ok) == "true",
        timeout=15, what="a MODIFIED event with reboot-ok=true",
    )
    assert event.type == "MODIFIED"
    assert event.node.state.reboot_ok
    assert watch.resource_version not in (None, start.resource_version)

    # close() from another thread ends the blocked iteration promptly and quietly.
    closed_at = time.monotonic()
    watch.close()
    collector.thread.join(timeout=10)
    assert not collector.thread.is_alive()
    assert time.monotonic() - closed_at < 10
    remaining = []
    while not collector.events.empty():
        remaining.append(collector.events.get())
    assert not any(isinstance(item, BaseException) for item in remaining)

    # A change made while nobody watches is delivered by a watch resumed from there.
    nodes.patch_metadata(node.name, annotations={KEYS.reboot_ok: "false"})
    with nodes.watch(node.name, watch.resource_version, timeout_seconds=30) as resumed:
        for event in resumed:
            if event.node.annotations.get(KEYS.reboot_ok) == "false":
                break
        else:
            pytest.fail("the resumed watch ended without the change made in between")
    assert event.type == "MODIFIED"


def test_watch_ends_after_its_timeout_and_from_now_starts_with_the_node(
    node: EmulatedNode, nodes: KubeNodes
) -> None:
    started = time.monotonic()
    events = list(nodes.watch(node.name, None, timeout_seconds=2))
    elapsed = time.monotonic() - started
    assert events and events[0].type == "ADDED"
    assert events[0].node.name == node.name
    assert 1.5 <= elapsed < 20


def test_an_api_server_restart_breaks_the_watch_and_expires_older_versions(
    control_plane: ControlPlane, node: EmulatedNode, nodes: KubeNodes
) -> None:
    # The watch cache serves every version since it started, so "1" only expires
    # once the API server restarts (its cache then starts at the current version).
    start = nodes.patch_metadata(node.name, annotations={KEYS.last_checked_time: "1"})
    watch = nodes.watch(node.name, start.resource_version, timeout_seconds=60)
    collector = EventCollector(watch)
    # Move the cluster's version past `start` with a write elsewhere, so the restarted
    # cache (which begins at the current version) cannot reach back to `start`.
    control_plane.kubectl("create", "configmap", f"bump-{node.name}", "-n", "default")
    control_plane.stop_apiserver()
    try:
        ended = collector.events.get(timeout=30)
        assert isinstance(ended, KubeError), ended
        assert ended.kind == "unavailable"
        assert f"watching node '{node.name}'" in str(ended)
        with pytest.raises(KubeError) as down:
            nodes.get(node.name)
        assert down.value.kind == "unavailable"
    finally:
        control_plane.start_apiserver()

    for version in ("1", start.resource_version):
        with pytest.raises(WatchExpired) as caught:
            for _ in nodes.watch(node.name, version, timeout_seconds=10):
                pass
        assert caught.value.kind == "expired"
        assert caught.value.resource_version == version
        assert f"watching node '{node.name}'" in str(caught.value)
    # A GET returns the node's own (last-modified) version, which the restarted watch
    # cache may not reach back to either; the way back is a watch from "now", whose
    # first event is the whole node.
    nodes.patch_metadata(node.name, annotations={KEYS.last_checked_time: "2"})
    with nodes.watch(node.name, None, timeout_seconds=10) as fresh:
        first = next(iter(fresh))
    assert first.type == "ADDED"
    assert first.node.annotations[KEYS.last_checked_time] == "2"


# -- events ----------------------------------------------------------------------------------


def test_emit_event_records_an_event_kubectl_describe_shows(
    control_plane: ControlPlane,
    kube_admin: kubernetes.client.ApiClient,
    node: EmulatedNode,
    nodes: KubeNodes,
) -> None:
    nodes.emit_event(node.name, "RebootScheduled", "drain starts", type="Warning")
    found = CoreV1Api(kube_admin).list_namespaced_event(
        EVENT_NAMESPACE, field_selector=f"involvedObject.name={node.name}"
    ).items
    ours = [e for e in found if e.reason == "RebootScheduled"]
    assert len(ours) == 1
    event = ours[0]
    assert event.type == "Warning"
    assert event.message == "drain starts"
    assert event.involved_object.kind == "Node"
    assert event.source.component == "cluo-agent"
    described = control_plane.kubectl("describe", "node", node.name).stdout
    assert "RebootScheduled" in described
    assert "drain starts" in described


def test_an_event_names_the_component_and_the_instance_that_reports_it(
    kube_admin: kubernetes.client.ApiClient, node: EmulatedNode, nodes: KubeNodes
) -> None:
    nodes.emit_event(node.name, "AgentSays", "from the node", instance=node.name)
    nodes.emit_event(node.name, "CoordSays", "from the cluster", component="cluo-coord")
    found = CoreV1Api(kube_admin).list_namespaced_event(
        EVENT_NAMESPACE, field_selector=f"involvedObject.name={node.name}"
    ).items
    reporters = {e.reason: (e.source.component, e.reporting_component, e.reporting_instance)
                 for e in found}
    assert reporters["AgentSays"] == ("cluo-agent", "cluo-agent", node.name)
    assert reporters["CoordSays"] == ("cluo-coord", "cluo-coord", "cluo-coord")


def test_emit_event_never_raises(
    control_plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    tls = ssl.create_default_context(cafile=control_plane.pki.ca_cert)
    # No credentials at all.
    with KubeClient(control_plane.url, user_agent="test", tls=tls) as api, \
            caplog.at_level(logging.WARNING):
        KubeNodes(api, KEYS).emit_event("n1", "Test", "anonymous is not allowed")
    records = [r for r in caplog.records if r.getMessage() == "could not record an event"]
    assert len(records) == 1
    assert records[0].ERROR_KIND == "forbidden"  # type: ignore[attr-defined]


# -- client configuration --------------------------------------------------------------------


def test_kubeconfig_client_talks_as_cluo_agent(
    control_plane: ControlPlane,
    kube_admin: kubernetes.client.ApiClient,
    node: EmulatedNode,
) -> None:
    with kubeconfig_client(control_plane.admin_kubeconfig, "cluo-agent") as api:
        assert api.user_agent == user_agent("cluo-agent")
        assert api.user_agent.startswith("cluo-agent/")
        KubeNodes(api, KEYS).patch_metadata(node.name, annotations={KEYS.status: "x"})
    managers = {
        entry.manager
        for entry in CoreV1Api(kube_admin).read_node(node.name).metadata.managed_fields
    }
    # The API server names the field manager after the user agent.
    assert "cluo-agent" in managers


def test_kubeconfig_errors_name_the_file_and_never_the_token(tmp_path: Path) -> None:
    missing = tmp_path / "missing.kubeconfig"
    with pytest.raises(ConfigError) as caught:
        kubeconfig_client(missing)
    assert str(missing) in str(caught.value)
    assert caught.value.kind == "not_found"

    broken = tmp_path / "broken.kubeconfig"
    broken.write_text("clusters: [\n")
    with pytest.raises(ConfigError) as caught:
        kubeconfig_client(broken)
    assert str(broken) in str(caught.value)
    assert caught.value.kind == "invalid"

    secret = "s3cr3t-token-value"
    wrong = tmp_path / "wrong.kubeconfig"
    wrong.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "contexts:\n- name: c\n  context: {cluster: k, user: u}\n"
        "clusters:\n- name: k\n  cluster: {certificate-authority: /nonexistent/ca.crt}\n"
        f"users:\n- name: u\n  token: {secret}\n"
    )
    with pytest.raises(ConfigError) as caught:
        kubeconfig_client(wrong)
    assert str(wrong) in str(caught.value)
    assert secret not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_in_cluster_client_uses_the_service_account_token(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(control_plane.service_account_token(namespace, "coord"))
    environ = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(control_plane.apiserver_port),
    }
    with in_cluster_client(
        "cluo-coord", token_path=token, ca_path=control_plane.pki.ca_cert, environ=environ
    ) as api:
        assert api.user_agent.startswith("cluo-coord/")
        review = api.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                             body={"apiVersion": "authentication.k8s.io/v1",
                                   "kind": "SelfSubjectReview"})
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:coord"

    with pytest.raises(ConfigError) as caught:
        in_cluster_client(token_path=tmp_path / "absent", ca_path=control_plane.pki.ca_cert,
                          environ=environ)
    assert str(tmp_path / "absent") in str(caught.value)
