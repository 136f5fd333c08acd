"""Everything kugetsu says on Gitea, as tables of inputs and the exact text they give.

core.render is pure, so each row is the data that goes in and the text that comes out.
The texts are the same, word for word, as the modules that wrote them before render
existed (checked when it was split out): any change to a text shows here.
"""

import pytest

from bot.config import Config, GiteaConfig, ServerConfig
from bot.core import render
from bot.core.commands import CommandError, UnknownVerb
from bot.core.render import QueueLoad, QueueView
from bot.core.tasks import Kind, Outcome, State, Task
from tests.conftest import a_task

SECRETS = dict(token="tok-ABCDEF123", webhook_secret="whsec-987654")
CONFIG = Config(
    server=ServerConfig(public_url="https://kugetsu.example"),
    gitea=GiteaConfig(url="https://git.example", **SECRETS),
)
NO_PUBLIC_URL = Config(gitea=GiteaConfig(url="https://git.example", **SECRETS))
LOG = "https://kugetsu.example/logs/12/b554741c01e7f94969f98485"


def task(**kw) -> Task:
    times = dict(
        started_at=1_800_000_000.0,  # 2027-01-15 08:00:00 UTC
        finished_at=1_800_000_125.0,
    )
    return a_task(**{**times, **kw})


# ------------------------------------------------------------------ the tracking comment

