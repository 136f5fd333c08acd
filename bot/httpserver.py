"""The production WSGI server (waitress), started and stopped from code."""

from __future__ import annotations

import errno
import gc
import logging
import resource
import sys
import threading
from typing import Any
from wsgiref.types import WSGIApplication

from waitress.server import create_server

log = logging.getLogger(__name__)

#: how long a thread may hold the GIL while another waits for it (Python's default: 5 ms)
SWITCH_INTERVAL_SECONDS = 0.0005

# Connections. Any client can open a connection without authenticating, and waitress
# stops accepting once it holds `connection_limit` of them (its default: 100); the
# connections after that wait in the kernel's queue until maintenance, every
# `cleanup_interval` seconds, closes one idle for `channel_timeout` seconds. With
# waitress's defaults, 100 connections that sent nothing held every valid delivery for
# up to a minute, past Gitea's 5 s. An idle or half-sent connection costs waitress no
# thread (it buffers a request until it is whole) and a few KiB, so the limit is set
# high; each pass of the socket loop costs about 2 microseconds per open connection
# (bench/slow_clients.py). Past the limit, a reverse proxy in front is the defence
# (README, "When the port faces the internet").
#: open connections waitress accepts at most (fewer if the file descriptor limit is lower)
CONNECTION_LIMIT = 4000
#: file descriptors the receiver needs besides its connections (database, logs, pipes)
FD_RESERVE = 128
#: a connection that has sent nothing for this long is closed, half a request or not
CHANNEL_TIMEOUT_SECONDS = 10
#: how often idle connections are looked for
CLEANUP_INTERVAL_SECONDS = 1


def raise_fd_limit(need: int = CONNECTION_LIMIT + FD_RESERVE) -> int | None:
    """Raise this process's soft limit of open files toward `need` (never above the hard
    limit, never lower). Returns the soft limit it replaced, None if it left it.

    Child processes should get the old one back: the soft limit is low by default
    because programs that use select() break on higher descriptor numbers, so only the
    receiver, which holds the connections, keeps more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    log.info("open file limit raised", extra={"from": soft, "to": target, "hard": hard})
    return soft


def connection_limit() -> int:
    """CONNECTION_LIMIT, or fewer when the open file limit leaves less room."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return CONNECTION_LIMIT
    return max(1, min(CONNECTION_LIMIT, soft - FD_RESERVE))


def prepare_interpreter() -> None:
    """Process-wide settings for a process whose job is answering requests quickly.

    Call once, after start-up and before serving.

    - Garbage collection: a full collection walks every tracked object, Flask, werkzeug
      and all other modules loaded at start-up included. Under load it ran about every
      ten seconds and held the interpreter, and so every request in flight, for about
      20 ms. `gc.freeze()` moves what exists now out of the collector's sight; later
      collections only walk what requests leave behind.
    - GIL switch interval: waitress hands each request from its socket thread to a
      worker thread. When two requests overlap, a thread that wants the GIL waits up to
      the switch interval for the one running Python code. 0.5 ms instead of 5 ms
      shortens those waits.
    """
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


class HttpServer:
    """Serves a WSGI app on a background thread; `port=0` picks a free port."""

    def __init__(
        self,
        app: WSGIApplication,
        host: str,
        port: int,
        *,
        threads: int = 8,
        max_body_bytes: int = 5 * 1024 * 1024,
    ):
        self.app, self.host, self.requested_port = app, host, port
        self.threads, self.max_body_bytes = threads, max_body_bytes
        self._server: Any = None  # waitress's server, once started
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.effective_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HttpServer:
        # The body limit is enforced again by Flask; here it stops waitress from
        # buffering an oversized body at all.
        limit = connection_limit()
        if limit < CONNECTION_LIMIT:
            log.warning(
                "open file limit caps the connections",
                extra={"connection_limit": limit, "wanted": CONNECTION_LIMIT},
            )
        try:
            self._server = self._create(limit)
        except OSError as exc:
            # one line that names what to change: `address already in use` alone does not
            what = (
                "is already in use (another kugetsu, or another program, listens there)"
                if exc.errno == errno.EADDRINUSE
                else f"cannot be listened on: {exc.strerror or exc}"
            )
            raise OSError(
                exc.errno,
                f"{self.host}:{self.requested_port} {what}; choose another with "
                "server.host and server.port",
            ) from None
        # Each answer leaves from the thread that made it: waitress 3 flushes as soon as
        # one byte is buffered (its deprecated `send_bytes`, default 1), so a small answer
        # never waits for the socket thread to wake up. Not set here: setting it only
        # warns, and a later waitress may drop it.
        self._thread = threading.Thread(
            target=self._run, args=(self._server,), name="http", daemon=True
        )
        self._thread.start()
        log.info(
            "listening", extra={"host": self.host, "port": self.port, "connection_limit": limit}
        )
        return self

    def _create(self, limit: int) -> Any:
        return create_server(
            self.app,
            host=self.host,
            port=self.requested_port,
            threads=self.threads,
            max_request_body_size=self.max_body_bytes + 1,
            ident="kugetsu",
            clear_untrusted_proxy_headers=True,
            connection_limit=limit,
            channel_timeout=CHANNEL_TIMEOUT_SECONDS,
            cleanup_interval=CLEANUP_INTERVAL_SECONDS,
            asyncore_loop_timeout=0.2,
        )

    def _run(self, server: Any) -> None:
        # waitress's own run() loops until the socket map is empty; closing its
        # sockets from another thread races with select(). Loop here instead and
        # close on this thread once asked to stop.
        while not self._stopping.is_set():
            server.asyncore.loop(timeout=0.2, map=server._map, use_poll=True, count=1)
        server.close()
        for channel in list(server._map.values()):
            channel.close()
        server.task_dispatcher.shutdown(timeout=5)

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is None:
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None
