"""A task's agent log, wherever it was written.

The runner writes the log to a file in its node's data directory (process.AgentProcess,
secrets masked as it is written). Where several machines share the database
(PostgreSQL), the runner also ships the file to the database in chunks as it grows
(`LogShipper`), and every reader (`kugetsu logs`, the signed log link, the failed
task's comment, the dashboard's log view and live log) reads the shipped log first
(`read`, `size`, `tail`, `response`), a part at a time where the log may be large. The
database was chosen over workers serving their own logs: a receiver behind a load
balancer then needs no route to each worker, a worker's log outlives the worker (after a
kill -9, the log of the attempt that died is what explains it), and the database is
already the one thing every node reaches. The cost is bounded by `agents.log_max_bytes`
per attempt, and a task's chunks go with the task when it is cleared. On SQLite, one
machine, the file is read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from flask import Response, send_file

from bot.config import Config
from bot.store import DATABASE_ERRORS, Store

log = logging.getLogger(__name__)

#: the most of a log shipped in one write
CHUNK_BYTES = 256 * 1024
#: what keeps a chunk from being shipped now (it is shipped at the next call)
SHIP_ERRORS: tuple[type[Exception], ...] = (OSError, *DATABASE_ERRORS)


class LogShipper:
    """Ships what an attempt adds to its task's log file: the bytes written from now
    on, after what the database already holds of the task (earlier attempts, maybe on
    other machines)."""

    def __init__(self, store: Store, task_id: int, path: Path):
        self.store, self.task_id, self.path = store, task_id, path
        try:
            self.local_at = path.stat().st_size
        except OSError:
            self.local_at = 0
        self.db_at = store.log_size(task_id)

    def ship(self) -> None:
        """Ship what was written since the last call; a failure is logged and the bytes
        are shipped at the next call."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.local_at)
                while data := fh.read(CHUNK_BYTES):
                    self.store.append_log(self.task_id, self.db_at, data)
                    self.local_at += len(data)
                    self.db_at += len(data)
        except FileNotFoundError:
            return
        except SHIP_ERRORS as exc:
            log.warning("log not shipped", extra={"task": self.task_id, "error": str(exc)})


def read(
    config: Config, store: Store, task_id: int, from_byte: int = 0, limit: int | None = None
) -> bytes | None:
    """A task's log from byte `from_byte` on, at most `limit` bytes of it (all without);
    None if it has none. The shipped log where the database is shared, else (or if none
    was shipped) this node's file."""
    if store.SHARED:
        shipped = store.read_log(task_id, from_byte, limit)
        if shipped is not None:
            return shipped
    try:
        with config.storage.log_path(task_id).open("rb") as fh:
            fh.seek(from_byte)
            return fh.read(-1 if limit is None else limit)
    except FileNotFoundError:
        return None


def size(config: Config, store: Store, task_id: int) -> int | None:
    """How many bytes long a task's log is, where `read` reads it; None if it has none."""
    if store.SHARED:
        shipped = store.log_size(task_id)
        if shipped:
            return shipped
    try:
        return config.storage.log_path(task_id).stat().st_size
    except OSError:
        return None


def local_file(config: Config, store: Store, task_id: int) -> Path | None:
    """This node's file of a task's log when it is what `read` reads (nothing of it was
    shipped), else None."""
    if store.SHARED and store.log_size(task_id):
        return None
    path = config.storage.log_path(task_id)
    return path if path.is_file() else None


def response(
    config: Config, store: Store, task_id: int, download_name: str | None = None
) -> Response | None:
    """The whole log as an answer, never read whole: this node's file sent by the server
    as the client reads it (no thread held while it is sent), or the shipped log a part
    at a time; None if the task has no log."""
    path = local_file(config, store, task_id)
    if path is not None:
        return send_file(
            path,
            mimetype="text/plain",
            conditional=False,
            etag=False,
            download_name=download_name,
        )
    if size(config, store, task_id) is None:
        return None
    answer = Response(parts(config, store, task_id), mimetype="text/plain")
    if download_name:
        answer.headers["Content-Disposition"] = f"inline; filename={download_name}"
    return answer


def parts(config: Config, store: Store, task_id: int) -> Iterator[bytes]:
    """A task's whole log, CHUNK_BYTES at a time, as `read` reads it."""
    at = 0
    while data := read(config, store, task_id, at, CHUNK_BYTES):
        yield data
        at += len(data)


def tail(config: Config, store: Store, task_id: int, size: int) -> bytes:
    """The last `size` bytes of a task's log (empty if it has none)."""
    if store.SHARED:
        end = store.log_size(task_id)
        if end:
            return store.read_log(task_id, max(0, end - size)) or b""
    try:
        with config.storage.log_path(task_id).open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - size))
            return fh.read()
    except OSError:
        return b""
