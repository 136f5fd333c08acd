"""Everything kugetsu says on Gitea, and every `<!-- kugetsu ... -->` marker.

Pure: plain data in, text out; no store, no network, no files. The tracking comment,
the pull request body and its follow-up comment, the replies to commands, the help
text, the status table, the refusals, the agent's prompt and the commit message are
all written here, so their wording and the rules that keep them safe live in one place:

- every comment kugetsu writes carries a marker (`MARKER` is what they all start with),
  so its own comments never trigger it, and a tracking comment lost in a crash can be
  found again (`marker(task_id)`);
- what an agent wrote goes in a code block where it has no effect (`agent_block`);
- secrets are redacted from whatever may hold one.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bot.config import Config
from bot.core import commands
from bot.core.tasks import AGENT_MISSING, Kind, Outcome, State, Task, agent_missing
from bot.redact import redact

MAX_SUMMARY = 6000
MAX_TAIL = 2500
#: how much of an earlier task's summary the prompt of a follow-up repeats
MAX_HISTORY_SUMMARY = 1500

# --------------------------------------------------------------------------------------- markers

#: every comment kugetsu writes carries this, so its own comments never trigger it
MARKER = "<!-- kugetsu"
#: the marker of a reply to a command
REPLY_MARKER = "<!-- kugetsu:reply -->"


def marker(task_id: int) -> str:
    """Marks a task's tracking comment and its pull request body, and only those."""
    return f"<!-- kugetsu:task={task_id} -->"


def follow_up_marker(task_id: int) -> str:
    """Marks the comment that announces a follow-up's commits on a pull request."""
    return f"<!-- kugetsu:follow-up={task_id} -->"


def answer_marker(task_id: int) -> str:
    """Marks the comment that gives a task's result where it was asked (`answer`)."""
    return f"<!-- kugetsu:answer={task_id} -->"


def reply(body: str, secrets: Iterable[str]) -> str:
    """A reply as it is posted: marked as kugetsu's (unless it carries a marker already),
    secrets redacted."""
    text = body if MARKER in body else f"{REPLY_MARKER}\n{body}"
    return redact(text, secrets)


# ---------------------------------------------------------------------------------------- pieces


def _when(ts: float | None) -> str:
    if not ts:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def usage_line(usage: Mapping[str, Any]) -> str:
    if not usage:
        return ""
    parts = []
    if usage.get("input_tokens") or usage.get("output_tokens"):
        parts.append(
            f"{usage.get('input_tokens', 0):,} tokens in, {usage.get('output_tokens', 0):,} out"
        )
    if usage.get("cost_usd") is not None:
        parts.append(f"cost ${usage['cost_usd']:.4f}")
    return ", ".join(parts)


#: who asks for work from the shell: no Gitea user, and never an @mention of one
CLI = "cli"


def mention(login: str) -> str:
    """A Gitea user as kugetsu names them: `@login`, and "the command line" for work
    queued from the shell (whoever owns the login `cli` is not meant)."""
    return "the command line" if login == CLI else f"@{login}"


def requested(login: str) -> str:
    """ "requested by @login", or "requested from the command line"."""
    return "requested from the command line" if login == CLI else f"requested by @{login}"


def task_name(task_id: int) -> str:
    """A task as kugetsu names it on Gitea: "task 7", never "task #7", which Gitea links
    to issue 7 (and cross-references there)."""
    return f"task {task_id}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


def _inert(text: str) -> str:
    """Agent output made safe to put in a code block: it cannot close the block, and it
    cannot carry kugetsu's hidden markers (which are found by plain text search)."""
    return text.replace("```", "ʼʼʼ").replace("<!--", "<!\u2060--")


def _quote_block(text: str, limit: int) -> str:
    text = text.strip()
    if len(text) > limit:
        text = "…" + text[-limit:]
    return f"```\n{_inert(text)}\n```"


