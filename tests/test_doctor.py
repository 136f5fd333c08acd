"""`kugetsu doctor` and `kugetsu webhook` against the fake Gitea, in process; the checks
`serve` runs at start and again later.

The fake keeps hooks as Gitea 1.26 does (tests/fakegitea.py): inactive unless told, the
secret never shown, url and content_type required.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest

from bot.cli import main
from bot.config import load
from bot.core import hooks
from bot.core.health import Readiness
from bot.doctor import CHECKS, ServeChecks
from bot.store import open_store
from tests.conftest import FAKE_AGENT, REPO, SANDBOX, SECRET, SERVICE_UID, TOKEN, first_uid
from tests.service import free_port, write_config

pytestmark = pytest.mark.both_modes

PUBLIC = "http://kugetsu.test:8080"
HOOK_URL = PUBLIC + "/webhook"


def write(tmp_path: Path, fake, **sections) -> str:
    """A config for the fake Gitea; each keyword replaces keys of one section."""
    tables = {
        "server": {"public_url": PUBLIC},
        "gitea": {"url": fake.url, "token": TOKEN, "webhook_secret": SECRET, "repos": [REPO]},
        "storage": {"data_dir": str(tmp_path / "data")},
        "agents": {"default": "fake"},
        "agents.fake": {"command": [sys.executable, str(FAKE_AGENT), "{prompt}"]},
    }
    for name, values in sections.items():
        tables.setdefault(name.replace("__", "."), {}).update(values)
    return str(write_config(tmp_path / "kugetsu.toml", tables))


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def doctor(capsys, config: str, *extra: str) -> tuple[int, dict]:
    code, out, _ = cli(capsys, "doctor", "--json", "--config", config, *extra)
    return code, json.loads(out)


def failing(report: dict) -> list[str]:
    return [c["name"] for c in report["checks"] if not c["ok"]]


def check(report: dict, name: str) -> dict:
    [found] = [c for c in report["checks"] if c["name"] == name]
    return found


def install(capsys, config: str, *args: str) -> tuple[int, str, str]:
    return cli(capsys, "webhook", "install", *args, "--config", config)


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory kugetsu's user cannot create files in, root or not."""
    if os.geteuid() != 0:
        path = tmp_path / "read-only"
        path.mkdir()
        path.chmod(0o500)
        return path
    # root writes wherever a mode would stop others; sysfs refuses new files to root too
    path = Path("/sys/kernel")
    try:
        fd, name = tempfile.mkstemp(dir=path)
    except OSError:
        return path
    os.close(fd)
    os.unlink(name)
    pytest.skip("no directory here that root cannot write")


# ------------------------------------------------------------------------- doctor


def test_doctor_passes_on_a_good_setup_in_order(gitea, tmp_path, capsys):
    config = write(tmp_path, gitea)
    assert install(capsys, config)[0] == 0
    code, report = doctor(capsys, config)
    assert code == 0 and report["ok"] is True, report
    assert [c["name"] for c in report["checks"]] == [
        "config",
        "data_dir",
        "database",
        "gitea",
        "token",
        f"repo {REPO}",
        f"webhook {REPO}",
        "agent fake",
        "sandbox",
    ]
    # exactly the documented shape
    assert set(report) == {"ok", "checks"}
    assert all(set(c) == {"name", "ok", "detail"} for c in report["checks"])
    assert "Gitea 1.26" in check(report, "gitea")["detail"]
    assert "user kugetsu-bot" in check(report, "token")["detail"]
    assert "write:issue cannot be seen without writing" in check(report, "token")["detail"]
    assert check(report, f"repo {REPO}")["detail"].startswith("admin")
    assert HOOK_URL in check(report, f"webhook {REPO}")["detail"]
    # what the suite's mode gives (KUGETSU_TEST_SANDBOX): off, or on and to be had as root
    assert check(report, "sandbox")["detail"].startswith(
        'off (sandbox.mode = "none")'
        if SANDBOX == "none"
        else f"can be had as uid 0 runs it: agents would run as uids {first_uid()}-"
        f"{first_uid() + 2}, kugetsu as {SERVICE_UID}"
    )
    # the human form: every check on a line of its own, and the verdict
    code, out, _ = cli(capsys, "doctor", "--config", config)
    assert code == 0 and out.rstrip().endswith("all checks passed")
    assert out.count("\nok   ") == len(report["checks"]) - 1


