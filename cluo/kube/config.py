"""Build a KubeClient from a kubeconfig file or from in-cluster credentials.

The agent reads a kubeconfig written at provisioning; the coordinator runs in a pod with
a ServiceAccount token. Each client carries a user agent naming the component and
version, so API server logs and audit events show who did what. Tokens and keys never
reach a log or an error text.

What a kubeconfig may say (the rest of it is ignored):

- cluster: ``server``, ``certificate-authority`` or ``certificate-authority-data``,
  ``insecure-skip-tls-verify``, ``tls-server-name``;
- user: ``token`` or ``tokenFile`` (re-read about every minute), ``client-certificate``
  / ``client-key`` or their ``-data`` forms, or a credential plugin (``exec``, below);
  none of them is anonymous access. Certificate and key files (which may be one PEM
  file, as the kubelet's kubelet-client-current.pem) are checked for a change at most
  every ``CERT_FILE_CHECK_PERIOD`` seconds, and after the server refused them (HTTP
  401): a rotated file (replaced, or a symlink moved) is loaded again without a restart;
- the ``current-context``, or a context chosen by name.

Relative file names are read relative to the kubeconfig's folder. ``auth-provider``,
basic authentication, impersonation and ``proxy-url`` are refused with a
``ConfigError`` that names them.

Credential plugins follow client-go's protocol (client.authentication.k8s.io v1 and
v1beta1): ``command`` (a relative path with a slash is taken from the kubeconfig's
folder, a bare name from PATH) runs with ``args``, ``env`` added to cluo's environment,
``KUBERNETES_EXEC_INFO`` (an ExecCredential with ``spec.interactive: false``, and
``spec.cluster`` when ``provideClusterInfo``) and no stdin; it must answer within
``EXEC_TIMEOUT`` with an ExecCredential on stdout: a ``token``, or a client certificate
and key (PEM), or both, valid until ``expirationTimestamp`` if given. It runs once when
the client is built (a failure is a ``ConfigError``), again shortly before the
credential expires, and again when the server rejects its token or its client
certificate (HTTP 401), as client-go does; a failure then is a ``CredentialError`` from
the request. ``interactiveMode: Always`` is refused:
cluo never has a terminal to lend.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import math
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from cluo.errors import ConfigError, ErrorKind
from cluo.kube.client import (
    CredentialError,
    FileToken,
    KubeClient,
    StaticToken,
    TlsSource,
    TokenSource,
)
from cluo.version import VERSION

__all__ = [
    "CERT_FILE_CHECK_PERIOD",
    "EXEC_API_VERSIONS",
    "EXEC_TIMEOUT",
    "SERVICE_CERT_FILENAME",
    "SERVICE_TOKEN_FILENAME",
    "Component",
    "in_cluster_client",
    "kubeconfig_client",
    "user_agent",
]

log = logging.getLogger(__name__)

Component = Literal["cluo-agent", "cluo-coord"]

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_TOKEN_FILENAME = f"{SERVICE_ACCOUNT_DIR}/token"
SERVICE_CERT_FILENAME = f"{SERVICE_ACCOUNT_DIR}/ca.crt"

# Credential plugins (users[].user.exec): the ExecCredential versions spoken, how long a
# run may take, how long before its expirationTimestamp a credential is renewed, how
# much of a failed run's stderr an error quotes, and where a cluster's plugin config is.
EXEC_API_VERSIONS = frozenset({
    "client.authentication.k8s.io/v1",
    "client.authentication.k8s.io/v1beta1",
})
EXEC_TIMEOUT = 60.0  # seconds
EXEC_RENEW_BEFORE = 30.0  # seconds
EXEC_STDERR_LINES = 5
EXEC_STDERR_CHARS = 1000
EXEC_CLUSTER_EXTENSION = "client.authentication.k8s.io/exec"
_EXEC_INTERACTIVE_MODES = frozenset({"Never", "IfAvailable", "Always"})
# Seconds between checks (a stat) of the client certificate and key files for a rotation.
CERT_FILE_CHECK_PERIOD = 5.0

# User fields cluo does not implement, and what to say about each.
_UNSUPPORTED_USER_FIELDS = {
    "auth-provider": "auth-provider plugins",
    "username": "basic authentication (username/password)",
    "password": "basic authentication (username/password)",
    "as": "impersonation (as)",
    "as-uid": "impersonation (as-uid)",
    "as-groups": "impersonation (as-groups)",
    "as-user-extra": "impersonation (as-user-extra)",
}
_UNSUPPORTED_CLUSTER_FIELDS = {"proxy-url": "a proxy (proxy-url)"}


class _Invalid(Exception):
    """What is wrong with a configuration; the caller says which one it was."""

    def __init__(self, text: str, kind: ErrorKind = "invalid") -> None:
        super().__init__(text)
        self.kind: ErrorKind = kind


def version() -> str:
    return VERSION


def user_agent(component: Component) -> str:
    return f"{component}/{version()}"


@dataclass(frozen=True, repr=False)
class _Endpoint:
    """Where the API server is and how to trust it and sign in (secrets never printed)."""

    server: str
    ca_file: Path | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    tls_server_name: str | None = None
    cert_file: Path | None = None
    cert_data: bytes | None = None
    key_file: Path | None = None
    key_data: bytes | None = None
    token: TokenSource | None = None
    plugin: _ExecSpec | None = None


@dataclass(frozen=True, repr=False)
class _ExecSpec:
    """A user's credential plugin as the kubeconfig configures it (env may hold secrets)."""

    command: str  # as written, for messages
    executable: str  # a relative path with a slash resolved against the kubeconfig's folder
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    api_version: str
    install_hint: str | None
    cluster: dict[str, Any] | None  # spec.cluster for the plugin, if provideClusterInfo


