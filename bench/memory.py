"""Memory of `kugetsu serve`: idle after start-up, and holding 1,000 queued tasks.

    python -m bench.memory [--tasks 1000]

Runs the service against a fake Gitea holding that many issues, with one agent slot and a
fake agent that sleeps for ten minutes, so the first task keeps the slot and every other task
stays queued. Reads VmRSS (resident now) and VmHWM (the most it was ever resident) from
/proc/<pid>/status of the service process (agents are separate processes and not counted):
once idle after start-up, then after one label delivery per issue has been received and the
tick has written a tracking comment for every task. Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from bench.common import (
    REPO,
    ROOT,
    TOKEN,
    Service,
    fake_agent_table,
    free_port,
    memory_kib,
    read_task_rows,
    service_tables,
    table,
    wait_until,
    write_config,
    write_result,
)
from tests import payloads
from tests.fakegitea import FakeGitea


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def service_pids(pid: int) -> list[int]:
    """The receiver and its worker process (agents run in sessions of their own)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and int(stat[3]) == pid:  # child, same process group
                pids.append(int(entry.name))
    return pids


def snapshot(pid: int, db: Path) -> dict:
    """RSS of the receiver and the worker together (the whole service)."""
    rss = peak = threads = 0
    for p in service_pids(pid):
        m = memory_kib(p)
        rss += m["VmRSS"]
        peak += m["VmHWM"]
        status = Path(f"/proc/{p}/status").read_text()
        threads += next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("Threads:")
        )
    return {
        "rss_mib": mib(rss),
        "peak_rss_mib": mib(peak),
        "threads": threads,
        "processes": len(service_pids(pid)),
        "db_mib": round(sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 2**20, 2),
    }


def send_all(url: str, deliveries: list[tuple[bytes, dict]], threads: int) -> list[int]:
    statuses: list[int] = [0] * len(deliveries)

    def worker(k: int) -> None:
        with requests.Session() as s:
            for i in range(k, len(deliveries), threads):
                body, headers = deliveries[i]
                statuses[i] = s.post(url, data=body, headers=headers, timeout=30).status_code

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="issues, one task each")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=5.0,
        help="how long to leave the service idle before the first reading",
    )
    parser.add_argument("--threads", type=int, default=4, help="threads sending deliveries")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="limit for all tracking comments to appear (s)"
    )
    args = parser.parse_args()
    if not 1 <= args.tasks <= 5000:
        parser.error("--tasks must be 1..5000")

    with tempfile.TemporaryDirectory(prefix="kugetsu-bench-", ignore_cleanup_errors=True) as d:
        tmp = Path(d)
        db = tmp / "data" / "kugetsu.db"
        with FakeGitea(tmp / "gitea", token=TOKEN) as gitea:
            gitea.create_repo(REPO, files={"README.md": "# widget\n"})
            gitea.set_permission(REPO, "alice", "write")
            numbers = [
                gitea.create_issue(REPO, f"Issue {i + 1}", "Something to do.", labels=["kugetsu"])
                for i in range(args.tasks)
            ]
            deliveries = [payloads.label_delivery(["kugetsu"], n) for n in numbers]
            port = free_port()
            agent = fake_agent_table(FAKE_MODE="write", FAKE_SECONDS=600)
            config = write_config(
                tmp / "kugetsu.toml",
                service_tables(
                    port=port,
                    gitea_url=gitea.url,
                    data_dir=tmp / "data",
                    agents={"fake": agent},
                    queue={"max_concurrent_agents": 1},
                ),
            )
            svc = Service(config, port, tmp).start()
            try:
                pid = svc.proc.pid
                time.sleep(args.idle_seconds)
                idle = snapshot(pid, db)
                print(f"idle: {idle}", flush=True)

                t0 = time.monotonic()
                statuses = send_all(svc.url + "/webhook", deliveries, args.threads)
                received = time.monotonic() - t0
                if statuses.count(202) != args.tasks:
                    raise RuntimeError(f"not every delivery was queued: {statuses[:20]}")
                after_deliveries = snapshot(pid, db)
                print(
                    f"{args.tasks} deliveries in {received:.1f} s: {after_deliveries}", flush=True
                )

                def all_commented() -> bool:
                    rows = read_task_rows(db).values()
                    return sum(1 for r in rows if r["comment_id"]) >= args.tasks

                wait_until(
                    all_commented,
                    args.timeout,
                    interval=0.5,
                    what="a tracking comment for every task",
                )
                commented = time.monotonic() - t0
                rows = list(read_task_rows(db).values())
                states = {
                    s: sum(1 for r in rows if r["state"] == s) for s in ("pending", "running")
                }
                time.sleep(2.0)
                queued = snapshot(pid, db)
                print(f"all {args.tasks} commented after {commented:.1f} s: {queued}", flush=True)
            finally:
                svc.stop()

    print()
    print(
        table(
            ["service (receiver + worker)", "RSS MiB", "peak RSS MiB", "threads", "db MiB"],
            [
                [
                    "idle after start",
                    idle["rss_mib"],
                    idle["peak_rss_mib"],
                    idle["threads"],
                    idle["db_mib"],
                ],
                [
                    f"{args.tasks} deliveries received",
                    after_deliveries["rss_mib"],
                    after_deliveries["peak_rss_mib"],
                    after_deliveries["threads"],
                    after_deliveries["db_mib"],
                ],
                [
                    f"{states['pending']} queued + {states['running']} running, all commented",
                    queued["rss_mib"],
                    queued["peak_rss_mib"],
                    queued["threads"],
                    queued["db_mib"],
                ],
            ],
        )
    )
    path = write_result(
        "memory",
        {
            "options": vars(args),
            "idle": idle,
            "after_deliveries": after_deliveries,
            "queued": queued,
            "task_states": states,
            "seconds_to_receive_deliveries": round(received, 2),
            "seconds_until_all_commented": round(commented, 2),
            "growth_mib": round(queued["rss_mib"] - idle["rss_mib"], 1),
        },
    )
    print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
