"""GiteaClient against recorded-shape Gitea responses (the `responses` library)."""

from __future__ import annotations

import inspect
import json
import logging
import re
import socket
import traceback
import urllib.parse

import pytest
import requests
import responses
from responses import matchers

from bot import gitea
from bot.gitea import (
    Conflict,
    Forbidden,
    GiteaAPI,
    GiteaClient,
    GiteaError,
    Locked,
    NotFound,
    ServerError,
    Unauthorized,
    Unprocessable,
    Unreachable,
)
from tests.conftest import logged

BASE = "http://gitea.test:3000"
API = BASE + "/api/v1"
REPO = API + "/repos/acme/widget"
TOKEN = "3f2a9c0d1e5b7a4c8d6e2f1a0b9c8d7e6f5a4b3c"
DOC_URL = "http://gitea.test:3000/api/swagger"


def user(login="kugetsu-bot", uid=7):
    return {
        "id": uid,
        "login": login,
        "login_name": "",
        "source_id": 0,
        "full_name": "",
        "email": f"{login}@noreply.gitea.test",
        "avatar_url": f"{BASE}/avatars/{uid}",
        "html_url": f"{BASE}/{login}",
        "language": "",
        "is_admin": False,
        "last_login": "0001-01-01T00:00:00Z",
        "created": "2026-01-05T10:00:00Z",
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


def repository():
    return {
        "id": 3,
        "owner": user("acme", 2),
        "name": "widget",
        "full_name": "acme/widget",
        "private": False,
        "fork": False,
        "empty": False,
        "html_url": f"{BASE}/acme/widget",
        "url": f"{API}/repos/acme/widget",
        "ssh_url": "ssh://git@gitea.test:2222/acme/widget.git",
        "clone_url": f"{BASE}/acme/widget.git",
        "default_branch": "main",
        "archived": False,
        "permissions": {"admin": True, "push": True, "pull": True},
        "has_issues": True,
        "has_pull_requests": True,
    }


def comment(cid=41, body="Working on it", number=12):
    return {
        "id": cid,
        "html_url": f"{BASE}/acme/widget/issues/{number}#issuecomment-{cid}",
        "pull_request_url": "",
        "issue_url": f"{BASE}/acme/widget/issues/{number}",
        "user": user(),
        "original_author": "",
        "original_author_id": 0,
        "body": body,
        "assets": [],
        "created_at": "2026-03-01T09:30:00Z",
        "updated_at": "2026-03-01T09:30:00Z",
    }


def issue(number=12):
    return {
        "id": 101,
        "url": f"{REPO}/issues/{number}",
        "html_url": f"{BASE}/acme/widget/issues/{number}",
        "number": number,
        "user": user("alice", 9),
        "title": "Crash on empty input",
        "body": "Steps to reproduce...",
        "labels": [
            {
                "id": 5,
                "name": "kugetsu",
                "exclusive": False,
                "is_archived": False,
                "color": "e11d21",
                "description": "",
                "url": f"{REPO}/labels/5",
            }
        ],
        "state": "open",
        "comments": 0,
        "pull_request": None,
        "repository": {"id": 3, "name": "widget", "owner": "acme", "full_name": "acme/widget"},
    }


def pull(number=13, head="kugetsu/issue-12", base="main", state="open"):
    return {
        "id": 55,
        "url": f"{BASE}/acme/widget/pulls/{number}",
        "number": number,
        "user": user(),
        "title": "Fix crash on empty input",
        "body": "Closes #12",
        "labels": [],
        "state": state,
        "draft": False,
        "html_url": f"{BASE}/acme/widget/pulls/{number}",
        "diff_url": f"{BASE}/acme/widget/pulls/{number}.diff",
        "patch_url": f"{BASE}/acme/widget/pulls/{number}.patch",
        "mergeable": True,
        "merged": False,
        "merged_at": None,
        "base": {"label": base, "ref": base, "sha": "a" * 40, "repo_id": 3, "repo": repository()},
        "head": {"label": head, "ref": head, "sha": "b" * 40, "repo_id": 3, "repo": repository()},
        "merge_base": "a" * 40,
        "created_at": "2026-03-01T09:31:00Z",
        "updated_at": "2026-03-01T09:31:00Z",
        "closed_at": None,
    }


def error_body(message):
    return {"message": message, "url": DOC_URL}


@pytest.fixture
def client():
    return GiteaClient(BASE + "/", TOKEN, retries=3, backoff=0.5, sleep=lambda s: None)


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


def sent_json(call):
    return json.loads(call.request.body)


# -- construction, auth --------------------------------------------------------------


def test_constructor_does_no_io(rsps):
    GiteaClient(BASE, TOKEN)
    assert len(rsps.calls) == 0


def test_client_satisfies_the_protocol():
    names = [n for n in dir(GiteaAPI) if not n.startswith("_")]
    assert "create_pull" in names and "get_permission" in names
    for name in names:
        expected = inspect.signature(getattr(GiteaAPI, name))
        actual = inspect.signature(getattr(GiteaClient, name))
        assert list(actual.parameters) == list(expected.parameters), name


def test_token_is_sent_as_header_and_never_in_the_url(rsps, client):
    rsps.get(API + "/user", json=user())
    rsps.get(REPO + "/issues/12", json=issue())
    rsps.post(REPO + "/issues/12/comments", json=comment(), status=201)
    rsps.get(
        REPO + "/pulls",
        json=[],
        match=[
            matchers.query_param_matcher(
                {"state": "open", "base_branch": "main", "page": "1", "limit": "50"}
            )
        ],
    )

    assert client.get_user()["login"] == "kugetsu-bot"
    assert client.get_issue("acme", "widget", 12)["number"] == 12
    client.create_comment("acme", "widget", 12, "hello")
    rsps.get(REPO + "/pulls/main/kugetsu/issue-12", json=pull(state="closed"))
    assert client.find_open_pull("acme", "widget", "main", "kugetsu/issue-12") is None

    assert len(rsps.calls) == 5
    for call in rsps.calls:
        assert call.request.headers["Authorization"] == f"token {TOKEN}"
        assert call.request.headers["Accept"] == "application/json"
        assert TOKEN not in call.request.url
        assert "token=" not in call.request.url


# -- every method: path, method, body, result ------------------------------------------


def _clear_proxy_env(monkeypatch):
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
    ):
        monkeypatch.delenv(name, raising=False)


