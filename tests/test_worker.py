"""The worker against a fake Gitea, a real git remote and real agent subprocesses."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bot import process
from bot.config import AgentConfig
from bot.core.permissions import LABELLER
from bot.core.tasks import CancelResult, Kind, Outcome, State
from bot.gitea import Forbidden, GiteaClient, Locked
from bot.ingest import ingest
from bot.store import open_store
from bot.worker.auth import AuthCache
from bot.worker.runner import GITEA_WAIT_SECONDS
from bot.worker.tick import Worker
from bot.workspace import GitError, Workspace
from tests.conftest import (
    AGENT_PYTHON,
    FAKE_AGENT,
    REPO,
    TOKEN,
    agent_pids,
    enqueue,
    fake_agent,
    logged,
    make_config,
    peak_overlap,
    task_events,
    wait_for,
    write_unchecked,
)

pytestmark = pytest.mark.both_modes

BRANCH = "kugetsu/issue-{}"


class Harness:
    def __init__(self, tmp_path: Path, gitea, **config_kw):
        self.gitea = gitea
        self.config = make_config(tmp_path / "data", gitea.url, **config_kw)
        self.store = open_store(self.config.storage.database)
        self.client = GiteaClient(gitea.url, TOKEN, retries=2, backoff=0.01, timeout=5)
        storage = self.config.storage
        self.workspace = Workspace(
            mirrors_dir=storage.mirrors_dir,
            worktrees_dir=storage.worktrees_dir,
            remote_url=self.config.gitea.git_url,
            token=TOKEN,
            author_name="kugetsu",
            author_email="kugetsu@example.invalid",
            secrets=self.config.secrets(),
        )
        self.worker = self._worker(self.client)

    def _worker(self, client) -> Worker:
        worker = Worker(
            self.config,
            self.store,
            client,
            self.workspace,
            environ={"PATH": os.environ["PATH"], "KUGETSU_GITEA_TOKEN": TOKEN},
        )
        worker.start()
        return worker

    def rebuild(self, *, config=None, client=None) -> None:
        """A new worker in place of the first (before any task ran), with another config
        or another Gitea client."""
        self.worker.shutdown(timeout=5)
        self.config = config or self.config
        self.worker = self._worker(client or self.client)

    def issue(self, title="Add a greeting", body="Please add a greeting file.") -> int:
        return self.gitea.create_issue(REPO, title, body)

    def enqueue(
        self, issue: int, *, kind=Kind.START, prompt="", agent="fake", by="alice", **kw
    ) -> int:
        perm = self.gitea.permission(REPO, by)
        return enqueue(
            self.store,
            repo=REPO,
            issue=issue,
            kind=kind,
            prompt=prompt,
            agent=agent,
            requested_by=by,
            max_attempts=self.config.queue.max_attempts,
            permission_hint=perm,
            **kw,
        )

    def settle(self, *task_ids: int, timeout: float = 60.0) -> None:
        def done():
            tasks = [self.store.get(t) for t in task_ids]
            return (
                all(not t.active for t in tasks)
                and not self.store.comment_out_of_date(1)
                and not self.store.outbox_due(1)
                and not self.worker.runner_threads()
            )

        wait_for(done, timeout=timeout, tick=self.worker.run_tick, what="tasks to finish")

    def tracking_comments(self, issue: int) -> list[dict]:
        return [
            c
            for c in self.gitea.comments_on(REPO, issue)
            if "<!-- kugetsu:task=" in c["body"] and "Pushed a follow-up" not in c["body"]
        ]

    def close(self):
        self.worker.shutdown(timeout=10)
        self.store.close()


@pytest.fixture
def make(tmp_path, gitea):
    made = []

    def factory(**kw) -> Harness:
        h = Harness(tmp_path, gitea, **kw)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


# ---------------------------------------------------------------- the happy path


def test_task_becomes_a_pull_request_and_one_tracking_comment(make):
    h = make()
    n = h.issue()
    tid = h.enqueue(n, prompt="use a friendly tone")
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome, task.attempts) == (State.COMPLETED, Outcome.SUCCEEDED, 1)
    assert (
        h.gitea.file_at(REPO, BRANCH.format(n), "kugetsu_output.txt") == f"written by task {tid}\n"
    )
    [pr] = h.gitea.pulls_of(REPO).values()
    assert pr["head"]["ref"] == BRANCH.format(n) and pr["base"]["ref"] == "main"
    assert pr["title"] == "Add a greeting"
    assert f"Closes #{n}" in pr["body"]
    assert "Summary: wrote kugetsu_output.txt" in pr["body"]
    assert f"http://kugetsu.test:8080/logs/{tid}/" in pr["body"]
    assert task.pr_number == pr["number"] and task.files_changed == 1
    [comment] = h.tracking_comments(n)
    assert "✅ **Done**" in comment["body"]
    assert f"pull request #{pr['number']}" in comment["body"]
    assert "1 file changed" in comment["body"] and "took" in comment["body"]
    # the commit is kugetsu's, not the host's git identity
    author = h.gitea.git(REPO, "log", "-1", "--format=%an <%ae>", BRANCH.format(n)).strip()
    assert author == "kugetsu <kugetsu@example.invalid>"


def test_agent_gets_prompt_worktree_and_a_scrubbed_environment(make, tmp_path):
    envfile = tmp_path / "env.json"
    h = make(agents={"fake": fake_agent(FAKE_ENVFILE=str(envfile))})
    n = h.issue("Rename the widget", "The widget should be called gadget.")
    tid = h.enqueue(n, prompt="keep the old name as an alias")
    h.settle(tid)
    seen = json.loads(envfile.read_text())
    env, argv = seen["env"], seen["argv"]
    prompt = argv[-1]
    assert "Rename the widget" in prompt and "called gadget" in prompt
    assert "keep the old name as an alias" in prompt
    assert Path(seen["cwd"]) == h.config.storage.worktrees_dir / "acme" / "widget" / str(n)
    assert env["KUGETSU_TASK_ID"] == str(tid) and env["KUGETSU_REPO"] == REPO
    assert env["KUGETSU_ISSUE"] == str(n) and env["KUGETSU_BRANCH"] == BRANCH.format(n)
    assert Path(env["KUGETSU_PROMPT_FILE"]).read_text() == prompt
    assert not Path(env["KUGETSU_PROMPT_FILE"]).is_relative_to(Path(seen["cwd"]))
    assert Path(env["HOME"]).is_relative_to(h.config.storage.homes_dir)
    assert not any(TOKEN in v for v in env.values())
    assert "KUGETSU_GITEA_TOKEN" not in env


def test_queued_and_working_comments_show_progress(make):
    h = make(limit=1, agents={"fake": fake_agent(FAKE_SECONDS="2")})
    first, second = h.issue(), h.issue("Second thing")
    t1, t2 = h.enqueue(first), h.enqueue(second)
    wait_for(
        lambda: (
            len(h.tracking_comments(second)) == 1
            and h.store.get(t1).state is State.RUNNING
            and "Working" in (h.tracking_comments(first) or [{"body": ""}])[0]["body"]
        ),
        tick=h.worker.run_tick,
        what="progress comments",
    )
    [working] = h.tracking_comments(first)
    assert "agent `fake`, attempt 1 of 3, started" in working["body"]
    [queued] = h.tracking_comments(second)
    assert "position 1 in the queue, 1 of 1 agents busy" in queued["body"]
    h.settle(t1, t2)
    assert all("✅" in c["body"] for c in h.tracking_comments(first) + h.tracking_comments(second))
    assert len(h.tracking_comments(first)) == len(h.tracking_comments(second)) == 1


# ---------------------------------------------------------------- outcomes


def test_no_changes_means_no_pull_request(make):
    h = make(agents={"fake": fake_agent(FAKE_MODE="nochange")})
    n = h.issue()
    tid = h.enqueue(n)
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome) == (State.COMPLETED, Outcome.NO_CHANGES)
    assert h.gitea.pulls_of(REPO) == {}
    assert h.gitea.branch_sha(REPO, BRANCH.format(n)) is None
    [comment] = h.tracking_comments(n)
    assert "No changes" in comment["body"] and "nothing needed changing" in comment["body"]


def test_failing_agent_is_retried_then_failed_with_log_tail(make):
    h = make(attempts=2, agents={"fake": fake_agent(FAKE_MODE="fail")})
    n = h.issue()
    tid = h.enqueue(n)
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome, task.attempts) == (State.FAILED, Outcome.AGENT_FAILED, 2)
    assert "exit" in task.error and "3" in task.error
    [comment] = h.tracking_comments(n)
    assert "❌ **Failed** (`agent_failed`) after 2 attempts" in comment["body"]
    assert "something went wrong in the agent" in comment["body"]
    assert "/kugetsu retry" in comment["body"]
    events = [e["event"] for e in task_events(h.store, tid)]
    assert events.count("claimed") == 2


def test_failed_attempt_then_success(make, tmp_path):
    counter = tmp_path / "count"
    h = make(agents={"fake": fake_agent(FAKE_COUNTER=str(counter), FAKE_FAIL_TIMES="1")})
    n = h.issue()
    tid = h.enqueue(n)
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome, task.attempts) == (State.COMPLETED, Outcome.SUCCEEDED, 2)
    assert len(h.gitea.pulls_of(REPO)) == 1


def opencode_shaped(record: Path) -> AgentConfig:
    """An agent that streams opencode's usage events, writes a file, and records each run."""
    return AgentConfig(
        name="oc",
        preset="opencode",
        command=(AGENT_PYTHON, str(FAKE_AGENT), "{prompt}"),
        resume_command=(AGENT_PYTHON, str(FAKE_AGENT), "--session", "{session_id}", "{prompt}"),
        env={
            "FAKE_MODE": "opencode",
            "FAKE_STEPS": "3",
            "FAKE_SECONDS": "0",
            "FAKE_FILE": "kugetsu_output.txt",
            "FAKE_RECORD": str(record),
        },
    )


