"""An agent's log, live: server-sent events that follow it as it grows.

The log is read through `Size` and `Read`, which the dashboard takes from `bot.tasklog`:
this node's file, or where the database is shared the chunks a worker shipped, so a
task that runs on another machine is followed the same way. The log is append-only
while a task lives (`process.AgentProcess` opens it for appending, every attempt adds to
it, and a worker ships each byte once, at its offset), so a byte offset names a place in
it for good. Each event's
`id` is the offset just after the text it carries; a browser that reconnects sends the
last one back (`Last-Event-ID`) and the stream goes on from there, so nothing is lost or
shown twice. The stream reads at most CHUNK bytes at a time, and reads again at once
while it is behind, so it keeps up with an agent that prints fast and never holds more
than one chunk, whatever the size of the log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

#: `read(offset, limit)`: at most `limit` bytes of a log from byte `offset` (None: no log)
Read = Callable[[int, int], bytes | None]
#: how many bytes long a log is (None: it has none yet)
Size = Callable[[], int | None]

#: bytes read and sent per event at most
CHUNK = 64 * 1024
#: the page starts this far from the end of the log (earlier parts on request)
TAIL_BYTES = 128 * 1024
#: how often a stream at the end of the log looks for more
POLL_SECONDS = 0.5
#: how often it asks whether the task still runs
ACTIVE_SECONDS = 1.0
#: a comment line this often on a quiet stream: a browser that went away is found by the
#: write that fails (the server cannot see it otherwise), and its thread given back;
#: it also keeps proxies from closing a quiet stream
KEEPALIVE_SECONDS = 2.0
#: how long a browser waits before it reconnects (sent with every stream)
RETRY_MS = 2000


def utf8_cut(data: bytes) -> int:
    """How much of `data` is whole UTF-8 characters: a character cut at the end is left
    for the next read. Bytes that cannot be UTF-8 at all are not held back."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for its lead
            continue
        if byte & 0x80 == 0:  # ASCII
            return len(data)
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4
        if byte & 0xF8 == 0xF8:  # not a lead byte at all
            return len(data)
        return len(data) if back >= need else len(data) - back
    return len(data)


def start_offset(size: int | None, read: Read, tail: int = TAIL_BYTES) -> int:
    """Where a page starts showing a log `size` bytes long: the first whole line of its
    last `tail` bytes (0 for a shorter log or none)."""
    if not size or size <= tail:
        return 0
    data = read(size - tail, tail) or b""
    newline = data.find(b"\n")
    return size - tail + (newline + 1 if 0 <= newline < len(data) - 1 else 0)


def resume_offset(last_event_id: str | None, start: str | None) -> int:
    """Where a stream begins: after the last event the browser saw (`Last-Event-ID`,
    sent when it reconnects), else where the page asked (`?from=`), else 0. A value
    that is not a whole number of bytes counts as none."""
    for value in (last_event_id, start):
        if value is not None and value.strip().isdigit() and len(value.strip()) <= 18:
            return int(value)
    return 0


def event(name: str, data: object, offset: int | None = None) -> bytes:
    """One server-sent event. The data is JSON: a line break in it cannot end the event."""
    head = f"id: {offset}\n" if offset is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def read_slice(read: Read, end: int, size: int = TAIL_BYTES) -> tuple[int, str]:
    """(start, text) of the log before `end`: at most `size` bytes, from a line start
    (unless it is the beginning of the log)."""
    end = max(0, end)
    start = max(0, end - size)
    data = read(start, end - start)
    if data is None:
        return end, ""
    if start > 0:
        newline = data.find(b"\n")
        if 0 <= newline < len(data) - 1:
            data, start = data[newline + 1 :], start + newline + 1
    return start, data.decode("utf-8", "replace")


def follow(
    size: Size,
    read: Read,
    offset: int,
    *,
    active: Callable[[], bool],
    gone: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[bytes]:
    """The events of a log from byte `offset` on, as it grows, until the task is no longer
    active and everything was sent (then an `end` event), or until `gone()` says the
    browser went away. A log that became shorter than `offset` was removed or replaced:
    it is sent again from its beginning, after a `reset` event."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    last_check = last_sent = clock()
    still_active = True
    while True:
        data = b""
        end = size()
        if end is not None:
            if end < offset:
                offset = 0
                yield event("reset", {}, 0)
            if end > offset:
                data = read(offset, min(CHUNK, end - offset)) or b""
        if data:
            # while the agent prints, a character cut at the end waits for its rest
            cut = utf8_cut(data) if still_active else len(data)
            if cut:
                offset += cut
                yield event("log", data[:cut].decode("utf-8", "replace"), offset)
                last_sent = clock()
                continue  # behind: read again at once
        now = clock()
        if not still_active and not data:
            yield event("end", {}, offset)
            return
        if now - last_check >= ACTIVE_SECONDS:
            last_check = now
            # one more read after this answer: what was written before the task ended
            # is sent before `end`
            still_active = active()
            if not still_active:
                continue
        if gone():
            return
        if now - last_sent >= KEEPALIVE_SECONDS:
            last_sent = now
            yield b": keepalive\n\n"
        sleep(POLL_SECONDS)
