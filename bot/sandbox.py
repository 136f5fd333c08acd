"""Agents in a sandbox: each concurrency slot's agent runs as a uid of its own.

With `sandbox.mode = "user"` (or "auto" where it can be had), `kugetsu serve` is started as
root (or with the launcher's capabilities). Before anything else it:

1. finds out whether the sandbox can be had (`state()`: the facts `gather()` collects, judged
   by `core.sandbox.assess`; `kugetsu doctor` reports the same);
2. gives the data directory to its service user (`prepare_data_dir`);
3. starts the launcher (`start_launcher`, bot/launcher.py), the one process that keeps
   privileges;
4. drops to the service user (`drop_privileges`) for the receiver and the worker, and so
   for git and every Gitea call.

The worker then runs each agent through a `Sandbox`: `UserSandbox` lends the issue's
worktree and home to the slot's uid (`first_uid + slot`), starts the agent through the
launcher, and when the run ends, whatever way it ends, kills every process of that uid and
takes the worktree and home back. `NoSandbox` runs agents as kugetsu's own user, as
before. The slot comes with the task from the store's claim, which never gives one slot to
two running tasks.

What the service user holds (the config, the database, logs, mirrors, prompts, other
issues' worktrees and homes) is private to it (0700/0600); the path from the data
directory to a worktree or home is searchable by others but not readable (0711), so an
agent reaches its own and nothing beside it.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import resource
import select
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import bot
from bot.config import Config, SandboxConfig, StorageConfig
from bot.core.sandbox import LAUNCHER_CAPABILITIES, SandboxFacts, SandboxState, assess
from bot.launcher import (
    CAPABILITY_NUMBERS,
    recv_message,
    send_message,
    set_capabilities,
    uid_processes,
)
from bot.process import AgentProcess, AgentStartError, Spawned, process_start_token

log = logging.getLogger(__name__)

#: how long `serve` waits for the launcher to say it is ready
LAUNCHER_START_SECONDS = 30.0
#: with the agents' kill grace, how long the launcher outlives `serve` while agents run:
#: the worker, left without `serve`, stops them through it
LINGER_EXTRA_SECONDS = 30.0


class SandboxError(RuntimeError):
    """The launcher refused a request or cannot be reached; the message says which."""


# ------------------------------------------------------------------------ facts and state


@dataclass(frozen=True)
class Account:
    """The unprivileged user kugetsu runs as."""

    name: str | None
    uid: int
    gid: int
    home: str | None = None


def resolve_account(user: str) -> Account | None:
    """sandbox.user as an account: a user name, or a uid (which needs no account)."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        return Account(None, int(user), int(user)) if user.isdigit() else None
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def effective_capabilities(status: str = "/proc/self/status") -> frozenset[str]:
    """Which of the launcher's capabilities this process has in effect."""
    try:
        with open(status) as fh:
            line = next(line for line in fh if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return frozenset()
    mask = int(line.split()[1], 16)
    return frozenset(name for name, bit in CAPABILITY_NUMBERS.items() if mask >> bit & 1)


def _mapped(ids: Iterable[int], map_file: str) -> list[int]:
    """Those of `ids` that this user namespace cannot use (its uid_map or gid_map)."""
    try:
        with open(map_file) as fh:
            ranges = [tuple(int(x) for x in line.split()) for line in fh if line.strip()]
    except OSError:
        return []
    return [i for i in ids if not any(lo <= i < lo + count for lo, _out, count in ranges)]


def _taken(ids: Sequence[int]) -> list[str]:
    found = []
    for i in ids:
        with contextlib.suppress(KeyError):
            found.append(f"uid {i} ({pwd.getpwuid(i).pw_name})")
        with contextlib.suppress(KeyError):
            found.append(f"gid {i} ({grp.getgrgid(i).gr_name})")
    return found


def _probe(uid: int, gid: int, checks: Sequence[tuple[str, Callable[[], bool]]]) -> list[str]:
    """Run `checks` as `uid` (in a child, which then exits); the phrases of those that fail."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            failed = [what for what, check in checks if not check()]
            os.write(write, json.dumps(failed).encode())
        finally:
            os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    return list(json.loads(data or b"[]"))


def _searchable_from(path: Path) -> Path:
    """The nearest existing directory at or above `path`."""
    path = Path(os.path.abspath(path))
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def slot_uids(config: Config) -> range:
    """The uids (and gids) of the concurrency slots: first_uid + slot."""
    first = config.sandbox.first_uid
    return range(first, first + config.queue.max_concurrent_agents)


def service_account(config: Config) -> Account | None:
    """Who kugetsu runs as with the sandbox: sandbox.user when started as root, else
    the user it was started as (with the launcher's capabilities, say from systemd)."""
    if os.geteuid() == 0:
        return resolve_account(config.sandbox.user)
    return Account(None, os.geteuid(), os.getegid())


def gather(config: Config) -> SandboxFacts:
    """What `assess` needs: this process's privileges, the accounts, and whether the service
    user and the slots can reach what they need (checked as them, when that can be done)."""
    sb = config.sandbox
    euid = os.geteuid()
    caps = effective_capabilities()
    account = service_account(config)
    slots = tuple(slot_uids(config))
    facts = SandboxFacts(
        mode=sb.mode,
        euid=euid,
        capabilities=caps,
        service_user=sb.user,
        service_uid=account.uid if account else None,
        slot_uids=slots,
        readable_token_config=readable_secret_file(config),
    )
    if sb.mode == "none" or not set(LAUNCHER_CAPABILITIES) <= caps or account is None:
        return facts
    ids = (account.uid, *slots)
    unmapped = sorted(
        set(_mapped(ids, "/proc/self/uid_map"))
        | set(_mapped((account.gid, *slots), "/proc/self/gid_map"))
    )
    unreachable: list[str] = []
    if not unmapped and account.uid not in slots and 0 not in slots:
        unreachable = _unreachable(config, account, slots[0])
    return replace(
        facts,
        taken=tuple(_taken(slots)),
        unmapped=tuple(unmapped),
        unreachable=tuple(unreachable),
    )


def _unreachable(config: Config, account: Account, slot_uid: int) -> list[str]:
    who = f"kugetsu's user (uid {account.uid})"
    checks: list[tuple[str, Callable[[], bool]]] = []
    source = config.source
    if not source.startswith("("):
        path = os.path.abspath(source)
        checks.append(
            (f"{who} cannot read the config file {path}", partial(os.access, path, os.R_OK))
        )
    python = os.path.realpath(sys.executable)
    stdlib = os.path.dirname(os.__file__)
    checks.append((f"{who} cannot run {python}", partial(os.access, python, os.X_OK)))
    for what, folder in (
        ("Python's library", stdlib),
        ("kugetsu's code", os.path.dirname(os.path.abspath(bot.__file__))),
        ("the installed packages", sysconfig.get_paths()["purelib"]),
    ):
        checks.append(
            (f"{who} cannot read {what} in {folder}", partial(os.access, folder, os.R_OK))
        )
    found = _probe(account.uid, account.gid, checks) if os.geteuid() == 0 else []
    above = _searchable_from(config.storage.data_dir.parent)
    found += _probe(
        slot_uid,
        slot_uid,
        [
            (
                f"agents (uid {slot_uid}) cannot reach the data directory: {above} is not "
                "searchable by other users",
                partial(os.access, str(above), os.X_OK),
            )
        ],
    )
    return found


def readable_secret_file(config: Config) -> str | None:
    """The config file, if it holds the token or webhook secret and others can read it."""
    if not config.source_holds_secret:
        return None
    path = os.path.abspath(config.source)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return path if mode & stat.S_IROTH else None


def state(config: Config) -> SandboxState:
    """The sandbox as `serve` would run it with this config, in this process: what
    `kugetsu doctor` reports."""
    return assess(gather(config))


# ------------------------------------------------------------------ serve, before the drop


def prepare_data_dir(storage: StorageConfig, account: Account, slot_uids: Sequence[int]) -> None:
    """Give the data directory to the service user. Run as root before the drop: what root
    wrote there (the first start, an older install run as root, `kugetsu` commands run as
    root while the service was stopped) becomes the service user's. Worktrees and homes a
    slot still holds stay with it; the worker takes them back before their next use."""
    data_dir = storage.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keep = {account.uid, *slot_uids}
    deep = os.lstat(data_dir).st_uid != account.uid

    def own(name: str | int, dirfd: int | None = None) -> None:
        st = (
            os.fstat(name)
            if isinstance(name, int)
            else os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        )
        if st.st_uid in keep:
            return
        if isinstance(name, int):
            os.fchown(name, account.uid, account.gid)
        else:
            os.chown(name, account.uid, account.gid, dir_fd=dirfd, follow_symlinks=False)

    top = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if deep:
            for _path, dirs, files, dirfd in os.fwalk(data_dir, follow_symlinks=False):
                for name in dirs + files:
                    with contextlib.suppress(FileNotFoundError):
                        own(name, dirfd)
        else:
            for name in os.listdir(top):
                with contextlib.suppress(FileNotFoundError):
                    own(name, top)
        own(top)  # last: while root owns it, the next start looks deeper
    finally:
        os.close(top)


class LauncherProcess:
    """The launcher as `serve` holds it: it lives while `serve` keeps its pipe open."""

    def __init__(self, proc: subprocess.Popen[bytes], parent: int, socket_path: Path):
        self.proc, self.socket = proc, socket_path
        self._parent: int | None = parent

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close_pipe(self) -> None:
        """What `serve` ending does: the launcher exits once its agents have ended."""
        if self._parent is not None:
            os.close(self._parent)
            self._parent = None

    def stop(self, timeout: float = 10.0) -> None:
        """Tell it that nothing more will be asked (whoever runs agents through it has
        ended), close its pipe and wait for it to exit."""
        if self._parent is not None:
            with contextlib.suppress(SandboxError):
                LauncherClient(self.socket).call({"op": "stop"})
        self.close_pipe()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_launcher(
    config: Config, account: Account, *, socket_path: Path | None = None, log_level: str = "INFO"
) -> LauncherProcess:
    """Start the launcher (bot/launcher.py) and wait until it listens at `socket_path` (by
    default the in-process one). With an empty environment: it needs no secret, so it
    holds none."""
    storage, sb = config.storage, config.sandbox
    socket_path = socket_path or storage.launcher_socket()
    _remove_stale_sockets(storage.data_dir)
    parent_r, parent_w = os.pipe()  # not inherited by the worker: its end is the launcher's life
    ready_r, ready_w = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "bot.launcher",
        "--socket",
        str(socket_path),
        "--service-uid",
        str(account.uid),
        "--service-gid",
        str(account.gid),
        "--first-uid",
        str(sb.first_uid),
        "--slots",
        str(config.queue.max_concurrent_agents),
        "--root",
        str(storage.worktrees_dir),
        "--root",
        str(storage.homes_dir),
        "--parent-fd",
        str(parent_r),
        "--ready-fd",
        str(ready_w),
        "--log-level",
        log_level,
        "--log-format",
        config.logging.format,
        # as long as the worker takes to stop its agents when serve is gone
        "--linger",
        str(config.agents.kill_grace_seconds + LINGER_EXTRA_SECONDS),
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    try:
        proc = subprocess.Popen(
            argv, pass_fds=(parent_r, ready_w), env=env, stdin=subprocess.DEVNULL, cwd="/"
        )
    finally:
        os.close(parent_r)
        os.close(ready_w)
    answer = b""
    try:
        while select.select([ready_r], [], [], LAUNCHER_START_SECONDS)[0]:
            chunk = os.read(ready_r, 4096)
            if not chunk:
                break
            answer += chunk
    finally:
        os.close(ready_r)
    if answer.strip() != b"ok":
        os.close(parent_w)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        reason = answer.decode(errors="replace").strip() or f"exit code {proc.poll()}"
        raise SandboxError(f"the sandbox's launcher did not start: {reason}")
    return LauncherProcess(proc, parent_w, socket_path)


def running_launcher(data_dir: Path) -> Path | None:
    """The socket of a launcher a running `serve` started, if one answers there."""
    for path in sorted(data_dir.glob("launcher-*.sock")):
        with contextlib.suppress(SandboxError):
            LauncherClient(path).call({"op": "ping"})
            return path
    return None


def _remove_stale_sockets(data_dir: Path) -> None:
    """Sockets of launchers that are gone (a `serve` killed with kill -9): nobody listens."""
    for path in data_dir.glob("launcher-*.sock"):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            probe.close()


def drop_privileges(account: Account) -> None:
    """Become the service user for good, with no capabilities left."""
    if os.geteuid() == 0:
        if account.name:
            os.initgroups(account.name, account.gid)
        else:
            os.setgroups([account.gid])
        os.setresgid(account.gid, account.gid, account.gid)
        os.setresuid(account.uid, account.uid, account.uid)
        os.environ["HOME"] = account.home or "/"
    set_capabilities(())


# ---------------------------------------------------------------- the worker's side


class LauncherClient:
    """Asks the launcher over its socket: one connection per request, so runner threads
    never share one."""

    def __init__(self, path: Path):
        self.path = str(path)

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise SandboxError(f"the sandbox's launcher is not reachable: {exc}") from None
        return sock

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        with self.connect() as sock:
            try:
                send_message(sock, message)
                answer, _ = recv_message(sock)
            except (OSError, ValueError) as exc:
                raise SandboxError(f"the sandbox's launcher did not answer: {exc}") from None
        if answer is None:
            raise SandboxError("the sandbox's launcher closed the connection")
        if "error" in answer:
            raise SandboxError(f"the sandbox's launcher refused: {answer['error']}")
        return answer


class LaunchedLeader:
    """An agent the launcher started: its exit comes on the connection that started it."""

    def __init__(self, sock: socket.socket, pid: int):
        self._sock, self.pid = sock, pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self.wait(0)

    def wait(self, timeout: float | None = None) -> int | None:
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            if not select.select([self._sock], [], [], timeout)[0]:
                return None
            try:
                answer, _ = recv_message(self._sock)
            except (OSError, ValueError):
                answer = None
            self._sock.close()
            if answer is None or not isinstance(answer.get("exit"), int):
                # the launcher is gone (serve stops and is started again, whose recovery
                # kills what is left): the agent's own end is unknown
                log.error("the sandbox's launcher is gone; the agent's end is unknown")
                self.returncode = -signal.SIGKILL
            else:
                self.returncode = answer["exit"]
            return self.returncode


class SlotProcesses:
    """Every process of a slot's uid, as one (`process.Members`)."""

    def __init__(self, client: LauncherClient, slot: int, uid: int):
        self.client, self.slot, self.uid = client, slot, uid

    def signal(self, sig: int) -> bool:
        alive = self.alive()
        op = {"op": "sweep"} if sig == signal.SIGKILL else {"op": "signal", "sig": int(sig)}
        try:
            self.client.call({**op, "slot": self.slot})
        except SandboxError as exc:
            log.error("cannot signal a slot", extra={"slot": self.slot, "error": str(exc)})
            return False
        return alive

    def alive(self) -> bool:
        return bool(uid_processes(self.uid))

    def __repr__(self) -> str:
        return f"slot {self.slot} (uid {self.uid})"


class Sandbox(Protocol):
    """How the worker runs agents: as its own user, or each slot as a uid of its own."""

    @property
    def active(self) -> bool: ...

    def lend(
        self, slot: int, paths: Sequence[Path]
    ) -> contextlib.AbstractContextManager[Callable[..., AgentProcess]]:
        """For one agent run: the worktree and home in `paths` belong to the slot, and
        the function to start the agent with (`AgentProcess.start`'s arguments). When the
        block ends, every process of the slot is killed and `paths` are taken back."""
        ...

    def sweep(self, slot: int) -> None:
        """Kill every process of the slot (after a crash, before the slot is reused)."""
        ...

    def reclaim(self, paths: Sequence[Path]) -> None:
        """Take back worktrees and homes that a slot may still hold (after a crash)."""
        ...


class NoSandbox:
    """Agents run as kugetsu's own user, each in a process group of its own."""

    active = False

    @contextlib.contextmanager
    def lend(self, slot: int, paths: Sequence[Path]) -> Iterator[Callable[..., AgentProcess]]:
        yield AgentProcess.start

    def sweep(self, slot: int) -> None:
        pass

    def reclaim(self, paths: Sequence[Path]) -> None:
        pass


class UserSandbox:
    """Each slot's agent runs as uid `first_uid + slot`, through the launcher."""

    active = True

    def __init__(self, storage: StorageConfig, settings: SandboxConfig, client: Any = None):
        self.client: LauncherClient = client or LauncherClient(storage.launcher_socket())
        self.data_dir = Path(os.path.abspath(storage.data_dir))
        self.first_uid = settings.first_uid
        mib = 1024 * 1024
        self.limits = {
            "nproc": settings.max_processes,
            "as": settings.max_memory_mb and settings.max_memory_mb * mib,
            "fsize": settings.max_file_size_mb and settings.max_file_size_mb * mib,
        }

    def _reachable(self, path: Path) -> None:
        """The folders from the data directory down to `path` may be searched by others
        (0711: passed through, never listed), so the slot reaches `path` and only it."""
        folder = Path(os.path.abspath(path)).parent
        chain = [folder]
        while folder != self.data_dir:
            if folder == folder.parent:
                raise SandboxError(f"{path} is not in the data directory {self.data_dir}")
            folder = folder.parent
            chain.append(folder)
        for folder in chain:
            mode = os.stat(folder).st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)

    def _spawn(self, slot: int, argv: Sequence[str], cwd: Path, env: dict[str, str]) -> Spawned:
        """`process.Spawn` through the launcher: the agent runs as the slot's uid."""
        request = {
            "op": "start",
            "slot": slot,
            "argv": list(argv),
            "env": dict(env),
            "cwd": str(cwd),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "limits": self.limits,
        }
        read, write = os.pipe()
        try:
            sock = self.client.connect()
        except SandboxError as exc:
            os.close(read)
            os.close(write)
            raise AgentStartError(f"cannot start agent {argv[0]!r}: {exc}") from None
        answer: dict[str, Any] | None = None
        problem = "the connection closed"
        try:
            send_message(sock, request, [write])
            answer, _ = recv_message(sock)
        except (OSError, ValueError) as exc:
            problem = f"no answer: {exc}"
        finally:
            os.close(write)
        if answer is not None and isinstance(answer.get("pid"), int):
            return Spawned(
                leader=LaunchedLeader(sock, answer["pid"]),
                members=SlotProcesses(self.client, slot, self.first_uid + slot),
                output=os.fdopen(read, "rb", buffering=0),
                start_token=process_start_token(answer["pid"], exited_ok=True),
            )
        sock.close()
        os.close(read)
        detail = (answer or {}).get("detail")
        if isinstance(detail, dict):  # the command itself could not be run
            raise OSError(detail.get("errno"), detail.get("strerror"), detail.get("filename"))
        problem = str((answer or {}).get("error") or problem)
        raise AgentStartError(f"cannot start agent {argv[0]!r}: the sandbox's launcher: {problem}")

    @contextlib.contextmanager
    def lend(self, slot: int, paths: Sequence[Path]) -> Iterator[Callable[..., AgentProcess]]:
        trees = [str(Path(os.path.abspath(p))) for p in paths]
        for path in paths:
            self._reachable(Path(path))
        self.client.call({"op": "lend", "slot": slot, "paths": trees})
        try:
            yield partial(AgentProcess.start, spawn=partial(self._spawn, slot))
        except BaseException:
            self._give_back(slot, trees, quiet=True)
            raise
        self._give_back(slot, trees, quiet=False)

    def _give_back(self, slot: int, trees: list[str], *, quiet: bool) -> None:
        """Nothing of the run outlives it, and the worktree and home are kugetsu's again.
        `quiet`: another error is on its way out; this one is only logged."""
        try:
            self.sweep(slot)
            self.client.call({"op": "reclaim", "paths": trees})
        except SandboxError as exc:
            if not quiet:
                raise
            log.error("cannot end a slot's run", extra={"slot": slot, "error": str(exc)})

    def sweep(self, slot: int) -> None:
        answer = self.client.call({"op": "sweep", "slot": slot})
        if answer.get("left"):
            raise SandboxError(f"{answer['left']} processes of slot {slot} outlived SIGKILL")

    def reclaim(self, paths: Sequence[Path]) -> None:
        trees = [str(Path(os.path.abspath(p))) for p in paths]
        self.client.call({"op": "reclaim", "paths": trees})


def sandbox_for(config: Config, launcher: Path | None = None) -> Sandbox:
    """The worker's sandbox: through the launcher listening at `launcher` (as `serve`
    started it); without one, as configured, through the in-process launcher's socket
    (which whoever builds the worker starts, as tests do)."""
    if launcher is not None:
        return UserSandbox(config.storage, config.sandbox, LauncherClient(launcher))
    if config.sandbox.mode == "user":
        return UserSandbox(config.storage, config.sandbox)
    return NoSandbox()