def agent_runs(record: Path) -> int:
    return record.read_text().count("start ") if record.exists() else 0


def assert_published_once(h, n: int, tid: int, record: Path, *, attempts: int) -> int:
    """One PR, the task and the issue know its number, and the one agent run's summary and
    usage are in the PR and the tracking comment. Returns the PR's number."""
    task = h.store.get(tid)
    [pr] = h.gitea.pulls_of(REPO).values()
    assert (task.state, task.outcome, task.attempts, task.pr_number) == (
        State.COMPLETED,
        Outcome.SUCCEEDED,
        attempts,
        pr["number"],
    ), task.error
    assert task.publish_sha is None
    assert h.store.issue_for_pr(None, REPO, pr["number"]) == n
    assert agent_runs(record) == 1
    [comment] = h.tracking_comments(n)
    assert f"✅ **Done**: pull request #{pr['number']}" in comment["body"]
    for body in (pr["body"], comment["body"]):
        assert "Did the opencode-shaped thing." in body
        assert "12,000 tokens in, 3,000 out" in body
    return pr["number"]


@pytest.mark.parametrize("answer", [504, "drop"])
def test_a_pull_request_whose_answer_was_lost_is_found_not_forgotten(make, tmp_path, answer):
    # Gitea opens the PR, and a proxy's 504 (or a dropped connection) loses the answer
    record = tmp_path / "record"
    h = make(default="oc", agents={"oc": opencode_shaped(record)})
    n = h.issue()
    h.gitea.lose_answer("POST", r"/repos/acme/widget/pulls", answer)
    tid = h.enqueue(n, agent="oc")
    h.settle(tid)
    number = assert_published_once(h, n, tid, record, attempts=1)
    # found by the attempt that made it: no retry was needed
    assert [e["event"] for e in task_events(h.store, tid)].count("claimed") == 1
    # `continue` on that pull request finds its issue and lands on the same PR
    posted, result = deliver_comment(
        h, "/kugetsu continue --agent oc add a test", number, is_pull=True
    )
    [follow] = result.task_ids
    h.settle(follow)
    task = h.store.get(follow)
    assert (task.issue, task.outcome, task.pr_number) == (n, Outcome.SUCCEEDED, number)
    assert list(h.gitea.pulls_of(REPO)) == [number]
    assert any(
        "Pushed a follow-up requested by @alice" in c["body"]
        for c in h.gitea.comments_on(REPO, number)
    )


class FailFirstPush:
    """The real workspace, except that the first push fails."""

    def __init__(self, workspace):
        self.workspace, self.failed = workspace, False

    def __getattr__(self, name):
        return getattr(self.workspace, name)

    def push(self, path, branch):
        if not self.failed:
            self.failed = True
            raise GitError("git push failed: the remote end hung up", step="push")
        return self.workspace.push(path, branch)


PULLS = r"/repos/acme/widget/pulls"
LOOKUP = r"/repos/acme/widget/pulls/main/.*"


def _gitea_500s_on_create(h):
    h.gitea.fail_next(3, 500, "POST", PULLS)  # the first try and both retries


def _answer_lost_and_the_lookup_fails(h):
    h.gitea.lose_answer("POST", PULLS, "drop")
    h.gitea.fail_next(3, 503, "GET", LOOKUP)


def _create_refused(h):
    h.gitea.fail_next(1, 403, "POST", PULLS)


def _push_fails(h):
    h.worker.runner.workspace = FailFirstPush(h.workspace)


@pytest.mark.parametrize(
    "trouble, attempts",
    [
        # Gitea away (5xx, no answer): the task waits for it, no attempt used
        (_gitea_500s_on_create, 1),
        (_answer_lost_and_the_lookup_fails, 1),
        # a refusal or a failed push counts an attempt; the retry still only publishes
        (_create_refused, 2),
        (_push_fails, 2),
    ],
)
def test_a_retry_after_a_publishing_failure_publishes_without_running_the_agent(
    make, tmp_path, trouble, attempts
):
    record = tmp_path / "record"
    h = make(default="oc", agents={"oc": opencode_shaped(record)})
    # waiting for Gitea puts the next attempt GITEA_WAIT_SECONDS ahead: the queue's clock
    # runs that much ahead, so the test need not wait for it
    h.store.clock = lambda: time.time() + GITEA_WAIT_SECONDS + 1
    n = h.issue()
    trouble(h)
    tid = h.enqueue(n, agent="oc")
    h.settle(tid)
    events = [e["event"] for e in task_events(h.store, tid)]
    assert events.count("claimed") == 2, events  # one failed publish, then one more try
    assert_published_once(h, n, tid, record, attempts=attempts)
    assert (
        h.gitea.file_at(REPO, BRANCH.format(n), "kugetsu_output.txt") == f"written by task {tid}\n"
    )


