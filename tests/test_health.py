"""/healthz: 200 while the service lives, each problem named in one line, 503 only for a
dead worker. The service itself (a full disk, a tick that keeps failing) is in test_e2e."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

from bot.app import create_app
from bot.config import Config, GiteaConfig, StorageConfig
from bot.core import health, intake
from bot.core.health import Facts, TickRecord, problems
from bot.service import ReceiverHealth
from bot.store import open_store
from tests import payloads

RULES = intake.Rules(
    label="kugetsu",
    command="/kugetsu",
    bot_login="kugetsu-bot",
    known_agents=frozenset({"opencode"}),
    default_agent="opencode",
    max_attempts=3,
)
NOW = 1_800_000_000.0


def facts(**kw) -> Facts:
    base = dict(
        now=NOW,
        worker_alive=True,
        worker_up_since=NOW - 3600,
        registered=True,
        heartbeat_at=NOW - 5,
        tick=TickRecord(ok_at=NOW - 10),
        free_bytes=10 * health.MIB,
        min_free_bytes=5 * health.MIB,
    )
    return Facts(**{**base, **kw})


def test_a_healthy_service_has_no_problems():
    assert problems(facts()) == []


def test_ticks_that_keep_failing_are_named_and_one_failure_is_not():
    record = TickRecord(ok_at=NOW - 100)
    for i in range(health.TICK_FAILURES_REPORTED):
        assert problems(facts(tick=record)) == []
        record = record.failed(NOW - 60 + i, "OperationalError: no such table: tasks")
    [line] = problems(facts(tick=record))
    assert line == (
        f"tick: failed {health.TICK_FAILURES_REPORTED} times in a row since "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(NOW - 60))}: "
        "OperationalError: no such table: tasks"
    )
    # one good tick clears it
    assert problems(facts(tick=record.began(NOW).succeeded(NOW))) == []


def test_a_stalled_tick_and_a_silent_worker_are_named():
    stalled = TickRecord().began(NOW - health.TICK_STALLED_SECONDS - 5)
    assert problems(facts(tick=stalled)) == [
        f"tick: running for {int(health.TICK_STALLED_SECONDS) + 5} s, stalled"
    ]
    assert problems(facts(tick=TickRecord().began(NOW - 30))) == []
    late = NOW - health.HEARTBEAT_LATE_SECONDS - 1
    assert problems(facts(heartbeat_at=late)) == [
        f"worker: no heartbeat for {int(health.HEARTBEAT_LATE_SECONDS) + 1} s "
        "(it cannot write to the database, or it is stuck)"
    ]
    # a worker that just started has not registered yet; one that never does is named
    assert problems(facts(registered=False, worker_up_since=NOW - 5)) == []
    assert problems(facts(registered=False, worker_up_since=NOW - 600)) == [
        "worker: not registered in the database after 600 s"
    ]


def test_disk_database_and_worker_problems_each_get_a_line():
    assert problems(facts(free_bytes=1 * health.MIB)) == [
        "disk: 1.0 MiB free in the data directory, below storage.min_free_mb (5)"
    ]
    assert problems(
        facts(write_failure=(NOW - 12, "OperationalError: database or disk is full"))
    ) == [
        "database: a delivery could not be stored 12 s ago (answered 503): "
        "OperationalError: database or disk is full"
    ]
    old = NOW - health.WRITE_FAILURE_SECONDS - 1
    assert problems(facts(write_failure=(old, "x"))) == []
    assert problems(facts(database_error="DatabaseError: file is not a database")) == [
        "database: cannot be read: DatabaseError: file is not a database"
    ]
    assert problems(facts(worker_alive=False)) == ["worker: not running (it is restarted)"]


def test_tick_records_survive_the_database_and_bad_ones_are_ignored():
    record = TickRecord(ok_at=1.0).began(2.0).failed(3.0, "boom")
    assert TickRecord.from_json(record.to_json()) == record
    assert TickRecord.from_json(None) is None
    assert TickRecord.from_json("{not json") is None


# ---------------------------------------------------------------- the receiver


def receiver(tmp_path, **storage):
    config = Config(
        gitea=GiteaConfig(webhook_secret=payloads.SECRET),
        storage=StorageConfig(data_dir=tmp_path, **storage),
    )
    store = open_store(tmp_path / "kugetsu.db")
    worker = SimpleNamespace(alive=True, pid=os.getpid(), started_at=time.time(), restarts=0)
    monitor = ReceiverHealth(config, store, worker)
    app = create_app(
        config, store, rules=lambda: RULES, health=monitor, store_failed=monitor.store_failed
    )
    return app.test_client(), store, worker


def test_healthz_is_ok_then_names_the_disk_below_the_threshold(tmp_path):
    client, _, _ = receiver(tmp_path, min_free_mb=1)
    r = client.get("/healthz")
    assert (r.status_code, r.json["status"], r.json["problems"]) == (200, "ok", [])
    # more than the disk holds: the same disk is now "too full"
    total_mib = os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize // health.MIB
    client, _, _ = receiver(tmp_path, min_free_mb=total_mib + 1)
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json["status"] == "degraded"
    [line] = r.json["problems"]
    assert line.startswith("disk: ") and f"below storage.min_free_mb ({total_mib + 1})" in line


def test_a_dead_worker_is_503_and_named(tmp_path):
    client, _, worker = receiver(tmp_path, min_free_mb=0)
    worker.alive = False
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json["status"] == "unhealthy"
    assert r.json["problems"] == ["worker: not running (it is restarted)"]


def test_a_delivery_that_cannot_be_stored_gets_503_nothing_of_it_is_kept_and_health_says_so(
    tmp_path,
):
    client, store, _ = receiver(tmp_path, min_free_mb=0)
    conn = store._conn()  # the test client runs the app on this thread, with this connection
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # the database may not grow: "full"
    long = "x" * 50_000  # a task row this size needs new pages
    body, headers = payloads.comment_delivery(f"/kugetsu start {long}", 7)
    r = client.post("/webhook", data=body, headers=headers)
    assert r.status_code == 503
    assert r.json == {
        "status": "error",
        "reason": "could not store the delivery, so it was not accepted: database or disk is full",
    }
    assert store.list_tasks() == []
    assert conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 0
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json["status"] == "degraded"
    [line] = r.json["problems"]
    assert line.startswith("database: a delivery could not be stored ")
    assert line.endswith("(answered 503): OperationalError: database or disk is full")

    # room again: the same delivery, sent again from Gitea's history, is accepted
    conn.execute("PRAGMA max_page_count = 1000000")
    r = client.post("/webhook", data=body, headers=headers)
    assert r.status_code == 202
    [task] = store.list_tasks()
    assert task.prompt == long


def test_a_database_the_receiver_cannot_read_is_named(tmp_path):
    client, store, _ = receiver(tmp_path, min_free_mb=0)
    store.close()
    (tmp_path / "kugetsu.db").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"kugetsu.db{suffix}").unlink(missing_ok=True)
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json["status"] == "degraded"
    assert r.json["problems"] == ["database: cannot be read: DatabaseError: file is not a database"]


# ---------------------------------------------------------------- readiness and /readyz


def test_what_the_checks_found_is_a_problem_and_unchecked_is_not_ready():
    from bot.core.health import Readiness, not_ready

    assert not_ready(facts()) == ["checks: not run yet (the worker runs them as it starts)"]
    assert problems(facts()) == []  # /healthz does not wait for them
    found = Readiness(NOW - 1, ("gitea: http://gitea:3000 is not reachable",))
    assert problems(facts(readiness=found)) == ["gitea: http://gitea:3000 is not reachable"]
    assert not_ready(facts(readiness=found)) == problems(facts(readiness=found))
    assert not_ready(facts(readiness=Readiness(NOW - 1))) == []
    assert Readiness.from_json(found.to_json()) == found
    assert Readiness.from_json("{") is None and Readiness.from_json(None) is None


def test_readyz_and_healthz_bodies_say_what_is_wrong(tmp_path):
    import socket

    from bot.core.health import Readiness

    client, store, worker = receiver(tmp_path, min_free_mb=0)
    # the worker has not registered, so its checks have not run: not ready, yet alive
    r = client.get("/readyz")
    assert (r.status_code, r.json["status"]) == (503, "not ready")
    assert r.json["problems"] == ["checks: not run yet (the worker runs them as it starts)"]
    assert client.get("/healthz").json["status"] == "ok"
    store.register_worker("w1", os.getpid(), None)
    assert store.worker_report(socket.gethostname(), os.getpid())[0] > 0
    store.set_readiness("w1", Readiness(time.time()).to_json())
    r = client.get("/readyz")
    assert (r.status_code, r.json["status"], r.json["problems"]) == (200, "ready", [])
    lines = (
        "gitea: http://gitea:3000 is not reachable: ConnectionError (check gitea.url)",
        "token: Gitea rejects it (HTTP 401) (create a new token)",
        "agent opencode: the default agent cannot start: opencode is not on PATH",
    )
    store.set_readiness("w1", Readiness(time.time(), lines).to_json())
    r = client.get("/readyz")
    assert (r.status_code, r.json["status"], r.json["problems"]) == (503, "not ready", list(lines))
    r = client.get("/healthz")  # liveness: still 200, and its body names the same
    assert (r.status_code, r.json["status"], r.json["problems"]) == (200, "degraded", list(lines))
    assert "not_ready" not in r.json
    # a worker restarting is not ready, nor alive
    worker.alive = False
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json["problems"] == ["worker: not running (it is restarted)"]


def test_a_disk_nearly_full_is_not_ready(tmp_path):
    from bot.core.health import Readiness

    total_mib = os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize // health.MIB
    client, store, _ = receiver(tmp_path, min_free_mb=total_mib + 1)
    store.register_worker("w1", os.getpid(), None)
    store.set_readiness("w1", Readiness(time.time()).to_json())
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json["problems"][0].startswith("disk: ")
