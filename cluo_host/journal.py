"""Logging to journald (``journalctl -u cluo-agent NODE=n1``), or to stderr elsewhere.

Log calls are constant messages plus UPPERCASE fields::

    log.info("reboot slot granted", extra={"NODE": node, "SLOT": slot})

Under systemd (stderr is the journal stream, ``JOURNAL_STREAM`` says so) the records go
through ``systemd.journal.JournalHandler`` and each field becomes a journal field. Anywhere
else a plain stderr handler appends the fields as ``KEY=value``.

Tokens are never logged on purpose; ``RedactSecrets`` is the safety net that blanks
anything looking like ``Bearer <token>`` or a bare JWT in messages, fields and tracebacks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from systemd import journal

JOURNAL_STREAM_ENV = "JOURNAL_STREAM"
DEFAULT_IDENTIFIER = "cluo-agent"

# A journal field name: uppercase letters, digits and underscores, not starting with a digit
# or an underscore (those are trusted fields journald sets itself).
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]+=*")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
REDACTED = "<redacted>"

# Marks the handler setup_logging installed, so calling it again replaces it.
_OURS = "_cluo_handler"

JournalSender = Callable[..., Any]


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


def journal_handler(identifier: str, *, sender: JournalSender | None = None) -> logging.Handler:
    """A ``JournalHandler`` tagged ``SYSLOG_IDENTIFIER=identifier`` with redaction.

    ``sender`` replaces ``systemd.journal.send`` (tests capture the fields with it).
    """
    handler = journal.JournalHandler(
        sender_function=sender if sender is not None else journal.send,
        SYSLOG_IDENTIFIER=identifier,
    )
    handler.addFilter(RedactSecrets())
    return handler  # type: ignore[no-any-return]


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
            # JournalHandler would also send str(exc_info), unredacted.
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