def kubeconfig_client(
    path: str | os.PathLike[str],
    component: Component = "cluo-agent",
    *,
    context: str | None = None,
    clock: Callable[[], float] = time.time,
) -> KubeClient:
    """A KubeClient for the (current or given) context of one kubeconfig file.

    Raises ``ConfigError`` naming the file when it is missing, unreadable, invalid or
    asks for something cluo does not support, or when its credential plugin fails. The
    file is never written. ``clock`` (seconds since the epoch) tells when a plugin's
    credential expires.
    """
    path = Path(path)
    where = f"loading kubeconfig {str(path)!r}"
    if os.pathsep in str(path):
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
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML{at}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: not a kubeconfig (expected a YAML mapping)")
    try:
        endpoint = _from_kubeconfig(config, path.parent, context)
        return _client(endpoint, component, clock)
    except _Invalid as err:
        # `from None`: nothing below may quote a credential, but keep it that way.
        raise ConfigError(f"{where}: {err}", kind=err.kind) from None


def in_cluster_client(
    component: Component = "cluo-coord",
    *,
    token_path: str | os.PathLike[str] = SERVICE_TOKEN_FILENAME,
    ca_path: str | os.PathLike[str] = SERVICE_CERT_FILENAME,
    environ: Mapping[str, str] | None = None,
) -> KubeClient:
    """A KubeClient from the pod's ServiceAccount (KUBERNETES_SERVICE_HOST/PORT, token, CA).

    The token file is re-read about every minute, so rotated (bound) tokens keep working.
    """
    where = (
        f"loading in-cluster configuration (token {str(token_path)!r}, CA {str(ca_path)!r})"
    )
    environ = os.environ if environ is None else environ
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    try:
        if not host or not port:
            raise _Invalid("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set "
                           "(not running in a pod?)")
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        endpoint = _Endpoint(
            server=f"https://{host}:{port}",
            ca_file=Path(ca_path),
            token=_file_token(Path(token_path), "the token file"),
        )
        return _client(endpoint, component)
    except _Invalid as err:
        raise ConfigError(f"{where}: {err}", kind=err.kind) from None


# -- reading a kubeconfig ----------------------------------------------------------------


def _named(config: Mapping[str, Any], section: str, field: str, name: str) -> dict[str, Any]:
    """The ``field`` mapping of the entry called ``name`` in the list ``section``."""
    what = section.removesuffix("s")
    entries = config.get(section) or []
    if not isinstance(entries, list):
        raise _Invalid(f"{section!r} must be a list")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(field)
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise _Invalid(f"{what} {name!r}: {field!r} must be a mapping")
            return value
    raise _Invalid(f"no {what} named {name!r}")


def _string(entry: Mapping[str, Any], key: str, owner: str) -> str | None:
    value = entry.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{owner}: {key!r} must be a string")
    return value


