"""Nothing lost when deliveries are: reconcile passes find on Gitea what was not delivered."""

from __future__ import annotations

import re
from dataclasses import replace as dc_replace
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
import responses

from bot.config import AgentConfig, ConfigError, load
from bot.core import events
from bot.core import reconcile as core
from bot.core.events import CommentEvent, IssueEvent
from bot.core.outbox import OutboxKind
from bot.core.permissions import UNSHOWN
from bot.core.tasks import Kind, Outcome, State
from bot.gitea import GiteaClient
from bot.ingest import ingest
from bot.worker.reconcile import LEASE
from tests import payloads
from tests.conftest import REPO, TOKEN
from tests.test_worker import Harness, not_admin

pytestmark = pytest.mark.both_modes

# ------------------------------------------------ what a pass makes of Gitea's answers


def entry(entry_id, kind="comment", *, body="", user="alice", at="2026-03-01T10:00:00Z", **kw):
    return {
        "id": entry_id,
        "type": kind,
        "body": body,
        "user": {"login": user},
        "created_at": at,
        "updated_at": at,
        **kw,
    }


def label_entry(entry_id, name="kugetsu", added=True, **kw):
    return entry(entry_id, "label", body="1" if added else "", label={"name": name}, **kw)


ISSUE = {"number": 4, "title": "Fix it", "labels": [{"name": "kugetsu"}], "pull_request": None}
SINCE = datetime(2026, 3, 1, 10, 0, tzinfo=UTC).timestamp()


def test_comments_become_new_comment_events_that_show_no_permission():
    [f] = core.found(REPO, ISSUE, [entry(31, body="/kugetsu start")], label="kugetsu", since=SINCE)
    assert f.delivery.id == "comment:31" == events.event_key(f.event)
    assert f.event == CommentEvent(
        action="created",
        repo=REPO,
        number=4,
        is_pull=False,
        comment_id=31,
        body="/kugetsu start",
        sender="alice",
        permission=UNSHOWN,
        title="Fix it",
        labels=("kugetsu",),
    )


def test_the_last_change_of_the_trigger_label_is_one_label_event_by_its_labeller():
    timeline = [
        label_entry(40, user="bob", at="2026-03-01T10:00:01Z"),
        label_entry(41, added=False, user="carol", at="2026-03-01T10:00:02Z"),
        label_entry(42, user="dave", at="2026-03-01T10:00:03Z"),
        label_entry(43, name="bug", user="erin", at="2026-03-01T10:00:04Z"),
        entry(44, body="thanks", at="2026-03-01T10:00:05Z"),
    ]
    found = core.found(REPO, ISSUE, timeline, label="kugetsu", since=SINCE)
    assert [f.delivery.id for f in found] == ["label:42", "comment:44"]
    assert found[0].event == IssueEvent(
        action="label_updated",
        repo=REPO,
        number=4,
        title="Fix it",
        body="",
        labels=("kugetsu",),
        is_pull=False,
        sender="dave",
        permission=None,
    )


def test_entries_before_the_window_by_kugetsu_or_not_shaped_as_gitea_sends_are_left_out():
    timeline = [
        entry(50, body="old", at="2026-03-01T09:59:59Z"),
        entry(51, body="mine", user="kugetsu-bot"),
        entry(52, body="no user", user=None),
        entry("53", body="id is text"),
        entry(54, body="no time", at=None),
        entry(55, body=None),
        "not an entry",
        entry(56, body="kept", at="2026-03-01T11:00:00+01:00"),  # 10:00 UTC
    ]
    found = core.found(
        REPO, ISSUE, timeline, label="kugetsu", since=SINCE + 0.9, bot_login="kugetsu-bot"
    )
    assert [f.delivery.id for f in found] == ["comment:56"]
    assert core.found(REPO, {"number": "4"}, timeline, label="kugetsu", since=SINCE) == []


def test_the_window_starts_where_the_last_pass_ended_less_the_overlap_and_never_too_far_back():
    day = 86400.0
    assert core.window_start(1000.0, None, 2000.0, 7 * day) == 1000.0
    assert core.window_start(1000.0, 1500.0, 2000.0, 7 * day) == 1500.0 - core.OVERLAP_SECONDS
    now = 100 * day
    oldest = now - (7 * day - core.MEMORY_MARGIN_SECONDS)
    assert core.window_start(1000.0, None, now, 7 * day) == oldest
    assert core.rfc3339(SINCE + 0.99) == "2026-03-01T10:00:00Z"


# ---------------------------------------------------------------- the client's calls


