"""Real agent CLIs run through kugetsu's presets against the fake LLM, offline.

Each test installs its pinned CLI from npm on first use (cached; see tests/agentcli.py) and skips
only when npm or its registry is unavailable. The CLI runs exactly as the service would start it:
resolve + prepare_home + build_env + argv_for, stdin from /dev/null, cwd in a temporary git repo.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bot import agents
from bot.config import AgentConfig, AgentsConfig
from tests import agentcli
from tests.fakellm import FakeLLM, conversation_text, http_error, text

pytestmark = pytest.mark.realagent

GITEA_TOKEN = "gitea-token-0123456789abcdef"
SERVICE_SECRET = "service-only-secret-9f8e7d"
PROMPT = "Please create hello.txt with a friendly greeting (issue #7)."
FOLLOW_UP = "Follow-up from the issue: now explain what you changed."
RUN_TIMEOUT = 240  # a guard against a hung CLI, not a speed assertion


def installed(name: str) -> Path:
    try:
        return agentcli.ensure(name)
    except agentcli.CLIUnavailable as exc:
        pytest.skip(exc.reason)


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    repo = tmp_path / "worktree"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "README.md").write_text("# demo\n")
    subprocess.run([*git, "add", "README.md"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    return repo


def service_environ(binary: Path, **extra: str) -> dict[str, str]:
    """The service's own environment: the CLI on PATH, plus values that must not reach the agent."""
    return {
        "PATH": f"{binary.parent}{os.pathsep}{os.environ.get('PATH', agents.DEFAULT_PATH)}",
        "HOME": os.environ.get("HOME", "/nonexistent"),
        "KUGETSU_GITEA_TOKEN": GITEA_TOKEN,
        "SERVICE_SECRET": SERVICE_SECRET,
        **extra,
    }


