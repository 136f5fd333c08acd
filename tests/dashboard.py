"""Helpers for the dashboard's tests: its config, and signing in through the fake Gitea
as a browser would (the authorize page's form, the redirects, the cookies)."""

from __future__ import annotations

import dataclasses
import re
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import requests

from bot.config import Config, DashboardConfig

CLIENT_ID = "kugetsu-dashboard-client"
CLIENT_SECRET = "kgt-oauth-client-SECRET-42"


def with_dashboard(config: Config, gitea_url: str, **dashboard) -> Config:
    return dataclasses.replace(
        config,
        dashboard=DashboardConfig(
            enabled=True,
            oauth_client_id=CLIENT_ID,
            oauth_client_secret=CLIENT_SECRET,
            gitea_public_url=gitea_url,
            **dashboard,
        ),
    )


def dashboard_table(gitea_url: str, **extra) -> dict:
    """The `[dashboard]` table of a config file for `kugetsu serve`."""
    return {
        "enabled": True,
        "oauth_client_id": CLIENT_ID,
        "oauth_client_secret": CLIENT_SECRET,
        "gitea_public_url": gitea_url,
        **extra,
    }


def authorize(authorize_url: str, login: str) -> str:
    """Sign in on the fake Gitea's authorize page as `login`; returns where Gitea sends
    the browser back (the callback with its code and state)."""
    parts = urlsplit(authorize_url)
    form = {k: v[0] for k, v in parse_qs(parts.query).items()}
    answer = requests.post(
        f"{parts.scheme}://{parts.netloc}{parts.path}",
        data={**form, "login": login},
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 302, answer.text
    return answer.headers["Location"]


def sign_in(client, login: str, next_url: str = "/"):
    """Sign `client` (Flask's test client) in as `login`; returns the callback's answer."""
    start = client.get("/login", query_string={"next": next_url})
    assert start.status_code == 302, start.data
    back = urlsplit(authorize(start.headers["Location"], login))
    return client.get(back.path, query_string=back.query)


def sign_in_http(base_url: str, login: str) -> requests.Session:
    """A requests session signed in to a running kugetsu as `login`."""
    http = requests.Session()
    start = http.get(base_url + "/login", allow_redirects=False, timeout=10)
    assert start.status_code == 302, start.text
    back = http.get(authorize(start.headers["Location"], login), allow_redirects=False, timeout=10)
    assert back.status_code == 303, back.text
    return http


class _Forms(HTMLParser):
    def __init__(self):
        super().__init__()
        self.forms: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.forms.append({"action": attrs.get("action"), "fields": {}})
        elif tag == "input" and self.forms and attrs.get("name"):
            self.forms[-1]["fields"][attrs["name"]] = attrs.get("value", "")


def csrf_of(page: str) -> str:
    """The CSRF token of the page's forms (the sign-out form is on every page)."""
    parser = _Forms()
    parser.feed(page)
    tokens = {f["fields"].get("csrf") for f in parser.forms} - {None}
    assert len(tokens) == 1, parser.forms
    return tokens.pop()


def form_actions(page: str) -> list[str]:
    parser = _Forms()
    parser.feed(page)
    return [f["action"] for f in parser.forms]


def text_of(page: str) -> str:
    """The page's text without tags (for looking for what a person would read)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
