"""What the dashboard's pages say about tasks: pure functions of tasks and events.

Why a queued task waits, its attempts from its events, the last line of a log, tokens
and cost, percentiles. No store, no files, no Gitea.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bot.core.render import duration
from bot.core.tasks import Outcome, State, Task

__all__ = [
    "Attempt",
    "QueueRow",
    "attempts",
    "cost",
    "duration",
    "last_line",
    "percentile",
    "queue_rows",
    "tokens",
]


@dataclass(frozen=True)
class QueueRow:
    task: Task
    #: 1-based place in the order the worker claims tasks (all repositories)
    position: int
    #: why it has not started yet, in a few words
    reason: str
    #: it starts at the next tick (a slot is free and nothing holds it back)
    next_up: bool = False


def queue_rows(
    waiting: Sequence[tuple[Task, int]], running: Iterable[Task], limit: int, now: float
) -> list[QueueRow]:
    """The queue as `Store.pending_positions` gives it (each waiting task with its place
    in the fair order in which slots go), each with why it waits, as `Store.claim` would
    decide: a task waits for its requester's permission to be checked, for its back-off
    to end, for its issue's running task, for an earlier task of its issue, or for a free
    agent slot (the free slots go to the first ready tasks in that order)."""
    running = list(running)
    busy_issues = {(t.repo, t.issue): t for t in running}
    free = max(0, limit - len(running))
    first_of_issue: dict[tuple[str, int], Task] = {}
    for task, _ in waiting:
        key = (task.repo, task.issue)
        if key not in first_of_issue or task.id < first_of_issue[key].id:
            first_of_issue[key] = task
    rows = []
    for task, position in waiting:
        key = (task.repo, task.issue)
        earlier = first_of_issue[key]
        next_up = False
        if not task.authorized:
            reason = "waiting for the requester's permission to be checked"
        elif key in busy_issues:
            reason = f"waiting on the issue's running task #{busy_issues[key].id}"
        elif earlier is not task:
            reason = f"behind task #{earlier.id} of the same issue"
        elif task.not_before > now:
            reason = f"back-off until {_clock(task.not_before)} UTC"
        elif free > 0:
            free -= 1
            next_up = True
            reason = "starts at the next tick (an agent slot is free)"
        else:
            reason = f"no free slot: {len(running)} of {limit} agents busy"
        rows.append(QueueRow(task, position, reason, next_up))
    return rows


def _clock(ts: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


@dataclass(frozen=True)
class Attempt:
    number: int
    started: float
    ended: float | None
    #: the outcome's name, "requeued", "recovered", or None while it runs
    result: str | None
    detail: str | None


#: events that end an attempt: each outcome, and the two ways an attempt is given back
_ENDS = {o.value for o in Outcome} | {"requeued", "recovered", "set aside"}


def attempts(events: Sequence[Mapping[str, Any]]) -> list[Attempt]:
    """A task's attempts from its events: each `claimed` starts one, the next event that
    ends an attempt (an outcome, requeued, recovered, set aside) ends it."""
    found: list[Attempt] = []
    open_at: float | None = None
    for event in events:
        name = event.get("event")
        if name == "claimed":
            if open_at is not None:
                found.append(Attempt(len(found) + 1, open_at, event["at"], "interrupted", None))
            open_at = event["at"]
        elif open_at is not None and name in _ENDS and event.get("from_state") == "running":
            found.append(Attempt(len(found) + 1, open_at, event["at"], name, event.get("detail")))
            open_at = None
    if open_at is not None:
        found.append(Attempt(len(found) + 1, open_at, None, None, None))
    return found


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def last_line(tail: bytes, limit: int = 200) -> str:
    """The last line with something on it in the end of a log, without terminal escapes
    and control characters, cut to `limit` characters."""
    text = tail.decode("utf-8", "replace").replace("\r", "\n")
    for line in reversed(text.split("\n")):
        clean = _CONTROL.sub("", _ANSI.sub("", line)).strip()
        if clean:
            return clean if len(clean) <= limit else clean[: limit - 1] + "…"
    return ""


def tokens(task: Task) -> int | None:
    usage = task.usage or {}
    total = 0
    for key in ("input_tokens", "output_tokens"):
        value = usage.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            total += int(value)
    return total or None


def cost(task: Task) -> float | None:
    value = (task.usage or {}).get("cost_usd")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0 to 100), interpolated between the nearest ranks."""
    if not values:
        return None
    data = sorted(values)
    k = (len(data) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


STATE_ICONS = {
    State.PENDING: "◷",
    State.RUNNING: "▶",
    State.COMPLETED: "✔",
    State.FAILED: "✖",
    State.CANCELLED: "■",
    State.REJECTED: "⊘",
}
