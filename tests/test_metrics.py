"""GET /metrics: counts kept in the database, right across processes.

Unit level: what a change of state counts, the counters the store keeps, the text a scrape
gives. Over HTTP: [metrics] enabled and its token. End to end: a real `kugetsu serve`
(receiver and worker in separate processes) scraped before and after tasks.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import sys

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from bot.app import create_app
from bot.config import Config, ConfigError, GiteaConfig, MetricsConfig, load
from bot.core import metrics as m
from bot.core.tasks import Outcome, State
from bot.httpserver import HttpServer
from bot.metrics import render
from bot.service import RefusedDeliveries
from bot.store import open_store
from tests import payloads
from tests.conftest import FAKE_AGENT, REPO, SECRET, TOKEN, queue_task, wait_for
from tests.service import Service, free_port, write_config
from tests.test_app import RULES


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(text_or_samples, name: str, **labels: str) -> float:
    found = samples(text_or_samples) if isinstance(text_or_samples, str) else text_or_samples
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


# ---------------------------------------------------------------------- pure counting


def facts(**kw) -> m.TaskFacts:
    base = dict(
        id=1,
        repo=REPO,
        issue=3,
        agent="fake",
        state=State.RUNNING,
        outcome=None,
        pr_number=None,
        created_at=100.0,
        not_before=0.0,
        started_at=None,
    )
    return m.TaskFacts(**{**base, **kw})


def test_a_claim_counts_the_wait_since_ready_and_an_end_counts_the_attempt_and_the_finish():
    wait = m.for_transition(facts(not_before=130.0), State.PENDING, State.RUNNING, now=131.0)
    assert wait == {
        m.key(m.Counter.QUEUE_WAIT, le="1.0"): 1.0,
        m.key(m.Counter.QUEUE_WAIT_SUM): 1.0,
    }
    done = m.for_transition(
        facts(state=State.COMPLETED, outcome="succeeded", started_at=140.0),
        State.RUNNING,
        State.COMPLETED,
        now=180.0,
    )
    assert done == {
        m.key(m.Counter.TASK_DURATION, le="60.0"): 1.0,
        m.key(m.Counter.TASK_DURATION_SUM): 40.0,
        m.key(m.Counter.TASKS_FINISHED, outcome="succeeded", agent="fake", repo=REPO): 1.0,
    }
    # a request refused before it ran is finished, as "rejected"; a retry counts no finish
    refused = m.for_transition(facts(state=State.REJECTED), State.PENDING, State.REJECTED, 1.0)
    assert refused == {
        m.key(m.Counter.TASKS_FINISHED, outcome="rejected", agent="fake", repo=REPO): 1.0
    }
    retry = m.for_transition(facts(started_at=10.0), State.RUNNING, State.PENDING, now=7210.5)
    assert retry == {
        m.key(m.Counter.TASK_DURATION, le="+Inf"): 1.0,
        m.key(m.Counter.TASK_DURATION_SUM): 7200.5,
    }


def test_keys_are_the_same_whatever_the_order_of_labels_and_a_tally_gives_back():
    assert m.key(m.Counter.AGENT_TOKENS, agent="a", repo="o/r") == m.key(
        m.Counter.AGENT_TOKENS, repo="o/r", agent="a"
    )
    tally = m.Tally()
    tally.add(m.gitea_request("GET", 200))
    tally.add(m.gitea_request("GET", 200))
    tally.add(m.gitea_request("POST", None))
    taken = tally.take()
    assert not tally
    assert taken[m.key(m.Counter.GITEA_REQUESTS, method="GET", code="200")] == 2
    assert taken[m.key(m.Counter.GITEA_REQUESTS, method="POST", code="none")] == 1
    tally.give_back(taken)
    assert tally.take() == taken


# ---------------------------------------------------------------------- the store's counters


def _counts_then_row(store, first, then):
    """A transaction that counts `first`, then updates counter row `then` itself (a claim
    or a finish that counted, then takes another row)."""
    with store.tx() as c:
        store.add_counts(c, {first: 1})
        c.execute("UPDATE counters SET value = value + 1 WHERE name = ? AND labels = ?", then)


def _counts_in_the_wrong_order(store, first, then):
    """Counts in one call that names `then` before `first` (the store's order is sorted)."""
    store.add_counts(None, {then: 1, first: 1})


@pytest.mark.parametrize(
    ("transaction", "held"),
    [
        # counts wait for the end of the transaction: it holds no counter while it waits
        # for the row it takes next, which the other holds before it takes the counter
        (_counts_then_row, "then"),
        # counters are taken sorted, whatever order the counts name them in: it waits
        # for the first, which the other holds before it takes the second
        (_counts_in_the_wrong_order, "first"),
    ],
)
def test_a_transaction_that_counts_cannot_deadlock_another(pg_cluster, transaction, held):
    """On PostgreSQL each counter row stays locked until commit. Another transaction holds
    one of the two counters ours takes, and goes on to take the other; ours must wait
    holding nothing, not hold the other and deadlock (seen between claims and finishes)."""
    import threading

    import psycopg

    url = pg_cluster.url_for()
    store = open_store(url)
    try:
        first = m.key(m.Counter.GITEA_REQUESTS, method="GET", code="200")
        then = m.key(m.Counter.GITEA_REQUESTS, method="POST", code="201")
        assert sorted([first, then]) == [first, then]
        store.add_counts(None, {first: 1, then: 1})  # both rows exist
        bump = "UPDATE counters SET value = value + 1 WHERE name = %s AND labels = %s"
        failed: list[BaseException] = []

        def ours() -> None:
            try:
                transaction(store, first, then)
            except BaseException as exc:
                failed.append(exc)

        held_key, next_key = (then, first) if held == "then" else (first, then)
        with psycopg.connect(url) as other:
            other.execute(bump, held_key)  # in a transaction
            pid = other.info.backend_pid
            worker = threading.Thread(target=ours)
            worker.start()
            with psycopg.connect(url, autocommit=True) as watch:
                wait_for(
                    lambda: watch.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE %s = ANY(pg_blocking_pids(pid))",
                        (pid,),
                    ).fetchone()[0],
                    what="our transaction to wait for the other",
                )
            other.execute("SET LOCAL lock_timeout = '5s'")
            other.execute(bump, next_key)  # free: ours holds nothing while it waits
            other.commit()
            worker.join(30)
        assert not worker.is_alive() and failed == []
        counters = {(n, lab): v for n, lab, v in store.metrics_snapshot().counters}
        assert counters[first] == counters[then] == 3
    finally:
        store.close()


