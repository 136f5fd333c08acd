"""Intake rules: label transitions, every verb, loop guards, dedupe, PR mapping."""

import json
from dataclasses import replace

import pytest

from bot.core import events, intake, reviews
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


def decide_comment(text, view=None, number=7, **kw):
    data = payloads.comment_payload(text, number, **kw)
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


def test_a_request_on_a_persons_pull_request_is_work_on_that_pull_request(store):
    # a pull request kugetsu did not open is its own issue: the runner works on its branch
    result = comment(store, "/kugetsu start add a test", 21, is_pull=True)
    [task] = tasks(store)
    assert (task.issue, task.kind, task.prompt, task.answer_on) == (
        21,
        Kind.START,
        "add a test",
        None,
    )
    assert result.task_ids == (task.id,)


def test_a_request_typed_on_kugetsus_pull_request_is_answered_there_too(store):
    store.set_issue(None, "acme/widget", 7, pr_number=13)
    comment(store, "/kugetsu start", 13, is_pull=True)
    [task] = tasks(store)
    assert (task.issue, task.answer_on) == (7, 13)


def pull_head(repo, *, edits=False, gone=False):
    head = {"ref": "fix", "repo": None if gone else {"full_name": repo}}
    return {"number": 21, "head": head, "base": {"ref": "main"}, "allow_maintainer_edit": edits}


@pytest.mark.parametrize(
    "pull, refused",
    [
        (pull_head("acme/widget"), False),
        (pull_head("carol/widget", edits=True), False),
        (pull_head("carol/widget"), True),
        (pull_head("carol/widget", edits=True, gone=True), True),
    ],
)
def test_a_fork_kugetsu_may_not_push_to_gets_a_reply_instead_of_work(pull, refused):
    d = decide_comment("/kugetsu tidy it up", number=21, is_pull=True, pull=pull)
    work = [i for i in d.intents if isinstance(i, intake.Enqueue)]
    assert bool(work) is not refused
    if refused:
        assert "cannot work on this pull request" in d.intents[-1].body
        assert d.intents[-1].issue == 21  # answered on the pull request
    # anything but a request for work is answered as anywhere
    assert kinds(decide_comment("/kugetsu status", number=21, is_pull=True, pull=pull))[-1] == (
        "OutboxItem",
        "status",
    )


@pytest.mark.parametrize(
    "text, guess",
    [
        ("/kugetsu stpo", "did you mean `stop`?"),
        ("/kugetsu frobnicate", "is not a kugetsu command."),
    ],
)
def test_a_lone_unknown_word_gets_did_you_mean_and_the_help_not_a_run(text, guess):
    d = decide_comment(text, view=FakeView(has=True))
    assert not [i for i in d.intents if isinstance(i, intake.Enqueue)]
    reply = d.intents[-1]
    assert guess in reply.body and "/kugetsu continue <instructions>" in reply.body
    assert not reply.needs_permission
    # a sentence is still a request
    d = decide_comment("/kugetsu make the timer stop drifting", view=FakeView(has=True))
    assert d.intents[-1].kind is Kind.CONTINUE


def test_help_lists_the_agents_installed():
    d = decide_comment("/kugetsu help")
    assert (
        "Agents available for `--agent`: `claude`, `opencode` (the default)." in d.intents[-1].body
    )


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


# ------------------------------------------------------------------ reviews


def review_delivery(state="COMMENT", content="", sender="bob", number=13):
    event_type = {"APPROVED": "approved", "REQUEST_CHANGES": "rejected", "COMMENT": "comment"}
    data = {
        "action": "reviewed",
        "number": number,
        "pull_request": {"number": number, "user": payloads.user("kugetsu-bot")},
        "requested_reviewer": None,
        "repository": payloads.repository(permission="admin"),  # the PR author's
        "sender": payloads.user(sender),
        "commit_id": "",
        "review": {"type": f"pull_request_review_{event_type[state]}", "content": content},
    }
    delivery = Delivery("d", "pull_request_comment", f"pull_request_review_{event_type[state]}")
    return events.parse(delivery, data)


