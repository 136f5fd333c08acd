"""`kugetsu serve`: the webhook receiver and the worker, as two processes.

`--role` chooses what a node runs: `all` (the default) both; `receiver` the HTTP side
alone, stateless, so several can stand behind a load balancer; `worker` the worker
(with /healthz, without /webhook). Roles on several machines share the queue through
PostgreSQL (`[storage] database_url`), which also wakes the workers (LISTEN/NOTIFY).

The receiver process answers Gitea (verify, parse, write rows, answer) and
nothing else. The worker process, started and watched by the receiver, runs the
scheduler, the tick and the agents. Keeping them apart means git and agent
subprocesses, Gitea API calls and output parsing never hold the interpreter while
a delivery waits for its answer, and a crash in one shows in the other.

They share only the database and a pipe: the receiver writes a byte to wake the
worker at once; when the receiver dies, the worker reads end-of-file and stops
its agents, putting their tasks back in the queue.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from bot import __version__, agents, dashboard, sandbox
from bot.config import Config
from bot.core import metrics
from bot.core.health import Facts, Readiness, TickRecord, describe, not_ready, problems
from bot.priority import lower_own_priority
from bot.redact import redact
from bot.scheduler import HEARTBEAT_SECONDS
from bot.store import DATABASE_ERRORS

if TYPE_CHECKING:
    from bot.gitea import GiteaClient
    from bot.workspace import Workspace

log = logging.getLogger("kugetsu")

#: what `kugetsu serve --role` accepts
ROLES = ("all", "receiver", "worker")

#: the receiver's HTTP threads for the webhook and /healthz (the dashboard adds its own)
HTTP_THREADS = 8
#: how long the worker gets to stop its agents before it is killed
WORKER_STOP_EXTRA_SECONDS = 30.0
WORKER_RESTART_DELAY_SECONDS = 2.0
#: a worker commit that leaves more pages than this (4 KiB each) in the WAL checkpoints it
WORKER_CHECKPOINT_PAGES = 1000
#: how often the worker measures the disk use of mirrors, worktrees and logs (/metrics)
DISK_USAGE_SECONDS = 600.0
#: how often the receiver writes the deliveries it refused without a write (/metrics)
REFUSED_FLUSH_SECONDS = 5.0


def known_agents(config: Config) -> frozenset[str]:
    """The agents configured: every preset and every `[agents.NAME]` table."""
    return agents.configured(config.agents)


def _signals(stop: threading.Event, *, level: int = logging.INFO) -> None:
    """Stop on SIGTERM and SIGINT. The worker gets the receiver's signal too (Ctrl-C
    reaches the whole process group; the receiver passes SIGTERM on), so it logs it at
    `level` DEBUG and the shutdown is logged once."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.log(level, "shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


# --------------------------------------------------------------------------- the worker