def _one_of(entry: Mapping[str, Any], key: str, owner: str) -> None:
    """Refuse ``key`` and ``key-data`` both given, as client-go (kubectl) does: which one
    wins would otherwise be a guess, and a wrong guess trusts another CA or signs in as
    another user."""
    if entry.get(key) and entry.get(f"{key}-data"):
        raise _Invalid(f"{owner}: {key!r} and {key + '-data'!r} are both given; keep one")


def _file(entry: Mapping[str, Any], key: str, owner: str, folder: Path) -> Path | None:
    value = _string(entry, key, owner)
    return None if value is None else folder / Path(value).expanduser()


def _data(entry: Mapping[str, Any], key: str, owner: str) -> bytes | None:
    value = _string(entry, key, owner)
    if value is None:
        return None
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _Invalid(f"{owner}: {key!r} is not valid base64") from None


def _from_kubeconfig(config: Mapping[str, Any], folder: Path, context: str | None) -> _Endpoint:
    name = context or config.get("current-context")
    if not name:
        raise _Invalid("no context given and no current-context set")
    if not isinstance(name, str):
        raise _Invalid("current-context must be a string")
    chosen = _named(config, "contexts", "context", name)
    cluster_name = chosen.get("cluster")
    if not cluster_name or not isinstance(cluster_name, str):
        raise _Invalid(f"context {name!r} names no cluster")
    cluster = _named(config, "clusters", "cluster", cluster_name)
    user_name = chosen.get("user")
    user = _named(config, "users", "user", user_name) if user_name else {}

    owner = f"cluster {cluster_name!r}"
    for key, what in _UNSUPPORTED_CLUSTER_FIELDS.items():
        if cluster.get(key):
            raise _Invalid(f"{owner}: {what} is not supported")
    server = _string(cluster, "server", owner)
    if server is None:
        raise _Invalid(f"{owner} has no server")
    insecure = cluster.get("insecure-skip-tls-verify") or False
    if not isinstance(insecure, bool):
        raise _Invalid(f"{owner}: 'insecure-skip-tls-verify' must be true or false")
    _one_of(cluster, "certificate-authority", owner)
    ca_file = _file(cluster, "certificate-authority", owner, folder)
    ca_data = _data(cluster, "certificate-authority-data", owner)
    if insecure and (ca_file or ca_data):
        raise _Invalid(f"{owner}: a certificate authority together with "
                       "insecure-skip-tls-verify is contradictory")

    cluster_info: dict[str, Any] = {"server": server}
    if tls_server_name := _string(cluster, "tls-server-name", owner):
        cluster_info["tls-server-name"] = tls_server_name
    if insecure:
        cluster_info["insecure-skip-tls-verify"] = True
    extension = _exec_extension(cluster, owner)
    if extension is not None:
        cluster_info["config"] = extension

    owner = f"user {user_name!r}"
    for key, what in _UNSUPPORTED_USER_FIELDS.items():
        if user.get(key):
            raise _Invalid(f"{owner}: {what} is not supported; use a token, a tokenFile, "
                           "a client certificate or a credential plugin (exec)")
    _one_of(user, "client-certificate", owner)
    _one_of(user, "client-key", owner)
    cert_file = _file(user, "client-certificate", owner, folder)
    cert_data = _data(user, "client-certificate-data", owner)
    key_file = _file(user, "client-key", owner, folder)
    key_data = _data(user, "client-key-data", owner)
    if bool(cert_file or cert_data) != bool(key_file or key_data):
        raise _Invalid(f"{owner}: a client certificate needs its key, and a key its "
                       "certificate")
    token: TokenSource | None = None
    static = _string(user, "token", owner)
    token_file = _file(user, "tokenFile", owner, folder)
    if token_file is not None:  # as client-go: tokenFile wins over token
        token = _file_token(token_file, f"{owner}: tokenFile")
    elif static is not None:
        token = StaticToken(static)
    plugin: _ExecSpec | None = None
    if user.get("exec"):
        if token is not None or cert_file or cert_data:
            raise _Invalid(f"{owner}: a credential plugin (exec) together with a token, a "
                           "tokenFile or a client certificate is ambiguous; keep one")
        plugin = _exec_spec(user["exec"], f"{owner}: exec", folder)
        if plugin.cluster is not None:
            ca = ca_data if ca_data is not None else _read_ca(ca_file)
            if ca is not None:
                cluster_info["certificate-authority-data"] = base64.b64encode(ca).decode()
            plugin = dataclasses.replace(plugin, cluster=cluster_info)
    return _Endpoint(
        server=server, ca_file=ca_file, ca_data=ca_data, insecure=insecure,
        tls_server_name=tls_server_name,
        cert_file=cert_file, cert_data=cert_data, key_file=key_file, key_data=key_data,
        token=token, plugin=plugin,
    )