def test_doctor_fails_with_the_right_check_for_each_broken_part(gitea, tmp_path, capsys):
    good = write(tmp_path, gitea)
    assert install(capsys, good)[0] == 0
    # what is broken: (the config's change, the checks that fail, what the first one says)
    cases = {
        "a missing hook": ({}, [f"webhook {REPO}"], "no webhook delivers to " + HOOK_URL),
        "a wrong token": (
            {"gitea": {"token": "not-the-token"}},
            ["token", f"repo {REPO}"],
            "Gitea rejects it (HTTP 401)",
        ),
        "a missing agent binary": (
            {"agents__fake": {"command": [str(tmp_path / "no-such-agent"), "{prompt}"]}},
            ["agent fake"],
            "the default agent cannot start",
        ),
        "an unreachable Gitea": (
            {"gitea": {"url": f"http://127.0.0.1:{free_port()}"}},
            ["gitea", "token", f"repo {REPO}"],
            "is not reachable",
        ),
        "an unwritable data dir": (
            {"storage": {"data_dir": str(unwritable_dir(tmp_path))}},
            ["data_dir"],
            "cannot be written",
        ),
    }
    for what, (change, expected, says) in cases.items():
        if what == "a missing hook":
            gitea.hooks.clear()
        config = write(tmp_path, gitea, **change)
        code, report = doctor(capsys, config)
        assert (code, report["ok"], failing(report)) == (1, False, expected), what
        first = check(report, expected[0])
        assert says in first["detail"] and " Fix: " in first["detail"], what
        if what == "a missing hook":
            assert install(capsys, good)[0] == 0
    # and the human form prints each problem with its fix under it
    config = write(tmp_path, gitea, gitea={"token": "not-the-token"})
    code, out, _ = cli(capsys, "doctor", "--config", config)
    lines = out.splitlines()
    token = next(i for i, line in enumerate(lines) if line.startswith("FAIL token"))
    assert "HTTP 401" in lines[token] and lines[token + 1].strip().startswith("fix: create")


def test_each_problem_names_its_fix(gitea, tmp_path, capsys):
    gitea.token_scopes = {"read:user", "read:repository", "read:issue"}  # no write scopes
    config = write(tmp_path, gitea)
    gitea.token_scopes = None
    assert install(capsys, config)[0] == 0
    gitea.token_scopes = {"read:user", "read:repository", "read:issue"}
    code, report = doctor(capsys, config)
    # the push handshake tells the missing write:repository
    assert failing(report) == [f"repo {REPO}"]
    detail = check(report, f"repo {REPO}")["detail"]
    assert "lacks write:repository" in detail and "Fix: give the token write:repository" in detail
    gitea.token_scopes = {"write:repository", "write:issue"}  # no read:user
    code, report = doctor(capsys, config)
    assert failing(report)[0] == "token" and "read:user" in check(report, "token")["detail"]


def test_a_bot_without_admin_is_told_what_it_loses(gitea, tmp_path, capsys):
    config = write(tmp_path, gitea)
    assert install(capsys, config)[0] == 0
    gitea.set_permission(REPO, "kugetsu-bot", "write")
    code, report = doctor(capsys, config)
    repo = check(report, f"repo {REPO}")
    assert repo["ok"] and repo["detail"].startswith("write: may push; without admin")
    assert "cannot read other users' permissions" in repo["detail"]
    # its webhook cannot be read: what arrived tells instead, and nothing has
    webhook = check(report, f"webhook {REPO}")
    assert not webhook["ok"] and "no delivery from it has arrived" in webhook["detail"]
    store = open_store(tmp_path / "data" / "kugetsu.db")
    with store.tx() as c:
        store.seen_delivery(c, "d-1", "issue_comment", REPO)
    store.close()
    code, report = doctor(capsys, config)
    assert code == 0 and "deliveries from it arrive" in check(report, f"webhook {REPO}")["detail"]


