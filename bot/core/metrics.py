"""What kugetsu counts for `GET /metrics`, and how a count is keyed: pure.

Counters are kept in the database (the store's `counters` table), not in a process's
memory, so the receiver, the worker and, later, processes on other machines all add to
the same figures, and a restart loses none. Most are added inside a transaction that is
written anyway: a delivery's count in the delivery's own transaction, a task's counts in
the transaction that changes its state (`for_transition`), an agent run's tokens with the
run's usage (`for_agent_run`). What happens where no transaction is written (a Gitea API
call, a delivery refused before it is read) is added to a `Tally` in memory and written in
batches (`Store.add_counts`).

A count is a `Key`: the counter's name and its labels, as stored. Histograms are stored as
one counter per bucket (not cumulative; `le` is the bucket's upper bound) and one for the
sum of the observed values: bot/metrics.py turns them into Prometheus' cumulative buckets.
"""

from __future__ import annotations

import enum
import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bot.core.tasks import TERMINAL_STATES, State

#: (counter name, labels as stored): one row of the `counters` table
Key = tuple[str, str]
#: amounts to add, by key
Counts = dict[Key, float]


class Counter(enum.StrEnum):
    """The counters' names as stored (bot/metrics.py gives each its Prometheus name)."""

    TASKS_FINISHED = "tasks_finished"  # outcome, agent, repo
    DELIVERIES = "webhook_deliveries"  # result
    TASK_DURATION = "task_duration_seconds"  # le (a histogram bucket)
    TASK_DURATION_SUM = "task_duration_seconds_sum"
    QUEUE_WAIT = "queue_wait_seconds"  # le
    QUEUE_WAIT_SUM = "queue_wait_seconds_sum"
    AGENT_TOKENS = "agent_tokens"  # agent, repo
    AGENT_COST = "agent_cost_usd"  # agent, repo
    GITEA_REQUESTS = "gitea_requests"  # method, code


class DeliveryResult(enum.StrEnum):
    """How the receiver answered a delivery: the `result` label."""

    QUEUED = "queued"  # 202: it queued a task or outbox work
    IGNORED = "ignored"  # 200: not for kugetsu
    DUPLICATE = "duplicate"  # 200: received before
    REJECTED = "rejected"  # 400, 401, 413, 415: a bad signature, body, size or type
    ERROR = "error"  # 503: it could not be stored


#: upper bounds of the buckets of an attempt's duration, in seconds (agents run minutes)
DURATION_BUCKETS: tuple[float, ...] = (
    5,
    15,
    30,
    60,
    120,
    300,
    600,
    1200,
    1800,
    3600,
    7200,
)
#: upper bounds of the buckets of the wait between ready and started, in seconds
WAIT_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1, 5, 15, 30, 60, 300, 600, 1800, 3600)

#: histogram -> (its sum's counter, its buckets)
HISTOGRAMS: dict[Counter, tuple[Counter, tuple[float, ...]]] = {
    Counter.TASK_DURATION: (Counter.TASK_DURATION_SUM, DURATION_BUCKETS),
    Counter.QUEUE_WAIT: (Counter.QUEUE_WAIT_SUM, WAIT_BUCKETS),
}

INF = "+Inf"


def key(name: Counter, **labels: str) -> Key:
    """The key of a count: labels in one canonical text, whatever order they came in."""
    return str(name), json.dumps(dict(sorted(labels.items())), separators=(",", ":"))


def labels_of(stored: str) -> dict[str, str]:
    """The labels of a stored key."""
    value = json.loads(stored)
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def bound(value: float) -> str:
    """A bucket's upper bound as Prometheus writes it in `le`."""
    return INF if math.isinf(value) else repr(float(value))


def observe(counts: Counts, histogram: Counter, value: float) -> None:
    """Count `value` in the bucket it falls in, and add it to the histogram's sum."""
    total, buckets = HISTOGRAMS[histogram]
    value = max(0.0, value)
    le = next((b for b in buckets if value <= b), math.inf)
    add(counts, key(histogram, le=bound(le)))
    add(counts, key(total), value)


def add(counts: Counts, k: Key, amount: float = 1.0) -> None:
    counts[k] = counts.get(k, 0.0) + amount


def delivery(result: DeliveryResult) -> Counts:
    return {key(Counter.DELIVERIES, result=str(result)): 1.0}


def gitea_request(method: str, status: int | None) -> Key:
    """A Gitea API call, by its method and its answer's status ("none": no answer)."""
    return key(
        Counter.GITEA_REQUESTS, method=method, code="none" if status is None else str(status)
    )


@dataclass(frozen=True)
class TaskFacts:
    """What the counts and notifications of a change need to know of the task, read in the
    transaction that changed it (after the change)."""

    id: int
    repo: str
    issue: int
    agent: str
    state: State
    outcome: str | None
    pr_number: int | None
    created_at: float
    not_before: float
    started_at: float | None


def outcome_label(facts: TaskFacts) -> str:
    """The `outcome` label of a finished task: its outcome, or its state when it has none (a
    request refused before it started is `rejected`)."""
    return facts.outcome or str(facts.state)


def for_transition(
    facts: TaskFacts, from_state: State | None, to_state: State, now: float
) -> Counts:
    """The counts a change of state adds:

    - claimed (pending -> running): how long the task waited since it was ready (queued,
      or its retry's back-off over);
    - the end of an attempt (running -> anything): how long the attempt ran;
    - finished (any -> a terminal state): one more task finished with its outcome.
    """
    counts: Counts = {}
    if from_state is State.PENDING and to_state is State.RUNNING:
        observe(counts, Counter.QUEUE_WAIT, now - max(facts.created_at, facts.not_before))
    if from_state is State.RUNNING and facts.started_at is not None:
        observe(counts, Counter.TASK_DURATION, now - facts.started_at)
    if to_state in TERMINAL_STATES:
        add(
            counts,
            key(
                Counter.TASKS_FINISHED,
                outcome=outcome_label(facts),
                agent=facts.agent,
                repo=facts.repo,
            ),
        )
    return counts


def for_agent_run(agent: str, repo: str, usage: Mapping[str, object]) -> Counts:
    """The tokens and cost of one agent run (`Usage.as_dict()`)."""
    counts: Counts = {}
    tokens = usage.get("total_tokens")
    if isinstance(tokens, (int, float)) and not isinstance(tokens, bool) and tokens > 0:
        add(counts, key(Counter.AGENT_TOKENS, agent=agent, repo=repo), float(tokens))
    cost = usage.get("cost_usd")
    if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost > 0:
        add(counts, key(Counter.AGENT_COST, agent=agent, repo=repo), float(cost))
    return counts


def without(labels: Mapping[str, str], names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Labels less those named, as a sorted tuple (to add up series that differ only there)."""
    return tuple(sorted((k, v) for k, v in labels.items() if k not in names))


class Tally:
    """Counts kept in memory until they are written to the database in a batch: what a
    process counts where it writes no transaction (each Gitea call, a refused delivery).
    Safe to share between threads."""

    def __init__(self) -> None:
        self._counts: Counts = {}
        self._lock = threading.Lock()

    def add(self, k: Key, amount: float = 1.0) -> None:
        with self._lock:
            self._counts[k] = self._counts.get(k, 0.0) + amount

    def take(self) -> Counts:
        """Everything counted since the last take, and forget it."""
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def give_back(self, counts: Mapping[Key, float]) -> None:
        """Counts taken that could not be written: they go with the next batch."""
        with self._lock:
            for k, amount in counts.items():
                self._counts[k] = self._counts.get(k, 0.0) + amount

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._counts)
