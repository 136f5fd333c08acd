"""bot.process against real subprocesses: small fake agents written into tmp_path."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bot import process
from bot.process import (
    AgentProcess,
    AgentStartError,
    group_alive,
    kill_group,
    kill_orphan,
    process_start_token,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc")

# generous limits that only keep a broken test from hanging
WAIT = 30.0
MiB = 1024 * 1024

GRANDCHILD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pidfile = sys.argv[1]
with open(pidfile + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(pidfile + ".tmp", pidfile)
print("grandchild up", flush=True)
time.sleep(120)
"""

# argv: grandchild-script pidfile mode; mode "hang" keeps the leader running,
# "hang-ignore" also makes the leader ignore SIGTERM, "exit" ends the leader.
LEADER = """
import os, signal, subprocess, sys, time
grandchild, pidfile, mode = sys.argv[1:4]
if mode == "hang-ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, grandchild, pidfile])
while not os.path.exists(pidfile):
    time.sleep(0.01)
print("ready", flush=True)
if mode.startswith("hang"):
    time.sleep(120)
print("leader done", flush=True)
"""


def write_script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def live_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are not zombies.

    os.killpg(pgid, 0) alone is not enough: where nothing reaps orphans, the
    zombie of a killed grandchild still counts as a member for kill().
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(name))
    return members


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_for_file(path: Path) -> None:
    event = threading.Event()
    for _ in range(int(WAIT / 0.02)):
        if path.exists():
            return
        event.wait(0.02)
    raise AssertionError(f"{path.name} never appeared")


