"""Shared fixtures: a fake Gitea with a real git remote, configs, task helpers.

`KUGETSU_TEST_SANDBOX=user` runs the suite with the sandbox on (it needs root): configs from
`make_config` and the e2e tests' `write_config` get `sandbox.mode = "user"`, each data
directory an in-process worker uses gets its own launcher, and agents run as slot uids, a
range of them for each test (`first_uid`). The tests that build such configs are marked
`both_modes` (`depends_on_mode`), so CI can run just them with the sandbox on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.config import (
    AgentConfig,
    AgentsConfig,
    Config,
    GitConfig,
    GiteaConfig,
    QueueConfig,
    SandboxConfig,
    ServerConfig,
    StorageConfig,
)
from bot.core.tasks import Kind, State, Task

ROOT = Path(__file__).resolve().parent
FAKE_AGENT = ROOT / "fixtures" / "bin" / "fake_agent.py"
TOKEN = "kgt-SECRET-token-0123456789abcdef"
SECRET = "kugetsu-test-secret"
REPO = "acme/widget"

#: "user": the suite runs with the sandbox on (KUGETSU_TEST_SANDBOX=user, as root)
SANDBOX = os.environ.get("KUGETSU_TEST_SANDBOX", "none")
#: the uid `kugetsu serve` drops to in sandbox runs (no account needed)
SERVICE_UID = 29999


def runnable_by_others(path: str) -> bool:
    """True if a uid that is neither root nor the file's owner can run `path`: every folder
    above it searchable by others and the file executable by them."""
    real = Path(os.path.realpath(path))
    if not os.stat(real).st_mode & 0o001:
        return False
    return all(os.stat(folder).st_mode & 0o001 for folder in real.parents)


#: the interpreter fake agents run with: the suite's own unless slot uids cannot run it
#: (a Python installed under root's home), then the system's
AGENT_PYTHON = (
    sys.executable
    if SANDBOX != "user" or runnable_by_others(sys.executable)
    else "/usr/bin/python3"
)


def fake_agent(name: str = "fake", **env: str) -> AgentConfig:
    return AgentConfig(
        name=name,
        command=(AGENT_PYTHON, str(FAKE_AGENT), "{prompt}"),
        env={k: str(v) for k, v in env.items()},
    )


#: a test run's share of uids for its tests' slots, and each test's share of that
UIDS_PER_RUN = 1_000_000
UIDS_PER_TEST = 100  # more than any test's max_concurrent_agents
_uid_block: int | None = None
_tests_given_uids = 0
_test_first_uid: int | None = None


def _claim_uid_block() -> int:
    """The first of UIDS_PER_RUN uids that no other test run on this machine gives its
    slots while this one lives: each run holds a lock on its block's file until it exits
    (a run that ends, however it ends, lets go of it)."""
    import fcntl
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"kugetsu-test-uids-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    # blocks from 1_000_000 up: clear of the default first_uid (20000), which runs of
    # other checkouts and kugetsu itself use, and of system and login accounts
    for block in range(1, 2_000_000_000 // UIDS_PER_RUN):
        fd = os.open(folder / f"{block}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return block * UIDS_PER_RUN  # the descriptor stays open: the lock lives with the run
    raise RuntimeError(f"every block of test uids in {folder} is held by a running test run")


def first_uid() -> int:
    """The current test's sandbox.first_uid: its slots' uids are its own, never those of
    another test of this run or of another test run on the machine. Every launcher sweeps
    its slot uids before it starts an agent, so two launchers that shared a uid (a test's
    `serve` lingering while the next test runs, or two runs at once) would kill each
    other's agents."""
    global _uid_block, _tests_given_uids, _test_first_uid
    if _test_first_uid is None:
        if _uid_block is None:
            _uid_block = _claim_uid_block()
        offset = _tests_given_uids % (UIDS_PER_RUN // UIDS_PER_TEST)
        _tests_given_uids += 1
        _test_first_uid = _uid_block + offset * UIDS_PER_TEST
    return _test_first_uid


#: the marker of tests whose outcome may depend on KUGETSU_TEST_SANDBOX: CI runs the whole
#: suite without the sandbox and these again with it (.ci/run: pytest -m both_modes)
BOTH_MODES = "both_modes"
_test_depends_on_mode = False


def depends_on_mode() -> None:
    """The current test builds what the suite's mode changes: a config from `make_config`
    or a `kugetsu serve` config file that leaves [sandbox] to the mode. It must be marked
    BOTH_MODES (checked when it ends), so that CI runs it with the sandbox on too."""
    global _test_depends_on_mode
    _test_depends_on_mode = True


#: data directory -> (slots, the launcher started for in-process workers on it)
_launchers: dict[Path, tuple[int, object]] = {}


def sandbox_config(data_dir: Path, slots: int) -> SandboxConfig:
    """The [sandbox] of configs built in-process: on in sandbox runs, with a launcher for
    `data_dir` whose service user is this process's (root): what `serve` starts before it
    drops privileges, for workers that tests build themselves."""
    depends_on_mode()
    if SANDBOX != "user":
        return SandboxConfig()
    settings = SandboxConfig(mode="user", user=str(os.getuid()), first_uid=first_uid())
    running = _launchers.get(data_dir)
    if running is None or running[0] < slots:
        from bot import sandbox

        if running is not None:
            running[1].stop()  # type: ignore[attr-defined]
        data_dir.mkdir(parents=True, exist_ok=True)
        config = Config(
            storage=StorageConfig(data_dir=data_dir),
            queue=QueueConfig(max_concurrent_agents=slots),
            sandbox=settings,
        )
        account = sandbox.Account(None, os.getuid(), os.getgid())
        _launchers[data_dir] = (slots, sandbox.start_launcher(config, account))
    return settings


def make_config(
    data_dir: Path,
    gitea_url: str,
    *,
    agents: dict[str, AgentConfig] | None = None,
    default: str = "fake",
    fallback: tuple[str, ...] = (),
    limit: int = 3,
    attempts: int = 3,
    timeout_minutes: float = 1.0,
    grace: float = 1.0,
    public_url: str = "http://kugetsu.test:8080",
    database_url: str = "",
    **agents_kw,
) -> Config:
    agents = agents or {"fake": fake_agent()}
    return Config(
        server=ServerConfig(public_url=public_url),
        gitea=GiteaConfig(
            url=gitea_url,
            token=TOKEN,
            webhook_secret=SECRET,
            bot_login="kugetsu-bot",
            retries=2,
            timeout_seconds=5,
        ),
        storage=StorageConfig(data_dir=data_dir, database_url=database_url),
        queue=QueueConfig(
            poll_interval_seconds=30,
            max_concurrent_agents=limit,
            max_attempts=attempts,
            retry_backoff_seconds=(0.0,),
        ),
        agents=AgentsConfig(
            default=default,
            fallback=fallback,
            timeout_minutes=timeout_minutes,
            kill_grace_seconds=grace,
            tables=agents,
            **agents_kw,
        ),
        git=GitConfig(author_name="kugetsu", author_email="kugetsu@example.invalid"),
        sandbox=sandbox_config(data_dir, limit),
    )


def enqueue(store, **task) -> int:
    """Queue a task as intake does, in a write transaction of its own (the fields of
    `Store.insert_task`)."""
    with store.tx() as c:
        return store.insert_task(c, **task)


#: what a start on acme/widget#7 by alice is queued with (`enqueue(store, **A_START)`)
A_START: dict = dict(
    repo="acme/widget",
    issue=7,
    kind=Kind.START,
    prompt="",
    agent="opencode",
    requested_by="alice",
    max_attempts=3,
)


def a_task(**kw) -> Task:
    """A task as the store would give it, for tests that need no database: task 12, the
    start A_START queues, pending, nothing run yet; `kw` overrides any field."""
    base: dict = dict(A_START, id=12, state=State.PENDING, attempts=0)
    base.update(kw)
    return Task(**base)


def queue_task(store, issue: int = 3, **kw) -> int:
    """An authorized start on REPO#issue by alice for the agent "fake" (`enqueue`)."""
    fields = dict(
        repo=REPO,
        issue=issue,
        kind="start",
        prompt="",
        agent="fake",
        requested_by="alice",
        max_attempts=3,
        authorized=True,
    )
    return enqueue(store, **{**fields, **kw})


def task_events(store, task_id: int) -> list[dict]:
    """A task's events, oldest first (what the store records with each change)."""
    rows = store._conn().execute(
        "SELECT at, from_state, to_state, event, detail FROM task_events "
        "WHERE task_id = ? ORDER BY id",
        (task_id,),
    )
    return [dict(r) for r in rows]


def write_unchecked(db, sql: str, args: tuple = ()) -> int | None:
    """Write to the database as no code path of kugetsu can: past the triggers that refuse
    values kugetsu does not know (a row written before they existed, by hand, or by
    corruption). The triggers are back when this returns. `db`: a SQLite file's path
    (returns the last row id) or a store of either backend."""
    import sqlite3

    from bot.store import MIGRATIONS, _statements

    if not isinstance(db, Path):
        if db.BACKEND == "sqlite":
            db = db.path
        else:
            with db.tx() as c:
                c.execute("ALTER TABLE tasks DISABLE TRIGGER tasks_known_values")
                c.execute(sql, args)
                c.execute("ALTER TABLE tasks ENABLE TRIGGER tasks_known_values")
            return None
    db_path = db

    triggers = MIGRATIONS[6].sqlite
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DROP TRIGGER tasks_known_values_on_insert")
        conn.execute("DROP TRIGGER tasks_known_values_on_update")
        row_id = conn.execute(sql, args).lastrowid
        for statement in _statements(triggers):
            conn.execute(statement)
        conn.execute("COMMIT")
        return row_id
    finally:
        conn.close()


def logged(caplog) -> str:
    """All that the captured log records hold: each message and every field of the record
    (what `extra=` put there too, which caplog.text leaves out)."""
    return "\n".join(
        f"{r.getMessage()} {sorted((k, str(v)) for k, v in r.__dict__.items())}"
        for r in caplog.records
    )


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 30.0,
    interval: float = 0.05,
    tick: Callable[[], None] | None = None,
    what: str = "condition",
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


_sandbox_basetemp: str | None = None


def pytest_configure(config):
    """Sandbox runs keep their temporary folders where other uids can reach them: pytest's
    own folder is private to its user (and put back to 0700 by every pytest run)."""
    global _sandbox_basetemp
    if SANDBOX == "user" and not config.option.basetemp:
        import tempfile

        _sandbox_basetemp = tempfile.mkdtemp(prefix="kugetsu-sandbox-tests-")
        os.chmod(_sandbox_basetemp, 0o711)
        config.option.basetemp = os.path.join(_sandbox_basetemp, "t")


def pytest_unconfigure(config):
    if _sandbox_basetemp is not None:
        import shutil

        shutil.rmtree(_sandbox_basetemp, ignore_errors=True)


def open_to_other_uids(path: Path) -> None:
    """`path` writable by every uid, and the folders above it searchable (not readable) by
    them: for slot uids and kugetsu's service user in tests that run the sandbox."""
    path.chmod(0o777)
    for folder in path.parents:
        mode = folder.stat().st_mode
        if not mode & 0o001:
            folder.chmod((mode & 0o7777) | 0o011)


@pytest.fixture
def shared_tmp():
    """A folder every uid can reach and write, for tests that run the sandbox (slot uids and
    kugetsu's service user work there): outside pytest's own, which is private to root and
    which every pytest run started meanwhile sets back to 0700."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="kugetsu-sandbox-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def reachable_in_sandbox(path: Path) -> Path:
    """`path`, which pytest made private to root: in sandbox runs, opened to agents (slot
    uids) and `kugetsu serve`'s service user (`open_to_other_uids`), who work there."""
    if SANDBOX == "user":
        open_to_other_uids(path)
    return path


@pytest.fixture(autouse=True)
def sandboxed(tmp_path, request):
    """In sandbox runs: agents (slot uids) and `kugetsu serve`'s service user can reach the
    test's folder and write what the fake agent records there; the launchers started for
    the test stop with it, and the next test's slots have uids of their own (`first_uid`).
    In either mode, a test that depends on the mode (`depends_on_mode`) is marked so."""
    global _test_first_uid, _test_depends_on_mode
    reachable_in_sandbox(tmp_path)
    yield
    while _launchers:
        _data_dir, (_slots, launcher) = _launchers.popitem()
        launcher.stop()  # type: ignore[attr-defined]
    _test_first_uid = None
    unmarked = _test_depends_on_mode and not request.node.get_closest_marker(BOTH_MODES)
    _test_depends_on_mode = False
    if unmarked:
        pytest.fail(
            f"{request.node.nodeid} runs what KUGETSU_TEST_SANDBOX changes (make_config, or "
            f"write_config without [sandbox]): mark it @pytest.mark.{BOTH_MODES}",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def services_stopped():
    """The `kugetsu serve` processes a test started (tests/service.py) stop with it, also
    when it fails half-way: one left running would go on running agents. (Those of wider
    fixtures, started before the test, stop with their fixture.)"""
    service = sys.modules.get("tests.service")
    before = set(service.Service.started) if service is not None else set()
    yield
    service = sys.modules.get("tests.service")
    if service is not None:
        service.Service.stop_all(but=before)


@pytest.fixture(autouse=True)
def umask_restored():
    """`kugetsu`'s main() sets the process umask; tests that call it in-process must not
    change it for the tests after them."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)


@pytest.fixture
def gitea(tmp_path):
    from tests.fakegitea import FakeGitea

    with FakeGitea(tmp_path / "gitea", token=TOKEN) as fake:
        fake.create_repo(REPO, files={"README.md": "# widget\n"})
        fake.set_permission(REPO, "alice", "write")
        fake.set_permission(REPO, "bob", "admin")
        fake.set_permission(REPO, "mallory", "read")
        yield fake


def peak_overlap(record: Path) -> tuple[int, int]:
    """From a fake agent's FAKE_RECORD file: (number of start/end events, most agents
    running at the same moment)."""
    events = []
    for line in record.read_text().splitlines():
        what, _task, at = line.split()
        events.append((float(at), 1 if what == "start" else -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return len(events), peak


def process_gone(pid: int) -> bool:
    """True if no live process has this pid (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@dataclass(frozen=True)
class AgentPid:
    """A pid as an agent saw itself, in the PID namespace it ran in (the sandbox gives an
    agent one of its own where it can: then its pid means nothing in the test's)."""

    pid: int
    namespace: str

    def host(self) -> int | None:
        """Its pid as the test sees it; None when no such live process is left."""
        if self.namespace == os.readlink("/proc/self/ns/pid"):
            return None if process_gone(self.pid) else self.pid
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != self.namespace:
                    continue
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
            if int(nspid.split()[-1]) == self.pid and not process_gone(int(entry)):
                return int(entry)
        return None

    def alive(self) -> bool:
        return self.host() is not None


def agent_pids(pidfile: Path) -> list[AgentPid]:
    """The pids a fake agent wrote (FAKE_PIDFILE), with the namespace it saw them in."""
    pids, namespace = pidfile.read_text().splitlines()[:2]
    return [AgentPid(int(pid), namespace.removeprefix("ns ")) for pid in pids.split()]


def agent_pid(pidfile: Path) -> int:
    """The pid, as the test sees it, of the fake agent that wrote `pidfile`; it runs."""
    [agent] = agent_pids(pidfile)
    pid = agent.host()
    assert pid is not None, f"the agent of {pidfile} is not running"
    return pid


@pytest.fixture
def unreaped():
    """Start a child, take its start token while it runs, let it exit and leave it unreaped
    (a zombie, as a worker killed with kill -9 is until its parent waits for it). Returns
    (pid, token taken while it ran). Reaped at the end of the test."""
    children = []

    def start() -> tuple[int, str]:
        from bot.process import process_start_token

        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        children.append(child)
        token = process_start_token(child.pid)
        assert token is not None
        child.stdin.close()
        # wait for it to exit without reaping it
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        with open(f"/proc/{child.pid}/stat") as fh:
            assert fh.read().rsplit(")", 1)[1].split()[0] == "Z"
        return child.pid, token

    yield start
    for child in children:
        child.wait()


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL cluster for the session: the one $KUGETSU_TEST_DATABASE_URL names (CI
    starts it, .ci/run), else one of the tests' own (tests/pg.py). Without either, the tests
    that need it are skipped, saying so, except in CI, where that is an error."""
    from tests.pg import PgCluster, Running, bin_dir

    if os.environ.get("KUGETSU_TEST_DATABASE_URL"):
        yield Running(os.environ["KUGETSU_TEST_DATABASE_URL"])
        return
    binaries = bin_dir()
    if binaries is None:
        if os.environ.get("CI"):
            raise RuntimeError("PostgreSQL is not installed (.ci/run installs it)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    cluster = PgCluster(binaries).start()
    yield cluster
    cluster.stop()


#: the store backends every contract test runs on
BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def make_store(backend, tmp_path, request):
    """Opens stores of the test's backend on one database: `make_store(clock=...)`. Each
    call is a new store (as a new process would open) on the same database."""
    from bot.store import open_store

    location = (
        str(tmp_path / "db.sqlite")
        if backend == "sqlite"
        else request.getfixturevalue("pg_cluster").url_for()
    )
    opened = []

    def make(**kw):
        store = open_store(location, **kw)
        opened.append(store)
        return store

    make.location = location
    yield make
    for store in opened:
        store.close()