def test_committed_work_that_is_gone_is_done_again(make, tmp_path):
    # the worktree was lost before its push: there is nothing to publish, so the agent runs
    record = tmp_path / "record"
    h = make(default="oc", agents={"oc": opencode_shaped(record)})
    n = h.issue()
    tid = h.enqueue(n, agent="oc")
    h.store.update(tid, publish_sha="0" * 40)  # a commit no worktree holds
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome, task.attempts) == (State.COMPLETED, Outcome.SUCCEEDED, 1)
    assert agent_runs(record) == 1 and len(h.gitea.pulls_of(REPO)) == 1


class LockedIssue:
    """The real client, except that one issue is locked (Gitea answers 423 to comments)."""

    def __init__(self, client, number):
        self.client, self.number, self.refused = client, number, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def create_comment(self, owner, repo, number, body):
        if number == self.number:
            self.refused += 1
            raise Locked("Gitea POST /comments failed (HTTP 423): issue is locked", status=423)
        return self.client.create_comment(owner, repo, number, body)


def test_a_refused_comment_does_not_hold_up_the_others(make):
    h = make()
    locked, fine = h.issue("Locked"), h.issue("Fine")
    gitea = LockedIssue(h.client, locked)
    h.rebuild(client=gitea)
    t1, t2 = h.enqueue(locked), h.enqueue(fine)
    h.settle(t1, t2)
    assert h.store.get(t1).outcome is h.store.get(t2).outcome is Outcome.SUCCEEDED
    assert gitea.refused >= 1 and h.tracking_comments(locked) == []
    assert "✅" in h.tracking_comments(fine)[0]["body"]
    assert not h.store.comment_out_of_date(10)


def test_status_reply_is_not_mistaken_for_a_tracking_comment(make):
    h = make()
    n = h.issue()
    tid = h.enqueue(n)
    h.settle(tid)
    deliver_comment(h, "/kugetsu status", n)
    h.settle(tid)
    [text] = replies(h, n)
    assert f"| {tid} |" in text and "completed" in text
    assert "kugetsu:task=" not in text
    # the tracking comment is still the task's one comment with its marker, unchanged
    [tracking] = h.tracking_comments(n)
    assert "✅" in tracking["body"] and tracking["body"] != text


def test_timeout_kills_the_whole_process_group(make, tmp_path):
    pidfile = tmp_path / "pids"
    h = make(
        attempts=1,
        timeout_minutes=0.03,
        agents={"fake": fake_agent(FAKE_MODE="hang", FAKE_PIDFILE=str(pidfile))},
    )
    n = h.issue()
    tid = h.enqueue(n)
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome) == (State.FAILED, Outcome.TIMED_OUT)
    leader, grandchild = agent_pids(pidfile)
    assert not leader.alive() and not grandchild.alive()
    assert "timed_out" in h.tracking_comments(n)[0]["body"]


def test_stop_kills_the_whole_process_group(make, tmp_path):
    pidfile = tmp_path / "pids"
    h = make(agents={"fake": fake_agent(FAKE_MODE="hang", FAKE_PIDFILE=str(pidfile))})
    n = h.issue()
    tid = h.enqueue(n)
    wait_for(pidfile.exists, tick=h.worker.run_tick, what="agent to start")
    assert h.store.request_cancel(tid, "bob") is CancelResult.STOPPING
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome, task.attempts) == (State.CANCELLED, Outcome.CANCELLED, 1)
    leader, grandchild = agent_pids(pidfile)
    assert not leader.alive() and not grandchild.alive()
    assert "🛑 **Stopped** by @bob" in h.tracking_comments(n)[0]["body"]


def test_unauthorized_requester_is_refused_with_a_reason(make):
    h = make()
    n = h.issue()
    tid = h.enqueue(n, by="mallory")
    h.settle(tid)
    task = h.store.get(tid)
    assert task.state is State.REJECTED and task.attempts == 0
    [comment] = h.tracking_comments(n)
    assert "Not started" in comment["body"]
    assert "@mallory needs write access to acme/widget" in comment["body"]
    assert not (h.config.storage.worktrees_dir / "acme").exists()


def deliver_label(h, number, sender, author):
    """The label delivery Gitea sends: repository.permissions is the issue author's."""
    from bot.core import events, intake
    from tests import payloads

    body, headers = payloads.label_delivery(
        ["kugetsu"],
        number,
        sender=sender,
        author=author,
        permission=h.gitea.permission(REPO, author),
    )
    delivery = events.delivery_of(headers, body)
    rules = intake.Rules(
        label="kugetsu",
        command="/kugetsu",
        bot_login="kugetsu-bot",
        known_agents=frozenset(h.config.agents.tables),
        default_agent="fake",
        max_attempts=h.config.queue.max_attempts,
    )
    return ingest(h.store, delivery, events.parse(delivery, events.load_json(body)), rules)


def not_admin(h):
    """kugetsu with write access only: Gitea answers 403 when it asks for a permission."""
    h.gitea.set_permission(REPO, "kugetsu-bot", "write")
    h.gitea.set_permission(REPO, "adam", "admin")
    h.gitea.set_permission(REPO, "rita", "read")


def test_an_admin_labelling_a_readers_issue_starts_work_when_kugetsu_is_not_admin(make):
    h = make()
    not_admin(h)
    n = h.gitea.create_issue(REPO, "Add a greeting", "Please add one.", login="rita")
    h.gitea.add_labels(REPO, n, "kugetsu")
    [tid] = deliver_label(h, n, sender="adam", author="rita").task_ids
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome) == (State.COMPLETED, Outcome.SUCCEEDED)
    assert len(h.gitea.pulls_of(REPO)) == 1


def test_a_readers_comment_is_refused_when_kugetsu_is_not_admin(make):
    h = make()
    not_admin(h)
    n = h.issue()
    _, result = deliver_comment(h, "/kugetsu start", n, sender="rita")
    [tid] = result.task_ids
    h.settle(tid)
    assert h.store.get(tid).state is State.REJECTED
    assert "@rita needs write access to acme/widget" in h.tracking_comments(n)[0]["body"]
    assert h.gitea.pulls_of(REPO) == {}


class _NotAdmin:
    def get_permission(self, owner, repo, login):
        raise Forbidden("user does not have admin permission", status=403)


@pytest.mark.parametrize(
    "need, hint, verdict",
    [
        ("write", LABELLER, (True, "write")),
        ("read", LABELLER, (True, "write")),
        ("admin", LABELLER, False),  # a label shows write at least, not admin
        ("admin", "admin", (True, "admin")),  # a comment shows the commenter's own
        ("write", "read", False),
        ("write", None, False),
    ],
)
def test_without_admin_a_request_is_judged_by_what_it_shows(tmp_path, need, hint, verdict):
    config = make_config(tmp_path, "http://gitea.invalid")
    config = dataclasses.replace(
        config, triggers=dataclasses.replace(config.triggers, min_permission=need)
    )
    result = AuthCache(config, _NotAdmin(), time.time).check(REPO, "adam", hint)
    if verdict is False:
        assert result[0] is False
        if hint == LABELLER:
            assert "needs admin access to the repository" in result[1]
    else:
        assert result == verdict