@responses.activate
def test_changed_issues_reads_every_page_since_and_gitea_s_own_time():
    client = GiteaClient("http://gitea.test", TOKEN, retries=0)
    url = "http://gitea.test/api/v1/repos/acme/widget/issues"
    served = datetime(2026, 3, 1, 12, 0, 5, tzinfo=UTC)
    pages = [[{"id": i, "number": i} for i in range(p * 50 + 1, p * 50 + 51)] for p in range(2)]
    for page in (*pages, [{"id": 101, "number": 101}]):
        responses.get(url, json=page, headers={"Date": format_datetime(served, usegmt=True)})
    issues, when = client.changed_issues("acme", "widget", "2026-03-01T10:00:00Z")
    assert [i["number"] for i in issues] == list(range(1, 102))
    assert when == served.timestamp()
    for n, call in enumerate(responses.calls, start=1):
        assert call.request.params == {
            "state": "all",
            "since": "2026-03-01T10:00:00Z",
            "limit": "50",
            "page": str(n),
        }


@responses.activate
def test_a_server_that_ignores_the_page_does_not_make_the_client_loop():
    client = GiteaClient("http://gitea.test", TOKEN, retries=0)
    url = "http://gitea.test/api/v1/repos/acme/widget/issues/3/timeline"
    responses.get(url, json=[{"id": i} for i in range(50)])
    assert len(client.timeline("acme", "widget", 3, "2026-03-01T10:00:00Z")) == 50
    assert len(responses.calls) == 2
    assert responses.calls[1].request.params["page"] == "2"


# ---------------------------------------------------------------- passes against the fake Gitea


@pytest.fixture
def h(tmp_path, gitea):
    harness = Harness(tmp_path, gitea)
    yield harness
    harness.close()


def deliver(h, body: bytes, headers: dict):
    """Take in a delivery as the receiver does, with the rules the worker's passes use."""
    delivery = events.delivery_of(headers, body)
    event = events.parse(delivery, events.load_json(body))
    return ingest(h.store, delivery, event, h.worker.reconciler.rules())


def deliver_comment(h, number: int, comment: dict, sender: str):
    return deliver(
        h,
        *payloads.comment_delivery(
            comment["body"],
            number,
            sender=sender,
            comment_id=comment["id"],
            permission=h.gitea.permission(REPO, sender),
        ),
    )


def deliver_label(h, number: int, labels, sender: str = "alice"):
    return deliver(
        h,
        *payloads.label_delivery(labels, number, sender=sender, author="carol", permission="read"),
    )


def served(h) -> None:
    """kugetsu serves the repository: a delivery came from it (a comment for nobody)."""
    n = h.gitea.create_issue(REPO, "Unrelated", "Nothing to do.")
    comment = h.gitea.add_comment(REPO, n, "Looks fine.", login="bob")
    assert not deliver_comment(h, n, comment, "bob").queued


def tasks_of(h, number: int) -> list:
    return h.store.list_tasks(repo=REPO, issue=number)


def test_a_label_and_a_start_made_while_nothing_was_delivered_run_once_each(h):
    served(h)
    assert h.worker.reconcile().taken_in == 0  # the last pass before "kugetsu stopped"
    labelled = h.gitea.create_issue(REPO, "Add a greeting", "Please add one.", login="carol")
    h.gitea.add_labels(REPO, labelled, "kugetsu", login="alice")
    commented = h.issue("Add a farewell", "Please add one.")
    start = h.gitea.add_comment(REPO, commented, "/kugetsu start", login="bob")
    refused = h.issue("Delete everything", "Please.")
    h.gitea.add_comment(REPO, refused, "/kugetsu start", login="mallory")  # read access

    report = h.worker.reconcile()
    assert report.taken_in == 3 and len(report.tasks) == 3
    [label_task], [comment_task], [mallorys] = (
        tasks_of(h, n) for n in (labelled, commented, refused)
    )
    assert (label_task.requested_by, comment_task.requested_by) == ("alice", "bob")
    h.settle(*report.tasks)
    for task in (label_task, comment_task):
        assert h.store.get(task.id).outcome is Outcome.SUCCEEDED
    assert h.store.get(mallorys.id).state is State.REJECTED
    assert "@mallory needs write access" in h.tracking_comments(refused)[0]["body"]
    assert not (h.config.storage.worktrees_dir / "acme" / "widget" / str(refused)).exists()
    assert len(h.gitea.pulls_of(REPO)) == 2
    # 👀 on the command found, as on a delivered one
    assert h.gitea.reactions.get(start["id"]) == ["eyes"]

    # the deliveries arrive late after all, and another pass sees the same entries again
    assert deliver_label(h, labelled, ["kugetsu"]).task_ids == ()
    late = deliver_comment(h, commented, start, "bob")
    assert late.duplicate and late.task_ids == ()
    again = h.worker.reconcile()
    assert again.taken_in == 0 and again.tasks == []
    assert [len(tasks_of(h, n)) for n in (labelled, commented, refused)] == [1, 1, 1]


