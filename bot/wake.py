"""The wake socket: how the command line tells a running `kugetsu serve` to look at the
queue now, instead of at its next poll.

`kugetsu serve` listens on a Unix socket in the data directory (`wake.sock`); `enqueue`,
`queue cancel` and `queue retry` connect to it after changing the queue, and the
connection is the whole message: the receiver wakes its worker. Whoever may connect is
whoever may write the data directory (0700, kugetsu's user), so no secret is needed and a
shell without the webhook secret wakes the server as well. A connection can cause one
extra tick and nothing else.

A socket's path is limited to 107 bytes; a longer one is reached through the directory's
descriptor (`/proc/self/fd/N/wake.sock`), which Linux resolves like the real path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_NAME = "wake.sock"
#: how long the command line waits for the server to take the connection
SEND_TIMEOUT_SECONDS = 2.0
#: the longest path a Unix socket address holds (sun_path, less its final NUL)
_MAX_SOCKET_PATH = 107


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


@contextlib.contextmanager
def _address(data_dir: Path) -> Iterator[str]:
    """The address of the socket in `data_dir`, short enough to bind or connect to."""
    path = os.fspath(socket_path(data_dir))
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        yield path
        return
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)


def send(data_dir: Path) -> bool:
    """Wake the `kugetsu serve` that uses `data_dir`. False if none answers."""
    try:
        with _address(data_dir) as address, socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(SEND_TIMEOUT_SECONDS)
            sock.connect(address)
            return True
    except OSError:
        return False


class Listener:
    """Accepts connections on the wake socket and calls `on_wake` for each, on a thread
    of its own, until `close()`."""

    def __init__(self, data_dir: Path, on_wake: Callable[[], None]):
        self.data_dir, self.on_wake = data_dir, on_wake
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Listener:
        """Listen, unless another live server holds the socket (then the command line
        wakes that one, and this one finds the work at its next poll)."""
        path = socket_path(self.data_dir)
        if send(self.data_dir):
            log.warning("another kugetsu serve answers on the wake socket", extra={"path": path})
            return self
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # left by a server that is gone
        sock = socket.socket(socket.AF_UNIX)
        try:
            with _address(self.data_dir) as address:
                sock.bind(address)
            sock.listen(16)
            self._inode = os.lstat(path).st_ino
        except OSError as exc:
            sock.close()
            log.warning(
                "cannot listen on the wake socket; the command line cannot wake this server",
                extra={"path": path, "error": str(exc)},
            )
            return self
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="wake-socket", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                conn, _ = sock.accept()
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ECONNABORTED):
                    continue
                return  # closed
            conn.close()
            self.on_wake()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        if self._thread is not None:
            self._thread.join(5)
        path = socket_path(self.data_dir)
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ino == self._inode:
                os.unlink(path)
