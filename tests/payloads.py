"""Webhook deliveries shaped like Gitea 1.26 sends them, built and signed in the test.

Field names, nesting and header set follow Gitea's payload structs; ids, names and
times are made up. Bodies are serialized as Gitea does: two-space indent, no
trailing newline. `sign()` computes the same headers a real delivery carries.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import uuid
from collections.abc import Iterable
from typing import Any

SECRET = "kugetsu-test-secret"
GITEA = "http://gitea.local:3000"
_ids = itertools.count(1000)


def user(login: str, uid: int | None = None) -> dict[str, Any]:
    uid = uid if uid is not None else next(_ids)
    return {
        "id": uid,
        "login": login,
        "login_name": "",
        "source_id": 0,
        "full_name": login.title(),
        "email": f"{uid}+{login}@noreply.gitea.local",
        "avatar_url": f"{GITEA}/avatars/{uid}",
        "html_url": f"{GITEA}/{login}",
        "language": "",
        "is_admin": False,
        "last_login": "0001-01-01T00:00:00Z",
        "created": "2026-01-02T03:04:05Z",
        "restricted": False,
        "active": False,
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


def repository(full_name: str = "acme/widget", *, permission: str = "write") -> dict[str, Any]:
    owner, name = full_name.split("/")
    perms = {
        "admin": permission in ("admin", "owner"),
        "push": permission in ("write", "admin", "owner"),
        "pull": permission != "none",
    }
    return {
        "id": 7,
        "owner": user(owner, 2),
        "name": name,
        "full_name": full_name,
        "description": "",
        "empty": False,
        "private": False,
        "fork": False,
        "template": False,
        "mirror": False,
        "size": 42,
        "language": "",
        "languages_url": "",
        "html_url": f"{GITEA}/{full_name}",
        "url": f"{GITEA}/api/v1/repos/{full_name}",
        "link": "",
        "ssh_url": f"git@gitea.local:{full_name}.git",
        "clone_url": f"{GITEA}/{full_name}.git",
        "original_url": "",
        "website": "",
        "stars_count": 0,
        "forks_count": 0,
        "watchers_count": 1,
        "open_issues_count": 3,
        "open_pr_counter": 0,
        "release_counter": 0,
        "default_branch": "main",
        "archived": False,
        "created_at": "2026-01-02T03:04:05Z",
        "updated_at": "2026-11-20T10:00:00Z",
        "archived_at": "1970-01-01T00:00:00Z",
        "permissions": perms,
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
        "default_delete_branch_after_merge": False,
        "default_merge_style": "merge",
        "default_allow_maintainer_edit": False,
        "avatar_url": "",
        "internal": False,
        "mirror_interval": "",
        "object_format_name": "sha1",
        "mirror_updated": "0001-01-01T00:00:00Z",
        "topics": [],
        "licenses": [],
    }


def label(name: str, lid: int | None = None) -> dict[str, Any]:
    lid = lid if lid is not None else next(_ids)
    return {
        "id": lid,
        "name": name,
        "exclusive": False,
        "is_archived": False,
        "color": "e11d21",
        "description": "",
        "url": f"{GITEA}/api/v1/repos/acme/widget/labels/{lid}",
    }


def issue(
    number: int,
    *,
    title: str = "Fix the widget",
    body: str = "It is broken.",
    labels: Iterable[str] = (),
    repo: str = "acme/widget",
    author: str = "alice",
    is_pull: bool = False,
) -> dict[str, Any]:
    owner, name = repo.split("/")
    return {
        "id": 500 + number,
        "url": f"{GITEA}/api/v1/repos/{repo}/issues/{number}",
        "html_url": f"{GITEA}/{repo}/{'pulls' if is_pull else 'issues'}/{number}",
        "number": number,
        "user": user(author, 3),
        "original_author": "",
        "original_author_id": 0,
        "title": title,
        "body": body,
        "ref": "",
        "assets": [],
        "labels": [label(n, 10 + i) for i, n in enumerate(labels)],
        "milestone": None,
        "assignee": None,
        "assignees": None,
        "state": "open",
        "is_locked": False,
        "comments": 0,
        "created_at": "2026-11-20T10:00:00Z",
        "updated_at": "2026-11-20T10:00:00Z",
        "closed_at": None,
        "due_date": None,
        "time_estimate": 0,
        "pull_request": (
            {
                "merged": False,
                "merged_at": None,
                "draft": False,
                "html_url": f"{GITEA}/{repo}/pulls/{number}",
            }
            if is_pull
            else None
        ),
        "repository": {"id": 7, "name": name, "owner": owner, "full_name": repo},
        "pin_order": 0,
        "content_version": 1,
    }


def issue_payload(
    action: str,
    number: int = 7,
    *,
    labels: Iterable[str] = (),
    sender: str = "alice",
    permission: str = "write",
    repo: str = "acme/widget",
    title: str = "Fix the widget",
    body: str = "It is broken.",
    author: str = "alice",
) -> dict[str, Any]:
    """`permission` is the issue author's, as Gitea fills `repository.permissions` here."""
    return {
        "action": action,
        "number": number,
        "issue": issue(number, title=title, body=body, labels=labels, repo=repo, author=author),
        "repository": repository(repo, permission=permission),
        "sender": user(sender, 3),
        "commit_id": "",
    }


