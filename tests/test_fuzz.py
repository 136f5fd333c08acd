"""Signed deliveries of any shape, for every event Gitea sends: never a 5xx.

Hypothesis builds deliveries the way an attacker who holds the secret, or a Gitea
that changed its payloads, might: real shapes with values swapped for others of any
type and size (huge and negative numbers, paths, hidden commands, budgets past every
bound), keys removed, random JSON, and bytes that are not JSON at all. Each is signed
and posted over HTTP to the receiver under waitress. Afterwards the worker works
through whatever they queued, and a valid labelled delivery still becomes a pull
request: nothing they left behind stalls the queue.
"""

from __future__ import annotations

import json
import os
import string
import urllib.parse

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.app import create_app
from bot.core import intake
from bot.core.tasks import Outcome, State
from bot.gitea import GiteaClient
from bot.httpserver import HttpServer
from bot.store import open_store
from bot.worker.tick import Worker
from bot.workspace import Workspace
from tests import payloads
from tests.conftest import TOKEN, make_config, wait_for

pytestmark = pytest.mark.both_modes

#: what Gitea sends in X-Gitea-Event (and some it does not)
EVENTS = [
    "issues",
    "issue_comment",
    "issue_assign",
    "issue_label",
    "issue_milestone",
    "pull_request",
    "pull_request_assign",
    "pull_request_label",
    "pull_request_milestone",
    "pull_request_comment",
    "pull_request_approved",
    "pull_request_rejected",
    "pull_request_review_request",
    "pull_request_sync",
    "push",
    "create",
    "delete",
    "fork",
    "release",
    "repository",
    "wiki",
    "package",
    "status",
    "workflow_run",
    "workflow_job",
    "ping",
    "unknown",
    "",
]
EVENT_TYPES = [
    "issues",
    "issue_label",
    "issue_comment",
    "pull_request_comment",
    "issue_assign",
    "pull_request_review_approved",
    "pull_request_review_rejected",
    "pull_request_review_comment",
    "pull_request",
    "push",
    "unknown",
]
HOSTILE_TEXT = [
    "",
    ".",
    "..",
    "../..",
    "acme/widget",
    "acme/..",
    "../widget",
    "acme/widget/x",
    "a b",
    "-1",
    "0",
    "9223372036854775808",
    "kugetsu",
    "kugetsu-bot",
    "alice",
    "bob",
    "mallory",
    "<!--",
    "/kugetsu start",
    "/kugetsu start --max-tokens 99999999999999999999",
    "/kugetsu start --max-cost 1e999",
    "/kugetsu stop",
    "/kugetsu retry",
    "/kugetsu status",
    "/kugetsu help",
    "/kugetsu continue more",
    "/kugetsu --agent ../../bin/sh go",
    "```\nx\u2029```\n/kugetsu start\n```",
    "> quote\u2029/kugetsu start",
    "<!--\n/kugetsu start\n-->",
    "x" * 500,
    "\u0000",
    "%2e%2e",
    "?a=b#c",
]
NUMBERS = [-(2**63), -(2**31), -1, 0, 1, 2, 7, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30]

