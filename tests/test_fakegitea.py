"""The fake Gitea behaves like Gitea where kugetsu depends on it: real git, real HTTP."""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import threading

import pytest
import requests

from bot.gitea import Conflict, GiteaClient, NotFound, ServerError, Unprocessable, Unreachable
from tests.conftest import wait_for
from tests.fakegitea import GIT_IDENTITY, FakeGitea

TOKEN = "9b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c"
REPO = "acme/widget"


@pytest.fixture
def git_env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
    }


@pytest.fixture
def fake(tmp_path):
    with FakeGitea(tmp_path / "gitea", TOKEN) as server:
        server.create_repo(REPO, files={"README.md": "hello\n", "src/app.py": "print('hi')\n"})
        yield server


@pytest.fixture
def client(fake):
    return GiteaClient(fake.url, TOKEN, timeout=5, retries=3, sleep=lambda s: None)


def git(env, *args, cwd=None, token=TOKEN, check=True):
    cmd = ["git", *GIT_IDENTITY]
    if token is not None:
        cmd += ["-c", f"http.extraHeader=Authorization: token {token}"]
    proc = subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc


def clone_and_push_branch(fake, env, tmp_path, branch, files):
    work = tmp_path / "work"
    if not work.exists():
        git(env, "clone", "--quiet", fake.clone_url(REPO), str(work))
    git(env, "fetch", "--quiet", "origin", cwd=work)
    has_remote = git(
        env, "rev-parse", "--verify", "--quiet", f"origin/{branch}", cwd=work, check=False
    )
    start = f"origin/{branch}" if has_remote.returncode == 0 else "origin/main"
    git(env, "checkout", "--quiet", "-B", branch, start, cwd=work)
    for name, content in files.items():
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    git(env, "add", "-A", cwd=work)
    git(env, "commit", "--quiet", "-m", f"Work on {branch}", cwd=work)
    git(env, "push", "--quiet", "origin", branch, cwd=work)
    return work, git(env, "rev-parse", "HEAD", cwd=work).stdout.strip()


# -- git over HTTP ------------------------------------------------------------------------


def test_clone_push_then_pull_request_flow(fake, client, git_env, tmp_path):
    issue = fake.create_issue(REPO, "Crash on empty input", "Steps...", labels=["kugetsu"])

    work, sha = clone_and_push_branch(
        fake, git_env, tmp_path, "kugetsu/issue-1", {"fix.txt": "fixed\n"}
    )
    assert (work / "README.md").read_text() == "hello\n"
    assert (work / "src" / "app.py").read_text() == "print('hi')\n"
    assert fake.branch_sha(REPO, "kugetsu/issue-1") == sha
    assert fake.file_at(REPO, "kugetsu/issue-1", "fix.txt") == "fixed\n"
    assert fake.file_at(REPO, "main", "fix.txt") is None
    assert fake.branch_sha(REPO, "nope") is None

    pr = client.create_pull(
        "acme", "widget", head="kugetsu/issue-1", base="main", title="Fix crash", body="Closes #1"
    )
    assert pr["number"] == issue + 1, "issues and pull requests share one number sequence"
    assert pr["head"]["ref"] == "kugetsu/issue-1"
    assert pr["head"]["sha"] == sha
    assert pr["base"]["ref"] == "main"
    assert pr["state"] == "open"
    assert pr["html_url"] == f"{fake.url}/{REPO}/pulls/{pr['number']}"
    assert fake.pulls[pr["number"]]["title"] == "Fix crash"

    found = client.find_pull("acme", "widget", "main", "kugetsu/issue-1")
    assert found["number"] == pr["number"]
    assert (
        client.find_pull("acme", "widget", "main", "acme:kugetsu/issue-1")["number"] == pr["number"]
    )
    assert client.find_pull("acme", "widget", "main", "kugetsu/issue-2") is None

    with pytest.raises(Conflict) as info:
        client.create_pull(
            "acme", "widget", head="kugetsu/issue-1", base="main", title="again", body=""
        )
    assert info.value.message.startswith("pull request already exists for these targets")
    assert f"issue_id: {pr['number']}" in info.value.message
    with pytest.raises(Unprocessable):
        client.create_pull("acme", "widget", head="main", base="main", title="same", body="")
    with pytest.raises(NotFound):
        client.create_pull("acme", "widget", head="no-such-branch", base="main", title="x", body="")

    tracking = client.create_comment("acme", "widget", issue, "Queued")
    assert client.edit_comment("acme", "widget", tracking["id"], "Opened a pull request")[
        "body"
    ] == ("Opened a pull request")
    assert fake.comments[tracking["id"]]["body"] == "Opened a pull request"
    [listed] = client.list_comments("acme", "widget", issue)
    assert listed["user"]["login"] == "kugetsu-bot"
    assert client.get_issue("acme", "widget", issue)["comments"] == 1

    # A new push moves the pull request's head.
    _, sha2 = clone_and_push_branch(
        fake, git_env, tmp_path, "kugetsu/issue-1", {"fix.txt": "fixed again\n"}
    )
    assert client.find_pull("acme", "widget", "main", "kugetsu/issue-1")["head"]["sha"] == sha2

    edited = client.edit_pull("acme", "widget", pr["number"], body="Closes #1\n\nUpdated")
    assert edited["body"].endswith("Updated") and edited["title"] == "Fix crash"
    assert (
        client.get_issue("acme", "widget", pr["number"])["pull_request"]["html_url"]
        == pr["html_url"]
    )

    for _method, path, headers, _ in fake.requests:
        assert "token=" not in path
        if path.startswith("/api/v1/"):
            assert headers["Authorization"] == f"token {TOKEN}"