def test_allowed_users_list_is_enforced(make, tmp_path):
    h = make()
    h.rebuild(config=replace(h.config, triggers=replace(h.config.triggers, allowed_users=("bob",))))
    n = h.issue()
    tid = h.enqueue(n, by="alice")
    h.settle(tid)
    assert h.store.get(tid).state is State.REJECTED
    assert "not on kugetsu's list of allowed users" in h.tracking_comments(n)[0]["body"]


def test_continue_lands_on_the_same_pull_request(make):
    h = make()
    n = h.issue()
    first = h.enqueue(n)
    h.settle(first)
    [pr] = h.gitea.pulls_of(REPO).values()
    sha1 = h.gitea.branch_sha(REPO, BRANCH.format(n))
    second = h.enqueue(n, kind=Kind.CONTINUE, prompt="add a test too", by="bob")
    h.settle(second)
    task = h.store.get(second)
    assert (task.state, task.outcome, task.pr_number) == (
        State.COMPLETED,
        Outcome.SUCCEEDED,
        pr["number"],
    )
    assert list(h.gitea.pulls_of(REPO)) == [pr["number"]]
    sha2 = h.gitea.branch_sha(REPO, BRANCH.format(n))
    assert sha2 != sha1
    assert h.gitea.git(REPO, "rev-parse", f"{sha2}~1").strip() == sha1
    assert (
        h.gitea.file_at(REPO, BRANCH.format(n), "kugetsu_output.txt")
        == f"written by task {first}\nwritten by task {second}\n"
    )
    pr_comments = h.gitea.comments_on(REPO, pr["number"])
    assert any("Pushed a follow-up requested by @bob" in c["body"] for c in pr_comments)
    assert len(h.tracking_comments(n)) == 2


def test_rate_limited_agent_falls_back_without_using_an_attempt(make):
    h = make(
        default="first",
        fallback=("second",),
        agents={
            "first": fake_agent("first", FAKE_MODE="ratelimit"),
            "second": fake_agent("second"),
        },
    )
    n = h.issue()
    tid = h.enqueue(n, agent="first")
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome, task.attempts) == (State.COMPLETED, Outcome.SUCCEEDED, 1)
    assert task.agents_tried == ("first", "second")
    assert len(h.gitea.pulls_of(REPO)) == 1


def test_budget_exceeded_stops_the_agent(make):
    agent = AgentConfig(
        name="oc",
        preset="opencode",
        command=(AGENT_PYTHON, str(FAKE_AGENT), "{prompt}"),
        env={"FAKE_MODE": "opencode", "FAKE_STEPS": "20", "FAKE_SECONDS": "0.3"},
    )
    h = make(default="oc", agents={"oc": agent})
    n = h.issue()
    tid = h.enqueue(n, agent="oc", max_tokens=12000)
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome, task.attempts) == (State.FAILED, Outcome.AGENT_FAILED, 1)
    assert "budget exceeded" in task.error
    assert task.usage["input_tokens"] + task.usage["output_tokens"] < 20 * 5000
    assert task.session_id == "ses_fake123"


def test_flooding_agent_leaves_a_capped_log(make):
    h = make(agents={"fake": fake_agent(FAKE_MODE="flood")}, log_max_bytes=64 * 1024)
    n = h.issue()
    tid = h.enqueue(n)
    h.settle(tid)
    assert h.store.get(tid).outcome is Outcome.SUCCEEDED
    log = (h.config.storage.logs_dir / f"{tid}.log").read_bytes()
    assert len(log) < 64 * 1024 + 4096
    assert b"bytes of output omitted" in log and b"Summary: wrote" in log


# ---------------------------------------------------------------- limits and recovery


def test_concurrency_limit_holds_and_is_used(make, tmp_path):
    record = tmp_path / "record"
    h = make(limit=3, agents={"fake": fake_agent(FAKE_SECONDS="1.0", FAKE_RECORD=str(record))})
    ids = [h.enqueue(h.issue(f"Task {i}")) for i in range(10)]
    h.settle(*ids, timeout=120)
    assert all(h.store.get(t).outcome is Outcome.SUCCEEDED for t in ids)
    count, peak = peak_overlap(record)
    assert count == 20
    assert peak == 3


def test_restart_recovers_a_task_whose_process_died_and_kills_its_orphan(make, tmp_path):
    h = make()
    n = h.issue()
    tid = h.enqueue(n)
    h.store.update(tid, authorized=True)
    # a previous kugetsu process that is gone, and the agent it left behind
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    h.store.register_worker("old-worker", dead.pid, "0@gone")
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    [claimed] = h.store.claim(3, "old-worker")
    h.store.update(claimed.id, pid=orphan.pid, pid_start=process.process_start_token(orphan.pid))
    recovered = h.worker.recover()
    assert recovered == [tid]
    orphan.wait(timeout=10)
    task = h.store.get(tid)
    assert (task.state, task.attempts) == (State.PENDING, 1)
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome, task.attempts) == (State.COMPLETED, Outcome.SUCCEEDED, 2)
    assert len(h.gitea.pulls_of(REPO)) == 1


def test_recovery_waits_the_configured_backoff_like_any_failed_attempt(make):
    # the retry policy is decided once: an attempt ended by a crash waits as any other
    h = make()
    h.rebuild(
        config=replace(h.config, queue=replace(h.config.queue, retry_backoff_seconds=(100.0,)))
    )
    tid = h.enqueue(h.issue())
    h.store.update(tid, authorized=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    h.store.register_worker("old-worker", dead.pid, "0@gone")
    h.store.claim(3, "old-worker")
    before = time.time()
    assert h.worker.recover() == [tid]
    task = h.store.get(tid)
    assert (task.state, task.attempts, task.outcome) == (State.PENDING, 1, Outcome.INFRA_ERROR)
    assert before + 100.0 <= task.not_before <= time.time() + 100.0
    assert task.error == "kugetsu stopped while the agent was running"
    assert task_events(h.store, tid)[-1]["event"] == "recovered"


def test_a_worker_that_exited_and_is_not_yet_reaped_is_dead(make, unreaped):
    # kill -9 leaves the worker a zombie until its parent reaps it: its tasks go back now
    h = make()
    tid = h.enqueue(h.issue(), authorized=True)
    pid, token = unreaped()
    h.store.register_worker("killed", pid, token)
    h.store.claim(3, "killed")
    assert h.worker.recover() == [tid]
    task = h.store.get(tid)
    assert (task.state, task.attempts) == (State.PENDING, 1)
    assert "killed" not in {w["id"] for w in h.store.workers()}


def test_a_live_worker_keeps_its_tasks(make):
    h = make()
    n = h.issue()
    tid = h.enqueue(n)
    h.store.update(tid, authorized=True)
    h.store.register_worker("other", os.getpid(), process.process_start_token(os.getpid()))
    h.store.claim(3, "other")
    assert h.worker.recover() == []
    assert h.store.get(tid).state is State.RUNNING


# ---------------------------------------------------------------- Gitea trouble


def test_gitea_down_then_back_loses_nothing(make):
    h = make()
    n = h.issue()
    h.gitea.down()
    tid = h.enqueue(n)
    for _ in range(3):
        h.worker.run_tick()
    assert h.store.get(tid).state is State.PENDING
    h.gitea.up()
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome) == (State.COMPLETED, Outcome.SUCCEEDED)
    [comment] = h.tracking_comments(n)
    assert "✅ **Done**" in comment["body"]