def _exec_extension(cluster: Mapping[str, Any], owner: str) -> Any:
    """The cluster's ``extensions[client.authentication.k8s.io/exec]`` (plugin config)."""
    extensions = cluster.get("extensions") or []
    if not isinstance(extensions, list):
        raise _Invalid(f"{owner}: 'extensions' must be a list")
    for entry in extensions:
        if isinstance(entry, dict) and entry.get("name") == EXEC_CLUSTER_EXTENSION:
            return entry.get("extension")
    return None


def _exec_spec(config: Any, owner: str, folder: Path) -> _ExecSpec:
    if not isinstance(config, dict):
        raise _Invalid(f"{owner} must be a mapping")
    command = _string(config, "command", owner)
    if command is None:
        raise _Invalid(f"{owner}: no command")
    api_version = _string(config, "apiVersion", owner)
    if api_version not in EXEC_API_VERSIONS:
        raise _Invalid(f"{owner}: apiVersion {api_version!r} is not supported; use one of "
                       f"{', '.join(sorted(EXEC_API_VERSIONS))}")
    # Unset is IfAvailable, as client-go defaults it: cluo is never interactive anyway.
    mode = _string(config, "interactiveMode", owner) or "IfAvailable"
    if mode not in _EXEC_INTERACTIVE_MODES:
        raise _Invalid(f"{owner}: interactiveMode {mode!r} is not one of "
                       f"{', '.join(sorted(_EXEC_INTERACTIVE_MODES))}")
    if mode == "Always":
        raise _Invalid(f"{owner}: interactiveMode 'Always' is not supported: cluo runs the "
                       "plugin without a terminal; use 'IfAvailable' or 'Never'")
    args = config.get("args") or []
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise _Invalid(f"{owner}: 'args' must be a list of strings")
    env: list[tuple[str, str]] = []
    for entry in config.get("env") or []:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and entry["name"] and isinstance(entry.get("value", ""), str)):
            raise _Invalid(f"{owner}: 'env' must be a list of {{name, value}} strings")
        env.append((entry["name"], entry.get("value", "")))
    provide = config.get("provideClusterInfo") or False
    if not isinstance(provide, bool):
        raise _Invalid(f"{owner}: 'provideClusterInfo' must be true or false")
    return _ExecSpec(
        command=command,
        # As client-go: a path with a slash is the kubeconfig's, a bare name is PATH's.
        executable=str(folder / command) if "/" in command else command,
        args=tuple(args),
        env=tuple(env),
        api_version=api_version,
        install_hint=_string(config, "installHint", owner),
        cluster={} if provide else None,  # filled in by the caller
    )


