"""CPU priority of the worker and of everything it starts.

The receiver has to answer each delivery quickly (Gitea waits 5 s and never retries), while
the worker, git and the agents can wait a little for the CPU. So the worker lowers its own
priority at start (`agents.nice`) and its children inherit it; with a positive
`agents.nice` it also runs as batch work (SCHED_BATCH: its wake-ups never preempt the
receiver).

Inheriting is not the whole story on Linux with autogroup scheduling
(`kernel.sched_autogroup_enabled`, on by default in many distributions, and in effect for
processes that no cgroup gives a CPU share of their own). The kernel then shares the CPU
between sessions first and by niceness only within a session. A child that starts a session
of its own starts in a new group at group niceness 0, and competes with the receiver's whole
session as an equal, however niced the child itself is. Measured with agents that exit at
once (bench/README.md), that put the webhook p99 at 9 to 14 ms instead of 6 to 8 ms.

- git runs in a process group of its own (a timeout kills the whole tree) but stays in the
  worker's session, so its niceness counts. It never prompts on a terminal
  (`GIT_TERMINAL_PROMPT=0`, stdin from /dev/null).
- Agents keep a session of their own, so that an agent never has a controlling terminal to
  read from or to stop on. `share_with_session()` gives that session's group the worker's
  niceness.
"""

from __future__ import annotations

import errno
import logging
import os
import time

log = logging.getLogger(__name__)

#: an unprivileged process may change a group's niceness only once per 100 ms (system-wide)
_AUTOGROUP_RETRY_SECONDS = 0.11
_AUTOGROUP_TRIES = 3


def lower_own_priority(increment: int) -> int:
    """Adds `increment` to this process's niceness; returns the niceness it now has.

    With a positive increment the calling thread also becomes batch work (SCHED_BATCH):
    same share of the CPU as its niceness gives, but its wake-ups never preempt a
    running thread. The receiver wakes the worker through a pipe for each delivery
    that queues work; as normal work the worker could wake up in the middle of the receiver's
    next request and take the CPU from it. Call it before any thread starts: threads
    and child processes inherit both.
    """
    if increment:
        try:
            os.nice(increment)
        except OSError as exc:
            log.warning("cannot lower the worker's CPU priority", extra={"error": str(exc)})
        else:
            _become_batch_work()
    return os.nice(0)


def _become_batch_work() -> bool:
    policy = getattr(os, "SCHED_BATCH", None)  # Linux only
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
        return True
    except OSError as exc:
        log.warning("cannot mark the worker as batch work", extra={"error": str(exc)})
        return False


def share_with_session(pid: int, *, proc_root: str = "/proc") -> bool:
    """Give the session of `pid` (a child that called setsid) this process's niceness.

    Returns True when the child's session group has it. Does nothing (False) where there
    is no autogroup: other kernels, other systems, or a child that has already exited.
    """
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    if nice <= 0:
        return False  # a new group's niceness is 0 already
    path = os.path.join(proc_root, str(pid), "autogroup")
    for attempt in range(_AUTOGROUP_TRIES):
        try:
            with open(path, "w") as fh:
                fh.write(str(nice))
            return True
        except OSError as exc:
            if exc.errno != errno.EAGAIN or attempt == _AUTOGROUP_TRIES - 1:
                if exc.errno not in (errno.ENOENT, errno.ESRCH):
                    log.debug(
                        "cannot set the niceness of a child's session",
                        extra={"pid": pid, "error": str(exc)},
                    )
                return False
            time.sleep(_AUTOGROUP_RETRY_SECONDS)
    return False