def test_gitea_500s_are_retried_and_the_comment_catches_up(make):
    h = make(agents={"fake": fake_agent(FAKE_SECONDS="1")})
    n = h.issue()
    tid = h.enqueue(n)
    wait_for(lambda: h.store.get(tid).state is State.RUNNING, tick=h.worker.run_tick)
    h.gitea.fail_next(7, 500)
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome) == (State.COMPLETED, Outcome.SUCCEEDED)
    assert len(h.gitea.pulls_of(REPO)) == 1
    [comment] = h.tracking_comments(n)
    assert "✅ **Done**" in comment["body"]
    assert not h.gitea._fail_queue  # every injected 500 was answered, and the work survived


def comments_changed(h, count: int, word: str) -> tuple[list[int], list[int], list[float]]:
    """`count` finished tasks on issues of their own whose tracking comments then fall behind
    (a new summary); the publisher on a clock the test moves. Returns the task ids, their
    comment ids, and the clock."""
    issues = [h.issue(f"Issue {i}") for i in range(count)]
    tids = [h.enqueue(n) for n in issues]
    h.settle(*tids)
    for tid in tids:
        h.store.update(tid, summary=f"{word} summary of task {tid}")
    now = [1000.0]
    h.worker.publisher.clock = lambda: now[0]
    with h.gitea.lock:
        h.gitea.requests.clear()
    return tids, [h.store.get(t).comment_id for t in tids], now


def edits_of(h, comment_id: int) -> int:
    """Edits of the comment asked for since `comments_changed`, answered or not."""
    return sum(
        1
        for method, path, *_ in h.gitea.requests
        if method == "PATCH" and path.endswith(f"/issues/comments/{comment_id}")
    )


def shows(h, comment_id: int, text: str) -> bool:
    with h.gitea.lock:
        return text in h.gitea.comments[comment_id]["body"]


def test_a_comment_gitea_answers_with_5xx_is_backed_off_and_the_others_are_written(make):
    h = make()
    tids, comments, now = comments_changed(h, 3, "second")
    # Gitea fails every edit of the first task's comment, and only that
    h.gitea.fail_next(1000, 500, "PATCH", f"/repos/acme/widget/issues/comments/{comments[0]}")
    publisher = h.worker.publisher
    assert publisher.sync_comments() == 2
    assert [shows(h, c, "second summary") for c in comments] == [False, True, True]
    assert [t.id for t in h.store.comment_out_of_date(10)] == [tids[0]]
    tried = edits_of(h, comments[0])
    assert tried == 3  # the first try and the client's two retries
    # backed off: not tried again until its time comes, then tried (and backed off longer)
    for _ in range(3):
        h.worker.run_tick()
    now[0] += 9.0
    publisher.sync_comments()
    assert edits_of(h, comments[0]) == tried
    now[0] += 1.0
    publisher.sync_comments()
    assert edits_of(h, comments[0]) == 2 * tried
    now[0] += 19.0
    publisher.sync_comments()
    assert edits_of(h, comments[0]) == 2 * tried


def test_5xx_for_every_comment_or_no_answer_ends_the_comment_pass(make):
    h = make()
    tids, comments, now = comments_changed(h, 3, "second")
    publisher = h.worker.publisher
    # every comment fails (the try and both retries of the first two): two in a row end
    # the pass, and the third is not tried
    h.gitea.fail_next(6, 503, "PATCH", r"/repos/acme/widget/issues/comments/\d+")
    assert publisher.sync_comments() == 0
    assert [edits_of(h, c) for c in comments] == [3, 3, 0]
    # Gitea is back: the one that failed first waits its turn, as Gitea could not say it
    # was failing as a whole until the second failed; the others are written at once
    assert publisher.sync_comments() == 2
    assert [shows(h, c, "second summary") for c in comments] == [False, True, True]
    now[0] += 10.0
    assert publisher.sync_comments() == 1
    assert all(shows(h, c, "second summary") for c in comments)
    # no answer at all ends the pass at once, and backs nothing off
    for tid in tids:
        h.store.update(tid, summary=f"third summary of task {tid}")
    h.gitea.down()
    assert publisher.sync_comments() == 0
    h.gitea.up()
    assert publisher.sync_comments() == 3
    assert all(shows(h, c, "third summary") for c in comments)


def test_token_never_leaves(make, caplog, tmp_path):
    caplog.set_level("DEBUG")
    # a failed task (log tail in its comment) and a successful one (push, PR body)
    h = make(
        attempts=1,
        agents={"fake": fake_agent(FAKE_COUNTER=str(tmp_path / "count"), FAKE_FAIL_TIMES="1")},
    )
    failed, done = h.enqueue(h.issue("First")), None
    h.settle(failed)
    done = h.enqueue(h.issue("Second"))
    h.settle(done)
    assert h.store.get(failed).state is State.FAILED
    assert h.store.get(done).outcome is Outcome.SUCCEEDED
    token = TOKEN.encode()
    for path in h.config.storage.data_dir.rglob("*"):
        if path.is_file():
            assert token not in path.read_bytes(), path
    for _method, path, _headers, body in h.gitea.requests:
        assert token not in body and TOKEN not in path
    for comment in h.gitea.comments.values():
        assert TOKEN not in comment["body"]
    for pr in h.gitea.pulls_of(REPO).values():
        assert TOKEN not in pr["body"]
    assert TOKEN not in logged(caplog)


def test_a_backlog_of_tracking_comments_is_created_without_waiting_for_the_interval(make):
    h = make(limit=1, agents={"fake": fake_agent(FAKE_MODE="hang")})
    issues = [h.issue(f"Backlog {i}") for i in range(45)]
    ids = [h.enqueue(n) for n in issues]
    h.worker.run_tick()  # one wake: the tick goes round until the backlog is written
    assert all(h.store.get(t).comment_id is not None for t in ids)
    assert all(len(h.tracking_comments(n)) == 1 for n in issues)
    h.store.request_cancel(ids[0], "bob")
    for t in ids[1:]:
        h.store.request_cancel(t, "bob")
    h.settle(*ids)


def test_cleanup_removes_old_finished_tasks_their_files_and_worktrees(make):
    h = make()
    n = h.issue()
    tid = h.enqueue(n)
    h.settle(tid)
    log = h.config.storage.logs_dir / f"{tid}.log"
    prompt = h.config.storage.prompts_dir / f"{tid}.md"
    worktree = Path(h.store.get(tid).worktree)
    assert log.exists() and prompt.exists() and worktree.exists()
    first = h.worker.cleanup(7)
    assert (first.tasks, first.files, first.worktrees) == (0, 0, [])
    later = time.time() + 8 * 86400
    h.worker.clock = h.store.clock = h.workspace._clock = lambda: later
    old = time.time() - 8 * 86400
    for path in (log, prompt):
        os.utime(path, (old, old))
    result = h.worker.cleanup(7)
    assert result.tasks == 1 and result.files == 2 and result.worktrees == [f"{REPO}#{n}"]
    assert h.store.get(tid) is None and not log.exists() and not worktree.exists()


