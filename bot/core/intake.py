"""From a parsed event to what kugetsu will do: tasks, replies, reactions, controls.

Pure: `decide()` reads prior state only through the narrow `IntakeView` and returns
intents. `bot.ingest` runs it inside one write transaction with the delivery dedupe, so
two deliveries for one issue can never both see "no task" and queue two starts, nor
both see a reply limit not yet reached. `start_or_continue()` is the one decision of
what a request for work becomes; `kugetsu enqueue` asks it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from bot.config import TriggersConfig
from bot.core import commands, render, reviews
from bot.core.events import CommentEvent, Event, Ignored, IssueEvent, PullHead, ReviewEvent
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
    #: any "request changes" review (of a reviewer who may ask for work) asks for a
    #: follow-up, without a command in it
    review_changes: bool = TriggersConfig.review_changes


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
    #: where its result is also posted when it ends (the pull request it was asked on)
    answer_on: int | None = None
    #: the review it answers (`reviews.Review.as_dict`)
    review: dict[str, Any] | None = None
    #: the request named its agent (else a repository's `.kugetsu.toml` may choose it)
    agent_requested: bool = False


@dataclass(frozen=True)
class ReviewRequest:
    """A review the worker read from the API after its delivery (`ReviewEvent`), with
    what Gitea's permission API says of its reviewer: decided on like a comment."""

    repo: str
    #: the pull request reviewed
    number: int
    review: reviews.Review
    #: the reviewer's permission, as Gitea's permission API gave it
    permission: str | None
    #: whether the reviewer may ask for work, and if not, why
    allowed: bool
    refusal: str = ""

    @property
    def sender(self) -> str:
        return self.review.user


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


def decide(event: Event | ReviewRequest, rules: Rules, view: IntakeView) -> Decision:
    if isinstance(event, Ignored):
        return Decision(reason=event.reason)
    if isinstance(event, IssueEvent):
        decision = _issue_event(event, rules, view)
    elif isinstance(event, ReviewEvent):
        decision = _review_event(event, rules, view)
    elif isinstance(event, ReviewRequest):
        decision = _review_request(event, rules, view)
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


