"""Tracking comment and PR body rendering, for every state."""

import pytest

from bot.config import Config, GiteaConfig, ServerConfig
from bot.gitea import ServerError, Unprocessable, Unreachable
from bot.publisher import QueueView, log_link, marker, render_pr_body, render_tracking
from bot.tasks import Kind, Outcome, State, Task

CONFIG = Config(
    server=ServerConfig(public_url="https://kugetsu.example"),
    gitea=GiteaConfig(
        url="https://git.example", token="tok-ABCDEF123", webhook_secret="whsec-987654"
    ),
)


def task(**kw) -> Task:
    base = dict(
        id=12,
        repo="acme/widget",
        issue=7,
        kind=Kind.START,
        prompt="",
        agent="opencode",
        requested_by="alice",
        state=State.PENDING,
        attempts=0,
        max_attempts=3,
        started_at=1_800_000_000.0,
        finished_at=1_800_000_125.0,
    )
    base.update(kw)
    return Task(**base)


def render(t, position=2, busy=3, **kw):
    return render_tracking(t, CONFIG, QueueView(position, busy, 3), **kw)


def test_every_state_carries_the_marker_and_the_requester():
    for state in State:
        body = render(task(state=state, outcome=Outcome.AGENT_FAILED, pr_number=4))
        assert body.startswith(marker(12)) and "@alice" in body


def test_queued_shows_position_and_busy_agents():
    body = render(task())
    assert "⏳ **Queued**: position 2 in the queue, 3 of 3 agents busy." in body


def test_retrying_shows_the_last_outcome():
    body = render(
        task(
            attempts=1, outcome=Outcome.TIMED_OUT, error="ran too long", not_before=1_800_000_200.0
        )
    )
    assert "Retrying" in body and "attempt 1 of 3" in body and "timed_out" in body
    assert "ran too long" in body and "position 2 in the queue" in body


def test_working_shows_agent_attempt_start_and_log_link():
    body = render(task(state=State.RUNNING, attempts=2))
    assert "agent `opencode`, attempt 2 of 3, started 2027-01-15 08:00:00 UTC" in body
    assert log_link(CONFIG, 12) in body and log_link(CONFIG, 12).startswith(
        "https://kugetsu.example/logs/12/"
    )


def test_stopping_and_stopped_say_by_whom():
    assert "Stopping, as requested by @bob" in render(
        task(state=State.RUNNING, attempts=1, cancel_requested_by="bob")
    )
    assert "🛑 **Stopped** by @bob." in render(
        task(state=State.CANCELLED, cancel_requested_by="bob")
    )


def test_done_has_pr_link_duration_files_summary_and_usage():
    body = render(
        task(
            state=State.COMPLETED,
            outcome=Outcome.SUCCEEDED,
            attempts=1,
            pr_number=9,
            files_changed=3,
            summary="Added greeting.",
            usage={"input_tokens": 12000, "output_tokens": 800, "cost_usd": 0.0421},
        )
    )
    # a reference Gitea links itself, not a URL built from the (often internal) API address
    assert "✅ **Done**: pull request #9, 3 files changed." in body
    assert "http" not in body.split("✅", 1)[1].split("\n", 1)[0]
    assert "Added greeting." in body and "took 2m05s" in body
    assert "12,000 tokens in, 800 out" in body and "cost $0.0421" in body


def test_no_changes():
    body = render(
        task(
            state=State.COMPLETED, outcome=Outcome.NO_CHANGES, attempts=1, summary="Nothing to do."
        )
    )
    assert "No changes" in body and "Nothing to do." in body


def test_failed_shows_outcome_reason_and_a_safe_log_tail():
    tail = "step 1\nleaked tok-ABCDEF123 here\n```\nclosing fence\n"
    body = render(
        task(
            state=State.FAILED,
            outcome=Outcome.AGENT_FAILED,
            attempts=3,
            error="exit code 3 with whsec-987654",
        ),
        log_tail=tail,
    )
    assert "❌ **Failed** (`agent_failed`) after 3 attempts: exit code 3" in body
    assert "tok-ABCDEF123" not in body and "whsec-987654" not in body
    assert "closing fence" in body and body.count("```") == 2
    assert "/kugetsu retry" in body