def run_worker(
    config: Config,
    wake_fd: int | None,
    *,
    log_level: str = "INFO",
    fd_limit: int | None = None,
    launcher: str | None = None,
) -> int:
    """The worker process: scheduler, tick and agents. `fd_limit`: the soft limit
    of open files the receiver found before it raised its own (httpserver.raise_fd_limit),
    for the worker, git and the agents. `launcher`: the socket of the sandbox's launcher
    the receiver started; None runs agents as this process's own user."""
    from bot.httpserver import prepare_interpreter
    from bot.logs import configure_logging
    from bot.scheduler import Scheduler
    from bot.store import open_store
    from bot.worker.tick import Worker

    if fd_limit is not None:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (fd_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )
    configure_logging(log_level, config.secrets(), output=config.logging.format)
    # Before any thread starts: threads and child processes inherit it.
    niceness = lower_own_priority(config.agents.nice)
    storage = config.storage
    # the worker keeps the write-ahead log short; the receiver never checkpoints
    store = open_store(
        storage.database,
        checkpoint_pages=WORKER_CHECKPOINT_PAGES,
        notify=config.notify_routes(),
    )
    gitea = gitea_client(config)
    workspace = workspace_of(config)
    # the heartbeat renews the leases of running tasks: several times per lease
    scheduler = Scheduler(
        config.queue.poll_interval_seconds,
        heartbeat_seconds=min(HEARTBEAT_SECONDS, config.worker.lease_seconds / 3),
    )
    worker = Worker(
        config,
        store,
        gitea,
        workspace,
        schedule_tick=scheduler.wake,
        schedule_at=scheduler.wake_at,
        counts=gitea.tally,
        sandbox=(sandbox.sandbox_for(config, Path(launcher)) if launcher else sandbox.NoSandbox()),
    )

    stop = threading.Event()
    _signals(stop, level=logging.DEBUG)
    prepare_interpreter()
    worker.start()
    from bot.doctor import SERVE_RECHECK_SECONDS, ServeChecks

    checks = ServeChecks(
        config, store, worker.worker_id, launcher=Path(launcher) if launcher else None
    )
    scheduler.start(
        worker.run_tick,
        heartbeat=worker.heartbeat,
        cleanup=worker.cleanup,
        every=[
            ("disk usage", DISK_USAGE_SECONDS, worker.measure_disk),
            ("checks", SERVE_RECHECK_SECONDS, checks),
        ],
        reconcile=worker.reconcile,
        reconcile_seconds=config.reconcile.interval_seconds,
    )
    if wake_fd is not None:
        threading.Thread(
            target=_read_wakes, args=(wake_fd, worker.wake, stop), name="wake", daemon=True
        ).start()
    # deliveries taken by a receiver on any machine wake this worker (PostgreSQL)
    store.listen(worker.wake, stop)
    log.info(
        "worker started",
        extra={"pid": os.getpid(), "worker": worker.worker_id, "nice": niceness},
    )
    while not stop.wait(1.0):
        pass
    scheduler.shutdown()
    worker.shutdown()
    store.close()
    log.debug("worker stopped")
    return 0


def gitea_client(config: Config, *, retries: int | None = None) -> GiteaClient:
    """The Gitea client of the configuration (no I/O); `retries` in place of the configured
    ones (0 for a check, which must say at once what it finds)."""
    from bot.gitea import GiteaClient

    return GiteaClient(
        config.gitea.url,
        config.gitea.token,
        timeout=config.gitea.timeout_seconds,
        retries=config.gitea.retries if retries is None else retries,
    )


def workspace_of(config: Config) -> Workspace:
    """The git workspaces of the configuration's data directory (no I/O)."""
    from bot.workspace import Workspace

    storage = config.storage
    return Workspace(
        mirrors_dir=storage.mirrors_dir,
        worktrees_dir=storage.worktrees_dir,
        remote_url=config.gitea.git_url,
        token=config.gitea.token,
        author_name=config.git.author_name,
        author_email=config.git.author_email,
        secrets=config.secrets(),
    )


def _read_wakes(fd: int, wake: Callable[[], None], stop: threading.Event) -> None:
    """Each byte from the receiver is a wake; end-of-file means the receiver is gone."""
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            if not stop.is_set():
                log.warning("receiver process is gone; stopping the worker")
                stop.set()
            return
        wake()


# --------------------------------------------------------------------------- the receiver


