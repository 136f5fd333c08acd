"""The worker's tick: one quick pass over the queue, and the end of every attempt.

`Worker.tick()` never waits on an agent. In order, its steps:

1. `recover()`: tasks left running by a process that is gone go back to the queue;
2. `authorize()`: new tasks are allowed or refused by their requester's permission;
3. `launch()`: up to the free slots are claimed (the store guarantees the limit) and each
   gets a runner thread (`runner.Runner`), which ends in `finish()`;
4. the outbox (`outbox.Outbox`): replies, reactions, stops and retries;
5. tracking comments are brought up to date (`Publisher.sync_comments`).

Beside the tick, on jobs of their own: the heartbeat, the daily cleanup, and the
reconcile pass (`reconcile.Reconciler`), which finds on Gitea what deliveries missed.

Steps 4 and 5 talk for kugetsu on Gitea, so with several processes on one database only
the holder of the publisher lease does them; the database side of the daily cleanup is
such a cluster-wide duty too (`_duty`). `finish()` is the one place an attempt's
result becomes the task's next state, by the retry policy, for the runner's results,
recovery's and those of runners that could not start alike.

Each running task is held by a lease (`[worker] lease_seconds`), which `heartbeat()`
renews for every task this worker runs. A task whose lease ran out goes back to the
queue, found by any worker on any machine; on the worker's own machine a dead worker's
tasks go back at once (the PID check). The lease token is part of the compare-and-set
of every step that publishes (push, pull request, finish), so a worker that lost its
lease, cut off from the database for a while, cannot publish over the task's new owner.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from bot import agents, logs, process, prune
from bot.config import Config
from bot.core import intake, metrics
from bot.core.health import TickRecord, describe
from bot.core.tasks import AttemptResult, Outcome, State, Task
from bot.gitea import GiteaAPI, GiteaError
from bot.ingest import rules_for
from bot.isolate import on_its_own
from bot.publisher import Publisher
from bot.sandbox import Sandbox, sandbox_for
from bot.scheduler import Coalescer
from bot.store import DATABASE_ERRORS, LeaseLost, Store
from bot.worker.auth import AuthCache
from bot.worker.notify import NotifyLane
from bot.worker.outbox import OUTBOX_BUDGET, Outbox
from bot.worker.reconcile import PassReport, Reconciler
from bot.worker.runner import Runner, Stopping
from bot.workspace import Workspace

log = logging.getLogger(__name__)

#: a worker on another host whose heartbeat is this many task leases old counts as gone
#: (90 s with the default lease of 60 s); its cluster-wide duties are then handed on
HEARTBEAT_STALE_LEASES = 1.5
#: the publisher lease lasts this many task leases (120 s by default)
PUBLISHER_LEASES = 2.0
#: the database side of the daily cleanup runs on one node a day
CLEANUP_LEASE_SECONDS = 3600.0
BOT_LOGIN_RETRY_SECONDS = 60.0
#: a burst of wakes becomes one tick per this many seconds, not one tick per delivery
MIN_TICK_SPACING_SECONDS = 0.05
#: tracking comments written per tick at most (a backlog makes the tick go round again)
COMMENT_BUDGET = 30
#: the extra time a shutdown gives runners, beyond the agents' kill grace
SHUTDOWN_EXTRA_SECONDS = 30.0


class Worker:
    """The tick and its steps, the runner threads, and the end of every attempt.

    `schedule_tick` asks whatever runs `run_tick` (the scheduler) to run it now; the
    worker calls it through `wake()` when something it did changed the queue.
    `schedule_at` asks for a tick at a time: when the next task or outbox item waiting
    out a back-off is due, so it does not wait for the next interval.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        gitea: GiteaAPI,
        workspace: Workspace,
        *,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
        schedule_tick: Callable[[], None] = lambda: None,
        schedule_at: Callable[[float], None] = lambda when: None,
        sandbox: Sandbox | None = None,
        counts: metrics.Tally | None = None,
    ):
        self.config, self.store, self.gitea, self.workspace = config, store, gitea, workspace
        self.clock = clock
        self.schedule_tick = schedule_tick
        self.schedule_at = schedule_at
        #: the machine, as other workers see it, and the place of this worker's worktrees
        self.host = config.worker.host or socket.gethostname()
        self.node = f"{self.host}:{config.storage.data_dir}"
        self.worker_id = f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.policy = config.queue.retry_policy
        self.publisher = Publisher(config, store, gitea)
        self.publisher.may_publish = self._still_publisher
        self.auth = AuthCache(config, gitea, clock)
        self.environ = dict(os.environ if environ is None else environ)
        #: the agents a request may name (installed ones), for the reviews the outbox reads
        self.agents = agents.available(config.agents, self.environ)
        self.outbox = Outbox(
            config, store, self.publisher, self.auth, on_change=self.wake, rules=self.rules
        )
        self.notify = NotifyLane(config, store, self.outbox, self.worker_id, clock=clock)
        # what this process counts in memory (its Gitea calls), written with each heartbeat
        if counts is None:
            counts = getattr(gitea, "tally", None)
        self.counts = counts if isinstance(counts, metrics.Tally) else metrics.Tally()
        self._stopping = threading.Event()
        self.sandbox = sandbox or sandbox_for(config)
        self.runner = Runner(
            config,
            store,
            gitea,
            workspace,
            self.publisher,
            stopping=self._stopping,
            clock=clock,
            environ=self.environ,
            node=self.node,
            sandbox=self.sandbox,
        )
        self.reconciler = Reconciler(
            config,
            store,
            gitea,
            self.rules,  # one source of rules for all the worker takes in
            auth=self.auth,
            owner=self.worker_id,
            clock=clock,
            on_queued=self.wake,
            stopping=self._stopping.is_set,
        )
        self._runners: dict[int, threading.Thread] = {}
        #: the lease token of each task a runner of this worker holds
        self._leases: dict[int, str] = {}
        self._runners_lock = threading.Lock()
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
        storage = self.config.storage
        for path in (storage.logs_dir, storage.prompts_dir, storage.homes_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.store.register_worker(
            self.worker_id,
            os.getpid(),
            process.process_start_token(os.getpid()),
            host=self.host,
            node=self.node,
            capacity=self.config.capacity,
        )
        self.recover()
        self.notify.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the agents this process started and put their tasks back in the queue."""
        self._stopping.set()
        if timeout is None:
            timeout = self.config.agents.kill_grace_seconds + SHUTDOWN_EXTRA_SECONDS
        deadline = time.monotonic() + timeout
        for thread in self.runner_threads():
            thread.join(max(0.1, deadline - time.monotonic()))
        self.notify.stop()
        self._write_counts()
        self.store.release_leases(self.worker_id)
        self._lease_renew_at = float("-inf")
        self.store.unregister_worker(self.worker_id)

    def runner_threads(self) -> list[threading.Thread]:
        with self._runners_lock:
            return list(self._runners.values())

    # ---------------------------------------------------------------- the tick

    def wake(self) -> None:
        """The queue changed: tick again now (or once more, if a tick is running), and look
        for notifications to send."""
        self.request_tick()
        self.schedule_tick()
        self.notify.wake()

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
            self._steps()
        except Exception as exc:
            self.ticks = self.ticks.failed(self.clock(), describe(exc))
            self._report_ticks()
            raise
        recovered = self.ticks.failures > 0
        self.ticks = self.ticks.succeeded(self.clock())
        if recovered:
            self._report_ticks()
        self.notify.wake()  # what the tick started or ended has its events to send

    def _report_ticks(self) -> None:
        try:
            self.store.heartbeat(self.worker_id, self.ticks.to_json())
        except DATABASE_ERRORS as exc:
            # the heartbeat goes stale, which /healthz reports in its place
            log.error("cannot report the ticks to the database", extra={"error": str(exc)})

    def _steps(self) -> None:
        self.ensure_bot_login()
        self._reap()
        self.recover()
        self.authorize()
        self.launch()
        # With several processes on one database, one at a time talks for kugetsu, so a
        # tracking comment is never created twice and a reply never sent twice.
        if self._publisher_lease():
            try:
                busy = self.outbox.work() >= OUTBOX_BUDGET
                busy |= self.publisher.sync_comments(COMMENT_BUDGET) >= COMMENT_BUDGET
            except LeaseLost:
                # another node took the publisher lease over (this one was cut off past
                # it): it writes on Gitea from now on
                log.warning("publisher lease lost", extra={"worker": self.worker_id})
                self._lease_renew_at = float("-inf")
                return
            if busy:
                self.request_tick()  # a backlog (say, 1,000 queued tasks): go round again now
        due = self.store.next_due()
        if due is not None:
            self.schedule_at(due)

    def _publisher_lease(self) -> bool:
        """Hold the publisher lease; renewed only when half of it is used up."""
        now = self.clock()
        if now < self._lease_renew_at:
            return True
        seconds = PUBLISHER_LEASES * self.config.worker.lease_seconds
        if self._duty("publisher", seconds):
            self._lease_renew_at = now + seconds / 2
            return True
        return False

    def _duty(self, name: str, seconds: float) -> bool:
        """True if this node is the one to do the cluster-wide duty `name` now: it holds
        (or has just taken) the lease of that name for `seconds`. One node at a time,
        whatever the number of machines; a node that dies hands it on when it runs out."""
        return self.store.try_lease(name, self.worker_id, seconds)

    def _still_publisher(self) -> bool:
        """The fence before the publisher writes on Gitea: the publisher lease is still
        this worker's for at least as long as one call to Gitea may take (renewed here if
        less is left), or no node's; never while another node holds it."""
        seconds = PUBLISHER_LEASES * self.config.worker.lease_seconds
        margin = min(self.config.gitea.timeout_seconds, seconds / 4)
        if self.store.holds_lease("publisher", self.worker_id, margin):
            return True
        self._lease_renew_at = float("-inf")
        return self._publisher_lease()

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

    def rules(self) -> intake.Rules:
        """Intake's rules, as the receiver has them, for what the worker takes in: the
        reviews it reads and what a reconcile pass finds."""
        return rules_for(self.config, self.ensure_bot_login(), self.agents)

    def _reap(self) -> None:
        with self._runners_lock:
            for task_id, thread in list(self._runners.items()):
                if not thread.is_alive():
                    del self._runners[task_id]

    # ---------------------------------------------------------------- jobs beside the tick

    def heartbeat(self) -> None:
        """Every few seconds, on its own job: renew the leases of the tasks this worker
        runs, say this process lives and how its ticks go, add what it counted in memory
        to the counters, and checkpoint the WAL. A task whose lease is no longer ours
        (another worker found it expired and took it over) has its agent stopped, and
        publishes nothing."""
        with self._runners_lock:
            held = dict(self._leases)
        lost = self.store.renew_leases(held, self.config.worker.lease_seconds)
        for task_id in lost:
            log.warning("lease lost; stopping the agent", extra={"task": task_id})
            self.runner.fenced.add(task_id)
        self._write_counts(report=True)
        self.store.repair_slots()
        self.store.checkpoint()
        if self.store.SHARED and self.store.leases_expired():
            # a worker elsewhere stopped renewing: recover its tasks now, not at the poll
            self.wake()

    def _write_counts(self, *, report: bool = False) -> None:
        counts = self.counts.take()
        try:
            if report:
                self.store.heartbeat(self.worker_id, self.ticks.to_json(), counts)
            else:
                self.store.add_counts(None, counts)
        except BaseException:
            self.counts.give_back(counts)  # with the next heartbeat
            raise

    def cleanup(self, older_than_days: float | None = None) -> prune.Report:
        """The daily prune (bot/prune.py): old finished tasks with their logs and prompts,
        idle worktrees whose work is pushed, and the homes and prompts of issues that are
        done (by default after queue.cleanup_age_days)."""
        # the database is pruned by one node a day; files and worktrees by each
        return prune.Pruner(
            self.config,
            self.store,
            self.gitea,
            self.workspace,
            clock=self.clock,
            clear_database=self._duty("cleanup", CLEANUP_LEASE_SECONDS),
        ).run(older_than_days)

    def measure_disk(self) -> None:
        """Every few minutes, on its own job: the disk use of mirrors, worktrees, logs and
        homes, kept in the database for /metrics."""
        self.store.set_disk_usage(*prune.disk_record(self.config.storage, self.clock()))

    def reconcile(self) -> PassReport | None:
        """On its own job: look on Gitea for what deliveries missed (`worker.reconcile`).
        None when another process runs the passes, or this one is shutting down."""
        if self._stopping.is_set():
            return None
        return self.reconciler.run()

    # ---------------------------------------------------------------- 1. recovery

    def _worker_alive(self, worker: dict[str, Any]) -> bool:
        if worker["id"] == self.worker_id:
            return True
        if worker["host"] == self.host:
            token = process.process_start_token(worker["pid"])
            return token is not None and token == worker["pid_start"]
        stale = HEARTBEAT_STALE_LEASES * self.config.worker.lease_seconds
        return bool(self.clock() - worker["heartbeat_at"] < stale)

    def recover(self) -> list[int]:
        """Tasks left running by a process that is gone go back to the queue, their
        attempt counted, by the retry policy like any other attempt's end.

        A task is gone when its worker ran on this host and its process is dead (the
        fast path: at once), or when its lease ran out (a worker on another machine,
        or one cut off from the database; checked by compare-and-set on the expiry, so
        a lease renewed meanwhile is left alone). A task of a worker on this host that
        is still alive keeps running whatever its lease says."""
        workers = {w["id"]: w for w in self.store.workers()}
        alive = {wid for wid, w in workers.items() if self._worker_alive(w)}
        now = self.clock()
        recovered = []
        for task in self.store.running_tasks():
            worker = workers.get(task.worker_id or "")
            # a task of a worker no longer registered is this machine's if it has no
            # lease (written before leases existed, when every worker shared a machine)
            local = worker["host"] == self.host if worker is not None else task.lease_token is None
            expired_by: float | None = None
            if task.worker_id == self.worker_id:
                with self._runners_lock:
                    if task.id in self._runners:
                        continue
                # ours, but no runner holds it (should not happen): recover it too
            elif local and task.worker_id in alive:
                continue
            elif not local and task.lease_expires_at is not None:
                if task.lease_expires_at >= now:
                    continue
                expired_by = now
            elif task.worker_id in alive:
                continue
            with on_its_own("recovery", task.id, self._set_aside(task)):
                if self._recover_one(task, local=local, expired_by=expired_by):
                    recovered.append(task.id)
        for wid in set(workers) - alive:
            self.store.unregister_worker(wid)
        return recovered

    def _recover_one(self, task: Task, *, local: bool = True, expired_by: float | None) -> bool:
        # an agent is killed only on its own machine: a pid or a slot's uid means nothing
        # on another (the launcher sweeps a slot there before it is used again)
        if local and task.slot is not None:
            # with the sandbox, everything the slot's uid runs is the dead run's: all of it
            # goes before the task moves on and its slot can be claimed again
            self.sandbox.sweep(task.slot)
        if (
            local
            and task.pid
            and process.kill_orphan(task.pid, task.pid_start, self.config.agents.kill_grace_seconds)
        ):
            log.warning("killed orphaned agent", extra={"task": task.id, "pid": task.pid})
        if local:
            self.sandbox.reclaim(self.runner.lent(task))
        reason = (
            "kugetsu stopped while the agent was running"
            if expired_by is None
            else "the worker running it stopped renewing its lease"
        )
        result = AttemptResult(Outcome.INFRA_ERROR, reason)
        state = self._end_attempt(
            task,
            result,
            event="recovered",
            detail=task.worker_id,
            lease=task.lease_token,
            lease_expired_by=expired_by,
        )
        if state is None:
            return False
        log.warning(
            "recovered task",
            extra={"task": task.id, "to": state.value, "attempts": task.attempts},
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

    # ---------------------------------------------------------------- 2. authorization

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

    # ---------------------------------------------------------------- 3. launching

    def launch(self) -> list[int]:
        """Claim tasks for this worker's free capacity, within the global limit, and start
        a runner for each."""
        if self._stopping.is_set():
            return []
        with self._runners_lock:
            free = self.config.capacity - len(self._runners)
        if free <= 0:
            return []
        claimed = self.store.claim(
            self.config.queue.max_concurrent_agents,
            self.worker_id,
            max_claims=free,
            lease_seconds=self.config.worker.lease_seconds,
            node=self.node if self.store.SHARED else None,
        )
        for task in claimed:
            with on_its_own("start", task.id, partial(self._not_started, task)):
                thread = threading.Thread(
                    target=self._run, args=(task,), name=f"task-{task.id}", daemon=True
                )
                with self._runners_lock:
                    self._runners[task.id] = thread
                    self._leases[task.id] = task.lease_token or ""
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
            self._leases.pop(task.id, None)
        self.finish(task, AttemptResult(Outcome.INFRA_ERROR, reason))

    def _run(self, task: Task) -> None:
        with logs.context(task=task.id, repo=task.repo, issue=task.issue):
            self._attempt(task)

    def _attempt(self, task: Task) -> None:
        try:
            try:
                result = self.runner.run(task)
            except Stopping:
                result = AttemptResult(Outcome.INFRA_ERROR, "kugetsu was shut down", requeue=True)
            except Exception as exc:  # a bug must not leave the task running forever
                log.exception("task crashed", extra={"task": task.id})
                result = AttemptResult(
                    Outcome.INFRA_ERROR, f"internal error: {exc.__class__.__name__}"
                )
            self.finish(task, result)
        finally:
            with self._runners_lock:
                self._runners.pop(task.id, None)
                self._leases.pop(task.id, None)
            self.runner.fenced.discard(task.id)
            self.wake()

    # ---------------------------------------------------------------- the end of an attempt

    def finish(self, task: Task, result: AttemptResult) -> State | None:
        """The one place an attempt's result becomes the task's next state. None if the
        task was no longer running (stopped meanwhile, or already finished), or no longer
        this attempt's: its lease was taken over (the compare-and-set includes the token)."""
        current = self.store.get(task.id)
        if current is None or current.state is not State.RUNNING:
            return None
        if current.lease_token != task.lease_token:
            log.warning(
                "task taken over; its result is not recorded",
                extra={"task": task.id, "outcome": result.outcome.value},
            )
            return None
        state = self._end_attempt(current, result, lease=task.lease_token)
        if state is not None:
            log.info(
                "task finished",
                extra={"task": task.id, "outcome": result.outcome.value, "state": state.value},
            )
        return state

    def _end_attempt(
        self,
        task: Task,
        result: AttemptResult,
        *,
        event: str | None = None,
        detail: str | None = None,
        lease: str | None = None,
        lease_expired_by: float | None = None,
    ) -> State | None:
        """Move a running task on by the retry policy, through the store's compare-and-set:
        None if it was no longer running as `task` was read, or (with `lease`) no longer
        held by that lease token."""
        decision = self.policy.decide(result, task.attempts, task.max_attempts)
        changes: dict[str, Any] = dict(result.changes)
        # put back without counting the attempt (a clean shutdown, a Gitea away): no
        # attempt ended, so there is no outcome to show, only the reason
        outcome = None if decision.refund else result.outcome
        changes.update(outcome=outcome, error=result.error, pid=None, pid_start=None)
        if decision.state is State.PENDING:
            changes["not_before"] = self.clock() + (decision.retry_in or 0.0)
        if decision.refund:
            changes["attempts"] = max(0, task.attempts - 1)
        if event is None:
            event = "requeued" if result.requeue else result.outcome.value
        done = self.store.transition(
            task.id,
            State.RUNNING,
            decision.state,
            event=event,
            detail=result.error if detail is None else detail,
            lease=lease,
            lease_expired_by=lease_expired_by,
            **changes,
        )
        return decision.state if done else None
