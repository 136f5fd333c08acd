"""What a reconcile pass finds on Gitea, as the events its lost deliveries carried.

Pure. Gitea never retries a delivery, so whatever it sent while kugetsu was down,
restarting or unreachable is gone. A reconcile pass (`bot.worker.reconcile`) asks Gitea
for the issues of a repository updated since the pass before, then for each one's
timeline since then, and turns what it finds here into the events a delivery would
have carried. They go through the same intake as deliveries (`bot.ingest`), so the
same rules decide, with the same permission checks:

- a comment becomes a new comment's event, under the delivery id that Gitea's delivery
  of it is also recorded under (`core.events.event_key`), so each is taken in once,
  whichever comes first;
- the last change of the trigger label on an issue becomes a label event with the
  labels the issue has now, sent by whoever made that change (the timeline's user is
  the labeller; Gitea lets only writers change labels). Intake starts work only when
  the label is on the issue and was not already, as kugetsu remembers the issue's
  labels: a delivery that did arrive has remembered it, and a pass that queued work
  has too, so the two never both start work. Its delivery id is the timeline entry's
  own, so a later pass that sees the entry again does nothing.

Windows overlap by OVERLAP_SECONDS (Gitea compares `since` in whole seconds, and a
change may be written a moment after the time it carries); what the overlap finds again
is taken in once, as above.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bot.core import names
from bot.core.events import CommentEvent, Delivery, IssueEvent
from bot.core.permissions import UNSHOWN

#: each pass looks this far back before where the last one ended
OVERLAP_SECONDS = 60.0
#: a pass never looks back further than deliveries are remembered (queue.cleanup_age_days)
#: less this much: what it found there could no longer be told from what was delivered
MEMORY_MARGIN_SECONDS = 3600.0
#: the event type that synthetic deliveries are recorded with (`deliveries.event`)
COMMENT_EVENT, LABEL_EVENT = "issue_comment", "issues"
#: the `X-Gitea-Event-Type` of a delivery that a pass made up
EVENT_TYPE = "reconcile"


def window_start(
    first_seen: float, reconciled_to: float | None, now: float, remembered: float
) -> float:
    """Where a pass over a repository starts looking (a Unix time): where the last pass
    ended less the overlap, or for the first pass when kugetsu first served the
    repository (what happened before is not kugetsu's to act on). Never further back
    than `remembered` seconds (how long deliveries are kept) less MEMORY_MARGIN_SECONDS:
    older events could no longer be told from those that were delivered."""
    start = first_seen if reconciled_to is None else reconciled_to - OVERLAP_SECONDS
    return max(start, now - max(remembered - MEMORY_MARGIN_SECONDS, OVERLAP_SECONDS))


def rfc3339(when: float) -> str:
    """A Unix time as Gitea's `since` takes it, in whole seconds (rounded down)."""
    return datetime.fromtimestamp(math.floor(when), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> float | None:
    """An RFC 3339 time from Gitea as a Unix time, or None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class Found:
    """An event a pass found, with the delivery it is taken in as, and when it happened
    (its timeline entry's time and id: Gitea numbers comments and events in one
    sequence)."""

    at: float
    entry_id: int
    delivery: Delivery
    event: CommentEvent | IssueEvent


def _number(value: Any) -> int | None:
    return None if names.number_error(value) else int(value)


def _login(entry: Mapping[str, Any]) -> str | None:
    user = entry.get("user")
    login = user.get("login") if isinstance(user, Mapping) else None
    return None if names.login_error(login) else login


def _label_name(entry: Mapping[str, Any]) -> str | None:
    label = entry.get("label")
    return label.get("name") if isinstance(label, Mapping) else None


def _labels(issue: Mapping[str, Any]) -> tuple[str, ...]:
    labels = issue.get("labels")
    return tuple(
        label["name"]
        for label in (labels if isinstance(labels, list) else ())
        if isinstance(label, Mapping) and isinstance(label.get("name"), str)
    )


def found(
    repo: str,
    issue: Mapping[str, Any],
    timeline: Iterable[Any],
    *,
    label: str,
    since: float,
    bot_login: str | None = None,
) -> list[Found]:
    """The events of one issue's `timeline` entries created at or after `since`: each
    new comment, and the last change of the trigger `label`. kugetsu's own entries
    (`bot_login`: intake ignores them) and entries that are not what Gitea sends (no
    id, no user, no time) are left out."""
    number = _number(issue.get("number"))
    if number is None:
        return []
    is_pull = bool(issue.get("pull_request"))
    title = issue["title"] if isinstance(issue.get("title"), str) else ""
    labels = _labels(issue)
    since = math.floor(since)
    events: list[Found] = []
    label_change: Found | None = None
    for entry in timeline:
        if not isinstance(entry, Mapping):
            continue
        at, entry_id, login = (
            parse_time(entry.get("created_at")),
            _number(entry.get("id")),
            _login(entry),
        )
        if at is None or at < since or entry_id is None or login in (None, bot_login):
            continue
        kind = entry.get("type")
        if kind == "comment" and isinstance(entry.get("body"), str):
            events.append(
                Found(
                    at,
                    entry_id,
                    Delivery(f"comment:{entry_id}", COMMENT_EVENT, EVENT_TYPE),
                    CommentEvent(
                        action="created",
                        repo=repo,
                        number=number,
                        is_pull=is_pull,
                        comment_id=entry_id,
                        body=entry["body"],
                        sender=login,
                        permission=UNSHOWN,
                        title=title,
                        labels=labels,
                    ),
                )
            )
        elif kind == "label" and _label_name(entry) == label:
            label_change = Found(
                at,
                entry_id,
                Delivery(f"label:{entry_id}", LABEL_EVENT, EVENT_TYPE),
                IssueEvent(
                    action="label_updated",
                    repo=repo,
                    number=number,
                    title=title,
                    body="",
                    labels=labels,
                    is_pull=is_pull,
                    sender=login,
                    permission=None,  # intake takes a labeller to have write access
                ),
            )
    if label_change is not None:
        events.append(label_change)
    return sorted(events, key=lambda f: (f.at, f.entry_id))
