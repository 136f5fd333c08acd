"""APScheduler wiring: the interval job, wake(), and no wake lost during a tick."""

import threading
import time

from bot.scheduler import Coalescer, Scheduler
from tests.conftest import wait_for


def test_wake_runs_the_tick_at_once_whatever_the_interval():
    calls = []
    scheduler = Scheduler(lambda: calls.append(time.monotonic()), interval=3600)
    scheduler.start()
    try:
        wait_for(lambda: len(calls) == 1, timeout=10, what="the first tick at start")
        scheduler.wake()
        wait_for(lambda: len(calls) == 2, timeout=10, what="a tick after wake()")
    finally:
        scheduler.shutdown()
    assert not scheduler.running


def test_a_wake_during_a_tick_is_not_lost():
    started, release = threading.Event(), threading.Event()
    runs = []

    def slow_tick():
        runs.append(1)
        if len(runs) == 1:
            started.set()
            release.wait(10)

    ticks = Coalescer(slow_tick)
    scheduler = Scheduler(ticks.run, interval=3600)
    scheduler.start()
    try:
        assert started.wait(10)
        # work arrives while the first tick is still running
        ticks.request()
        scheduler.wake()
        time.sleep(0.3)
        assert len(runs) == 1
        release.set()
        wait_for(lambda: len(runs) == 2, timeout=10, what="the tick that the wake asked for")
        time.sleep(0.3)
        assert len(runs) == 2  # one wake, one extra run
    finally:
        release.set()
        scheduler.shutdown()


def test_coalescer_runs_one_at_a_time():
    active, peak, runs = [0], [0], []
    lock = threading.Lock()

    def fn():
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        runs.append(1)
        with lock:
            active[0] -= 1

    c = Coalescer(fn)
    threads = [threading.Thread(target=c.run) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1
    assert 1 <= len(runs) <= 20
