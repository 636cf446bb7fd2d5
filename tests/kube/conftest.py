"""tests/kube: the real control plane (tests/fixtures/control_plane.py: `control_plane`,
`kube_admin`, `kube_client`, `namespace`, `service_account_client`,
`service_account_kube_client`) and, for the agent's tests, the private system bus
(tests/fixtures/system_bus.py)."""

from __future__ import annotations

import pytest

from tests import fixtures


def pytest_configure(config: pytest.Config) -> None:
    fixtures.load(config, fixtures.CONTROL_PLANE, fixtures.SYSTEM_BUS)
