"""The durable queue: migrations, compare-and-set transitions, atomic claiming.

The contract tests take `store` or `make_store` and run on both backends, SQLite and
PostgreSQL (tests/conftest.py: `backend`); those about SQLite's own mechanics (its
pragmas, write lock, query plans) take `sqlite_store`."""

import multiprocessing
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from bot.core.tasks import CancelResult, InvalidTransition, Kind, Outcome, State
from bot.store import MIGRATIONS, SCHEMA_VERSION, SchemaTooNew, open_store, sqlite_migration
from tests.conftest import enqueue, task_events, write_unchecked


def add(store, issue=1, repo="acme/widget", authorized=True, **kw):
    return enqueue(
        store,
        repo=repo,
        issue=issue,
        kind=kw.pop("kind", Kind.START),
        prompt="",
        agent="opencode",
        requested_by="alice",
        max_attempts=3,
        authorized=authorized,
        **kw,
    )


@pytest.fixture
def store(make_store):
    return make_store()


@pytest.fixture
def sqlite_store(tmp_path):
    s = open_store(tmp_path / "db.sqlite")
    yield s
    s.close()


def integrity_errors() -> tuple[type[BaseException], ...]:
    from bot.store import IntegrityFailure

    return (sqlite3.IntegrityError, IntegrityFailure)


def test_fresh_database_gets_the_latest_schema(store):
    assert store.schema_version() == SCHEMA_VERSION
    assert store.check() == []


def test_both_backends_have_the_same_tables_columns_and_indexes(sqlite_store, pg_cluster):
    """PostgreSQL's schema follows SQLite's migrations, entry for entry: the same tables,
    columns and indexes; PostgreSQL adds only its version table and the slot rows."""
    sqlite = sqlite_store._conn()
    tables = {
        row[0]
        for row in sqlite.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    lite = {t: {row[1] for row in sqlite.execute(f"PRAGMA table_info({t})")} for t in tables}
    lite_indexes = {
        row[0]
        for row in sqlite.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )
    }
    pg = open_store(pg_cluster.url_for())
    try:
        conn = pg._conn()
        pg_columns: dict[str, set[str]] = {}
        for table, column in conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema()"
        ):
            pg_columns.setdefault(table, set()).add(column)
        pg_indexes = {
            row[0]
            for row in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
                "AND right(indexname, 5) <> '_pkey' AND right(indexname, 4) <> '_key'"
            )
        }
    finally:
        pg.close()
    assert set(pg_columns) - set(lite) == {"kugetsu_schema", "slots"}
    assert {t: pg_columns[t] for t in lite} == lite
    assert pg_indexes == lite_indexes


def test_a_fresh_sqlite_database_is_in_wal_mode(sqlite_store):
    store = sqlite_store
    assert store._conn().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    mode = store._conn().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_migrates_forward_from_version_1_and_keeps_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    conn.execute(
        "INSERT INTO tasks (repo, issue, kind, agent, requested_by, state, created_at, "
        "updated_at) VALUES ('acme/widget', 3, 'start', 'opencode', 'bob', 'pending', 1, 1)"
    )
    conn.commit()
    conn.close()
    store = open_store(path)
    assert store._conn().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    task = store.list_tasks()[0]
    assert (task.issue, task.requested_by, task.max_tokens, task.usage) == (3, "bob", None, {})
    store.update(task.id, max_tokens=10)
    assert store.get(task.id).max_tokens == 10


def test_the_repositories_a_pass_looks_at_start_from_the_tasks_and_deliveries_before(tmp_path):
    """An existing database: the repositories kugetsu served before (tasks, deliveries with
    their repository) are looked at by the first pass, each from when it was first seen."""
    path = tmp_path / "old.sqlite"
    scripts = [sqlite_migration(i) for i in range(len(MIGRATIONS))]
    repos_table = next(i for i, m in enumerate(scripts) if "CREATE TABLE repos " in m)
    conn = sqlite3.connect(path)
    conn.executescript(";".join(scripts[:repos_table]) + f"; PRAGMA user_version = {repos_table};")
    conn.execute(
        "INSERT INTO tasks (repo, issue, kind, agent, requested_by, state, created_at, "
        "updated_at) VALUES ('acme/widget', 3, 'start', 'opencode', 'bob', 'pending', 5, 5)"
    )
    conn.executemany(
        "INSERT INTO deliveries (id, event, received_at, repo) VALUES (?, 'issues', ?, ?)",
        [("d1", 2.0, "acme/widget"), ("d2", 3.0, "acme/other"), ("d3", 1.0, None)],
    )
    conn.commit()
    conn.close()
    store = open_store(path)
    try:
        assert store.reconcile_windows() == [("acme/other", 3.0, None), ("acme/widget", 2.0, None)]
    finally:
        store.close()


def test_migrate_is_idempotent(store):
    assert store.migrate() == SCHEMA_VERSION
    assert store.migrate() == SCHEMA_VERSION