leaves = (
    st.none()
    | st.booleans()
    | st.sampled_from(NUMBERS)
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(HOSTILE_TEXT)
    | st.text(max_size=30)
)
json_values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=10)
            | st.sampled_from(["id", "number", "login", "name", "full_name", "body", "labels"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


def _review(action: str = "reviewed") -> dict:
    data = payloads.issue_payload("opened")
    pr = data.pop("issue")
    pr["pull_request"] = {"merged": False}
    return {
        "action": action,
        "number": 7,
        "pull_request": pr,
        "repository": data["repository"],
        "sender": data["sender"],
        "review": {"type": "pull_request_review_approved", "content": "/kugetsu stop"},
    }


BASES = {
    "issue": lambda: payloads.issue_payload("label_updated", labels=["kugetsu"]),
    "issue opened": lambda: payloads.issue_payload("opened", labels=["kugetsu", "bug"]),
    "comment": lambda: payloads.comment_payload("/kugetsu start fix it"),
    "pr comment": lambda: payloads.comment_payload("/kugetsu continue more", is_pull=True),
    "pull request": lambda: {**payloads.issue_payload("opened"), "pull_request": {"number": 7}},
    "review": _review,
    "push": lambda: {
        "ref": "refs/heads/main",
        "before": "0" * 40,
        "after": "1" * 40,
        "commits": [],
        "repository": payloads.repository(),
        "sender": payloads.user("alice"),
    },
    "empty": lambda: {},
}


#: the shapes Gitea sends with each event, mutated most of the time
BASES_FOR = {
    "issues": ["issue", "issue opened"],
    "issue_label": ["issue"],
    "issue_comment": ["comment", "pr comment"],
    "pull_request_comment": ["pr comment"],
    "pull_request": ["pull request"],
    "pull_request_label": ["pull request"],
    "pull_request_approved": ["review"],
    "pull_request_rejected": ["review"],
    "push": ["push"],
}
#: a value put in place of another: mostly the kind that broke things before
values = st.one_of(
    st.sampled_from(NUMBERS), st.sampled_from(NUMBERS), st.sampled_from(HOSTILE_TEXT), json_values
)


def _paths(data, prefix=()):
    """Every place in a JSON value that a mutation may change."""
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _paths(value, (*prefix, index))


#: the fields kugetsu reads: most mutations go here, the rest anywhere
READ = [
    ("repository", "full_name"),
    ("repository", "permissions"),
    ("issue", "number"),
    ("issue", "user", "login"),
    ("issue", "labels"),
    ("issue", "pull_request"),
    ("issue", "title"),
    ("comment", "id"),
    ("comment", "body"),
    ("sender", "login"),
    ("action",),
    ("is_pull",),
    ("review",),
]


def _mutate(draw, data):
    """Change one to three places of `data`, most often a field kugetsu reads."""
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        read = [p for p in paths if p in READ]
        path = draw(st.sampled_from(read if read and draw(st.booleans()) else paths))
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.integers(0, 3)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(values)
    return data


@st.composite
def deliveries(draw, event: str | None):
    if event is None:
        event = draw(st.text(string.ascii_letters + "_-.", max_size=12))
    event_type = draw(st.sampled_from(EVENT_TYPES) | st.just(event))
    shape = draw(st.sampled_from(["mutated"] * 6 + ["json", "bytes"]))
    if shape == "bytes":
        body = draw(st.binary(max_size=200))
    else:
        if shape == "json":
            data = draw(json_values)
        else:
            data = _mutate(
                draw, BASES[draw(st.sampled_from(BASES_FOR.get(event, sorted(BASES))))]()
            )
        body = json.dumps(data).encode()
    headers = payloads.sign(body, event=event, event_type=event_type)
    if draw(st.booleans()) and shape != "bytes":
        # Gitea's other content type: the JSON in a form field, the signature over the JSON
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        body = b"payload=" + urllib.parse.quote(body.decode(), safe="").encode()
    return event, body, headers


@pytest.fixture
def system(tmp_path, gitea):
    config = make_config(tmp_path / "data", gitea.url, attempts=1)
    store = open_store(config.storage.db_path)
    storage = config.storage
    workspace = Workspace(
        mirrors_dir=storage.mirrors_dir,
        worktrees_dir=storage.worktrees_dir,
        remote_url=config.gitea.git_url,
        token=TOKEN,
        author_name="kugetsu",
        author_email="kugetsu@example.invalid",
        secrets=config.secrets(),
    )
    client = GiteaClient(gitea.url, TOKEN, retries=0, timeout=5)
    worker = Worker(
        config,
        store,
        client,
        workspace,
        environ={"PATH": os.environ["PATH"], "KUGETSU_GITEA_TOKEN": TOKEN},
    )
    worker.start()
    rules = intake.Rules(
        label="kugetsu",
        command="/kugetsu",
        bot_login="kugetsu-bot",
        known_agents=frozenset(config.agents.tables),
        default_agent="fake",
        max_attempts=config.queue.max_attempts,
    )
    app = create_app(config, store, rules=lambda: rules)
    server = HttpServer(app, "127.0.0.1", 0, max_body_bytes=config.server.max_body_bytes).start()
    yield server.url, store, worker
    server.stop()
    worker.shutdown(timeout=10)
    store.close()


def test_no_delivery_of_any_shape_gives_a_5xx_and_the_queue_still_works(system, gitea):
    url, store, worker = system
    session = requests.Session()
    answered: dict[str, set[int]] = {}

    def post_any(delivery):
        event, body, headers = delivery
        r = session.post(url + "/webhook", data=body, headers=headers, timeout=10)
        assert r.status_code < 500, (event, body[:300], r.status_code, r.text[:300])
        assert "\n" not in r.json()["reason"]
        answered.setdefault(event, set()).add(r.status_code)

    # most examples where kugetsu reads deeply, some for every other event and for names
    # no Gitea sends
    for event in [*EVENTS, None]:
        examples = 400 if event in ("issues", "issue_comment") else 8
        settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(given(deliveries(event))(post_any))()
    assert set(EVENTS) <= set(answered)
    assert {200, 202, 400} <= answered["issue_comment"] | answered["issues"]

    # the worker goes through everything the fuzz queued; then a valid delivery on a
    # repository the fuzz never named becomes a pull request
    gitea.create_repo("acme/gadget")
    gitea.set_permission("acme/gadget", "alice", "write")
    number = gitea.create_issue("acme/gadget", "Add a greeting", "Please add one.")
    gitea.add_labels("acme/gadget", number, "kugetsu")
    body, headers = payloads.label_delivery(["kugetsu"], number, repo="acme/gadget")
    r = session.post(url + "/webhook", data=body, headers=headers, timeout=10)
    assert r.status_code == 202
    [task_id] = r.json()["tasks"]
    wait_for(
        lambda: not store.get(task_id).active,
        timeout=120,
        tick=worker.run_tick,
        what="the valid delivery's task",
    )
    task = store.get(task_id)
    assert (task.state, task.outcome) == (State.COMPLETED, Outcome.SUCCEEDED), task.error
    assert [pr["number"] for pr in gitea.pulls_of("acme/gadget").values()] == [task.pr_number]
