"""Logging for operators: one handler on stderr, every record redacted.

Messages are constant; the context (task, repo, issue, delivery, ...) goes in
`extra={...}` fields. `[logging] format` chooses how a record is written:

- "text" (the default): `time LEVEL logger: message key=value ...`;
- "json": one JSON object per line, `time`, `level`, `logger` and `message` with the
  context fields beside them (and `exception` with its traceback, if any).

`context(...)` adds fields to every record logged meanwhile on the same thread (the
runner sets the task, repo and issue for everything its attempt logs; the receiver the
delivery id), so a line from git or the Gitea client says which task it served. The
redacting filter applies to both formats, to the message and to every text field.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from bot.redact import redact

#: the formats `[logging] format` may name
FORMATS = ("text", "json")
#: the levels `[logging] level` and `--log-level` may name
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "kugetsu_log_context", default=MappingProxyType({})
)


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Add `fields` to every record logged on this thread until the block ends."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the fields of `context()` on each record (a field the call set itself wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class RedactingFilter(logging.Filter):
    """Applied to log handlers: formats the record's message, then redacts it and every
    text field of the record (`bot.redact.redact`)."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        for key, value in list(record.__dict__.items()):
            if isinstance(value, str) and key not in ("msg", "message"):
                cleaned = redact(value, self.secrets)
                if cleaned != value:
                    setattr(record, key, cleaned)
        return True


_STANDARD = set(logging.LogRecord("x", 0, "x", 0, "x", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The context fields of a record: what `extra=` and `context()` put on it."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class ContextFormatter(logging.Formatter):
    """Constant messages with their context fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = _fields(record)
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in sorted(extras.items()))
        return base


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "time": f"{created}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str, secrets: Iterable[str], *, output: str = "text") -> None:
    """Send every record of `level` and above to stderr, redacted, as `output` (FORMATS)."""
    handler = logging.StreamHandler()
    if output == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("waitress").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
