"""A review, read in the worker after its delivery.

A review's delivery names neither the review nor its line comments, and the permission
it carries is the pull request author's (`core.events.ReviewEvent`). So intake leaves an
outbox item (`OutboxKind.REVIEW`), and here the worker finds the review among the pull
request's reviews (`core.reviews.pick`), reads its line comments, asks Gitea's
permission API about the reviewer when the review asks for something, and takes the
review in like a delivery (`bot.ingest.ingest` under `core.reviews.key`): intake decides
on it as on a comment, in one transaction, once. A reconcile pass takes in the reviews
whose delivery never came through the same `take_review`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from bot.core import intake, names, reviews
from bot.core.events import Delivery
from bot.core.outbox import OutboxItem
from bot.core.permissions import UNSHOWN
from bot.gitea import GiteaAPI
from bot.ingest import IngestResult, ingest
from bot.store import Store
from bot.worker.auth import AuthCache

log = logging.getLogger(__name__)


class Deferred(Exception):
    """Gitea cannot say now whether the reviewer may ask for work: try again later."""


def take(
    item: OutboxItem,
    *,
    store: Store,
    gitea: GiteaAPI,
    auth: AuthCache,
    rules: Callable[[], intake.Rules],
) -> bool:
    """Read the review an item stands for and act on it. True if it was taken (a task or
    a reply may have been queued); False if there was no review left to take."""
    asked = json.loads(item.body)
    state, body = str(asked.get("state", "")), str(asked.get("body", ""))
    owner, name = names.split_repo(item.repo)
    number = item.target
    assert number is not None  # intake sets the pull request reviewed
    picked = reviews.pick(
        gitea.list_reviews(owner, name, number),
        sender=item.requested_by or "",
        state=state,
        body=body,
        taken=lambda review_id: store.delivery_known(reviews.key(item.repo, review_id)),
        since=item.created_at - reviews.PICK_WINDOW_SECONDS,
    )
    if picked is None:
        log.info(
            "no review left to take",
            extra={"repo": item.repo, "pr": number, "user": item.requested_by},
        )
        return False
    return take_review(
        item.repo, number, picked, store=store, gitea=gitea, auth=auth, rules=rules
    ).queued


def take_review(
    repo: str,
    number: int,
    listed: Mapping[str, Any],
    *,
    store: Store,
    gitea: GiteaAPI,
    auth: AuthCache,
    rules: Callable[[], intake.Rules],
) -> IngestResult:
    """Take in one review of pull request `number`, as its reviews listing gave it: read
    its line comments (when it has any), ask about the reviewer when the review asks for
    something, and let intake decide under `core.reviews.key`, once, whoever comes first
    (a delivery's reading of it, or a reconcile pass that found it)."""
    owner, name = names.split_repo(repo)
    review_id = int(listed["id"])
    has_comments = listed.get("comments_count") != 0  # absent: ask all the same
    comments = gitea.review_comments(owner, name, number, review_id) if has_comments else []
    review = reviews.from_api(listed, comments)
    current = rules()
    allowed, permission, refusal = False, None, ""
    asks = review.command(current.command) is not None or (
        current.review_changes and review.state == reviews.REQUEST_CHANGES
    )
    if asks:
        # never the delivery's permission: it is the pull request author's
        verdict = auth.check(repo, review.user, UNSHOWN)
        if verdict is None:
            raise Deferred("the reviewer's permission cannot be read now")
        allowed = verdict[0]
        permission, refusal = (verdict[1], "") if allowed else (None, verdict[1])
    request = intake.ReviewRequest(
        repo, number, review, permission=permission, allowed=allowed, refusal=refusal
    )
    key = reviews.key(repo, review.id)
    result = ingest(store, Delivery(key, "review", "review"), request, current, counted=False)
    log.info(
        "review taken",
        extra={
            "repo": repo,
            "pr": number,
            "review": review.id,
            "duplicate": result.duplicate,
            "reason": result.reason,
            "tasks": list(result.task_ids),
        },
    )
    return result