def test_a_hook_that_differs_is_named_and_repositories_come_from_the_database(
    gitea, tmp_path, capsys
):
    config = write(tmp_path, gitea, gitea={"repos": []})
    code, report = doctor(capsys, config)
    assert (
        failing(report) == ["repositories"]
        and "gitea.repos" in check(report, "repositories")["detail"]
    )
    # a task in the database makes its repository one kugetsu serves
    store = open_store(tmp_path / "data" / "kugetsu.db")
    with store.tx() as c:
        store.insert_task(
            c,
            repo=REPO,
            issue=1,
            kind="start",
            prompt="",
            agent="fake",
            requested_by="cli",
            max_attempts=1,
        )
    store.close()
    gitea.hooks.clear()
    gitea.create_org("acme")
    # as an operator might have made it by hand: no "active", so inactive
    hook = gitea_post(
        gitea,
        f"/repos/{REPO}/hooks",
        {
            "type": "gitea",
            "events": ["issues"],
            "config": {"url": HOOK_URL, "content_type": "form"},
        },
    )
    code, report = doctor(capsys, config)
    detail = check(report, f"webhook {REPO}")["detail"]
    assert failing(report) == [f"webhook {REPO}"]
    assert f"hook {hook['id']} differs" in detail
    assert "content type is form" in detail and "not active" in detail
    assert "events missing: pull_request_comment, pull_request_review" in detail


def gitea_post(gitea, path: str, body: dict) -> dict:
    import requests

    r = requests.post(
        gitea.api_url + path, json=body, headers={"Authorization": f"token {TOKEN}"}, timeout=5
    )
    assert r.status_code == 201, r.text
    return r.json()


