"""Writing on Gitea: tracking comments, pull requests, replies and reactions.

I/O only: the text comes from `core.render`. The `Publisher` gathers what a text needs
(a task's row, its queue position, the tail of its log), has it rendered, and sends it
through the Gitea client. The tracking comment is idempotent: the store remembers which
version of a task the comment shows, so after an outage the comment simply catches up
with the task's latest state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bot import tasklog
from bot.config import Config
from bot.core import render
from bot.core.render import QueueView
from bot.core.tasks import Kind, State, Task, doubling
from bot.gitea import GiteaAPI, GiteaError, NotFound, ServerError, Unreachable
from bot.isolate import on_its_own
from bot.store import CommentRecord, LeaseLost, Store

log = logging.getLogger(__name__)

#: how much of the end of a failed task's log its comment quotes (before MAX_TAIL cuts it)
LOG_TAIL_BYTES = 4000
#: a tracking comment that Gitea answers with 5xx is not tried again for this long, twice
#: as long after each further 5xx, up to COMMENT_BACKOFF_MAX_SECONDS
COMMENT_BACKOFF_SECONDS = 10.0
COMMENT_BACKOFF_MAX_SECONDS = 300.0
#: 5xx for this many tracking comments in a row, none written in between: Gitea is failing
#: as a whole, not for one comment, and the pass ends
FAILING_IN_A_ROW = 2


class Publisher:
    def __init__(
        self,
        config: Config,
        store: Store,
        gitea: GiteaAPI,
        *,
        clock: Callable[[], float] = time.monotonic,
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
        #: True while this node may write on Gitea for kugetsu (the worker's check of
        #: the publisher lease); checked before each tracking comment, reply and reaction
        self.may_publish: Callable[[], bool] = lambda: True

    # ---------------------------------------------------------------- tracking comment

    def _log_tail(self, task: Task) -> str:
        return tasklog.tail(self.config, self.store, task.id, LOG_TAIL_BYTES).decode(
            "utf-8", "replace"
        )

    def _fence(self) -> None:
        """Before writing on Gitea for kugetsu: this node is still the publisher."""
        if not self.may_publish():
            raise LeaseLost("the publisher lease is another node's now")

    def tracking_body(self, task: Task, position: int | None = None) -> str:
        """The task's tracking comment as it should read now."""
        if task.state is State.PENDING and position is None:
            position = self.store.queue_position(task.id)
        queue = QueueView(
            position, self.store.count(State.RUNNING), self.config.queue.max_concurrent_agents
        )
        tail = self._log_tail(task) if task.state is State.FAILED else ""
        return render.tracking(task, self.config, queue, log_tail=tail)

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
        if render.answer_due(task):
            self._answer(task)
        body = self.tracking_body(task, position)
        if task.comment_id is not None and body == last_body:
            record(version, body)
            return False
        comment_id = task.comment_id
        if comment_id is None:
            # last_body is set just before every create: if it is there but no comment id,
            # a create may have reached Gitea before a crash, so look for it first
            existing = (
                self._find_marked(task, task.issue, render.marker(task.id))
                if last_body is not None
                else None
            )
            if existing is None:
                self._fence()
                self.store.comment_attempt(task.id)
                created = self.gitea.create_comment(task.owner, task.name, task.issue, body)
                record(version, body, int(created["id"]))
                return True
            self.store.comment_synced(task.id, 0, last_body or "", comment_id=existing)
            task, comment_id = self.store.require(task.id), existing
        self._fence()
        try:
            self.gitea.edit_comment(task.owner, task.name, comment_id, body)
        except NotFound:
            # someone deleted it: write a new one rather than lose the update
            created = self.gitea.create_comment(task.owner, task.name, task.issue, body)
            record(version, body, int(created["id"]))
            return True
        record(version, body)
        return True

    def _answer(self, task: Task) -> None:
        """Post a task's result where it was asked (`Task.answer_on`), once: the comment is
        marked as being written first, so that one whose record a crash lost is found
        again instead of written twice. Gitea refusing it (a locked pull request) gives
        up on it; the tracking comment has the result anyway."""
        assert task.answer_on is not None
        mark = render.answer_marker(task.id)
        if task.answer_id == 0:
            found = self._find_marked(task, task.answer_on, mark)
            if found is not None:
                self.store.update(task.id, answer_id=found, bump=False)
                return
        else:
            self.store.update(task.id, answer_id=0, bump=False)
        try:
            created = self.gitea.create_comment(
                task.owner, task.name, task.answer_on, render.answer(task, self.config)
            )
        except (ServerError, Unreachable):
            raise
        except GiteaError as exc:
            log.warning("answer refused", extra={"task": task.id, "error": str(exc)})
            self.store.update(task.id, answer_id=-1, bump=False)
            return
        self.store.update(task.id, answer_id=int(created["id"]), bump=False)

    def _find_marked(self, task: Task, number: int, mark: str) -> int | None:
        """After a crash between creating a comment and recording it, find it again on
        issue or pull request `number`.

        Only a comment that begins with the marker and, when the bot's login is known,
        was written by the bot: anyone can type the marker into a comment.
        """
        login = self.config.gitea.bot_login or self.store.get_meta("bot_login")
        for comment in self.gitea.list_comments(task.owner, task.name, number):
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
        usage: Mapping[str, Any],
        changed: Sequence[str] | None = None,
        fence: Callable[[], None] = lambda: None,
    ) -> tuple[int, bool]:
        """Open a PR for the branch or update the one that exists. Returns (number, created).

        A create that fails may still have been applied: Gitea did the work and the answer
        was lost (a proxy's 504, a read timeout, a reset), or another open PR appeared (409).
        So after any failed create the open PR is looked up again before anything is
        decided, and one found is adopted. `created` is True when the PR is this task's own
        (its body carries the task's marker), whichever call made it. `fence` is called
        before each write (it raises when the attempt lost its lease).

        A follow-up on a pull request it did not open announces its commits there (for a
        review, comment by comment, resolving the conversations whose files it changed:
        `changed` are the files its run changed, None when not known) and brings the body
        kugetsu wrote up to date: the files changed in it, the latest summary and usage.
        """
        body = render.pr_body(
            task, self.config, summary=summary, files_changed=files_changed, usage=usage
        )
        existing = self.gitea.find_open_pull(task.owner, task.name, base, branch)
        if existing is None:
            fence()
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
        old_body = existing.get("body") or ""
        own = render.marker(task.id) in old_body
        if task.kind is Kind.CONTINUE and not own:
            fence()
            if task.review:
                resolved = self._resolve(task, changed)
                note = render.review_answer(
                    task,
                    self.config,
                    summary=summary,
                    files_changed=files_changed,
                    changed=changed,
                    resolved=resolved,
                )
            else:
                note = render.follow_up(
                    task, self.config, summary=summary, files_changed=files_changed
                )
            fence()
            self.gitea.create_comment(task.owner, task.name, number, note)
            if not self._wrote(existing):
                return number, own
        if old_body != body:
            fence()
            self.gitea.edit_pull(task.owner, task.name, number, body=body)
        return number, own

    def _wrote(self, pull: Mapping[str, Any]) -> bool:
        """Whether kugetsu wrote this pull request (and so may rewrite its body)."""
        login = self.config.gitea.bot_login or self.store.get_meta("bot_login")
        author = (pull.get("user") or {}).get("login")
        return render.MARKER in (pull.get("body") or "") and (not login or author == login)

    def _resolve(self, task: Task, changed: Sequence[str] | None) -> list[int]:
        """Resolve the conversations of the review's line comments whose files the run
        changed; returns their ids. A conversation Gitea will not resolve stays open."""
        if changed is None:
            return []
        done = []
        for comment in task.review.get("comments") or ():
            if comment.get("path") not in changed or not isinstance(comment.get("id"), int):
                continue
            try:
                self.gitea.resolve_review_comment(task.owner, task.name, comment["id"])
            except (ServerError, Unreachable):
                raise
            except GiteaError as exc:
                log.warning(
                    "conversation not resolved",
                    extra={"task": task.id, "comment": comment["id"], "error": str(exc)},
                )
                continue
            done.append(comment["id"])
        return done

    # ---------------------------------------------------------------- replies

    def reply(self, repo: str, number: int, body: str) -> None:
        owner, name = repo.split("/", 1)
        self._fence()
        self.gitea.create_comment(owner, name, number, render.reply(body, self.config.secrets()))

    def react(self, repo: str, comment_id: int, content: str = "eyes") -> None:
        owner, name = repo.split("/", 1)
        self._fence()
        self.gitea.add_reaction(owner, name, comment_id, content)