@dataclass(frozen=True)
class _Asked:
    """A command and where it was asked: a comment, or a review the worker read."""

    repo: str
    #: the issue the work is for: the issue itself, the issue of a pull request kugetsu
    #: opened, or a pull request a person opened (which is its own issue)
    issue: int
    #: where the command was written (an issue or a pull request): answers go there
    number: int
    sender: str
    permission: str | None
    is_pull: bool
    #: the comment to react to
    comment_id: int | None = None
    #: the labels on the issue now, for a first request on it
    labels: tuple[str, ...] = ()
    pull: PullHead | None = None
    review: dict[str, Any] | None = None

    def item(
        self,
        kind: OutboxKind,
        number: int,
        *,
        body: str = "",
        target: int | None = None,
        needs_permission: bool = False,
    ) -> OutboxItem:
        return OutboxItem(
            kind,
            self.repo,
            number,
            requested_by=self.sender,
            permission_hint=self.permission,
            body=body,
            target=target,
            needs_permission=needs_permission,
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
        # a pull request kugetsu opened stands for its issue; one a person opened is its
        # own issue: kugetsu works on its branch
        issue = view.issue_for_pr(event.repo, event.number) or event.number
    asked = _Asked(
        event.repo,
        issue,
        event.number,
        event.sender,
        event.permission,
        event.is_pull,
        comment_id=event.comment_id,
        labels=event.labels,
        pull=event.pull,
    )
    return _command(asked, command, rules, view)


def _review_event(event: ReviewEvent, rules: Rules, view: IntakeView) -> Decision:
    """A review's delivery: the worker reads the review itself (`REVIEW`), since the
    delivery holds neither its line comments nor its reviewer's permission."""
    if rules.bot_login and event.sender == rules.bot_login:
        return Decision(reason="review by kugetsu itself")
    issue = view.issue_for_pr(event.repo, event.number)
    if issue is None:
        return Decision(reason="reviews are read only on pull requests kugetsu opened")
    body = json.dumps({"state": event.state, "body": event.body})
    item = OutboxItem(
        OutboxKind.REVIEW,
        event.repo,
        issue,
        requested_by=event.sender,
        body=body,
        target=event.number,
    )
    return Decision(intents=[item], reason="review to read")


def _review_request(event: ReviewRequest, rules: Rules, view: IntakeView) -> Decision:
    review = event.review
    if rules.bot_login and review.user == rules.bot_login:
        return Decision(reason="review by kugetsu itself")
    command = review.command(rules.command)
    if command is None:
        if not (rules.review_changes and review.state == reviews.REQUEST_CHANGES):
            return Decision(reason="no command in the review")
        if not event.allowed:
            return Decision(reason=f"changes requested by someone who may not ask: {event.refusal}")
        command = commands.Command(commands.AUTO)
    issue = view.issue_for_pr(event.repo, event.number)
    if issue is None:
        return Decision(reason="reviews are read only on pull requests kugetsu opened")
    asked = _Asked(
        event.repo,
        issue,
        event.number,
        review.user,
        event.permission,
        True,
        review=review.as_dict(),
    )
    if not event.allowed:
        body = render.not_done(event.refusal)
        return Decision(
            intents=[asked.item(OutboxKind.COMMENT, event.number, body=body)],
            reason=f"review refused: {event.refusal}",
        )
    return _command(asked, command, rules, view)


def _command(
    asked: _Asked,
    command: commands.Command | commands.CommandError | commands.UnknownVerb,
    rules: Rules,
    view: IntakeView,
) -> Decision:
    """What a command becomes, wherever it was asked."""
    decision = Decision()
    if asked.comment_id is not None:
        decision.intents.append(
            asked.item(OutboxKind.REACTION, asked.issue, target=asked.comment_id)
        )

    def reply(body: str, needs_permission: bool = True) -> Decision:
        decision.intents.append(
            asked.item(
                OutboxKind.COMMENT, asked.number, body=body, needs_permission=needs_permission
            )
        )
        return decision

    def help_text() -> str:
        return render.help_text(rules.command, rules.label, rules.known_agents, rules.default_agent)

    if isinstance(command, commands.CommandError):
        decision.reason = f"bad command: {command.message}"
        return reply(render.usage_error(asked.sender, command))
    if isinstance(command, commands.UnknownVerb):
        decision.reason = f"unknown command {command.word}"
        return reply(
            render.unknown_verb(asked.sender, command, help_text()), needs_permission=False
        )

    if command.agent is not None and command.agent not in rules.known_agents:
        decision.reason = f"unknown agent {command.agent}"
        return reply(render.unknown_agent(asked.sender, command.agent, rules.known_agents))

    verb = command.verb
    if verb == "help":
        decision.reason = "help"
        return reply(help_text(), needs_permission=False)
    if verb == "status":
        decision.intents.append(asked.item(OutboxKind.STATUS, asked.issue, target=asked.number))
        decision.reason = "status"
        return decision
    if verb in ("stop", "retry"):
        kind = OutboxKind.STOP if verb == "stop" else OutboxKind.RETRY
        decision.intents.append(
            asked.item(kind, asked.issue, target=asked.number, needs_permission=True)
        )
        decision.reason = verb
        return decision

    # the verb is start, continue, or none (commands.AUTO): whichever fits
    pull = asked.pull
    if pull is not None and pull.repo != asked.repo and not (pull.repo and pull.maintainer_edit):
        decision.reason = "pull request from a fork kugetsu may not push to"
        return reply(render.fork_not_editable(asked.sender, pull.repo))
    want = None if verb == commands.AUTO else Kind(verb)
    work, active = start_or_continue(view, asked.repo, asked.issue, want)
    if not asked.is_pull and view.previous_labels(asked.repo, asked.issue) is None:
        # The first kugetsu hears of this issue is a request for work: the labels on it now
        # are not "newly added" when a later delivery changes some other label.
        decision.intents.append(RememberLabels(asked.repo, asked.issue, asked.labels))
    if active is not None:
        decision.intents.append(
            _already(asked.repo, asked.number, active, asked.sender, asked.permission)
        )
        decision.reason = f"task {active.id} is already active for this issue"
        return decision
    decision.intents.append(
        Enqueue(
            asked.repo,
            asked.issue,
            work,
            command.text,
            command.agent or rules.default_agent,
            asked.sender,
            asked.permission,
            trigger_comment_id=asked.comment_id,
            max_tokens=command.max_tokens,
            max_cost_usd=command.max_cost_usd,
            answer_on=asked.number if asked.number != asked.issue else None,
            review=asked.review,
            agent_requested=command.agent is not None,
        )
    )
    decision.reason = f"{work.value} requested"
    return decision
