"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against
`kugetsu serve` as a process, the fake Gitea (with its OAuth2 sign-in) and real agent
processes that print as they work.

Screenshots go to test-artifacts/screenshots/ (git-ignored; KUGETSU_SCREENSHOTS names
another folder), to be looked at.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from pathlib import Path

import pytest
import requests

from tests import payloads
from tests.conftest import (
    AGENT_PYTHON,
    FAKE_AGENT,
    REPO,
    SECRET,
    TOKEN,
    process_gone,
    reachable_in_sandbox,
    wait_for,
)
from tests.dashboard import CLIENT_ID, CLIENT_SECRET, dashboard_table
from tests.service import Service, free_port, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.both_modes]

CHROMIUM = "/usr/bin/chromium"
#: Chromium on a machine without a network to the outside: no sandbox (root), no GPU,
#: none of its own background connections
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SECRET_REPO = "acme/secret"
SHOTS = Path(
    os.environ.get("KUGETSU_SCREENSHOTS")
    or Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
)
#: Playwright's own waits (expect) give up after this long
WAIT_MS = 20_000


class Site:
    """The fake Gitea and `kugetsu serve` with the dashboard on, shared by this module's
    tests; each test works on issues of its own."""

    def __init__(self, tmp: Path, gitea):
        self.tmp, self.gitea = tmp, gitea
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        gitea.register_oauth_app(CLIENT_ID, CLIENT_SECRET, self.url + "/oauth/callback")
        config = write_config(
            tmp / "kugetsu.toml",
            {
                "server": {"host": "127.0.0.1", "port": self.port, "public_url": self.url},
                "gitea": {"url": gitea.url, "token": TOKEN, "webhook_secret": SECRET},
                "storage": {"data_dir": str(tmp / "data")},
                "queue": {"poll_interval_seconds": 30, "max_concurrent_agents": 4},
                "agents": {"default": "fake", "timeout_minutes": 5, "kill_grace_seconds": 2},
                "agents.fake": {
                    "command": [AGENT_PYTHON, str(FAKE_AGENT), "{prompt}"],
                    # an agent that works for a minute, printing a line every 0.2 s
                    "env": {"FAKE_SECONDS": "60", "FAKE_PRINT_EVERY": "0.2"},
                },
                "dashboard": dashboard_table(gitea.url),
                "git": {"author_name": "kugetsu", "author_email": "kugetsu@example.invalid"},
            },
        )
        self.service = Service(config, self.port, tmp).start()
        self.db = tmp / "data" / "kugetsu.db"

    def start_task(self, repo: str = REPO, title: str = "Fix the widget") -> int:
        """Open an issue and ask for work on it as alice; returns the task's id."""
        number = self.gitea.create_issue(repo, title)
        body, headers = payloads.comment_delivery(
            "/kugetsu start please", number, sender="alice", repo=repo
        )
        answer = self.service.post(body, headers)
        assert answer.status_code == 202, answer.text
        return int(answer.json()["tasks"][0])

    def row(self, task_id: int) -> dict:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            conn.row_factory = sqlite3.Row
            return dict(conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone())
        finally:
            conn.close()

    def running(self, task_id: int) -> int:
        """Wait until the task's agent runs; its pid."""
        row = wait_for(
            lambda: (r := self.row(task_id))["state"] == "running" and r["pid"] and r,
            what=f"task {task_id} running",
        )
        return int(row["pid"])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from tests.fakegitea import FakeGitea

    tmp = reachable_in_sandbox(tmp_path_factory.mktemp("browser"))
    with FakeGitea(tmp / "gitea", token=TOKEN) as gitea:
        gitea.create_repo(REPO, files={"README.md": "# widget\n"})
        gitea.set_permission(REPO, "alice", "write")
        gitea.set_permission(REPO, "mallory", "read")
        gitea.create_repo(SECRET_REPO, files={"README.md": "# secret\n"})
        gitea.set_private(SECRET_REPO)
        gitea.set_permission(SECRET_REPO, "alice", "write")
        site = Site(tmp, gitea)
        try:
            yield site
        finally:
            site.service.stop()


@pytest.fixture(scope="module")
def playwright():
    if not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run does)"
        if os.environ.get("KUGETSU_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture
def open_browser(playwright, tmp_path):
    """A browser of its own (a fresh profile) per person: `open_browser("alice")`."""
    contexts = []

    def start(who: str, **options):
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / f"profile-{who}-{len(contexts)}"),
            executable_path=CHROMIUM,
            args=CHROMIUM_FLAGS,
            headless=True,
            **{"viewport": {"width": 1280, "height": 860}, **options},
        )
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        return context.pages[0] if context.pages else context.new_page()

    yield start
    for context in contexts:
        context.close()


