"""Webhook deliveries: verify the signature, then parse into typed events.

Pure: no Flask, no I/O. The signature is checked over the raw body bytes
before anything is parsed (for Gitea's `form` content type, over the JSON
inside the `payload` field, which is what Gitea signs).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

from bot.core import names, permissions


class WebhookError(Exception):
    """A delivery we refuse; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Delivery:
    id: str
    event: str  # X-Gitea-Event: issues, issue_comment, pull_request, ...
    event_type: str  # X-Gitea-Event-Type: issue_label, pull_request_comment, ...


@dataclass(frozen=True)
class IssueEvent:
    """An `issues` delivery (opened, label_updated, label_cleared, ...).

    `permission` is the sender's, when the delivery tells it: Gitea fills
    `repository.permissions` with the issue author's, so only when the sender wrote
    the issue.
    """

    action: str
    repo: str
    number: int
    title: str
    body: str
    labels: tuple[str, ...]
    is_pull: bool
    sender: str
    permission: str | None


@dataclass(frozen=True)
class PullHead:
    """Where a pull request's commits live, as its delivery shows them."""

    #: the repository that holds the head branch (a fork, or the repository itself);
    #: None when it is gone (a deleted fork)
    repo: str | None
    branch: str
    #: its author lets those who may write to the base repository push to the branch
    maintainer_edit: bool


@dataclass(frozen=True)
class CommentEvent:
    """An `issue_comment` delivery, on an issue or a pull request.

    `permission` is the commenter's: on comment events Gitea fills
    `repository.permissions` for whoever commented.
    """

    action: str
    repo: str
    number: int
    is_pull: bool
    comment_id: int
    body: str
    sender: str
    permission: str | None
    title: str
    #: the labels now on the issue (or pull request) the comment is on
    labels: tuple[str, ...] = ()
    #: on a pull request: where its commits live
    pull: PullHead | None = None


#: The webhook events that send submitted reviews, as Gitea's hook API names them in its
#: `events` list (one name turns on approved, rejected and comment reviews alike).
REVIEW_EVENTS = ("pull_request_review",)

#: A review's state in the reviews API, by the `X-Gitea-Event-Type` of its delivery ...
REVIEW_STATES = {
    "pull_request_review_approved": "APPROVED",
    "pull_request_review_rejected": "REQUEST_CHANGES",
    "pull_request_review_comment": "COMMENT",
}
#: ... or, from a sender without event types, by its `X-Gitea-Event`
_LEGACY_REVIEW_STATES = {
    "pull_request_approved": "APPROVED",
    "pull_request_rejected": "REQUEST_CHANGES",
    "pull_request_comment": "COMMENT",
}


@dataclass(frozen=True)
class ReviewEvent:
    """A submitted review of a pull request.

    The delivery says neither the review's id nor anything of its line comments (a review
    of line comments alone arrives with an empty body), and its `repository.permissions`
    are the pull request author's: the worker reads the review and the reviewer's
    permission from the API.
    """

    repo: str
    number: int
    #: APPROVED, REQUEST_CHANGES or COMMENT, as the reviews API names it
    state: str
    body: str
    sender: str


@dataclass(frozen=True)
class Ignored:
    reason: str


Event = IssueEvent | CommentEvent | ReviewEvent | Ignored


def event_key(event: Event) -> str | None:
    """What a delivery is about, the same however kugetsu learns of it: from Gitea's
    delivery, or from a reconcile pass that found it on Gitea (`core.reconcile`). A new
    comment is its id (Gitea numbers comments across the whole instance). None for the
    rest: a label change is taken in once through the labels kugetsu remembers of the
    issue (`core.intake`), and other changes are not acted on."""
    if isinstance(event, CommentEvent) and event.action == "created":
        return f"comment:{event.comment_id}"
    return None


class Headers(Protocol):
    """A delivery's HTTP headers: a dict, or the web framework's own (case-insensitive)."""

    def get(self, key: str, /) -> str | None: ...


JSON_TYPES = ("application/json",)
FORM_TYPES = ("application/x-www-form-urlencoded",)


def _header(headers: Headers, *names: str) -> str | None:
    for name in names:
        value = headers.get(name)
        if value:
            return value
    return None