def agent_block(text: str, secrets: Sequence[str], limit: int = MAX_SUMMARY) -> str:
    """What the agent said about its work, shown as written but without effect.

    The agent's words follow instructions from issue text anyone may write, so they go
    in a code block: no @mention notifies anyone, no "Fixes #3" closes another issue
    (Gitea looks for references outside code only), no markdown or HTML hides the rest
    of the comment. Secrets are redacted before the text is cut, so a cut cannot leave
    part of one behind. Empty text gives "".
    """
    text = redact(text.strip(), secrets)
    if not text:
        return ""
    if len(text) > limit:
        text = text[:limit] + "…"
    return f"```text\n{_inert(text)}\n```"


def log_token(config: Config, task_id: int) -> str:
    """The unguessable part of a task's log link (the receiver checks it)."""
    key = (config.gitea.webhook_secret or config.gitea.token or "kugetsu").encode()
    return hmac.new(key, f"log:{task_id}".encode(), hashlib.sha256).hexdigest()[:24]


def log_link(config: Config, task_id: int) -> str | None:
    """An unguessable link to the task's log, if the service has a public URL."""
    if not config.server.public_url:
        return None
    return f"{config.server.public_url}/logs/{task_id}/{log_token(config, task_id)}"


# -------------------------------------------------------------------------- the tracking comment


@dataclass(frozen=True)
class QueueView:
    """The queue as a queued task's comment shows it."""

    position: int | None
    busy: int
    limit: int


def tracking(task: Task, config: Config, queue: QueueView, *, log_tail: str = "") -> str:
    """The one tracking comment of a task, for its current state."""
    head = (
        f"{marker(task.id)}\n**kugetsu** · {task_name(task.id)} "
        f"({task.kind.value}, {requested(task.requested_by)})\n\n"
    )
    agent = f"`{task.agent}`"
    link = log_link(config, task.id)
    # with the dashboard on, the same link opens the task page for those signed in
    log_ref = f" · [{'task page' if config.dashboard.enabled else 'log'}]({link})" if link else ""
    n = task.max_attempts
    secrets = config.secrets()
    retried = ""
    if task.retried_by and task.active:
        retried = (
            " Queued again from the command line."
            if task.retried_by == CLI
            else f" Queued again by @{task.retried_by}."
        )

    if task.state is State.PENDING:
        where = f"position {queue.position} in the queue, " if queue.position else ""
        line = f"⏳ **Queued**: {where}{queue.busy} of {queue.limit} agents busy."
        if task.error and not task.outcome:
            # put back without using up an attempt: a clean shutdown, a Gitea away
            line = (
                f"⏳ **Queued again** ({redact(task.error, secrets)}): "
                + line[len("⏳ **Queued**: ") :]
            )
        elif task.attempts and task.outcome:
            line = (
                f"🔁 **Retrying**: attempt {task.attempts} of {n} ended with "
                f"`{task.outcome.value}`"
                + (f" ({redact(task.error, secrets)})" if task.error else "")
                + f". Next attempt not before {_when(task.not_before)}; "
                + line[len("⏳ **Queued**: ") :]
            )
        return head + line + retried
    moved = (
        "\n\nContinued on another worker than the earlier work on this issue: it rebuilt "
        "the worktree from the pushed branch and started a fresh agent session, with the "
        "earlier requests and results in its prompt."
        if task.moved_from
        else ""
    )
    if task.state is State.RUNNING:
        line = (
            f"🛠️ **Working**: agent {agent}, attempt {task.attempts} of {n}, "
            f"started {_when(task.started_at)}{log_ref}.{moved}{retried}"
        )
        if task.cancel_requested_by:
            line += f"\n\nStopping, as {requested(task.cancel_requested_by)}."
        return head + line
    if task.state is State.REJECTED:
        return head + f"🚫 **Not started**: {redact(task.error or 'not allowed', secrets)}"
    took = duration((task.finished_at or 0) - (task.started_at or 0)) if task.started_at else "?"
    usage = usage_line(task.usage)
    footer = " · ".join(
        x for x in (f"agent {agent}", f"took {took}", f"attempt {task.attempts} of {n}", usage) if x
    )
    if task.state is State.CANCELLED:
        line = _stopped(task)
        if not task.attempts or not task.started_at:
            return head + line + " It had not started."
        return head + f"{line}\n\n<sub>{footer}{log_ref}</sub>"
    summary = agent_block(task.summary or "", secrets)
    summary_block = f"\n\n{summary}" if summary else ""

    if task.state is State.COMPLETED:
        return head + f"{_completed(task)}{moved}{summary_block}\n\n<sub>{footer}{log_ref}</sub>"
    if agent_missing(task):
        return head + agent_not_installed(task, config)
    # failed
    reason = redact(task.error or "", secrets)
    tail = redact(log_tail, secrets)
    tail_block = (
        (
            f"\n\n<details><summary>Last lines of the log</summary>\n\n"
            f"{_quote_block(tail, MAX_TAIL)}\n</details>"
        )
        if tail.strip()
        else ""
    )
    outcome = task.outcome.value if task.outcome else "failed"
    return (
        head + f"❌ **Failed** (`{outcome}`) after {_plural(task.attempts, 'attempt')}: "
        f"{reason}{tail_block}\n\n"
        f"Comment `{config.triggers.command} retry` to try again.\n\n"
        f"<sub>{footer}{log_ref}</sub>"
    )


