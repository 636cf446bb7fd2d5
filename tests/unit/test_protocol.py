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
    MetadataPatch,
    NodePatch,
    NodeProtocolState,
    ProtocolError,
    Writer,
    after_reboot_patch,
    before_reboot_patch,
    grant_patch,
    hooks_done,
    label_value,
    parse_bool,
    parse_hook_annotations,
    reset_patch,
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


# --- encoding: each side writes only what the table says it writes ------------------------

KEYS = Keys()
HOOK = "example.com/drained"  # a user-chosen hook annotation
# Keys of others that the coordinator deletes, as their meaning in SPECS says it does.
CLEARED_BY_COORDINATOR = {"blocked-reason", "release-slot", "agent-made-unschedulable",
                          "boot-id-before-reboot"}


def _spec(key: str, kind: Kind) -> tuple[str, Writer]:
    name = key.removeprefix(KEYS.prefix)
    (spec,) = [s for s in SPECS if s.name == name and s.kind is kind]
    return spec.name, spec.writer


def _writes(patch: MetadataPatch) -> list[tuple[str, Kind, str | None]]:
    return [*((k, Kind.LABEL, v) for k, v in patch.labels.items()),
            *((k, Kind.ANNOTATION, v) for k, v in patch.annotations.items())]


def test_the_agent_writes_only_keys_the_table_gives_the_agent() -> None:
    patch = NodePatch(reboot_needed=True, reboot_in_progress=True,
                      agent_made_unschedulable=True, boot_id_before_reboot="b",
                      blocked_reason="r", status="UPDATE_STATUS_IDLE", new_version="1.2.3",
                      last_checked_time="1").to_metadata(KEYS)
    written = _writes(patch)
    assert len(written) == 9  # every field, reboot-needed as annotation and label
    for key, kind, _value in written:
        assert _spec(key, kind)[1] is Writer.AGENT, key


def test_the_coordinator_sets_only_its_keys_and_clears_only_what_the_table_says() -> None:
    patches = [before_reboot_patch(KEYS, [HOOK]), grant_patch(KEYS, [HOOK]),
               after_reboot_patch(KEYS, [HOOK]),
               reset_patch(KEYS, [HOOK], clear_release_slot=True),
               reset_patch(KEYS, [HOOK], uncordon=True),
               reset_patch(KEYS, [HOOK], uncordon=True, finished=True)]
    for patch in patches:
        for key, kind, value in _writes(patch):
            if key == HOOK:
                assert value is None, "hook annotations are only ever cleared"
                continue
            name, writer = _spec(key, kind)
            if value is not None or name not in CLEARED_BY_COORDINATOR:
                assert writer is Writer.COORDINATOR, key


def test_the_grant_sets_reboot_ok_and_the_reset_sets_it_back_to_false() -> None:
    assert grant_patch(KEYS, ()).annotations[KEYS.reboot_ok] == "true"
    reset = reset_patch(KEYS, ())
    assert reset.annotations[KEYS.reboot_ok] == "false", "reboot-ok is never deleted"
    assert reset.labels == {KEYS.before_reboot: None, KEYS.after_reboot: None}


def test_only_the_reset_that_ends_a_cycle_removes_the_agents_boot_id() -> None:
    assert KEYS.boot_id_before_reboot not in reset_patch(KEYS, (), uncordon=True).annotations
    finished = reset_patch(KEYS, (), finished=True)
    assert finished.annotations[KEYS.boot_id_before_reboot] is None
    assert KEYS.agent_made_unschedulable not in finished.annotations  # that is `uncordon`'s