def test_a_netrc_entry_for_the_gitea_host_does_not_replace_the_token(rsps, tmp_path, monkeypatch):
    _clear_proxy_env(monkeypatch)
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine gitea.test login someone password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    rsps.get(API + "/user", json=user())
    GiteaClient(BASE, TOKEN, retries=0).get_user()
    assert rsps.calls[0].request.headers["Authorization"] == f"token {TOKEN}"


def test_proxy_and_ca_bundle_variables_are_honoured(rsps, monkeypatch, tmp_path):
    _clear_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    rsps.get(API + "/user", json=user())
    GiteaClient(BASE, TOKEN, retries=0).get_user()
    sent = rsps.calls[0].request.req_kwargs
    assert sent["verify"] == str(bundle)
    assert requests.utils.select_proxy(API + "/user", sent["proxies"]) == "http://proxy.test:3128"


def test_no_proxy_exempts_the_gitea_host(rsps, monkeypatch):
    _clear_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "gitea.test")
    rsps.get(API + "/user", json=user())
    GiteaClient(BASE, TOKEN, retries=0).get_user()
    sent = rsps.calls[0].request.req_kwargs
    assert requests.utils.select_proxy(API + "/user", sent["proxies"]) is None
    assert sent["verify"] is True


def test_get_issue(rsps, client):
    rsps.get(REPO + "/issues/12", json=issue())
    assert client.get_issue("acme", "widget", 12)["labels"][0]["name"] == "kugetsu"


def test_create_comment_posts_body_and_returns_comment(rsps, client):
    rsps.post(REPO + "/issues/12/comments", json=comment(body="Queued"), status=201)
    result = client.create_comment("acme", "widget", 12, "Queued")
    assert result["id"] == 41
    assert rsps.calls[0].request.method == "POST"
    assert sent_json(rsps.calls[0]) == {"body": "Queued"}


