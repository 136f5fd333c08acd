"""The fake Gitea's conversations: reviews, their line comments, and pull requests
opened by people (from the repository or from a fork), as Gitea 1.26 serves them.

`FakeGitea` takes these methods from `Conversations`:
`GET /repos/{o}/{r}/pulls/{index}/reviews` and `.../reviews/{id}` (PullReview),
`.../reviews/{id}/comments` (PullReviewComment), and
`POST /repos/{o}/{r}/pulls/comments/{id}/resolve` (204). A review's delivery
(`review_event`) is a PullRequestPayload with `action: "reviewed"` and
`review: {type, content}` only: no review id, no path, no line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

#: a review's state, and the event type and legacy event of its delivery
REVIEW_DELIVERY = {
    "APPROVED": ("pull_request_review_approved", "pull_request_approved"),
    "REQUEST_CHANGES": ("pull_request_review_rejected", "pull_request_rejected"),
    "COMMENT": ("pull_request_review_comment", "pull_request_comment"),
}


def _cut_hunk(diff: str, line: int, old: bool, context: int = 3) -> str:
    """The hunk of a one-file diff around `line` (of the new file, or with `old` of the old
    one), cut after that line and to `context` lines before it, with its file header, as
    Gitea keeps a line comment's `diff_hunk` (`CutDiffAroundLine`)."""
    lines = diff.splitlines()
    first = next((i for i, x in enumerate(lines) if x.startswith("@@")), len(lines))
    header = [x for x in lines[:first] if not x.startswith("index ")]
    hunk_re = re.compile(r"@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")
    for i, text in enumerate(lines):
        match = hunk_re.match(text)
        if not match:
            continue
        old_no, new_no = int(match[1]), int(match[2])
        body: list[tuple[int, int, str]] = []
        for row in lines[i + 1 :]:
            if row.startswith("@@"):
                break
            body.append((old_no, new_no, row))
            if row.startswith("-"):
                old_no += 1
            elif row.startswith("+"):
                new_no += 1
            else:
                old_no += 1
                new_no += 1
        for j, (o, n, row) in enumerate(body):
            at_line = (
                (o == line and not row.startswith("+"))
                if old
                else (n == line and not row.startswith("-"))
            )
            if not at_line:
                continue
            kept = body[max(0, j - context) : j + 1]
            first_old, first_new = kept[0][0], kept[0][1]
            olds = sum(1 for _, _, r in kept if not r.startswith("+"))
            news = sum(1 for _, _, r in kept if not r.startswith("-"))
            head = f"@@ -{first_old},{olds} +{first_new},{news} @@"
            return "\n".join([*header, head, *(r for _, _, r in kept)])
    return ""


def _fake():
    """The fake's own helpers (its module imports this one)."""
    from tests import fakegitea

    return fakegitea


