"""The sandbox's launcher: the one process of kugetsu that keeps privileges.

With `sandbox.mode = "user"`, `kugetsu serve` is started as root. It starts this launcher,
then drops to its unprivileged service user for everything else: the receiver, the worker,
git and Gitea calls. The launcher keeps only what running agents under uids of their own
takes: it runs as the service user too, with five capabilities
(`core.sandbox.LAUNCHER_CAPABILITIES`) and none of root's other powers. It answers the
worker over a Unix socket that only the service user can open (the socket is 0600, and
the launcher checks the caller's uid), and does four things:

- `start`: run an agent as its slot's uid and gid (`first_uid + slot`), in a session of
  its own, in the worktree it is given, with stdin from /dev/null and its output to the
  pipe the worker passes along. Before that, whatever the uid still runs is killed, so a
  slot is never reused while something of an earlier task lives. The agent has no
  capabilities, no supplementary groups and no way to gain privileges (no_new_privs:
  set-user-id programs do not raise it), and the per-slot limits. The leader's exit status
  goes back on the connection that asked, when it ends.
- `signal` and `sweep`: send a signal to every process of a slot's uid. A sweep kills them
  all (SIGKILL, again until none is left): a process of the uid cannot escape it by
  starting a session of its own, ignoring SIGTERM or forking, since a kill(-1) sent as
  that uid reaches every process of the uid in one step.
- `lend` and `reclaim`: hand an issue's worktree and agent home to the slot's uid before
  a run, and back to the service user after it, with group and other access and set-id
  bits taken away. Only directories exactly three levels below the worktrees or homes
  folder are accepted, walked without following links, and only entries owned by the
  service user or a slot uid change hands.

The launcher exits when `serve` is gone (its pipe closes) and the agents it started have
ended, and it has been asked nothing for a moment: the worker stops them when it loses
`serve` and takes their worktrees back. A `serve` that stops cleanly says `stop` once its
worker has ended, and the launcher then exits as soon as its agents have. What is left
after `--linger` seconds is killed.
It does not import the rest of kugetsu beyond what this module names, and holds no secret:
it is started with an empty environment, and agents get theirs from the worker.

Run as `python -m bot.launcher ...` by `bot.sandbox.start_launcher`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import resource
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from bot.core.sandbox import LAUNCHER_CAPABILITIES
from bot.priority import lower_own_priority, share_with_session

log = logging.getLogger("kugetsu.launcher")

#: how long a sweep keeps killing before it reports what is left
SWEEP_SECONDS = 5.0
#: a request larger than this is refused (an agent's argv holds its prompt)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: how long one request may take to arrive whole
REQUEST_SECONDS = 30.0
#: once serve is gone and its agents have ended, the launcher exits after this long
#: without a request (the worker's last: killing what the runs left, taking worktrees back)
QUIET_SECONDS = 2.0

# ---------------------------------------------------------------------------------- framing
# A message is a 4-byte big-endian length and that many bytes of JSON; a start request
# carries the agent's output pipe as an SCM_RIGHTS file descriptor with its first byte.

_LENGTH = struct.Struct(">I")


def send_message(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    frame = _LENGTH.pack(len(data)) + data
    sent = socket.send_fds(sock, [frame], list(fds)) if fds else sock.send(frame)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def recv_message(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and the descriptors that came with it; (None, []) at end of stream."""
    head, fds, _flags, _addr = socket.recv_fds(sock, _LENGTH.size, 4)
    for fd in fds:
        os.set_inheritable(fd, False)
    while head and len(head) < _LENGTH.size:
        more = sock.recv(_LENGTH.size - len(head))
        if not more:
            break
        head += more
    if len(head) < _LENGTH.size:
        for fd in fds:
            os.close(fd)
        return None, []
    (length,) = _LENGTH.unpack(head)
    if length > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {length} bytes is too large")
    body = bytearray()
    while len(body) < length:
        chunk = sock.recv(min(length - len(body), 1 << 20))
        if not chunk:
            raise ValueError("connection closed in the middle of a message")
        body += chunk
    message = json.loads(body)
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return message, fds


# ---------------------------------------------------------------------------- capabilities

#: Linux's numbers of the capabilities the launcher keeps (linux/capability.h)
CAPABILITY_NUMBERS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
}
_PR_SET_DUMPABLE = 4
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int = 0) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def set_capabilities(names: Iterable[str]) -> None:
    """Make `names` this process's permitted and effective capabilities, and nothing else:
    no inheritable and no ambient ones, so a program it runs gets none of them."""
    names = tuple(names)
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITY_NUMBERS[name]
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(
            err, f"cannot keep {', '.join(names) or 'no capabilities'}: {os.strerror(err)}"
        )


