"""Keeps secrets out of everything kugetsu writes: logs, comments, PR bodies, errors."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import AnyStr

MASK = "[redacted]"


def _maskable(secrets: Iterable[str]) -> tuple[str, ...]:
    """The secrets that are masked: shorter ones would mask ordinary text."""
    return tuple(s for s in secrets if s and len(s) >= 4)


def redact(text: AnyStr, secrets: Iterable[str]) -> AnyStr:
    """Every secret in `text` (str, or bytes such as an agent's raw output) masked."""
    for secret in _maskable(secrets):
        if isinstance(text, bytes):
            if secret.encode() in text:
                text = text.replace(secret.encode(), MASK.encode())
        elif secret in text:
            text = text.replace(secret, MASK)
    return text


class StreamRedactor:
    """`redact` for bytes that arrive in pieces (an agent's output on its way to the log).

    A secret may be split across two pieces, so the end of what `feed` was given is held
    back while it could be the start of a secret, and masked or let through with the next
    piece. Where the stream is cut (the log leaves out the middle of a flood), `cut` drops
    what was held back and `end_of_secret` tells how much of the piece after the gap could
    be the rest of a secret, so no part of one is written on either side of the gap.
    """

    def __init__(self, secrets: Iterable[str]):
        self.secrets = _maskable(secrets)
        self._needles = tuple(s.encode() for s in self.secrets)
        self._longest = max((len(n) for n in self._needles), default=0)
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """What can be written now of what came so far, secrets masked."""
        if not self._needles:
            return data
        text = redact(self._held + data, self.secrets)
        keep = self._start_of_secret(text)
        self._held = text[len(text) - keep :] if keep else b""
        return text[: len(text) - keep]

    def flush(self) -> bytes:
        """At the end of the stream: what was held back (it never became a secret)."""
        held, self._held = self._held, b""
        return held

    def cut(self) -> int:
        """The stream is cut here: forget what was held back; returns its length."""
        dropped, self._held = len(self._held), b""
        return dropped

    def end_of_secret(self, data: bytes) -> int:
        """How many bytes at the start of `data` could be the rest of a secret cut before."""
        for n in range(min(len(data), self._longest - 1), 0, -1):
            if any(needle.endswith(data[:n]) for needle in self._needles):
                return n
        return 0

    def _start_of_secret(self, data: bytes) -> int:
        for n in range(min(len(data), self._longest - 1), 0, -1):
            if any(needle.startswith(data[-n:]) for needle in self._needles):
                return n
        return 0


class RedactingFilter(logging.Filter):
    """Applied to log handlers: formats the record, then masks every secret in it."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
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
