"""Sending one notification to an operator's endpoint (`[[notify]]`) over HTTP.

The body and headers come from `core.notify`; here they are posted, with the endpoint's
timeout. Anything but a 2xx answer, or no answer, raises `NotSent`: the notification lane
(bot/worker/notify.py) tries it again later. Endpoints are named in errors and logs by
their `name`, never by their URL, which may hold a secret (a Slack webhook, an ntfy topic).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping

import requests

from bot.config import Config, NotifyConfig
from bot.core import notify
from bot.core.outbox import OutboxItem
from bot.gitea import environment_session

log = logging.getLogger(__name__)

Post = Callable[..., requests.Response]


class NotSent(Exception):
    """The endpoint did not take the notification (no answer, or not 2xx)."""


class UnknownEndpoint(Exception):
    """The notification is for an endpoint no longer in the config."""


class Sender:
    """Posts notifications to the configured endpoints. The constructor does no I/O."""

    def __init__(self, config: Config, *, post: Post | None = None):
        self.config = config
        self.endpoints: Mapping[str, NotifyConfig] = {n.id: n for n in config.notify}
        self._sessions: dict[str, requests.Session] = {}
        self._post = post

    def endpoint(self, endpoint_id: str | None) -> NotifyConfig:
        found = self.endpoints.get(endpoint_id or "")
        if found is None:
            raise UnknownEndpoint(f"endpoint {endpoint_id} is no longer configured")
        return found

    def request(self, item: OutboxItem) -> tuple[NotifyConfig, bytes, dict[str, str]]:
        """The endpoint, body and headers of an outbox item of kind NOTIFY."""
        endpoint = self.endpoint(item.endpoint)
        stored = json.loads(item.body)
        task = dict(stored["task"])
        task["url"] = notify.issue_url(self.config.gitea.url, task["repo"], task["issue"])
        body, headers = notify.request(endpoint.format, stored["event"], task, endpoint.secret)
        headers[notify.DELIVERY_HEADER] = str(item.id)
        return endpoint, body, headers

    def send(self, item: OutboxItem) -> None:
        endpoint, body, headers = self.request(item)
        post = self._post or self._session_post
        try:
            resp = post(endpoint.url, data=body, headers=headers, timeout=endpoint.timeout_seconds)
        except requests.RequestException as exc:
            raise NotSent(f"{endpoint.shown}: no answer ({type(exc).__name__})") from None
        status = resp.status_code
        resp.close()
        if not 200 <= status < 300:
            raise NotSent(f"{endpoint.shown}: answered HTTP {status}")

    def _session_post(self, url: str, **kwargs: object) -> requests.Response:
        # one session per endpoint: each keeps its connection, with its own proxy settings
        session = self._sessions.get(url)
        if session is None:
            session = self._sessions[url] = environment_session(url)
        return session.post(url, **kwargs)  # type: ignore[arg-type]
