"""Keeps secrets out of everything kugetsu writes: logs, comments, PR bodies, errors.

One set of rules, `redact()`, for every text kugetsu writes out: the configured secrets
(the Gitea token, the webhook secret), the value of an `Authorization:` header, and the
credentials of a URL (`https://user:pass@host`), each replaced by `MASK`. A secret
shorter than MIN_SECRET_LENGTH is left alone: it would mask ordinary text. An agent's
output, which arrives in pieces, goes through `StreamRedactor`, which masks the secrets
even when one is split between two pieces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "[redacted]"
MIN_SECRET_LENGTH = 4

_AUTH_HEADER_RE = re.compile(r"(?i)(authorization:\s*)\S[^\r\n]*")
_URL_USERINFO_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def _maskable(secrets: Iterable[str]) -> tuple[str, ...]:
    """The secrets that are masked, longest first (so that a secret holding another one
    is masked whole); shorter ones would mask ordinary text."""
    return tuple(
        sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
    )


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret, Authorization header value and URL credential masked."""
    for secret in _maskable(secrets):
        if secret in text:
            text = text.replace(secret, MASK)
    text = _AUTH_HEADER_RE.sub(rf"\1{MASK}", text)
    if "://" in text:
        text = _URL_USERINFO_RE.sub(rf"\1{MASK}@", text)
    return text


def _redact_bytes(data: bytes, needles: Iterable[bytes]) -> bytes:
    for needle in needles:
        if needle in data:
            data = data.replace(needle, MASK.encode())
    return data


class StreamRedactor:
    """The secrets of `redact` masked in bytes that arrive in pieces (an agent's output on
    its way to the log).

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
        text = _redact_bytes(self._held + data, self._needles)
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