# (the task's fields, QueueView(position, busy, limit), the log's tail, config) -> text
TRACKING = [
    pytest.param(
        dict(),
        QueueView(2, 3, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "⏳ **Queued**: position 2 in the queue, 3 of 3 agents busy."
        ),
        id="queued",
    ),
    pytest.param(
        dict(),
        QueueView(None, 1, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "⏳ **Queued**: 1 of 3 agents busy."
        ),
        id="queued, position unknown",
    ),
    pytest.param(
        dict(
            attempts=1, outcome=Outcome.TIMED_OUT, error="ran too long", not_before=1_800_000_200.0
        ),
        QueueView(2, 3, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "🔁 **Retrying**: attempt 1 of 3 ended with `timed_out` (ran too long). Next attempt not before 2027-01-15 08:03:20 UTC; position 2 in the queue, 3 of 3 agents busy."
        ),
        id="retrying",
    ),
    pytest.param(
        dict(state=State.RUNNING, attempts=2),
        QueueView(None, 3, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "🛠️ **Working**: agent `opencode`, attempt 2 of 3, started 2027-01-15 08:00:00 UTC · [log]({LOG})."
        ),
        id="working",
    ),
    pytest.param(
        dict(state=State.RUNNING, attempts=1),
        QueueView(None, 1, 3),
        "",
        NO_PUBLIC_URL,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "🛠️ **Working**: agent `opencode`, attempt 1 of 3, started 2027-01-15 08:00:00 UTC."
        ),
        id="working, no public URL",
    ),
    pytest.param(
        dict(state=State.RUNNING, attempts=1, cancel_requested_by="bob"),
        QueueView(None, 1, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "🛠️ **Working**: agent `opencode`, attempt 1 of 3, started 2027-01-15 08:00:00 UTC · [log]({LOG}).\n"
            "\n"
            "Stopping, as requested by @bob."
        ),
        id="stopping",
    ),
    pytest.param(
        dict(state=State.REJECTED, error="@eve needs write access to acme/widget"),
        QueueView(None, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "🚫 **Not started**: @eve needs write access to acme/widget"
        ),
        id="not started",
    ),
    pytest.param(
        dict(state=State.CANCELLED, cancel_requested_by="bob"),
        QueueView(None, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "🛑 **Stopped** by @bob. It had not started."
        ),
        id="stopped",
    ),
    pytest.param(
        dict(state=State.CANCELLED, cancel_requested_by="cli"),
        QueueView(None, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "🛑 **Stopped** from the kugetsu command line. It had not started."
        ),
        id="stopped from the command line",
    ),
    pytest.param(
        dict(
            state=State.COMPLETED,
            outcome=Outcome.SUCCEEDED,
            attempts=1,
            pr_number=9,
            files_changed=3,
            summary="Added greeting.",
            usage={"input_tokens": 12000, "output_tokens": 800, "cost_usd": 0.0421},
        ),
        QueueView(None, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "✅ **Done**: pull request #9, 3 files changed.\n"
            "\n"
            "```text\n"
            "Added greeting.\n"
            "```\n"
            "\n"
            "<sub>agent `opencode` · took 2m05s · attempt 1 of 3 · 12,000 tokens in, 800 out, cost $0.0421 · [log]({LOG})</sub>"
        ),
        id="done",
    ),
    pytest.param(
        dict(
            state=State.COMPLETED,
            outcome=Outcome.SUCCEEDED,
            attempts=2,
            pr_number=9,
            files_changed=1,
        ),
        QueueView(None, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "✅ **Done**: pull request #9, 1 file changed.\n"
            "\n"
            "<sub>agent `opencode` · took 2m05s · attempt 2 of 3 · [log]({LOG})</sub>"
        ),
        id="done, one file",
    ),
    pytest.param(
        dict(
            state=State.COMPLETED, outcome=Outcome.NO_CHANGES, attempts=1, summary="Nothing to do."
        ),
        QueueView(None, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "➖ **No changes**: the agent finished without changing any files, so there is no pull request.\n"
            "\n"
            "```text\n"
            "Nothing to do.\n"
            "```\n"
            "\n"
            "<sub>agent `opencode` · took 2m05s · attempt 1 of 3 · [log]({LOG})</sub>"
        ),
        id="no changes",
    ),
    pytest.param(
        dict(
            state=State.FAILED,
            outcome=Outcome.AGENT_FAILED,
            attempts=3,
            error="exit code 3 with whsec-987654",
        ),
        QueueView(None, 0, 3),
        "step 1\nleaked tok-ABCDEF123 here\n```\nclosing fence\n",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "❌ **Failed** (`agent_failed`) after 3 attempts: exit code 3 with [redacted]\n"
            "\n"
            "<details><summary>Last lines of the log</summary>\n"
            "\n"
            "```\n"
            "step 1\n"
            "leaked [redacted] here\n"
            "ʼʼʼ\n"
            "closing fence\n"
            "```\n"
            "</details>\n"
            "\n"
            "Comment `/kugetsu retry` to try again.\n"
            "\n"
            "<sub>agent `opencode` · took 2m05s · attempt 3 of 3 · [log]({LOG})</sub>"
        ),
        id="failed",
    ),
    pytest.param(
        dict(
            state=State.FAILED, outcome=Outcome.INFRA_ERROR, attempts=1, error="git: push refused"
        ),
        QueueView(None, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "❌ **Failed** (`infra_error`) after 1 attempt: git: push refused\n"
            "\n"
            "Comment `/kugetsu retry` to try again.\n"
            "\n"
            "<sub>agent `opencode` · took 2m05s · attempt 1 of 3 · [log]({LOG})</sub>"
        ),
        id="failed, one attempt, no log",
    ),
    pytest.param(
        dict(state=State.CANCELLED, cancel_requested_by="bob", attempts=1),
        QueueView(None, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "🛑 **Stopped** by @bob.\n"
            "\n"
            "<sub>agent `opencode` · took 2m05s · attempt 1 of 3 · [log]({LOG})</sub>"
        ),
        id="stopped while working: its run time and log",
    ),
    pytest.param(
        dict(error="kugetsu was shut down"),
        QueueView(1, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "⏳ **Queued again** (kugetsu was shut down): position 1 in the queue, 0 of 3 agents busy."
        ),
        id="put back by a clean shutdown: requeued, no outcome",
    ),
    pytest.param(
        dict(
            kind=Kind.CONTINUE,
            state=State.COMPLETED,
            outcome=Outcome.NO_CHANGES,
            attempts=1,
            pr_number=9,
        ),
        QueueView(None, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (continue, requested by @alice)\n"
            "\n"
            "➖ **No changes**: the agent finished without changing any files; pull request #9 is as it was.\n"
            "\n"
            "<sub>agent `opencode` · took 2m05s · attempt 1 of 3 · [log]({LOG})</sub>"
        ),
        id="no changes on an issue with a pull request",
    ),
    pytest.param(
        dict(
            issue=21,
            state=State.COMPLETED,
            outcome=Outcome.SUCCEEDED,
            attempts=1,
            pr_number=21,
            branch="feature/greet",
            files_changed=2,
        ),
        QueueView(None, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "✅ **Done**: pushed to this pull request's branch `feature/greet`, 2 files changed.\n"
            "\n"
            "<sub>agent `opencode` · took 2m05s · attempt 1 of 3 · [log]({LOG})</sub>"
        ),
        id="done on a person's pull request",
    ),
    pytest.param(
        dict(
            state=State.FAILED,
            outcome=Outcome.AGENT_FAILED,
            attempts=1,
            error="agent not installed: cannot start agent 'opencode': command not found "
            "(No such file or directory)",
        ),
        QueueView(None, 0, 3),
        "[kugetsu: cannot start agent 'opencode': command not found]\n",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested by @alice)\n"
            "\n"
            "⚠️ **Not started**: the agent `opencode` is not installed where kugetsu runs "
            "(cannot start agent 'opencode': command not found (No such file or directory)).\n"
            "\n"
            "This needs an operator of kugetsu, not a retry: install the agent, or set "
            "`agents.opencode.command` to where it is, check with `kugetsu doctor`, then queue "
            "this task again with `kugetsu queue retry 12`."
        ),
        id="failed: the agent is not installed",
    ),
    pytest.param(
        dict(requested_by="cli"),
        QueueView(1, 0, 3),
        "",
        CONFIG,
        (
            "<!-- kugetsu:task=12 -->\n"
            "**kugetsu** · task 12 (start, requested from the command line)\n"
            "\n"
            "⏳ **Queued**: position 1 in the queue, 0 of 3 agents busy."
        ),
        id="queued from the command line",
    ),
]


