"""Conversations on pull requests: reviews reach the agent, and people's pull requests.

The worker runs against the fake Gitea (reviews and their line comments as Gitea 1.26
serves them, deliveries as it sends them), a real git remote and the fake agent.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bot.core import events, intake
from bot.core.tasks import Kind, Outcome, State
from bot.ingest import ingest, rules_for
from tests import payloads, test_worker
from tests.conftest import REPO, fake_agent, wait_for
from tests.test_worker import Harness, deliver_comment, replies

pytestmark = pytest.mark.both_modes

BRANCH = "kugetsu/issue-{}"
make = test_worker.make  # the fixture: a worker against the fake Gitea


def rules(h, **kw) -> intake.Rules:
    """The rules the receiver has for the harness's config."""
    return replace(rules_for(h.config, "kugetsu-bot", frozenset(h.config.agents.tables)), **kw)


def deliver_review(h, number: int, review: dict, **rules_kw):
    """Take in the delivery Gitea sends for a submitted review, as the receiver does."""
    payload, event_type, event = h.gitea.review_event(REPO, number, review)
    body, headers = payloads.review_delivery(payload, event_type, event)
    delivery = events.delivery_of(headers, body)
    parsed = events.parse(delivery, events.load_json(body))
    return ingest(h.store, delivery, parsed, rules(h, **rules_kw))


def opened_pull(h, n: int) -> int:
    """kugetsu's pull request for issue n, after its first task."""
    first = h.enqueue(n)
    h.settle(first)
    [pr] = [p for p in h.gitea.pulls_of(REPO).values() if p["head"]["ref"] == BRANCH.format(n)]
    return pr["number"]


def settle_all(h, timeout: float = 60.0) -> list:
    """Tick until the outbox is empty and every task has ended; returns the tasks."""

    def done():
        tasks = h.store.list_tasks()
        return (
            not h.store.outbox_due(1)
            and all(not t.active for t in tasks)
            and not h.store.comment_out_of_date(1)
            and not h.worker.runner_threads()
        )

    wait_for(done, timeout=timeout, tick=h.worker.run_tick, what="the queue to settle")
    return h.store.list_tasks()


def prompt_seen(envfile) -> str:
    return json.loads(envfile.read_text())["argv"][-1]


# ---------------------------------------------------------------- reviews


def review_of_two_line_comments(h, pr: int, login: str) -> dict:
    """A person's commit adds a notes file to kugetsu's branch; `login` reviews the pull
    request with two line comments and no text (the shape Gitea sends with an empty body)."""
    h.gitea.commit_files(
        REPO, {"docs/notes.md": "# Notes\n\nfirst note\nsecond note\n"}, branch=BRANCH.format(1)
    )
    return h.gitea.add_review(
        REPO,
        pr,
        login,
        "COMMENT",
        body="",
        comments=[
            {"path": "kugetsu_output.txt", "line": 1, "body": "/kugetsu say hello here too"},
            {"path": "docs/notes.md", "line": 4, "body": "This note is wrong: it is the third."},
        ],
    )


