"""GET /metrics at 100,000 tasks, and webhook acknowledgement while it is scraped every second.

    python -m bench.metrics [--tasks 100000] [--scrapes 300] [--rate 50] [--seconds 30]
                            [--repo-label]

1. Scrape time. A database holding `--tasks` finished tasks as months of use leave them
   (bench/large_table.py's fill: events, outbox rows, deliveries, issues), and the counters
   those tasks would have added. `kugetsu serve` runs on it with `[metrics] enabled`;
   `--scrapes` scrapes are sent one after another over one connection and timed at the
   client (request to last byte). The same scrape is also timed in this process
   (`bot.metrics.render` on the same database), without HTTP.
2. Webhook acknowledgement while scraped. Two `kugetsu serve` side by side, each on its own
   copy of that database, the same configuration, the same fake Gitea behind both; the same
   signed deliveries go to both (bench/webhook_latency.py's default mix, side by side) while
   fake agents work, and one of them is scraped once a second for the whole run. Prints
   both p99s and their ratio (scraped over not scraped).

Writes bench/results/metrics.json.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    Service,
    fake_agent_table,
    free_port,
    service_tables,
    summary,
    table,
    write_config,
    write_result,
)
from bench.gitea_process import GiteaProcess
from bench.large_table import create_database, fill
from bench.webhook_latency import build_deliveries, measure, plain_deliveries
from bot.config import Config, MetricsConfig
from bot.core import metrics
from bot.metrics import render
from bot.store import open_store


def add_counters(path: Path, tasks: int) -> None:
    """The counters `tasks` finished tasks would have added (a few dozen rows)."""
    store = open_store(path)
    counts: metrics.Counts = {}
    rng = random.Random(7)
    outcomes = ("succeeded", "succeeded", "no_changes", "agent_failed", "cancelled", "rejected")
    for i in range(tasks):
        metrics.add(
            counts,
            metrics.key(
                metrics.Counter.TASKS_FINISHED,
                outcome=outcomes[i % len(outcomes)],
                agent="opencode",
                repo="acme/widget",
            ),
        )
        metrics.observe(counts, metrics.Counter.TASK_DURATION, rng.uniform(20, 900))
        metrics.observe(counts, metrics.Counter.QUEUE_WAIT, rng.uniform(0, 120))
        metrics.add(counts, metrics.key(metrics.Counter.DELIVERIES, result="queued"))
        metrics.add(counts, metrics.gitea_request("PATCH", 200), 6)
    store.add_counts(None, counts)
    store.close()


def scrape_times(url: str, count: int) -> list[float]:
    session = requests.Session()
    for _ in range(5):
        session.get(url, timeout=10).raise_for_status()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        r = session.get(url, timeout=10)
        r.raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
    return times


def render_times(db: Path, config: Config, count: int) -> tuple[list[float], int]:
    store = open_store(db)
    try:
        render(config, store)
        times, size = [], 0
        for _ in range(count):
            start = time.perf_counter()
            size = len(render(config, store))
            times.append((time.perf_counter() - start) * 1000)
        return times, size
    finally:
        store.close()


class Scraper(threading.Thread):
    """GET /metrics once a second until stopped."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.times = url, []
        self.stopped = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        while not self.stopped.wait(1.0):
            start = time.perf_counter()
            session.get(self.url, timeout=10).raise_for_status()
            self.times.append((time.perf_counter() - start) * 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0, help="deliveries per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--issues", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--agent-seconds", type=float, default=120.0)
    parser.add_argument("--repo-label", action="store_true", help="[metrics] repo_label = true")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not (1 <= args.rate * args.seconds <= 20000) or args.tasks < 1:
        parser.error("rate x seconds must be between 1 and 20000, and --tasks at least 1")
    metrics_table = {"enabled": True, "repo_label": args.repo_label}
    config = Config(metrics=MetricsConfig(enabled=True, repo_label=args.repo_label))

    rng = random.Random(args.seed)
    work = build_deliveries(round(args.rate * args.seconds), args.issues, rng)
    warm = plain_deliveries(args.warmup, args.issues, rng)
    with tempfile.TemporaryDirectory(prefix="kugetsu-bench-", ignore_cleanup_errors=True) as d:
        tmp = Path(d)
        (tmp / "data-0").mkdir()
        db = tmp / "data-0" / "kugetsu.db"
        create_database(db, tmp)
        fill(db, args.tasks, time.time())
        add_counters(db, args.tasks)
        (tmp / "data-1").mkdir()
        with sqlite3.connect(db) as src, sqlite3.connect(tmp / "data-1" / "kugetsu.db") as dst:
            src.backup(dst)
        print(f"{args.tasks:,} finished tasks in each database", flush=True)
        in_process, size = render_times(db, config, min(args.scrapes, 100))

        with GiteaProcess(tmp / "gitea", issues=args.issues) as gitea:
            services = []
            try:
                for k in range(2):
                    port = free_port()
                    agent = fake_agent_table(FAKE_MODE="nochange", FAKE_SECONDS=args.agent_seconds)
                    tables = service_tables(
                        port=port,
                        gitea_url=gitea.url,
                        data_dir=tmp / f"data-{k}",
                        agents={"fake": agent},
                    )
                    tables["metrics"] = metrics_table
                    path = write_config(tmp / f"kugetsu-{k}.toml", tables)
                    services.append(Service(path, port, tmp).start(timeout=300))
                time.sleep(2.0)
                # 1. scrape time, nothing else sent
                over_http = scrape_times(services[0].url + "/metrics", args.scrapes)
                # 2. deliveries to both; the first is scraped every second
                scraper = Scraper(services[0].url + "/metrics")
                scraper.start()
                try:
                    results = measure(
                        [(svc.url + "/webhook", svc.proc.pid) for svc in services],
                        args,
                        work,
                        warm,
                    )
                finally:
                    scraper.stopped.set()
                    scraper.join()
            finally:
                for svc in services:
                    svc.stop()

    scrape = {
        "http_ms": summary(over_http),
        "in_process_ms": summary(in_process),
        "during_load_ms": summary(scraper.times),
        "bytes": size,
    }
    ratio = round(results[0]["latency_ms"]["p99"] / results[1]["latency_ms"]["p99"], 2)
    print()
    print(
        table(
            ["scrape", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"],
            [
                [name, s["count"], s["p50"], s["p90"], s["p99"], s["max"]]
                for name, s in (
                    ("GET /metrics, alone", scrape["http_ms"]),
                    ("render() in process", scrape["in_process_ms"]),
                    ("GET /metrics during the load", scrape["during_load_ms"]),
                )
            ],
        )
    )
    print(f"\n{size} bytes per scrape; target: under 50 ms at {args.tasks:,} tasks")
    print()
    print(
        table(
            ["service", "p50 ms", "p90 ms", "p99 ms", "max ms", "status"],
            [
                [
                    name,
                    r["latency_ms"]["p50"],
                    r["latency_ms"]["p90"],
                    r["latency_ms"]["p99"],
                    r["latency_ms"]["max"],
                    " ".join(f"{k}:{v}" for k, v in sorted(r["status_counts"].items())),
                ]
                for name, r in zip(("scraped every second", "not scraped"), results, strict=False)
            ],
        )
    )
    print(f"\nratio of p99, scraped over not scraped (side by side): {ratio}x")
    path = write_result(
        "metrics",
        {
            "options": vars(args),
            "scrape": scrape,
            "webhook": {"scraped": results[0], "not_scraped": results[1]},
            "p99_ratio": ratio,
        },
    )
    print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