@pytest.mark.parametrize("fields, queue, log_tail, config, expected", TRACKING)
def test_tracking_comment(fields, queue, log_tail, config, expected):
    body = render.tracking(task(**fields), config, queue, log_tail=log_tail)
    assert body == expected.replace("{LOG}", LOG)


def test_every_state_starts_with_the_tasks_marker():
    # the marker is how a tracking comment lost in a crash is found again
    for state in State:
        body = render.tracking(
            task(state=state, outcome=Outcome.AGENT_FAILED), CONFIG, QueueView(1, 0, 3)
        )
        assert body.startswith(render.marker(12) + "\n")


# ------------------------------------------------------------------ pull requests

# (the agent's summary, files changed, usage, config) -> the body of task 12's pull request
PR_BODY = [
    pytest.param(
        "Did it. token tok-ABCDEF123",
        1,
        {"input_tokens": 5, "output_tokens": 6},
        CONFIG,
        (
            "Closes #7\n"
            "\n"
            "```text\n"
            "Did it. token [redacted]\n"
            "```\n"
            "\n"
            "---\n"
            "Written by kugetsu · task 12 · agent `opencode` · 1 file changed · 5 tokens in, 6 out · [task log]({LOG})\n"
            "<!-- kugetsu:task=12 -->"
        ),
        id="summary and usage",
    ),
    pytest.param(
        "",
        4,
        {},
        CONFIG,
        (
            "Closes #7\n"
            "\n"
            "---\n"
            "Written by kugetsu · task 12 · agent `opencode` · 4 files changed · [task log]({LOG})\n"
            "<!-- kugetsu:task=12 -->"
        ),
        id="no summary",
    ),
    pytest.param(
        "x",
        2,
        {"cost_usd": 0.5},
        NO_PUBLIC_URL,
        (
            "Closes #7\n"
            "\n"
            "```text\n"
            "x\n"
            "```\n"
            "\n"
            "---\n"
            "Written by kugetsu · task 12 · agent `opencode` · 2 files changed · cost $0.5000\n"
            "<!-- kugetsu:task=12 -->"
        ),
        id="no public URL",
    ),
]


@pytest.mark.parametrize("summary, files, usage, config, expected", PR_BODY)
def test_pull_request_body(summary, files, usage, config, expected):
    body = render.pr_body(task(), config, summary=summary, files_changed=files, usage=usage)
    assert body == expected.replace("{LOG}", LOG)


def test_follow_up_comment_on_a_pull_request_it_did_not_open():
    follow_up = task(id=14, kind=Kind.CONTINUE, requested_by="bob")
    from_shell = task(id=15, kind=Kind.CONTINUE, requested_by="cli")
    assert "@cli" not in render.follow_up(from_shell, CONFIG, summary="", files_changed=1)
    assert render.follow_up(follow_up, CONFIG, summary="Fixed the test.", files_changed=2) == (
        "<!-- kugetsu:follow-up=14 -->\n"
        "Pushed a follow-up requested by @bob (task 14, 2 files changed in this pull request so far).\n"
        "\n"
        "```text\n"
        "Fixed the test.\n"
        "```"
    )


def test_a_follow_up_answers_a_review_comment_by_comment():
    review = {
        "id": 5,
        "state": "REQUEST_CHANGES",
        "body": "",
        "user": "bob",
        "comments": [
            {"id": 31, "path": "app.py", "line": 3, "old_side": False, "body": "x"},
            {"id": 32, "path": "a`b.md", "line": 7, "old_side": True, "body": "y"},
            {"id": 33, "path": "docs.md", "line": 0, "old_side": False, "body": "z"},
        ],
    }
    follow_up = task(id=14, kind=Kind.CONTINUE, requested_by="bob", review=review)
    text = render.review_answer(
        follow_up,
        CONFIG,
        summary="1: fixed. 2: left. 3: left.",
        files_changed=2,
        changed=["app.py", "docs.md"],
        resolved=[31],
    )
    assert text == (
        "<!-- kugetsu:follow-up=14 -->\n"
        "@bob: pushed a follow-up for your review (changes requested), task 14, 2 files "
        "changed in this pull request so far.\n"
        "\n"
        "1. `app.py` line 3: its file changed in this push; conversation resolved\n"
        "2. `a'b.md` line 7 of the old file: its file did not change in this push\n"
        "3. `docs.md` (the whole file): its file changed in this push\n"
        "\n"
        "```text\n"
        "1: fixed. 2: left. 3: left.\n"
        "```"
    )