def test_a_review_with_two_line_comments_becomes_one_follow_up_on_the_same_pull_request(
    make, tmp_path
):
    envfile = tmp_path / "env.json"
    h = make(agents={"fake": fake_agent(FAKE_ENVFILE=str(envfile))})
    n = h.issue()
    assert n == 1
    pr = opened_pull(h, n)
    review = review_of_two_line_comments(h, pr, "bob")
    before = h.gitea.branch_sha(REPO, BRANCH.format(n))
    [first_comment, second_comment] = h.gitea._review_comments[review["id"]]

    result = deliver_review(h, pr, review)
    assert result.queued and not result.task_ids  # the receiver only queues the reading
    tasks = settle_all(h)

    # one follow-up, on the pull request's issue, holding the review
    [start, follow] = tasks
    assert (follow.kind, follow.issue, follow.state, follow.outcome) == (
        Kind.CONTINUE,
        n,
        State.COMPLETED,
        Outcome.SUCCEEDED,
    )
    assert (follow.requested_by, follow.review["id"]) == ("bob", review["id"])
    # its prompt holds both comments: path, line, diff hunk and text
    prompt = prompt_seen(envfile)
    assert "kugetsu_output.txt, line 1" in prompt
    assert "docs/notes.md, line 4" in prompt
    assert "/kugetsu say hello here too" in prompt
    assert "This note is wrong: it is the third." in prompt
    assert "+second note" in prompt and "+written by task" in prompt  # the diff hunks
    # a commit on top of the pull request's branch (the person's commit kept), no new PR
    after = h.gitea.branch_sha(REPO, BRANCH.format(n))
    assert after != before
    assert h.gitea.git(REPO, "merge-base", "--is-ancestor", before, after) == ""
    assert list(h.gitea.pulls_of(REPO)) == [pr]
    assert follow.pr_number == pr
    # the answer on the pull request, comment by comment; the conversation on the file the
    # run changed is resolved, the other is not
    [answer] = [
        c["body"]
        for c in h.gitea.comments_on(REPO, pr)
        if f"kugetsu:follow-up={follow.id}" in c["body"]
    ]
    assert "@bob: pushed a follow-up for your review (comments)" in answer
    assert (
        "1. `kugetsu_output.txt` line 1: its file changed in this push; conversation resolved"
        in answer
    )
    assert "2. `docs/notes.md` line 4: its file did not change in this push" in answer
    assert h.gitea.resolved(REPO, pr) == {first_comment["id"]: "kugetsu-bot"}
    assert second_comment["resolver"] is None

    # the same delivery again (Gitea's "replay" gives it a new id) takes nothing more
    deliver_review(h, pr, review)
    assert len(settle_all(h)) == 2
    # /metrics counts the two webhook deliveries, not the worker's readings of the review
    deliveries = {
        labels: value
        for name, labels, value in h.store.metrics_snapshot().counters
        if name == "webhook_deliveries"
    }
    assert sum(deliveries.values()) == 2, deliveries


def test_the_same_review_from_a_read_only_user_does_nothing(make):
    h = make()
    n = h.issue()
    pr = opened_pull(h, n)
    review = review_of_two_line_comments(h, pr, "mallory")  # read access
    before = h.gitea.branch_sha(REPO, BRANCH.format(n))
    # the delivery's repository.permissions are the pull request author's: kugetsu's own
    payload, _, _ = h.gitea.review_event(REPO, pr, review)
    assert payload["repository"]["permissions"]["admin"] is True

    deliver_review(h, pr, review)
    tasks = settle_all(h)

    assert len(tasks) == 1  # the first task alone: no follow-up
    assert h.gitea.branch_sha(REPO, BRANCH.format(n)) == before
    assert h.gitea.resolved(REPO, pr) == {}
    # the reviewer is told why, on the pull request, where the review is
    [refusal] = replies(h, pr)
    assert "Not done: @mallory needs write access to acme/widget" in refusal
    assert "(has read)" in refusal


def test_a_review_without_a_command_asks_for_nothing_unless_changes_requested_count(make):
    h = make()
    n = h.issue()
    pr = opened_pull(h, n)
    plain = h.gitea.add_review(
        REPO, pr, "bob", "REQUEST_CHANGES", body="Please rename the file.", comments=[]
    )
    deliver_review(h, pr, plain)
    assert len(settle_all(h)) == 1  # no command, and review_changes is off

    triggers = replace(h.config.triggers, review_changes=True)
    h.rebuild(config=replace(h.config, triggers=triggers))
    again = h.gitea.add_review(
        REPO, pr, "bob", "REQUEST_CHANGES", body="Please rename the file.", comments=[]
    )
    deliver_review(h, pr, again, review_changes=True)
    [_, follow] = settle_all(h)
    assert (follow.kind, follow.outcome, follow.review["id"]) == (
        Kind.CONTINUE,
        Outcome.SUCCEEDED,
        again["id"],
    )
    # a reader's "request changes" is no request: nothing, and nothing said
    reader = h.gitea.add_review(REPO, pr, "mallory", "REQUEST_CHANGES", body="No.", comments=[])
    deliver_review(h, pr, reader, review_changes=True)
    assert len(settle_all(h)) == 2
    assert replies(h, pr) == []


def test_two_equal_reviews_are_each_taken_once(make):
    h = make()
    n = h.issue()
    pr = opened_pull(h, n)
    first = h.gitea.add_review(REPO, pr, "bob", "COMMENT", body="/kugetsu add a test")
    deliver_review(h, pr, first)
    settle_all(h)
    second = h.gitea.add_review(REPO, pr, "bob", "COMMENT", body="/kugetsu add a test")
    deliver_review(h, pr, second)
    tasks = settle_all(h)
    assert [t.review.get("id") for t in tasks] == [None, first["id"], second["id"]]


# ---------------------------------------------------------------- a person's pull request