def signed_bytes(content_type: str, body: bytes, *, signed: bool = False) -> bytes:
    """The bytes Gitea signed: the body itself, or the JSON in a form's `payload` field.

    A form without its JSON is 400, or 401 when deliveries must be `signed`: then there is
    nothing a signature could cover, and an unsigned caller learns no more than a wrong
    signature tells it.
    """
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in JSON_TYPES or mime.endswith("+json"):
        return body
    if mime in FORM_TYPES:

        def unusable(reason: str) -> WebhookError:
            if signed:
                return WebhookError(401, f"cannot check the signature: {reason}")
            return WebhookError(400, reason)

        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise unusable("form body is not UTF-8") from None
        payload = fields.get("payload")
        if not payload:
            raise unusable("form body has no payload field")
        return payload[0].encode("utf-8")
    raise WebhookError(415, f"unsupported content type {mime or '(none)'}; send application/json")


def verify_signature(secret: str, payload: bytes, headers: Headers) -> None:
    """Raise WebhookError(401) unless the payload carries a valid HMAC-SHA256 of `secret`."""
    expected = hmac.new(secret.encode("utf-8"), payload, hashlib.sha256).hexdigest()
    given = _header(headers, "X-Gitea-Signature", "X-Gogs-Signature")
    if given is None:
        hub = _header(headers, "X-Hub-Signature-256")
        if hub and hub.startswith("sha256="):
            given = hub[len("sha256=") :]
    if not given:
        raise WebhookError(401, "missing signature")
    if not equal_secrets(expected, given.strip().lower()):
        raise WebhookError(401, "signature does not match")


def equal_secrets(a: str, b: str) -> bool:
    """Constant-time comparison of two strings from the outside world.

    `hmac.compare_digest` refuses str with non-ASCII characters (TypeError), which any
    caller can put in a header or a URL; compared as UTF-8 bytes they are simply unequal.
    """
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def delivery_of(headers: Headers, payload: bytes) -> Delivery:
    event = _header(headers, "X-Gitea-Event", "X-Gogs-Event", "X-GitHub-Event")
    if not event:
        raise WebhookError(400, "missing X-Gitea-Event header")
    event_type = (
        _header(headers, "X-Gitea-Event-Type", "X-Gogs-Event-Type", "X-GitHub-Event-Type") or event
    )
    delivery_id = _header(headers, "X-Gitea-Delivery", "X-Gogs-Delivery", "X-GitHub-Delivery")
    if not delivery_id:
        # Gitea always sends one; for other senders the body's hash is a stable stand-in.
        delivery_id = "sha256:" + hashlib.sha256(payload).hexdigest()
    if len(delivery_id) > 200:
        raise WebhookError(400, "delivery id too long")
    return Delivery(delivery_id, event, event_type)