class Lines:
    """An on_line callback that records lines and lets a test wait for one."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    def wait_for(self, line: str) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: line in self.lines, timeout=WAIT), self.lines


@pytest.fixture
def spawn(tmp_path):
    """Start an agent with sensible defaults; anything left running is killed afterwards."""
    started: list[AgentProcess] = []

    def _spawn(argv, **kwargs) -> AgentProcess:
        kwargs.setdefault("cwd", tmp_path)
        kwargs.setdefault("env", {"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        kwargs.setdefault("log_path", tmp_path / "logs" / "agent.log")
        kwargs.setdefault("log_max_bytes", MiB)
        proc = AgentProcess.start([str(a) for a in argv], **kwargs)
        started.append(proc)
        return proc

    yield _spawn
    for proc in started:
        proc.terminate(0.1)


def py(script: Path, *args) -> list[str]:
    return [sys.executable, str(script), *map(str, args)]


# ---------------------------------------------------------------------------
# exit codes, output, log


def test_exit_zero_output_in_log_and_output(spawn, tmp_path):
    agent = write_script(
        tmp_path,
        "agent.py",
        """
        print("hello")
        print("world")
    """,
    )
    proc = spawn(py(agent))
    assert proc.wait(WAIT) == 0
    proc.close()
    assert proc.returncode == 0
    assert proc.output() == "hello\nworld\n"
    assert proc.bytes_seen == len("hello\nworld\n")
    assert (tmp_path / "logs" / "agent.log").read_text() == "hello\nworld\n"
    assert proc.tail() == "hello\nworld\n"
    assert proc.tail(6) == "world\n"


def test_nonzero_exit_and_stderr_captured(spawn, tmp_path):
    agent = write_script(
        tmp_path,
        "agent.py",
        """
        import sys
        print("working", flush=True)
        print("boom: it broke", file=sys.stderr, flush=True)
        sys.exit(3)
    """,
    )
    proc = spawn(py(agent))
    assert proc.wait(WAIT) == 3
    proc.close()
    assert proc.returncode == 3
    assert proc.output() == "working\nboom: it broke\n"
    assert "boom: it broke" in proc.tail(100)
    assert "boom: it broke" in (tmp_path / "logs" / "agent.log").read_text()


def test_on_line_gets_every_line_including_last_without_newline(spawn, tmp_path):
    agent = write_script(
        tmp_path,
        "agent.py",
        r"""
        import sys
        sys.stdout.write("first\nsecond\r\n\nlast without newline")
    """,
    )
    lines = Lines()
    proc = spawn(py(agent), on_line=lines)
    assert proc.wait(WAIT) == 0
    proc.close()
    assert lines.lines == ["first", "second", "", "last without newline"]


def test_on_line_handles_characters_split_across_reads(spawn, tmp_path):
    agent = write_script(
        tmp_path,
        "agent.py",
        r"""
        import sys, time
        out = sys.stdout.buffer
        out.write(b"caf\xc3"); out.flush()
        time.sleep(0.2)
        out.write(b"\xa9\n\xff bad byte\n"); out.flush()
    """,
    )
    lines = Lines()
    proc = spawn(py(agent), on_line=lines)
    assert proc.wait(WAIT) == 0
    proc.close()
    assert lines.lines == ["café", "\ufffd bad byte"]
    assert proc.output() == "café\n\ufffd bad byte\n"


def test_on_line_exception_is_logged_once_and_reading_continues(spawn, tmp_path, caplog):
    agent = write_script(
        tmp_path,
        "agent.py",
        """
        for i in range(100):
            print("line", i)
    """,
    )

    def broken(line: str) -> None:
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.ERROR, logger="bot.process"):
        proc = spawn(py(agent), on_line=broken)
        assert proc.wait(WAIT) == 0
        proc.close()
    assert proc.output().splitlines()[-1] == "line 99"
    assert "line 99" in (tmp_path / "logs" / "agent.log").read_text()
    failures = [r for r in caplog.records if "on_line" in r.getMessage()]
    assert len(failures) == 1


def test_header_and_append_across_runs(spawn, tmp_path):
    agent = write_script(
        tmp_path,
        "agent.py",
        """
        import sys
        print("output of", sys.argv[1])
    """,
    )
    log = tmp_path / "deep" / "dir" / "task-7.log"
    for attempt in (1, 2):
        proc = spawn(py(agent, attempt), log_path=log, header=f"=== attempt {attempt} ===")
        assert proc.wait(WAIT) == 0
        proc.close()
    assert log.read_text() == ("=== attempt 1 ===\noutput of 1\n=== attempt 2 ===\noutput of 2\n")


def test_missing_command_raises_agent_start_error(spawn, tmp_path):
    missing = tmp_path / "no-such-agent"
    with pytest.raises(AgentStartError, match="no-such-agent"):
        spawn([missing, "--help"], header="=== attempt 1 ===")
    log = (tmp_path / "logs" / "agent.log").read_text()
    assert log.startswith("=== attempt 1 ===\n")
    assert "no-such-agent" in log


def test_missing_command_on_path_raises_agent_start_error(spawn):
    with pytest.raises(AgentStartError, match="kugetsu-no-such-agent-cli"):
        spawn(["kugetsu-no-such-agent-cli"])


def test_not_executable_raises_agent_start_error(spawn, tmp_path):
    agent = write_script(tmp_path, "agent.sh", "#!/bin/sh\necho hi\n")
    agent.chmod(0o644)
    with pytest.raises(AgentStartError, match=r"agent\.sh"):
        spawn([agent])


def test_missing_cwd_raises_agent_start_error(spawn, tmp_path):
    agent = write_script(tmp_path, "agent.py", "print('hi')\n")
    with pytest.raises(AgentStartError, match="working directory"):
        spawn(py(agent), cwd=tmp_path / "gone")


# ---------------------------------------------------------------------------
# environment of the agent


def test_cwd_env_and_stdin(spawn, tmp_path, monkeypatch):
    monkeypatch.setenv("KUGETSU_SERVICE_ONLY", "must not leak")
    worktree = tmp_path / "worktree"
    worktree.mkdir()
    agent = write_script(
        tmp_path,
        "agent.py",
        """
        import json, os, sys
        print(json.dumps({
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "stdin": sys.stdin.read(),
            "stdin_is_devnull": os.path.samestat(os.fstat(0), os.stat(os.devnull)),
        }))
    """,
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AGENT_TOKEN": "t0ken",
        "HOME": str(tmp_path),
    }
    proc = spawn(py(agent), cwd=worktree, env=env)
    assert proc.wait(WAIT) == 0
    proc.close()
    seen = json.loads(proc.output())
    assert Path(seen["cwd"]).resolve() == worktree.resolve()
    for key, value in env.items():
        assert seen["env"][key] == value
    assert "KUGETSU_SERVICE_ONLY" not in seen["env"]
    assert seen["stdin"] == ""
    assert seen["stdin_is_devnull"] is True


def test_agent_has_its_own_process_group_and_session(spawn, tmp_path):
    agent = write_script(
        tmp_path,
        "agent.py",
        """
        import os
        print(os.getpid(), os.getpgrp(), os.getsid(0))
    """,
    )
    proc = spawn(py(agent))
    assert proc.wait(WAIT) == 0
    proc.close()
    pid, pgid, sid = map(int, proc.output().split())
    assert pid == pgid == sid == proc.pid
    assert pgid != os.getpgrp()


def test_start_token_identifies_the_agent(spawn, tmp_path):
    agent = write_script(
        tmp_path,
        "agent.py",
        """
        import time
        print("ready", flush=True)
        time.sleep(120)
    """,
    )
    lines = Lines()
    proc = spawn(py(agent), on_line=lines)
    lines.wait_for("ready")
    assert proc.start_token is not None
    assert proc.start_token == process_start_token(proc.pid)
    assert proc.start_token != process_start_token(os.getpid())
    proc.terminate(5.0)


# ---------------------------------------------------------------------------
# stopping


def test_terminate_hanging_agent(spawn, tmp_path):
    agent = write_script(
        tmp_path,
        "agent.py",
        """
        import time
        print("ready", flush=True)
        time.sleep(120)
    """,
    )
    lines = Lines()
    proc = spawn(py(agent), on_line=lines, header="hdr")
    lines.wait_for("ready")
    assert proc.poll() is None
    assert proc.wait(0.1) is None
    rc = proc.terminate(WAIT)
    assert rc == -signal.SIGTERM
    assert proc.returncode == -signal.SIGTERM
    assert not group_alive(proc.pid)
    assert proc.terminate(WAIT) == rc  # idempotent
    proc.close()
    assert (tmp_path / "logs" / "agent.log").read_text() == "hdr\nready\n"


@pytest.mark.parametrize(
    "mode, expected_rc", [("hang", -signal.SIGTERM), ("hang-ignore", -signal.SIGKILL)]
)
def test_terminate_kills_grandchild_that_ignores_sigterm(spawn, tmp_path, mode, expected_rc):
    grandchild = write_script(tmp_path, "grandchild.py", GRANDCHILD)
    leader = write_script(tmp_path, "leader.py", LEADER)
    pidfile = tmp_path / "grandchild.pid"
    lines = Lines()
    proc = spawn(py(leader, grandchild, pidfile, mode), on_line=lines)
    lines.wait_for("ready")
    grandchild_pid = int(pidfile.read_text())
    assert pid_alive(grandchild_pid)
    assert group_alive(proc.pid)

    rc = proc.terminate(0.5)

    assert rc == expected_rc
    assert not pid_alive(grandchild_pid)
    assert not group_alive(proc.pid)
    assert live_members(proc.pid) == []
    assert "grandchild up" in lines.lines


def test_close_after_leader_exit_kills_grandchild_holding_the_pipe(spawn, tmp_path):
    grandchild = write_script(tmp_path, "grandchild.py", GRANDCHILD)
    leader = write_script(tmp_path, "leader.py", LEADER)
    pidfile = tmp_path / "grandchild.pid"
    lines = Lines()
    proc = spawn(py(leader, grandchild, pidfile, "exit"), on_line=lines)
    assert proc.wait(WAIT) == 0
    grandchild_pid = int(pidfile.read_text())
    assert pid_alive(grandchild_pid)

    closer = threading.Thread(target=proc.close, kwargs={"grace": 0.5}, daemon=True)
    closer.start()
    closer.join(WAIT)

    assert not closer.is_alive(), "close() blocked on a pipe held by a grandchild"
    assert not pid_alive(grandchild_pid)
    assert not group_alive(proc.pid)
    assert live_members(proc.pid) == []
    assert proc.returncode == 0
    assert "leader done" in lines.lines and "grandchild up" in lines.lines
    log = (tmp_path / "logs" / "agent.log").read_text()
    assert "leader done" in log and "grandchild up" in log


def test_close_on_running_agent_terminates_it(spawn, tmp_path):
    agent = write_script(
        tmp_path,
        "agent.py",
        """
        import time
        print("ready", flush=True)
        time.sleep(120)
    """,
    )
    lines = Lines()
    proc = spawn(py(agent), on_line=lines)
    lines.wait_for("ready")
    proc.close(grace=5.0)
    assert proc.returncode == -signal.SIGTERM
    assert not group_alive(proc.pid)


# ---------------------------------------------------------------------------
# bounded output


def test_output_flood_is_capped_in_log_and_memory(spawn, tmp_path):
    total_mb = 50
    agent = write_script(
        tmp_path,
        "agent.py",
        f"""
        import sys
        out = sys.stdout.buffer
        out.write(b"HEAD-MARKER\\n")
        block = (b"x" * 1023 + b"\\n") * 1024
        for _ in range({total_mb}):
            out.write(block)
        out.write(b"REAL-LAST-LINE\\n")
        out.flush()
    """,
    )
    count = [0]

    def on_line(line: str) -> None:
        count[0] += 1

    log = tmp_path / "logs" / "agent.log"
    rss_before = rss_bytes()
    proc = spawn(py(agent), log_max_bytes=MiB, on_line=on_line, header="=== flood ===")
    assert proc.wait(WAIT * 4) == 0
    proc.close()
    rss_growth = rss_bytes() - rss_before

    expected_total = len(b"HEAD-MARKER\n") + total_mb * MiB + len(b"REAL-LAST-LINE\n")
    assert proc.bytes_seen == expected_total
    assert count[0] == total_mb * 1024 + 2

    size = log.stat().st_size
    assert size <= 1.1 * MiB
    data = log.read_bytes()
    assert data.startswith(b"=== flood ===\nHEAD-MARKER\n")
    assert data.endswith(b"REAL-LAST-LINE\n")
    assert b"bytes of output omitted]" in data
    marker = data[data.index(b"[kugetsu: ") :].split(b"\n", 1)[0]
    omitted = int(marker.split()[1])
    assert omitted == expected_total - 2 * (MiB // 2)

    out = proc.output()
    assert len(out) <= process.OUTPUT_HEAD_BYTES + process.OUTPUT_TAIL_BYTES + 200
    assert out.startswith("HEAD-MARKER\n")
    assert out.endswith("REAL-LAST-LINE\n")
    assert "bytes omitted ...]" in out
    assert proc.tail(15) == "REAL-LAST-LINE\n"

    # the whole flood must not have been kept in memory
    assert rss_growth < 30 * MiB


def test_single_huge_line_without_newline(spawn, tmp_path):
    size = 5 * 1000 * 1000
    agent = write_script(
        tmp_path,
        "agent.py",
        f"""
        import sys
        sys.stdout.buffer.write(b"y" * {size})
    """,
    )
    lines = Lines()
    log = tmp_path / "logs" / "agent.log"
    proc = spawn(py(agent), log_max_bytes=MiB, on_line=lines)
    assert proc.wait(WAIT) == 0
    proc.close()

    assert proc.bytes_seen == size
    assert all(0 < len(piece) <= process.MAX_LINE_CHARS for piece in lines.lines)
    assert sum(len(piece) for piece in lines.lines) == size
    assert set("".join(lines.lines)) == {"y"}
    assert log.stat().st_size <= 1.1 * MiB
    assert b"bytes of output omitted]" in log.read_bytes()
    assert log.read_bytes().endswith(b"y")
    assert len(proc.output()) <= process.OUTPUT_HEAD_BYTES + process.OUTPUT_TAIL_BYTES + 200


def test_output_just_over_half_the_log_cap_is_kept_whole(spawn, tmp_path):
    # more than the live half, less than both halves: nothing is omitted
    agent = write_script(
        tmp_path,
        "agent.py",
        """
        for i in range(3000):
            print(f"line {i:05d}")
    """,
    )
    log = tmp_path / "logs" / "agent.log"
    proc = spawn(py(agent), log_max_bytes=40_000)
    assert proc.wait(WAIT) == 0
    proc.close()
    expected = "".join(f"line {i:05d}\n" for i in range(3000))
    assert log.read_text() == expected
    assert proc.output() == expected


# ---------------------------------------------------------------------------
# secrets never reach the log

TOKEN = "kgt-SECRET-token-0123456789abcdef"
HOOK_SECRET = "kugetsu-test-secret"


def test_a_secret_split_across_writes_is_masked_in_the_log(spawn, tmp_path):
    # the token comes in three writes, each flushed and some time apart, so the reader
    # meets it in pieces; the webhook secret comes whole
    agent = write_script(
        tmp_path,
        "agent.py",
        f"""
        import sys, time
        out = sys.stdout.buffer
        for piece in (b"token: {TOKEN[:7]}", b"{TOKEN[7:20]}", b"{TOKEN[20:]} done\\n",
                      b"secret={HOOK_SECRET}\\n", b"kgt-SEC is no secret\\n"):
            out.write(piece)
            out.flush()
            time.sleep(0.2)
    """,
    )
    log = tmp_path / "logs" / "agent.log"
    proc = spawn(py(agent), header="=== run ===", secrets=(TOKEN, HOOK_SECRET))
    assert proc.wait(WAIT) == 0
    proc.close()
    assert log.read_text() == (
        "=== run ===\ntoken: [redacted] done\nsecret=[redacted]\nkgt-SEC is no secret\n"
    )
    # what kugetsu parses in memory is the agent's own output
    assert TOKEN in proc.output()


def test_a_secret_cut_by_the_log_cap_leaves_no_part_on_either_side(spawn, tmp_path):
    # log_max_bytes=200: the first 100 bytes are written as they come, the last 100 at the
    # end. The live part ends 10 bytes into one token, the tail starts 20 bytes before
    # the end of another: neither part may be written.
    token = TOKEN.encode()
    output = b"." * 90 + token + b"." * 1000 + token + b"." * 80
    agent = write_script(
        tmp_path,
        "agent.py",
        f"""
        import sys
        sys.stdout.buffer.write({output!r})
    """,
    )
    log = tmp_path / "logs" / "agent.log"
    proc = spawn(py(agent), log_max_bytes=200, secrets=(TOKEN,))
    assert proc.wait(WAIT) == 0
    proc.close()
    omitted = len(output) - 100 - 100 + 10 + 20
    assert log.read_bytes() == (
        b"." * 90 + f"\n[kugetsu: {omitted} bytes of output omitted]\n".encode() + b"." * 80
    )


def test_the_stream_redactor_masks_a_secret_split_anywhere():
    from bot.redact import MASK, StreamRedactor

    text = f"a {TOKEN} b {HOOK_SECRET}{TOKEN} c kgt- d".encode()
    expected = f"a {MASK} b {MASK}{MASK} c kgt- d".encode()
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            r = StreamRedactor((TOKEN, HOOK_SECRET, "", "abc"))
            assert (
                r.feed(text[:i]) + r.feed(text[i:j]) + r.feed(text[j:]) + r.flush() == expected
            ), (i, j)


# ---------------------------------------------------------------------------
# orphans from a previous run


@pytest.fixture
def detached(tmp_path):
    """A sleeping process in its own session, started without AgentProcess."""
    procs: list[subprocess.Popen] = []

    def _start() -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(p)
        return p

    yield _start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_kill_orphan_checks_the_start_token(detached):
    p = detached()
    token = process_start_token(p.pid)
    assert token is not None
    assert process_start_token(p.pid) == token

    assert kill_orphan(p.pid, "0@not-this-process", 1.0) is False
    assert kill_orphan(p.pid, None, 1.0) is False
    assert p.poll() is None

    assert kill_orphan(p.pid, token, WAIT) is True
    assert p.wait(WAIT) == -signal.SIGTERM
    assert not group_alive(p.pid)


def test_kill_orphan_for_dead_pid(detached):
    p = detached()
    token = process_start_token(p.pid)
    p.kill()
    p.wait()
    assert process_start_token(p.pid) is None
    assert kill_orphan(p.pid, token, 1.0) is False


def test_an_exited_process_not_yet_reaped_has_no_start_token(unreaped):
    # a zombie is not running: whoever asks whether it lives (a worker's tasks) gets None
    pid, token = unreaped()
    assert process_start_token(pid) is None
    # but it still holds its pid, and its identity is still known to whoever asks for it
    assert process_start_token(pid, exited_ok=True) == token
    # kill_orphan knows it for the agent it was, and finds nothing alive to kill
    assert kill_orphan(pid, token, 1.0) is False


def test_kill_orphan_kills_the_group_its_dead_leader_left(tmp_path):
    # the service was down while the agent's leader exited; a child it started lives on
    # in the leader's group, still working in the worktree
    pidfile = tmp_path / "child"
    leader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n",
        ],
        start_new_session=True,
    )
    token = process_start_token(leader.pid)
    assert leader.wait(WAIT) == 0
    child = int(pidfile.read_text())
    try:
        assert process_start_token(leader.pid) is None and group_alive(leader.pid)
        assert kill_orphan(leader.pid, token, WAIT) is True
        deadline = time.monotonic() + WAIT
        while group_alive(leader.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not group_alive(leader.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_kill_group_and_group_alive(detached):
    p = detached()
    assert group_alive(p.pid)
    assert kill_group(p.pid, WAIT) is True
    p.wait(WAIT)
    assert not group_alive(p.pid)
    assert kill_group(p.pid, 0.1) is False


def test_kill_group_refuses_dangerous_groups():
    for pgid in (0, 1, os.getpgrp()):
        with pytest.raises(ValueError):
            kill_group(pgid, 0.1)
    assert process_start_token(0) is None
    assert group_alive(0) is False