def deliver_pull_comment(h, text: str, pr: int, sender: str = "bob"):
    """A comment on pull request `pr`, delivered with the pull request as Gitea sends it."""
    return deliver_comment(h, text, pr, sender, is_pull=True, pull=h.gitea.pull_json(REPO, pr))[1]


def tracking_on(h, number: int) -> list[str]:
    return [c["body"] for c in h.gitea.comments_on(REPO, number) if "kugetsu:task=" in c["body"]]


def test_a_persons_pull_request_gets_a_commit_on_its_branch_on_top_of_theirs(make, tmp_path):
    envfile = tmp_path / "env.json"
    h = make(agents={"fake": fake_agent(FAKE_ENVFILE=str(envfile))})
    h.gitea.commit_files(REPO, {"greet.py": "print('hi')\n"}, branch="feature/greet")
    theirs = h.gitea.commit_files(REPO, {"greet.py": "print('hello')\n"}, branch="feature/greet")
    pr = h.gitea.open_pull(REPO, "feature/greet", title="Greet people", login="alice")

    result = deliver_pull_comment(h, "/kugetsu add a greeting file as well", pr)
    [tid] = result.task_ids
    [task] = settle_all(h)

    assert (task.id, task.issue, task.state, task.outcome) == (
        tid,
        pr,
        State.COMPLETED,
        Outcome.SUCCEEDED,
    )
    assert (task.branch, task.pr_number) == ("feature/greet", pr)
    # one commit on top of the person's, which stay as they were; no new pull request
    after = h.gitea.branch_sha(REPO, "feature/greet")
    assert h.gitea.git(REPO, "rev-parse", f"{after}~1").strip() == theirs
    assert (
        h.gitea.file_at(REPO, "feature/greet", "kugetsu_output.txt") == f"written by task {tid}\n"
    )
    assert h.gitea.file_at(REPO, "feature/greet", "greet.py") == "print('hello')\n"
    assert list(h.gitea.pulls_of(REPO)) == [pr]
    assert h.gitea.pulls_of(REPO)[pr]["body"] == ""  # a person's description is theirs
    # the agent was told where it works
    prompt = prompt_seen(envfile)
    assert f"You are working on pull request #{pr}" in prompt
    assert "branch feature/greet, the branch of this pull request" in prompt
    # the tracking comment is on the pull request
    [comment] = tracking_on(h, pr)
    assert "✅ **Done**: pushed to this pull request's branch `feature/greet`" in comment

    # a second request there follows up on the same branch, on top of the first
    follow = deliver_pull_comment(h, "/kugetsu and a second line", pr).task_ids[0]
    tasks = settle_all(h)
    assert [(t.kind, t.outcome) for t in tasks] == [
        (Kind.START, Outcome.SUCCEEDED),
        (Kind.CONTINUE, Outcome.SUCCEEDED),
    ]
    assert (
        h.gitea.git(REPO, "rev-parse", f"{h.gitea.branch_sha(REPO, 'feature/greet')}~1").strip()
        == after
    )
    assert h.gitea.file_at(REPO, "feature/greet", "kugetsu_output.txt") == (
        f"written by task {tid}\nwritten by task {follow}\n"
    )
    assert len(tracking_on(h, pr)) == 2


def fork_pull(h, *, maintainer_edit: bool) -> tuple[str, str, int]:
    """carol's fork with a commit on branch `fix`, and her pull request from it: the fork,
    her commit and the pull request's number."""
    fork = h.gitea.fork_repo(REPO, "carol")
    theirs = h.gitea.commit_files(fork, {"fix.txt": "fixed\n"}, branch="fix")
    pr = h.gitea.open_pull(
        REPO, "fix", head_repo=fork, login="carol", allow_maintainer_edit=maintainer_edit
    )
    return fork, theirs, pr


def test_a_fork_pull_request_without_maintainer_edits_gets_a_reply(make):
    h = make()
    _, _, pr = fork_pull(h, maintainer_edit=False)

    result = deliver_pull_comment(h, "/kugetsu tidy this up", pr)
    assert not result.task_ids
    settle_all(h)
    [reply] = replies(h, pr)
    assert "@bob kugetsu cannot work on this pull request" in reply
    assert "fork carol/widget, whose author has not allowed edits by maintainers" in reply
    assert h.store.list_tasks() == []


