"""The worker's queries cost the same whether the database holds 100 finished tasks or 20,000.

A real worker ticks against the fake Gitea until its work is done (authorizing,
recovering a dead worker's task, claiming, running agents, replies, reactions, a status
reply, a stop and a retry, tracking comments), then beats its heart and runs the daily
cleanup. Every statement it ran on the database is recorded. Each is then run again on
two databases that hold the same live tasks and differ only in their history of
finished tasks (with their events, outbox rows, deliveries, issues and the replies
counted against the rate limit): the number of
SQLite virtual machine steps must be the same in both, and no query plan may read a
whole table that grows with use.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from bot.core.outbox import OutboxItem, OutboxKind
from bot.core.tasks import Kind
from bot.store import Store, open_store
from tests.conftest import REPO, enqueue
from tests.test_worker import Harness

pytestmark = pytest.mark.both_modes

#: tables whose size grows with use; a query may read one of them only through an index
GROWING = (
    "tasks",
    "task_events",
    "outbox",
    "deliveries",
    "issues",
    "replies",
    "repo_turns",
    "requester_turns",
)
#: live rows get ids from here on in every database, whatever the history before them
LIVE_IDS_FROM = 1_000_000
SMALL, LARGE = 100, 20_000
#: a statement of each kind the tick, the heartbeat and the cleanup must have run, so
#: that the comparison cannot pass by not running them
EXPECTED = {
    "recover: running tasks": "FROM tasks WHERE 1=1 AND state = ?",
    "authorize": "state = 'pending' AND authorized IS NULL",
    "claim": "NOT EXISTS",
    "outbox": "FROM outbox INDEXED BY outbox_gitea_due WHERE done_at IS NULL",
    "tracking comments": "comment_version < version",
    "queue positions": "queue.position AS queue_place FROM queue",
    "queue position": "SELECT position FROM queue WHERE id = ?",
    "claim: the fair order": "ROW_NUMBER() OVER (PARTITION BY w.repo, w.requested_by",
    "claim: the turn taken": "INSERT INTO requester_turns",
    "claim: agents busy": "COUNT(*) FROM tasks WHERE state = 'running'",
    "status reply and comments: tasks by state": "COUNT(*) FROM tasks WHERE state = ?",
    "heartbeat": "UPDATE workers SET heartbeat_at",
    "cleanup: tasks": "DELETE FROM tasks",
    "cleanup: deliveries": "DELETE FROM deliveries",
    "cleanup: outbox": "DELETE FROM outbox",
    "cleanup: replies": "DELETE FROM replies",
    "cleanup: old files": "SELECT id FROM tasks WHERE id IN",
    "cleanup: worktrees in use": "FROM tasks WHERE 1=1 AND state = ? ORDER BY id",
}


def add_history(store: Store, n: int, now: float) -> None:
    """n tasks finished within the last day, on issues no live task is about."""
    with store.tx() as c:
        c.executemany(
            "INSERT INTO tasks (id, repo, issue, kind, prompt, agent, requested_by, state, "
            "attempts, created_at, updated_at, started_at, finished_at, authorized, outcome, "
            "comment_id, comment_version, version, comment_body, pr_number, branch) "
            "VALUES (?, ?, ?, 'start', 'do it', 'fake', 'alice', ?, 1, ?, ?, ?, ?, 1, ?, ?, "
            "5, 5, 'done', ?, ?)",
            [
                (
                    i,
                    REPO,
                    10_000 + i // 3,
                    state,
                    t - 60,
                    t,
                    t - 50,
                    t,
                    outcome,
                    50_000 + i,
                    i,
                    f"kugetsu/issue-{10_000 + i // 3}",
                )
                for i in range(1, n + 1)
                for t in [now - 3600 - 4 * (n - i)]
                for state, outcome in [
                    [
                        ("completed", "succeeded"),
                        ("failed", "agent_failed"),
                        ("cancelled", "cancelled"),
                        ("rejected", None),
                    ][i % 4]
                ]
            ],
        )
        c.executemany(
            "INSERT INTO task_events (task_id, at, from_state, to_state, event) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                (i, now - 3600, a, b, "history")
                for i in range(1, n + 1)
                for a, b in ((None, "pending"), ("pending", "running"), ("running", "completed"))
            ],
        )
        c.executemany(
            "INSERT INTO outbox (id, repo, issue, kind, target, body, created_at, done_at) "
            "VALUES (?, ?, ?, 'reaction', ?, '', ?, ?)",
            [
                (i, REPO, 10_000 + i // 3, 60_000 + i, now - 3600, now - 3500)
                for i in range(1, n + 1)
            ],
        )
        c.executemany(
            "INSERT INTO deliveries (id, event, received_at, result) "
            "VALUES (?, 'issue_comment', ?, 'ignored')",
            [(f"history-{i}", now - 3600 - i) for i in range(2 * n)],
        )
        c.executemany(
            "INSERT INTO issues (repo, number, labels, updated_at) VALUES (?, ?, '[]', ?)",
            [(REPO, 10_000 + i, now - 3600) for i in range(n // 3 + 1)],
        )
        c.executemany(
            "INSERT INTO replies (repo, issue, login, at) VALUES (?, ?, ?, ?)",
            [(REPO, 10_000 + i // 3, f"user{i % 50}", now - 3600) for i in range(1, n + 1)],
        )
        # fair share remembers every repository and requester that ever got a slot
        c.executemany(
            "INSERT INTO repo_turns (repo, turn) VALUES (?, ?)",
            [(f"acme/old-{i}", i) for i in range(1, n // 10 + 1)],
        )
        c.executemany(
            "INSERT INTO requester_turns (repo, requested_by, turn) VALUES (?, ?, ?)",
            [(f"acme/old-{i % (n // 10)}", f"user{i}", i) for i in range(1, n // 2 + 1)],
        )
        c.execute(
            "UPDATE sqlite_sequence SET seq = ? WHERE name IN ('tasks', 'task_events', 'outbox')",
            (LIVE_IDS_FROM,),
        )


def add_live(store: Store, comment_id: int) -> None:
    """The same live work in every database: a task to authorize (issue 1), a task left
    running by a dead worker (2), a stopped task to retry (3), a queued task to stop (4),
    and a reaction, a reply and a status reply to send."""

    def queue(issue: int) -> int:
        return enqueue(
            store,
            repo=REPO,
            issue=issue,
            kind=Kind.START,
            prompt="",
            agent="fake",
            requested_by="alice",
            max_attempts=3,
            permission_hint="write",
        )

    queue(1)
    orphan = queue(2)
    store.mark_authorized([(orphan, "test")])
    store.register_worker("gone", pid=2**22 + 1, pid_start="gone")
    assert [t.id for t in store.claim(3, "gone")] == [orphan]
    store.request_cancel(queue(3), "alice")
    queue(4)
    with store.tx() as c:
        store.add_outbox(c, OutboxItem(OutboxKind.REACTION, REPO, 1, target=comment_id))
        store.add_outbox(c, OutboxItem(OutboxKind.COMMENT, REPO, 1, body="Queued."))
        store.add_outbox(c, OutboxItem(OutboxKind.STATUS, REPO, 1, target=1))
        for issue, kind in ((3, OutboxKind.RETRY), (4, OutboxKind.STOP)):
            store.add_outbox(
                c,
                OutboxItem(
                    kind,
                    REPO,
                    issue,
                    target=issue,
                    requested_by="alice",
                    permission_hint="write",
                    needs_permission=True,
                ),
            )


class Recording:
    """A store connection that notes each statement with its parameters, as bound: a
    statement's plan can depend on whether a value is written in it or bound."""

    def __init__(self, conn: sqlite3.Connection, seen: list[tuple[str, tuple]]):
        self._conn, self._seen = conn, seen

    def execute(self, sql: str, args=()):
        self._seen.append((sql, tuple(args)))
        return self._conn.execute(sql, args)

    def executemany(self, sql: str, rows):
        rows = [tuple(r) for r in rows]
        self._seen.extend((sql, r) for r in rows)
        return self._conn.executemany(sql, rows)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def record_statements(store: Store) -> list[tuple[str, tuple]]:
    """Every statement run on the store's connections from now on, with its parameters."""
    seen: list[tuple[str, tuple]] = []
    connect = store._conn
    store._conn = lambda: Recording(connect(), seen)  # type: ignore[method-assign]
    return seen


