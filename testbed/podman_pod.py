"""A Deployment's pod, started with podman the way the kubelet would start it.

`pod_run` reads the pod template of a Deployment manifest and turns what the kubelet
enforces into ``podman run`` options: the container's args with ``$(VAR)`` references
expanded, its env (downward-API fieldRefs resolved for the given pod and node names), its
security context (user and group, a read-only root with no writable tmpfs, dropped
capabilities, no new privileges, the runtime's default seccomp profile), its resource
limits, its ServiceAccount token mounted read-only at the in-cluster path, and the
``KUBERNETES_SERVICE_HOST``/``PORT`` the kubelet injects. The pod shares the machine's
network, so its ports and probes are reached on 127.0.0.1 at their container ports.

A field it does not know how to apply raises `PodSpecError`, so a manifest that gains one
makes the caller learn it rather than run something else than the cluster would.

Podman runs with runc and explicit limits: crun fails on the VMs we test on.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
RUNTIME_OPTIONS = ("--runtime", "runc",
                   "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")
PODMAN_TIMEOUT = 60.0
STOP_GRACE_SECONDS = 15
HTTP_TIMEOUT = 2.0

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


class PodSpecError(ValueError):
    """The manifest asks for something this translation does not apply."""


class PodmanError(RuntimeError):
    """A podman command failed."""


@dataclass(frozen=True)
class PodRun:
    """What ``podman run`` needs to start the pod's one container."""

    image: str
    options: tuple[str, ...]
    args: tuple[str, ...]
    ports: Mapping[str, int]  # container port by name (numbers as themselves)
    probes: Mapping[str, str]  # "readiness", "liveness", "startup" -> URL


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: defined names are replaced, ``$$`` is ``$``,
    undefined references stay as written."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, text)


def deployment_from(manifest: Path, name: str) -> dict[str, Any]:
    """The Deployment called ``name`` in a multi-document manifest."""
    for document in yaml.safe_load_all(manifest.read_text()):
        if document and document.get("kind") == "Deployment" and \
                document["metadata"]["name"] == name:
            return dict(document)
    raise PodSpecError(f"{manifest} has no Deployment {name!r}")


def the_container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    for unsupported in ("initContainers", "volumes", "hostNetwork", "hostPID"):
        if unsupported in spec:
            raise PodSpecError(f"the pod template's {unsupported} is not applied here")
    containers = spec["containers"]
    if len(containers) != 1:
        raise PodSpecError(f"expected one container, the pod template has {len(containers)}")
    return dict(containers[0])


def pod_run(deployment: Mapping[str, Any], *, pod_name: str, node_name: str,
            service_account_dir: Path, api_host: str, api_port: int,
            extra_args: Sequence[str] = ()) -> PodRun:
    """The pod of ``deployment`` as it would run as ``pod_name`` on ``node_name``.

    ``service_account_dir`` holds ``token``, ``ca.crt`` and ``namespace`` of the pod's
    ServiceAccount. ``extra_args`` go after the manifest's args (what an operator would add
    to the Deployment)."""
    namespace = deployment["metadata"].get("namespace", "default")
    pod_spec = deployment["spec"]["template"]["spec"]
    container = the_container(deployment)
    fields = {
        "metadata.namespace": namespace,
        "metadata.name": pod_name,
        "spec.nodeName": node_name,
        "spec.serviceAccountName": pod_spec.get("serviceAccountName", "default"),
    }
    env: dict[str, str] = {}
    for variable in container.get("env", []):
        env[variable["name"]] = _env_value(variable, fields, env)
    # What the kubelet adds: the API server's Service. (--hostname sets HOSTNAME.)
    injected = {"KUBERNETES_SERVICE_HOST": api_host, "KUBERNETES_SERVICE_PORT": str(api_port)}
    options: list[str] = [*RUNTIME_OPTIONS, "--pull=never", "--network", "host",
                          "--hostname", pod_name,
                          "--volume", f"{service_account_dir}:{SERVICE_ACCOUNT_PATH}:ro"]
    options += _security_options(pod_spec.get("securityContext", {}),
                                 container.get("securityContext", {}))
    options += _resource_options(container.get("resources", {}))
    for name, value in {**injected, **env}.items():
        options += ["--env", f"{name}={value}"]
    if "command" in container:
        options += ["--entrypoint", json.dumps([expand(c, env) for c in container["command"]])]
    args = tuple(expand(a, env) for a in container.get("args", [])) + tuple(extra_args)
    ports = {}
    for port in container.get("ports", []):
        if port.get("protocol", "TCP") != "TCP" or "hostPort" in port:
            raise PodSpecError(f"port {port} is not a plain TCP container port")
        ports[str(port.get("name", port["containerPort"]))] = int(port["containerPort"])
    probes = {}
    for kind in ("readiness", "liveness", "startup"):
        probe = container.get(f"{kind}Probe")
        if probe:
            probes[kind] = _probe_url(probe, ports)
    return PodRun(container["image"], tuple(options), args, ports, probes)