def test_a_fork_pull_request_with_maintainer_edits_gets_a_commit_on_the_forks_branch(make):
    h = make()
    fork, theirs, pr = fork_pull(h, maintainer_edit=True)

    [tid] = deliver_pull_comment(h, "/kugetsu tidy this up", pr).task_ids
    [task] = settle_all(h)

    assert (task.outcome, task.pr_number) == (Outcome.SUCCEEDED, pr), task.error
    after = h.gitea.branch_sha(fork, "fix")
    assert h.gitea.git(fork, "rev-parse", f"{after}~1").strip() == theirs
    assert h.gitea.file_at(fork, "fix", "kugetsu_output.txt") == f"written by task {tid}\n"
    assert h.gitea.branch_sha(REPO, "fix") is None  # nothing pushed to the base repository
    assert list(h.gitea.pulls_of(REPO)) == [pr]


# ---------------------------------------------------------------- what people see


def test_a_follow_up_without_changes_names_the_pull_request_that_is_there(make, tmp_path):
    h = make(agents={"fake": fake_agent(FAKE_MODE="once", FAKE_COUNTER=str(tmp_path / "n"))})
    n = h.issue()
    pr = opened_pull(h, n)
    follow = h.enqueue(n, kind=Kind.CONTINUE, prompt="anything else?")
    h.settle(follow)
    task = h.store.get(follow)
    assert (task.outcome, task.pr_number) == (Outcome.NO_CHANGES, pr)
    comment = h.tracking_comments(n)[-1]["body"]
    assert f"pull request #{pr} is as it was" in comment
    assert "there is no pull request" not in comment


def test_after_a_follow_up_the_pull_request_body_tells_the_files_and_summary_now(make):
    h = make(
        agents={
            "fake": fake_agent(),
            "other": fake_agent("other", FAKE_FILE="second.txt"),
        }
    )
    n = h.issue()
    pr = opened_pull(h, n)
    assert "1 file changed" in h.gitea.pulls_of(REPO)[pr]["body"]
    follow = h.enqueue(n, kind=Kind.CONTINUE, prompt="add a second file", agent="other")
    h.settle(follow)
    body = h.gitea.pulls_of(REPO)[pr]["body"]
    assert "2 files changed" in body and f"task {follow}" in body
    assert f"wrote second.txt for task {follow}" in body
    assert f"Closes #{n}" in body and body.count("Closes #") == 1


def test_a_start_typed_on_the_pull_request_gets_its_result_there_too(make):
    h = make()
    n = h.issue()
    pr = opened_pull(h, n)
    _, result = deliver_comment(h, "/kugetsu start again from scratch", pr, is_pull=True)
    [tid] = result.task_ids
    settle_all(h)
    task = h.store.get(tid)
    assert (task.kind, task.issue, task.answer_on, task.outcome) == (
        Kind.START,
        n,
        pr,
        Outcome.SUCCEEDED,
    )
    [answer] = [c["body"] for c in h.gitea.comments_on(REPO, pr) if "kugetsu:answer=" in c["body"]]
    assert f"@alice: task {tid} (start) has ended. ✅ **Done**: pull request #{pr}" in answer
    assert f"Its tracking comment on #{n} has the details." in answer
    assert task.answer_id and task.answer_id > 0
    # told once, however often the comments are brought up to date again
    h.store.update(tid, summary="touched")
    settle_all(h)
    assert len([c for c in h.gitea.comments_on(REPO, pr) if "kugetsu:answer=" in c["body"]]) == 1


def test_retry_replies_where_it_was_asked_and_its_result_follows_there(make, tmp_path):
    counter = tmp_path / "count"
    h = make(attempts=1, agents={"fake": fake_agent(FAKE_COUNTER=str(counter))})
    n = h.issue()
    first = h.enqueue(n)
    h.settle(first)
    assert h.store.get(first).state is State.FAILED
    # far down the thread, under other comments, someone asks again
    for i in range(3):
        h.gitea.add_comment(REPO, n, f"chatter {i}", login="carol")
    posted, _ = deliver_comment(h, "/kugetsu retry", n, sender="bob")
    settle_all(h)
    task = h.store.get(first)
    assert (task.state, task.outcome, task.answer_on) == (State.COMPLETED, Outcome.SUCCEEDED, n)
    after = [c for c in h.gitea.comments_on(REPO, n) if c["id"] > posted["id"]]
    queued, result = after[0]["body"], after[-1]["body"]
    assert f"@bob: task {first} is queued again with fresh attempts" in queued
    assert f"@alice: task {first} (start) has ended. ✅ **Done**" in result
    assert "Its tracking comment above has the details." in result