def test_what_was_delivered_is_not_taken_in_again_by_the_pass(h):
    served(h)
    h.worker.reconcile()
    labelled = h.issue()
    h.gitea.add_labels(REPO, labelled, "kugetsu", login="alice")
    [label_task] = deliver_label(h, labelled, ["kugetsu"]).task_ids
    commented = h.issue()
    comment = h.gitea.add_comment(REPO, commented, "/kugetsu start", login="bob")
    [comment_task] = deliver_comment(h, commented, comment, "bob").task_ids

    report = h.worker.reconcile()
    assert report.found >= 2 and report.tasks == []
    assert [t.id for t in tasks_of(h, labelled)] == [label_task]
    assert [t.id for t in tasks_of(h, commented)] == [comment_task]
    reactions = [i for i in h.store.outbox_due(100) if i.kind is OutboxKind.REACTION]
    assert [i.target for i in reactions] == [comment["id"]]  # one 👀, the delivery's


def delivery_counts(h) -> dict[str, float]:
    rows = h.store._conn().execute(
        "SELECT labels, value FROM counters WHERE name = 'webhook_deliveries'"
    )
    return {labels: value for labels, value in rows}


def test_what_a_pass_finds_is_not_counted_as_deliveries_and_a_late_delivery_is_a_duplicate(h):
    served(h)
    h.worker.reconcile()
    before = delivery_counts(h)
    n = h.issue()
    comment = h.gitea.add_comment(REPO, n, "/kugetsu start", login="bob")
    assert len(h.worker.reconcile().tasks) == 1
    assert h.worker.reconcile().taken_in == 0  # found again in the overlap
    assert delivery_counts(h) == before
    assert deliver_comment(h, n, comment, "bob").duplicate
    after = delivery_counts(h)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k)} == {
        '{"result":"duplicate"}': 1.0
    }


def test_a_follow_up_written_on_kugetsus_pull_request_is_found_too(h):
    served(h)
    n = h.issue()
    [first] = deliver_label(h, n, ["kugetsu"]).task_ids
    h.settle(first)
    h.worker.reconcile()
    pr = h.store.get(first).pr_number
    h.gitea.add_comment(REPO, pr, "/kugetsu continue add a test", login="bob")
    [follow] = h.worker.reconcile().tasks
    task = h.store.get(follow)
    assert (task.issue, task.kind, task.prompt) == (n, Kind.CONTINUE, "add a test")
    h.settle(follow)
    assert h.store.get(follow).outcome is Outcome.SUCCEEDED
    assert len(h.gitea.pulls_of(REPO)) == 1


def test_a_found_command_may_name_only_an_agent_installed_as_a_delivered_one(h):
    ghost = AgentConfig(name="ghost", command=("/nonexistent/ghost", "{prompt}"))
    tables = {**h.config.agents.tables, "ghost": ghost}
    h.rebuild(config=dc_replace(h.config, agents=dc_replace(h.config.agents, tables=tables)))
    served(h)
    h.worker.reconcile()
    n = h.issue()
    h.gitea.add_comment(REPO, n, "/kugetsu --agent ghost add a file", login="bob")

    report = h.worker.reconcile()

    assert report.tasks == [] and tasks_of(h, n) == []
    h.worker.run_tick()
    [reply] = [c["body"] for c in h.gitea.comments_on(REPO, n) if "kugetsu:reply" in c["body"]]
    assert "there is no agent named `ghost` here" in reply


def test_a_label_removed_unseen_is_remembered_so_adding_it_again_starts_work(h):
    served(h)
    n = h.issue()
    h.gitea.add_labels(REPO, n, "kugetsu", login="alice")
    [first] = deliver_label(h, n, ["kugetsu"]).task_ids
    h.settle(first)
    h.worker.reconcile()
    h.gitea.remove_labels(REPO, n, "kugetsu", login="alice")  # its delivery is lost
    assert h.worker.reconcile().tasks == []
    h.gitea.add_labels(REPO, n, "kugetsu", login="alice")  # delivered, this time
    [again] = deliver_label(h, n, ["kugetsu"]).task_ids
    assert [t.id for t in tasks_of(h, n)] == [first, again]


