"""Logging for operators: one handler on stderr, every record redacted.

Messages are constant; the context (task, repo, issue, delivery, ...) goes in
`extra={...}` fields, which the text format appends as key=value.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from bot.redact import redact


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
}


class ContextFormatter(logging.Formatter):
    """Constant messages with their context fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in sorted(extras.items()))
        return base


def configure_logging(level: str, secrets: Iterable[str]) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("waitress").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
