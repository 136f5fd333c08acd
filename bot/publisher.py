"""What kugetsu says on Gitea: the tracking comment, pull requests, replies.

Rendering is pure (`render_tracking`, `render_pr_body`, `status_text`); the
`Publisher` pushes rendered text through the Gitea client. The tracking comment
is idempotent: the store remembers which version of a task the comment shows,
so after an outage the comment simply catches up with the task's latest state.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bot.config import Config
from bot.gitea import GiteaAPI, GiteaError, NotFound, ServerError, Unreachable
from bot.isolate import on_its_own
from bot.redact import redact
from bot.store import CommentRecord, Store
from bot.tasks import Kind, Outcome, State, Task, doubling

log = logging.getLogger(__name__)

MAX_SUMMARY = 6000
MAX_TAIL = 2500
#: a tracking comment that Gitea answers with 5xx is not tried again for this long, twice
#: as long after each further 5xx, up to COMMENT_BACKOFF_MAX_SECONDS
COMMENT_BACKOFF_SECONDS = 10.0
COMMENT_BACKOFF_MAX_SECONDS = 300.0
#: 5xx for this many tracking comments in a row, none written in between: Gitea is failing
#: as a whole, not for one comment, and the pass ends
FAILING_IN_A_ROW = 2


REPLY_MARKER = "<!-- kugetsu:reply -->"


def marker(task_id: int) -> str:
    """Marks a task's tracking comment, and only that (other comments use their own)."""
    return f"<!-- kugetsu:task={task_id} -->"


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


def usage_line(usage: dict[str, Any]) -> str:
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


def log_link(config: Config, task_id: int) -> str | None:
    """An unguessable link to the task's log, if the service has a public URL."""
    if not config.server.public_url:
        return None
    return f"{config.server.public_url}/logs/{task_id}/{log_token(config, task_id)}"


def log_token(config: Config, task_id: int) -> str:
    key = (config.gitea.webhook_secret or config.gitea.token or "kugetsu").encode()
    return hmac.new(key, f"log:{task_id}".encode(), hashlib.sha256).hexdigest()[:24]


@dataclass(frozen=True)
class QueueView:
    position: int | None
    busy: int
    limit: int


