"""Reading kubeconfig files: what is supported, and clear refusals for the rest.

Only checks that fail before any certificate is loaded live here; kubeconfigs that
reach a real API server (embedded and relative certificates, tokenFile, insecure,
tls-server-name) are in tests/kube/test_kube_client.py. Credential plugins are run
here (a fake one, ``FakePlugin``); what their credentials do to requests (caching,
expiry, a 401) is in tests/unit/test_kube_client.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cluo.errors import ConfigError
from cluo.kube import config as kube_config
from cluo.kube.config import in_cluster_client, kubeconfig_client

SECRET = "s3cr3t-token-value"
V1 = "client.authentication.k8s.io/v1"
V1BETA1 = "client.authentication.k8s.io/v1beta1"

_PLUGIN_SCRIPT = """#!{python}
import json, os, sys, time
from pathlib import Path

me = Path(sys.argv[0])
runs = Path(f"{{me}}.runs")
with runs.open("a") as log:
    log.write(json.dumps({{
        "args": sys.argv[1:],
        "env": {{k: v for k, v in os.environ.items() if k.startswith("FAKE_")}},
        "info": json.loads(os.environ["KUBERNETES_EXEC_INFO"]),
        "stdin_is_devnull": os.stat(0).st_rdev == os.stat("/dev/null").st_rdev,
    }}) + "\\n")
run = len(runs.read_text().splitlines())
plan = json.loads(Path(f"{{me}}.plan").read_text())
time.sleep(plan["sleep"])
sys.stderr.write(plan["stderr"])
sys.stdout.write(plan["stdout"].replace("{{run}}", str(run)))
sys.exit(plan["exit"])
"""


class FakePlugin:
    """A credential plugin: a Python script printing what the test planned (``{run}`` in
    its output is its run number, from 1) and recording each run (args, FAKE_* env,
    KUBERNETES_EXEC_INFO, whether stdin is /dev/null)."""

    def __init__(self, folder: Path, name: str = "fake-plugin") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / name
        self.path.write_text(_PLUGIN_SCRIPT.format(python=sys.executable))
        self.path.chmod(0o755)
        self.answer(token="token-{run}")

    def answer(
        self, *, token: str | None = None, cert: str | None = None, key: str | None = None,
        expires: str | None = None, api_version: str = V1, stdout: str | None = None,
        stderr: str = "", exit: int = 0, sleep: float = 0.0,
    ) -> None:
        """Plan the next runs' answer: an ExecCredential unless ``stdout`` is given."""
        if stdout is None:
            status = {"token": token, "clientCertificateData": cert, "clientKeyData": key,
                      "expirationTimestamp": expires}
            stdout = json.dumps({"apiVersion": api_version, "kind": "ExecCredential",
                                 "status": {k: v for k, v in status.items() if v is not None}})
        Path(f"{self.path}.plan").write_text(json.dumps(
            {"stdout": stdout, "stderr": stderr, "exit": exit, "sleep": sleep}))

    @property
    def runs(self) -> list[dict[str, Any]]:
        log = Path(f"{self.path}.runs")
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]


def exec_user(command: str | Path, api_version: str = V1, **fields: Any) -> str:
    """A kubeconfig ``user`` (flow mapping) with a credential plugin."""
    config = {"command": str(command), "apiVersion": api_version, **fields}
    return f"exec: {json.dumps(config)}"


def write(tmp_path: Path, *, cluster: str, user: str = f"token: {SECRET}",
          extra: str = "") -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "contexts:\n- name: c\n  context: {cluster: k, user: u}\n"
        "- name: other\n  context: {cluster: k2, user: u}\n"
        f"clusters:\n- name: k\n  cluster: {{{cluster}}}\n"
        "- name: k2\n  cluster: {server: 'https://other.example:6443'}\n"
        f"users:\n- name: u\n  user: {{{user}}}\n{extra}"
    )
    return path


def refusal(path: Path, **kwargs: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        kubeconfig_client(path, **kwargs)  # type: ignore[arg-type]
    error = caught.value
    assert str(path) in str(error)
    assert SECRET not in str(error)
    assert error.__cause__ is None and error.__suppress_context__
    return error


@pytest.mark.parametrize(("user", "named"), [
    ("auth-provider: {name: oidc}", "auth-provider"),
    (f"username: admin, password: {SECRET}", "basic authentication"),
    (f"token: {SECRET}, as: someone-else", "impersonation"),
])
def test_unsupported_authentication_is_refused_by_name(
    tmp_path: Path, user: str, named: str
) -> None:
    error = refusal(write(tmp_path, cluster="server: 'https://127.0.0.1:6443'", user=user))
    assert named in str(error)
    assert "not supported" in str(error)
    assert error.kind == "invalid"


def test_an_upper_case_https_scheme_carries_credentials(tmp_path: Path) -> None:
    # Refused as "credentials go over https only" when the scheme was compared as written.
    with kubeconfig_client(write(tmp_path, cluster="server: 'HTTPS://h:6443'")) as client:
        assert client.server == "HTTPS://h:6443"


def test_a_proxy_is_refused_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, cluster="server: 'https://h:6443', proxy-url: 'http://proxy:3128'")
    assert "proxy-url" in str(refusal(path))


