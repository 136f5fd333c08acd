"""Shared fixtures: a fake Gitea with a real git remote, configs, task helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bot.config import (
    AgentConfig,
    AgentsConfig,
    Config,
    GitConfig,
    GiteaConfig,
    QueueConfig,
    ServerConfig,
    StorageConfig,
)

ROOT = Path(__file__).resolve().parent
FAKE_AGENT = ROOT / "fixtures" / "bin" / "fake_agent.py"
TOKEN = "kgt-SECRET-token-0123456789abcdef"
SECRET = "kugetsu-test-secret"
REPO = "acme/widget"


def fake_agent(name: str = "fake", **env: str) -> AgentConfig:
    return AgentConfig(
        name=name,
        command=(sys.executable, str(FAKE_AGENT), "{prompt}"),
        env={k: str(v) for k, v in env.items()},
    )


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
        storage=StorageConfig(data_dir=data_dir),
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
    )


def enqueue(store, **task) -> int:
    """Queue a task as intake does, in a write transaction of its own (the fields of
    `Store.insert_task`)."""
    with store.tx() as c:
        return store.insert_task(c, **task)


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


def write_unchecked(db_path: Path, sql: str, args: tuple = ()) -> int:
    """Write to the database as no code path of kugetsu can: past the triggers that refuse
    values kugetsu does not know (a row written before they existed, by hand, or by
    corruption). The triggers are back when this returns. Returns the last row id."""
    import sqlite3

    from bot.store import MIGRATIONS, _statements

    triggers = MIGRATIONS[6]
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