def _env_value(variable: Mapping[str, Any], fields: Mapping[str, str],
               env: Mapping[str, str]) -> str:
    if "value" in variable:
        return expand(str(variable["value"]), env)  # may name variables defined before it
    source = variable.get("valueFrom", {})
    path = source.get("fieldRef", {}).get("fieldPath")
    if path not in fields:
        raise PodSpecError(f"env {variable['name']}: {source} is not a supported source")
    return fields[path]


def _security_options(pod: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    """The security context; the container's settings override the pod's."""
    merged = {**pod, **container}
    known = {"runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile",
             "allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities",
             "privileged"}
    unknown = set(merged) - known
    if unknown:
        raise PodSpecError(f"securityContext fields not applied here: {sorted(unknown)}")
    options = []
    if "runAsUser" not in merged:
        raise PodSpecError("no runAsUser: the image's user would decide")
    user, group = merged["runAsUser"], merged.get("runAsGroup", merged["runAsUser"])
    if merged.get("runAsNonRoot") and user == 0:
        raise PodSpecError("runAsNonRoot with runAsUser 0: the kubelet would not start it")
    options += ["--user", f"{user}:{group}"]
    seccomp = merged.get("seccompProfile", {}).get("type", "RuntimeDefault")
    if seccomp != "RuntimeDefault":  # podman's default profile is the runtime default
        raise PodSpecError(f"seccompProfile {seccomp} is not applied here")
    if merged.get("privileged"):
        raise PodSpecError("privileged containers are not applied here")
    if merged.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    if merged.get("readOnlyRootFilesystem"):
        # podman would mount writable tmpfs on /tmp, /var/tmp and /run; the kubelet does not.
        options += ["--read-only", "--read-only-tmpfs=false"]
    capabilities = merged.get("capabilities", {})
    for capability in capabilities.get("drop", []):
        options += ["--cap-drop", capability]
    for capability in capabilities.get("add", []):
        options += ["--cap-add", capability]
    return options


def _resource_options(resources: Mapping[str, Any]) -> list[str]:
    """Limits are enforced by the runtime; requests only steer the scheduler."""
    limits = resources.get("limits", {})
    unknown = set(limits) - {"cpu", "memory"}
    if unknown:
        raise PodSpecError(f"resource limits not applied here: {sorted(unknown)}")
    options = []
    if "memory" in limits:
        options += ["--memory", str(int(_quantity(limits["memory"])))]
    if "cpu" in limits:
        options += ["--cpus", f"{_quantity(limits['cpu']):g}"]
    return options


def _quantity(text: object) -> float:
    match = _QUANTITY.match(str(text))
    if not match:
        raise PodSpecError(f"{text!r} is not a resource quantity")
    number, suffix = float(match.group(1)), match.group(2)
    if suffix == "m":
        return number / 1000
    return number * _BINARY.get(suffix or "", 1)


def _probe_url(probe: Mapping[str, Any], ports: Mapping[str, int]) -> str:
    get = probe.get("httpGet")
    if not get or get.get("scheme", "HTTP") != "HTTP" or "host" in get:
        raise PodSpecError(f"probe {probe} is not a plain httpGet")
    port = get["port"]
    number = ports[port] if isinstance(port, str) else int(port)
    return f"http://127.0.0.1:{number}{get.get('path', '/')}"


def podman(*args: str, timeout: float = PODMAN_TIMEOUT,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise PodmanError(f"podman {' '.join(args[:3])} ... failed ({result.returncode}):\n"
                          f"{result.stderr[-3000:]}")
    return result


@dataclass
class PodmanPod:
    """One started container; `remove` it whatever happened (the caller's finally)."""

    name: str
    run: PodRun
    removed: bool = field(default=False)

    @classmethod
    def start(cls, name: str, run: PodRun) -> PodmanPod:
        podman("run", "--detach", "--name", name, *run.options, run.image, *run.args)
        return cls(name, run)

    def running(self) -> bool:
        result = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return result.stdout.strip() == "true"

    def exit_code(self) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout)

    def inspect(self) -> dict[str, Any]:
        return dict(json.loads(podman("inspect", self.name).stdout)[0])

    def logs(self) -> str:
        return podman("logs", self.name, check=False).stdout

    def log_entries(self) -> list[dict[str, Any]]:
        """The JSON records the container wrote to stdout (other lines skipped)."""
        entries = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    def get(self, url: str) -> int:
        """Status of a GET, as a probe sees it; 0 if nothing answers."""
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0

    def probe(self, kind: str) -> int:
        return self.get(self.run.probes[kind])

    def metrics(self, port: str = "metrics") -> dict[str, float]:
        """Every sample of /metrics on the named port, by ``name`` and ``name{labels}``."""
        url = f"http://127.0.0.1:{self.run.ports[port]}/metrics"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after the grace period, as the kubelet does; the exit code."""
        podman("stop", "--time", str(STOP_GRACE_SECONDS), self.name,
               timeout=STOP_GRACE_SECONDS + PODMAN_TIMEOUT)
        return self.exit_code()

    def remove(self) -> None:
        if not self.removed:
            podman("rm", "--force", "--time", "0", self.name, check=False)
            self.removed = True