def _stopped(task: Task) -> str:
    by = task.cancel_requested_by or "an operator"
    if by == CLI:
        return "🛑 **Stopped** from the kugetsu command line."
    return f"🛑 **Stopped** by @{by}."


def _completed(task: Task) -> str:
    """The line of a completed task: its pull request, or that nothing changed."""
    files = (
        f", {_plural(task.files_changed, 'file')} changed" if task.files_changed is not None else ""
    )
    if task.outcome is Outcome.SUCCEEDED and task.pr_number == task.issue:
        # work on a pull request a person opened: commits on its own branch
        where = f" `{_code(task.branch)}`" if task.branch else ""
        return f"✅ **Done**: pushed to this pull request's branch{where}{files}."
    if task.outcome is Outcome.SUCCEEDED:
        # "#9" and not a URL: Gitea links it to the pull request itself, with its own public
        # address, while gitea.url is often an internal name (http://gitea:3000)
        return f"✅ **Done**: pull request #{task.pr_number}{files}."
    if task.pr_number:
        return (
            "➖ **No changes**: the agent finished without changing any files; "
            f"pull request #{task.pr_number} is as it was."
        )
    return (
        "➖ **No changes**: the agent finished without changing any files, "
        "so there is no pull request."
    )


def _code(text: str) -> str:
    """Text for inside a code span: no backtick can end it early, no line break."""
    return " ".join(text.replace("`", "'").split())


def answer_due(task: Task) -> bool:
    """Whether a task's result is still to be posted where it was asked: it has ended
    (refusals excepted: their tracking comment is the one reply they get), and no
    follow-up comment on that pull request has told it already."""
    if task.answer_on is None or task.answer_id not in (None, 0):
        return False
    if task.state not in (State.COMPLETED, State.FAILED, State.CANCELLED):
        return False
    told = (
        task.outcome is Outcome.SUCCEEDED
        and task.kind is Kind.CONTINUE
        and task.pr_number == task.answer_on != task.issue
    )
    return not told


def answer(task: Task, config: Config) -> str:
    """A task's result, posted where it was asked when that is not where its tracking
    comment is (a request typed on a pull request, a retry asked for later)."""
    secrets = config.secrets()
    if task.state is State.COMPLETED:
        line = _completed(task)
    elif task.state is State.CANCELLED:
        line = _stopped(task)
    else:
        outcome = task.outcome.value if task.outcome else "failed"
        line = (
            f"❌ **Failed** (`{outcome}`) after {_plural(task.attempts, 'attempt')}: "
            f"{redact(task.error or '', secrets)}"
        )
    where = "above" if task.answer_on == task.issue else f"on #{task.issue}"
    block = agent_block(task.summary or "", secrets) if task.state is State.COMPLETED else ""
    return (
        f"{answer_marker(task.id)}\n{mention(task.requested_by)}: {task_name(task.id)} "
        f"({task.kind.value}) has ended. {line}"
        + (f"\n\n{block}" if block else "")
        + f"\n\nIts tracking comment {where} has the details."
    )


