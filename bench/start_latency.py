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
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.common import ROOT, sequential_runs, summary, table, write_result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="deliveries, one new issue each")
    parser.add_argument(
        "--gap",
        type=float,
        default=0.3,
        help="pause after a task has finished before the next delivery (s)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per-run limit (s)")
    args = parser.parse_args()
    if not 1 <= args.runs <= 500:
        parser.error("--runs must be 1..500")

    result = sequential_runs(args.runs, args.gap, args.timeout)
    rows, marks = result["rows"], result["marks"]
    runs = []
    for r in result["runs"]:
        runs.append(
            {
                "task": r["task"],
                "issue": r["issue"],
                "ack_s": r["acked"] - r["sent"],
                "start_s": marks[str(r["task"])]["start"] - r["sent"],
                "sent_wall": r["sent_wall"],
            }
        )

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
    print(
        table(
            ["delivery ->", "p50 s", "p90 s", "max s", "min s"],
            [
                ["202 answer", s_ack["p50"], s_ack["p90"], s_ack["max"], s_ack["min"]],
                ["task claimed", s_claim["p50"], s_claim["p90"], s_claim["max"], s_claim["min"]],
                ["agent started", s_start["p50"], s_start["p90"], s_start["max"], s_start["min"]],
            ],
        )
    )
    met = s_start["p50"] < 0.5
    print(
        f"\n{len(runs)} runs; target median delivery -> agent start < 0.5 s: "
        f"{'met' if met else 'MISSED'} ({s_start['p50']} s)"
    )
    print("per run (s): " + " ".join(f"{v:.3f}" for v in starts))
    path = write_result(
        "start_latency",
        {
            "options": vars(args),
            "delivery_to_agent_start_s": s_start,
            "delivery_to_claim_s": s_claim,
            "delivery_to_ack_s": s_ack,
            "target_median_under_0_5_s": met,
            "runs": [
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                for r in runs
            ],
        },
    )
    print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
