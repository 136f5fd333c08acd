"""GiteaClient: the only module that knows Gitea's URLs, auth, pagination and status codes.

Every API call goes through `GiteaClient._request`, which adds the token header,
the timeout and retries, and turns HTTP status codes into the typed errors below.
Callers depend on the narrow `GiteaAPI` protocol so tests can pass a fake.

The token is sent only as an `Authorization: token ...` header. It never appears in
a URL, a log line or an exception message.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import quote

import requests
from urllib3.exceptions import NewConnectionError

from bot.core import metrics, names
from bot.redact import redact

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
RETRY_STATUSES = frozenset({500, 502, 503, 504})
#: open pull requests are listed this many at a time, for at most this many pages
PULL_PAGE_SIZE = 50
MAX_PULL_PAGES = 20
#: a pull request's reviews are listed this many at a time, for at most this many pages
REVIEW_PAGE_SIZE = 50
MAX_REVIEW_PAGES = 20
#: issues and timeline entries are listed this many at a time (Gitea's largest page)
LIST_PAGE_SIZE = 50
#: a proxy's "bad gateway" / "gateway timeout": Gitea behind it may have applied the request
GATEWAY_STATUSES = frozenset({502, 504})
MAX_BACKOFF_SECONDS = 30.0


class GiteaError(Exception):
    """A Gitea API call failed. `status` is the HTTP status (None if no answer)."""

    def __init__(
        self, message: str, *, status: int | None = None, method: str = "", path: str = ""
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.method = method
        self.path = path

    def __str__(self) -> str:
        where = f"{self.method} {self.path}".strip()
        status = "no response" if self.status is None else f"HTTP {self.status}"
        detail = f": {self.message}" if self.message else ""
        return f"Gitea {where} failed ({status}){detail}"


class Unauthorized(GiteaError):
    """401: the token is missing, wrong or expired."""


class Forbidden(GiteaError):
    """403: the token's user may not do this (or the token lacks a scope)."""


class NotFound(GiteaError):
    """404: the repository, issue, comment, branch or route does not exist."""


class Conflict(GiteaError):
    """409: e.g. an open pull request already exists for the same head and base."""


class Unprocessable(GiteaError):
    """422: Gitea rejected the request body (e.g. head == base)."""


class Locked(GiteaError):
    """423: the repository is archived."""


class ServerError(GiteaError):
    """5xx, after the retries (if the status was retryable) ran out."""


class Unreachable(GiteaError):
    """No HTTP answer: connection refused or reset, or timed out, after the retries."""


class InvalidPath(GiteaError):
    """A value that cannot be one segment of an API path: nothing was sent."""

    def __str__(self) -> str:
        return f"not sent to Gitea: {self.message}"