def become(uid: int, gid: int, *, keep: Iterable[str] = ()) -> None:
    """Switch every uid and gid of this process to `uid`/`gid`, with no supplementary groups,
    keeping the capabilities `keep` (none by default)."""
    keep = tuple(keep)
    if keep and os.geteuid() == 0 and uid != 0:
        _prctl(_PR_SET_KEEPCAPS, 1)  # or leaving uid 0 takes every capability away
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if keep:
        _prctl(_PR_SET_KEEPCAPS, 0)
    set_capabilities(keep)


# ------------------------------------------------------------------------------- processes


def uid_processes(uid: int) -> list[int]:
    """Pids of the live processes (not zombies) whose real, effective or saved uid is `uid`.

    Read from /proc/<pid>/status, which names a process's uids even when it made itself
    undumpable (which hands its /proc directory to root).
    """
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as fh:
                text = fh.read(4096)
        except OSError:
            continue
        state = uids = b""
        for line in text.splitlines():
            if line.startswith(b"State:"):
                state = line[6:].strip()[:1]
            elif line.startswith(b"Uid:"):
                uids = line
                break
        if state in (b"Z", b"X") or not uids:
            continue
        if str(uid).encode() in uids.split()[1:4]:
            found.append(int(name))
    return found


def kill_as(uid: int, sig: int) -> None:
    """Send `sig` to every process of `uid`, from a child that becomes `uid` for it: kill(-1)
    reaches all of that uid's processes in one step, whatever sessions or groups they made."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; it exits at once
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, sig)
        except BaseException:
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)


# -------------------------------------------------------------------------------- the agent


def _run_agent(
    request: dict[str, Any], out: int, report: int, uid: int, private_pids: bool
) -> None:
    """The child that becomes the agent; never returns. A failure before exec is written
    to `report` as JSON {errno, strerror, filename}. With `private_pids` the agent runs in
    namespaces of its own (`_enter_own_namespaces`): this child stays behind to pass on
    how it ended."""
    try:
        # what this launcher ignores (and Python ignores for itself) would stay ignored
        # across exec: the agent starts with every signal at its default, as Popen does
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        nice = int(request.get("nice") or 0)
        if nice > 0:
            # the worker's priority (bot/priority.py): niceness and batch work, for its own
            # session's autogroup too
            lower_own_priority(nice - os.getpriority(os.PRIO_PROCESS, 0))
            share_with_session(os.getpid())
        limits = request.get("limits") or {}
        for key, which in (
            ("nproc", resource.RLIMIT_NPROC),
            ("as", resource.RLIMIT_AS),
            ("fsize", resource.RLIMIT_FSIZE),
        ):
            value = limits.get(key)
            if value:
                if key == "nproc" and private_pids:
                    value += NAMESPACE_PROCESSES  # the two that pass the agent's end on
                resource.setrlimit(which, (value, value))
        nofile = request.get("nofile")
        if nofile:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            limit = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        become(uid, uid)
        os.umask(0o077)
        os.chdir(request["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.closerange(3, report)
        os.closerange(report + 1, 1 << 16)
        if private_pids:
            _enter_own_namespaces(uid, report)
        argv, env = request["argv"], request["env"]
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        detail = {"errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}
    except BaseException as exc:
        detail = {"errno": None, "strerror": f"{type(exc).__name__}: {exc}", "filename": None}
    with contextlib.suppress(BaseException):
        os.write(report, json.dumps(detail).encode()[:4000])
    os._exit(127)


# ------------------------------------------------------------------ the agent's own processes
# An agent that can list /proc sees every process of the machine, and reads the command line
# of each (world-readable on Linux): kugetsu's, and another issue's agent's, whose holds its
# prompt when the command passes {prompt}. Where the kernel lets an unprivileged uid make
# namespaces (a user namespace owning a PID and a mount namespace), the agent gets a /proc
# of its own, in which only its own processes exist. The launcher needs no further
# capability for it: the slot's uid makes them itself. Where that is refused (Docker's and
# Kubernetes' default seccomp profiles refuse it, and so does the kernel inside a chroot),
# agents run as before and the README says what they can then see.

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000
#: the processes of a slot's uid that are not the agent's: the one that waits in the
#: launcher's PID namespace and the first one of the agent's (its "init")
NAMESPACE_PROCESSES = 2
_STATUS = struct.Struct("i")


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _own_namespaces(uid: int) -> None:
    """Move this process into a new user namespace (mapping `uid` to itself, and nothing
    else), a new mount namespace, and make its next child the first of a new PID namespace."""
    # undumpable (as a process that changed uid is) its /proc files are root's, and it
    # could not write its own id maps; undumpable again afterwards, so that what it holds
    # of the launcher's memory stays out of the agent's reach
    _prctl(_PR_SET_DUMPABLE, 1)
    _check(_libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWPID), "unshare")
    for name, text in (
        ("uid_map", f"{uid} {uid} 1\n"),
        ("setgroups", "deny"),
        ("gid_map", f"{uid} {uid} 1\n"),
    ):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)
    _prctl(_PR_SET_DUMPABLE, 0)


def _mount_own_proc() -> None:
    """In the first process of the new PID namespace: a /proc that shows its processes only."""
    _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    _check(_libc.mount(b"proc", b"/proc", b"proc", flags, None), "mount /proc")


def _enter_own_namespaces(uid: int, report: int) -> None:
    """Returns in the process that is to become the agent, in namespaces of its own. Two
    processes stay behind, and end with it:
    - the first of the new PID namespace reaps what the agent leaves (a namespace's first
      process inherits its orphans) and, when the agent ends, sends how it ended and exits,
      which kills whatever is left in the namespace;
    - this one, which the launcher started and waits for, ends the same way the agent did.
    Both ignore the signals the worker sends the slot (the agent gets them itself)."""
    _own_namespaces(uid)
    status_r, status_w = os.pipe()
    first = os.fork()
    if first == 0:
        os.close(status_r)
        _mount_own_proc()
        agent = os.fork()
        if agent == 0:
            os.close(status_w)
            return
        os.close(report)  # its copy; the agent's closes when it runs its program
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == agent:
                os.write(status_w, _STATUS.pack(status))
                os._exit(0)
    os.close(status_w)
    os.close(report)
    for ignored in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(ignored, signal.SIG_IGN)
    os.waitpid(first, 0)
    data = os.read(status_r, _STATUS.size)
    # no word from the first: it was killed (a sweep), and the agent with it
    status = _STATUS.unpack(data)[0] if len(data) == _STATUS.size else int(signal.SIGKILL)
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    ended_by = os.WTERMSIG(status)
    signal.signal(ended_by, signal.SIG_DFL)
    os.kill(os.getpid(), ended_by)
    os._exit(128 + ended_by)


def namespaces_work(uid: int) -> bool:
    """Whether an agent running as `uid` can have a PID namespace and a /proc of its own:
    tried in a child that becomes `uid`, whose own child mounts that /proc."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; it exits at once
        code = 1
        try:
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
            become(uid, uid)
            _own_namespaces(uid)
            first = os.fork()
            if first == 0:
                try:
                    _mount_own_proc()
                    alone = [n for n in os.listdir("/proc") if n.isdigit()] == ["1"]
                    os._exit(0 if alone else 1)
                except BaseException:
                    os._exit(1)
            code = os.waitstatus_to_exitcode(os.waitpid(first, 0)[1])
        except BaseException:
            pass
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


