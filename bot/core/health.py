"""What /healthz and /readyz say beyond "the process lives": each problem in one line.

The receiver and the worker are separate processes and share only the database. The
worker keeps a `TickRecord` of its ticks and writes it there with its heartbeat, and at
once when a tick fails or recovers; the receiver reads it back (`Store.worker_report`),
adds the free space of the data directory and its own failed writes, and `problems()`
turns those facts into lines. The worker's checks (bot/doctor.py: Gitea reachable, the
token accepted, the default agent found) reach the receiver the same way, as a
`Readiness`. When the database cannot be written, the heartbeat stops and that is
reported; when it cannot be read, the receiver says so. /readyz answers 503 for
`not_ready()`: every problem, and checks that have not run yet.

`problems()`, `not_ready()`, `TickRecord` and `Readiness` are pure: no I/O, the time is
passed in.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace

#: this many failed ticks in a row are reported (one can be a passing lock or outage)
TICK_FAILURES_REPORTED = 3
#: a tick still running after this long is reported as stalled; a tick waits on Gitea
#: at most for its timeouts, one call per step when Gitea is away
TICK_STALLED_SECONDS = 600.0
#: the worker writes its heartbeat every 10 s; this much silence means it cannot
HEARTBEAT_LATE_SECONDS = 60.0
#: a failed write by the receiver is reported for this long
WRITE_FAILURE_SECONDS = 300.0

#: longest error message kept in a report or a reason
MAX_ERROR_CHARS = 300

MIB = 1024 * 1024


def describe(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """An exception as one line: its class and message, cut to `limit` characters."""
    text = " ".join(f"{exc.__class__.__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class TickRecord:
    """The worker's ticks: the one running now, the last that ended well, the failures."""

    started_at: float | None = None  # the tick in progress, if any
    ok_at: float | None = None  # the end of the last tick that did not fail
    failures: int = 0  # ticks failed in a row
    failing_since: float | None = None  # when the first of them failed
    error: str | None = None  # the last failure, one line

    def began(self, now: float) -> TickRecord:
        return replace(self, started_at=now)

    def succeeded(self, now: float) -> TickRecord:
        return TickRecord(ok_at=now)

    def failed(self, now: float, error: str) -> TickRecord:
        return replace(
            self,
            started_at=None,
            failures=self.failures + 1,
            error=error,
            failing_since=self.failing_since if self.failures else now,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> TickRecord | None:
        """The record a worker wrote, or None if there is none or it cannot be read."""
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError):
            return None


@dataclass(frozen=True)
class Readiness:
    """What the worker's checks (bot/doctor.py) last found that keeps kugetsu from working:
    Gitea away, the token refused, the default agent missing; one line each, with its fix.
    The worker writes it to the database at start and after each re-check."""

    checked_at: float
    problems: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"checked_at": self.checked_at, "problems": list(self.problems)})

    @classmethod
    def from_json(cls, text: str | None) -> Readiness | None:
        """The record a worker wrote, or None if there is none or it cannot be read."""
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(float(data["checked_at"]), tuple(str(p) for p in data["problems"]))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class Facts:
    """What the receiver knows when /healthz is asked, each None when unknown."""

    now: float
    worker_alive: bool
    worker_up_since: float | None = None
    #: the worker's heartbeat and tick record from the database (None: no row for it)
    heartbeat_at: float | None = None
    tick: TickRecord | None = None
    registered: bool = False
    database_error: str | None = None  # the receiver could not read the database
    free_bytes: int | None = None
    min_free_bytes: int = 0
    disk_error: str | None = None  # free space could not be read
    #: (when, what) of the receiver's last failed write
    write_failure: tuple[float, str] | None = None
    #: what `serve` warned of at start about the sandbox (core.sandbox.assess), one line each
    sandbox_warnings: tuple[str, ...] = ()
    #: what the worker's checks found (None: they have not run yet)
    readiness: Readiness | None = None


def _ago(seconds: float) -> str:
    return f"{max(0, int(seconds))} s"


def _at(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def problems(f: Facts) -> list[str]:
    """One line per problem, most serious first; an empty list is healthy."""
    found: list[str] = []
    if not f.worker_alive:
        found.append("worker: not running (it is restarted)")
    if f.database_error:
        found.append(f"database: cannot be read: {f.database_error}")
    if f.write_failure and f.now - f.write_failure[0] < WRITE_FAILURE_SECONDS:
        found.append(
            f"database: a delivery could not be stored {_ago(f.now - f.write_failure[0])}"
            f" ago (answered 503): {f.write_failure[1]}"
        )
    if f.disk_error:
        found.append(f"disk: free space of the data directory cannot be read: {f.disk_error}")
    elif f.free_bytes is not None and f.free_bytes < f.min_free_bytes:
        found.append(
            f"disk: {f.free_bytes / MIB:.1f} MiB free in the data directory, below "
            f"storage.min_free_mb ({f.min_free_bytes // MIB})"
        )
    if f.worker_alive and f.database_error is None:
        found += _worker_problems(f)
    found += f.sandbox_warnings
    return found


def not_ready(f: Facts) -> list[str]:
    """What /readyz answers 503 for: every problem but the sandbox's warnings (kugetsu works
    as it is; /healthz names them), and checks that have not run yet."""
    found = [p for p in problems(f) if p not in f.sandbox_warnings]
    if f.worker_alive and f.database_error is None and f.readiness is None:
        found.append("checks: not run yet (the worker runs them as it starts)")
    return found


def _worker_problems(f: Facts) -> list[str]:
    found: list[str] = []
    if f.readiness is not None:
        found += f.readiness.problems
    if not f.registered:
        if f.worker_up_since is not None and f.now - f.worker_up_since > HEARTBEAT_LATE_SECONDS:
            found.append(
                f"worker: not registered in the database after {_ago(f.now - f.worker_up_since)}"
            )
        return found
    if f.heartbeat_at is not None and f.now - f.heartbeat_at > HEARTBEAT_LATE_SECONDS:
        found.append(
            f"worker: no heartbeat for {_ago(f.now - f.heartbeat_at)} "
            "(it cannot write to the database, or it is stuck)"
        )
    tick = f.tick
    if tick is None:
        return found
    if tick.failures >= TICK_FAILURES_REPORTED:
        since = f" since {_at(tick.failing_since)}" if tick.failing_since else ""
        found.append(f"tick: failed {tick.failures} times in a row{since}: {tick.error}")
    if tick.started_at is not None and f.now - tick.started_at > TICK_STALLED_SECONDS:
        found.append(f"tick: running for {_ago(f.now - tick.started_at)}, stalled")
    return found
