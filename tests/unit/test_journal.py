"""Logging setup: journal fields, the stderr format, journald detection and token redaction.

The journal tests send to a real unix datagram socket standing in for journald's and parse
what arrives as systemd.io/JOURNAL_NATIVE_PROTOCOL defines it: ``KEY=value`` lines, or for
a value with a newline ``KEY``, newline, the value's length as a 64-bit little-endian
integer, the value, newline; an entry too big for a datagram comes as an empty datagram
carrying a sealed memfd (SCM_RIGHTS) that holds it.
"""

from __future__ import annotations

import array
import fcntl
import io
import logging
import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluo_host.journal import (
    FieldsFormatter,
    JournalHandler,
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


class Journald:
    """A datagram socket where journald's would be; keeps each entry's fields (a list of
    values per name, as the journal allows repeats) and how it came (datagram or memfd)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(5)

    def receive(self) -> tuple[dict[str, list[bytes]], str]:
        fds = array.array("i")
        data, ancillary, _, _ = self.socket.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if not fds:
            return parse_entry(data), "datagram"
        (memfd,) = fds
        try:
            assert data == b""
            seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
            size = os.fstat(memfd).st_size
            return parse_entry(os.pread(memfd, size, 0)), "memfd"
        finally:
            os.close(memfd)

    def entry(self) -> dict[str, str]:
        """The next entry, each field's one value as text."""
        fields, _ = self.receive()
        assert all(len(values) == 1 for values in fields.values()), fields
        return {key: values[0].decode() for key, values in fields.items()}

    def close(self) -> None:
        self.socket.close()


def parse_entry(data: bytes) -> dict[str, list[bytes]]:
    fields: dict[str, list[bytes]] = {}
    at = 0
    while at < len(data):
        end = data.index(b"\n", at)
        line = data[at:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            at = end + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 1 + 8
            value = data[start:start + size]
            assert data[start + size:start + size + 1] == b"\n", "no newline after a binary field"
            at = start + size + 1
        fields.setdefault(key.decode(), []).append(value)
    return fields


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[Journald]:
    receiver = Journald(tmp_path / "journal.socket")
    yield receiver
    receiver.close()


def test_extra_fields_become_journal_fields(logger, journald):
    logger.addHandler(journal_handler("cluo-agent", socket_path=journald.path))
    logger.setLevel(logging.DEBUG)

    logger.info("reboot slot granted", extra={"NODE": "n1", "SLOT": 0})
    logger.warning("drain timed out", extra={"NODE": "n2"})
    logger.debug("looked again")

    first, second, third = journald.entry(), journald.entry(), journald.entry()
    assert first["MESSAGE"] == "reboot slot granted"
    assert first["NODE"] == "n1"
    assert first["SLOT"] == "0"
    assert first["SYSLOG_IDENTIFIER"] == "cluo-agent"
    assert first["PRIORITY"] == "6"
    assert first["LOGGER"] == logger.name
    assert first["CODE_FUNC"] == "test_extra_fields_become_journal_fields"
    assert first["CODE_FILE"] == __file__
    assert int(first["CODE_LINE"]) > 0
    assert first["THREAD_NAME"] == "MainThread"
    assert "PROCESS_NAME" in first
    assert second["PRIORITY"] == "4"
    assert third["PRIORITY"] == "7"
    assert "SLOT" not in second
    # Only journal field names: no lowercase record attributes, nothing starting with "_".
    assert all(key.isupper() and not key.startswith("_") for key in first)


@pytest.mark.parametrize(("level", "priority"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.INFO + 1, 4), (logging.WARNING, 4),
    (logging.ERROR, 3), (logging.CRITICAL, 2), (logging.CRITICAL + 1, 1),
])
def test_priority_is_syslog_s_for_the_level(logger, journald, level, priority):
    logger.addHandler(journal_handler("cluo-agent", socket_path=journald.path))
    logger.setLevel(logging.DEBUG)

    logger.log(level, "something")

    assert journald.entry()["PRIORITY"] == str(priority)


def test_values_with_newlines_are_sent_length_prefixed(logger, journald):
    logger.addHandler(journal_handler("cluo-agent", socket_path=journald.path))

    logger.warning("two\nlines", extra={"DETAIL": "a=b\nc", "EMPTY": ""})

    data, _, _, _ = journald.socket.recvmsg(1 << 16)
    assert b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n" in data
    entry = parse_entry(data)
    assert entry["DETAIL"] == [b"a=b\nc"]
    assert entry["EMPTY"] == [b""]


def test_an_entry_too_big_for_a_datagram_comes_in_a_sealed_memfd(logger, journald):
    logger.addHandler(journal_handler("cluo-agent", socket_path=journald.path))
    logger.setLevel(logging.INFO)
    big = "x" * 300_000 + "\n" + "y" * 800_000  # past the default 208 KiB send buffer

    logger.warning("drain failed", extra={"DETAIL": big, "NODE": "n1"})
    logger.info("after it")

    fields, how = journald.receive()
    assert how == "memfd"
    assert fields["DETAIL"] == [big.encode()]
    assert fields["NODE"] == [b"n1"]
    assert fields["MESSAGE"] == [b"drain failed"]
    assert journald.entry()["MESSAGE"] == "after it"


def test_a_field_named_like_a_standard_one_does_not_repeat_it(logger, journald):
    logger.addHandler(journal_handler("cluo-agent", socket_path=journald.path))

    logger.warning("hello", extra={"PRIORITY": "0", "NODE": "n1"})

    fields, _ = journald.receive()
    assert fields["PRIORITY"] == [b"4"]
    assert fields["NODE"] == [b"n1"]


def test_journal_entries_carry_no_token_and_no_raw_exception(logger, journald):
    logger.addHandler(journal_handler("cluo-agent", socket_path=journald.path))

    try:
        raise RuntimeError(f"401 with Authorization: Bearer {OPAQUE_TOKEN}")
    except RuntimeError:
        logger.exception("patching node failed", extra={"DETAIL": f"token {TOKEN}"})

    entry = journald.entry()
    sent = repr(entry)
    assert OPAQUE_TOKEN not in sent
    assert TOKEN not in sent
    assert "Bearer <redacted>" in entry["EXCEPTION_TEXT"]
    assert "RuntimeError" in entry["EXCEPTION_TEXT"]
    assert entry["MESSAGE"].startswith("patching node failed\nTraceback")
    assert entry["DETAIL"] == "token <redacted>"
    assert entry["PRIORITY"] == "3"
    assert "EXCEPTION_INFO" not in entry


def test_without_journald_a_record_goes_to_handle_error(logger, tmp_path, monkeypatch):
    failed: list[logging.LogRecord] = []
    handler = journal_handler("cluo-agent", socket_path=str(tmp_path / "no-socket"))
    monkeypatch.setattr(handler, "handleError", failed.append)
    logger.addHandler(handler)

    logger.warning("nobody listens")

    assert [record.getMessage() for record in failed] == ["nobody listens"]


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
        assert isinstance(on_journal, JournalHandler)

        elsewhere = setup_logging(logger=logger, env={"JOURNAL_STREAM": "1:2"}, stream=stream)
        assert isinstance(elsewhere, logging.StreamHandler)

        unset = setup_logging(logger=logger, env={}, stream=stream)
        assert isinstance(unset, logging.StreamHandler)

        forced = setup_logging(logger=logger, env={}, stream=stream, use_journal=True)
        assert isinstance(forced, JournalHandler)

    # Each call replaced the handler installed before it (pytest adds handlers of its own).
    installed = [on_journal, elsewhere, unset, forced]
    assert [handler for handler in installed if handler in logger.handlers] == [forced]


def test_a_stream_without_a_file_descriptor_is_not_the_journal(logger):
    handler = setup_logging(logger=logger, env={"JOURNAL_STREAM": "1:2"}, stream=io.StringIO())

    assert not isinstance(handler, JournalHandler)
