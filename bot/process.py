"""Spawn and supervise one agent process.

An agent runs in its own session (so its pid is also its process group id),
with stdin from /dev/null and stdout+stderr on one pipe. A reader thread
drains that pipe in fixed-size chunks, hands complete lines to a callback,
and writes a size-capped log with the secrets it is given masked as they are
written; whatever the agent prints, memory stays bounded.
Stopping an agent signals the whole group (SIGTERM, a grace period, SIGKILL),
so grandchildren that ignore SIGTERM or keep the pipe open are dealt with too.

How the process is started is one function (`Spawn`): by default `spawn_process`, a
child of this process in a session of its own, whose process group is what is stopped.
The sandbox (bot/sandbox.py) passes its own: the agent then runs as a slot's uid, and
every process of that uid is what is stopped.

Linux only: process identity and zombie detection read /proc.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from bot.priority import share_with_session
from bot.redact import StreamRedactor

logger = logging.getLogger(__name__)

#: bytes asked for per read of the output pipe
READ_CHUNK = 64 * 1024
#: a line longer than this (in characters) is passed to on_line in pieces
MAX_LINE_CHARS = 256 * 1024
#: start of the output kept in memory for output()
OUTPUT_HEAD_BYTES = 256 * 1024
#: end of the output kept in memory for output()
OUTPUT_TAIL_BYTES = 1024 * 1024

_POLL_INTERVAL = 0.05
#: how long the reader waits on the pipe before checking whether it was asked to stop
_READER_POLL_MS = 100
#: after being asked to stop, the reader reads at most this much more before giving up
_STOP_DRAIN_BYTES = 4 * 1024 * 1024
_READER_JOIN_TIMEOUT = 5.0
#: how long to wait for processes to disappear once SIGKILL was sent
_KILL_WAIT = 5.0


class AgentStartError(Exception):
    """The agent command could not be started (not found, not executable, bad cwd).
    `not_found`: the command itself is not there (not installed, or a wrong path)."""

    def __init__(self, message: str, *, not_found: bool = False):
        super().__init__(message)
        self.not_found = not_found


# ---------------------------------------------------------------------------
# process identity and process groups


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on, or None if there is no such process.

    The command name (field 2) may contain spaces and parentheses, so the
    line is split after the last ')'.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    end = raw.rfind(b")")
    if end < 0:
        return None
    return raw[end + 1 :].decode("ascii", "replace").split()


# offsets into _read_stat()'s list: field number minus 3
_STAT_STATE = 0
_STAT_PGRP = 2
_STAT_STARTTIME = 19

_boot_id: str | None = None


def _get_boot_id() -> str:
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                _boot_id = f.read().strip()
        except OSError:
            _boot_id = ""
    return _boot_id


_DEAD_STATES = ("Z", "X", "x")


def process_start_token(pid: int, *, exited_ok: bool = False) -> str | None:
    """An opaque token for the process now running as `pid`, or None if there is none.

    Built from the process's start time (field 22 of /proc/<pid>/stat, in
    clock ticks since boot) and the kernel's boot id, so a pid reused later,
    even after a reboot, yields a different token.

    A process that has exited and waits to be reaped (a zombie, state Z or X)
    is not running: None, so a worker killed with kill -9 counts as dead at
    once, not when its parent gets round to reaping it. With `exited_ok`, such
    a process gets its token too: it still holds its pid, so the token still
    tells it from a later process with the same pid (what kill_orphan asks).
    """
    if pid <= 0:
        return None
    fields = _read_stat(pid)
    if fields is None or len(fields) <= _STAT_STARTTIME:
        return None
    if not exited_ok and fields[_STAT_STATE] in _DEAD_STATES:
        return None
    starttime = fields[_STAT_STARTTIME]
    boot_id = _get_boot_id()
    return f"{starttime}@{boot_id}" if boot_id else starttime


#: pgid -> a member seen alive by the last scan, checked first so that waiting
#: on a long-lived group does not rescan all of /proc every time
_live_member_hint: dict[int, int] = {}


def _is_live_member(pid: int, pgid: int) -> bool:
    fields = _read_stat(pid)
    return (
        fields is not None
        and len(fields) > _STAT_PGRP
        and fields[_STAT_PGRP] == str(pgid)
        and fields[_STAT_STATE] not in _DEAD_STATES
    )


def _group_has_live_member(pgid: int) -> bool:
    """Scan /proc for a member of `pgid` that is not a zombie.

    Called after kill(-pgid, 0) succeeded: zombies still count for kill(),
    and where nothing reaps orphans (an init that does not wait, or this
    service running as pid 1) they would otherwise keep a group "alive"
    forever.
    """
    hint = _live_member_hint.get(pgid)
    if hint is not None and _is_live_member(hint, pgid):
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    saw_zombie = False
    for name in entries:
        if not name.isdigit():
            continue
        fields = _read_stat(int(name))
        if fields is None or len(fields) <= _STAT_PGRP:
            continue
        if fields[_STAT_PGRP] != str(pgid):
            continue
        if fields[_STAT_STATE] in _DEAD_STATES:
            saw_zombie = True
        else:
            if len(_live_member_hint) >= 1024:
                _live_member_hint.clear()
            _live_member_hint[pgid] = int(name)
            return True
    _live_member_hint.pop(pgid, None)
    if saw_zombie:
        return False
    # No member found at all: the group emptied during the scan, or a new member
    # appeared where the scan had already passed. Ask the kernel once more.
    return _killpg_probe(pgid)


def _killpg_probe(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """True if the process group `pgid` has a member that is not a zombie."""
    if pgid <= 0:
        return False
    if not _killpg_probe(pgid):
        return False
    return _group_has_live_member(pgid)


def _check_pgid(pgid: int) -> None:
    # killpg(0) or killpg(1) would hit far more than an agent; our own group is never an agent's.
    if pgid <= 1:
        raise ValueError(f"refusing to signal process group {pgid}")
    if pgid == os.getpgrp():
        raise ValueError(f"refusing to signal our own process group {pgid}")


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; True if it reached at least one process."""
    _check_pgid(pgid)
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        logger.warning("not permitted to signal process group", extra={"pgid": pgid, "signal": sig})
        return False
    return True


