"""Notifications ([[notify]]): produced where a task's state changes, sent from the outbox in
order per endpoint, signed, retried, never in the way of a task.

A small HTTP server stands in for an operator's endpoint: it checks each signature as a
receiver would, and can be told to fail its first answers or to hold them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bot.config import Config, ConfigError, NotifyConfig, load
from bot.core import notify
from bot.core.notify import Format, NotifyEvent
from bot.core.outbox import OutboxKind
from bot.core.tasks import Outcome, State
from bot.worker.notify import NotifyLane
from bot.worker.outbox import HANDLERS, Outbox
from tests import payloads
from tests.conftest import FAKE_AGENT, REPO, SECRET, TOKEN, queue_task, wait_for
from tests.service import Service, free_port, write_config

HOOK_SECRET = "notify-secret-42"


class Endpoint:
    """Records what it is sent. `fail` answers that many requests with 500 first; `hold`
    keeps each answer back until `release()`."""

    def __init__(self, *, fail: int = 0, hold: bool = False, secret: str = HOOK_SECRET):
        self.received: list[dict] = []
        self.attempts = 0
        self.bad_signatures = 0
        self.fail, self.secret = fail, secret
        self.released = threading.Event()
        if not hold:
            self.released.set()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.released.wait(30)
                with outer.lock:
                    outer.attempts += 1
                    failing = outer.fail > 0
                    if failing:
                        outer.fail -= 1
                    else:
                        signed = hmac.new(outer.secret.encode(), body, hashlib.sha256).hexdigest()
                        if not hmac.compare_digest(
                            signed, self.headers.get("X-Kugetsu-Signature", "")
                        ):
                            outer.bad_signatures += 1
                        outer.received.append(
                            {
                                "body": body,
                                "headers": dict(self.headers),
                                "delivery": self.headers.get("X-Kugetsu-Delivery"),
                            }
                        )
                self.send_response(500 if failing else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[tuple[int, str, str]]:
        """(task id, event, state) of each JSON notification taken, in order."""
        with self.lock:
            found = []
            for r in self.received:
                data = json.loads(r["body"])
                found.append((data["task"]["id"], data["event"], data["task"]["state"]))
            return found

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints():
    made: list[Endpoint] = []

    def factory(**kw) -> Endpoint:
        e = Endpoint(**kw)
        made.append(e)
        return e

    yield factory
    for e in made:
        e.close()


# ---------------------------------------------------------------------- pure and config


def test_every_state_is_an_event_and_each_format_has_its_body():
    assert {notify.event_for(s) for s in State} == set(NotifyEvent)
    assert notify.event_for(State.REJECTED) is NotifyEvent.FAILED
    task = {
        "id": 7,
        "repo": REPO,
        "issue": 3,
        "state": "completed",
        "outcome": "succeeded",
        "pr_number": 9,
        "url": "http://gitea/acme/widget/issues/3",
    }
    body, headers = notify.request(Format.JSON, "completed", task, secret="s3")
    assert json.loads(body) == {"event": "completed", "task": task}
    assert headers["X-Kugetsu-Signature"] == hmac.new(b"s3", body, hashlib.sha256).hexdigest()
    body, headers = notify.request(Format.SLACK, "completed", task)
    assert json.loads(body)["text"] == (
        "kugetsu task 7 on acme/widget#3: completed (succeeded), pull request #9 "
        "<http://gitea/acme/widget/issues/3>"
    )
    assert "X-Kugetsu-Signature" not in headers
    body, headers = notify.request(Format.NTFY, "failed", dict(task, outcome="timed_out"))
    assert body.decode() == "kugetsu task 7 on acme/widget#3: failed (timed_out), pull request #9"
    assert headers["Title"] == "kugetsu: failed" and headers["Click"] == task["url"]


def test_notify_entries_are_read_and_checked(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(
        '[[notify]]\nurl = "https://ntfy.example/k"\nformat = "ntfy"\n'
        'events = ["failed"]\n\n'
        '[[notify]]\nurl = "https://hooks.example/x"\nsecret = "s"\nretry_hours = 2\n'
        'name = "ops"\n'
    )
    config = load(path, {}, require_secret=False)
    first, second = config.notify
    assert (first.format, first.events, first.name) == (
        Format.NTFY,
        frozenset({NotifyEvent.FAILED}),
        "notify[0]",
    )
    assert (second.format, second.events, second.retry_seconds) == (
        Format.JSON,
        frozenset(NotifyEvent),
        7200.0,
    )
    assert "s" in config.secrets() and "hooks.example" not in repr(second)
    for text, error in (
        ('[notify]\nurl = "https://x"\n', "notify must be written as"),
        ('[[notify]]\nurl = "ftp://x"\n', r"notify\[0\]\.url must start with"),
        ('[[notify]]\nurl = "https://x"\nformat = "xml"\n', r"notify\[0\]\.format must be"),
        ('[[notify]]\nurl = "https://x"\nevents = ["done"]\n', "unknown event 'done'"),
        ('[[notify]]\nurl = "https://x"\nretry_hours = 0\n', "retry_hours must be greater"),
        ('[[notify]]\nurl = "https://x"\ncolour = 1\n', "unknown key: colour"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=error):
            load(path, {}, require_secret=False)


# ---------------------------------------------------------------------- produced once, in order


def test_each_change_of_state_writes_one_notification_for_each_endpoint_that_wants_it(
    make_store,
):
    # on both backends (tests/conftest.py: make_store)
    every = NotifyConfig(url="http://a.example/")
    failures = NotifyConfig(url="http://b.example/", events=frozenset({NotifyEvent.FAILED}))
    config = Config(notify=(every, failures))
    store = make_store(notify=config.notify_routes())
    tid = queue_task(store)
    store.claim(3, "w1")
    store.transition(tid, State.RUNNING, State.PENDING, event="retry", outcome=Outcome.TIMED_OUT)
    store.claim(3, "w1")
    store.transition(tid, State.RUNNING, State.FAILED, event="x", outcome=Outcome.AGENT_FAILED)
    assert not store.transition(tid, State.RUNNING, State.FAILED, event="lost race")
    other = queue_task(store, issue=4)
    store.request_cancel(other, "bob")

    def sent_to(endpoint):
        return [
            (i.target, json.loads(i.body)["event"], json.loads(i.body)["task"]["state"])
            for i in store.notify_queue(endpoint.id, 100)
        ]

    assert sent_to(every) == [
        (tid, "queued", "pending"),
        (tid, "started", "running"),
        (tid, "queued", "pending"),
        (tid, "started", "running"),
        (tid, "failed", "failed"),
        (other, "queued", "pending"),
        (other, "cancelled", "cancelled"),
    ]
    assert sent_to(failures) == [(tid, "failed", "failed")]
    [item] = store.notify_queue(failures.id, 100)
    assert item.kind is OutboxKind.NOTIFY and json.loads(item.body)["task"]["outcome"] == (
        "agent_failed"
    )
    # the tick's outbox pass never sees them
    assert store.outbox_due(100) == []
    assert HANDLERS[OutboxKind.NOTIFY].own_lane


def test_an_event_not_taken_within_the_retry_window_is_dropped_and_the_next_is_sent(
    make_store, endpoints
):
    down = endpoints(fail=1000)
    endpoint = NotifyConfig(url=down.url, secret=HOOK_SECRET, retry_hours=1.0)
    config = Config(notify=(endpoint,))
    now = [1000.0]
    store = make_store(clock=lambda: now[0], notify=config.notify_routes())
    first = queue_task(store)
    lane = NotifyLane(config, store, Outbox(config, store, None, None, lambda: None), "w1",
                      clock=lambda: now[0])  # fmt: skip
    assert lane.work(endpoint) == 0 and down.attempts == 1
    now[0] += 1800  # within the window: still waiting, tried again when due
    assert lane.work(endpoint) == 0 and down.attempts == 2
    now[0] += 1801  # past it: dropped, with why
    down.fail = 0
    second = queue_task(store, issue=4)
    assert lane.work(endpoint) == 1
    assert down.events() == [(second, "queued", "pending")]
    error = (
        store._conn()
        .execute("SELECT error FROM outbox WHERE target = ? AND endpoint IS NOT NULL", (first,))
        .fetchone()[0]
    )
    assert error.startswith(f"not taken within 1 hours: {endpoint.shown}: answered HTTP 500")


# ---------------------------------------------------------------------- the whole service


def service(tmp_path, gitea, notify_entries, agent_env=None) -> Service:
    port = free_port()
    tables = {
        "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"},
        "gitea": {"url": gitea.url, "token": TOKEN, "webhook_secret": SECRET},
        "storage": {"data_dir": str(tmp_path / "data")},
        "queue": {"poll_interval_seconds": 30, "max_concurrent_agents": 3},
        "agents": {"default": "fake", "timeout_minutes": 2, "kill_grace_seconds": 2},
        "agents.fake": {
            "command": [sys.executable, str(FAKE_AGENT), "{prompt}"],
            "env": agent_env or {},
        },
    }
    path = write_config(tmp_path / "kugetsu.toml", tables)
    with path.open("a") as fh:
        for entry in notify_entries:
            fh.write("\n[[notify]]\n")
            fh.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in entry.items()))
    return Service(path, port, tmp_path).start()


@pytest.mark.both_modes
@pytest.mark.e2e
def test_a_service_sends_every_tasks_events_in_order_signed_through_an_endpoint_that_fails_first(
    tmp_path, gitea, endpoints
):
    flaky = endpoints(fail=2)
    svc = service(tmp_path, gitea, [{"url": flaky.url, "secret": HOOK_SECRET}])
    try:
        issues = [
            gitea.create_issue(REPO, f"Task {i}", "do it", labels=["kugetsu"]) for i in range(3)
        ]
        for n in issues:
            body, headers = payloads.label_delivery(["kugetsu"], n)
            assert svc.post(body, headers).status_code == 202
        wait_for(
            lambda: sum(e == "completed" for _, e, _ in flaky.events()) == 3,
            timeout=90,
            interval=0.2,
            what="every task's completed event",
        )
        events = flaky.events()
        assert flaky.bad_signatures == 0 and flaky.attempts == len(events) + 2
        tasks = sorted({t for t, _, _ in events})
        assert len(tasks) == 3
        for t in tasks:
            assert [(e, s) for tid, e, s in events if tid == t] == [
                ("queued", "pending"),
                ("started", "running"),
                ("completed", "completed"),
            ]
        done = [json.loads(r["body"]) for r in flaky.received if b'"completed"' in r["body"]]
        for data in done:
            task = data["task"]
            assert task["outcome"] == "succeeded" and task["pr_number"]
            assert (
                task["repo"] == REPO and task["url"] == f"{gitea.url}/{REPO}/issues/{task['issue']}"
            )
        deliveries = [r["delivery"] for r in flaky.received]
        assert len(set(deliveries)) == len(deliveries)  # nothing sent twice
    finally:
        svc.stop()


@pytest.mark.both_modes
@pytest.mark.e2e
def test_an_endpoint_that_does_not_answer_slows_neither_the_tasks_nor_the_other_endpoints(
    tmp_path, gitea, endpoints
):
    stuck = endpoints(hold=True)
    fine = endpoints()
    svc = service(
        tmp_path,
        gitea,
        [
            {"url": stuck.url, "secret": HOOK_SECRET, "timeout_seconds": 60, "name": "stuck"},
            {"url": fine.url, "secret": HOOK_SECRET, "events": ["completed"]},
        ],
    )
    try:
        n = gitea.create_issue(REPO, "Task", "do it", labels=["kugetsu"])
        body, headers = payloads.label_delivery(["kugetsu"], n)
        assert svc.post(body, headers).status_code == 202
        # the task runs to its end and the other endpoint hears of it while the first
        # endpoint still holds its first request
        wait_for(lambda: fine.events(), timeout=60, interval=0.2, what="the completed event")
        assert [e for _, e, _ in fine.events()] == ["completed"]
        assert stuck.received == [] and not stuck.released.is_set()
        assert gitea.pulls_of(REPO)
        stuck.release()
        wait_for(
            lambda: [e for _, e, _ in stuck.events()] == ["queued", "started", "completed"],
            timeout=30,
            interval=0.2,
            what="the held endpoint to get its events, in order",
        )
    finally:
        svc.stop()
