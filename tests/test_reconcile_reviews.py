"""Nothing lost when a review's delivery is: a reconcile pass finds reviews on Gitea too.

A review submitted while kugetsu was down (or whose delivery was lost) is found by the
next pass on the pull request it updated, and taken in through the same reading as a
delivered review: the same permission rules, once, whichever comes first.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from bot.core import reviews
from bot.core.tasks import Kind, Outcome
from tests.conftest import REPO, fake_agent
from tests.test_conversations import deliver_review, make, prompt_seen, settle_all
from tests.test_reconcile import delivery_counts, served
from tests.test_worker import replies

pytestmark = pytest.mark.both_modes

__all__ = ["make"]  # the fixture, used by name

LINE_COMMENT = {"path": "kugetsu_output.txt", "line": 1, "body": "/kugetsu say hello here too"}


def kugetsus_pull(h) -> tuple[int, int]:
    """An issue with kugetsu's pull request for it, after its first task, and a pass after
    that (the last one before the review: as if kugetsu stopped then)."""
    served(h)
    n = h.issue()
    h.settle(h.enqueue(n))
    [pr] = h.gitea.pulls_of(REPO)
    h.worker.reconcile()
    return n, pr


def test_a_review_nobody_delivered_becomes_one_follow_up_and_a_late_delivery_takes_nothing(
    make, tmp_path
):
    envfile = tmp_path / "env.json"
    h = make(agents={"fake": fake_agent(FAKE_ENVFILE=str(envfile))})
    n, pr = kugetsus_pull(h)
    review = h.gitea.add_review(REPO, pr, "bob", "COMMENT", body="", comments=[LINE_COMMENT])
    counted = delivery_counts(h)

    report = h.worker.reconcile()

    [follow] = report.tasks
    task = h.store.get(follow)
    assert (task.issue, task.kind, task.requested_by, task.review["id"]) == (
        n,
        Kind.CONTINUE,
        "bob",
        review["id"],
    )
    h.settle(follow)
    assert h.store.get(follow).outcome is Outcome.SUCCEEDED
    prompt = prompt_seen(envfile)
    assert "kugetsu_output.txt, line 1" in prompt
    assert "/kugetsu say hello here too" in prompt
    assert "+written by task" in prompt  # the line's diff hunk
    # a second pass sees the review again (the windows overlap) and takes nothing
    again = h.worker.reconcile()
    assert (again.taken_in, again.tasks) == (0, [])
    # the delivery arrives late after all: its reading finds the review taken
    assert deliver_review(h, pr, review).task_ids == ()
    tasks = settle_all(h)
    assert [t.id for t in tasks if t.kind is Kind.CONTINUE] == [follow]
    # the pass's reading is not a delivery; the late delivery is the one counted
    after = delivery_counts(h)
    assert sum(after.values()) - sum(counted.values()) == 1


def test_the_same_review_by_a_read_only_user_found_by_a_pass_does_nothing_but_say_why(make):
    h = make()
    n, pr = kugetsus_pull(h)
    before = h.gitea.branch_sha(REPO, f"kugetsu/issue-{n}")
    h.gitea.add_review(REPO, pr, "mallory", "COMMENT", body="", comments=[LINE_COMMENT])

    report = h.worker.reconcile()
    settle_all(h)

    assert report.tasks == [] and report.taken_in == 1
    assert len(h.store.list_tasks(repo=REPO, issue=n)) == 1  # the first task alone
    assert h.gitea.branch_sha(REPO, f"kugetsu/issue-{n}") == before
    # told why on the pull request, as for a delivered review, and once
    [refusal] = replies(h, pr)
    assert "Not done: @mallory needs write access to acme/widget" in refusal
    assert h.worker.reconcile().taken_in == 0
    settle_all(h)
    assert len(replies(h, pr)) == 1


def test_a_pass_reads_reviews_only_of_changed_pull_requests_kugetsu_works_on(make):
    h = make()
    n, pr = kugetsus_pull(h)
    quiet = [h.issue(f"Old {i}", "Nothing new.") for i in range(20)]
    for number in (*range(1, pr), *quiet):  # the issues so far: unchanged since long ago
        h.gitea.issue(REPO, number)["updated_at"] = "2026-01-01T00:00:00Z"
    h.gitea.add_comment(REPO, quiet[3], "Just a remark.", login="bob")  # changed, no PR
    h.gitea.commit_files(REPO, {"greet.py": "print('hi')\n"}, branch="feature/greet")
    theirs = h.gitea.open_pull(REPO, "feature/greet", login="alice")  # kugetsu not asked
    h.gitea.add_review(REPO, theirs, "bob", "COMMENT", body="", comments=[])
    review = h.gitea.add_review(REPO, pr, "bob", "COMMENT", body="", comments=[LINE_COMMENT])
    before = len(h.gitea.requests)

    report = h.worker.reconcile()

    asked = sorted(
        path.split("?")[0]
        for method, path, _, _ in h.gitea.requests[before:]
        if method == "GET" and re.search(r"/(issues|pulls)(\?|/\d+/)", path)
    )
    base = "/api/v1/repos/acme/widget"
    assert asked == sorted(
        [
            f"{base}/issues",
            f"{base}/issues/{pr}/timeline",
            f"{base}/issues/{quiet[3]}/timeline",
            f"{base}/issues/{theirs}/timeline",
            f"{base}/pulls/{pr}/reviews",
            f"{base}/pulls/{pr}/reviews/{review['id']}/comments",
        ]
    )
    assert len(report.tasks) == 1
    # the next pass lists the reviews again (the pull request is still in the overlap)
    # but reads no review it took
    before = len(h.gitea.requests)
    h.worker.reconcile()
    assert not [p for m, p, _, _ in h.gitea.requests[before:] if p.endswith("/comments")]


def test_a_pass_takes_only_submitted_reviews_of_its_window_by_others_not_taken_yet():
    def review(i, state="COMMENT", at="2026-03-01T10:00:00Z", user="bob", **kw):
        return {"id": i, "state": state, "submitted_at": at, "user": {"login": user}, **kw}

    listed = [
        review(9),
        review(1, at="2026-03-01T09:59:59Z"),  # before the window
        review(2, state="PENDING"),
        review(3, dismissed=True),
        review(4, user="kugetsu-bot"),
        review(5),  # taken already
        review(6, state="REQUEST_CHANGES", at="2026-03-01T10:00:00.900Z"),
        {"id": 7, "state": "COMMENT", "user": None},
        "not a review",
    ]
    since = datetime(2026, 3, 1, 10, 0, 0, 500000, UTC).timestamp()  # Gitea's whole seconds
    found = reviews.submitted_since(
        listed, since=since, bot_login="kugetsu-bot", taken=lambda i: i == 5
    )
    assert [r["id"] for r in found] == [6, 9]
