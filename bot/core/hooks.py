"""The Gitea webhook kugetsu needs, and how an installed one differs from it.

Pure: Gitea's hook objects (as `GET .../hooks` returns them) in, lines and request
bodies out. `kugetsu webhook install` writes what `create_body` / `edit_body` give,
`kugetsu webhook list` and `kugetsu doctor` show what `differences` finds.

What Gitea 1.26 does with hooks, and what is built on it here:

- `active` defaults to false on create, so every body says `"active": true`;
- `config.url` and `config.content_type` are required; `content_type` is `json` or `form`;
- the secret is never returned: an installed hook's secret cannot be compared, only set
  again (and proved by a test delivery, `kugetsu doctor --deliver-test`);
- an edit replaces the event list, and an empty list means `push` only;
- the events a hook answers with are the single ones (`issue_label`, ...), never the
  groups (`issues`, `pull_request`) a request may name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: what kugetsu acts on: labels on issues, comments on issues and pull requests, and
#: reviews of pull requests
EVENTS = ("issue_label", "issue_comment", "pull_request_comment", "pull_request_review")
#: the name kugetsu gives its hook, so that it finds it again after its URL changed
NAME = "kugetsu"
#: the hook type whose payloads kugetsu reads
TYPE = "gitea"
CONTENT_TYPE = "json"
#: the path of the receiver's webhook route under `server.public_url`
WEBHOOK_PATH = "/webhook"


def url_for(public_url: str) -> str:
    """The URL Gitea delivers to: `server.public_url` + /webhook ("" without one)."""
    return public_url.rstrip("/") + WEBHOOK_PATH if public_url else ""


def _config(hook: Mapping[str, Any]) -> Mapping[str, Any]:
    config = hook.get("config")
    return config if isinstance(config, Mapping) else {}


def hook_url(hook: Mapping[str, Any]) -> str:
    return str(_config(hook).get("url") or "")


def ours(hooks: Iterable[Mapping[str, Any]], url: str) -> list[Mapping[str, Any]]:
    """The hooks that are kugetsu's: named `NAME`, or delivering to `url`; the named one
    first. More than one means each event arrives more than once."""
    named = [h for h in hooks if h.get("name") == NAME]
    rest = [h for h in hooks if h.get("name") != NAME and url and hook_url(h) == url]
    return named + rest


def differences(hook: Mapping[str, Any], url: str) -> list[str]:
    """How an installed hook differs from what kugetsu needs, one phrase each; [] when it
    is right (as far as Gitea shows it: never the secret)."""
    found = []
    if hook.get("type") != TYPE:
        found.append(f"type is {hook.get('type')!r}, not {TYPE!r}")
    if hook_url(hook) != url:
        found.append(f"URL is {hook_url(hook) or '(none)'}, not {url}")
    content_type = _config(hook).get("content_type")
    if content_type != CONTENT_TYPE:
        found.append(f"content type is {content_type or '(none)'}, not {CONTENT_TYPE}")
    if hook.get("active") is not True:
        found.append("not active (Gitea makes a hook inactive unless told otherwise)")
    events = events_of(hook)
    missing = [e for e in EVENTS if e not in events]
    if missing:
        found.append("events missing: " + ", ".join(missing))
    if hook.get("branch_filter") not in (None, "", "*"):
        found.append(f"branch filter {hook.get('branch_filter')!r} (should be empty)")
    return found


def events_of(hook: Mapping[str, Any]) -> list[str]:
    events = hook.get("events")
    return [e for e in events if isinstance(e, str)] if isinstance(events, list) else []


def describe(hook: Mapping[str, Any]) -> str:
    """One line for an installed hook: its id, URL, content type, state and events."""
    events = events_of(hook)
    state = "active" if hook.get("active") is True else "inactive"
    return (
        f"hook {hook.get('id')} ({hook.get('type')}) {hook_url(hook) or '(no URL)'}, "
        f"{_config(hook).get('content_type') or '?'}, {state}, "
        f"events {', '.join(sorted(events)) or '(none)'}"
    )


def create_body(url: str, secret: str) -> dict[str, Any]:
    """POST .../hooks: the hook kugetsu needs."""
    return {
        "type": TYPE,
        "name": NAME,
        "active": True,
        "events": list(EVENTS),
        "branch_filter": "",
        "config": {"url": url, "content_type": CONTENT_TYPE, "secret": secret},
    }


def edit_body(url: str, secret: str) -> dict[str, Any]:
    """PATCH .../hooks/{id}: the same, in place. Every field is set, the secret too, since
    Gitea never shows it."""
    return {
        "name": NAME,
        "active": True,
        "events": list(EVENTS),
        "branch_filter": "",
        "config": {"url": url, "content_type": CONTENT_TYPE, "secret": secret},
    }
