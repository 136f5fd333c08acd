"""The outbox: work for the Gitea API that intake leaves for the worker.

Pure. Intake decides in the delivery's transaction what kugetsu will answer and do;
the Gitea calls happen later, in the worker's tick (`bot.worker.outbox` holds one
handler per kind). An item is one row of the `outbox` table, described by one class,
`OutboxItem`, from the moment intake decides it to the moment the worker marks it done.

Adding a kind: a member of `OutboxKind` with its `Answer` in `ANSWERS`, and its handler
in `bot.worker.outbox.HANDLERS` (CONTRIBUTING.md has a worked example).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class OutboxKind(enum.StrEnum):
    """What the worker does with an item (the value is stored in the database)."""

    REACTION = "reaction"  # 👀 on the comment that held a command
    COMMENT = "comment"  # a reply written at intake (help, a usage error, "already queued")
    STATUS = "status"  # the issue's tasks, written when it is sent
    STOP = "stop"  # stop the issue's active task
    RETRY = "retry"  # queue the issue's last failed or stopped task again
    NOTIFY = "notify"  # tell a notification endpoint of a task's change (not Gitea)
    #: read a review of a pull request kugetsu opened (the delivery names neither the
    #: review nor its line comments; `body` holds the state and text it gave, as JSON,
    #: `target` the pull request) and act on the command it holds
    REVIEW = "review"


class Answer(enum.Enum):
    """Whether an item writes a comment in answer, which the reply limit counts."""

    NEVER = "never"  # writes no comment (a reaction)
    ALWAYS = "always"  # is a comment: past the reply limit it is left out
    MAYBE = "maybe"  # acts, and may answer: past the reply limit it acts quietly


ANSWERS: dict[OutboxKind, Answer] = {
    OutboxKind.REACTION: Answer.NEVER,
    OutboxKind.COMMENT: Answer.ALWAYS,
    OutboxKind.STATUS: Answer.ALWAYS,
    OutboxKind.STOP: Answer.MAYBE,
    OutboxKind.RETRY: Answer.MAYBE,
    OutboxKind.NOTIFY: Answer.NEVER,
    # writes nothing itself: what the review asks for is decided, replies and their
    # limit included, once it has been read
    OutboxKind.REVIEW: Answer.NEVER,
}


@dataclass(frozen=True)
class OutboxItem:
    """One outbox row. `id` and `attempts` are the store's: 0 until it is stored."""

    kind: OutboxKind
    repo: str
    #: the issue the item is about (for a command on a pull request, the PR's issue)
    issue: int
    requested_by: str | None = None
    #: what the delivery showed of the requester's permission (core.permissions)
    permission_hint: str | None = None
    body: str = ""
    #: the comment to react to, or the issue or pull request to answer on
    target: int | None = None
    #: the worker checks the requester's permission before it acts
    needs_permission: bool = False
    #: act, but write no comment (the requester's reply limit was reached)
    quiet: bool = False
    id: int = 0
    attempts: int = 0
    #: a notification's endpoint (`NotifyConfig.id`); None for work on Gitea
    endpoint: str | None = None
    created_at: float = 0.0
    not_before: float = 0.0
    #: why the last try failed (an item tried again later)
    error: str | None = None

    @property
    def answer(self) -> Answer:
        return ANSWERS[self.kind]
