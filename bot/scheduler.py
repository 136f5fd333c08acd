"""APScheduler wiring only: the interval tick, the heartbeat, a daily clean-up, the setup
checks, the reconcile pass, and wake()."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
#: the first reconcile pass runs this long after the worker starts (the first tick first)
RECONCILE_FIRST_SECONDS = 3.0


class Coalescer:
    """Runs `fn` one call at a time; a request made during a run causes one more run.

    APScheduler's max_instances skips a job that is already running, which would drop a
    wake that arrives mid-tick. Here every caller marks the work as wanted and only one
    thread runs it, going round again while anyone asked for more.
    """

    def __init__(
        self,
        fn: Callable[[], None],
        *,
        stopped: Callable[[], bool] = lambda: False,
        min_interval: float = 0.0,
    ):
        self._fn = fn
        self._stopped = stopped
        self._min_interval = min_interval
        self._last_start = float("-inf")
        self._lock = threading.Lock()
        self._wanted = threading.Event()

    def request(self) -> None:
        self._wanted.set()

    def run(self) -> None:
        self._wanted.set()
        while self._wanted.is_set() and not self._stopped():
            if not self._lock.acquire(blocking=False):
                return  # the thread holding the lock will see the request and go again
            try:
                # back-to-back requests (a burst of deliveries) are served as one batch
                wait = self._last_start + self._min_interval - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self._wanted.clear()
                self._last_start = time.monotonic()
                self._fn()
            except Exception:
                log.exception("scheduled run failed")
            finally:
                self._lock.release()


class Scheduler:
    """Runs the tick every `interval` seconds, and at once when woken.

    The interval job has max_instances=1 and coalesces missed runs. wake() adds a
    one-off job; the tick's own Coalescer makes sure a wake that arrives during a tick
    is not lost. Until start() gives it the jobs, wake() does nothing.
    """

    def __init__(self, interval: float, *, heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.interval = interval
        self.heartbeat_seconds = heartbeat_seconds
        self._tick: Callable[[], None] | None = None
        self._scheduler = BackgroundScheduler(
            timezone=UTC, job_defaults={"misfire_grace_time": None}
        )

    def start(
        self,
        tick: Callable[[], None],
        *,
        heartbeat: Callable[[], None] | None = None,
        cleanup: Callable[[], object] | None = None,
        every: Sequence[tuple[str, float, Callable[[], object]]] = (),
        reconcile: Callable[[], object] | None = None,
        reconcile_seconds: float = 0.0,
    ) -> None:
        """Run `tick` now and every interval; `heartbeat` every heartbeat_seconds; `cleanup`
        five minutes from now and then daily; each of `every` (name, seconds, job) now and
        then every that many seconds; `reconcile` RECONCILE_FIRST_SECONDS from now and then
        every `reconcile_seconds` (never, if that is 0)."""
        self._tick = tick
        now = datetime.now(UTC)
        self._scheduler.add_job(
            tick,
            "interval",
            seconds=self.interval,
            id="tick",
            max_instances=1,
            coalesce=True,
            next_run_time=now,
        )
        if heartbeat is not None:
            self._scheduler.add_job(
                heartbeat,
                "interval",
                seconds=self.heartbeat_seconds,
                id="heartbeat",
                max_instances=1,
                coalesce=True,
            )
        if cleanup is not None:
            self._scheduler.add_job(
                cleanup,
                "interval",
                hours=24,
                id="cleanup",
                max_instances=1,
                coalesce=True,
                next_run_time=now + timedelta(minutes=5),
            )
        for name, seconds, job in every:
            self._scheduler.add_job(
                job,
                "interval",
                seconds=seconds,
                id=name,
                max_instances=1,
                coalesce=True,
                next_run_time=now,
            )
        if reconcile is not None and reconcile_seconds > 0:
            self._scheduler.add_job(
                reconcile,
                "interval",
                seconds=reconcile_seconds,
                id="reconcile",
                max_instances=1,
                coalesce=True,
                next_run_time=now + timedelta(seconds=RECONCILE_FIRST_SECONDS),
            )
        self._scheduler.start()

    def wake(self) -> None:
        if self._tick is None or not self._scheduler.running:
            return
        self._scheduler.add_job(
            self._tick,
            "date",
            run_date=datetime.now(UTC),
            id="wake",
            replace_existing=True,
            max_instances=4,
        )

    def wake_at(self, when: float) -> None:
        """Run the tick at `when` (a Unix time) too: a back-off that ends then need not
        wait for the next interval. A later call replaces the time asked for before (each
        tick asks again for the earliest)."""
        if self._tick is None or not self._scheduler.running:
            return
        self._scheduler.add_job(
            self._tick,
            "date",
            run_date=datetime.fromtimestamp(when, UTC),
            id="wake-at",
            replace_existing=True,
            max_instances=4,
        )

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
