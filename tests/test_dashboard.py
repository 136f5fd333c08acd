"""The dashboard over HTTP: the Flask app in this process (its test client, or waitress
for streams), the fake Gitea over real HTTP with its OAuth2 sign-in, a real store.

Unit tests of its pure parts are at the end: the live log's resume position, why a
task waits, attempts, a hostile tracking comment, charts, the session cookie."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
import responses

from bot import tasklog
from bot.app import create_app
from bot.config import ConfigError, load
from bot.core import render
from bot.core.render import QueueView
from bot.core.tasks import Outcome, State
from bot.dashboard import access as access_mod
from bot.dashboard import charts, comment, logstream, views
from bot.dashboard.auth import Sessions, Signer, pkce_challenge, safe_next
from bot.gitea import GiteaOAuth, OAuthError
from bot.httpserver import HttpServer
from bot.ingest import RulesSource
from bot.store import TaskQuery, open_store
from tests.conftest import REPO, make_config, queue_task, task_events, wait_for
from tests.dashboard import (
    CLIENT_ID,
    CLIENT_SECRET,
    csrf_of,
    form_actions,
    sign_in,
    text_of,
    with_dashboard,
)

pytestmark = pytest.mark.both_modes

PUBLIC = "http://kugetsu.test"
SECRET_REPO = "acme/secret"


class Harness:
    def __init__(
        self, tmp: Path, gitea, *, public_url: str = PUBLIC, database_url: str = "", **dashboard
    ):
        self.gitea = gitea
        gitea.register_oauth_app(CLIENT_ID, CLIENT_SECRET, public_url + "/oauth/callback")
        self.config = with_dashboard(
            make_config(tmp / "data", gitea.url, public_url=public_url, database_url=database_url),
            gitea.url,
            **dashboard,
        )
        self.store = open_store(database_url or self.config.storage.db_path)
        self.wakes = 0
        self.app = create_app(
            self.config,
            self.store,
            rules=RulesSource(self.config, self.store, frozenset({"fake"})),
            wake=self._wake,
        )

    def _wake(self) -> None:
        self.wakes += 1

    def client(self):
        return self.app.test_client()

    def task(self, repo: str = REPO, *, state: State = State.PENDING, **fields) -> int:
        number = self.gitea.create_issue(repo, f"Issue in {repo}")
        task_id = queue_task(self.store, number, repo=repo, prompt="please")
        if state is not State.PENDING:
            assert [t.id for t in self.store.claim(10, "w1")] == [task_id]
        if state in (State.FAILED, State.COMPLETED, State.CANCELLED):
            outcome = {
                State.FAILED: Outcome.AGENT_FAILED,
                State.COMPLETED: Outcome.SUCCEEDED,
                State.CANCELLED: Outcome.CANCELLED,
            }[state]
            assert self.store.transition(
                task_id, State.RUNNING, state, event=outcome.value, outcome=outcome
            )
        if fields:
            self.store.update(task_id, **fields)
        return task_id


@pytest.fixture
def site(tmp_path, gitea):
    gitea.create_repo(SECRET_REPO)
    gitea.set_private(SECRET_REPO)
    gitea.set_permission(SECRET_REPO, "alice", "write")
    return Harness(tmp_path, gitea)


# ------------------------------------------------------------------------------ sign-in


def test_sign_in_sets_a_signed_session_cookie_and_sign_out_ends_it(site):
    c = site.client()
    assert "Sign in with Gitea" in c.get("/").get_data(as_text=True)
    back = sign_in(c, "alice", next_url="/charts")
    assert back.status_code == 303 and back.headers["Location"] == "/charts"
    cookie = next(h for h in back.headers.getlist("Set-Cookie") if h.startswith("kugetsu_session="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Max-Age=28800" in cookie
    assert "Secure" not in cookie  # public_url is http
    page = c.get("/").get_data(as_text=True)
    assert "Signed in as alice" in text_of(page)
    # the token Gitea gave is in no cookie and not on the page
    tokens = set(site.gitea._user_tokens)
    assert tokens and not any(t in cookie or t in page for t in tokens)
    # sign-out needs the CSRF token of the session
    assert c.post("/logout").status_code == 403
    assert "Signed in as alice" in text_of(c.get("/").get_data(as_text=True))
    out = c.post("/logout", data={"csrf": csrf_of(page)})
    assert out.status_code == 303
    assert "Signed in as" not in text_of(c.get("/").get_data(as_text=True))
    # the cookie the browser had is no longer a session
    c.set_cookie("kugetsu_session", cookie.split(";")[0].split("=", 1)[1], domain="localhost")
    assert "Signed in as" not in text_of(c.get("/").get_data(as_text=True))


def test_the_overview_refreshes_in_place_and_an_ended_sign_in_reloads_it(site):
    """The overview's script fetches `?fragment=live` every few seconds and puts it in
    the page; on 401 it reloads (to the sign-in page) instead."""
    task_id = site.task(REPO, state=State.RUNNING)
    c = site.client()
    sign_in(c, "alice")
    live = c.get("/?fragment=live")
    assert live.status_code == 200
    text = live.get_data(as_text=True)
    assert f"/tasks/{task_id}" in text and "<html" not in text and "Running now" in text
    signed_out = site.client().get("/?fragment=live")
    assert signed_out.status_code == 401
    assert site.client().get("/").status_code == 200  # the page itself: the sign-in page


def test_the_session_cookie_is_secure_behind_https(tmp_path, gitea):
    site = Harness(tmp_path, gitea, public_url="https://kugetsu.example")
    back = sign_in(site.client(), "alice")
    cookie = next(h for h in back.headers.getlist("Set-Cookie") if h.startswith("kugetsu_session="))
    assert "Secure" in cookie


def test_a_sign_in_finishes_only_in_the_browser_that_began_it(site):
    c = site.client()
    start = c.get("/login")
    location = start.headers["Location"]
    from tests.dashboard import authorize

    back = authorize(location, "alice")
    other = site.client()  # another browser, without the login cookie
    answer = other.get(back.replace(PUBLIC, ""))
    assert answer.status_code == 400
    assert "Signed in as" not in text_of(other.get("/").get_data(as_text=True))
    # and a state used once does not work twice
    assert c.get(back.replace(PUBLIC, "")).status_code == 303
    assert c.get(back.replace(PUBLIC, "")).status_code == 400


def test_gitea_refuses_a_code_without_the_right_pkce_verifier(site):
    c = site.client()
    start = c.get("/login")
    from urllib.parse import parse_qs, urlsplit

    from tests.dashboard import authorize

    code = parse_qs(urlsplit(authorize(start.headers["Location"], "alice")).query)["code"][0]
    oauth = GiteaOAuth(site.gitea.url, site.gitea.url, CLIENT_ID, CLIENT_SECRET)
    with pytest.raises(OAuthError, match="PKCE"):
        oauth.exchange_code(code=code, verifier="x" * 64, redirect_uri=PUBLIC + "/oauth/callback")


def test_sign_in_needs_the_client_id_secret_and_public_url(tmp_path):
    config = tmp_path / "k.toml"
    config.write_text('[dashboard]\nenabled = true\noauth_client_id = "x"\n')
    with pytest.raises(ConfigError, match="oauth_client_secret"):
        load(config, {"KUGETSU_WEBHOOK_SECRET": "s"})
    config.write_text(
        '[dashboard]\nenabled = true\noauth_client_id = "x"\noauth_client_secret = "y"\n'
    )
    with pytest.raises(ConfigError, match="public_url"):
        load(config, {"KUGETSU_WEBHOOK_SECRET": "s"})
    config.write_text(
        '[server]\npublic_url = "https://k.example"\n'
        '[dashboard]\nenabled = true\noauth_client_id = "x"\n'
    )
    loaded = load(
        config, {"KUGETSU_WEBHOOK_SECRET": "s", "KUGETSU_OAUTH_CLIENT_SECRET": "from-env-secret"}
    )
    assert loaded.dashboard.oauth_client_secret == "from-env-secret"
    assert "from-env-secret" in loaded.secrets()  # redacted wherever secrets are
    assert "from-env-secret" not in repr(loaded)


# ----------------------------------------------------------------- who sees what


def test_a_private_repository_never_shows_to_a_user_who_cannot_read_it(site):
    public = site.task(REPO, state=State.RUNNING)
    hidden = site.task(SECRET_REPO, state=State.COMPLETED)
    queued = site.task(SECRET_REPO)
    mallory = site.client()
    sign_in(mallory, "mallory")
    page = mallory.get("/").get_data(as_text=True)
    assert f"#{public}" in page and SECRET_REPO not in page
    for path in (f"/tasks/{hidden}", f"/tasks/{queued}", f"/tasks/{hidden}/log.txt"):
        assert mallory.get(path).status_code == 404
    for query in (f"repo={SECRET_REPO}", f"q={SECRET_REPO}%231", "q=1", "state=pending"):
        found = mallory.get(f"/?{query}").get_data(as_text=True)
        assert f"/tasks/{hidden}" not in found and f"/tasks/{queued}" not in found, query
        assert f"{SECRET_REPO}/issues" not in found, query
    # alice can read it, and a site admin reads everything
    alice = site.client()
    sign_in(alice, "alice")
    assert f"{SECRET_REPO}#" in alice.get("/").get_data(as_text=True)
    site.gitea.set_admin("root")
    root = site.client()
    sign_in(root, "root")
    assert root.get(f"/tasks/{hidden}").status_code == 200


def test_what_a_user_may_read_is_cached_then_asked_again(tmp_path, gitea):
    site = Harness(tmp_path, gitea, access_cache_seconds=0.5)
    task_id = site.task(REPO)
    c = site.client()
    sign_in(c, "mallory")

    def asked() -> int:
        return sum(1 for m, p, *_ in gitea.requests if m == "GET" and p == f"/api/v1/repos/{REPO}")

    assert c.get(f"/tasks/{task_id}").status_code == 200
    before = asked()
    for _ in range(3):
        c.get("/")
    assert asked() == before  # cached
    gitea.set_private(REPO)
    gitea.set_permission(REPO, "mallory", "none")
    wait_for(lambda: c.get(f"/tasks/{task_id}").status_code == 404, what="the change seen")
    assert asked() > before


def test_the_queue_is_shown_in_the_fair_order_slots_go_in(site):
    """Three tasks of one repository, then one of another: the other's takes the second
    slot (fair share), and the page shows each at the place its tracking comment gives."""
    site.gitea.create_repo("acme/other")
    first = [site.task(REPO) for _ in range(3)]
    other = site.task("acme/other")
    c = site.client()
    sign_in(c, "alice")
    page = c.get("/?state=pending").get_data(as_text=True)
    queue = page[page.index('id="h-queue"') :]
    shown = [int(n) for n in re.findall(r'href="/tasks/(\d+)"', queue)]
    assert shown == [first[0], other, first[1], first[2]]
    places = [int(p) for p in re.findall(r'data-label="Position">(\d+)<', queue)]
    assert places == [site.store.queue_position(t) for t in shown] == [1, 2, 3, 4]


def test_the_agent_filter_offers_every_agent_tasks_were_given(site):
    """An agent named by a repository's .kugetsu.toml (a preset the server's config does
    not list) is offered too, and filters."""
    given = site.task(REPO, agent="claude")
    other = site.task(REPO)
    c = site.client()
    sign_in(c, "alice")
    page = c.get("/").get_data(as_text=True)
    options = re.findall(r'<option value="([^"]*)"', page[page.index('id="f-agent"') :])
    assert "claude" in options and "fake" in options
    found = c.get("/?agent=claude&state=pending").get_data(as_text=True)
    assert f"/tasks/{given}" in found and f"/tasks/{other}" not in found


# --------------------------------------------------------------- stop and retry


def test_a_writer_stops_a_task_with_the_form_and_is_named_for_it(site):
    task_id = site.task(REPO, state=State.RUNNING)
    c = site.client()
    sign_in(c, "alice")
    page = c.get(f"/tasks/{task_id}").get_data(as_text=True)
    # named as its comments name it ("task 3"); "#" is for the issue beside it
    assert f"<title>Task {task_id}" in page and f"<h1>Task {task_id} <span" in page
    assert f"› task {task_id}</p>" in page  # the breadcrumb too
    assert f"/tasks/{task_id}/stop" in form_actions(page)
    done = c.post(f"/tasks/{task_id}/stop", data={"csrf": csrf_of(page)})
    assert done.status_code == 303 and "done=stopping" in done.headers["Location"]
    task = site.store.require(task_id)
    assert task.cancel_requested_by == "alice" and site.wakes == 1
    assert task_events(site.store, task_id)[-1]["detail"] == "alice via the dashboard"
    assert "Stopping, as requested by @alice." in render.tracking(
        task, site.config, QueueView(None, 1, 3)
    )


@pytest.mark.parametrize(
    "how", ["no token", "another session's token", "another site's Origin", "a GET"]
)
def test_a_stop_without_this_sessions_csrf_token_is_refused(site, how):
    task_id = site.task(REPO, state=State.RUNNING)
    c, other = site.client(), site.client()
    sign_in(c, "alice")
    sign_in(other, "alice")
    page = c.get(f"/tasks/{task_id}").get_data(as_text=True)
    token = csrf_of(page)
    if how == "no token":
        answer = c.post(f"/tasks/{task_id}/stop", data={})
    elif how == "another session's token":
        answer = c.post(
            f"/tasks/{task_id}/stop", data={"csrf": csrf_of(other.get("/").get_data(as_text=True))}
        )
    elif how == "another site's Origin":
        answer = c.post(
            f"/tasks/{task_id}/stop", data={"csrf": token}, headers={"Origin": "https://evil.test"}
        )
    else:
        answer = c.get(f"/tasks/{task_id}/stop", query_string={"csrf": token})
    assert answer.status_code in (403, 405)
    assert site.store.require(task_id).cancel_requested_by is None


def test_a_reader_gets_no_buttons_and_403_for_a_forged_stop_or_retry(site):
    running = site.task(REPO, state=State.RUNNING)
    failed = site.task(REPO, state=State.FAILED)
    c = site.client()
    sign_in(c, "mallory")  # read access
    for task_id, action in ((running, "stop"), (failed, "retry")):
        page = c.get(f"/tasks/{task_id}").get_data(as_text=True)
        assert f"/tasks/{task_id}/{action}" not in form_actions(page)
        assert "You cannot stop or retry this task" in text_of(page)
        answer = c.post(f"/tasks/{task_id}/{action}", data={"csrf": csrf_of(page)})
        assert answer.status_code == 403
        assert "needs write access" in answer.get_data(as_text=True)
    assert site.store.require(running).cancel_requested_by is None
    assert site.store.require(failed).state is State.FAILED


def test_permission_is_asked_again_when_acting(tmp_path, gitea):
    """The button was shown from the cache; the POST asks Gitea now."""
    site = Harness(tmp_path, gitea, access_cache_seconds=3600)
    task_id = site.task(REPO, state=State.RUNNING)
    c = site.client()
    sign_in(c, "alice")
    page = c.get(f"/tasks/{task_id}").get_data(as_text=True)
    assert f"/tasks/{task_id}/stop" in form_actions(page)
    gitea.set_permission(REPO, "alice", "read")
    assert c.post(f"/tasks/{task_id}/stop", data={"csrf": csrf_of(page)}).status_code == 403
    assert site.store.require(task_id).cancel_requested_by is None


def test_a_writer_retries_a_failed_task_and_the_comment_names_them(site):
    task_id = site.task(REPO, state=State.FAILED)
    c = site.client()
    sign_in(c, "alice")
    page = c.get(f"/tasks/{task_id}").get_data(as_text=True)
    done = c.post(f"/tasks/{task_id}/retry", data={"csrf": csrf_of(page)})
    assert "done=retried" in done.headers["Location"]
    task = site.store.require(task_id)
    assert task.state is State.PENDING and task.retried_by == "alice"
    assert task_events(site.store, task_id)[-1]["detail"] == "alice via the dashboard"
    assert "Queued again by @alice." in render.tracking(task, site.config, QueueView(1, 0, 3))


def test_the_task_page_shows_the_prompt_the_agent_was_given(site):
    task_id = site.task(REPO, state=State.RUNNING)
    c = site.client()
    sign_in(c, "alice")
    assert "Not given yet" in text_of(c.get(f"/tasks/{task_id}").get_data(as_text=True))
    path = site.config.storage.prompt_path(task_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the issue's text is in the prompt: hostile markup is shown as text
    path.write_text("Fix <script>alert(1)</script> the widget\n" + "x" * 70_000)
    page = c.get(f"/tasks/{task_id}").get_data(as_text=True)
    assert "Fix &lt;script&gt;alert(1)&lt;/script&gt; the widget" in page
    assert "<script>alert" not in page
    assert "70,041 bytes; the first 65,536 shown" in text_of(page)
    assert "x" * 60_000 in page and "x" * 70_000 not in page


# ------------------------------------------------------------------ the log link


def test_the_log_link_opens_the_task_page_for_readers_signed_in_and_the_log_for_others(site):
    open_task = site.task(REPO, state=State.RUNNING)
    secret_task = site.task(SECRET_REPO, state=State.RUNNING)
    for task_id in (open_task, secret_task):
        path = site.config.storage.log_path(task_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"log of {task_id}\n")
    link = {
        t: render.log_link(site.config, t).replace(PUBLIC, "") for t in (open_task, secret_task)
    }
    stranger = site.client()
    answer = stranger.get(link[open_task])
    assert answer.status_code == 200 and answer.get_data(as_text=True) == f"log of {open_task}\n"
    mallory = site.client()
    sign_in(mallory, "mallory")
    moved = mallory.get(link[open_task])
    assert moved.status_code == 303 and moved.headers["Location"] == f"/tasks/{open_task}"
    assert mallory.get(link[open_task] + "?plain").get_data(as_text=True) == f"log of {open_task}\n"
    # signed in, but the repository is not theirs to read: the link still shows its log
    assert mallory.get(link[secret_task]).get_data(as_text=True) == f"log of {secret_task}\n"
    # and a wrong token is no link at all, signed in or not
    assert mallory.get(f"/logs/{open_task}/{'0' * 24}").status_code == 404
    assert "[task page](" in render.tracking(
        site.store.require(open_task), site.config, QueueView(None, 1, 3)
    )


# ------------------------------------------------------------------ the live log


@pytest.fixture
def served(site):
    server = HttpServer(site.app, "127.0.0.1", 0, threads=8).start()
    yield server
    server.stop()


def _events(raw: bytes) -> list[dict]:
    found = []
    for block in raw.decode().split("\n\n"):
        fields: dict = {}
        for line in block.split("\n"):
            if line.startswith(("id: ", "event: ", "data: ")):
                key, _, value = line.partition(": ")
                fields[key] = value
        if "event" in fields:
            found.append(fields)
    return found


def _read_events(response, until: str | None = None, count: int | None = None) -> list[dict]:
    """The events of a stream until one named `until`, or `count` log events; what came
    by then if neither came within 30 s (a quiet stream still sends keepalives)."""
    raw, found = b"", []
    give_up = time.monotonic() + 30
    for chunk in response.iter_content(chunk_size=None):
        raw += chunk
        found = _events(raw.rpartition(b"\n\n")[0] + b"\n\n")
        if until and any(e["event"] == until for e in found):
            break
        if count and sum(e["event"] == "log" for e in found) >= count:
            break
        if time.monotonic() > give_up:
            break
    response.close()
    return found


def test_the_live_log_resumes_where_the_browser_left_off(site, served):
    task_id = site.task(REPO, state=State.RUNNING)
    path = site.config.storage.log_path(task_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    # more than one chunk, and a character cut at a chunk's end (é is two bytes)
    text = "".join(f"line {i} é\n" for i in range(20_000))
    path.write_bytes(text.encode())
    http = _signed_in(site, served, "alice")
    url = f"{served.url}/tasks/{task_id}/log/stream"
    first = _read_events(http.get(url, stream=True, timeout=10), count=1)
    log = [e for e in first if e["event"] == "log"]
    got = json.loads(log[0]["data"])
    offset = int(log[0]["id"])
    assert offset == len(got.encode()) and offset <= logstream.CHUNK
    # the browser reconnects with the last id it saw; meanwhile the agent prints more
    with path.open("ab") as fh:
        fh.write("the end é\n".encode())
    site.store.transition(
        task_id, State.RUNNING, State.COMPLETED, event="succeeded", outcome=Outcome.SUCCEEDED
    )
    rest = _read_events(
        http.get(url, stream=True, timeout=20, headers={"Last-Event-ID": str(offset)}), until="end"
    )
    got += "".join(json.loads(e["data"]) for e in rest if e["event"] == "log")
    assert got == path.read_text()  # nothing lost, nothing twice, no character broken
    assert int(rest[-1]["id"]) == path.stat().st_size


def test_a_task_on_another_machine_shows_and_streams_the_log_its_worker_shipped(
    tmp_path, gitea, pg_cluster
):
    """On PostgreSQL, a task whose agent runs on a worker elsewhere has its log here only
    as the chunks that worker ships (the file is in the other machine's data directory):
    the overview's last line, the task page, its earlier part, the download and the live
    log read them, and the stream resumes at the byte the browser reached."""
    database = pg_cluster.url_for()
    site = Harness(tmp_path, gitea, database_url=database)
    task_id = site.task(REPO, state=State.RUNNING)
    # the other machine: its own data directory, the same database
    worker_store = open_store(database)
    path = make_config(tmp_path / "machine-b", gitea.url).storage.log_path(task_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    shipper = tasklog.LogShipper(worker_store, task_id, path)
    # more than one shipped chunk, more than the page starts with, a character cut at a
    # read's end (é is two bytes)
    with path.open("ab") as fh:
        fh.write("".join(f"line {i} é\n" for i in range(30_000)).encode())
    shipper.ship()
    shipped = path.read_bytes()
    assert len(shipped) > tasklog.CHUNK_BYTES + logstream.TAIL_BYTES
    assert not site.config.storage.log_path(task_id).exists()
    server = HttpServer(site.app, "127.0.0.1", 0, threads=8).start()
    try:
        http = _signed_in(site, server, "alice")
        assert "line 29999 é" in http.get(f"{server.url}/", timeout=10).text
        page = http.get(f"{server.url}/tasks/{task_id}", timeout=10)
        assert page.status_code == 200 and f"{len(shipped):,} bytes" in page.text
        start = int(re.search(r'data-start="(\d+)"', page.text)[1])
        assert shipped[start - 1 : start] == b"\n"
        assert 0 < len(shipped) - start <= logstream.TAIL_BYTES
        earlier = http.get(f"{server.url}/tasks/{task_id}/log", params={"end": start}, timeout=10)
        begin = int(earlier.headers["X-Log-Start"])
        assert begin < start and earlier.text == shipped[begin:start].decode()
        whole = http.get(f"{server.url}/tasks/{task_id}/log.txt", timeout=10)
        assert whole.status_code == 200 and whole.content == shipped

        url = f"{server.url}/tasks/{task_id}/log/stream"
        first = _read_events(
            http.get(url, params={"from": start}, stream=True, timeout=10), count=1
        )
        log = [e for e in first if e["event"] == "log"]
        assert log, f"no log event from byte {start}: {first}"
        got = json.loads(log[0]["data"])
        offset = int(log[0]["id"])
        assert offset - start == len(got.encode()) and got.encode() == shipped[start:offset]
        # the agent prints more there, the worker ships it, the task ends; the browser
        # reconnects with the last id it saw
        with path.open("ab") as fh:
            fh.write("the end é\n".encode())
        shipper.ship()
        site.store.transition(
            task_id, State.RUNNING, State.COMPLETED, event="succeeded", outcome=Outcome.SUCCEEDED
        )
        rest = _read_events(
            http.get(url, stream=True, timeout=20, headers={"Last-Event-ID": str(offset)}),
            until="end",
        )
    finally:
        server.stop()
        worker_store.close()
    got += "".join(json.loads(e["data"]) for e in rest if e["event"] == "log")
    assert got.encode() == path.read_bytes()[start:]  # nothing lost, nothing twice
    assert int(rest[-1]["id"]) == path.stat().st_size


def _signed_in(site, served, login: str) -> requests.Session:
    """Sign in over HTTP to the app served by waitress (public_url is another host, so
    the callback is followed by hand)."""
    from urllib.parse import urlsplit

    from tests.dashboard import authorize

    http = requests.Session()
    start = http.get(served.url + "/login", allow_redirects=False, timeout=10)
    back = urlsplit(authorize(start.headers["Location"], login))
    http.cookies.set("kugetsu_login", start.cookies["kugetsu_login"], path="/oauth")
    answer = http.get(f"{served.url}{back.path}?{back.query}", allow_redirects=False, timeout=10)
    assert answer.status_code == 303, answer.text
    return http


def test_past_the_limit_of_live_logs_a_viewer_is_told_and_retries(tmp_path, gitea):
    site = Harness(tmp_path, gitea, max_log_streams=1)
    task_id = site.task(REPO, state=State.RUNNING)
    server = HttpServer(site.app, "127.0.0.1", 0, threads=8).start()
    try:
        http = _signed_in(site, server, "alice")
        url = f"{server.url}/tasks/{task_id}/log/stream"
        held = http.get(url, stream=True, timeout=10)
        next(held.iter_content(chunk_size=None))  # the first stream is open
        refused = _first_bytes(http, url)
        assert refused.startswith("retry: 10000\n")
        assert _events(refused.encode())[0] == {"event": "busy", "data": '{"limit": 1}'}
        held.close()
        # the slot is given back when the browser goes away
        wait_for(
            lambda: "event: busy" not in _first_bytes(http, url),
            what="the slot given back",
        )
    finally:
        server.stop()


def _first_bytes(http, url) -> str:
    """What a stream sends first: its retry line and, if it sends one at once, an event."""
    with http.get(url, stream=True, timeout=10) as answer:
        assert answer.status_code == 200
        chunks = answer.iter_content(chunk_size=None)
        text = next(chunks).decode()
        if "event:" not in text and "retry: 10000" in text:
            text += next(chunks).decode()
        return text


# -------------------------------------------------------- lists at 100,000 tasks


def test_the_lists_read_indexes_not_the_whole_table(site):
    """Every query the lists make is read in order from an index: no scan of the
    table, no sort of its rows (bench/dashboard.py times them at 100,000 tasks)."""
    store = site.store
    calls = [
        lambda: store.find_tasks(TaskQuery(), limit=50),
        lambda: store.find_tasks(TaskQuery(repos=(REPO, SECRET_REPO)), before=90, limit=50),
        lambda: store.find_tasks(TaskQuery(agent="fake"), limit=50),
        lambda: store.find_tasks(TaskQuery(issue=3), limit=50),
        lambda: store.finished_tasks(TaskQuery(), limit=25),
        lambda: store.finished_tasks(TaskQuery(repos=(REPO,)), before=(time.time(), 5), limit=25),
        lambda: store.finished_tasks(TaskQuery(state=State.FAILED), limit=25),
        lambda: store.task_events(1),
        lambda: store.task_repos(),
        lambda: store.task_agents(),
        lambda: store.finished_since(time.time() - 86400, (REPO,)),
    ]
    conn = store._conn()
    for call in calls:
        statements = _recorded(store, call)
        assert statements
        for sql, args in statements:
            plan = " ".join(str(r[3]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))
            assert "TEMP B-TREE" not in plan, (sql, plan)
            # an index read in order ("SCAN ... USING INDEX" stops after LIMIT rows); a
            # plain scan only for the newest of all tasks: the table in id order
            if "WHERE TRUE ORDER BY id DESC LIMIT" not in sql:
                assert not re.search(r"SCAN tasks(?! USING)", plan), (sql, plan)


def _recorded(store, call):
    """The SELECT statements `call` runs, with their arguments written in (the trace
    callback gets them expanded), as (sql, ())."""
    found = []
    conn = store._conn()
    conn.set_trace_callback(found.append)
    try:
        call()
    finally:
        conn.set_trace_callback(None)
    return [(sql, ()) for sql in found if sql.lstrip().upper().startswith(("SELECT", "WITH"))]


# =============================================================================== units


def test_utf8_cut_keeps_a_cut_character_for_the_next_read():
    data = "aé€😀".encode()
    assert logstream.utf8_cut(data) == len(data)
    for cut in range(1, len(data)):
        part = data[:cut]
        whole = logstream.utf8_cut(part)
        part[:whole].decode()  # never a broken character
        assert whole >= cut - 3
    assert logstream.utf8_cut(b"\xff\xfe") == 2  # not UTF-8 at all: not held back


def test_resume_offset_prefers_the_last_event_id():
    assert logstream.resume_offset("120", "5") == 120
    assert logstream.resume_offset(None, "5") == 5
    assert logstream.resume_offset(None, None) == 0
    assert logstream.resume_offset("-3", "x") == 0
    assert logstream.resume_offset("9" * 40, None) == 0


def test_follow_sends_what_is_appended_from_the_offset_and_ends_with_the_task(tmp_path):
    path = tmp_path / "1.log"
    path.write_bytes(b"one\ntwo\n")
    clock, active = [0.0], [True]

    def sleep(seconds):
        clock[0] += seconds
        if clock[0] > 1.5:
            with path.open("ab") as fh:
                fh.write(b"three\n")
            active[0] = clock[0] < 3.0

    stream = logstream.follow(
        lambda: path.stat().st_size,
        _file_reader(path),
        4,
        active=lambda: active[0],
        clock=lambda: clock[0],
        sleep=sleep,
    )
    out = b"".join(stream).decode()
    events = _events(out.encode())
    logs = [e for e in events if e["event"] == "log"]
    assert json.loads(logs[0]["data"]) == "two\n" and logs[0]["id"] == "8"
    assert "".join(json.loads(e["data"]) for e in logs).startswith("two\nthree\n")
    assert events[-1]["event"] == "end" and int(events[-1]["id"]) == path.stat().st_size


def test_start_offset_and_earlier_parts_begin_at_a_line(tmp_path):
    path = tmp_path / "2.log"
    path.write_bytes(b"".join(b"%06d\n" % i for i in range(100_000)))  # 700,000 bytes
    read = _file_reader(path)
    start = logstream.start_offset(path.stat().st_size, read, tail=1000)
    assert path.read_bytes()[start - 1 : start] == b"\n" and 0 < path.stat().st_size - start <= 1000
    begin, text = logstream.read_slice(read, start, size=1000)
    assert text.endswith("\n") and path.read_bytes()[begin:start].decode() == text
    assert logstream.start_offset(None, _file_reader(tmp_path / "missing.log")) == 0


def _file_reader(path: Path) -> logstream.Read:
    def read(offset: int, limit: int) -> bytes | None:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(limit)

    return read


def _task(task_id, repo=REPO, issue=1, **kw):
    from bot.core.tasks import Task

    base = dict(
        kind="start",
        prompt="",
        agent="fake",
        requested_by="alice",
        state=State.PENDING,
        authorized=True,
        created_at=0.0,
    )
    return Task(id=task_id, repo=repo, issue=issue, **{**base, **kw})


def test_queue_rows_say_why_each_task_waits():
    running = [_task(1, issue=1, state=State.RUNNING)]
    # in the fair order the store gives (not by id): 6 comes before 5, its issue's
    # earlier task, and the one free slot goes to the first task that is ready
    waiting = [
        _task(2, issue=1),  # its issue's task runs
        _task(3, issue=2, authorized=None),
        _task(4, issue=3, not_before=500.0),
        _task(6, issue=4),  # behind 5
        _task(7, issue=5),  # the one free slot
        _task(5, issue=4),  # no slot left
    ]
    rows = views.queue_rows(
        [(t, place) for place, t in enumerate(waiting, start=1)], running, limit=2, now=100.0
    )
    reasons = {r.task.id: r.reason for r in rows}
    assert [r.task.id for r in rows] == [2, 3, 4, 6, 7, 5]
    assert [r.position for r in rows] == [1, 2, 3, 4, 5, 6]
    assert reasons[2] == "waiting on the issue's running task #1"
    assert "permission" in reasons[3]
    assert reasons[4].startswith("back-off until 1970-01-01 00:08:20")
    assert reasons[6] == "behind task #5 of the same issue"
    assert rows[4].next_up and "slot is free" in reasons[7]
    assert reasons[5] == "no free slot: 1 of 2 agents busy"
    assert [r.next_up for r in rows].count(True) == 1


def test_attempts_are_read_from_events():
    events = [
        {"at": 1.0, "event": "queued", "from_state": None, "to_state": "pending"},
        {"at": 2.0, "event": "claimed", "from_state": "pending", "to_state": "running"},
        {
            "at": 5.0,
            "event": "agent_failed",
            "from_state": "running",
            "to_state": "pending",
            "detail": "exit 3",
        },
        {"at": 6.0, "event": "claimed", "from_state": "pending", "to_state": "running"},
    ]
    found = views.attempts(events)
    assert [(a.number, a.started, a.ended, a.result) for a in found] == [
        (1, 2.0, 5.0, "agent_failed"),
        (2, 6.0, None, None),
    ]


def test_last_line_skips_blank_lines_and_terminal_escapes():
    assert views.last_line(b"first\n\x1b[32mgreen\x1b[0m done\r\n\n") == "green done"
    assert views.last_line(b"") == ""
    assert len(views.last_line(b"x" * 500)) == 200


def test_a_hostile_tracking_comment_renders_without_script_or_hidden_links():
    body = (
        "<!-- kugetsu:task=3 -->\n**kugetsu** <script>alert(1)</script>\n\n"
        "<details><summary>tail</summary>\n\n```\n<img src=x onerror=alert(2)>\n```\n</details>\n\n"
        '<sub>[log](javascript:alert(3)) <img src=x onerror=alert(4)> <a href="javascript:5">x</a>'
        " ![p](https://tracker.example/p.png) [ok](https://ok.example/)</sub>\n"
        '<details open ontoggle="alert(6)"><iframe src="https://x"></iframe>'
    )
    out = comment.render(body)
    tags = _tags(out)
    assert {name for name, _ in tags} <= {
        "p",
        "strong",
        "details",
        "summary",
        "pre",
        "code",
        "sub",
        "a",
    }
    for name, attrs in tags:
        if name == "a":
            assert dict(attrs)["href"].startswith(("https://", "#")), attrs
            assert dict(attrs)["rel"] == "nofollow noopener noreferrer"
        else:
            assert attrs == [], (name, attrs)
    assert "kugetsu:task" not in out  # the marker is dropped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out  # shown as text
    assert '<a href="https://ok.example/" rel="nofollow noopener noreferrer">ok</a>' in out


def _tags(page: str) -> list[tuple[str, list]]:
    from html.parser import HTMLParser

    found = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, attrs))

    Tags().feed(page)
    return found


def test_charts_tell_series_apart_by_pattern_and_list_their_numbers():
    from bot.store import FinishedRow

    day = 86400.0 * 20000
    rows = [
        FinishedRow(REPO, "fake", "completed", "succeeded", day, day + 10, day + 70, 0.5),
        FinishedRow(REPO, "claude", "failed", "agent_failed", day, day + 30, day + 40, 0.25),
    ]
    days = charts.days_between(day, day + 100)
    outcome = charts.outcomes_per_day(rows, days)
    assert 'fill="url(#p0)"' in outcome.svg and 'fill="url(#p2)"' in outcome.svg
    assert "<title>" in outcome.svg and outcome.rows == ((days[0], "1", "1", "2"),)
    times = charts.times_per_day(rows, days)
    assert times.rows[0][1:] == ("20s", "29s", "35s", "57.5s")
    # the axis of times reaches 80 s in steps of 20: none is rounded to another number
    ticks = re.findall(r'text-anchor="end">([^<]+)</text>', times.svg)
    assert ticks == ["0s", "20s", "40s", "1m00s", "1m20s"]
    wait = [FinishedRow(REPO, "fake", "completed", "succeeded", day, day + 10, day + 20, None)]
    ticks = re.findall(r'text-anchor="end">([^<]+)</text>', charts.times_per_day(wait, days).svg)
    assert ticks == ["0s", "2.5s", "5s", "7.5s", "10s"]
    cost = charts.cost_per_day(rows, days, "agent")
    assert cost.columns == ("day", "fake", "claude", "total")
    assert "nothing in this period" in charts.cost_per_day([], days, "repo").svg


def test_session_cookies_are_signed_and_sign_ins_are_bound_to_their_browser():
    sessions = Sessions(3600, clock=lambda: now[0])
    now = [1000.0]
    s = sessions.create("alice", False, "tok", "ref", 3600)
    cookie = sessions.cookie(s)
    assert sessions.get(cookie) is s
    assert sessions.get(cookie[:-1] + ("0" if cookie[-1] != "0" else "1")) is None
    assert sessions.get(s.id) is None  # an id without its signature
    assert Sessions(3600).get(cookie) is None  # another process's key
    now[0] += 3601
    assert sessions.get(cookie) is None  # expired
    state, verifier = sessions.begin_login("//evil.example/x")
    assert sessions.finish_login(state, Signer().sign(state)) is None  # another key
    assert sessions.finish_login(state, sessions.signer.sign(state)) == (verifier, "/")
    assert sessions.finish_login(state, sessions.signer.sign(state)) is None  # once
    assert len(pkce_challenge(verifier)) == 43
    for bad in ("https://evil.example", "//evil", "/\\evil", "/a\nb", ""):
        assert safe_next(bad) == "/"
    assert safe_next("/tasks/3?x=1") == "/tasks/3?x=1"


@responses.activate
def test_visibility_is_asked_per_repository_with_the_users_token(tmp_path):
    config = with_dashboard(make_config(tmp_path, "http://gitea.test"), "http://gitea.test")
    sessions = Sessions(3600)
    oauth = GiteaOAuth("http://gitea.test", "http://gitea.test", CLIENT_ID, CLIENT_SECRET)
    repos = ["acme/open", "acme/closed", "acme/down", "acme/mine"]
    access = access_mod.Access(config, lambda: repos, sessions, oauth)
    session = sessions.create("bea", False, "bea-token", "r", 3600)

    def repo(owner_login, push=False):
        return {
            "owner": {"login": owner_login},
            "permissions": {"admin": False, "push": push, "pull": True},
        }

    responses.get("http://gitea.test/api/v1/repos/acme/open", json=repo("acme"))
    responses.get(
        "http://gitea.test/api/v1/repos/acme/closed", status=404, json={"message": "not found"}
    )
    responses.get("http://gitea.test/api/v1/repos/acme/down", status=500, json={"message": "boom"})
    responses.get("http://gitea.test/api/v1/repos/acme/mine", json=repo("bea"))
    visible = access.visible(session)
    assert visible.repos == {"acme/open", "acme/mine"} and visible.unchecked == ("acme/down",)
    assert not visible.can_read("acme/closed") and not visible.can_read("acme/down")
    assert all(c.request.headers["Authorization"] == "token bea-token" for c in responses.calls)
    assert access.may_act(session, "acme/mine") == (True, "")
    assert access.may_act(session, "acme/open")[0] is False
    admin = sessions.create("root", True, "root-token", "r", 3600)
    assert access.visible(admin).everything
    access.close()


def test_the_wheel_ships_every_template_and_static_file():
    """`pip install .` is the whole install: package-data must name every page file."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["bot.dashboard"]
    folder = root / "bot" / "dashboard"
    files = [
        p.relative_to(folder).as_posix()
        for sub in ("templates", "static")
        for p in (folder / sub).rglob("*")
        if p.is_file()
    ]
    assert files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert missing == []