@pytest.mark.parametrize(("cluster", "user", "says"), [
    ("certificate-authority: /nonexistent/ca.crt", f"token: {SECRET}", "has no server"),
    ("server: 'https://h:6443', certificate-authority: /nonexistent/ca.crt",
     f"token: {SECRET}", "'/nonexistent/ca.crt': no such file"),
    ("server: 'https://h:6443', certificate-authority-data: 'not base64!'",
     f"token: {SECRET}", "not valid base64"),
    ("server: 'https://h:6443', certificate-authority-data: 'bm90IGEgY2VydA=='",
     f"token: {SECRET}", "not a PEM certificate"),
    ("server: 'https://h:6443', insecure-skip-tls-verify: true, "
     "certificate-authority: ca.crt", f"token: {SECRET}", "contradictory"),
    ("server: 'https://h:6443', insecure-skip-tls-verify: 'yes'", f"token: {SECRET}",
     "must be true or false"),
    ("server: 'https://h:notaport'", f"token: {SECRET}", "server 'https://h:notaport'"),
    ("server: 'http://127.0.0.1:8080'", f"token: {SECRET}", "over https only"),
    ("server: 'https://h:6443'", "client-certificate: c.crt", "needs its key"),
    ("server: 'https://h:6443'", "client-key-data: 'a2V5'", "needs its key"),
    ("server: 'https://h:6443'", "client-certificate: c.crt, client-key: c.key",
     "no such file"),
    ("server: 'https://h:6443'", "tokenFile: missing-token", "does not exist"),
    # kubectl refuses a file and its -data form together; so does cluo.
    ("server: 'https://h:6443', certificate-authority: ca.crt, "
     "certificate-authority-data: 'bm90IGEgY2VydA=='", f"token: {SECRET}",
     "'certificate-authority' and 'certificate-authority-data' are both given"),
    ("server: 'https://h:6443'", "client-certificate: c.crt, client-certificate-data: 'YQ==', "
     "client-key-data: 'a2V5'",
     "'client-certificate' and 'client-certificate-data' are both given"),
    ("server: 'https://h:6443'", "client-certificate-data: 'YQ==', client-key: c.key, "
     "client-key-data: 'a2V5'", "'client-key' and 'client-key-data' are both given"),
])
def test_configuration_mistakes_say_what_is_wrong(
    tmp_path: Path, cluster: str, user: str, says: str
) -> None:
    assert says in str(refusal(write(tmp_path, cluster=cluster, user=user)))


def test_relative_files_are_read_next_to_the_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tokenFile is found relative to the kubeconfig's folder, not the working
    # directory: the missing CA it names next is reported with the resolved path.
    (tmp_path / "token").write_text("abc\n")
    path = write(tmp_path, cluster="server: 'https://h:6443', certificate-authority: ca.crt",
                 user="tokenFile: token")
    monkeypatch.chdir("/")
    assert f"{tmp_path / 'ca.crt'}" in str(refusal(path))


def test_contexts_are_chosen_by_current_context_or_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, cluster="server: 'https://current.example:6443'")
    with caplog.at_level(logging.INFO, logger="cluo.kube.config"):
        assert kubeconfig_client(path).server == "https://current.example:6443"
        assert kubeconfig_client(path, context="other").server == "https://other.example:6443"
    assert "no context named 'missing'" in str(refusal(path, context="missing"))
    assert all(SECRET not in record.getMessage() + str(vars(record))
               for record in caplog.records)


