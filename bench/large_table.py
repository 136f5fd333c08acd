"""Webhook acknowledgement with 100,000 finished tasks in the database, beside an empty one.

    python -m bench.large_table [--tasks 100000] [--rate 50] [--seconds 30]

Starts two `kugetsu serve` processes side by side, the same configuration and the same fake
Gitea (in a process of its own) behind both. One starts on an empty database, the other on
one that already holds `--tasks` finished tasks, as months of use leave them: each with its
events, two sent replies, four deliveries and a tracking comment, on issues other than the
ones the run is about, all newer than the cleanup age. The same signed deliveries then go to
both (bench/webhook_latency.py's default mix, side by side: each slot's two requests half a
slot apart, in random order), while fake agents work for 120 s each in three slots and the
rest of the tasks wait, as in that benchmark's default.

Prints each service's acknowledgement latency, the ratio of their p99s (the target: 1.5x at
most), and the CPU time of each service's worker and receiver per minute. Then times
`kugetsu queue list` on the large database (the default page, and `--all`, as text and as
JSON), with the command's peak memory. Writes bench/results/large_table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    REPO,
    ROOT,
    Service,
    fake_agent_table,
    free_port,
    memory_kib,
    read_task_rows,
    service_tables,
    table,
    write_config,
    write_result,
)
from bench.gitea_process import GiteaProcess
from bench.memory import service_pids
from bench.webhook_latency import (
    build_deliveries,
    cpu_seconds,
    measure,
    plain_deliveries,
)

PROMPT = "Please fix the widget: it breaks on Mondays when the locale is set. " * 3
COMMENT = (
    "<!-- kugetsu:task={id} -->\n✅ **Done** by `opencode` (attempt 1 of 3) in 4m 12s: "
    "pull request #{pr}, 3 files changed.\n\n<details><summary>Summary</summary>\n\n"
    + "Changed the widget's date handling so that it reads the locale once. " * 6
    + "\n</details>\n\nTokens: 48,211 in, 3,907 out; cost $0.21."
)
SUMMARY = "Changed the widget's date handling so that it reads the locale once. " * 5
USAGE = json.dumps({"input_tokens": 48211, "output_tokens": 3907, "cost_usd": 0.21})


def create_database(path: Path, workdir: Path) -> None:
    """The schema of the kugetsu that will be measured: made by the `bot` package that
    `kugetsu serve` imports (a separate virtualenv may hold another version)."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from bot.store import open_store; open_store(sys.argv[1]).close()",
            str(path),
        ],
        cwd=workdir,
        check=True,
        env={**os.environ, "PYTHONPATH": ""},
    )


