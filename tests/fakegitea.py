"""A small fake Gitea for integration and end-to-end tests.

`FakeGitea` serves, over real HTTP on 127.0.0.1, the slice of Gitea's REST API that
kugetsu uses plus git smart HTTP backed by real bare repositories (`git http-backend`
run as a CGI). State lives in memory behind one lock and is open to inspection:

    with FakeGitea(tmp_path, token="T") as gitea:
        gitea.create_repo("acme/widget", files={"README.md": "hello\\n"})
        n = gitea.create_issue("acme/widget", "Fix it", "please")
        ...  # point the code under test at gitea.url
        assert gitea.pulls[2]["head"]["ref"] == "kugetsu/issue-1"

Behaviour follows Gitea v1.26 where kugetsu depends on it: token / Bearer / Basic
auth (never `?token=`), `{"message", "url"}` error bodies, issues and pull requests
sharing one number sequence per repository, 409 for a second open pull request with
the same head and base, 200 (not 201) for a reaction that already exists, and
`/pulls/{base}/{head}` returning the first match in any state. The bot's permission
on a new repository is "admin"; other users default to "read". Writes to pull
requests need "write"; the collaborator-permission endpoint needs
"admin" (as in Gitea).

Sign-in with Gitea (its OAuth2 provider): `register_oauth_app(...)` registers the
dashboard's application; `/login/oauth/authorize` shows a minimal sign-in page (a login
field and an Authorize button) and, once a browser has signed in, approves at once as
Gitea does after the first consent; `/login/oauth/access_token` checks the client, the
redirect URI, the code (once) and the PKCE verifier (S256), and also refreshes. Users'
tokens (from that flow, or `user_token(login)`) act as that user on `GET /user` (with
`is_admin`, see `set_admin`), `GET /repos/{o}/{r}` (their own `permissions`; 404 for a
private repository, `set_private`, they cannot read) and reading issues; anything else
needs the bot's token.

Reviews and pull requests people open (section "Conversations"): `add_review` submits a
review with line comments as Gitea 1.26 stores and serves them (ids, `position` or
`original_position`, a `diff_hunk` cut from the real diff), `review_event` gives the
delivery Gitea would send for it (no review id, no line comment in it), `resolved` the
conversations kugetsu resolved; `commit_files` pushes a person's commit, `open_pull` opens
a pull request as a person (from the repository or a fork made by `fork_repo`).

Webhooks as Gitea 1.26 keeps them (repository and organization hooks): `active` defaults
to false, `config.url` and `config.content_type` are required, the secret is never
returned, an edit replaces the event list (empty means `push`), the groups `issues` and
`pull_request` stand for their single events, and a repository hook needs an admin of the
repository (an organization hook, an owner of the organization). `POST .../hooks/{id}/tests`
really POSTs a signed push delivery to the hook's URL, but only to a hook with the push
event, as Gitea's PrepareWebhook (`hook_deliveries` records each try; `block_deliveries`
refuses them as `ALLOWED_HOST_LIST` would). `GET /version` needs no token.
`token_scopes` (None: every scope) makes the API and git's push answer 403 as Gitea does
for a token without the scope a route needs.

Test hooks: `requests`, `comments`, `pulls` (and `pulls_of(repo)`), `reactions`, `hooks_of()`,
`fail_next(n, status, method, path)`, `lose_answer(method, path, answer)` / `release()`,
`down()` / `up()`, `branch_sha()`, `file_at()`, `commit_files()`,
`git(repo, ...)`, and `create_issue` / `add_comment` / `add_labels` / `remove_labels` /
`close_pull` / `close_issue` to act as a human would. Like Gitea, a comment or a label
change updates its issue's `updated_at`, and shows in the issue's timeline; the issue list,
the comments and the timeline take `since` (compared with `updated_at`, whole seconds,
inclusive).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import hmac
import html
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import threading
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import requests

from tests.fakeconversations import Conversations

log = logging.getLogger(__name__)

GITEA_VERSION = "1.26.3"
ALLOWED_REACTIONS = ("+1", "-1", "laugh", "hooray", "confused", "heart", "rocket", "eyes")
PERMISSION_ORDER = ("none", "read", "write", "admin", "owner")
#: the single events a hook can have (Gitea's HookEvents keys), and the groups that stand
#: for several of them in a create or edit request
HOOK_EVENTS = (
    "create",
    "delete",
    "fork",
    "issues",
    "issue_assign",
    "issue_label",
    "issue_milestone",
    "issue_comment",
    "push",
    "pull_request",
    "pull_request_assign",
    "pull_request_label",
    "pull_request_milestone",
    "pull_request_comment",
    "pull_request_review",
    "pull_request_review_request",
    "pull_request_sync",
    "wiki",
    "repository",
    "release",
    "package",
    "status",
)
_HOOK_GROUPS = {
    "issues_only": ("issues",),
    "pull_request_only": ("pull_request",),
    "issues": ("issues", "issue_assign", "issue_label", "issue_milestone", "issue_comment"),
    "pull_request": (
        "pull_request",
        "pull_request_assign",
        "pull_request_label",
        "pull_request_milestone",
        "pull_request_comment",
        "pull_request_review",
        "pull_request_review_request",
        "pull_request_sync",
    ),
}
HOOK_TYPES = ("dingtalk", "discord", "gitea", "gogs", "msteams", "slack", "telegram", "feishu")
GIT_IDENTITY = ("-c", "user.name=Fake Gitea", "-c", "user.email=fake-gitea@example.invalid")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rank(permission: str) -> int:
    return PERMISSION_ORDER.index(permission) if permission in PERMISSION_ORDER else 0


class ApiError(Exception):
    """Raised inside a route to answer with a Gitea-style error body."""

    def __init__(self, status: int, message: str, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra or {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address, fake: FakeGitea):
        self.fake = fake
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeGitea/" + GITEA_VERSION
    timeout = 10
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake gitea: " + format, *args)

    def _dispatch(self) -> None:
        self.server.fake._handle(self)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _dispatch


class FakeGitea(Conversations):
    """An in-memory Gitea with real git repositories under `root`.

    The listening socket is bound in the constructor (so `url` is known before any
    repository is created); requests are served between `start()` and `stop()`, or
    inside a `with` block.
    """

    def __init__(self, root: Path, token: str, bot_login: str = "kugetsu-bot"):
        self.root = Path(root)
        self.token = token
        self.bot_login = bot_login
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.comments: dict[int, dict] = {}
        self.reactions: dict[int, list[str]] = {}
        self._repos: dict[str, dict] = {}
        self._users: dict[str, dict] = {}
        self._comment_home: dict[int, tuple[str, int]] = {}
        #: timeline events that are not comments (labels added and removed), by id
        self.events: dict[int, dict] = {}
        self._event_home: dict[int, tuple[str, int]] = {}
        self._fail_queue: list[tuple[int, str | None, re.Pattern | None]] = []
        self._lose: list[tuple[str, re.Pattern, int | str]] = []
        self._released = threading.Event()
        self.hooks: dict[int, dict] = {}
        #: each test delivery tried: {"hook", "url", "status" (None: not sent), "error"}
        self.hook_deliveries: list[dict] = []
        #: refuse every delivery, as Gitea's ALLOWED_HOST_LIST refuses a private address
        self.block_deliveries = False
        #: the token's scopes ("read:user", "write:repository", ...); None: every scope
        self.token_scopes: set[str] | None = None
        self._orgs: dict[str, set[str]] = {}
        self._ids = {
            "hook": 0,
            "user": 0,
            "repo": 0,
            "issue": 0,
            "comment": 0,
            "pull": 0,
            "status": 0,
            "label": 0,
            "review": 0,
        }
        #: (repo, pull number) -> its reviews, oldest first; review id -> its line comments
        self._reviews: dict[tuple[str, int], list[dict]] = {}
        self._review_comments: dict[int, list[dict]] = {}
        self._conns: set[socket.socket] = set()
        self._down = False
        self._thread: threading.Thread | None = None
        self._server: _Server | None = _Server(("127.0.0.1", 0), self)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = self.url + "/api/v1"
        self._routes = self._build_routes()
        self.user(bot_login)
        # sign-in: OAuth2 applications, codes on their way, users' tokens
        self._oauth_apps: dict[str, dict[str, Any]] = {}
        self._codes: dict[str, dict[str, Any]] = {}
        self._user_tokens: dict[str, str] = {}
        self._refresh_tokens: dict[str, tuple[str, str]] = {}
        self._who = threading.local()

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> FakeGitea:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        if self._server is None:
            self._server = _Server(("127.0.0.1", self.port), self)
        if self._thread is None:
            self._down = False
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fake-gitea-{self.port}",
                daemon=True,
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the port (clients then get connection refused)."""
        self._down = True
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            if thread is not None:
                server.shutdown()
            server.server_close()
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=10)

    def down(self) -> None:
        """Stop listening and drop open connections; `up()` listens again on the same port."""
        self.stop()

    def up(self) -> None:
        self.start()

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self.lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # -- test hooks -------------------------------------------------------------

    def fail_next(
        self, n: int, status: int = 500, method: str | None = None, path: str | None = None
    ) -> None:
        """Answer the next `n` API requests with `status` and a Gitea error body; with
        `method` and/or `path` (a regular expression for the path after /api/v1), only the
        next `n` requests that match."""
        rule = (status, method.upper() if method else None, re.compile(path) if path else None)
        with self.lock:
            self._fail_queue.extend([rule] * n)

    def lose_answer(self, method: str, path: str, answer: int | str = 504, times: int = 1) -> None:
        """Apply the next `times` API requests `method` whose path (after /api/v1) matches the
        regular expression `path`, then lose the answer as a proxy or a network would.

        `answer` is the status a proxy sends instead (502, 504), "drop" (the connection is
        closed without a word), or "hold" (it stays open and unanswered until `release()`,
        or 60 s, as when the client dies waiting).
        """
        if not (isinstance(answer, int) or answer in ("drop", "hold")):
            raise ValueError(f"answer must be a status, 'drop' or 'hold', not {answer!r}")
        with self.lock:
            self._lose.extend([(method.upper(), re.compile(path), answer)] * times)

    def release(self) -> None:
        """Let every held answer go (its connection is closed unanswered)."""
        self._released.set()

    def user(self, login: str) -> dict:
        """The user object for `login`, created on first use."""
        with self.lock:
            if login not in self._users:
                uid = self._next("user")
                self._users[login] = {
                    "id": uid,
                    "login": login,
                    "login_name": "",
                    "source_id": 0,
                    "full_name": "",
                    "email": f"{login}@noreply.localhost",
                    "avatar_url": f"{self.url}/avatars/{uid}",
                    "html_url": f"{self.url}/{login}",
                    "language": "",
                    "is_admin": False,
                    "last_login": "0001-01-01T00:00:00Z",
                    "created": _now(),
                    "restricted": False,
                    "active": True,
                    "prohibit_login": False,
                    "location": "",
                    "website": "",
                    "description": "",
                    "visibility": "public",
                    "followers_count": 0,
                    "following_count": 0,
                    "starred_repos_count": 0,
                    "username": login,
                }
            return self._users[login]

    def create_repo(
        self,
        full_name: str,
        files: dict[str, str | bytes] | None = None,
        default_branch: str = "main",
    ) -> dict:
        """Create a bare repository with one initial commit holding `files`."""
        owner, name = full_name.split("/")
        if files is None:
            files = {"README.md": f"# {name}\n"}
        path = self.repos_root / owner / f"{name}.git"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._git(
            None, "init", "--quiet", "--bare", f"--initial-branch={default_branch}", str(path)
        )
        self._git(path, "config", "http.receivepack", "true")
        tree = self._tree(path, files)
        commit = self._git(path, *GIT_IDENTITY, "commit-tree", tree, "-m", "Initial commit").strip()
        self._git(path, "update-ref", f"refs/heads/{default_branch}", commit)
        with self.lock:
            repo_id = self._next("repo")
            owner_user = self.user(owner)
            record = {
                "id": repo_id,
                "owner": owner,
                "name": name,
                "full_name": full_name,
                "path": path,
                "default_branch": default_branch,
                "owner_user": owner_user,
                "next_number": 1,
                "issues": {},
                "pulls": {},
                "labels": {},
                "permissions": {self.bot_login: "admin"},
                "created_at": _now(),
            }
            self._repos[full_name] = record
            return self._repo_json(record)

    def create_issue(
        self,
        repo: str,
        title: str,
        body: str = "",
        labels: tuple[str, ...] | list[str] = (),
        login: str = "alice",
    ) -> int:
        """Open an issue as `login`; returns its number."""
        with self.lock:
            record = self._repo(repo)
            number = self._take_number(record)
            poster = self.user(login)
            now = _now()
            html = f"{self.url}/{repo}/issues/{number}"
            issue = {
                "id": self._next("issue"),
                "url": f"{self.api_url}/repos/{repo}/issues/{number}",
                "html_url": html,
                "number": number,
                "user": poster,
                "original_author": "",
                "original_author_id": 0,
                "title": title,
                "body": body,
                "ref": "",
                "assets": [],
                "labels": [],
                "milestone": None,
                "assignee": None,
                "assignees": None,
                "state": "open",
                "is_locked": False,
                "comments": 0,
                "created_at": now,
                "updated_at": now,
                "closed_at": None,
                "due_date": None,
                "time_estimate": 0,
                "pull_request": None,
                "repository": self._repo_ref(record),
                "pin_order": 0,
                "content_version": 0,
            }
            record["issues"][number] = issue
            if labels:
                self.add_labels(repo, number, *labels, login=login)
            return number

    def issue(self, repo: str, number: int) -> dict:
        """The stored issue (live dict) or, for a pull request number, its issue view."""
        with self.lock:
            return self._issue_view(self._repo(repo), number)

    def add_labels(self, repo: str, number: int, *names: str, login: str = "alice") -> None:
        """Put labels on an issue as `login`. Like Gitea, each label added is recorded as a
        comment of its own (not listed with the issue's comments, but in its timeline, as
        `type: "label"` with body "1"): it takes a comment id."""
        with self.lock:
            record, target = self._labelled(repo, number)
            for label_name in names:
                label = self._label(record, label_name)
                if any(existing["id"] == label["id"] for existing in target["labels"]):
                    continue
                target["labels"].append(label)
                self._label_event(record, number, label, "1", login)

    def remove_labels(self, repo: str, number: int, *names: str, login: str = "alice") -> None:
        """Take labels off an issue as `login` (a timeline event with an empty body each)."""
        with self.lock:
            record, target = self._labelled(repo, number)
            for label_name in names:
                label = record["labels"].get(label_name)
                if label is None or label not in target["labels"]:
                    continue
                target["labels"].remove(label)
                self._label_event(record, number, label, "", login)

    def _labelled(self, repo: str, number: int) -> tuple[dict, dict]:
        """The repository's record and the issue or pull request whose labels change."""
        record = self._repo(repo)
        target = record["issues"].get(number) or record["pulls"].get(number)
        if target is None:
            raise KeyError(f"{repo}#{number}")
        return record, target

    def _label_event(self, record: dict, number: int, label: dict, body: str, login: str) -> None:
        full = record["full_name"]
        target = record["issues"].get(number) or record["pulls"][number]
        event_id, now = self._next("comment"), _now()
        self.events[event_id] = {
            "id": event_id,
            "type": "label",
            "html_url": f"{self.url}/{full}/issues/{number}#issuecomment-{event_id}",
            "pull_request_url": "",
            "issue_url": f"{self.url}/{full}/issues/{number}",
            "user": self.user(login),
            "body": body,
            "label": dict(label),
            "created_at": now,
            "updated_at": now,
        }
        self._event_home[event_id] = (full, number)
        target["updated_at"] = now

    def add_comment(self, repo: str, number: int, body: str, login: str = "alice") -> dict:
        """Post a comment as `login` (as a human would through the UI)."""
        with self.lock:
            return self._new_comment(self._repo(repo), number, body, self.user(login))

    def comments_on(self, repo: str, number: int) -> list[dict]:
        with self.lock:
            return [
                c
                for cid, c in self.comments.items()
                if self._comment_home.get(cid) == (repo, number)
            ]

    def set_permission(self, repo: str, login: str, permission: str) -> None:
        if permission not in PERMISSION_ORDER:
            raise ValueError(f"unknown permission {permission!r}")
        with self.lock:
            self._repo(repo)["permissions"][login] = permission
            self.user(login)

    def create_org(self, name: str, owners: tuple[str, ...] | None = None) -> None:
        """Make `name` an organization; its owners (default: the bot) may manage its hooks."""
        with self.lock:
            self._orgs[name] = set(owners if owners is not None else (self.bot_login,))
            self.user(name)

    def hooks_of(self, repo: str | None = None, *, org: str | None = None) -> list[dict]:
        """The hooks of a repository (or organization) as stored, secret included."""
        scope = ("repo", repo) if repo is not None else ("org", org)
        with self.lock:
            return [dict(h) for _, h in sorted(self.hooks.items()) if h["scope"] == scope]

    def permission(self, repo: str, login: str) -> str:
        """A user's permission; without one of their own: read on a public repository,
        none on a private one."""
        with self.lock:
            record = self._repo(repo)
            default = "none" if record.get("private") else "read"
            return record["permissions"].get(login, default)

    # -- sign-in with Gitea (OAuth2 provider) ---------------------------------------

    def set_private(self, repo: str, private: bool = True) -> None:
        with self.lock:
            self._repo(repo)["private"] = private

    def set_admin(self, login: str, admin: bool = True) -> None:
        """Make a user a site administrator (`is_admin`), who can read every repository."""
        with self.lock:
            self.user(login)["is_admin"] = admin

    def register_oauth_app(self, client_id: str, client_secret: str, redirect_uri: str) -> None:
        with self.lock:
            self._oauth_apps[client_id] = {"secret": client_secret, "redirect_uri": redirect_uri}

    def user_token(self, login: str) -> str:
        """A new access token of `login` (as a personal access token would be)."""
        token = "gto_" + base64.urlsafe_b64encode(os.urandom(18)).decode()
        with self.lock:
            self.user(login)
            self._user_tokens[token] = login
        return token

    def revoke_tokens(self, login: str) -> None:
        """Every access token of `login` stops working (refresh tokens still work)."""
        with self.lock:
            for token in [t for t, who in self._user_tokens.items() if who == login]:
                del self._user_tokens[token]

    def _token_login(self, h: BaseHTTPRequestHandler) -> str | None:
        """Whose token the request carries: the bot's, a user's, or None."""
        if self._authorized(h):
            return self.bot_login
        scheme, _, cred = h.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() not in ("token", "bearer"):
            return None
        with self.lock:
            return self._user_tokens.get(cred.strip())

    def _oauth(self, h: BaseHTTPRequestHandler, path: str, query: str, body: bytes) -> None:
        if path == "/login/oauth/authorize":
            self._oauth_authorize(h, query, body)
        else:
            self._oauth_token(h, body)

    def _oauth_authorize(self, h: BaseHTTPRequestHandler, query: str, body: bytes) -> None:
        params = {
            k: v[0] for k, v in parse_qs(body.decode() if h.command == "POST" else query).items()
        }
        app = self._oauth_apps.get(params.get("client_id", ""))
        if app is None or params.get("redirect_uri") != app["redirect_uri"]:
            self._send(h, 400, b"unknown client_id or redirect_uri", content_type="text/plain")
            return
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            self._send(h, 400, b"PKCE with S256 is required here", content_type="text/plain")
            return
        cookie = re.search(r"(?:^|;\s*)fake_gitea_login=([^;]+)", h.headers.get("Cookie", ""))
        login = params.get("login") if h.command == "POST" else (cookie[1] if cookie else None)
        if not login:
            hidden = "".join(
                f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                for k, v in params.items()
            )
            page = (
                "<!doctype html><title>Sign in · Fake Gitea</title><h1>Fake Gitea</h1>"
                '<form method="post" action="/login/oauth/authorize">'
                + hidden
                + '<label>Username <input name="login" id="login"></label> '
                "<button type=submit>Authorize</button></form>"
            )
            self._send(h, 200, page.encode(), content_type="text/html; charset=utf-8")
            return
        code = base64.urlsafe_b64encode(os.urandom(18)).decode()
        with self.lock:
            self.user(login)
            self._codes[code] = {**params, "login": login}
        target = (
            params["redirect_uri"]
            + "?"
            + urlencode({"code": code, "state": params.get("state", "")})
        )
        h.send_response(302)
        h.send_header("Location", target)
        h.send_header("Set-Cookie", f"fake_gitea_login={login}; Path=/; HttpOnly")
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _oauth_token(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}

        def refuse(error: str, description: str) -> None:
            self._send(h, 400, {"error": error, "error_description": description})

        with self.lock:
            app = self._oauth_apps.get(form.get("client_id", ""))
            if app is None or form.get("client_secret") != app["secret"]:
                return refuse("unauthorized_client", "invalid client secret")
            if form.get("grant_type") == "refresh_token":
                found = self._refresh_tokens.pop(form.get("refresh_token", ""), None)
                if found is None or found[1] != form["client_id"]:
                    return refuse("unauthorized_client", "refresh token not found")
                login = found[0]
            elif form.get("grant_type") == "authorization_code":
                grant = self._codes.pop(form.get("code", ""), None)
                if grant is None or grant["client_id"] != form["client_id"]:
                    return refuse("unauthorized_client", "client is not authorized")
                if form.get("redirect_uri") != grant["redirect_uri"]:
                    return refuse("unauthorized_client", "unexpected redirect URI")
                verifier = form.get("code_verifier", "")
                challenge = (
                    base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
                    .rstrip(b"=")
                    .decode()
                )
                if not verifier or challenge != grant["code_challenge"]:
                    return refuse("unauthorized_client", "failed PKCE code challenge")
                login = grant["login"]
            else:
                return refuse(
                    "unsupported_grant_type",
                    "Only refresh_token or authorization_code grant type is supported",
                )
            access, refresh = (
                self.user_token(login),
                base64.urlsafe_b64encode(os.urandom(18)).decode(),
            )
            self._refresh_tokens[refresh] = (login, form["client_id"])
        self._send(
            h,
            200,
            {
                "access_token": access,
                "token_type": "bearer",
                "expires_in": 3600,
                "refresh_token": refresh,
            },
        )

    def pulls_of(self, repo: str) -> dict[int, dict]:
        """Pull requests of one repository, number -> live dict."""
        with self.lock:
            return dict(self._repo(repo)["pulls"])

    @property
    def pulls(self) -> dict[int, dict]:
        """All pull requests, number -> live dict; use `pulls_of` when numbers collide across
        repos."""
        with self.lock:
            merged: dict[int, dict] = {}
            for record in self._repos.values():
                for number, pr in record["pulls"].items():
                    if number in merged:
                        raise RuntimeError(
                            f"pull #{number} exists in several repositories; use pulls_of(repo)"
                        )
                    merged[number] = pr
            return merged

    def close_pull(self, repo: str, number: int, *, merged: bool = False) -> dict:
        """Close (or mark merged) a pull request as a human would."""
        with self.lock:
            pr = self._repo(repo)["pulls"][number]
            now = _now()
            pr.update(state="closed", closed_at=now, updated_at=now)
            if merged:
                pr.update(merged=True, merged_at=now, merged_by=self.user(self.bot_login))
            return pr

    def close_issue(self, repo: str, number: int) -> dict:
        """Close an issue as a human would."""
        with self.lock:
            issue = self._repo(repo)["issues"][number]
            now = _now()
            issue.update(state="closed", closed_at=now, updated_at=now)
            return issue

    def commit_files(
        self,
        repo: str,
        files: dict[str, str | bytes],
        *,
        branch: str | None = None,
        modes: dict[str, str] | None = None,
        message: str = "Change files",
    ) -> str:
        """Commit `files` (path -> content; `modes` may make one a link, "120000") on top
        of `branch` (the default branch if None; made from it if it does not exist), as
        a person pushing would. Returns the new commit."""
        with self.lock:
            record = self._repo(repo)
        path, default = record["path"], record["default_branch"]
        branch = branch or default
        parent = self.branch_sha(repo, branch) or self.branch_sha(repo, default)
        assert parent is not None
        tree = self._tree(path, files, modes=modes, base=parent)
        commit = self._git(
            path, *GIT_IDENTITY, "commit-tree", tree, "-p", parent, "-m", message
        ).strip()
        self._git(path, "update-ref", f"refs/heads/{branch}", commit)
        return commit

    def _tree(
        self,
        path: Path,
        files: dict[str, str | bytes],
        *,
        modes: dict[str, str] | None = None,
        base: str | None = None,
    ) -> str:
        """A tree object in the bare repository at `path`: `base`'s tree (or none) with
        `files` written over it (mode 100644 unless `modes` says otherwise)."""
        fd, index = tempfile.mkstemp(prefix="index-", dir=self.root)
        os.close(fd)
        os.unlink(index)
        env = {"GIT_INDEX_FILE": index}
        try:
            if base is not None:
                self._git(path, "read-tree", base, env=env)
            for file_path, content in files.items():
                data = content.encode() if isinstance(content, str) else content
                blob = self._git(path, "hash-object", "-w", "--stdin", input=data).strip()
                mode = (modes or {}).get(file_path, "100644")
                self._git(
                    path,
                    "update-index",
                    "--add",
                    "--cacheinfo",
                    f"{mode},{blob},{file_path}",
                    env=env,
                )
            return self._git(path, "write-tree", env=env).strip()
        finally:
            if os.path.exists(index):
                os.unlink(index)

    def branch_sha(self, repo: str, branch: str) -> str | None:
        path = self._repo_path(repo)
        try:
            return self._git(
                path, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}"
            ).strip()
        except subprocess.CalledProcessError:
            return None

    def branches(self, repo: str) -> list[str]:
        out = self._git(
            self._repo_path(repo), "for-each-ref", "--format=%(refname:lstrip=2)", "refs/heads"
        )
        return out.split()

    def file_at(self, repo: str, branch: str, path: str) -> str | None:
        """The text of `path` on `branch`, or None if either is missing."""
        try:
            data = self._git(
                self._repo_path(repo), "cat-file", "blob", f"refs/heads/{branch}:{path}", text=False
            )
        except subprocess.CalledProcessError:
            return None
        return data.decode("utf-8")

    def git(self, repo: str, *args: str) -> str:
        """Run a git command in `repo`'s bare repository and return its output."""
        return self._git(self._repo_path(repo), *args)

    def clone_url(self, repo: str) -> str:
        return f"{self.url}/{repo}.git"

    @property
    def repos_root(self) -> Path:
        return self.root / "repos"

    # -- git helpers ------------------------------------------------------------

    def git_env(self) -> dict[str, str]:
        """An environment for git that ignores the host's system and global config."""
        home = self.root / "home"
        home.mkdir(parents=True, exist_ok=True)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
        }

    def _git(
        self,
        repo_path: Path | None,
        *args: str,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
        text: bool = True,
    ):
        cmd = ["git"]
        if repo_path is not None:
            cmd += ["--git-dir", str(repo_path)]
        cmd += list(args)
        full_env = self.git_env()
        if env:
            full_env.update(env)
        proc = subprocess.run(cmd, input=input, capture_output=True, env=full_env, timeout=60)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc.stdout.decode("utf-8") if text else proc.stdout

    def _repo_path(self, repo: str) -> Path:
        with self.lock:
            return self._repo(repo)["path"]

    # -- state helpers ----------------------------------------------------------

    def _next(self, kind: str) -> int:
        with self.lock:
            self._ids[kind] += 1
            return self._ids[kind]

    def _take_number(self, record: dict) -> int:
        number = record["next_number"]
        record["next_number"] += 1
        return number

    def _repo(self, full_name: str) -> dict:
        try:
            return self._repos[full_name]
        except KeyError:
            raise KeyError(f"no repository {full_name!r} in the fake") from None

    def _label(self, record: dict, name: str) -> dict:
        if name not in record["labels"]:
            lid = self._next("label")
            record["labels"][name] = {
                "id": lid,
                "name": name,
                "exclusive": False,
                "is_archived": False,
                "color": "e11d21",
                "description": "",
                "url": f"{self.api_url}/repos/{record['full_name']}/labels/{lid}",
            }
        return record["labels"][name]

    def _repo_ref(self, record: dict) -> dict:
        return {
            "id": record["id"],
            "name": record["name"],
            "owner": record["owner"],
            "full_name": record["full_name"],
        }

    def _repo_json(self, record: dict, login: str | None = None) -> dict:
        full = record["full_name"]
        login = login or self.bot_login
        perm = _rank("admin" if self.user(login)["is_admin"] else self.permission(full, login))
        return {
            "id": record["id"],
            "owner": record["owner_user"],
            "name": record["name"],
            "full_name": full,
            "description": "",
            "empty": False,
            "private": bool(record.get("private")),
            "fork": False,
            "template": False,
            "parent": None,
            "mirror": False,
            "size": 0,
            "language": "",
            "languages_url": f"{self.api_url}/repos/{full}/languages",
            "html_url": f"{self.url}/{full}",
            "url": f"{self.api_url}/repos/{full}",
            "link": "",
            "ssh_url": f"git@127.0.0.1:{full}.git",
            "clone_url": f"{self.url}/{full}.git",
            "original_url": "",
            "website": "",
            "stars_count": 0,
            "forks_count": 0,
            "watchers_count": 0,
            "open_issues_count": sum(1 for i in record["issues"].values() if i["state"] == "open"),
            "open_pr_counter": sum(1 for p in record["pulls"].values() if p["state"] == "open"),
            "release_counter": 0,
            "default_branch": record["default_branch"],
            "archived": False,
            "created_at": record["created_at"],
            "updated_at": record["created_at"],
            "archived_at": "1970-01-01T00:00:00Z",
            "permissions": {
                "admin": perm >= _rank("admin"),
                "push": perm >= _rank("write"),
                "pull": perm >= _rank("read"),
            },
            "has_code": True,
            "has_issues": True,
            "internal_tracker": {
                "enable_time_tracker": True,
                "allow_only_contributors_to_track_time": True,
                "enable_issue_dependencies": True,
            },
            "has_wiki": True,
            "has_pull_requests": True,
            "has_projects": True,
            "has_releases": True,
            "has_packages": True,
            "has_actions": True,
            "ignore_whitespace_conflicts": False,
            "allow_merge_commits": True,
            "allow_rebase": True,
            "allow_rebase_explicit": True,
            "allow_squash_merge": True,
            "allow_fast_forward_only_merge": True,
            "allow_rebase_update": True,
            "allow_manual_merge": False,
            "autodetect_manual_merge": False,
            "default_delete_branch_after_merge": False,
            "default_merge_style": "merge",
            "default_allow_maintainer_edit": False,
            "avatar_url": "",
            "internal": False,
            "mirror_interval": "",
            "object_format_name": "sha1",
            "mirror_updated": "0001-01-01T00:00:00Z",
            "repo_transfer": None,
            "topics": [],
            "licenses": [],
        }

    def _issue_view(self, record: dict, number: int) -> dict:
        if number in record["issues"]:
            return record["issues"][number]
        pr = record["pulls"].get(number)
        if pr is None:
            raise ApiError(404, "issue does not exist")
        full = record["full_name"]
        return {
            "id": pr["issue_id"],
            "url": f"{self.api_url}/repos/{full}/issues/{number}",
            "html_url": pr["html_url"],
            "number": number,
            "user": pr["user"],
            "original_author": "",
            "original_author_id": 0,
            "title": pr["title"],
            "body": pr["body"],
            "ref": "",
            "assets": [],
            "labels": pr["labels"],
            "milestone": None,
            "assignee": None,
            "assignees": None,
            "state": pr["state"],
            "is_locked": False,
            "comments": pr["comments"],
            "created_at": pr["created_at"],
            "updated_at": pr["updated_at"],
            "closed_at": pr["closed_at"],
            "due_date": None,
            "time_estimate": 0,
            "pull_request": {
                "merged": pr["merged"],
                "merged_at": pr["merged_at"],
                "draft": False,
                "html_url": pr["html_url"],
            },
            "repository": self._repo_ref(record),
            "pin_order": 0,
            "content_version": 0,
        }

    def _new_comment(self, record: dict, number: int, body: str, poster: dict) -> dict:
        full = record["full_name"]
        target = record["issues"].get(number) or record["pulls"].get(number)
        if target is None:
            raise ApiError(404, "issue does not exist")
        is_pull = number in record["pulls"]
        cid = self._next("comment")
        now = _now()
        page = f"{self.url}/{full}/{'pulls' if is_pull else 'issues'}/{number}"
        comment = {
            "id": cid,
            "html_url": f"{page}#issuecomment-{cid}",
            "pull_request_url": page if is_pull else "",
            "issue_url": "" if is_pull else page,
            "user": poster,
            "original_author": "",
            "original_author_id": 0,
            "body": body,
            "assets": [],
            "created_at": now,
            "updated_at": now,
        }
        self.comments[cid] = comment
        self._comment_home[cid] = (full, number)
        target["comments"] += 1
        target["updated_at"] = now
        return comment

    def _branch_exists(self, record: dict, branch: str) -> bool:
        return self.branch_sha(record["full_name"], branch) is not None

    def _refresh_pull(self, record: dict, pr: dict) -> dict:
        holder = (pr["head"].get("repo") or {}).get("full_name") or record["full_name"]
        sha = self.branch_sha(holder, pr["head"]["ref"])
        if sha is not None:
            pr["head"]["sha"] = sha
        base_sha = self.branch_sha(record["full_name"], pr["base"]["ref"])
        if base_sha is not None:
            pr["base"]["sha"] = base_sha
        return pr

    def _open_pull_for(
        self, record: dict, head: str, base: str, exclude: int | None = None
    ) -> dict | None:
        for number, pr in sorted(record["pulls"].items()):
            if number == exclude or pr["state"] != "open" or pr["merged"]:
                continue
            if pr["head"]["ref"] == head and pr["base"]["ref"] == base:
                return pr
        return None

    def _already_exists(self, record: dict, pr: dict) -> ApiError:
        return ApiError(
            409,
            "pull request already exists for these targets [id: {}, issue_id: {}, "
            "head_repo_id: {}, base_repo_id: {}, head_branch: {}, base_branch: {}]".format(
                pr["id"],
                pr["number"],
                record["id"],
                record["id"],
                pr["head"]["ref"],
                pr["base"]["ref"],
            ),
        )

    def _split_head(self, record: dict, head: str) -> str:
        """Reduce `branch`, `owner:branch` or `owner/repo:branch` to a branch of this repo."""
        if ":" not in head:
            return head
        prefix, branch = head.split(":", 1)
        owner, _, name = prefix.partition("/")
        if owner != record["owner"] or (name and name != record["name"]):
            raise ApiError(404, "repository does not exist")
        return branch

    # -- HTTP ---------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        if self._down:
            h.close_connection = True
            return
        try:
            body = _read_body(h)
        except (ValueError, OSError, EOFError, zlib.error) as exc:
            self._send(h, 400, {"message": f"bad request body: {exc}"})
            return
        headers = {k: v for k, v in h.headers.items()}
        with self.lock:
            self.requests.append((h.command, h.path, headers, body))
        parts = urlsplit(h.path)
        path = parts.path
        try:
            if path in ("/login/oauth/authorize", "/login/oauth/access_token"):
                self._oauth(h, path, parts.query, body)
                return
            if path == "/api/v1" or path.startswith("/api/v1/"):
                status, payload, extra = self._api(h, path[len("/api/v1") :], parts.query, body)
                if not self._lost(h, path[len("/api/v1") :]):
                    self._send(h, status, payload, extra)
                return
            match = re.fullmatch(r"/([^/]+)/([^/]+?)\.git(/.*)?", path)
            if match:
                self._serve_git(
                    h, unquote(match[1]), unquote(match[2]), match[3] or "", parts.query, body
                )
                return
            self._send(h, 404, {"message": "not found"}, content_type="text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
        except Exception:
            log.exception("fake gitea failed on %s %s", h.command, path)
            try:
                self._send(h, 500, {"message": "fake gitea internal error", "url": self._doc_url})
            except OSError:
                h.close_connection = True

    def _lost(self, h: BaseHTTPRequestHandler, api_path: str) -> bool:
        """Lose the answer to an applied request if `lose_answer` asked for it."""
        with self.lock:
            for i, (method, pattern, answer) in enumerate(self._lose):  # noqa: B007 - read after the loop
                if method == h.command and pattern.fullmatch(api_path):
                    del self._lose[i]
                    break
            else:
                return False
        if isinstance(answer, int):
            page = f"<html><body><h1>{answer} Gateway Time-out</h1></body></html>"
            self._send(h, answer, page.encode(), content_type="text/html")
            return True
        if answer == "hold":
            self._released.wait(60)
        h.close_connection = True
        return True

    @property
    def _doc_url(self) -> str:
        return f"{self.url}/api/swagger"

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        payload: Any,
        extra: dict[str, str] | None = None,
        content_type: str = "application/json;charset=utf-8",
    ) -> None:
        if payload is None:
            data = b""
        elif content_type.startswith("application/json"):
            data = json.dumps(payload, separators=(",", ":")).encode()
        else:
            data = (
                str(payload.get("message", "")).encode()
                if isinstance(payload, dict)
                else bytes(payload)
            )
        h.send_response(status)
        if data or status != 204:
            h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for key, value in (extra or {}).items():
            h.send_header(key, value)
        h.end_headers()
        if h.command != "HEAD" and data:
            h.wfile.write(data)

    def _authorized(self, h: BaseHTTPRequestHandler) -> bool:
        header = h.headers.get("Authorization", "")
        scheme, _, cred = header.strip().partition(" ")
        scheme, cred = scheme.lower(), cred.strip()
        if scheme in ("token", "bearer"):
            return bool(self.token) and cred == self.token
        if scheme == "basic":
            try:
                user, _, password = (
                    base64.b64decode(cred, validate=True).decode("utf-8").partition(":")
                )
            except (ValueError, UnicodeDecodeError):
                return False
            return bool(self.token) and self.token in (user, password)
        return False

    # -- git smart HTTP -----------------------------------------------------------

    def _serve_git(self, h, owner: str, name: str, rest: str, query: str, body: bytes) -> None:
        if not self._authorized(h):
            self._send(
                h,
                401,
                {"message": "Unauthorized"},
                {"WWW-Authenticate": 'Basic realm="Gitea"'},
                content_type="text/plain; charset=utf-8",
            )
            return
        full = f"{owner}/{name}"
        with self.lock:
            known = full in self._repos
        if not known:
            self._send(
                h,
                404,
                {"message": "Repository not found"},
                content_type="text/plain; charset=utf-8",
            )
            return
        pushing = rest.endswith("/git-receive-pack") or "service=git-receive-pack" in query
        missing = self._missing_scope("repository", "POST" if pushing else "GET")
        if (
            missing is None
            and pushing
            and _rank(self.permission(full, self.bot_login)) < _rank("write")
            and not self.maintainer_may_push(full, self.bot_login)
        ):
            self._send(
                h,
                403,
                {"message": "User permission denied"},
                content_type="text/plain; charset=utf-8",
            )
            return
        if missing is not None:
            self._send(
                h,
                403,
                {"message": f"token does not have at least one of required scope(s): [{missing}]"},
                content_type="text/plain; charset=utf-8",
            )
            return
        env = self.git_env()
        env.update(
            GIT_PROJECT_ROOT=str(self.repos_root),
            GIT_HTTP_EXPORT_ALL="1",
            PATH_INFO=f"/{owner}/{name}.git{rest}",
            QUERY_STRING=query,
            REQUEST_METHOD=h.command,
            CONTENT_TYPE=h.headers.get("Content-Type", ""),
            CONTENT_LENGTH=str(len(body)),
            REMOTE_USER=self.bot_login,
            REMOTE_ADDR=h.client_address[0],
            SERVER_PROTOCOL="HTTP/1.1",
        )
        git_protocol = h.headers.get("Git-Protocol")
        if git_protocol:
            env["HTTP_GIT_PROTOCOL"] = git_protocol
        proc = subprocess.run(
            ["git", "-c", "http.receivepack=true", "http-backend"],
            input=body,
            capture_output=True,
            env=env,
            timeout=120,
        )
        status, headers, payload = _parse_cgi(proc.stdout)
        if not headers and proc.returncode != 0:
            log.warning(
                "git http-backend failed: %s", proc.stderr.decode("utf-8", "replace").strip()
            )
            status, payload = 500, b"git http-backend failed\n"
            headers = [("Content-Type", "text/plain")]
        h.send_response(status)
        for key, value in headers:
            if key.lower() not in ("content-length", "status", "transfer-encoding", "connection"):
                h.send_header(key, value)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)

    # -- REST API -------------------------------------------------------------------

    def _build_routes(self) -> list[tuple[str, re.Pattern, Callable]]:
        repo = r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)"
        org = r"/orgs/(?P<org>[^/]+)"
        table = [
            ("GET", r"/version", self._api_version),
            # before `/pulls/{base}/{head}`, which their paths would match too
            *self._conversation_routes(repo),
            ("GET", r"/user", self._api_user),
            ("GET", repo, self._api_repo),
            ("GET", repo + r"/issues", self._api_list_issues),
            ("GET", repo + r"/hooks", self._api_list_hooks),
            ("POST", repo + r"/hooks", self._api_create_hook),
            ("PATCH", repo + r"/hooks/(?P<id>\d+)", self._api_edit_hook),
            ("POST", repo + r"/hooks/(?P<id>\d+)/tests", self._api_test_hook),
            ("GET", org + r"/hooks", self._api_list_hooks),
            ("POST", org + r"/hooks", self._api_create_hook),
            ("PATCH", org + r"/hooks/(?P<id>\d+)", self._api_edit_hook),
            ("GET", repo + r"/issues/(?P<index>\d+)", self._api_issue),
            ("GET", repo + r"/issues/(?P<index>\d+)/timeline", self._api_timeline),
            ("GET", repo + r"/issues/(?P<index>\d+)/comments", self._api_list_comments),
            ("POST", repo + r"/issues/(?P<index>\d+)/comments", self._api_create_comment),
            ("PATCH", repo + r"/issues/comments/(?P<id>\d+)", self._api_edit_comment),
            ("GET", repo + r"/issues/comments/(?P<id>\d+)/reactions", self._api_list_reactions),
            ("POST", repo + r"/issues/comments/(?P<id>\d+)/reactions", self._api_add_reaction),
            ("GET", repo + r"/collaborators/(?P<login>[^/]+)/permission", self._api_permission),
            ("POST", repo + r"/pulls", self._api_create_pull),
            ("GET", repo + r"/pulls", self._api_list_pulls),
            ("PATCH", repo + r"/pulls/(?P<index>\d+)", self._api_edit_pull),
            ("GET", repo + r"/pulls/(?P<base>[^/]+)/(?P<head>.+)", self._api_find_pull),
            ("GET", repo + r"/pulls/(?P<index>\d+)", self._api_get_pull),
        ]
        # what a user's token may call (everything else is the bot's)
        self._user_routes = {self._api_user, self._api_repo, self._api_issue}
        return [(method, re.compile(pattern), fn) for method, pattern, fn in table]

    def _api(self, h, path: str, query: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            for i, (status, method, pattern) in enumerate(self._fail_queue):
                if (method is None or method == h.command) and (
                    pattern is None or pattern.fullmatch(path)
                ):
                    del self._fail_queue[i]
                    return (
                        status,
                        {"message": f"injected failure {status}", "url": self._doc_url},
                        {},
                    )
        public = path == "/version" and not h.headers.get("Authorization")
        login = None if public else self._token_login(h)
        if not public and login is None:
            return 401, {"message": "invalid username, password or token", "url": self._doc_url}, {}
        # token_scopes are the bot token's
        refused = self._scope_refusal(h.command, path) if login == self.bot_login else None
        if refused is not None:
            return 403, {"message": refused, "url": self._doc_url}, {}
        self._who.login = login or self.bot_login
        matched_path = False
        for method, pattern, fn in self._routes:
            match = pattern.fullmatch(path)
            if not match:
                continue
            matched_path = True
            if method != h.command:
                continue
            if not public and login != self.bot_login and fn not in self._user_routes:
                return (
                    403,
                    {"message": "token does not have the required scope", "url": self._doc_url},
                    {},
                )
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            try:
                data = json.loads(body) if body.strip() else {}
            except ValueError:
                return 422, {"message": "invalid JSON body", "url": self._doc_url}, {}
            try:
                with self.lock:
                    result = fn(params=params, query=parse_qs(query), data=data)
            except ApiError as err:
                payload = {"message": err.message, "url": self._doc_url}
                if err.status == 404:
                    payload["errors"] = [err.message]
                payload.update(err.extra)
                return err.status, payload, {}
            if len(result) == 2:
                return result[0], result[1], {}
            return result
        if matched_path:
            return 405, {"message": "method not allowed", "url": self._doc_url}, {}
        return 404, {"message": "not found", "url": self._doc_url, "errors": []}, {}

    def _api_repo_record(self, params: dict) -> dict:
        full = f"{params['owner']}/{params['repo']}"
        record = self._repos.get(full)
        if record is None:
            raise ApiError(404, "repository does not exist")
        return record

    def _require(self, record: dict, level: str) -> None:
        if _rank(self.permission(record["full_name"], self.bot_login)) < _rank(level):
            raise ApiError(403, f"user does not have {level} permission on this repository")

    def _api_user(self, params, query, data):
        return 200, self.user(self._who.login)

    def _readable_record(self, params: dict) -> dict:
        """The repository, if the token's user may read it (404 otherwise, as Gitea)."""
        record = self._api_repo_record(params)
        login = self._who.login
        if self.user(login)["is_admin"] or login == self.bot_login:
            return record
        if _rank(self.permission(record["full_name"], login)) < _rank("read"):
            raise ApiError(404, "repository does not exist")
        return record

    def _api_repo(self, params, query, data):
        record = self._readable_record(params)
        return 200, self._repo_json(record, self._who.login)

    def _api_version(self, params, query, data):
        return 200, {"version": GITEA_VERSION}

    def _api_list_issues(self, params, query, data):
        record = self._api_repo_record(params)
        limit = max(1, min(50, int((query.get("limit") or ["30"])[0])))
        items = [i for _, i in sorted(record["issues"].items(), reverse=True)]
        return 200, items[:limit], {"X-Total-Count": str(len(items))}

    # -- scopes and hooks -----------------------------------------------------------

    @staticmethod
    def _scope_category(path: str) -> str | None:
        if path == "/user" or path.startswith("/user/"):
            return "user"
        if re.fullmatch(r"/repos/[^/]+/[^/]+/issues(/.*)?", path):
            return "issue"
        if path.startswith("/repos/"):
            return "repository"
        if path.startswith("/orgs/"):
            return "organization"
        return None

    def _missing_scope(self, category: str | None, method: str) -> str | None:
        """The scope a request lacks, as Gitea names it, or None."""
        scopes = self.token_scopes
        if scopes is None or category is None or "all" in scopes:
            return None
        level = "read" if method in ("GET", "HEAD") else "write"
        if f"write:{category}" in scopes or f"{level}:{category}" in scopes:
            return None
        return f"{level}:{category}"

    def _scope_refusal(self, method: str, path: str) -> str | None:
        missing = self._missing_scope(self._scope_category(path), method)
        if missing is None:
            return None
        return (
            f"token does not have at least one of required scope(s), required=[{missing}], "
            f"token scope={','.join(sorted(self.token_scopes or ()))}"
        )

    def _hook_scope(self, params: dict) -> tuple[str, str]:
        """("repo", full name) or ("org", name) of a hooks route, its access checked."""
        if "org" in params:
            name = params["org"]
            if name not in self._orgs:
                raise ApiError(404, "organization does not exist")
            if self.bot_login not in self._orgs[name]:
                raise ApiError(403, "Must be an organization owner")
            return "org", name
        record = self._api_repo_record(params)
        if _rank(self.permission(record["full_name"], self.bot_login)) < _rank("admin"):
            raise ApiError(
                403, "user should be an owner or a collaborator with admin write of a repository"
            )
        return "repo", record["full_name"]

    @staticmethod
    def _hook_events(events: Any) -> list[str]:
        """The single events a request's list turns on (as Gitea's addHook/editHook)."""
        if not isinstance(events, list) or not events:
            events = ["push"]
        chosen: list[str] = []
        for name in events:
            for single in _HOOK_GROUPS.get(name, (name,)):
                if single in HOOK_EVENTS and single not in chosen:
                    chosen.append(single)
        return chosen

    def _hook_json(self, hook: dict) -> dict:
        """The hook as the API shows it: never the secret."""
        return {
            "id": hook["id"],
            "type": hook["type"],
            "name": hook["name"],
            "branch_filter": hook["branch_filter"],
            "config": {"url": hook["url"], "content_type": hook["content_type"]},
            "events": list(hook["events"]),
            "authorization_header": hook["authorization_header"],
            "active": hook["active"],
            "created_at": hook["created_at"],
            "updated_at": hook["updated_at"],
        }

    def _api_list_hooks(self, params, query, data):
        scope = self._hook_scope(params)
        page = max(1, int((query.get("page") or ["1"])[0]))
        limit = max(1, min(50, int((query.get("limit") or ["30"])[0])))
        items = [self._hook_json(h) for _, h in sorted(self.hooks.items()) if h["scope"] == scope]
        return 200, items[(page - 1) * limit : page * limit], {"X-Total-Count": str(len(items))}

    def _api_create_hook(self, params, query, data):
        scope = self._hook_scope(params)
        if data.get("type") not in HOOK_TYPES:
            raise ApiError(422, f"Invalid hook type: {data.get('type')}")
        config = data.get("config") if isinstance(data.get("config"), dict) else {}
        for name in ("url", "content_type"):
            if name not in config:
                raise ApiError(422, f"Missing config option: {name}")
        if config["content_type"] not in ("json", "form"):
            raise ApiError(422, "Invalid content type")
        now = _now()
        hook = {
            "id": self._next("hook"),
            "scope": scope,
            "type": data["type"],
            "name": str(data.get("name") or ""),
            "url": str(config["url"]),
            "content_type": config["content_type"],
            "secret": str(config.get("secret") or ""),
            "events": self._hook_events(data.get("events")),
            "branch_filter": str(data.get("branch_filter") or ""),
            "authorization_header": str(data.get("authorization_header") or ""),
            "active": bool(data.get("active", False)),
            "created_at": now,
            "updated_at": now,
        }
        self.hooks[hook["id"]] = hook
        return 201, self._hook_json(hook)

    def _api_hook(self, params) -> dict:
        scope = self._hook_scope(params)
        hook = self.hooks.get(int(params["id"]))
        if hook is None or hook["scope"] != scope:
            raise ApiError(404, "webhook does not exist")
        return hook

    def _api_edit_hook(self, params, query, data):
        hook = self._api_hook(params)
        config = data.get("config")
        if isinstance(config, dict):
            if "content_type" in config and config["content_type"] not in ("json", "form"):
                raise ApiError(422, "Invalid content type")
            for key, field in (("url", "url"), ("content_type", "content_type")):
                if key in config:
                    hook[field] = str(config[key])
            if "secret" in config:
                hook["secret"] = str(config["secret"])
        # as Gitea's editHook: the events, branch filter and authorization header are
        # replaced by what the request says, or emptied
        hook["events"] = self._hook_events(data.get("events"))
        hook["branch_filter"] = str(data.get("branch_filter") or "")
        hook["authorization_header"] = str(data.get("authorization_header") or "")
        if "active" in data and data["active"] is not None:
            hook["active"] = bool(data["active"])
        if data.get("name") is not None:
            hook["name"] = str(data["name"])
        hook["updated_at"] = _now()
        return 200, self._hook_json(hook)

    def _api_test_hook(self, params, query, data):
        hook = dict(self._api_hook(params))
        record = self._api_repo_record(params)
        if "push" not in hook["events"]:
            # as Gitea's PrepareWebhook: a hook without the push event gets no push test
            # delivery, and the answer is 204 all the same
            return 204, None
        payload = self._push_payload(record)
        threading.Thread(
            target=self._deliver, args=(hook, "push", payload), name="fake-gitea-hook", daemon=True
        ).start()
        return 204, None

    def _push_payload(self, record: dict) -> dict:
        full, branch = record["full_name"], record["default_branch"]
        sha = self.branch_sha(full, branch) or "0" * 40
        bot = self.user(self.bot_login)
        commit = {
            "id": sha,
            "message": "Initial commit\n",
            "url": f"{self.url}/{full}/commit/{sha}",
            "author": {"name": "Fake Gitea", "email": "fake-gitea@example.invalid"},
            "committer": {"name": "Fake Gitea", "email": "fake-gitea@example.invalid"},
            "timestamp": _now(),
            "added": [],
            "removed": [],
            "modified": [],
        }
        return {
            "ref": f"refs/heads/{branch}",
            "before": sha,
            "after": sha,
            "compare_url": f"{self.url}/{full}/compare/{sha}...{sha}",
            "commits": [commit],
            "total_commits": 1,
            "head_commit": commit,
            "repository": self._repo_json(record),
            "pusher": bot,
            "sender": bot,
        }

    def _deliver(self, hook: dict, event: str, payload: dict) -> None:
        """Send one delivery as Gitea does: signed with the hook's secret, 5 s to answer."""
        attempt: dict[str, Any] = {"hook": hook["id"], "url": hook["url"], "status": None}
        if self.block_deliveries:
            attempt["error"] = (
                "webhook can only call allowed HTTP servers (check your "
                "webhook.ALLOWED_HOST_LIST setting)"
            )
            with self.lock:
                self.hook_deliveries.append(attempt)
            return
        signed = json.dumps(payload, indent=2).encode()
        body = signed
        content_type = "application/json"
        if hook["content_type"] == "form":
            body = ("payload=" + quote(signed.decode(), safe="")).encode()
            content_type = "application/x-www-form-urlencoded"
        signature = hmac.new(hook["secret"].encode(), signed, hashlib.sha256).hexdigest()
        delivery = str(uuid.uuid4())
        headers = {"Content-Type": content_type, "User-Agent": "Go-http-client/1.1"}
        for prefix in ("X-Gitea", "X-Gogs"):
            headers.update(
                {
                    f"{prefix}-Delivery": delivery,
                    f"{prefix}-Event": event,
                    f"{prefix}-Event-Type": event,
                    f"{prefix}-Signature": signature,
                }
            )
        headers["X-Hub-Signature-256"] = "sha256=" + signature
        try:
            answer = requests.post(hook["url"], data=body, headers=headers, timeout=5)
            attempt["status"] = answer.status_code
            attempt["error"] = None
        except requests.RequestException as exc:
            attempt["error"] = f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.hook_deliveries.append(attempt)

    def _api_issue(self, params, query, data):
        record = self._readable_record(params)
        return 200, self._issue_view(record, int(params["index"]))

    def _api_list_comments(self, params, query, data):
        record = self._api_repo_record(params)
        number = int(params["index"])
        self._issue_view(record, number)
        since = _since(query)
        items = [c for c in self.comments_on(record["full_name"], number) if since(c)]
        return 200, items, {"X-Total-Count": str(len(items))}

    def _api_list_issues(self, params, query, data):
        """Gitea's ListIssues: newest first; `state` open (default), closed or all; `type`
        issues or pulls (both when unset); `since` on the updated time; pages of at most 50."""
        record = self._api_repo_record(params)
        state = (query.get("state") or ["open"])[0]
        kind = (query.get("type") or [""])[0]
        since = _since(query)
        views = [self._issue_view(record, n) for n in (*record["issues"], *record["pulls"])]
        items = [
            v
            for v in sorted(views, key=lambda v: v["id"], reverse=True)
            if (state == "all" or v["state"] == state)
            and (kind != "issues" or v["pull_request"] is None)
            and (kind != "pulls" or v["pull_request"] is not None)
            and since(v)
        ]
        return _page(items, query)

    def _api_timeline(self, params, query, data):
        """An issue's comments and label events, oldest first, `since` on the updated time,
        in pages (default 30, at most 50)."""
        record = self._api_repo_record(params)
        number = int(params["index"])
        self._issue_view(record, number)
        home, since = (record["full_name"], number), _since(query)
        entries = [{**c, "type": "comment"} for c in self.comments_on(*home)] + [
            e for eid, e in self.events.items() if self._event_home[eid] == home
        ]
        return _page([e for e in sorted(entries, key=lambda e: e["id"]) if since(e)], query)

    def _api_create_comment(self, params, query, data):
        record = self._api_repo_record(params)
        body = data.get("body")
        if not isinstance(body, str) or not body:
            raise ApiError(422, "[Body]: Required")
        self._require(record, "read")
        return 201, self._new_comment(record, int(params["index"]), body, self.user(self.bot_login))

    def _api_comment(self, params) -> tuple[dict, dict]:
        record = self._api_repo_record(params)
        cid = int(params["id"])
        home = self._comment_home.get(cid)
        if home is None or home[0] != record["full_name"]:
            raise ApiError(404, "comment does not exist")
        return record, self.comments[cid]

    def _api_edit_comment(self, params, query, data):
        record, comment = self._api_comment(params)
        body = data.get("body")
        if not isinstance(body, str):
            raise ApiError(422, "[Body]: Required")
        if comment["user"]["login"] != self.bot_login:
            self._require(record, "write")
        comment["body"] = body
        comment["updated_at"] = _now()
        return 200, comment

    def _api_list_reactions(self, params, query, data):
        _, comment = self._api_comment(params)
        bot = self.user(self.bot_login)
        return 200, [
            {"user": bot, "content": c, "created_at": comment["created_at"]}
            for c in self.reactions.get(comment["id"], [])
        ]

    def _api_add_reaction(self, params, query, data):
        _, comment = self._api_comment(params)
        content = data.get("content")
        if content not in ALLOWED_REACTIONS:
            raise ApiError(403, f"'{content}' is not an allowed reaction")
        reaction = {"user": self.user(self.bot_login), "content": content, "created_at": _now()}
        existing = self.reactions.setdefault(comment["id"], [])
        if content in existing:
            return 200, reaction
        existing.append(content)
        return 201, reaction

    def _api_permission(self, params, query, data):
        record = self._api_repo_record(params)
        login = params["login"]
        if login != self.bot_login:
            self._require(record, "admin")
        permission = self.permission(record["full_name"], login)
        return 200, {"permission": permission, "role_name": permission, "user": self.user(login)}

    def _pull_branch_info(self, record: dict, branch: str, sha: str) -> dict:
        return {
            "label": branch,
            "ref": branch,
            "sha": sha,
            "repo_id": record["id"],
            "repo": self._repo_json(record),
        }

    def _new_pull(
        self,
        record: dict,
        number: int,
        *,
        user: dict,
        title: str,
        body: str,
        base: dict,
        head: dict,
        merge_base: str,
        allow_maintainer_edit: bool,
    ) -> dict:
        """A new open pull request as Gitea stores and serves it (`PullRequest`)."""
        full = record["full_name"]
        now = _now()
        html = f"{self.url}/{full}/pulls/{number}"
        return {
            "id": self._next("pull"),
            "issue_id": self._next("issue"),
            "url": html,
            "number": number,
            "user": user,
            "title": title,
            "body": body,
            "labels": [],
            "milestone": None,
            "assignee": None,
            "assignees": None,
            "requested_reviewers": None,
            "requested_reviewers_teams": None,
            "state": "open",
            "draft": False,
            "is_locked": False,
            "comments": 0,
            "review_comments": 0,
            "additions": 0,
            "deletions": 0,
            "changed_files": 0,
            "html_url": html,
            "diff_url": html + ".diff",
            "patch_url": html + ".patch",
            "mergeable": True,
            "merged": False,
            "merged_at": None,
            "merge_commit_sha": None,
            "merged_by": None,
            "allow_maintainer_edit": allow_maintainer_edit,
            "base": base,
            "head": head,
            "merge_base": merge_base,
            "due_date": None,
            "created_at": now,
            "updated_at": now,
            "closed_at": None,
            "pin_order": 0,
        }

    def _api_create_pull(self, params, query, data):
        record = self._api_repo_record(params)
        head, base, title = data.get("head"), data.get("base"), data.get("title")
        missing = [
            k
            for k, v in (("Head", head), ("Base", base), ("Title", title))
            if not isinstance(v, str) or not v
        ]
        if missing:
            raise ApiError(422, ", ".join(f"[{k}]: Required" for k in missing))
        if head == base:
            raise ApiError(
                422, "Invalid PullRequest: There are no changes between the head and the base"
            )
        self._require(record, "read")
        head_branch = self._split_head(record, head)
        full = record["full_name"]
        base_sha = self.branch_sha(full, base)
        head_sha = self.branch_sha(full, head_branch)
        if base_sha is None or head_sha is None:
            raise ApiError(404, "branch does not exist")
        existing = self._open_pull_for(record, head_branch, base)
        if existing is not None:
            raise self._already_exists(record, existing)
        try:
            merge_base = self._git(record["path"], "merge-base", base_sha, head_sha).strip()
        except subprocess.CalledProcessError:
            merge_base = ""
        number = self._take_number(record)
        pr = self._new_pull(
            record,
            number,
            user=self.user(self.bot_login),
            title=title,
            body=data.get("body") or "",
            base=self._pull_branch_info(record, base, base_sha),
            head=self._pull_branch_info(record, head_branch, head_sha),
            merge_base=merge_base,
            allow_maintainer_edit=bool(data.get("allow_maintainer_edit", False)),
        )
        record["pulls"][number] = pr
        return 201, pr

    def _api_pull(self, params) -> tuple[dict, dict]:
        record = self._api_repo_record(params)
        pr = record["pulls"].get(int(params["index"]))
        if pr is None:
            raise ApiError(404, "pull request does not exist")
        return record, pr

    def _api_edit_pull(self, params, query, data):
        record, pr = self._api_pull(params)
        if pr["user"]["login"] != self.bot_login:
            self._require(record, "write")
        state = data.get("state")
        if state is not None and state not in ("open", "closed"):
            raise ApiError(422, f"invalid state {state!r}")
        if state is not None and pr["merged"]:
            raise ApiError(412, "cannot change state of this pull request, it was already merged")
        new_base = data.get("base")
        if new_base and new_base != pr["base"]["ref"]:
            sha = self.branch_sha(record["full_name"], new_base)
            if sha is None:
                raise ApiError(404, f"new base '{new_base}' not exist")
        if state == "open" and pr["state"] == "closed":
            other = self._open_pull_for(
                record, pr["head"]["ref"], new_base or pr["base"]["ref"], exclude=pr["number"]
            )
            if other is not None:
                raise self._already_exists(record, other)
        now = _now()
        if data.get("title"):
            pr["title"] = data["title"]
        if "body" in data and data["body"] is not None:
            pr["body"] = data["body"]
        if new_base and new_base != pr["base"]["ref"]:
            pr["base"] = self._pull_branch_info(
                record, new_base, self.branch_sha(record["full_name"], new_base)
            )
        if state == "closed" and pr["state"] != "closed":
            pr["state"], pr["closed_at"] = "closed", now
        elif state == "open" and pr["state"] != "open":
            pr["state"], pr["closed_at"] = "open", None
        pr["updated_at"] = now
        return 201, self._refresh_pull(record, pr)

    def _api_get_pull(self, params, query, data):
        record, pr = self._api_pull(params)
        return 200, self._refresh_pull(record, pr)

    def _api_find_pull(self, params, query, data):
        record = self._api_repo_record(params)
        head = self._split_head(record, params["head"])
        for _number, pr in sorted(record["pulls"].items()):
            if pr["base"]["ref"] == params["base"] and pr["head"]["ref"] == head:
                return 200, self._refresh_pull(record, pr)
        raise ApiError(404, "pull request does not exist")

    def _api_list_pulls(self, params, query, data):
        record = self._api_repo_record(params)
        state = (query.get("state") or ["open"])[0]
        base = (query.get("base_branch") or [None])[0]
        page = max(1, int((query.get("page") or ["1"])[0]))
        limit = max(1, min(50, int((query.get("limit") or ["30"])[0])))
        items = [
            self._refresh_pull(record, pr)
            for _, pr in sorted(record["pulls"].items())
            if (state == "all" or pr["state"] == state)
            and (base is None or pr["base"]["ref"] == base)
        ]
        return 200, items[(page - 1) * limit : page * limit], {"X-Total-Count": str(len(items))}


def _since(query: dict[str, list[str]]) -> Callable[[dict], bool]:
    """Whether an item was updated at or after the query's `since` (RFC 3339), as Gitea
    compares them: in whole seconds, inclusive."""
    if not query.get("since"):
        return lambda item: True
    since = int(datetime.fromisoformat(query["since"][0]).timestamp())
    return lambda item: int(datetime.fromisoformat(item["updated_at"]).timestamp()) >= since


def _page(items: list, query: dict[str, list[str]]) -> tuple[int, list, dict[str, str]]:
    """One page of a list, as Gitea pages it (`page` from 1, `limit` 30 by default, at most
    50), with the total in X-Total-Count."""
    page = max(1, int((query.get("page") or ["1"])[0]))
    limit = max(1, min(50, int((query.get("limit") or ["30"])[0])))
    return 200, items[(page - 1) * limit : page * limit], {"X-Total-Count": str(len(items))}


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    """The request body with chunked transfer coding and gzip/deflate content coding undone."""
    if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
        chunks = []
        while True:
            line = h.rfile.readline(65537)
            if not line:
                raise EOFError("connection closed inside a chunked body")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while h.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunks.append(h.rfile.read(size))
            h.rfile.readline(3)
        data = b"".join(chunks)
    else:
        length = int(h.headers.get("Content-Length") or 0)
        data = h.rfile.read(length) if length > 0 else b""
    encoding = h.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        data = gzip.decompress(data)
    elif encoding == "deflate":
        data = zlib.decompress(data)
    return data


def _parse_cgi(output: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Split CGI output into (status, headers, body)."""
    positions = [p for p in (output.find(b"\r\n\r\n"), output.find(b"\n\n")) if p >= 0]
    if not positions:
        return 500, [], output
    end = min(positions)
    sep = 4 if output[end : end + 4] == b"\r\n\r\n" else 2
    head, body = output[:end], output[end + sep :]
    status = 200
    headers: list[tuple[str, str]] = []
    for line in head.decode("latin-1").splitlines():
        if not line.strip():
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key.lower() == "status":
            status = int(value.split()[0])
        else:
            headers.append((key, value))
    return status, headers, body
