"""A repository's own settings: `.kugetsu.toml` on its default branch, within the server's."""

from __future__ import annotations

import json
import sys

import pytest

from bot.config import (
    REPO_SETTINGS_MAX_BYTES,
    REPO_SETTINGS_PATHS,
    AgentConfig,
    ConfigError,
    RepoSettings,
    repo_settings,
)
from bot.core.tasks import Kind, Outcome, State
from bot.workspace import Workspace
from tests import test_worker
from tests.conftest import FAKE_AGENT, REPO, TOKEN, enqueue, fake_agent

make = test_worker.make  # the fixture: a worker against the fake Gitea, closed after the test

KNOWN = frozenset({"fake", "other", "capped"})
BUDGETS = {"fake": (None, None), "other": (None, None), "capped": (5000, 2.0)}


def read(text: str | bytes, default: str = "fake") -> RepoSettings:
    return repo_settings(
        text.encode() if isinstance(text, str) else text,
        default_agent=default,
        known_agents=KNOWN,
        budget_of=BUDGETS.__getitem__,
    )


def test_a_file_may_set_the_agent_instructions_budgets_and_branch():
    settings = read(
        """
        [agents]
        default = "capped"
        max_tokens = 4000
        max_cost_usd = 1.5
        [prompt]
        instructions = '''
        Run `make check` before you finish.
        '''
        [git]
        branch_template = "ai/{repo}-{number}"
        """
    )
    assert settings == RepoSettings(
        agent="capped",
        instructions="Run `make check` before you finish.",
        max_tokens=4000,
        max_cost_usd=1.5,
        branch_template="ai/{repo}-{number}",
    )
    assert read("") == RepoSettings()
    # where the server sets no budget for the agent, any positive budget is within it
    assert read("[agents]\nmax_tokens = 10_000_000").max_tokens == 10_000_000


@pytest.mark.parametrize(
    "text, problem",
    [
        (b"\xff\xfe[agents]", "it is not UTF-8 text"),
        ("[agents\ndefault = 1", "it is not valid TOML: "),
        ("a = " + "[" * 5000 + "]" * 5000, "it is not valid TOML: "),
        ("x" * (REPO_SETTINGS_MAX_BYTES + 1), f"larger than {REPO_SETTINGS_MAX_BYTES} bytes"),
        ("[server]\nport = 1", "unknown section or key 'server'"),
        ("token = 'abc'", "unknown section or key 'token'"),
        ("[agents]\ncommand = ['sh']", r"[agents] has an unknown key: command"),
        ("[agents.evil]\ncommand = ['sh']", r"[agents] has an unknown key: evil"),
        ("agents = 3", "[agents] must be a table"),
        ("[agents]\ndefault = 'rm -rf'", "agents.default 'rm -rf' is not one of this server's"),
        ("[agents]\ndefault = 7", "agents.default must be a string, got int"),
        ("[agents]\nmax_tokens = 0", "agents.max_tokens must be at least 1, got 0"),
        ("[agents]\nmax_tokens = '9'", "agents.max_tokens must be a whole number, got '9'"),
        ("[agents]\nmax_cost_usd = nan", "agents.max_cost_usd must be a finite number"),
        ("[agents]\nmax_tokens = 1_000_000_000_001", "max_tokens must be at most 1000000000000"),
        ("[agents]\nmax_cost_usd = 1e7", "agents.max_cost_usd must be at most 1000000"),
        (
            "[agents]\ndefault = 'capped'\nmax_tokens = 5001",
            "agents.max_tokens must be at most 5000 (the server's budget for capped), got 5001",
        ),
        (
            "[agents]\nmax_tokens = 6000",
            "agents.max_tokens must be at most 5000 (the server's budget for capped)",
        ),
        (
            "[agents]\ndefault = 'capped'\nmax_cost_usd = 2.5",
            "agents.max_cost_usd must be at most 2 (the server's budget for capped), got 2.5",
        ),
        ("[prompt]\ninstructions = '" + "x" * 4001 + "'", "longer than 4000 characters"),
        ("[prompt]\nsystem = 'x'", r"[prompt] has an unknown key: system"),
        ("[git]\nbranch_template = 'kugetsu/fixed'", "git.branch_template must use {number}"),
        ("[git]\nbranch_template = 'main'", "git.branch_template must use {number}"),
        ("[git]\nbranch_template = '{secret}-{number}'", "may use only {number}, {owner} and"),
        ("[git]\nbranch_template = '-x{number}'", "gives an invalid branch name: '-x1'"),
        ("[git]\nauthor_email = 'x@y'", r"[git] has an unknown key: author_email"),
    ],
)
def test_a_bad_file_is_refused_with_what_is_wrong_in_one_line(text, problem):
    default = "capped" if "6000" in str(text) else "fake"
    with pytest.raises(ConfigError) as caught:
        read(text, default=default)
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- read from the mirror with git