def test_edit_comment(rsps, client):
    rsps.patch(REPO + "/issues/comments/41", json=comment(body="Done"))
    assert client.edit_comment("acme", "widget", 41, "Done")["body"] == "Done"
    assert sent_json(rsps.calls[0]) == {"body": "Done"}
    assert rsps.calls[0].request.method == "PATCH"


def test_list_comments(rsps, client):
    rsps.get(REPO + "/issues/12/comments", json=[comment(body="a"), comment(body="b")])
    assert [c["body"] for c in client.list_comments("acme", "widget", 12)] == ["a", "b"]
    assert rsps.calls[0].request.method == "GET"


def test_edit_comment_204_returns_none(rsps, client):
    rsps.patch(REPO + "/issues/comments/41", status=204)
    assert client.edit_comment("acme", "widget", 41, "x") is None


@pytest.mark.parametrize("status", [200, 201])
def test_add_reaction_accepts_200_and_201(rsps, client, status):
    rsps.post(
        REPO + "/issues/comments/41/reactions",
        json={"user": user(), "content": "eyes", "created_at": "2026-03-01T09:30:00Z"},
        status=status,
    )
    assert client.add_reaction("acme", "widget", 41, "eyes") is None
    assert sent_json(rsps.calls[0]) == {"content": "eyes"}


def test_add_reaction_not_allowed_is_forbidden(rsps, client):
    rsps.post(
        REPO + "/issues/comments/41/reactions",
        json=error_body("'wave' is not an allowed reaction"),
        status=403,
    )
    with pytest.raises(Forbidden) as info:
        client.add_reaction("acme", "widget", 41, "wave")
    assert info.value.message == "'wave' is not an allowed reaction"


def test_get_permission_returns_the_permission_field(rsps, client):
    rsps.get(
        REPO + "/collaborators/alice/permission",
        json={"permission": "write", "role_name": "write", "user": user("alice", 9)},
    )
    assert client.get_permission("acme", "widget", "alice") == "write"


def test_path_segments_are_quoted(rsps, client):
    rsps.get(
        API + "/repos/acme/my%20repo/collaborators/al%2Fice/permission",
        json={"permission": "read", "role_name": "read", "user": user("x", 1)},
    )
    assert client.get_permission("acme", "my repo", "al/ice") == "read"
    assert (
        rsps.calls[0].request.path_url
        == "/api/v1/repos/acme/my%20repo/collaborators/al%2Fice/permission"
    )


def test_find_pull_keeps_the_slash_in_head(rsps, client):
    rsps.get(REPO + "/pulls/main/kugetsu/issue-12", json=pull())
    result = client.find_pull("acme", "widget", "main", "kugetsu/issue-12")
    assert result["number"] == 13
    assert rsps.calls[0].request.path_url == "/api/v1/repos/acme/widget/pulls/main/kugetsu/issue-12"


def test_find_pull_404_is_none(rsps, client):
    rsps.get(
        REPO + "/pulls/main/kugetsu/issue-99",
        json={"message": "not found", "url": DOC_URL, "errors": []},
        status=404,
    )
    assert client.find_pull("acme", "widget", "main", "kugetsu/issue-99") is None


def test_find_pull_other_errors_still_raise(rsps, client):
    rsps.get(
        REPO + "/pulls/main/feature",
        json=error_body("token does not have required scope"),
        status=403,
    )
    with pytest.raises(Forbidden):
        client.find_pull("acme", "widget", "main", "feature")