# ---------------------------------------------------------------- commands from Gitea


def deliver_comment(h, text, number, sender="alice", is_pull=False, pull=None, **rules_kw):
    """`pull`: the pull request the delivery carries (as the fake Gitea serves it)."""
    from bot.core import events, intake
    from tests import payloads

    posted = h.gitea.add_comment(REPO, number, text, login=sender)
    body, headers = payloads.comment_delivery(
        text,
        number,
        sender=sender,
        is_pull=is_pull,
        comment_id=posted["id"],
        permission=h.gitea.permission(REPO, sender),
        pull=pull,
    )
    delivery = events.delivery_of(headers, body)
    rules = intake.Rules(
        label="kugetsu",
        command="/kugetsu",
        bot_login="kugetsu-bot",
        known_agents=frozenset(h.config.agents.tables),
        default_agent="fake",
        max_attempts=h.config.queue.max_attempts,
        **rules_kw,
    )
    result = ingest(h.store, delivery, events.parse(delivery, events.load_json(body)), rules)
    return posted, result


def replies(h, number):
    return [
        c["body"]
        for c in h.gitea.comments_on(REPO, number)
        if "<!-- kugetsu:reply -->" in c["body"]
    ]


def test_stop_retry_status_and_help_from_comments(make, tmp_path):
    pidfile = tmp_path / "pids"
    h = make(agents={"fake": fake_agent(FAKE_MODE="hang", FAKE_PIDFILE=str(pidfile))})
    n = h.issue()
    posted, result = deliver_comment(h, "/kugetsu start", n)
    [tid] = result.task_ids
    wait_for(pidfile.exists, tick=h.worker.run_tick, what="agent to start")
    assert "eyes" in h.gitea.reactions[posted["id"]]

    # someone with read access cannot stop it
    deliver_comment(h, "/kugetsu stop", n, sender="mallory")
    for _ in range(3):
        h.worker.run_tick()
    assert h.store.get(tid).state is State.RUNNING
    assert any("@mallory needs write access" in r for r in replies(h, n))

    # status answers anyone
    deliver_comment(h, "/kugetsu status", n, sender="mallory")
    wait_for(
        lambda: any("kugetsu on this issue" in r for r in replies(h, n)),
        tick=h.worker.run_tick,
        what="status reply",
    )
    assert any(f"| {tid} | start | running |" in r for r in replies(h, n))

    # a writer stops it, and the whole group dies
    deliver_comment(h, "/kugetsu stop", n, sender="bob")
    h.settle(tid)
    assert h.store.get(tid).state is State.CANCELLED
    leader, grandchild = agent_pids(pidfile)
    assert not leader.alive() and not grandchild.alive()
    assert "Stopped** by @bob" in h.tracking_comments(n)[0]["body"]

    # retry queues it again with fresh attempts
    pidfile.unlink()
    deliver_comment(h, "/kugetsu retry", n, sender="alice")
    wait_for(pidfile.exists, tick=h.worker.run_tick, what="the retried agent to start")
    task = h.store.get(tid)
    assert (task.state, task.attempts) == (State.RUNNING, 1)
    deliver_comment(h, "/kugetsu cancel", n, sender="bob")
    h.settle(tid)

    # help replies with the generated help; nothing to retry on a fresh issue says so
    deliver_comment(h, "/kugetsu help", n, sender="mallory")
    other = h.issue("Nothing here")
    deliver_comment(h, "/kugetsu retry", other, sender="alice")
    deliver_comment(h, "/kugetsu stop", other, sender="alice")
    h.settle(tid)
    assert any("/kugetsu continue <instructions>" in r for r in replies(h, n))
    assert any("no failed or stopped task to retry" in r for r in replies(h, other))
    assert any("nothing to stop" in r for r in replies(h, other))


def test_reactions_of_one_outbox_pass_are_marked_done_together(make):
    h = make()
    n = h.issue()
    posted = [deliver_comment(h, "/kugetsu help", n)[0] for _ in range(3)]
    statements: list[str] = []
    h.store._conn().set_trace_callback(statements.append)
    try:
        assert h.worker.outbox.work() == 6  # three reactions, three help replies
    finally:
        h.store._conn().set_trace_callback(None)
    assert all("eyes" in h.gitea.reactions[p["id"]] for p in posted)
    assert len(replies(h, n)) == 3
    assert h.store.outbox_due(10) == []
    # a transaction per reply, and one for the three reactions
    assert statements.count("BEGIN IMMEDIATE") == 4, statements


def test_a_comment_pass_records_what_it_wrote_in_one_transaction(make):
    h = make()
    issues = [h.issue(f"Issue {i}") for i in range(5)]
    tasks = [h.enqueue(n, authorized=True) for n in issues]
    publisher = h.worker.publisher
    publisher._positions_at = publisher.clock()  # queue positions are not due in this pass
    statements: list[str] = []
    h.store._conn().set_trace_callback(statements.append)
    assert h.worker.publisher.sync_comments(30) == 5
    h.store._conn().set_trace_callback(None)
    # one transaction marking each create before it is made, one recording all five
    assert statements.count("BEGIN IMMEDIATE") == 5 + 1
    for n, tid in zip(issues, tasks, strict=False):
        [comment] = h.tracking_comments(n)
        assert h.store.require(tid).comment_id == comment["id"]
    assert h.store.comment_out_of_date(10) == []


def test_comments_whose_record_was_lost_are_found_again_not_duplicated(make, monkeypatch):
    # The worker dies after Gitea created the comments and before the pass recorded them.
    h = make()
    issues = [h.issue(f"Issue {i}") for i in range(3)]
    tasks = [h.enqueue(n, authorized=True) for n in issues]
    real = h.store.comment_synced_many

    def crash(records):
        if records:
            raise RuntimeError("worker killed")
        real(records)

    monkeypatch.setattr(h.store, "comment_synced_many", crash)
    with pytest.raises(RuntimeError):
        h.worker.publisher.sync_comments(30)
    assert all(h.store.require(t).comment_id is None for t in tasks)
    assert all(len(h.tracking_comments(n)) == 1 for n in issues)

    monkeypatch.setattr(h.store, "comment_synced_many", real)
    h.worker.publisher.sync_comments(30)
    for n, tid in zip(issues, tasks, strict=False):
        [comment] = h.tracking_comments(n)  # still one each
        assert h.store.require(tid).comment_id == comment["id"]
    assert h.store.comment_out_of_date(10) == []


def naming_its_session(envfile: Path) -> AgentConfig:
    """An agent like claude's --session-id: kugetsu picks the id for the first run and
    resumes it; each run dumps its argv and environment to `envfile`."""
    return AgentConfig(
        name="fake",
        env={"FAKE_ENVFILE": str(envfile)},
        command=(AGENT_PYTHON, str(FAKE_AGENT), "--session-id", "{session_id}", "{prompt}"),
        resume_command=(AGENT_PYTHON, str(FAKE_AGENT), "--resume", "{session_id}", "{prompt}"),
    )


