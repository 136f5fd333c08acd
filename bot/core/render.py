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
    who = (
        "from the command line"
        if task.requested_by == "cli"
        else f"requested by @{task.requested_by}"
    )
    head = f"{marker(task.id)}\n**kugetsu** · task #{task.id} ({task.kind.value}, {who})\n\n"
    agent = f"`{task.agent}`"
    link = log_link(config, task.id)
    log_ref = f" · [log]({link})" if link else ""
    n = task.max_attempts
    secrets = config.secrets()

    if task.state is State.PENDING:
        where = f"position {queue.position} in the queue, " if queue.position else ""
        line = f"⏳ **Queued**: {where}{queue.busy} of {queue.limit} agents busy."
        if task.attempts and task.outcome:
            line = (
                f"🔁 **Retrying**: attempt {task.attempts} of {n} ended with "
                f"`{task.outcome.value}`"
                + (f" ({redact(task.error, secrets)})" if task.error else "")
                + f". Next attempt not before {_when(task.not_before)}; "
                + line[len("⏳ **Queued**: ") :]
            )
        return head + line
    if task.state is State.RUNNING:
        line = (
            f"🛠️ **Working**: agent {agent}, attempt {task.attempts} of {n}, "
            f"started {_when(task.started_at)}{log_ref}."
        )
        if task.cancel_requested_by:
            line += f"\n\nStopping, as requested by @{task.cancel_requested_by}."
        return head + line
    if task.state is State.REJECTED:
        return head + f"🚫 **Not started**: {redact(task.error or 'not allowed', secrets)}"
    if task.state is State.CANCELLED:
        by = task.cancel_requested_by or "an operator"
        return head + (
            f"🛑 **Stopped** by @{by}."
            if by != "cli"
            else "🛑 **Stopped** from the kugetsu command line."
        )

    took = duration((task.finished_at or 0) - (task.started_at or 0)) if task.started_at else "?"
    usage = usage_line(task.usage)
    footer = " · ".join(
        x for x in (f"agent {agent}", f"took {took}", f"attempt {task.attempts} of {n}", usage) if x
    )
    summary = agent_block(task.summary or "", secrets)
    summary_block = f"\n\n{summary}" if summary else ""

    if task.state is State.COMPLETED and task.outcome is Outcome.SUCCEEDED:
        files = (
            f", {_plural(task.files_changed, 'file')} changed"
            if task.files_changed is not None
            else ""
        )
        # "#9" and not a URL: Gitea links it to the pull request itself, with its own public
        # address, while gitea.url is often an internal name (http://gitea:3000)
        return (
            head + f"✅ **Done**: pull request #{task.pr_number}{files}.{summary_block}\n\n"
            f"<sub>{footer}{log_ref}</sub>"
        )
    if task.state is State.COMPLETED:
        return (
            head + "➖ **No changes**: the agent finished without changing any files, "
            f"so there is no pull request.{summary_block}\n\n<sub>{footer}{log_ref}</sub>"
        )
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
        f"task #{task.id}",
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
        f"Pushed a follow-up for @{task.requested_by} "
        f"(task #{task.id}, {_plural(files_changed, 'file')} "
        f"changed in this pull request so far).\n\n" + agent_block(summary, config.secrets())
    )


def commit_message(task: Task, title: str | None) -> str:
    """The message of the commit that holds an agent's work."""
    first_line = (title or f"issue #{task.issue}").strip().splitlines()[0][:72]
    if task.kind is Kind.CONTINUE:
        first = (task.prompt.strip().splitlines() or ["follow-up"])[0][:60]
        subject = f"Follow-up on #{task.issue}: {first}"
    else:
        subject = f"{first_line} (#{task.issue})"
    return (
        f"{subject}\n\nWritten by an AI coding agent ({task.agent}) run by kugetsu, "
        f"task #{task.id}, requested by @{task.requested_by}."
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
    repo_instructions: str = "",
) -> str:
    """What the agent is asked to do: the issue, earlier requests on it (when the agent
    cannot resume its own session), the request itself, the repository's own
    instructions (its `.kugetsu.toml`), and where it works."""
    parts = [
        f"You are working on issue #{task.issue} of the repository {task.repo}.",
        f"\nIssue title: {title}",
        f"\nIssue description:\n{body.strip() or '(empty)'}",
    ]
    if history:
        parts.append("\nEarlier requests on this issue, oldest first:")
        for old in history:
            parts.append(
                f"- {old.kind.value} by @{old.requested_by}: {old.prompt or '(no text)'}"
                + (
                    f"\n  result: {old.summary.strip()[:MAX_HISTORY_SUMMARY]}"
                    if old.summary
                    else ""
                )
            )
    if task.kind is Kind.CONTINUE:
        parts.append(f"\nFollow-up request from @{task.requested_by}:\n{task.prompt}")
    elif task.prompt:
        parts.append(f"\nInstructions from @{task.requested_by}:\n{task.prompt}")
    if repo_instructions:
        parts.append(
            f"\nInstructions from this repository (its .kugetsu.toml):\n{repo_instructions}"
        )
    parts.append(
        f"\nThe current directory is a git worktree on branch {branch}, made from {base}. "
        "Make the changes the issue asks for in this directory. You do not need to commit, "
        "push or open a pull request: kugetsu commits your changes and opens the pull request. "
        "End with a short summary of what you changed."
    )
    return "\n".join(parts)


# --------------------------------------------------------------------------- replies to commands


def help_text(word: str = "/kugetsu", label: str = "kugetsu") -> str:
    """The answer to `help`, generated from the command registry."""
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
    return (
        f"**kugetsu** turns this issue into a pull request written by an AI coding agent. "
        f"Add the label `{label}`, or comment one of these on its own line:\n\n"
        + "\n".join(rows)
        + f"\n\nOptions, after the command word or the verb:\n{flags}\n\n"
        "Quoted lines, code blocks and HTML comments are never read as commands. Starting, "
        "following up, stopping and retrying need write access to the repository."
    )


def usage_error(sender: str, error: commands.CommandError) -> str:
    return f"@{sender} {error.message}. Usage: {error.usage}"


def unknown_agent(sender: str, agent: str, known: Iterable[str]) -> str:
    return f"@{sender} there is no agent named `{agent}`. Configured: {', '.join(sorted(known))}."


def already_active(sender: str, active: Task) -> str:
    """The answer to a start while the issue has an active task."""
    word = "queued" if active.state is State.PENDING else "running"
    return (
        f"@{sender} kugetsu is already {word} on this issue (task #{active.id}). "
        f"Use `continue <instructions>` to follow up, or `stop` to stop it."
    )


NOTHING_TO_STOP = "There is nothing to stop on this issue."
NOTHING_TO_RETRY = "There is no failed or stopped task to retry on this issue."


def retry_blocked(blocker: Task) -> str:
    return (
        f"Task #{blocker.id} is still active on this issue; stop it first or wait for it to finish."
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
            f"| #{t.id} | {t.kind.value} | {t.state.value} | "
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