def agent_not_installed(task: Task, config: Config) -> str:
    """A task whose agent is not installed: an operator must act, and a retry from the
    issue would fail the same way, so none is suggested."""
    why = redact((task.error or "")[len(AGENT_MISSING) :], config.secrets())
    return (
        f"⚠️ **Not started**: the agent `{task.agent}` is not installed where kugetsu runs"
        + (f" ({why})" if why else "")
        + ".\n\nThis needs an operator of kugetsu, not a retry: install the agent, or set "
        f"`agents.{task.agent}.command` to where it is, check with `kugetsu doctor`, then "
        f"queue this task again with `kugetsu queue retry {task.id}`."
    )


# --------------------------------------------------------------------------------- pull requests


def pr_body(
    task: Task, config: Config, *, summary: str, files_changed: int, usage: Mapping[str, Any]
) -> str:
    """The body of the pull request a task opens: it closes the issue."""
    link = log_link(config, task.id)
    block = agent_block(summary, config.secrets())
    details = [
        task_name(task.id),
        f"agent `{task.agent}`",
        f"{_plural(files_changed, 'file')} changed",
    ]
    if usage_line(usage):
        details.append(usage_line(usage))
    if link:
        details.append(f"[task log]({link})")
    return (
        f"Closes #{task.issue}\n\n"
        + (f"{block}\n\n" if block else "")
        + "---\nWritten by kugetsu · "
        + " · ".join(details)
        + f"\n{marker(task.id)}"
    )


def follow_up(task: Task, config: Config, *, summary: str, files_changed: int) -> str:
    """The comment on a pull request that a follow-up pushed to and did not open."""
    return (
        f"{follow_up_marker(task.id)}\n"
        f"Pushed a follow-up {requested(task.requested_by)} "
        f"({task_name(task.id)}, {_plural(files_changed, 'file')} "
        f"changed in this pull request so far).\n\n" + agent_block(summary, config.secrets())
    )


#: a review's state as a reader says it
REVIEW_STATE_WORDS = {
    "APPROVED": "approved",
    "REQUEST_CHANGES": "changes requested",
    "COMMENT": "comments",
}


def review_answer(
    task: Task,
    config: Config,
    *,
    summary: str,
    files_changed: int,
    changed: Sequence[str] | None,
    resolved: Iterable[int] = (),
) -> str:
    """The answer on a pull request to the review a follow-up worked on: what changed for
    each line comment (its file changed in this push or not; its conversation resolved),
    then the agent's own summary, which says what it did about each."""
    review = task.review
    done = set(resolved)
    lines = []
    for number, comment in enumerate(review.get("comments") or (), start=1):
        where = f"{number}. `{_code(str(comment.get('path') or '?'))}` {_line_of(comment)}"
        if changed is None:
            lines.append(f"{where}")
        elif comment.get("path") in changed:
            note = "; conversation resolved" if comment.get("id") in done else ""
            lines.append(f"{where}: its file changed in this push{note}")
        else:
            lines.append(f"{where}: its file did not change in this push")
    reviewer = review.get("user") or task.requested_by
    state = REVIEW_STATE_WORDS.get(str(review.get("state")), "review")
    return (
        f"{follow_up_marker(task.id)}\n"
        f"{mention(reviewer)}: pushed a follow-up for your review ({state}), "
        f"{task_name(task.id)}, {_plural(files_changed, 'file')} changed in this pull "
        "request so far."
        + ("\n\n" + "\n".join(lines) if lines else "")
        + "\n\n"
        + agent_block(summary, config.secrets())
    )


def _line_of(comment: Mapping[str, Any]) -> str:
    line = comment.get("line")
    if not line:
        return "(the whole file)"
    return f"line {line}" + (" of the old file" if comment.get("old_side") else "")


