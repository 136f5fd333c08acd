"""The whole service with a real agent CLI: delivery, real agent, push, PR, follow-up.

`kugetsu serve` runs as a process; the agent is the pinned real CLI (installed from
npm, or PyPI for aider, once and cached), talking to a scripted fake LLM on 127.0.0.1
that answers with tool calls that write files (aider, which has no tools: with a
`whole` edit block). Skipped only when the CLI cannot be installed here (its registry is
unreachable, or for aider, the interpreter is one it does not support).
"""

from __future__ import annotations

import json
import os

import pytest

from tests import agentcli, payloads
from tests.conftest import REPO, SECRET, SERVICE_UID, TOKEN, first_uid, wait_for
from tests.fakellm import FakeLLM, conversation_text, litellm_metadata, text, write_file
from tests.service import Service, free_port, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.realagent]

SANDBOXED = {"sandbox": {"mode": "user", "user": str(SERVICE_UID)}} if os.geteuid() == 0 else {}

SERVICE_ONLY_SECRET = "sk-service-only-4f1c9e2b7a"
TITLE = "Greet the visitors"
BODY = "The project needs a hello.txt with a friendly greeting."


def installed(name: str):
    try:
        return agentcli.ensure(name)
    except agentcli.CLIUnavailable as exc:
        pytest.skip(exc.reason)


