"""Logging to journald (``journalctl -u cluo-agent NODE=n1``), or to stderr elsewhere.

Log calls are constant messages plus UPPERCASE fields::

    log.info("reboot slot granted", extra={"NODE": node, "SLOT": slot})

Under systemd (stderr is the journal stream, ``JOURNAL_STREAM`` says so) each record is one
journal entry, sent in journald's native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL) to
``/run/systemd/journal/socket``, and each field becomes a journal field. Anywhere else a
plain stderr handler appends the fields as ``KEY=value``.

The protocol is written here rather than through systemd-python's ``JournalHandler``,
which costs the agent libsystemd and its libraries (docs/decisions.md); the fields are
the ones that handler sent.

Tokens are never logged on purpose; ``RedactSecrets`` is the safety net that blanks
anything looking like ``Bearer <token>`` or a bare JWT in messages, fields and tracebacks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from typing import TextIO

JOURNAL_STREAM_ENV = "JOURNAL_STREAM"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
DEFAULT_IDENTIFIER = "cluo-agent"

# A journal field name: uppercase letters, digits and underscores, not starting with a digit
# or an underscore (those are trusted fields journald sets itself).
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]+=*")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
REDACTED = "<redacted>"

# Marks the handler setup_logging installed, so calling it again replaces it.
_OURS = "_cluo_handler"

# syslog priorities (journald's PRIORITY field) of the logging levels: a level up to and
# including DEBUG is 7 (debug), up to INFO 6 (info), up to WARNING 4 (warning), ...
LOG_DEBUG = 7
_PRIORITIES = ((logging.CRITICAL + 1, 1), (logging.ERROR + 1, 2), (logging.WARNING + 1, 3),
               (logging.INFO + 1, 4), (logging.DEBUG + 1, 6))
# What journald requires of a memfd it is handed: nothing can change its contents any more.
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def setup_logging(
    identifier: str = DEFAULT_IDENTIFIER,
    level: int = logging.INFO,
    *,
    use_journal: bool | None = None,
    env: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    logger: logging.Logger | None = None,
) -> logging.Handler:
    """Send ``logger``'s records (the root logger's by default) to journald or ``stream``.

    ``use_journal`` None means: journald when ``stream`` (stderr by default) is the journal
    stream named by ``JOURNAL_STREAM`` in ``env`` (``os.environ`` by default). Returns the
    installed handler; calling again replaces it.
    """
    target = logger if logger is not None else logging.getLogger()
    output = stream if stream is not None else sys.stderr
    if use_journal is None:
        use_journal = is_journal_stream(output, os.environ if env is None else env)
    handler = journal_handler(identifier) if use_journal else stderr_handler(output)
    setattr(handler, _OURS, True)
    for old in [h for h in target.handlers if getattr(h, _OURS, False)]:
        target.removeHandler(old)
        old.close()
    target.addHandler(handler)
    target.setLevel(level)
    return handler


def journal_handler(identifier: str, *, socket_path: str = JOURNAL_SOCKET) -> logging.Handler:
    """A ``JournalHandler`` tagged ``SYSLOG_IDENTIFIER=identifier``, with redaction."""
    handler = JournalHandler(identifier, socket_path)
    handler.addFilter(RedactSecrets())
    return handler


class JournalHandler(logging.Handler):
    """Each record as one journal entry: ``MESSAGE`` (with the traceback, if any),
    ``PRIORITY``, ``SYSLOG_IDENTIFIER``, ``LOGGER``, ``THREAD_NAME``, ``PROCESS_NAME``,
    ``CODE_FILE``, ``CODE_LINE``, ``CODE_FUNC``, ``EXCEPTION_TEXT`` when there is a
    traceback, then the record's UPPERCASE fields (a field named like one before it is
    left out). A failed send goes to ``handleError``, as any handler's would.
    """

    def __init__(self, identifier: str, socket_path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.socket_path = socket_path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            send_entry(self._socket, self.socket_path, encode_entry(self.fields(record)))
        except Exception:
            self.handleError(record)

    def fields(self, record: logging.LogRecord) -> dict[str, object]:
        fields: dict[str, object] = {
            "MESSAGE": self.format(record),
            "PRIORITY": priority(record.levelno),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "THREAD_NAME": record.threadName,
            "PROCESS_NAME": record.processName,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        if record.exc_text:
            fields["EXCEPTION_TEXT"] = record.exc_text
        for key, value in fields_of(record).items():
            fields.setdefault(key, value)
        return fields

    def close(self) -> None:
        self._socket.close()
        super().close()


def priority(levelno: int) -> int:
    """The syslog priority journald files a record of this logging level under."""
    return next((value for limit, value in _PRIORITIES if levelno >= limit), LOG_DEBUG)


def encode_entry(fields: Mapping[str, object]) -> bytes:
    """One journal entry in the native protocol: ``KEY=value\\n`` per field, or, for a
    value with a newline, ``KEY\\n``, its length as 64-bit little-endian, the value and
    ``\\n``. Strings are sent as UTF-8, bytes as they are, anything else as ``str()``."""
    parts: list[bytes] = []
    for key, value in fields.items():
        data = value if isinstance(value, bytes) else str(value).encode(errors="replace")
        if b"\n" in data:
            parts += [key.encode(), b"\n", struct.pack("<Q", len(data)), data, b"\n"]
        else:
            parts += [key.encode(), b"=", data, b"\n"]
    return b"".join(parts)


def send_entry(sock: socket.socket, path: str, entry: bytes) -> None:
    """Send ``entry`` to journald at ``path``: as one datagram, or, when it is too big for
    one, in a sealed memfd passed along an empty datagram (as sd_journal_sendv does)."""
    try:
        sock.sendto(entry, path)
        return
    except OSError as err:
        if err.errno != errno.EMSGSIZE:
            raise
    memfd = os.memfd_create("cluo-journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with open(memfd, "wb", closefd=False) as file:
            file.write(entry)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
        rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", memfd))
        sock.sendmsg([], [rights], 0, path)
    finally:
        os.close(memfd)


def stderr_handler(stream: TextIO) -> logging.Handler:
    """``LEVEL logger: message KEY=value ...`` lines on ``stream``, with redaction."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(FieldsFormatter())
    handler.addFilter(RedactSecrets())
    return handler


