"""Fixtures shared by every test tier.

The control plane is started once per test session, and only when a test asks for it,
so `pytest tests/unit` needs no binaries.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import kubernetes.client
import pytest
from kubernetes.client.rest import ApiException

from cluo.kube.client import KubeClient
from tests.testbed.controlplane import ControlPlane, running_control_plane
from tests.testbed.dbus_bus import LOGIND_TEMPLATE, UPDATE_ENGINE_TEMPLATE, MockService, spawn_mock

pytest_plugins = ["dbusmock.pytest_fixtures"]


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    with running_control_plane() as plane:
        yield plane


@pytest.fixture(scope="session")
def kube_admin(control_plane: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:
    with control_plane.admin_api_client() as api:
        yield api


@pytest.fixture(scope="session")
def kube_client(control_plane: ControlPlane) -> Iterator[KubeClient]:
    """cluo's own client (cluo.kube.client) as admin: what cluo's adapters take."""
    with control_plane.kube_client() as client:
        yield client


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
    yield from _closing_factory(control_plane.service_account_api_client)


@pytest.fixture
def service_account_kube_client(
    control_plane: ControlPlane,
) -> Iterator[Callable[[str, str], KubeClient]]:
    """Factory: a KubeClient authenticated by a real token of ServiceAccount ns/name."""
    yield from _closing_factory(control_plane.service_account_kube_client)


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


def _closing_factory(
    make: Callable[[str, str], C],
) -> Iterator[Callable[[str, str], C]]:
    """Yield ``make``, closing whatever it made once the test is over."""
    made: list[C] = []

    def tracked(namespace: str, name: str) -> C:
        made.append(client := make(namespace, name))
        return client

    yield tracked
    for client in made:
        client.close()


# -- private system bus -------------------------------------------------------------------
# `dbusmock_system` (python-dbusmock) starts one private dbus-daemon per session and points
# DBUS_SYSTEM_BUS_ADDRESS at it. Each mock fixture runs a fresh mock process per test; give
# it template parameters with indirect parametrization:
#     @pytest.mark.parametrize("update_engine_mock", [{"NewVersion": "4152.2.0"}], indirect=True)


@pytest.fixture(scope="session")
def system_bus_address(dbusmock_system) -> str:  # type: ignore[no-untyped-def]
    """Address of the private system bus, for MessageBus(bus_address=..., BusType.SYSTEM)."""
    return str(dbusmock_system.address)


def _spawn(request: pytest.FixtureRequest, template: Path, log_dir: Path) -> Iterator[MockService]:
    parameters = getattr(request, "param", None)
    with spawn_mock(template, parameters, log_dir / f"{template.stem}-mock.log") as mock:
        yield mock


@pytest.fixture
def update_engine_mock(
    request: pytest.FixtureRequest, system_bus_address: str, tmp_path: Path
) -> Iterator[MockService]:
    """com.coreos.update1 (tests/testbed/dbus_templates/update_engine.py)."""
    yield from _spawn(request, UPDATE_ENGINE_TEMPLATE, tmp_path)


@pytest.fixture
def logind_mock(
    request: pytest.FixtureRequest, system_bus_address: str, tmp_path: Path
) -> Iterator[MockService]:
    """org.freedesktop.login1 (tests/testbed/dbus_templates/logind.py)."""
    yield from _spawn(request, LOGIND_TEMPLATE, tmp_path)