def test_every_change_of_state_is_counted_once_in_its_own_transaction(make_store):
    # on both backends (tests/conftest.py: make_store)
    now = [1000.0]
    store = make_store(clock=lambda: now[0])
    config = Config()
    tid = queue_task(store)
    before = samples(render(config, store).decode())
    assert value(before, "kugetsu_tasks", state="pending") == 1
    assert value(before, "kugetsu_tasks", state="completed") == 0
    assert value(before, "kugetsu_queue_wait_seconds_count") == 0
    now[0] = 1003.0
    [task] = store.claim(3, "w1")
    store.agent_ran(tid, "fake", {"total_tokens": 1500, "cost_usd": 0.25}, agents_tried=["fake"])
    now[0] = 1063.0
    assert store.transition(
        tid, State.RUNNING, State.COMPLETED, event="done", outcome=Outcome.SUCCEEDED
    )
    # a lost race (the task is no longer running) counts nothing
    assert not store.transition(
        tid, State.RUNNING, State.FAILED, event="late", outcome=Outcome.INFRA_ERROR
    )
    after = samples(render(config, store).decode())
    assert value(after, "kugetsu_tasks", state="pending") == 0
    assert value(after, "kugetsu_tasks", state="completed") == 1
    assert value(after, "kugetsu_tasks_finished_total", outcome="succeeded", agent="fake") == 1
    assert value(after, "kugetsu_tasks_finished_total", outcome="infra_error", agent="fake") == 0
    assert value(after, "kugetsu_queue_wait_seconds_count") == 1
    assert value(after, "kugetsu_queue_wait_seconds_sum") == 3.0
    assert value(after, "kugetsu_queue_wait_seconds_bucket", le="5.0") == 1
    assert value(after, "kugetsu_queue_wait_seconds_bucket", le="1.0") == 0
    assert value(after, "kugetsu_task_duration_seconds_count") == 1
    assert value(after, "kugetsu_task_duration_seconds_sum") == 60.0
    assert value(after, "kugetsu_agent_tokens_total", agent="fake") == 1500
    assert value(after, "kugetsu_agent_cost_usd_total", agent="fake") == 0.25
    assert (
        value(
            after,
            "kugetsu_build_info",
            version=__import__("bot").__version__,
            python=sys.version.split()[0],
        )
        == 1
    )
    # no per-task label anywhere, and no repo label unless asked for
    assert not any(dict(labels).keys() & {"task", "id", "issue", "repo"} for _name, labels in after)
    by_repo = samples(render(Config(metrics=MetricsConfig(repo_label=True)), store).decode())
    assert value(by_repo, "kugetsu_tasks", state="completed", repo=REPO) == 1
    assert (
        value(by_repo, "kugetsu_tasks_finished_total", outcome="succeeded", agent="fake", repo=REPO)
        == 1
    )


