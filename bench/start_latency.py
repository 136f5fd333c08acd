"""Delivery to agent start: how long after a label delivery the agent process is running.

    python -m bench.start_latency [--runs 20]

Runs `kugetsu serve` (poll interval 30 s, so only the wake-up on delivery can start work
quickly) against a fake Gitea, with the test suite's fake agent, which appends
"start <task> <monotonic time>" to a file as its first act. For each run a new issue gets the
`kugetsu` label; the time just before the delivery is sent is compared with the agent's
recorded start (CLOCK_MONOTONIC is system-wide on Linux, so the two processes' clocks agree).
Each task is left to finish before the next delivery. Writes bench/results/start_latency.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.common import (REPO, ROOT, TOKEN, Service, fake_agent_table, final_state,  # noqa: E402
                          free_port, read_record, read_task_rows, service_tables, summary,
                          table, wait_until, write_config, write_result)
from tests import payloads  # noqa: E402
from tests.fakegitea import FakeGitea  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="deliveries, one new issue each")
    parser.add_argument("--gap", type=float, default=0.3,
                        help="pause after a task has finished before the next delivery (s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-run limit (s)")
    args = parser.parse_args()
    if not 1 <= args.runs <= 500:
        parser.error("--runs must be 1..500")

    runs = []
    with tempfile.TemporaryDirectory(prefix="kugetsu-bench-", ignore_cleanup_errors=True) as d:
        tmp = Path(d)
        record = tmp / "agent-record.txt"
        with FakeGitea(tmp / "gitea", token=TOKEN) as gitea:
            gitea.create_repo(REPO, files={"README.md": "# widget\n"})
            gitea.set_permission(REPO, "alice", "write")
            port = free_port()
            agent = fake_agent_table(FAKE_MODE="write", FAKE_SECONDS=0, FAKE_RECORD=record)
            config = write_config(tmp / "kugetsu.toml", service_tables(
                port=port, gitea_url=gitea.url, data_dir=tmp / "data", agents={"fake": agent}))
            svc = Service(config, port, tmp).start()
            session = requests.Session()
            try:
                time.sleep(1.0)  # let the first tick (at start-up) finish
                for i in range(args.runs):
                    n = gitea.create_issue(REPO, f"Benchmark issue {i + 1}", "Add a file.",
                                           labels=["kugetsu"])
                    body, headers = payloads.label_delivery(["kugetsu"], n)
                    sent_wall = time.time()
                    sent = time.monotonic()
                    r = session.post(svc.url + "/webhook", data=body, headers=headers,
                                     timeout=10)
                    acked = time.monotonic()
                    if r.status_code != 202:
                        raise RuntimeError(f"delivery answered {r.status_code}: {r.text}")
                    task = str(r.json()["tasks"][0])
                    started = wait_until(lambda: read_record(record).get(task, {}).get("start"),
                                         args.timeout, what=f"task {task}'s agent to start")
                    state = wait_until(lambda: final_state(gitea, n), args.timeout,
                                       what=f"task {task} to finish")
                    runs.append({"task": int(task), "issue": n, "state": state,
                                 "ack_s": acked - sent, "start_s": started - sent,
                                 "sent_wall": sent_wall})
                    time.sleep(args.gap)
                rows = read_task_rows(tmp / "data" / "kugetsu.db")
            finally:
                session.close()
                svc.stop()

    for run in runs:
        row = rows.get(run["task"], {})
        # wall clock, same machine: delivery sent -> task claimed by the tick
        if row.get("started_at"):
            run["claimed_s"] = row["started_at"] - run.pop("sent_wall")
        else:
            run.pop("sent_wall")
    starts = [r["start_s"] for r in runs]
    claims = [r["claimed_s"] for r in runs if "claimed_s" in r]
    acks = [r["ack_s"] for r in runs]
    s_start, s_claim, s_ack = summary(starts), summary(claims), summary(acks)
    print(table(["delivery ->", "p50 s", "p90 s", "max s", "min s"], [
        ["202 answer", s_ack["p50"], s_ack["p90"], s_ack["max"], s_ack["min"]],
        ["task claimed", s_claim["p50"], s_claim["p90"], s_claim["max"], s_claim["min"]],
        ["agent started", s_start["p50"], s_start["p90"], s_start["max"], s_start["min"]],
    ]))
    met = s_start["p50"] < 0.5
    print(f"\n{len(runs)} runs; target median delivery -> agent start < 0.5 s: "
          f"{'met' if met else 'MISSED'} ({s_start['p50']} s)")
    print("per run (s): " + " ".join(f"{v:.3f}" for v in starts))
    path = write_result("start_latency", {
        "options": vars(args), "delivery_to_agent_start_s": s_start,
        "delivery_to_claim_s": s_claim, "delivery_to_ack_s": s_ack,
        "target_median_under_0_5_s": met,
        "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                 for r in runs]})
    print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