# ------------------------------------------------------------------ where it was asked

# (the task's fields) -> its result, posted where it was asked (render.answer), or None
# when it is not due there (render.answer_due)
ANSWERS = [
    pytest.param(
        dict(
            answer_on=21,
            state=State.COMPLETED,
            outcome=Outcome.SUCCEEDED,
            attempts=1,
            pr_number=21,
            files_changed=2,
            summary="Did it.",
        ),
        (
            "<!-- kugetsu:answer=12 -->\n"
            "@alice: task 12 (start) has ended. ✅ **Done**: pull request #21, 2 files changed.\n"
            "\n"
            "```text\n"
            "Did it.\n"
            "```\n"
            "\n"
            "Its tracking comment on #7 has the details."
        ),
        id="a start typed on the pull request",
    ),
    pytest.param(
        dict(
            answer_on=7,
            state=State.FAILED,
            outcome=Outcome.AGENT_FAILED,
            attempts=3,
            error="exited with code 3: tok-ABCDEF123",
        ),
        (
            "<!-- kugetsu:answer=12 -->\n"
            "@alice: task 12 (start) has ended. ❌ **Failed** (`agent_failed`) after 3 attempts: "
            "exited with code 3: [redacted]\n"
            "\n"
            "Its tracking comment above has the details."
        ),
        id="a retry asked on the issue, failed",
    ),
    pytest.param(
        dict(answer_on=21, state=State.CANCELLED, cancel_requested_by="bob", attempts=1),
        (
            "<!-- kugetsu:answer=12 -->\n"
            "@alice: task 12 (start) has ended. 🛑 **Stopped** by @bob.\n"
            "\n"
            "Its tracking comment on #7 has the details."
        ),
        id="stopped",
    ),
    pytest.param(
        dict(
            answer_on=21,
            kind=Kind.CONTINUE,
            state=State.COMPLETED,
            outcome=Outcome.SUCCEEDED,
            pr_number=21,
        ),
        None,
        id="a follow-up that pushed: its comment on the pull request says so already",
    ),
    pytest.param(dict(answer_on=21, state=State.RUNNING), None, id="still running"),
    pytest.param(dict(answer_on=21, state=State.REJECTED), None, id="refused"),
    pytest.param(dict(state=State.FAILED), None, id="asked where its comment is"),
    pytest.param(dict(answer_on=21, state=State.FAILED, answer_id=77), None, id="answered already"),
]


@pytest.mark.parametrize("fields, expected", ANSWERS)
def test_answers_where_it_was_asked(fields, expected):
    the_task = task(**fields)
    assert render.answer_due(the_task) is (expected is not None)
    if expected is not None:
        assert render.answer(the_task, CONFIG) == expected


# ------------------------------------------------------------------ replies to commands