def test_clone_without_token_fails(fake, git_env, tmp_path):
    proc = git(
        git_env, "clone", fake.clone_url(REPO), str(tmp_path / "anon"), token=None, check=False
    )
    assert proc.returncode != 0
    assert not (tmp_path / "anon" / "README.md").exists()
    proc = git(
        git_env,
        "clone",
        fake.clone_url(REPO),
        str(tmp_path / "wrong"),
        token="not-the-token",
        check=False,
    )
    assert proc.returncode != 0
    resp = requests.get(fake.clone_url(REPO) + "/info/refs?service=git-upload-pack", timeout=5)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="Gitea"'


def test_clone_with_basic_auth_token(fake, git_env, tmp_path):
    basic = base64.b64encode(f"kugetsu-bot:{TOKEN}".encode()).decode()
    proc = git(
        git_env,
        "-c",
        f"http.extraHeader=Authorization: Basic {basic}",
        "clone",
        "--quiet",
        fake.clone_url(REPO),
        str(tmp_path / "basic"),
        token=None,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "basic" / "README.md").read_text() == "hello\n"


def test_large_push_uses_chunked_request_body(fake, git_env, tmp_path):
    payload = os.urandom(1_500_000)  # above git's 1 MiB http.postBuffer
    _, sha = clone_and_push_branch(fake, git_env, tmp_path, "big", {"blob.bin": payload})
    assert fake.branch_sha(REPO, "big") == sha
    pushes = [h for m, p, h, _ in fake.requests if m == "POST" and p.endswith("/git-receive-pack")]
    assert any(h.get("Transfer-Encoding", "").lower() == "chunked" for h in pushes)


def test_fetch_with_gzip_request_body(fake, git_env, tmp_path):
    work = tmp_path / "work"
    git(git_env, "clone", "--quiet", fake.clone_url(REPO), str(work))
    tree = fake.git(REPO, "rev-parse", "main^{tree}").strip()
    for i in range(40):
        commit = fake.git(REPO, *GIT_IDENTITY, "commit-tree", tree, "-m", f"branch {i}").strip()
        fake.git(REPO, "update-ref", f"refs/heads/topic-{i}", commit)
    before = len(fake.requests)
    git(git_env, "fetch", "--quiet", "origin", cwd=work)
    assert git(git_env, "rev-parse", "origin/topic-39", cwd=work).stdout.strip() == fake.branch_sha(
        REPO, "topic-39"
    )
    encodings = [h.get("Content-Encoding") for m, _, h, _ in fake.requests[before:] if m == "POST"]
    assert "gzip" in encodings