def is_journal_stream(stream: TextIO, env: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journal stream systemd named in ``JOURNAL_STREAM``."""
    expected = env.get(JOURNAL_STREAM_ENV, "")
    if not expected:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):  # ValueError: io.UnsupportedOperation, closed stream
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def fields_of(record: logging.LogRecord) -> dict[str, object]:
    """The record's journal fields: its UPPERCASE attributes (from ``extra=``), in order."""
    return {key: value for key, value in vars(record).items() if _FIELD_NAME.fullmatch(key)}


class FieldsFormatter(logging.Formatter):
    """``LEVEL logger: message KEY=value ...``; values with spaces or quotes are quoted.

    No timestamp: journald or the caller's terminal adds one.
    """

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{key}={_quote(value)}" for key, value in fields_of(record).items())
        if not fields:
            return text
        first, newline, rest = text.partition("\n")  # keep a traceback after the fields
        return f"{first} {fields}{newline}{rest}"


class RedactSecrets(logging.Filter):
    """Blank bearer tokens and JWTs in the message, the fields and the traceback.

    It rewrites the record (message merged with its args, traceback rendered into
    ``exc_text``), so every handler after it sees the redacted text. A handler filter, not
    a logger filter: logger filters do not see records propagated from child loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        for key, value in fields_of(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value))
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            # Handlers would render exc_info again, unredacted.
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def redact(text: str) -> str:
    """``text`` with bearer tokens and JWTs replaced by ``<redacted>``."""
    return _JWT.sub(REDACTED, _BEARER.sub(rf"\1 {REDACTED}", text))


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(ch.isspace() or ch in "\"'=" for ch in text):
        return text
    return json.dumps(text, ensure_ascii=False)
