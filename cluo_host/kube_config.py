"""Build a Kubernetes ApiClient from a kubeconfig file or from in-cluster credentials.

The agent reads a kubeconfig written at provisioning; the coordinator runs in a pod with
a ServiceAccount token. Each gets its own ``Configuration`` (never the client library's
global default) and a user agent naming the component and version, so API server logs
and audit events show who did what. Tokens and keys never reach a log or an error text.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Literal

import kubernetes.client
import yaml
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)
from kubernetes.config.kube_config import load_kube_config

from cluo_host.errors import ConfigError

__all__ = [
    "Component",
    "in_cluster_client",
    "kubeconfig_client",
    "user_agent",
]

log = logging.getLogger(__name__)

Component = Literal["cluo-agent", "cluo-coord"]

# Keys whose values are secrets; the client library's error texts may quote whole
# kubeconfig entries (its merger names entries by their dict repr).
_SECRET_KEYS = (
    "token", "client-key-data", "password", "access-token", "id-token", "refresh-token",
    "client-secret", "BearerToken", "authorization",
)
_SECRET_NAMES = "|".join(map(re.escape, _SECRET_KEYS))
_SECRET_VALUE = re.compile(
    rf"""(['"]?(?:{_SECRET_NAMES})['"]?\s*[:=]\s*)(?:(['"])(?:(?!\2).)*\2|[^\s,}}]+)""",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?i)\bbearer\s+\S+")


def redact(text: str) -> str:
    """Blank out secret values quoted in an error text."""
    def blank(match: re.Match[str]) -> str:
        quote = match.group(2) or ""
        return f"{match.group(1)}{quote}<redacted>{quote}"

    return _SECRET_VALUE.sub(blank, _BEARER.sub("bearer <redacted>", text))


def version() -> str:
    try:
        return metadata.version("cluo")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def user_agent(component: Component) -> str:
    return f"{component}/{version()}"


def kubeconfig_client(
    path: str | os.PathLike[str],
    component: Component = "cluo-agent",
    *,
    context: str | None = None,
) -> kubernetes.client.ApiClient:
    """An ApiClient for the (current or given) context of one kubeconfig file.

    Raises ``ConfigError`` naming the file when it is missing, unreadable or invalid.
    The file is never written back (no token refresh persisted into it).
    """
    path = Path(path)
    where = f"loading kubeconfig {str(path)!r}"
    if os.pathsep in str(path):
        # The client library would treat it as a list of files and skip missing ones.
        raise ConfigError(f"{where}: give one file, not a {os.pathsep!r}-separated list")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file", kind="not_found") from None
    except PermissionError:
        raise ConfigError(f"{where}: permission denied", kind="forbidden") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: cannot read it ({type(err).__name__})") from None
    try:
        if not isinstance(yaml.safe_load(text), dict):
            raise ConfigError(f"{where}: not a kubeconfig (expected a YAML mapping)")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML{at}") from None
    configuration = kubernetes.client.Configuration()
    try:
        load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(path),
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
    except (ConfigException, KeyError, TypeError, ValueError, OSError) as err:
        # `from None`: the original may quote the credentials it failed on.
        raise ConfigError(f"{where}: {redact(_describe(err))}") from None
    return _client(configuration, component)


def in_cluster_client(
    component: Component = "cluo-coord",
    *,
    token_path: str | os.PathLike[str] = SERVICE_TOKEN_FILENAME,
    ca_path: str | os.PathLike[str] = SERVICE_CERT_FILENAME,
    environ: Mapping[str, str] | None = None,
) -> kubernetes.client.ApiClient:
    """An ApiClient from the pod's ServiceAccount (KUBERNETES_SERVICE_HOST/PORT, token, CA).

    The token file is re-read about every minute, so rotated (bound) tokens keep working.
    """
    configuration = kubernetes.client.Configuration()
    loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
        token_filename=str(token_path),
        cert_filename=str(ca_path),
        try_refresh_token=True,
        environ=os.environ if environ is None else environ,
    )
    try:
        loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError) as err:
        raise ConfigError(
            f"loading in-cluster configuration (token {str(token_path)!r}, "
            f"CA {str(ca_path)!r}): {redact(_describe(err))}"
        ) from None
    return _client(configuration, component)


def _describe(err: BaseException) -> str:
    if isinstance(err, KeyError):
        return f"missing key {err}"
    text = str(err).strip() or type(err).__name__
    return text[:500]


def _client(
    configuration: kubernetes.client.Configuration, component: Component
) -> kubernetes.client.ApiClient:
    api_client = kubernetes.client.ApiClient(configuration)
    api_client.user_agent = user_agent(component)
    log.info(
        "kubernetes client configured",
        extra={"API_SERVER": configuration.host, "USER_AGENT": api_client.user_agent},
    )
    return api_client