def test_a_review_of_kugetsus_pull_request_is_left_for_the_worker_to_read():
    event = review_delivery("REQUEST_CHANGES", "")
    assert (event.state, event.body, event.sender) == ("REQUEST_CHANGES", "", "bob")
    d = intake.decide(event, RULES, FakeView(prs={13: 7}))
    [item] = d.intents
    assert (item.kind, item.issue, item.target, item.requested_by) == ("review", 7, 13, "bob")
    assert json.loads(item.body) == {"state": "REQUEST_CHANGES", "body": ""}
    assert item.permission_hint is None  # never the delivery's, which is the PR author's
    # not kugetsu's pull request, or kugetsu's own review: nothing
    assert intake.decide(event, RULES, FakeView()).intents == []
    own = review_delivery(sender="kugetsu-bot")
    assert intake.decide(own, RULES, FakeView(prs={13: 7})).intents == []


def a_review(*texts, state="COMMENT", body=""):
    comments = [
        {
            "id": 100 + i,
            "path": f"f{i}.py",
            "position": i + 1,
            "body": text,
            "user": {"login": "bob"},
        }
        for i, text in enumerate(texts)
    ]
    listed = {"id": 5, "state": state, "body": body, "user": {"login": "bob"}}
    return reviews.from_api(listed, comments)


def decide_review(review, *, allowed=True, rules=RULES, view=None):
    request = intake.ReviewRequest(
        "acme/widget",
        13,
        review,
        permission="write" if allowed else None,
        allowed=allowed,
        refusal=""
        if allowed
        else "@bob needs write access to acme/widget to use kugetsu (has read)",
    )
    return intake.decide(request, rules, view or FakeView(prs={13: 7}, has=True))


def test_a_review_with_a_command_in_a_line_comment_asks_for_a_follow_up():
    d = decide_review(a_review("just a remark", "/kugetsu use a constant here"))
    [work] = [i for i in d.intents if isinstance(i, intake.Enqueue)]
    assert (work.issue, work.kind, work.prompt, work.answer_on) == (
        7,
        Kind.CONTINUE,
        "use a constant here",
        13,
    )
    assert [c["path"] for c in work.review["comments"]] == ["f0.py", "f1.py"]
    assert work.permission == "write"
    # a command word alone in a review asks for work on it, not for help
    alone = decide_review(a_review("/kugetsu"))
    assert [i.kind for i in alone.intents if isinstance(i, intake.Enqueue)] == [Kind.CONTINUE]


@pytest.mark.parametrize("state", ["APPROVED", "REQUEST_CHANGES", "COMMENT"])
def test_a_review_in_any_state_with_a_command_in_its_text_asks_for_a_follow_up(state):
    d = decide_review(a_review(state=state, body="Looks fine.\n/kugetsu add a changelog line"))
    [work] = [i for i in d.intents if isinstance(i, intake.Enqueue)]
    assert (work.kind, work.prompt, work.review["state"]) == (
        Kind.CONTINUE,
        "add a changelog line",
        state,
    )


def test_a_review_is_read_for_commands_only_where_readers_see_them():
    assert decide_review(a_review("> /kugetsu fix it", "`/kugetsu` is the word")).intents == []


def test_a_review_from_someone_who_may_not_ask_is_answered_why_and_does_nothing():
    d = decide_review(a_review("/kugetsu fix it"), allowed=False)
    assert not [i for i in d.intents if isinstance(i, intake.Enqueue)]
    assert "Not done: @bob needs write access" in d.intents[-1].body
    assert d.intents[-1].issue == 13  # on the pull request


def test_changes_requested_ask_for_a_follow_up_only_when_configured():
    changes = a_review(state="REQUEST_CHANGES", body="Rename it.")
    assert decide_review(changes).intents == []
    on = replace(RULES, review_changes=True)
    [work] = [i for i in decide_review(changes, rules=on).intents if isinstance(i, intake.Enqueue)]
    assert (work.kind, work.prompt, work.review["body"]) == (Kind.CONTINUE, "", "Rename it.")
    # from someone who may not ask: nothing at all, not even a reply
    assert decide_review(changes, rules=on, allowed=False).intents == []
    # an approval or a comment is not a request for changes
    assert decide_review(a_review(state="APPROVED", body="ok"), rules=on).intents == []