class WorkerProcess:
    """Starts the worker, wakes it through a pipe, restarts it if it dies."""

    def __init__(
        self,
        config: Config,
        log_level: str,
        fd_limit: int | None = None,
        launcher: Path | None = None,
    ):
        self.config, self.log_level, self.fd_limit = config, log_level, fd_limit
        self.launcher = launcher
        self.proc: subprocess.Popen[bytes] | None = None
        self._wake_w: int | None = None
        self._lock = threading.Lock()
        self.restarts = 0
        self.started_at: float | None = None

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        argv = [
            sys.executable,
            "-m",
            "bot",
            "worker",
            "--wake-fd",
            str(read_fd),
            "--log-level",
            self.log_level,
        ]
        if self.launcher is not None:
            argv += ["--launcher", str(self.launcher)]
        if self.fd_limit is not None:
            argv += ["--fd-limit", str(self.fd_limit)]
        if self.config.source and not self.config.source.startswith("("):
            # absolute: the service user may not search the directory serve started in
            argv += ["--config", os.path.abspath(self.config.source)]
        try:
            # same environment: the worker resolves the same config and secrets
            self.proc = subprocess.Popen(argv, pass_fds=(read_fd,), stdin=subprocess.DEVNULL)
            self.started_at = time.time()
        finally:
            os.close(read_fd)
        with self._lock:
            old, self._wake_w = self._wake_w, write_fd
        if old is not None:
            os.close(old)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def wake(self) -> None:
        with self._lock:
            fd = self._wake_w
            if fd is None:
                return
            try:
                os.write(fd, b"w")
            except BlockingIOError:
                pass  # the pipe is full of wakes already
            except OSError:
                pass  # the worker is gone; the supervisor loop restarts it

    def watch(self) -> None:
        """Called every second: restart a worker that died."""
        if self.proc is not None and self.proc.poll() is not None:
            log.error("worker exited; restarting it", extra={"code": self.proc.returncode})
            self.restarts += 1
            time.sleep(WORKER_RESTART_DELAY_SECONDS)
            self.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.config.agents.kill_grace_seconds + WORKER_STOP_EXTRA_SECONDS)
            except subprocess.TimeoutExpired:
                log.error("worker did not stop; killing it")
                self.proc.kill()
                self.proc.wait()
        with self._lock:
            if self._wake_w is not None:
                os.close(self._wake_w)
                self._wake_w = None


#: set in the database once everything in the data directory was made private
PRIVATE_MARK = "data_dir_private"


def make_private(data_dir: Path, *, deep: bool) -> int:
    """Take group and other access away from the data directory and what is in it: the
    entries at its top (the database and its -wal and -shm, the folders), or with `deep`
    everything below too. Returns how many modes changed.

    New files are private anyway (the command line sets the umask to 077); this tightens
    an install made before. The directory's own 0700 already keeps others out of all of
    it. Symbolic links are not followed; an entry that cannot be changed is logged.
    """
    changed = 0

    def tighten(path: str, entry: os.DirEntry[str] | None = None) -> int | None:
        """Its mode, made private; None if it cannot be read or changed, or is a link."""
        nonlocal changed
        try:
            mode = (entry.stat(follow_symlinks=False) if entry else os.lstat(path)).st_mode
            if stat.S_ISLNK(mode):
                return None
            if mode & 0o077:
                os.chmod(path, stat.S_IMODE(mode) & ~0o077)
                changed += 1
            return mode
        except OSError as exc:
            log.warning("cannot make a data file private", extra={"path": path, "error": str(exc)})
            return None

    top = os.fspath(data_dir)
    pending = [top] if tighten(top) is not None else []
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:
            log.warning("cannot list a data folder", extra={"path": folder, "error": str(exc)})
            continue
        for entry in entries:
            mode = tighten(entry.path, entry)
            if deep and mode is not None and stat.S_ISDIR(mode):
                pending.append(entry.path)
    return changed