def fill(path: Path, tasks: int, now: float) -> None:
    """`tasks` finished tasks written over the last six days, with their rows elsewhere."""
    conn = sqlite3.connect(path, isolation_level=None)
    span = 6 * 86400.0
    states = (
        ("completed", "succeeded"),
        ("completed", "succeeded"),
        ("completed", "no_changes"),
        ("failed", "agent_failed"),
        ("cancelled", "cancelled"),
        ("rejected", None),
    )
    conn.execute("BEGIN")
    for start in range(1, tasks + 1, 10000):
        ids = range(start, min(tasks, start + 9999) + 1)
        rows = []
        for i in ids:
            t = now - span + span * i / (tasks + 1)
            state, outcome = states[i % len(states)]
            issue = 1000 + i // 3
            rows.append(
                (
                    i,
                    REPO,
                    issue,
                    "start" if i % 3 else "continue",
                    PROMPT,
                    "opencode",
                    "alice",
                    state,
                    1,
                    3,
                    t - 300,
                    t,
                    t - 250,
                    t,
                    f"vm-{i % 7}",
                    f"kugetsu/issue-{issue}",
                    f"/data/worktrees/{issue}",
                    f"ses_{i:08x}",
                    100_000 + i,
                    200_000 + i,
                    outcome,
                    1,
                    7,
                    7,
                    COMMENT.format(id=i, pr=100_000 + i),
                    USAGE,
                    SUMMARY,
                    3,
                    '["opencode"]',
                )
            )
        conn.executemany(
            "INSERT INTO tasks (id, repo, issue, kind, prompt, agent, requested_by, state, "
            "attempts, max_attempts, created_at, updated_at, started_at, finished_at, "
            "worker_id, branch, worktree, session_id, pr_number, comment_id, outcome, "
            "authorized, version, comment_version, comment_body, usage, summary, "
            "files_changed, agents_tried) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "INSERT INTO task_events (task_id, at, from_state, to_state, event, detail) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (r[0], r[11], a, b, e, d)
                for r in rows
                for a, b, e, d in (
                    (None, "pending", "queued", "start by alice"),
                    (None, None, "authorized", "write"),
                    ("pending", "running", "claimed", r[14]),
                    ("running", r[7], r[20] or "rejected", None),
                )
            ],
        )
        conn.executemany(
            "INSERT INTO outbox (repo, issue, kind, target, body, requested_by, created_at, "
            "done_at) VALUES (?, ?, ?, ?, ?, 'alice', ?, ?)",
            [
                (REPO, r[2], kind, r[19] + k, body, r[10], r[10] + 1)
                for r in rows
                for k, (kind, body) in enumerate(
                    (("reaction", ""), ("comment", "Queued behind 2 tasks."))
                )
            ],
        )
        conn.executemany(
            "INSERT INTO deliveries (id, event, received_at, result) VALUES (?, ?, ?, ?)",
            [
                (f"{r[0]:08d}-{k}", "issue_comment", r[10] - k, "no command in comment")
                for r in rows
                for k in range(4)
            ],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO issues (repo, number, labels, pr_number, branch, session_id, "
            "agent, updated_at) VALUES (?, ?, '[\"kugetsu\"]', ?, ?, ?, 'opencode', ?)",
            [(REPO, r[2], r[18], r[15], r[17], r[11]) for r in rows],
        )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def worker_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) for p in service_pids(pid) if p != pid)