def test_a_kubeconfig_without_current_context_needs_one_named(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    assert "no context given" in str(refusal(path))


def test_a_user_less_context_is_anonymous(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "current-context: c\ncontexts:\n- name: c\n  context: {cluster: k}\n"
        "clusters:\n- name: k\n  cluster: {server: 'https://h:6443'}\n"
    )
    assert kubeconfig_client(path, "cluo-coord").user_agent.startswith("cluo-coord/")


def test_in_cluster_needs_the_service_environment_and_its_files(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(SECRET)
    with pytest.raises(ConfigError) as caught:
        in_cluster_client(token_path=token, ca_path=tmp_path / "ca.crt", environ={})
    assert "KUBERNETES_SERVICE_HOST" in str(caught.value)
    environ = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(ConfigError) as caught:
        in_cluster_client(token_path=token, ca_path=tmp_path / "ca.crt", environ=environ)
    assert str(tmp_path / "ca.crt") in str(caught.value)
    assert SECRET not in str(caught.value)
    token.write_text("")
    with pytest.raises(ConfigError) as caught:
        in_cluster_client(token_path=token, ca_path=tmp_path / "ca.crt", environ=environ)
    assert "is empty" in str(caught.value)


# -- credential plugins (exec) ----------------------------------------------------------


@pytest.mark.parametrize("api_version", [V1, V1BETA1])
def test_a_credential_plugin_runs_with_its_args_env_and_exec_info_and_no_stdin(
    tmp_path: Path, api_version: str
) -> None:
    plugin = FakePlugin(tmp_path)
    plugin.answer(token=SECRET, api_version=api_version)
    user = exec_user(plugin.path, api_version, args=["token", "--cluster", "c 1"],
                     env=[{"name": "FAKE_REGION", "value": "eu-west-1"},
                          {"name": "FAKE_EMPTY", "value": ""}],
                     interactiveMode="Never")
    kubeconfig_client(write(tmp_path, cluster="server: 'https://h:6443'", user=user))
    (run,) = plugin.runs
    assert run["args"] == ["token", "--cluster", "c 1"]
    assert run["env"] == {"FAKE_REGION": "eu-west-1", "FAKE_EMPTY": ""}
    assert run["stdin_is_devnull"]
    # No provideClusterInfo: no cluster in the request.
    assert run["info"] == {"apiVersion": api_version, "kind": "ExecCredential",
                           "spec": {"interactive": False}}


def test_a_relative_command_is_found_next_to_the_kubeconfig_and_a_bare_one_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nearby = FakePlugin(tmp_path / "bin", "nearby")
    on_path = FakePlugin(tmp_path / "elsewhere", "on-path")
    monkeypatch.chdir("/")
    monkeypatch.setenv("PATH", f"{tmp_path / 'elsewhere'}{os.pathsep}{os.environ['PATH']}")
    for command in ("bin/nearby", "on-path"):
        kubeconfig_client(write(tmp_path, cluster="server: 'https://h:6443'",
                                user=exec_user(command)))
    assert (len(nearby.runs), len(on_path.runs)) == (1, 1)


def test_a_missing_plugin_is_named_with_its_install_hint(tmp_path: Path) -> None:
    hint = "Install the AWS CLI: https://aws.amazon.com/cli/"
    user = exec_user("no-such-cluo-plugin", installHint=hint)
    error = refusal(write(tmp_path, cluster="server: 'https://h:6443'", user=user))
    assert "credential plugin 'no-such-cluo-plugin'" in str(error)
    assert "not found on PATH" in str(error)
    assert hint in str(error)
    assert error.kind == "not_found"


def test_a_failing_plugin_is_reported_with_its_exit_status_and_stderr_tail_never_stdout(
    tmp_path: Path
) -> None:
    plugin = FakePlugin(tmp_path)
    stderr = "".join(f"line {n}\n" for n in range(1, 21)) + "error: token expired, log in\n"
    plugin.answer(exit=3, stderr=stderr, stdout=json.dumps({"status": {"token": SECRET}}))
    error = refusal(write(tmp_path, cluster="server: 'https://h:6443'",
                          user=exec_user(plugin.path)))
    assert "exited with status 3" in str(error)
    assert "error: token expired, log in" in str(error)
    assert "line 17 | line 18 | line 19 | line 20 | error" in str(error)
    assert "line 16" not in str(error)  # only the last lines
    assert error.kind == "unavailable"


def test_a_plugin_that_does_not_answer_in_time_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube_config, "EXEC_TIMEOUT", 0.3)
    plugin = FakePlugin(tmp_path)
    plugin.answer(token=SECRET, sleep=30)
    error = refusal(write(tmp_path, cluster="server: 'https://h:6443'",
                          user=exec_user(plugin.path)))
    assert "did not answer within 0.3 s" in str(error)
    assert error.kind == "timeout"


@pytest.mark.parametrize(("answer", "says"), [
    ({"stdout": f"token: {SECRET}\n"}, "its output is not JSON"),
    ({"stdout": json.dumps({"kind": "Status", "token": SECRET})},
     "kind is not 'ExecCredential'"),
    ({"token": SECRET, "api_version": V1BETA1},
     f"apiVersion '{V1BETA1}', not the configured '{V1}'"),
    ({"stdout": json.dumps({"apiVersion": V1, "kind": "ExecCredential"})}, "no status"),
    ({"expires": "2030-01-01T00:00:00Z"}, "neither a token nor a client certificate"),
    ({"cert": "-----BEGIN CERTIFICATE-----"}, "without its key"),
    ({"token": SECRET, "expires": "next tuesday"}, "not an RFC 3339 time"),
    ({"token": SECRET, "expires": "2030-01-01T00:00:00"}, "without a time zone"),
])
def test_a_plugin_answer_that_is_no_credential_is_refused_without_quoting_it(
    tmp_path: Path, answer: dict[str, Any], says: str
) -> None:
    plugin = FakePlugin(tmp_path)
    plugin.answer(**answer)
    error = refusal(write(tmp_path, cluster="server: 'https://h:6443'",
                          user=exec_user(plugin.path)))
    assert says in str(error)
    assert error.kind == "invalid"


@pytest.mark.parametrize(("fields", "says"), [
    ({"interactiveMode": "Always"}, "interactiveMode 'Always' is not supported"),
    ({"interactiveMode": "Sometimes"}, "interactiveMode 'Sometimes' is not one of"),
    ({"apiVersion": "client.authentication.k8s.io/v1alpha1"}, "apiVersion "
     "'client.authentication.k8s.io/v1alpha1' is not supported"),
    ({"args": "--flag"}, "'args' must be a list of strings"),
    ({"env": [{"value": "x"}]}, "'env' must be a list of {name, value} strings"),
    ({"command": ""}, "exec: no command"),
])
def test_plugin_configurations_cluo_cannot_honour_are_refused_before_running_it(
    tmp_path: Path, fields: dict[str, Any], says: str
) -> None:
    plugin = FakePlugin(tmp_path)
    config = {"command": str(plugin.path), "apiVersion": V1, **fields}
    error = refusal(write(tmp_path, cluster="server: 'https://h:6443'",
                          user=f"exec: {json.dumps(config)}"))
    assert says in str(error)
    assert plugin.runs == []


def test_a_plugin_together_with_a_token_is_refused_as_ambiguous(tmp_path: Path) -> None:
    plugin = FakePlugin(tmp_path)
    user = f"token: {SECRET}, {exec_user(plugin.path)}"
    assert "ambiguous" in str(refusal(write(tmp_path, cluster="server: 'https://h:6443'",
                                            user=user)))
    assert plugin.runs == []


def test_a_plugin_credential_goes_over_https_only(tmp_path: Path) -> None:
    plugin = FakePlugin(tmp_path)
    path = write(tmp_path, cluster="server: 'http://127.0.0.1:8080'", user=exec_user(plugin.path))
    assert "over https only" in str(refusal(path))
    assert plugin.runs == []


def test_a_plugin_token_never_shows_in_a_log_or_a_repr(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = FakePlugin(tmp_path)
    plugin.answer(token=SECRET, expires="2030-01-01T00:00:00Z")
    with caplog.at_level(logging.DEBUG):
        client = kubeconfig_client(write(tmp_path, cluster="server: 'https://h:6443'",
                                         user=exec_user(plugin.path)))
    source = client._token
    assert source is not None and source.get() == SECRET
    assert "credential plugin ran" in caplog.text
    texts = [repr(client), repr(source), *(str(vars(record)) for record in caplog.records)]
    assert all(SECRET not in text for text in texts), texts


def test_what_a_working_plugin_says_on_stderr_is_logged_at_debug_level(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = FakePlugin(tmp_path)
    plugin.answer(token=SECRET, stderr="using cached login\nrefreshed\n")
    with caplog.at_level(logging.DEBUG, logger="cluo.kube.config"):
        kubeconfig_client(write(tmp_path, cluster="server: 'https://h:6443'",
                                user=exec_user(plugin.path)))
    said = [r for r in caplog.records if r.getMessage() == "credential plugin wrote to stderr"]
    assert [(r.levelno, getattr(r, "STDERR", None)) for r in said] == [
        (logging.DEBUG, "using cached login | refreshed")]


@pytest.mark.parametrize(("environment", "warned"), [
    ({"HTTPS_PROXY": "http://user:pw@proxy.example:3128"}, "HTTPS_PROXY"),
    ({"https_proxy": "http://proxy.example:3128"}, "https_proxy"),
    ({"HTTPS_PROXY": "http://proxy.example:3128", "NO_PROXY": "h,.internal"}, None),
    ({"HTTP_PROXY": "http://proxy.example:3128"}, None),
])
def test_a_proxy_in_the_environment_is_named_at_start_not_silently_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    environment: dict[str, str], warned: str | None,
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="cluo.kube.config"):
        kubeconfig_client(write(tmp_path, cluster="server: 'https://h:6443'"))
    proxied = [r for r in caplog.records if "proxy" in r.getMessage()]
    assert [getattr(r, "VARIABLE", None) for r in proxied] == ([warned] if warned else [])
    assert all("pw@" not in r.getMessage() + str(vars(r)) for r in caplog.records)


def test_the_user_agent_names_the_version_pyproject_gives() -> None:
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    with pyproject.open("rb") as file:
        released = tomllib.load(file)["project"]["version"]

    assert kube_config.version() == released
    assert kube_config.user_agent("cluo-agent") == f"cluo-agent/{released}"
