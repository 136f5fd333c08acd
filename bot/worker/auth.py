"""Who may ask kugetsu for work: the requester's permission, asked of Gitea and cached.

Gitea tells a user's permission on a repository only to its admins. When kugetsu is not
one, each request is judged by what its signed delivery shows (`core.permissions.shown`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from bot.config import Config
from bot.core import names, permissions, render
from bot.gitea import Forbidden, GiteaAPI, GiteaError, NotFound, Unauthorized

log = logging.getLogger(__name__)


class AuthCache:
    """Who may ask kugetsu for work, cached for a few minutes per repo and user."""

    #: cached when Gitea will not say: the bot is not an admin of the repository
    NOT_ADMIN = "not-admin"

    def __init__(self, config: Config, gitea: GiteaAPI, clock: Callable[[], float]):
        self.config, self.gitea, self.clock = config, gitea, clock
        self._cache: dict[tuple[str, str], tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._warned_fallback = False

    def _asked(self, repo: str, login: str) -> str | None:
        """Gitea's answer: a permission, NOT_ADMIN, or None when it can't be asked now."""
        key = (repo, login)
        now = self.clock()
        with self._lock:
            cached = self._cache.get(key)
            if cached and now - cached[0] < self.config.queue.authorization_cache_seconds:
                return cached[1]
        owner, name = names.split_repo(repo)
        try:
            perm = self.gitea.get_permission(owner, name, login)
        except (Forbidden, Unauthorized):
            # Only repository admins may read other users' permissions.
            if not self._warned_fallback:
                log.warning(
                    "cannot read collaborator permissions (kugetsu is not a "
                    "repository admin); judging by what each request shows",
                    extra={"repo": repo},
                )
                self._warned_fallback = True
            perm = self.NOT_ADMIN
        except NotFound:
            perm = "none"
        except GiteaError as exc:
            log.warning(
                "permission check deferred", extra={"repo": repo, "user": login, "error": str(exc)}
            )
            return None
        with self._lock:
            self._cache[key] = (now, perm)
        return perm

    def permission(self, repo: str, login: str, hint: str | None) -> str | None:
        """The user's permission, or None when Gitea can't be asked right now.

        Without admin rights, what the request shows (`hint`): see permissions.shown.
        """
        perm = self._asked(repo, login)
        return permissions.shown(hint)[0] if perm == self.NOT_ADMIN else perm

    def may_read(self, repo: str, login: str | None, hint: str | None) -> bool:
        """Whether the user can read the repository (when Gitea cannot say now: no)."""
        if not login:
            return False
        return permissions.at_least(self.permission(repo, login, hint), "read")

    def check(self, repo: str, login: str, hint: str | None) -> tuple[bool, str] | None:
        """(allowed, the permission or the reason for the refusal), or None when Gitea
        cannot be asked now."""
        triggers = self.config.triggers
        if triggers.allowed_users and login not in triggers.allowed_users:
            return False, render.not_allowed_user(login)
        perm, exact = self._asked(repo, login), True
        if perm is None:
            return None
        if perm == self.NOT_ADMIN:
            perm, exact = permissions.shown(hint)
        if not permissions.at_least(perm, triggers.min_permission):
            if not exact:
                return False, render.cannot_check(login, triggers.min_permission, repo)
            return False, render.needs_permission(login, triggers.min_permission, repo, perm)
        return True, perm
