"""Prune: what kugetsu keeps on disk and in the database, removed by age and by state.

Run daily by the worker and at once by `kugetsu prune [--dry-run]`, with the age
`queue.cleanup_age_days` (N below):

- finished tasks older than N days are deleted from the database, with their logs and
  prompts (`Store.clear`);
- an issue's worktree not used for N days is removed (a later task makes it again from
  the pushed branch), unless a commit in it is not pushed: such a worktree is never
  removed, it is reported (in the log, and by `kugetsu prune`);
- the agent home and the prompts of an issue that is done (closed, or its pull request
  merged or closed, or gone from Gitea) are removed once it has been idle for N days. An
  open issue's home stays: it holds the agent's session that `continue` resumes.

Whether an issue is done comes from Gitea: one `GET` of the issue and, when it is open and
kugetsu opened a pull request for it, one of that pull request. Only issues idle for N
days with something on disk are asked about, at most MAX_LOOKUPS calls per run, those
asked longest ago (or never) first; what Gitea said is kept on the issue's row
(`state`, `state_checked_at`), and an issue known done is not asked again. So the calls a
run makes are bounded however many issues there are, and an open issue idle for long is
asked about once per run at most.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.config import Config, StorageConfig
from bot.gitea import GiteaAPI, GiteaError, NotFound
from bot.store import Store
from bot.workspace import GitError, Workspace, remove_tree

log = logging.getLogger(__name__)

#: Gitea calls one run makes at most to learn issues' states
MAX_LOOKUPS = 200
#: an issue in one of these states (as prune records them) is done
DONE_STATES = frozenset({"closed", "merged", "gone"})


@dataclass
class Report:
    """What a prune did, or with `dry_run` would do."""

    dry_run: bool
    tasks: int = 0
    files: int = 0
    worktrees: list[str] = field(default_factory=list)
    homes: list[str] = field(default_factory=list)
    prompts: int = 0
    #: (issue, commits not pushed or None when git could not tell): kept, and said so
    unpushed: list[tuple[str, int | None]] = field(default_factory=list)
    #: idle issues whose state Gitea could not be asked this run (budget, Gitea away)
    unknown: list[str] = field(default_factory=list)
    lookups: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "tasks": self.tasks,
            "files": self.files,
            "worktrees": self.worktrees,
            "homes": self.homes,
            "prompts": self.prompts,
            "unpushed": [{"issue": ref, "commits": n} for ref, n in self.unpushed],
            "unknown": self.unknown,
            "lookups": self.lookups,
        }


@dataclass
class _Issue:
    repo: str
    issue: int
    worktree: Path | None = None
    home: Path | None = None

    @property
    def ref(self) -> str:
        return f"{self.repo}#{self.issue}"


class Pruner:
    def __init__(
        self,
        config: Config,
        store: Store,
        gitea: GiteaAPI,
        workspace: Workspace,
        *,
        clock: Callable[[], float] = time.time,
        clear_database: bool = True,
    ):
        """`clear_database`: delete old finished tasks too (False on the nodes of a
        cluster that are not doing it today: one node a day does, `Worker.cleanup`)."""
        self.config, self.store, self.gitea, self.workspace = config, store, gitea, workspace
        self.clock = clock
        self.clear_database = clear_database

    def run(self, older_than_days: float | None = None, *, dry_run: bool = False) -> Report:
        days = self.config.queue.cleanup_age_days if older_than_days is None else older_than_days
        age = days * 86400.0
        cutoff = self.clock() - age
        report = Report(dry_run)
        if dry_run:
            report.tasks = self.store.clearable(days)
        elif self.clear_database:
            report.tasks = self.store.clear(days)
        report.files = self._task_files(cutoff, dry_run)
        active = self.store.active_tasks()
        busy = {(t.repo, t.issue) for t in active}
        lookups = [MAX_LOOKUPS]
        for item in self._candidates(busy):
            self._prune_issue(item, age, dry_run, report, lookups)
        report.lookups = MAX_LOOKUPS - lookups[0]
        log.info(
            "prune done",
            extra={
                "dry_run": dry_run,
                "tasks": report.tasks,
                "files": report.files,
                "worktrees": len(report.worktrees),
                "homes": len(report.homes),
                "unpushed": len(report.unpushed),
                "lookups": report.lookups,
            },
        )
        return report

    # ---------------------------------------------------------------- tasks' files

    def _task_files(self, cutoff: float, dry_run: bool) -> int:
        """Logs and prompts older than the cutoff whose task is gone (or, dry, would be)."""
        old: dict[int, list[Path]] = {}
        for folder, suffix in self.config.storage.task_files:
            for path in folder.glob(f"*{suffix}") if folder.is_dir() else ():
                stem = path.name[: -len(suffix)]
                if stem.isdigit() and path.stat().st_mtime < cutoff:
                    old.setdefault(int(stem), []).append(path)
        known = self.store.existing(old, cleared_before=cutoff if dry_run else None)
        files = 0
        for task_id, paths in old.items():
            if task_id not in known:
                for path in paths:
                    if not dry_run:
                        path.unlink(missing_ok=True)
                    files += 1
        return files

    # ---------------------------------------------------------------- issues on disk

    def _candidates(self, busy: set[tuple[str, int]]) -> list[_Issue]:
        """Issues with a worktree or a home on disk and no active task; those whose state
        was asked longest ago (or never) first."""
        found: dict[tuple[str, int], _Issue] = {}
        for repo, issue, path in self.workspace.worktrees():
            found.setdefault((repo, issue), _Issue(repo, issue)).worktree = path
        for repo, issue, path in _issue_dirs(self.config.storage.homes_dir):
            found.setdefault((repo, issue), _Issue(repo, issue)).home = path
        items = [item for k, item in found.items() if k not in busy]

        def asked(item: _Issue) -> float:
            row = self.store.issue_row(None, item.repo, item.issue) or {}
            return row.get("state_checked_at") or 0.0

        return sorted(items, key=asked)

    def _prune_issue(
        self, item: _Issue, age: float, dry_run: bool, report: Report, lookups: list[int]
    ) -> None:
        if self._idle_seconds(item) < age:
            return
        asked: list[tuple[str | None, str | None]] = []

        def state() -> tuple[str | None, str | None]:
            """Asked of Gitea once, and only when needed."""
            if not asked:
                asked.append(self._state(item, lookups, dry_run))
            return asked[0]

        if item.worktree is not None:
            self._worktree(item, age, state, dry_run, report)
        if item.home is None:
            return
        done = state()[0]
        if done is None:
            report.unknown.append(item.ref)
        if done not in DONE_STATES:
            return
        report.homes.append(item.ref)
        storage = self.config.storage
        prompts = [storage.prompt_path(i) for i in self.store.issue_task_ids(item.repo, item.issue)]
        present = [p for p in prompts if p.exists()]
        report.prompts += len(present)
        if not dry_run:
            remove_tree(item.home)
            _remove_empty_parents(item.home, levels=2)
            for path in present:
                path.unlink(missing_ok=True)
            log.info("agent home removed", extra={"issue": item.ref, "state": done})

    def _idle_seconds(self, item: _Issue) -> float:
        """Since the issue's last use: its worktree, its home, its newest task's change."""
        now = self.clock()
        last = 0.0
        if item.worktree is not None:
            last = max(last, now - self.workspace.idle_seconds(item.worktree))
        if item.home is not None:
            with contextlib.suppress(OSError):
                last = max(last, item.home.stat().st_mtime)
        task = self.store.latest_task(None, item.repo, item.issue)
        if task is not None:
            last = max(last, task.updated_at, task.finished_at or 0.0)
        return now - last

    def _worktree(
        self,
        item: _Issue,
        age: float,
        state: Callable[[], tuple[str | None, str | None]],
        dry_run: bool,
        report: Report,
    ) -> None:
        assert item.worktree is not None
        unpushed: int | None = 0  # not a worktree (left half made): nothing to push
        if (item.worktree / ".git").is_file():
            try:
                unpushed = self.workspace.unpushed_commits(item.worktree)
                if unpushed:
                    # Gitea keeps a pull request's head after a squash or rebase merge
                    # deleted its branch: commits it holds are pushed
                    head = state()[1]
                    if head:
                        unpushed = self.workspace.unpushed_commits(item.worktree, [head])
            except GitError as exc:
                log.warning(
                    "worktree kept: cannot tell what is pushed",
                    extra={"issue": item.ref, "error": str(exc)},
                )
                unpushed = None
        if unpushed != 0:
            report.unpushed.append((item.ref, unpushed))
            log.warning(
                "worktree kept: commits not pushed", extra={"issue": item.ref, "commits": unpushed}
            )
            return
        if dry_run:
            report.worktrees.append(item.ref)
            return
        removed, left = self.workspace.remove_if_idle(item.repo, item.issue, age)
        if removed:
            report.worktrees.append(item.ref)
        elif left != 0:
            report.unpushed.append((item.ref, left))

    def _state(
        self, item: _Issue, lookups: list[int], dry_run: bool
    ) -> tuple[str | None, str | None]:
        """(the issue's state: open, closed, merged or gone; None if not known this run,
        the head commit of its pull request if Gitea said). Asks Gitea unless the issue is
        known done; `lookups` holds the calls left."""
        row = self.store.issue_row(None, item.repo, item.issue) or {}
        if row.get("state") in DONE_STATES:
            return row["state"], None
        owner, name = item.repo.split("/", 1)
        state, head = None, None
        try:
            if lookups[0] <= 0:
                return None, None
            lookups[0] -= 1
            issue = self.gitea.get_issue(owner, name, item.issue)
            state = "closed" if issue.get("state") == "closed" else "open"
            pr = row.get("pr_number")
            if state == "open" and pr:
                if lookups[0] <= 0:
                    return None, None
                lookups[0] -= 1
                pull = self.gitea.get_pull(owner, name, int(pr))
                head = (pull.get("head") or {}).get("sha") or None
                if pull.get("merged"):
                    state = "merged"
                elif pull.get("state") == "closed":
                    state = "closed"
        except NotFound:
            state = "gone"
        except GiteaError as exc:
            log.warning("issue state unknown", extra={"issue": item.ref, "error": str(exc)})
            lookups[0] = 0  # Gitea is away or refuses: ask again next run
            return None, None
        if not dry_run:
            self.store.set_issue(
                None, item.repo, item.issue, state=state, state_checked_at=self.clock()
            )
        return state, head


def _issue_dirs(root: Path) -> Iterator[tuple[str, int, Path]]:
    """(repository, issue, path) of each `<root>/<owner>/<name>/<issue>` directory."""
    for owner in _dirs(root):
        for name in _dirs(owner):
            for issue in _dirs(name):
                if issue.name.isdigit():
                    yield f"{owner.name}/{name.name}", int(issue.name), issue


def _dirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def _remove_empty_parents(path: Path, levels: int) -> None:
    for parent in list(path.parents)[:levels]:
        try:
            parent.rmdir()
        except OSError:
            return


# ---------------------------------------------------------------------- disk use

#: the folders of the data directory whose disk use is reported
DISK_FOLDERS = ("mirrors", "worktrees", "logs", "homes")


def disk_usage(storage: StorageConfig) -> dict[str, int]:
    """Bytes on disk (allocated blocks) under each of DISK_FOLDERS; symbolic links are not
    followed, and what cannot be read counts as nothing."""
    roots = {
        "mirrors": storage.mirrors_dir,
        "worktrees": storage.worktrees_dir,
        "logs": storage.logs_dir,
        "homes": storage.homes_dir,
    }
    return {name: _tree_bytes(roots[name]) for name in DISK_FOLDERS}


def _tree_bytes(root: Path) -> int:
    total = 0
    pending = [os.fspath(root)]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
        except OSError:
            continue
    return total


def disk_record(storage: StorageConfig, now: float) -> tuple[str, str]:
    """(this host's name, its disk use as the store keeps it for /metrics)."""
    return socket.gethostname(), json.dumps({"at": now, "bytes": disk_usage(storage)})