def test_refuses_a_newer_schema(make_store, backend):
    store = make_store()
    if backend == "sqlite":
        store._conn().execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    else:
        store._conn().execute("UPDATE kugetsu_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew):
        make_store()
    assert "this kugetsu expects" in store.check()[0]


def test_values_kugetsu_does_not_know_are_refused_when_written(store):
    # every value of the enums is accepted (the triggers' lists match bot/core/tasks.py) ...
    conn = store._conn()
    tid = add(store)
    for kind in Kind:
        conn.execute("UPDATE tasks SET kind = ? WHERE id = ?", (kind.value, tid))
    for state in State:
        conn.execute("UPDATE tasks SET state = ? WHERE id = ?", (state.value, tid))
    for outcome in [*Outcome, None]:
        conn.execute("UPDATE tasks SET outcome = ? WHERE id = ?", (outcome and outcome.value, tid))
    # ... and nothing else, by an insert or an update
    insert = (
        "INSERT INTO tasks (repo, issue, kind, agent, requested_by, state, outcome, "
        "created_at, updated_at) VALUES ('acme/widget', 2, ?, 'fake', 'bob', ?, ?, 1, 1)"
    )
    for kind, state, outcome in [
        ("frobnicate", "pending", None),
        ("start", "paused", None),
        ("start", "failed", "exploded"),
        ("start", "failed", ""),
        ("start", 3, None),
    ]:
        with pytest.raises(integrity_errors(), match="not a value kugetsu knows"):
            conn.execute(insert, (kind, state, outcome))
    for column, value in [("kind", "frobnicate"), ("state", "paused"), ("outcome", "exploded")]:
        with pytest.raises(integrity_errors(), match="not a value kugetsu knows"):
            conn.execute(f"UPDATE tasks SET {column} = ? WHERE id = ?", (value, tid))
    assert [t.id for t in store.list_tasks()] == [tid]


def test_a_row_written_before_the_checks_can_still_be_moved_on(store):
    # an unknown kind already there does not stop an update of the state
    tid = add(store)
    write_unchecked(store, "UPDATE tasks SET kind = 'frobnicate' WHERE id = ?", (tid,))
    assert [t.id for t in store.claim(1, "w")] == []  # set aside as it was read
    task = store.get(tid)
    assert (task.state, task.kind) == (State.FAILED, Kind.START)


#: each way the store reads tasks: (name, call); and those that read by state, which never
#: meet a row whose state is unknown
READERS = [
    ("get", lambda s, good, bad: [s.get(good), s.get(bad)]),
    ("list_tasks", lambda s, good, bad: s.list_tasks()),
    ("iter_tasks", lambda s, good, bad: [*s.iter_tasks()]),
    ("running_tasks", lambda s, good, bad: s.running_tasks()),
    ("active_tasks", lambda s, good, bad: s.active_tasks()),
    ("active_task", lambda s, good, bad: [s.active_task(None, "acme/widget", 1)]),
    (
        "latest_task",
        lambda s, good, bad: [
            s.latest_task(None, "acme/widget", 1),
            s.latest_task(None, "acme/widget", 2),
        ],
    ),
    ("claim", lambda s, good, bad: s.claim(5, "w")),
    ("unauthorized_pending", lambda s, good, bad: s.unauthorized_pending()),
    ("pending_positions", lambda s, good, bad: [t for t, _ in s.pending_positions(10)]),
    ("comment_out_of_date", lambda s, good, bad: s.comment_out_of_date(10)),
    ("queue_position", lambda s, good, bad: [s.queue_position(bad), s.get(good)]),
    ("try_requeue", lambda s, good, bad: [s.try_requeue(bad, "bob")[1]]),
]
BY_STATE = {
    "running_tasks",
    "active_tasks",
    "active_task",
    "claim",
    "unauthorized_pending",
    "pending_positions",
}


@pytest.mark.parametrize("name, read", READERS, ids=[r[0] for r in READERS])
@pytest.mark.parametrize(
    "column, value, shown",
    [
        ("kind", "frobnicate", "unknown kind 'frobnicate' (now start)"),
        ("state", "paused", "unknown state 'paused'"),
        ("outcome", "exploded", "unknown outcome 'exploded'"),
        ("usage", "{not json", "usage is not JSON: '{not json' (emptied)"),
        ("agents_tried", '{"a": 1}', "agents_tried is not a JSON list (emptied)"),
    ],
)
def test_a_row_that_cannot_be_read_is_set_aside_and_the_others_are_read(
    store, name, read, column, value, shown
):
    # the bad row is one each reader meets (authorized or not, pending or running), and a
    # good task comes after it
    authorized = None if name == "unauthorized_pending" else True
    bad = add(store, issue=1, authorized=authorized)
    if name == "running_tasks":
        store.claim(1, "w")
    write_unchecked(store, f"UPDATE tasks SET {column} = ? WHERE id = ?", (value, bad))
    # (on another issue where the reader takes one task per issue, or the latest)
    good = add(store, issue=2 if name in ("claim", "latest_task") else 1, authorized=authorized)
    if name == "running_tasks":
        store.transition(good, State.PENDING, State.RUNNING, event="claimed")

    found = read(store, good, bad)  # does not raise

    assert good in [t.id for t in found if t is not None]
    raw = (
        store._conn()
        .execute("SELECT state, outcome, error FROM tasks WHERE id = ?", (bad,))
        .fetchone()
    )
    if column == "state" and name in BY_STATE:
        assert tuple(raw) == ("paused", None, None)  # never read, so left alone
        return
    reason = f"set aside, unreadable: {shown}"
    assert tuple(raw) == ("failed", "infra_error", reason)
    assert bad not in [t.id for t in found if t is not None and t.active]
    [event] = [e for e in task_events(store, bad) if e["event"] == "set aside"]
    assert (event["to_state"], event["detail"]) == ("failed", reason)
    # set aside once: from now on it reads
    task, events = store.get(bad), task_events(store, bad)
    assert (task.state, task.outcome, task.error) == (State.FAILED, Outcome.INFRA_ERROR, reason)
    assert store.list_tasks() and task_events(store, bad) == events


def test_transition_is_compare_and_set(store):
    tid = add(store)
    assert store.transition(tid, State.PENDING, State.CANCELLED, event="cancelled")
    assert not store.transition(tid, State.PENDING, State.RUNNING, event="claimed")
    assert store.get(tid).state is State.CANCELLED
    with pytest.raises(InvalidTransition):
        store.transition(tid, State.COMPLETED, State.RUNNING, event="nope")
    events = [e["event"] for e in task_events(store, tid)]
    assert events == ["queued", "cancelled"]


def test_claim_is_fifo_one_per_issue_and_skips_unauthorized_and_backoff(store):
    first = add(store, issue=1)
    follow = add(store, issue=1, kind=Kind.CONTINUE)
    unauth = add(store, issue=2, authorized=None)
    later = add(store, issue=3)
    delayed = add(store, issue=4)
    store.update(delayed, not_before=time.time() + 3600)
    claimed = store.claim(10, "w1")
    assert [t.id for t in claimed] == [first, later]
    assert all(t.state is State.RUNNING and t.attempts == 1 for t in claimed)
    # the follow-up waits until the issue's running task is done
    assert store.claim(10, "w1") == []
    store.transition(first, State.RUNNING, State.COMPLETED, event="done", outcome=Outcome.SUCCEEDED)
    assert [t.id for t in store.claim(10, "w1")] == [follow]
    assert store.get(unauth).state is State.PENDING


def test_claim_never_exceeds_the_limit(store):
    for i in range(10):
        add(store, issue=i)
    assert len(store.claim(3, "w")) == 3
    assert store.claim(3, "w") == []
    assert store.count(State.RUNNING) == 3


def test_request_cancel_and_try_requeue(store):
    pending = add(store, issue=1)
    assert store.request_cancel(pending, "bob") is CancelResult.CANCELLED
    assert store.get(pending).outcome is Outcome.CANCELLED
    running = add(store, issue=2)
    store.claim(5, "w")
    assert store.request_cancel(running, "bob") is CancelResult.STOPPING
    assert store.cancel_requested(running) == "bob"
    assert store.get(running).state is State.RUNNING
    assert store.try_requeue(pending, "carol")[0]
    task = store.get(pending)
    assert (task.state, task.attempts, task.outcome) == (State.PENDING, 0, None)
    assert not store.try_requeue(running, "carol")[0]


def test_try_requeue_refuses_while_another_task_of_the_issue_is_active(store):
    first = add(store, issue=5)
    assert store.request_cancel(first, "bob") is CancelResult.CANCELLED
    second = add(store, issue=5)
    assert not store.try_requeue(first, "carol")[0]
    assert store.try_requeue(first, "carol") == (False, store.get(second))
    assert store.get(first).state is State.CANCELLED
    assert [t.id for t in store.list_tasks(state=State.PENDING)] == [second]
    assert task_events(store, first)[-1]["event"] == "cancelled"
    # once the other task has finished, the retry goes through
    store.claim(1, "w")
    assert not store.try_requeue(first, "carol")[0]
    store.transition(
        second, State.RUNNING, State.COMPLETED, event="done", outcome=Outcome.SUCCEEDED
    )
    assert store.try_requeue(first, "carol") == (True, None)
    assert store.get(first).state is State.PENDING
    with pytest.raises(KeyError):
        store.try_requeue(12345, "carol")


@pytest.mark.parametrize("days", [-1.0, float("nan"), float("inf"), float("-inf")])
def test_clear_refuses_a_negative_or_non_finite_age(store, days):
    done = add(store, issue=1)
    store.request_cancel(done, "bob")
    with store.tx() as c:
        assert not store.seen_delivery(c, "d1", "issues")
    with pytest.raises(ValueError, match="older_than_days"):
        store.clear(days)
    assert store.get(done) is not None
    with store.tx() as c:
        assert store.seen_delivery(c, "d1", "issues")


def test_queue_positions(store):
    ids = [add(store, issue=i) for i in range(4)]
    assert [store.queue_position(i) for i in ids] == [1, 2, 3, 4]
    store.claim(1, "w")
    assert store.queue_position(ids[0]) is None
    assert store.queue_position(ids[3]) == 3


def test_leases(make_store):
    now = [100.0]
    store = make_store(clock=lambda: now[0])
    assert store.try_lease("publisher", "a", 10)
    assert not store.try_lease("publisher", "b", 10)
    assert store.try_lease("publisher", "a", 10)  # renewal
    now[0] += 11
    assert store.try_lease("publisher", "b", 10)  # expired: taken over
    store.release_leases("b")
    assert store.try_lease("publisher", "a", 10)


def test_a_worker_found_gone_frees_its_leases(store):
    store.register_worker("dead", 1, "0@gone")
    assert store.try_lease("publisher", "dead", 120)
    assert not store.try_lease("publisher", "alive", 120)
    store.unregister_worker("dead")  # what recovery does with a process that is gone
    assert store.try_lease("publisher", "alive", 120)


def test_clear_removes_only_old_finished_tasks(make_store):
    now = [1000.0]
    store = make_store(clock=lambda: now[0])
    done = add(store, issue=1)
    store.transition(done, State.PENDING, State.CANCELLED, event="x")
    active = add(store, issue=2)
    now[0] += 10 * 86400
    assert store.clear(7) == 1
    assert store.get(done) is None and store.get(active) is not None


def test_indexed_queries_give_what_a_plain_reading_of_the_table_gives(make_store):
    """The indexes and batches behind the worker's queries (tests/test_query_cost.py) change
    what they cost, not what they return: compared with Python over every row."""
    from bot.core.tasks import TERMINAL_STATES
    from bot.store import _TERMINAL, CLEAR_BATCH

    assert set(_TERMINAL.split("(")[1].rstrip(")").replace("'", "").split(", ")) == {
        s.value for s in TERMINAL_STATES
    }
    rng = random.Random(7)
    now = 100 * 86400.0
    store = make_store(clock=lambda: now)
    states = [s.value for s in State]
    n = 6 * CLEAR_BATCH + 7
    with store.tx() as c:
        c.executemany(
            "INSERT INTO tasks (repo, issue, kind, agent, requested_by, state, created_at, "
            "updated_at, finished_at, authorized, version, comment_version) "
            "VALUES ('acme/widget', ?, 'start', 'opencode', 'alice', ?, 0, ?, ?, ?, ?, ?)",
            [
                (
                    rng.randint(1, 50),
                    rng.choice(states),
                    now - rng.uniform(0, 20) * 86400,
                    rng.choice([None, now - rng.uniform(0, 20) * 86400]),
                    rng.choice([None, 0, 1]),
                    version,
                    rng.randint(0, version),
                )
                for _ in range(n)
                for version in [rng.randint(1, 4)]
            ],
        )
        c.executemany(
            "INSERT INTO task_events (task_id, at, event) VALUES (?, 0, 'x')",
            [(i,) for i in range(1, n + 1)],
        )
        c.executemany(
            "INSERT INTO deliveries (id, event, received_at) VALUES (?, 'e', ?)",
            [(f"d{i}", now - rng.uniform(0, 20) * 86400) for i in range(n)],
        )
        c.executemany(
            "INSERT INTO outbox (repo, issue, kind, created_at, done_at) "
            "VALUES ('acme/widget', 1, 'reaction', 0, ?)",
            [(rng.choice([None, now - rng.uniform(0, 20) * 86400]),) for _ in range(n)],
        )
        c.executemany(
            "INSERT INTO replies (repo, issue, login, at) VALUES ('acme/widget', 1, 'alice', ?)",
            [(now - rng.uniform(0, 20) * 86400,) for _ in range(n)],
        )

    def rows(sql: str) -> list[dict]:
        return [dict(r) for r in store._conn().execute(sql)]

    tasks = rows("SELECT * FROM tasks ORDER BY id")
    due = sorted(
        (t for t in tasks if t["comment_version"] < t["version"] and t["authorized"] is not None),
        key=lambda t: (t["state"] == "pending", t["id"]),
    )
    for limit in (1, 30, n):
        assert [t.id for t in store.comment_out_of_date(limit)] == [t["id"] for t in due[:limit]]
    for state in State:
        assert store.count(state) == sum(1 for t in tasks if t["state"] == state.value)
    assert [t.id for t in store.active_tasks()] == [
        t["id"] for t in tasks if t["state"] == "pending"
    ] + [t["id"] for t in tasks if t["state"] == "running"]
    ids = [t["id"] for t in tasks]
    for state, before, newest in (
        (None, None, None),
        (None, None, 10),
        (None, 700, 25),
        ("failed", None, 5),
        ("pending", 900, None),
    ):
        expected = [
            i
            for i, t in zip(ids, tasks, strict=False)
            if (state is None or t["state"] == state) and (before is None or i < before)
        ]
        if newest is not None:
            expected = expected[-newest:]
        assert [t.id for t in store.iter_tasks(state, before=before, newest=newest)] == expected
    asked = [*ids[::2], n + 1, n + 2]
    assert store.existing(asked) == set(ids[::2])

    cutoff = now - 7 * 86400
    old = {
        t["id"]
        for t in tasks
        if t["state"] in {s.value for s in TERMINAL_STATES}
        and (t["finished_at"] if t["finished_at"] is not None else t["updated_at"]) < cutoff
    }
    assert len(old) > 2 * CLEAR_BATCH  # deleted in more than one batch
    kept_deliveries = {
        r["id"] for r in rows("SELECT * FROM deliveries") if r["received_at"] >= cutoff
    }
    kept_outbox = {
        r["id"]
        for r in rows("SELECT * FROM outbox")
        if r["done_at"] is None or r["done_at"] >= cutoff
    }
    kept_replies = sorted(r["at"] for r in rows("SELECT at FROM replies") if r["at"] >= cutoff)
    assert store.clear(7) == len(old)
    assert {r["id"] for r in rows("SELECT id FROM tasks")} == set(ids) - old
    assert {r["task_id"] for r in rows("SELECT task_id FROM task_events")} == set(ids) - old
    assert {r["id"] for r in rows("SELECT id FROM deliveries")} == kept_deliveries
    assert {r["id"] for r in rows("SELECT id FROM outbox")} == kept_outbox
    assert sorted(r["at"] for r in rows("SELECT at FROM replies")) == kept_replies


# ---------------------------------------------------------------- concurrency


def _overlap(intervals):
    points = sorted(
        [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1])
    )
    cur = best = 0
    for _, delta in points:
        cur += delta
        best = max(best, cur)
    return best


