"""The publisher against Gitea's API: tracking comments and pull requests (the texts
themselves are core.render's, tested in tests/test_render.py)."""

import pytest

from bot.config import Config, GiteaConfig, ServerConfig
from bot.core.render import marker, pr_body
from bot.core.tasks import Task
from bot.gitea import ServerError, Unprocessable, Unreachable
from tests.conftest import A_START, a_task, enqueue

CONFIG = Config(
    server=ServerConfig(public_url="https://kugetsu.example"),
    gitea=GiteaConfig(
        url="https://git.example", token="tok-ABCDEF123", webhook_secret="whsec-987654"
    ),
)
QUEUED = A_START


def task(**kw) -> Task:
    return a_task(**kw)


def _publisher(tmp_path, login="kugetsu-bot"):
    from bot.gitea import GiteaClient
    from bot.publisher import Publisher
    from bot.store import open_store

    store = open_store(tmp_path / "db")
    store.set_meta("bot_login", login)
    client = GiteaClient("https://git.example", "tok-ABCDEF123", retries=0)
    return Publisher(CONFIG, store, client), store


def test_a_lost_tracking_comment_is_found_only_if_kugetsu_wrote_it(tmp_path):
    import responses

    publisher, store = _publisher(tmp_path)
    api = "https://git.example/api/v1/repos/acme/widget/issues"
    tid = enqueue(store, **QUEUED)
    mark = marker(tid)
    comments = [
        {"id": 100, "user": {"login": "mallory"}, "body": f"{mark}\nlooks official"},
        {"id": 101, "user": {"login": "kugetsu-bot"}, "body": f"quoting:\n{mark}"},
        {"id": 102, "user": {"login": "kugetsu-bot"}, "body": f"{mark}\n**kugetsu**"},
    ]
    # a create that reached Gitea before a crash: marked as tried, its id never recorded
    store.comment_attempt(tid)
    with responses.RequestsMock() as rsps:
        rsps.get(f"{api}/7/comments", json=comments)
        edit = rsps.patch(f"{api}/comments/102", json=comments[2])
        assert publisher.sync_task(store.require(tid))
    assert edit.call_count == 1 and store.require(tid).comment_id == 102

    # only comments that carry the marker without being kugetsu's own tracking comment:
    # none of them is edited, a new one is written
    other = enqueue(store, **{**QUEUED, "issue": 8})
    mark = marker(other)
    store.comment_attempt(other)
    with responses.RequestsMock() as rsps:
        rsps.get(
            f"{api}/8/comments",
            json=[{**c, "body": c["body"].replace(marker(tid), mark)} for c in comments[:2]],
        )
        create = rsps.post(f"{api}/8/comments", status=201, json={"id": 103, "body": mark})
        assert publisher.sync_task(store.require(other))
    assert create.call_count == 1 and store.require(other).comment_id == 103
    store.close()


def test_the_open_pull_request_is_found_not_an_older_closed_one(tmp_path):
    import responses
    from responses import matchers

    publisher, store = _publisher(tmp_path)
    api = "https://git.example/api/v1/repos/acme/widget"
    branch = "kugetsu/issue-7"
    closed = {"number": 5, "state": "closed", "head": {"ref": branch}, "base": {"ref": "main"}}
    opened = {"number": 11, "state": "open", "head": {"ref": branch}, "base": {"ref": "main"}}
    other = {"number": 12, "state": "open", "head": {"ref": "feature"}, "base": {"ref": "main"}}
    with responses.RequestsMock() as rsps:
        rsps.get(f"{api}/pulls/main/{branch}", json=closed)
        rsps.get(
            f"{api}/pulls",
            json=[other, opened],
            match=[
                matchers.query_param_matcher(
                    {"state": "open", "base_branch": "main", "page": "1", "limit": "50"}
                )
            ],
        )
        edit = rsps.patch(f"{api}/pulls/11", status=201, json=opened)
        number, created = publisher.publish_pr(
            task(), branch=branch, base="main", title="t", summary="s", files_changed=1, usage={}
        )
    assert (number, created) == (11, False) and edit.call_count == 1
    store.close()


def _lost(rsps, url):
    import requests

    rsps.post(url, body=requests.ConnectionError("Remote end closed connection without response"))


def _gateway_timeout(rsps, url):
    rsps.post(url, status=504, body="<html>504 Gateway Time-out</html>")


def _conflict(rsps, url):
    rsps.post(url, status=409, json={"message": "pull request already exists for these targets"})


def _unprocessable(rsps, url):
    rsps.post(url, status=422, json={"message": "no changes between the head and the base"})


def _found(mine):
    def lookup(rsps, url):
        # this task's create, applied: the body it sent; else another task's PR
        body = (
            pr_body(task(), CONFIG, summary="s", files_changed=1, usage={})
            if mine
            else "Closes #7\n<!-- kugetsu:task=3 -->"
        )
        rsps.get(
            url,
            json={
                "number": 11,
                "state": "open",
                "body": body,
                "head": {"ref": "kugetsu/issue-7"},
                "base": {"ref": "main"},
            },
        )

    return lookup


def _none(rsps, url):
    rsps.get(url, status=404, json={"message": "not found"})


def _lookup_fails(rsps, url):
    rsps.get(url, status=503, json={"message": "try later"})


@pytest.mark.parametrize(
    "create, lookup, expect",
    [
        # Gitea applied the create and the answer was lost: the PR is this task's own
        (_gateway_timeout, _found(mine=True), (11, True, "no edit")),
        (_lost, _found(mine=True), (11, True, "no edit")),
        # another open PR for the branch appeared (409): it gets this task's body
        (_conflict, _found(mine=False), (11, False, "edit")),
        # nothing there: the create's own error stands, also when the lookup fails too
        (_unprocessable, _none, Unprocessable),
        (_gateway_timeout, _lookup_fails, ServerError),
        (_lost, _lookup_fails, Unreachable),
    ],
)
def test_after_a_failed_create_the_pull_request_is_looked_up_before_deciding(
    tmp_path, create, lookup, expect
):
    import responses

    publisher, store = _publisher(tmp_path)
    api = "https://git.example/api/v1/repos/acme/widget"
    by_head = f"{api}/pulls/main/kugetsu/issue-7"
    with responses.RequestsMock() as rsps:
        _none(rsps, by_head)  # before the create: none yet
        create(rsps, f"{api}/pulls")
        lookup(rsps, by_head)  # after it
        edit = rsps.patch(f"{api}/pulls/11", status=201, json={"number": 11})
        call = dict(
            branch="kugetsu/issue-7", base="main", title="t", summary="s", files_changed=1, usage={}
        )
        if isinstance(expect, type):
            with pytest.raises(expect):
                publisher.publish_pr(task(), **call)
        else:
            assert publisher.publish_pr(task(), **call)[:2] == expect[:2]
            assert edit.call_count == (1 if expect[2] == "edit" else 0)
        rsps.assert_all_requests_are_fired = False
    store.close()