def test_a_config_that_cannot_be_read_is_the_first_check(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[gitea]\nretries = -1\n")
    code, report = doctor(capsys, str(bad))
    assert code == 1 and report["ok"] is False
    assert [c["name"] for c in report["checks"]] == ["config"]
    assert "gitea.retries must be at least 0" in report["checks"][0]["detail"]


def test_the_registry_is_in_the_documented_order():
    assert [c.name for c in CHECKS] == [
        "config",
        "data_dir",
        "database",
        "gitea",
        "token",
        "repositories",
        "agents",
        "sandbox",
    ]


# ------------------------------------------------------------------------- webhook


def test_webhook_install_twice_leaves_one_correct_hook(gitea, tmp_path, capsys):
    config = write(tmp_path, gitea)
    code, out, err = install(capsys, config, REPO)
    assert code == 0 and f"{REPO}: created hook" in out, err
    code, out, _ = install(capsys, config, REPO)
    assert code == 0 and "was right; its secret was set again" in out
    [hook] = gitea.hooks_of(REPO)
    assert hook["url"] == HOOK_URL and hook["content_type"] == "json"
    assert hook["active"] is True and hook["secret"] == SECRET and hook["type"] == "gitea"
    assert set(hook["events"]) == set(hooks.EVENTS) and hook["name"] == "kugetsu"
    # `webhook list` agrees
    code, out, _ = cli(capsys, "webhook", "list", REPO, "--config", config)
    assert code == 0 and "[kugetsu's]" in out and "differs" not in out


def test_webhook_install_updates_a_wrong_hook_in_place(gitea, tmp_path, capsys):
    config = write(tmp_path, gitea)
    old = gitea_post(
        gitea,
        f"/repos/{REPO}/hooks",
        {"type": "gitea", "config": {"url": HOOK_URL, "content_type": "form", "secret": "x"}},
    )
    code, out, _ = cli(capsys, "webhook", "list", "--config", config)
    assert code == 1 and "differs: content type is form" in out and "not active" in out
    code, out, _ = install(capsys, config)  # the repositories of gitea.repos
    assert code == 0 and f"updated hook {old['id']}" in out
    [hook] = gitea.hooks_of(REPO)
    assert hook["id"] == old["id"] and hook["secret"] == SECRET and hook["active"] is True
    assert hook["content_type"] == "json" and set(hook["events"]) == set(hooks.EVENTS)


def test_webhook_install_on_an_organization_and_with_a_url(gitea, tmp_path, capsys):
    config = write(tmp_path, gitea)
    gitea.create_org("acme")
    code, out, _ = install(capsys, config, "--org", "acme", "--url", "http://kugetsu:8080/webhook")
    assert code == 0 and "organization acme: created" in out
    [hook] = gitea.hooks_of(org="acme")
    assert hook["url"] == "http://kugetsu:8080/webhook" and hook["active"] is True
    assert gitea.hooks_of(REPO) == []


def test_webhook_install_explains_what_it_cannot_do(gitea, tmp_path, capsys):
    config = write(tmp_path, gitea)
    gitea.set_permission(REPO, "kugetsu-bot", "write")
    code, _, err = install(capsys, config, REPO)
    assert code == 1 and "needs admin on the repository" in err and err.count("\n") == 1
    assert gitea.hooks_of(REPO) == []
    code, _, err = install(capsys, write(tmp_path, gitea, server={"public_url": ""}), REPO)
    assert code == 2 and "server.public_url" in err
    code, _, err = install(capsys, config, "not-a-repo")
    assert code == 2 and "not OWNER/REPO" in err


# ------------------------------------------------------------------- kugetsu serve


def test_serve_checks_log_every_problem_at_start_then_follow_gitea(gitea, tmp_path, caplog):
    config = load(write(tmp_path, gitea), require_secret=False)
    store = open_store(config.storage.db_path)
    checks = ServeChecks(config, store, "w1")
    with caplog.at_level(logging.INFO, logger="bot.doctor"):
        first = checks()
        # the webhook is missing: logged as an error, but it does not make kugetsu unready
        problems = [r.check for r in caplog.records if r.getMessage() == "setup problem"]
        # run as root (as CI runs), serve without the sandbox is a problem too; with it
        # (KUGETSU_TEST_SANDBOX=user), it is not
        as_root = ["sandbox"] if os.geteuid() == 0 and SANDBOX == "none" else []
        assert problems == [f"webhook {REPO}", *as_root] and first.problems == ()
        caplog.clear()
        gitea.down()
        gone = checks()
        assert [line.split(":")[0] for line in gone.problems] == ["gitea", "token"]
        assert [r.check for r in caplog.records if r.levelno == logging.ERROR] == [
            "gitea",
            "token",
        ]
        caplog.clear()
        checks()  # still away: not logged again
        assert not [r for r in caplog.records if r.name == "bot.doctor"]
        gitea.up()
        back = checks()
        assert back.problems == ()
        assert sorted(
            r.check for r in caplog.records if r.getMessage() == "setup problem gone"
        ) == [
            "gitea",
            "token",
        ]
    # what the receiver reads
    report = store.worker_report(*_registered(store, "w1"))
    assert Readiness.from_json(report[2]) == back
    store.close()


def _registered(store, worker_id: str) -> tuple[str, int]:
    import socket

    store.register_worker(worker_id, os.getpid(), None)
    return socket.gethostname(), os.getpid()


def test_an_agent_is_found_its_version_runs_and_its_pass_env_is_set(
    gitea, tmp_path, capsys, monkeypatch
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    claude = bin_dir / "claude"
    # answers --version as the real CLI does, and tells whether the preset's variables that
    # keep it from phoning home reached it
    claude.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && [ "$DISABLE_AUTOUPDATER" = 1 ] && '
        'echo "2.1.197 (Claude Code)" && exit 0\nexit 3\n'
    )
    claude.chmod(0o755)
    config = write(
        tmp_path,
        gitea,
        agents={"default": "claude"},
        agents__claude={"command": [str(claude), "{prompt}"], "pass_env": ["ANTHROPIC_API_KEY"]},
    )
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    assert install(capsys, config)[0] == 0
    code, report = doctor(capsys, config)
    agent = check(report, "agent claude")
    assert agent["ok"] and f"{claude}; version 2.1.197 (Claude Code)" in agent["detail"]
    assert "passes ANTHROPIC_API_KEY" in agent["detail"]
    monkeypatch.delenv("ANTHROPIC_API_KEY")  # named in pass_env, and not set
    code, report = doctor(capsys, config)
    agent = check(report, "agent claude")
    assert not agent["ok"] and "pass_env names variables that are not set: " in agent["detail"]
    claude.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    code, report = doctor(capsys, config)
    agent = check(report, "agent claude")
    assert not agent["ok"] and "--version failed: exit code 3: broken" in agent["detail"]