@pytest.fixture
def workspace(tmp_path, gitea):
    return Workspace(
        mirrors_dir=tmp_path / "mirrors",
        worktrees_dir=tmp_path / "worktrees",
        remote_url=lambda repo: f"{gitea.url}/{repo}.git",
        token=TOKEN,
        secrets=(TOKEN,),
    )


def test_the_file_is_read_at_the_default_branchs_commit_from_the_mirror(workspace, gitea):
    assert (
        workspace.read_file(REPO, workspace.fetch(REPO).default_sha, REPO_SETTINGS_PATHS, 99)
        is None
    )
    gitea.commit_files(REPO, {".gitea/.kugetsu.toml": "[prompt]\ninstructions = 'b'\n"})
    fetched = workspace.fetch(REPO)
    found = workspace.read_file(REPO, fetched.default_sha, REPO_SETTINGS_PATHS, 99)
    assert (found.path, found.data, found.problem) == (
        ".gitea/.kugetsu.toml",
        b"[prompt]\ninstructions = 'b'\n",
        None,
    )
    # the one at the top wins; another branch's (a pull request's) is never read
    gitea.commit_files(REPO, {".kugetsu.toml": "[prompt]\ninstructions = 'a'\n"})
    gitea.commit_files(REPO, {".kugetsu.toml": "[agents]\ndefault = 'other'\n"}, branch="pr")
    fetched = workspace.fetch(REPO)
    found = workspace.read_file(REPO, fetched.default_sha, REPO_SETTINGS_PATHS, 99)
    assert (found.path, found.data) == (".kugetsu.toml", b"[prompt]\ninstructions = 'a'\n")
    assert found.blob == gitea.git(REPO, "rev-parse", "main:.kugetsu.toml").strip()


def test_a_link_a_folder_or_a_large_file_is_not_read(workspace, gitea):
    def found(repo=REPO):
        return workspace.read_file(repo, workspace.fetch(repo).default_sha, REPO_SETTINGS_PATHS, 99)

    gitea.commit_files(REPO, {".kugetsu.toml": "/etc/passwd"}, modes={".kugetsu.toml": "120000"})
    assert (found().data, found().problem) == (b"", "it is not a regular file")
    gitea.commit_files(REPO, {".kugetsu.toml": "# " + "x" * 200})
    assert (found().data, found().problem) == (b"", "it is larger than 99 bytes")
    gitea.create_repo("acme/folder", files={".kugetsu.toml/x": "[agents]\n"})
    assert found("acme/folder").problem == "it is not a regular file"


# ---------------------------------------------------------------- what the worker does with it


def settings_file(gitea, text: str) -> str:
    return gitea.commit_files(REPO, {".kugetsu.toml": text}, message="kugetsu settings")


def queue(h, issue: int, **kw) -> int:
    return enqueue(
        h.store,
        repo=REPO,
        issue=issue,
        kind=kw.pop("kind", Kind.START),
        prompt=kw.pop("prompt", ""),
        agent=kw.pop("agent", "fake"),
        requested_by="alice",
        max_attempts=h.config.queue.max_attempts,
        permission_hint="write",
        **kw,
    )


@pytest.mark.both_modes
def test_the_repositorys_agent_instructions_and_branch_are_used(make, tmp_path):
    seen = tmp_path / "other.json"
    h = make(agents={"fake": fake_agent(), "other": fake_agent(FAKE_ENVFILE=str(seen))})
    settings_file(
        h.gitea,
        "[agents]\ndefault = 'other'\n[prompt]\ninstructions = 'Keep lines short.'\n"
        "[git]\nbranch_template = 'ai/{repo}-{number}'\n",
    )
    n = h.issue()
    tid = queue(h, n)
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.outcome, task.agent, task.branch) == (Outcome.SUCCEEDED, "other", f"ai/widget-{n}")
    prompt = json.loads(seen.read_text())["argv"][-1]
    assert "Instructions from this repository (its .kugetsu.toml):\nKeep lines short." in prompt
    [pr] = h.gitea.pulls_of(REPO).values()
    assert pr["head"]["ref"] == f"ai/widget-{n}"
    assert "`other`" in h.tracking_comments(n)[0]["body"]
    # a request that names its agent keeps it
    seen.unlink()
    asked = queue(h, h.issue(), agent_requested=True)
    h.settle(asked)
    assert (h.store.get(asked).agent, seen.exists()) == ("fake", False)


