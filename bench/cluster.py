"""The queue on SQLite and on PostgreSQL, side by side in one run.

    python -m bench.cluster [--history 100000] [--claims 200] [--workers 8]
                            [--throughput-tasks 2000] [--runs 20]

1. Claim latency: each backend's database holds `--history` finished tasks (with their
   events) and 1,000 queued ones; `Store.claim` takes one task at a time, `--claims`
   times (the task is finished, untimed, before the next claim, so a slot is free).
2. Claims per second: `--workers` processes claim one task at a time, finish it and
   claim again, until `--throughput-tasks` queued tasks are done, global limit = the
   number of workers, timed from the first claim to the last finish; the peak of tasks
   running at once is checked against the limit.
3. Delivery to agent start across processes, poll interval 30 s: a receiver node
   (`--role receiver`) takes label deliveries, a worker node (`--role worker`, another
   data directory) runs the fake agent; only PostgreSQL joins them, and its NOTIFY wakes
   the worker. `--runs` deliveries, one after another (as bench.start_latency does for
   one node on SQLite).

PostgreSQL runs as a throwaway cluster (tests/pg.py), on this machine's loopback, with
fsync off (as the tests run it): the figures compare the engines' queue work, not disks.
Writes bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, sequential_runs, summary, table, write_result
from bot.core.tasks import Outcome, State
from bot.store import Store, open_store

BACKENDS = ("sqlite", "postgresql")


def fill(store: Store, history: int, pending: int) -> None:
    """`history` finished tasks with three events each, and `pending` queued ones."""
    now = time.time()
    batch = 10_000
    for start in range(0, history, batch):
        rows = range(start, min(history, start + batch))
        with store.tx() as c:
            c.executemany(
                "INSERT INTO tasks (repo, issue, kind, agent, requested_by, state, attempts, "
                "created_at, updated_at, finished_at, authorized, outcome) VALUES "
                "('acme/widget', ?, 'start', 'fake', 'alice', 'completed', 1, ?, ?, ?, 1, "
                "'succeeded')",
                [(100_000 + i, now - 86400, now - 86000, now - 86000) for i in rows],
            )
    with store.tx() as c:
        c.execute(
            "INSERT INTO task_events (task_id, at, event) SELECT id, created_at, 'history' "
            "FROM tasks"
        )
        c.executemany(
            "INSERT INTO tasks (repo, issue, kind, agent, requested_by, state, created_at, "
            "updated_at, authorized) VALUES ('acme/widget', ?, 'start', 'fake', 'alice', "
            "'pending', ?, ?, 1)",
            [(i, now, now) for i in range(1, pending + 1)],
        )
    if store.BACKEND == "postgresql":
        # the planner's statistics, as autovacuum gathers them within a minute of a bulk
        # change; before that, PostgreSQL may plan the claim for an empty table
        store._conn().execute("ANALYZE")


def finish(store: Store, task_id: int) -> None:
    store.transition(
        task_id, State.RUNNING, State.COMPLETED, event="done", outcome=Outcome.SUCCEEDED
    )


def claim_latency(location: str, history: int, claims: int) -> dict[str, Any]:
    store = open_store(location)
    try:
        t0 = time.monotonic()
        fill(store, history, 1000)
        filled = time.monotonic() - t0
        times = []
        for _ in range(claims):
            started = time.perf_counter()
            [task] = store.claim(3, "bench", max_claims=1)
            times.append(time.perf_counter() - started)
            finish(store, task.id)
        return {"claim_ms": summary(times, scale=1000.0), "fill_s": round(filled, 1)}
    finally:
        store.close()


def _claimer(location: str, limit: int, name: str, out: Any) -> None:
    store = open_store(location)
    spans = []
    while True:
        claimed = store.claim(limit, name, max_claims=1)
        if not claimed:
            if store.count(State.PENDING) == 0:
                break
            continue
        start = time.monotonic()
        for task in claimed:
            finish(store, task.id)
        spans.append((start, time.monotonic()))
    store.close()
    out.put(spans)


def throughput(location: str, workers: int, tasks: int) -> dict[str, Any]:
    store = open_store(location)
    fill(store, 0, tasks)
    store.close()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_claimer, args=(location, workers, f"w{n}", queue))
        for n in range(workers)
    ]
    for p in procs:
        p.start()
    spans = []
    for _ in procs:
        spans.extend(queue.get(timeout=600))
    # from the first claim to the last finish: the processes' start-up is not counted
    elapsed = max(e for _, e in spans) - min(s for s, _ in spans)
    for p in procs:
        p.join()
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in points:
        running += delta
        peak = max(peak, running)
    return {
        "claims": len(spans),
        "seconds": round(elapsed, 2),
        "claims_per_s": round(len(spans) / elapsed, 1),
        "peak_running": peak,
        "limit": workers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=100_000, help="finished tasks")
    parser.add_argument("--claims", type=int, default=200, help="claims timed per backend")
    parser.add_argument("--workers", type=int, default=8, help="claiming processes")
    parser.add_argument("--throughput-tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=20, help="deliveries across processes")
    args = parser.parse_args()

    from tests.pg import PgCluster, bin_dir

    binaries = bin_dir()
    if binaries is None:
        parser.error("PostgreSQL is not installed (apt-get install postgresql)")
    pg = PgCluster(binaries).start()
    results: dict[str, Any] = {"options": vars(args)}
    try:
        with tempfile.TemporaryDirectory(prefix="kugetsu-bench-") as d:
            where = {
                "sqlite": lambda name: str(Path(d) / f"{name}.sqlite"),
                "postgresql": lambda name: pg.url_for(name),
            }
            results["claim_latency"] = {
                b: claim_latency(where[b]("latency"), args.history, args.claims) for b in BACKENDS
            }
            results["throughput"] = {
                b: throughput(where[b]("throughput"), args.workers, args.throughput_tasks)
                for b in BACKENDS
            }
        runs = sequential_runs(args.runs, 0.3, 60.0, database_url=pg.url_for("delivery"))
    finally:
        pg.stop()
    starts = [
        runs["marks"][str(r["task"])]["start"] - r["sent"]
        for r in runs["runs"]
        if str(r["task"]) in runs["marks"]
    ]
    results["delivery_to_agent_start_s"] = summary(starts)

    lat, thr = results["claim_latency"], results["throughput"]
    print(
        table(
            [
                "backend",
                "claim p50 ms",
                "p90 ms",
                "max ms",
                f"{args.workers} workers claims/s",
                "peak running",
            ],
            [
                [
                    b,
                    lat[b]["claim_ms"]["p50"],
                    lat[b]["claim_ms"]["p90"],
                    lat[b]["claim_ms"]["max"],
                    thr[b]["claims_per_s"],
                    f"{thr[b]['peak_running']} of {thr[b]['limit']}",
                ]
                for b in BACKENDS
            ],
        )
    )
    s = results["delivery_to_agent_start_s"]
    met = s["p50"] is not None and s["p50"] < 0.5
    results["target_median_under_0_5_s"] = met
    print(
        f"\ndelivery at a receiver -> agent start on a worker (PostgreSQL, poll 30 s), "
        f"{len(starts)} runs: p50 {s['p50']} s, p90 {s['p90']} s, max {s['max']} s; "
        f"target median < 0.5 s: {'met' if met else 'MISSED'}"
    )
    path = write_result("cluster", results)
    print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