SENDER = "bob"
# (the text as rendered) -> the text as written on Gitea (render.reply)
REPLIES = [
    pytest.param(
        lambda: render.already_active(SENDER, task(id=3)),
        "@bob kugetsu is already queued on this issue (task 3). Use `continue <instructions>` to follow up, or `stop` to stop it.",
        id="already queued",
    ),
    pytest.param(
        lambda: render.already_active(SENDER, task(id=4, state=State.RUNNING)),
        "@bob kugetsu is already running on this issue (task 4). Use `continue <instructions>` to follow up, or `stop` to stop it.",
        id="already running",
    ),
    pytest.param(
        lambda: render.usage_error(
            SENDER,
            CommandError("continue needs instructions", "`/kugetsu continue <instructions>`"),
        ),
        "@bob continue needs instructions. Usage: `/kugetsu continue <instructions>`",
        id="usage error",
    ),
    pytest.param(
        lambda: render.unknown_agent(SENDER, "nope", {"opencode", "claude"}),
        "@bob there is no agent named `nope` here. Available: `claude`, `opencode`.",
        id="unknown agent",
    ),
    pytest.param(
        lambda: render.unknown_verb(SENDER, UnknownVerb("stpo", ("stop",)), "HELP"),
        "@bob `stpo` is not a kugetsu command; did you mean `stop`? Nothing was started: to ask for work, write a sentence of instructions.\n\nHELP",
        id="a typo of a verb",
    ),
    pytest.param(
        lambda: render.unknown_verb(SENDER, UnknownVerb("frob`nicate"), "HELP"),
        "@bob `frob'nicate` is not a kugetsu command. Nothing was started: to ask for work, write a sentence of instructions.\n\nHELP",
        id="an unknown word",
    ),
    pytest.param(
        lambda: render.fork_not_editable(SENDER, "carol/widget"),
        '@bob kugetsu cannot work on this pull request: its branch is in the fork carol/widget, whose author has not allowed edits by maintainers (the pull request\'s "Allow edits from maintainers"), so kugetsu cannot push to it. Nothing was started.',
        id="a fork without edits by maintainers",
    ),
    pytest.param(
        lambda: render.fork_not_editable(SENDER, None),
        "@bob kugetsu cannot work on this pull request: its branch is in a fork that no longer exists, so kugetsu cannot push to it. Nothing was started.",
        id="a fork that is gone",
    ),
    pytest.param(
        lambda: render.retry_queued(task(id=5), "bob", 7),
        "@bob: task 5 is queued again with fresh attempts; its result will be posted here when it ends.",
        id="retry, asked on the issue",
    ),
    pytest.param(
        lambda: render.retry_queued(task(id=5), "bob", 21),
        "@bob: task 5 is queued again with fresh attempts; its result will be posted here when it ends. Its tracking comment is on #7.",
        id="retry, asked on the pull request",
    ),
    pytest.param(
        lambda: render.reply(render.NOTHING_TO_STOP, ()),
        ("<!-- kugetsu:reply -->\nThere is nothing to stop on this issue."),
        id="nothing to stop",
    ),
    pytest.param(
        lambda: render.reply(render.NOTHING_TO_RETRY, ()),
        ("<!-- kugetsu:reply -->\nThere is no failed or stopped task to retry on this issue."),
        id="nothing to retry",
    ),
    pytest.param(
        lambda: render.reply(render.retry_blocked(task(id=5)), ()),
        (
            "<!-- kugetsu:reply -->\n"
            "Task 5 is still active on this issue; stop it first or wait for it to finish."
        ),
        id="retry blocked",
    ),
    pytest.param(
        lambda: render.reply(
            render.not_done(render.needs_permission("eve", "write", "acme/widget", "read")), ()
        ),
        (
            "<!-- kugetsu:reply -->\n"
            "Not done: @eve needs write access to acme/widget to use kugetsu (has read)."
        ),
        id="not done",
    ),
    pytest.param(
        lambda: render.reply("a tok-ABCDEF123 b", CONFIG.secrets()),
        ("<!-- kugetsu:reply -->\na [redacted] b"),
        id="a secret in a reply",
    ),
    pytest.param(
        lambda: render.reply(render.status(STATUS_TASKS, CONFIG, QueueLoad(2, 5, 3)), ()),
        (
            "<!-- kugetsu:reply -->\n"
            "kugetsu on this issue:\n"
            "\n"
            "| task | kind | state | outcome | attempts | PR |\n"
            "|---|---|---|---|---|---|\n"
            "| 1 | start | failed | agent_failed | 3/3 |  |\n"
            "| 2 | continue | completed | succeeded | 1/3 | #9 |\n"
            "| 3 | start | pending |  | 0/3 |  |\n"
            "\n"
            "Agents busy: 2 of 3; tasks waiting: 5."
        ),
        id="status, with the queue",
    ),
    pytest.param(
        lambda: render.reply(render.status(STATUS_TASKS, CONFIG, None), ()),
        (
            "<!-- kugetsu:reply -->\n"
            "kugetsu on this issue:\n"
            "\n"
            "| task | kind | state | outcome | attempts | PR |\n"
            "|---|---|---|---|---|---|\n"
            "| 1 | start | failed | agent_failed | 3/3 |  |\n"
            "| 2 | continue | completed | succeeded | 1/3 | #9 |\n"
            "| 3 | start | pending |  | 0/3 |  |"
        ),
        id="status, without the queue",
    ),
    pytest.param(
        lambda: render.reply(render.status([], CONFIG, None), ()),
        (
            "<!-- kugetsu:reply -->\n"
            "kugetsu has no tasks for this issue. Comment `/kugetsu start` or add the label `kugetsu`."
        ),
        id="status, no tasks",
    ),
    pytest.param(
        lambda: render.help_text("/kugetsu", "kugetsu"),
        (
            "**kugetsu** turns this issue into a pull request written by an AI coding agent. Add the label `kugetsu`, or comment one of these on its own line:\n"
            "\n"
            "| command | what it does |\n"
            "|---|---|\n"
            "| `/kugetsu start [instructions]` | Start work on this issue; optional instructions are added to the issue text. |\n"
            "| `/kugetsu continue <instructions>` | Follow up in the same worktree, branch and agent session (on the issue or its PR). |\n"
            "| `/kugetsu stop` (also `/kugetsu cancel`) | Stop the running or queued task for this issue. |\n"
            "| `/kugetsu status` | Reply with the state of this issue's tasks. |\n"
            "| `/kugetsu retry` | Queue the last failed or stopped task again, with fresh attempts. |\n"
            "| `/kugetsu help` | Show this help. |\n"
            "| `/kugetsu <instructions>` | Continue if this issue already has a task, else start. |\n"
            "\n"
            "Options, after the command word or the verb:\n"
            "- `--agent ...`: run this request with the named agent\n"
            "- `--max-tokens ...`: stop the agent when it has used this many tokens (at most 1,000,000,000,000)\n"
            "- `--max-cost ...`: stop the agent when it has cost this many USD (at most 1,000,000)\n"
            "\n"
            "On a pull request kugetsu opened, a review whose text or line comments hold a `/kugetsu` line is answered with a follow-up that gets every line comment. On a pull request a person opened, `/kugetsu <instructions>` adds commits to its branch.\n"
            "\n"
            "Quoted lines, code blocks and HTML comments are never read as commands. Starting, following up, stopping and retrying need write access to the repository."
        ),
        id="help",
    ),
    pytest.param(
        lambda: render.help_text("/bot", "ai", {"fake", "aider"}, "fake"),
        (
            "**kugetsu** turns this issue into a pull request written by an AI coding agent. Add the label `ai`, or comment one of these on its own line:\n"
            "\n"
            "| command | what it does |\n"
            "|---|---|\n"
            "| `/bot start [instructions]` | Start work on this issue; optional instructions are added to the issue text. |\n"
            "| `/bot continue <instructions>` | Follow up in the same worktree, branch and agent session (on the issue or its PR). |\n"
            "| `/bot stop` (also `/bot cancel`) | Stop the running or queued task for this issue. |\n"
            "| `/bot status` | Reply with the state of this issue's tasks. |\n"
            "| `/bot retry` | Queue the last failed or stopped task again, with fresh attempts. |\n"
            "| `/bot help` | Show this help. |\n"
            "| `/bot <instructions>` | Continue if this issue already has a task, else start. |\n"
            "\n"
            "Options, after the command word or the verb:\n"
            "- `--agent ...`: run this request with the named agent\n"
            "- `--max-tokens ...`: stop the agent when it has used this many tokens (at most 1,000,000,000,000)\n"
            "- `--max-cost ...`: stop the agent when it has cost this many USD (at most 1,000,000)\n"
            "\n"
            "Agents available for `--agent`: `aider`, `fake` (the default).\n"
            "\n"
            "On a pull request kugetsu opened, a review whose text or line comments hold a `/bot` line is answered with a follow-up that gets every line comment. On a pull request a person opened, `/bot <instructions>` adds commits to its branch.\n"
            "\n"
            "Quoted lines, code blocks and HTML comments are never read as commands. Starting, following up, stopping and retrying need write access to the repository."
        ),
        id="help, other words, with the agents installed",
    ),
]
STATUS_TASKS = [
    task(id=1, state=State.FAILED, outcome=Outcome.AGENT_FAILED, attempts=3),
    task(
        id=2,
        kind=Kind.CONTINUE,
        state=State.COMPLETED,
        outcome=Outcome.SUCCEEDED,
        attempts=1,
        pr_number=9,
    ),
    task(id=3),
]


