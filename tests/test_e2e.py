"""The whole service as a process: a signed delivery in, a pull request out.

`kugetsu serve` runs as a subprocess against the fake Gitea, whose repositories
are real bare git repositories served over smart HTTP with the token required.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
import requests

from tests import payloads
from tests.conftest import (
    AGENT_PYTHON,
    FAKE_AGENT,
    REPO,
    SANDBOX,
    SECRET,
    TOKEN,
    agent_pid,
    peak_overlap,
    process_gone,
    task_events,
    wait_for,
)
from tests.service import Service, free_port, json_lines, problems, workers, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.both_modes]


def agent_table(**env) -> dict:
    return {"command": [AGENT_PYTHON, str(FAKE_AGENT), "{prompt}"], "env": env}


@pytest.fixture
def service_factory(tmp_path, gitea):
    started = []

    def factory(
        agent_env: dict | None = None,
        agents: dict | None = None,
        triggers: dict | None = None,
        storage: dict | None = None,
        logging: dict | None = None,
        args: tuple[str, ...] = (),
        **queue,
    ) -> Service:
        port = free_port()
        config = write_config(
            tmp_path / f"kugetsu-{port}.toml",
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": port,
                    "public_url": f"http://127.0.0.1:{port}",
                },
                "gitea": {"url": gitea.url, "token": TOKEN, "webhook_secret": SECRET},
                "storage": {"data_dir": str(tmp_path / "data"), **(storage or {})},
                "queue": {
                    "poll_interval_seconds": 30,
                    "max_concurrent_agents": 2,
                    "retry_backoff_seconds": [0],
                    **queue,
                },
                "agents": {
                    "default": "fake",
                    "timeout_minutes": 2,
                    "kill_grace_seconds": 2,
                    **(agents or {}),
                },
                "agents.fake": agent_table(**(agent_env or {})),
                "triggers": triggers or {},
                "git": {"author_name": "kugetsu", "author_email": "kugetsu@example.invalid"},
                "logging": logging or {},
            },
        )
        svc = Service(config, port, tmp_path, args=args)
        started.append(svc)
        return svc.start()

    yield factory
    for svc in started:
        with contextlib.suppress(Exception):
            svc.stop()


def tracking(gitea, number):
    return [
        c
        for c in gitea.comments_on(REPO, number)
        if "<!-- kugetsu:task=" in c["body"] and "Pushed a follow-up" not in c["body"]
    ]


def queue_json(svc):
    result = svc.cli("queue", "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_label_delivery_leads_to_a_pull_request_and_a_follow_up(service_factory, gitea):
    svc = service_factory()
    n = gitea.create_issue(
        REPO, "Add a greeting", "Please add a greeting file.", labels=["kugetsu"]
    )
    body, headers = payloads.label_delivery(["kugetsu"], n)
    r = svc.post(body, headers)
    assert r.status_code == 202, r.text

    def done():
        comments = tracking(gitea, n)
        return comments and "✅ **Done**" in comments[0]["body"]

    wait_for(done, timeout=60, what="the tracking comment to say done")
    [pr] = gitea.pulls_of(REPO).values()
    assert pr["head"]["ref"] == f"kugetsu/issue-{n}"
    assert f"Closes #{n}" in pr["body"]
    [comment] = tracking(gitea, n)
    assert f"pull request #{pr['number']}" in comment["body"]
    sha1 = gitea.branch_sha(REPO, f"kugetsu/issue-{n}")
    assert sha1

    # the same delivery again changes nothing
    assert svc.post(body, headers).json()["status"] == "duplicate"

    # a follow-up on the PR lands on the same branch and PR
    posted = gitea.add_comment(REPO, pr["number"], "/kugetsu continue add a test")
    body, headers = payloads.comment_delivery(
        "/kugetsu continue add a test", pr["number"], is_pull=True, comment_id=posted["id"]
    )
    assert svc.post(body, headers).status_code == 202
    wait_for(
        lambda: len(tracking(gitea, n)) == 2 and "✅" in tracking(gitea, n)[1]["body"],
        timeout=60,
        what="the follow-up to finish",
    )
    assert list(gitea.pulls_of(REPO)) == [pr["number"]]
    sha2 = gitea.branch_sha(REPO, f"kugetsu/issue-{n}")
    assert gitea.git(REPO, "rev-parse", f"{sha2}~1").strip() == sha1
    tasks = queue_json(svc)
    assert [(t["kind"], t["state"], t["outcome"], t["pr_number"]) for t in tasks] == [
        ("start", "completed", "succeeded", pr["number"]),
        ("continue", "completed", "succeeded", pr["number"]),
    ]
    assert set(tasks[0]) >= {
        "id",
        "repo",
        "issue",
        "kind",
        "state",
        "attempts",
        "outcome",
        "pr_number",
        "created_at",
    }
    # the follow-up's comment got an eyes reaction
    assert "eyes" in gitea.reactions.get(posted["id"], [])

    # the token is nowhere in what kugetsu wrote
    data = svc.workdir / "data"
    for path in data.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in svc.logs()


def test_a_review_delivery_becomes_a_follow_up_on_the_same_pull_request(service_factory, gitea):
    svc = service_factory()
    n = gitea.create_issue(REPO, "Add a greeting", "Please add a greeting file.")
    assert svc.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
    wait_for(lambda: gitea.pulls_of(REPO), timeout=60, what="the pull request")
    [pr] = gitea.pulls_of(REPO)
    wait_for(lambda: queue_json(svc)[0]["state"] == "completed", timeout=60, what="the first task")
    before = gitea.branch_sha(REPO, f"kugetsu/issue-{n}")
    review = gitea.add_review(
        REPO,
        pr,
        "bob",
        "REQUEST_CHANGES",
        comments=[{"path": "kugetsu_output.txt", "line": 1, "body": "/kugetsu say more"}],
    )
    payload, event_type, event = gitea.review_event(REPO, pr, review)
    r = svc.post(*payloads.review_delivery(payload, event_type, event))
    assert (r.status_code, r.json()["reason"]) == (202, "review to read")

    def follow_up_done():
        tasks = queue_json(svc)
        return len(tasks) == 2 and tasks[1]["state"] == "completed"

    wait_for(follow_up_done, timeout=60, what="the follow-up for the review")
    assert queue_json(svc)[1]["kind"] == "continue"
    after = gitea.branch_sha(REPO, f"kugetsu/issue-{n}")
    assert gitea.git(REPO, "rev-parse", f"{after}~1").strip() == before
    assert list(gitea.pulls_of(REPO)) == [pr]
    wait_for(lambda: gitea.resolved(REPO, pr), timeout=30, what="the conversation resolved")


def test_kill_9_in_mid_task_recovers_with_exactly_one_pull_request(
    service_factory, gitea, tmp_path
):
    pidfile = tmp_path / "agent.pid"
    svc = service_factory(agent_env={"FAKE_SECONDS": "4", "FAKE_PIDFILE": str(pidfile)})
    n = gitea.create_issue(REPO, "Slow work", "Takes a while.")
    assert svc.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
    wait_for(pidfile.exists, timeout=30, what="the agent to start")
    first_agent = agent_pid(pidfile)
    svc.kill9()
    pidfile.unlink()
    # the agent is an orphan now, still running in its own session
    assert os.path.exists(f"/proc/{first_agent}")
    svc.start()

    def finished():
        tasks = queue_json(svc)
        return tasks and tasks[0]["state"] == "completed"

    wait_for(finished, timeout=60, what="the recovered task to finish")
    [task] = queue_json(svc)
    assert (task["outcome"], task["attempts"]) == ("succeeded", 2)
    assert len(gitea.pulls_of(REPO)) == 1
    assert len(tracking(gitea, n)) == 1
    assert process_gone(first_agent)  # the restarted service killed the orphan


def test_kill_9_between_opening_the_pull_request_and_recording_it(service_factory, gitea, tmp_path):
    # Gitea opens the PR; kugetsu dies before the answer reaches it
    record = tmp_path / "record"
    svc = service_factory(agent_env={"FAKE_RECORD": str(record)}, poll_interval_seconds=2)
    n = gitea.create_issue(REPO, "Add a greeting", "Please add a greeting file.")
    gitea.lose_answer("POST", r"/repos/acme/widget/pulls", "hold")
    assert svc.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
    wait_for(lambda: gitea.pulls_of(REPO), timeout=60, what="Gitea to open the pull request")
    svc.kill9()
    gitea.release()
    svc.start()
    wait_for(
        lambda: queue_json(svc)[0]["state"] == "completed",
        timeout=60,
        what="the recovered task to finish",
    )
    [number] = gitea.pulls_of(REPO)
    [task] = queue_json(svc)
    # the recovered attempt is counted; it only published, it did not run the agent again
    assert (task["outcome"], task["pr_number"], task["attempts"]) == ("succeeded", number, 2)
    assert record.read_text().count("start ") == 1
    wait_for(
        lambda: (
            [f"✅ **Done**: pull request #{number}" in c["body"] for c in tracking(gitea, n)]
            == [True]
        ),
        timeout=30,
        what="the one tracking comment to say done",
    )
    # the issue knows its pull request: a follow-up there is accepted and lands on it
    text = "/kugetsu continue add a test"
    posted = gitea.add_comment(REPO, number, text)
    assert (
        svc.post(
            *payloads.comment_delivery(text, number, is_pull=True, comment_id=posted["id"])
        ).status_code
        == 202
    )
    wait_for(
        lambda: [t["state"] for t in queue_json(svc)] == ["completed", "completed"],
        timeout=60,
        what="the follow-up to finish",
    )
    follow = queue_json(svc)[1]
    assert (follow["kind"], follow["outcome"], follow["pr_number"]) == (
        "continue",
        "succeeded",
        number,
    )
    assert list(gitea.pulls_of(REPO)) == [number]


def test_sigterm_stops_agents_and_requeues_their_tasks(service_factory, gitea, tmp_path):
    pidfile = tmp_path / "agent.pid"
    svc = service_factory(agent_env={"FAKE_SECONDS": "60", "FAKE_PIDFILE": str(pidfile)})
    n = gitea.create_issue(REPO, "Long work", "Takes a long while.")
    assert svc.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
    wait_for(pidfile.exists, timeout=30, what="the agent to start")
    agent = agent_pid(pidfile)
    assert svc.stop(timeout=30) == 0
    assert process_gone(agent)
    [task] = queue_json(svc)
    # put back, not failed: no attempt used up, and no outcome (its comment says "queued again")
    assert (task["state"], task["attempts"], task["outcome"]) == ("pending", 0, None)


def test_replies_past_the_configured_limit_are_a_reaction_alone(service_factory, gitea):
    svc = service_factory(triggers={"reply_limit": 2})
    n = gitea.create_issue(REPO, "Curious", "What can it do?")
    posted = []
    for _ in range(4):
        posted.append(gitea.add_comment(REPO, n, "/kugetsu help", login="mallory"))
        body, headers = payloads.comment_delivery(
            "/kugetsu help", n, sender="mallory", permission="read", comment_id=posted[-1]["id"]
        )
        assert svc.post(body, headers).status_code == 202
    wait_for(
        lambda: all("eyes" in gitea.reactions.get(p["id"], []) for p in posted),
        timeout=30,
        what="a reaction on every command",
    )
    answers = [c for c in gitea.comments_on(REPO, n) if "<!-- kugetsu:reply -->" in c["body"]]
    assert len(answers) == 2


def test_help_and_agent_names_are_the_agents_installed(service_factory, gitea, tmp_path):
    ghost = {"command": [str(tmp_path / "not-installed"), "{prompt}"]}
    svc = service_factory(agents={"ghost": ghost})
    n = gitea.create_issue(REPO, "Curious", "What can it do?")
    for text in ("/kugetsu help", "/kugetsu --agent ghost add a file"):
        comment = gitea.add_comment(REPO, n, text, login="alice")
        body, headers = payloads.comment_delivery(text, n, comment_id=comment["id"])
        assert svc.post(body, headers).status_code == 202

    def answers():
        return [c["body"] for c in gitea.comments_on(REPO, n) if "kugetsu:reply" in c["body"]]

    wait_for(lambda: len(answers()) == 2, timeout=30, what="both replies")
    help_reply, refusal = answers()
    assert "`fake` (the default)" in help_reply and "`ghost`" not in help_reply
    assert "there is no agent named `ghost` here. Available:" in refusal
    assert "`fake`" in refusal.split("Available:")[1]
    assert "`ghost`" not in refusal.split("Available:")[1]
    assert queue_json(svc) == []


def test_bad_deliveries_get_clear_errors_and_change_nothing(service_factory, gitea):
    svc = service_factory()
    body, headers = payloads.label_delivery(["kugetsu"])
    bad = dict(headers, **{"X-Gitea-Signature": "f" * 64, "X-Hub-Signature-256": ""})
    assert svc.post(body, bad).status_code == 401
    assert svc.post(b"{", payloads.sign(b"{", event="issues")).status_code == 400
    huge = b"{" + b" " * (6 * 1024 * 1024) + b"}"
    assert svc.post(huge, payloads.sign(huge, event="issues")).status_code == 413
    assert queue_json(svc) == []


def test_cli_enqueue_cancel_retry_and_logs(service_factory, gitea, tmp_path):
    pidfile = tmp_path / "agent.pid"
    svc = service_factory(agent_env={"FAKE_SECONDS": "60", "FAKE_PIDFILE": str(pidfile)})
    n = gitea.create_issue(REPO, "From the shell", "Queued by hand.")
    r = svc.cli("enqueue", f"{REPO}#{n}", "do it by hand")
    assert r.returncode == 0, r.stderr
    again = svc.cli("enqueue", f"{REPO}#{n}")
    assert again.returncode == 1 and "already queued" in again.stderr
    # enqueue woke the server, which polls only every 30 s
    wait_for(pidfile.exists, timeout=20, what="the agent to start")
    [task] = queue_json(svc)
    assert task["state"] == "running"
    logs = svc.cli("logs", str(task["id"]))
    assert f"kugetsu task {task['id']} attempt 1" in logs.stdout
    cancel = svc.cli("queue", "cancel", str(task["id"]))
    assert cancel.returncode == 0 and "will be stopped" in cancel.stdout
    wait_for(lambda: queue_json(svc)[0]["state"] == "cancelled", timeout=30)
    stats = json.loads(svc.cli("queue", "stats", "--json").stdout)
    assert stats["by_state"]["cancelled"] == 1
    retry = svc.cli("queue", "retry", str(task["id"]))
    assert retry.returncode == 0
    assert queue_json(svc)[0]["state"] in ("pending", "running")
    bad = svc.cli("enqueue", "not-a-ref")
    assert bad.returncode == 2 and "OWNER/REPO#NUMBER" in bad.stderr


def test_two_processes_on_one_database_share_the_limit(service_factory, gitea, tmp_path):
    record = tmp_path / "record"
    env = {"FAKE_SECONDS": "1.0", "FAKE_RECORD": str(record)}
    first = service_factory(agent_env=env, max_concurrent_agents=3)
    second = service_factory(agent_env=env, max_concurrent_agents=3)
    issues = [gitea.create_issue(REPO, f"Work {i}", "Do it.") for i in range(8)]
    # two tasks to the first process; while they run, the rest to the second, which can
    # then take only the one slot left, so both run agents under one shared limit
    for n in issues[:2]:
        assert first.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
    wait_for(lambda: record.exists() and record.read_text().count("start") == 2, timeout=30)
    for n in issues[2:]:
        assert second.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
    wait_for(
        lambda: [t["state"] for t in queue_json(first)] == ["completed"] * 8,
        timeout=90,
        what="all tasks to finish",
    )
    count, peak = peak_overlap(record)
    assert count == 16 and peak <= 3
    assert len(gitea.pulls_of(REPO)) == 8
    from bot.store import open_store

    store = open_store(tmp_path / "data" / "kugetsu.db")
    claimers = {
        e["detail"]
        for t in store.list_tasks()
        for e in task_events(store, t.id)
        if e["event"] == "claimed"
    }
    store.close()
    assert len(claimers) == 2  # both processes ran agents
    for n in issues:  # one tracking comment per task, though two processes publish
        assert len(tracking(gitea, n)) == 1


def test_worker_stops_its_agents_when_the_receiver_dies(service_factory, gitea, tmp_path):
    pidfile = tmp_path / "agent.pid"
    svc = service_factory(agent_env={"FAKE_SECONDS": "60", "FAKE_PIDFILE": str(pidfile)})
    n = gitea.create_issue(REPO, "Long work", "Takes a long while.")
    assert svc.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
    wait_for(pidfile.exists, timeout=30, what="the agent to start")
    agent = agent_pid(pidfile)
    [worker] = workers(svc.proc.pid)
    svc.proc.send_signal(signal.SIGKILL)  # the receiver only
    svc.proc.wait(timeout=10)
    wait_for(
        lambda: process_gone(worker) and process_gone(agent),
        timeout=30,
        what="the worker and its agent to stop",
    )
    [task] = queue_json(svc)
    # put back, not failed: no attempt used up, and no outcome (its comment says "queued again")
    assert (task["state"], task["attempts"], task["outcome"]) == ("pending", 0, None)


def nice_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[16])


def policy_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[38])


def test_the_worker_and_its_agents_yield_the_cpu_to_the_receiver(service_factory, gitea, tmp_path):
    pidfile = tmp_path / "agent.pid"
    svc = service_factory(
        agent_env={"FAKE_SECONDS": "60", "FAKE_PIDFILE": str(pidfile)}, agents={"nice": 7}
    )
    n = gitea.create_issue(REPO, "Long work", "Takes a long while.")
    assert svc.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
    wait_for(pidfile.exists, timeout=30, what="the agent to start")
    [worker] = workers(svc.proc.pid)
    base = os.nice(0)
    assert nice_of(svc.proc.pid) == base
    assert nice_of(worker) == min(base + 7, 19)
    agent = agent_pid(pidfile)
    assert nice_of(agent) == min(base + 7, 19)
    if hasattr(os, "SCHED_BATCH"):
        # batch work: their wake-ups never preempt the receiver (bot/priority.py)
        assert policy_of(svc.proc.pid) == os.SCHED_OTHER
        assert policy_of(worker) == policy_of(agent) == os.SCHED_BATCH
    assert "nice=" in svc.logs()
    if Path("/proc/self/autogroup").exists():
        # the agent's own session is a scheduling group of its own (bot/priority.py)
        group = Path(f"/proc/{agent}/autogroup").read_text().split()
        assert int(group[-1]) == min(base + 7, 19)


def test_a_crashed_worker_is_restarted(service_factory, gitea):
    svc = service_factory()
    [worker] = workers(svc.proc.pid)
    os.kill(worker, signal.SIGKILL)
    wait_for(
        lambda: [p for p in workers(svc.proc.pid) if p != worker], timeout=30, what="a new worker"
    )
    health = requests.get(svc.url + "/healthz", timeout=5).json()
    assert health["worker_restarts"] == 1
    n = gitea.create_issue(REPO, "After the crash", "Still works.")
    assert svc.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
    wait_for(lambda: tracking(gitea, n) and "✅" in tracking(gitea, n)[0]["body"], timeout=60)


# ---------------------------------------------------------------- /healthz


def healthz(svc) -> tuple[int, dict]:
    r = requests.get(svc.url + "/healthz", timeout=5)
    return r.status_code, r.json()


def wake(svc) -> None:
    from bot import wake

    assert wake.send(svc.workdir / "data")


def test_a_tick_that_keeps_failing_shows_in_healthz_and_clears(service_factory, gitea, tmp_path):
    import sqlite3

    svc = service_factory(storage={"min_free_mb": 0})
    wait_for(lambda: "worker started" in svc.logs(), timeout=30, what="the worker to start")
    code, body = healthz(svc)
    assert (code, problems(body)) == (200, [])
    db = sqlite3.connect(tmp_path / "data" / "kugetsu.db")
    # every tick reads the tasks table first; the receiver does not read it for /healthz
    db.execute("ALTER TABLE tasks RENAME TO tasks_elsewhere")
    db.commit()

    def tick_failing():
        wake(svc)  # each wake is a tick
        code, body = healthz(svc)
        return any(p.startswith("tick: failed") for p in body["problems"]) and (code, body)

    code, body = wait_for(tick_failing, timeout=30, what="/healthz to name the failing tick")
    assert code == 200 and body["status"] == "degraded" and body["worker"] == "running"
    [line] = problems(body)
    assert line.endswith(": OperationalError: no such table: tasks"), line

    db.execute("ALTER TABLE tasks_elsewhere RENAME TO tasks")
    db.commit()
    db.close()

    def ok():
        wake(svc)
        return problems(healthz(svc)[1]) == []

    wait_for(ok, timeout=30, what="/healthz to be ok again")
    n = gitea.create_issue(REPO, "After the outage", "Still works.")
    assert svc.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
    wait_for(lambda: tracking(gitea, n) and "✅" in tracking(gitea, n)[0]["body"], timeout=60)


@pytest.fixture
def small_disk(tmp_path):
    """The data directory on a filesystem of its own, 8 MiB, that a test can fill."""
    import subprocess

    data = tmp_path / "data"
    data.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(data)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(
            "a real full disk needs a small tmpfs as the data directory, and mount "
            f"is not allowed here: {done.stderr.strip() or done.returncode} (the "
            "storage-full path is still covered by tests/test_health.py)"
        )
    yield data
    subprocess.run(["umount", "-l", str(data)], capture_output=True)


def fill(path: Path) -> Path:
    """Write a file until the filesystem has no room left."""
    import errno

    filler = path / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        while chunk:  # the last blocks too
            chunk = chunk[: len(chunk) // 2]
            with contextlib.suppress(OSError):
                fh.write(chunk)
    return filler


def test_a_full_disk_gets_503_loses_nothing_acknowledged_and_shows_in_healthz(
    service_factory, gitea, small_disk
):
    svc = service_factory(storage={"min_free_mb": 1})
    code, body = healthz(svc)
    assert (code, problems(body)) == (200, []), body
    acknowledged = []
    for i in range(2):
        n = gitea.create_issue(REPO, f"Before {i}", "Do it.")
        assert (
            svc.post(*payloads.comment_delivery(f"/kugetsu start before {i}", n)).status_code == 202
        )
        acknowledged.append(n)
    filler = fill(small_disk)
    code, body = healthz(svc)
    assert code == 200 and body["status"] == "degraded"
    assert any(
        p.startswith("disk: 0.0 MiB free in the data directory, below storage.min_free_mb (1)")
        for p in body["problems"]
    ), body

    # Deliveries until one cannot be stored: one may still fit in room SQLite's
    # write-ahead log already has. Instructions of 100 kB make each need new room.
    for i in range(40):
        n = gitea.create_issue(REPO, f"Issue {i}", "Do it.")
        refused = payloads.comment_delivery(f"/kugetsu start {i} " + "x" * 100_000, n)
        r = svc.post(*refused)
        if r.status_code != 202:
            break
        acknowledged.append(n)
    assert r.status_code == 503, r.text
    assert r.json() == {
        "status": "error",
        "reason": "could not store the delivery, so it was not accepted: database or disk is full",
    }
    code, body = healthz(svc)
    assert code == 200 and body["status"] == "degraded"
    assert any(
        p.startswith("database: a delivery could not be stored")
        and p.endswith("database or disk is full")
        for p in body["problems"]
    ), body

    # with room again, the same process accepts the refused delivery, redelivered from
    # Gitea's history; killed then, it comes back with everything it acknowledged
    filler.unlink()
    assert svc.post(*refused).status_code == 202
    acknowledged.append(n)
    svc.kill9()
    svc.start()
    assert sorted(t["issue"] for t in queue_json(svc)) == acknowledged
    wait_for(
        lambda: tracking(gitea, n) and "✅" in tracking(gitea, n)[0]["body"],
        timeout=90,
        what="the redelivered task to become a pull request",
    )
    from bot.store import open_store

    store = open_store(small_disk / "kugetsu.db")
    try:
        [task] = store.list_tasks(repo=REPO, issue=n)
        assert task.prompt == f"{i} " + "x" * 100_000
    finally:
        store.close()


# ---------------------------------------------------------------- private files


def test_the_data_directory_is_private_whatever_the_umask(service_factory, gitea, tmp_path):
    import stat

    from bot.store import open_store

    data = tmp_path / "data"
    old_umask = os.umask(0o022)
    try:
        # an install made before, under umask 022: everything readable by anyone
        data.mkdir(mode=0o755)
        (data / "logs").mkdir()
        (data / "logs" / "1.log").write_text("an agent's old output\n")
        (data / "worktrees" / "acme" / "old").mkdir(parents=True)
        (data / "worktrees" / "acme" / "old" / "notes.txt").write_text("old work\n")
        open_store(data / "kugetsu.db").close()
        assert (data / "kugetsu.db").stat().st_mode & 0o044 == 0o044
        svc = service_factory()  # `kugetsu serve` under umask 022 too
        n = gitea.create_issue(REPO, "Private", "Please add a greeting file.")
        assert svc.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
        wait_for(
            lambda: tracking(gitea, n) and "✅" in tracking(gitea, n)[0]["body"],
            timeout=60,
            what="the task to finish",
        )
    finally:
        os.umask(old_umask)
    [task] = queue_json(svc)
    modes = {}
    for path in [data, *data.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode):
            modes[path.relative_to(data).as_posix()] = stat.S_IMODE(mode)
    # every file and folder, the agent's worktree and home, git's mirror included; with
    # the sandbox, the folders on the way to a worktree or home may be passed through by
    # the slots' uids (searched, never listed), and nothing else
    passed = (
        {
            f"{top}{sub}": 0o701
            for top in ("worktrees", "homes")
            for sub in ("", "/acme", "/acme/widget")
        }
        | {".": 0o701}
        if SANDBOX == "user"
        else {}
    )
    assert {p: oct(m) for p, m in modes.items() if m & 0o077 and passed.get(p) != m} == {}
    assert modes["."] == passed.get(".", 0o700)
    tid = task["id"]
    for name in (
        "kugetsu.db",
        "kugetsu.db-wal",
        "kugetsu.db-shm",
        "logs/1.log",
        f"logs/{tid}.log",
        f"prompts/{tid}.md",
        "worktrees/acme/old/notes.txt",
    ):
        assert modes[name] == 0o600, (name, oct(modes[name]))
    for name in ("logs", "prompts", "mirrors", "worktrees", "homes"):
        assert modes[name] == passed.get(name, 0o700), (name, oct(modes[name]))
    assert len(modes) > 50  # it did look at the whole tree


def test_a_secret_an_agent_prints_is_masked_in_its_log_everywhere_it_is_served(
    service_factory, gitea, tmp_path
):
    import re

    leak = tmp_path / "found-secrets"
    leak.write_text(f"{TOKEN} {SECRET}")
    svc = service_factory(agent_env={"FAKE_LEAK": str(leak)})
    n = gitea.create_issue(REPO, "Leaky", "Print what you know.")
    assert svc.post(*payloads.comment_delivery("/kugetsu start", n)).status_code == 202
    wait_for(
        lambda: tracking(gitea, n) and "✅" in tracking(gitea, n)[0]["body"],
        timeout=60,
        what="the task to finish",
    )
    [task] = queue_json(svc)
    link = re.search(r"\((http://[^)]+/logs/[^)]+)\)", tracking(gitea, n)[0]["body"]).group(1)
    served = {
        "file": (tmp_path / "data" / "logs" / f"{task['id']}.log").read_text(),
        "kugetsu logs": svc.cli("logs", str(task["id"])).stdout,
        "the log link": requests.get(link, timeout=5).text,
    }
    for where, text in served.items():
        assert "leaking [redacted] here\nleaking [redacted] here\n" in text, (where, text)
        for secret in (TOKEN, SECRET):
            assert secret[: len(secret) // 2] not in text, where
            assert secret[len(secret) // 2 :] not in text, where


# -------------------------------------------------------------- nothing lost while kugetsu is down


def passes(tmp_path) -> float | None:
    """How far the last reconcile pass looked at the repository (None: not yet)."""
    from bot.store import open_store

    store = open_store(tmp_path / "data" / "kugetsu.db")
    try:
        return {repo: to for repo, _, to in store.reconcile_windows()}.get(REPO)
    finally:
        store.close()


def test_kugetsu_stopped_then_a_label_and_a_start_each_run_once_after_the_restart(
    service_factory, gitea, tmp_path
):
    svc = service_factory()
    n = gitea.create_issue(REPO, "Unrelated", "Nothing to do.")
    hello = gitea.add_comment(REPO, n, "Looks fine.", login="bob")
    body, headers = payloads.comment_delivery(
        hello["body"], n, sender="bob", comment_id=hello["id"]
    )
    assert svc.post(body, headers).status_code == 200
    first = wait_for(lambda: passes(tmp_path), what="the pass after the start")
    svc.stop()

    labelled = gitea.create_issue(REPO, "Add a greeting", "Please add one.", login="carol")
    gitea.add_labels(REPO, labelled, "kugetsu", login="alice")
    commented = gitea.create_issue(REPO, "Add a farewell", "Please add one.")
    start = gitea.add_comment(REPO, commented, "/kugetsu start", login="bob")
    refused = gitea.create_issue(REPO, "Delete everything", "Please.")
    gitea.add_comment(REPO, refused, "/kugetsu start", login="mallory")

    svc.start()

    def finished():
        tasks = {t["issue"]: t for t in queue_json(svc)}
        states = [tasks.get(i, {}).get("state") for i in (labelled, commented, refused)]
        return tasks if states == ["completed", "completed", "rejected"] else None

    tasks = wait_for(finished, timeout=60, what="the missed requests to be done")
    assert len(tasks) == 3 and len(gitea.pulls_of(REPO)) == 2
    assert (tasks[labelled]["requested_by"], tasks[commented]["requested_by"]) == ("alice", "bob")

    # Gitea's deliveries, had they come late, and one more restart: nothing runs again
    late_label = svc.post(*payloads.label_delivery(["kugetsu"], labelled, author="carol"))
    assert late_label.json()["status"] == "ignored"
    body, headers = payloads.comment_delivery(
        "/kugetsu start", commented, sender="bob", comment_id=start["id"]
    )
    assert svc.post(body, headers).json()["status"] == "duplicate"
    svc.stop()
    before = passes(tmp_path)
    assert before is not None and before >= first
    svc.start()
    wait_for(lambda: (passes(tmp_path) or 0) > before, what="the pass after the second start")
    assert len(queue_json(svc)) == 3


def run_one_task(svc, gitea) -> tuple[int, int, dict[str, str]]:
    """A label delivery, and its task to Done: (issue, task id, the delivery's headers)."""
    number = gitea.create_issue(REPO, "Add a greeting", "Please add one.")
    body, headers = payloads.label_delivery(["kugetsu"], number)
    [task] = svc.post(body, headers).json()["tasks"]
    wait_for(
        lambda: any("Done" in c["body"] for c in tracking(gitea, number)), what="the task done"
    )
    return number, task, headers


def test_json_logs_say_which_task_and_the_log_level_flag_wins(service_factory, gitea):
    # the config asks for warnings only; --log-level INFO on the command line wins
    svc = service_factory(
        logging={"format": "json", "level": "WARNING"}, args=("--log-level", "INFO")
    )
    number, task, headers = run_one_task(svc, gitea)
    lines = json_lines(svc)  # every line is one JSON object
    started = [line for line in lines if line["message"] == "task started"]
    assert [(s["level"], s["task"], s["repo"], s["issue"]) for s in started] == [
        ("INFO", task, REPO, number)
    ]
    # what the attempt's thread logs, git's steps included, says which task it served
    fetched = [line for line in lines if line["message"] == "mirror fetched"]
    assert fetched and all(line["task"] == task for line in fetched)
    handled = [line for line in lines if line["message"] == "webhook handled"]
    assert [line["delivery"] for line in handled] == [headers["X-Gitea-Delivery"]]
    assert TOKEN not in svc.logs() and SECRET not in svc.logs()


def test_the_configured_log_level_applies_without_the_flag(service_factory, gitea):
    svc = service_factory(logging={"format": "json", "level": "WARNING"})
    run_one_task(svc, gitea)  # the receiver and the worker log at INFO on the way
    assert all(line["level"] in ("WARNING", "ERROR") for line in json_lines(svc))
    assert "task started" not in svc.logs()