def _read_ca(path: Path | None) -> bytes | None:
    if path is None:
        return None
    what = _reading("certificate-authority", path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _Invalid(f"{what}: no such file", kind="not_found") from None
    except PermissionError:
        raise _Invalid(f"{what}: permission denied", kind="forbidden") from None
    except OSError as err:
        raise _Invalid(f"{what}: cannot read it ({type(err).__name__})") from None


def _file_token(path: Path, what: str) -> FileToken:
    try:
        return FileToken(path)
    except FileNotFoundError:
        raise _Invalid(f"{what} {str(path)!r} does not exist", kind="not_found") from None
    except PermissionError:
        raise _Invalid(f"{what} {str(path)!r}: permission denied", kind="forbidden") from None
    except UnicodeDecodeError:
        raise _Invalid(f"{what} {str(path)!r} is not text") from None
    except ValueError:
        raise _Invalid(f"{what} {str(path)!r} is empty") from None
    except OSError as err:
        raise _Invalid(f"{what} {str(path)!r}: cannot read it ({type(err).__name__})") from None


# -- credential plugins ------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class _ExecCredential:
    """What a plugin answered (never printed): a token, a certificate and key, or both."""

    token: str | None
    cert: bytes | None
    key: bytes | None
    expires: float | None  # seconds since the epoch; None: until rejected


class _ExecPlugin:
    """A credential plugin's current credential, fetched again when it is about to expire
    or the server rejected it.

    A ``TokenSource`` (``get``, ``reject``) and, for a client certificate, a
    ``TlsSource`` (``context``, ``reject_context``). Thread-safe: one run at a time,
    the others wait for it. Every answer must carry the same kinds of credential as the
    first.
    """

    def __init__(
        self,
        spec: _ExecSpec,
        *,
        clock: Callable[[], float],
        make_tls: Callable[[bytes, bytes], ssl.SSLContext],
        timeout: float | None = None,  # EXEC_TIMEOUT
    ) -> None:
        self._spec = spec
        self._name = f"credential plugin {spec.command!r}"
        self._clock = clock
        self._make_tls = make_tls
        self._timeout = EXEC_TIMEOUT if timeout is None else timeout
        self._lock = threading.Lock()
        self._credential: _ExecCredential | None = None
        self._renew_at = -math.inf
        self._context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"_ExecPlugin({self._spec.command!r})"

    def current(self) -> _ExecCredential:
        """The credential, from the plugin if there is none yet or it is about to expire."""
        with self._lock:
            return self._current()

    def get(self) -> str:
        with self._lock:
            token = self._current().token
        if token is None:
            raise CredentialError(f"{self._name} gave no token", kind="invalid")
        return token

    def reject(self, token: str) -> bool:
        with self._lock:
            if self._credential is not None and self._credential.token == token:
                log.info("the API server rejected the credential plugin's token, "
                         "running it again", extra={"COMMAND": self._spec.command})
                self._renew_at = -math.inf
        return True  # the next get() has a token the server has not yet seen rejected

    def reject_context(self, context: ssl.SSLContext) -> bool:
        with self._lock:
            if self._context is context:
                log.info("the API server rejected the credential plugin's client "
                         "certificate, running it again", extra={"COMMAND": self._spec.command})
                self._renew_at = -math.inf
        return True  # the next context() has a certificate not yet seen rejected

    def context(self) -> ssl.SSLContext:
        with self._lock:
            credential = self._current()
            if self._context is None:
                if credential.cert is None or credential.key is None:
                    raise CredentialError(f"{self._name} gave no client certificate",
                                          kind="invalid")
                self._context = self._make_tls(credential.cert, credential.key)
            return self._context

    def _current(self) -> _ExecCredential:
        now = self._clock()
        if self._credential is not None and now < self._renew_at:
            return self._credential
        credential = _run_plugin(self._spec, self._timeout)
        previous = self._credential
        if previous is not None and (
            (credential.token is None) != (previous.token is None)
            or (credential.cert is None) != (previous.cert is None)
        ):
            raise CredentialError(f"{self._name} answered with other kinds of credential "
                                  f"({_kinds(credential)}) than at first ({_kinds(previous)})",
                                  kind="invalid")
        self._credential, self._context = credential, None
        if credential.expires is None:
            self._renew_at = math.inf
        else:  # a while before it expires, or halfway through a short life
            life = credential.expires - now
            self._renew_at = credential.expires - min(EXEC_RENEW_BEFORE, life / 2)
        log.info("credential plugin ran", extra={
            "COMMAND": self._spec.command, "CREDENTIAL": _kinds(credential),
            "EXPIRES": None if credential.expires is None
            else datetime.fromtimestamp(credential.expires, UTC).isoformat(),
        })
        return credential


def _kinds(credential: _ExecCredential) -> str:
    kinds = ["a token"] if credential.token is not None else []
    if credential.cert is not None:
        kinds.append("a client certificate")
    return " and ".join(kinds)


def _run_plugin(spec: _ExecSpec, timeout: float) -> _ExecCredential:
    """Run the plugin once and read its ExecCredential; ``CredentialError`` if that fails."""
    name = f"credential plugin {spec.command!r}"
    request: dict[str, Any] = {"apiVersion": spec.api_version, "kind": "ExecCredential",
                               "spec": {"interactive": False}}
    if spec.cluster is not None:
        request["spec"]["cluster"] = spec.cluster
    env = {**os.environ, **dict(spec.env), "KUBERNETES_EXEC_INFO": json.dumps(request)}
    try:
        done = subprocess.run(
            [spec.executable, *spec.args], stdin=subprocess.DEVNULL, capture_output=True,
            env=env, timeout=timeout, check=False,
        )
    except FileNotFoundError:
        where = "no such file" if "/" in spec.command else "not found on PATH"
        hint = f"; {spec.install_hint.strip()}" if spec.install_hint else ""
        raise CredentialError(f"{name}: {where}{hint}", kind="not_found") from None
    except subprocess.TimeoutExpired:
        raise CredentialError(f"{name} did not answer within {timeout:g} s",
                              kind="timeout") from None
    except PermissionError:
        raise CredentialError(f"{name}: permission denied (not executable?)",
                              kind="forbidden") from None
    except OSError as err:
        raise CredentialError(f"{name}: cannot run it ({type(err).__name__})") from None
    if done.returncode != 0:
        # stderr only: stdout may hold a credential even when the plugin fails.
        how = (f"exited with status {done.returncode}" if done.returncode > 0
               else f"was killed by signal {-done.returncode}")
        tail = _tail(done.stderr)
        said = f"; stderr ends: {tail}" if tail else " (nothing on stderr)"
        raise CredentialError(f"{name} {how}{said}")
    if tail := _tail(done.stderr):  # what a plugin says on success: for whoever debugs it
        log.debug("credential plugin wrote to stderr", extra={
            "COMMAND": spec.command, "STDERR": tail})
    return _parse_credential(done.stdout, spec.api_version, name)


def _tail(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()]
    text = " | ".join([line for line in lines if line][-EXEC_STDERR_LINES:])
    return text if len(text) <= EXEC_STDERR_CHARS else "..." + text[-EXEC_STDERR_CHARS:]


def _parse_credential(stdout: bytes, api_version: str, name: str) -> _ExecCredential:
    # No message below quotes what the plugin printed, but for its apiVersion.
    def invalid(text: str) -> CredentialError:
        return CredentialError(f"{name} {text}", kind="invalid")

    try:
        answer = json.loads(stdout)
    except ValueError:
        raise invalid("did not print an ExecCredential (its output is not JSON)") from None
    if not isinstance(answer, dict) or answer.get("kind") != "ExecCredential":
        raise invalid("did not print an ExecCredential (kind is not 'ExecCredential')")
    got = answer.get("apiVersion")
    if got != api_version:
        shown = repr(got[:100]) if isinstance(got, str) else "none"
        raise invalid(f"answered with apiVersion {shown}, not the configured {api_version!r}")
    status = answer.get("status")
    if not isinstance(status, dict):
        raise invalid("gave no status in its ExecCredential")
    fields: dict[str, str | None] = {}
    for field in ("token", "clientCertificateData", "clientKeyData", "expirationTimestamp"):
        value = status.get(field)
        if value is not None and not isinstance(value, str):
            raise invalid(f"gave a status.{field} that is not a string")
        fields[field] = value or None
    token, cert, key = fields["token"], fields["clientCertificateData"], fields["clientKeyData"]
    if (cert is None) != (key is None):
        raise invalid("gave a client certificate without its key, or a key without its "
                      "certificate")
    if token is None and cert is None:
        raise invalid("gave neither a token nor a client certificate and key")
    expires: float | None = None
    if (stamp := fields["expirationTimestamp"]) is not None:
        try:
            moment = datetime.fromisoformat(stamp)
        except ValueError:
            raise invalid("gave a status.expirationTimestamp that is not an RFC 3339 time") \
                from None
        if moment.tzinfo is None:
            raise invalid("gave a status.expirationTimestamp without a time zone")
        expires = moment.timestamp()
    return _ExecCredential(
        token=token,
        cert=None if cert is None else cert.encode(),
        key=None if key is None else key.encode(),
        expires=expires,
    )


# -- TLS and the client ------------------------------------------------------------------


def _reading(what: str, path: Path | None) -> str:
    return f"{what} {str(path)!r}" if path is not None else f"{what} (embedded data)"


def _tls_context(endpoint: _Endpoint) -> ssl.SSLContext:
    if endpoint.insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        what = _reading("certificate-authority", endpoint.ca_file)
        ca_data: str | bytes | None = endpoint.ca_data
        if isinstance(ca_data, bytes) and ca_data.lstrip().startswith(b"-----BEGIN"):
            ca_data = ca_data.decode("ascii", "replace")  # PEM; bytes would mean DER
        try:
            context = ssl.create_default_context(
                cafile=str(endpoint.ca_file) if endpoint.ca_file else None, cadata=ca_data
            )
        except FileNotFoundError:
            raise _Invalid(f"{what}: no such file", kind="not_found") from None
        except PermissionError:
            raise _Invalid(f"{what}: permission denied", kind="forbidden") from None
        except (ssl.SSLError, ValueError):
            raise _Invalid(f"{what}: not a PEM certificate") from None
        except OSError as err:
            raise _Invalid(f"{what}: cannot read it ({type(err).__name__})") from None
        # As Go's crypto/x509 (kubectl): the kubeconfig's CA is trusted as an anchor even
        # when it is an intermediate CA, not only a self-signed root (Python 3.13 turns
        # this on by default; 3.11 and 3.12 refuse such a chain). VERIFY_X509_STRICT stays
        # off, as before 3.13: it refuses CA certificates that Go and kubectl accept (one
        # without an Authority Key Identifier, for example).
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    if endpoint.cert_file or endpoint.cert_data:
        _load_client_certificate(context, endpoint)
    return context


_FileStamp = tuple[int, int, int, int] | None  # (device, inode, mtime in ns, size)


def _stamp(path: Path | None) -> _FileStamp:
    """What changes when a file is rewritten, replaced or a symlink to it is moved."""
    if path is None:
        return None
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


class _FileTls:
    """The TLS context of a kubeconfig whose client certificate and key are files, built
    again when they change: the kubelet rotates its certificate by writing a new file and
    moving the kubelet-client-current.pem symlink, cert-manager or an operator replace
    it in place. A ``TlsSource``; thread-safe.

    The files are checked (stat) at most every ``check_period`` seconds, and at once
    after the server refused the certificate. New files that do not load (a key that
    does not match its certificate yet, half-way through a rotation) keep the last
    context, with a warning, and are tried again at the next check. The first load
    raises ``_Invalid``.
    """

    def __init__(
        self,
        endpoint: _Endpoint,
        *,
        check_period: float = CERT_FILE_CHECK_PERIOD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._endpoint = endpoint
        self._check_period = check_period
        self._clock = clock
        self._lock = threading.Lock()
        self._stamps = self._files()
        self._refused: tuple[_FileStamp, ...] | None = None  # files that did not load
        self._context = _tls_context(endpoint)
        self._check_at = clock() + check_period

    def __repr__(self) -> str:
        return f"_FileTls({str(self._endpoint.cert_file)!r})"

    def context(self) -> ssl.SSLContext:
        with self._lock:
            now = self._clock()
            if now >= self._check_at:
                self._check_at = now + self._check_period
                self._reload()
            return self._context

    def reject_context(self, context: ssl.SSLContext) -> bool:
        with self._lock:
            self._check_at = self._clock() + self._check_period
            self._reload()
            return self._context is not context  # a rotated certificate is worth a try

    def _files(self) -> tuple[_FileStamp, ...]:
        endpoint = self._endpoint
        return tuple(_stamp(path) for path in (endpoint.cert_file, endpoint.key_file,
                                               endpoint.ca_file))

    def _reload(self) -> None:
        stamps = self._files()
        if stamps in (self._stamps, self._refused):
            return
        try:
            context = _tls_context(self._endpoint)
        except _Invalid as err:
            self._refused = stamps
            log.warning("the client certificate files changed but do not load, keeping the "
                        "last ones", extra={"PATH": str(self._endpoint.cert_file),
                                            "ERROR": str(err)})
            return
        self._context, self._stamps = context, stamps
        log.info("client certificate files changed, loaded them again",
                 extra={"PATH": str(self._endpoint.cert_file)})


def _plugin_tls(endpoint: _Endpoint, cert: bytes, key: bytes) -> ssl.SSLContext:
    """The TLS context with a credential plugin's client certificate and key."""
    command = endpoint.plugin.command if endpoint.plugin is not None else "?"
    try:
        return _tls_context(dataclasses.replace(endpoint, cert_data=cert, key_data=key))
    except _Invalid as err:
        raise CredentialError(f"credential plugin {command!r}: {err}", kind=err.kind) \
            from None


@contextlib.contextmanager
def _as_file(path: Path | None, data: bytes | None) -> Iterator[str]:
    """A file name holding the material: the given file, or the data in an anonymous
    memory file (``memfd_create``), named through /proc/self/fd (``ssl`` loads
    certificates and keys from files). Key material never touches a file system, so
    nothing is left behind, even by a crash."""
    if path is not None or data is None:
        yield str(path)
        return
    fd = os.memfd_create("cluo-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _load_client_certificate(context: ssl.SSLContext, endpoint: _Endpoint) -> None:
    cert = _reading("client-certificate", endpoint.cert_file)
    key = _reading("client-key", endpoint.key_file)
    for what, path in ((cert, endpoint.cert_file), (key, endpoint.key_file)):
        if path is not None and not path.is_file():
            raise _Invalid(f"{what}: no such file", kind="not_found")
    try:
        with _as_file(endpoint.cert_file, endpoint.cert_data) as cert_name, \
                _as_file(endpoint.key_file, endpoint.key_data) as key_name:
            context.load_cert_chain(cert_name, key_name)
    except PermissionError:
        raise _Invalid(f"{cert} or {key}: permission denied", kind="forbidden") from None
    except ssl.SSLError:
        raise _Invalid(f"{cert} and {key}: not a PEM certificate and its matching key") from None
    except OSError as err:
        raise _Invalid(f"{cert} or {key}: cannot read it ({type(err).__name__})") from None


def _warn_about_proxy(server: str) -> None:
    """cluo connects to the API server directly; say so at start when the environment
    asks for a proxy for it (HTTPS_PROXY or https_proxy, not bypassed by NO_PROXY), rather
    than ignore the variable silently. The proxy's address is not logged: it may hold a
    password."""
    if not any(name.lower() == "https_proxy" and value for name, value in os.environ.items()):
        return  # no proxy for https (what getproxies_environment reads): no urllib.request
    # Imported here: urllib.request costs the agent's start-up 0.6 MB (docs/agent.md).
    import urllib.request  # noqa: PLC0415

    proxies = urllib.request.getproxies_environment()
    host = urlsplit(server).hostname or ""
    if "https" in proxies and not urllib.request.proxy_bypass(host):
        variable = next((name for name in ("HTTPS_PROXY", "https_proxy") if os.environ.get(name)),
                        "HTTPS_PROXY")
        log.warning("a proxy is set for https, but cluo connects to the API server directly",
                    extra={"SERVER": server, "VARIABLE": variable})


def _client(
    endpoint: _Endpoint, component: Component, clock: Callable[[], float] = time.time
) -> KubeClient:
    https = urlsplit(endpoint.server).scheme == "https"  # lower-cased, as KubeClient reads it
    _warn_about_proxy(endpoint.server)
    if not https and (endpoint.token is not None or endpoint.cert_file or endpoint.cert_data
                      or endpoint.plugin is not None):
        raise _Invalid(f"server {endpoint.server!r}: credentials go over https only")
    token = endpoint.token
    tls: ssl.SSLContext | TlsSource | None = None
    if endpoint.plugin is not None:
        plugin = _ExecPlugin(endpoint.plugin, clock=clock,
                             make_tls=lambda cert, key: _plugin_tls(endpoint, cert, key))
        try:  # run it now: a plugin that does not work is a configuration error
            first = plugin.current()
            if first.cert is not None:
                plugin.context()
                tls = plugin
        except CredentialError as err:
            raise _Invalid(str(err), kind=err.kind) from None
        if first.token is not None:
            token = plugin
    if https and tls is None:
        tls = (_FileTls(endpoint) if endpoint.cert_file or endpoint.key_file
               else _tls_context(endpoint))
    try:
        client = KubeClient(
            endpoint.server,
            user_agent=user_agent(component),
            tls=tls,
            token=token,
            tls_server_name=endpoint.tls_server_name,
        )
    except ValueError as err:  # the server URL
        raise _Invalid(f"server {endpoint.server!r}: {err}") from None
    if endpoint.insecure:
        log.warning("the API server's certificate is not verified (insecure-skip-tls-verify)",
                    extra={"API_SERVER": client.server})
    log.info(
        "kubernetes client configured",
        extra={"API_SERVER": client.server, "USER_AGENT": client.user_agent},
    )
    return client