def shot(page, name: str, full_page: bool = True) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def sign_in(page, site: Site, login: str, path: str = "/") -> None:
    from playwright.sync_api import expect

    page.goto(site.url + path)
    page.get_by_role("link", name="Sign in with Gitea").click()
    page.locator("#login").fill(login)
    page.get_by_role("button", name="Authorize").click()
    expect(page.get_by_text(f"Signed in as {login}")).to_be_visible()


# --------------------------------------------------------------------------------- tests


def test_sign_in_round_trip(site, open_browser):
    from playwright.sync_api import expect

    page = open_browser("alice")
    page.goto(site.url + "/")
    expect(page.get_by_role("link", name="Sign in with Gitea")).to_be_visible()
    shot(page, "01-sign-in")
    page.get_by_role("link", name="Sign in with Gitea").click()
    # at Gitea: its sign-in page, then back to kugetsu with a code
    assert page.url.startswith(site.gitea.url + "/login/oauth/authorize")
    assert "code_challenge_method=S256" in page.url
    page.locator("#login").fill("alice")
    page.get_by_role("button", name="Authorize").click()
    expect(page.get_by_text("Signed in as alice")).to_be_visible()
    assert page.url.rstrip("/") == site.url
    cookies = {c["name"]: c for c in page.context.cookies(site.url)}
    session = cookies["kugetsu_session"]
    assert session["httpOnly"] and session["sameSite"] == "Lax" and session["expires"] > time.time()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    shot(page, "02-overview-signed-in")


def test_a_running_task_shows_its_log_growing_while_the_agent_prints(site, open_browser):
    from playwright.sync_api import expect

    task_id = site.start_task(title="Make the widget faster")
    site.running(task_id)
    page = open_browser("alice")
    sign_in(page, site, "alice")
    row = page.locator("tr", has=page.get_by_role("link", name=f"#{task_id}", exact=True))
    expect(row).to_contain_text("Make the widget faster")
    expect(row.locator(".logline")).to_contain_text("working: step")
    first = row.locator(".logline").inner_text()
    # the overview refreshes itself: the last line moves on without a reload
    expect(row.locator(".logline")).not_to_have_text(first, timeout=WAIT_MS)
    shot(page, "03-overview-running")

    page.get_by_role("link", name=f"#{task_id}", exact=True).click()
    log = page.locator("#log")
    expect(log).to_contain_text("working: step 3")
    steps = [int(n) for n in re.findall(r"working: step (\d+)", log.inner_text())]
    seen = max(steps)
    # new lines arrive over the stream: ten more steps, without reloading the page
    expect(log).to_contain_text(f"working: step {seen + 10}\n")
    text = log.inner_text()
    steps = [int(n) for n in re.findall(r"working: step (\d+)", text)]
    assert steps == list(range(1, max(steps) + 1)), "a line was lost or shown twice"
    expect(page.locator("#log-status")).to_contain_text("Live")
    shot(page, "04-task-live-log")
    # the same page on a phone, in dark mode
    phone = open_browser("alice-phone", viewport={"width": 390, "height": 844}, color_scheme="dark")
    sign_in(phone, site, "alice", path=f"/tasks/{task_id}")
    expect(phone.locator("#log")).to_contain_text("working: step")
    shot(phone, "05-task-phone-dark")
    site.service.cli("queue", "cancel", str(task_id))


def test_a_write_user_stops_a_running_agent(site, open_browser):
    from playwright.sync_api import expect

    task_id = site.start_task(title="Stop me")
    pid = site.running(task_id)
    page = open_browser("alice")
    sign_in(page, site, "alice", path=f"/tasks/{task_id}")
    expect(page.locator("#log")).to_contain_text("working: step")
    page.get_by_role("button", name="Stop this task").click()
    expect(page.get_by_role("status").filter(has_text="Stopping")).to_be_visible()
    wait_for(lambda: site.row(task_id)["state"] == "cancelled", what="the task cancelled")
    wait_for(lambda: process_gone(pid), what="the agent gone")
    row = site.row(task_id)
    assert row["cancel_requested_by"] == "alice"
    # the stream ends when the task has
    page.reload()
    expect(page.locator("#log-status")).to_contain_text("has finished")
    expect(page.locator(".facts")).to_contain_text("cancelled")
    expect(page.locator("ol.timeline")).to_contain_text("alice via the dashboard")
    shot(page, "06-task-stopped")
    # and Gitea's tracking comment says who stopped it
    wait_for(
        lambda: any(
            f"kugetsu:task={task_id} " in c["body"] and "Stopped** by @alice" in c["body"]
            for c in site.gitea.comments.values()
        ),
        what="the tracking comment naming alice",
    )


