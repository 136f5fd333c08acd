"""Reviews of pull requests, as Gitea's reviews API gives them.

Pure. A review's delivery says neither which review it was nor anything of its line
comments (`core.events.ReviewEvent`), so the worker reads them from the API
(`GET .../pulls/{n}/reviews`, then `.../reviews/{id}/comments`) and this module makes
sense of what it read: which review the delivery was about (`pick`), which reviews a
reconcile pass takes in because their delivery never came (`submitted_since`), what
kugetsu keeps of it (`Review`, stored with the follow-up it asks for), and the command
it holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bot.core import commands
from bot.core.reconcile import parse_time

#: the states of a submitted review; PENDING (not submitted) and REQUEST_REVIEW are not
SUBMITTED = frozenset({"APPROVED", "REQUEST_CHANGES", "COMMENT"})
REQUEST_CHANGES = "REQUEST_CHANGES"
#: a review submitted this long before its delivery was taken in may still be the one it
#: is about (Gitea's clock and kugetsu's may differ); older ones are not
PICK_WINDOW_SECONDS = 24 * 3600.0
#: what kugetsu keeps of one comment's text and diff hunk (the prompt carries them)
MAX_TEXT = 20_000


class BadReview(ValueError):
    """What the API answered is not the shape of a review or of its comments."""


@dataclass(frozen=True)
class ReviewComment:
    """A line comment of a review."""

    id: int
    path: str
    #: the line it is on; 0 when Gitea gives none
    line: int
    #: the line is in the old file (a removed line), not the new one
    old_side: bool
    diff_hunk: str
    body: str
    user: str


@dataclass(frozen=True)
class Review:
    id: int
    #: APPROVED, REQUEST_CHANGES or COMMENT
    state: str
    body: str
    user: str
    comments: tuple[ReviewComment, ...] = ()

    def texts(self) -> list[str]:
        """Where a command may be written: the review's text, then each line comment's."""
        return [self.body, *(c.body for c in self.comments)]

    def command(self, word: str) -> commands.Command | commands.CommandError | None:
        """The first command in the review's text or line comments, read as in a comment,
        except that the review itself says what to do: a command word alone, or a
        `continue` without text, asks for work on it."""
        for text in self.texts():
            found = commands.parse_comment(text, word, instructions=True)
            if isinstance(found, commands.UnknownVerb):
                return commands.CommandError(
                    f"`{found.word}` is not a kugetsu command", commands.usage_line(word)
                )
            if found is not None:
                return found
        return None

    def as_dict(self) -> dict[str, Any]:
        """How a follow-up stores the review it answers (`Task.review`)."""
        return {
            "id": self.id,
            "state": self.state,
            "body": self.body,
            "user": self.user,
            "comments": [
                {
                    "id": c.id,
                    "path": c.path,
                    "line": c.line,
                    "old_side": c.old_side,
                    "diff_hunk": c.diff_hunk,
                    "body": c.body,
                    "user": c.user,
                }
                for c in self.comments
            ],
        }


def key(repo: str, review_id: int) -> str:
    """The id under which taking a review is recorded, like a delivery's, so that a
    review is taken once however many deliveries name it."""
    return f"review:{repo}:{review_id}"


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadReview(f"{what} is not a number")
    return value


def _str(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadReview(f"{what} is not text")
    return value[:MAX_TEXT]


def _login(obj: Any) -> str:
    return _str(obj.get("login") if isinstance(obj, Mapping) else None, "user.login")


def from_api(review: Mapping[str, Any], comments: Sequence[Mapping[str, Any]]) -> Review:
    """A review and its comments as the API gave them (`PullReview`, `PullReviewComment`).

    A comment's line is `position` (in the new file) or, when that is 0, `original_position`
    (in the old one): Gitea fills one of the two."""
    if not isinstance(review, Mapping):
        raise BadReview("the review is not an object")
    kept = []
    for comment in comments:
        if not isinstance(comment, Mapping):
            raise BadReview("a review comment is not an object")
        new = comment.get("position") or 0
        old = comment.get("original_position") or 0
        kept.append(
            ReviewComment(
                id=_int(comment.get("id"), "comment.id"),
                path=_str(comment.get("path"), "comment.path"),
                line=_int(new or old, "comment.position"),
                old_side=not new and bool(old),
                diff_hunk=_str(comment.get("diff_hunk"), "comment.diff_hunk"),
                body=_str(comment.get("body"), "comment.body"),
                user=_login(comment.get("user")),
            )
        )
    return Review(
        id=_int(review.get("id"), "review.id"),
        state=_str(review.get("state"), "review.state"),
        body=_str(review.get("body"), "review.body"),
        user=_login(review.get("user")),
        comments=tuple(kept),
    )


def _submitted_at(review: Mapping[str, Any]) -> float | None:
    return parse_time(review.get("submitted_at"))


def pick(
    listed: Sequence[Any],
    *,
    sender: str,
    state: str,
    body: str,
    taken: Callable[[int], bool],
    since: float,
) -> Mapping[str, Any] | None:
    """Which of a pull request's reviews a delivery was about: the newest submitted by
    `sender` in `state` with `body`, submitted after `since`, that kugetsu has not taken
    yet (`taken(id)`). None if there is none (already taken, or not to be found).

    Two deliveries of equal reviews take one review each, newest first; a replayed
    delivery finds its review taken."""
    candidates = [
        r
        for r in listed
        if isinstance(r, Mapping)
        and _login(r.get("user")) == sender
        and r.get("state") == state
        and (r.get("body") or "") == body
        and not r.get("dismissed")
        and isinstance(r.get("id"), int)
        and (_submitted_at(r) or since) >= since
    ]
    for review in sorted(candidates, key=lambda r: r["id"], reverse=True):
        if not taken(review["id"]):
            return review
    return None


def submitted_since(
    listed: Sequence[Any],
    *,
    since: float,
    bot_login: str | None,
    taken: Callable[[int], bool],
) -> list[Mapping[str, Any]]:
    """The reviews of a pull request's list that a reconcile pass takes in: submitted (not
    pending, not dismissed) at or after `since` (in whole seconds, as Gitea's `since`),
    not by kugetsu (`bot_login`), and not taken yet (`taken(id)`: their delivery came, or
    a pass before found them), oldest first."""
    start = math.floor(since)
    found = [
        r
        for r in listed
        if isinstance(r, Mapping)
        and r.get("state") in SUBMITTED
        and not r.get("dismissed")
        and isinstance(r.get("id"), int)
        and not isinstance(r.get("id"), bool)
        and (_submitted_at(r) or -math.inf) >= start
        and isinstance(r.get("user"), Mapping)
        and isinstance(r["user"].get("login"), str)
        and r["user"]["login"] not in ("", bot_login)
    ]
    return [r for r in sorted(found, key=lambda r: r["id"]) if not taken(r["id"])]
