"""The durable queue, the single source of truth: SQLite in WAL mode by default, or
PostgreSQL (`bot.pgstore.PostgresStore`) when several machines share one queue.

Every task is a row. A task's state changes only by compare-and-set
(`UPDATE ... WHERE id = ? AND state = ?`), in two places: `_transition()` (behind
`transition()`, `claim()`, `reject()` and `try_requeue()`), which checks every change
against `core.tasks.TRANSITIONS`; and `_set_aside_row()`, which fails a row that cannot
be read at all (a kind, state or outcome this code does not know), whatever its state,
so the query that met it goes on without it. `claim()` admits tasks up to the limit
inside its write transaction (`_admit`): on SQLite it counts running tasks under
`BEGIN IMMEDIATE`, which holds the file's write lock, so the limit holds across threads
and processes that share the file; on PostgreSQL each running task holds one of the
limit's slot rows, locked `FOR UPDATE SKIP LOCKED`, so it holds across machines.

One interface, two backends. Each query is written once, here, in the SQL both run
(`?` placeholders, `INSERT ... ON CONFLICT`, `RETURNING`); PostgresStore translates the
placeholders in one place and overrides only the plumbing (connections, transactions,
migrations' bookkeeping) and the few hooks where the engines differ (`_admit`,
`_lock_candidate`, `ROWID`, the slots). A new query is one method here; a new migration is
one entry in MIGRATIONS, in SQLite's dialect, which PostgreSQL runs with its column types
translated (`Dialects` where a statement differs, as triggers do). A method that may run
inside the caller's write transaction (`Store.tx()`) takes that transaction's connection
as its first parameter (`Tx`); where it may also run outside one, None reads on this
thread's own connection.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, cast

from bot.core import metrics, notify
from bot.core.outbox import OutboxItem, OutboxKind
from bot.core.tasks import (
    TERMINAL_STATES,
    CancelResult,
    Kind,
    Outcome,
    State,
    Task,
    check_transition,
)

log = logging.getLogger(__name__)


class Cursor(Protocol):
    """What a query gives back on either backend (sqlite3's cursor, psycopg's)."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """A connection as the store's queries use it: sqlite3's, or PostgresStore's session,
    which takes the same `?` placeholders."""

    @property
    def in_transaction(self) -> bool: ...
    def execute(self, sql: str, parameters: Any = (), /) -> Any: ...
    def executemany(self, sql: str, seq_of_parameters: Any, /) -> Any: ...


#: a row read by a query: `row["name"]`, `row[0]`, `row.keys()` and `dict(row)` on both backends
Row = Any


@dataclass(frozen=True)
class Dialects:
    """A migration whose statements differ between the engines (triggers, locks). A plain
    string in MIGRATIONS is SQLite's dialect and runs on PostgreSQL with its column types
    translated (`bot.pgstore.translate_ddl`)."""

    sqlite: str
    #: PostgreSQL's own script; None: SQLite's, translated
    postgres: str | None = None
    #: run on PostgreSQL after that: what PostgreSQL alone has (slot rows, wake triggers)
    postgres_extra: str = ""


# Each entry moves the schema from version i to i+1. Never edit a released entry;
# append a new one.
MIGRATIONS: tuple[str | Dialects, ...] = (
    # 1: the first schema
    """
    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        repo TEXT NOT NULL,
        issue INTEGER NOT NULL,
        kind TEXT NOT NULL,
        prompt TEXT NOT NULL DEFAULT '',
        agent TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL DEFAULT 3,
        not_before REAL NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        pid INTEGER,
        pid_start TEXT,
        worker_id TEXT,
        branch TEXT,
        worktree TEXT,
        session_id TEXT,
        pr_number INTEGER,
        comment_id INTEGER,
        trigger_comment_id INTEGER,
        outcome TEXT,
        error TEXT,
        authorized INTEGER,
        permission_hint TEXT,
        cancel_requested_by TEXT,
        version INTEGER NOT NULL DEFAULT 1,
        comment_version INTEGER NOT NULL DEFAULT 0,
        comment_body TEXT
    );
    CREATE INDEX tasks_by_state ON tasks (state, id);
    CREATE INDEX tasks_by_issue ON tasks (repo, issue, id);
    CREATE TABLE task_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
        at REAL NOT NULL,
        from_state TEXT,
        to_state TEXT,
        event TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX task_events_by_task ON task_events (task_id, id);
    CREATE TABLE deliveries (
        id TEXT PRIMARY KEY,
        event TEXT NOT NULL,
        received_at REAL NOT NULL,
        result TEXT
    );
    CREATE TABLE issues (
        repo TEXT NOT NULL,
        number INTEGER NOT NULL,
        labels TEXT,
        pr_number INTEGER,
        branch TEXT,
        session_id TEXT,
        agent TEXT,
        updated_at REAL NOT NULL,
        PRIMARY KEY (repo, number)
    );
    CREATE INDEX issues_by_pr ON issues (repo, pr_number);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        repo TEXT NOT NULL,
        issue INTEGER NOT NULL,
        kind TEXT NOT NULL,
        target INTEGER,
        body TEXT NOT NULL DEFAULT '',
        requested_by TEXT,
        permission_hint TEXT,
        needs_permission INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        not_before REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        done_at REAL,
        error TEXT
    );
    CREATE INDEX outbox_open ON outbox (done_at, not_before, id);
    CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        pid_start TEXT,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
    """,
    # 2: agent results and budgets
    """
    ALTER TABLE tasks ADD COLUMN max_tokens INTEGER;
    ALTER TABLE tasks ADD COLUMN max_cost_usd REAL;
    ALTER TABLE tasks ADD COLUMN usage TEXT;
    ALTER TABLE tasks ADD COLUMN summary TEXT;
    ALTER TABLE tasks ADD COLUMN files_changed INTEGER;
    ALTER TABLE tasks ADD COLUMN agents_tried TEXT;
    """,
    # 3: leases, so that with several processes on one database only one publishes
    """
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    # 4: the agent's committed work waiting to be published, so a retry only publishes it
    """
    ALTER TABLE tasks ADD COLUMN publish_sha TEXT;
    """,
    # 5: replies are rate-limited per user and issue
    """
    CREATE TABLE replies (
        repo TEXT NOT NULL,
        issue INTEGER NOT NULL,
        login TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX replies_by_user ON replies (repo, issue, login, at);
    ALTER TABLE outbox ADD COLUMN quiet INTEGER NOT NULL DEFAULT 0;
    """,
    # 6: indexes that keep the worker's queries from reading the whole table: each tick
    # looks for tracking comments to write, and the daily cleanup for old rows. A partial
    # index holds only the rows its query is after, and a query uses it only if its
    # WHERE holds the index's terms as written here (tests/test_query_cost.py).
    """
    CREATE INDEX tasks_comment_due ON tasks ((state = 'pending'), id)
        WHERE comment_version < version AND authorized IS NOT NULL;
    CREATE INDEX tasks_finished ON tasks (state, COALESCE(finished_at, updated_at))
        WHERE state IN ('completed', 'failed', 'cancelled', 'rejected');
    CREATE INDEX deliveries_by_time ON deliveries (received_at);
    CREATE INDEX replies_by_time ON replies (at);
    """,
    # 7: a task's kind, state and outcome must be values kugetsu knows, or the row cannot
    # be read (bot/core/tasks.py; tests/test_store.py checks that these lists match it). New
    # writes are refused here; rows written before are set aside when read
    # (Store._set_aside_row). Triggers, not CHECK constraints: SQLite adds a CHECK only
    # by copying the whole table into a new one, which would hold the write lock for as
    # long as the copy takes, fail on the first bad row already there, and need the
    # foreign keys switched off, which cannot be done inside the migration's transaction.
    # An update is checked only for the values it changes, so a row written before can
    # still be moved on (and set aside) while its unchanged kind is still unknown.
    # PostgreSQL checks the same in one trigger function.
    Dialects(
        sqlite="""
    CREATE TRIGGER tasks_known_values_on_insert BEFORE INSERT ON tasks
    WHEN NEW.kind NOT IN ('start', 'continue')
      OR NEW.state NOT IN ('pending', 'running', 'completed', 'failed', 'cancelled',
                           'rejected')
      OR NEW.outcome NOT IN ('succeeded', 'no_changes', 'agent_failed', 'timed_out',
                             'cancelled', 'infra_error')
    BEGIN
      SELECT RAISE(ABORT, 'tasks: kind, state or outcome is not a value kugetsu knows');
    END;
    CREATE TRIGGER tasks_known_values_on_update BEFORE UPDATE OF kind, state, outcome ON tasks
    WHEN (NEW.kind IS NOT OLD.kind AND NEW.kind NOT IN ('start', 'continue'))
      OR (NEW.state IS NOT OLD.state
          AND NEW.state NOT IN ('pending', 'running', 'completed', 'failed', 'cancelled',
                                'rejected'))
      OR (NEW.outcome IS NOT OLD.outcome
          AND NEW.outcome NOT IN ('succeeded', 'no_changes', 'agent_failed', 'timed_out',
                                  'cancelled', 'infra_error'))
    BEGIN
      SELECT RAISE(ABORT, 'tasks: kind, state or outcome is not a value kugetsu knows');
    END;
    """,
        postgres="""
    CREATE FUNCTION tasks_known_values() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'INSERT' THEN
        IF NEW.kind NOT IN ('start', 'continue')
           OR NEW.state NOT IN ('pending', 'running', 'completed', 'failed', 'cancelled',
                                'rejected')
           OR NEW.outcome NOT IN ('succeeded', 'no_changes', 'agent_failed', 'timed_out',
                                  'cancelled', 'infra_error') THEN
          RAISE EXCEPTION 'tasks: kind, state or outcome is not a value kugetsu knows'
            USING ERRCODE = 'check_violation';
        END IF;
      ELSIF (NEW.kind IS DISTINCT FROM OLD.kind AND NEW.kind NOT IN ('start', 'continue'))
         OR (NEW.state IS DISTINCT FROM OLD.state
             AND NEW.state NOT IN ('pending', 'running', 'completed', 'failed', 'cancelled',
                                   'rejected'))
         OR (NEW.outcome IS DISTINCT FROM OLD.outcome
             AND NEW.outcome NOT IN ('succeeded', 'no_changes', 'agent_failed', 'timed_out',
                                     'cancelled', 'infra_error')) THEN
        RAISE EXCEPTION 'tasks: kind, state or outcome is not a value kugetsu knows'
          USING ERRCODE = 'check_violation';
      END IF;
      RETURN NEW;
    END $$;
    CREATE TRIGGER tasks_known_values BEFORE INSERT OR UPDATE OF kind, state, outcome ON tasks
      FOR EACH ROW EXECUTE FUNCTION tasks_known_values();
    """,
    ),
    # 8: counters for /metrics that every process adds to (bot/core/metrics.py): a row per
    # counter and set of labels, added to inside the transactions that change what they
    # count. WITHOUT ROWID: the key is the row, so an add is one lookup in one b-tree.
    """
    CREATE TABLE counters (
        name TEXT NOT NULL,
        labels TEXT NOT NULL,
        value REAL NOT NULL,
        PRIMARY KEY (name, labels)
    ) WITHOUT ROWID;
    """,
    # 9: notifications are outbox rows for one endpoint each (its id from the config),
    # sent in id order per endpoint. Partial indexes hold only the rows still to send:
    # per endpoint, and those for Gitea, so that a backlog of notifications for an
    # endpoint that is down is never read by the tick.
    """
    ALTER TABLE outbox ADD COLUMN endpoint TEXT;
    CREATE INDEX outbox_endpoint_open ON outbox (endpoint, id)
        WHERE done_at IS NULL AND endpoint IS NOT NULL;
    CREATE INDEX outbox_gitea_due ON outbox (id)
        WHERE done_at IS NULL AND endpoint IS NULL;
    """,
    # 10: what Gitea last said of an issue's state (open, closed, merged, gone) and when,
    # so that prune asks about each issue in turn, the longest unasked first
    """
    ALTER TABLE issues ADD COLUMN state TEXT;
    ALTER TABLE issues ADD COLUMN state_checked_at REAL;
    """,
    # 11: the repository a delivery came from, so that the repositories kugetsu serves are
    # known (those with tasks or deliveries, `kugetsu doctor`), and a test delivery can be
    # seen arriving (`kugetsu doctor --deliver-test`). NULL for rows written before and for
    # deliveries without one. The index holds only rows that name one.
    """
    ALTER TABLE deliveries ADD COLUMN repo TEXT;
    CREATE INDEX deliveries_by_repo ON deliveries (repo, received_at) WHERE repo IS NOT NULL;
    """,
    # 12: fair share: when each repository, and each requester within it, last got a slot
    # (a number that grows with every slot given, see _fair_order and Store._take_turn)
    """
    CREATE TABLE repo_turns (
        repo TEXT PRIMARY KEY,
        turn INTEGER NOT NULL
    );
    CREATE INDEX repo_turns_by_turn ON repo_turns (turn);
    CREATE TABLE requester_turns (
        repo TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        turn INTEGER NOT NULL,
        PRIMARY KEY (repo, requested_by)
    );
    """,
    # 13: the repositories a reconcile pass looks at (those kugetsu serves: tasks in them,
    # deliveries from them, the config), each with when kugetsu first served it and how far
    # a pass has looked on Gitea for what deliveries missed. (PostgreSQL before 16 wants a
    # name for the subquery; SQLite's script is as released.)
    Dialects(
        sqlite="""
    CREATE TABLE repos (
        repo TEXT PRIMARY KEY,
        first_seen REAL NOT NULL,
        reconciled_to REAL
    );
    INSERT INTO repos (repo, first_seen)
        SELECT repo, MIN(at) FROM (
            SELECT repo, MIN(created_at) AS at FROM tasks GROUP BY repo
            UNION ALL
            SELECT repo, MIN(received_at) FROM deliveries WHERE repo IS NOT NULL GROUP BY repo
        ) GROUP BY repo;
    """,
        postgres="""
    CREATE TABLE repos (
        repo TEXT PRIMARY KEY,
        first_seen DOUBLE PRECISION NOT NULL,
        reconciled_to DOUBLE PRECISION
    );
    INSERT INTO repos (repo, first_seen)
        SELECT repo, MIN(at) FROM (
            SELECT repo, MIN(created_at) AS at FROM tasks GROUP BY repo
            UNION ALL
            SELECT repo, MIN(received_at) FROM deliveries WHERE repo IS NOT NULL GROUP BY repo
        ) AS served GROUP BY repo;
    """,
    ),
    # 14: a repository's own settings (.kugetsu.toml): whether a request named its agent
    # (else the repository's default agent runs it; tasks queued before keep theirs), and
    # the versions of the file kugetsu has answered that it cannot use them
    """
    ALTER TABLE tasks ADD COLUMN agent_requested INTEGER NOT NULL DEFAULT 0;
    UPDATE tasks SET agent_requested = 1 WHERE state IN ('pending', 'running');
    CREATE TABLE repo_files_refused (
        repo TEXT NOT NULL,
        blob TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (repo, blob)
    );
    """,
    # 15: conversations. `answer_on`: the issue or pull request where the task's result is
    # also posted when it ends (a request typed on a pull request, a retry), and
    # `answer_id` that answer's comment (0 while it is being written); `review`: the
    # review a follow-up answers (its id, state, body and line comments), as JSON.
    """
    ALTER TABLE tasks ADD COLUMN answer_on INTEGER;
    ALTER TABLE tasks ADD COLUMN answer_id INTEGER;
    ALTER TABLE tasks ADD COLUMN review TEXT;
    """,
    # 16: the dashboard. Who last retried a task (its tracking comment names them), and
    # indexes for its lists: newest first per repository (and state), agent, requester
    # and issue number, and finished tasks by the time they finished, over all
    # repositories and per repository (`_FINISHED_AT` below is the expression as written).
    """
    ALTER TABLE tasks ADD COLUMN retried_by TEXT;
    CREATE INDEX tasks_by_repo ON tasks (repo, id);
    CREATE INDEX tasks_by_repo_state ON tasks (repo, state, id);
    CREATE INDEX tasks_by_agent ON tasks (agent, id);
    CREATE INDEX tasks_by_requester ON tasks (requested_by, id);
    CREATE INDEX tasks_by_number ON tasks (issue, id);
    CREATE INDEX tasks_finished_recent ON tasks (COALESCE(finished_at, updated_at), id)
        WHERE state IN ('completed', 'failed', 'cancelled', 'rejected');
    CREATE INDEX tasks_finished_by_repo ON tasks (repo, COALESCE(finished_at, updated_at), id)
        WHERE state IN ('completed', 'failed', 'cancelled', 'rejected');
    """,
    # 17: the concurrency slot a running task holds; with the sandbox its agent runs as
    # the slot's uid, so no two running tasks may hold the same one (Store.claim)
    """
    ALTER TABLE tasks ADD COLUMN slot INTEGER;
    """,
    # 18: several machines on one queue. A running task holds a lease (a token and when it
    # runs out), renewed by its worker and checked by compare-and-set before each step
    # that publishes (push, pull request, comment, finish), so a worker that was cut off
    # cannot publish over the task's next owner. Workers say where they run (`node`: a
    # machine and its data directory) and how many agents they may run; an issue
    # remembers the node that holds its worktree and agent home, so a follow-up goes
    # there. Agent logs are shipped in chunks where several machines share the database.
    # On PostgreSQL each running task holds one slot row of the global limit, claimed
    # FOR UPDATE SKIP LOCKED, and a trigger wakes idle workers on every machine.
    Dialects(
        sqlite="""
    ALTER TABLE tasks ADD COLUMN lease_token TEXT;
    ALTER TABLE tasks ADD COLUMN lease_expires_at REAL;
    ALTER TABLE tasks ADD COLUMN moved_from TEXT;
    ALTER TABLE workers ADD COLUMN node TEXT;
    ALTER TABLE workers ADD COLUMN capacity INTEGER;
    ALTER TABLE issues ADD COLUMN node TEXT;
    CREATE TABLE task_logs (
        task_id INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
        at_byte INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (task_id, at_byte)
    );
    """,
        # the same, translated; then what PostgreSQL alone has
        postgres_extra="""
    CREATE TABLE slots (
        n BIGINT PRIMARY KEY,
        task_id BIGINT UNIQUE,
        taken_at DOUBLE PRECISION
    );
    CREATE FUNCTION kugetsu_wake() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_notify('kugetsu_wake', '');
      RETURN NULL;
    END $$;
    CREATE TRIGGER tasks_wake_on_insert AFTER INSERT ON tasks
      FOR EACH ROW EXECUTE FUNCTION kugetsu_wake();
    CREATE TRIGGER tasks_wake_on_update AFTER UPDATE OF state, authorized, not_before ON tasks
      FOR EACH ROW WHEN (NEW.state IS DISTINCT FROM OLD.state
                         OR NEW.authorized IS DISTINCT FROM OLD.authorized
                         OR NEW.not_before IS DISTINCT FROM OLD.not_before)
      EXECUTE FUNCTION kugetsu_wake();
    CREATE TRIGGER outbox_wake AFTER INSERT ON outbox
      FOR EACH ROW EXECUTE FUNCTION kugetsu_wake();
    """,
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
#: the finished states as migration 6 writes them in the index `tasks_finished`: a query
#: uses that index only if it names them the same way (as text, not as bound values)
_TERMINAL = "state IN ('completed', 'failed', 'cancelled', 'rejected')"
#: the dashboard's lists for at most this many repositories read each one on its own
MERGE_REPOS = 32
#: when a finished task finished, as migration 16 writes it in its indexes
_FINISHED_AT = "COALESCE(finished_at, updated_at)"
#: the tasks a queue position is counted among: pending and not refused (those still to be
#: authorized included), whatever their wait before a retry
_WAITING = "t.state = 'pending' AND (t.authorized IS NULL OR t.authorized = 1)"


def _fair_order(waiting: str) -> str:
    """A `WITH` clause naming `queue (id, position)`: the tasks for which `waiting` (a
    condition on `tasks AS t`) holds, each with its 1-based place in the order in which
    slots go to them.

    Fair share is round-robin with a memory. Each slot goes to the repository served
    longest ago (one never served first), within it to the requester served longest
    ago, and to that requester's oldest task; among repositories (or requesters) never
    served, the one whose next task is oldest goes first. `claim()` records each turn
    (`_take_turn`). So one repository's hundred waiting tasks take one slot in every
    round, and another repository's single task waits for one slot at most.

    Played out in advance, that is: the k-th task of each requester (oldest first) is in
    its requester's round k, and the requesters of a repository take their rounds in
    the order they were last served; that gives each task its place within its
    repository, and the k-th of each repository is in the queue's round k, the
    repositories again in the order they were last served. Claiming the first task
    leaves the order of the others as it was (its repository and requester, served
    last now, move behind the others in every later round, where they already were),
    so the position shown is the order the tasks start in while nothing else changes.

    Plain SQL (window functions, UPSERT-maintained turn tables) that SQLite and
    PostgreSQL both run. It reads waiting tasks through the index by state and the turn
    tables by key, never the finished tasks: its cost grows with the queue, not with
    the history.
    """
    return f"""
        WITH waiting AS (
            SELECT t.id, t.repo, t.requested_by FROM tasks AS t WHERE {waiting}
        ), by_requester AS (
            SELECT w.id, w.repo,
                   ROW_NUMBER() OVER (PARTITION BY w.repo, w.requested_by ORDER BY w.id)
                       AS round,
                   COALESCE(u.turn, 0) AS served,
                   MIN(w.id) OVER (PARTITION BY w.repo, w.requested_by) AS first_task
            FROM waiting AS w
            LEFT JOIN requester_turns AS u
                   ON u.repo = w.repo AND u.requested_by = w.requested_by
        ), by_repo AS (
            SELECT b.id, b.repo,
                   ROW_NUMBER() OVER (PARTITION BY b.repo
                                      ORDER BY b.round, b.served, b.first_task) AS round,
                   FIRST_VALUE(b.id) OVER (PARTITION BY b.repo
                                           ORDER BY b.round, b.served, b.first_task)
                       AS first_task
            FROM by_requester AS b
        ), queue AS (
            SELECT r.id,
                   ROW_NUMBER() OVER (ORDER BY r.round, COALESCE(p.turn, 0), r.first_task)
                       AS position
            FROM by_repo AS r LEFT JOIN repo_turns AS p ON p.repo = r.repo
        )"""


#: rows that Store.clear() deletes per write transaction
CLEAR_BATCH = 500
#: the claim reads this many candidates more than it has slots: those another claim takes
#: at the same moment (PostgreSQL) are passed over for the next ones
CLAIM_SPARE = 8
#: a claimed task's lease runs out after this long unless its worker renews it
DEFAULT_LEASE_SECONDS = 60.0
#: a follow-up waits this long for the node that holds its issue's worktree, if that
#: node has a live worker, before any worker may take it
LOCALITY_WAIT_SECONDS = 60.0
#: a worker whose heartbeat is younger than this counts as live (for locality)
LIVE_WORKER_SECONDS = 90.0
BUSY_TIMEOUT_SECONDS = 30.0

#: meta key prefix of a worker's report on its ticks, followed by the worker's id
_REPORT_KEY = "worker-report:"
#: meta key prefix of the disk use a worker measured, followed by its host's name
_DISK_KEY = "disk-usage:"
#: meta key prefix of what a worker's checks found (bot/doctor.py), followed by its id
_READY_KEY = "worker-readiness:"

_TASK_FIELDS = {f.name for f in fields(Task)}
#: fields that callers may set without changing state
_UPDATABLE = _TASK_FIELDS - {"id", "repo", "issue", "kind", "state", "created_at", "updated_at"}


class StoreError(RuntimeError):
    pass


class DatabaseFailure(StoreError):
    """An error of the PostgreSQL database, as bot.pgstore raises it in place of the
    driver's own: catching the driver's classes would mean importing the driver (14 MB
    in each process) where SQLite is used."""


class OperationalFailure(DatabaseFailure):
    """PostgreSQL is unreachable, refused the connection, or ran out of something."""


class IntegrityFailure(DatabaseFailure):
    """PostgreSQL refused a write that breaks a constraint or a trigger's check."""


#: what a database of either backend raises: callers that must survive a database
#: failure (a delivery answered 503, a tick that fails and is retried) catch these
DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, DatabaseFailure)
#: what opening or using the store may raise, its own errors included (the command line
#: answers each with one line)
STORE_ERRORS: tuple[type[Exception], ...] = (StoreError, sqlite3.Error)
#: failures of the database itself (locked, full, unreachable), not of one row
OPERATIONAL_ERRORS: tuple[type[Exception], ...] = (sqlite3.OperationalError, OperationalFailure)


