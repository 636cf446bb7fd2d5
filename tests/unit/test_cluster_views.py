"""The coordinator's node views: built once per Node resourceVersion, in name order.

``ClusterCache.snapshot()`` takes the changed names from the Node store and hands them to
``NodeViewCache``; these tests drive the same two pieces without an API server.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from cluo.kube.nodes import NodeSnapshot
from cluo.protocol import Keys
from cluo_coord.cluster import NodeViewCache, _NodeStore, node_view

KEYS = Keys()


def node(name: str, version: str, **annotations: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "resourceVersion": version, "annotations": annotations,
                     "labels": {}},
        "status": {"conditions": [{"type": "Ready", "status": "True",
                                   "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                   "nodeInfo": {"bootID": f"boot-{name}"}},
    }


def snapshot(store: _NodeStore, views: NodeViewCache) -> tuple[Any, ...]:
    """What ClusterCache.snapshot() does with the two."""
    complete, changed = store.take_changes()
    if complete:
        return views.rebuild(obj for obj in changed.values() if obj is not None)
    return views.update(changed)


def listed(*objects: dict[str, Any]) -> tuple[_NodeStore, NodeViewCache]:
    store, views = _NodeStore(), NodeViewCache(KEYS)
    store.replace(list(objects), "100")
    return store, views


def test_view_is_kept_while_the_resource_version_stays() -> None:
    store, views = listed(node("a", "1"), node("b", "2"))
    first = snapshot(store, views)
    second = snapshot(store, views)
    assert second is first
    assert views.built == 2


def test_view_is_rebuilt_when_the_resource_version_changes() -> None:
    store, views = listed(node("a", "1"), node("b", "2"))
    a_before, b_before = snapshot(store, views)
    assert not a_before.state.reboot_needed

    store.put(node("a", "3", **{KEYS.reboot_needed: "true"}))
    a_after, b_after = snapshot(store, views)

    assert a_after.resource_version == "3"
    assert a_after.state.reboot_needed
    assert b_after is b_before
    assert views.built == 3


def test_a_watch_event_at_the_same_version_rebuilds_nothing() -> None:
    store, views = listed(node("a", "1"))
    snapshot(store, views)
    store.put(node("a", "1", **{KEYS.reboot_needed: "true"}))  # same version: ignored
    (view,) = snapshot(store, views)
    assert not view.state.reboot_needed
    assert views.built == 1


def test_added_and_deleted_nodes_keep_the_name_order() -> None:
    store, views = listed(node("b", "1"), node("d", "2"))
    snapshot(store, views)
    store.put(node("c", "3"))
    store.put(node("a", "4"))
    store.delete(node("d", "2"))
    assert [view.name for view in snapshot(store, views)] == ["a", "b", "c"]


def test_a_fresh_list_forgets_nodes_that_are_gone_and_keeps_unchanged_views() -> None:
    store, views = listed(node("a", "1"), node("b", "2"))
    a_before, _ = snapshot(store, views)
    store.replace([node("a", "1"), node("c", "5")], "10")
    a_after, c_view = snapshot(store, views)
    assert a_after is a_before
    assert c_view.name == "c"
    assert views.built == 3


def test_object_without_resource_version_is_always_rebuilt() -> None:
    views = NodeViewCache(KEYS)
    bare = node("a", "")
    views.update({"a": bare})
    changed = copy.deepcopy(bare)
    changed["metadata"]["annotations"][KEYS.reboot_needed] = "true"
    (view,) = views.update({"a": changed})
    assert view.state.reboot_needed


def test_the_coordinator_node_is_marked() -> None:
    views = NodeViewCache(KEYS, coordinator_node="b")
    views.rebuild([node("a", "1"), node("b", "2")])
    assert [view.runs_coordinator for view in views.views] == [False, True]


def test_a_view_reads_the_node_as_the_agent_does() -> None:
    obj = node("a", "7", **{KEYS.reboot_needed: "true"})
    obj["spec"] = {"unschedulable": True}
    obj["status"]["conditions"].insert(0, {"type": "MemoryPressure", "status": "False"})
    view = node_view(obj, KEYS)
    snapshot = NodeSnapshot.from_object(obj, KEYS)  # the agent's reading, the one parser
    assert (view.name, view.resource_version, view.state, view.boot_id) == (
        snapshot.name, snapshot.resource_version, snapshot.state, "boot-a")
    assert view.ready and view.unschedulable
    assert view.ready_since == snapshot.ready_since == datetime(2026, 1, 1, tzinfo=UTC)
    assert dict(view.annotations) == {KEYS.reboot_needed: "true"}


def test_a_node_that_is_not_ready_has_no_ready_since() -> None:
    obj = node("a", "7")
    obj["status"]["conditions"][0]["status"] = "Unknown"
    view = node_view(obj, KEYS)
    assert not view.ready
    assert view.ready_since is None


def test_the_cache_keeps_no_managed_fields_or_images_and_the_view_is_the_same() -> None:
    heavy = copy.deepcopy(node("a", "1", **{KEYS.reboot_needed: "true"}))
    heavy["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
    heavy["status"]["images"] = [{"names": ["registry/image:1"], "sizeBytes": 1}]
    store, views = listed(heavy)
    store.put({**heavy, "metadata": {**heavy["metadata"], "resourceVersion": "2"}})
    cached = store.by_name()["a"]
    assert cached is not None
    assert "managedFields" not in cached["metadata"]
    assert "images" not in cached["status"]
    (view,) = snapshot(store, views)
    (plain,) = snapshot(*listed(node("a", "2", **{KEYS.reboot_needed: "true"})))
    assert view == plain


def test_the_cache_keeps_of_a_node_only_what_its_view_reads_and_the_view_is_the_same() -> None:
    full = node("a", "5", **{KEYS.reboot_needed: "true", "hooks.example.com/before": "true"})
    full["metadata"].update(uid="uid-a", deletionTimestamp="2026-01-02T00:00:00Z",
                            labels={"kubernetes.io/os": "linux", KEYS.group: "web"})
    full["spec"] = {"unschedulable": True, "podCIDR": "10.0.0.0/24"}
    full["status"]["conditions"].insert(0, {
        "type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
        "lastHeartbeatTime": "2026-01-01T00:00:00Z"})
    full["status"].update(capacity={"cpu": "4"}, addresses=[{"type": "Hostname"}])
    full["status"]["nodeInfo"].update(kernelVersion="6.6", machineID="m")
    store = _NodeStore()
    store.replace([store.kept(copy.deepcopy(full))], "5")
    kept = store.by_name()["a"]
    assert kept is not None
    assert set(kept["status"]) == {"conditions", "nodeInfo"}
    assert [c["type"] for c in kept["status"]["conditions"]] == ["Ready"]
    assert kept["status"]["nodeInfo"] == {"bootID": "boot-a"}
    assert kept["spec"] == {"unschedulable": True}
    assert node_view(kept, KEYS, "a") == node_view(full, KEYS, "a")