# -- API behaviour --------------------------------------------------------------------------------


def test_api_auth_schemes(fake):
    url = fake.api_url + "/user"
    anonymous = requests.get(url, timeout=5)
    assert anonymous.status_code == 401
    assert anonymous.json()["message"] == "invalid username, password or token"
    assert requests.get(url, params={"token": TOKEN}, timeout=5).status_code == 401
    assert requests.get(url, headers={"Authorization": "token wrong"}, timeout=5).status_code == 401
    assert (
        requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).json()["login"]
        == "kugetsu-bot"
    )
    assert (
        requests.get(url, headers={"Authorization": f"TOKEN {TOKEN}"}, timeout=5).status_code == 200
    )
    assert requests.get(url, auth=("kugetsu-bot", TOKEN), timeout=5).status_code == 200


def test_unknown_route_is_404_json(fake):
    resp = requests.get(
        fake.api_url + "/repos/acme/widget/no-such-thing",
        headers={"Authorization": f"token {TOKEN}"},
        timeout=5,
    )
    assert resp.status_code == 404
    assert "message" in resp.json()
    assert (
        requests.get(
            fake.api_url + "/repos/acme/nope",
            headers={"Authorization": f"token {TOKEN}"},
            timeout=5,
        ).status_code
        == 404
    )


def test_user(fake, client):
    assert client.get_user()["login"] == "kugetsu-bot"