@pytest.mark.parametrize(
    "first, calls",
    [
        (pull(13), 1),  # the first match is the open one: one call
        (None, 1),  # no pull request in any state: none is open
        (pull(5, state="closed"), 2),  # after an older closed one, the open ones are paged
    ],
)
def test_find_open_pull_asks_once_unless_the_first_match_is_closed(rsps, client, first, calls):
    by_head = REPO + "/pulls/main/kugetsu/issue-12"
    if first is None:
        rsps.get(by_head, json={"message": "not found", "url": DOC_URL, "errors": []}, status=404)
    else:
        rsps.get(by_head, json=first)
    if calls == 2:
        rsps.get(
            REPO + "/pulls",
            json=[pull(9, head="other"), pull(13)],
            match=[
                matchers.query_param_matcher(
                    {"state": "open", "base_branch": "main", "page": "1", "limit": "50"}
                )
            ],
        )
    found = client.find_open_pull("acme", "widget", "main", "kugetsu/issue-12")
    assert (found or {}).get("number") == (None if first is None else 13)
    assert len(rsps.calls) == calls


def test_create_pull(rsps, client):
    rsps.post(REPO + "/pulls", json=pull(), status=201)
    result = client.create_pull(
        "acme", "widget", head="kugetsu/issue-12", base="main", title="Fix crash", body="Closes #12"
    )
    assert result["number"] == 13
    assert sent_json(rsps.calls[0]) == {
        "head": "kugetsu/issue-12",
        "base": "main",
        "title": "Fix crash",
        "body": "Closes #12",
    }


def test_reviews_are_listed_page_by_page_then_their_comments_read(rsps, client):
    # GET /repos/{owner}/{repo}/pulls/{index}/reviews (page, limit), then
    # GET /repos/{owner}/{repo}/pulls/{index}/reviews/{id}/comments
    full = [{"id": i, "state": "COMMENT"} for i in range(1, 51)]
    for page, items in ((1, full), (2, [{"id": 51, "state": "APPROVED"}])):
        rsps.get(
            REPO + "/pulls/13/reviews",
            json=items,
            match=[matchers.query_param_matcher({"page": str(page), "limit": "50"})],
        )
    assert [r["id"] for r in client.list_reviews("acme", "widget", 13)] == list(range(1, 52))
    rsps.get(REPO + "/pulls/13/reviews/51/comments", json=[{"id": 7, "path": "a.py"}])
    assert client.review_comments("acme", "widget", 13, 51) == [{"id": 7, "path": "a.py"}]


def test_resolve_a_review_comments_conversation(rsps, client):
    # POST /repos/{owner}/{repo}/pulls/comments/{id}/resolve answers 204
    rsps.post(REPO + "/pulls/comments/7/resolve", status=204)
    assert client.resolve_review_comment("acme", "widget", 7) is None
    rsps.post(REPO + "/pulls/comments/8/resolve", json=error_body("not a code comment"), status=400)
    with pytest.raises(GiteaError):
        client.resolve_review_comment("acme", "widget", 8)


def test_get_pull(rsps, client):
    rsps.get(REPO + "/pulls/13", json=pull())
    assert client.get_pull("acme", "widget", 13)["number"] == 13


def test_edit_pull_sends_only_given_fields(rsps, client):
    rsps.patch(REPO + "/pulls/13", json=pull(), status=201)
    rsps.patch(REPO + "/pulls/13", json=pull(state="closed"), status=201)
    client.edit_pull("acme", "widget", 13, body="new body")
    assert client.edit_pull("acme", "widget", 13, title="T", state="closed")["state"] == "closed"
    assert sent_json(rsps.calls[0]) == {"body": "new body"}
    assert sent_json(rsps.calls[1]) == {"title": "T", "state": "closed"}


# -- status codes to typed errors ---------------------------------------------------------


@pytest.mark.parametrize(
    "status, cls, message",
    [
        (401, Unauthorized, "invalid username, password or token"),
        (
            403,
            Forbidden,
            "user should be an owner or a collaborator with admin write of a repository",
        ),
        (404, NotFound, "issue does not exist [id: 0, repo_id: 3, index: 99]"),
        (
            409,
            Conflict,
            "pull request already exists for these targets [id: 55, issue_id: 13, head_repo_id: 3, "
            "base_repo_id: 3, head_branch: kugetsu/issue-12, base_branch: main]",
        ),
        (
            422,
            Unprocessable,
            "Invalid PullRequest: There are no changes between the head and the base",
        ),
        (423, Locked, "repo is archived"),
        (412, GiteaError, "cannot change state of this pull request, it was already merged"),
    ],
)
def test_status_codes_map_to_typed_errors(rsps, client, status, cls, message):
    rsps.post(REPO + "/pulls", json=error_body(message), status=status)
    with pytest.raises(cls) as info:
        client.create_pull("acme", "widget", head="main", base="main", title="t", body="")
    err = info.value
    assert type(err) is cls
    assert err.status == status
    assert err.message == message
    assert "POST" in str(err) and "/repos/acme/widget/pulls" in str(err)
    assert len(rsps.calls) == 1


