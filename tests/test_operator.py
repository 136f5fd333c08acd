"""An operator's view of `kugetsu serve`, as a process: what it checks and says at start,
/healthz and /readyz, the wake socket, `doctor --deliver-test`, `backup` while it serves,
and the command line's rough edges."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest
import requests

from bot import wake
from bot.core import hooks
from bot.store import open_store
from tests import payloads
from tests.conftest import FAKE_AGENT, REPO, SECRET, TOKEN, enqueue, wait_for
from tests.service import Service, free_port, problems, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.both_modes]


@pytest.fixture
def serve(tmp_path, gitea):
    started = []

    def factory(
        *, gitea_section=None, agents=None, env=None, start=True, port=None, **sections
    ) -> Service:
        port = port or free_port()
        tables = {
            "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"},
            "gitea": {
                "url": gitea.url,
                "token": TOKEN,
                "webhook_secret": SECRET,
                "repos": [REPO],
                **(gitea_section or {}),
            },
            "storage": {"data_dir": str(tmp_path / "data")},
            "queue": {"poll_interval_seconds": 30, "retry_backoff_seconds": [0]},
            "agents": {"default": "fake", "timeout_minutes": 2, **(agents or {})},
            "agents.fake": {
                "command": [sys.executable, str(FAKE_AGENT), "{prompt}"],
                "env": {"FAKE_SECONDS": "30"},
            },
            **sections,
        }
        config = write_config(tmp_path / f"kugetsu-{port}.toml", tables)
        svc = Service(config, port, tmp_path, env=env)
        started.append(svc)
        return svc.start() if start else svc

    yield factory
    for svc in started:
        with contextlib.suppress(Exception):
            svc.stop()


def get(svc: Service, path: str) -> tuple[int, dict]:
    r = requests.get(svc.url + path, timeout=5)
    return r.status_code, r.json()


def ready(svc: Service) -> dict:
    def checked():
        code, body = get(svc, "/readyz")
        return body if not any(p.startswith("checks:") for p in body["problems"]) else None

    return wait_for(checked, timeout=30, what="the checks at start")


# ------------------------------------------------------------------ checks at start


def test_a_good_start_is_ready_and_logs_what_is_missing(serve, gitea):
    svc = serve()
    body = ready(svc)
    # (run as root without the sandbox, /healthz also warns of that: tests/test_sandbox.py)
    assert body["status"] == "ready" and problems(get(svc, "/healthz")[1]) == []
    # no webhook yet: an error in the log with its fix, but nothing that makes it unready
    wait_for(lambda: "setup problem" in svc.logs(), timeout=30)
    # (run as root without the sandbox, that is logged too: tests/test_sandbox.py)
    [line] = [
        line
        for line in svc.logs().splitlines()
        if "setup problem" in line and "check=sandbox" not in line
    ]
    assert "ERROR" in line and f"check=webhook {REPO}" in line
    assert f"kugetsu webhook install {REPO}" in line


def test_a_wrong_token_and_a_missing_default_agent_are_not_ready_but_alive(serve, tmp_path):
    svc = serve(
        gitea_section={"token": "wrong-token"},
        agents={"default": "claude"},
        env={"PATH": str(tmp_path / "empty-bin")},
    )
    body = ready(svc)
    assert body["status"] == "not ready"
    assert [p.split(":")[0] for p in body["problems"]] == ["token", "agent claude"]
    assert "HTTP 401" in body["problems"][0] and "not on PATH" in body["problems"][1]
    code, health = get(svc, "/healthz")
    assert (code, health["status"], problems(health)) == (200, "degraded", body["problems"])
    # each was logged as an error at start, with what to do
    logs = svc.logs()
    assert "ERROR bot.doctor: setup problem check=token" in logs
    assert "check=agent claude" in logs and "npm install -g @anthropic-ai/claude-code" in logs


def test_an_unreachable_gitea_is_not_ready_but_alive(serve):
    svc = serve(gitea_section={"url": f"http://127.0.0.1:{free_port()}"})
    body = ready(svc)
    assert body["status"] == "not ready"
    assert body["problems"][0].startswith("gitea: http://127.0.0.1:")
    assert "is not reachable" in body["problems"][0]
    assert get(svc, "/healthz")[0] == 200


def test_one_line_each_for_migrating_and_for_shutting_down(serve):
    svc = serve()
    ready(svc)
    # Ctrl-C reaches the receiver and the worker alike
    os.killpg(svc.proc.pid, signal.SIGINT)
    assert svc.proc.wait(timeout=30) == 0
    logs = svc.logs()
    assert logs.count("database migrated") == 1 and "from_version=0" in logs
    assert logs.count("shutting down") == 1 and logs.count("worker stopped") == 0


def test_a_port_in_use_is_named_and_nothing_starts(serve, tmp_path):
    first = serve()
    second = serve(start=False, port=first.port)
    done = subprocess.run(
        [sys.executable, "-m", "bot", "serve", "--config", str(second.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=second.env,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"kugetsu: 127.0.0.1:{first.port} is already in use (another kugetsu, or another "
        "program, listens there); choose another with server.host and server.port"
    )
    assert "worker started" not in done.stderr


# ------------------------------------------------------------------ the wake socket


def test_the_command_line_wakes_the_server_without_the_webhook_secret(serve, gitea, tmp_path):
    # the secret reaches serve through its environment only; the shell has none
    svc = serve(gitea_section={"webhook_secret": ""}, env={"KUGETSU_WEBHOOK_SECRET": SECRET})
    n = gitea.create_issue(REPO, "From the shell", "Queued by hand.")
    shell = {k: v for k, v in svc.env.items() if k != "KUGETSU_WEBHOOK_SECRET"}
    done = subprocess.run(
        [sys.executable, "-m", "bot", "enqueue", f"{REPO}#{n}", "--config", str(svc.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=shell,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and done.stdout.strip() == f"task 1 queued (start on {REPO}#{n})"
    assert done.stderr == ""
    # the poll interval is 30 s: only the wake starts it sooner
    wait_for(
        lambda: json.loads(svc.cli("queue", "list", "--json").stdout)[0]["state"] == "running",
        timeout=15,
        what="the task to start",
    )


def test_the_wake_socket_works_on_a_long_path_and_replaces_a_stale_one(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(str(wake.socket_path(deep))) > 107
    assert wake.send(deep) is False
    woken = threading.Event()
    listener = wake.Listener(deep, woken.set).start()
    try:
        assert wake.send(deep) is True and woken.wait(5)
        # a second server does not take over a live socket
        second = wake.Listener(deep, lambda: None).start()
        assert second._sock is None
    finally:
        listener.close()
    assert not wake.socket_path(deep).exists()
    # one left behind by a server that is gone is replaced
    import socket

    stale = socket.socket(socket.AF_UNIX)
    with wake._address(deep) as address:
        stale.bind(address)
    stale.close()
    assert wake.socket_path(deep).exists() and wake.send(deep) is False
    woken.clear()
    listener = wake.Listener(deep, woken.set).start()
    try:
        assert wake.send(deep) and woken.wait(5)
    finally:
        listener.close()


# ------------------------------------------------------------------ deliver test


def test_deliver_test_proves_the_delivery_arrives(serve, gitea, tmp_path):
    svc = serve()
    ready(svc)
    installed = svc.cli("webhook", "install", REPO)
    assert installed.returncode == 0, installed.stderr
    done = svc.cli("doctor", "--deliver-test", "--json")
    report = json.loads(done.stdout)
    [delivery] = [c for c in report["checks"] if c["name"] == f"delivery {REPO}"]
    assert done.returncode == 0 and delivery["ok"], report
    assert delivery["detail"].startswith("Gitea's test delivery arrived after")
    # the push event was there for the test only
    [hook] = gitea.hooks_of(REPO)
    assert set(hook["events"]) == set(hooks.EVENTS)
    # Gitea refusing to deliver (ALLOWED_HOST_LIST) is found, and named
    gitea.block_deliveries = True
    done = svc.cli("doctor", "--deliver-test", "--deliver-wait", "3", "--json")
    report = json.loads(done.stdout)
    [delivery] = [c for c in report["checks"] if c["name"] == f"delivery {REPO}"]
    assert done.returncode == 1 and not delivery["ok"]
    assert "did not arrive within 3 s" in delivery["detail"]
    assert "ALLOWED_HOST_LIST" in delivery["detail"]


# ------------------------------------------------------------------ backup


def test_backup_while_serving_holds_every_task(serve, tmp_path):
    svc = serve()
    store = open_store(tmp_path / "data" / "kugetsu.db")
    # A reader that stays (a long `queue list --all`, say) keeps every write after it in the
    # write-ahead log: no checkpoint copies them into the database file meanwhile, so a copy
    # of the file alone would not hold them.
    reader = sqlite3.connect(tmp_path / "data" / "kugetsu.db")
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM tasks").fetchone()
    before = [
        enqueue(
            store,
            repo=REPO,
            issue=1000 + i,
            kind="start",
            prompt="x" * 2000,
            agent="fake",
            requested_by="cli",
            max_attempts=1,
        )
        for i in range(300)
    ]
    stop = threading.Event()
    written = []

    def writer():  # a busy service writes while the copy is taken
        i = 0
        while not stop.is_set():
            written.append(
                enqueue(
                    store,
                    repo=REPO,
                    issue=5000 + i,
                    kind="start",
                    prompt="",
                    agent="fake",
                    requested_by="cli",
                    max_attempts=1,
                )
            )
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        copy = tmp_path / "backups"
        copy.mkdir()
        done = svc.cli("backup", str(copy))
    finally:
        stop.set()
        thread.join()
        reader.rollback()
        reader.close()
    assert done.returncode == 0, done.stderr
    [path] = copy.iterdir()
    assert done.stdout.startswith("backed up ") and str(path) in done.stdout
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    ids = {row[0] for row in conn.execute("SELECT id FROM tasks")}
    conn.close()
    assert set(before) <= ids and ids <= set(before) | set(written)
    assert not list(copy.glob(".*part*"))
    # never over a file
    again = svc.cli("backup", str(path))
    assert again.returncode == 1 and "never overwrites" in again.stderr
    store.close()


# ------------------------------------------------------------------ rough edges


def test_enqueue_checks_the_issue_and_queues_with_a_warning_when_gitea_is_away(serve, gitea):
    svc = serve()
    missing = svc.cli("enqueue", f"{REPO}#99")
    assert missing.returncode == 1
    assert missing.stderr == (
        f"kugetsu: {REPO}#99 is not an issue on Gitea (or the bot cannot see it); nothing queued\n"
    )
    n = gitea.create_issue(REPO, "Real", "An issue.")
    gitea.down()
    away = svc.cli("enqueue", f"{REPO}#{n}")
    assert away.returncode == 0 and f"task 1 queued (start on {REPO}#{n})" in away.stdout
    assert away.stderr.startswith(f"kugetsu: warning: cannot check that {REPO}#{n} exists")
    assert away.stderr.count("\n") == 1
    gitea.up()
    listed = svc.cli("queue", "list", "--repo", REPO, "--issue", str(n), "--json")
    assert [t["issue"] for t in json.loads(listed.stdout)] == [n]
    assert (
        json.loads(svc.cli("queue", "list", "--repo", REPO, "--issue", "99", "--json").stdout) == []
    )


def test_a_delivery_records_its_repository(serve, gitea):
    svc = serve()
    body, headers = payloads.comment_delivery("no command here", 1)
    assert svc.post(body, headers).status_code == 200
    store = open_store(svc.workdir / "data" / "kugetsu.db")
    assert store.served_repos() == [REPO] and store.last_delivery(REPO) is not None
    store.close()