def _worker_loop(location, limit, worker, out):
    store = open_store(location)
    intervals = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        claimed = store.claim(limit, worker)
        if not claimed:
            if store.stats().by_state["pending"] == 0:
                break
            time.sleep(random.uniform(0, 0.002))
            continue
        start = time.monotonic()
        time.sleep(random.uniform(0, 0.003))
        for task in claimed:
            end = time.monotonic()
            intervals.append((start, end))
            assert store.transition(
                task.id, State.RUNNING, State.COMPLETED, event="done", outcome=Outcome.SUCCEEDED
            )
    store.close()
    out.extend(intervals) if isinstance(out, list) else out.put(intervals)


def test_claim_limit_holds_across_threads(make_store):
    store = make_store()
    for i in range(120):
        add(store, issue=i)
    results = []
    threads = [
        threading.Thread(target=_worker_loop, args=(make_store.location, 3, f"t{n}", results))
        for n in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 120
    assert _overlap(results) <= 3
    assert store.stats().by_state["completed"] == 120


def test_claims_racing_at_the_same_moment_admit_exactly_the_limit(make_store):
    """The count-then-claim race: 8 workers (a store each, as on as many machines) claim at
    the same moment, and again until the limit is full. Exactly the limit runs, never
    more, round after round."""
    stores = [make_store() for _ in range(8)]
    for i in range(40):
        add(stores[0], issue=i)
    for _ in range(4):
        barrier = threading.Barrier(len(stores))
        claimed: list[int] = []

        def race(store, name: str, barrier=barrier, claimed=claimed) -> None:
            barrier.wait()
            for _ in range(200):
                claimed.extend(t.id for t in store.claim(3, name, max_claims=1))
                if store.count(State.RUNNING) >= 3:
                    return

        threads = [threading.Thread(target=race, args=(s, f"w{n}")) for n, s in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(claimed) == 3 and stores[0].count(State.RUNNING) == 3
        for tid in claimed:
            assert stores[0].transition(
                tid, State.RUNNING, State.COMPLETED, event="done", outcome=Outcome.SUCCEEDED
            )


def test_claim_limit_holds_across_processes(make_store):
    store = make_store()
    for i in range(80):
        add(store, issue=i)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker_loop, args=(make_store.location, 3, f"p{n}", queue))
        for n in range(2)
    ]
    for p in procs:
        p.start()
    intervals = []
    for _ in procs:
        intervals.extend(queue.get(timeout=120))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(intervals) == 80
    assert _overlap(intervals) <= 3
    assert store.count(State.RUNNING) == 0