class ProcessGroup:
    """The processes of one group, as one (`Members`)."""

    def __init__(self, pgid: int):
        _check_pgid(pgid)
        self.pgid = pgid

    def signal(self, sig: int) -> bool:
        return _signal_group(self.pgid, sig)

    def alive(self) -> bool:
        return group_alive(self.pgid)

    def __repr__(self) -> str:
        return f"process group {self.pgid}"


def _wait_gone(members: Members, timeout: float) -> bool:
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        if not members.alive():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)


def stop_members(members: Members, grace: float) -> bool:
    """SIGTERM them, wait up to `grace` s for them to disappear, then SIGKILL them.
    Returns True if any process was signalled."""
    if not members.alive():
        return False
    if not members.signal(signal.SIGTERM):
        return False
    if _wait_gone(members, grace):
        logger.debug("agent processes exited after SIGTERM", extra={"members": repr(members)})
        return True
    logger.warning(
        "agent processes still alive after grace, sending SIGKILL",
        extra={"members": repr(members), "grace": grace},
    )
    members.signal(signal.SIGKILL)
    if not _wait_gone(members, _KILL_WAIT):
        logger.error("agent processes still alive after SIGKILL", extra={"members": repr(members)})
    return True


def kill_group(pgid: int, grace: float) -> bool:
    """SIGTERM the group, wait up to `grace` s for it to disappear, then SIGKILL it.

    Returns True if any process was signalled. Refuses (ValueError) to signal
    group 0, 1 or the caller's own group.
    """
    return stop_members(ProcessGroup(pgid), grace)


def kill_orphan(pid: int, start_token: str | None, grace: float) -> bool:
    """Kill the group led by `pid`, but only if that exact process is still alive.

    For agents left over from a previous run of the service: `start_token`
    is what `process_start_token` returned when the agent was started. A
    dead pid, a reused pid (token differs) or a missing token kills nothing.
    Returns True if the group was signalled.
    """
    if pid <= 1 or start_token is None:
        return False
    # a leader that exited and is not reaped yet still holds its pid: its token says
    # whether it is the agent (and kill_group passes over it, killing what lives on)
    current = process_start_token(pid, exited_ok=True)
    if current is None:
        # The leader is gone, but what it started may live on in its group. Linux does not
        # hand out a pid while a process group of that id has members, so any member is
        # still the agent's.
        if pid != os.getpgrp() and group_alive(pid):
            logger.warning(
                "orphaned agent's leader is gone but its group is not, killing", extra={"pgid": pid}
            )
            return kill_group(pid, grace)
        logger.info("orphaned agent already gone", extra={"pid": pid})
        return False
    if current != start_token:
        logger.info("pid reused by another process, not killing", extra={"pid": pid})
        return False
    fields = _read_stat(pid)
    if fields is None:
        return False
    if fields[_STAT_PGRP] != str(pid):
        logger.warning(
            "orphaned agent is not a process group leader, not killing", extra={"pid": pid}
        )
        return False
    if pid == os.getpgrp():
        return False
    logger.warning("killing orphaned agent process group", extra={"pgid": pid})
    return kill_group(pid, grace)


