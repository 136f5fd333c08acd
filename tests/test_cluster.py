"""Several machines on one queue: one receiver and two workers on one PostgreSQL database.

Each node is `kugetsu serve` as a process of its own, with its own data directory, port
and `[worker] host` (so the PID check, which holds within one host, never applies
between them, as between real machines). The fake Gitea and its git remote are shared.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import pytest
import requests

from bot.config import load
from bot.core import render
from bot.core.tasks import State
from bot.store import open_store
from tests import payloads
from tests.conftest import FAKE_AGENT, REPO, SECRET, TOKEN, peak_overlap, task_events, wait_for
from tests.service import Service, free_port, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.both_modes]

LEASE_SECONDS = 4


def agent(seconds: float, record) -> dict:
    return {
        "command": [sys.executable, str(FAKE_AGENT), "{prompt}"],
        "env": {"FAKE_SECONDS": str(seconds), "FAKE_RECORD": str(record)},
    }


@pytest.fixture
def cluster(tmp_path, gitea, pg_cluster):
    """start(role, host, capacity) -> a started node on the test's database."""
    url = pg_cluster.url_for()
    record = tmp_path / "agents.record"
    nodes: list[Service] = []

    def start(role: str, host: str = "", capacity: int | None = None) -> Service:
        port = free_port()
        name = f"{role}-{host or port}"
        config = write_config(
            tmp_path / f"{name}.toml",
            {
                "server": {"host": "127.0.0.1", "port": port},
                "gitea": {"url": gitea.url, "token": TOKEN, "webhook_secret": SECRET},
                "storage": {"data_dir": str(tmp_path / name), "database_url": url},
                "queue": {
                    "poll_interval_seconds": 30,
                    "max_concurrent_agents": 3,
                    "retry_backoff_seconds": [0],
                },
                "worker": {
                    "lease_seconds": LEASE_SECONDS,
                    "host": host,
                    **({"capacity": capacity} if capacity else {}),
                },
                "agents": {"default": "fake", "timeout_minutes": 2, "kill_grace_seconds": 1},
                "agents.fake": agent(1.0, record),
                "agents.slow": agent(8.0, record),
                "git": {"author_name": "kugetsu", "author_email": "kugetsu@example.invalid"},
            },
        )
        node = Service(config, port, tmp_path, args=("--role", role))
        nodes.append(node)
        return node.start()

    start.url = url
    start.record = record
    yield start
    for node in nodes:
        with contextlib.suppress(Exception):
            node.stop()


def tracking(gitea, number):
    return [
        c
        for c in gitea.comments_on(REPO, number)
        if "<!-- kugetsu:task=" in c["body"] and "Pushed a follow-up" not in c["body"]
    ]


def one_done_comment_each(gitea, issues) -> None:
    for n in issues:
        wait_for(
            lambda n=n: (
                len(tracking(gitea, n)) == 1 and "✅ **Done**" in tracking(gitea, n)[0]["body"]
            ),
            timeout=60,
            what=f"issue {n}'s one tracking comment to say done",
        )


def pulls_by_branch(gitea) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pr in gitea.pulls_of(REPO).values():
        counts[pr["head"]["ref"]] = counts.get(pr["head"]["ref"], 0) + 1
    return counts


def test_one_receiver_and_two_workers_share_one_queue_and_one_exact_limit(cluster, gitea):
    receiver = cluster("receiver")
    workers = {h: cluster("worker", host=h, capacity=2) for h in ("machine-a", "machine-b")}
    store = open_store(cluster.url)
    try:
        issues = [gitea.create_issue(REPO, f"Issue {i}", "Do it.") for i in range(12)]
        for n in issues:
            r = receiver.post(*payloads.label_delivery(["kugetsu"], n))
            assert r.status_code == 202, r.text
        wait_for(
            lambda: sum(t.state is State.COMPLETED for t in store.list_tasks()) == 12,
            timeout=120,
            what="12 tasks completed",
        )
        starts, peak = peak_overlap(cluster.record)
        assert starts == 24 and peak == 3  # the global limit, exactly: never more, and used
        claimed_by = {
            e["detail"].split("-")[0] + "-" + e["detail"].split("-")[1]
            for t in store.list_tasks()
            for e in task_events(store, t.id)
            if e["event"] == "claimed"
        }
        assert claimed_by == {"machine-a", "machine-b"}
        one_done_comment_each(gitea, issues)
        assert pulls_by_branch(gitea) == {f"kugetsu/issue-{n}": 1 for n in issues}
        # the log of a task that ran on a worker is read where it did not run: by
        # `kugetsu logs` and the signed log link of the receiver, which has no log files
        task = store.list_tasks()[0]
        shown = receiver.cli("logs", str(task.id))
        assert shown.returncode == 0 and f"=== kugetsu task {task.id} attempt 1" in shown.stdout
        config = load(receiver.config_path)
        assert not config.storage.log_path(task.id).exists()
        link = f"{receiver.url}/logs/{task.id}/{render.log_token(config, task.id)}"
        served = requests.get(link, timeout=10)
        assert served.status_code == 200 and served.text == shown.stdout

        # kill -9 one machine's worker and its agents while they run: its tasks finish on
        # the other machine once their leases run out
        more = [gitea.create_issue(REPO, f"Later {i}", "Do it.") for i in range(4)]
        for n in more:
            r = receiver.post(*payloads.comment_delivery("/kugetsu start --agent slow", n))
            assert r.status_code == 202, r.text

        def running_on_a():
            return [
                t
                for t in store.running_tasks()
                if t.worker_id.startswith("machine-a-") and t.pid is not None
            ]

        victims = wait_for(running_on_a, timeout=60, what="an agent running on machine-a")
        workers["machine-a"].kill9()
        killed_at = time.monotonic()
        for task in victims:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(task.pid, signal.SIGKILL)
        wait_for(
            lambda: (
                all(t.state is State.COMPLETED for t in store.list_tasks() if t.issue in more)
                and len([t for t in store.list_tasks() if t.issue in more]) == 4
            ),
            timeout=LEASE_SECONDS + 60,
            what="the 4 later tasks completed on machine-b",
        )
        assert time.monotonic() - killed_at < LEASE_SECONDS + 60
        for task in victims:
            events = [e["event"] for e in task_events(store, task.id)]
            assert "recovered" in events, events
            assert store.get(task.id).worker_id.startswith("machine-b-")
            assert store.get(task.id).attempts == 2  # the lost attempt counted
        assert pulls_by_branch(gitea) == {f"kugetsu/issue-{n}": 1 for n in issues + more}
        one_done_comment_each(gitea, more)
    finally:
        store.close()
