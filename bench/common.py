"""Shared pieces of the benchmark scripts: statistics, result files, a configured service."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import FAKE_AGENT, REPO, SECRET, TOKEN
from tests.service import Service, free_port, write_config

RESULTS = Path(__file__).resolve().parent / "results"
TRACKING_MARK = "<!-- kugetsu:task="
FINAL_MARKS = {
    "✅ **Done**": "done",
    "➖ **No changes**": "no_changes",
    "❌ **Failed**": "failed",
    "🛑 **Stopped**": "stopped",
    "🚫 **Not started**": "rejected",
}

__all__ = [
    "FAKE_AGENT",
    "REPO",
    "ROOT",
    "SECRET",
    "TOKEN",
    "Service",
    "fake_agent_table",
    "final_state",
    "free_port",
    "machine",
    "memory_kib",
    "pct",
    "read_record",
    "read_task_rows",
    "service_tables",
    "summary",
    "table",
    "task_phases",
    "tracking_comments",
    "wait_until",
    "write_config",
    "write_result",
]


# --------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100), interpolated between the two nearest ranks (the
    dashboard's charts compute theirs the same way)."""
    from bot.dashboard.views import percentile

    return percentile(values, p)


def summary(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> dict[str, Any]:
    """count, min, p50, p90, p99, max and mean, each multiplied by `scale`."""
    if not values:
        return {"count": 0}
    out: dict[str, Any] = {"count": len(values)}
    for key, value in (
        ("min", min(values)),
        ("p50", pct(values, 50)),
        ("p90", pct(values, 90)),
        ("p99", pct(values, 99)),
        ("max", max(values)),
        ("mean", sum(values) / len(values)),
    ):
        out[key] = round(value * scale, digits)
    return out


# --------------------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def revision() -> str | None:
    """The commit measured, with "+changes" when bot/ differs from it."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "bot"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "revision": revision(),
        "machine": machine(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return path


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)),
        "  ".join("-" * w for w in widths),
    ]
    lines += [
        "  ".join(
            v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=False))
        )
        for r in rows
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the service


def fake_agent_table(**env: Any) -> dict[str, Any]:
    """An [agents.NAME] table running the test suite's scriptable fake agent."""
    return {
        "command": [sys.executable, str(FAKE_AGENT), "{prompt}"],
        "env": {k: str(v) for k, v in env.items()},
    }


def service_tables(
    *,
    port: int,
    gitea_url: str,
    data_dir: Path,
    agents: dict[str, dict[str, Any]] | None = None,
    default: str = "fake",
    queue: dict[str, Any] | None = None,
    agents_options: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The config tables of a `kugetsu serve` on 127.0.0.1 talking to a fake Gitea."""
    tables: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"},
        "gitea": {
            "url": gitea_url,
            "token": TOKEN,
            "webhook_secret": SECRET,
            "bot_login": "kugetsu-bot",
        },
        "storage": {"data_dir": str(data_dir)},
        "queue": {
            "poll_interval_seconds": 30,
            "max_concurrent_agents": 3,
            "retry_backoff_seconds": [0],
            **(queue or {}),
        },
        "agents": {
            "default": default,
            "timeout_minutes": 15,
            "kill_grace_seconds": 2,
            **(agents_options or {}),
        },
    }
    for name, agent in (agents or {}).items():
        tables[f"agents.{name}"] = agent
    tables["git"] = {"author_name": "kugetsu", "author_email": "kugetsu@example.invalid"}
    return tables


def tracking_comments(gitea, number: int, repo: str = REPO) -> list[dict]:
    return [
        c
        for c in gitea.comments_on(repo, number)
        if TRACKING_MARK in c["body"] and "Pushed a follow-up" not in c["body"]
    ]


def final_state(gitea, number: int, repo: str = REPO) -> str | None:
    """done / no_changes / failed / stopped / rejected once the tracking comment says so."""
    comments = tracking_comments(gitea, number, repo)
    if not comments:
        return None
    body = comments[-1]["body"]
    for mark, state in FINAL_MARKS.items():
        if mark in body:
            return state
    return None


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.005, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


_KIB = re.compile(r"^(Vm\w+):\s+(\d+)\s+kB", re.M)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and friends of a process, in KiB, from /proc."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {m.group(1): int(m.group(2)) for m in _KIB.finditer(text)}


def read_task_rows(db_path: Path | str) -> dict[int, dict[str, Any]]:
    """Task rows straight from the service's database (read-only), by id: a SQLite file,
    or a PostgreSQL URL."""
    import sqlite3

    if isinstance(db_path, str):
        from bot.store import open_store

        store = open_store(db_path)
        try:
            return {
                r["id"]: dict(r)
                for r in store._conn().execute(
                    "SELECT id, issue, state, outcome, attempts, created_at, started_at, "
                    "finished_at, comment_id FROM tasks"
                )
            }
        finally:
            store.close()

    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return {
            r["id"]: dict(r)
            for r in conn.execute(
                "SELECT id, issue, state, outcome, attempts, created_at, started_at, finished_at, "
                "comment_id FROM tasks"
            )
        }
    finally:
        conn.close()


def read_record(path: Path) -> dict[str, dict[str, float]]:
    """The fake agent's FAKE_RECORD lines: {task id: {"start": t, "end": t}} (monotonic)."""
    out: dict[str, dict[str, float]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.setdefault(parts[1], {})[parts[0]] = float(parts[2])
    return out


def task_phases(
    *, sent: float, sent_wall: float, done: float, start: float, end: float, row: dict[str, Any]
) -> dict[str, float]:
    """Split delivery -> Done of one task at the claim, the agent's start and end, and the
    task's finish. `sent`, `done`, `start` and `end` are monotonic; the database's claim and
    finish times are wall-clock and are moved onto the monotonic clock through `sent_wall`."""
    shift = sent - sent_wall
    claimed, finished = row["started_at"] + shift, row["finished_at"] + shift
    return {
        "claimed_s": claimed - sent,
        "prepare_s": start - claimed,
        "publish_s": finished - end,
        "comment_s": done - finished,
    }


def sequential_runs(
    runs: int, gap: float, timeout: float, *, database_url: str | None = None
) -> dict[str, Any]:
    """One labelled issue after another through `kugetsu serve` and the fake Gitea.

    The agent writes one file and records when it starts and ends. Each delivery waits
    for its task's tracking comment to reach a final state before the next is sent.
    Returns the runs (task, issue, monotonic and wall send times, answer and done
    times, final state), the task rows, the agent's marks and the number of PRs.

    With `database_url` (PostgreSQL), two nodes instead of one: a receiver
    (`--role receiver`) that takes the deliveries and a worker (`--role worker`) with
    a data directory of its own, as on two machines; only the database joins them.
    """
    import tempfile

    import requests

    from tests import payloads
    from tests.fakegitea import FakeGitea

    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kugetsu-bench-", ignore_cleanup_errors=True) as d:
        tmp = Path(d)
        record = tmp / "agent-record.txt"
        with FakeGitea(tmp / "gitea", token=TOKEN) as gitea:
            gitea.create_repo(REPO, files={"README.md": "# widget\n"})
            gitea.set_permission(REPO, "alice", "write")
            port = free_port()
            agent = fake_agent_table(FAKE_MODE="write", FAKE_SECONDS=0, FAKE_RECORD=record)
            tables = service_tables(
                port=port, gitea_url=gitea.url, data_dir=tmp / "data", agents={"fake": agent}
            )
            nodes = []
            if database_url:
                tables["storage"]["database_url"] = database_url
                worker_port = free_port()
                worker_tables = {
                    **tables,
                    "server": {**tables["server"], "port": worker_port},
                    "storage": {**tables["storage"], "data_dir": str(tmp / "worker-data")},
                }
                worker_config = write_config(tmp / "worker.toml", worker_tables)
                nodes.append(Service(worker_config, worker_port, tmp, args=("--role", "worker")))
            config = write_config(tmp / "kugetsu.toml", tables)
            svc = Service(
                config, port, tmp, args=("--role", "receiver") if database_url else ()
            ).start()
            for node in nodes:
                node.start()
            session = requests.Session()
            try:
                time.sleep(1.0)  # let the first tick (at start-up) finish
                for i in range(runs):
                    n = gitea.create_issue(
                        REPO, f"Benchmark issue {i + 1}", "Add a file.", labels=["kugetsu"]
                    )
                    body, headers = payloads.label_delivery(["kugetsu"], n)
                    sent_wall, sent = time.time(), time.monotonic()
                    r = session.post(svc.url + "/webhook", data=body, headers=headers, timeout=10)
                    acked = time.monotonic()
                    if r.status_code != 202:
                        raise RuntimeError(f"delivery answered {r.status_code}: {r.text}")
                    task = str(r.json()["tasks"][0])
                    state = wait_until(
                        lambda n=n: final_state(gitea, n),
                        timeout,
                        interval=0.002,
                        what=f"task {task} to finish",
                    )
                    done = time.monotonic()
                    if state != "done":
                        raise RuntimeError(f"task {task} ended {state}:\n{svc.logs()[-3000:]}")
                    out.append(
                        {
                            "task": int(task),
                            "issue": n,
                            "sent": sent,
                            "sent_wall": sent_wall,
                            "acked": acked,
                            "done": done,
                        }
                    )
                    time.sleep(gap)
                rows = read_task_rows(database_url or tmp / "data" / "kugetsu.db")
                marks = read_record(record)
                prs = len(gitea.pulls_of(REPO))
            finally:
                session.close()
                svc.stop()
                for node in nodes:
                    node.stop()
    return {"runs": out, "rows": rows, "marks": marks, "pull_requests": prs}