def test_checkpoint_pages_keeps_the_write_ahead_log_short(tmp_path):
    """The worker's store checkpoints after commits; the receiver's never does."""

    def wal_size_after_commits(path, pages):
        store = open_store(path, checkpoint_pages=pages)
        try:
            for i in range(300):
                store.set_meta(f"key-{i}", "x" * 2000)
            return Path(f"{path}-wal").stat().st_size
        finally:
            store.close()

    assert wal_size_after_commits(tmp_path / "receiver.db", 0) > 1_000_000
    assert wal_size_after_commits(tmp_path / "worker.db", 20) < 300_000


def test_mark_authorized_writes_a_batch_in_one_transaction(sqlite_store):
    store = sqlite_store
    first, second = add(store, 1, authorized=False), add(store, 2, authorized=False)
    statements: list[str] = []
    store._conn().set_trace_callback(statements.append)
    store.mark_authorized([(first, "write on acme/widget"), (second, "admin")])
    store._conn().set_trace_callback(None)
    assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("COMMIT") == 1
    assert [t.id for t in store.unauthorized_pending()] == []
    assert store.require(first).authorized and store.require(second).authorized
    assert [e["detail"] for e in task_events(store, second) if e["event"] == "authorized"] == [
        "admin"
    ]
    store.mark_authorized([])  # nothing to write


