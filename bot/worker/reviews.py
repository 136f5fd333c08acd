"""A review, read in the worker after its delivery.

A review's delivery names neither the review nor its line comments, and the permission
it carries is the pull request author's (`core.events.ReviewEvent`). So intake leaves an
outbox item (`OutboxKind.REVIEW`), and here the worker finds the review among the pull
request's reviews (`core.reviews.pick`), reads its line comments, asks Gitea's
permission API about the reviewer when the review asks for something, and takes the
review in like a delivery (`bot.ingest.ingest` under `core.reviews.key`): intake decides
on it as on a comment, in one transaction, once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from bot.core import intake, names, reviews
from bot.core.events import Delivery
from bot.core.outbox import OutboxItem
from bot.core.permissions import UNSHOWN
from bot.gitea import GiteaAPI
from bot.ingest import ingest
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
    review = reviews.from_api(picked, gitea.review_comments(owner, name, number, int(picked["id"])))
    current = rules()
    allowed, permission, refusal = False, None, ""
    asks = review.command(current.command) is not None or (
        current.review_changes and review.state == reviews.REQUEST_CHANGES
    )
    if asks:
        # never the delivery's permission: it is the pull request author's
        verdict = auth.check(item.repo, review.user, UNSHOWN)
        if verdict is None:
            raise Deferred("the reviewer's permission cannot be read now")
        allowed = verdict[0]
        permission, refusal = (verdict[1], "") if allowed else (None, verdict[1])
    request = intake.ReviewRequest(
        item.repo, number, review, permission=permission, allowed=allowed, refusal=refusal
    )
    key = reviews.key(item.repo, review.id)
    result = ingest(store, Delivery(key, "review", "review"), request, current, counted=False)
    log.info(
        "review taken",
        extra={
            "repo": item.repo,
            "pr": number,
            "review": review.id,
            "reason": result.reason,
            "tasks": list(result.task_ids),
        },
    )
    return result.queued
