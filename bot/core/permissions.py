"""Gitea's repository permissions: their one order, and what a request shows of its
requester's.

Pure. Who may ask kugetsu for work is judged by the requester's permission on the
repository. Gitea tells it to repository admins (`GET .../collaborators/{user}/permission`);
without admin, kugetsu judges by what the signed delivery itself shows, never by a field
that describes someone else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Gitea's permissions, weakest first
PERMISSIONS = ("none", "read", "write", "admin", "owner")

#: The permission hint of a request made by adding a label. Gitea lets only users with
#: write access change labels, so whoever did has at least write.
LABELLER = "labeller"

#: The permission hint of a request that shows nothing of its requester's permission: a
#: review, whose delivery carries the pull request author's, or a comment that a reconcile
#: pass found on Gitea, with no delivery at all. Only Gitea's permission API can tell,
#: which needs a repository admin.
UNSHOWN = "unshown"


def at_least(have: str | None, need: str) -> bool:
    """True if `have` is a permission and is `need` or stronger."""
    if have not in PERMISSIONS:
        return False
    return PERMISSIONS.index(have) >= PERMISSIONS.index(need)


def in_delivery(repository: Any) -> str | None:
    """The permission in a delivery's `repository.permissions`, or None if it has none.

    Whose permission it is depends on the event: on `issue_comment` deliveries Gitea
    fills it for the commenter, on `issues` deliveries for the issue's author. So it is
    the sender's own on comments, and on issue events only when the sender wrote the
    issue (`core.events.parse` keeps it only then).
    """
    perms = repository.get("permissions") if isinstance(repository, Mapping) else None
    if not isinstance(perms, Mapping):
        return None
    if perms.get("admin"):
        return "admin"
    if perms.get("push"):
        return "write"
    if perms.get("pull"):
        return "read"
    return "none"


def shown(hint: str | None) -> tuple[str, bool]:
    """What a request itself shows of its requester's permission: (permission, exact).

    For when Gitea will not tell (its permission API needs a repository admin). The
    hint never comes from a field that describes someone else: a comment carries the
    commenter's permission (exact); a label change shows only that the labeller has at
    least write; a review, or a comment found by a reconcile pass, shows nothing, and
    says so (not exact); anything else shows nothing ("none").
    """
    if hint == LABELLER:
        return "write", False
    if hint == UNSHOWN:
        return "none", False
    if hint in PERMISSIONS:
        return hint, True
    return "none", True