def test_a_command_that_names_its_session_is_resumed_with_it(make, tmp_path):
    envfile = tmp_path / "env.json"
    h = make(agents={"fake": naming_its_session(envfile)})
    n = h.issue()
    first = h.enqueue(n)
    h.settle(first)
    argv = json.loads(envfile.read_text())["argv"]
    assert argv[1] == "--session-id"
    session = argv[2]
    assert len(session) == 36 and h.store.get(first).session_id == session
    second = h.enqueue(n, kind=Kind.CONTINUE, prompt="and a test")
    h.settle(second)
    argv = json.loads(envfile.read_text())["argv"]
    assert argv[1:3] == ["--resume", session]
    assert h.store.get(second).outcome is Outcome.SUCCEEDED


def test_retry_from_a_comment_is_refused_while_another_task_of_the_issue_is_active(make):
    h = make(limit=1)
    n, other = h.issue(), h.issue("Something else")
    blocker = h.enqueue(other)  # holds the only slot's place in the queue first
    first = h.enqueue(n)
    follow = h.enqueue(n, kind=Kind.CONTINUE, prompt="more")
    h.store.transition(follow, State.PENDING, State.CANCELLED, event="test")
    # the latest task of the issue is cancelled, but the first is still pending
    deliver_comment(h, "/kugetsu retry", n)
    h.settle(blocker, first)
    assert h.store.get(follow).state is State.CANCELLED
    assert any(f"Task {first} is still active" in body for body in replies(h, n))
    assert [t.id for t in h.store.list_tasks(repo=REPO, issue=n) if t.active] == []


# ---------------------------------------------------------------- replies anyone can trigger


@pytest.mark.parametrize(
    "who, permission, shows_queue",
    [
        ("bob", "admin", True),
        ("alice", "write", True),
        ("mallory", "read", True),
        ("eve", "none", False),
        ("eve", "Gitea cannot say", False),
    ],
)
def test_status_shows_the_queue_only_to_those_who_can_read_the_repository(
    make, who, permission, shows_queue
):
    h = make()
    n = h.issue()
    tid = h.enqueue(n)
    h.settle(tid)
    if permission == "none":
        h.gitea.set_permission(REPO, who, "none")
    elif permission == "Gitea cannot say":
        h.gitea.fail_next(3, 503, "GET", r".*/collaborators/.*")  # the try and both retries
    deliver_comment(h, "/kugetsu status", n, sender=who)
    h.worker.outbox.work()
    [reply] = replies(h, n)
    assert f"| {tid} | start | completed | succeeded |" in reply
    assert ("Agents busy" in reply and "tasks waiting" in reply) == shows_queue


def test_past_the_reply_limit_a_command_gets_a_reaction_alone_and_still_acts(make, tmp_path):
    pidfile = tmp_path / "pids"
    h = make(agents={"fake": fake_agent(FAKE_MODE="hang", FAKE_PIDFILE=str(pidfile))})
    n = h.issue()
    one = {"reply_limit": 1}
    sent = [
        deliver_comment(h, text, n, sender=who, **one)[0]
        for who, text in [
            ("mallory", "/kugetsu help"),  # answered
            ("mallory", "/kugetsu help"),  # reaction only, and so on for mallory
            ("mallory", "/kugetsu status"),
            ("mallory", "/kugetsu stop"),  # refused, and the refusal not written
            ("bob", "/kugetsu retry"),  # answered: nothing to retry
            ("bob", "/kugetsu stop"),  # nothing to stop, not written
        ]
    ]
    for _ in range(3):
        h.worker.outbox.work()
    assert all("eyes" in h.gitea.reactions.get(p["id"], []) for p in sent)
    bodies = replies(h, n)
    assert len(bodies) == 2, bodies
    assert "/kugetsu continue <instructions>" in bodies[0]
    assert "no failed or stopped task to retry" in bodies[1]
    assert h.store.outbox_due(10) == []
    # bob is past his limit on this issue, and his stop still stops the work
    _posted, result = deliver_comment(h, "/kugetsu start", n, sender="bob", **one)
    [tid] = result.task_ids
    wait_for(pidfile.exists, tick=h.worker.run_tick, what="the agent to start")
    deliver_comment(h, "/kugetsu stop", n, sender="bob", **one)
    h.settle(tid)
    assert h.store.get(tid).state is State.CANCELLED
    assert len(replies(h, n)) == 2


def test_refusals_count_against_the_reply_limit_and_past_it_get_a_reaction_alone(make):

    h = make()
    h.rebuild(config=replace(h.config, triggers=replace(h.config.triggers, reply_limit=2)))
    n = h.issue()
    two = {"reply_limit": 2}

    def request(sender: str, text: str = "/kugetsu start") -> tuple[dict, list[int]]:
        posted, result = deliver_comment(h, text, n, sender=sender, **two)
        h.settle(*result.task_ids)
        return posted, list(result.task_ids)

    asked = [request("mallory", "/kugetsu help")]  # a reply: 1 of 2
    asked += [request("mallory") for _ in range(3)]  # refused: 2 of 2, then none
    asked.append(request("eve"))  # not a collaborator: 1 of 2
    asked.append(request("mallory", "/kugetsu help"))  # the refusals counted: none
    h.worker.outbox.work()
    refused = [tid for _posted, tids in asked for tid in tids]
    assert [h.store.get(t).state for t in refused] == [State.REJECTED] * 4
    comments = h.tracking_comments(n)
    assert [c["body"].split("\n")[1] for c in comments] == [
        f"**kugetsu** · task {tid} (start, requested by @{who})"
        for tid, who in [(refused[0], "mallory"), (refused[3], "eve")]
    ]
    assert all("Not started" in c["body"] for c in comments)
    assert len(replies(h, n)) == 1
    # each request still got its reaction; the quiet refusals say why in their events
    assert all("eyes" in h.gitea.reactions.get(posted["id"], []) for posted, _ in asked)
    for tid in refused[1:3]:
        assert ("not answered", "reply limit reached for mallory") in [
            (e["event"], e["detail"]) for e in task_events(h.store, tid)
        ]
    assert h.store.comment_out_of_date(10) == []


# ---------------------------------------------------------------- one bad item, the rest go on


def insert_raw(h, table: str, **values) -> int:
    """A row written straight into the database, as no code path of kugetsu writes it."""
    import sqlite3

    conn = sqlite3.connect(h.config.storage.db_path)
    try:
        cur = conn.execute(
            f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
            tuple(values.values()),
        )
        conn.commit()
        return cur.lastrowid
    finally:
        conn.close()


def poison_task(h, **values) -> int:
    now = time.time()
    row = dict(
        repo="no-slash",
        issue=1,
        kind="start",
        agent="fake",
        requested_by="alice",
        state="pending",
        created_at=now,
        updated_at=now,
    )
    row.update(values)
    return insert_raw(h, "tasks", **row)


