"""The webhook receiver over real HTTP: every status code, dedupe, nothing lost."""

import json
import logging
import urllib.parse

import pytest
import requests

from bot.app import create_app
from bot.config import Config, GiteaConfig, ServerConfig
from bot.core import intake
from bot.httpserver import HttpServer
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


@pytest.fixture
def service(tmp_path):
    config = Config(
        server=ServerConfig(max_body_bytes=64 * 1024),
        gitea=GiteaConfig(webhook_secret=payloads.SECRET),
    )
    store = open_store(tmp_path / "db")
    woken = []
    app = create_app(config, store, rules=lambda: RULES, wake=lambda: woken.append(1))
    server = HttpServer(app, "127.0.0.1", 0, max_body_bytes=config.server.max_body_bytes).start()
    yield server.url, store, woken
    server.stop()
    store.close()


def post(url, body, headers):
    return requests.post(url + "/webhook", data=body, headers=headers, timeout=10)


def test_label_delivery_is_queued_with_202(service):
    url, store, woken = service
    r = post(url, *payloads.label_delivery(["kugetsu"]))
    assert r.status_code == 202
    assert r.json()["status"] == "queued"
    [task] = store.list_tasks()
    assert r.json()["tasks"] == [task.id]
    assert woken == [1]


def test_comment_delivery_is_queued(service):
    url, store, _ = service
    r = post(url, *payloads.comment_delivery("/kugetsu start fix it"))
    assert r.status_code == 202
    assert store.list_tasks()[0].prompt == "fix it"


def test_missing_signature_is_401_and_writes_nothing(service):
    url, store, _ = service
    body, headers = payloads.label_delivery(["kugetsu"])
    headers = {k: v for k, v in headers.items() if "Signature" not in k}
    r = post(url, body, headers)
    assert r.status_code == 401
    assert store.list_tasks() == []


def test_wrong_signature_is_401(service):
    url, store, _ = service
    body, headers = payloads.label_delivery(["kugetsu"])
    body = body.replace(b"Fix the widget", b"Fix the widgeT")
    assert post(url, body, headers).status_code == 401
    assert store.list_tasks() == []


def test_malformed_json_is_400(service):
    url, _, _ = service
    body = b"{not json"
    assert post(url, body, payloads.sign(body, event="issues")).status_code == 400


def test_missing_fields_are_400(service):
    url, _, _ = service
    body = json.dumps({"action": "label_updated"}).encode()
    r = post(url, body, payloads.sign(body, event="issues", event_type="issue_label"))
    assert r.status_code == 400
    assert "missing field" in r.json()["reason"]


def test_oversized_body_is_413(service):
    url, store, _ = service
    data = payloads.issue_payload("label_updated", labels=["kugetsu"], body="x" * 70000)
    body = payloads.encode(data)
    r = post(url, body, payloads.sign(body, event="issues", event_type="issue_label"))
    assert r.status_code == 413
    assert store.list_tasks() == []


def test_oversized_chunked_body_is_413(service):
    url, store, _ = service
    data = payloads.issue_payload("label_updated", labels=["kugetsu"], body="x" * 70000)
    body = payloads.encode(data)
    headers = payloads.sign(body, event="issues", event_type="issue_label")
    r = requests.post(
        url + "/webhook", data=iter([body[:1000], body[1000:]]), headers=headers, timeout=10
    )
    assert r.status_code == 413
    assert store.list_tasks() == []


def test_wrong_content_type_is_415(service):
    url, _, _ = service
    body, headers = payloads.label_delivery(["kugetsu"])
    headers["Content-Type"] = "text/plain"
    assert post(url, body, headers).status_code == 415


def test_form_content_type_is_accepted(service):
    url, store, _ = service
    json_body, headers = payloads.label_delivery(["kugetsu"])
    form = "payload=" + urllib.parse.quote(json_body.decode())
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    assert post(url, form.encode(), headers).status_code == 202
    assert len(store.list_tasks()) == 1


def test_event_not_for_us_is_2xx_with_reason(service):
    url, _, _ = service
    body = json.dumps({"ref": "refs/heads/main"}).encode()
    r = post(url, body, payloads.sign(body, event="push"))
    assert r.status_code == 200
    assert r.json()["status"] == "ignored" and "push" in r.json()["reason"]


def test_repeated_delivery_is_acknowledged_and_ignored(service):
    url, store, _ = service
    body, headers = payloads.comment_delivery("/kugetsu start")
    assert post(url, body, headers).status_code == 202
    r = post(url, body, headers)
    assert r.status_code == 200 and r.json()["status"] == "duplicate"
    assert len(store.list_tasks()) == 1


def test_answers_carry_the_handler_time(service):
    url, _, _ = service
    for body, headers in (
        payloads.label_delivery(["kugetsu"]),
        payloads.comment_delivery("Thanks!"),
        (b"{not json", payloads.label_delivery(["kugetsu"])[1]),
    ):
        r = post(url, body, headers)
        name, _, duration = r.headers["Server-Timing"].partition(";dur=")
        assert name == "handler" and 0 < float(duration) < 10_000, r.headers


