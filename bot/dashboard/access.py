"""What a signed-in user may see and do, as Gitea says with the user's own token.

A user sees the tasks of the repositories they can read, asked of Gitea
(`GET /repos/{owner}/{repo}`: 404 when they cannot read it, else `permissions`) and
kept for `dashboard.access_cache_seconds`. A Gitea site admin sees every repository.
Stop and retry need `triggers.min_permission`, asked again at the moment of acting.
What cannot be checked (Gitea away) is not shown: the page says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from bot.config import Config
from bot.core import names, permissions
from bot.dashboard.auth import Session, Sessions
from bot.gitea import (
    GiteaClient,
    GiteaError,
    GiteaOAuth,
    JSONObject,
    NotFound,
    OAuthError,
    Unauthorized,
    environment_session,
)

log = logging.getLogger(__name__)

#: Gitea calls at once for one page
CHECK_THREADS = 4
#: a Gitea call made for a page waits this long at most
CALL_TIMEOUT_SECONDS = 5.0
#: issue titles kept (shared by all users: a title is shown only to those who can read it)
MAX_TITLES = 5_000
TITLE_SECONDS = 600.0
#: a permission that could not be learnt now
UNKNOWN = "unknown"


class SignedOut(Exception):
    """Gitea no longer accepts the user's token and it could not be refreshed."""


@dataclass(frozen=True)
class Visible:
    """The repositories a user may see: all of them, or these."""

    everything: bool
    repos: frozenset[str] = frozenset()
    #: repositories Gitea could not be asked about now (shown to nobody until it can)
    unchecked: tuple[str, ...] = ()

    @property
    def query_repos(self) -> tuple[str, ...] | None:
        """For `store.TaskQuery.repos`: None for every repository."""
        return None if self.everything else tuple(sorted(self.repos))

    def can_read(self, repo: str) -> bool:
        return self.everything or repo in self.repos


def permission_of(repo: JSONObject, login: str) -> str:
    """The user's permission as `GET /repos/{o}/{r}` with their token shows it."""
    owner = repo.get("owner") if isinstance(repo, dict) else None
    if isinstance(owner, dict) and owner.get("login") == login:
        return "owner"
    return permissions.in_delivery(repo) or "read"