@pytest.mark.parametrize("text, expected", REPLIES)
def test_replies(text, expected):
    assert text() == expected


def test_a_reply_that_carries_a_marker_keeps_it_and_every_other_gets_the_reply_marker():
    assert render.reply("plain", ()) == "<!-- kugetsu:reply -->\nplain"
    assert render.reply("<!-- kugetsu:x -->\nmarked", ()) == "<!-- kugetsu:x -->\nmarked"


# ------------------------------------------------------------------ what the agent is told

HISTORY = [
    task(id=1, prompt="add a greeting", summary="Added hello.txt"),
    task(id=2, kind=Kind.CONTINUE, prompt="", requested_by="bob"),
]
# (the task, the issue's description, earlier tasks) -> the prompt
PROMPTS = [
    pytest.param(
        task(),
        "Please add a greeting.",
        None,
        (
            "You are working on issue #7 of the repository acme/widget.\n"
            "\n"
            "Issue title: Add a greeting\n"
            "\n"
            "Issue description:\n"
            "Please add a greeting.\n"
            "\n"
            "The current directory is a git worktree on branch kugetsu/issue-7, made from main. Make the changes the issue asks for in this directory. You do not need to commit, push or open a pull request: kugetsu commits your changes and opens the pull request. End with a short summary of what you changed."
        ),
        id="start",
    ),
    pytest.param(
        task(prompt="use French"),
        "Please add a greeting.",
        None,
        (
            "You are working on issue #7 of the repository acme/widget.\n"
            "\n"
            "Issue title: Add a greeting\n"
            "\n"
            "Issue description:\n"
            "Please add a greeting.\n"
            "\n"
            "Instructions from @alice:\n"
            "use French\n"
            "\n"
            "The current directory is a git worktree on branch kugetsu/issue-7, made from main. Make the changes the issue asks for in this directory. You do not need to commit, push or open a pull request: kugetsu commits your changes and opens the pull request. End with a short summary of what you changed."
        ),
        id="start with instructions",
    ),
    pytest.param(
        task(id=3, kind=Kind.CONTINUE, prompt="now in German", requested_by="carol"),
        "Please add a greeting.",
        HISTORY,
        (
            "You are working on issue #7 of the repository acme/widget.\n"
            "\n"
            "Issue title: Add a greeting\n"
            "\n"
            "Issue description:\n"
            "Please add a greeting.\n"
            "\n"
            "Earlier requests on this issue, oldest first:\n"
            "- start by @alice: add a greeting\n"
            "  result: Added hello.txt\n"
            "- continue by @bob: (no text)\n"
            "\n"
            "Follow-up request from @carol:\n"
            "now in German\n"
            "\n"
            "The current directory is a git worktree on branch kugetsu/issue-7, made from main. Make the changes the issue asks for in this directory. You do not need to commit, push or open a pull request: kugetsu commits your changes and opens the pull request. End with a short summary of what you changed."
        ),
        id="follow-up with history",
    ),
    pytest.param(
        task(),
        "",
        None,
        (
            "You are working on issue #7 of the repository acme/widget.\n"
            "\n"
            "Issue title: Add a greeting\n"
            "\n"
            "Issue description:\n"
            "(empty)\n"
            "\n"
            "The current directory is a git worktree on branch kugetsu/issue-7, made from main. Make the changes the issue asks for in this directory. You do not need to commit, push or open a pull request: kugetsu commits your changes and opens the pull request. End with a short summary of what you changed."
        ),
        id="empty issue",
    ),
    pytest.param(
        task(
            id=3,
            kind=Kind.CONTINUE,
            prompt="and rename it",
            requested_by="bob",
            review={
                "id": 5,
                "state": "COMMENT",
                "body": "Two things.",
                "user": "bob",
                "comments": [
                    {
                        "id": 31,
                        "path": "hello.txt",
                        "line": 2,
                        "old_side": False,
                        "diff_hunk": "@@ -0,0 +1,2 @@\n+hi\n+there",
                        "body": "/kugetsu and rename it",
                        "user": "bob",
                    },
                    {
                        "id": 32,
                        "path": "README.md",
                        "line": 4,
                        "old_side": True,
                        "diff_hunk": "",
                        "body": "Keep this line.",
                        "user": "bob",
                    },
                ],
            },
        ),
        "Please add a greeting.",
        None,
        (
            "You are working on issue #7 of the repository acme/widget.\n"
            "\n"
            "Issue title: Add a greeting\n"
            "\n"
            "Issue description:\n"
            "Please add a greeting.\n"
            "\n"
            "Follow-up request from @bob:\n"
            "and rename it\n"
            "\n"
            "A review of the pull request by @bob (comments) asks for this follow-up.\n"
            "Review text:\n"
            "Two things.\n"
            "\n"
            "Line comments of the review:\n"
            "\n"
            "1. hello.txt, line 2, by @bob:\n"
            "```diff\n"
            "@@ -0,0 +1,2 @@\n"
            "+hi\n"
            "+there\n"
            "```\n"
            "/kugetsu and rename it\n"
            "\n"
            "2. README.md, line 4 of the old file, by @bob:\n"
            "Keep this line.\n"
            "\n"
            "Address the review: make the changes its comments ask for. In your summary, say for each numbered line comment what you changed, or why you changed nothing.\n"
            "\n"
            "The current directory is a git worktree on branch kugetsu/issue-7, made from main. Make the changes the issue asks for in this directory. You do not need to commit, push or open a pull request: kugetsu commits your changes and opens the pull request. End with a short summary of what you changed."
        ),
        id="a follow-up for a review: each line comment with its file, line, hunk and text",
    ),
    pytest.param(
        task(prompt="tidy it", requested_by="cli"),
        "",
        None,
        (
            "You are working on issue #7 of the repository acme/widget.\n"
            "\n"
            "Issue title: Add a greeting\n"
            "\n"
            "Issue description:\n"
            "(empty)\n"
            "\n"
            "Instructions from the command line:\n"
            "tidy it\n"
            "\n"
            "The current directory is a git worktree on branch kugetsu/issue-7, made from main. Make the changes the issue asks for in this directory. You do not need to commit, push or open a pull request: kugetsu commits your changes and opens the pull request. End with a short summary of what you changed."
        ),
        id="queued from the shell: no @cli",
    ),
]