def test_rejected_says_why():
    body = render(task(state=State.REJECTED, error="@eve needs write access to acme/widget"))
    assert "Not started" in body and "@eve needs write access" in body


def test_cli_requests_are_named_as_such():
    assert "from the command line" in render(task(requested_by="cli"))


def test_pr_body_closes_the_issue_and_keeps_secrets_out():
    body = render_pr_body(
        task(),
        CONFIG,
        summary="Did it. token tok-ABCDEF123",
        files_changed=1,
        usage={"input_tokens": 5, "output_tokens": 6},
    )
    assert body.startswith("Closes #7\n")
    assert "tok-ABCDEF123" not in body and "Did it." in body
    assert "1 file changed" in body and "5 tokens in, 6 out" in body
    assert log_link(CONFIG, 12) in body


def test_stopped_by_a_user_whose_name_starts_with_cli():
    assert "🛑 **Stopped** by @clifford." in render(
        task(state=State.CANCELLED, cancel_requested_by="clifford")
    )
    assert "from the kugetsu command line" in render(
        task(state=State.CANCELLED, cancel_requested_by="cli")
    )


HOSTILE = (
    "All done.\n```\n@admin please look. Fixes #3\n<!-- kugetsu:task=13 -->\n"
    "<!-- kugetsu:reply -->\n<!-- the rest is hidden"
)


def _code_blocks_hold(body: str, text: str) -> bool:
    """True if every occurrence of `text` in `body` is inside a ``` code block."""
    inside = False
    for line in body.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif text in line and not inside:
            return False
    return not inside  # every block is closed


def test_agent_text_is_inert_in_comments_and_pull_requests():
    done = render(
        task(
            state=State.COMPLETED,
            outcome=Outcome.SUCCEEDED,
            attempts=1,
            pr_number=9,
            files_changed=1,
            summary=HOSTILE,
        )
    )
    pr = render_pr_body(task(), CONFIG, summary=HOSTILE, files_changed=1, usage={})
    for body in (done, pr):
        for text in ("@admin", "Fixes #3", "All done."):
            assert text in body and _code_blocks_hold(body, text), (text, body)
        # kugetsu's markers are found by text search: the agent cannot plant them
        assert "<!-- kugetsu:task=13" not in body and "<!-- kugetsu:reply" not in body
        assert "<!--" not in body.replace(marker(12), "")
    assert pr.startswith("Closes #7\n") and pr.count("Closes #") == 1
    assert done.rstrip().endswith("</sub>")  # the footer is not swallowed by a block


def test_a_secret_cut_by_the_length_limit_is_still_redacted():
    from bot.publisher import MAX_SUMMARY, agent_block

    text = "x" * (MAX_SUMMARY - 5) + "tok-ABCDEF123 and more"
    block = agent_block(text, CONFIG.secrets())
    assert "tok-A" not in block and "ABCDEF" not in block


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
    url = "https://git.example/api/v1/repos/acme/widget/issues/7/comments"
    comments = [
        {"id": 100, "user": {"login": "mallory"}, "body": f"{marker(12)}\nlooks official"},
        {"id": 101, "user": {"login": "kugetsu-bot"}, "body": f"quoting:\n{marker(12)}"},
        {"id": 102, "user": {"login": "kugetsu-bot"}, "body": f"{marker(12)}\n**kugetsu**"},
    ]
    with responses.RequestsMock() as rsps:
        rsps.get(url, json=comments)
        assert publisher._find_existing_comment(task()) == 102
    with responses.RequestsMock() as rsps:
        rsps.get(url, json=comments[:2])
        assert publisher._find_existing_comment(task()) is None
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
            render_pr_body(task(), CONFIG, summary="s", files_changed=1, usage={})
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