def commit_message(task: Task, title: str | None) -> str:
    """The message of the commit that holds an agent's work."""
    first_line = (title or f"issue #{task.issue}").strip().splitlines()[0][:72]
    if task.kind is Kind.CONTINUE or task.review:
        asked = task.prompt.strip() or ("review" if task.review else "")
        first = (asked.splitlines() or ["follow-up"])[0][:60]
        subject = f"Follow-up on #{task.issue}: {first}"
    else:
        subject = f"{first_line} (#{task.issue})"
    return (
        f"{subject}\n\nWritten by an AI coding agent ({task.agent}) run by kugetsu, "
        f"{task_name(task.id)}, {requested(task.requested_by)}."
    )


# ------------------------------------------------------------------------------------ the prompt


def prompt(
    task: Task,
    title: str,
    body: str,
    *,
    history: Sequence[Task] | None = None,
    branch: str,
    base: str,
    pull: bool = False,
    repo_instructions: str = "",
) -> str:
    """What the agent is asked to do: the issue (or the pull request a person opened,
    with `pull`), earlier requests on it (when the agent cannot resume its own session),
    the request itself with the review it answers, the repository's own instructions
    (its `.kugetsu.toml`), and where it works."""
    thing = "pull request" if pull else "issue"
    parts = [
        f"You are working on {thing} #{task.issue} of the repository {task.repo}.",
        f"\n{thing.capitalize()} title: {title}",
        f"\n{thing.capitalize()} description:\n{body.strip() or '(empty)'}",
    ]
    if history:
        parts.append(f"\nEarlier requests on this {thing}, oldest first:")
        for old in history:
            parts.append(
                f"- {old.kind.value} by {mention(old.requested_by)}: {old.prompt or '(no text)'}"
                + (
                    f"\n  result: {old.summary.strip()[:MAX_HISTORY_SUMMARY]}"
                    if old.summary
                    else ""
                )
            )
    who = mention(task.requested_by)
    if task.kind is Kind.CONTINUE and task.prompt:
        parts.append(f"\nFollow-up request from {who}:\n{task.prompt}")
    elif task.prompt:
        parts.append(f"\nInstructions from {who}:\n{task.prompt}")
    if task.review:
        parts.append(_review_prompt(task.review))
    if repo_instructions:
        parts.append(
            f"\nInstructions from this repository (its .kugetsu.toml):\n{repo_instructions}"
        )
    if pull:
        parts.append(
            f"\nThe current directory is a git worktree on branch {branch}, the branch of "
            f"this pull request, which is to be merged into {base}. Make the changes asked "
            "for in this directory, on top of the commits already there. You do not need to "
            "commit or push: kugetsu commits your changes and pushes them to this branch. "
            "End with a short summary of what you changed."
        )
    else:
        parts.append(
            f"\nThe current directory is a git worktree on branch {branch}, made from {base}. "
            "Make the changes the issue asks for in this directory. You do not need to "
            "commit, push or open a pull request: kugetsu commits your changes and opens the "
            "pull request. End with a short summary of what you changed."
        )
    return "\n".join(parts)


def _review_prompt(review: Mapping[str, Any]) -> str:
    """A review in the prompt: its body, then each line comment with its file, its line,
    the diff hunk it was written on and its text, numbered for the summary to refer to."""
    state = REVIEW_STATE_WORDS.get(str(review.get("state")), "review")
    parts = [
        f"\nA review of the pull request by {mention(str(review.get('user') or '?'))} "
        f"({state}) asks for this follow-up.",
        f"Review text:\n{str(review.get('body') or '').strip() or '(empty)'}",
    ]
    comments = review.get("comments") or []
    if comments:
        parts.append("\nLine comments of the review:")
    for number, comment in enumerate(comments, start=1):
        hunk = str(comment.get("diff_hunk") or "").rstrip()
        parts.append(
            f"\n{number}. {comment.get('path') or '?'}, {_line_of(comment)}, "
            f"by {mention(str(comment.get('user') or '?'))}:"
            + (f"\n```diff\n{hunk}\n```" if hunk else "")
            + f"\n{str(comment.get('body') or '').strip() or '(empty)'}"
        )
    parts.append(
        "\nAddress the review: make the changes its comments ask for. In your summary, say "
        "for each numbered line comment what you changed, or why you changed nothing."
    )
    return "\n".join(parts)