def working(make, tmp_path) -> tuple[Harness, int, int]:
    """A harness whose agent works until it is stopped, at work: (harness, issue, task)."""
    pidfile = tmp_path / "pid"
    h = make(agents={"fake": fake_agent(FAKE_MODE="hang", FAKE_PIDFILE=str(pidfile))})
    n = h.issue()
    tid = h.enqueue(n)
    wait_for(pidfile.exists, tick=h.worker.run_tick, what="the agent to start")
    return h, n, tid


def test_stopped_by_someone_tells_the_run_time_and_the_log(make, tmp_path):
    h, n, tid = working(make, tmp_path)
    h.store.request_cancel(tid, "bob")
    h.settle(tid)
    [comment] = h.tracking_comments(n)
    assert "🛑 **Stopped** by @bob." in comment["body"]
    assert "took " in comment["body"] and f"/logs/{tid}/" in comment["body"]


def test_a_task_put_back_by_a_clean_shutdown_shows_it_was_requeued(make, tmp_path):
    h, n, tid = working(make, tmp_path)
    h.worker.shutdown(timeout=10)
    task = h.store.get(tid)
    assert (task.state, task.attempts, task.outcome) == (State.PENDING, 0, None)
    assert task.error == "kugetsu was shut down"
    h.worker.publisher.sync_comments()
    [comment] = h.tracking_comments(n)
    assert "⏳ **Queued again** (kugetsu was shut down)" in comment["body"]
    assert "infra_error" not in comment["body"]


def test_a_retry_back_off_wakes_the_worker_when_it_ends_not_at_the_next_poll(make, tmp_path):
    from bot.scheduler import Scheduler
    from bot.worker.tick import Worker

    counter = tmp_path / "count"
    h = make(agents={"fake": fake_agent(FAKE_COUNTER=str(counter))})
    h.config = replace(
        h.config,
        queue=replace(h.config.queue, poll_interval_seconds=3600, retry_backoff_seconds=(1.0,)),
    )
    scheduler = Scheduler(h.config.queue.poll_interval_seconds)
    worker = Worker(
        h.config,
        h.store,
        h.client,
        h.workspace,
        environ=h.worker.environ,
        schedule_tick=scheduler.wake,
        schedule_at=scheduler.wake_at,
    )
    worker.start()
    try:
        tid = h.enqueue(h.issue())
        scheduler.start(worker.run_tick)  # one tick now; the next by the interval: an hour
        wait_for(
            lambda: h.store.get(tid).outcome is Outcome.SUCCEEDED,
            timeout=30,
            what="the second attempt, after its one-second back-off",
        )
        assert h.store.get(tid).attempts == 2
    finally:
        scheduler.shutdown()
        worker.shutdown(timeout=10)


def test_a_fork_kugetsu_may_not_push_to_is_refused_before_any_run(make, tmp_path):
    record = tmp_path / "runs"
    h = make(agents={"fake": fake_agent(FAKE_RECORD=str(record))})
    fork, theirs, pr = fork_pull(h, maintainer_edit=True)
    h.gitea.set_permission(REPO, "kugetsu-bot", "read")  # no longer a maintainer

    [tid] = deliver_pull_comment(h, "/kugetsu tidy this up", pr).task_ids
    [task] = settle_all(h)

    assert (task.id, task.state, task.attempts) == (tid, State.FAILED, 1)
    assert "Gitea lets those with write access to acme/widget push there" in task.error
    assert not record.exists()  # no agent ran
    assert h.gitea.branch_sha(fork, "fix") == theirs
    [comment] = tracking_on(h, pr)
    assert "kugetsu has read" in comment


def test_maintainer_edits_withdrawn_after_the_request_stop_it_before_any_run(make, tmp_path):
    record = tmp_path / "runs"
    h = make(agents={"fake": fake_agent(FAKE_RECORD=str(record))})
    fork, theirs, pr = fork_pull(h, maintainer_edit=True)
    [tid] = deliver_pull_comment(h, "/kugetsu tidy this up", pr).task_ids
    # the author unticks "Allow edits from maintainers" before the task starts
    h.gitea.pulls_of(REPO)[pr]["allow_maintainer_edit"] = False

    [task] = settle_all(h)

    assert (task.id, task.state, task.attempts) == (tid, State.FAILED, 1)
    assert "whose author has not allowed edits by maintainers" in task.error
    assert not record.exists()  # no agent ran
    assert h.gitea.branch_sha(fork, "fix") == theirs