def test_a_reader_sees_no_stop_button_and_a_forged_stop_is_refused(site, open_browser):
    from playwright.sync_api import expect

    task_id = site.start_task(title="Read only")
    site.running(task_id)
    page = open_browser("mallory")
    sign_in(page, site, "mallory", path=f"/tasks/{task_id}")
    expect(page.locator("#log")).to_contain_text("working: step")
    expect(page.get_by_role("button", name="Stop this task")).to_have_count(0)
    expect(page.get_by_text("You cannot stop or retry this task")).to_be_visible()
    shot(page, "07-task-read-only")
    # a POST made by hand, with the session's own cookie and CSRF token, is still refused
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    forged = page.request.post(
        f"{site.url}/tasks/{task_id}/stop", form={"csrf": csrf}, max_redirects=0
    )
    assert forged.status == 403
    assert "needs write access" in forged.text()
    # and without the token, or from another site, even before the permission is asked
    assert page.request.post(f"{site.url}/tasks/{task_id}/stop", form={}).status == 403
    other = page.request.post(
        f"{site.url}/tasks/{task_id}/stop",
        form={"csrf": csrf},
        headers={"Origin": "http://evil.example"},
    )
    assert other.status == 403
    row = site.row(task_id)
    assert row["state"] == "running" and row["cancel_requested_by"] is None
    site.service.cli("queue", "cancel", str(task_id))


def test_a_private_repository_never_appears_for_a_user_without_access(site, open_browser):
    from playwright.sync_api import expect

    hidden = site.start_task(repo=SECRET_REPO, title="Top secret plan")
    shown = site.start_task(title="Public work")
    site.running(hidden)
    site.running(shown)
    page = open_browser("mallory")
    sign_in(page, site, "mallory")
    expect(page.get_by_role("link", name=f"#{shown}", exact=True).first).to_be_visible()
    body = page.locator("body").inner_text()
    assert SECRET_REPO not in body and "Top secret plan" not in body
    options = page.locator("#f-repo option").all_inner_texts()
    assert SECRET_REPO not in options and REPO in options
    shot(page, "08-overview-without-the-private-repository")
    # not by its address either: the task, its log and its stream answer as if it did
    # not exist
    answer = page.goto(f"{site.url}/tasks/{hidden}")
    assert answer.status == 404
    expect(page.get_by_text("No such task")).to_be_visible()
    for path in ("log.txt", "log/stream", "log?end=100"):
        assert page.request.get(f"{site.url}/tasks/{hidden}/{path}").status == 404
    filtered = page.goto(f"{site.url}/?repo={SECRET_REPO}")
    assert filtered.status == 200 and "Top secret plan" not in page.locator("body").inner_text()
    # alice, who can read it, sees it
    alice = open_browser("alice")
    sign_in(alice, site, "alice")
    expect(alice.get_by_role("link", name=f"{SECRET_REPO}#", exact=False).first).to_be_visible()
    for task_id in (hidden, shown):
        site.service.cli("queue", "cancel", str(task_id))


def test_sign_out(site, open_browser):
    from playwright.sync_api import expect

    page = open_browser("alice")
    sign_in(page, site, "alice")
    cookie = {c["name"]: c for c in page.context.cookies(site.url)}["kugetsu_session"]
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_text("You are signed out.")).to_be_visible()
    expect(page.get_by_role("link", name="Sign in with Gitea")).to_be_visible()
    shot(page, "09-signed-out")
    assert "kugetsu_session" not in {c["name"] for c in page.context.cookies(site.url)}
    # the old cookie, sent again, is no session any more
    answer = requests.get(site.url + "/", cookies={"kugetsu_session": cookie["value"]}, timeout=10)
    assert "Sign in with Gitea" in answer.text and "Signed in as" not in answer.text


def test_charts_page(site, open_browser):
    """Not a listed proof, but the page people look at: it renders, with a table of its
    numbers for each chart."""
    from playwright.sync_api import expect

    page = open_browser("alice")
    sign_in(page, site, "alice", path="/charts")
    expect(page.locator("svg.chart")).to_have_count(4)
    shot(page, "10-charts")