# --------------------------------------------------------------------------- replies to commands


def help_text(
    word: str = "/kugetsu",
    label: str = "kugetsu",
    agents: Iterable[str] = (),
    default_agent: str | None = None,
) -> str:
    """The answer to `help`, generated from the command registry, with the agents this
    kugetsu has installed."""
    rows = ["| command | what it does |", "|---|---|"]
    for verb in commands.REGISTRY:
        alias = f" (also `{word} {verb.aliases[0]}`)" if verb.aliases else ""
        rows.append(f"| `{word} {verb.usage}`{alias} | {verb.help} |")
    rows.append(
        f"| `{word} <instructions>` | Continue if this issue already has a task, else start. |"
    )
    flags = "\n".join(
        f"- `{flag} ...`: {desc}" + (f" (at most {limit:,})" if limit else "")
        for flag, (_, _, desc, limit) in commands.FLAGS.items()
    )
    names = sorted(agents)
    listed = ", ".join(
        f"`{name}`" + (" (the default)" if name == default_agent else "") for name in names
    )
    return (
        f"**kugetsu** turns this issue into a pull request written by an AI coding agent. "
        f"Add the label `{label}`, or comment one of these on its own line:\n\n"
        + "\n".join(rows)
        + f"\n\nOptions, after the command word or the verb:\n{flags}\n\n"
        + (f"Agents available for `--agent`: {listed}.\n\n" if names else "")
        + f"On a pull request kugetsu opened, a review whose text or line comments hold a "
        f"`{word}` line is answered with a follow-up that gets every line comment. On a pull "
        f"request a person opened, `{word} <instructions>` adds commits to its branch.\n\n"
        "Quoted lines, code blocks and HTML comments are never read as commands. Starting, "
        "following up, stopping and retrying need write access to the repository."
    )


def usage_error(sender: str, error: commands.CommandError) -> str:
    return f"@{sender} {error.message}. Usage: {error.usage}"


def unknown_agent(sender: str, agent: str, known: Iterable[str]) -> str:
    available = ", ".join(f"`{name}`" for name in sorted(known)) or "none"
    return f"@{sender} there is no agent named `{agent}` here. Available: {available}."


def unknown_verb(sender: str, unknown: commands.UnknownVerb, help_text: str) -> str:
    """The answer to a command of one word that is no verb: the closest verbs, the help."""
    word = f"`{_code(unknown.word)}`"
    if unknown.suggestions:
        guesses = " or ".join(f"`{s}`" for s in unknown.suggestions)
        first = f"@{sender} {word} is not a kugetsu command; did you mean {guesses}?"
    else:
        first = f"@{sender} {word} is not a kugetsu command."
    return (
        f"{first} Nothing was started: to ask for work, write a sentence of instructions."
        f"\n\n{help_text}"
    )


def fork_not_editable(sender: str, head: str | None) -> str:
    """The answer to a request for work on a pull request whose branch kugetsu may not push."""
    if head is None:
        why = "its branch is in a fork that no longer exists"
    else:
        why = (
            f"its branch is in the fork {head}, whose author has not allowed edits by "
            'maintainers (the pull request\'s "Allow edits from maintainers")'
        )
    return (
        f"@{sender} kugetsu cannot work on this pull request: {why}, so kugetsu cannot push "
        "to it. Nothing was started."
    )


def fork_not_pushable(fork: str, repo: str, have: str) -> str:
    """Why kugetsu does not work on a fork's branch whose author allowed edits by
    maintainers: only those who may write to the base repository may push there."""
    return (
        f"kugetsu cannot push to this pull request's branch in the fork {fork}: Gitea lets "
        f"those with write access to {repo} push there, and kugetsu has {have}"
    )