def test_claim_takes_no_write_lock_when_every_slot_is_taken(sqlite_store):
    store = sqlite_store
    for issue in range(1, 5):
        add(store, issue)
    assert len(store.claim(2, "w1")) == 2
    statements: list[str] = []
    store._conn().set_trace_callback(statements.append)
    assert store.claim(2, "w1") == []
    store._conn().set_trace_callback(None)
    assert "BEGIN IMMEDIATE" not in statements
    running = [t for t in store.list_tasks() if t.state is State.RUNNING]
    store.transition(
        running[0].id, State.RUNNING, State.COMPLETED, event="done", outcome=Outcome.SUCCEEDED
    )
    assert len(store.claim(2, "w1")) == 1  # a freed slot is claimed at the next call


def test_a_write_waits_for_another_process_holding_the_lock(sqlite_store):
    store = sqlite_store
    # Another process (here: another connection) holds SQLite's write lock for longer
    # than the fast polling phase; the write must wait for it and then go through, not
    # fail with "database is locked".
    other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release_later() -> None:
        time.sleep(0.05)
        released.set()
        other.execute("COMMIT")

    threading.Thread(target=release_later).start()
    task_id = add(store)
    assert released.is_set()  # it did wait: the insert could only commit after the release
    assert store.require(task_id).state.value == "pending"
    other.close()


