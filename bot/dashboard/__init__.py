"""The dashboard: people sign in with their Gitea account, watch agents live and stop
or retry tasks from a browser (`[dashboard]` in the config; README "Dashboard").

It lives in the receiver process beside the webhook, and keeps out of its way:

- every page and stream runs on threads of its own: the receiver's HTTP server gets
  `http_threads(config)` more threads than the webhook needs, pages take at most
  PAGE_SLOTS of them and live logs at most `dashboard.max_log_streams` (each holds one
  for as long as it is watched), and past either limit a request is answered at once
  (a page: 503; a live log: an event saying so, and the browser retries), so the
  webhook's threads are never taken;
- it reads the database without the store's write lock (SQLite's write-ahead log lets
  readers and the writer go on together), and writes only when someone stops or
  retries a task, as the command line does;
- Gitea is asked with the user's own token, with a short timeout and no retries, from
  the page's own thread.

`auth` signs people in (OAuth2 with PKCE) and keeps their sessions, `access` asks Gitea
what they may see and do, `views` and `charts` turn tasks into what the pages show,
`logstream` follows a log (read through `bot.tasklog`) as server-sent events, `comment`
renders a tracking comment safely, and `routes` puts them on the Flask app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from bot.config import Config

if TYPE_CHECKING:
    from flask import Flask

    from bot.store import Store

#: dashboard pages served at once at most (each may wait for Gitea)
PAGE_SLOTS = 8


def http_threads(config: Config) -> int:
    """Threads the receiver's HTTP server needs for the dashboard, beyond its own."""
    if not config.dashboard.enabled:
        return 0
    return PAGE_SLOTS + config.dashboard.max_log_streams


def register(app: Flask, config: Config, store: Store, *, wake: Callable[[], None]) -> None:
    """Put the dashboard on the receiver's Flask app, if `[dashboard] enabled`."""
    if not config.dashboard.enabled:
        return
    from bot.dashboard.routes import Dashboard

    Dashboard(config, store, wake=wake).register(app)
