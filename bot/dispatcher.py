"""The tick, and the runner that carries one task from claim to outcome.

`tick()` is quick and never waits on an agent: it recovers tasks orphaned by a
dead process, authorizes new tasks, claims up to the free slots (the store
guarantees the limit), starts one runner thread per claimed task, works the
outbox (replies, reactions, stop and retry), and brings tracking comments up
to date. Each runner prepares the worktree, runs the agent under a timeout,
budget and stop flag, publishes the result, and ends in `finish()`, the one
place an attempt's outcome turns into the task's next state.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bot import agents, names, process
from bot.config import Config
from bot.gitea import (
    Forbidden,
    GiteaAPI,
    GiteaError,
    NotFound,
    ServerError,
    Unauthorized,
    Unreachable,
)
from bot.health import TickRecord, describe
from bot.isolate import on_its_own
from bot.publisher import Publisher, status_text
from bot.redact import redact
from bot.scheduler import Coalescer
from bot.store import Store
from bot.tasks import (
    Kind,
    Outcome,
    State,
    Task,
    decide,
    doubling,
    fallback_permission,
    permission_at_least,
)
from bot.workspace import GitError, Prepared, Workspace

log = logging.getLogger(__name__)

HEARTBEAT_STALE_SECONDS = 90.0
POLL_SECONDS = 0.25
GITEA_WAIT_SECONDS = 15.0
PUBLISHER_LEASE_SECONDS = 120.0
BOT_LOGIN_RETRY_SECONDS = 60.0
#: a burst of wakes becomes one tick per this many seconds, not one tick per delivery
MIN_TICK_SPACING_SECONDS = 0.05
OUTBOX_BUDGET = 30
COMMENT_BUDGET = 30


@dataclass
class Result:
    """How one attempt ended."""

    outcome: Outcome
    error: str | None = None
    retry: bool = True  # False: do not retry even if the outcome allows it
    requeue: bool = False  # put back without counting the attempt
    delay: float = 0.0  # with requeue: wait this long first
    changes: dict[str, Any] = field(default_factory=dict)


class Stopping(Exception):
    """The service is shutting down; the task goes back to the queue."""


class AuthCache:
    """Who may ask kugetsu for work, cached for a few minutes per repo and user."""

    #: cached when Gitea will not say: the bot is not an admin of the repository
    NOT_ADMIN = "not-admin"

    def __init__(self, config: Config, gitea: GiteaAPI, clock: Callable[[], float]):
        self.config, self.gitea, self.clock = config, gitea, clock
        self._cache: dict[tuple[str, str], tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._warned_fallback = False

    def _asked(self, repo: str, login: str) -> str | None:
        """Gitea's answer: a permission, NOT_ADMIN, or None when it can't be asked now."""
        key = (repo, login)
        now = self.clock()
        with self._lock:
            cached = self._cache.get(key)
            if cached and now - cached[0] < self.config.queue.authorization_cache_seconds:
                return cached[1]
        owner, name = names.split_repo(repo)
        try:
            perm = self.gitea.get_permission(owner, name, login)
        except (Forbidden, Unauthorized):
            # Only repository admins may read other users' permissions.
            if not self._warned_fallback:
                log.warning(
                    "cannot read collaborator permissions (kugetsu is not a "
                    "repository admin); judging by what each request shows",
                    extra={"repo": repo},
                )
                self._warned_fallback = True
            perm = self.NOT_ADMIN
        except NotFound:
            perm = "none"
        except GiteaError as exc:
            log.warning(
                "permission check deferred", extra={"repo": repo, "user": login, "error": str(exc)}
            )
            return None
        with self._lock:
            self._cache[key] = (now, perm)
        return perm

    def permission(self, repo: str, login: str, hint: str | None) -> str | None:
        """The user's permission, or None when Gitea can't be asked right now.

        Without admin rights, what the request shows (`hint`): see fallback_permission.
        """
        perm = self._asked(repo, login)
        return fallback_permission(hint)[0] if perm == self.NOT_ADMIN else perm

    def check(self, repo: str, login: str, hint: str | None) -> tuple[bool, str] | None:
        triggers = self.config.triggers
        if triggers.allowed_users and login not in triggers.allowed_users:
            return False, f"@{login} is not on kugetsu's list of allowed users"
        perm, exact = self._asked(repo, login), True
        if perm is None:
            return None
        if perm == self.NOT_ADMIN:
            perm, exact = fallback_permission(hint)
        if not permission_at_least(perm, triggers.min_permission):
            if not exact:
                return False, (
                    f"kugetsu cannot check that @{login} has "
                    f"{triggers.min_permission} access to {repo}: reading other "
                    "users' permissions needs admin access to the repository"
                )
            return False, (
                f"@{login} needs {triggers.min_permission} access to {repo} "
                f"to use kugetsu (has {perm})"
            )
        return True, perm


def build_prompt(
    task: Task, title: str, body: str, *, history: list[Task] | None = None, branch: str, base: str
) -> str:
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
                + (f"\n  result: {old.summary.strip()[:1500]}" if old.summary else "")
            )
    if task.kind is Kind.CONTINUE:
        parts.append(f"\nFollow-up request from @{task.requested_by}:\n{task.prompt}")
    elif task.prompt:
        parts.append(f"\nInstructions from @{task.requested_by}:\n{task.prompt}")
    parts.append(
        f"\nThe current directory is a git worktree on branch {branch}, made from {base}. "
        "Make the changes the issue asks for in this directory. You do not need to commit, "
        "push or open a pull request: kugetsu commits your changes and opens the pull request. "
        "End with a short summary of what you changed."
    )
    return "\n".join(parts)


class Dispatcher:
    def __init__(
        self,
        config: Config,
        store: Store,
        gitea: GiteaAPI,
        workspace: Workspace,
        *,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
        on_change: Callable[[], None] = lambda: None,
    ):
        self.config, self.store, self.gitea, self.workspace = config, store, gitea, workspace
        self.clock = clock
        self.environ = dict(os.environ if environ is None else environ)
        self.on_change = on_change
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.publisher = Publisher(config, store, gitea)
        self.auth = AuthCache(config, gitea, clock)
        self._runners: dict[int, threading.Thread] = {}
        self._runners_lock = threading.Lock()
        self._stopping = threading.Event()
        self._ticks = Coalescer(
            self.tick, stopped=self._stopping.is_set, min_interval=MIN_TICK_SPACING_SECONDS
        )
        self.bot_login: str | None = config.gitea.bot_login or None
        self._bot_login_tried = float("-inf")
        self._lease_renew_at = float("-inf")
        self.ticks = TickRecord()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Register this process and recover what a previous run left behind."""
        for path in (
            self.config.storage.logs_dir,
            self.config.storage.prompts_dir,
            self.config.storage.homes_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)
        self.store.register_worker(
            self.worker_id, os.getpid(), process.process_start_token(os.getpid())
        )
        self.recover()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the agents this process started and put their tasks back in the queue."""
        self._stopping.set()
        deadline = time.monotonic() + (
            timeout if timeout is not None else self.config.agents.kill_grace_seconds + 30
        )
        for thread in self.runner_threads():
            thread.join(max(0.1, deadline - time.monotonic()))
        self.store.release_leases(self.worker_id)
        self._lease_renew_at = float("-inf")
        self.store.unregister_worker(self.worker_id)

    def runner_threads(self) -> list[threading.Thread]:
        with self._runners_lock:
            return list(self._runners.values())

    # ---------------------------------------------------------------- the tick

    def request_tick(self) -> None:
        """Ask for another tick; the next run_tick (or the one in progress) will do it."""
        self._ticks.request()

    def run_tick(self) -> None:
        """Run tick() now, or make the tick in progress run once more. Never loses a wake."""
        self._ticks.run()

    def tick(self) -> None:
        """One pass over the queue. Its outcome is kept for /healthz: an exception that
        escapes it (an item's own failure does not) is written to the database at once."""
        self.ticks = self.ticks.began(self.clock())
        try:
            self._tick()
        except Exception as exc:
            self.ticks = self.ticks.failed(self.clock(), describe(exc))
            self._report_ticks()
            raise
        recovered = self.ticks.failures > 0
        self.ticks = self.ticks.succeeded(self.clock())
        if recovered:
            self._report_ticks()

    def _report_ticks(self) -> None:
        try:
            self.store.heartbeat(self.worker_id, self.ticks.to_json())
        except sqlite3.Error as exc:
            # the heartbeat goes stale, which /healthz reports in its place
            log.error("cannot report the ticks to the database", extra={"error": str(exc)})

    def _tick(self) -> None:
        self.ensure_bot_login()
        self._reap()
        self.recover()
        self.authorize()
        self.launch()
        # With several processes on one database, one at a time talks for kugetsu, so a
        # tracking comment is never created twice and a reply never sent twice.
        if self._publisher_lease():
            busy = self.work_outbox() >= OUTBOX_BUDGET
            busy |= self.publisher.sync_comments(COMMENT_BUDGET) >= COMMENT_BUDGET
            if busy:
                self.request_tick()  # a backlog (say, 1,000 queued tasks): go round again now

    def _publisher_lease(self) -> bool:
        """Hold the publisher lease; renewed only when half of it is used up."""
        now = self.clock()
        if now < self._lease_renew_at:
            return True
        if self.store.try_lease("publisher", self.worker_id, PUBLISHER_LEASE_SECONDS):
            self._lease_renew_at = now + PUBLISHER_LEASE_SECONDS / 2
            return True
        return False

    def cleanup(self, older_than_days: float) -> dict[str, int]:
        """Delete old finished tasks, their logs and prompt files, and idle worktrees."""
        removed = self.store.clear(older_than_days)
        cutoff = self.clock() - older_than_days * 86400.0
        old: dict[int, list[Path]] = {}
        for folder, suffix in (
            (self.config.storage.logs_dir, ".log"),
            (self.config.storage.prompts_dir, ".md"),
        ):
            for path in folder.glob(f"*{suffix}") if folder.is_dir() else ():
                stem = path.name[: -len(suffix)]
                if stem.isdigit() and path.stat().st_mtime < cutoff:
                    old.setdefault(int(stem), []).append(path)
        known = self.store.existing(old)
        files = 0
        for task_id, paths in old.items():
            if task_id not in known:
                for path in paths:
                    path.unlink(missing_ok=True)
                    files += 1
        keep = [Path(t.worktree) for t in self.store.active_tasks() if t.worktree]
        worktrees = self.workspace.cleanup(older_than_days * 86400.0, keep=keep)
        log.info(
            "cleanup done", extra={"tasks": removed, "files": files, "worktrees": len(worktrees)}
        )
        return {"tasks": removed, "files": files, "worktrees": len(worktrees)}

    def ensure_bot_login(self) -> str | None:
        """Who kugetsu is on Gitea, for the loop guard: config, then the store, then /user."""
        if self.bot_login:
            return self.bot_login
        login = self.config.gitea.bot_login or self.store.get_meta("bot_login")
        if (
            not login
            and self.config.gitea.token
            and self.clock() - self._bot_login_tried >= BOT_LOGIN_RETRY_SECONDS
        ):
            self._bot_login_tried = self.clock()
            try:
                login = self.gitea.get_user().get("login")
            except GiteaError as exc:
                log.warning("cannot read the bot's own user", extra={"error": str(exc)})
            if login:
                self.store.set_meta("bot_login", login)
        self.bot_login = login or None
        return self.bot_login

    def heartbeat(self) -> None:
        """Every few seconds, on its own job: say this process lives and how its ticks go,
        and checkpoint the WAL."""
        self.store.heartbeat(self.worker_id, self.ticks.to_json())
        self.store.checkpoint()

    def _reap(self) -> None:
        with self._runners_lock:
            for task_id, thread in list(self._runners.items()):
                if not thread.is_alive():
                    del self._runners[task_id]

    # ---------------------------------------------------------------- recovery

    def _worker_alive(self, worker: dict[str, Any]) -> bool:
        if worker["id"] == self.worker_id:
            return True
        if worker["host"] == socket.gethostname():
            token = process.process_start_token(worker["pid"])
            return token is not None and token == worker["pid_start"]
        return self.clock() - worker["heartbeat_at"] < HEARTBEAT_STALE_SECONDS

    def recover(self) -> list[int]:
        """Tasks left running by a process that is gone go back to the queue, attempt counted."""
        workers = {w["id"]: w for w in self.store.workers()}
        alive = {wid for wid, w in workers.items() if self._worker_alive(w)}
        recovered = []
        for task in self.store.running_tasks():
            if task.worker_id == self.worker_id:
                with self._runners_lock:
                    if task.id in self._runners:
                        continue
                # ours, but no runner holds it (should not happen): recover it too
            elif task.worker_id in alive:
                continue
            with on_its_own("recovery", task.id, self._set_aside(task)):
                if self._recover_one(task):
                    recovered.append(task.id)
        for wid in set(workers) - alive:
            self.store.unregister_worker(wid)
        return recovered

    def _recover_one(self, task: Task) -> bool:
        if task.pid and process.kill_orphan(
            task.pid, task.pid_start, self.config.agents.kill_grace_seconds
        ):
            log.warning("killed orphaned agent", extra={"task": task.id, "pid": task.pid})
        decision = decide(Outcome.INFRA_ERROR, task.attempts, task.max_attempts, (0.0,))
        error = "kugetsu stopped while the agent was running"
        if not self.store.transition(
            task.id,
            State.RUNNING,
            decision.state,
            event="recovered",
            detail=task.worker_id,
            error=error,
            pid=None,
            pid_start=None,
            outcome=Outcome.INFRA_ERROR,
            not_before=self.clock(),
        ):
            return False
        log.warning(
            "recovered task",
            extra={"task": task.id, "to": decision.state.value, "attempts": task.attempts},
        )
        return True

    def _set_aside(self, task: Task) -> Callable[[str], bool]:
        """How a tick step gives up on a task it cannot process: the task ends, with the
        reason, through the store's compare-and-set (a pending one is not started)."""

        def give_up(reason: str) -> bool:
            if task.state is State.PENDING:
                # a request not started is refused, which its tracking comment then says
                to = State.REJECTED
                done = self._reject(task, reason, event="set aside", outcome=Outcome.INFRA_ERROR)
            else:
                to = State.FAILED
                done = self.store.transition(
                    task.id,
                    task.state,
                    to,
                    event="set aside",
                    detail=reason,
                    error=reason,
                    outcome=Outcome.INFRA_ERROR,
                    pid=None,
                    pid_start=None,
                )
            log.error("task set aside", extra={"task": task.id, "to": to.value, "error": reason})
            return done

        return give_up

    def _reject(self, task: Task, reason: str, **how: Any) -> bool:
        """Refuse a pending task; its comment counts against the requester's reply limit."""
        triggers = self.config.triggers
        return self.store.reject(
            task,
            reason,
            reply_limit=triggers.reply_limit,
            reply_window=triggers.reply_window_seconds,
            **how,
        )

    # ---------------------------------------------------------------- authorization

    def authorize(self) -> None:
        allowed_tasks: list[tuple[int, str]] = []
        try:
            for task in self.store.unauthorized_pending():
                with on_its_own("authorization", task.id, self._set_aside(task)):
                    verdict = self.auth.check(task.repo, task.requested_by, task.permission_hint)
                    if verdict is None:
                        break  # Gitea cannot answer now; the rest wait for the next tick
                    allowed, reason = verdict
                    if allowed:
                        allowed_tasks.append((task.id, reason))
                        continue
                    self._reject(task, reason)
                    log.info("task rejected", extra={"task": task.id, "user": task.requested_by})
        finally:
            self.store.mark_authorized(allowed_tasks)

    # ---------------------------------------------------------------- launching

    def launch(self) -> list[int]:
        if self._stopping.is_set():
            return []
        claimed = self.store.claim(self.config.queue.max_concurrent_agents, self.worker_id)
        for task in claimed:
            with on_its_own("start", task.id, partial(self._not_started, task)):
                thread = threading.Thread(
                    target=self._run, args=(task,), name=f"task-{task.id}", daemon=True
                )
                with self._runners_lock:
                    self._runners[task.id] = thread
                thread.start()
                log.info(
                    "task started",
                    extra={
                        "task": task.id,
                        "repo": task.repo,
                        "issue": task.issue,
                        "attempt": task.attempts,
                    },
                )
        return [t.id for t in claimed]

    def _not_started(self, task: Task, reason: str) -> None:
        """A claimed task whose runner could not start: the attempt ends like any other."""
        with self._runners_lock:
            self._runners.pop(task.id, None)
        self.finish(task, Result(Outcome.INFRA_ERROR, reason))

    def _run(self, task: Task) -> None:
        try:
            try:
                result = self.execute(task)
            except Stopping:
                result = Result(Outcome.INFRA_ERROR, "kugetsu was shut down", requeue=True)
            except Exception as exc:  # a bug must not leave the task running forever
                log.exception("task crashed", extra={"task": task.id})
                result = Result(Outcome.INFRA_ERROR, f"internal error: {exc.__class__.__name__}")
            self.finish(task, result)
        finally:
            with self._runners_lock:
                self._runners.pop(task.id, None)
            self.on_change()

    def finish(self, task: Task, result: Result) -> State | None:
        """The one place an attempt's outcome becomes the task's next state."""
        current = self.store.get(task.id)
        if current is None or current.state is not State.RUNNING:
            return None
        changes = dict(result.changes)
        changes.update(outcome=result.outcome, error=result.error, pid=None, pid_start=None)
        if result.requeue:
            ok = self.store.transition(
                task.id,
                State.RUNNING,
                State.PENDING,
                event="requeued",
                detail=result.error,
                attempts=max(0, current.attempts - 1),
                not_before=self.clock() + result.delay,
                **changes,
            )
            return State.PENDING if ok else None
        decision = decide(
            result.outcome,
            current.attempts,
            current.max_attempts,
            self.config.queue.retry_backoff_seconds,
        )
        state = decision.state
        if state is State.PENDING and not result.retry:
            state = State.FAILED
        if state is State.PENDING:
            changes["not_before"] = self.clock() + (decision.retry_in or 0.0)
        ok = self.store.transition(
            task.id,
            State.RUNNING,
            state,
            event=result.outcome.value,
            detail=result.error,
            **changes,
        )
        log.info(
            "task finished",
            extra={"task": task.id, "outcome": result.outcome.value, "state": state.value},
        )
        return state if ok else None

    # ---------------------------------------------------------------- one attempt

    def _branch(self, task: Task) -> str:
        return self.config.git.branch_template.format(
            number=task.issue, owner=task.owner, repo=task.name
        )

    def execute(self, task: Task) -> Result:
        cfg = self.config
        secrets = cfg.secrets()
        try:
            issue = self.gitea.get_issue(task.owner, task.name, task.issue)
        except (Unreachable, ServerError) as exc:
            # Gitea is away: wait for it without using up an attempt; nothing has run yet.
            return Result(
                Outcome.INFRA_ERROR,
                f"waiting for Gitea: {exc}",
                requeue=True,
                delay=GITEA_WAIT_SECONDS,
            )
        except GiteaError as exc:
            return Result(Outcome.INFRA_ERROR, f"could not read the issue: {exc}", retry=False)
        branch = self._branch(task)
        try:
            prepared = self.workspace.prepare(task.repo, task.issue, branch)
        except GitError as exc:
            return Result(Outcome.INFRA_ERROR, redact(f"git: {exc}", secrets))
        self.store.update(task.id, branch=branch, worktree=str(prepared.path))
        if task.publish_sha:
            resumed = self._resume_publishing(task, issue, prepared, branch)
            if resumed is not None:
                return resumed
        start_head = self.workspace.head(prepared.path)

        issue_row = self.store.issue_row(task.repo, task.issue) or {}
        order = [task.agent] + [a for a in cfg.agents.fallback if a != task.agent]
        tried: list[str] = []
        run: AgentRun | None = None
        for name in order:
            try:
                spec = agents.resolve(cfg.agents, name)
            except agents.UnknownAgent as exc:
                return Result(Outcome.AGENT_FAILED, str(exc), retry=False)
            tried.append(name)
            session = self._session_for(task, spec, issue_row)
            history = None
            if task.kind is Kind.CONTINUE and not (session and spec.sessions):
                history = [
                    t
                    for t in self.store.list_tasks(repo=task.repo, issue=task.issue)
                    if t.id < task.id
                ]
            prompt = build_prompt(
                task,
                issue.get("title") or "",
                issue.get("body") or "",
                history=history,
                branch=branch,
                base=prepared.base_branch,
            )
            run = self._run_agent(task, spec, prepared.path, prompt, session, branch)
            self.store.update(
                task.id,
                agents_tried=tried,
                session_id=run.session_id,
                usage=run.usage,
                summary=run.summary,
            )
            if run.session_id and spec.sessions:
                self.store.set_issue(
                    task.repo, task.issue, session_id=run.session_id, agent=name, branch=branch
                )
            if run.outcome is Outcome.AGENT_FAILED and run.rate_limited and name != order[-1]:
                log.warning(
                    "agent rate limited; falling back", extra={"task": task.id, "agent": name}
                )
                continue
            break
        assert run is not None
        changes = {
            "summary": run.summary,
            "usage": run.usage,
            "session_id": run.session_id,
            "agents_tried": tried,
        }
        if run.outcome is not None:
            return Result(run.outcome, run.error, retry=run.retry, changes=changes)

        # the agent succeeded: commit, push, open or update the pull request
        try:
            self.workspace.commit_all(prepared.path, self._commit_message(task, issue))
            if not self.workspace.has_new_commits(prepared.path, prepared.base_sha):
                return Result(Outcome.NO_CHANGES, None, changes=changes)
            head = self.workspace.head(prepared.path)
            remote = self.workspace.remote_branch_sha(task.repo, branch)
        except GitError as exc:
            return Result(Outcome.INFRA_ERROR, redact(f"git: {exc}", secrets), changes=changes)
        if head == start_head and head == remote:
            # Nothing new from this run. The branch may still lack its PR, if an earlier
            # attempt or task pushed and then could not open it: publish in that case.
            try:
                existing = self.gitea.find_open_pull(
                    task.owner, task.name, prepared.base_branch, branch
                )
            except GiteaError as exc:
                return Result(
                    Outcome.INFRA_ERROR,
                    f"could not look up the pull request: {exc}",
                    changes=changes,
                )
            if existing:
                return Result(Outcome.NO_CHANGES, None, changes=changes)
        # The agent's work is committed: from here on, a retry publishes it and does not
        # run the agent again (see _resume_publishing).
        self.store.update(task.id, publish_sha=head, bump=False)
        return self._publish(
            task,
            issue,
            prepared,
            branch,
            head=head,
            remote=remote,
            summary=run.summary,
            usage=run.usage,
            changes=changes,
        )

    def _resume_publishing(
        self, task: Task, issue: Mapping[str, Any], prepared: Prepared, branch: str
    ) -> Result | None:
        """An earlier attempt committed the agent's work and could not publish it (Gitea
        away, a lost answer, a crash): publish that work, with that run's summary and usage.
        None when the work is gone (a worktree lost before its push): the agent runs again."""
        commit = task.publish_sha or ""
        try:
            present = self.workspace.contains(prepared.path, commit)
            if present:
                head = self.workspace.head(prepared.path)
                remote = self.workspace.remote_branch_sha(task.repo, branch)
        except GitError as exc:
            return Result(Outcome.INFRA_ERROR, redact(f"git: {exc}", self.config.secrets()))
        if not present:
            log.warning(
                "committed work is gone; running the agent again",
                extra={"task": task.id, "commit": commit},
            )
            self.store.update(task.id, publish_sha=None, bump=False)
            return None
        log.info("resuming at publishing", extra={"task": task.id, "commit": commit})
        current = self.store.require(task.id)
        return self._publish(
            current,
            issue,
            prepared,
            branch,
            head=head,
            remote=remote,
            summary=current.summary or "",
            usage=current.usage,
            changes={},
        )

    def _publish(
        self,
        task: Task,
        issue: Mapping[str, Any],
        prepared: Prepared,
        branch: str,
        *,
        head: str,
        remote: str | None,
        summary: str,
        usage: dict[str, Any],
        changes: dict[str, Any],
    ) -> Result:
        """Push the committed work and open or update its pull request.

        While Gitea is away (no answer, 5xx) the task waits for it without using up an
        attempt, as it does before the agent runs; a refusal counts one. Either way the
        next attempt publishes without running the agent again.
        """
        secrets = self.config.secrets()
        try:
            files = len(self.workspace.changed_files(prepared.path, prepared.base_sha))
            if head != remote:
                self.workspace.push(prepared.path, branch)
        except GitError as exc:
            return Result(Outcome.INFRA_ERROR, redact(f"git: {exc}", secrets), changes=changes)
        current = self.store.require(task.id)
        try:
            number, _own = self.publisher.publish_pr(
                current,
                branch=branch,
                base=prepared.base_branch,
                title=issue.get("title") or f"Issue #{task.issue}",
                summary=summary,
                files_changed=files,
                usage=usage,
            )
        except (Unreachable, ServerError) as exc:
            return Result(
                Outcome.INFRA_ERROR,
                f"waiting for Gitea to open the pull request: {exc}",
                requeue=True,
                delay=GITEA_WAIT_SECONDS,
                changes=changes,
            )
        except GiteaError as exc:
            return Result(
                Outcome.INFRA_ERROR, f"could not open the pull request: {exc}", changes=changes
            )
        self.store.set_issue(task.repo, task.issue, pr_number=number, branch=branch)
        changes.update(pr_number=number, files_changed=files, publish_sha=None)
        return Result(Outcome.SUCCEEDED, None, changes=changes)

    def _session_for(
        self, task: Task, spec: agents.AgentSpec, issue_row: Mapping[str, Any]
    ) -> str | None:
        if not spec.sessions:
            return None
        current = self.store.require(task.id)
        if current.session_id and current.agents_tried and current.agents_tried[-1] == spec.name:
            return current.session_id  # a retry resumes its own conversation
        if task.kind is Kind.CONTINUE and issue_row.get("agent") == spec.name:
            return issue_row.get("session_id")
        return None

    def _commit_message(self, task: Task, issue: Mapping[str, Any]) -> str:
        title = (issue.get("title") or f"issue #{task.issue}").strip().splitlines()[0][:72]
        if task.kind is Kind.CONTINUE:
            first = (task.prompt.strip().splitlines() or ["follow-up"])[0][:60]
            subject = f"Follow-up on #{task.issue}: {first}"
        else:
            subject = f"{title} (#{task.issue})"
        return (
            f"{subject}\n\nWritten by an AI coding agent ({task.agent}) run by kugetsu, "
            f"task #{task.id}, requested by @{task.requested_by}."
        )

    def _run_agent(
        self,
        task: Task,
        spec: agents.AgentSpec,
        workdir: Path,
        prompt: str,
        session: str | None,
        branch: str,
    ) -> AgentRun:
        cfg = self.config
        storage = cfg.storage
        prompt_file = storage.prompts_dir / f"{task.id}.md"
        prompt_file.parent.mkdir(parents=True, exist_ok=True)
        prompt_file.write_text(prompt, encoding="utf-8")
        home = storage.homes_dir / task.owner / task.name / str(task.issue)
        home_env = agents.prepare_home(spec, home)
        task_vars = {
            "KUGETSU_TASK_ID": str(task.id),
            "KUGETSU_REPO": task.repo,
            "KUGETSU_ISSUE": str(task.issue),
            "KUGETSU_BRANCH": branch,
            "KUGETSU_WORKDIR": str(workdir),
            "KUGETSU_PROMPT_FILE": str(prompt_file),
        }
        env = agents.build_env(
            spec,
            home_env=home_env,
            task_vars=task_vars,
            environ=self.environ,
            secrets=cfg.secrets(),
        )
        started = agents.new_session_id(spec, session)
        argv = agents.argv_for(
            spec,
            prompt=prompt,
            prompt_file=str(prompt_file),
            workdir=str(workdir),
            session_id=session,
            new_session_id=started,
        )
        if started:
            # the command names the session it starts: a follow-up resumes that one
            session = started
            self.store.update(task.id, session_id=started, bump=False)
        meter = agents.UsageMeter(spec)
        max_tokens = task.max_tokens or spec.max_tokens or cfg.agents.max_tokens
        max_cost = task.max_cost_usd or spec.max_cost_usd or cfg.agents.max_cost_usd
        header = (
            f"=== kugetsu task {task.id} attempt {task.attempts} agent {spec.name} "
            f"at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.clock()))} ==="
        )
        try:
            proc = process.AgentProcess.start(
                argv,
                cwd=workdir,
                env=env,
                log_path=storage.logs_dir / f"{task.id}.log",
                log_max_bytes=cfg.agents.log_max_bytes,
                on_line=meter.feed,
                header=header,
                secrets=cfg.secrets(),
            )
        except process.AgentStartError as exc:
            return AgentRun(Outcome.AGENT_FAILED, str(exc), retry=False)
        self.store.update(task.id, pid=proc.pid, pid_start=proc.start_token, bump=False)
        deadline = self.clock() + cfg.agents.timeout_seconds
        grace = cfg.agents.kill_grace_seconds
        stop: tuple[Outcome, str, bool] | None = None
        session_saved = None
        last_flag_check = 0.0
        while proc.wait(POLL_SECONDS) is None:
            if meter.session_id and meter.session_id != session_saved:
                session_saved = meter.session_id
                self.store.update(task.id, session_id=session_saved, bump=False)
            if self._stopping.is_set():
                proc.terminate(grace)
                proc.close()
                raise Stopping()
            if time.monotonic() - last_flag_check >= 1.0:
                last_flag_check = time.monotonic()
                by = self.store.cancel_requested(task.id)
                if by:
                    stop = (Outcome.CANCELLED, f"stopped by {by}", False)
            if stop is None and self.clock() >= deadline:
                stop = (
                    Outcome.TIMED_OUT,
                    f"the agent ran longer than {cfg.agents.timeout_minutes:g} minutes",
                    True,
                )
            if stop is None:
                over = meter.exceeded(max_tokens, max_cost)
                if over:
                    stop = (Outcome.AGENT_FAILED, f"budget exceeded: {over}", False)
            if stop is not None:
                proc.terminate(grace)
                break
        proc.close()
        code = proc.returncode if proc.returncode is not None else -9
        report = agents.parse_output(spec, proc.output(), code)
        session_id = report.session_id or meter.session_id or session
        # The meter saw every line; the parsed output may miss the middle of a huge log.
        best = max((report.usage, meter.usage), key=lambda u: u.total_tokens)
        usage = best.as_dict()
        summary = report.summary or ""
        if stop is not None:
            return AgentRun(
                stop[0], stop[1], retry=stop[2], session_id=session_id, usage=usage, summary=summary
            )
        over = agents.budget_exceeded(best, max_tokens, max_cost)
        if code != 0 or report.failed:
            reason = report.failure or f"the agent exited with code {code}"
            return AgentRun(
                Outcome.AGENT_FAILED,
                reason,
                session_id=session_id,
                usage=usage,
                summary=summary,
                rate_limited=report.rate_limited,
            )
        if over:
            summary = (summary + f"\n\nNote: the run went over its budget ({over}).").strip()
        return AgentRun(None, None, session_id=session_id, usage=usage, summary=summary)

    # ---------------------------------------------------------------- the outbox

    def work_outbox(self, budget: int = OUTBOX_BUDGET) -> int:
        """Send replies, reactions, stops and retries; returns how many items it handled."""
        items = self.store.outbox_due(budget)
        # Reactions are marked done together at the end of the pass: one write
        # transaction instead of one each. Gitea answers a repeated reaction with the
        # existing one, so a crash before the mark at worst sends it again. Replies and
        # actions are marked one by one, right after they happen.
        reacted: list[tuple[int, str | None]] = []

        def done(item, error: str | None = None) -> None:
            if item.kind == "reaction":
                reacted.append((item.id, error))
            else:
                self.store.outbox_done(item.id, error=error)

        try:
            for item in items:
                with on_its_own("outbox", item.id, partial(done, item)):
                    if item.needs_permission:
                        verdict = self.auth.check(
                            item.repo, item.requested_by or "", item.permission_hint
                        )
                        if verdict is None:
                            self.store.outbox_retry(item.id, 30.0, "permission check deferred")
                            continue
                        if not verdict[0]:
                            self._refuse(item, verdict[1])
                            continue
                    try:
                        self._outbox_item(item)
                    except (ServerError, Unreachable) as exc:
                        delay = doubling(5.0, item.attempts + 1, 600.0)
                        self.store.outbox_retry(item.id, delay, str(exc))
                        log.warning(
                            "outbox item deferred", extra={"item": item.id, "error": str(exc)}
                        )
                        return 0  # Gitea is struggling: try the rest later
                    except GiteaError as exc:
                        # refused for good (deleted comment, locked issue, no permission)
                        done(item, str(exc))
                        log.warning(
                            "outbox item refused", extra={"item": item.id, "error": str(exc)}
                        )
                    else:
                        done(item)
        finally:
            self.store.outbox_done_many(reacted)
        return len(items)

    def _refuse(self, item, reason: str) -> None:
        if item.kind in ("stop", "retry"):
            try:
                self._answer(item, f"Not done: {reason}.")
            except GiteaError as exc:
                self.store.outbox_retry(item.id, 30.0, str(exc))
                return
        self.store.outbox_done(item.id, error=f"refused: {reason}")

    def _answer(self, item, body: str) -> None:
        """Reply where the command was written, unless its reply limit was reached."""
        if not item.quiet:
            self.publisher.reply(item.repo, item.target or item.issue, body)

    def _may_read(self, item) -> bool:
        """Whether the requester can read the repository (when Gitea cannot say: no)."""
        if not item.requested_by:
            return False
        perm = self.auth.permission(item.repo, item.requested_by, item.permission_hint)
        return perm is not None and permission_at_least(perm, "read")

    def _outbox_item(self, item) -> None:
        if item.kind == "reaction":
            self.publisher.react(item.repo, item.target, "eyes")
        elif item.kind == "comment":
            self._answer(item, item.body)
        elif item.kind == "status":
            self._answer(
                item,
                status_text(
                    self.store, item.repo, item.issue, self.config, show_queue=self._may_read(item)
                ),
            )
        elif item.kind == "stop":
            active = [
                t for t in self.store.list_tasks(repo=item.repo, issue=item.issue) if t.active
            ]
            if not active:
                self._answer(item, "There is nothing to stop on this issue.")
            for task in active:
                self.store.request_cancel(task.id, item.requested_by or "someone")
            self.on_change()
        elif item.kind == "retry":
            last = self.store.latest_task(item.repo, item.issue)
            if last is None or last.state not in (State.FAILED, State.CANCELLED):
                self._answer(item, "There is no failed or stopped task to retry on this issue.")
            else:
                done, blocker = self.store.try_requeue(last.id, item.requested_by or "someone")
                if blocker is not None:
                    self._answer(
                        item,
                        f"Task #{blocker.id} is still active on this issue; "
                        "stop it first or wait for it to finish.",
                    )
                if done:
                    self.on_change()
        else:
            log.error("unknown outbox item", extra={"item": item.id, "kind": item.kind})


@dataclass
class AgentRun:
    outcome: Outcome | None  # None: the agent succeeded and the result is to be published
    error: str | None
    retry: bool = True
    session_id: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    rate_limited: bool = False