def timed_cli(config: Path, workdir: Path, *args: str) -> dict:
    """One `kugetsu` command: wall time, peak resident memory and bytes written.

    The peak is VmHWM read from /proc while the command runs (the last reading before it
    exits): the kernel's own figure for a child, from wait4, also counts the memory of the
    forked copy of this process before it executed the command."""
    out = workdir / "cli-out"
    peak = 0
    with out.open("wb") as fh:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bot", *args, "--config", str(config)],
            cwd=workdir,
            stdout=fh,
            stderr=subprocess.DEVNULL,
        )
        while proc.poll() is None:
            try:
                if b"\0bot\0" in Path(f"/proc/{proc.pid}/cmdline").read_bytes():  # executed
                    peak = memory_kib(proc.pid).get("VmHWM", peak)
            except OSError:
                pass
            time.sleep(0.005)
        wall = time.monotonic() - start
    return {
        "args": list(args),
        "exit": proc.returncode,
        "seconds": round(wall, 2),
        "peak_rss_mib": round(peak / 1024, 1),
        "output_mb": round(out.stat().st_size / 1e6, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", type=int, default=100_000, help="finished tasks in the second service's database"
    )
    parser.add_argument("--rate", type=float, default=50.0, help="deliveries per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the measured run")
    parser.add_argument("--threads", type=int, default=8, help="sending threads per service")
    parser.add_argument(
        "--issues", type=int, default=500, help="distinct issues the deliveries are about"
    )
    parser.add_argument(
        "--warmup", type=int, default=100, help="deliveries sent first and not measured"
    )
    parser.add_argument(
        "--agent-seconds",
        type=float,
        default=120.0,
        help="how long each queued task's fake agent works",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not (1 <= args.rate * args.seconds <= 20000) or args.tasks < 1:
        parser.error("rate x seconds must be between 1 and 20000, and --tasks at least 1")

    rng = random.Random(args.seed)
    work = build_deliveries(round(args.rate * args.seconds), args.issues, rng)
    warm = plain_deliveries(args.warmup, args.issues, rng)
    names = ("empty", f"{args.tasks:,} tasks")
    print(
        f"{len(work)} deliveries at {args.rate:g}/s to each of two services: one on an "
        f"empty database, one on {args.tasks:,} finished tasks",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="kugetsu-bench-", ignore_cleanup_errors=True) as d:
        tmp = Path(d)
        configs = []
        for k in range(2):
            (tmp / f"data-{k}").mkdir()
            create_database(tmp / f"data-{k}" / "kugetsu.db", tmp)
        started = time.monotonic()
        fill(tmp / "data-1" / "kugetsu.db", args.tasks, time.time())
        db_mib = sum(p.stat().st_size for p in (tmp / "data-1").glob("kugetsu.db*")) / 2**20
        print(f"filled in {time.monotonic() - started:.1f} s ({db_mib:.0f} MiB)", flush=True)
        with GiteaProcess(tmp / "gitea", issues=args.issues) as gitea:
            services = []
            try:
                for k in range(2):
                    port = free_port()
                    agent = fake_agent_table(FAKE_MODE="nochange", FAKE_SECONDS=args.agent_seconds)
                    configs.append(
                        write_config(
                            tmp / f"kugetsu-{k}.toml",
                            service_tables(
                                port=port,
                                gitea_url=gitea.url,
                                data_dir=tmp / f"data-{k}",
                                agents={"fake": agent},
                            ),
                        )
                    )
                    # start-up migrates the schema (on the large database: builds new indexes)
                    services.append(Service(configs[-1], port, tmp).start(timeout=300))
                time.sleep(2.0)
                pids = [svc.proc.pid for svc in services]
                before = [(worker_cpu(p), cpu_seconds(p)) for p in pids]
                wall = time.monotonic()
                results = measure(
                    [(svc.url + "/webhook", svc.proc.pid) for svc in services], args, work, warm
                )
                wall = time.monotonic() - wall
                after = [(worker_cpu(p), cpu_seconds(p)) for p in pids]
                for k, (result, (w0, r0), (w1, r1)) in enumerate(
                    zip(results, before, after, strict=False)
                ):
                    result["worker_cpu_s_per_min"] = round((w1 - w0) * 60 / wall, 2)
                    result["receiver_cpu_s_per_min"] = round((r1 - r0) * 60 / wall, 2)
                    rows = read_task_rows(tmp / f"data-{k}" / "kugetsu.db")
                    result["tasks_in_table"] = len(rows)
            finally:
                for svc in services:
                    svc.stop()
        # (before `--all` existed, `queue list` printed every task and `--all` exits 2)
        cli = [
            timed_cli(configs[1], tmp, "queue", "list", *extra)
            for extra in ((), ("--json",), ("--all",), ("--all", "--json"))
        ]

    ratio = round(results[1]["latency_ms"]["p99"] / results[0]["latency_ms"]["p99"], 2)
    rows = [
        [
            name,
            r["latency_ms"]["p50"],
            r["latency_ms"]["p90"],
            r["latency_ms"]["p99"],
            r["latency_ms"]["max"],
            r["worker_cpu_s_per_min"],
            r["receiver_cpu_s_per_min"],
            r["tasks_in_table"],
            " ".join(f"{k}:{v}" for k, v in sorted(r["status_counts"].items())),
        ]
        for name, r in zip(names, results, strict=False)
    ]
    print()
    print(
        table(
            [
                "database",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "worker cpu s/min",
                "receiver cpu s/min",
                "tasks",
                "status",
            ],
            rows,
        )
    )
    print(
        f"\nratio of p99, {names[1]} over empty (side by side): {ratio}x; target 1.5x: "
        f"{'met' if ratio <= 1.5 else 'MISSED'}"
    )
    print()
    print(
        table(
            ["command", "exit", "seconds", "peak RSS MiB", "output MB"],
            [
                [" ".join(c["args"]), c["exit"], c["seconds"], c["peak_rss_mib"], c["output_mb"]]
                for c in cli
            ],
        )
    )
    path = write_result(
        "large_table",
        {
            "options": vars(args),
            "runs": dict(zip(names, results, strict=False)),
            "p99_ratio": ratio,
            "target_met": ratio <= 1.5,
            "queue_list": cli,
        },
    )
    print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
