"""kugetsu's own time per task: delivery to "Done" in the tracking comment, minus the agent.

    python -m bench.task_overhead [--runs 20]

Runs `kugetsu serve` against a fake Gitea (real bare repositories over git's smart HTTP) with
the test suite's fake agent writing one small file and exiting at once. For each run a new
issue gets the `kugetsu` label; the bench polls the fake Gitea until the task's tracking
comment says Done. Overhead = that time minus the agent's own run (its recorded start to end):
claiming, the issue fetch, mirror fetch and worktree, starting the agent, commit, push, the
pull request and the comments. Writes bench/results/task_overhead.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.common import ROOT, sequential_runs, summary, table, task_phases, write_result

PHASES = (
    ("delivery -> claimed", "claimed"),
    ("claimed -> agent start", "prepare"),
    ("agent end -> task finished", "publish"),
    ("task finished -> comment Done", "comment"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="tasks, one new issue each")
    parser.add_argument(
        "--gap",
        type=float,
        default=0.3,
        help="pause between one task's Done and the next delivery (s)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per-run limit (s)")
    args = parser.parse_args()
    if not 1 <= args.runs <= 500:
        parser.error("--runs must be 1..500")

    result = sequential_runs(args.runs, args.gap, args.timeout)
    runs, rows, marks, prs = (
        result["runs"],
        result["rows"],
        result["marks"],
        result["pull_requests"],
    )
    for run in runs:
        run.pop("acked")

    phases: dict[str, list[float]] = {key: [] for _, key in PHASES}
    totals, agents, overheads = [], [], []
    for run in runs:
        mark = marks[str(run["task"])]
        run.update(total_s=run["done"] - run["sent"], agent_s=mark["end"] - mark["start"])
        run["overhead_s"] = run["total_s"] - run["agent_s"]
        run.update(
            task_phases(
                sent=run["sent"],
                sent_wall=run["sent_wall"],
                done=run["done"],
                start=mark["start"],
                end=mark["end"],
                row=rows[run["task"]],
            )
        )
        for key in phases:
            phases[key].append(run[key + "_s"])
        totals.append(run["total_s"])
        agents.append(run["agent_s"])
        overheads.append(run["overhead_s"])
        for key in ("sent", "sent_wall", "done"):
            run.pop(key)

    s_total, s_agent, s_over = summary(totals), summary(agents), summary(overheads)
    rows_out = [
        ["delivery -> Done (total)", s_total["p50"], s_total["p90"], s_total["max"]],
        ["agent's own run", s_agent["p50"], s_agent["p90"], s_agent["max"]],
        ["kugetsu overhead", s_over["p50"], s_over["p90"], s_over["max"]],
    ]
    phase_stats = {}
    for label, key in PHASES:
        st = summary(phases[key])
        phase_stats[key] = st
        rows_out.append(["  " + label, st["p50"], st["p90"], st["max"]])
    print(table(["per task", "p50 s", "p90 s", "max s"], rows_out))
    met = s_over["p50"] < 1.0
    print(
        f"\n{len(runs)} tasks, {prs} pull requests; target median overhead < 1 s: "
        f"{'met' if met else 'MISSED'} ({s_over['p50']} s)"
    )
    path = write_result(
        "task_overhead",
        {
            "options": vars(args),
            "total_s": s_total,
            "agent_s": s_agent,
            "overhead_s": s_over,
            "phases_s": phase_stats,
            "pull_requests": prs,
            "target_median_under_1_s": met,
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