_ERRORS_BY_STATUS: dict[int, type[GiteaError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: Unprocessable,
    423: Locked,
}


#: a JSON object as Gitea sends it: a user, an issue, a comment, a pull request
JSONObject = dict[str, Any]


class GiteaAPI(Protocol):
    """The calls kugetsu makes to Gitea. `GiteaClient` implements it; test fakes may too."""

    def get_user(self) -> JSONObject: ...

    def get_issue(self, owner: str, repo: str, number: int) -> JSONObject: ...

    def create_comment(self, owner: str, repo: str, number: int, body: str) -> JSONObject: ...

    def edit_comment(
        self, owner: str, repo: str, comment_id: int, body: str
    ) -> JSONObject | None: ...

    def list_comments(self, owner: str, repo: str, number: int) -> list[JSONObject]: ...

    def add_reaction(self, owner: str, repo: str, comment_id: int, content: str) -> None: ...

    def get_permission(self, owner: str, repo: str, login: str) -> str: ...

    def find_pull(self, owner: str, repo: str, base: str, head: str) -> JSONObject | None: ...

    def changed_issues(
        self, owner: str, repo: str, since: str
    ) -> tuple[list[JSONObject], float | None]: ...

    def timeline(self, owner: str, repo: str, number: int, since: str) -> list[JSONObject]: ...

    def get_pull(self, owner: str, repo: str, number: int) -> JSONObject: ...

    def find_open_pull(self, owner: str, repo: str, base: str, head: str) -> JSONObject | None: ...

    def create_pull(
        self, owner: str, repo: str, *, head: str, base: str, title: str, body: str
    ) -> JSONObject: ...

    def edit_pull(
        self,
        owner: str,
        repo: str,
        number: int,
        *,
        title: str | None = None,
        body: str | None = None,
        state: str | None = None,
    ) -> JSONObject: ...

    def list_reviews(self, owner: str, repo: str, number: int) -> list[JSONObject]: ...

    def review_comments(
        self, owner: str, repo: str, number: int, review_id: int
    ) -> list[JSONObject]: ...

    def resolve_review_comment(self, owner: str, repo: str, comment_id: int) -> None: ...


def _seg(value: str | int, *, safe: str = "") -> str:
    """One segment of an API path, so that no value can change the path.

    Every segment goes through here. An int must be an id or a number (1..2^63-1); a
    string is quoted ('/' too) and must not be empty, "." or "..": quote() leaves dots
    alone, and Gitea or a proxy in front of it may resolve them.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidPath(f"{type(value).__name__} {names.shown(value)} in an API path")
    if isinstance(value, int):
        error = names.number_error(value, "a number in an API path")
        if error:
            raise InvalidPath(error)
        return str(value)
    if value in ("", ".", ".."):
        raise InvalidPath(f"{value!r} as a segment of an API path")
    return quote(value, safe=safe)


def _segs(value: str) -> str:
    """A value that Gitea's route takes as several segments (a branch with '/'): each
    part is a segment of its own."""
    if not isinstance(value, str):
        raise InvalidPath(f"{type(value).__name__} {names.shown(value)} in an API path")
    return "/".join(_seg(part, safe=":") for part in value.split("/"))


def _repo_path(owner: str, repo: str) -> str:
    return f"/repos/{_seg(owner)}/{_seg(repo)}"


def _date_header(value: str | None) -> float | None:
    """An HTTP `Date` header as a Unix time, or None if there is none that reads."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _may_have_been_sent(exc: requests.RequestException) -> bool:
    """True unless the error proves the request never reached the server.

    A refused or unresolvable connection (and a connect timeout) happens before any
    byte of the request is written; a read timeout or a reset mid-response does not.
    """
    if isinstance(exc, requests.ConnectTimeout):
        return False
    if isinstance(exc, requests.ConnectionError) and not isinstance(exc, requests.ReadTimeout):
        reason = exc.args[0] if exc.args else None
        reason = getattr(reason, "reason", reason)
        if isinstance(reason, (NewConnectionError, ConnectionRefusedError)):
            return False
    return True


def environment_session(base_url: str) -> requests.Session:
    """A requests session that reads the environment once, here, instead of on every call.

    With `trust_env` on (requests' default), every request looks up the proxy variables,
    the CA bundle variables and ~/.netrc again. That is about a fifth of the client's CPU
    per call, and a ~/.netrc entry for the Gitea host would silently replace the token
    header with that entry's basic auth. The proxies for `base_url` (NO_PROXY included)
    and REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE are honoured as requests would honour them;
    .netrc is not used, since the token is the only credential.
    """
    session = requests.Session()
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    return session


class GiteaClient:
    """Talks to one Gitea instance with one token. The constructor does no I/O.

    `retries` is the number of extra attempts after the first one for connection
    errors, timeouts and HTTP 500/502/503/504; the wait before extra attempt *n*
    is `backoff * 2 ** (n - 1)` seconds (capped at 30). A POST is not retried once
    it may have reached the server without an answer (read timeout, reset, or a
    proxy's 502/504), since Gitea may have applied it.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10,
        retries: int = 3,
        backoff: float = 0.5,
        session: requests.Session | None = None,
        sleep: Callable[[float], Any] = time.sleep,
        tally: metrics.Tally | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_url = self.base_url + API_PREFIX
        self._token = token
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self._session = session if session is not None else environment_session(self.base_url)
        self._sleep = sleep
        #: every HTTP request sent, by method and answer (`gitea_requests` on /metrics):
        #: counted in memory here, written to the database in batches by its owner
        self.tally = tally if tally is not None else metrics.Tally()

    def __repr__(self) -> str:
        return f"GiteaClient({self.base_url!r})"

    # -- the funnel -------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return redact(text, (self._token,))

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        ok: tuple[int, ...] = (200, 201, 204),
        auth: bool = True,
        api: bool = True,
    ) -> requests.Response:
        """Send one API call (path relative to /api/v1; with `api` False, relative to
        Gitea's root) and return the response. `auth` False sends no token.

        Returns only when the status is in `ok`; otherwise raises a `GiteaError`.
        """
        method = method.upper()
        url = (self.api_url if api else self.base_url) + path
        headers = {"Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"token {self._token}"
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                resp = self._session.request(
                    method,
                    url,
                    headers=headers,
                    json=json,
                    params=params,
                    timeout=self.timeout,
                )
            except requests.RequestException as exc:
                self.tally.add(metrics.gitea_request(method, None))
                if not isinstance(exc, (requests.ConnectionError, requests.Timeout)):
                    raise GiteaError(
                        self._scrub(f"request failed: {type(exc).__name__}"),
                        method=method,
                        path=path,
                    ) from exc
                kind = type(exc).__name__
                retryable = not (method == "POST" and _may_have_been_sent(exc))
                give_up = last or not retryable
                log.warning(
                    "gitea request failed without a response",
                    extra={
                        "method": method,
                        "path": path,
                        "error": kind,
                        "attempt": attempt,
                        "retry": not give_up,
                    },
                )
                if give_up:
                    why = f"{kind} after {attempt} attempt(s)"
                    if not retryable and not last:
                        why += "; not retried because the POST may have been applied"
                    raise Unreachable(why, status=None, method=method, path=path) from exc
                self._sleep(self._delay(attempt))
                continue

            status = resp.status_code
            self.tally.add(metrics.gitea_request(method, status))
            log.debug(
                "gitea request",
                extra={"method": method, "path": path, "status": status, "attempt": attempt},
            )
            if status in ok:
                return resp
            if (
                status in RETRY_STATUSES
                and not last
                and not (method == "POST" and status in GATEWAY_STATUSES)
            ):
                log.warning(
                    "gitea server error, retrying",
                    extra={"method": method, "path": path, "status": status, "attempt": attempt},
                )
                resp.close()
                self._sleep(self._delay(attempt))
                continue
            raise self._error(method, path, resp)
        raise AssertionError("unreachable")  # pragma: no cover

    def _delay(self, attempt: int) -> float:
        return float(min(self.backoff * (2 ** (attempt - 1)), MAX_BACKOFF_SECONDS))

    def _error(self, method: str, path: str, resp: requests.Response) -> GiteaError:
        status = resp.status_code
        try:
            data = resp.json()
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            message = data["message"]
        elif resp.headers.get("Content-Type", "").startswith("text/plain") and resp.content:
            # git's HTTP routes answer in plain text ("User permission denied", a scope)
            message = resp.text.strip().splitlines()[0][:300] if resp.text.strip() else ""
        else:
            message = (resp.reason or "").strip() if resp.content else ""
        message = self._scrub(message)
        if status >= 500:
            cls: type[GiteaError] = ServerError
        else:
            cls = _ERRORS_BY_STATUS.get(status, GiteaError)
        if status >= 400:
            log.info(
                "gitea request rejected", extra={"method": method, "path": path, "status": status}
            )
        return cls(message, status=status, method=method, path=path)

    def _json(self, method: str, path: str, resp: requests.Response) -> Any:
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise GiteaError(
                "response is not JSON", status=resp.status_code, method=method, path=path
            ) from None

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, **kwargs)
        return self._json(method, path, resp)

    def _object(self, method: str, path: str, **kwargs: Any) -> JSONObject:
        """An answer that must be a JSON object; GiteaError if it is anything else."""
        found = self._object_or_none(method, path, **kwargs)
        if found is None:
            raise GiteaError("response is not a JSON object", method=method, path=path)
        return found

    def _object_or_none(self, method: str, path: str, **kwargs: Any) -> JSONObject | None:
        """A JSON object, or None for an empty answer (204)."""
        value = self._call(method, path, **kwargs)
        if value is not None and not isinstance(value, dict):
            raise GiteaError("response is not a JSON object", method=method, path=path)
        return value

    def _objects(self, method: str, path: str, **kwargs: Any) -> list[JSONObject]:
        """An answer that must be a list of JSON objects (an empty answer is none)."""
        return self._as_objects(method, path, self._call(method, path, **kwargs))

    @staticmethod
    def _as_objects(method: str, path: str, value: Any) -> list[JSONObject]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise GiteaError("response is not a list of JSON objects", method=method, path=path)
        return value

    def _pages(
        self,
        path: str,
        *,
        size: int,
        most: int | None = None,
        params: Mapping[str, Any] | None = None,
        first: list[JSONObject] | None = None,
    ) -> Iterator[list[JSONObject]]:
        """The pages of a paged listing, in order, until one is short, `most` were read,
        or one brings nothing new (so a server that ignores `page` cannot loop). `first`:
        page 1, read already. A page holds only what no earlier page held."""
        seen: set[Any] = set()
        page = 1
        while most is None or page <= most:
            items = (
                first
                if page == 1 and first is not None
                else self._objects(
                    "GET", path, params={**(params or {}), "page": page, "limit": size}
                )
            )
            new = [item for item in items if item.get("id") is None or item["id"] not in seen]
            if page > 1 and not new:
                return
            seen.update(item.get("id") for item in new)
            yield new
            if len(items) < size:
                return
            page += 1

    # -- endpoints ----------------------------------------------------------

    def get_user(self) -> JSONObject:
        return self._object("GET", "/user")

    def get_issue(self, owner: str, repo: str, number: int) -> JSONObject:
        return self._object("GET", f"{_repo_path(owner, repo)}/issues/{_seg(number)}")

    def create_comment(self, owner: str, repo: str, number: int, body: str) -> JSONObject:
        path = f"{_repo_path(owner, repo)}/issues/{_seg(number)}/comments"
        return self._object("POST", path, json={"body": body})

    def edit_comment(self, owner: str, repo: str, comment_id: int, body: str) -> JSONObject | None:
        path = f"{_repo_path(owner, repo)}/issues/comments/{_seg(comment_id)}"
        return self._object_or_none("PATCH", path, json={"body": body}, ok=(200, 204))

    def list_comments(self, owner: str, repo: str, number: int) -> list[JSONObject]:
        """All comments of an issue or PR (Gitea does not page this endpoint)."""
        path = f"{_repo_path(owner, repo)}/issues/{_seg(number)}/comments"
        return self._objects("GET", path)

    def add_reaction(self, owner: str, repo: str, comment_id: int, content: str) -> None:
        path = f"{_repo_path(owner, repo)}/issues/comments/{_seg(comment_id)}/reactions"
        self._request("POST", path, json={"content": content}, ok=(200, 201))

    def changed_issues(
        self, owner: str, repo: str, since: str
    ) -> tuple[list[JSONObject], float | None]:
        """Issues and pull requests, open or closed, updated at or after `since` (RFC 3339;
        a comment or a label updates an issue), and Gitea's own time when it answered the
        first page (its `Date` header, as a Unix time; None if it sent none). Every page."""
        path = f"{_repo_path(owner, repo)}/issues"
        params = {"state": "all", "since": since}
        first = self._request("GET", path, params={**params, "page": 1, "limit": LIST_PAGE_SIZE})
        server_time = _date_header(first.headers.get("Date"))
        items = self._as_objects("GET", path, self._json("GET", path, first))
        pages = self._pages(path, size=LIST_PAGE_SIZE, params=params, first=items)
        return [item for page in pages for item in page], server_time

    def timeline(self, owner: str, repo: str, number: int, since: str) -> list[JSONObject]:
        """An issue's comments and events (labels added or removed, ...) updated at or
        after `since` (RFC 3339), oldest first. Every page."""
        path = f"{_repo_path(owner, repo)}/issues/{_seg(number)}/timeline"
        pages = self._pages(path, size=LIST_PAGE_SIZE, params={"since": since})
        return [item for page in pages for item in page]

    def get_permission(self, owner: str, repo: str, login: str) -> str:
        path = f"{_repo_path(owner, repo)}/collaborators/{_seg(login)}/permission"
        permission = self._object("GET", path).get("permission")
        if not isinstance(permission, str):
            raise GiteaError("the answer holds no permission", method="GET", path=path)
        return permission

    def find_pull(self, owner: str, repo: str, base: str, head: str) -> JSONObject | None:
        """The pull request from `head` into `base` in any state, or None.

        `head` is `branch`, `owner:branch` or `owner/repo:branch`; a branch may
        contain '/', which stays a literal '/' in the path (Gitea's route is
        `/pulls/{base}/*`).
        """
        path = f"{_repo_path(owner, repo)}/pulls/{_seg(base)}/{_segs(head)}"
        try:
            return self._object("GET", path)
        except NotFound:
            return None

    def get_pull(self, owner: str, repo: str, number: int) -> JSONObject:
        """A pull request by number, in any state (`merged`, `head.sha` included)."""
        return self._object("GET", f"{_repo_path(owner, repo)}/pulls/{_seg(number)}")

    def find_open_pull(self, owner: str, repo: str, base: str, head: str) -> JSONObject | None:
        """The open pull request from branch `head` (of this repository) into `base`, or None.

        `find_pull` answers with the first match in any state: one call settles it when that
        match is open, or when there is none at all. After an older, closed one it cannot
        find the open one, so then this pages through the open pull requests into `base`.
        """
        first = self.find_pull(owner, repo, base, head)
        if first is None or first.get("state") == "open":
            return first
        path = f"{_repo_path(owner, repo)}/pulls"
        params = {"state": "open", "base_branch": base}
        for items in self._pages(path, size=PULL_PAGE_SIZE, most=MAX_PULL_PAGES, params=params):
            for pr in items:
                if (pr.get("head") or {}).get("ref") == head and (pr.get("base") or {}).get(
                    "ref"
                ) == base:
                    return pr
        return None

    def create_pull(
        self, owner: str, repo: str, *, head: str, base: str, title: str, body: str
    ) -> JSONObject:
        path = f"{_repo_path(owner, repo)}/pulls"
        payload = {"head": head, "base": base, "title": title, "body": body}
        return self._object("POST", path, json=payload)

    def edit_pull(
        self,
        owner: str,
        repo: str,
        number: int,
        *,
        title: str | None = None,
        body: str | None = None,
        state: str | None = None,
    ) -> JSONObject:
        payload = {
            k: v for k, v in (("title", title), ("body", body), ("state", state)) if v is not None
        }
        path = f"{_repo_path(owner, repo)}/pulls/{_seg(number)}"
        return self._object("PATCH", path, json=payload)

    def list_reviews(self, owner: str, repo: str, number: int) -> list[JSONObject]:
        """A pull request's reviews, oldest first (pending ones included: Gitea lists them
        to their author)."""
        path = f"{_repo_path(owner, repo)}/pulls/{_seg(number)}/reviews"
        pages = self._pages(path, size=REVIEW_PAGE_SIZE, most=MAX_REVIEW_PAGES)
        return [review for page in pages for review in page]

    def review_comments(
        self, owner: str, repo: str, number: int, review_id: int
    ) -> list[JSONObject]:
        """The line comments of one review (Gitea does not page this endpoint)."""
        path = f"{_repo_path(owner, repo)}/pulls/{_seg(number)}/reviews/{_seg(review_id)}/comments"
        return self._objects("GET", path)

    def resolve_review_comment(self, owner: str, repo: str, comment_id: int) -> None:
        """Mark the conversation of a line comment resolved (Gitea 1.26)."""
        path = f"{_repo_path(owner, repo)}/pulls/comments/{_seg(comment_id)}/resolve"
        self._request("POST", path, ok=(200, 204))

    # -- operator calls: kugetsu doctor and kugetsu webhook -------------------------------

    def get_version(self) -> str:
        """Gitea's version (GET /version needs no token, so it tells reachability alone)."""
        data = self._call("GET", "/version", auth=False)
        return str((data or {}).get("version") or "")

    def get_repo(self, owner: str, repo: str) -> JSONObject:
        """The repository, with the token user's `permissions` (admin, push, pull) on it."""
        return self._object("GET", _repo_path(owner, repo))

    def list_issues(self, owner: str, repo: str, *, limit: int = 1) -> list[JSONObject]:
        """The newest `limit` issues (any state): asked to see that issues can be read."""
        path = f"{_repo_path(owner, repo)}/issues"
        return self._objects("GET", path, params={"state": "all", "limit": limit})

    def may_push(self, owner: str, repo: str) -> None:
        """Raise GiteaError unless the token may push to the repository. Asks for git's
        push handshake (`info/refs?service=git-receive-pack`), which Gitea answers only
        for a token with write:repository of a user with write access: nothing is sent."""
        path = f"/{_seg(owner)}/{_seg(repo)}.git/info/refs"
        resp = self._request(
            "GET", path, params={"service": "git-receive-pack"}, ok=(200,), api=False
        )
        resp.close()

    @staticmethod
    def _hooks_path(owner: str, repo: str | None) -> str:
        """The hooks of a repository, or with `repo` None those of organization `owner`."""
        return f"{_repo_path(owner, repo)}/hooks" if repo else f"/orgs/{_seg(owner)}/hooks"

    def list_hooks(self, owner: str, repo: str | None = None) -> list[JSONObject]:
        """Every webhook of a repository (or, with `repo` None, of organization `owner`)."""
        path = self._hooks_path(owner, repo)
        pages = self._pages(path, size=PULL_PAGE_SIZE, most=MAX_PULL_PAGES)
        return [hook for page in pages for hook in page]

    def create_hook(self, owner: str, repo: str | None, body: Mapping[str, Any]) -> JSONObject:
        return self._object("POST", self._hooks_path(owner, repo), json=dict(body))

    def edit_hook(
        self, owner: str, repo: str | None, hook_id: int, body: Mapping[str, Any]
    ) -> JSONObject:
        path = f"{self._hooks_path(owner, repo)}/{_seg(hook_id)}"
        return self._object("PATCH", path, json=dict(body))

    def test_hook(self, owner: str, repo: str, hook_id: int) -> None:
        """Make Gitea send the hook a test delivery (a push event) now."""
        path = f"{self._hooks_path(owner, repo)}/{_seg(hook_id)}/tests"
        self._request("POST", path, ok=(200, 204))


_SCOPE_RE = re.compile(r"required scope\(s\)[^\[]*\[([^\]]*)\]")


def missing_scope(exc: GiteaError) -> str | None:
    """The token scope(s) a 403 says the token lacks ("read:user"), or None when the 403
    is for something else (the user's own access)."""
    if not isinstance(exc, Forbidden):
        return None
    found = _SCOPE_RE.search(exc.message)
    return found.group(1).strip() or None if found else None


# --------------------------------------------------------------------------- OAuth2

#: Gitea's OAuth2 provider, under its web root (not /api/v1)
OAUTH_AUTHORIZE_PATH = "/login/oauth/authorize"
OAUTH_TOKEN_PATH = "/login/oauth/access_token"


class OAuthError(GiteaError):
    """Gitea refused to give a token (a wrong or used code, a wrong PKCE verifier, a
    wrong client secret, an expired refresh token), or could not be asked."""


class GiteaOAuth:
    """Signs people in with Gitea as an OAuth2 provider: the authorization code grant
    with PKCE. The tokens it gets are the user's own; they are sent only in the
    Authorization header of API calls (`GiteaClient`), never in a URL or a log line."""

    def __init__(
        self,
        base_url: str,
        public_url: str,
        client_id: str,
        client_secret: str,
        *,
        timeout: float = 10,
        session: requests.Session | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.public_url = public_url.rstrip("/")
        self.client_id = client_id
        self._secret = client_secret
        self.timeout = timeout
        self._session = session if session is not None else environment_session(self.base_url)

    def authorize_url(
        self, *, redirect_uri: str, state: str, code_challenge: str, scope: str
    ) -> str:
        """Where the browser goes to sign in (Gitea as browsers reach it)."""
        from urllib.parse import urlencode

        query = urlencode(
            {
                "client_id": self.client_id,
                "redirect_uri": redirect_uri,
                "response_type": "code",
                "state": state,
                "scope": scope,
                "code_challenge": code_challenge,
                "code_challenge_method": "S256",
            }
        )
        return f"{self.public_url}{OAUTH_AUTHORIZE_PATH}?{query}"

    def exchange_code(self, *, code: str, verifier: str, redirect_uri: str) -> JSONObject:
        """The tokens for an authorization code: {access_token, refresh_token, expires_in}."""
        return self._token(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            }
        )

    def refresh(self, refresh_token: str) -> JSONObject:
        return self._token({"grant_type": "refresh_token", "refresh_token": refresh_token})

    def _token(self, form: dict[str, str]) -> JSONObject:
        secrets = tuple(v for v in (self._secret, *form.values()) if len(v) >= 8)
        form = {**form, "client_id": self.client_id, "client_secret": self._secret}
        try:
            resp = self._session.post(
                self.base_url + OAUTH_TOKEN_PATH,
                data=form,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise OAuthError(
                type(exc).__name__, status=None, method="POST", path=OAUTH_TOKEN_PATH
            ) from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code != 200 or not isinstance(data, dict) or not data.get("access_token"):
            reason = ""
            if isinstance(data, dict):
                reason = str(data.get("error_description") or data.get("error") or "")
            raise OAuthError(
                redact(reason or "no access token in the answer", secrets),
                status=resp.status_code,
                method="POST",
                path=OAUTH_TOKEN_PATH,
            )
        return data
