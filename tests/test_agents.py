"""bot.agents: presets, command lines, homes and environments, and parsing recorded CLI output.

Fast: no npm, no real CLI. The outputs parsed here were recorded from the real CLIs by
tests/fixtures/agents/capture.py (versions and scenarios in that directory's README and manifest).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bot import agents
from bot.agents import AgentSpec, UnknownAgent, Usage
from bot.config import AgentConfig, AgentsConfig, load
from tests.conftest import logged
from tests.fakellm import FakeLLM, http_error, text, tool_call, write_file

FIXTURES = Path(__file__).parent / "fixtures" / "agents"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def spec(name: str, **tables: AgentConfig) -> AgentSpec:
    return agents.resolve(AgentsConfig(tables=tables), name)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def parse(name: str):
    meta = MANIFEST[name]
    return agents.parse_output(spec(meta["cli"]), fixture(name), meta["exit_code"])


# ============================================================================ resolve


@pytest.mark.parametrize("name", ["opencode", "claude", "codex", "aider"])
def test_resolve_preset_by_name(name):
    s = agents.resolve(AgentsConfig(max_tokens=5000, max_cost_usd=1.5), name)
    preset = agents.PRESETS[name]
    assert s.name == name and s.preset == name
    assert s.command == preset.command and s.resume_command == preset.resume_command
    assert s.pass_env == preset.pass_env
    assert dict(s.env) == {} and dict(s.home_files) == {}
    assert (s.max_tokens, s.max_cost_usd) == (5000, 1.5)
    assert s.sessions is preset.sessions


def test_preset_sessions_and_commands():
    assert agents.resolve(AgentsConfig(), "aider").sessions is False
    assert agents.resolve(AgentsConfig(), "aider").resume_command is None
    for name in ("opencode", "claude", "codex"):
        assert agents.resolve(AgentsConfig(), name).sessions is True
    assert agents.PRESETS["opencode"].command == ("opencode", "run", "--format", "json", "{prompt}")
    assert "ANTHROPIC_API_KEY" in agents.PRESETS["claude"].pass_env
    assert "OPENAI_API_KEY" in agents.PRESETS["codex"].pass_env
    assert agents.PRESETS["claude"].env["IS_SANDBOX"] == "1"
    assert agents.PRESETS["opencode"].env["OPENCODE_DISABLE_AUTOUPDATE"] == "1"
    assert agents.PRESETS["aider"].env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"


def test_table_overrides_single_fields_of_same_named_preset():
    table = AgentConfig(
        name="opencode",
        command=("opencode", "run", "-m", "x/y", "{prompt}"),
        env={"OPENCODE_CONFIG": "/etc/oc.json"},
        max_cost_usd=2.0,
        home_files={".config/opencode/opencode.json": "/src/oc.json"},
    )
    s = agents.resolve(
        AgentsConfig(max_tokens=1000, max_cost_usd=9.0, tables={"opencode": table}), "opencode"
    )
    assert s.preset == "opencode"
    assert s.command == ("opencode", "run", "-m", "x/y", "{prompt}")
    assert s.resume_command == agents.PRESETS["opencode"].resume_command  # not set: the preset's
    assert s.pass_env == agents.PRESETS["opencode"].pass_env
    assert dict(s.env) == {"OPENCODE_CONFIG": "/etc/oc.json"}
    assert (s.max_tokens, s.max_cost_usd) == (1000, 2.0)
    assert dict(s.home_files) == {".config/opencode/opencode.json": "/src/oc.json"}


def test_table_with_other_name_uses_its_preset():
    s = spec(
        "cheap",
        cheap=AgentConfig(name="cheap", preset="claude", pass_env=("MY_KEY",), max_tokens=10),
    )
    assert (s.name, s.preset) == ("cheap", "claude")
    assert s.command == agents.PRESETS["claude"].command
    assert s.pass_env == ("MY_KEY",)
    assert s.max_tokens == 10 and s.sessions


def test_custom_command():
    s = spec("mine", mine=AgentConfig(name="mine", command=("./agent.sh", "{prompt_file}")))
    assert s.preset is None and s.command == ("./agent.sh", "{prompt_file}")
    assert s.resume_command is None and not s.sessions and s.pass_env == ()
    with_resume = spec(
        "mine",
        mine=AgentConfig(
            name="mine",
            command=("a", "{prompt}"),
            resume_command=("a", "--id", "{session_id}", "{prompt}"),
        ),
    )
    assert with_resume.sessions
    no_placeholder = spec(
        "mine", mine=AgentConfig(name="mine", command=("a",), resume_command=("a", "-c"))
    )
    assert not no_placeholder.sessions


def test_unknown_agent_lists_what_exists():
    config = AgentsConfig(tables={"mine": AgentConfig(name="mine", command=("x",))})
    with pytest.raises(UnknownAgent) as err:
        agents.resolve(config, "nope")
    message = str(err.value)
    for known in ("opencode", "claude", "codex", "aider", "mine", "nope"):
        assert known in message
    assert isinstance(err.value, ValueError)


def test_table_with_unknown_preset_or_no_command():
    with pytest.raises(UnknownAgent, match="gpt-cli"):
        spec("x", x=AgentConfig(name="x", preset="gpt-cli"))
    with pytest.raises(UnknownAgent, match="no command"):
        spec("x", x=AgentConfig(name="x"))


def test_config_loader_knows_the_presets(tmp_path):
    path = tmp_path / "kugetsu.toml"
    path.write_text(
        '[gitea]\ninsecure_no_signature = true\n[agents]\ndefault = "claude"\n'
        'fallback = ["codex", "fast"]\n[agents.fast]\npreset = "aider"\n'
    )
    config = load(path, environ={})
    assert agents.resolve(config.agents, "fast").preset == "aider"
    assert agents.resolve(config.agents, config.agents.default).preset == "claude"


# ============================================================================ render and argv


def fill(template, prompt="P", session_id=None):
    return agents.fill(
        template, prompt=prompt, prompt_file="/p/prompt.md", workdir="/w", session_id=session_id
    )


def test_fill_fills_only_the_four_placeholders():
    out = fill(
        [
            "x",
            "{prompt}",
            "--file={prompt_file}",
            "-C",
            "{workdir}",
            "{session_id}",
            '{"json": {"a": 1}}',
            "{model}",
            "{{prompt}}",
            "{ prompt }",
            "{}",
        ],
        session_id="S1",
    )
    assert out == [
        "x",
        "P",
        "--file=/p/prompt.md",
        "-C",
        "/w",
        "S1",
        '{"json": {"a": 1}}',
        "{model}",
        "{P}",
        "{ prompt }",
        "{}",
    ]


def test_render_prompt_stays_one_argument():
    prompt = 'Fix "bug" in it\'s $(rm -rf /) `x`; echo {workdir} \\1 \\n\nsecond line\n--flag'
    out = fill(["agent", "--message", "{prompt}"], prompt=prompt)
    assert out == ["agent", "--message", prompt]  # placeholders in the prompt are not expanded


def test_render_session_placeholder_needs_a_session():
    with pytest.raises(ValueError, match="session_id"):
        fill(["a", "{session_id}"])


def test_argv_for_start_and_resume():
    kw = dict(prompt="do it", prompt_file="/p", workdir="/w")
    oc = agents.resolve(AgentsConfig(), "opencode")
    assert agents.argv_for(oc, session_id=None, **kw) == [
        "opencode",
        "run",
        "--format",
        "json",
        "do it",
    ]
    assert agents.argv_for(oc, session_id="ses_1", **kw) == [
        "opencode",
        "run",
        "--format",
        "json",
        "--session",
        "ses_1",
        "do it",
    ]
    codex = agents.argv_for(agents.resolve(AgentsConfig(), "codex"), session_id="T1", **kw)
    assert codex[:2] == ["codex", "exec"] and codex[-3:] == ["resume", "T1", "do it"]
    assert "--json" in codex and "--skip-git-repo-check" in codex
    claude = agents.argv_for(agents.resolve(AgentsConfig(), "claude"), session_id="U1", **kw)
    assert claude[:2] == ["claude", "-p"] and claude[-3:] == ["--resume", "U1", "do it"]
    aider = agents.resolve(AgentsConfig(), "aider")
    assert agents.argv_for(aider, session_id="ignored", **kw) == agents.argv_for(
        aider, session_id=None, **kw
    )
    assert agents.argv_for(aider, session_id=None, **kw)[-2:] == ["--message", "do it"]
    custom = spec("c", c=AgentConfig(name="c", command=("run", "{prompt_file}", "{workdir}")))
    assert agents.argv_for(custom, session_id="x", **kw) == ["run", "/p", "/w"]


def test_a_command_may_name_the_session_it_starts(tmp_path):
    """{session_id} in `command` is a fresh id kugetsu picks (like claude's --session-id);
    in `resume_command` it is the session to resume."""
    path = tmp_path / "kugetsu.toml"
    path.write_text(
        '[gitea]\ninsecure_no_signature = true\n[agents]\ndefault = "x"\n'
        '[agents.x]\ncommand = ["foo", "--session-id", "{session_id}", "{prompt}"]\n'
        'resume_command = ["foo", "-r", "{session_id}", "{prompt}"]\n'
    )
    x = agents.resolve(load(path, environ={}).agents, "x")
    kw = dict(prompt="do it", prompt_file="/p", workdir="/w")
    first, second = agents.new_session_id(x), agents.new_session_id(x)
    assert first and second and first != second and len(first) == 36
    assert agents.argv_for(x, session_id=None, new_session_id=first, **kw) == [
        "foo",
        "--session-id",
        first,
        "do it",
    ]
    assert agents.argv_for(x, session_id="S1", new_session_id=None, **kw) == [
        "foo",
        "-r",
        "S1",
        "do it",
    ]
    # without an id to fill in, the command cannot be built: a clear error, not a bad argv
    with pytest.raises(ValueError, match="session_id"):
        agents.argv_for(x, session_id=None, **kw)
    # a command that does not name its session gets no id
    for preset in agents.PRESETS.values():
        assert agents.new_session_id(agents.resolve(AgentsConfig(), preset.name)) is None


# ============================================================================ home and environment


def test_prepare_home_dirs_and_vars(tmp_path):
    home = tmp_path / "homes" / "issue-7"
    env = agents.prepare_home(agents.resolve(AgentsConfig(), "codex"), home)
    assert env["HOME"] == str(home)
    assert env["XDG_CONFIG_HOME"] == str(home / ".config")
    assert env["XDG_DATA_HOME"] == str(home / ".local/share")
    assert env["XDG_CACHE_HOME"] == str(home / ".cache")
    assert env["XDG_STATE_HOME"] == str(home / ".local/state")
    assert env["CODEX_HOME"] == str(home / ".codex")
    assert "CLAUDE_CONFIG_DIR" not in env
    assert all(Path(v).is_dir() for v in env.values())
    claude = agents.prepare_home(agents.resolve(AgentsConfig(), "claude"), tmp_path / "c")
    assert (
        claude["CLAUDE_CONFIG_DIR"] == str(tmp_path / "c" / ".claude")
        and "CODEX_HOME" not in claude
    )
    assert "CODEX_HOME" not in agents.prepare_home(
        agents.resolve(AgentsConfig(), "opencode"), tmp_path / "o"
    )


def test_prepare_home_copies_home_files_and_keeps_state(tmp_path):
    source = tmp_path / "config.toml"
    source.write_text('model = "one"\n')
    s = spec(
        "codex",
        codex=AgentConfig(
            name="codex",
            home_files={".codex/config.toml": str(source), "deep/er/file.txt": str(source)},
        ),
    )
    home = tmp_path / "home"
    agents.prepare_home(s, home)
    assert (home / ".codex/config.toml").read_text() == 'model = "one"\n'
    assert (home / "deep/er/file.txt").exists()
    session = home / ".codex" / "sessions" / "rollout.jsonl"  # what the CLI leaves behind
    session.parent.mkdir(parents=True)
    session.write_text("{}\n")
    source.write_text('model = "two"\n')
    agents.prepare_home(s, home)  # a follow-up on the same issue
    assert session.read_text() == "{}\n"
    assert (home / ".codex/config.toml").read_text() == 'model = "two"\n'


def test_prepare_home_refuses_paths_outside(tmp_path):
    source = tmp_path / "f"
    source.write_text("x")
    for rel in ("../escape", "/etc/passwd", "a/../../b"):
        s = spec("opencode", opencode=AgentConfig(name="opencode", home_files={rel: str(source)}))
        with pytest.raises(ValueError):
            agents.prepare_home(s, tmp_path / "home")
    assert not (tmp_path / "escape").exists()


def test_prepare_home_seeds_aider_price_cache(tmp_path):
    agents.prepare_home(agents.resolve(AgentsConfig(), "aider"), tmp_path)
    cache = json.loads(
        (tmp_path / ".aider/caches/model_prices_and_context_window.json").read_text()
    )
    assert cache  # aider downloads the list again when its cache is empty


ENVIRON = {
    "PATH": "/opt/agents/bin:/usr/bin",
    "LANG": "en_US.UTF-8",
    "HOME": "/home/kugetsu",
    "ANTHROPIC_API_KEY": "sk-ant-1",
    "KUGETSU_GITEA_TOKEN": "tok-123456",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "SSH_AUTH_SOCK": "/tmp/ssh",
    "XDG_CONFIG_HOME": "/home/kugetsu/.config",
}
TASK = {"KUGETSU_TASK_ID": "42", "KUGETSU_REPO": "o/r", "KUGETSU_ISSUE": "7"}


def test_build_env_is_minimal():
    s = agents.resolve(AgentsConfig(), "claude")
    env = agents.build_env(
        s,
        home_env={"HOME": "/h", "CLAUDE_CONFIG_DIR": "/h/.claude"},
        task_vars=TASK,
        environ=ENVIRON,
        secrets=["tok-123456"],
    )
    expected = {
        "PATH",
        "LANG",
        "HOME",
        "CLAUDE_CONFIG_DIR",
        "ANTHROPIC_API_KEY",
        *TASK,
        *agents.PRESETS["claude"].env,
    }
    assert set(env) == expected
    assert env["PATH"] == "/opt/agents/bin:/usr/bin" and env["LANG"] == "en_US.UTF-8"
    assert env["HOME"] == "/h"  # never the service's own
    assert env["ANTHROPIC_API_KEY"] == "sk-ant-1"
    assert env["KUGETSU_TASK_ID"] == "42" and env["IS_SANDBOX"] == "1"
    assert "tok-123456" not in json.dumps(env)


def test_build_env_adds_the_sandbox_env_only_when_sandboxed():
    # as a slot's uid aider cannot reach the worktree's git directory (kugetsu's mirror): with
    # git on, it dies writing a git identity into that repository's config as it starts
    aider = agents.resolve(AgentsConfig(), "aider")
    kw = dict(home_env={}, task_vars={}, environ={}, secrets=[])
    assert agents.build_env(aider, sandboxed=True, **kw)["AIDER_GIT"] == "false"
    assert "AIDER_GIT" not in agents.build_env(aider, **kw)
    # the table's env still has the last word
    mine = spec("aider", aider=AgentConfig(name="aider", env={"AIDER_GIT": "true"}))
    assert agents.build_env(mine, sandboxed=True, **kw)["AIDER_GIT"] == "true"
    # the CLIs that start without touching the repository need nothing
    for name in ("opencode", "claude", "codex"):
        plain = agents.resolve(AgentsConfig(), name)
        assert agents.build_env(plain, sandboxed=True, **kw) == agents.build_env(plain, **kw)


def test_build_env_defaults_and_table_env_wins_over_preset():
    s = spec(
        "opencode",
        opencode=AgentConfig(
            name="opencode",
            env={"npm_config_offline": "false", "X": "1"},
            pass_env=("MISSING", "SSH_AUTH_SOCK"),
        ),
    )
    env = agents.build_env(
        s, home_env={}, task_vars={}, environ={"SSH_AUTH_SOCK": "/s"}, secrets=[]
    )
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin" and env["LANG"] == "C.UTF-8"
    assert env["npm_config_offline"] == "false" and env["X"] == "1"
    assert env["SSH_AUTH_SOCK"] == "/s" and "MISSING" not in env
    assert "ANTHROPIC_API_KEY" not in env  # the table's pass_env replaced the preset's


def test_build_env_drops_secret_valued_variables(caplog):
    s = spec(
        "mine",
        mine=AgentConfig(
            name="mine",
            command=("x",),
            env={
                "GIT_TOKEN": "tok-123456",
                "HEADER": "Authorization: token tok-123456",
                "FINE": "ok",
            },
            pass_env=("KUGETSU_GITEA_TOKEN", "ANTHROPIC_API_KEY"),
        ),
    )
    with caplog.at_level(logging.WARNING, logger="bot.agents"):
        env = agents.build_env(
            s,
            home_env={"HOME": "/h"},
            task_vars={**TASK, "KUGETSU_LEAK": "tok-123456"},
            environ=ENVIRON,
            secrets=["", "tok-123456"],
        )
    assert "tok-123456" not in json.dumps(env)
    dropped = [r.variable for r in caplog.records if r.getMessage().startswith("variable dropped")]
    assert sorted(dropped) == ["GIT_TOKEN", "HEADER", "KUGETSU_GITEA_TOKEN", "KUGETSU_LEAK"]
    for name in dropped:
        assert name not in env
    assert "tok-123456" not in logged(caplog)
    assert (
        env["FINE"] == "ok"
        and env["ANTHROPIC_API_KEY"] == "sk-ant-1"
        and env["KUGETSU_TASK_ID"] == "42"
    )


# ============================================================================ recorded output

# what each recorded run must parse to; every fixture in the manifest has an entry
EXPECTED = {
    "opencode-success.jsonl": dict(
        summary="Done: hello.txt now says hello.",
        failed=False,
        rate_limited=False,
        usage=(2000, 40, 400, 0),
        cost=0.00672,
    ),
    "opencode-resume.jsonl": dict(
        summary="Resumed: second.txt created; hello.txt was written earlier.",
        failed=False,
        rate_limited=False,
        usage=(2000, 40, 400, 0),
        cost=0.00672,
        same_session_as="opencode-success.jsonl",
    ),
    "opencode-error-500.jsonl": dict(
        summary="", failed=True, rate_limited=False, failure="500", usage=(0, 0, 0, 0), cost=None
    ),
    "opencode-error-429.jsonl": dict(
        summary="", failed=True, rate_limited=True, failure="429", usage=(0, 0, 0, 0), cost=None
    ),
    "codex-success.jsonl": dict(
        summary="Done: hello.txt now says hello.",
        failed=False,
        rate_limited=False,
        usage=(2000, 40, 400, 0),
        cost=None,
    ),
    # codex reports the thread's cumulative usage: the resumed run includes the first one
    "codex-resume.jsonl": dict(
        summary="Resumed: second.txt created; hello.txt was written earlier.",
        failed=False,
        rate_limited=False,
        usage=(4000, 80, 800, 0),
        cost=None,
        same_session_as="codex-success.jsonl",
    ),
    "codex-flaky.jsonl": dict(
        summary="Done: hello.txt now says hello.",
        failed=False,
        rate_limited=False,
        usage=(2000, 40, 400, 0),
        cost=None,
    ),
    # codex words a 5xx as "experiencing high demand", its overloaded message
    "codex-error-500.jsonl": dict(
        summary="",
        failed=True,
        rate_limited=True,
        failure="high demand",
        usage=(0, 0, 0, 0),
        cost=None,
    ),
    "codex-error-429.jsonl": dict(
        summary="", failed=True, rate_limited=True, failure="429", usage=(0, 0, 0, 0), cost=None
    ),
    "claude-success.jsonl": dict(
        summary="Done: hello.txt now says hello.",
        failed=False,
        rate_limited=False,
        usage=(2000, 40, 400, 200),
        cost=0.01245,
    ),
    "claude-resume.jsonl": dict(
        summary="Resumed: second.txt created; hello.txt was written earlier.",
        failed=False,
        rate_limited=False,
        usage=(2000, 40, 400, 200),
        cost=0.01245,
        same_session_as="claude-success.jsonl",
    ),
    "claude-error-500.jsonl": dict(
        summary="", failed=True, rate_limited=False, failure="500", usage=(0, 0, 0, 0), cost=0.0
    ),
    "claude-error-429.jsonl": dict(
        summary="", failed=True, rate_limited=True, failure="429", usage=(0, 0, 0, 0), cost=0.0
    ),
    "claude-error-529.jsonl": dict(
        summary="", failed=True, rate_limited=True, failure="529", usage=(0, 0, 0, 0), cost=0.0
    ),
    "aider-success.txt": dict(
        summary="I will create hello.txt.\n\nhello.txt\n```\nhello from the fake model\n```",
        failed=False,
        rate_limited=False,
        usage=(776, 19, 0, 0),
        cost=0.0026,
    ),
    "aider-error-500.txt": dict(
        summary=None,
        failed=True,
        rate_limited=False,
        failure="InternalServerError",
        usage=(0, 0, 0, 0),
        cost=None,
    ),
    "aider-error-429.txt": dict(
        summary=None,
        failed=True,
        rate_limited=True,
        failure="RateLimitError",
        usage=(0, 0, 0, 0),
        cost=None,
    ),
    "aider-error-401.txt": dict(
        summary=None,
        failed=True,
        rate_limited=False,
        failure="AuthenticationError",
        usage=(0, 0, 0, 0),
        cost=None,
    ),
}


def test_every_fixture_is_recorded_and_expected():
    recorded = {p.name for p in FIXTURES.iterdir() if p.suffix in (".jsonl", ".txt")}
    assert recorded == set(MANIFEST) == set(EXPECTED)
    for name, meta in MANIFEST.items():
        assert meta["version"] and meta["scenario"] and isinstance(meta["exit_code"], int), name
    readme = (FIXTURES / "README.md").read_text()
    assert all(name in readme for name in MANIFEST)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parse_recorded_output(name):
    want = EXPECTED[name]
    report = parse(name)
    if want["summary"] is not None:
        assert report.summary == want["summary"]
    assert report.failed is want["failed"], report.failure
    assert report.rate_limited is want["rate_limited"]
    if want["failed"]:
        assert want["failure"] in report.failure
    else:
        assert report.failure is None
    u = report.usage
    assert (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens) == want[
        "usage"
    ]
    assert (
        u.cost_usd == pytest.approx(want["cost"])
        if want["cost"] is not None
        else u.cost_usd is None
    )
    cli = MANIFEST[name]["cli"]
    if cli == "aider":
        assert report.session_id is None
    else:
        assert report.session_id
    if "same_session_as" in want:
        assert report.session_id == parse(want["same_session_as"]).session_id


def test_session_id_formats():
    assert parse("opencode-success.jsonl").session_id.startswith("ses_")
    assert parse("codex-success.jsonl").session_id.count("-") == 4
    assert parse("claude-success.jsonl").session_id.count("-") == 4


@pytest.mark.parametrize(
    "name", ["aider-error-500.txt", "aider-error-429.txt", "aider-error-401.txt"]
)
def test_aider_api_failure_with_exit_zero_is_failed(name):
    assert MANIFEST[name]["exit_code"] == 0
    report = agents.parse_output(spec("aider"), fixture(name), 0)
    assert report.failed and report.failure
    assert "fake error" in report.failure
    assert "Retrying" not in report.failure and "The API provider" not in report.failure


@pytest.mark.parametrize(
    "name",
    [
        "opencode-error-429.jsonl",
        "codex-error-429.jsonl",
        "claude-error-429.jsonl",
        "aider-error-429.txt",
    ],
)
def test_http_429_is_rate_limited_for_every_preset(name):
    report = parse(name)
    assert report.failed and report.rate_limited


@pytest.mark.parametrize(
    "name", ["opencode-error-500.jsonl", "claude-error-500.jsonl", "aider-error-500.txt"]
)
def test_http_500_is_not_rate_limited(name):
    # aider prints "servers are down or overloaded" under every 5xx: its hint, not the error
    report = parse(name)
    assert report.failed and not report.rate_limited


@pytest.mark.parametrize(
    "name, old, new",
    [
        (
            "opencode-success.jsonl",
            "Done: hello.txt now says hello.",
            "Handled HTTP 429 rate limit and quota errors.",
        ),
        (
            "codex-success.jsonl",
            "Done: hello.txt now says hello.",
            "Handled HTTP 429 rate limit and quota errors.",
        ),
        (
            "claude-success.jsonl",
            "Done: hello.txt now says hello.",
            "Handled HTTP 429 rate limit and quota errors.",
        ),
        (
            "aider-success.txt",
            "I will create hello.txt.",
            "litellm.RateLimitError: handled HTTP 429 in the client.",
        ),
    ],
)
def test_words_about_rate_limits_in_a_good_run_are_not_a_rate_limit(name, old, new):
    meta = MANIFEST[name]
    output = fixture(name).replace(old, new)
    assert new in output
    report = agents.parse_output(spec(meta["cli"]), output, 0)
    assert not report.failed and not report.rate_limited


def test_nonzero_exit_fails_even_with_a_good_result():
    report = agents.parse_output(spec("opencode"), fixture("opencode-success.jsonl"), 137)
    assert report.failed and "137" in report.failure
    assert report.summary == "Done: hello.txt now says hello."
    assert (
        "signal 9" in agents.parse_output(spec("codex"), fixture("codex-success.jsonl"), -9).failure
    )


# ============================================================================ UsageMeter


def meter_over(name: str, max_tokens=None, max_cost_usd=None):
    """Feed a recording line by line; return (index of the first line after which the budget is
    exceeded, reason, meter)."""
    meter = agents.UsageMeter(spec(MANIFEST[name]["cli"]))
    for index, line in enumerate(fixture(name).splitlines()):
        meter.feed(line)
        reason = meter.exceeded(max_tokens, max_cost_usd)
        if reason:
            return index, reason, meter
    return None, None, meter


def line_index(name: str, predicate) -> list[int]:
    return [i for i, line in enumerate(fixture(name).splitlines()) if predicate(line)]


def test_meter_opencode_stops_at_the_step_that_crosses_the_budget():
    steps = line_index("opencode-success.jsonl", lambda line: '"type":"step_finish"' in line)
    index, reason, meter = meter_over("opencode-success.jsonl", max_tokens=1500)
    assert index == steps[1] and "2440" in reason and "1500" in reason
    index, reason, _ = meter_over("opencode-success.jsonl", max_tokens=1220)
    assert index == steps[1]  # 1220 after the first step is not over a limit of 1220
    index, reason, _ = meter_over("opencode-success.jsonl", max_cost_usd=0.005)
    assert index == steps[1] and "cost" in reason
    assert meter_over("opencode-success.jsonl", max_tokens=2440, max_cost_usd=0.01)[0] is None


def test_meter_claude_sees_usage_while_streaming():
    name = "claude-success.jsonl"
    lines = fixture(name).splitlines()
    result = line_index(name, lambda line: '"type":"result"' in line)[0]
    second_message = line_index(
        name, lambda line: '"type":"assistant"' in line and '"msg_0003"' in line
    )[0]
    index, reason, _ = meter_over(name, max_tokens=2000)
    assert index == second_message < result  # before the run ends
    index, _, meter = meter_over(name, max_cost_usd=0.01)
    assert index == result  # claude prints cost only at the end
    assert meter.usage.total_tokens == 2640
    meter = agents.UsageMeter(spec("claude"))
    meter.feed(lines[0])
    assert meter.session_id == parse(name).session_id


def test_meter_codex_and_aider():
    index, reason, meter = meter_over("codex-success.jsonl", max_tokens=100)
    assert index == line_index("codex-success.jsonl", lambda line: "turn.completed" in line)[0]
    assert meter.session_id == parse("codex-success.jsonl").session_id
    index, reason, meter = meter_over("aider-success.txt", max_tokens=500)
    assert index == line_index("aider-success.txt", lambda line: line.startswith("Tokens:"))[0]
    assert meter.usage.cost_usd == pytest.approx(0.0026)
    custom = agents.UsageMeter(spec("c", c=AgentConfig(name="c", command=("x",))))
    custom.feed('{"type":"step_finish","part":{"tokens":{"input":99999}}}')
    assert custom.usage.total_tokens == 0 and custom.exceeded(1, 0.01) is None


def test_budget_exceeded():
    u = Usage(
        input_tokens=100, output_tokens=20, cache_read_tokens=30, cache_write_tokens=5, cost_usd=0.5
    )
    assert u.total_tokens == 155
    assert u.as_dict() == {
        "input_tokens": 100,
        "output_tokens": 20,
        "cache_read_tokens": 30,
        "cache_write_tokens": 5,
        "total_tokens": 155,
        "cost_usd": 0.5,
    }
    assert agents.budget_exceeded(u, None, None) is None
    assert agents.budget_exceeded(u, 155, 0.5) is None
    assert "155" in agents.budget_exceeded(u, 154, None)
    assert "cost" in agents.budget_exceeded(u, None, 0.49)
    assert agents.budget_exceeded(Usage(input_tokens=10), None, 0.01) is None  # no cost known


# ======================================================================= noise, truncation, custom


NOISE = [
    "",
    "not json at all",
    "{broken json",
    "[]",
    "42",
    '{"type": 7}',
    '{"part": "x", "type": "text"}',
    "\x1b[31mred\x1b[0m",
    "\ufffd\ufffd binary \x00 junk",
    '{"type":"step_finish","part":{"tokens":"many"}}',
    '{"type":"item.completed","item":null}',
    '{"type":"result","usage":[1,2]}',
]


@pytest.mark.parametrize(
    "name",
    ["opencode-success.jsonl", "codex-success.jsonl", "claude-success.jsonl", "aider-success.txt"],
)
def test_garbage_lines_change_nothing(name):
    clean = parse(name)
    lines = fixture(name).splitlines()
    if name.endswith(".txt"):  # plain text: noise inside a reply would be part of the reply
        noisy = [*NOISE, *lines, *NOISE]
    else:
        noisy = []
        for line in lines:
            noisy.extend([line, *NOISE[:3]])
        noisy[1:1] = NOISE
    report = agents.parse_output(spec(MANIFEST[name]["cli"]), "\n".join(noisy), 0)
    assert (report.summary, report.session_id, report.failed) == (
        clean.summary,
        clean.session_id,
        False,
    )
    assert report.usage == clean.usage


MARKERS = ["[kugetsu: {n} bytes of output omitted]", "[... {n} bytes omitted ...]"]


def truncated(text: str, keep_head: int, keep_tail: int, marker: str) -> str:
    lines = text.splitlines()
    head, tail_ = lines[:keep_head], lines[-keep_tail:]
    omitted = sum(len(line) + 1 for line in lines[keep_head:-keep_tail])
    cut = head[-1][: len(head[-1]) // 2]  # the middle may start and end anywhere in a line
    return "\n".join([*head[:-1], cut, marker.format(n=omitted), *tail_])


@pytest.mark.parametrize("marker", MARKERS)
@pytest.mark.parametrize(
    "name, head, tail_",
    [
        ("opencode-success.jsonl", 2, 2),
        ("codex-success.jsonl", 2, 2),
        ("claude-success.jsonl", 2, 1),
        ("aider-success.txt", 3, 12),
    ],
)
def test_truncated_output_keeps_session_and_summary(name, head, tail_, marker):
    clean = parse(name)
    report = agents.parse_output(
        spec(MANIFEST[name]["cli"]), truncated(fixture(name), head, tail_, marker), 0
    )
    assert report.session_id == clean.session_id
    assert report.summary == clean.summary
    assert not report.failed


@pytest.mark.parametrize("cli", ["opencode", "codex", "claude", "aider"])
def test_empty_or_cut_output_with_exit_zero_is_a_failure(cli):
    for output in ("", "\n".join(NOISE), "[kugetsu: 99 bytes of output omitted]"):
        report = agents.parse_output(spec(cli), output, 0)
        assert report.failed and report.failure and not report.rate_limited, (cli, output)


def test_custom_command_summary_is_the_tail():
    c = spec("c", c=AgentConfig(name="c", command=("x",)))
    out = "\n".join(f"line {i}" for i in range(100)) + "\n\x1b[32mall done\x1b[0m\n"
    report = agents.parse_output(c, out, 0)
    lines = report.summary.splitlines()
    assert len(lines) == 40 and lines[-1] == "all done" and lines[0] == "line 61"
    assert not report.failed and report.session_id is None and report.usage == Usage()
    long = agents.parse_output(c, "x" * 10000 + "\nEND", 0)
    assert len(long.summary) <= 3000 and long.summary.endswith("END")


def test_custom_command_failure_and_rate_limit():
    c = spec("c", c=AgentConfig(name="c", command=("x",)))
    failed = agents.parse_output(c, "working\nError: 429 Too Many Requests\n", 2)
    assert failed.failed and failed.rate_limited and "exited with code 2" in failed.failure
    plain = agents.parse_output(c, "working\nboom\n", 1)
    assert plain.failed and not plain.rate_limited and "boom" in plain.failure
    fine = agents.parse_output(c, "implemented retry on 429 rate limit\n", 0)
    assert not fine.failed and not fine.rate_limited


# ============================================================================ the fake LLM itself


def post(llm: FakeLLM, path: str, body: dict) -> tuple[int, dict, str]:
    request = urllib.request.Request(
        llm.base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def sse_data(raw: str) -> list:
    return [
        json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
        for line in raw.splitlines()
        if line.startswith("data: ")
    ]


TOOLS = [{"type": "function", "function": {"name": "write", "parameters": {}}}]


def test_fake_chat_completions_script_by_turns():
    script = [
        write_file("a.txt", "A\n", "writing"),
        tool_call("bash", {"command": "ls"}),
        text("done"),
    ]
    with FakeLLM(script) as llm:
        user = {"role": "user", "content": "make a.txt"}
        status, _, raw = post(llm, "/v1/chat/completions", {"messages": [user], "tools": TOOLS})
        message = json.loads(raw)["choices"][0]["message"]
        assert status == 200 and message["content"] == "writing"
        call = message["tool_calls"][0]["function"]
        assert call["name"] == "write" and json.loads(call["arguments"]) == {
            "filePath": "a.txt",
            "content": "A\n",
        }
        turn = [
            user,
            {"role": "assistant", "content": "writing"},
            {"role": "tool", "content": "ok"},
        ]
        raw = post(llm, "/v1/chat/completions", {"messages": turn, "tools": TOOLS})[2]
        assert (
            json.loads(raw)["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "bash"
        )
        later = [*turn, {"role": "assistant", "content": ""}, {"role": "tool", "content": "ok"}]
        chunks = sse_data(
            post(
                llm,
                "/v1/chat/completions",
                {
                    "messages": later,
                    "tools": TOOLS,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            )[2]
        )
        assert chunks[-1] == "[DONE]" and chunks[-2]["usage"]["completion_tokens"] == 20
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-2]) == "done"
        # a new user message starts the script again; no tools means an aider-style whole edit
        again = [
            *later,
            {"role": "assistant", "content": "done"},
            {"role": "user", "content": "more"},
        ]
        content = json.loads(post(llm, "/v1/chat/completions", {"messages": again})[2])["choices"][
            0
        ]["message"]
        assert content["content"] == "writing\n\na.txt\n```\nA\n```\n"
        title = {"messages": [{"role": "system", "content": "You are a title generator."}, user]}
        assert (
            json.loads(post(llm, "/v1/chat/completions", title)[2])["choices"][0]["message"][
                "content"
            ]
            == "Fake title"
        )
        assert len(llm.requests) == 5 and len(llm.agent_requests()) == 4


def test_fake_streams_tool_calls_in_pieces():
    with FakeLLM() as llm:
        chunks = sse_data(
            post(
                llm,
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "stream": True},
            )[2]
        )
        calls = [
            c["choices"][0]["delta"]["tool_calls"][0]
            for c in chunks[:-1]
            if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
        ]
        assert calls[0]["function"] == {"name": "write", "arguments": ""} and calls[0]["id"]
        assert json.loads(calls[1]["function"]["arguments"])["filePath"] == "hello.txt"
        assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_fake_responses_api():
    with FakeLLM() as llm:
        body = {
            "stream": True,
            "input": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "<environment_context><cwd>/w</cwd>"}
                    ],
                },
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "make it"}],
                },
            ],
        }
        events = sse_data(post(llm, "/v1/responses", body)[2])
        done = events[-1]
        assert (
            done["type"] == "response.completed"
            and done["response"]["usage"]["input_tokens"] == 1200
        )
        call = next(i for i in done["response"]["output"] if i["type"] == "function_call")
        assert (
            call["name"] == "exec_command" and "hello.txt" in json.loads(call["arguments"])["cmd"]
        )
        body["input"] += [
            call,
            {"type": "function_call_output", "call_id": call["call_id"], "output": "ok"},
        ]
        output = json.loads(post(llm, "/v1/responses", {**body, "stream": False})[2])["output"]
        assert output[0]["content"][0]["text"] == "Done: hello.txt now says hello."


def test_fake_anthropic_messages_uses_the_working_directory():
    with FakeLLM() as llm:
        body = {
            "stream": True,
            "tools": [{"name": "Write"}],
            "system": [{"type": "text", "text": "Primary working directory: /srv/checkout\nmore"}],
            "messages": [{"role": "user", "content": "x"}],
        }
        events = sse_data(post(llm, "/v1/messages?beta=true", body)[2])
        kinds = [e["type"] for e in events]
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        tool = next(
            e
            for e in events
            if e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use"
        )["content_block"]
        args = json.loads(
            next(e for e in events if e.get("delta", {}).get("type") == "input_json_delta")[
                "delta"
            ]["partial_json"]
        )
        assert tool["name"] == "Write" and args["file_path"] == "/srv/checkout/hello.txt"
        body["messages"] += [
            {"role": "assistant", "content": [{"type": "tool_use"}]},
            {"role": "user", "content": [{"type": "tool_result", "content": "ok"}]},
        ]
        reply = json.loads(post(llm, "/v1/messages", {**body, "stream": False})[2])
        assert reply["content"] == [{"type": "text", "text": "Done: hello.txt now says hello."}]
        assert reply["usage"]["cache_creation_input_tokens"] == 100


def test_fake_errors_and_flaky_errors():
    user = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
    with FakeLLM([http_error(429, {"retry-after-ms": "10"})]) as llm:
        for _ in range(2):  # the last step repeats: the client never gets past it
            status, headers, raw = post(llm, "/v1/chat/completions", user)
            assert status == 429 and headers["retry-after-ms"] == "10"
            assert json.loads(raw)["error"]["type"] == "rate_limit_error"
        assert json.loads(post(llm, "/v1/messages", user)[2])["error"]["type"] == "rate_limit_error"
    with FakeLLM([http_error(500, times=2), text("recovered"), text("second turn")]) as llm:
        assert [post(llm, "/v1/chat/completions", user)[0] for _ in range(3)] == [500, 500, 200]
        turn = {
            **user,
            "messages": [*user["messages"], {"role": "assistant", "content": "recovered"}],
        }
        assert (
            json.loads(post(llm, "/v1/chat/completions", turn)[2])["choices"][0]["message"][
                "content"
            ]
            == "second turn"
        )
        with urllib.request.urlopen(llm.url + "/models", timeout=10) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "fake-model"


def test_a_failures_reason_is_the_line_that_says_what_went_wrong():
    # stderr and stdout come as one stream; the error is often not in the last lines
    c = spec("c", c=AgentConfig(name="c", command=("x",)))
    output = (
        "starting up\n"
        "Traceback (most recent call last):\n"
        '  File "agent.py", line 3, in <module>\n'
        "\x1b[31mValueError: the model name is not set\x1b[0m\n"
        "usage: agent [--model NAME] PROMPT\n"
        "  --model NAME   the model to use\n"
        "see you\n"
    )
    report = agents.parse_output(c, output, 1)
    assert report.failure == "exited with code 1: ValueError: the model name is not set"
    # a preset that ended without an error event of its own: its error line, not JSON
    events = fixture("opencode-success.jsonl").splitlines()[:2]
    output = "\n".join([*events, "Error: connect ECONNREFUSED 127.0.0.1:4000", "bye"])
    report = agents.parse_output(spec("opencode"), output, 1)
    assert report.failure == "exited with code 1: Error: connect ECONNREFUSED 127.0.0.1:4000"
    # no line reads as an error: the last one
    assert agents.parse_output(c, "one\ntwo\n", 4).failure == "exited with code 4: two"


def test_only_the_agents_whose_program_is_installed_are_available(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    claude = bin_dir / "claude"
    claude.write_text("#!/bin/sh\n")
    claude.chmod(0o755)
    (bin_dir / "codex").write_text("not executable\n")
    config = AgentsConfig(
        tables={
            "mine": AgentConfig(name="mine", command=(str(claude), "{prompt}")),
            "gone": AgentConfig(name="gone", command=(str(tmp_path / "nope"), "{prompt}")),
        }
    )
    found = agents.available(config, {"PATH": str(bin_dir)})
    assert found == {"claude", "mine"}
    assert agents.configured(config) >= {"opencode", "codex", "aider", "gone"}