class SchemaTooNew(StoreError):
    pass


class LeaseLost(StoreError):
    """A step only a lease's holder may take was refused: the lease (a task's, or a
    cluster-wide duty's) is no longer this worker's."""


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of a migration, whole: a trigger's body holds `;` of its own."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""
    if pending.strip(" \n;"):
        yield pending


class UnreadableRow(StoreError):
    """A task row holds a value this kugetsu cannot read: written by hand, by a newer
    kugetsu, or by corruption. `problems` maps each such field to a phrase naming it."""

    def __init__(self, task_id: int, problems: dict[str, str]):
        self.task_id, self.problems = task_id, problems
        super().__init__(f"task {task_id}: {'; '.join(problems.values())}")


#: columns that hold an enumerated value, and the enum that reads it
_ENUMS: dict[str, type[Kind] | type[State] | type[Outcome]] = {
    "kind": Kind,
    "state": State,
    "outcome": Outcome,
}
#: JSON columns, and the type their value must have
_JSON_TYPES: dict[str, type] = {"usage": dict, "agents_tried": list, "review": dict}
_JSON_FIELDS = set(_JSON_TYPES)


def _shown(value: Any) -> str:
    """A stored value as an error names it: quoted, and short whatever it holds."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _row_to_task(row: Row) -> Task:
    """The task a row holds; UnreadableRow naming every value that cannot be read."""
    data = {k: row[k] for k in row.keys() if k in _TASK_FIELDS}  # noqa: SIM118 - a Row iterates its values
    problems: dict[str, str] = {}
    for key, enum in _ENUMS.items():
        if key == "outcome" and not data[key]:
            data[key] = None
            continue
        try:
            data[key] = enum(data[key])
        except ValueError:
            problems[key] = f"unknown {key} {_shown(data[key])}"
    for key, kind in _JSON_TYPES.items():
        if not data.get(key):
            data[key] = kind()
            continue
        try:
            data[key] = json.loads(data[key])
        except (TypeError, ValueError):
            problems[key] = f"{key} is not JSON: {_shown(data[key])}"
            continue
        if not isinstance(data[key], kind):
            problems[key] = f"{key} is not a JSON {'object' if kind is dict else 'list'}"
    if problems:
        raise UnreadableRow(row["id"], problems)
    if data.get("authorized") is not None:
        data["authorized"] = bool(data["authorized"])
    data["agent_requested"] = bool(data.get("agent_requested"))
    data["agents_tried"] = tuple(data["agents_tried"])
    return Task(**data)


def _readable(rows: Iterable[Row], unreadable: list[tuple[Row, UnreadableRow]]) -> Iterator[Task]:
    """The tasks of the rows that can be read; the others are added to `unreadable`."""
    for row in rows:
        try:
            yield _row_to_task(row)
        except UnreadableRow as exc:
            unreadable.append((row, exc))


def sqlite_migration(number: int) -> str:
    """The script of migration `number` (0-based) for SQLite."""
    entry = MIGRATIONS[number]
    return entry.sqlite if isinstance(entry, Dialects) else entry


def _number(c: Conn, sql: str, args: Sequence[Any] = ()) -> int:
    """The whole number a query of one row and one column gives (a count, a version)."""
    return int(c.execute(sql, args).fetchone()[0])


def _inserted_id(cur: Cursor) -> int:
    """The id of the row an `INSERT ... RETURNING id` just wrote (both backends)."""
    return int(cur.fetchall()[0][0])


def _agent_that_ran(agent: str, agents_tried: str | None) -> str:
    """The agent of a task's last run (a fallback's, if one ran), else the one it asked for."""
    try:
        tried = json.loads(agents_tried) if agents_tried else []
    except ValueError:
        tried = []
    return str(tried[-1]) if isinstance(tried, list) and tried else agent


def _encode(key: str, value: Any) -> Any:
    if key in _JSON_FIELDS:
        return json.dumps(list(value) if key == "agents_tried" else value) if value else None
    if isinstance(value, (State, Outcome, Kind)):
        return value.value
    if isinstance(value, bool):
        return int(value)
    return value


@dataclass(frozen=True)
class Stats:
    by_state: dict[str, int]
    by_outcome: dict[str, int]
    running: int
    pending_ready: int
    oldest_pending_age: float | None
    #: each registered worker: id, host, node, capacity, heartbeat age, running tasks
    workers: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "by_state": self.by_state,
            "by_outcome": self.by_outcome,
            "running": self.running,
            "pending_ready": self.pending_ready,
            "oldest_pending_age_seconds": self.oldest_pending_age,
            "workers": self.workers,
        }


@dataclass(frozen=True)
class MetricsSnapshot:
    """The database's part of /metrics, read at once (`Store.metrics_snapshot`)."""

    #: (state, repository or None, tasks)
    tasks: list[tuple[str, str | None, int]]
    #: running tasks whose agent runs
    agents_running: int
    #: (counter name, labels as stored, value)
    counters: list[tuple[str, str, float]]
    #: (host, the disk use it measured, as JSON)
    disk: list[tuple[str, str]]
    #: each registered worker (`Store.worker_stats`)
    workers: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class TaskQuery:
    """Which tasks a list shows (the dashboard's filters). `repos`: only these
    repositories (None: all of them; empty: none)."""

    repos: tuple[str, ...] | None = None
    state: State | None = None
    agent: str | None = None
    requester: str | None = None
    issue: int | None = None

    def where(self) -> tuple[str, list[Any]]:
        """The SQL conditions (joined with AND, each a term the indexes of migration 16
        can serve) and their arguments."""
        terms, args = list[str](), list[Any]()
        if self.repos is not None:
            terms.append(f"repo IN ({','.join('?' * len(self.repos))})" if self.repos else "FALSE")
            args.extend(self.repos)
        for column, value in (
            ("state", None if self.state is None else State(self.state).value),
            ("agent", self.agent),
            ("requested_by", self.requester),
            ("issue", self.issue),
        ):
            if value is not None:
                terms.append(f"{column} = ?")
                args.append(value)
        return " AND ".join(terms) or "TRUE", args