def test_error_without_json_body_still_has_status(rsps, client):
    rsps.get(
        REPO + "/issues/12", body="<html>Bad Gateway</html>", status=502, content_type="text/html"
    )
    with pytest.raises(ServerError) as info:
        GiteaClient(BASE, TOKEN, retries=0, sleep=lambda s: None).get_issue("acme", "widget", 12)
    assert info.value.status == 502


# -- retries ---------------------------------------------------------------------------------


def test_500_then_200_succeeds_after_one_retry(rsps):
    sleeps = []
    client = GiteaClient(BASE, TOKEN, retries=3, backoff=0.5, sleep=sleeps.append)
    rsps.get(REPO + "/issues/12", json=error_body(""), status=500)
    rsps.get(REPO + "/issues/12", json=issue())
    assert client.get_issue("acme", "widget", 12)["number"] == 12
    assert len(rsps.calls) == 2
    assert sleeps == [0.5]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_persistent_5xx_raises_server_error_after_retries(rsps, status):
    sleeps = []
    client = GiteaClient(BASE, TOKEN, retries=3, backoff=0.5, sleep=sleeps.append)
    rsps.get(REPO + "/issues/12", json=error_body(""), status=status)
    with pytest.raises(ServerError) as info:
        client.get_issue("acme", "widget", 12)
    assert info.value.status == status
    assert len(rsps.calls) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_501_is_not_retried(rsps, client):
    rsps.get(REPO + "/issues/12", json=error_body("not implemented"), status=501)
    with pytest.raises(ServerError):
        client.get_issue("acme", "widget", 12)
    assert len(rsps.calls) == 1


def test_4xx_is_not_retried(rsps, client):
    rsps.get(
        REPO + "/issues/12", json={"message": "not found", "url": DOC_URL, "errors": []}, status=404
    )
    with pytest.raises(NotFound):
        client.get_issue("acme", "widget", 12)
    assert len(rsps.calls) == 1


def test_read_timeout_on_get_is_retried(rsps, client):
    rsps.get(REPO + "/issues/12", body=requests.ReadTimeout("read timed out"))
    rsps.get(REPO + "/issues/12", json=issue())
    assert client.get_issue("acme", "widget", 12)["number"] == 12
    assert len(rsps.calls) == 2


def test_read_timeout_on_post_is_not_retried(rsps, client):
    rsps.post(REPO + "/issues/12/comments", body=requests.ReadTimeout("read timed out"))
    with pytest.raises(Unreachable) as info:
        client.create_comment("acme", "widget", 12, "hello")
    assert info.value.status is None
    assert len(rsps.calls) == 1


@pytest.mark.parametrize("status, calls", [(502, 1), (504, 1), (500, 2), (503, 2)])
def test_a_post_is_not_retried_after_a_gateway_error(rsps, client, status, calls):
    # behind a proxy, 502/504 may come after Gitea applied the POST: a second one would
    # make a second comment; 500 and 503 are Gitea's own refusals and are retried
    url = REPO + "/issues/12/comments"
    rsps.post(url, json=error_body(""), status=status)
    if calls == 1:
        with pytest.raises(ServerError) as info:
            client.create_comment("acme", "widget", 12, "hello")
        assert info.value.status == status
    else:
        rsps.post(url, json={"id": 5, "body": "hello"}, status=201)
        assert client.create_comment("acme", "widget", 12, "hello")["id"] == 5
    assert len(rsps.calls) == calls


