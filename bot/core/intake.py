"""From a parsed event to what kugetsu will do: tasks, replies, reactions, controls.

Pure: `decide()` reads prior state only through the narrow `IntakeView` and returns
intents. `bot.ingest` runs it inside one write transaction with the delivery dedupe, so
two deliveries for one issue can never both see "no task" and queue two starts, nor
both see a reply limit not yet reached. `start_or_continue()` is the one decision of
what a request for work becomes; `kugetsu enqueue` asks it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from bot.config import TriggersConfig
from bot.core import commands, render
from bot.core.events import CommentEvent, Event, Ignored, IssueEvent
from bot.core.outbox import Answer, OutboxItem, OutboxKind
from bot.core.permissions import LABELLER
from bot.core.tasks import Kind, Task


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
    #: the request named its agent (else a repository's `.kugetsu.toml` may choose it)
    agent_requested: bool = False


@dataclass(frozen=True)
class RememberLabels:
    repo: str
    issue: int
    labels: tuple[str, ...]


@dataclass(frozen=True)
class NoteReply:
    """Count a reply to `login` on `issue` (the issue or pull request it is written on)."""

    repo: str
    issue: int
    login: str


Intent = Enqueue | RememberLabels | OutboxItem | NoteReply


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


def start_or_continue(
    view: IntakeView, repo: str, issue: int, asked: Kind | None
) -> tuple[Kind, Task | None]:
    """What a request for work on an issue becomes, and, when that is a start, the task
    already active on the issue that stands in its way (None: the work may be queued).

    `asked` None is a request without a verb: it continues if the issue has a task, else
    starts. A follow-up on an issue with no task yet starts the work. A follow-up is
    queued behind an active task; a start is not.
    """
    if asked is Kind.START or not view.has_task(repo, issue):
        return Kind.START, view.active_task(repo, issue)
    return Kind.CONTINUE, None


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
        i for i in decision.intents if isinstance(i, OutboxItem) and i.answer is not Answer.NEVER
    ]
    if not answers:
        return decision
    if view.recent_replies(repo, number, sender, rules.reply_window_seconds) < rules.reply_limit:
        decision.intents.insert(0, NoteReply(repo, number, sender))
        return decision
    kept: list[Intent] = []
    for intent in decision.intents:
        if isinstance(intent, OutboxItem) and intent.answer is Answer.ALWAYS:
            continue
        if isinstance(intent, OutboxItem) and intent.answer is Answer.MAYBE:
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
    # else only that they could change a label (see core.permissions.shown).
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


def _already(
    repo: str, issue: int, active: Task, sender: str, permission: str | None
) -> OutboxItem:
    return OutboxItem(
        OutboxKind.COMMENT,
        repo,
        issue,
        requested_by=sender,
        permission_hint=permission,
        body=render.already_active(sender, active),
        needs_permission=True,
    )


def _comment_event(event: CommentEvent, rules: Rules, view: IntakeView) -> Decision:
    if event.action != "created":
        return Decision(reason=f"comment {event.action}: only new comments are read")
    if rules.bot_login and event.sender == rules.bot_login:
        return Decision(reason="comment by kugetsu itself")
    if render.MARKER in event.body:
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

    def item(
        kind: OutboxKind,
        number: int,
        *,
        body: str = "",
        target: int | None = None,
        needs_permission: bool = False,
    ) -> OutboxItem:
        return OutboxItem(
            kind,
            event.repo,
            number,
            requested_by=event.sender,
            permission_hint=event.permission,
            body=body,
            target=target,
            needs_permission=needs_permission,
        )

    react = item(OutboxKind.REACTION, issue, target=event.comment_id)
    decision = Decision(intents=[react])
    reply_to = event.number  # answer where the command was written (issue or PR)

    def reply(body: str, needs_permission: bool = True) -> Decision:
        decision.intents.append(
            item(OutboxKind.COMMENT, reply_to, body=body, needs_permission=needs_permission)
        )
        return decision

    if isinstance(command, commands.CommandError):
        decision.reason = f"bad command: {command.message}"
        return reply(render.usage_error(event.sender, command))

    if command.agent is not None and command.agent not in rules.known_agents:
        decision.reason = f"unknown agent {command.agent}"
        return reply(render.unknown_agent(event.sender, command.agent, rules.known_agents))

    verb = command.verb
    if verb == "help":
        decision.reason = "help"
        return reply(render.help_text(rules.command, rules.label), needs_permission=False)
    if verb == "status":
        decision.intents.append(item(OutboxKind.STATUS, issue, target=reply_to))
        decision.reason = "status"
        return decision
    if verb in ("stop", "retry"):
        kind = OutboxKind.STOP if verb == "stop" else OutboxKind.RETRY
        decision.intents.append(item(kind, issue, target=reply_to, needs_permission=True))
        decision.reason = verb
        return decision

    # the verb is start, continue, or none (commands.AUTO): whichever fits
    asked = None if verb == commands.AUTO else Kind(verb)
    work, active = start_or_continue(view, event.repo, issue, asked)
    if not event.is_pull and view.previous_labels(event.repo, issue) is None:
        # The first kugetsu hears of this issue is a request for work: the labels on it now
        # are not "newly added" when a later delivery changes some other label.
        decision.intents.append(RememberLabels(event.repo, issue, event.labels))
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
            work,
            command.text,
            command.agent or rules.default_agent,
            event.sender,
            event.permission,
            trigger_comment_id=event.comment_id,
            max_tokens=command.max_tokens,
            max_cost_usd=command.max_cost_usd,
            agent_requested=command.agent is not None,
        )
    )
    decision.reason = f"{work.value} requested"
    return decision
