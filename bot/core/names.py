"""Gitea's rules for the names and numbers kugetsu takes from outside.

Pure. A repository's `owner/name`, a user's login and an issue or comment number
arrive in deliveries and on the command line, and end up in API paths, directory
names and SQLite integers. They are all checked here, by Gitea's own rules: names of
ASCII letters, digits, `-`, `_` and `.` (never `.` or `..`), users and organizations
at most 40 characters, repositories at most 100, and numbers from 1 to 2^63 - 1
(Gitea's int64 and SQLite's INTEGER).
"""

from __future__ import annotations

import re
from typing import Any

#: ids and issue numbers are Gitea int64s, and SQLite INTEGERs: they live in 1..MAX_ID
MAX_ID = 2**63 - 1
MAX_OWNER_LENGTH = 40
MAX_REPO_NAME_LENGTH = 100
MAX_LOGIN_LENGTH = 40

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
#: how much of a bad value an error message shows
_SHOWN = 60


def shown(value: Any) -> str:
    """A bad value for a one-line error: its repr, cut short."""
    if isinstance(value, int) and abs(value) >= 10**_SHOWN:
        return f"a number of more than {_SHOWN} digits"  # and str() refuses the longest
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def name_error(value: Any, what: str, max_length: int) -> str | None:
    """Why `value` is not a valid user, organization or repository name, or None."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        return f"{what} {shown(value)} is not letters, digits, '-', '_' and '.'"
    if value in (".", ".."):
        return f"{what} {value!r} is not a name"
    if len(value) > max_length:
        return f"{what} is longer than {max_length} characters"
    return None


def login_error(login: Any) -> str | None:
    return name_error(login, "login", MAX_LOGIN_LENGTH)


def repo_error(full_name: Any) -> str | None:
    """Why `full_name` is not a valid `owner/name`, or None."""
    if not isinstance(full_name, str) or full_name.count("/") != 1:
        return f"repository {shown(full_name)} is not owner/name"
    owner, name = full_name.split("/")
    return name_error(owner, "owner", MAX_OWNER_LENGTH) or name_error(
        name, "repository name", MAX_REPO_NAME_LENGTH
    )


def split_repo(full_name: str) -> tuple[str, str]:
    """(owner, name) of a valid `owner/name`; ValueError with the reason otherwise."""
    error = repo_error(full_name)
    if error:
        raise ValueError(error)
    owner, name = full_name.split("/")
    return owner, name


def number_error(value: Any, what: str = "number") -> str | None:
    """Why `value` is not an id or issue number (an int in 1..MAX_ID), or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{what} {shown(value)} is not an integer"
    if not 1 <= value <= MAX_ID:
        return f"{what} must be between 1 and {MAX_ID}, not {shown(value)}"
    return None