def test_persistent_timeout_raises_unreachable(rsps, client):
    rsps.get(REPO + "/issues/12", body=requests.ConnectTimeout("connect timed out"))
    with pytest.raises(Unreachable):
        client.get_issue("acme", "widget", 12)
    assert len(rsps.calls) == 4


# -- real connection refused -------------------------------------------------------------------


@pytest.fixture
def closed_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


class CountingSession(requests.Session):
    def __init__(self):
        super().__init__()
        self.attempts = 0

    def request(self, *args, **kwargs):
        self.attempts += 1
        return super().request(*args, **kwargs)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_connection_refused_is_retried_then_unreachable(closed_port, method):
    session = CountingSession()
    sleeps = []
    client = GiteaClient(
        f"http://127.0.0.1:{closed_port}",
        TOKEN,
        retries=2,
        timeout=5,
        session=session,
        sleep=sleeps.append,
    )
    with pytest.raises(Unreachable) as info:
        if method == "GET":
            client.get_user()
        else:
            client.create_comment("acme", "widget", 1, "hi")
    assert info.value.status is None
    assert session.attempts == 3
    assert sleeps == [0.5, 1.0]
    assert method in str(info.value)


# -- the token never leaks ------------------------------------------------------------------------


def test_token_not_in_errors_or_logs(rsps, caplog, closed_port):
    caplog.set_level(logging.DEBUG)
    client = GiteaClient(BASE, TOKEN, retries=1, sleep=lambda s: None)
    rsps.get(API + "/user", json=error_body(f"invalid token {TOKEN}"), status=401)
    rsps.get(REPO + "/issues/12", json=error_body(""), status=500)
    rsps.post(REPO + "/pulls", json=error_body("conflict"), status=409)

    raised = []
    for call in (
        client.get_user,
        lambda: client.get_issue("acme", "widget", 12),
        lambda: client.create_pull("acme", "widget", head="h", base="main", title="t", body=""),
    ):
        with pytest.raises(GiteaError) as info:
            call()
        raised.append(info.value)

    rsps.stop()
    offline = GiteaClient(f"http://127.0.0.1:{closed_port}", TOKEN, retries=1, sleep=lambda s: None)
    with pytest.raises(Unreachable) as info:
        offline.get_user()
    raised.append(info.value)

    assert [type(e) for e in raised] == [Unauthorized, ServerError, Conflict, Unreachable]
    for err in raised:
        text = "".join(traceback.format_exception(err))
        assert TOKEN not in text
        assert TOKEN not in repr(err)
        assert TOKEN not in str(err)
    assert caplog.records, "expected log records"
    assert TOKEN not in logged(caplog)
    assert {r.path for r in caplog.records if r.name == "bot.gitea"} >= {
        "/repos/acme/widget/issues/12"
    }
    assert TOKEN not in repr(client)


def test_unexpected_non_json_success_is_an_error(rsps, client):
    rsps.get(API + "/user", body="<html>login</html>", status=200, content_type="text/html")
    with pytest.raises(GiteaError):
        client.get_user()


# -- no value can change an API path --------------------------------------------------

# (method, arguments, which argument is the value under test)
PATH_CALLS = [
    ("get_issue", ["acme", "widget", 7], 0),
    ("get_issue", ["acme", "widget", 7], 1),
    ("get_issue", ["acme", "widget", 7], 2),
    ("create_comment", ["acme", "widget", 7, "hi"], 2),
    ("edit_comment", ["acme", "widget", 5, "hi"], 2),
    ("list_comments", ["acme", "widget", 7], 2),
    ("add_reaction", ["acme", "widget", 5, "eyes"], 2),
    ("get_permission", ["acme", "widget", "alice"], 2),
    ("find_pull", ["acme", "widget", "main", "kugetsu/issue-7"], 2),
    ("find_pull", ["acme", "widget", "main", "kugetsu/issue-7"], 3),
    ("edit_pull", ["acme", "widget", 7], 2),
    ("get_pull", ["acme", "widget", 7], 2),
    ("list_reviews", ["acme", "widget", 7], 2),
    ("review_comments", ["acme", "widget", 7, 3], 2),
    ("review_comments", ["acme", "widget", 7, 3], 3),
    ("resolve_review_comment", ["acme", "widget", 5], 2),
]
HOSTILE_TEXT = [
    "..",
    ".",
    "",
    "../..",
    "a/b",
    "a/../b",
    "%2e%2e",
    "%2F",
    "?admin=1",
    "#x",
    "a b",
    "ü",
    ";x",
    "\\..",
    "~",
    "a\nb",
    "-1",
]
HOSTILE_NUMBERS = [0, -1, -9223372036854775808, 2**63, 10**30, True, None, 1.5, "..", "7/8"]
REFUSED_TEXT = {"..", ".", ""}


