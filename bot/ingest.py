"""A delivery taken in: deduplicated, decided and written, in one transaction.

`core.intake.decide` is pure; here it runs inside one write transaction of the store,
with the delivery's dedupe, so two deliveries for one issue can never both see "no
task" and queue two starts, nor both see a reply limit not yet reached. `StoreView` is
the store as intake reads it, inside that transaction (`kugetsu enqueue` reads through
it too). `RulesSource` gives the receiver its intake rules, with the bot's login as the
worker found it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bot.config import Config
from bot.core import intake, metrics
from bot.core.events import Delivery, Event, Ignored, event_key
from bot.core.outbox import OutboxItem
from bot.core.tasks import Task
from bot.store import Store, Tx

#: how often the receiver looks again for the bot's login while it does not know it
BOT_LOGIN_REFRESH_SECONDS = 60.0


class StoreView:
    """`core.intake.IntakeView` over the store, inside the caller's transaction `c`."""

    def __init__(self, store: Store, c: Tx):
        self.store, self.c = store, c

    def previous_labels(self, repo: str, issue: int) -> list[str] | None:
        row = self.store.issue_row(self.c, repo, issue)
        return None if row is None else row["labels"]

    def active_task(self, repo: str, issue: int) -> Task | None:
        return self.store.active_task(self.c, repo, issue)

    def has_task(self, repo: str, issue: int) -> bool:
        return self.store.latest_task(self.c, repo, issue) is not None

    def issue_for_pr(self, repo: str, pr: int) -> int | None:
        return self.store.issue_for_pr(self.c, repo, pr)

    def recent_replies(self, repo: str, issue: int, login: str, seconds: float) -> int:
        return self.store.recent_replies(self.c, repo, issue, login, seconds)


@dataclass(frozen=True)
class IngestResult:
    duplicate: bool
    reason: str
    task_ids: tuple[int, ...] = ()
    outbox_ids: tuple[int, ...] = ()

    @property
    def queued(self) -> bool:
        return bool(self.task_ids or self.outbox_ids)


def ingest(
    store: Store,
    delivery: Delivery,
    event: Event | intake.ReviewRequest,
    rules: intake.Rules,
    *,
    repo: str | None = None,
    counted: bool = True,
) -> IngestResult:
    """Dedupe the delivery, decide, and write the result, all in one transaction. `repo`:
    the repository the delivery came from, recorded with it.

    A delivery is taken in once by its id, and an event once by its key
    (`core.events.event_key`), however it came: a reconcile pass gives the key as the
    delivery id, so it and Gitea's delivery of the same comment dedupe each other in
    either order. The repository is remembered as one kugetsu serves. `counted`: the
    delivery counts in /metrics (a reconcile pass's findings do not: they are not
    deliveries, and a pass finds again what the one before it found; nor does a review
    the worker read, under an id of its own, `core.reviews.key`, so that it is acted on
    once whatever delivered it)."""
    key = None if isinstance(event, intake.ReviewRequest) else event_key(event)

    def count(c: Tx, result: metrics.DeliveryResult) -> None:
        if counted:
            store.add_counts(c, metrics.delivery(result))

    with store.tx() as c:
        if store.seen_delivery(c, delivery.id, delivery.event, repo):
            count(c, metrics.DeliveryResult.DUPLICATE)
            return IngestResult(True, "delivery already received")
        if key is not None and key != delivery.id and store.seen_event(c, key, delivery.event):
            # delivered after a reconcile pass found it on Gitea (or delivered twice)
            count(c, metrics.DeliveryResult.DUPLICATE)
            return IngestResult(True, f"{key} already taken in")
        served = repo or (None if isinstance(event, Ignored) else event.repo)
        if served:
            store.note_repo(c, served)
        decision = intake.decide(event, rules, StoreView(store, c))
        task_ids, outbox_ids = _apply(store, c, decision.intents, rules)
        store.delivery_result(c, delivery.id, decision.reason)
        result = IngestResult(False, decision.reason, task_ids, outbox_ids)
        # counted in the delivery's own transaction: no write of its own
        count(
            c,
            metrics.DeliveryResult.QUEUED if result.queued else metrics.DeliveryResult.IGNORED,
        )
    return result


def _apply(
    store: Store, c: Tx, intents: Sequence[intake.Intent], rules: intake.Rules
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    task_ids, outbox_ids = [], []
    for intent in intents:
        if isinstance(intent, intake.RememberLabels):
            store.set_issue(c, intent.repo, intent.issue, labels=list(intent.labels))
        elif isinstance(intent, intake.NoteReply):
            store.note_reply(c, intent.repo, intent.issue, intent.login, rules.reply_window_seconds)
        elif isinstance(intent, intake.Enqueue):
            task_ids.append(
                store.insert_task(
                    c,
                    repo=intent.repo,
                    issue=intent.issue,
                    kind=intent.kind,
                    prompt=intent.prompt,
                    agent=intent.agent,
                    requested_by=intent.requested_by,
                    max_attempts=rules.max_attempts,
                    permission_hint=intent.permission,
                    trigger_comment_id=intent.trigger_comment_id,
                    max_tokens=intent.max_tokens,
                    max_cost_usd=intent.max_cost_usd,
                    answer_on=intent.answer_on,
                    review=intent.review,
                    agent_requested=intent.agent_requested,
                )
            )
        elif isinstance(intent, OutboxItem):
            outbox_ids.append(store.add_outbox(c, intent))
    return tuple(task_ids), tuple(outbox_ids)


class RulesSource:
    """The receiver's intake rules. The bot's login comes from the config, else from the
    database, where the worker keeps what Gitea said (GET /user); while it is unknown
    the database is asked again at most every BOT_LOGIN_REFRESH_SECONDS."""

    def __init__(
        self,
        config: Config,
        store: Store,
        known_agents: frozenset[str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config, self.store, self.known_agents, self.clock = config, store, known_agents, clock
        self._bot_login: str | None = config.gitea.bot_login or None
        self._asked_at = float("-inf")

    def bot_login(self) -> str | None:
        if not self._bot_login and self.clock() - self._asked_at > BOT_LOGIN_REFRESH_SECONDS:
            self._asked_at = self.clock()
            self._bot_login = self.store.get_meta("bot_login")
        return self._bot_login

    def __call__(self) -> intake.Rules:
        return rules_for(self.config, self.bot_login(), self.known_agents)


def rules_for(config: Config, bot_login: str | None, agents: frozenset[str]) -> intake.Rules:
    """Intake's rules from the config, the bot's login and the agents installed."""
    return intake.Rules(
        label=config.triggers.label,
        command=config.triggers.command,
        bot_login=bot_login,
        known_agents=agents,
        default_agent=config.agents.default,
        max_attempts=config.queue.max_attempts,
        reply_limit=config.triggers.reply_limit,
        reply_window_seconds=config.triggers.reply_window_seconds,
        review_changes=config.triggers.review_changes,
    )
