"""Intake rules: label transitions, every verb, loop guards, dedupe, PR mapping."""

import pytest

from bot.core import events, intake
from bot.core.events import Delivery
from bot.core.intake import Rules
from bot.core.outbox import OutboxItem
from bot.core.permissions import LABELLER
from bot.core.tasks import Kind, State
from bot.ingest import ingest
from bot.store import open_store
from tests import payloads

RULES = Rules(
    label="kugetsu",
    command="/kugetsu",
    bot_login="kugetsu-bot",
    known_agents=frozenset({"opencode", "claude"}),
    default_agent="opencode",
    max_attempts=3,
)


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "db")
    yield s
    s.close()


def deliver(store, body, headers, rules=RULES):
    delivery = events.delivery_of(headers, body)
    event = events.parse(delivery, events.load_json(body))
    return ingest(store, delivery, event, rules)


def label(store, labels, number=7, **kw):
    return deliver(store, *payloads.label_delivery(labels, number, **kw))


def comment(store, text, number=7, **kw):
    return deliver(store, *payloads.comment_delivery(text, number, **kw))


def tasks(store):
    return store.list_tasks()


def outbox(store):
    return store.outbox_due(100)


# ------------------------------------------------------------------ labels


def test_label_added_starts_a_task(store):
    result = label(store, ["kugetsu"])
    assert result.task_ids and not result.duplicate
    [task] = tasks(store)
    assert (task.repo, task.issue, task.kind, task.requested_by, task.state) == (
        "acme/widget",
        7,
        Kind.START,
        "alice",
        State.PENDING,
    )
    assert task.authorized is None and task.permission_hint == "write"


def test_a_label_from_someone_else_carries_only_that_they_could_change_labels(store):
    # repository.permissions is the issue author's (a reader's), not the labeller's
    label(store, ["kugetsu"], sender="adam", author="rita", permission="read")
    [task] = tasks(store)
    assert (task.requested_by, task.permission_hint) == ("adam", LABELLER)


def test_another_label_later_does_not_start_again(store):
    label(store, ["kugetsu"])
    store.transition(tasks(store)[0].id, State.PENDING, State.CANCELLED, event="x")
    result = label(store, ["kugetsu", "bug"])
    assert not result.task_ids
    assert len(tasks(store)) == 1


def test_repeated_label_updated_for_another_label_starts_once(store):
    label(store, ["bug"])
    label(store, ["bug", "kugetsu"])
    label(store, ["bug", "kugetsu", "ui"])
    label(store, ["kugetsu", "ui"])
    assert len(tasks(store)) == 1


def test_label_removed_and_added_again_is_a_new_transition(store):
    label(store, ["kugetsu"])
    store.transition(tasks(store)[0].id, State.PENDING, State.CANCELLED, event="x")
    label(store, [], action="label_cleared")
    label(store, ["kugetsu"])
    assert len(tasks(store)) == 2


def test_opened_with_the_label_starts_and_following_label_updated_does_not(store):
    label(store, ["kugetsu"], action="opened")
    label(store, ["kugetsu"])
    assert len(tasks(store)) == 1


def test_opened_without_label_then_label_added(store):
    label(store, [], action="opened")
    assert tasks(store) == []
    label(store, ["kugetsu"])
    assert len(tasks(store)) == 1


def test_label_added_while_a_task_is_active_answers_already_queued(store):
    comment(store, "/kugetsu start")
    result = label(store, ["kugetsu"])
    assert not result.task_ids
    replies = [o for o in outbox(store) if o.kind == "comment"]
    assert "already queued" in replies[-1].body and replies[-1].needs_permission


def test_label_added_by_the_bot_itself_is_ignored(store):
    assert not label(store, ["kugetsu"], sender="kugetsu-bot").task_ids


def test_pull_request_label_is_not_a_trigger():
    data = payloads.issue_payload("label_updated", labels=["kugetsu"])
    data["issue"]["pull_request"] = {"merged": False}
    event = events.parse(Delivery("d", "issues", "issue_label"), data)
    view = FakeView()
    assert intake.decide(event, RULES, view).intents == []


# ------------------------------------------------------------------ comments


class FakeView:
    def __init__(self, labels=None, active=None, has=False, prs=None, replies=0):
        self.labels, self.active, self.has, self.prs = labels, active, has, prs or {}
        self.replies, self.asked = replies, []

    def previous_labels(self, repo, issue):
        return self.labels

    def active_task(self, repo, issue):
        return self.active

    def has_task(self, repo, issue):
        return self.has

    def issue_for_pr(self, repo, pr):
        return self.prs.get(pr)

    def recent_replies(self, repo, issue, login, seconds):
        self.asked.append((repo, issue, login, seconds))
        return self.replies