# ---------------------------------------------------------------------------
# starting the process


class Leader(Protocol):
    """The process an agent's command started as, followed until it exits."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code, waiting up to `timeout` s; None if it still runs then."""
        ...


class Members(Protocol):
    """Every process the agent's run may have started, stopped as one."""

    def signal(self, sig: int) -> bool:
        """Send `sig` to all of them; True if it reached at least one."""
        ...

    def alive(self) -> bool:
        """True while any of them lives (zombies do not count)."""
        ...


@dataclass
class Spawned:
    """A started agent: its leader, all its processes, and the read end of its output."""

    leader: Leader
    members: Members
    output: IO[bytes]
    #: the leader's `process_start_token`, for a later run's recovery
    start_token: str | None


class Spawn(Protocol):
    """Starts `argv` in `cwd` with exactly `env`, stdin from /dev/null and stdout and
    stderr on one pipe. Raises OSError when the command cannot be started, or
    AgentStartError with its own message."""

    def __call__(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> Spawned: ...


class _Child:
    """A `Leader` that is a child of this process."""

    def __init__(self, popen: subprocess.Popen[bytes]):
        self._popen = popen
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def poll(self) -> int | None:
        return self._popen.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def spawn_process(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> Spawned:
    """The agent as a child of this process, in a new session: its group is its members."""
    popen = subprocess.Popen(
        argv,
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    # its own session is its own scheduling group under autogroup: give it our niceness
    share_with_session(popen.pid)
    assert popen.stdout is not None  # started with stdout=PIPE
    return Spawned(
        leader=_Child(popen),
        members=ProcessGroup(popen.pid),
        output=popen.stdout,
        # the agent's identity for a later run's kill_orphan, even if it has exited
        # already: it is our child and not yet reaped, so its pid is still its own
        start_token=process_start_token(popen.pid, exited_ok=True),
    )


# ---------------------------------------------------------------------------
# the agent process


def _skip_continuation_bytes(data: bytes | bytearray) -> bytes:
    """Drop up to 3 leading UTF-8 continuation bytes left by a cut in the middle of a character."""
    i = 0
    while i < 3 and i < len(data) and (data[i] & 0xC0) == 0x80:
        i += 1
    return bytes(data[i:])


class AgentProcess:
    """One running agent: its process group, its output pipe and its log.

    Create with `AgentProcess.start(...)`. When the process has ended (see
    `poll`/`wait`) call `close()`; to stop it early call `terminate(grace)`.
    Both kill what remains of the group and finish the log.
    """

    def __init__(
        self,
        spawned: Spawned,
        *,
        argv0: str,
        log_file: BinaryIO,
        log_path: Path,
        log_max_bytes: int,
        on_line: Callable[[str], None] | None,
        secrets: Sequence[str] = (),
    ) -> None:
        # Not meant to be called directly: start() spawns the process first.
        self._leader = spawned.leader
        self._members = spawned.members
        self.pid: int = spawned.leader.pid
        self.start_token: str | None = spawned.start_token
        self.argv0 = argv0
        self.log_path = log_path

        self._on_line = on_line
        self._on_line_failed = False

        self._log = log_file
        self._log_broken = False
        self._log_half = max(1, log_max_bytes // 2)
        self._log_live = 0  # output bytes of this run written to the log as they came
        self._log_last_byte = b"\n"
        # the log is served over HTTP and by `kugetsu logs`: no secret is written to it
        self._redactor = StreamRedactor(secrets)

        self._buf_lock = threading.Lock()
        self._bytes_seen = 0
        self._head = bytearray()
        self._tail_cap = max(OUTPUT_TAIL_BYTES, self._log_half)
        self._tail = bytearray()  # the last _tail_cap bytes of the output

        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""

        self._stop = threading.Event()
        self._pipe: IO[bytes] = spawned.output
        self._reader = threading.Thread(
            target=self._read_loop, name=f"agent-reader-{self.pid}", daemon=True
        )
        self._finish_lock = threading.Lock()
        self._finished = False

    # -- starting ------------------------------------------------------------

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        log_path: Path,
        log_max_bytes: int,
        on_line: Callable[[str], None] | None = None,
        header: str | None = None,
        secrets: Sequence[str] = (),
        spawn: Spawn = spawn_process,
    ) -> AgentProcess:
        """Start `argv` in `cwd` with exactly `env` (through `spawn`: by default in a new
        session of its own), output to `log_path` with `secrets` masked.

        Raises AgentStartError if the command cannot be started.
        """
        argv = [os.fspath(a) for a in argv]
        if not argv:
            raise AgentStartError("cannot start agent: empty command")
        if log_max_bytes < 2:
            raise ValueError("log_max_bytes must be at least 2")
        argv0 = argv[0]
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # not a `with`: the log outlives this call, and AgentProcess closes it
        log_file = open(log_path, "ab", buffering=0)  # noqa: SIM115
        try:
            if _ends_without_newline(log_path):
                log_file.write(b"\n")  # an earlier run's last line stays on its own line
            if header is not None:
                line = header if header.endswith("\n") else header + "\n"
                log_file.write(line.encode("utf-8", "replace"))
            try:
                spawned = spawn(argv, cwd, env)
            except (AgentStartError, OSError, ValueError) as exc:
                message = (
                    str(exc)
                    if isinstance(exc, AgentStartError)
                    else _start_error_message(argv0, cwd, exc)
                )
                logger.warning(
                    "agent could not be started", extra={"argv0": argv0, "error": str(exc)}
                )
                log_file.write(f"[kugetsu: {message}]\n".encode("utf-8", "replace"))
                if isinstance(exc, AgentStartError):
                    raise
                missing = _command_missing(argv0, cwd, exc)
                raise AgentStartError(message, not_found=missing) from exc
        except BaseException:
            log_file.close()
            raise

        proc = cls(
            spawned,
            argv0=argv0,
            log_file=log_file,
            log_path=log_path,
            log_max_bytes=log_max_bytes,
            on_line=on_line,
            secrets=secrets,
        )
        try:
            proc._reader.start()
        except BaseException as exc:
            logger.error("could not start output reader, killing agent", extra={"pid": proc.pid})
            spawned.members.signal(signal.SIGKILL)
            spawned.leader.wait()
            proc._pipe.close()
            log_file.close()
            raise AgentStartError(
                f"cannot start agent {argv0!r}: no reader thread ({exc})"
            ) from exc
        logger.info("agent started", extra={"pid": proc.pid, "argv0": argv0, "log": str(log_path)})
        return proc

    # -- state ---------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        return self._leader.returncode

    @property
    def bytes_seen(self) -> int:
        """Bytes the agent has written to stdout/stderr so far."""
        return self._bytes_seen

    def poll(self) -> int | None:
        return self._leader.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the leader to exit; None if it is still running after `timeout` s."""
        return self._leader.wait(timeout)

    def __repr__(self) -> str:
        return f"<AgentProcess pid={self.pid} argv0={self.argv0!r} returncode={self.returncode}>"

    # -- stopping ------------------------------------------------------------

    def terminate(self, grace: float) -> int:
        """Stop the whole group: SIGTERM, up to `grace` s, SIGKILL; reap; finish the log.

        Returns the leader's exit code (negative signal number if it was killed
        by a signal). Safe to call again and after the agent exited by itself.
        """
        if self._leader.poll() is None:
            logger.info("terminating agent", extra={"pid": self.pid, "grace": grace})
            self._members.signal(signal.SIGTERM)
            deadline = time.monotonic() + max(0.0, grace)
            while True:
                leader_done = self._leader.poll() is not None
                if leader_done and not self._members.alive():
                    break
                if time.monotonic() >= deadline:
                    break
                time.sleep(_POLL_INTERVAL)
            if self._leader.poll() is None or self._members.alive():
                logger.warning(
                    "agent still alive after grace, sending SIGKILL", extra={"pid": self.pid}
                )
                self._members.signal(signal.SIGKILL)
                self._reap_leader()
                if not _wait_gone(self._members, _KILL_WAIT):
                    logger.error(
                        "agent processes still alive after SIGKILL", extra={"pid": self.pid}
                    )
            else:
                self._reap_leader()
        self._finish(grace)
        rc = self._leader.returncode
        return rc if rc is not None else -signal.SIGKILL

    def close(self, grace: float = 2.0) -> None:
        """After the leader exited: kill what is left of its group and finish the log.

        If the leader is still running it is terminated first. Idempotent.
        """
        if self._leader.poll() is None:
            logger.warning("close called on a running agent, terminating", extra={"pid": self.pid})
            self.terminate(grace)
            return
        self._finish(grace)

    def _reap_leader(self) -> None:
        if self._leader.wait(_KILL_WAIT) is None:
            logger.error("agent leader not reaped after SIGKILL", extra={"pid": self.pid})

    def _finish(self, grace: float) -> None:
        with self._finish_lock:
            if self._finished:
                return
            if self._members.alive():
                logger.info("killing leftover processes of agent", extra={"pid": self.pid})
                stop_members(self._members, grace)
            # Everything in the group is gone, so whatever is still in the pipe
            # can be read without waiting; a writer that escaped the group
            # cannot hold the reader up because it now stops at the first pause.
            self._stop.set()
            self._reader.join(_READER_JOIN_TIMEOUT)
            if self._reader.is_alive():
                logger.error("agent output reader did not finish", extra={"pid": self.pid})
            self._finished = True
            logger.info(
                "agent finished",
                extra={"pid": self.pid, "returncode": self.returncode, "bytes": self._bytes_seen},
            )

    # -- output --------------------------------------------------------------

    def _kept(self, tail_limit: int) -> tuple[bytes, int, bytes]:
        """(head, bytes omitted between, tail) of the output; the tail at most `tail_limit`
        bytes."""
        with self._buf_lock:
            total = self._bytes_seen
            head = bytes(self._head)
            after_head = total - len(head)
            n = min(tail_limit, after_head, len(self._tail))
            tail = bytes(self._tail[len(self._tail) - n :]) if n > 0 else b""
        return head, after_head - len(tail), tail

    def output(self) -> str:
        """The output kept for parsing: all of it if small, else head, an omission line and tail."""
        head, omitted, tail = self._kept(OUTPUT_TAIL_BYTES)
        if omitted <= 0:
            return (head + tail).decode("utf-8", "replace")
        return (
            head.decode("utf-8", "replace")
            + f"\n[... {omitted} bytes omitted ...]\n"
            + _skip_continuation_bytes(tail).decode("utf-8", "replace")
        )

    def tail(self, max_chars: int = 2000) -> str:
        """The last `max_chars` characters of the output, for failure messages."""
        if max_chars <= 0:
            return ""
        head, omitted, tail = self._kept(OUTPUT_TAIL_BYTES)
        data = tail if omitted > 0 else head + tail
        want = max_chars * 4  # a UTF-8 character is at most 4 bytes
        if len(data) > want:
            data = _skip_continuation_bytes(data[-want:])
        return data.decode("utf-8", "replace")[-max_chars:]

    # -- the reader thread ---------------------------------------------------

    def _read_loop(self) -> None:
        fd = self._pipe.fileno()
        try:
            os.set_blocking(fd, False)
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            while True:
                if self._stop.is_set():
                    self._drain(fd)
                    break
                if not poller.poll(_READER_POLL_MS):
                    continue
                try:
                    data = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    break
                self._feed(data)
        except Exception:
            logger.exception("agent output reader failed", extra={"pid": self.pid})
        finally:
            try:
                self._end_of_output()
            except Exception:
                logger.exception("finishing agent output failed", extra={"pid": self.pid})
            with contextlib.suppress(OSError):
                self._pipe.close()
            self._close_log()

    def _drain(self, fd: int) -> None:
        """Read what is there without waiting, up to a bound, after a stop was asked for."""
        budget = _STOP_DRAIN_BYTES
        while budget > 0:
            try:
                data = os.read(fd, min(READ_CHUNK, budget))
            except BlockingIOError:
                logger.warning(
                    "agent output pipe still open after its group ended", extra={"pid": self.pid}
                )
                return
            if not data:
                return
            budget -= len(data)
            self._feed(data)
        logger.warning(
            "agent output still flowing after its group ended, stopped reading",
            extra={"pid": self.pid},
        )

    def _feed(self, data: bytes) -> None:
        with self._buf_lock:
            self._bytes_seen += len(data)
            room = OUTPUT_HEAD_BYTES - len(self._head)
            if room > 0:
                self._head += data[:room]
            self._tail += data
            excess = len(self._tail) - self._tail_cap
            if excess > 0:
                del self._tail[:excess]

        room = self._log_half - self._log_live
        if room > 0:
            live = data[:room]
            self._log_live += len(live)
            self._write_log(self._redactor.feed(live))

        if self._on_line is not None:
            self._split_lines(self._decoder.decode(data))

    def _split_lines(self, text: str) -> None:
        if not text:
            return
        parts = text.split("\n")
        parts[0] = self._partial + parts[0]
        self._partial = parts.pop()
        for line in parts:
            if line.endswith("\r"):
                line = line[:-1]
            if len(line) <= MAX_LINE_CHARS:
                self._emit(line)
            else:
                for i in range(0, len(line), MAX_LINE_CHARS):
                    self._emit(line[i : i + MAX_LINE_CHARS])
        while len(self._partial) > MAX_LINE_CHARS:
            self._emit(self._partial[:MAX_LINE_CHARS])
            self._partial = self._partial[MAX_LINE_CHARS:]

    def _emit(self, line: str) -> None:
        if self._on_line is None:
            return
        try:
            self._on_line(line)
        except Exception:
            if not self._on_line_failed:
                self._on_line_failed = True
                logger.exception(
                    "on_line callback failed, further errors ignored", extra={"pid": self.pid}
                )

    def _end_of_output(self) -> None:
        if self._on_line is not None:
            self._split_lines(self._decoder.decode(b"", final=True))
            if self._partial:
                last, self._partial = self._partial, ""
                self._emit(last[:-1] if last.endswith("\r") else last)

        with self._buf_lock:
            after_live = self._bytes_seen - self._log_live
            n = min(self._log_half, after_live, len(self._tail))
            tail = bytes(self._tail[len(self._tail) - n :]) if n > 0 else b""
        omitted = after_live - len(tail)
        if omitted > 0:
            # A secret may straddle either side of the gap: what the live part held back
            # and what could end a secret at the start of the tail are left out too.
            omitted += self._redactor.cut()
            skip = self._redactor.end_of_secret(tail)
            tail, omitted = tail[skip:], omitted + skip
            prefix = b"" if self._log_last_byte == b"\n" else b"\n"
            self._write_log(
                prefix + f"[kugetsu: {omitted} bytes of output omitted]\n".encode("ascii")
            )
        self._write_log(self._redactor.feed(tail) + self._redactor.flush())
        if omitted > 0:
            logger.info("agent log capped", extra={"pid": self.pid, "omitted": omitted})

    def _write_log(self, data: bytes) -> None:
        if self._log_broken or not data:
            return
        try:
            self._log.write(data)
            self._log_last_byte = data[-1:]
        except (OSError, ValueError):
            self._log_broken = True
            logger.exception(
                "writing agent log failed, log left incomplete", extra={"pid": self.pid}
            )

    def _close_log(self) -> None:
        try:
            self._log.close()
        except OSError:
            logger.exception("closing agent log failed", extra={"pid": self.pid})


def _ends_without_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def _command_missing(argv0: str, cwd: Path, exc: BaseException) -> bool:
    """True when the command itself is not there (rather than its working directory)."""
    return (
        isinstance(exc, OSError)
        and exc.errno == errno.ENOENT
        and not (exc.filename is not None and os.fspath(exc.filename) == os.fspath(cwd) != argv0)
    )


def _start_error_message(argv0: str, cwd: Path, exc: BaseException) -> str:
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        filename = exc.filename
        if (
            filename is not None
            and os.fspath(filename) == os.fspath(cwd)
            and os.fspath(filename) != argv0
        ):
            return f"cannot start agent {argv0!r}: working directory {os.fspath(cwd)!r}: {reason}"
        if exc.errno == errno.ENOENT:
            return f"cannot start agent {argv0!r}: command not found ({reason})"
        if exc.errno == errno.EACCES:
            return f"cannot start agent {argv0!r}: not executable (permission denied)"
        return f"cannot start agent {argv0!r}: {reason}"
    return f"cannot start agent {argv0!r}: {exc}"
