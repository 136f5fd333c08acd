"""Prune by state: the worktrees, agent homes and prompts of finished issues go; work that is
not pushed never does; `kugetsu prune --dry-run` changes nothing.

Tasks run for real (worker, fake agent, real git remote behind the fake Gitea); then
issues are closed and pull requests merged on the fake Gitea, and `kugetsu prune` runs
as the command line does.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bot import cli, prune
from bot.gitea import GiteaClient
from bot.prune import Pruner
from tests.conftest import FAKE_AGENT, REPO, TOKEN
from tests.service import write_config
from tests.test_worker import Harness

pytestmark = pytest.mark.both_modes


@pytest.fixture
def h(tmp_path, gitea):
    harness = Harness(tmp_path, gitea)
    yield harness
    harness.close()


def config_file(h: Harness, tmp_path: Path) -> Path:
    """The TOML of the harness's config, for the command line."""
    return write_config(
        tmp_path / "kugetsu.toml",
        {
            "gitea": {"url": h.gitea.url, "token": TOKEN},
            "storage": {"data_dir": str(h.config.storage.data_dir)},
            "agents": {"default": "fake"},
            "agents.fake": {"command": [sys.executable, str(FAKE_AGENT), "{prompt}"]},
        },
    )


def run_tasks(h: Harness, count: int) -> list[int]:
    issues = [h.issue(f"Task {i}") for i in range(count)]
    ids = [h.enqueue(n) for n in issues]
    h.settle(*ids)
    return issues


def commit_in_worktree(h: Harness, issue: int) -> None:
    """A commit in the issue's worktree that was never pushed (an agent's own commit, or
    the work of a task whose push kept failing)."""
    wt = h.config.storage.worktrees_dir / REPO / str(issue)
    (wt / "unpushed.txt").write_text("work nobody has seen\n")
    git = ["git", "-c", "user.name=a", "-c", "user.email=a@example.invalid"]
    subprocess.run([*git, "add", "unpushed.txt"], cwd=wt, check=True)
    subprocess.run([*git, "commit", "-qm", "local only"], cwd=wt, check=True)


def snapshot(h: Harness) -> tuple[list[str], list[tuple]]:
    """Every path under the data directory, and every row of the database but the workers'."""
    data = h.config.storage.data_dir
    paths = sorted(str(p.relative_to(data)) for p in data.rglob("*") if "kugetsu.db" not in p.name)
    db = sqlite3.connect(h.config.storage.db_path)
    rows = []
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        if table not in ("workers", "leases", "meta", "sqlite_sequence"):
            rows += [(table, *r) for r in db.execute(f"SELECT * FROM {table} ORDER BY 1")]
    db.close()
    return paths, rows


