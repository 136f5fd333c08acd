"""APScheduler wiring: the interval job, wake(), and no wake lost during a tick."""

import threading
import time

from bot.scheduler import Coalescer, Scheduler
from tests.conftest import wait_for


def test_wake_runs_the_tick_at_once_whatever_the_interval():
    calls = []
    scheduler = Scheduler(interval=3600)
    scheduler.wake()  # before start: nothing to run yet, and no error
    scheduler.start(lambda: calls.append(time.monotonic()))
    try:
        wait_for(lambda: len(calls) == 1, timeout=10, what="the first tick at start")
        scheduler.wake()
        wait_for(lambda: len(calls) == 2, timeout=10, what="a tick after wake()")
    finally:
        scheduler.shutdown()
    assert not scheduler.running


def test_a_wake_during_a_tick_is_not_lost():
    started, release = threading.Event(), threading.Event()
    runs, returned = [], []

    def slow_tick():
        runs.append(1)
        if len(runs) == 1:
            started.set()
            release.wait(10)

    ticks = Coalescer(slow_tick)

    def job():
        # what the scheduler runs: each of its jobs (the first tick, the wake) returns here
        ticks.run()
        returned.append(1)

    scheduler = Scheduler(interval=3600)
    scheduler.start(job)
    try:
        assert started.wait(10)
        # work arrives while the first tick is still running
        ticks.request()
        scheduler.wake()
        # the wake's job found the tick running and returned without a second one at once
        wait_for(lambda: len(returned) == 1, timeout=10, what="the wake's job to return")
        assert len(runs) == 1
        release.set()
        # the running tick went round once more for the wake, and then its job returned:
        # both jobs are done and the next interval is an hour away, so nothing else runs
        wait_for(lambda: len(returned) == 2, timeout=10, what="the first job to return")
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


def test_wake_at_runs_the_tick_at_that_time_whatever_the_interval():
    calls = []
    scheduler = Scheduler(interval=3600)
    scheduler.start(lambda: calls.append(time.time()))
    try:
        wait_for(lambda: len(calls) == 1, timeout=10, what="the first tick at start")
        when = time.time() + 0.5
        scheduler.wake_at(when + 60)
        scheduler.wake_at(when)  # the earlier time replaces the later one
        wait_for(lambda: len(calls) == 2, timeout=10, what="the tick asked for")
        assert calls[1] >= when
    finally:
        scheduler.shutdown()


def test_the_reconcile_pass_runs_shortly_after_start_and_not_at_all_when_turned_off():
    passes = []
    scheduler = Scheduler(interval=3600)
    scheduler.start(lambda: None, reconcile=lambda: passes.append(1), reconcile_seconds=3600)
    try:
        wait_for(lambda: passes, timeout=15, what="the pass after the start")
    finally:
        scheduler.shutdown()

    off = Scheduler(interval=3600)
    off.start(lambda: None, reconcile=lambda: passes.append(1), reconcile_seconds=0)
    try:
        # interval_minutes = 0: no job at all, so not the pass after the start either
        assert off._scheduler.get_job("reconcile") is None
    finally:
        off.shutdown()
    assert passes == [1]
