#!/usr/bin/env bash
# Install what `make test` needs on a Debian bookworm machine, as root:
# the Debian packages, then the Python virtualenv with cluo and its test tools.
# Idempotent and quiet when everything is already there.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

# Debian packages:
#  - libdbus-1-dev, libglib2.0-dev, pkg-config: dbus-python (python-dbusmock's
#    dependency) builds from source.
#  - dbus-daemon: private system buses for the dbus tests.
#  - openssl: certificates and keys for the test control plane.
#  - systemd-container, mmdebstrap: real systemd hosts for the e2e tests.
#  - squashfs-tools: the agent's systemd-sysext image.
#  - ignition: ignition-validate checks the generated Ignition config.
#  - podman, buildah, runc: cluo-coord's container image (`make image`,
#    hack/build-coord-image.sh) with no registry: buildah builds it on bases that podman
#    imports from mmdebstrap roots, podman saves and runs it. runc because crun, podman's
#    default, fails on the VMs we test on (setrlimit refused, hybrid cgroups unsupported).
#  - docker-registry, skopeo: docs/install.md's push step, tested against a registry on
#    loopback (tests/e2e/test_install_walkthrough.py): skopeo copies the image's OCI
#    archive into it and reads back the digest.
#  - prometheus: a real Prometheus for the coordinator's blocker tests
#    (tests/kube/test_blockers.py); testbed/prometheus.py runs the binary itself, in a
#    directory of its own. Its Debian service is not used.
packages=(
    libdbus-1-dev libglib2.0-dev pkg-config dbus-daemon
    openssl systemd-container mmdebstrap squashfs-tools ignition
    podman buildah runc docker-registry skopeo prometheus
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing Debian packages (${missing[*]}); run as root to install them" >&2
        exit 1
    fi
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The package starts Prometheus as a service where systemd runs: the tests run their
    # own, and a service on :9090 would only be in the way.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi

venv=${CLUO_VENV:-$root/.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.cluo-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -e "${root}[agent,test,build,bench]"
    touch "$stamp"
fi