def test_prune_removes_what_finished_issues_leave_and_keeps_unpushed_work(h, tmp_path, capsys):
    merged, closed, unpushed, still_open = run_tasks(h, 4)
    prs = {pr["head"]["ref"]: n for n, pr in h.gitea.pulls_of(REPO).items()}
    h.gitea.close_pull(REPO, prs[f"kugetsu/issue-{merged}"], merged=True)
    h.gitea.close_issue(REPO, closed)
    h.gitea.close_issue(REPO, unpushed)
    commit_in_worktree(h, unpushed)
    storage = h.config.storage
    worktree = {
        n: storage.worktrees_dir / REPO / str(n) for n in (merged, closed, unpushed, still_open)
    }
    home = {n: storage.homes_dir / REPO / str(n) for n in worktree}
    assert all(p.is_dir() for p in [*worktree.values(), *home.values()])
    path = config_file(h, tmp_path)
    # `--older-than 0`: everything counts as idle long enough; the tasks' rows go too
    before = snapshot(h)
    assert (
        cli.main(["prune", "--dry-run", "--older-than", "0", "--json", "--config", str(path)]) == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert snapshot(h) == before  # a dry run changes nothing, on disk or in the database
    ref = f"{REPO}#{{}}".format
    assert sorted(shown["worktrees"]) == sorted(ref(n) for n in (merged, closed, still_open))
    assert sorted(shown["homes"]) == sorted(ref(n) for n in (merged, closed, unpushed))
    assert shown["unpushed"] == [{"issue": ref(unpushed), "commits": 1}]
    assert shown["tasks"] == 4 and shown["dry_run"] is True

    assert cli.main(["prune", "--older-than", "0", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"kept: the worktree of {ref(unpushed)} holds 1 commit(s) not pushed" in err
    assert "worktrees removed: 3" in out
    for n in (merged, closed, still_open):
        assert not worktree[n].exists(), n
    assert worktree[unpushed].is_dir() and (worktree[unpushed] / "unpushed.txt").is_file()
    for n in (merged, closed, unpushed):
        assert not home[n].exists(), n
    assert home[still_open].is_dir()  # an open issue keeps its agent's session
    assert not any(storage.prompts_dir.iterdir())
    # the work is still there for a later prune, which reports it again
    assert cli.main(["prune", "--older-than", "0", "--json", "--config", str(path)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["unpushed"] == [{"issue": ref(unpushed), "commits": 1}]
    # only the open issue is asked about again (the issue and its pull request): the
    # closed one's state is known
    assert again["lookups"] == 2


def test_the_daily_prune_waits_for_the_age_and_asks_gitea_a_bounded_number_of_times(h, monkeypatch):
    issues = run_tasks(h, 3)
    for n in issues:
        h.gitea.close_issue(REPO, n)
    assert h.worker.cleanup().homes == []  # not idle for cleanup_age_days yet
    later = h.store.clock() + 8 * 86400
    h.worker.clock = h.store.clock = h.workspace._clock = lambda: later
    monkeypatch.setattr(prune, "MAX_LOOKUPS", 2)
    asked = len(h.gitea.requests)
    report = h.worker.cleanup()
    issue_calls = [r for r in h.gitea.requests[asked:] if r[0] == "GET" and "/issues/" in r[1]]
    assert len(issue_calls) == 2 and report.lookups == 2
    assert len(report.homes) == 2 and len(report.unknown) == 1
    # the next run asks about the one left
    report = h.worker.cleanup()
    assert len(report.homes) == 1 and report.unknown == [] and report.lookups == 1
    assert not any((h.config.storage.homes_dir / REPO / str(n)).exists() for n in issues)


def test_gitea_away_keeps_every_home_and_says_so(h):
    n = run_tasks(h, 1)[0]
    h.gitea.close_issue(REPO, n)
    h.gitea.down()
    client = GiteaClient(h.gitea.url, TOKEN, retries=0, timeout=2)
    report = Pruner(h.config, h.store, client, h.workspace).run(0)
    h.gitea.up()
    assert report.homes == [] and report.unknown == [f"{REPO}#{n}"]
    assert (h.config.storage.homes_dir / REPO / str(n)).is_dir()


def test_queue_stats_and_metrics_show_the_disk_used_by_mirrors_worktrees_and_logs(
    h, tmp_path, capsys
):
    from bot.metrics import render
    from tests.test_metrics import samples, value

    run_tasks(h, 1)
    path = config_file(h, tmp_path)
    assert cli.main(["queue", "stats", "--json", "--config", str(path)]) == 0
    disk = json.loads(capsys.readouterr().out)["disk_bytes"]
    assert set(disk) == {"mirrors", "worktrees", "logs", "homes"}
    assert disk["mirrors"] > 0 and disk["worktrees"] > 0 and disk["logs"] > 0
    assert cli.main(["queue", "stats", "--config", str(path)]) == 0
    assert "disk:      mirrors " in capsys.readouterr().out
    h.worker.measure_disk()
    scraped = samples(render(h.config, h.store).decode())
    host = __import__("socket").gethostname()
    mirrors = value(scraped, "kugetsu_disk_usage_bytes", dir="mirrors", host=host)
    assert mirrors == prune.disk_usage(h.config.storage)["mirrors"] > 0