def test_a_write_gives_up_after_the_busy_timeout(sqlite_store, monkeypatch):
    store = sqlite_store
    monkeypatch.setattr("bot.store.BUSY_TIMEOUT_SECONDS", 0.05)
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            add(store)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.list_tasks() == []


def test_reply_counts_forget_what_is_older_than_the_window_and_use_the_index(tmp_path):
    now = [0.0]
    store = open_store(tmp_path / "db.sqlite", clock=lambda: now[0])
    with store.tx() as c:
        for i in range(10):
            now[0] = i * 100.0
            store.note_reply(c, "acme/widget", 7, "eve", 150.0)
        store.note_reply(c, "acme/widget", 8, "eve", 150.0)
        assert store.recent_replies(c, "acme/widget", 7, "eve", 150.0) == 2
        assert store.recent_replies(c, "acme/widget", 7, "bob", 150.0) == 0
        # what the window has left behind is gone, so the table stays small
        assert c.execute("SELECT COUNT(*) FROM replies").fetchone()[0] == 3
        # the count the intake transaction makes is an index range, whatever the table size
        seen: list[str] = []
        c.set_trace_callback(seen.append)
        store.recent_replies(c, "acme/widget", 7, "eve", 150.0)
        c.set_trace_callback(None)
        plan = " ".join(r[-1] for r in c.execute("EXPLAIN QUERY PLAN " + seen[-1]))
        assert "USING COVERING INDEX replies_by_user" in plan, plan
    store.close()


def test_claim_moves_a_task_through_the_transition_check(store, monkeypatch):
    # a task's state changes only through the check against TRANSITIONS, claiming included
    from bot.core import tasks

    tid = add(store)
    monkeypatch.setitem(
        tasks.TRANSITIONS, State.PENDING, frozenset({State.CANCELLED, State.REJECTED})
    )
    with pytest.raises(InvalidTransition):
        store.claim(3, "w")
    assert store.get(tid).state is State.PENDING


def test_an_outbox_item_of_an_unknown_kind_is_set_aside_and_the_others_are_read(store):
    from bot.core.outbox import OutboxItem, OutboxKind

    with store.tx() as c:
        first = store.add_outbox(c, OutboxItem(OutboxKind.COMMENT, "acme/widget", 1, body="hi"))
        c.execute(
            "INSERT INTO outbox (repo, issue, kind, created_at) VALUES ('acme/widget', 1, "
            "'teleport', 0)"
        )
        last = store.add_outbox(c, OutboxItem(OutboxKind.REACTION, "acme/widget", 1, target=5))
    due = store.outbox_due(10)
    assert [(i.id, i.kind) for i in due] == [
        (first, OutboxKind.COMMENT),
        (last, OutboxKind.REACTION),
    ]
    row = (
        store._conn()
        .execute("SELECT done_at, error FROM outbox WHERE kind = 'teleport'")
        .fetchone()
    )
    assert row["done_at"] is not None and row["error"] == "set aside: unknown kind 'teleport'"
    assert [i.id for i in store.outbox_due(10)] == [first, last]


# ---------------------------------------------------------------- leases and logs


def test_a_claim_leases_each_task_and_only_the_token_moves_it_on(make_store):
    now = [1000.0]
    store = make_store(clock=lambda: now[0])
    tid = add(store)
    [task] = store.claim(3, "w1", lease_seconds=60)
    assert task.lease_token and task.lease_expires_at == 1060.0
    # renewing takes the token; another token is refused and reported lost
    now[0] = 1030.0
    assert store.renew_leases({tid: task.lease_token}, 60) == set()
    assert store.get(tid).lease_expires_at == 1090.0
    assert store.renew_leases({tid: "someone-else"}, 60) == {tid}
    assert not store.hold_lease(tid, "someone-else", 60) and not store.hold_lease(tid, None, 60)
    # a write about the attempt and its end go through only with the task's token
    assert not store.update(tid, lease="someone-else", summary="no")
    assert store.update(tid, lease=task.lease_token, summary="yes")
    done = dict(event="done", outcome=Outcome.SUCCEEDED)
    assert not store.transition(tid, State.RUNNING, State.COMPLETED, lease="nope", **done)

    def recover() -> bool:
        return store.transition(
            tid,
            State.RUNNING,
            State.PENDING,
            event="recovered",
            lease=task.lease_token,
            lease_expired_by=now[0],
        )

    # recovery by expiry is refused while the lease is renewed, and goes through once not
    assert not recover()
    now[0] = 1100.0
    assert store.leases_expired()
    assert recover()
    after = store.get(tid)
    assert (after.state, after.summary, after.lease_token, after.lease_expires_at) == (
        State.PENDING,
        "yes",
        None,
        None,
    )
    assert not store.hold_lease(tid, task.lease_token, 60)  # the old token holds nothing
    [again] = store.claim(3, "w2")
    assert again.lease_token != task.lease_token and again.attempts == 2