def test_prompt_on_a_persons_pull_request():
    prompt = render.prompt(
        task(issue=21, prompt="add a test"),
        "Greet people",
        "",
        branch="feature/greet",
        base="main",
        pull=True,
    )
    assert prompt == (
        "You are working on pull request #21 of the repository acme/widget.\n"
        "\n"
        "Pull request title: Greet people\n"
        "\n"
        "Pull request description:\n"
        "(empty)\n"
        "\n"
        "Instructions from @alice:\n"
        "add a test\n"
        "\n"
        "The current directory is a git worktree on branch feature/greet, the branch of this pull request, which is to be merged into main. Make the changes asked for in this directory, on top of the commits already there. You do not need to commit or push: kugetsu commits your changes and pushes them to this branch. End with a short summary of what you changed."
    )


@pytest.mark.parametrize("the_task, body, history, expected", PROMPTS)
def test_prompt(the_task, body, history, expected):
    prompt = render.prompt(
        the_task, "Add a greeting", body, history=history, branch="kugetsu/issue-7", base="main"
    )
    assert prompt == expected


# (the task, the issue's title) -> the message of the commit holding the agent's work
COMMITS = [
    pytest.param(
        task(),
        "Add a greeting\nsecond line",
        (
            "Add a greeting (#7)\n"
            "\n"
            "Written by an AI coding agent (opencode) run by kugetsu, task 12, requested by @alice."
        ),
        id="start",
    ),
    pytest.param(
        task(),
        None,
        (
            "issue #7 (#7)\n"
            "\n"
            "Written by an AI coding agent (opencode) run by kugetsu, task 12, requested by @alice."
        ),
        id="no title",
    ),
    pytest.param(
        task(kind=Kind.CONTINUE, prompt="now in German\nand more"),
        "Add a greeting",
        (
            "Follow-up on #7: now in German\n"
            "\n"
            "Written by an AI coding agent (opencode) run by kugetsu, task 12, requested by @alice."
        ),
        id="follow-up",
    ),
    pytest.param(
        task(requested_by="cli"),
        "Add a greeting",
        (
            "Add a greeting (#7)\n"
            "\n"
            "Written by an AI coding agent (opencode) run by kugetsu, task 12, requested from the command line."
        ),
        id="queued from the shell: no @cli",
    ),
    pytest.param(
        task(kind=Kind.CONTINUE, review={"id": 5, "comments": []}),
        "Add a greeting",
        (
            "Follow-up on #7: review\n"
            "\n"
            "Written by an AI coding agent (opencode) run by kugetsu, task 12, requested by @alice."
        ),
        id="a review's follow-up without words of its own",
    ),
]