# --------------------------------------------------------------------------------- the trees


class Refused(ValueError):
    """A request the launcher will not carry out; the message says why."""


def _hand_over(
    name: str | int, dirfd: int | None, uid: int, owners: frozenset[int], private: bool
) -> None:
    """Give one entry (a name in `dirfd`, or an open directory) to `uid` if `owners` own it."""
    if isinstance(name, int):
        st = os.fstat(name)
        if st.st_uid not in owners:
            return
        os.fchown(name, uid, uid)
    else:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if st.st_uid not in owners:
            return
        os.chown(name, uid, uid, dir_fd=dirfd, follow_symlinks=False)
    if private and not stat.S_ISLNK(st.st_mode):
        # no group or other access, no set-id or sticky bits; the owner may read and write
        mode = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600 | (st.st_mode & 0o100)
        if stat.S_IMODE(st.st_mode) == mode:
            return
        if isinstance(name, int):
            os.fchmod(name, mode)
        else:
            os.chmod(name, mode, dir_fd=dirfd)


def chown_tree(top: str, uid: int, owners: frozenset[int], *, private: bool) -> None:
    """Give `top` and everything below it that `owners` own to `uid` (gid the same), never
    following a link. The top changes hands first when lent, last when taken back: while
    its owner is the service user, nothing below belongs to a slot."""
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        if not private:
            _hand_over(fd, None, uid, owners, private)
        for _path, dirs, files, dirfd in os.fwalk(top, follow_symlinks=False):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    _hand_over(name, dirfd, uid, owners, private)
        if private:
            _hand_over(fd, None, uid, owners, private)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ the launcher


