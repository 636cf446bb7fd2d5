"""Fixtures for end-to-end tests of cluo-agent on real systemd hosts.

A host is provisioned the way a Flatcar node is, from the Ignition config that
`ignition/cluo_ignition.py` generates, applied by the real Ignition; how, and what the
test bed adds to a Debian root (Flatcar's os-release and update group, so it merges the
release sysext image; loop devices for systemd-sysext; a dbusmock update-engine.service;
the nspawn boot's id for the agent), is in `testbed/roll.py`, which `make demo`
shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from testbed import ignition_apply
from testbed.controlplane import ControlPlane
from testbed.nspawn import NspawnHost, build_base_root
from testbed.roll import (
    AgentImage,
    ProvisionedHost,
    build_agent_image,
    generate_config,
    provision_host,
    unique_name,
    update_engine_unit,
)
from tests import fixtures

__all__ = [
    "AgentHostFactory",
    "AgentImage",
    "ProvisionedHost",
    "generate_config",
    "unique_name",
    "update_engine_unit",
]


def pytest_configure(config: pytest.Config) -> None:
    # `control_plane`, `kube_admin`, `namespace`, ...: one definition with tests/kube.
    fixtures.load(config, fixtures.CONTROL_PLANE)


@pytest.fixture(scope="session")
def agent_base_root() -> Path:
    return build_base_root()


@pytest.fixture(scope="session")
def agent_image(tmp_path_factory: pytest.TempPathFactory) -> AgentImage:
    """hack/build-agent-artifact.sh (the release image, ID=flatcar), once per session."""
    return build_agent_image(tmp_path_factory.mktemp("agent-image"))


@pytest.fixture(scope="session")
def artifact_url_base(agent_image: AgentImage) -> Iterator[str]:
    """An HTTP server on loopback serving the image, as an artifact store would."""
    with ignition_apply.serve_directory(agent_image.image.parent) as base:
        yield base


AgentHostFactory = Callable[..., ProvisionedHost]


@pytest.fixture
def agent_hosts(
    agent_base_root: Path,
    agent_image: AgentImage,
    artifact_url_base: str,
    control_plane: ControlPlane,
    tmp_path: Path,
) -> Iterator[AgentHostFactory]:
    """Factory: `make(name, settings=())` provisions a host from its Ignition config, with
    its node's kubelet credential where kubeadm puts it (testbed/roll.py), and starts its
    boot; it returns as soon as the boot id can be read.

    Not later: the boot does not finish (`wait_until_running`) before the agent is ready,
    and the agent is ready only once its Node exists, which the caller registers with this
    boot id. Hosts are destroyed afterwards."""
    hosts: list[NspawnHost] = []

    def make(name: str, settings: Sequence[str] = ()) -> ProvisionedHost:
        return provision_host(
            name, base_root=agent_base_root, image=agent_image, url_base=artifact_url_base,
            control_plane=control_plane, workdir=tmp_path / name,
            settings=settings, on_made=hosts.append)

    yield make
    for host in hosts:
        host.destroy()