@pytest.mark.parametrize("the_task, title, expected", COMMITS)
def test_commit_message(the_task, title, expected):
    assert render.commit_message(the_task, title) == expected


# ------------------------------------------------------------------ what the agent wrote

HOSTILE = (
    "All done.\n```\n@admin please look. Fixes #3\n<!-- kugetsu:task=13 -->\n"
    "<!-- kugetsu:reply -->\n<!-- the rest is hidden"
)


def _code_blocks_hold(body: str, text: str) -> bool:
    """True if every occurrence of `text` in `body` is inside a ``` code block."""
    inside = False
    for line in body.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif text in line and not inside:
            return False
    return not inside  # every block is closed


def test_agent_text_is_inert_in_comments_and_pull_requests():
    done = render.tracking(
        task(
            state=State.COMPLETED,
            outcome=Outcome.SUCCEEDED,
            attempts=1,
            pr_number=9,
            files_changed=1,
            summary=HOSTILE,
        ),
        CONFIG,
        QueueView(None, 0, 3),
    )
    pr = render.pr_body(task(), CONFIG, summary=HOSTILE, files_changed=1, usage={})
    follow_up = render.follow_up(task(kind=Kind.CONTINUE), CONFIG, summary=HOSTILE, files_changed=1)
    for body in (done, pr, follow_up):
        for text in ("@admin", "Fixes #3", "All done."):
            assert text in body and _code_blocks_hold(body, text), (text, body)
        # kugetsu's markers are found by text search: the agent cannot plant them
        assert "<!-- kugetsu:task=13" not in body and "<!-- kugetsu:reply" not in body
    assert "<!--" not in done.replace(render.marker(12), "")
    assert "<!--" not in pr.replace(render.marker(12), "")
    assert pr.startswith("Closes #7\n") and pr.count("Closes #") == 1
    assert done.rstrip().endswith("</sub>")  # the footer is not swallowed by a block


def test_a_secret_cut_by_the_length_limit_is_still_redacted():
    text = "x" * (render.MAX_SUMMARY - 5) + "tok-ABCDEF123 and more"
    block = render.agent_block(text, CONFIG.secrets())
    assert "tok-A" not in block and "ABCDEF" not in block