def _call(client, method, args):
    getattr(client, method)(*args)


def _paths(method, args, value, at):
    """Call `method` with `value` as argument `at`: the paths it asked for, or the error."""
    client = GiteaClient(BASE, TOKEN, retries=0, sleep=lambda s: None)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        for verb in ("GET", "POST", "PATCH"):
            listing = method in ("list_comments", "list_reviews", "review_comments")
            answer = [] if listing else {"permission": "read"}
            mock.add(verb, re.compile(r".*"), json=answer)
        args = list(args)
        args[at] = value
        try:
            _call(client, method, args)
        except gitea.InvalidPath as exc:
            assert not mock.calls, "nothing is sent when a value is refused"
            return exc
        return [call.request.path_url.split("?")[0] for call in mock.calls]


@pytest.mark.parametrize("method, args, at", PATH_CALLS, ids=[f"{m}-{a}" for m, _, a in PATH_CALLS])
def test_no_value_can_change_an_api_path(method, args, at):
    numeric = isinstance(args[at], int)
    [reference] = _paths(method, args, 424242 if numeric else "MARK", at)
    before, _, after = reference.partition("424242" if numeric else "MARK")
    for value in HOSTILE_NUMBERS if numeric else HOSTILE_TEXT:
        result = _paths(method, args, value, at)
        if isinstance(result, gitea.InvalidPath):
            assert "not sent to Gitea" in str(result)
            if numeric:
                assert not (
                    isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2**63
                )
            else:
                assert value in REFUSED_TEXT or (
                    method == "find_pull" and at == 3 and REFUSED_TEXT & set(value.split("/"))
                )
            continue
        assert not numeric or isinstance(value, str), f"{value!r} was sent"
        [path] = result
        assert path.startswith(before) and path.endswith(after), (value, path)
        middle = path[len(before) : len(path) - len(after)]
        if method == "find_pull" and at == 3:  # a branch: its '/' are Gitea's route's own
            parts = middle.split("/")
            assert [urllib.parse.unquote(p) for p in parts] == value.split("/")
            assert not REFUSED_TEXT & set(parts)
        else:
            assert "/" not in middle and urllib.parse.unquote(middle) == value
        assert "/../" not in path and "/./" not in path and not path.endswith(("/..", "/."))


def test_a_refused_segment_is_a_gitea_error_that_sends_nothing(rsps, client):
    with pytest.raises(GiteaError) as info:
        client.create_comment("acme", "widget", -9223372036854775808, "hi")
    assert "not sent to Gitea" in str(info.value) and "between 1 and" in str(info.value)
    with pytest.raises(GiteaError):
        client.get_permission("acme", "widget", "..")
    assert len(rsps.calls) == 0


@pytest.mark.parametrize(
    "call, answer",
    [
        (lambda c: c.get_issue("acme", "widget", 12), [1, 2]),
        (lambda c: c.get_user(), "kugetsu-bot"),
        (lambda c: c.list_comments("acme", "widget", 12), {"id": 1}),
        (lambda c: c.list_comments("acme", "widget", 12), [{"id": 1}, "two"]),
        (lambda c: c.get_permission("acme", "widget", "alice"), {"role": "write"}),
    ],
)
def test_an_answer_of_the_wrong_shape_is_a_gitea_error(rsps, client, call, answer):
    rsps.add(responses.GET, re.compile(r".*"), json=answer)
    with pytest.raises(GiteaError):
        call(client)
