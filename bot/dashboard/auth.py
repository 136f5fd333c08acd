"""Signing in with Gitea: PKCE, the signed session cookie, sessions, CSRF tokens.

Sessions live in the receiver's memory only. A user's Gitea token is never written to
disk (where an agent running as the same operating-system user could read it), never
put in a cookie and never logged; a restart signs everyone out, and signing in again
is one redirect through Gitea. The cookie holds a random session id and its HMAC under
a key made at start-up, so a cookie cannot be forged or carried over a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

SESSION_COOKIE = "kugetsu_session"
#: binds a sign-in that Gitea sends back to the browser that started it
LOGIN_COOKIE = "kugetsu_login"
#: what kugetsu asks Gitea for: who the user is, the repositories and issues they can read.
#: Gitea keeps the scope of a user's first consent, so this string must not change.
OAUTH_SCOPE = "read:user read:repository read:issue"
#: sessions kept at most (the oldest goes first)
MAX_SESSIONS = 10_000
#: sign-ins begun and not yet back from Gitea, kept at most, and for how long
MAX_PENDING_LOGINS = 1_000
LOGIN_SECONDS = 600.0


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier (RFC 7636: 43 to 128 characters) and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    return verifier, pkce_challenge(verifier)


def pkce_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class Signer:
    """HMAC-signs short values for cookies, with a key of its own."""

    def __init__(self, key: bytes | None = None):
        self._key = key or secrets.token_bytes(32)

    def _mac(self, value: str) -> str:
        return hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:32]

    def sign(self, value: str) -> str:
        return f"{value}.{self._mac(value)}"

    def unsign(self, signed: str | None) -> str | None:
        """The value, or None if the signature does not match."""
        if not signed or "." not in signed:
            return None
        value, _, mac = signed.rpartition(".")
        return value if hmac.compare_digest(mac, self._mac(value)) else None


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only, never another site."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(ord(c) < 32 for c in target)
    ):
        return "/"
    return target


@dataclass
class Session:
    """One signed-in browser."""

    id: str
    login: str
    is_admin: bool
    token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    #: when Gitea's access token runs out (then it is refreshed)
    token_expires: float
    #: when the sign-in ends
    expires: float
    csrf: str = field(repr=False)
    #: repository -> (when Gitea was asked, the user's permission there)
    access: dict[str, tuple[float, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf, token or "")


class Sessions:
    """Signed-in sessions and sign-ins on their way, in memory, bounded."""

    def __init__(self, lifetime: float, *, clock: Callable[[], float] = time.time):
        self.lifetime, self.clock = lifetime, clock
        self.signer = Signer()
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._logins: OrderedDict[str, tuple[float, str, str]] = OrderedDict()

    # -- sessions

    def create(
        self, login: str, is_admin: bool, token: str, refresh_token: str, expires_in: float
    ) -> Session:
        now = self.clock()
        session = Session(
            id=secrets.token_urlsafe(32),
            login=login,
            is_admin=is_admin,
            token=token,
            refresh_token=refresh_token,
            token_expires=now + max(0.0, expires_in),
            expires=now + self.lifetime,
            csrf=secrets.token_urlsafe(32),
        )
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session

    def get(self, cookie: str | None) -> Session | None:
        """The session a cookie names, unless it is forged, unknown or has expired."""
        sid = self.signer.unsign(cookie)
        if sid is None:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None and session.expires <= self.clock():
                del self._sessions[sid]
                session = None
        return session

    def cookie(self, session: Session) -> str:
        return self.signer.sign(session.id)

    def drop(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    # -- sign-ins on their way

    def begin_login(self, next_url: str) -> tuple[str, str]:
        """(state, PKCE verifier) of a new sign-in that returns to `next_url`."""
        state, (verifier, _) = secrets.token_urlsafe(24), pkce_pair()
        now = self.clock()
        with self._lock:
            self._logins[state] = (now, verifier, safe_next(next_url))
            while self._logins and (
                len(self._logins) > MAX_PENDING_LOGINS
                or next(iter(self._logins.values()))[0] < now - LOGIN_SECONDS
            ):
                self._logins.popitem(last=False)
        return state, verifier

    def finish_login(self, state: str | None, cookie: str | None) -> tuple[str, str] | None:
        """(PKCE verifier, where to go) of the sign-in `state` names, once, and only in
        the browser that began it (its login cookie carries the same state)."""
        if not state or self.signer.unsign(cookie) != state:
            return None
        with self._lock:
            found = self._logins.pop(state, None)
        if found is None or found[0] < self.clock() - LOGIN_SECONDS:
            return None
        return found[1], found[2]
