"""The reconcile pass: what Gitea's lost deliveries said, found on Gitea and taken in.

Gitea never retries a delivery. Every `reconcile.interval_minutes`, and once shortly
after every start, the worker looks at each repository kugetsu serves as `kugetsu
doctor` counts them (it has tasks in it or deliveries from it, or `gitea.repos` names
it), and at those `reconcile.repos` names besides: one listing of the issues
updated since the last pass (`since`, every page), then one timeline per issue that
changed, and for each changed pull request kugetsu works on (a review updates its pull
request) one listing of its reviews, and the line comments of each review submitted
since then that was not taken yet. So a pass costs Gitea calls in proportion to what
changed, not to how many issues there are. `core.reconcile` turns what it finds into
events, and each goes through the same intake as a delivery (`bot.ingest`), which takes
it in once; a review found goes through the same reading as a delivered one
(`worker.reviews.take_review`), under the same key, so whichever comes first takes it.

It is a duty of the whole cluster: with several processes on one database, the one that
holds the `reconcile` lease runs the pass, the others skip it. How far each repository
was looked at is in the database (`Store.reconciled`), so whichever process runs the
next pass goes on from there. A repository is marked only when its pass went through;
while Gitea is away or failing the pass ends, and the next one looks at the same window
again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bot.config import Config
from bot.core import names
from bot.core import reconcile as core
from bot.core import reviews as core_reviews
from bot.core.intake import Rules
from bot.gitea import GiteaAPI, GiteaError, NotFound, ServerError, Unreachable
from bot.ingest import IngestResult, ingest
from bot.store import Store
from bot.worker import reviews
from bot.worker.auth import AuthCache

log = logging.getLogger(__name__)

LEASE = "reconcile"
#: the lease is taken for this long and renewed before each repository
LEASE_SECONDS = 300.0


@dataclass
class PassReport:
    """What one pass did."""

    repos: int = 0
    #: issues (and pull requests) updated in the windows looked at
    changed: int = 0
    #: events found on Gitea (comments, label changes, reviews), including those already
    #: taken in (a review already taken is not read again, so not counted)
    found: int = 0
    #: of those, taken in for the first time: they were not delivered
    taken_in: int = 0
    tasks: list[int] = field(default_factory=list)
    #: repositories whose pass did not go through (their window is looked at again)
    failed: list[str] = field(default_factory=list)

    def took(self, result: IngestResult, message: str, **about: Any) -> None:
        """Count what intake made of something found, and log it when it was taken in for
        the first time (`message`: the log's constant message)."""
        if result.duplicate:
            return
        self.taken_in += 1
        self.tasks += result.task_ids
        log.info(message, extra={**about, "reason": result.reason, "tasks": list(result.task_ids)})


class GiteaAway(Exception):
    """Gitea did not answer, or answered 5xx: the pass ends."""


class Reconciler:
    def __init__(
        self,
        config: Config,
        store: Store,
        gitea: GiteaAPI,
        rules: Callable[[], Rules],
        *,
        auth: AuthCache,
        owner: str,
        clock: Callable[[], float] = time.time,
        on_queued: Callable[[], None] = lambda: None,
        stopping: Callable[[], bool] = lambda: False,
    ):
        self.config, self.store, self.gitea, self.rules = config, store, gitea, rules
        self.auth = auth
        self.owner, self.clock, self.on_queued, self.stopping = owner, clock, on_queued, stopping

    def run(self) -> PassReport | None:
        """One pass over every repository kugetsu serves. None when another process holds
        the lease (it runs the passes meanwhile)."""
        if not self.store.try_lease(LEASE, self.owner, LEASE_SECONDS):
            return None
        started = time.monotonic()
        report = PassReport()
        try:
            self._pass(report)
        finally:
            self.store.release_lease(LEASE, self.owner)
            if report.tasks or report.taken_in:
                self.on_queued()
        log.info(
            "reconcile pass done",
            extra={
                "repos": report.repos,
                "changed": report.changed,
                "found": report.found,
                "taken_in": report.taken_in,
                "tasks": report.tasks,
                "failed": report.failed,
                "ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        return report

    def _pass(self, report: PassReport) -> None:
        configured = (*self.config.gitea.repos, *self.config.reconcile.repos)
        if configured:
            with self.store.tx() as c:
                for repo in configured:
                    self.store.note_repo(c, repo)
        remembered = self.config.queue.cleanup_age_days * 86400.0
        for repo, first_seen, reconciled_to in self.store.reconcile_windows():
            if self.stopping():
                return
            if names.repo_error(repo):
                continue
            if not self.store.try_lease(LEASE, self.owner, LEASE_SECONDS):
                return  # held too long: another process has taken the duty over
            report.repos += 1
            since = core.window_start(first_seen, reconciled_to, self.clock(), remembered)
            try:
                self._repo(repo, since, report)
            except GiteaAway as exc:
                report.failed.append(repo)
                log.warning("reconcile pass ended: Gitea is away", extra={"error": str(exc)})
                return
            except GiteaError as exc:
                # this repository only (gone, renamed, no longer readable by the bot)
                report.failed.append(repo)
                log.warning("repository not reconciled", extra={"repo": repo, "error": str(exc)})

    def _repo(self, repo: str, since: float, report: PassReport) -> None:
        owner, name = names.split_repo(repo)
        label, bot_login = self.config.triggers.label, self.rules().bot_login
        window = core.rfc3339(since)
        with _away_ends_the_pass():
            issues, server_time = self.gitea.changed_issues(owner, name, window)
        # the next window starts where Gitea's clock stood as it answered (less the
        # overlap); without its Date header, where ours stood before we asked
        looked_to = server_time if server_time is not None else self.clock()
        found: list[core.Found] = []
        reviewed: list[tuple[int, list[Mapping[str, Any]]]] = []
        for issue in issues:
            number = issue.get("number")
            if not isinstance(number, int) or names.number_error(number):
                continue
            report.changed += 1
            with _away_ends_the_pass():
                try:
                    timeline = self.gitea.timeline(owner, name, number, window)
                except NotFound:
                    continue  # deleted since it was listed
            found += core.found(
                repo, issue, timeline, label=label, since=since, bot_login=bot_login
            )
            if issue.get("pull_request") and self.store.issue_for_pr(None, repo, number):
                with _away_ends_the_pass():
                    try:
                        listed = self.gitea.list_reviews(owner, name, number)
                    except NotFound:
                        continue
                new = core_reviews.submitted_since(
                    listed,
                    since=since,
                    bot_login=bot_login,
                    taken=lambda i: self.store.delivery_known(core_reviews.key(repo, i)),
                )
                if new:
                    reviewed.append((number, new))
        for item in sorted(found, key=lambda f: (f.at, f.entry_id)):
            report.found += 1
            result = ingest(self.store, item.delivery, item.event, self.rules(), counted=False)
            report.took(
                result,
                "missed event taken in",
                delivery=item.delivery.id,
                repo=repo,
                issue=item.event.number,
            )
        for number, new in reviewed:
            for review in new:
                report.found += 1
                self._review(repo, number, review, report)
        self.store.reconciled(repo, looked_to)

    def _review(
        self, repo: str, number: int, review: Mapping[str, Any], report: PassReport
    ) -> None:
        """Take in a review whose delivery never came, as a delivered one is taken."""
        with _away_ends_the_pass():
            try:
                result = reviews.take_review(
                    repo,
                    number,
                    review,
                    store=self.store,
                    gitea=self.gitea,
                    auth=self.auth,
                    rules=self.rules,
                )
            except reviews.Deferred as exc:
                # the reviewer's permission cannot be read now: look at this window again
                raise GiteaAway(str(exc)) from exc
            except (NotFound, core_reviews.BadReview) as exc:
                log.warning(
                    "review not taken in",
                    extra={
                        "repo": repo,
                        "pr": number,
                        "review": review.get("id"),
                        "error": str(exc),
                    },
                )
                return
        report.took(result, "missed review taken in", repo=repo, pr=number, review=review.get("id"))


@contextmanager
def _away_ends_the_pass() -> Iterator[None]:
    """Gitea's absence (no answer, 5xx) ends the whole pass, as GiteaAway."""
    try:
        yield
    except (ServerError, Unreachable) as exc:
        raise GiteaAway(str(exc)) from exc