def test_a_slot_freed_by_any_way_out_of_running_is_claimed_again(make_store):
    store = make_store()
    first, second, third, fourth = (add(store, issue=i) for i in range(4))
    assert [t.id for t in store.claim(2, "w")] == [first, second]
    assert store.claim(2, "w") == []
    # finished, recovered, set aside: each gives its slot back
    store.transition(first, State.RUNNING, State.COMPLETED, event="done", outcome=Outcome.SUCCEEDED)
    assert [t.id for t in store.claim(2, "w")] == [third]
    store.transition(second, State.RUNNING, State.PENDING, event="recovered")
    assert [t.id for t in store.claim(2, "w")] == [second]
    write_unchecked(store, "UPDATE tasks SET usage = 'x' WHERE id = ?", (third,))
    assert store.get(third).state is State.FAILED  # set aside as it was read
    assert [t.id for t in store.claim(2, "w")] == [fourth]
    assert store.claim(2, "w") == [] and store.count(State.RUNNING) == 2
    assert store.repair_slots() == 0  # every slot was given back where it was freed


def test_capacity_and_limit_together(make_store):
    store = make_store()
    for i in range(6):
        add(store, issue=i)
    assert len(store.claim(3, "a", max_claims=2)) == 2
    assert len(store.claim(3, "b", max_claims=2)) == 1  # the global limit, not b's capacity
    assert store.claim(3, "b", max_claims=2) == [] and store.count(State.RUNNING) == 3


def test_a_lease_for_a_duty_is_one_nodes_at_a_time(make_store):
    stores = [make_store() for _ in range(4)]
    won = []

    def ask(i: int) -> None:
        if stores[i].try_lease("publisher", f"node-{i}", 60):
            won.append(i)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert stores[0].holds_lease("publisher", f"node-{won[0]}", 30)
    other = (won[0] + 1) % 4
    assert not stores[0].holds_lease("publisher", f"node-{other}")


def test_shipped_logs_read_back_from_any_byte(make_store):
    store = make_store()
    tid = add(store)
    assert store.read_log(tid) is None and store.log_size(tid) == 0
    store.append_log(tid, 0, b"hello ")
    store.append_log(tid, 6, b"world\n")
    store.append_log(tid, 6, b"WORLD\n")  # shipped twice: the first stays
    assert store.read_log(tid) == b"hello world\n" and store.log_size(tid) == 12
    assert store.read_log(tid, 3) == b"lo world\n"
    assert store.read_log(tid, 12) == b""
    # a part of it, from the chunks that hold it
    assert store.read_log(tid, 3, 5) == b"lo wo" and store.read_log(tid, 8, 100) == b"rld\n"
    assert store.read_log(tid, 12, 10) == b"" and store.read_log(tid + 1, 0, 10) is None


def test_workers_are_shown_with_capacity_heartbeat_and_running_tasks(make_store):
    now = [500.0]
    store = make_store(clock=lambda: now[0])
    store.register_worker("w1", 10, None, host="machine-a", node="machine-a:/data", capacity=2)
    store.register_worker("w2", 11, None, host="machine-b", node="machine-b:/data", capacity=4)
    add(store, issue=1)
    store.claim(3, "w1")
    now[0] = 512.0
    store.heartbeat("w2")
    stats = store.stats().as_dict()
    assert stats["workers"] == [
        {
            "id": "w1",
            "host": "machine-a",
            "node": "machine-a:/data",
            "capacity": 2,
            "heartbeat_age_seconds": 12.0,
            "running": 1,
        },
        {
            "id": "w2",
            "host": "machine-b",
            "node": "machine-b:/data",
            "capacity": 4,
            "heartbeat_age_seconds": 0.0,
            "running": 0,
        },
    ]


def test_a_follow_up_waits_a_while_for_the_node_that_holds_its_worktree(make_store):
    now = [10_000.0]
    store = make_store(clock=lambda: now[0])
    store.register_worker("a1", 1, None, host="a", node="a:/data", capacity=1)
    store.set_issue(None, "acme/widget", 1, node="a:/data")
    follow = add(store, issue=1, kind=Kind.CONTINUE)
    start = add(store, issue=2)
    # a start goes anywhere; the follow-up is left to node a while it lives
    assert [t.id for t in store.claim(5, "b1", node="b:/data")] == [start]
    assert [t.id for t in store.claim(5, "a1", node="a:/data")] == [follow]
    store.transition(follow, State.RUNNING, State.PENDING, event="recovered")
    # ... for locality_wait seconds from its queueing; then any node takes it
    now[0] += 30
    assert store.claim(5, "b1", node="b:/data", locality_wait=60) == []
    assert [t.id for t in store.claim(5, "b1", node="b:/data", locality_wait=20)] == [follow]
    store.transition(follow, State.RUNNING, State.PENDING, event="recovered")
    # ... and at once when node a has no live worker (its heartbeat is old)
    now[0] += 600
    assert [t.id for t in store.claim(5, "b1", node="b:/data", locality_wait=3600)] == [follow]