def render_tracking(task: Task, config: Config, queue: QueueView, *, log_tail: str = "") -> str:
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

    if task.state is State.PENDING:
        where = f"position {queue.position} in the queue, " if queue.position else ""
        line = f"⏳ **Queued**: {where}{queue.busy} of {queue.limit} agents busy."
        if task.attempts and task.outcome:
            line = (
                f"🔁 **Retrying**: attempt {task.attempts} of {n} ended with "
                f"`{task.outcome.value}`"
                + (f" ({redact(task.error, config.secrets())})" if task.error else "")
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
        return head + f"🚫 **Not started**: {redact(task.error or 'not allowed', config.secrets())}"
    if task.state is State.CANCELLED:
        who = task.cancel_requested_by or "an operator"
        return head + (
            f"🛑 **Stopped** by @{who}."
            if who != "cli"
            else "🛑 **Stopped** from the kugetsu command line."
        )

    took = duration((task.finished_at or 0) - (task.started_at or 0)) if task.started_at else "?"
    usage = usage_line(task.usage)
    footer = " · ".join(
        x for x in (f"agent {agent}", f"took {took}", f"attempt {task.attempts} of {n}", usage) if x
    )
    summary = agent_block(task.summary or "", config.secrets())
    summary_block = f"\n\n{summary}" if summary else ""

    if task.state is State.COMPLETED and task.outcome is Outcome.SUCCEEDED:
        files = (
            f", {task.files_changed} file{'s' if task.files_changed != 1 else ''} changed"
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
    # failed
    reason = redact(task.error or "", config.secrets())
    tail = redact(log_tail, config.secrets())
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
        head + f"❌ **Failed** (`{outcome}`) after {task.attempts} attempt"
        f"{'s' if task.attempts != 1 else ''}: {reason}{tail_block}\n\n"
        f"Comment `{config.triggers.command} retry` to try again.\n\n"
        f"<sub>{footer}{log_ref}</sub>"
    )


def render_pr_body(
    task: Task, config: Config, *, summary: str, files_changed: int, usage: dict[str, Any]
) -> str:
    link = log_link(config, task.id)
    summary = agent_block(summary, config.secrets())
    details = [
        f"task #{task.id}",
        f"agent `{task.agent}`",
        f"{files_changed} file{'s' if files_changed != 1 else ''} changed",
    ]
    if usage_line(usage):
        details.append(usage_line(usage))
    if link:
        details.append(f"[task log]({link})")
    return (
        f"Closes #{task.issue}\n\n"
        + (f"{summary}\n\n" if summary else "")
        + "---\nWritten by kugetsu · "
        + " · ".join(details)
        + f"\n{marker(task.id)}"
    )


def status_text(
    store: Store, repo: str, issue: int, config: Config, *, show_queue: bool = True
) -> str:
    """The issue's tasks, and with `show_queue` how busy kugetsu is over all repositories
    (only for those who may read the repository: the queue says what happens elsewhere)."""
    tasks = store.list_tasks(repo=repo, issue=issue)
    if not tasks:
        return (
            f"{REPLY_MARKER}\nkugetsu has no tasks for this issue. Comment "
            f"`{config.triggers.command} start` or add the label `{config.triggers.label}`."
        )
    rows = ["| task | kind | state | outcome | attempts | PR |", "|---|---|---|---|---|---|"]
    for t in tasks[-10:]:
        rows.append(
            f"| #{t.id} | {t.kind.value} | {t.state.value} | "
            f"{t.outcome.value if t.outcome else ''} | {t.attempts}/{t.max_attempts} | "
            f"{'#' + str(t.pr_number) if t.pr_number else ''} |"
        )
    text = f"{REPLY_MARKER}\nkugetsu on this issue:\n\n" + "\n".join(rows)
    if not show_queue:
        return text
    return (
        text + f"\n\nAgents busy: {store.count(State.RUNNING)} of "
        f"{config.queue.max_concurrent_agents}; tasks waiting: {store.count(State.PENDING)}."
    )


class Publisher:
    def __init__(
        self,
        config: Config,
        store: Store,
        gitea: GiteaAPI,
        *,
        clock=time.monotonic,
        position_refresh_seconds: float = 15.0,
    ):
        self.config, self.store, self.gitea = config, store, gitea
        self.clock = clock
        self.position_refresh_seconds = position_refresh_seconds
        self._positions_at = float("-inf")
        #: task id -> (5xx in a row for its tracking comment, when it may be tried again).
        #: In memory: it says how Gitea answers this process now, not a fact about the
        #: task, so after a restart each comment is simply tried once more; and it costs
        #: no write, which the receiver's deliveries would wait behind.
        self._backoff: dict[int, tuple[int, float]] = {}

    # ---------------------------------------------------------------- tracking comment

    def _log_tail(self, task: Task) -> str:
        path = self.config.storage.logs_dir / f"{task.id}.log"
        try:
            with path.open("rb") as fh:
                fh.seek(0, 2)
                size = fh.tell()
                fh.seek(max(0, size - 4000))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def render(self, task: Task, position: int | None = None) -> str:
        if task.state is State.PENDING and position is None:
            position = self.store.queue_position(task.id)
        queue = QueueView(
            position, self.store.count(State.RUNNING), self.config.queue.max_concurrent_agents
        )
        tail = self._log_tail(task) if task.state is State.FAILED else ""
        return render_tracking(task, self.config, queue, log_tail=tail)

    def sync_task(
        self, task: Task, position: int | None = None, synced: list[CommentRecord] | None = None
    ) -> bool:
        """Create or edit the task's tracking comment to match its state. True if written.

        What was written is recorded in the database at once, or, with `synced`, appended
        there for the caller to record later (Store.comment_synced_many). Recording late is
        safe: an edit is simply made again, and a create is marked first (comment_attempt),
        so that a create whose record was lost is found again instead of made twice.
        """

        def record(version: int, body: str, comment_id: int | None = None) -> None:
            if synced is None:
                self.store.comment_synced(task.id, version, body, comment_id=comment_id)
            else:
                synced.append((task.id, version, body, comment_id))

        version, last_body = self.store.comment_state(task.id)
        task = self.store.require(task.id)  # the freshest row, read after the version
        body = self.render(task, position)
        if task.comment_id is not None and body == last_body:
            record(version, body)
            return False
        comment_id = task.comment_id
        if comment_id is None:
            # last_body is set just before every create: if it is there but no comment id,
            # a create may have reached Gitea before a crash, so look for it first
            existing = self._find_existing_comment(task) if last_body is not None else None
            if existing is None:
                self.store.comment_attempt(task.id)
                created = self.gitea.create_comment(task.owner, task.name, task.issue, body)
                record(version, body, int(created["id"]))
                return True
            self.store.comment_synced(task.id, 0, last_body or "", comment_id=existing)
            task, comment_id = self.store.require(task.id), existing
        try:
            self.gitea.edit_comment(task.owner, task.name, comment_id, body)
        except NotFound:
            # someone deleted it: write a new one rather than lose the update
            created = self.gitea.create_comment(task.owner, task.name, task.issue, body)
            record(version, body, int(created["id"]))
            return True
        record(version, body)
        return True

    def _find_existing_comment(self, task: Task) -> int | None:
        """After a crash between creating a comment and recording it, find it again.

        Only a comment that begins with the task's marker and, when the bot's login is
        known, was written by the bot: anyone can type the marker into a comment.
        """
        mark = marker(task.id)
        login = self.config.gitea.bot_login or self.store.get_meta("bot_login")
        for comment in self.gitea.list_comments(task.owner, task.name, task.issue):
            if not (comment.get("body") or "").startswith(mark):
                continue
            author = (comment.get("user") or {}).get("login")
            if login and author != login:
                continue
            return int(comment["id"])
        return None

    def sync_comments(self, budget: int = 30) -> int:
        """Bring tracking comments up to date; returns how many it wrote.

        Changed tasks come first. Queue positions move every time a task starts, so they
        are refreshed at most every `position_refresh_seconds` (for the first `budget`
        queued tasks; further back, a comment shows the position it had when last written).
        A refusal for one comment (locked issue, no permission) skips that version only.
        A server error for one comment backs that comment off (COMMENT_BACKOFF_SECONDS,
        doubling) and the pass goes on; an unreachable Gitea, or server errors for
        FAILING_IN_A_ROW comments in a row, end the pass (the rest catches up later).
        """
        written = 0
        failing = 0  # server errors in a row
        # Each pass records what it wrote in one transaction instead of one per comment:
        # the worker's many small transactions are what the receiver waits behind for
        # SQLite's write lock (bench/README.md).
        synced: list[CommentRecord] = []

        def sync(task: Task, position: int | None = None) -> None:
            nonlocal written, failing
            try:
                if self._sync_or_skip(task, position, synced):
                    written += 1
                    failing = 0
                    self._backoff.pop(task.id, None)
            except ServerError:
                failing += 1
                if failing >= FAILING_IN_A_ROW:
                    raise
                self._back_off(task.id)

        try:
            now = self.clock()
            self._backoff = {
                k: v for k, v in self._backoff.items() if v[1] + COMMENT_BACKOFF_MAX_SECONDS > now
            }
            # as many more as are backed off, so that those cannot take the whole budget
            due = [
                t
                for t in self.store.comment_out_of_date(budget + len(self._backoff))
                if self._may_try(t.id, now)
            ]
            for task in due[:budget]:
                sync(task)
            self.store.comment_synced_many(synced)
            synced.clear()
            if (
                written < budget
                and self.clock() - self._positions_at >= self.position_refresh_seconds
            ):
                self._positions_at = self.clock()
                for task, position in self.store.pending_positions(budget):
                    if written >= budget:
                        break
                    if task.comment_id is not None and self._may_try(task.id, now):
                        sync(task, position)
        except (ServerError, Unreachable) as exc:
            log.warning("tracking comments not synced", extra={"error": str(exc)})
        finally:
            self.store.comment_synced_many(synced)
        return written

    def _may_try(self, task_id: int, now: float) -> bool:
        return self._backoff.get(task_id, (0, now))[1] <= now

    def _back_off(self, task_id: int) -> None:
        """Gitea answered 5xx for this task's comment (and not for all): try it later."""
        failures = self._backoff.get(task_id, (0, 0.0))[0] + 1
        delay = doubling(COMMENT_BACKOFF_SECONDS, failures, COMMENT_BACKOFF_MAX_SECONDS)
        self._backoff[task_id] = (failures, self.clock() + delay)
        log.warning(
            "tracking comment backed off",
            extra={"task": task_id, "seconds": delay, "failures": failures},
        )

    def _sync_or_skip(
        self, task: Task, position: int | None = None, synced: list[CommentRecord] | None = None
    ) -> bool:
        written = False
        # a comment that cannot be written for a reason of its own (refused, or a task this
        # code cannot render) skips this version, so the others behind it are not held up
        with on_its_own("tracking comment", task.id, lambda _reason: self._skip(task)):
            try:
                written = self.sync_task(task, position, synced)
            except (ServerError, Unreachable):
                raise
            except GiteaError as exc:
                self._skip(task)
                log.warning("tracking comment refused", extra={"task": task.id, "error": str(exc)})
        return written

    def _skip(self, task: Task) -> None:
        """Leave the task's comment as it is until the task changes again."""
        version, last_body = self.store.comment_state(task.id)
        self.store.comment_synced(task.id, version, last_body or "")

    # ---------------------------------------------------------------- pull requests

    def publish_pr(
        self,
        task: Task,
        *,
        branch: str,
        base: str,
        title: str,
        summary: str,
        files_changed: int,
        usage: dict[str, Any],
    ) -> tuple[int, bool]:
        """Open a PR for the branch or update the one that exists. Returns (number, created).

        A create that fails may still have been applied: Gitea did the work and the answer
        was lost (a proxy's 504, a read timeout, a reset), or another open PR appeared (409).
        So after any failed create the open PR is looked up again before anything is
        decided, and one found is adopted. `created` is True when the PR is this task's own
        (its body carries the task's marker), whichever call made it.
        """
        body = render_pr_body(
            task, self.config, summary=summary, files_changed=files_changed, usage=usage
        )
        existing = self.gitea.find_open_pull(task.owner, task.name, base, branch)
        if existing is None:
            try:
                created = self.gitea.create_pull(
                    task.owner, task.name, head=branch, base=base, title=title, body=body
                )
                return int(created["number"]), True
            except GiteaError as exc:
                try:
                    existing = self.gitea.find_open_pull(task.owner, task.name, base, branch)
                except GiteaError:
                    raise exc from None
                if existing is None:
                    raise
                log.warning(
                    "pull request found after a failed create",
                    extra={"task": task.id, "pr": existing.get("number"), "error": str(exc)},
                )
        number = int(existing["number"])
        own = marker(task.id) in (existing.get("body") or "")
        if task.kind is Kind.CONTINUE and not own:
            self.gitea.create_comment(
                task.owner,
                task.name,
                number,
                f"<!-- kugetsu:follow-up={task.id} -->\n"
                f"Pushed a follow-up for @{task.requested_by} "
                f"(task #{task.id}, {files_changed} file{'s' if files_changed != 1 else ''} "
                f"changed in this pull request so far).\n\n"
                + agent_block(summary, self.config.secrets()),
            )
        elif existing.get("body") != body:
            self.gitea.edit_pull(task.owner, task.name, number, body=body)
        return number, own

    # ---------------------------------------------------------------- replies

    def reply(self, repo: str, number: int, body: str) -> None:
        owner, name = repo.split("/", 1)
        text = body if "<!-- kugetsu" in body else f"{REPLY_MARKER}\n{body}"
        self.gitea.create_comment(owner, name, number, redact(text, self.config.secrets()))

    def react(self, repo: str, comment_id: int, content: str = "eyes") -> None:
        owner, name = repo.split("/", 1)
        self.gitea.add_reaction(owner, name, comment_id, content)


__all__: Sequence[str] = (
    "Publisher",
    "QueueView",
    "log_link",
    "log_token",
    "marker",
    "render_pr_body",
    "render_tracking",
    "status_text",
)