# ---------------------------------------------------------------------- over HTTP


@pytest.fixture
def receiver(tmp_path):
    started = []

    def start(metrics: MetricsConfig):
        config = Config(gitea=GiteaConfig(webhook_secret=payloads.SECRET), metrics=metrics)
        store = open_store(tmp_path / "db")
        refused = RefusedDeliveries(store)
        app = create_app(
            config,
            store,
            rules=lambda: RULES,
            refused=refused.tally,
            scrape=refused.flushed(lambda: render(config, store)),
        )
        server = HttpServer(app, "127.0.0.1", 0).start()
        started.append((server, store))
        return server.url, store

    yield start
    for server, store in started:
        server.stop()
        store.close()


def test_metrics_are_off_unless_enabled(receiver):
    url, _ = receiver(MetricsConfig())
    assert requests.get(url + "/metrics", timeout=5).status_code == 404


def test_with_a_token_metrics_answer_401_without_the_bearer_token(receiver):
    url, _ = receiver(MetricsConfig(enabled=True, token="scrape-me"))
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic scrape-me"},
        {"Authorization": "scrape-me"},
    ):
        r = requests.get(url + "/metrics", headers=headers, timeout=5)
        assert r.status_code == 401, headers
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "kugetsu_" not in r.text
    r = requests.get(url + "/metrics", headers={"Authorization": "Bearer scrape-me"}, timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert (
        value(
            r.text,
            "kugetsu_build_info",
            version=__import__("bot").__version__,
            python=sys.version.split()[0],
        )
        == 1
    )


def test_every_delivery_is_counted_by_how_it_was_answered(receiver):
    url, store = receiver(MetricsConfig(enabled=True))
    queued = payloads.label_delivery(["kugetsu"], 5)
    assert requests.post(url + "/webhook", data=queued[0], headers=queued[1], timeout=5).ok
    requests.post(url + "/webhook", data=queued[0], headers=queued[1], timeout=5)  # again
    other = payloads.comment_delivery("thanks!", 6)
    requests.post(url + "/webhook", data=other[0], headers=other[1], timeout=5)
    bad = dict(queued[1], **{"X-Gitea-Signature": "0" * 64})
    assert (
        requests.post(url + "/webhook", data=queued[0], headers=bad, timeout=5).status_code == 401
    )
    text = requests.get(url + "/metrics", timeout=5).text
    for result, count in (("queued", 1), ("duplicate", 1), ("ignored", 1), ("rejected", 1)):
        assert value(text, "kugetsu_webhook_deliveries_total", result=result) == count, result
    # counted in the database, not in the receiver's memory
    rows = dict(
        store._conn()
        .execute("SELECT labels, value FROM counters WHERE name = ?", ("webhook_deliveries",))
        .fetchall()
    )
    assert rows == {
        '{"result":"queued"}': 1,
        '{"result":"duplicate"}': 1,
        '{"result":"ignored"}': 1,
        '{"result":"rejected"}': 1,
    }


def test_metrics_settings_are_read_from_the_file_and_the_token_is_a_secret(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text('[metrics]\nenabled = true\ntoken = "tok-123"\nrepo_label = true\n')
    config = load(path, {}, require_secret=False)
    assert config.metrics == MetricsConfig(enabled=True, token="tok-123", repo_label=True)
    assert "tok-123" in config.secrets()
    assert load(path, {"KUGETSU_METRICS_TOKEN": "env-tok"}, require_secret=False).metrics.token == (
        "env-tok"
    )
    path.write_text("[metrics]\nenabled = 1\n")
    with pytest.raises(ConfigError, match=r"metrics\.enabled must be true or false"):
        load(path, {}, require_secret=False)


# ---------------------------------------------------------------------- the whole service


def scrape(svc) -> dict:
    r = requests.get(svc.url + "/metrics", headers={"Authorization": "Bearer t0k"}, timeout=10)
    assert r.status_code == 200, r.text
    return samples(r.text)


@pytest.mark.both_modes
@pytest.mark.e2e
def test_metrics_of_a_running_service_count_the_receivers_and_the_workers_work(tmp_path, gitea):
    port = free_port()
    config = write_config(
        tmp_path / "kugetsu.toml",
        {
            "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"},
            "gitea": {"url": gitea.url, "token": TOKEN, "webhook_secret": SECRET},
            "storage": {"data_dir": str(tmp_path / "data")},
            "queue": {"poll_interval_seconds": 30, "max_concurrent_agents": 2},
            "agents": {"default": "oc", "timeout_minutes": 2, "kill_grace_seconds": 2},
            "agents.oc": {
                "preset": "opencode",
                "command": [sys.executable, str(FAKE_AGENT), "{prompt}"],
                "env": {"FAKE_MODE": "opencode", "FAKE_FILE": "out.txt"},
            },
            "metrics": {"enabled": True, "token": "t0k"},
        },
    )
    svc = Service(config, port, tmp_path).start()
    try:
        before = scrape(svc)
        assert value(before, "kugetsu_tasks", state="completed") == 0
        assert value(before, "kugetsu_webhook_deliveries_total", result="queued") == 0
        issues = [
            gitea.create_issue(REPO, f"Task {i}", "do it", labels=["kugetsu"]) for i in range(3)
        ]
        for n in issues:
            body, headers = payloads.label_delivery(["kugetsu"], n)
            assert svc.post(body, headers).status_code == 202
        body, headers = payloads.label_delivery(["kugetsu"], issues[0])
        assert svc.post(body, dict(headers, **{"X-Gitea-Signature": "f" * 64})).status_code == 401

        def finished():
            now = scrape(svc)
            return now if value(now, "kugetsu_tasks", state="completed") == 3 else None

        wait_for(finished, timeout=90, interval=0.5, what="three tasks to complete")
        # Gitea calls are written with the worker's heartbeat (every 10 s)
        after = wait_for(
            lambda: (
                (s := scrape(svc))
                and value(s, "kugetsu_gitea_requests_total", method="POST", code="201") > 0
                and s
            ),
            timeout=30,
            interval=0.5,
            what="the worker's Gitea calls to be counted",
        )
        assert value(after, "kugetsu_webhook_deliveries_total", result="queued") == 3
        assert value(after, "kugetsu_webhook_deliveries_total", result="rejected") == 1
        assert value(after, "kugetsu_tasks_finished_total", outcome="succeeded", agent="oc") == 3
        assert value(after, "kugetsu_task_duration_seconds_count") == 3
        assert value(after, "kugetsu_queue_wait_seconds_count") == 3
        assert value(after, "kugetsu_agents_running") == 0
        db = sqlite3.connect(tmp_path / "data" / "kugetsu.db")
        usage = [json.loads(u)["total_tokens"] for (u,) in db.execute("SELECT usage FROM tasks")]
        db.close()
        assert len(usage) == 3 and all(usage)
        assert value(after, "kugetsu_agent_tokens_total", agent="oc") == sum(usage)
        # three pull requests opened, each one POST answered 201
        assert value(after, "kugetsu_gitea_requests_total", method="POST", code="201") >= 3
        # the worker measures the disk as it starts, and every few minutes
        host = socket.gethostname()
        assert value(after, "kugetsu_disk_usage_measured_timestamp_seconds", host=host) > 0
        assert ("kugetsu_disk_usage_bytes", (("dir", "mirrors"), ("host", host))) in after
    finally:
        svc.stop()


def test_metrics_show_each_workers_capacity_running_tasks_and_heartbeat_age(make_store):
    # on both backends: with several machines, every worker on one scrape
    now = [500.0]
    store = make_store(clock=lambda: now[0])
    store.register_worker("w1", 10, None, host="machine-a", node="machine-a:/d", capacity=2)
    store.register_worker("w2", 11, None, host="machine-b", node="machine-b:/d", capacity=3)
    queue_task(store)
    store.claim(3, "w2")
    now[0] = 530.0
    store.heartbeat("w2")
    text = samples(render(Config(), store).decode())
    assert value(text, "kugetsu_worker_capacity", worker="w1", host="machine-a") == 2
    assert value(text, "kugetsu_worker_capacity", worker="w2", host="machine-b") == 3
    assert value(text, "kugetsu_worker_running_tasks", worker="w1", host="machine-a") == 0
    assert value(text, "kugetsu_worker_running_tasks", worker="w2", host="machine-b") == 1
    assert value(text, "kugetsu_worker_heartbeat_age_seconds", worker="w1", host="machine-a") == 30
    assert value(text, "kugetsu_worker_heartbeat_age_seconds", worker="w2", host="machine-b") == 0
