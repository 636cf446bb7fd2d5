"""Fixtures shared by every test tier.

The control plane is started once per test session, and only when a test asks for it,
so `pytest tests/unit` needs no binaries.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import kubernetes.client
import pytest
from kubernetes.client.rest import ApiException

from tests.testbed.controlplane import ControlPlane, running_control_plane

pytest_plugins = ["dbusmock.pytest_fixtures"]


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    with running_control_plane() as plane:
        yield plane


@pytest.fixture(scope="session")
def kube_admin(control_plane: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:
    with control_plane.admin_api_client() as api:
        yield api


@pytest.fixture
def namespace(kube_admin: kubernetes.client.ApiClient) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    core = kubernetes.client.CoreV1Api(kube_admin)
    core.create_namespace(
        kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name))
    )
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as err:
        if err.status != 404:
            raise


@pytest.fixture
def service_account_client(
    control_plane: ControlPlane,
) -> Iterator[Callable[[str, str], kubernetes.client.ApiClient]]:
    """Factory: an ApiClient authenticated by a real token of ServiceAccount ns/name."""
    clients: list[kubernetes.client.ApiClient] = []

    def make(namespace: str, name: str) -> kubernetes.client.ApiClient:
        client = control_plane.service_account_api_client(namespace, name)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
