"""From a parsed event to what kugetsu will do: tasks, replies, reactions, controls.

`decide()` is pure: it reads prior state only through the narrow `IntakeView`
and returns intents. `ingest()` runs it inside one write transaction with the
delivery dedupe, so two deliveries for one issue can never both see "no task"
and queue two starts, nor both see a reply limit not yet reached.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from bot import commands
from bot.config import TriggersConfig
from bot.events import CommentEvent, Delivery, Event, Ignored, IssueEvent
from bot.store import Store
from bot.tasks import LABELLER, Kind, Task

#: every comment kugetsu writes carries this, so its own comments never trigger it
MARKER = "<!-- kugetsu"


@dataclass(frozen=True)
class Rules:
    label: str
    command: str
    bot_login: str | None
    known_agents: frozenset[str]
    default_agent: str
    max_attempts: int
    reply_limit: int = TriggersConfig.reply_limit
    reply_window_seconds: float = TriggersConfig.reply_window_seconds


@dataclass(frozen=True)
class Enqueue:
    repo: str
    issue: int
    kind: Kind
    prompt: str
    agent: str
    requested_by: str
    permission: str | None
    trigger_comment_id: int | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None


@dataclass(frozen=True)
class RememberLabels:
    repo: str
    issue: int
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Outbox:
    """Work for the Gitea API that the tick does later: reply, status, reaction, stop, retry."""

    kind: str
    repo: str
    issue: int
    requested_by: str | None = None
    permission: str | None = None
    body: str = ""
    target: int | None = None
    needs_permission: bool = False
    quiet: bool = False  # act, but write no comment (the reply limit was reached)


@dataclass(frozen=True)
class NoteReply:
    """Count a reply to `login` on `issue` (the issue or pull request it is written on)."""

    repo: str
    issue: int
    login: str


Intent = Enqueue | RememberLabels | Outbox | NoteReply

#: outbox work that writes a comment in answer now, and work that may write one later
REPLY_KINDS = frozenset({"comment", "status"})
MAY_REPLY_KINDS = frozenset({"stop", "retry"})


@dataclass
class Decision:
    intents: list[Intent] = field(default_factory=list)
    reason: str = ""


class IntakeView(Protocol):
    def previous_labels(self, repo: str, issue: int) -> list[str] | None: ...
    def active_task(self, repo: str, issue: int) -> Task | None: ...
    def has_task(self, repo: str, issue: int) -> bool: ...
    def issue_for_pr(self, repo: str, pr: int) -> int | None: ...
    def recent_replies(self, repo: str, issue: int, login: str, seconds: float) -> int: ...


def decide(event: Event, rules: Rules, view: IntakeView) -> Decision:
    if isinstance(event, Ignored):
        return Decision(reason=event.reason)
    if isinstance(event, IssueEvent):
        decision = _issue_event(event, rules, view)
    else:
        decision = _comment_event(event, rules, view)
    return _limit_replies(decision, rules, view, event.repo, event.number, event.sender)


def _limit_replies(
    decision: Decision, rules: Rules, view: IntakeView, repo: str, number: int, sender: str
) -> Decision:
    """At most `reply_limit` replies to one user on one issue (or pull request) within
    `reply_window_seconds`, whoever they are: anyone can comment, and kugetsu must not
    answer a flood with a flood. Past the limit a command gets its reaction alone; stop
    and retry still act, but write nothing. Work requests are never limited."""
    answers = [
        i
        for i in decision.intents
        if isinstance(i, Outbox) and i.kind in REPLY_KINDS | MAY_REPLY_KINDS
    ]
    if not answers:
        return decision
    if view.recent_replies(repo, number, sender, rules.reply_window_seconds) < rules.reply_limit:
        decision.intents.insert(0, NoteReply(repo, number, sender))
        return decision
    kept: list[Intent] = []
    for intent in decision.intents:
        if isinstance(intent, Outbox) and intent.kind in REPLY_KINDS:
            continue
        if isinstance(intent, Outbox) and intent.kind in MAY_REPLY_KINDS:
            intent = replace(intent, quiet=True)
        kept.append(intent)
    decision.intents = kept
    decision.reason += f" (reply limit reached for {sender}: no reply)"
    return decision


def _issue_event(event: IssueEvent, rules: Rules, view: IntakeView) -> Decision:
    if event.is_pull:
        return Decision(reason="label changes on pull requests are not triggers")
    decision = Decision()
    previous = view.previous_labels(event.repo, event.number)
    if event.action in ("opened", "label_updated", "label_cleared", "edited", "reopened"):
        decision.intents.append(RememberLabels(event.repo, event.number, event.labels))
    newly_labelled = (
        event.action in ("opened", "label_updated")
        and rules.label in event.labels
        and (previous is None or rules.label not in previous)
    )
    if not newly_labelled:
        decision.reason = (
            f"label {rules.label!r} was not newly added"
            if event.action in ("opened", "label_updated")
            else f"action {event.action} is not a trigger"
        )
        return decision
    if rules.bot_login and event.sender == rules.bot_login:
        decision.reason = "labelled by kugetsu itself"
        return decision
    # What the delivery shows of the labeller: their permission if they wrote the issue,
    # else only that they could change a label (see tasks.fallback_permission).
    hint = event.permission or LABELLER
    active = view.active_task(event.repo, event.number)
    if active is not None:
        decision.intents.append(_already(event.repo, event.number, active, event.sender, hint))
        decision.reason = f"task {active.id} is already active for this issue"
        return decision
    decision.intents.append(
        Enqueue(event.repo, event.number, Kind.START, "", rules.default_agent, event.sender, hint)
    )
    decision.reason = "label added"
    return decision


def _already(repo: str, issue: int, active: Task, sender: str, permission: str | None) -> Outbox:
    word = "queued" if active.state.value == "pending" else "running"
    return Outbox(
        "comment",
        repo,
        issue,
        sender,
        permission,
        body=f"@{sender} kugetsu is already {word} on this issue (task #{active.id}). "
        f"Use `continue <instructions>` to follow up, or `stop` to stop it.",
        needs_permission=True,
    )


def _comment_event(event: CommentEvent, rules: Rules, view: IntakeView) -> Decision:
    if event.action != "created":
        return Decision(reason=f"comment {event.action}: only new comments are read")
    if rules.bot_login and event.sender == rules.bot_login:
        return Decision(reason="comment by kugetsu itself")
    if MARKER in event.body:
        return Decision(reason="comment written by kugetsu")
    command = commands.parse_comment(event.body, rules.command)
    if command is None:
        return Decision(reason="no command in comment")

    issue = event.number
    if event.is_pull:
        mapped = view.issue_for_pr(event.repo, event.number)
        if mapped is None:
            return Decision(reason="pull request was not opened by kugetsu")
        issue = mapped

    react = Outbox(
        "reaction", event.repo, issue, event.sender, event.permission, target=event.comment_id
    )
    decision = Decision(intents=[react])
    reply_to = event.number  # answer where the command was written (issue or PR)

    def reply(body: str, needs_permission: bool = True) -> Decision:
        decision.intents.append(
            Outbox(
                "comment",
                event.repo,
                reply_to,
                event.sender,
                event.permission,
                body=body,
                needs_permission=needs_permission,
            )
        )
        return decision

    if isinstance(command, commands.CommandError):
        decision.reason = f"bad command: {command.message}"
        return reply(f"@{event.sender} {command.message}. Usage: {command.usage}")

    if command.agent is not None and command.agent not in rules.known_agents:
        decision.reason = f"unknown agent {command.agent}"
        return reply(
            f"@{event.sender} there is no agent named `{command.agent}`. "
            f"Configured: {', '.join(sorted(rules.known_agents))}."
        )

    verb = command.verb
    if verb == "help":
        decision.reason = "help"
        return reply(commands.help_text(rules.command, rules.label), needs_permission=False)
    if verb == "status":
        decision.intents.append(
            Outbox("status", event.repo, issue, event.sender, event.permission, target=reply_to)
        )
        decision.reason = "status"
        return decision
    if verb in ("stop", "retry"):
        decision.intents.append(
            Outbox(
                verb,
                event.repo,
                issue,
                event.sender,
                event.permission,
                target=reply_to,
                needs_permission=True,
            )
        )
        decision.reason = verb
        return decision

    if verb == commands.AUTO:
        verb = "continue" if view.has_task(event.repo, issue) else "start"
    kind = Kind.START if verb == "start" else Kind.CONTINUE
    if kind is Kind.CONTINUE and not view.has_task(event.repo, issue):
        kind = Kind.START  # nothing to continue yet: the instructions start the work
    if not event.is_pull and view.previous_labels(event.repo, issue) is None:
        # The first kugetsu hears of this issue is a request for work: the labels on it now
        # are not "newly added" when a later delivery changes some other label.
        decision.intents.append(RememberLabels(event.repo, issue, event.labels))
    if kind is Kind.START:
        active = view.active_task(event.repo, issue)
        if active is not None:
            decision.intents.append(
                _already(event.repo, reply_to, active, event.sender, event.permission)
            )
            decision.reason = f"task {active.id} is already active for this issue"
            return decision
    decision.intents.append(
        Enqueue(
            event.repo,
            issue,
            kind,
            command.text,
            command.agent or rules.default_agent,
            event.sender,
            event.permission,
            trigger_comment_id=event.comment_id,
            max_tokens=command.max_tokens,
            max_cost_usd=command.max_cost_usd,
        )
    )
    decision.reason = f"{kind.value} requested"
    return decision


# --------------------------------------------------------------------------- applying


class _SqlView:
    def __init__(self, store: Store, conn: sqlite3.Connection):
        self.store, self.conn = store, conn

    def previous_labels(self, repo: str, issue: int) -> list[str] | None:
        row = self.store.issue_row(repo, issue, self.conn)
        return None if row is None else row["labels"]

    def active_task(self, repo: str, issue: int) -> Task | None:
        return self.store.active_task(self.conn, repo, issue)

    def has_task(self, repo: str, issue: int) -> bool:
        return self.store.latest_task(repo, issue, self.conn) is not None

    def issue_for_pr(self, repo: str, pr: int) -> int | None:
        return self.store.issue_for_pr(repo, pr, self.conn)

    def recent_replies(self, repo: str, issue: int, login: str, seconds: float) -> int:
        return self.store.recent_replies(self.conn, repo, issue, login, seconds)


@dataclass(frozen=True)
class IngestResult:
    duplicate: bool
    reason: str
    task_ids: tuple[int, ...] = ()
    outbox_ids: tuple[int, ...] = ()

    @property
    def queued(self) -> bool:
        return bool(self.task_ids or self.outbox_ids)


def ingest(store: Store, delivery: Delivery, event: Event, rules: Rules) -> IngestResult:
    """Dedupe the delivery, decide, and write the result, all in one transaction."""
    with store.tx() as c:
        if store.seen_delivery(c, delivery.id, delivery.event):
            return IngestResult(True, "delivery already received")
        decision = decide(event, rules, _SqlView(store, c))
        task_ids, outbox_ids = _apply(store, c, decision.intents, rules)
        store.delivery_result(c, delivery.id, decision.reason)
    return IngestResult(False, decision.reason, task_ids, outbox_ids)


def _apply(
    store: Store, c: sqlite3.Connection, intents: Sequence[Intent], rules: Rules
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    task_ids, outbox_ids = [], []
    for intent in intents:
        if isinstance(intent, RememberLabels):
            store.set_issue(intent.repo, intent.issue, c, labels=list(intent.labels))
        elif isinstance(intent, NoteReply):
            store.note_reply(c, intent.repo, intent.issue, intent.login, rules.reply_window_seconds)
        elif isinstance(intent, Enqueue):
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
                )
            )
        else:
            outbox_ids.append(
                store.add_outbox(
                    c,
                    repo=intent.repo,
                    issue=intent.issue,
                    kind=intent.kind,
                    body=intent.body,
                    target=intent.target,
                    requested_by=intent.requested_by,
                    permission_hint=intent.permission,
                    needs_permission=intent.needs_permission,
                    quiet=intent.quiet,
                )
            )
    return tuple(task_ids), tuple(outbox_ids)
