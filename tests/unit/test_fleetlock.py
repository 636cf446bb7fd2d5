"""FleetLock: Zincati's client id derived from the machine id, the requests as Zincati
sends them and every way one is refused (cluo_coord/fleetlock.py), the id-to-Node match
(cluo_coord/fleetlock_nodes.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cluo.protocol import Keys
from cluo_coord.fleetlock import (
    ZINCATI_APP_ID,
    Answer,
    ClientParams,
    Endpoint,
    Kind,
    Request,
    app_specific_id,
    parse_request,
)
from cluo_coord.fleetlock_nodes import matching_nodes

# A request body exactly as Zincati 0.0.32 sends it: serde_json::to_string_pretty of its
# ClientIdentity, no Content-Type header, the protocol header.
ZINCATI_BODY = (b'{\n  "client_params": {\n    "id": "975228d46dc94622b9bbe16671e2b58d",\n'
                b'    "group": "default"\n  }\n}')
HEADERS = {"fleet-lock-protocol": "true", "content-length": str(len(ZINCATI_BODY))}
KEYS = Keys()


# --- the id ---------------------------------------------------------------------------


def test_zincati_id_of_a_machine_id_is_systemds_app_specific_id() -> None:
    # Computed with systemd 252's `systemd-id128 -a de35106b6ec24688b63afddaa156679b
    # machine-id` on a host whose /etc/machine-id is 3d1219c7c4c5404aaa1f6d2a48adfda4.
    assert app_specific_id("3d1219c7c4c5404aaa1f6d2a48adfda4") == \
        "975228d46dc94622b9bbe16671e2b58d"


@pytest.mark.skipif(shutil.which("systemd-id128") is None, reason="no systemd-id128 here")
def test_zincati_id_matches_systemd_on_this_host() -> None:
    machine_id = Path("/etc/machine-id").read_text().strip()
    systemd = subprocess.run(["systemd-id128", "-a", ZINCATI_APP_ID, "machine-id"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert app_specific_id(machine_id) == systemd.replace("-", "")


def test_zincati_id_is_a_version_4_uuid() -> None:
    derived = app_specific_id("0" * 32)
    assert derived[12] == "4" and derived[16] in "89ab"


@pytest.mark.parametrize("bad", ["", "xyz", "3d1219c7-c4c5-404a-aa1f-6d2a48adfda4", "0" * 31])
def test_a_malformed_machine_id_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a machine id"):
        app_specific_id(bad)


# --- the requests ---------------------------------------------------------------------


def test_zincatis_pre_reboot_request_is_parsed() -> None:
    assert parse_request("POST", "/v1/pre-reboot", HEADERS, ZINCATI_BODY) == Request(
        Endpoint.PRE_REBOOT, ClientParams("975228d46dc94622b9bbe16671e2b58d", "default"))
    assert parse_request("POST", "/v1/steady-state", HEADERS, ZINCATI_BODY) == Request(
        Endpoint.STEADY_STATE, ClientParams("975228d46dc94622b9bbe16671e2b58d", "default"))


def test_a_base_url_with_a_path_is_served() -> None:
    request = parse_request("POST", "/fleetlock/v1/pre-reboot", HEADERS, ZINCATI_BODY)
    assert isinstance(request, Request) and request.endpoint is Endpoint.PRE_REBOOT


def _refusal(method: str = "POST", path: str = "/v1/pre-reboot",
             headers: dict[str, str] | None = None, body: bytes = ZINCATI_BODY) -> Answer:
    answer = parse_request(method, path, HEADERS if headers is None else headers, body)
    assert isinstance(answer, Answer), answer
    return answer


@pytest.mark.parametrize(("case", "status", "kind"), [
    ({"method": "GET"}, 405, Kind.METHOD_NOT_ALLOWED),
    ({"method": "PUT", "path": "/v1/steady-state"}, 405, Kind.METHOD_NOT_ALLOWED),
    ({"path": "/v1/lock"}, 404, Kind.NOT_FOUND),
    ({"path": "/v2/pre-reboot"}, 404, Kind.NOT_FOUND),
    ({"headers": {}}, 400, Kind.MISSING_PROTOCOL_HEADER),
    ({"headers": {"fleet-lock-protocol": "false"}}, 400, Kind.MISSING_PROTOCOL_HEADER),
    ({"body": b"{not json"}, 400, Kind.BAD_REQUEST),
    ({"body": b"\xff\xfe"}, 400, Kind.BAD_REQUEST),
    ({"body": b"[]"}, 400, Kind.BAD_REQUEST),
    ({"body": b'{"id": "a", "group": "b"}'}, 400, Kind.BAD_REQUEST),
    ({"body": b'{"client_params": {"group": "default"}}'}, 400, Kind.BAD_REQUEST),
    ({"body": b'{"client_params": {"id": " ", "group": "default"}}'}, 400, Kind.BAD_REQUEST),
    ({"body": b'{"client_params": {"id": "a", "group": ""}}'}, 400, Kind.BAD_REQUEST),
    ({"body": b'{"client_params": {"id": "a", "group": "a b"}}'}, 400, Kind.BAD_REQUEST),
    ({"body": b'{"client_params": {"id": 7, "group": "default"}}'}, 400, Kind.BAD_REQUEST),
])
def test_a_request_that_is_not_fleetlock_is_refused_with_its_kind(
        case: dict[str, Any], status: int, kind: Kind) -> None:
    answer = _refusal(**case)
    assert (answer.status, answer.kind) == (status, kind)
    assert answer.value


def test_an_error_answer_is_the_protocols_json() -> None:
    answer = _refusal(headers={})
    assert json.loads(answer.body) == {"kind": "missing_protocol_header",
                                       "value": answer.value}
    assert "fleet-lock-protocol: true" in answer.value


# --- id -> Node -----------------------------------------------------------------------


def _node(name: str, machine_id: str = "", fleetlock_id: str | None = None) -> dict[str, Any]:
    annotations = {} if fleetlock_id is None else {KEYS.fleetlock_id: fleetlock_id}
    return {"metadata": {"name": name, "annotations": annotations},
            "status": {"nodeInfo": {"machineID": machine_id}}}


ZINCATI_ID = app_specific_id("3d1219c7c4c5404aaa1f6d2a48adfda4")


def test_a_client_is_the_node_whose_machine_id_gives_its_id() -> None:
    nodes = [_node("a", "0" * 32), _node("b", "3d1219c7c4c5404aaa1f6d2a48adfda4"),
             _node("c", "not reported")]
    assert matching_nodes(ZINCATI_ID, nodes, KEYS) == ["b"]


def test_the_fleetlock_id_annotation_wins_over_the_machine_id() -> None:
    nodes = [_node("b", "3d1219c7c4c5404aaa1f6d2a48adfda4"),
             _node("named", "0" * 32, fleetlock_id=ZINCATI_ID)]
    assert matching_nodes(ZINCATI_ID, nodes, KEYS) == ["named"]


def test_a_node_naming_another_id_is_not_matched_by_its_machine_id() -> None:
    nodes = [_node("b", "3d1219c7c4c5404aaa1f6d2a48adfda4", fleetlock_id="other")]
    assert matching_nodes(ZINCATI_ID, nodes, KEYS) == []
    assert matching_nodes("other", nodes, KEYS) == ["b"]


def test_no_node_matches_an_unknown_id() -> None:
    assert matching_nodes("c988d2509fdf5cdcbed39037c56406fb", [_node("a", "0" * 32)],
                          KEYS) == []