def comment_payload(
    text: str,
    number: int = 7,
    *,
    sender: str = "alice",
    permission: str = "write",
    action: str = "created",
    is_pull: bool = False,
    comment_id: int | None = None,
    repo: str = "acme/widget",
    labels: Iterable[str] = (),
    pull: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`pull`: the pull request a comment on one carries (as the fake Gitea serves it),
    instead of a stand-in of kugetsu's own."""
    cid = comment_id if comment_id is not None else next(_ids)
    data: dict[str, Any] = {
        "action": action,
        "issue": issue(number, repo=repo, is_pull=is_pull, labels=labels),
        "comment": {
            "id": cid,
            "html_url": f"{GITEA}/{repo}/issues/{number}#issuecomment-{cid}",
            "pull_request_url": f"{GITEA}/{repo}/pulls/{number}" if is_pull else "",
            "issue_url": "" if is_pull else f"{GITEA}/{repo}/issues/{number}",
            "user": user(sender, 3),
            "original_author": "",
            "original_author_id": 0,
            "body": text,
            "assets": [],
            "created_at": "2026-11-20T10:05:00Z",
            "updated_at": "2026-11-20T10:05:00Z",
        },
        "repository": repository(repo, permission=permission),
        "sender": user(sender, 3),
        "is_pull": is_pull,
    }
    if action == "edited":
        data["changes"] = {"body": {"from": "old text"}}
    if is_pull:
        data["pull_request"] = pull or {
            "id": 900 + number,
            "number": number,
            "title": "PR",
            "head": {"ref": f"kugetsu/issue-{number}"},
            "base": {"ref": "main"},
        }
    return data


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, indent=2, ensure_ascii=False).encode("utf-8")


def sign(
    body: bytes,
    *,
    event: str,
    event_type: str | None = None,
    secret: str = SECRET,
    delivery: str | None = None,
) -> dict[str, str]:
    delivery = delivery or str(uuid.uuid4())
    event_type = event_type or event
    sig = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    sha1 = hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Go-http-client/1.1",
        "X-Gitea-Hook-Installation-Target-Type": "repository",
        "X-Hub-Signature": f"sha1={sha1}",
        "X-Hub-Signature-256": f"sha256={sig}",
    }
    for prefix in ("X-Gitea", "X-Gogs", "X-GitHub"):
        headers[f"{prefix}-Delivery"] = delivery
        headers[f"{prefix}-Event"] = event
        headers[f"{prefix}-Event-Type"] = event_type
    headers["X-Gitea-Signature"] = sig
    headers["X-Gogs-Signature"] = sig
    return headers


def label_delivery(
    labels: Iterable[str], number: int = 7, *, action: str = "label_updated", **kw: Any
) -> tuple[bytes, dict[str, str]]:
    body = encode(issue_payload(action, number, labels=labels, **kw))
    etype = "issues" if action == "opened" else "issue_label"
    return body, sign(body, event="issues", event_type=etype)


def comment_delivery(
    text: str, number: int = 7, *, is_pull: bool = False, **kw: Any
) -> tuple[bytes, dict[str, str]]:
    body = encode(comment_payload(text, number, is_pull=is_pull, **kw))
    etype = "pull_request_comment" if is_pull else "issue_comment"
    return body, sign(body, event="issue_comment", event_type=etype)


def review_delivery(
    payload: dict[str, Any], event_type: str, event: str
) -> tuple[bytes, dict[str, str]]:
    """A submitted review's delivery (`FakeGitea.review_event` gives its parts)."""
    body = encode(payload)
    return body, sign(body, event=event, event_type=event_type)
