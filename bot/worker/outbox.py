"""The outbox pass of the tick: replies, reactions, stops and retries, one handler per kind.

Notifications (kind NOTIFY) have their handler here too, but are sent by a lane of their
own (bot/worker/notify.py), in order per endpoint and never by the tick: an endpoint that
is slow or down must not hold the work on Gitea.

Intake leaves `core.outbox.OutboxItem` rows; each tick sends the ones due, oldest first.
`HANDLERS` maps each `OutboxKind` to its handler: adding a kind is one entry here (and
its member in `core.outbox`). An item whose requester needs a permission is checked
first; a refused action (stop, retry) answers why, a refused reply says nothing.
While Gitea is away or failing the item is tried again later (doubling waits), and the
pass stops; an item Gitea refuses for good (deleted comment, locked issue) is done with
the error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from bot import agents
from bot.config import Config
from bot.core import intake, render
from bot.core.outbox import OutboxItem, OutboxKind
from bot.core.render import QueueLoad
from bot.core.tasks import State, doubling
from bot.gitea import GiteaError, ServerError, Unreachable
from bot.ingest import rules_for
from bot.isolate import on_its_own
from bot.notify import Sender
from bot.publisher import Publisher
from bot.store import Store
from bot.worker import reviews
from bot.worker.auth import AuthCache

log = logging.getLogger(__name__)

#: items handled per pass at most (a backlog makes the tick go round again at once)
OUTBOX_BUDGET = 30
#: an item whose permission check or refusal could not be made waits this long
RECHECK_SECONDS = 30.0
#: an item Gitea did not take (5xx, no answer) waits this long, doubling, up to the most
RETRY_FIRST_SECONDS = 5.0
RETRY_MOST_SECONDS = 600.0


class Outbox:
    """Sends the outbox's items through the publisher; `on_change` wakes the tick after
    a stop, a retry or a review changed the queue. `rules`: intake's rules, for the
    reviews it reads."""

    def __init__(
        self,
        config: Config,
        store: Store,
        publisher: Publisher,
        auth: AuthCache,
        on_change: Callable[[], None],
        sender: Sender | None = None,
        rules: Callable[[], intake.Rules] | None = None,
    ):
        self.config, self.store, self.publisher, self.auth = config, store, publisher, auth
        self.on_change = on_change
        self.sender = sender if sender is not None else Sender(config)
        if rules is None:
            # from the config alone: the worker passes its own, with the login it learned
            fixed = rules_for(
                config, config.gitea.bot_login or None, agents.configured(config.agents)
            )
            rules = lambda: fixed  # noqa: E731
        self.rules = rules

    def work(self, budget: int = OUTBOX_BUDGET) -> int:
        """Send the items due; returns how many it handled."""
        items = self.store.outbox_due(budget)
        # Batched items (reactions) are marked done together at the end of the pass: one
        # write transaction instead of one each. Gitea answers a repeated reaction with
        # the existing one, so a crash before the mark at worst sends it again. Replies
        # and actions are marked one by one, right after they happen.
        batch: list[tuple[int, str | None]] = []

        def done(item: OutboxItem, error: str | None = None) -> None:
            if HANDLERS[item.kind].batched:
                batch.append((item.id, error))
            else:
                self.store.outbox_done(item.id, error=error)

        try:
            for item in items:
                with on_its_own("outbox", item.id, partial(done, item)):
                    if item.needs_permission:
                        verdict = self.auth.check(
                            item.repo, item.requested_by or "", item.permission_hint
                        )
                        if verdict is None:
                            self.store.outbox_retry(
                                item.id, RECHECK_SECONDS, "permission check deferred"
                            )
                            continue
                        if not verdict[0]:
                            self._refuse(item, verdict[1])
                            continue
                    try:
                        HANDLERS[item.kind].send(self, item)
                    except reviews.Deferred as exc:
                        self.store.outbox_retry(item.id, RECHECK_SECONDS, str(exc))
                        continue
                    except (ServerError, Unreachable) as exc:
                        delay = doubling(RETRY_FIRST_SECONDS, item.attempts + 1, RETRY_MOST_SECONDS)
                        self.store.outbox_retry(item.id, delay, str(exc))
                        log.warning(
                            "outbox item deferred", extra={"item": item.id, "error": str(exc)}
                        )
                        return 0  # Gitea is struggling: try the rest later
                    except GiteaError as exc:
                        # refused for good (deleted comment, locked issue, no permission)
                        done(item, str(exc))
                        log.warning(
                            "outbox item refused", extra={"item": item.id, "error": str(exc)}
                        )
                    else:
                        done(item)
        finally:
            self.store.outbox_done_many(batch)
        return len(items)

    def _refuse(self, item: OutboxItem, reason: str) -> None:
        if HANDLERS[item.kind].acts:
            try:
                self.answer(item, render.not_done(reason))
            except GiteaError as exc:
                self.store.outbox_retry(item.id, RECHECK_SECONDS, str(exc))
                return
        self.store.outbox_done(item.id, error=f"refused: {reason}")

    def answer(self, item: OutboxItem, body: str) -> None:
        """Reply where the command was written, unless its reply limit was reached."""
        if not item.quiet:
            self.publisher.reply(item.repo, item.target or item.issue, body)


# ------------------------------------------------------------------------------ handlers


def _react(outbox: Outbox, item: OutboxItem) -> None:
    assert item.target is not None  # intake sets the comment to react to
    outbox.publisher.react(item.repo, item.target, "eyes")


def _comment(outbox: Outbox, item: OutboxItem) -> None:
    outbox.answer(item, item.body)


def _status(outbox: Outbox, item: OutboxItem) -> None:
    store = outbox.store
    load = None
    if outbox.auth.may_read(item.repo, item.requested_by, item.permission_hint):
        load = QueueLoad(
            busy=store.count(State.RUNNING),
            waiting=store.count(State.PENDING),
            limit=outbox.config.queue.max_concurrent_agents,
        )
    tasks = store.list_tasks(repo=item.repo, issue=item.issue)
    outbox.answer(item, render.status(tasks, outbox.config, load))


def _stop(outbox: Outbox, item: OutboxItem) -> None:
    store = outbox.store
    active = [t for t in store.list_tasks(repo=item.repo, issue=item.issue) if t.active]
    if not active:
        outbox.answer(item, render.NOTHING_TO_STOP)
    for task in active:
        store.request_cancel(task.id, item.requested_by or "someone")
    outbox.on_change()


def _retry(outbox: Outbox, item: OutboxItem) -> None:
    store = outbox.store
    last = store.latest_task(None, item.repo, item.issue)
    if last is None or last.state not in (State.FAILED, State.CANCELLED):
        outbox.answer(item, render.NOTHING_TO_RETRY)
        return
    here = item.target or item.issue
    by = item.requested_by or "someone"
    # its result is posted where the retry was asked, not only in its old comment far up
    done, blocker = store.try_requeue(last.id, by, answer_on=here)
    if blocker is not None:
        outbox.answer(item, render.retry_blocked(blocker))
    if done:
        outbox.answer(item, render.retry_queued(last, by, here))
        outbox.on_change()


def _review(outbox: Outbox, item: OutboxItem) -> None:
    taken = reviews.take(
        item,
        store=outbox.store,
        gitea=outbox.publisher.gitea,
        auth=outbox.auth,
        rules=outbox.rules,
    )
    if taken:
        outbox.on_change()


def _notify(outbox: Outbox, item: OutboxItem) -> None:
    outbox.sender.send(item)


@dataclass(frozen=True)
class Handler:
    send: Callable[[Outbox, OutboxItem], None]
    #: marked done with the others at the end of the pass (cheap to repeat after a crash)
    batched: bool = False
    #: it acts on the queue for its requester: refused, it answers why
    acts: bool = False
    #: sent by the notification lane (bot/worker/notify.py), never by the tick's pass
    own_lane: bool = False


HANDLERS: dict[OutboxKind, Handler] = {
    OutboxKind.REACTION: Handler(_react, batched=True),
    OutboxKind.COMMENT: Handler(_comment),
    OutboxKind.STATUS: Handler(_status),
    OutboxKind.STOP: Handler(_stop, acts=True),
    OutboxKind.RETRY: Handler(_retry, acts=True),
    OutboxKind.NOTIFY: Handler(_notify, own_lane=True),
    OutboxKind.REVIEW: Handler(_review),
}