def decide_comment(text, view=None, **kw):
    data = payloads.comment_payload(text, **kw)
    event = events.parse(Delivery("d", "issue_comment", "issue_comment"), data)
    return intake.decide(event, RULES, view or FakeView())


def kinds(decision):
    return [(type(i).__name__, getattr(i, "kind", None)) for i in decision.intents]


def test_start_command(store):
    result = comment(store, "/kugetsu start please add docs", comment_id=99)
    [task] = tasks(store)
    assert (task.kind, task.prompt, task.trigger_comment_id) == (Kind.START, "please add docs", 99)
    [reaction] = outbox(store)
    assert (reaction.kind, reaction.target) == ("reaction", 99)
    assert result.task_ids == (task.id,)


def test_second_start_is_answered_already_queued(store):
    comment(store, "/kugetsu start")
    comment(store, "/kugetsu start again")
    assert len(tasks(store)) == 1
    assert any("already queued" in o.body for o in outbox(store))


def test_continue_is_queued_behind_the_active_task(store):
    comment(store, "/kugetsu start")
    comment(store, "/kugetsu continue add a test")
    first, second = tasks(store)
    assert (second.kind, second.prompt, second.state) == (
        Kind.CONTINUE,
        "add a test",
        State.PENDING,
    )


def test_continue_without_any_task_starts(store):
    comment(store, "/kugetsu continue do it")
    [task] = tasks(store)
    assert task.kind is Kind.START and task.prompt == "do it"


def test_free_text_continues_or_starts():
    d = decide_comment("/kugetsu make it faster", FakeView(has=False))
    assert d.intents[-1].kind is Kind.START
    d = decide_comment("/kugetsu make it faster", FakeView(has=True))
    assert d.intents[-1].kind is Kind.CONTINUE and d.intents[-1].prompt == "make it faster"


@pytest.mark.parametrize(
    "verb, kind", [("stop", "stop"), ("cancel", "stop"), ("retry", "retry"), ("status", "status")]
)
def test_control_verbs_become_outbox_work(verb, kind):
    d = decide_comment(f"/kugetsu {verb}", comment_id=5)
    assert kinds(d) == [("NoteReply", None), ("OutboxItem", "reaction"), ("OutboxItem", kind)]
    assert d.intents[2].needs_permission == (kind != "status")


def test_help_replies_with_generated_help():
    d = decide_comment("/kugetsu help")
    assert "/kugetsu continue <instructions>" in d.intents[-1].body
    assert not d.intents[-1].needs_permission


def test_agent_option_and_unknown_agent():
    d = decide_comment("/kugetsu start --agent claude --max-tokens 100")
    assert (d.intents[-1].agent, d.intents[-1].max_tokens) == ("claude", 100)
    d = decide_comment("/kugetsu start --agent nope")
    assert "no agent named `nope`" in d.intents[-1].body


def test_usage_error_is_answered():
    d = decide_comment("/kugetsu continue")
    assert "Usage:" in d.intents[-1].body


@pytest.mark.parametrize(
    "text, kw",
    [
        ("> /kugetsu stop", {}),
        ("```\n/kugetsu start\n```", {}),
        ("/kugetsu start", {"action": "edited"}),
        ("/kugetsu start", {"sender": "kugetsu-bot"}),
        ("<!-- kugetsu:task=3 -->\n/kugetsu stop", {}),
        ("just a comment", {}),
    ],
)
def test_ignored_comments(text, kw):
    assert decide_comment(text, **kw).intents == []


def test_comment_on_kugetsu_pull_request_acts_on_its_issue(store):
    store.set_issue(None, "acme/widget", 7, pr_number=13)
    comment(store, "/kugetsu start")
    store.transition(tasks(store)[0].id, State.PENDING, State.CANCELLED, event="x")
    comment(store, "/kugetsu continue add a test", 13, is_pull=True)
    follow = tasks(store)[-1]
    assert (follow.issue, follow.kind) == (7, Kind.CONTINUE)


def test_comment_on_another_pull_request_is_ignored(store):
    result = comment(store, "/kugetsu start", 21, is_pull=True)
    assert not result.queued and "not opened by kugetsu" in result.reason


# ------------------------------------------------------------------ dedupe


def test_repeated_delivery_is_acknowledged_and_ignored(store):
    body, headers = payloads.comment_delivery("/kugetsu start")
    assert deliver(store, body, headers).task_ids
    again = deliver(store, body, headers)
    assert again.duplicate and not again.task_ids
    assert len(tasks(store)) == 1


