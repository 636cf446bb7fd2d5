"""Logging setup: journal fields, the stderr format, journald detection and token redaction."""

from __future__ import annotations

import io
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from systemd import journal

from cluo_host.journal import (
    FieldsFormatter,
    RedactSecrets,
    journal_handler,
    redact,
    setup_logging,
)

TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEyMyJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJl"
OPAQUE_TOKEN = "abc123.DEF-456_ghi~+/x=="


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A logger of our own, so the tests leave the root logger alone."""
    test_logger = logging.getLogger(f"cluo-test.{uuid.uuid4().hex}")
    test_logger.propagate = False
    yield test_logger
    for handler in list(test_logger.handlers):
        test_logger.removeHandler(handler)
        handler.close()


class JournalCapture:
    """Stands in for systemd.journal.send: keeps what would have reached journald."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    # Positional-only: JournalHandler also passes every record attribute, "message" included.
    def __call__(self, text: str, /, **fields: Any) -> None:
        self.entries.append({"MESSAGE": text, **fields})


def test_extra_fields_become_journal_fields(logger):
    capture = JournalCapture()
    logger.addHandler(journal_handler("cluo-agent", sender=capture))
    logger.setLevel(logging.INFO)

    logger.info("reboot slot granted", extra={"NODE": "n1", "SLOT": 0})
    logger.warning("drain timed out", extra={"NODE": "n2"})

    first, second = capture.entries
    assert first["MESSAGE"] == "reboot slot granted"
    assert first["NODE"] == "n1"
    assert first["SLOT"] == 0
    assert first["SYSLOG_IDENTIFIER"] == "cluo-agent"
    assert first["PRIORITY"] == str(journal.LOG_INFO)
    assert second["PRIORITY"] == str(journal.LOG_WARNING)
    assert "SLOT" not in second


def test_journal_entries_carry_no_token_and_no_raw_exception(logger):
    capture = JournalCapture()
    logger.addHandler(journal_handler("cluo-agent", sender=capture))

    try:
        raise RuntimeError(f"401 with Authorization: Bearer {OPAQUE_TOKEN}")
    except RuntimeError:
        logger.exception("patching node failed", extra={"DETAIL": f"token {TOKEN}"})

    (entry,) = capture.entries
    sent = repr(entry)
    assert OPAQUE_TOKEN not in sent
    assert TOKEN not in sent
    assert "Bearer <redacted>" in entry["EXCEPTION_TEXT"]
    assert "RuntimeError" in entry["EXCEPTION_TEXT"]
    assert entry["DETAIL"] == "token <redacted>"
    assert "EXCEPTION_INFO" not in entry


def test_stderr_lines_are_level_logger_message_and_fields(logger):
    stream = io.StringIO()
    handler = setup_logging(logger=logger, use_journal=False, stream=stream)

    logger.info("reboot slot granted", extra={"NODE": "n1", "SLOT": 0})
    logger.warning("drain blocked", extra={"POD": "ns/web-0", "WHY": "PDB web allows 0"})
    logger.debug("not shown at INFO")

    assert isinstance(handler.formatter, FieldsFormatter)
    assert stream.getvalue().splitlines() == [
        f"INFO {logger.name}: reboot slot granted NODE=n1 SLOT=0",
        f'WARNING {logger.name}: drain blocked POD=ns/web-0 WHY="PDB web allows 0"',
    ]


def test_stderr_keeps_the_traceback_after_the_fields(logger):
    stream = io.StringIO()
    setup_logging(logger=logger, use_journal=False, stream=stream)

    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("step failed", extra={"STEP": "cordon"})

    lines = stream.getvalue().splitlines()
    assert lines[0] == f"ERROR {logger.name}: step failed STEP=cordon"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"


def test_stderr_output_redacts_bearer_tokens_in_messages_args_and_fields(logger):
    stream = io.StringIO()
    setup_logging(logger=logger, use_journal=False, stream=stream)

    logger.warning("request failed: %s", f"Authorization: Bearer {OPAQUE_TOKEN}")
    logger.warning("request failed", extra={"HEADER": f"bearer {TOKEN}"})

    output = stream.getvalue()
    assert OPAQUE_TOKEN not in output
    assert TOKEN not in output
    assert output.splitlines() == [
        f"WARNING {logger.name}: request failed: Authorization: Bearer <redacted>",
        f'WARNING {logger.name}: request failed HEADER="bearer <redacted>"',
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Bearer {OPAQUE_TOKEN}", "Bearer <redacted>"),
        (f"x BEARER  {OPAQUE_TOKEN} y", "x BEARER <redacted> y"),
        (f"token={TOKEN}", "token=<redacted>"),
        ("Bearer", "Bearer"),
        ("node n1 drained", "node n1 drained"),
    ],
)
def test_redact(text, expected):
    assert redact(text) == expected


def test_redaction_filter_is_idempotent():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "got %s", (f"Bearer {TOKEN}",), None)
    redactor = RedactSecrets()

    assert redactor.filter(record)
    assert redactor.filter(record)

    assert record.getMessage() == "got Bearer <redacted>"


def test_journal_is_used_when_stderr_is_the_journal_stream(tmp_path: Path, logger):
    with (tmp_path / "stream").open("w") as stream:
        info = os.fstat(stream.fileno())
        journal_env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}

        on_journal = setup_logging(logger=logger, env=journal_env, stream=stream)
        assert isinstance(on_journal, journal.JournalHandler)

        elsewhere = setup_logging(logger=logger, env={"JOURNAL_STREAM": "1:2"}, stream=stream)
        assert isinstance(elsewhere, logging.StreamHandler)

        unset = setup_logging(logger=logger, env={}, stream=stream)
        assert isinstance(unset, logging.StreamHandler)

        forced = setup_logging(logger=logger, env={}, stream=stream, use_journal=True)
        assert isinstance(forced, journal.JournalHandler)

    # Each call replaced the handler installed before it (pytest adds handlers of its own).
    installed = [on_journal, elsewhere, unset, forced]
    assert [handler for handler in installed if handler in logger.handlers] == [forced]


def test_a_stream_without_a_file_descriptor_is_not_the_journal(logger):
    handler = setup_logging(logger=logger, env={"JOURNAL_STREAM": "1:2"}, stream=io.StringIO())

    assert not isinstance(handler, journal.JournalHandler)