def opencode_shaped(steps: int, **table) -> AgentConfig:
    """An agent that reports 5,000 tokens a step, as opencode does, for `steps` steps."""
    env = {"FAKE_MODE": "opencode", "FAKE_STEPS": str(steps), "FAKE_SECONDS": "0.05"}
    command = (sys.executable, str(FAKE_AGENT), "{prompt}")
    return AgentConfig(name="oc", preset="opencode", command=command, env=env, **table)


@pytest.mark.both_modes
def test_the_repositorys_budget_stops_the_agent(make):
    h = make(default="oc", agents={"oc": opencode_shaped(20)})
    settings_file(h.gitea, "[agents]\nmax_tokens = 12000\n")  # the server sets none
    tid = queue(h, h.issue(), agent="oc")
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.state, task.outcome, task.attempts) == (State.FAILED, Outcome.AGENT_FAILED, 1)
    assert "budget exceeded" in task.error
    assert task.usage["input_tokens"] + task.usage["output_tokens"] < 20 * 5000


@pytest.mark.both_modes
def test_the_servers_budget_for_the_agent_that_runs_still_holds(make):
    # the repository's budget is checked against its own default agent's (no limit), and
    # a request for another agent runs within that agent's server budget all the same
    h = make(agents={"fake": fake_agent(), "oc": opencode_shaped(8, max_tokens=12000)})
    settings_file(h.gitea, "[agents]\nmax_tokens = 50000\n")
    tid = queue(h, h.issue(), agent="oc", agent_requested=True)
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.outcome, task.agent) == (Outcome.AGENT_FAILED, "oc")
    assert "budget exceeded" in task.error


@pytest.mark.both_modes
def test_a_pull_request_cannot_change_its_own_settings(make, tmp_path):
    seen = tmp_path / "other.json"
    h = make(agents={"fake": fake_agent(), "other": fake_agent(FAKE_ENVFILE=str(seen))})
    n = h.issue()
    # the task's branch (its pull request's head) asks for another agent and a budget
    h.gitea.commit_files(
        REPO,
        {".kugetsu.toml": "[agents]\ndefault = 'other'\n"},
        branch=f"kugetsu/issue-{n}",
    )
    tid = queue(h, n)
    h.settle(tid)
    task = h.store.get(tid)
    assert (task.outcome, task.agent, seen.exists()) == (Outcome.SUCCEEDED, "fake", False)
    assert h.gitea.file_at(REPO, f"kugetsu/issue-{n}", ".kugetsu.toml") is not None


@pytest.mark.both_modes
def test_a_bad_file_is_answered_once_per_version_and_the_servers_settings_are_used(make):
    h = make()
    settings_file(h.gitea, "[agents]\ndefault = '@everyone'\n")
    first, second = h.issue(), h.issue()
    tasks = [queue(h, first), queue(h, second)]
    h.settle(*tasks)
    assert [h.store.get(t).outcome for t in tasks] == [Outcome.SUCCEEDED] * 2
    assert [h.store.get(t).branch for t in tasks] == [f"kugetsu/issue-{n}" for n in (first, second)]

    def refusals():
        return [
            c
            for c in h.gitea.comments.values()
            if "kugetsu cannot use `.kugetsu.toml`" in c["body"]
        ]

    [refusal] = refusals()
    body = refusal["body"]
    assert "agents.default '@everyone' is not one of this server's agents" in body
    # the agents it may name are those installed here (the fake), not every preset
    assert "agents (fake)" in body
    # what the file says stays in a code block, where it mentions no one
    assert body.index("```text") < body.index("@everyone") < body.rindex("```")
    # a new version of the file that is still bad: one more answer
    settings_file(h.gitea, "[agents]\nmax_tokens = 'lots'\n")
    third = queue(h, h.issue())
    h.settle(third)
    assert len(refusals()) == 2
    assert "agents.max_tokens must be a whole number, got 'lots'" in refusals()[-1]["body"]