def test_poison_rows_are_set_aside_with_a_reason_and_the_queue_goes_on(make):
    h = make(limit=3)
    # a repository name with no "/": AuthCache.permission's split raised on every tick
    unauthorized = poison_task(h)
    # an authorized one reaches a runner, which reads task.owner / task.name
    authorized = poison_task(h, issue=2, authorized=1)
    # a running task of a dead worker whose pid no kill() accepts (OverflowError)
    running = poison_task(
        h,
        repo=REPO,
        issue=99,
        state="running",
        attempts=1,
        worker_id="gone",
        pid=2**40,
        pid_start="x",
        authorized=1,
    )
    # an outbox reply to a repository that cannot be
    bad_reply = insert_raw(
        h, "outbox", repo="no-slash", issue=1, kind="comment", body="hi", created_at=time.time()
    )
    issues = [h.issue(f"Issue {i}") for i in range(2)]
    good = [h.enqueue(n) for n in issues]
    deliver_comment(h, "/kugetsu help", issues[0], sender="mallory")

    h.settle(unauthorized, authorized, running, *good)
    for tid, n in zip(good, issues, strict=False):
        task = h.store.get(tid)
        assert (task.state, task.outcome) == (State.COMPLETED, Outcome.SUCCEEDED), task
        assert h.gitea.file_at(REPO, BRANCH.format(n), "kugetsu_output.txt")
    assert len(h.gitea.pulls_of(REPO)) == 2
    assert any("/kugetsu continue <instructions>" in r for r in replies(h, issues[0]))

    task = h.store.get(unauthorized)
    assert task.state is State.REJECTED and task.outcome is Outcome.INFRA_ERROR
    assert task.error.startswith("authorization failed: ValueError: ")
    task = h.store.get(authorized)
    assert task.state is State.FAILED and task.error == "internal error: IndexError"
    task = h.store.get(running)
    assert task.state is State.FAILED
    assert task.error.startswith("recovery failed: OverflowError: "), task.error
    assert [e["event"] for e in task_events(h.store, running)][-1] == "set aside"
    row = (
        h.store._conn()
        .execute("SELECT done_at, error FROM outbox WHERE id = ?", (bad_reply,))
        .fetchone()
    )
    assert row["done_at"] is not None
    assert row["error"].startswith("outbox failed: ValueError: "), row["error"]


def unreadable_task(h, **values) -> int:
    """A task row holding values kugetsu does not know, written past the checks that
    refuse them (as before those checks existed, by hand, or by corruption)."""
    now = time.time()
    row = dict(
        repo=REPO,
        issue=1,
        kind="start",
        agent="fake",
        requested_by="alice",
        state="pending",
        created_at=now,
        updated_at=now,
    )
    row.update(values)
    return write_unchecked(
        h.config.storage.db_path,
        f"INSERT INTO tasks ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
        tuple(row.values()),
    )


def test_rows_that_cannot_be_read_are_set_aside_and_every_tick_goes_on(make):
    h = make(limit=3)
    issues = [h.issue(f"Issue {i}") for i in range(3)]
    # read by authorization, by claiming, by recovery and by the tracking comments
    bad = {
        unreadable_task(
            h, issue=issues[0], kind="frobnicate"
        ): "unknown kind 'frobnicate' (now start)",
        unreadable_task(
            h, issue=issues[1], authorized=1, outcome="exploded"
        ): "unknown outcome 'exploded'",
        unreadable_task(
            h,
            issue=issues[2],
            state="running",
            authorized=1,
            attempts=1,
            worker_id="gone",
            usage="{not json",
        ): "usage is not JSON: '{not json' (emptied)",
        unreadable_task(
            h, issue=issues[2], state="paused", authorized=1, version=2
        ): "unknown state 'paused'",
    }
    good = [h.enqueue(h.issue(f"Good {i}")) for i in range(2)]
    h.settle(*good, *bad)  # a tick that raised would raise here
    assert h.worker.ticks.failures == 0
    assert [h.store.get(t).outcome for t in good] == [Outcome.SUCCEEDED] * 2
    assert len(h.gitea.pulls_of(REPO)) == 2
    for tid, shown in bad.items():
        task = h.store.get(tid)
        assert (task.state, task.outcome) == (State.FAILED, Outcome.INFRA_ERROR), tid
        assert task.error == f"set aside, unreadable: {shown}"
        assert "set aside" in [e["event"] for e in task_events(h.store, tid)]
    # an authorized request hears why, in its tracking comment
    [comment] = h.tracking_comments(issues[1])
    assert "unknown outcome 'exploded'" in comment["body"] and "Failed" in comment["body"]


def test_an_outbox_item_retried_for_days_is_still_retried(make):
    # 5 s, doubling to 10 min: after some 1,030 tries (a week), 5.0 * 2 ** attempts
    # overflowed and the reply was dropped as if it were poison
    h = make()
    n = h.issue()
    item = insert_raw(
        h,
        "outbox",
        repo=REPO,
        issue=n,
        kind="comment",
        body="hello",
        attempts=1100,
        created_at=time.time(),
    )
    h.gitea.fail_next(3, 503, "POST", r".*/comments")  # the try and both retries
    h.worker.outbox.work()
    row = (
        h.store._conn()
        .execute(
            "SELECT done_at, attempts, not_before - ? AS wait FROM outbox WHERE id = ?",
            (time.time(), item),
        )
        .fetchone()
    )
    assert row["done_at"] is None and row["attempts"] == 1101
    assert 590 < row["wait"] <= 600


def test_a_runner_that_cannot_start_ends_its_attempt_and_the_others_start(make, monkeypatch):
    import threading

    h = make(limit=3)
    issues = [h.issue(f"Issue {i}") for i in range(3)]
    tasks = [h.enqueue(n, authorized=True) for n in issues]
    start = threading.Thread.start

    def no_thread_for_the_first(thread):
        if thread.name == f"task-{tasks[0]}":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", no_thread_for_the_first)
    assert h.worker.launch() == tasks
    monkeypatch.setattr(threading.Thread, "start", start)
    first = h.store.get(tasks[0])
    # the attempt ended like any other infrastructure failure: back in the queue, counted
    assert (first.state, first.outcome, first.attempts) == (State.PENDING, Outcome.INFRA_ERROR, 1)
    assert first.error == "start failed: RuntimeError: can't start new thread"
    h.settle(*tasks)
    assert [h.store.get(t).state for t in tasks] == [State.COMPLETED] * 3


def test_every_outbox_kind_has_its_answer_and_its_handler():
    # adding a kind is one member, its answer and its handler: none can be left out
    from bot.core.outbox import ANSWERS, OutboxKind
    from bot.worker.outbox import HANDLERS

    assert set(ANSWERS) == set(OutboxKind) == set(HANDLERS)


def test_a_task_whose_agent_is_not_installed_says_so_and_how_an_operator_fixes_it(make, tmp_path):
    missing = AgentConfig(name="gone", command=(str(tmp_path / "no-such-agent"), "{prompt}"))
    h = make(agents={"fake": fake_agent(), "gone": missing})
    n = h.issue()
    tid = h.enqueue(n, agent="gone", authorized=True)
    h.settle(tid)
    task = h.store.get(tid)
    # not an agent's failure worth retrying: one attempt, and the reason is kept
    assert (task.state, task.outcome, task.attempts) == (State.FAILED, Outcome.AGENT_FAILED, 1)
    [comment] = h.tracking_comments(n)
    body = comment["body"]
    assert "⚠️ **Not started**: the agent `gone` is not installed where kugetsu runs" in body
    assert "command not found" in body and "no-such-agent" in body
    assert "`agents.gone.command`" in body and "`kugetsu doctor`" in body
    assert f"`kugetsu queue retry {tid}`" in body
    assert "/kugetsu retry" not in body and "❌" not in body