class Access:
    def __init__(
        self,
        config: Config,
        repos: Callable[[], list[str]],
        sessions: Sessions,
        oauth: GiteaOAuth,
        *,
        clock: Callable[[], float] = time.time,
    ):
        self.config, self._all_repos, self.sessions, self.oauth = config, repos, sessions, oauth
        self.clock = clock
        self._http: requests.Session = environment_session(config.gitea.url)
        self._pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="dashboard-gitea")
        self._lock = threading.Lock()
        self._titles: dict[tuple[str, int], tuple[float, str]] = {}

    def client(self, session: Session) -> GiteaClient:
        """Gitea as the user: their token, a short timeout, no retries (a person waits)."""
        self._fresh_token(session)
        return GiteaClient(
            self.config.gitea.url,
            session.token,
            timeout=CALL_TIMEOUT_SECONDS,
            retries=0,
            session=self._http,
        )

    def _fresh_token(self, session: Session, *, force: bool = False) -> None:
        """Refresh the user's access token when it has run out (or Gitea refused it)."""
        if not force and session.token_expires > self.clock() + 30:
            return
        with session.lock:
            if not force and session.token_expires > self.clock() + 30:
                return
            try:
                tokens = self.oauth.refresh(session.refresh_token)
            except OAuthError as exc:
                log.info("dashboard sign-in ended", extra={"user": session.login, "why": str(exc)})
                self.sessions.drop(session)
                raise SignedOut(str(exc)) from None
            session.token = tokens["access_token"]
            session.refresh_token = tokens.get("refresh_token") or session.refresh_token
            session.token_expires = self.clock() + float(tokens.get("expires_in") or 3600)

    def known_repos(self) -> list[str]:
        """Every repository with tasks (read each time: a skip scan, as many steps as
        there are repositories, so a new repository's first task shows at once)."""
        return self._all_repos()

    # -- permissions

    def _ask(self, session: Session, repo: str) -> str:
        """The user's permission on `repo` from Gitea: none when it is not found for
        them, UNKNOWN when Gitea cannot say now. SignedOut when the token is refused."""
        owner, name = names.split_repo(repo)
        for attempt in (0, 1):
            try:
                return permission_of(self.client(session).get_repo(owner, name), session.login)
            except NotFound:
                return "none"
            except Unauthorized:
                if attempt:
                    self.sessions.drop(session)
                    raise SignedOut("Gitea refused the token") from None
                self._fresh_token(session, force=True)
            except (GiteaError, ValueError) as exc:
                log.warning(
                    "dashboard could not ask Gitea",
                    extra={"user": session.login, "repo": repo, "error": str(exc)},
                )
                return UNKNOWN
        return UNKNOWN  # pragma: no cover - the loop returns or raises

    def permission(self, session: Session, repo: str, *, fresh: bool = False) -> str:
        """The user's permission on `repo` (none, read, write, admin, owner, or UNKNOWN),
        from the cache unless `fresh` or stale."""
        now = self.clock()
        with session.lock:
            cached = session.access.get(repo)
        if not fresh and cached and now - cached[0] < self.config.dashboard.access_cache_seconds:
            return cached[1]
        perm = self._ask(session, repo)
        if perm != UNKNOWN:
            with session.lock:
                session.access[repo] = (now, perm)
        return perm

    def visible(self, session: Session) -> Visible:
        """The repositories the user may see; each asked of Gitea unless cached."""
        if session.is_admin:
            return Visible(True)
        repos = self.known_repos()
        now, ttl = self.clock(), self.config.dashboard.access_cache_seconds
        with session.lock:
            stale = [r for r in repos if not (c := session.access.get(r)) or now - c[0] >= ttl]
        answers = dict(zip(stale, self._map(session, stale), strict=True))
        readable, unchecked = set(), []
        for repo in repos:
            perm = answers.get(repo) or self.permission(session, repo)
            if perm == UNKNOWN:
                unchecked.append(repo)
            elif permissions.at_least(perm, "read"):
                readable.add(repo)
        return Visible(False, frozenset(readable), tuple(unchecked))

    def _map(self, session: Session, repos: Iterable[str]) -> list[str]:
        repos = list(repos)
        if len(repos) <= 1:
            return [self.permission(session, r, fresh=True) for r in repos]
        return list(self._pool.map(lambda r: self.permission(session, r, fresh=True), repos))

    def may_act(self, session: Session, repo: str, *, fresh: bool = False) -> tuple[bool, str]:
        """(allowed, why not) for stop and retry: `triggers.min_permission` on the
        repository (and the allowed users list, if there is one), as the commands need."""
        triggers = self.config.triggers
        if triggers.allowed_users and session.login not in triggers.allowed_users:
            return False, f"@{session.login} is not on kugetsu's list of allowed users"
        perm = self.permission(session, repo, fresh=fresh)
        if perm == UNKNOWN:
            return False, "Gitea could not be asked for your permission; try again"
        if not permissions.at_least(perm, triggers.min_permission):
            return False, f"this needs {triggers.min_permission} access to {repo} (you have {perm})"
        return True, ""

    # -- issue titles

    def titles(
        self, session: Session, refs: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], str]:
        """Issue titles as the user may read them (cached for all; a title is only shown
        where the user can read the repository). Missing where Gitea cannot say."""
        now = self.clock()
        wanted, found = [], {}
        with self._lock:
            for ref in dict.fromkeys(refs):
                cached = self._titles.get(ref)
                if cached and now - cached[0] < TITLE_SECONDS:
                    found[ref] = cached[1]
                else:
                    wanted.append(ref)
        if not wanted:
            return found
        client = self.client(session)

        def title(ref: tuple[str, int]) -> str | None:
            owner, name = names.split_repo(ref[0])
            try:
                return str(client.get_issue(owner, name, ref[1]).get("title") or "")
            except (GiteaError, ValueError, AttributeError):
                return None

        for ref, text in zip(wanted, self._pool.map(title, wanted), strict=True):
            if text is None:
                continue
            found[ref] = text
            with self._lock:
                self._titles[ref] = (now, text)
                while len(self._titles) > MAX_TITLES:
                    self._titles.pop(next(iter(self._titles)))
        return found

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