class ReceiverHealth:
    """/healthz and /readyz of `kugetsu serve`: the worker process, its ticks and its
    checks as it reports them through the database, the free space of the data directory,
    and deliveries that could not be stored. `(alive, details)`: alive is False only when
    the worker is not running; details["problems"] names each problem in one line, and
    details["not_ready"] what /readyz answers 503 for."""

    def __init__(
        self,
        config: Config,
        store: Any,
        worker: Any,
        clock: Callable[[], float] = time.time,
        sandbox_warnings: tuple[str, ...] = (),
    ):
        self.config, self.store, self.worker, self.clock = config, store, worker, clock
        self.sandbox_warnings = sandbox_warnings
        self._write_failure: tuple[float, str] | None = None

    def store_failed(self, exc: BaseException) -> None:
        """A delivery could not be stored (a full disk, a broken database)."""
        self._write_failure = (self.clock(), describe(exc))

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        now = self.clock()
        alive = self.worker.alive
        facts: dict[str, Any] = {
            "now": now,
            "worker_alive": alive,
            "worker_up_since": self.worker.started_at,
            "write_failure": self._write_failure,
            "min_free_bytes": self.config.storage.min_free_mb * 1024 * 1024,
            "sandbox_warnings": self.sandbox_warnings,
        }
        try:
            facts["free_bytes"] = shutil.disk_usage(self.config.storage.data_dir).free
        except OSError as exc:
            facts["disk_error"] = describe(exc)
        if self.worker.pid is None:
            # a receiver alone: it has no worker to ask about, only the database
            try:
                self.store.schema_version()
            except DATABASE_ERRORS as exc:
                facts["database_error"] = describe(exc)
        elif alive:
            host = self.config.worker.host or socket.gethostname()
            try:
                report = self.store.worker_report(host, self.worker.pid)
            except DATABASE_ERRORS as exc:
                facts["database_error"] = describe(exc)
            else:
                if report is not None:
                    facts.update(
                        registered=True,
                        heartbeat_at=report[0],
                        tick=TickRecord.from_json(report[1]),
                        readiness=Readiness.from_json(report[2]),
                    )
        known = Facts(**facts)
        secrets = self.config.secrets()
        found = [redact(line, secrets) for line in problems(known)]
        return alive, {
            "problems": found,
            "not_ready": [redact(line, secrets) for line in not_ready(known)],
            "worker": "running" if alive else "stopped",
            "worker_restarts": self.worker.restarts,
            "version": __version__,
        }


def _sandbox_up(config: Config, log_level: str) -> sandbox.LauncherProcess:
    """Started as root (or with the launcher's capabilities): the data directory goes to
    the service user, the launcher starts, and this process becomes the service user with
    no privilege left, before it opens the database or starts the worker."""
    account = sandbox.service_account(config)
    assert account is not None  # state() said the sandbox can be had
    slots = sandbox.slot_uids(config)
    if os.geteuid() == 0:
        sandbox.prepare_data_dir(config.storage, account, slots)
    launcher = sandbox.start_launcher(
        config,
        account,
        socket_path=config.storage.launcher_socket(os.getpid()),
        log_level=log_level,
    )
    try:
        sandbox.drop_privileges(account)
    except BaseException:
        launcher.stop()
        raise
    log.info(
        "sandbox on",
        extra={"uid": account.uid, "first_uid": config.sandbox.first_uid, "slots": len(slots)},
    )
    return launcher


class RefusedDeliveries:
    """Deliveries the receiver answered without writing (refused: 400, 401, 413, 415; or
    not stored: 503), counted in memory and added to the counters at most every few
    seconds, and before each scrape of /metrics. Most deliveries are counted in their own
    transaction (bot/ingest.py)."""

    def __init__(self, store: Any, clock: Callable[[], float] = time.monotonic):
        self.store, self.clock = store, clock
        self.tally = metrics.Tally()
        self._flushed_at = float("-inf")

    def flush(self, *, every: float = 0.0) -> None:
        if not self.tally or self.clock() - self._flushed_at < every:
            return
        self._flushed_at = self.clock()
        counts = self.tally.take()
        try:
            self.store.add_counts(None, counts)
        except DATABASE_ERRORS as exc:
            self.tally.give_back(counts)  # the database cannot be written: later
            log.warning("refused deliveries not counted yet", extra={"error": str(exc)})

    def flushed(self, scrape: Callable[[], bytes]) -> Callable[[], bytes]:
        """`scrape`, after writing what is counted in memory."""

        def run() -> bytes:
            self.flush()
            return scrape()

        return run