def agent_tables(name: str, llm: FakeLLM, tmp_path) -> dict:
    if name == "aider":
        metadata = tmp_path / "aider-model-metadata.json"
        metadata.write_text(json.dumps(litellm_metadata()))
        return {
            "agents.aider": {
                "env": {
                    "AIDER_MODEL": "openai/fake-model",
                    "AIDER_EDIT_FORMAT": "whole",
                    "OPENAI_API_BASE": llm.url,
                    "OPENAI_API_KEY": "sk-fake",
                },
                "home_files": {".aider.model.metadata.json": str(metadata)},
            }
        }
    if name == "opencode":
        config = {
            "autoupdate": False,
            "share": "disabled",
            "model": "fake/fake-model",
            "small_model": "fake/fake-model",
            "enabled_providers": ["fake"],
            "provider": {
                "fake": {
                    "npm": "@ai-sdk/openai-compatible",
                    "name": "Fake LLM",
                    "options": {"baseURL": llm.url, "apiKey": "sk-fake"},
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
        return {"agents.opencode": {"env": {"OPENCODE_CONFIG_CONTENT": json.dumps(config)}}}
    if name == "claude":
        return {
            "agents.claude": {
                "env": {
                    "ANTHROPIC_BASE_URL": llm.base,
                    "ANTHROPIC_MODEL": "fake-model",
                    "CLAUDE_CODE_MAX_RETRIES": "0",
                }
            }
        }
    codex_config = tmp_path / "codex-config.toml"
    codex_config.write_text(
        'model = "fake-model"\nmodel_provider = "fake"\n\n[model_providers.fake]\n'
        f'name = "Fake"\nbase_url = "{llm.url}"\nenv_key = "FAKE_API_KEY"\n'
        'wire_api = "responses"\nrequest_max_retries = 0\nstream_max_retries = 0\n'
    )
    return {
        "agents.codex": {
            "env": {"FAKE_API_KEY": "sk-fake"},
            "home_files": {".codex/config.toml": str(codex_config)},
        }
    }


def script(agent: str, path: str, content: str, said: str) -> list:
    """The model writes `path` and says `said`: in two turns for the CLIs with tools, in one
    reply for aider, which asks the model once per message."""
    if agent == "aider":
        return [write_file(path, content, said)]
    return [write_file(path, content), text(said)]


def tracking(gitea, number):
    return [
        c
        for c in gitea.comments_on(REPO, number)
        if "<!-- kugetsu:task=" in c["body"] and "Pushed a follow-up" not in c["body"]
    ]


@pytest.mark.parametrize("agent", ["opencode", "codex", "claude", "aider"])
def test_real_agent_from_label_to_pull_request_and_resumed_follow_up(
    agent, tmp_path, shared_tmp, gitea
):
    binary = installed(agent)
    if SANDBOXED:  # kugetsu's service user and the slots work there
        tmp_path = shared_tmp
    with FakeLLM(
        script(
            agent, "hello.txt", "Hello, visitor!\n", "Created hello.txt with a friendly greeting."
        )
    ) as llm:
        port = free_port()
        config = write_config(
            tmp_path / "kugetsu.toml",
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": port,
                    "public_url": f"http://127.0.0.1:{port}",
                },
                "gitea": {"url": gitea.url, "token": TOKEN, "webhook_secret": SECRET},
                "storage": {"data_dir": str(tmp_path / "data")},
                "queue": {
                    "poll_interval_seconds": 30,
                    "retry_backoff_seconds": [0],
                    "max_attempts": 1,
                },
                "agents": {"default": agent, "timeout_minutes": 5, "kill_grace_seconds": 2},
                **agent_tables(agent, llm, tmp_path),
                # as root (as CI runs), the agent runs as a slot's uid: the CLI, its home and
                # its session resume work in the sandbox
                **SANDBOXED,
            },
        )
        path = f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
        svc = Service(
            config,
            port,
            tmp_path,
            env={
                "PATH": path,
                "OPENAI_API_KEY_UNUSED": SERVICE_ONLY_SECRET,
                # claude's key reaches it only through the preset's pass_env
                "ANTHROPIC_API_KEY": "sk-ant-fake-key",
                "KUGETSU_GITEA_TOKEN": TOKEN,
            },
        ).start()
        try:
            n = gitea.create_issue(REPO, TITLE, BODY, labels=["kugetsu"])
            assert svc.post(*payloads.label_delivery(["kugetsu"], n)).status_code == 202

            def done(count):
                comments = tracking(gitea, n)
                return len(comments) == count and "✅ **Done**" in comments[-1]["body"]

            wait_for(
                lambda: done(1),
                timeout=240,
                interval=0.5,
                what=f"{agent} to finish\n{svc.logs()[-3000:]}",
            )
            if SANDBOXED:  # the launcher started it as the first slot's uid
                started = [
                    line for line in svc.logs().splitlines() if "launcher: agent started" in line
                ]
                assert started and all(f"uid={first_uid()}" in line for line in started), started
            [pr] = gitea.pulls_of(REPO).values()
            branch = f"kugetsu/issue-{n}"
            assert gitea.file_at(REPO, branch, "hello.txt") == "Hello, visitor!\n"
            assert f"Closes #{n}" in pr["body"]
            [comment] = tracking(gitea, n)
            assert f"pull request #{pr['number']}" in comment["body"]
            assert "Created hello.txt with a friendly greeting." in comment["body"]
            first_prompt = conversation_text(llm.agent_requests()[0])
            assert TITLE in first_prompt and BODY in first_prompt
            sha1 = gitea.branch_sha(REPO, branch)
            first_requests = len(llm.requests)

            # follow-up on the pull request: the same session resumes (aider, which has no
            # sessions, is run again on the branch with the earlier run in its prompt)
            llm.script = script(
                agent, "test_hello.txt", "assert True\n", "Added a test for the greeting."
            )
            posted = gitea.add_comment(REPO, pr["number"], "/kugetsu continue add a test")
            assert (
                svc.post(
                    *payloads.comment_delivery(
                        "/kugetsu continue add a test",
                        pr["number"],
                        is_pull=True,
                        comment_id=posted["id"],
                    )
                ).status_code
                == 202
            )
            wait_for(
                lambda: done(2),
                timeout=240,
                interval=0.5,
                what=f"the {agent} follow-up to finish\n{svc.logs()[-3000:]}",
            )
            later = [r for r in llm.requests[first_requests:]]
            resumed = conversation_text(later[-1])
            assert "add a test" in resumed
            # the model received the earlier conversation: the first prompt and its answer
            assert TITLE in resumed and "Created hello.txt" in resumed
            assert list(gitea.pulls_of(REPO)) == [pr["number"]]
            sha2 = gitea.branch_sha(REPO, branch)
            assert gitea.git(REPO, "rev-parse", f"{sha2}~1").strip() == sha1
            assert gitea.file_at(REPO, branch, "test_hello.txt") == "assert True\n"

            # nothing secret reached the model
            everything = json.dumps(llm.requests)
            for secret in (TOKEN, SECRET, SERVICE_ONLY_SECRET):
                assert secret not in everything
        finally:
            svc.stop()