def test_a_pass_asks_gitea_once_per_repository_and_once_per_changed_issue(h):
    quiet = [h.issue(f"Old {i}", "Nothing new.") for i in range(30)]
    for n in quiet:
        h.gitea.issue(REPO, n)["updated_at"] = "2026-01-01T00:00:00Z"
    served(h)
    for n in quiet:  # the unrelated issue of served() too, for this count
        h.gitea.issue(REPO, n)["updated_at"] = "2026-01-01T00:00:00Z"
    h.gitea.issue(REPO, max(quiet) + 1)["updated_at"] = "2026-01-01T00:00:00Z"
    h.gitea.add_labels(REPO, quiet[3], "kugetsu", login="alice")
    h.gitea.add_comment(REPO, quiet[7], "/kugetsu start", login="bob")
    before = len(h.gitea.requests)

    report = h.worker.reconcile()

    asked = [
        path.split("?")[0]
        for method, path, _, _ in h.gitea.requests[before:]
        if method == "GET" and re.search(r"/issues(\?|/\d+/timeline)", path)
    ]
    assert sorted(asked) == [
        "/api/v1/repos/acme/widget/issues",
        f"/api/v1/repos/acme/widget/issues/{quiet[3]}/timeline",
        f"/api/v1/repos/acme/widget/issues/{quiet[7]}/timeline",
    ]
    assert report.changed == 2 and len(report.tasks) == 2


def test_while_gitea_fails_the_pass_ends_and_the_next_one_looks_again(h):
    served(h)
    h.worker.reconcile()
    n = h.issue()
    h.gitea.add_comment(REPO, n, "/kugetsu start", login="bob")
    h.gitea.fail_next(3, 503, "GET", r"/repos/acme/widget/issues/\d+/timeline")
    failed = h.worker.reconcile()
    assert failed.failed == [REPO] and failed.tasks == []
    assert tasks_of(h, n) == []
    report = h.worker.reconcile()
    assert len(report.tasks) == 1 and [t.id for t in tasks_of(h, n)] == report.tasks


def test_one_process_at_a_time_runs_the_pass(h):
    served(h)
    assert h.store.try_lease(LEASE, "another-worker", 60)
    assert h.worker.reconcile() is None
    h.store.release_lease(LEASE, "another-worker")
    assert h.worker.reconcile() is not None
    assert h.store.try_lease(LEASE, "another-worker", 60)  # let go after the pass


def test_without_admin_a_found_comment_is_refused_as_unverifiable_and_a_label_is_not(h):
    not_admin(h)
    served(h)
    h.worker.reconcile()
    commented, labelled = h.issue(), h.issue()
    h.gitea.add_comment(REPO, commented, "/kugetsu start", login="alice")
    h.gitea.add_labels(REPO, labelled, "kugetsu", login="alice")
    report = h.worker.reconcile()
    h.settle(*report.tasks)
    [comment_task], [label_task] = tasks_of(h, commented), tasks_of(h, labelled)
    assert comment_task.permission_hint == UNSHOWN
    assert h.store.get(comment_task.id).state is State.REJECTED
    assert "kugetsu cannot check that @alice has write access" in h.store.get(comment_task.id).error
    assert h.store.get(label_task.id).outcome is Outcome.SUCCEEDED


def test_reconcile_settings_are_read_and_checked(tmp_path):
    path = tmp_path / "kugetsu.toml"
    path.write_text('[reconcile]\ninterval_minutes = 0\nrepos = ["acme/widget"]\n')
    config = load(path, {}, require_secret=False)
    assert (config.reconcile.interval_seconds, config.reconcile.repos) == (0.0, (REPO,))
    assert load(None, {}, require_secret=False).reconcile.interval_minutes == 10.0
    for bad, message in [
        ('repos = ["acme"]', "reconcile.repos: 'acme' is not OWNER/NAME"),
        ("interval_minutes = -1", "reconcile.interval_minutes must be at least 0"),
        ("every = 5", r"\[reconcile\] has an unknown key: every"),
    ]:
        path.write_text(f"[reconcile]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load(path, {}, require_secret=False)


@pytest.mark.parametrize("section", ["gitea", "reconcile"])
def test_repositories_named_in_the_config_are_polled_from_the_first_pass_on(
    tmp_path, gitea, section
):
    """`gitea.repos` (served: doctor and webhook install count them too) and
    `reconcile.repos` (polled only)."""
    from dataclasses import replace

    h = Harness(tmp_path, gitea)
    try:
        named = replace(getattr(h.config, section), repos=(REPO,))
        h.rebuild(config=replace(h.config, **{section: named}))
        h.worker.reconcile()  # the first pass: the repository is served from now on
        n = h.issue()
        h.gitea.add_comment(REPO, n, "/kugetsu start", login="bob")
        assert len(h.worker.reconcile().tasks) == 1
    finally:
        h.close()
