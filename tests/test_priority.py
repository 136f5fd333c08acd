"""CPU priority of what the worker starts (bot.priority), with real processes.

The worker runs niced; git and the agents must be niced too, and on kernels with autogroup
scheduling that takes more than inheriting the niceness (see bot/priority.py).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bot import priority
from bot.workspace import run_command
from tests.conftest import process_gone, wait_for

HAS_AUTOGROUP = Path("/proc/self/autogroup").exists()


def in_niced_child(code: str, nice: int = 6) -> dict:
    """Runs `code` in a fresh interpreter at +`nice`; it prints one JSON object."""
    prelude = f"import os, json, sys, subprocess\nos.nice({nice})\n"
    out = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# --------------------------------------------------------------------------- git commands


def test_a_command_gets_its_own_process_group_in_the_callers_session(tmp_path):
    out = run_command(
        [sys.executable, "-c", "import os; print(os.getpid(), os.getpgrp(), os.getsid(0))"],
        stdout=subprocess.PIPE,
        check=True,
    )
    pid, pgid, sid = map(int, out.stdout.split())
    assert pgid == pid != os.getpgrp()  # a timeout can kill its whole tree
    assert sid == os.getsid(0)  # and it shares the worker's scheduling group


def test_a_timeout_kills_the_commands_whole_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    script = (
        f"import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        f"time.sleep(60)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        run_command([sys.executable, "-c", script], timeout=5)
    grandchild = int(pidfile.read_text())
    wait_for(
        lambda: process_gone(grandchild),
        timeout=10,
        what="the grandchild to be killed with its group",
    )


def test_commands_inherit_the_callers_niceness():
    seen = in_niced_child("""
        from bot.workspace import run_command
        out = run_command([sys.executable, "-c", "import os; print(os.nice(0))"],
                          stdout=subprocess.PIPE, check=True)
        print(json.dumps({"parent": os.nice(0), "child": int(out.stdout)}))
    """)
    assert seen["child"] == seen["parent"] > 0


@pytest.mark.skipif(not HAS_AUTOGROUP, reason="this kernel has no autogroup scheduling")
def test_commands_stay_in_the_callers_scheduling_group():
    # A process in init's own group (one started without a session of its own, as a CI
    # runner may) reads an empty file; a child that started a session would read a line.
    seen = in_niced_child("""
        from bot.workspace import run_command
        group = "print((open('/proc/self/autogroup').read().split() or ['none'])[0])"
        out = run_command([sys.executable, "-c", group], stdout=subprocess.PIPE, check=True)
        print(json.dumps({"parent": (open('/proc/self/autogroup').read().split()
                                     or ['none'])[0],
                          "child": out.stdout.decode().strip()}))
    """)
    assert seen["child"] == seen["parent"]


# --------------------------------------------------------------------------- agents


@pytest.mark.skipif(not HAS_AUTOGROUP, reason="this kernel has no autogroup scheduling")
def test_an_agents_own_session_gets_the_workers_niceness(tmp_path):
    seen = in_niced_child(
        f"""
        from bot.process import AgentProcess
        agent = AgentProcess.start(
            [sys.executable, "-c", "import os, time; print(os.getsid(0), flush=True); "
             "time.sleep(30)"],
            cwd={str(tmp_path)!r}, env=dict(os.environ), log_path={str(tmp_path / "a.log")!r},
            log_max_bytes=1 << 20)
        try:
            group = open(f"/proc/{{agent.pid}}/autogroup").read()
            print(json.dumps({{"parent": os.nice(0), "pid": agent.pid,
                              "sid": os.getsid(agent.pid), "group": group}}))
        finally:
            agent.terminate(grace=1.0)
            agent.close()
    """,
        nice=5,
    )
    assert seen["sid"] == seen["pid"]  # its own session...
    assert seen["group"].split()[-1] == str(seen["parent"])  # ...at the worker's niceness


@pytest.mark.skipif(not HAS_AUTOGROUP, reason="this kernel has no autogroup scheduling")
def test_share_with_session_on_a_real_child():
    seen = in_niced_child(
        """
        from bot import priority
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                 start_new_session=True)
        try:
            ok = priority.share_with_session(child.pid)
            group = int(open(f"/proc/{child.pid}/autogroup").read().split()[-1])
        finally:
            child.kill()
            child.wait()
        print(json.dumps({"ok": ok, "group": group, "parent": os.nice(0)}))
    """,
        nice=4,
    )
    assert seen["ok"] is True and seen["group"] == seen["parent"] > 0


def fake_proc(tmp_path: Path, pid: int) -> Path:
    (tmp_path / str(pid)).mkdir()
    path = tmp_path / str(pid) / "autogroup"
    path.write_text("/autogroup-1 nice 0\n")
    return path


def test_share_with_session_does_nothing_when_not_niced(tmp_path, monkeypatch):
    path = fake_proc(tmp_path, 42)
    monkeypatch.setattr(priority.os, "getpriority", lambda *_: 0)
    assert priority.share_with_session(42, proc_root=str(tmp_path)) is False
    assert path.read_text() == "/autogroup-1 nice 0\n"


def test_share_with_session_writes_the_niceness(tmp_path, monkeypatch):
    path = fake_proc(tmp_path, 42)
    monkeypatch.setattr(priority.os, "getpriority", lambda *_: 9)
    assert priority.share_with_session(42, proc_root=str(tmp_path)) is True
    assert path.read_text() == "9"


def test_share_with_session_retries_the_kernels_rate_limit(tmp_path, monkeypatch):
    # unprivileged, the kernel allows one change of a group's niceness per 100 ms
    path = fake_proc(tmp_path, 42)
    monkeypatch.setattr(priority.os, "getpriority", lambda *_: 9)
    monkeypatch.setattr(priority.time, "sleep", lambda _s: None)
    real_open, failures = open, [OSError(errno.EAGAIN, "try again")] * 2

    def flaky_open(file, mode="r", *args, **kwargs):
        if str(file) == str(path) and "w" in mode and failures:
            raise failures.pop()
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", flaky_open)
    assert priority.share_with_session(42, proc_root=str(tmp_path)) is True
    assert path.read_text() == "9" and not failures


def test_share_with_session_gives_up_quietly(tmp_path, monkeypatch):
    monkeypatch.setattr(priority.os, "getpriority", lambda *_: 9)
    monkeypatch.setattr(priority.time, "sleep", lambda _s: None)
    # no such process (it exited already), or no autogroup on this system
    assert priority.share_with_session(999999, proc_root=str(tmp_path)) is False


def test_the_worker_lowers_its_own_priority():
    seen = in_niced_child(
        """
        from bot import priority
        before = os.nice(0)
        now = priority.lower_own_priority(3)
        print(json.dumps({"before": before, "now": now, "real": os.nice(0)}))
    """,
        nice=1,
    )
    assert seen["now"] == seen["real"] == min(seen["before"] + 3, 19)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH on this system")
def test_the_niced_worker_its_threads_and_children_are_batch_work():
    seen = in_niced_child(
        """
        import threading
        from bot import priority
        priority.lower_own_priority(2)
        in_thread = []
        t = threading.Thread(target=lambda: in_thread.append(os.sched_getscheduler(0)))
        t.start(); t.join()
        child = subprocess.run([sys.executable, "-c",
                                "import os; print(os.sched_getscheduler(0))"],
                               capture_output=True, text=True, check=True)
        print(json.dumps({"main": os.sched_getscheduler(0), "thread": in_thread[0],
                          "child": int(child.stdout)}))
    """,
        nice=1,
    )
    assert seen == {"main": os.SCHED_BATCH, "thread": os.SCHED_BATCH, "child": os.SCHED_BATCH}


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH on this system")
def test_nice_zero_leaves_the_worker_normal_work():
    seen = in_niced_child(
        """
        from bot import priority
        priority.lower_own_priority(0)
        print(json.dumps({"policy": os.sched_getscheduler(0)}))
    """,
        nice=0,
    )
    assert seen["policy"] == os.SCHED_OTHER