def test_start_by_comment_on_a_labelled_issue_remembers_its_labels(store):
    # The issue carried the label before kugetsu heard of it (say, the webhook was added
    # later); the work starts by command. Another label added afterwards is no transition.
    comment(store, "/kugetsu start go", labels=["bug", "kugetsu"])
    [task] = tasks(store)
    store.transition(task.id, State.PENDING, State.CANCELLED, event="x")
    result = label(store, ["bug", "kugetsu", "docs"])
    assert not result.task_ids and not outbox(store)[1:]
    assert len(tasks(store)) == 1
    # a real transition still starts
    label(store, ["bug", "docs"])
    assert label(store, ["bug", "docs", "kugetsu"]).task_ids


def test_plain_comments_do_not_record_labels(store):
    # only a request for work does: a plain comment delivered before the label_updated
    # that added the label must not hide that transition
    comment(store, "Any news?", labels=["kugetsu"])
    assert label(store, ["kugetsu"]).task_ids


# ------------------------------------------------------------------ reply limit

LIMIT = RULES.reply_limit


def _what(intent):
    if isinstance(intent, OutboxItem):
        return ("quiet " if intent.quiet else "") + intent.kind
    return type(intent).__name__


@pytest.mark.parametrize(
    "text, replies, expect",
    [
        # under the limit: answered, and the reply counted
        ("/kugetsu help", 0, ["NoteReply", "reaction", "comment"]),
        ("/kugetsu status", LIMIT - 1, ["NoteReply", "reaction", "status"]),
        ("/kugetsu continue", 0, ["NoteReply", "reaction", "comment"]),  # usage error
        ("/kugetsu stop", 0, ["NoteReply", "reaction", "stop"]),
        ("/kugetsu retry", LIMIT - 1, ["NoteReply", "reaction", "retry"]),
        # at the limit: the reaction alone; stop and retry still act, without a word
        ("/kugetsu help", LIMIT, ["reaction"]),
        ("/kugetsu status", LIMIT, ["reaction"]),
        ("/kugetsu continue", LIMIT + 10, ["reaction"]),
        ("/kugetsu start --agent nope", LIMIT, ["reaction"]),
        ("/kugetsu stop", LIMIT, ["reaction", "quiet stop"]),
        ("/kugetsu retry", LIMIT, ["reaction", "quiet retry"]),
        # a request for work is never limited
        ("/kugetsu start", LIMIT, ["reaction", "RememberLabels", "Enqueue"]),
    ],
)
def test_replies_are_limited_per_user_and_issue(text, replies, expect):
    view = FakeView(replies=replies)
    assert [_what(i) for i in decide_comment(text, view).intents] == expect


def test_the_reply_limit_is_counted_where_the_command_was_written_for_its_sender():
    view = FakeView(prs={13: 7})
    decide_comment("/kugetsu status", view, number=13, is_pull=True, sender="eve")
    assert view.asked == [("acme/widget", 13, "eve", RULES.reply_window_seconds)]


def test_reply_limit_counts_in_the_database_per_user_issue_and_window(tmp_path):
    from dataclasses import replace

    now = [1000.0]
    store = open_store(tmp_path / "db", clock=lambda: now[0])
    rules = replace(RULES, reply_limit=2, reply_window_seconds=60.0)

    def help_from(sender, number=7):
        deliver(
            store, *payloads.comment_delivery("/kugetsu help", number, sender=sender), rules=rules
        )

    def replies():
        return sorted((o.issue, o.requested_by) for o in outbox(store) if o.kind == "comment")

    for _ in range(4):
        help_from("mallory")
    assert replies() == [(7, "mallory")] * 2
    assert len([o for o in outbox(store) if o.kind == "reaction"]) == 4
    help_from("eve")  # another user on the issue, and the same user elsewhere:
    help_from("mallory", 8)  # each has a count of their own
    assert replies() == [(7, "eve"), (7, "mallory"), (7, "mallory"), (8, "mallory")]
    now[0] += 61  # the window has passed
    help_from("mallory")
    assert replies().count((7, "mallory")) == 3
    store.close()


# ------------------------------------------------------------------ start or continue


@pytest.mark.parametrize(
    "asked, has_task, active, expected",
    [
        # no verb: continue if the issue has a task, else start
        (None, False, None, (Kind.START, None)),
        (None, True, None, (Kind.CONTINUE, None)),
        # a start is refused while the issue has an active task; a follow-up queues behind it
        (Kind.START, True, "active", (Kind.START, "active")),
        (Kind.START, True, None, (Kind.START, None)),
        (Kind.CONTINUE, True, "active", (Kind.CONTINUE, None)),
        # a follow-up on an issue without any task starts the work
        (Kind.CONTINUE, False, None, (Kind.START, None)),
    ],
)
def test_start_or_continue(asked, has_task, active, expected):
    view = FakeView(has=has_task, active=active)
    assert intake.start_or_continue(view, "acme/widget", 7, asked) == expected