def test_only_deliveries_that_queue_work_are_logged_at_info(service, caplog):
    url, _, _ = service
    caplog.set_level(logging.INFO, logger="bot.app")
    assert post(url, *payloads.comment_delivery("Thanks!")).status_code == 200
    queued = post(url, *payloads.label_delivery(["kugetsu"]))
    assert queued.status_code == 202
    handled = [r for r in caplog.records if r.getMessage() == "webhook handled"]
    assert [r.tasks for r in handled] == [queued.json()["tasks"]]
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="bot.app")
    assert post(url, *payloads.comment_delivery("Looks good")).status_code == 200
    assert [r.reason for r in caplog.records if r.getMessage() == "webhook handled"] == [
        "no command in comment"
    ]


def test_healthz(service):
    url, _, _ = service
    r = requests.get(url + "/healthz", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_healthz_reports_an_unhealthy_scheduler(tmp_path):
    config = Config(gitea=GiteaConfig(webhook_secret="s"))
    store = open_store(tmp_path / "db")
    app = create_app(
        config, store, rules=lambda: RULES, health=lambda: (False, {"scheduler": "stopped"})
    )
    r = app.test_client().get("/healthz")
    assert r.status_code == 503 and r.json["scheduler"] == "stopped"


def test_unsigned_deliveries_accepted_only_when_configured_insecure(tmp_path):
    config = Config(gitea=GiteaConfig(webhook_secret="", insecure_no_signature=True))
    store = open_store(tmp_path / "db")
    app = create_app(config, store, rules=lambda: RULES)
    body, headers = payloads.label_delivery(["kugetsu"])
    headers = {k: v for k, v in headers.items() if "Signature" not in k}
    r = app.test_client().post("/webhook", data=body, headers=headers)
    assert r.status_code == 202


@pytest.mark.parametrize(
    "header, value",
    [
        ("X-Gitea-Signature", "\u00e9" * 64),
        ("X-Hub-Signature-256", "sha256=\u00e9"),
    ],
)
def test_non_ascii_signature_is_401_not_a_crash(service, header, value):
    url, store, _ = service
    body, headers = payloads.label_delivery(["kugetsu"])
    headers = {k: v for k, v in headers.items() if "Signature" not in k}
    headers[header] = value
    r = requests.post(
        url + "/webhook",
        data=body,
        timeout=10,
        headers={k: v.encode("latin-1") for k, v in headers.items()},
    )
    assert r.status_code == 401 and r.json()["reason"] == "signature does not match"
    assert store.list_tasks() == []


def test_a_non_ascii_log_token_is_refused_not_a_crash(service):
    url, _, _ = service
    assert requests.get(url + "/logs/1/%C3%A9", timeout=5).status_code == 404


def test_deeply_nested_json_is_400(service):
    url, store, _ = service
    body = b"[" * 5000 + b"]" * 5000
    r = post(url, body, payloads.sign(body, event="issues"))
    assert r.status_code == 400 and "nested too deeply" in r.json()["reason"]
    assert store.list_tasks() == []


@pytest.mark.parametrize("form", [b"action=created", b"payload=\xff\xfe"])
def test_form_without_its_json_is_401_before_anything_else(service, form):
    url, store, _ = service
    _, headers = payloads.comment_delivery("/kugetsu start")
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    r = post(url, form, headers)
    assert r.status_code == 401 and r.json()["reason"].startswith("cannot check the signature")
    assert store.list_tasks() == []


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d["repository"].update(full_name="widget"), "repository.full_name"),
        (lambda d: d["issue"].update(number=-9223372036854775808), "issue.number"),
        (lambda d: d["issue"].update(number=2**64), "issue.number"),
        (lambda d: d["comment"].update(id=2**63), "comment.id"),
        (lambda d: d["sender"].update(login="../alice"), "sender.login"),
    ],
)
def test_values_out_of_range_are_400_with_a_reason_and_write_nothing(service, mutate, reason):
    url, store, woken = service
    data = payloads.comment_payload("/kugetsu start --max-tokens 5")
    mutate(data)
    body = payloads.encode(data)
    r = post(url, body, payloads.sign(body, event="issue_comment"))
    assert r.status_code == 400 and reason in r.json()["reason"]
    assert store.list_tasks() == [] and woken == []


def test_a_budget_out_of_range_is_refused_with_a_reply_not_a_500(service):
    url, store, _ = service
    r = post(url, *payloads.comment_delivery("/kugetsu start --max-tokens 99999999999999999999"))
    assert r.status_code == 202
    assert store.list_tasks() == []
    [reply] = [item for item in store.outbox_due(10) if item.kind == "comment"]
    assert "--max-tokens must be greater than 0 and at most 1,000,000,000,000" in reply.body


@pytest.mark.both_modes
def test_a_worker_only_node_takes_no_deliveries(tmp_path):
    from bot.app import create_app
    from bot.store import open_store
    from tests import payloads
    from tests.conftest import SECRET, make_config

    config = make_config(tmp_path / "data", "http://gitea.invalid")
    assert config.gitea.webhook_secret == SECRET
    store = open_store(config.storage.database)
    try:
        app = create_app(config, store, rules=lambda: None, receive=False)  # type: ignore[arg-type]
        body, headers = payloads.label_delivery(["kugetsu"], 3)
        r = app.test_client().post("/webhook", data=body, headers=headers)
        assert r.status_code == 404 and "worker only" in r.get_json()["reason"]
        assert store.list_tasks() == []
        assert app.test_client().get("/healthz").status_code == 200
    finally:
        store.close()