@dataclass(frozen=True)
class FinishedRow:
    """What the dashboard's charts read of one finished task."""

    repo: str
    agent: str
    state: str
    outcome: str | None
    created_at: float
    started_at: float | None
    finished_at: float
    cost_usd: float | None


#: the connection of a write transaction (`Store.tx()`), passed to the methods that run in it
Tx = Conn

#: a tracking comment written to Gitea: (task id, the task version its body shows, the body,
#: the comment's id when it was just created, else None)
CommentRecord = tuple[int, int, str, int | None]


class Store:
    """The queue's queries, and the SQLite backend's plumbing: owns the database file,
    one connection per thread; safe to share. PostgresStore overrides the plumbing and
    the hooks below."""

    #: the backend's name, as `doctor`, stats and logs show it
    BACKEND = "sqlite"
    #: several machines may share this database: workers ship their agents' logs to it
    #: and recover each other's tasks by lease (the PID check stays within one machine)
    SHARED = False
    #: the name of a row's physical address, for deleting in batches
    ROWID = "rowid"

    def _indexed_by(self, index: str) -> str:
        """`INDEXED BY index ` where the engine takes that hint (SQLite); PostgreSQL has
        no such clause and chooses partial indexes by itself."""
        return f"INDEXED BY {index} "

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Callable[[], float] = time.time,
        checkpoint_pages: int = 0,
        notify: Sequence[tuple[str, frozenset[str]]] = (),
    ):
        self.path = Path(path)
        self.clock = clock
        # (endpoint id, the events it wants) of each notification endpoint
        # (Config.notify_routes): a change of state writes one outbox row for each
        self.notify = tuple(notify)
        # 0: commits in this process never copy the write-ahead log back (the receiver,
        # the command line). The worker passes a page count: a commit that leaves more
        # pages than that in the log checkpoints it, so each checkpoint stays small.
        self.checkpoint_pages = checkpoint_pages
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        # Writers in this process queue here. SQLite's own busy handler sleeps in fixed
        # steps (1, 2, 5, 10 ... 100 ms) instead of waking when the lock is free, which
        # put tens of milliseconds on webhook answers under load. Other processes on the
        # same file still meet SQLite's lock and its busy timeout.
        self._write_lock = threading.RLock()

    # ------------------------------------------------------------------ plumbing

    def _conn(self) -> Conn:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=30.0, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA wal_autocheckpoint = {int(self.checkpoint_pages)}")
            conn.execute("PRAGMA journal_size_limit = 8388608")  # WAL kept after a checkpoint
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def tx(self) -> Iterator[Conn]:
        """A write transaction. IMMEDIATE takes SQLite's write lock at once (no upgrade
        deadlocks); the in-process lock in front of it makes local writers take turns."""
        conn = self._conn()
        with self._write_lock:
            self._begin_immediate(conn)
            try:
                yield conn
            except BaseException:
                # SQLite has already rolled back after some errors (a full disk): a second
                # ROLLBACK would raise and hide the error that matters
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[Conn]:
        """A read transaction: every query in it sees the database as it was at once."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _begin_immediate(self, conn: Conn) -> None:
        """Take the write lock, polling briefly while another process holds it.

        SQLite's busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries and so does
        not notice a lock freed after a fraction of a millisecond; this wait does.
        """
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
            delay = 0.0002
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise
                    if time.monotonic() >= deadline:
                        raise
                time.sleep(delay)
                delay = min(delay * 2, 0.001)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file (PASSIVE: never blocks writers)."""
        self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                with suppress(sqlite3.Error):
                    conn.close()
            self._conns.clear()
        self._local = threading.local()

    def migrate(self) -> int:
        """Bring the schema up to date; returns the version. Safe to run concurrently."""
        with self.tx() as c:
            version = _number(c, "PRAGMA user_version")
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"database {self.path} has schema version {version}, this kugetsu knows "
                    f"up to {SCHEMA_VERSION}; upgrade kugetsu"
                )
            for number in range(version, SCHEMA_VERSION):
                for statement in _statements(sqlite_migration(number)):
                    c.execute(statement)
                c.execute(f"PRAGMA user_version = {number + 1}")
        if version < SCHEMA_VERSION:
            # one line, however many steps: a new database takes them all at once
            log.info(
                "database migrated",
                extra={"from_version": version, "schema_version": SCHEMA_VERSION},
            )
        return SCHEMA_VERSION

    # ------------------------------------------------------------------ tasks

    def _event(
        self,
        c: Conn,
        task_id: int,
        event: str,
        from_state: str | None,
        to_state: str | None,
        detail: str | None = None,
    ) -> None:
        c.execute(
            "INSERT INTO task_events (task_id, at, from_state, to_state, event, detail) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (task_id, self.clock(), from_state, to_state, event, detail),
        )

    def insert_task(
        self,
        c: Tx,
        *,
        repo: str,
        issue: int,
        kind: Kind | str,
        prompt: str,
        agent: str,
        requested_by: str,
        max_attempts: int,
        authorized: bool | None = None,
        permission_hint: str | None = None,
        trigger_comment_id: int | None = None,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
        answer_on: int | None = None,
        review: dict[str, Any] | None = None,
        agent_requested: bool = False,
    ) -> int:
        """Insert a pending task inside the caller's transaction."""
        now = self.clock()
        cur = c.execute(
            "INSERT INTO tasks (repo, issue, kind, prompt, agent, requested_by, state, "
            "max_attempts, created_at, updated_at, authorized, permission_hint, "
            "trigger_comment_id, max_tokens, max_cost_usd, answer_on, review, agent_requested) "
            "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                repo,
                issue,
                str(Kind(kind)),
                prompt,
                agent,
                requested_by,
                max_attempts,
                now,
                now,
                None if authorized is None else int(authorized),
                permission_hint,
                trigger_comment_id,
                max_tokens,
                max_cost_usd,
                answer_on,
                _encode("review", review),
                int(agent_requested),
            ),
        )
        task_id = _inserted_id(cur)
        self._event(c, task_id, "queued", None, "pending", f"{kind} by {requested_by}")
        self._changed(c, task_id, None, State.PENDING)
        self.note_repo(c, repo)
        return task_id

    def get(self, task_id: int) -> Task | None:
        return self._one(self._conn(), "SELECT * FROM tasks WHERE id = ?", (task_id,))

    def _tasks(self, conn: Conn, rows: Iterable[Row]) -> list[Task]:
        """The tasks of rows already read (not a cursor still open); a row that cannot be
        read is set aside and left out, so that it cannot stop a query that reads many."""
        unreadable: list[tuple[Row, UnreadableRow]] = []
        tasks = [*_readable(rows, unreadable)]
        self._set_aside_rows(conn, unreadable)
        return tasks

    def _one(self, conn: Conn, sql: str, args: Sequence[Any]) -> Task | None:
        """The first task the query finds. A row that cannot be read is set aside and the
        query asked again: it then finds the row as set aside, or the next one."""
        for _ in range(2):
            row = conn.execute(sql, args).fetchone()
            if row is None:
                return None
            found = self._tasks(conn, [row])
            if found:
                return found[0]
        return None

    def _set_aside_rows(self, conn: Conn, unreadable: Sequence[tuple[Row, UnreadableRow]]) -> None:
        """Set each unreadable row aside, inside the caller's write transaction if there is
        one (claim, intake), else in one of its own."""
        if not unreadable:
            return
        if conn.in_transaction:
            for row, exc in unreadable:
                self._set_aside_row(conn, row, exc)
            return
        with self.tx() as c:
            for row, exc in unreadable:
                self._set_aside_row(c, row, exc)

    def _set_aside_row(self, c: Conn, row: Row, exc: UnreadableRow) -> bool:
        """The one place a task row that cannot be read is dealt with: it fails with an
        error naming what could not be read, and a task event says so. A kind that cannot
        be read becomes `start` and JSON that cannot be read is emptied, as the error
        says, so the row reads from then on. A compare-and-set on the row's version: a
        row changed since it was read is left to the next read."""
        problems = dict(exc.problems)
        sets: dict[str, Any] = {
            "state": State.FAILED.value,
            "outcome": Outcome.INFRA_ERROR.value,
            "pid": None,
            "pid_start": None,
            "lease_token": None,
            "lease_expires_at": None,
        }
        if "kind" in problems:
            problems["kind"] += f" (now {Kind.START})"
            sets["kind"] = Kind.START.value
        for key in _JSON_TYPES:
            if key in problems:
                problems[key] += " (emptied)"
                sets[key] = None
        reason = "set aside, unreadable: " + "; ".join(problems.values())
        now = self.clock()
        sets.update(error=reason, finished_at=now, updated_at=now)
        cur = c.execute(
            f"UPDATE tasks SET {', '.join(f'{k} = ?' for k in sets)}, version = version + 1 "
            "WHERE id = ? AND version = ?",
            (*sets.values(), row["id"], row["version"]),
        )
        if cur.rowcount != 1:
            return False
        self._free_slot(c, row["id"])
        self._event(c, row["id"], "set aside", str(row["state"]), State.FAILED.value, reason)
        before = row["state"] if row["state"] in set(State) else None
        self._changed(c, row["id"], None if before is None else State(before), State.FAILED)
        log.error("task row set aside", extra={"task": row["id"], "error": reason})
        return True

    def require(self, task_id: int) -> Task:
        task = self.get(task_id)
        if task is None:
            raise KeyError(f"no task {task_id}")
        return task

    def iter_tasks(
        self,
        state: State | str | None = None,
        *,
        repo: str | None = None,
        issue: int | None = None,
        before: int | None = None,
        newest: int | None = None,
    ) -> Iterator[Task]:
        """Tasks in id order, read from the database as the caller iterates. `before`: only
        ids below it; `newest`: only the newest that many of those (still in id order)."""
        sql, args = "SELECT * FROM tasks WHERE 1=1", list[Any]()
        if state is not None:
            sql += " AND state = ?"
            args.append(str(State(state)))
        if repo is not None:
            sql += " AND repo = ?"
            args.append(repo)
        if issue is not None:
            sql += " AND issue = ?"
            args.append(issue)
        if before is not None:
            sql += " AND id < ?"
            args.append(before)
        if newest is None:
            sql += " ORDER BY id"
        else:
            sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?) AS page ORDER BY id"
            args.append(newest)
        conn = self._conn()
        unreadable: list[tuple[Row, UnreadableRow]] = []
        yield from _readable(conn.execute(sql, args), unreadable)
        # once the rows are all read: a write while the query is open would stop it
        self._set_aside_rows(conn, unreadable)

    def list_tasks(
        self, state: State | str | None = None, *, repo: str | None = None, issue: int | None = None
    ) -> list[Task]:
        return [*self.iter_tasks(state, repo=repo, issue=issue)]

    def existing(self, task_ids: Iterable[int], *, cleared_before: float | None = None) -> set[int]:
        """Which of these task ids are in the table; with `cleared_before`, which would still
        be there after `clear()` with that cutoff (what `kugetsu prune --dry-run` shows)."""
        ids, found = [*task_ids], set[int]()
        kept = (
            ""
            if cleared_before is None
            else (f" AND NOT ({_TERMINAL} AND COALESCE(finished_at, updated_at) < ?)")
        )
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found.update(
                row[0]
                for row in self._conn().execute(
                    f"SELECT id FROM tasks WHERE id IN ({','.join('?' * len(chunk))}){kept}",
                    [*chunk] + ([] if cleared_before is None else [cleared_before]),
                )
            )
        return found

    def clearable(self, older_than_days: float) -> int:
        """How many finished tasks `clear(older_than_days)` would delete now."""
        cutoff = self.clock() - older_than_days * 86400.0
        return _number(
            self._conn(),
            f"SELECT COUNT(*) FROM tasks WHERE {_TERMINAL} "
            "AND COALESCE(finished_at, updated_at) < ?",
            (cutoff,),
        )

    def issue_task_ids(self, repo: str, issue: int) -> list[int]:
        """The ids of an issue's tasks (read from the index by issue)."""
        return [
            row[0]
            for row in self._conn().execute(
                "SELECT id FROM tasks WHERE repo = ? AND issue = ? ORDER BY id", (repo, issue)
            )
        ]

    def transition(
        self,
        task_id: int,
        from_state: State | str,
        to_state: State | str,
        *,
        event: str,
        detail: str | None = None,
        lease: str | None = None,
        lease_expired_by: float | None = None,
        **changes: Any,
    ) -> bool:
        """Move a task from `from_state` to `to_state` (checked against TRANSITIONS) by
        compare-and-set, setting `changes` with it. False if it was not in from_state,
        or, with `lease`, if the task's lease token is no longer that one, or, with
        `lease_expired_by`, if its lease runs out after that time (it was renewed)."""
        with self.tx() as c:
            return self._transition(
                c,
                task_id,
                from_state,
                to_state,
                event=event,
                detail=detail,
                lease=lease,
                lease_expired_by=lease_expired_by,
                **changes,
            )

    def _transition(
        self,
        c: Conn,
        task_id: int,
        from_state: State | str,
        to_state: State | str,
        *,
        event: str,
        detail: str | None = None,
        lease: str | None = None,
        lease_expired_by: float | None = None,
        **changes: Any,
    ) -> bool:
        """The compare-and-set of `transition()`, inside the caller's write transaction."""
        check_transition(from_state, to_state)
        bad = set(changes) - _UPDATABLE
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} in a transition")
        from_state, to_state = State(from_state), State(to_state)
        now = self.clock()
        if to_state in TERMINAL_STATES:
            changes.setdefault("finished_at", now)
        if from_state is State.RUNNING and to_state is not State.RUNNING:
            changes.setdefault("lease_token", None)
            changes.setdefault("lease_expires_at", None)
        sets = ["state = ?", "updated_at = ?", "version = version + 1"]
        args: list[Any] = [to_state.value, now]
        for key, value in changes.items():
            sets.append(f"{key} = ?")
            args.append(_encode(key, value))
        where = "id = ? AND state = ?"
        args += [task_id, from_state.value]
        if lease is not None:
            where += " AND lease_token = ?"
            args.append(lease)
        if lease_expired_by is not None:
            where += " AND lease_expires_at < ?"
            args.append(lease_expired_by)
        cur = c.execute(f"UPDATE tasks SET {', '.join(sets)} WHERE {where}", args)
        if cur.rowcount != 1:
            return False
        if from_state is State.RUNNING and to_state is not State.RUNNING:
            self._free_slot(c, task_id)
        self._event(c, task_id, event, from_state.value, to_state.value, detail)
        self._changed(c, task_id, from_state, to_state)
        return True

    def _changed(self, c: Conn, task_id: int, from_state: State | None, to_state: State) -> None:
        """What follows from a task's change of state, in the transaction that changed it:
        its counts for /metrics, and a notification for each endpoint that wants its event.
        Every change of state passes here (insert_task, _transition, _set_aside_row), so
        none is missed and none counted or sent twice."""
        event = str(notify.event_for(to_state))
        endpoints = [endpoint for endpoint, events in self.notify if event in events]
        if from_state is None and to_state is State.PENDING and not endpoints:
            return  # queued (the webhook path): nothing to count, nothing to send
        row = c.execute(
            "SELECT id, repo, issue, agent, agents_tried, state, outcome, pr_number, "
            "created_at, not_before, started_at FROM tasks WHERE id = ?",
            (task_id,),
        ).fetchone()
        facts = metrics.TaskFacts(
            id=row["id"],
            repo=row["repo"],
            issue=row["issue"],
            agent=_agent_that_ran(row["agent"], row["agents_tried"]),
            state=to_state,
            outcome=row["outcome"],
            pr_number=row["pr_number"],
            created_at=row["created_at"],
            not_before=row["not_before"],
            started_at=row["started_at"],
        )
        self.add_counts(c, metrics.for_transition(facts, from_state, to_state, self.clock()))
        if not endpoints:
            return
        body = json.dumps(
            {
                "event": event,
                "task": notify.task_view(
                    task_id=facts.id,
                    repo=facts.repo,
                    issue=facts.issue,
                    state=str(to_state),
                    outcome=facts.outcome,
                    pr_number=facts.pr_number,
                ),
            }
        )
        now = self.clock()
        c.executemany(
            "INSERT INTO outbox (repo, issue, kind, target, body, endpoint, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (facts.repo, facts.issue, OutboxKind.NOTIFY.value, facts.id, body, endpoint, now)
                for endpoint in endpoints
            ],
        )

    def reject(
        self,
        task: Task,
        reason: str,
        *,
        reply_limit: int,
        reply_window: float,
        event: str = "rejected",
        outcome: Outcome | None = None,
    ) -> bool:
        """Refuse a pending task, with the reason its tracking comment gives. False if it
        was no longer pending.

        The refusal is a reply that anyone who can comment can call for, so it counts
        against the requester's reply limit on the issue, as intake counts the others
        (`recent_replies`, `note_reply`), in the same transaction as the refusal. Past
        the limit the task gets no tracking comment at all: it is recorded as written,
        and an event says why. This is where that is decided, once; the comment pass
        just finds nothing to write."""
        with self.tx() as c:
            if not self._transition(
                c,
                task.id,
                State.PENDING,
                State.REJECTED,
                event=event,
                detail=reason,
                authorized=False,
                error=reason,
                outcome=outcome,
            ):
                return False
            who = task.requested_by
            if self.recent_replies(c, task.repo, task.issue, who, reply_window) < reply_limit:
                self.note_reply(c, task.repo, task.issue, who, reply_window)
            else:
                c.execute("UPDATE tasks SET comment_version = version WHERE id = ?", (task.id,))
                self._event(
                    c, task.id, "not answered", None, None, f"reply limit reached for {who}"
                )
            return True

    def update(
        self, task_id: int, *, bump: bool = True, lease: str | None = None, **changes: Any
    ) -> bool:
        """Set fields that are not the state (pid, session, PR number, ...). With `lease`,
        only while the task's lease token is that one (a runner's writes about its
        attempt): False if it is not."""
        bad = set(changes) - _UPDATABLE
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} with update()")
        if not changes:
            return True
        with self.tx() as c:
            return self._set_fields(c, task_id, changes, bump=bump, lease=lease)

    def agent_ran(
        self,
        task_id: int,
        agent: str,
        usage: dict[str, Any],
        *,
        lease: str | None = None,
        **changes: Any,
    ) -> None:
        """Record one agent run of a task: `usage` and `changes` on the task (as update(),
        with `lease` only while the task holds that token), and the run's tokens and cost
        in the counters, in one transaction, so each run counts once, fallbacks'
        included (a run whose lease was lost spent them too)."""
        bad = set(changes) - _UPDATABLE
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} with agent_ran()")
        with self.tx() as c:
            self._set_fields(c, task_id, {**changes, "usage": usage}, lease=lease)
            repo = c.execute("SELECT repo FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if repo is not None:
                self.add_counts(c, metrics.for_agent_run(agent, repo[0], usage))

    def _set_fields(
        self,
        c: Conn,
        task_id: int,
        changes: dict[str, Any],
        *,
        bump: bool = True,
        lease: str | None = None,
    ) -> bool:
        sets = [f"{k} = ?" for k in changes] + ["updated_at = ?"]
        if bump:
            sets.append("version = version + 1")
        args = [_encode(k, v) for k, v in changes.items()] + [self.clock(), task_id]
        where = "id = ?"
        if lease is not None:
            where += " AND lease_token = ?"
            args.append(lease)
        cur = c.execute(f"UPDATE tasks SET {', '.join(sets)} WHERE {where}", args)
        return bool(cur.rowcount == 1)

    def mark_authorized(self, verdicts: Sequence[tuple[int, str]]) -> None:
        """Record that each (task id, reason) may run: one transaction for the batch, so
        that a tick authorizing many tasks takes the write lock once."""
        if not verdicts:
            return
        with self.tx() as c:
            for task_id, reason in verdicts:
                self._set_fields(c, task_id, {"authorized": True})
                self._event(c, task_id, "authorized", None, None, reason)

    def active_task(self, c: Tx | None, repo: str, issue: int) -> Task | None:
        """The issue's pending or running task (there is at most one), or None."""
        return self._one(
            c or self._conn(),
            "SELECT * FROM tasks WHERE repo = ? AND issue = ? "
            "AND state IN ('pending', 'running') ORDER BY id LIMIT 1",
            (repo, issue),
        )

    def latest_task(self, c: Tx | None, repo: str, issue: int) -> Task | None:
        """The issue's newest task, whatever its state, or None."""
        return self._one(
            c or self._conn(),
            "SELECT * FROM tasks WHERE repo = ? AND issue = ? ORDER BY id DESC LIMIT 1",
            (repo, issue),
        )

    def count(self, state: State) -> int:
        """Tasks in that state (read from the index by state: as many steps as there are)."""
        return _number(self._conn(), "SELECT COUNT(*) FROM tasks WHERE state = ?", (state.value,))

    def claim(
        self,
        limit: int,
        worker_id: str,
        *,
        max_claims: int | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        node: str | None = None,
        locality_wait: float = LOCALITY_WAIT_SECONDS,
    ) -> list[Task]:
        """Lease up to (limit - running) ready tasks, at most `max_claims` (the worker's
        free capacity), one per issue, in the fair order (`_fair_order`, through
        `_claim_candidates`): each goes from pending to running through `_transition()`,
        its attempt counted, with a new lease token that runs out `lease_seconds` from now
        unless renewed.

        Admission and update happen in one write transaction (`_admit`), so no
        interleaving of threads, processes or machines can push the number of running
        tasks over `limit`. With `node`, a follow-up whose issue's worktree is on another
        node with a live worker is left to that node for `locality_wait` seconds.
        """
        now = self.clock()
        # A read first: with nothing ready, or every slot taken (as while a backlog waits
        # for long-running agents, tick after tick), there is no write transaction at all.
        # The admission inside the transaction below is the one that decides.
        running, ready = (
            self._conn()
            .execute(
                "SELECT (SELECT COUNT(*) FROM tasks WHERE state = 'running'), "
                "EXISTS (SELECT 1 FROM tasks WHERE state = 'pending' AND authorized = 1 "
                "AND not_before <= ?)",
                (now,),
            )
            .fetchone()
        )
        if not ready or running >= limit or (max_claims is not None and max_claims <= 0):
            return []
        with self.tx() as c:
            slots = self._admit(c, limit, limit if max_claims is None else min(max_claims, limit))
            if not slots:
                return []
            sql, args = self._claim_candidates(now, len(slots), node, locality_wait)
            rows = c.execute(sql, args).fetchall()
            claimed: list[int] = []
            for row in rows:
                if len(claimed) == len(slots):
                    break
                if not self._lock_candidate(c, row["id"]):
                    continue  # another claim is taking it at this moment
                slot = slots[len(claimed)]
                if self._transition(
                    c,
                    row["id"],
                    State.PENDING,
                    State.RUNNING,
                    event="claimed",
                    detail=worker_id,
                    attempts=row["attempts"] + 1,
                    worker_id=worker_id,
                    started_at=now,
                    pid=None,
                    pid_start=None,
                    error=None,
                    lease_token=uuid.uuid4().hex,
                    lease_expires_at=now + lease_seconds,
                    slot=slot,
                ):
                    self._take_slot(c, slot, row["id"])
                    self._take_turn(c, row["repo"], row["requested_by"])
                    claimed.append(row["id"])
            result = self._tasks(
                c, [c.execute("SELECT * FROM tasks WHERE id = ?", (i,)).fetchone() for i in claimed]
            )
        return result

    def _admit(self, c: Conn, limit: int, wanted: int) -> list[int]:
        """The slots this claim may fill, at most `wanted`, lowest first, inside its write
        transaction: SQLite holds the file's write lock from BEGIN IMMEDIATE on, so
        counting the running tasks here is exact. (PostgresStore locks free slot rows
        instead.) A slot is a number from 0 to `limit` - 1 that no running task holds;
        with the sandbox it is the agent's uid (`first_uid` + slot), so no two running
        agents share one. Free slots exist below the limit while fewer than `limit`
        tasks run, even after the limit was lowered under running tasks."""
        running = c.execute("SELECT COUNT(*) FROM tasks WHERE state = 'running'").fetchone()[0]
        held = {
            r[0]
            for r in c.execute(
                "SELECT slot FROM tasks WHERE state = 'running' AND slot IS NOT NULL"
            )
        }
        free = [s for s in range(limit) if s not in held]
        return free[: max(0, min(limit - running, wanted))]

    def _lock_candidate(self, c: Conn, task_id: int) -> bool:
        """The candidate task is this claim's to try, False if another claim holds it now
        (PostgreSQL). SQLite's write lock, held since BEGIN IMMEDIATE, already makes it so."""
        return True

    def _take_slot(self, c: Conn, slot: int, task_id: int) -> None:
        """A claimed task holds the slot `_admit` gave it (PostgreSQL's slot rows)."""

    def _free_slot(self, c: Conn, task_id: int) -> None:
        """A task that stops running gives its slot back (PostgreSQL's slot rows)."""

    def _claim_candidates(
        self, now: float, free: int, node: str | None, locality_wait: float
    ) -> tuple[str, list[Any]]:
        """The claim's candidate query: ready tasks, one per issue (the issue's oldest
        pending task, and none while the issue has one running), in the fair order
        (`_fair_order`), up to CLAIM_SPARE more than `free`: on PostgreSQL a claim at the
        same moment may take one of them first, and this claim then takes the next. What
        makes the claim exact is `_admit` and the compare-and-set; the order and the
        filters here only choose among the ready tasks."""
        waiting = """
                t.state = 'pending' AND t.authorized = 1 AND t.not_before <= ?
                AND NOT EXISTS (SELECT 1 FROM tasks AS r WHERE r.repo = t.repo
                                AND r.issue = t.issue AND r.state = 'running')
                AND NOT EXISTS (SELECT 1 FROM tasks AS e WHERE e.repo = t.repo
                                AND e.issue = t.issue AND e.state = 'pending'
                                AND e.id < t.id)
                """
        args: list[Any] = [now]
        if node is not None:
            # locality: a follow-up waits a while for the node that holds its worktree
            waiting += """
                AND NOT (t.kind = 'continue' AND t.created_at > ? AND EXISTS (
                    SELECT 1 FROM issues AS i JOIN workers AS w ON w.node = i.node
                    WHERE i.repo = t.repo AND i.number = t.issue AND i.node <> ?
                      AND w.heartbeat_at > ?))
                """
            args += [now - locality_wait, node, now - LIVE_WORKER_SECONDS]
        sql = (
            _fair_order(waiting)
            + " SELECT queue.id, tasks.attempts, tasks.repo, tasks.requested_by FROM queue"
            " JOIN tasks ON tasks.id = queue.id ORDER BY queue.position LIMIT ?"
        )
        args.append(free + CLAIM_SPARE)
        return sql, args

    def _take_turn(self, c: Tx, repo: str, requested_by: str) -> None:
        """Record that `repo` and its `requested_by` just got a slot: their turn is the
        newest, so the others come before them in the next round (`_fair_order`)."""
        turn = c.execute("SELECT COALESCE(MAX(turn), 0) + 1 FROM repo_turns").fetchone()[0]
        c.execute(
            "INSERT INTO repo_turns (repo, turn) VALUES (?, ?) "
            "ON CONFLICT (repo) DO UPDATE SET turn = excluded.turn",
            (repo, turn),
        )
        c.execute(
            "INSERT INTO requester_turns (repo, requested_by, turn) VALUES (?, ?, ?) "
            "ON CONFLICT (repo, requested_by) DO UPDATE SET turn = excluded.turn",
            (repo, requested_by, turn),
        )

    def unauthorized_pending(self, limit: int = 50) -> list[Task]:
        conn = self._conn()
        return self._tasks(
            conn,
            conn.execute(
                "SELECT * FROM tasks WHERE state = 'pending' AND authorized IS NULL "
                "ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall(),
        )

    def cancel_requested(self, task_id: int) -> str | None:
        row = (
            self._conn()
            .execute("SELECT cancel_requested_by FROM tasks WHERE id = ?", (task_id,))
            .fetchone()
        )
        return row[0] if row else None

    def request_cancel(self, task_id: int, by: str, *, via: str | None = None) -> CancelResult:
        """Stop a task: a pending one is cancelled at once, a running one is flagged for its
        runner (which stops its agent). `by` is who asked (the tracking comment names
        them), `via` where, for the task's events ("the dashboard"). KeyError if there is
        no such task."""
        detail = by if via is None else f"{by} via {via}"
        for _ in range(5):
            task = self.require(task_id)
            if task.state is State.PENDING:
                if self.transition(
                    task_id,
                    State.PENDING,
                    State.CANCELLED,
                    event="cancelled",
                    detail=detail,
                    cancel_requested_by=by,
                    outcome=Outcome.CANCELLED,
                ):
                    return CancelResult.CANCELLED
                continue
            if task.state is State.RUNNING:
                with self.tx() as c:
                    cur = c.execute(
                        "UPDATE tasks SET cancel_requested_by = ?, updated_at = ?, "
                        "version = version + 1 WHERE id = ? AND state = 'running'",
                        (by, self.clock(), task_id),
                    )
                    if cur.rowcount == 1:
                        self._event(c, task_id, "stop requested", None, None, detail)
                        return CancelResult.STOPPING
                continue
            return CancelResult.FINISHED
        return CancelResult.FINISHED

    def try_requeue(
        self,
        task_id: int,
        by: str,
        *,
        via: str | None = None,
        answer_on: int | None = None,
    ) -> tuple[bool, Task | None]:
        """Put a failed or cancelled task back in the queue with fresh attempts, noting
        `by` on it (its tracking comment names them) and `via` in its events. Returns
        (done, the other active task of its issue that stands in the way, if one does):
        not done when the task is not failed or cancelled, or while another task of its
        issue is pending or running (at most one active task per issue). `answer_on`:
        where its result is to be posted when it ends again (where the retry was asked).

        The check and the compare-and-set share one write transaction, so no task of the
        issue can become active in between. KeyError if there is no such task."""
        with self.tx() as c:
            task = self._one(c, "SELECT * FROM tasks WHERE id = ?", (task_id,))
            if task is None:
                raise KeyError(f"no task {task_id}")
            if task.state not in (State.FAILED, State.CANCELLED):
                return False, None
            active = self.active_task(c, task.repo, task.issue)
            if active is not None:
                return False, active
            done = self._transition(
                c,
                task_id,
                task.state,
                State.PENDING,
                event="retry requested",
                detail=by if via is None else f"{by} via {via}",
                retried_by=by,
                attempts=0,
                # ready from now: the wait counted when it starts runs from here
                not_before=self.clock(),
                outcome=None,
                error=None,
                cancel_requested_by=None,
                finished_at=None,
                answer_on=answer_on,
                answer_id=None,
            )
            return done, None

    def next_due(self) -> float | None:
        """When the next task or item for Gitea in the outbox that waits out a back-off
        becomes due (later than now), or None if none waits."""
        now = self.clock()
        row = (
            self._conn()
            .execute(
                "SELECT (SELECT MIN(not_before) FROM tasks WHERE state = 'pending' "
                "AND not_before > ?), (SELECT MIN(not_before) FROM outbox "
                "WHERE done_at IS NULL AND endpoint IS NULL AND not_before > ?)",
                (now, now),
            )
            .fetchone()
        )
        found = [t for t in row if t is not None]
        return min(found) if found else None

    def queue_position(self, task_id: int) -> int | None:
        """1-based place among the tasks waiting (pending, not refused), in the order they
        get slots (`_fair_order`); None if the task is not waiting."""
        task = self.get(task_id)  # a row that cannot be read is set aside here
        if task is None or task.state is not State.PENDING:
            return None
        row = (
            self._conn()
            .execute(_fair_order(_WAITING) + " SELECT position FROM queue WHERE id = ?", (task_id,))
            .fetchone()
        )
        return row[0] if row else None

    def pending_positions(self, limit: int, *, unchecked: bool = False) -> list[tuple[Task, int]]:
        """The first `limit` authorized waiting tasks with their places in the queue (the
        same places `queue_position` gives), first place first; with `unchecked`, those
        whose requester's permission is still to be checked too (the dashboard's queue)."""
        conn = self._conn()
        authorized = "" if unchecked else "WHERE tasks.authorized = 1 "
        rows = conn.execute(
            _fair_order(_WAITING) + " SELECT tasks.*, queue.position AS queue_place FROM queue "
            f"JOIN tasks ON tasks.id = queue.id {authorized}"
            "ORDER BY queue.position LIMIT ?",
            (limit,),
        ).fetchall()
        places = {row["id"]: row["queue_place"] for row in rows}
        return [(task, places[task.id]) for task in self._tasks(conn, rows)]

    def comment_out_of_date(self, limit: int) -> list[Task]:
        """Tasks whose tracking comment has not caught up with their last change."""
        conn = self._conn()
        return self._tasks(
            conn,
            conn.execute(
                "SELECT * FROM tasks WHERE comment_version < version AND authorized IS NOT NULL "
                "ORDER BY (state = 'pending'), id LIMIT ?",
                (limit,),
            ).fetchall(),
        )

    def comment_synced(
        self, task_id: int, version: int, body: str, comment_id: int | None = None
    ) -> None:
        self.comment_synced_many([(task_id, version, body, comment_id)])

    def comment_synced_many(self, records: Sequence[CommentRecord]) -> None:
        """Record tracking comments written to Gitea, in one transaction: (task id, the
        task's version the body shows, the body, the comment's id if it was just created)."""
        if not records:
            return
        with self.tx() as c:
            c.executemany(
                "UPDATE tasks SET comment_id = COALESCE(?, comment_id), "
                "comment_version = CASE WHEN comment_version > ? THEN comment_version "
                "ELSE ? END, comment_body = ? WHERE id = ?",
                [
                    (comment_id, version, version, body, task_id)
                    for task_id, version, body, comment_id in records
                ],
            )

    def comment_attempt(self, task_id: int) -> None:
        """Note that a tracking comment is about to be created (see Publisher.sync_task)."""
        with self.tx() as c:
            c.execute(
                "UPDATE tasks SET comment_body = COALESCE(comment_body, '') WHERE id = ?",
                (task_id,),
            )

    def comment_state(self, task_id: int) -> tuple[int, str | None]:
        row = (
            self._conn()
            .execute("SELECT version, comment_body FROM tasks WHERE id = ?", (task_id,))
            .fetchone()
        )
        return (row[0], row[1]) if row else (0, None)

    def stats(self) -> Stats:
        """Counts over the whole table, for `kugetsu queue stats`: it reads every row, so
        nothing the worker does on its own calls it."""
        conn = self._conn()
        by_state = {s.value: 0 for s in State}
        for row in conn.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state"):
            by_state[row[0]] = row[1]
        by_outcome = {
            row[0]: row[1]
            for row in conn.execute(
                "SELECT outcome, COUNT(*) FROM tasks WHERE outcome IS NOT NULL GROUP BY outcome"
            )
        }
        now = self.clock()
        ready = _number(
            conn, "SELECT COUNT(*) FROM tasks WHERE state = 'pending' AND not_before <= ?", (now,)
        )
        oldest = conn.execute(
            "SELECT MIN(created_at) FROM tasks WHERE state = 'pending'"
        ).fetchone()[0]
        return Stats(
            by_state,
            by_outcome,
            by_state["running"],
            ready,
            None if oldest is None else max(0.0, now - oldest),
            self.worker_stats(),
        )

    def clear(self, older_than_days: float) -> int:
        """Delete finished tasks older than that; active tasks are never deleted.

        Deliveries and sent replies of that age go too. Each table goes in batches of
        CLEAR_BATCH rows, one write transaction each, found through an index: the
        receiver's deliveries wait for the write lock at most one batch, and the work
        grows with what is deleted, not with what is kept."""
        if not math.isfinite(older_than_days) or older_than_days < 0:
            raise ValueError(f"older_than_days must be a finite number >= 0, got {older_than_days}")
        cutoff = self.clock() - older_than_days * 86400.0
        tasks = 0
        for table, old in (
            ("tasks", f"{_TERMINAL} AND COALESCE(finished_at, updated_at) < ?"),
            ("deliveries", "received_at < ?"),
            ("outbox", "done_at IS NOT NULL AND done_at < ?"),
            ("replies", "at < ?"),
        ):
            while True:
                with self.tx() as c:
                    count = c.execute(
                        f"DELETE FROM {table} WHERE {self.ROWID} IN "
                        f"(SELECT {self.ROWID} FROM {table} WHERE {old} LIMIT ?)",
                        (cutoff, CLEAR_BATCH),
                    ).rowcount
                if table == "tasks":
                    tasks += count
                if count < CLEAR_BATCH:
                    break
        return tasks

    # ------------------------------------------------------------------ issues

    def issue_row(self, c: Tx | None, repo: str, number: int) -> dict[str, Any] | None:
        """What kugetsu remembers of an issue (labels, its pull request, branch, agent
        session), or None if nothing."""
        row = (
            (c or self._conn())
            .execute("SELECT * FROM issues WHERE repo = ? AND number = ?", (repo, number))
            .fetchone()
        )
        if row is None:
            return None
        data = dict(row)
        data["labels"] = None if data["labels"] is None else json.loads(data["labels"])
        return data

    def set_issue(self, c: Tx | None, repo: str, number: int, **values: Any) -> None:
        """Remember `values` (labels, pr_number, branch, session_id, agent; state and
        state_checked_at, what Gitea said of it last; the node that holds its worktree and
        agent home) of an issue; with `c` None, in a write transaction of its own."""
        allowed = {
            "labels",
            "pr_number",
            "branch",
            "session_id",
            "agent",
            "state",
            "state_checked_at",
            "node",
        }
        if set(values) - allowed:
            raise ValueError(f"unknown issue fields {sorted(set(values) - allowed)}")
        if "labels" in values and values["labels"] is not None:
            values["labels"] = json.dumps(sorted(values["labels"]))

        def write(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO issues (repo, number, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (repo, number) DO NOTHING",
                (repo, number, self.clock()),
            )
            if values:
                sets = ", ".join(f"{k} = ?" for k in values)
                conn.execute(
                    f"UPDATE issues SET {sets}, updated_at = ? WHERE repo = ? AND number = ?",
                    (*values.values(), self.clock(), repo, number),
                )

        if c is not None:
            write(c)
        else:
            with self.tx() as conn:
                write(conn)

    def issue_for_pr(self, c: Tx | None, repo: str, pr_number: int) -> int | None:
        """The issue whose task opened pull request `pr_number`, or None."""
        row = (
            (c or self._conn())
            .execute(
                "SELECT number FROM issues WHERE repo = ? AND pr_number = ?", (repo, pr_number)
            )
            .fetchone()
        )
        return row[0] if row else None

    # ------------------------------------------------------------------ deliveries

    def seen_delivery(self, c: Tx, delivery_id: str, event: str, repo: str | None = None) -> bool:
        """Record a delivery id, with the repository it came from when it names one; True
        if it was already recorded."""
        cur = c.execute(
            "INSERT INTO deliveries (id, event, received_at, repo) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            (delivery_id, event, self.clock(), repo),
        )
        return bool(cur.rowcount == 0)

    def delivery_known(self, delivery_id: str) -> bool:
        """Whether a delivery (or a review taken as one) was recorded."""
        row = (
            self._conn().execute("SELECT 1 FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
        )
        return row is not None

    def served_repos(self) -> list[str]:
        """The repositories kugetsu serves as the database knows them: those with tasks or
        deliveries, sorted. Read from the indexes on repo, never from the rows."""
        rows = self._conn().execute(
            "SELECT repo FROM tasks GROUP BY repo UNION "
            "SELECT repo FROM deliveries WHERE repo IS NOT NULL GROUP BY repo"
        )
        return sorted(row[0] for row in rows)

    def last_delivery(
        self, repo: str, *, event: str | None = None, since: float | None = None
    ) -> float | None:
        """When the newest delivery from `repo` (of `event`, at or after `since`) arrived,
        or None if none did."""
        sql, args = "SELECT MAX(received_at) FROM deliveries WHERE repo = ?", list[Any]([repo])
        if event is not None:
            sql += " AND event = ?"
            args.append(event)
        if since is not None:
            sql += " AND received_at >= ?"
            args.append(since)
        newest = self._conn().execute(sql, args).fetchone()[0]
        return None if newest is None else float(newest)

    def delivery_result(self, c: Tx, delivery_id: str, result: str) -> None:
        c.execute("UPDATE deliveries SET result = ? WHERE id = ?", (result, delivery_id))

    def seen_event(self, c: Tx, key: str, event: str) -> bool:
        """Record what a delivery is about (`core.events.event_key`: the same for the
        delivery of an event and for the reconcile pass that found it on Gitea); True if
        it was already recorded, whichever came first. Kept as long as deliveries are."""
        return self.seen_delivery(c, key, event)

    # ------------------------------------------------------------------ repositories

    def note_repo(self, c: Tx, repo: str) -> None:
        """Remember that kugetsu serves `repo` (a task, a delivery, the config), from now
        on if it did not already."""
        c.execute(
            "INSERT INTO repos (repo, first_seen) VALUES (?, ?) ON CONFLICT (repo) DO NOTHING",
            (repo, self.clock()),
        )

    def reconcile_windows(self) -> list[tuple[str, float, float | None]]:
        """(repository, when kugetsu first served it, how far a reconcile pass has looked
        on Gitea, in Gitea's time, or None), for every repository noted (`note_repo`):
        those `served_repos` names, and those the config named to a pass."""
        return [
            (row[0], row[1], row[2])
            for row in self._conn().execute(
                "SELECT repo, first_seen, reconciled_to FROM repos ORDER BY repo"
            )
        ]

    def reconciled(self, repo: str, to: float) -> None:
        """A reconcile pass has looked at `repo` up to `to` (Gitea's time)."""
        with self.tx() as c:
            c.execute("UPDATE repos SET reconciled_to = ? WHERE repo = ?", (to, repo))

    def refuse_repo_file(self, repo: str, blob: str, issue: int, body: str) -> bool:
        """Answer on `issue` with `body` that a repository's settings file cannot be used,
        once per version of the file (`blob`, its git object id): True if this is the
        first time, and the answer was queued (in the outbox, with the note, atomically)."""
        with self.tx() as c:
            new = c.execute(
                "INSERT INTO repo_files_refused (repo, blob, at) VALUES (?, ?, ?) "
                "ON CONFLICT (repo, blob) DO NOTHING",
                (repo, blob, self.clock()),
            ).rowcount
            if new:
                self.add_outbox(c, OutboxItem(OutboxKind.COMMENT, repo, issue, body=body))
            return bool(new)

    # ------------------------------------------------------------------ outbox

    def add_outbox(self, c: Tx, item: OutboxItem) -> int:
        """Store an outbox item inside the caller's transaction; returns its id."""
        cur = c.execute(
            "INSERT INTO outbox (repo, issue, kind, target, body, requested_by, permission_hint, "
            "needs_permission, quiet, endpoint, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                item.repo,
                item.issue,
                item.kind.value,
                item.target,
                item.body,
                item.requested_by,
                item.permission_hint,
                int(item.needs_permission),
                int(item.quiet),
                item.endpoint,
                self.clock(),
            ),
        )
        return _inserted_id(cur)

    def outbox_due(self, limit: int) -> list[OutboxItem]:
        """Items for Gitea due now, oldest first (notifications are read per endpoint:
        `notify_queue`). An item of a kind this code does not know (written by a newer
        kugetsu, or by hand) is marked done with the reason, and left out."""
        rows = (
            self._conn()
            .execute(
                # the index that holds Gitea's items alone: notifications waiting for an
                # endpoint that is down are never read here, however many there are
                f"SELECT * FROM outbox {self._indexed_by('outbox_gitea_due')}WHERE done_at IS NULL "
                "AND endpoint IS NULL AND not_before <= ? ORDER BY id LIMIT ?",
                (self.clock(), limit),
            )
            .fetchall()
        )
        return self._outbox_items(rows)

    def _outbox_items(self, rows: Sequence[Row]) -> list[OutboxItem]:
        items, unknown = [], []
        for r in rows:
            try:
                kind = OutboxKind(r["kind"])
            except ValueError:
                unknown.append((r["id"], f"set aside: unknown kind {_shown(r['kind'])}"))
                log.error("outbox item set aside", extra={"item": r["id"], "kind": r["kind"]})
                continue
            items.append(
                OutboxItem(
                    kind,
                    r["repo"],
                    r["issue"],
                    requested_by=r["requested_by"],
                    permission_hint=r["permission_hint"],
                    body=r["body"],
                    target=r["target"],
                    needs_permission=bool(r["needs_permission"]),
                    quiet=bool(r["quiet"]),
                    id=r["id"],
                    attempts=r["attempts"],
                    endpoint=r["endpoint"],
                    created_at=r["created_at"],
                    not_before=r["not_before"],
                    error=r["error"],
                )
            )
        self.outbox_done_many(unknown)
        return items

    def notify_queue(self, endpoint: str, limit: int) -> list[OutboxItem]:
        """The first `limit` notifications still to send to `endpoint`, in the order they
        were written, whether due or not: the first one that is not due holds the others
        back, so an endpoint gets its events in order."""
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM outbox WHERE endpoint = ? AND done_at IS NULL "
                "AND endpoint IS NOT NULL ORDER BY id LIMIT ?",
                (endpoint, limit),
            )
            .fetchall()
        )
        return self._outbox_items(rows)

    def notify_endpoints(self) -> list[str]:
        """Endpoints that have notifications still to send (read from the partial index)."""
        return [
            row[0]
            for row in self._conn().execute(
                "SELECT DISTINCT endpoint FROM outbox WHERE done_at IS NULL "
                "AND endpoint IS NOT NULL"
            )
        ]

    def drop_notifications(self, endpoint: str, error: str) -> int:
        """Mark every notification still to send to `endpoint` done with `error` (an
        endpoint no longer configured); returns how many."""
        with self.tx() as c:
            cur = c.execute(
                "UPDATE outbox SET done_at = ?, error = ? WHERE endpoint = ? "
                "AND done_at IS NULL AND endpoint IS NOT NULL",
                (self.clock(), error, endpoint),
            )
            return int(cur.rowcount)

    def outbox_done(self, item_id: int, error: str | None = None) -> None:
        self.outbox_done_many([(item_id, error)])

    def outbox_done_many(self, items: Sequence[tuple[int, str | None]]) -> None:
        """Mark (item id, error or None) pairs done, in one transaction."""
        if not items:
            return
        now = self.clock()
        with self.tx() as c:
            c.executemany(
                "UPDATE outbox SET done_at = ?, error = ? WHERE id = ?",
                [(now, error, item_id) for item_id, error in items],
            )

    def outbox_retry(self, item_id: int, delay: float, error: str) -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE outbox SET attempts = attempts + 1, not_before = ?, error = ? WHERE id = ?",
                (self.clock() + delay, error, item_id),
            )

    # ------------------------------------------------------------------ replies

    def recent_replies(self, c: Tx, repo: str, issue: int, login: str, seconds: float) -> int:
        """Replies to `login` on issue (or pull request) `issue` in the last `seconds`."""
        return _number(
            c,
            "SELECT COUNT(*) FROM replies WHERE repo = ? AND issue = ? AND login = ? AND at > ?",
            (repo, issue, login, self.clock() - seconds),
        )

    def note_reply(self, c: Tx, repo: str, issue: int, login: str, seconds: float) -> None:
        """Count a reply to `login` on `issue`, forgetting theirs older than `seconds`."""
        now = self.clock()
        c.execute(
            "DELETE FROM replies WHERE repo = ? AND issue = ? AND login = ? AND at <= ?",
            (repo, issue, login, now - seconds),
        )
        c.execute(
            "INSERT INTO replies (repo, issue, login, at) VALUES (?, ?, ?, ?)",
            (repo, issue, login, now),
        )

    # ------------------------------------------------------------------ workers

    def register_worker(
        self,
        worker_id: str,
        pid: int,
        pid_start: str | None,
        *,
        host: str | None = None,
        node: str | None = None,
        capacity: int | None = None,
    ) -> None:
        """Say that a worker runs: on `host` (the machine, by default this one), from
        `node` (the machine and its data directory, where its worktrees are), with room
        for `capacity` agents."""
        now = self.clock()
        with self.tx() as c:
            c.execute(
                "INSERT INTO workers (id, host, pid, pid_start, started_at, heartbeat_at, "
                "node, capacity) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
                "SET host = excluded.host, pid = excluded.pid, pid_start = excluded.pid_start, "
                "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, "
                "node = excluded.node, capacity = excluded.capacity",
                (worker_id, host or socket.gethostname(), pid, pid_start, now, now, node, capacity),
            )

    def heartbeat(
        self,
        worker_id: str,
        report: str | None = None,
        counts: Mapping[metrics.Key, float] | None = None,
    ) -> None:
        """Say the worker lives; with `report`, also what it says about its ticks (read by
        the receiver's /healthz through `worker_report`); with `counts`, add what it
        counted in memory since (its Gitea calls) to the counters."""
        with self.tx() as c:
            c.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", (self.clock(), worker_id))
            if report is not None:
                self._set_meta(c, _REPORT_KEY + worker_id, report)
            if counts:
                self.add_counts(c, counts)

    def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker, and free the leases it held: a process found dead (kill -9)
        would otherwise keep the publisher lease, and with it every tracking comment and
        reply, until the lease ran out."""
        with self.tx() as c:
            c.execute("DELETE FROM workers WHERE id = ?", (worker_id,))
            c.execute("DELETE FROM leases WHERE owner = ?", (worker_id,))
            c.execute(
                "DELETE FROM meta WHERE key IN (?, ?)",
                (_REPORT_KEY + worker_id, _READY_KEY + worker_id),
            )

    def workers(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn().execute("SELECT * FROM workers")]

    def set_readiness(self, worker_id: str, readiness: str) -> None:
        """What the worker's checks found (read by /healthz and /readyz through
        `worker_report`)."""
        self.set_meta(_READY_KEY + worker_id, readiness)

    def worker_report(self, host: str, pid: int) -> tuple[float, str | None, str | None] | None:
        """(heartbeat time, tick report, readiness) of the worker running as `pid` on
        `host`, or None if it has not registered."""
        row = (
            self._conn()
            .execute(
                "SELECT w.heartbeat_at, m.value, r.value FROM workers AS w "
                "LEFT JOIN meta AS m ON m.key = ? || w.id "
                "LEFT JOIN meta AS r ON r.key = ? || w.id WHERE w.host = ? AND w.pid = ? "
                "ORDER BY w.started_at DESC LIMIT 1",
                (_REPORT_KEY, _READY_KEY, host, pid),
            )
            .fetchone()
        )
        return (row[0], row[1], row[2]) if row else None

    def worker_stats(self) -> list[dict[str, Any]]:
        """Each registered worker as `queue stats` and /metrics show it: where it runs,
        its capacity, how old its heartbeat is and how many tasks it runs."""
        now = self.clock()
        rows = self._conn().execute(
            "SELECT w.id, w.host, w.node, w.capacity, w.heartbeat_at, "
            "(SELECT COUNT(*) FROM tasks AS t WHERE t.state = 'running' "
            "AND t.worker_id = w.id) AS running FROM workers AS w ORDER BY w.id"
        )
        return [
            {
                "id": r["id"],
                "host": r["host"],
                "node": r["node"],
                "capacity": r["capacity"],
                "heartbeat_age_seconds": max(0.0, now - r["heartbeat_at"]),
                "running": int(r["running"]),
            }
            for r in rows
        ]

    def running_tasks(self) -> list[Task]:
        return self.list_tasks(State.RUNNING)

    def active_tasks(self) -> list[Task]:
        """Pending and running tasks (read from the index by state)."""
        return self.list_tasks(State.PENDING) + self.list_tasks(State.RUNNING)

    # ------------------------------------------------------------------ leases

    def try_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Hold `name` for `ttl` seconds unless another owner holds it; renewing is allowed.
        One statement, a compare-and-set: two nodes asking at once cannot both get it."""
        now = self.clock()
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                "WHERE leases.owner = excluded.owner OR leases.expires_at <= ?",
                (name, owner, now + ttl, now),
            )
            return bool(cur.rowcount == 1)

    def holds_lease(self, name: str, owner: str, margin: float = 0.0) -> bool:
        """The check a node makes before a step only the holder of lease `name` may take:
        True if `owner` holds it for at least `margin` seconds more, or if no one holds
        it now; False while another owner does."""
        row = (
            self._conn()
            .execute("SELECT owner, expires_at FROM leases WHERE name = ?", (name,))
            .fetchone()
        )
        now = self.clock()
        if row is None or (row[0] != owner and row[1] <= now):
            return True
        return bool(row[0] == owner and row[1] > now + margin)

    def renew_leases(self, leases: Mapping[int, str], seconds: float) -> set[int]:
        """Extend each running task's lease (task id -> its token) to `seconds` from now,
        by compare-and-set on the token, in one transaction. Returns the ids whose lease
        this worker no longer holds: the task was recovered, stopped or finished."""
        if not leases:
            return set()
        until = self.clock() + seconds
        lost = set()
        with self.tx() as c:
            for task_id, token in leases.items():
                cur = c.execute(
                    "UPDATE tasks SET lease_expires_at = ? "
                    "WHERE id = ? AND state = 'running' AND lease_token = ?",
                    (until, task_id, token),
                )
                if cur.rowcount != 1:
                    lost.add(task_id)
        return lost

    def leases_expired(self) -> bool:
        """True if a running task's lease has run out (its worker stopped renewing)."""
        row = (
            self._conn()
            .execute(
                "SELECT 1 FROM tasks WHERE state = 'running' AND lease_expires_at < ? LIMIT 1",
                (self.clock(),),
            )
            .fetchone()
        )
        return row is not None

    def hold_lease(self, task_id: int, token: str | None, seconds: float) -> bool:
        """The fence before a step that publishes: True if the task's lease is still
        `token`'s, renewed for `seconds` by the same compare-and-set, so no other worker
        can take the task over for that long."""
        return token is not None and not self.renew_leases({task_id: token}, seconds)

    def repair_slots(self) -> int:
        """Give back slots held by tasks that no longer run (PostgreSQL's slot rows; a
        task leaves `running` only through `_transition` and `_set_aside_row`, which free
        its slot, so this finds none unless a row was changed by hand)."""
        return 0

    def release_lease(self, name: str, owner: str) -> None:
        """Let go of `name` if `owner` holds it."""
        with self.tx() as c:
            c.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def release_leases(self, owner: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM leases WHERE owner = ?", (owner,))

    # ------------------------------------------------------------------ counters (/metrics)

    def add_counts(self, c: Tx | None, counts: Mapping[metrics.Key, float]) -> None:
        """Add to counters (bot/core/metrics.py), inside the caller's transaction, or with
        `c` None in one of its own."""
        if not counts:
            return
        # in one order in every transaction: on PostgreSQL each row is locked until commit,
        # and two finishes that took the same counters in opposite orders would deadlock
        rows = sorted((name, labels, amount) for (name, labels), amount in counts.items())
        sql = (
            "INSERT INTO counters (name, labels, value) VALUES (?, ?, ?) "
            "ON CONFLICT (name, labels) DO UPDATE SET value = counters.value + excluded.value"
        )
        if c is not None:
            c.executemany(sql, rows)
            return
        with self.tx() as conn:
            conn.executemany(sql, rows)

    def metrics_snapshot(self, *, by_repo: bool = False) -> MetricsSnapshot:
        """What /metrics shows, read in one read transaction (one consistent view). Costs
        the same whatever the history: the counters are a row per series, the counts by
        state come from the index by state, and the running tasks are few."""
        with self.snapshot() as conn:
            if by_repo:
                tasks = [
                    (row[0], row[1], row[2])
                    for row in conn.execute(
                        "SELECT state, repo, COUNT(*) FROM tasks GROUP BY state, repo"
                    )
                ]
            else:
                tasks = [
                    (row[0], None, row[1])
                    for row in conn.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state")
                ]
            agents = conn.execute(
                "SELECT COUNT(*) FROM tasks WHERE state = 'running' AND pid IS NOT NULL"
            ).fetchone()[0]
            counters = [
                (row[0], row[1], row[2])
                for row in conn.execute("SELECT name, labels, value FROM counters")
            ]
            disk = [
                (row[0][len(_DISK_KEY) :], row[1])
                for row in conn.execute(
                    "SELECT key, value FROM meta WHERE key >= ? AND key < ?",
                    (_DISK_KEY, _DISK_KEY[:-1] + chr(ord(_DISK_KEY[-1]) + 1)),
                )
            ]
            workers = self.worker_stats()
        return MetricsSnapshot(tasks, agents, counters, disk, workers)

    def set_disk_usage(self, host: str, usage: str) -> None:
        """What a worker measured of the disk its data directory uses (a JSON object)."""
        self.set_meta(_DISK_KEY + host, usage)

    # ------------------------------------------------------------------ the dashboard

    def task_repos(self) -> list[str]:
        """Every repository with tasks, in order (`_distinct`)."""
        return self._distinct("repo")

    def task_agents(self) -> list[str]:
        """Every agent tasks were given, in order (`_distinct`)."""
        return self._distinct("agent")

    def _distinct(self, column: str) -> list[str]:
        """The values of `column` in tasks, in order. A skip scan of the index that starts
        with it (migration 16): as many steps as there are values, whatever the number of
        tasks (a GROUP BY would read every entry)."""
        assert column in ("repo", "agent"), column
        return [
            row[0]
            for row in self._conn().execute(
                f"WITH RECURSIVE r(v) AS (SELECT MIN({column}) FROM tasks UNION ALL "
                f"SELECT (SELECT MIN({column}) FROM tasks WHERE {column} > r.v) FROM r "
                "WHERE r.v IS NOT NULL) SELECT v FROM r WHERE v IS NOT NULL"
            )
        ]

    def find_tasks(self, query: TaskQuery, *, before: int | None = None, limit: int) -> list[Task]:
        """Tasks that match, newest first; with `before`, only ids below it."""
        tail, args = "", list[Any]()
        if before is not None:
            tail, args = " AND id < ?", [before]
        return self._newest(query, "", tail, args, "id DESC", limit, lambda t: t.id)

    def finished_tasks(
        self, query: TaskQuery, *, before: tuple[float, int] | None = None, limit: int
    ) -> list[Task]:
        """Finished tasks that match: the last to finish first, or with a filter besides
        the repositories, the newest first (each filter has an index by id); `before` is
        (when it finished, id) of the last one shown, for the next page."""
        tail, args = f" AND {_TERMINAL}", list[Any]()
        if query.state or query.agent or query.requester or query.issue is not None:
            if before is not None:
                tail += " AND id < ?"
                args.append(before[1])
            return self._newest(query, "", tail, args, "id DESC", limit, lambda t: t.id)
        if before is not None:
            tail += f" AND ({_FINISHED_AT}, id) < (?, ?)"
            args.extend(before)
        return self._newest(
            query,
            self._indexed_by("tasks_finished_recent") if query.repos is None else "",
            tail,
            args,
            f"{_FINISHED_AT} DESC, id DESC",
            limit,
            lambda t: (t.finished_at or t.updated_at, t.id),
        )

    def _newest(
        self,
        query: TaskQuery,
        index: str,
        tail: str,
        args: list[Any],
        order: str,
        limit: int,
        key: Callable[[Task], Any],
    ) -> list[Task]:
        """The first `limit` tasks in `order` that match `query` and `tail`. For a few
        repositories, one query per repository, each read in order from an index that
        starts with the repository (no sort of all their tasks), merged here."""
        conn = self._conn()
        repos = query.repos
        groups: list[TaskQuery] = [query]
        if repos is not None and 0 < len(repos) <= MERGE_REPOS:
            groups = [replace(query, repos=(repo,)) for repo in repos]
        found: list[Task] = []
        for group in groups:
            where, group_args = group.where()
            if group.repos is not None and len(group.repos) == 1:
                where = where.replace("repo IN (?)", "repo = ?", 1)
            rows = conn.execute(
                f"SELECT * FROM tasks {index} WHERE {where}{tail} ORDER BY {order} LIMIT ?",
                (*group_args, *args, limit),
            ).fetchall()
            found.extend(self._tasks(conn, rows))
        if len(groups) == 1:
            return found
        return heapq.nlargest(limit, found, key=key)

    def task_events(self, task_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        """A task's events, oldest first: at, from_state, to_state, event, detail."""
        return [
            dict(row)
            for row in self._conn().execute(
                "SELECT at, from_state, to_state, event, detail FROM task_events "
                "WHERE task_id = ? ORDER BY id LIMIT ?",
                (task_id, limit),
            )
        ]

    def finished_since(self, since: float, repos: tuple[str, ...] | None) -> list[FinishedRow]:
        """What the charts read of each task that finished at or after `since`, read
        through the index of finished tasks by when they finished."""
        where, args = TaskQuery(repos=repos).where()
        rows = self._conn().execute(
            f"SELECT repo, agent, state, outcome, created_at, started_at, {_FINISHED_AT}, "
            f"{self.COST_OF_USAGE} "
            f"FROM tasks WHERE {_TERMINAL} AND {_FINISHED_AT} >= ? AND {where}",
            (since, *args),
        )
        return [
            FinishedRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], self._cost(row[7]))
            for row in rows
        ]

    #: what finished_since() reads of a task's usage: its cost, in SQL where the engine
    #: reads JSON safely (SQLite's json_valid), else the text, read by `_cost`
    COST_OF_USAGE = "CASE WHEN json_valid(usage) THEN json_extract(usage, '$.cost_usd') END"

    def _cost(self, value: Any) -> float | None:
        """The cost `COST_OF_USAGE` gave (SQLite: already the number)."""
        return cast("float | None", value)

    # ------------------------------------------------------------------ backup

    def backup(self, dest: Path) -> tuple[int, int]:
        """Copy the database to `dest` with SQLite's online backup, while other processes
        read and write it: the copy is one consistent moment of it. Written beside `dest`
        and renamed into place once whole and checked, so a `dest` that exists is whole.
        Returns the copy's (schema version, number of tasks)."""
        dest = Path(dest)
        part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        copy = sqlite3.connect(part)
        try:
            # one step: a read transaction on the source for the whole copy (in WAL mode
            # writers go on meanwhile); in steps, every write in between restarts it
            source = self._conn()
            assert isinstance(source, sqlite3.Connection)  # PostgreSQL: pg_dump (cli.backup)
            source.backup(copy)
            copy.execute("PRAGMA journal_mode = DELETE")  # one file, whole by itself
            check = copy.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"the copy does not check out: {check}")
            version = copy.execute("PRAGMA user_version").fetchone()[0]
            tasks = copy.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
            copy.close()
            with open(part, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(part, dest)
        except BaseException:
            copy.close()
            part.unlink(missing_ok=True)
            raise
        return version, tasks

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as c:
            self._set_meta(c, key, value)

    def _set_meta(self, c: Conn, key: str, value: str) -> None:
        c.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # ------------------------------------------------------------------ task logs

    def append_log(self, task_id: int, at_byte: int, data: bytes) -> None:
        """Ship a chunk of a task's agent log, starting at byte `at_byte` of it, so that
        any node can serve it (`read_log`). A chunk already shipped is kept as it was."""
        with self.tx() as c:
            c.execute(
                "INSERT INTO task_logs (task_id, at_byte, data) VALUES (?, ?, ?) "
                "ON CONFLICT (task_id, at_byte) DO NOTHING",
                (task_id, at_byte, data),
            )

    def log_size(self, task_id: int) -> int:
        """How many bytes of a task's log were shipped."""
        row = (
            self._conn()
            .execute(
                "SELECT COALESCE(MAX(at_byte + LENGTH(data)), 0) FROM task_logs WHERE task_id = ?",
                (task_id,),
            )
            .fetchone()
        )
        return int(row[0])

    def read_log(self, task_id: int, from_byte: int = 0, limit: int | None = None) -> bytes | None:
        """A task's shipped log from byte `from_byte` on, at most `limit` bytes of it (all
        without); None if none was shipped. Only the chunks that hold those bytes are read."""
        within: str = ""
        args: tuple[int, ...] = (task_id, from_byte)
        if limit is not None:
            within, args = " AND at_byte < ?", (*args, from_byte + limit)
        rows = (
            self._conn()
            .execute(
                "SELECT at_byte, data FROM task_logs WHERE task_id = ? "
                f"AND at_byte + LENGTH(data) > ?{within} ORDER BY at_byte",
                args,
            )
            .fetchall()
        )
        if not rows:
            shipped = self._conn().execute(
                "SELECT 1 FROM task_logs WHERE task_id = ? LIMIT 1", (task_id,)
            )
            return b"" if shipped.fetchone() is not None else None
        out = bytearray()
        for at_byte, data in rows:
            out += bytes(data)[max(0, from_byte - at_byte) :]
        return bytes(out if limit is None else out[:limit])

    # ------------------------------------------------------------------ across machines

    def wake_workers(self) -> None:
        """Wake idle workers on every machine (PostgreSQL's NOTIFY). On SQLite all workers
        share one machine and are woken through their own process."""

    def listen(self, on_wake: Callable[[], None], stop: threading.Event) -> bool:
        """Call `on_wake` whenever a worker anywhere should look at the queue, until `stop`
        is set, on a thread of its own. False if this backend has no such thing (SQLite:
        polling and the local pipe wake the worker)."""
        return False

    def check(self) -> list[str]:
        """What is wrong with the database, one line each (for `kugetsu doctor`)."""
        problems = []
        try:
            version = self.schema_version()
        except Exception as exc:
            return [f"database: cannot be read: {exc.__class__.__name__}: {exc}"]
        if version != SCHEMA_VERSION:
            problems.append(
                f"database: schema version {version}, this kugetsu expects {SCHEMA_VERSION}"
            )
        return problems

    def schema_version(self) -> int:
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

    def describe(self) -> str:
        """Where the database is, without credentials."""
        return f"sqlite {self.path}"


def is_database_url(location: str | Path) -> bool:
    """True for a PostgreSQL URL (`postgresql://...` or `postgres://...`)."""
    return str(location).startswith(("postgresql://", "postgres://"))


def open_store(
    location: Path | str,
    clock: Callable[[], float] = time.time,
    *,
    checkpoint_pages: int = 0,
    notify: Sequence[tuple[str, frozenset[str]]] = (),
    pool_size: int | None = None,
    migrate: bool = True,
) -> Store:
    """The store at `location`: a SQLite file, or a PostgreSQL URL; migrated unless
    `migrate` is False (`kugetsu doctor` looks without changing anything)."""
    store: Store
    if is_database_url(location):
        from bot.pgstore import PostgresStore

        store = PostgresStore(str(location), clock=clock, pool_size=pool_size, notify=notify)
    else:
        store = Store(location, clock=clock, checkpoint_pages=checkpoint_pages, notify=notify)
    if migrate:
        store.migrate()
    return store


__all__ = [
    "DATABASE_ERRORS",
    "MIGRATIONS",
    "OPERATIONAL_ERRORS",
    "SCHEMA_VERSION",
    "STORE_ERRORS",
    "CommentRecord",
    "Conn",
    "Dialects",
    "FinishedRow",
    "LeaseLost",
    "MetricsSnapshot",
    "SchemaTooNew",
    "Stats",
    "Store",
    "StoreError",
    "TaskQuery",
    "Tx",
    "UnreadableRow",
    "open_store",
    "sqlite_migration",
]