class Conversations:
    """Reviews and pull requests people open: a part of `FakeGitea`."""

    def _conversation_routes(self, repo: str) -> list[tuple[str, str, Callable]]:
        pull = repo + r"/pulls/(?P<index>\d+)"
        return [
            ("GET", pull + r"/reviews", self._api_list_reviews),
            ("GET", pull + r"/reviews/(?P<id>\d+)", self._api_get_review),
            ("GET", pull + r"/reviews/(?P<id>\d+)/comments", self._api_review_comments),
            ("POST", repo + r"/pulls/comments/(?P<id>\d+)/resolve", self._api_resolve),
            ("POST", repo + r"/pulls/comments/(?P<id>\d+)/unresolve", self._api_unresolve),
        ]

    # -- test hooks ---------------------------------------------------------------

    def fork_repo(self, source: str, owner: str) -> str:
        """Fork `source` into `owner`'s namespace (its branches and history); returns the
        fork's full name."""
        name = source.split("/")[1]
        full = f"{owner}/{name}"
        path = self.repos_root / owner / f"{name}.git"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._git(None, "clone", "--quiet", "--bare", str(self._repo_path(source)), str(path))
        self._git(path, "config", "http.receivepack", "true")
        with self.lock:
            parent = self._repo(source)
            record = dict(
                parent,
                id=self._next("repo"),
                owner=owner,
                full_name=full,
                path=path,
                owner_user=self.user(owner),
                next_number=1,
                issues={},
                pulls={},
                labels={},
                permissions={owner: "owner"},
                created_at=_fake()._now(),
                fork_of=source,
            )
            self._repos[full] = record
        return full

    def maintainer_may_push(self, repo: str, login: str) -> bool:
        """Whether `login` may push to the fork `repo` as a maintainer: an open pull request
        from it allows edits by maintainers, and `login` may write to its base repository.
        (Gitea checks the pushed branch in its pre-receive hook; the fake lets the whole
        fork through, which is enough for a test that pushes only that branch.)"""
        fake = _fake()
        with self.lock:
            for base in self._repos.values():
                for pull in base["pulls"].values():
                    if (
                        pull["state"] == "open"
                        and pull["allow_maintainer_edit"]
                        and (pull["head"].get("repo") or {}).get("full_name") == repo
                        and fake._rank(self.permission(base["full_name"], login))
                        >= fake._rank("write")
                    ):
                        return True
        return False

    def open_pull(
        self,
        repo: str,
        head: str,
        *,
        title: str = "A person's change",
        body: str = "",
        base: str | None = None,
        login: str = "alice",
        head_repo: str | None = None,
        allow_maintainer_edit: bool = False,
    ) -> int:
        """Open a pull request as `login` from `head` (a branch of `repo`, or of the fork
        `head_repo`) into `base`; returns its number."""
        with self.lock:
            record = self._repo(repo)
            source = self._repo(head_repo or repo)
            base = base or record["default_branch"]
            head_sha = self.branch_sha(source["full_name"], head)
            base_sha = self.branch_sha(repo, base)
            number = self._take_number(record)
            info = self._pull_branch_info(source, head, head_sha)
            info["label"] = head if source is record else f"{source['owner']}:{head}"
            record["pulls"][number] = self._new_pull(
                record,
                number,
                user=self.user(login),
                title=title,
                body=body,
                base=self._pull_branch_info(record, base, base_sha),
                head=info,
                merge_base=base_sha,
                allow_maintainer_edit=allow_maintainer_edit,
            )
            return number

    def pull_json(self, repo: str, number: int) -> dict:
        """A pull request as the API and deliveries show it now."""
        with self.lock:
            record = self._repo(repo)
            return json.loads(
                json.dumps(self._refresh_pull(record, record["pulls"][number]), default=str)
            )

    def add_review(
        self,
        repo: str,
        number: int,
        login: str,
        state: str = "COMMENT",
        body: str = "",
        comments: list[dict] | tuple[dict, ...] = (),
    ) -> dict:
        """Submit a review of pull request `number` as `login`, with line comments, each
        `{"path", "line", "body"}` (a line of the new file; `"old": True` for a line of
        the old one). Returns the review as the API serves it."""
        if state not in REVIEW_DELIVERY and state != "PENDING":
            raise ValueError(f"unknown review state {state!r}")
        with self.lock:
            record = self._repo(repo)
            pr = self._refresh_pull(record, record["pulls"][number])
            reviewer = self.user(login)
            review_id = self._next("review")
            now = _fake()._now()
            page = f"{self.url}/{repo}/pulls/{number}"
            head_sha = pr["head"]["sha"]
            kept = []
            for comment in comments:
                old = bool(comment.get("old"))
                diff = self._git(
                    self._repo_path((pr["head"].get("repo") or {}).get("full_name") or repo),
                    "diff",
                    "-U3",
                    pr["merge_base"] or pr["base"]["sha"],
                    head_sha,
                    "--",
                    comment["path"],
                )
                cid = self._next("comment")
                kept.append(
                    {
                        "id": cid,
                        "body": comment["body"],
                        "user": reviewer,
                        "resolver": None,
                        "pull_request_review_id": review_id,
                        "created_at": now,
                        "updated_at": now,
                        "path": comment["path"],
                        "commit_id": head_sha,
                        "original_commit_id": head_sha,
                        "diff_hunk": _cut_hunk(diff, comment["line"], old),
                        "position": 0 if old else comment["line"],
                        "original_position": comment["line"] if old else 0,
                        "html_url": f"{page}/files#issuecomment-{cid}",
                        "pull_request_url": page,
                    }
                )
            review = {
                "id": review_id,
                "user": reviewer,
                "team": None,
                "state": state,
                "body": body,
                "commit_id": head_sha,
                "stale": False,
                "official": _fake()._rank(self.permission(repo, login)) >= _fake()._rank("write"),
                "dismissed": False,
                "comments_count": len(kept),
                "submitted_at": now,
                "updated_at": now,
                "html_url": f"{page}#issuecomment-{review_id}",
                "pull_request_url": page,
            }
            self._reviews.setdefault((repo, number), []).append(review)
            self._review_comments[review_id] = kept
            stored = record["pulls"][number]
            stored["review_comments"] += len(kept)
            # a submitted review is a comment of the pull request's issue (type "review"):
            # it updates the issue, so the issue list's `since` finds the pull request
            if state != "PENDING":
                stored["updated_at"] = now
            return review

    def review_event(self, repo: str, number: int, review: dict) -> tuple[dict, str, str]:
        """The delivery Gitea sends for a submitted review: (payload, event type, legacy
        event). It holds the review's type and text only; its `repository.permissions`
        are the pull request author's, whoever reviewed."""
        event_type, event = REVIEW_DELIVERY[review["state"]]
        with self.lock:
            record = self._repo(repo)
            pull = self.pull_json(repo, number)
            author = pull["user"]["login"]
            repository = self._repo_json(record)
            rank = _fake()._rank(self.permission(repo, author))
            repository["permissions"] = {
                "admin": rank >= _fake()._rank("admin"),
                "push": rank >= _fake()._rank("write"),
                "pull": rank >= _fake()._rank("read"),
            }
            payload = {
                "action": "reviewed",
                "number": number,
                "pull_request": pull,
                "requested_reviewer": None,
                "repository": repository,
                "sender": self.user(review["user"]["login"]),
                "commit_id": "",
                "review": {"type": event_type, "content": review["body"]},
            }
        return payload, event_type, event

    def resolved(self, repo: str, number: int) -> dict[int, str]:
        """The line comments of a pull request's reviews whose conversation is resolved,
        comment id -> who resolved it."""
        with self.lock:
            return {
                c["id"]: c["resolver"]["login"]
                for review in self._reviews.get((repo, number), [])
                for c in self._review_comments[review["id"]]
                if c["resolver"]
            }

    # -- REST API -------------------------------------------------------------------

    def _api_list_reviews(self, params, query, data):
        record, pr = self._api_pull(params)
        page = max(1, int((query.get("page") or ["1"])[0]))
        limit = max(1, min(50, int((query.get("limit") or ["30"])[0])))
        # a pending review is listed to its author only
        items = [
            r
            for r in self._reviews.get((record["full_name"], pr["number"]), [])
            if r["state"] != "PENDING" or r["user"]["login"] == self.bot_login
        ]
        return 200, items[(page - 1) * limit : page * limit], {"X-Total-Count": str(len(items))}

    def _api_review(self, params) -> tuple[dict, dict]:
        record, pr = self._api_pull(params)
        for review in self._reviews.get((record["full_name"], pr["number"]), []):
            if review["id"] == int(params["id"]):
                return record, review
        raise _fake().ApiError(404, "pull review does not exist")

    def _api_get_review(self, params, query, data):
        return 200, self._api_review(params)[1]

    def _api_review_comments(self, params, query, data):
        _, review = self._api_review(params)
        return 200, self._review_comments[review["id"]]

    def _review_comment(self, params) -> tuple[dict, dict]:
        record = self._api_repo_record(params)
        cid = int(params["id"])
        for (repo, number), listed in self._reviews.items():
            if repo != record["full_name"]:
                continue
            for review in listed:
                for comment in self._review_comments[review["id"]]:
                    if comment["id"] == cid:
                        return record["pulls"][number], comment
        raise _fake().ApiError(404, "comment does not exist")

    def _api_resolve(self, params, query, data):
        pr, comment = self._review_comment(params)
        if pr["user"]["login"] != self.bot_login:
            self._require(self._api_repo_record(params), "write")
        if not comment["resolver"]:
            comment["resolver"] = self.user(self.bot_login)
        return 204, None

    def _api_unresolve(self, params, query, data):
        pr, comment = self._review_comment(params)
        if pr["user"]["login"] != self.bot_login:
            self._require(self._api_repo_record(params), "write")
        comment["resolver"] = None
        return 204, None