class NoWorker:
    """The worker of a node that runs none (`--role receiver`): /healthz never calls it
    down, and wakes go to the workers through the database."""

    alive = True
    pid: int | None = None
    started_at: float | None = None
    restarts = 0

    def __init__(self, wake: Callable[[], None]):
        self.wake = wake

    def watch(self) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def serve(config: Config, *, log_level: str = "INFO", role: str = "all") -> int:
    """The node's main process: the HTTP server (the webhook receiver unless `role` is
    "worker"), supervising the worker process (unless `role` is "receiver")."""
    from bot.app import create_app
    from bot.httpserver import HttpServer, prepare_interpreter, raise_fd_limit
    from bot.ingest import RulesSource
    from bot.logs import configure_logging
    from bot.metrics import render as render_metrics
    from bot.store import open_store
    from bot.wake import Listener

    configure_logging(log_level, config.secrets(), output=config.logging.format)
    storage = config.storage
    if storage.data_dir.exists() and not storage.data_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(storage.data_dir))
    where = sandbox.state(config)
    if where.error:
        print(f"kugetsu: {where.error}", file=sys.stderr)
        return 2
    for warning in where.warnings:
        log.warning("not as safe as it could be", extra={"problem": warning})
    launcher = None
    if where.active:
        try:
            launcher = _sandbox_up(config, log_level)
        except (sandbox.SandboxError, OSError) as exc:
            print(f"kugetsu: sandbox: {exc}", file=sys.stderr)
            return 2
    storage.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    make_private(storage.data_dir, deep=False)  # the database files before they are opened
    # migrate before the worker starts
    store = open_store(storage.database, notify=config.notify_routes())
    if store.get_meta(PRIVATE_MARK) is None:
        # once per data directory: what earlier versions wrote under the umask
        changed = make_private(storage.data_dir, deep=True)
        store.set_meta(PRIVATE_MARK, "1")
        if changed:
            log.info("data directory made private", extra={"changed": changed})
    # waitress holds a file per connection; the worker gets the limit it had back
    fd_limit = raise_fd_limit()
    worker: WorkerProcess | NoWorker = (
        NoWorker(store.wake_workers)
        if role == "receiver"
        else WorkerProcess(
            config,
            log_level,
            fd_limit=fd_limit,
            launcher=launcher.socket if launcher is not None else None,
        )
    )
    health = ReceiverHealth(config, store, worker, sandbox_warnings=where.warnings)
    refused = RefusedDeliveries(store)
    app = create_app(
        config,
        store,
        # what a request may name and `help` lists: the agents installed here
        rules=RulesSource(config, store, agents.available(config.agents, os.environ)),
        wake=worker.wake,
        health=health,
        store_failed=health.store_failed,
        refused=refused.tally,
        scrape=refused.flushed(partial(render_metrics, config, store)),
        receive=role != "worker",
    )
    stop = threading.Event()
    _signals(stop)
    # the port first: a port in use ends the start before any worker runs
    server = HttpServer(
        app,
        config.server.host,
        config.server.port,
        max_body_bytes=config.server.max_body_bytes,
        threads=HTTP_THREADS + dashboard.http_threads(config),
    ).start()
    worker.start()
    waker = Listener(storage.data_dir, worker.wake).start()
    prepare_interpreter()
    log.info(
        "kugetsu serving",
        extra={
            "url": server.url,
            "role": role,
            "data_dir": str(storage.data_dir),
            "database": store.describe(),
            "config": config.source,
            "sandbox": where.mode,
        },
    )
    print(
        f"kugetsu {__version__} listening on {server.url} as {role} "
        f"(data in {storage.data_dir}, database {store.describe()})",
        flush=True,
    )
    code = 0
    while not stop.wait(1.0):
        worker.watch()
        refused.flush(every=REFUSED_FLUSH_SECONDS)
        if launcher is not None and not launcher.alive:
            log.error("the sandbox's launcher is gone; stopping, to be started again")
            code = 1
            break
    waker.close()
    server.stop()
    worker.stop()
    refused.flush()
    store.close()
    if launcher is not None:
        launcher.stop()
    log.info("stopped")
    return code
