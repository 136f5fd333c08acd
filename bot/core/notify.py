"""Notifications of a task's changes to an operator's endpoints (`[[notify]]`): pure.

An event is produced in one place, the store's transaction that changes a task's state
(`event_for`), as one outbox row per endpoint that wants it; the worker sends them in
order per endpoint (bot/worker/notify.py). Here: which change is which event, the body
each format sends, and the signature.

json's body is `{"event", "task": {"id", "repo", "issue", "state", "outcome", "pr_number",
"url"}}`, signed as Gitea signs its deliveries: `X-Kugetsu-Signature` is the hex
HMAC-SHA256 of the body with the endpoint's secret. slack gets `{"text"}`; ntfy a line of
text with a title, tags and a click link in its headers.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from bot.core.tasks import State

SIGNATURE_HEADER = "X-Kugetsu-Signature"
#: the outbox id of the notification: the same id means the same event sent again
DELIVERY_HEADER = "X-Kugetsu-Delivery"
EVENT_HEADER = "X-Kugetsu-Event"


class NotifyEvent(enum.StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Format(enum.StrEnum):
    JSON = "json"
    SLACK = "slack"
    NTFY = "ntfy"


#: the state a task enters -> the event that says so
_EVENTS: dict[State, NotifyEvent] = {
    # queued, and queued again: a retry, a retry's back-off, `retry` of a finished task
    State.PENDING: NotifyEvent.QUEUED,
    State.RUNNING: NotifyEvent.STARTED,
    State.COMPLETED: NotifyEvent.COMPLETED,
    State.FAILED: NotifyEvent.FAILED,
    # a request refused before it started (not allowed, set aside): it will not run
    State.REJECTED: NotifyEvent.FAILED,
    State.CANCELLED: NotifyEvent.CANCELLED,
}


def event_for(to_state: State) -> NotifyEvent:
    """The event of a task entering `to_state` (every change of state is one)."""
    return _EVENTS[to_state]


def task_view(
    *,
    task_id: int,
    repo: str,
    issue: int,
    state: str,
    outcome: str | None,
    pr_number: int | None,
) -> dict[str, Any]:
    """The task as an event shows it (without its url, added when it is sent)."""
    return {
        "id": task_id,
        "repo": repo,
        "issue": issue,
        "state": state,
        "outcome": outcome,
        "pr_number": pr_number,
    }


def issue_url(gitea_url: str, repo: str, issue: int) -> str:
    return f"{gitea_url.rstrip('/')}/{repo}/issues/{issue}"


def signature(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def summary(event: str, task: Mapping[str, Any]) -> str:
    """One line saying what happened, for the formats a person reads."""
    text = f"kugetsu task {task['id']} on {task['repo']}#{task['issue']}: {event}"
    if task.get("outcome") and task["outcome"] != event:
        text += f" ({task['outcome']})"
    if task.get("pr_number"):
        text += f", pull request #{task['pr_number']}"
    return text


def request(
    fmt: Format, event: str, task: Mapping[str, Any], secret: str = ""
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one notification. With a secret, every format is signed."""
    headers = {EVENT_HEADER: event}
    if fmt is Format.JSON:
        body = json.dumps({"event": event, "task": dict(task)}).encode()
        headers["Content-Type"] = "application/json"
    elif fmt is Format.SLACK:
        line = summary(event, task)
        if task.get("url"):
            line += f" <{task['url']}>"
        body = json.dumps({"text": line}).encode()
        headers["Content-Type"] = "application/json"
    else:
        body = summary(event, task).encode()
        headers.update(
            {
                "Content-Type": "text/plain; charset=utf-8",
                "Title": f"kugetsu: {event}",
                "Tags": {"failed": "warning", "completed": "white_check_mark"}.get(event, "robot"),
            }
        )
        if task.get("url"):
            headers["Click"] = str(task["url"])
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, body)
    return body, headers
