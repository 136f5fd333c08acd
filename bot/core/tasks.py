"""The task model: states, outcomes, the allowed transitions and the retry policy.

Pure: no I/O. The store changes a task's state only by compare-and-set, checked against
`TRANSITIONS`; every attempt ends in one `AttemptResult`, which `RetryPolicy.decide`
turns into the task's next state, in exactly one place.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class State(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    NO_CHANGES = "no_changes"
    AGENT_FAILED = "agent_failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    INFRA_ERROR = "infra_error"


class Kind(enum.StrEnum):
    START = "start"
    CONTINUE = "continue"


ACTIVE_STATES = (State.PENDING, State.RUNNING)
TERMINAL_STATES = (State.COMPLETED, State.FAILED, State.CANCELLED, State.REJECTED)

#: state -> states it may move to. Anything else is a bug or a lost race.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.RUNNING, State.CANCELLED, State.REJECTED}),
    # running -> pending: a retry, a quota fallback, or recovery after a crash
    State.RUNNING: frozenset({State.PENDING, State.COMPLETED, State.FAILED, State.CANCELLED}),
    # a finished task can be put back in the queue by `retry`
    State.FAILED: frozenset({State.PENDING}),
    State.CANCELLED: frozenset({State.PENDING}),
    State.COMPLETED: frozenset(),
    State.REJECTED: frozenset(),
}

RETRYABLE_OUTCOMES = frozenset({Outcome.AGENT_FAILED, Outcome.TIMED_OUT, Outcome.INFRA_ERROR})


class InvalidTransition(ValueError):
    pass


def check_transition(current: State | str, new: State | str) -> None:
    current, new = State(current), State(new)
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"a task may not go from {current} to {new}")


@dataclass(frozen=True)
class AttemptResult:
    """How one attempt ended: the one result every path gives, the runner's, recovery's
    after a crash, and that of a runner that could not start. `RetryPolicy.decide`
    turns it into the task's next state."""

    outcome: Outcome
    error: str | None = None
    #: False: do not retry, even if the outcome allows it (an unknown agent, a budget)
    retry: bool = True
    #: put back in the queue without counting the attempt (waiting for Gitea, a shutdown)
    requeue: bool = False
    #: with requeue: wait this long first
    delay: float = 0.0
    #: fields of the task the attempt sets (usage, summary, pull request ...)
    changes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """What happens to a task after one attempt."""

    state: State
    retry_in: float | None = None  # seconds until the next attempt, when state is PENDING
    #: the attempt is given back: it does not count against max_attempts
    refund: bool = False


def backoff_for(attempt: int, backoff: Sequence[float]) -> float:
    """Delay before attempt `attempt + 1`; the last entry repeats."""
    if not backoff:
        return 0.0
    return float(backoff[min(max(attempt, 1), len(backoff)) - 1])


def doubling(first: float, failures: int, most: float) -> float:
    """A wait after `failures` failures in a row: `first` after one, twice as long after
    each further one, never more than `most` (however many failures there were)."""
    return min(most, first * 2.0 ** min(max(failures, 1) - 1, 64))


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy, built once from `[queue]` (`QueueConfig.retry_policy`): every
    attempt's end, whether the runner finished it, recovery found it orphaned, or its
    runner never started, goes through `decide`."""

    #: attempts a new task gets (each task keeps the number it was queued with)
    max_attempts: int
    #: wait before attempt n + 1 after attempt n failed; the last entry repeats
    backoff: tuple[float, ...]

    def decide(self, result: AttemptResult, attempts: int, max_attempts: int) -> Decision:
        """The next state of a task whose attempt number `attempts` (of its own
        `max_attempts`) ended with `result`."""
        if result.requeue:
            return Decision(State.PENDING, result.delay, refund=True)
        outcome = result.outcome
        if outcome in (Outcome.SUCCEEDED, Outcome.NO_CHANGES):
            return Decision(State.COMPLETED)
        if outcome is Outcome.CANCELLED:
            return Decision(State.CANCELLED)
        if outcome in RETRYABLE_OUTCOMES and result.retry and attempts < max_attempts:
            return Decision(State.PENDING, backoff_for(attempts, self.backoff))
        return Decision(State.FAILED)


#: how the error of an attempt begins when its agent's command is not there (not installed,
#: or a wrong path): an operator's problem, which the tracking comment says
AGENT_MISSING = "agent not installed: "


def agent_missing(task: Task) -> bool:
    """True when the task failed because its agent's command is not there."""
    return task.state is State.FAILED and (task.error or "").startswith(AGENT_MISSING)


class CancelResult(enum.Enum):
    """What asking to stop a task did."""

    CANCELLED = "cancelled"  # it was queued: cancelled at once
    STOPPING = "stopping"  # it is running: its runner stops the agent
    FINISHED = "finished"  # it had already finished: nothing to stop


@dataclass(frozen=True)
class Task:
    id: int
    repo: str
    issue: int
    kind: Kind
    prompt: str
    agent: str
    requested_by: str
    state: State
    attempts: int = 0
    max_attempts: int = 3
    not_before: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None
    pid_start: str | None = None
    worker_id: str | None = None
    branch: str | None = None
    worktree: str | None = None
    session_id: str | None = None
    pr_number: int | None = None
    comment_id: int | None = None
    trigger_comment_id: int | None = None
    outcome: Outcome | None = None
    error: str | None = None
    authorized: bool | None = None
    permission_hint: str | None = None
    cancel_requested_by: str | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    summary: str | None = None
    files_changed: int | None = None
    agents_tried: tuple[str, ...] = ()
    #: the commit holding the agent's work while it waits to be published: a retry then
    #: publishes it and does not run the agent again (None: the agent has yet to run)
    publish_sha: str | None = None
    #: the running attempt's lease: its token, checked by compare-and-set before each
    #: step that publishes, and when it runs out unless its worker renews it
    lease_token: str | None = None
    lease_expires_at: float | None = None
    #: a follow-up that ran on another node than its issue's worktree and agent home
    #: (that node was gone or busy): the node they were on. It got a worktree rebuilt from
    #: the pushed branch and a fresh session with the earlier requests and results.
    moved_from: str | None = None
    #: the concurrency slot of its last claim (0 .. max_concurrent_agents - 1): no two
    #: running tasks hold the same one, and with the sandbox its agent runs as that slot's uid
    slot: int | None = None
    #: where the task's result is also posted when it ends (the pull request a request
    #: was typed on, or where a retry was asked); None: the tracking comment is enough
    answer_on: int | None = None
    #: that answer's comment id once written (0 while it is being written)
    answer_id: int | None = None
    #: the review a follow-up answers: id, state, body, user and its line comments
    review: dict[str, Any] = field(default_factory=dict)
    #: the request named its agent: a repository's default agent does not replace it
    agent_requested: bool = False
    #: who last put the task back in the queue (`retry`), shown in its tracking comment
    retried_by: str | None = None

    @property
    def owner(self) -> str:
        return self.repo.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.repo.split("/", 1)[1]

    @property
    def ref(self) -> str:
        return f"{self.repo}#{self.issue}"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def public_dict(self) -> dict[str, Any]:
        """The shape `queue list --json` prints."""
        return {
            "id": self.id,
            "repo": self.repo,
            "issue": self.issue,
            "kind": str(self.kind),
            "state": str(self.state),
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "outcome": str(self.outcome) if self.outcome else None,
            "pr_number": self.pr_number,
            "agent": self.agent,
            "requested_by": self.requested_by,
            "branch": self.branch,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