def run_agent(
    spec: agents.AgentSpec,
    environ: dict[str, str],
    worktree: Path,
    home: Path,
    prompt: str,
    session_id: str | None = None,
) -> tuple[subprocess.CompletedProcess, agents.AgentReport]:
    home_env = agents.prepare_home(spec, home)
    env = agents.build_env(
        spec,
        home_env=home_env,
        environ=environ,
        secrets=[GITEA_TOKEN],
        task_vars={"KUGETSU_TASK_ID": "1", "KUGETSU_ISSUE": "7"},
    )
    assert GITEA_TOKEN not in json.dumps(env) and SERVICE_SECRET not in json.dumps(env)
    prompt_file = home.parent / "prompt.md"
    prompt_file.write_text(prompt)
    argv = agents.argv_for(
        spec,
        prompt=prompt,
        prompt_file=str(prompt_file),
        workdir=str(worktree),
        session_id=session_id,
    )
    proc = subprocess.run(
        argv,
        cwd=worktree,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    meter = agents.UsageMeter(spec)
    for line in proc.stdout.splitlines():
        meter.feed(line)
    report = agents.parse_output(spec, proc.stdout, proc.returncode)
    assert meter.usage == report.usage and meter.session_id == report.session_id
    return proc, report


def assert_nothing_leaked(llm: FakeLLM) -> None:
    dump = llm.dump()
    assert GITEA_TOKEN not in dump
    assert SERVICE_SECRET not in dump


def last_conversation(llm: FakeLLM) -> str:
    return conversation_text(llm.agent_requests()[-1])


def check_start_and_resume(spec, environ, worktree, home, llm: FakeLLM) -> None:
    proc, report = run_agent(spec, environ, worktree, home, PROMPT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (worktree / "hello.txt").read_text() == "hello from the fake model\n"
    assert not report.failed, report.failure
    assert report.summary == "Done: hello.txt now says hello."
    assert report.session_id
    assert report.usage.total_tokens > 0
    assert PROMPT in last_conversation(llm)
    first_requests = len(llm.requests)

    llm.script = [text("Resumed: the earlier hello.txt stays as it is.")]
    proc, resumed = run_agent(
        spec, environ, worktree, home, FOLLOW_UP, session_id=report.session_id
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not resumed.failed, resumed.failure
    assert resumed.session_id == report.session_id
    assert resumed.summary == "Resumed: the earlier hello.txt stays as it is."
    assert len(llm.requests) > first_requests
    conversation = last_conversation(llm)
    assert PROMPT in conversation  # the earlier conversation was replayed to the model
    assert "I will create hello.txt." in conversation
    assert "Done: hello.txt now says hello." in conversation
    assert conversation.index(PROMPT) < conversation.index(FOLLOW_UP)
    assert_nothing_leaked(llm)


def opencode_spec(url: str) -> agents.AgentSpec:
    """The opencode preset with a config (through the spec's env) naming the fake provider."""
    config = json.dumps(
        {
            "autoupdate": False,
            "share": "disabled",
            "model": "fake/fake-model",
            "small_model": "fake/fake-model",
            "enabled_providers": ["fake"],
            "provider": {
                "fake": {
                    "npm": "@ai-sdk/openai-compatible",
                    "name": "Fake LLM",
                    "options": {"baseURL": url, "apiKey": "sk-fake"},
                    "models": {
                        "fake-model": {
                            "name": "Fake",
                            "tool_call": True,
                            "limit": {"context": 128000, "output": 4096},
                        }
                    },
                }
            },
        }
    )
    return agents.resolve(
        AgentsConfig(
            tables={
                "opencode": AgentConfig(name="opencode", env={"OPENCODE_CONFIG_CONTENT": config})
            }
        ),
        "opencode",
    )


def test_opencode_writes_file_and_resumes(worktree, tmp_path):
    binary = installed("opencode")
    with FakeLLM() as llm:
        spec = opencode_spec(llm.url)
        check_start_and_resume(spec, service_environ(binary), worktree, tmp_path / "home", llm)
        assert any(r.get("tools") for r in llm.requests)
        assert not [
            p for p in worktree.iterdir() if p.name not in (".git", "README.md", "hello.txt")
        ]


def test_codex_writes_file_and_resumes(worktree, tmp_path):
    binary = installed("codex")
    with FakeLLM() as llm:
        config = tmp_path / "codex-config.toml"
        config.write_text(f"""model = "fake-model"
model_provider = "fake"

[model_providers.fake]
name = "Fake"
base_url = "{llm.url}"
env_key = "FAKE_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
""")
        spec = agents.resolve(
            AgentsConfig(
                tables={
                    "codex": AgentConfig(
                        name="codex",
                        env={"FAKE_API_KEY": "sk-fake"},
                        home_files={".codex/config.toml": str(config)},
                    )
                }
            ),
            "codex",
        )
        check_start_and_resume(spec, service_environ(binary), worktree, tmp_path / "home", llm)
        assert (tmp_path / "home" / ".codex" / "config.toml").read_text() == config.read_text()
        posts = [path for method, path, _ in llm.calls if method == "POST"]
        assert posts and all(path.startswith("/v1/responses") for path in posts)


def test_claude_writes_file_and_resumes(worktree, tmp_path):
    binary = installed("claude")
    with FakeLLM() as llm:
        spec = agents.resolve(
            AgentsConfig(
                tables={
                    "claude": AgentConfig(
                        name="claude",
                        env={
                            "ANTHROPIC_BASE_URL": llm.base,
                            "ANTHROPIC_MODEL": "fake-model",
                            "CLAUDE_CODE_MAX_RETRIES": "0",
                        },
                    )
                }
            ),
            "claude",
        )
        # the API key reaches claude only through the preset's pass_env
        environ = service_environ(binary, ANTHROPIC_API_KEY="sk-ant-fake-key")
        check_start_and_resume(spec, environ, worktree, tmp_path / "home", llm)


def test_opencode_api_failure_is_reported(worktree, tmp_path):
    binary = installed("opencode")
    with FakeLLM([http_error(429, {"retry-after-ms": "10"})]) as llm:
        spec = opencode_spec(llm.url)
        proc, report = run_agent(spec, service_environ(binary), worktree, tmp_path / "home", PROMPT)
    assert proc.returncode != 0
    assert report.failed and report.rate_limited and "429" in report.failure
    assert not (worktree / "hello.txt").exists()
