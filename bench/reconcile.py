"""A reconcile pass over 1,000 open issues of which 10 changed: its time and Gitea calls.

    python -m bench.reconcile [--issues 1000] [--changed 10] [--runs 5]

A fake Gitea in a process of its own holds `--issues` open issues, last updated an hour
ago. kugetsu has served the repository for half an hour and its last pass is just done.
Each run then changes `--changed` issues as people would (half get a `/kugetsu start`
comment, half the `kugetsu` label, from a writer) and times one pass of the worker's
`Reconciler` (the class the worker's reconcile job runs, with the real Gitea client and a
SQLite store), counting the HTTP requests it sends. After the first run, the pass right
after it, with nothing new, is timed too: its window overlaps the last one by a minute,
so it looks again at what changed in that minute. Before each run the stored end of the
last pass is moved a minute on, as if a minute had passed with nothing new. For
comparison, the same pass without `since`: a window reaching back before every issue, as
polling every issue would.
Writes bench/results/reconcile.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from bench.common import REPO, TOKEN, summary, table, write_result
from bench.gitea_process import GiteaProcess


class CountingSession(requests.Session):
    """A requests session that counts what it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        self.sent = 0

    def request(self, *args, **kwargs):  # type: ignore[override]
        self.sent += 1
        return super().request(*args, **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--issues", type=int, default=1000)
    parser.add_argument("--changed", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not 1 <= args.changed * args.runs <= args.issues:
        parser.error("--changed times --runs must be between 1 and --issues")

    from bot.config import QueueConfig, ReconcileConfig
    from bot.core import intake
    from bot.core.reconcile import OVERLAP_SECONDS
    from bot.gitea import GiteaClient
    from bot.store import open_store
    from bot.worker.auth import AuthCache
    from bot.worker.reconcile import Reconciler
    from tests.conftest import make_config

    root = Path(tempfile.mkdtemp(prefix="kugetsu-bench-reconcile-"))
    results: dict[str, list[float]] = {"changed": [], "again": [], "without since": []}
    calls: dict[str, list[int]] = {key: [] for key in results}
    found: dict[str, list[int]] = {key: [] for key in results}
    try:
        with GiteaProcess(root / "gitea", issues=args.issues, age=3600.0) as gitea:
            config = make_config(root / "data", gitea.url)
            store = open_store(config.storage.db_path)
            session = CountingSession()
            client = GiteaClient(gitea.url, TOKEN, session=session)
            rules = intake.Rules(
                label="kugetsu",
                command="/kugetsu",
                bot_login="kugetsu-bot",
                known_agents=frozenset({"fake"}),
                default_agent="fake",
                max_attempts=3,
            )
            with store.tx() as c:
                store.note_repo(c, REPO)
            store._conn().execute(
                "UPDATE repos SET first_seen = ? WHERE repo = ?", (time.time() - 1800, REPO)
            )

            def timed(reconciler: Reconciler, key: str) -> None:
                before = session.sent
                started = time.perf_counter()
                report = reconciler.run()
                results[key].append(time.perf_counter() - started)
                calls[key].append(session.sent - before)
                assert report is not None
                found[key].append(report.changed)

            auth = AuthCache(config, client, time.time)
            reconciler = Reconciler(config, store, client, lambda: rules, auth=auth, owner="bench")
            reconciler.run()  # the last pass before the changes
            number = 0
            for _ in range(args.runs):
                # as if the last pass had ended a minute after the last changes (Gitea's
                # `since` is in whole seconds: the changes come a second later)
                time.sleep(1.1)
                store.reconciled(REPO, time.time() + OVERLAP_SECONDS)
                time.sleep(1.1)
                for i in range(args.changed):
                    number += 1
                    if i % 2:
                        gitea.act(op="label", number=number, login="alice", label="kugetsu")
                    else:
                        gitea.act(op="comment", number=number, login="alice", body="/kugetsu start")
                timed(reconciler, "changed")
                if not results["again"]:
                    # later runs would see the runs before theirs again: they are all
                    # within the minute the windows overlap by, in this compressed time
                    timed(reconciler, "again")

            # the same pass with a window that reaches back before every issue
            everything = replace(
                config,
                queue=QueueConfig(cleanup_age_days=3650.0),
                reconcile=ReconcileConfig(),
            )
            for _ in range(args.runs):
                store._conn().execute(
                    "UPDATE repos SET first_seen = 0, reconciled_to = NULL WHERE repo = ?",
                    (REPO,),
                )
                timed(
                    Reconciler(everything, store, client, lambda: rules, auth=auth, owner="bench"),
                    "without since",
                )
            store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    data = {}
    for key in results:
        times = summary(results[key], scale=1000.0, digits=1)
        data[key] = {
            "ms": times,
            "gitea_calls": calls[key],
            "issues_looked_at": found[key],
        }
        rows.append(
            [
                key,
                f"{times['p50']} ({times['min']} to {times['max']})",
                f"{min(calls[key])} to {max(calls[key])}",
                f"{min(found[key])} to {max(found[key])}",
            ]
        )
    print(f"{args.issues} open issues, {args.changed} changed before each pass, {args.runs} runs\n")
    print(table(["pass", "ms p50 (min to max)", "Gitea calls", "issues looked at"], rows))
    path = write_result(
        "reconcile",
        {"issues": args.issues, "changed": args.changed, "runs": args.runs, "passes": data},
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
