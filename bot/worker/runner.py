"""One attempt of one task, from its worktree to its `AttemptResult`.

The runner reads the issue, prepares the worktree, runs the agent (and its fallbacks
when one is rate limited) under a timeout, a budget and the stop flag, commits what it
changed, pushes the branch and opens or updates the pull request. Its result goes back
to the tick, whose `finish()` turns it into the task's next state by the retry policy.

The agent runs through the worker's `Sandbox` (bot/sandbox.py): for the run, the issue's
worktree and home are lent to the task's slot and the agent is started by the function
the sandbox gives; when the run ends, whatever way, every process of the slot is killed
and the worktree and home are taken back before kugetsu's own git touches them.

The attempt holds the task's lease (its token, from the claim). Every write about the
attempt is made only while the token is still the task's, and before each step that
publishes (the push, the pull request and its comments) `_fence` renews the lease by
compare-and-set: a runner whose task was taken over (its worker was cut off from the
database past the lease) publishes nothing. Where the database is shared by several
machines (PostgreSQL), the agent's log is shipped to it as it grows, so any node can
serve it (`bot.tasklog`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from bot import agents, process
from bot.config import (
    REPO_SETTINGS_MAX_BYTES,
    REPO_SETTINGS_PATHS,
    Config,
    ConfigError,
    RepoSettings,
    repo_settings,
)
from bot.core import permissions, render
from bot.core.tasks import AGENT_MISSING, AttemptResult, Kind, Outcome, Task
from bot.gitea import Forbidden, GiteaAPI, GiteaError, NotFound, ServerError, Unreachable
from bot.publisher import Publisher
from bot.redact import redact
from bot.sandbox import NoSandbox, Sandbox, SandboxError
from bot.store import LeaseLost, Store
from bot.tasklog import LogShipper
from bot.workspace import Fetched, GitError, Prepared, Workspace

log = logging.getLogger(__name__)

_N = TypeVar("_N", int, float)

#: how often the runner looks at its agent (exit, stop flag, timeout, budget)
POLL_SECONDS = 0.25
#: how often it reads the task's stop request from the database
STOP_CHECK_SECONDS = 1.0
#: an attempt that waits for Gitea (no answer, 5xx) is tried again after this long
GITEA_WAIT_SECONDS = 15.0


class Stopping(Exception):
    """The service is shutting down; the task goes back to the queue."""


@dataclass(frozen=True)
class PullTarget:
    """A pull request a person opened, as the runner works on it."""

    branch: str
    base: str
    #: the fork that holds the branch (its author allowed edits by maintainers); None
    #: when the branch is in the repository itself
    source: str | None = None


def _holder(task: Task, pull: PullTarget | None) -> str:
    """The repository that holds the task's branch: its own, or a pull request's fork."""
    return pull.source if pull is not None and pull.source else task.repo


@dataclass
class AgentRun:
    outcome: Outcome | None  # None: the agent succeeded and the result is to be published
    error: str | None
    retry: bool = True
    session_id: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    rate_limited: bool = False


class Runner:
    """Runs attempts; one instance serves every runner thread of the worker."""

    def __init__(
        self,
        config: Config,
        store: Store,
        gitea: GiteaAPI,
        workspace: Workspace,
        publisher: Publisher,
        *,
        stopping: threading.Event,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str],
        sandbox: Sandbox | None = None,
        node: str | None = None,
    ):
        self.config, self.store, self.gitea = config, store, gitea
        self.workspace, self.publisher = workspace, publisher
        self.stopping, self.clock, self.environ = stopping, clock, environ
        self.sandbox: Sandbox = sandbox or NoSandbox()
        #: where this worker's worktrees and agent homes are (`Worker.node`)
        self.node = node
        #: tasks whose lease this worker lost (the heartbeat found it taken over): their
        #: agents are stopped and their attempts publish nothing
        self.fenced: set[int] = set()
        #: the lease token of each attempt running here, by task id
        self._tokens: dict[int, str | None] = {}

    def _fence(self, task_id: int) -> None:
        """Before a step that publishes: renew the attempt's lease by compare-and-set;
        LeaseLost if the task is no longer this attempt's."""
        token = self._tokens.get(task_id)
        if task_id in self.fenced or not self.store.hold_lease(
            task_id, token, self.config.worker.lease_seconds
        ):
            self.fenced.add(task_id)
            raise LeaseLost(f"task {task_id}: its lease was taken over")

    def branch(
        self, task: Task, settings: RepoSettings, issue_row: Mapping[str, Any] | None = None
    ) -> str:
        """The task's branch: the one an earlier attempt of it used, or for a follow-up
        the issue's, so that neither moves when a template changes; else the repository's
        template, or the server's."""
        if task.branch:
            return task.branch
        if task.kind is Kind.CONTINUE and issue_row and issue_row.get("branch"):
            return str(issue_row["branch"])
        template = settings.branch_template or self.config.git.branch_template
        return template.format(number=task.issue, owner=task.owner, repo=task.name)

    def run(self, task: Task) -> AttemptResult:
        """One attempt of a claimed task, from its worktree to its result. Raises Stopping
        when the service shuts down meanwhile (its agent is stopped first)."""
        self._tokens[task.id] = task.lease_token
        try:
            return self._run(task)
        except LeaseLost as exc:
            log.warning("lease lost; nothing published", extra={"task": task.id})
            return AttemptResult(Outcome.INFRA_ERROR, str(exc))
        finally:
            self._tokens.pop(task.id, None)

    def _update(self, task: Task, **changes: Any) -> None:
        """Write about this attempt while it still holds the task's lease."""
        self.store.update(task.id, lease=self._tokens.get(task.id), **changes)

    def _run(self, task: Task) -> AttemptResult:
        cfg = self.config
        secrets = cfg.secrets()
        try:
            issue = self.gitea.get_issue(task.owner, task.name, task.issue)
            # a pull request as the task's issue is one a person opened: work on its branch
            pull = self._pull(task) if issue.get("pull_request") else None
        except (Unreachable, ServerError) as exc:
            # Gitea is away: wait for it without using up an attempt; nothing has run yet.
            return AttemptResult(
                Outcome.INFRA_ERROR,
                f"waiting for Gitea: {exc}",
                requeue=True,
                delay=GITEA_WAIT_SECONDS,
            )
        except GiteaError as exc:
            return AttemptResult(
                Outcome.INFRA_ERROR, f"could not read the issue: {exc}", retry=False
            )
        if isinstance(pull, str):
            return AttemptResult(Outcome.INFRA_ERROR, pull, retry=False)
        # Locality: the issue's worktree and agent home are on the node that worked on it
        # last. Elsewhere the worktree is rebuilt from the pushed branch and no session is
        # resumed (it lives in that node's agent home): a follow-up gets the earlier
        # requests and results in its prompt instead, and its comment says so.
        issue_row = self.store.issue_row(None, task.repo, task.issue) or {}
        held_by = issue_row.get("node")
        home_here = not self.store.SHARED or held_by in (None, self.node)
        try:
            # what a run that crashed may still hold is kugetsu's again before git runs there
            self.sandbox.reclaim(self.lent(task))
        except SandboxError as exc:
            return AttemptResult(Outcome.INFRA_ERROR, f"sandbox: {exc}")
        try:
            fetched = self.workspace.fetch(task.repo)
            settings = self._repo_settings(task, fetched)
            if settings.agent and not task.agent_requested and settings.agent != task.agent:
                self.store.update(task.id, agent=settings.agent)
                task = replace(task, agent=settings.agent)
            branch = pull.branch if pull else self.branch(task, settings, issue_row)
            prepared = self.workspace.prepare(
                task.repo,
                task.issue,
                branch,
                base=pull.base if pull else None,
                source=pull.source if pull else None,
                fetched=fetched,
            )
        except GitError as exc:
            return AttemptResult(Outcome.INFRA_ERROR, redact(f"git: {exc}", secrets))
        self._update(task, branch=branch, worktree=str(prepared.path))
        if self.store.SHARED:
            if not home_here and task.kind is Kind.CONTINUE:
                log.info("follow-up moved", extra={"task": task.id, "from": held_by})
                self._update(task, moved_from=held_by)
            self.store.set_issue(None, task.repo, task.issue, node=self.node)
        if task.publish_sha:
            resumed = self._resume_publishing(task, issue, prepared, branch, pull)
            if resumed is not None:
                return resumed
        start_head = self.workspace.head(prepared.path)

        order = [task.agent] + [a for a in cfg.agents.fallback if a != task.agent]
        tried: list[str] = []
        run: AgentRun | None = None
        for name in order:
            try:
                spec = agents.resolve(cfg.agents, name)
            except agents.UnknownAgent as exc:
                return AttemptResult(Outcome.AGENT_FAILED, str(exc), retry=False)
            tried.append(name)
            session = self._session_for(task, spec, issue_row) if home_here else None
            history = None
            if task.kind is Kind.CONTINUE and not (session and spec.sessions):
                history = [
                    t
                    for t in self.store.list_tasks(repo=task.repo, issue=task.issue)
                    if t.id < task.id
                ]
            prompt = render.prompt(
                task,
                issue.get("title") or "",
                issue.get("body") or "",
                history=history,
                branch=branch,
                base=prepared.base_branch,
                pull=pull is not None,
                repo_instructions=settings.instructions,
            )
            run = self._run_agent(task, spec, prepared.path, prompt, session, branch, settings)
            self.store.agent_ran(
                task.id,
                name,
                run.usage,
                lease=self._tokens.get(task.id),
                agents_tried=tried,
                session_id=run.session_id,
                summary=run.summary,
            )
            if run.session_id and spec.sessions:
                self.store.set_issue(
                    None,
                    task.repo,
                    task.issue,
                    session_id=run.session_id,
                    agent=name,
                    branch=branch,
                )
            if run.outcome is Outcome.AGENT_FAILED and run.rate_limited and name != order[-1]:
                log.warning(
                    "agent rate limited; falling back", extra={"task": task.id, "agent": name}
                )
                continue
            break
        assert run is not None
        changes: dict[str, Any] = {
            "summary": run.summary,
            "usage": run.usage,
            "session_id": run.session_id,
            "agents_tried": tried,
        }
        if run.outcome is not None:
            return AttemptResult(run.outcome, run.error, retry=run.retry, changes=changes)

        # a run that changes nothing leaves the pull request there is as it was, and says so
        unchanged = {
            **changes,
            "pr_number": task.issue if pull else issue_row.get("pr_number"),
        }
        # the agent succeeded: commit, push, open or update the pull request
        try:
            self.workspace.commit_all(
                prepared.path, render.commit_message(task, issue.get("title"))
            )
            head = self.workspace.head(prepared.path)
            if pull is not None:
                # a person's branch has commits of its own: only this run's count
                nothing = head == start_head
            else:
                nothing = not self.workspace.has_new_commits(prepared.path, prepared.base_sha)
            if nothing:
                return AttemptResult(Outcome.NO_CHANGES, None, changes=unchanged)
            remote = self.workspace.remote_branch_sha(_holder(task, pull), branch)
            ran = self.workspace.changed_files(prepared.path, start_head)
        except GitError as exc:
            return AttemptResult(
                Outcome.INFRA_ERROR, redact(f"git: {exc}", secrets), changes=changes
            )
        if pull is None and head == start_head and head == remote:
            # Nothing new from this run. The branch may still lack its PR, if an earlier
            # attempt or task pushed and then could not open it: publish in that case.
            try:
                existing = self.gitea.find_open_pull(
                    task.owner, task.name, prepared.base_branch, branch
                )
            except GiteaError as exc:
                return AttemptResult(
                    Outcome.INFRA_ERROR,
                    f"could not look up the pull request: {exc}",
                    changes=changes,
                )
            if existing:
                unchanged["pr_number"] = int(existing["number"])
                return AttemptResult(Outcome.NO_CHANGES, None, changes=unchanged)
        # The agent's work is committed: from here on, a retry publishes it and does not
        # run the agent again (see _resume_publishing).
        self._update(task, publish_sha=head, bump=False)
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
            pull=pull,
            ran=ran,
        )

    def _pull(self, task: Task) -> PullTarget | str:
        """Where to work on a pull request a person opened (its branch, and the fork that
        holds it), or why kugetsu may not."""
        pr = self.gitea.get_pull(task.owner, task.name, task.issue)
        head, base = pr.get("head") or {}, pr.get("base") or {}
        repo = (head.get("repo") or {}).get("full_name")
        if not isinstance(head.get("ref"), str) or not isinstance(base.get("ref"), str):
            return f"pull request #{task.issue} has no head or base branch"
        if pr.get("state") != "open":
            return f"pull request #{task.issue} is {pr.get('state') or 'not open'}"
        if repo == task.repo:
            return PullTarget(head["ref"], base["ref"])
        if not repo or pr.get("allow_maintainer_edit") is not True:
            return render.fork_not_editable(task.requested_by, repo)
        # Gitea lets those who may write to the base repository push to the fork's branch:
        # find out before a paid run whether kugetsu may
        login = self.config.gitea.bot_login or self.store.get_meta("bot_login")
        if login:
            try:
                have = self.gitea.get_permission(task.owner, task.name, login)
            except (Forbidden, NotFound):
                have = None  # cannot tell: the push will
            if have is not None and not permissions.at_least(have, "write"):
                return render.fork_not_pushable(repo, task.repo, have)
        return PullTarget(head["ref"], base["ref"], source=repo)

    def _resume_publishing(
        self,
        task: Task,
        issue: Mapping[str, Any],
        prepared: Prepared,
        branch: str,
        pull: PullTarget | None,
    ) -> AttemptResult | None:
        """An earlier attempt committed the agent's work and could not publish it (Gitea
        away, a lost answer, a crash): publish that work, with that run's summary and usage.
        None when the work is gone (a worktree lost before its push): the agent runs again."""
        commit = task.publish_sha or ""
        try:
            present = self.workspace.contains(prepared.path, commit)
            if present:
                head = self.workspace.head(prepared.path)
                remote = self.workspace.remote_branch_sha(_holder(task, pull), branch)
        except GitError as exc:
            return AttemptResult(Outcome.INFRA_ERROR, redact(f"git: {exc}", self.config.secrets()))
        if not present:
            log.warning(
                "committed work is gone; running the agent again",
                extra={"task": task.id, "commit": commit},
            )
            self._update(task, publish_sha=None, bump=False)
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
            pull=pull,
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
        usage: Mapping[str, Any],
        changes: Mapping[str, Any],
        pull: PullTarget | None = None,
        ran: list[str] | None = None,
    ) -> AttemptResult:
        """Push the committed work and open or update its pull request; on a pull request
        a person opened, push it to that pull request's branch, and that is all.

        While Gitea is away (no answer, 5xx) the task waits for it without using up an
        attempt, as it does before the agent runs; a refusal counts one. Either way the
        next attempt publishes without running the agent again. `ran`: the files this
        attempt's run changed (None when not known: the work of an earlier attempt).
        """
        secrets = self.config.secrets()
        try:
            files = len(self.workspace.changed_files(prepared.path, prepared.base_sha))
            if head != remote:
                self._fence(task.id)
                if pull is None:
                    self.workspace.push(prepared.path, branch)
                else:
                    # a person's branch: a plain push, which only ever adds commits
                    self.workspace.push(prepared.path, branch, source=pull.source, force=False)
        except GitError as exc:
            return AttemptResult(
                Outcome.INFRA_ERROR, redact(f"git: {exc}", secrets), changes=changes
            )
        done = {**changes, "files_changed": files, "publish_sha": None}
        if pull is not None:
            return AttemptResult(Outcome.SUCCEEDED, None, changes={**done, "pr_number": task.issue})
        current = self.store.require(task.id)
        try:
            number, _own = self.publisher.publish_pr(
                current,
                fence=lambda: self._fence(task.id),
                branch=branch,
                base=prepared.base_branch,
                title=issue.get("title") or f"Issue #{task.issue}",
                summary=summary,
                files_changed=files,
                usage=usage,
                changed=ran,
            )
        except (Unreachable, ServerError) as exc:
            return AttemptResult(
                Outcome.INFRA_ERROR,
                f"waiting for Gitea to open the pull request: {exc}",
                requeue=True,
                delay=GITEA_WAIT_SECONDS,
                changes=changes,
            )
        except GiteaError as exc:
            return AttemptResult(
                Outcome.INFRA_ERROR, f"could not open the pull request: {exc}", changes=changes
            )
        self.store.set_issue(None, task.repo, task.issue, pr_number=number, branch=branch)
        return AttemptResult(Outcome.SUCCEEDED, None, changes={**done, "pr_number": number})

    def lent(self, task: Task) -> list[Path]:
        """What an agent run on the task's issue is lent: its worktree and its home."""
        return [
            self.workspace.worktree_path(task.repo, task.issue),
            self.config.storage.agent_home(task.owner, task.name, task.issue),
        ]

    def _repo_settings(self, task: Task, fetched: Fetched) -> RepoSettings:
        """The repository's `.kugetsu.toml` as its default branch holds it now (the commit
        the task starts from, read from the mirror with git: a pull request cannot change
        its own settings). A file that cannot be used is answered once per version of it,
        on the issue that found it, and the server's settings are used."""
        cfg = self.config
        found = self.workspace.read_file(
            task.repo, fetched.default_sha, REPO_SETTINGS_PATHS, REPO_SETTINGS_MAX_BYTES
        )
        if found is None:
            return RepoSettings()
        problem = found.problem
        if problem is None:
            try:
                return repo_settings(
                    found.data,
                    default_agent=cfg.agents.default,
                    known_agents=agents.available(cfg.agents, self.environ),
                    budget_of=self._server_budget,
                )
            except ConfigError as exc:
                problem = str(exc)
        body = render.repo_settings_refused(found.path, fetched.default_sha, problem)
        if self.store.refuse_repo_file(task.repo, found.blob, task.issue, body):
            log.warning(
                "repository settings refused",
                extra={"repo": task.repo, "path": found.path, "error": problem},
            )
        return RepoSettings()

    def _server_budget(self, name: str) -> tuple[int | None, float | None]:
        """The server's budget for agent `name`: its table's, else the [agents] one."""
        try:
            spec = agents.resolve(self.config.agents, name)
        except agents.UnknownAgent:
            return self.config.agents.max_tokens, self.config.agents.max_cost_usd
        return spec.max_tokens, spec.max_cost_usd

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

    def _run_agent(
        self,
        task: Task,
        spec: agents.AgentSpec,
        workdir: Path,
        prompt: str,
        session: str | None,
        branch: str,
        settings: RepoSettings,
    ) -> AgentRun:
        cfg = self.config
        storage = cfg.storage
        prompt_file = storage.prompt_path(task.id)
        prompt_file.parent.mkdir(parents=True, exist_ok=True)
        prompt_file.write_text(prompt, encoding="utf-8")
        home = storage.agent_home(task.owner, task.name, task.issue)
        home_env = agents.prepare_home(spec, home)
        if self.sandbox.active:
            # the slot's uid cannot read the prompts folder: its copy is in the home lent to it
            prompt_file = home / ".kugetsu" / "prompt.md"
            prompt_file.parent.mkdir(exist_ok=True)
            prompt_file.write_text(prompt, encoding="utf-8")
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
            sandboxed=self.sandbox.active,
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
            self._update(task, session_id=started, bump=False)
        meter = agents.UsageMeter(spec)
        # the request's own budget, else the repository's within the server's, else the server's
        max_tokens = task.max_tokens or _within(
            settings.max_tokens, spec.max_tokens or cfg.agents.max_tokens
        )
        max_cost = task.max_cost_usd or _within(
            settings.max_cost_usd, spec.max_cost_usd or cfg.agents.max_cost_usd
        )
        header = (
            f"=== kugetsu task {task.id} attempt {task.attempts} agent {spec.name} "
            f"at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.clock()))} ==="
        )
        shipper = (
            LogShipper(self.store, task.id, storage.log_path(task.id))
            if self.store.SHARED
            else None
        )
        if task.slot is None:
            return AgentRun(Outcome.INFRA_ERROR, "the task holds no slot")
        # lent to a uid of its own, the worktree is out of kugetsu's sight: git must keep it
        kept = self.workspace.lent(workdir) if self.sandbox.active else contextlib.nullcontext()
        try:
            with kept, self.sandbox.lend(task.slot, [workdir, home]) as start_agent:
                proc, stop = self._watch(
                    task,
                    start_agent(
                        argv,
                        cwd=workdir,
                        env=env,
                        log_path=storage.log_path(task.id),
                        log_max_bytes=cfg.agents.log_max_bytes,
                        on_line=meter.feed,
                        header=header,
                        secrets=cfg.secrets(),
                    ),
                    meter,
                    shipper,
                    max_tokens,
                    max_cost,
                )
        except process.AgentStartError as exc:
            reason = f"{AGENT_MISSING}{exc}" if exc.not_found else str(exc)
            return AgentRun(Outcome.AGENT_FAILED, reason, retry=False)
        except SandboxError as exc:
            return AgentRun(Outcome.INFRA_ERROR, f"sandbox: {exc}")
        except GitError as exc:
            return AgentRun(Outcome.INFRA_ERROR, redact(f"git: {exc}", cfg.secrets()))
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

    def _watch(
        self,
        task: Task,
        proc: process.AgentProcess,
        meter: agents.UsageMeter,
        shipper: LogShipper | None,
        max_tokens: int | None,
        max_cost: float | None,
    ) -> tuple[process.AgentProcess, tuple[Outcome, str, bool] | None]:
        """Follow the agent to its end (or stop it: the stop flag, its timeout, its budget,
        a shutdown, which raises Stopping); what stopped it, if anything: (outcome, reason,
        retry)."""
        cfg = self.config
        self._update(task, pid=proc.pid, pid_start=proc.start_token, bump=False)
        deadline = self.clock() + cfg.agents.timeout_seconds
        grace = cfg.agents.kill_grace_seconds
        stop: tuple[Outcome, str, bool] | None = None
        session_saved = None
        last_flag_check = 0.0
        while proc.wait(POLL_SECONDS) is None:
            if meter.session_id and meter.session_id != session_saved:
                session_saved = meter.session_id
                self._update(task, session_id=session_saved, bump=False)
            if self.stopping.is_set():
                proc.terminate(grace)
                proc.close()
                raise Stopping()
            if time.monotonic() - last_flag_check >= STOP_CHECK_SECONDS:
                last_flag_check = time.monotonic()
                by = self.store.cancel_requested(task.id)
                if by:
                    stop = (Outcome.CANCELLED, f"stopped by {by}", False)
                if shipper is not None:
                    shipper.ship()
            if stop is None and task.id in self.fenced:
                stop = (Outcome.INFRA_ERROR, "its lease was taken over", False)
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
        if shipper is not None:
            shipper.ship()
        return proc, stop


def _within(asked: _N | None, bound: _N | None) -> _N | None:
    """A repository's budget held to the server's (None: not set)."""
    if asked is None:
        return bound
    return asked if bound is None else min(asked, bound)
