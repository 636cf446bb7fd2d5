"""The wire contract: keys, prefixes, values and the documentation that describes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluo.protocol import (
    CLUO_PREFIX,
    FLUO_PREFIX,
    SPECS,
    Keys,
    Kind,
    NodeProtocolState,
    ProtocolError,
    hooks_done,
    label_value,
    parse_bool,
    parse_hook_annotations,
    slot_lease_name,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_every_key_is_documented_in_protocol_md() -> None:
    text = DOC.read_text()
    for spec in SPECS:
        row = f"| `{spec.name}` | {spec.kind.value} | {spec.writer.value} |"
        assert row in text, f"docs/protocol.md lacks the row for {spec.kind.value} {spec.name}"


def test_every_spec_has_a_key_property() -> None:
    keys = Keys()
    for spec in SPECS:
        attribute = spec.name.replace("-", "_")
        if spec.kind is Kind.LABEL and spec.name == "reboot-needed":
            attribute = "reboot_needed"
        assert getattr(keys, attribute) == CLUO_PREFIX + spec.name


@pytest.mark.parametrize("prefix", [CLUO_PREFIX, FLUO_PREFIX, "example.com/"])
def test_accepts_dns_prefixes(prefix: str) -> None:
    assert Keys(prefix).reboot_ok == prefix + "reboot-ok"


@pytest.mark.parametrize("prefix", ["", "no-slash.example.com", "UPPER.com/", "a_b.com/", "/"])
def test_rejects_bad_prefix_naming_it(prefix: str) -> None:
    with pytest.raises(ProtocolError, match="annotation prefix"):
        Keys(prefix)


def test_unknown_key_name_is_refused() -> None:
    with pytest.raises(ProtocolError, match="reboot-okay"):
        Keys().key("reboot-okay")


@pytest.mark.parametrize(("raw", "expected"), [(None, False), ("false", False), ("true", True)])
def test_parse_bool(raw: str | None, expected: bool) -> None:
    assert parse_bool("k", raw) is expected


@pytest.mark.parametrize("raw", ["True", "yes", "1", ""])
def test_parse_bool_rejects_anything_else_naming_key_and_value(raw: str) -> None:
    with pytest.raises(ProtocolError, match=f"k must be 'true' or 'false', not {raw!r}"):
        parse_bool("k", raw)


def test_node_state_reads_fluo_prefix_and_reports_bad_values() -> None:
    keys = Keys(FLUO_PREFIX)
    state = NodeProtocolState.from_metadata(
        keys,
        {keys.reboot_needed: "true", keys.reboot_ok: "yes", keys.status: "UPDATE_STATUS_IDLE",
         CLUO_PREFIX + "reboot-in-progress": "true"},
        {keys.before_reboot: "true"},
    )
    assert state.reboot_needed is True
    assert state.reboot_ok is False
    assert state.reboot_in_progress is False  # a CLUO key is not a FLUO key
    assert state.before_reboot is True
    assert state.status == "UPDATE_STATUS_IDLE"
    assert state.complaints == (f"{keys.reboot_ok} must be 'true' or 'false', not 'yes'",)


def test_missing_metadata_reads_as_idle_node() -> None:
    assert NodeProtocolState.from_metadata(Keys(), None, None) == NodeProtocolState()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('"3975.2.0"', "3975.2.0"),
        ("'stable'", "stable"),
        ("Flatcar Container Linux", "Flatcar_Container_Linux"),
        ("  beta  ", "beta"),
        ("x" * 80, "x" * 63),
    ],
)
def test_label_value_strips_quotes_and_cleans(raw: str, expected: str) -> None:
    assert label_value(raw) == expected


def test_hooks_done_needs_every_hook_true() -> None:
    hooks = ("example.com/drained-db", "example.com/backup")
    assert hooks_done((), None)
    assert not hooks_done(hooks, {"example.com/drained-db": "true"})
    assert not hooks_done(hooks, {"example.com/drained-db": "true", "example.com/backup": "yes"})
    assert hooks_done(hooks, {"example.com/drained-db": "true", "example.com/backup": "true"})


def test_parse_hook_annotations() -> None:
    assert parse_hook_annotations(" example.com/a, b ,,") == ("example.com/a", "b")
    with pytest.raises(ProtocolError, match=r"'example\.com/' is not a valid"):
        parse_hook_annotations("example.com/")
    with pytest.raises(ProtocolError, match="invalid prefix 'Bad_Prefix'"):
        parse_hook_annotations("Bad_Prefix/x")


def test_slot_lease_names() -> None:
    assert slot_lease_name(0) == "cluo-reboot-slot-0"
    with pytest.raises(ProtocolError):
        slot_lease_name(-1)
