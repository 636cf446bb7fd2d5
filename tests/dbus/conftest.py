"""Fixtures for tests/dbus: dbusmock services on a private system bus.

`dbusmock_system` (python-dbusmock) starts one private dbus-daemon per session and points
DBUS_SYSTEM_BUS_ADDRESS at it. Each mock fixture runs a fresh mock process per test; give it
template parameters with indirect parametrization:

    @pytest.mark.parametrize("update_engine_mock", [{"NewVersion": "4152.2.0"}], indirect=True)
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
from dbusmock import pytest_fixtures

from tests.testbed.dbus_bus import LOGIND_TEMPLATE, UPDATE_ENGINE_TEMPLATE, MockService, spawn_mock

# Re-exported so pytest finds it here; `pytest_plugins` is not allowed in a nested conftest.
dbusmock_system = pytest_fixtures.dbusmock_system


@pytest.fixture(scope="session")
def system_bus_address(dbusmock_system) -> str:
    """Address of the private system bus, for MessageBus(bus_address=..., BusType.SYSTEM)."""
    return dbusmock_system.address


# The mock fixtures take `system_bus_address` so that the private bus is up before they spawn.
def _spawn(request: pytest.FixtureRequest, template: Path, log_dir: Path):
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