def test_what_prune_notifications_and_metrics_read_works_on_both_backends(make_store):
    from bot.core.outbox import OutboxItem, OutboxKind

    now = [100 * 86400.0]
    store = make_store(clock=lambda: now[0], notify=(("ops", frozenset({"failed"})),))
    old = add(store, issue=1)
    store.request_cancel(old, "bob")
    kept = add(store, issue=2)
    now[0] += 10 * 86400
    assert store.clearable(7) == 1
    assert store.existing([old, kept], cleared_before=now[0] - 7 * 86400) == {kept}
    assert store.issue_task_ids("acme/widget", 1) == [old]
    with store.tx() as c:
        store.add_outbox(
            c, OutboxItem(OutboxKind.NOTIFY, "acme/widget", 2, body="{}", endpoint="gone")
        )
    assert store.notify_endpoints() == ["gone"]
    assert store.drop_notifications("gone", "endpoint no longer configured") == 1
    assert store.notify_endpoints() == []
    store.set_disk_usage("machine-a", '{"logs": 1}')
    snap = store.metrics_snapshot(by_repo=True)
    assert sorted(snap.tasks) == [("cancelled", "acme/widget", 1), ("pending", "acme/widget", 1)]
    assert snap.disk == [("machine-a", '{"logs": 1}')] and snap.agents_running == 0
    assert store.clear(7) == 1 and store.get(old) is None


def test_a_task_queued_anywhere_wakes_the_listening_workers(make_store, backend):
    """PostgreSQL: a task added or moved by any process (a receiver on another machine)
    wakes each listener at once (LISTEN/NOTIFY); SQLite has no such thing and says so."""
    from tests.conftest import wait_for

    store, other = make_store(), make_store()
    wakes: list[float] = []
    stop = threading.Event()
    try:
        listening = store.listen(lambda: wakes.append(time.time()), stop)
        if backend == "sqlite":
            assert listening is False
            return
        wait_for(lambda: len(wakes) >= 1, timeout=30, what="the listener to connect")
        seen = len(wakes)
        tid = add(other, issue=1)
        wait_for(lambda: len(wakes) > seen, timeout=30, what="a wake for the new task")
        seen = len(wakes)
        assert other.request_cancel(tid, "alice") is not None
        wait_for(lambda: len(wakes) > seen, timeout=30, what="a wake for the change of state")
    finally:
        stop.set()


def test_a_claim_passes_over_a_task_another_claim_holds(pg_cluster):
    """PostgreSQL: while another transaction holds the first task in line (a claim at the
    same moment), a claim takes the next one at once instead of waiting behind it."""
    import psycopg

    from tests.conftest import wait_for

    url = pg_cluster.url_for()
    store = open_store(url)
    first, second = add(store, issue=1), add(store, issue=2)
    taken: list[int] = []
    holder = psycopg.connect(url)
    try:
        holder.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (first,))
        claimer = threading.Thread(
            target=lambda: taken.extend(t.id for t in store.claim(3, "w", max_claims=1))
        )
        claimer.start()
        wait_for(lambda: taken == [second], timeout=10, what="the next task claimed at once")
    finally:
        holder.rollback()
        holder.close()
        claimer.join(timeout=30)
        store.close()


def test_the_dashboards_queries_answer_alike_on_both_backends(store):
    from bot.store import TaskQuery

    ids = [add(store, issue=i) for i in range(1, 6)]
    [task] = store.claim(3, "w", max_claims=1)
    assert store.update(task.id, usage={"cost_usd": 0.5}, lease=task.lease_token)
    assert store.transition(
        task.id,
        State.RUNNING,
        State.COMPLETED,
        event="done",
        outcome=Outcome.SUCCEEDED,
        lease=task.lease_token,
    )
    assert (store.task_repos(), store.task_agents()) == (["acme/widget"], ["opencode"])
    assert [t.id for t in store.find_tasks(TaskQuery(), limit=10)] == ids[::-1]
    assert store.find_tasks(TaskQuery(repos=()), limit=10) == []
    pending = TaskQuery(repos=("acme/widget", "other/repo"), state="pending")
    assert len(store.find_tasks(pending, limit=10)) == 4
    assert [t.id for t in store.finished_tasks(TaskQuery(), limit=10)] == [task.id]
    [row] = store.finished_since(0, ("acme/widget",))
    assert (row.outcome, row.cost_usd) == ("succeeded", 0.5)


# ------------------------------------------------------------------ slots (the sandbox's uids)


def test_each_claim_gets_the_lowest_slot_no_running_task_holds(store):
    ids = [add(store, issue=i) for i in range(1, 6)]
    assert [t.slot for t in store.claim(3, "w")] == [0, 1, 2]
    assert store.claim(3, "w") == []
    store.transition(ids[1], State.RUNNING, State.COMPLETED, event="done")
    [task] = store.claim(3, "w")
    assert (task.id, task.slot) == (ids[3], 1)
    store.transition(ids[0], State.RUNNING, State.COMPLETED, event="done")
    store.transition(ids[2], State.RUNNING, State.COMPLETED, event="done")
    assert [t.slot for t in store.claim(3, "w")] == [0]


def test_no_two_running_tasks_hold_one_slot_across_threads(make_store):
    """With the sandbox a slot is its agent's uid: claims racing on one database never
    give one slot to two running tasks, and never one outside 0 .. limit - 1."""
    store = make_store()
    for i in range(1, 61):
        add(store, issue=i)
    seen: list[list[int]] = []
    errors: list[BaseException] = []

    def claimer(name: str) -> None:
        mine = make_store()
        try:
            while mine.stats().by_state["pending"]:
                for task in mine.claim(3, name):
                    seen.append([t.slot for t in mine.running_tasks()])
                    assert task.slot is not None and 0 <= task.slot < 3
                    mine.transition(task.id, State.RUNNING, State.COMPLETED, event="done")
        except BaseException as exc:  # the assertion above, seen by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.stats().by_state["completed"] == 60
    assert seen and all(len(slots) == len(set(slots)) for slots in seen)