def steps(conn: sqlite3.Connection, sql: str, args: tuple) -> int:
    """SQLite virtual machine steps the statement takes; what it wrote is rolled back."""
    count = [0]

    def step() -> int:
        count[0] += 1
        return 0

    conn.execute("BEGIN")
    conn.set_progress_handler(step, 1)
    try:
        conn.execute(sql, args).fetchall()
    finally:
        conn.set_progress_handler(None, 1)
        conn.execute("ROLLBACK")
    return count[0]


def whole_table_reads(conn: sqlite3.Connection, sql: str, args: tuple) -> list[str]:
    """Plan lines that read a growing table in full (through a partial index is fine:
    it holds only the rows the query is after)."""
    partial = {
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql LIKE '% WHERE %'"
        )
    }
    bad = []
    for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args):
        detail = row[3]
        words = detail.split()
        if words[0] != "SCAN" or words[1] not in GROWING:
            continue
        if "INDEX" in words and words[words.index("INDEX") + 1] in partial:
            continue
        bad.append(detail)
    return bad


def build(path: Path, history: int, comment_id: int, now: float) -> Store:
    store = open_store(path)
    add_history(store, history, now)
    add_live(store, comment_id)
    return store


def test_tick_and_cleanup_queries_cost_the_same_at_100_and_20000_tasks(tmp_path, gitea):
    for n in range(1, 5):
        assert gitea.create_issue(REPO, f"Issue {n}", "Do something.") == n
    comment_id = int(gitea.add_comment(REPO, 1, "/kugetsu start")["id"])
    now = time.time()
    databases = {n: build(tmp_path / f"history-{n}.db", n, comment_id, now) for n in (SMALL, LARGE)}
    for store in databases.values():
        store.close()

    h = Harness(tmp_path, gitea)
    try:
        add_history(h.store, SMALL, now)
        add_live(h.store, comment_id)
        logs = h.config.storage.logs_dir
        for task_id in (1, 2, LIVE_IDS_FROM - 1):  # old logs: of two tasks kept, one gone
            (logs / f"{task_id}.log").write_text("old output\n")
            os.utime(logs / f"{task_id}.log", (now - 30 * 86400, now - 30 * 86400))
        seen = record_statements(h.store)
        h.settle(*range(LIVE_IDS_FROM + 1, LIVE_IDS_FROM + 5))
        h.worker.heartbeat()
        assert h.worker.cleanup(7.0).files == 1
    finally:
        h.close()

    statements = list(
        dict.fromkeys(
            (sql, args)
            for sql, args in seen
            if sql.split(None, 1)[0].upper() in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")
        )
    )
    small = sqlite3.connect(tmp_path / f"history-{SMALL}.db", isolation_level=None)
    large = sqlite3.connect(tmp_path / f"history-{LARGE}.db", isolation_level=None)
    assert large.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == LARGE + 4
    scans, grew = [], []
    for conn in (small, large):  # read the schema before the first statement is counted
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    for sql, args in statements:
        scans += [f"{sql} {args}\n    {line}" for line in whole_table_reads(large, sql, args)]
        a, b = steps(small, sql, args), steps(large, sql, args)
        if a != b:
            grew.append(f"{a} -> {b} steps: {sql} {args}")
    assert not scans and not grew, (
        "whole-table reads:\n"
        + "\n".join(scans)
        + "\nstatements that cost more with a longer history:\n"
        + "\n".join(grew)
    )
    missing = [
        what for what, part in EXPECTED.items() if not any(part in sql for sql, _ in statements)
    ]
    assert not missing, f"the scenario did not run: {missing}"
