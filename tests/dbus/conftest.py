"""tests/dbus: the agent's D-Bus adapters on a private system bus (tests/fixtures/system_bus.py:
`system_bus_address`, `update_engine_mock`, `logind_mock`)."""

from __future__ import annotations

import pytest

from tests import fixtures


def pytest_configure(config: pytest.Config) -> None:
    fixtures.load(config, fixtures.SYSTEM_BUS)