class Launcher:
    """The launcher's loop: one request at a time, and the exits of the agents it started."""

    def __init__(
        self,
        sock: socket.socket,
        parent: int,
        *,
        service_uid: int,
        first_uid: int,
        slots: int,
        roots: Sequence[str],
        linger: float = 0.0,
        private_pids: bool = False,
    ):
        self.sock, self.parent, self.linger = sock, parent, linger
        #: agents run in PID and mount namespaces of their own (see _enter_own_namespaces)
        self.private_pids = private_pids
        self.service_uid, self.first_uid, self.slots = service_uid, first_uid, slots
        self.roots = frozenset(os.path.realpath(r) for r in roots)
        self.slot_uids = frozenset(range(first_uid, first_uid + slots))
        #: pid of a running agent -> (the connection that started it, its uid)
        self.agents: dict[int, tuple[socket.socket, int]] = {}
        #: `serve` said it is done with the launcher (`stop`): once serve is gone and the
        #: agents have ended, there is nothing to wait for
        self.leaving = False

    def serve(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, "accept")
        selector.register(self.parent, selectors.EVENT_READ, "parent")
        selector.register(wake_r, selectors.EVENT_READ, "child")
        closing_at: float | None = None
        active = time.monotonic()  # the last request, or the last agent's end
        while True:
            timeout = None if closing_at is None else QUIET_SECONDS
            for key, _ in selector.select(timeout):
                if key.data == "child":
                    os.read(wake_r, 4096)
                elif key.data == "parent":
                    if not os.read(self.parent, 4096):
                        # serve is gone: its worker may still be stopping its agents, and
                        # then takes their worktrees back
                        selector.unregister(self.parent)
                        closing_at = time.monotonic() + self.linger
                else:
                    self._accept()
                    active = time.monotonic()
            if self._reap():
                active = time.monotonic()
            now = time.monotonic()
            if closing_at is not None and (
                now >= closing_at
                or (not self.agents and (self.leaving or now - active >= QUIET_SECONDS))
            ):
                self._stop()
                return

    def _stop(self) -> None:
        """Kill what the agents it started left, so nothing outlives serve."""
        for uid in {uid for _conn, uid in self.agents.values()}:
            self._sweep(uid)
        self._reap()

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.settimeout(REQUEST_SECONDS)
        _pid, peer_uid, _gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
        keep = False
        try:
            if peer_uid not in (self.service_uid, 0):
                raise Refused(f"uid {peer_uid} may not use the launcher")
            request, fds = recv_message(conn)
            try:
                if request is not None:
                    keep = self._handle(conn, request, fds)
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        except (Refused, ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("launcher request refused", extra={"error": str(exc)})
            with contextlib.suppress(OSError):
                send_message(conn, {"error": str(exc)})
        if not keep:
            conn.close()

    def _slot_uid(self, request: dict[str, Any]) -> int:
        slot = request.get("slot")
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.slots:
            raise Refused(f"no slot {slot!r}: slots are 0 to {self.slots - 1}")
        return self.first_uid + slot

    def _tree(self, path: Any) -> str:
        """`path` if it is an issue's worktree or home: <root>/<owner>/<repo>/<issue>."""
        if not isinstance(path, str) or not os.path.isabs(path):
            raise Refused(f"not an absolute path: {path!r}")
        if (
            os.path.realpath(path) != path
            or os.path.dirname(os.path.dirname(os.path.dirname(path))) not in self.roots
        ):
            raise Refused(f"not a worktree or agent home: {path}")
        return path

    def _handle(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> bool:
        """Carry out one request; True when the connection stays open (a running agent)."""
        op = request.get("op")
        if op == "ping":  # `kugetsu doctor`: it runs and answers
            send_message(
                conn,
                {
                    "ok": True,
                    "first_uid": self.first_uid,
                    "slots": self.slots,
                    "private_pids": self.private_pids,
                },
            )
            return False
        if op == "stop":  # serve's last word: its worker has ended
            self.leaving = True
            send_message(conn, {"ok": True})
            return False
        if op == "reclaim":
            for tree in [self._tree(p) for p in request.get("paths") or ()]:
                chown_tree(tree, self.service_uid, self.slot_uids, private=True)
            send_message(conn, {"ok": True})
            return False
        uid = self._slot_uid(request)
        if op == "start":
            return self._start(conn, request, fds, uid)
        if op == "signal":
            sig = request.get("sig")
            if sig not in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                raise Refused(f"signal {sig!r} is not one a slot may be sent; sweep it")
            kill_as(uid, sig)
        elif op == "sweep":
            send_message(conn, {"ok": True, "left": self._sweep(uid)})
            return False
        elif op == "lend":
            owners = self.slot_uids | {self.service_uid}
            for tree in [self._tree(p) for p in request.get("paths") or ()]:
                chown_tree(tree, uid, owners, private=False)
        else:
            raise Refused(f"unknown request {op!r}")
        send_message(conn, {"ok": True})
        return False

    def _sweep(self, uid: int) -> int:
        """Kill every process of `uid`; how many are still alive after SWEEP_SECONDS."""
        deadline = time.monotonic() + SWEEP_SECONDS
        while True:
            kill_as(uid, signal.SIGKILL)
            self._reap()
            left = uid_processes(uid)
            if not left or time.monotonic() >= deadline:
                if left:
                    log.error("processes of a slot survive SIGKILL", extra={"uid": uid})
                return len(left)
            time.sleep(0.01)

    def _start(
        self, conn: socket.socket, request: dict[str, Any], fds: list[int], uid: int
    ) -> bool:
        argv, env, cwd = request.get("argv"), request.get("env"), request.get("cwd")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise Refused("argv must be a non-empty list of strings")
        if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
            raise Refused("env must map names to strings")
        if not isinstance(cwd, str) or len(fds) != 1:
            raise Refused("a start needs cwd and exactly one output descriptor")
        if self._sweep(uid):
            raise Refused(f"processes of uid {uid} outlived SIGKILL; the slot is not reused")
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - becomes the agent
            os.close(report_r)
            _run_agent(request, fds[0], report_w, uid, self.private_pids)
        os.close(report_w)
        failure = b""
        while chunk := os.read(report_r, 4096):  # end of file: it ran the program
            failure += chunk
        os.close(report_r)
        if failure:
            os.waitpid(pid, 0)
            send_message(conn, {"error": "exec", "detail": json.loads(failure)})
            return False
        self.agents[pid] = (conn, uid)
        log.info("agent started", extra={"pid": pid, "uid": uid, "argv0": argv[0]})
        send_message(conn, {"pid": pid})
        return True

    def _reap(self) -> bool:
        """Report the agents that ended to who started them; True if any did."""
        ended = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return ended
            if pid == 0:
                return ended
            conn, _uid = self.agents.pop(pid, (None, None))
            if conn is not None:
                ended = True
                with contextlib.suppress(OSError):
                    send_message(conn, {"exit": os.waitstatus_to_exitcode(status)})
                conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.launcher")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--service-uid", type=int, required=True)
    parser.add_argument("--service-gid", type=int, required=True)
    parser.add_argument("--first-uid", type=int, required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--root", action="append", default=[])
    parser.add_argument("--parent-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--linger", type=float, default=0.0)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text")
    args = parser.parse_args(argv)
    from bot.logs import configure_logging

    configure_logging(args.log_level, (), output=args.log_format)
    # stopped by its pipe closing, not by the signals a terminal or a service manager
    # sends the whole group: the worker still needs it to stop its agents
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in (args.parent_fd, args.ready_fd):
        os.set_inheritable(fd, False)
    os.umask(0o077)
    try:
        become(args.service_uid, args.service_gid, keep=LAUNCHER_CAPABILITIES)
        _prctl(_PR_SET_DUMPABLE, 0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.socket)
        os.chmod(args.socket, 0o600)
        sock.listen(64)
    except OSError as exc:
        os.write(args.ready_fd, f"{exc}\n".encode())
        return 1
    private_pids = namespaces_work(args.first_uid)
    if private_pids:
        log.info("agents get PID namespaces of their own: they see only their own processes")
    else:
        log.warning(
            "agents share the PID namespace: they can list every process and read its "
            "command line (user namespaces are refused here: by a seccomp profile, a "
            "chroot, or the kernel's settings)"
        )
    os.write(args.ready_fd, b"ok\n")
    os.close(args.ready_fd)
    launcher = Launcher(
        sock,
        args.parent_fd,
        service_uid=args.service_uid,
        first_uid=args.first_uid,
        slots=args.slots,
        roots=args.root,
        linger=args.linger,
        private_pids=private_pids,
    )
    try:
        launcher.serve()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