def load_json(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except ValueError as exc:
        # JSONDecodeError, UnicodeDecodeError, and the ValueError of an integer of more
        # than 4,300 digits, which Python refuses to convert
        raise WebhookError(400, f"body is not valid JSON: {exc.__class__.__name__}") from None
    except RecursionError:
        raise WebhookError(400, "body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise WebhookError(400, "body must be a JSON object")
    return data


def repo_of(data: Mapping[str, Any]) -> str | None:
    """The repository a delivery names (`repository.full_name`), whatever its event, when
    it is one Gitea could have named; None otherwise. Recorded with the delivery."""
    repository = data.get("repository")
    full_name = repository.get("full_name") if isinstance(repository, Mapping) else None
    if isinstance(full_name, str) and not names.repo_error(full_name):
        return full_name
    return None


def _get(data: Mapping[str, Any], path: str, kind: type | tuple[type, ...]) -> Any:
    cur: Any = data
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise WebhookError(400, f"missing field {path}")
        cur = cur[part]
    if isinstance(cur, bool) and kind is int:
        raise WebhookError(400, f"field {path} has the wrong type")
    if not isinstance(cur, kind):
        raise WebhookError(400, f"field {path} has the wrong type")
    return cur


def _checked(
    data: Mapping[str, Any], path: str, kind: type, error: Callable[[Any], str | None]
) -> Any:
    """A field that goes into API paths, directory names or SQLite: Gitea's rules or 400."""
    value = _get(data, path, kind)
    reason = error(value)
    if reason:
        raise WebhookError(400, f"field {path}: {reason}")
    return value


def _text(issue: Mapping[str, Any], key: str) -> str:
    value = issue.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise WebhookError(400, f"field issue.{key} has the wrong type")
    return value


def _labels(issue: Mapping[str, Any]) -> tuple[str, ...]:
    labels = issue.get("labels") or []
    if not isinstance(labels, list):
        raise WebhookError(400, "field issue.labels has the wrong type")
    names = []
    for label in labels:
        if not isinstance(label, Mapping) or not isinstance(label.get("name"), str):
            raise WebhookError(400, "field issue.labels has the wrong type")
        names.append(label["name"])
    return tuple(names)


def _pull_head(data: Mapping[str, Any]) -> PullHead | None:
    """The head of the pull request a delivery carries, or None if it carries none."""
    pull = data.get("pull_request")
    if not isinstance(pull, Mapping):
        return None
    head = pull.get("head")
    if not isinstance(head, Mapping) or not isinstance(head.get("ref"), str) or "repo" not in head:
        return None
    repo = head["repo"]  # null: the fork is gone
    full = repo.get("full_name") if isinstance(repo, Mapping) else None
    if full is not None and (not isinstance(full, str) or names.repo_error(full)):
        raise WebhookError(400, "field pull_request.head.repo.full_name is not a repository")
    return PullHead(full, head["ref"], pull.get("allow_maintainer_edit") is True)


def parse(delivery: Delivery, data: Mapping[str, Any]) -> Event:
    """Turn a verified delivery into the event kugetsu acts on, or Ignored with a reason."""
    if delivery.event == "issues":
        action = _get(data, "action", str)
        issue = _get(data, "issue", Mapping)
        is_pull = bool(issue.get("pull_request"))
        sender = _checked(data, "sender.login", str, names.login_error)
        author = issue.get("user")
        # the issue author's permission: the sender's only if the sender wrote the issue
        by_author = isinstance(author, Mapping) and author.get("login") == sender
        return IssueEvent(
            action=action,
            repo=_checked(data, "repository.full_name", str, names.repo_error),
            number=_checked(data, "issue.number", int, names.number_error),
            title=_text(issue, "title"),
            body=_text(issue, "body"),
            labels=_labels(issue),
            is_pull=is_pull,
            sender=sender,
            permission=permissions.in_delivery(data.get("repository")) if by_author else None,
        )
    if delivery.event == "issue_comment":
        action = _get(data, "action", str)
        issue = _get(data, "issue", Mapping)
        return CommentEvent(
            action=action,
            repo=_checked(data, "repository.full_name", str, names.repo_error),
            number=_checked(data, "issue.number", int, names.number_error),
            is_pull=bool(data.get("is_pull")) or bool(issue.get("pull_request")),
            comment_id=_checked(data, "comment.id", int, names.number_error),
            body=_get(data, "comment.body", str),
            sender=_checked(data, "sender.login", str, names.login_error),
            permission=permissions.in_delivery(data.get("repository")),  # the commenter's
            title=_text(issue, "title"),
            labels=_labels(issue),
            pull=_pull_head(data),
        )
    state = REVIEW_STATES.get(delivery.event_type) or _LEGACY_REVIEW_STATES.get(delivery.event)
    if state is not None:
        action = _get(data, "action", str)
        if action != "reviewed":
            return Ignored(f"review action {action} is not one kugetsu acts on")
        review = _get(data, "review", Mapping)
        content = review.get("content")
        if content is not None and not isinstance(content, str):
            raise WebhookError(400, "field review.content has the wrong type")
        return ReviewEvent(
            repo=_checked(data, "repository.full_name", str, names.repo_error),
            number=_checked(data, "pull_request.number", int, names.number_error),
            state=state,
            body=content or "",
            sender=_checked(data, "sender.login", str, names.login_error),
        )
    return Ignored(f"event {delivery.event} is not one kugetsu acts on")