def test_gzip_encoded_api_request(fake):
    number = fake.create_issue(REPO, "t", "b")
    body = gzip.compress(json.dumps({"body": "compressed"}).encode())
    resp = requests.post(
        f"{fake.api_url}/repos/{REPO}/issues/{number}/comments",
        data=body,
        headers={
            "Authorization": f"token {TOKEN}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
        timeout=5,
    )
    assert resp.status_code == 201
    assert resp.json()["body"] == "compressed"


def test_reaction_is_201_then_200(fake):
    number = fake.create_issue(REPO, "t", "b")
    comment = fake.add_comment(REPO, number, "/kugetsu run", login="alice")
    url = f"{fake.api_url}/repos/{REPO}/issues/comments/{comment['id']}/reactions"
    headers = {"Authorization": f"token {TOKEN}"}
    assert (
        requests.post(url, json={"content": "eyes"}, headers=headers, timeout=5).status_code == 201
    )
    again = requests.post(url, json={"content": "eyes"}, headers=headers, timeout=5)
    assert again.status_code == 200
    assert again.json()["content"] == "eyes"
    assert (
        requests.post(url, json={"content": "wave"}, headers=headers, timeout=5).status_code == 403
    )
    assert fake.reactions[comment["id"]] == ["eyes"]


def test_permissions(fake, client):
    fake.set_permission(REPO, "alice", "write")
    assert client.get_permission("acme", "widget", "alice") == "write"
    assert client.get_permission("acme", "widget", "mallory") == "read"
    assert client.get_permission("acme", "widget", "kugetsu-bot") == "admin"


def test_closed_pull_is_still_found_and_allows_a_new_one(fake, client, git_env, tmp_path):
    clone_and_push_branch(fake, git_env, tmp_path, "feature/x", {"x.txt": "x\n"})
    first = client.create_pull(
        "acme", "widget", head="feature/x", base="main", title="one", body=""
    )
    closed = client.edit_pull("acme", "widget", first["number"], state="closed")
    assert closed["state"] == "closed"
    assert client.find_pull("acme", "widget", "main", "feature/x")["state"] == "closed"
    second = client.create_pull(
        "acme", "widget", head="feature/x", base="main", title="two", body=""
    )
    assert second["number"] == first["number"] + 1
    assert client.find_pull("acme", "widget", "main", "feature/x")["number"] == first["number"]
    with pytest.raises(Conflict):
        client.edit_pull("acme", "widget", first["number"], state="open")


# -- failure injection ---------------------------------------------------------------------------


def test_fail_next_is_retried(fake, client):
    number = fake.create_issue(REPO, "t", "b")
    fake.fail_next(1)
    assert client.get_issue("acme", "widget", number)["number"] == number
    path = f"/api/v1/repos/{REPO}/issues/{number}"
    assert len([p for _, p, _, _ in fake.requests if p == path]) == 2


def test_fail_next_beyond_retries_is_server_error(fake, client):
    number = fake.create_issue(REPO, "t", "b")
    fake.fail_next(4, status=503)
    with pytest.raises(ServerError) as info:
        client.get_issue("acme", "widget", number)
    assert info.value.status == 503
    assert client.get_issue("acme", "widget", number)["number"] == number


def test_down_is_unreachable_and_up_recovers(fake, client):
    number = fake.create_issue(REPO, "t", "b")
    assert client.get_user()["login"] == "kugetsu-bot"
    url = fake.url
    fake.down()
    seen = len(fake.requests)
    with pytest.raises(Unreachable) as info:
        client.get_user()
    assert info.value.status is None
    with pytest.raises(Unreachable):
        client.create_comment("acme", "widget", number, "hello")
    assert len(fake.requests) == seen
    fake.up()
    assert fake.url == url
    assert client.get_user()["login"] == "kugetsu-bot"
    assert client.create_comment("acme", "widget", number, "hello")["body"] == "hello"


def test_repo_files_are_committed_with_the_fakes_own_identity(fake):
    author = fake.git(REPO, "log", "-1", "--format=%an <%ae>", "main").strip()
    assert author == "Fake Gitea <fake-gitea@example.invalid>"


@pytest.mark.parametrize(
    "answer, error, status",
    [(504, ServerError, 504), (502, ServerError, 502), ("drop", Unreachable, None)],
)
def test_lose_answer_applies_the_request_and_loses_its_answer(
    fake, client, git_env, tmp_path, answer, error, status
):
    clone_and_push_branch(fake, git_env, tmp_path, "feature/x", {"x.txt": "x\n"})
    fake.lose_answer("POST", r"/repos/[^/]+/[^/]+/pulls", answer)
    with pytest.raises(error) as info:
        client.create_pull("acme", "widget", head="feature/x", base="main", title="t", body="b")
    assert info.value.status == status
    # applied once: the client does not repeat a POST whose answer was lost
    assert [pr["title"] for pr in fake.pulls_of(REPO).values()] == ["t"]
    assert client.find_open_pull("acme", "widget", "main", "feature/x")["title"] == "t"


def test_a_held_answer_waits_until_released(fake, tmp_path, git_env):
    clone_and_push_branch(fake, git_env, tmp_path, "feature/x", {"x.txt": "x\n"})
    slow = GiteaClient(fake.url, TOKEN, timeout=30, retries=0)
    fake.lose_answer("POST", r".*/pulls", "hold")
    failed = []

    def create():
        try:
            slow.create_pull("acme", "widget", head="feature/x", base="main", title="t", body="")
        except Unreachable as exc:
            failed.append(exc)

    thread = threading.Thread(target=create)
    thread.start()
    wait_for(lambda: fake.pulls_of(REPO), what="the pull request to be applied")
    assert thread.is_alive() and not failed  # applied, and no answer yet
    fake.release()
    thread.join(10)
    assert len(failed) == 1 and len(fake.pulls_of(REPO)) == 1


# ---------------------------------------------------------------- hooks, version, scopes


def test_hooks_are_kept_as_gitea_1_26_keeps_them(fake, client):
    from bot.gitea import Forbidden

    api = f"{fake.api_url}/repos/{REPO}/hooks"
    auth = {"Authorization": f"token {TOKEN}"}
    # url and content_type are required, and content_type is json or form
    for config, message in (
        ({"content_type": "json"}, "Missing config option: url"),
        ({"url": "http://k/webhook"}, "Missing config option: content_type"),
        ({"url": "http://k/webhook", "content_type": "xml"}, "Invalid content type"),
    ):
        r = requests.post(api, json={"type": "gitea", "config": config}, headers=auth, timeout=5)
        assert (r.status_code, r.json()["message"]) == (422, message)
    # active defaults to false, the secret is never shown, groups stand for their events
    made = client.create_hook(
        "acme",
        "widget",
        {
            "type": "gitea",
            "events": ["issues"],
            "config": {"url": "http://k/webhook", "content_type": "json", "secret": "s3"},
        },
    )
    assert made["active"] is False and "secret" not in json.dumps(made)
    assert made["config"] == {"url": "http://k/webhook", "content_type": "json"}
    assert set(made["events"]) == {
        "issues",
        "issue_assign",
        "issue_label",
        "issue_milestone",
        "issue_comment",
    }
    [listed] = client.list_hooks("acme", "widget")
    assert listed == made and fake.hooks_of(REPO)[0]["secret"] == "s3"
    # an edit replaces the events (none: push) and keeps the secret it is not given
    edited = client.edit_hook("acme", "widget", made["id"], {"active": True})
    assert edited["events"] == ["push"] and edited["active"] is True
    assert fake.hooks_of(REPO)[0]["secret"] == "s3"
    # a repository's hooks are for its admins
    fake.set_permission(REPO, fake.bot_login, "write")
    with pytest.raises(Forbidden, match="admin"):
        client.list_hooks("acme", "widget")


def test_a_test_delivery_is_a_signed_push_sent_only_to_a_hook_with_push(fake, client):
    import hashlib
    import hmac
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    got: list[tuple[dict, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((dict(self.headers), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/webhook"
        hook = client.create_hook(
            "acme",
            "widget",
            {
                "type": "gitea",
                "active": True,
                "events": ["issue_comment"],
                "config": {"url": url, "content_type": "json", "secret": "s3"},
            },
        )
        client.test_hook("acme", "widget", hook["id"])  # no push event: 204 and nothing
        client.edit_hook("acme", "widget", hook["id"], {"events": ["issue_comment", "push"]})
        client.test_hook("acme", "widget", hook["id"])
        wait_for(lambda: got, timeout=10, what="the test delivery")
        # the fake records the delivery once the answer is read, after the receiver has it
        wait_for(lambda: fake.hook_deliveries, timeout=10, what="the delivery's record")
        [(headers, body)] = got
        assert headers["X-Gitea-Event"] == "push"
        expected = hmac.new(b"s3", body, hashlib.sha256).hexdigest()
        assert headers["X-Gitea-Signature"] == expected
        assert json.loads(body)["repository"]["full_name"] == REPO
        assert fake.hook_deliveries == [
            {"hook": hook["id"], "url": url, "status": 200, "error": None}
        ]
        fake.block_deliveries = True  # as ALLOWED_HOST_LIST refuses a private address
        client.test_hook("acme", "widget", hook["id"])
        wait_for(lambda: len(fake.hook_deliveries) == 2, timeout=10)
        assert "ALLOWED_HOST_LIST" in fake.hook_deliveries[1]["error"] and len(got) == 1
    finally:
        server.shutdown()


def test_version_needs_no_token_and_scopes_are_enforced(fake, client, git_env, tmp_path):
    from bot.gitea import Forbidden, missing_scope

    assert GiteaClient(fake.url, "wrong").get_version() == "1.26.3"
    fake.token_scopes = {"read:repository"}
    with pytest.raises(Forbidden) as refused:
        client.get_user()
    assert missing_scope(refused.value) == "read:user"
    assert client.get_repo("acme", "widget")["full_name"] == REPO
    with pytest.raises(Forbidden) as refused:
        client.may_push("acme", "widget")
    assert missing_scope(refused.value) == "write:repository"
    fake.token_scopes = {"write:repository"}
    client.may_push("acme", "widget")
    fake.set_permission(REPO, fake.bot_login, "read")
    with pytest.raises(Forbidden, match="User permission denied") as refused:
        client.may_push("acme", "widget")
    assert missing_scope(refused.value) is None