def retry_queued(task: Task, by: str, here: int) -> str:
    """The answer to `retry` once the task is queued again: its result is posted where
    the retry was asked, `here`, when it ends."""
    return (
        f"{mention(by)}: {task_name(task.id)} is queued again with fresh attempts; its "
        "result will be posted here when it ends."
        + ("" if here == task.issue else f" Its tracking comment is on #{task.issue}.")
    )


def already_active(sender: str, active: Task) -> str:
    """The answer to a start while the issue has an active task."""
    word = "queued" if active.state is State.PENDING else "running"
    return (
        f"@{sender} kugetsu is already {word} on this issue ({task_name(active.id)}). "
        f"Use `continue <instructions>` to follow up, or `stop` to stop it."
    )


NOTHING_TO_STOP = "There is nothing to stop on this issue."
NOTHING_TO_RETRY = "There is no failed or stopped task to retry on this issue."


def retry_blocked(blocker: Task) -> str:
    return (
        f"Task {blocker.id} is still active on this issue; stop it first or wait for it to finish."
    )


def not_done(reason: str) -> str:
    """The answer to a stop or retry its requester may not ask for."""
    return f"Not done: {reason}."


@dataclass(frozen=True)
class QueueLoad:
    """How busy kugetsu is over all repositories."""

    busy: int
    waiting: int
    limit: int


#: how many of an issue's tasks the status table shows (the latest)
STATUS_ROWS = 10


def status(tasks: Sequence[Task], config: Config, load: QueueLoad | None) -> str:
    """The answer to `status`: the issue's tasks (the latest STATUS_ROWS), and with `load`
    how busy kugetsu is over all repositories (only for those who may read the
    repository: the queue says what happens elsewhere)."""
    if not tasks:
        return (
            f"kugetsu has no tasks for this issue. Comment "
            f"`{config.triggers.command} start` or add the label `{config.triggers.label}`."
        )
    rows = ["| task | kind | state | outcome | attempts | PR |", "|---|---|---|---|---|---|"]
    for t in tasks[-STATUS_ROWS:]:
        rows.append(
            f"| {t.id} | {t.kind.value} | {t.state.value} | "
            f"{t.outcome.value if t.outcome else ''} | {t.attempts}/{t.max_attempts} | "
            f"{'#' + str(t.pr_number) if t.pr_number else ''} |"
        )
    text = "kugetsu on this issue:\n\n" + "\n".join(rows)
    if load is None:
        return text
    return text + f"\n\nAgents busy: {load.busy} of {load.limit}; tasks waiting: {load.waiting}."


# -------------------------------------------------------------------------------------- refusals


#: how much of what is wrong with a repository's settings file its refusal quotes
MAX_SETTINGS_PROBLEM = 300


def repo_settings_refused(path: str, commit: str, problem: str) -> str:
    """The one comment on a version of a repository's `.kugetsu.toml` that kugetsu cannot
    use. What is wrong may quote the file, which anyone who can push wrote: it goes in a
    code block, cut short."""
    if len(problem) > MAX_SETTINGS_PROBLEM:
        problem = problem[:MAX_SETTINGS_PROBLEM] + "…"
    return (
        f"kugetsu cannot use `{path}` as the default branch has it (commit "
        f"`{commit[:12]}`), so it uses the server's settings for this repository until the "
        f"file is fixed:\n\n```text\n{_inert(problem)}\n```"
    )


def not_allowed_user(login: str) -> str:
    return f"@{login} is not on kugetsu's list of allowed users"


def cannot_check(login: str, need: str, repo: str) -> str:
    return (
        f"kugetsu cannot check that @{login} has {need} access to {repo}: reading other "
        "users' permissions needs admin access to the repository"
    )


def needs_permission(login: str, need: str, repo: str, have: str) -> str:
    return f"@{login} needs {need} access to {repo} to use kugetsu (has {have})"
