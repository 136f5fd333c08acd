"""The agent CLIs kugetsu knows: one `Preset` object each.

A preset holds everything about one CLI: its command lines (start, and resume a session),
the environment that keeps it from phoning home, the API keys it may be given, the
variables that point it at its own directory in the agent home, the files seeded there,
the parser of its output and the words it uses for a rate limit. Adding a CLI is one
entry in `PRESETS` (CONTRIBUTING.md has a worked example).

Preset command lines and output formats match these CLI versions (flags change between
releases): opencode 1.18.33, codex 0.169.0, claude code 2.1.197, aider 0.86.2.

The placeholders a command line may use are defined here (`PLACEHOLDERS`); the config
checks [agents.NAME] tables against them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from bot.agents.parsers import (
    AiderParser,
    ClaudeParser,
    CodexParser,
    CustomParser,
    OpencodeParser,
    Parser,
    rate_limit_pattern,
)

#: what agent command lines may use (`launch.fill` fills them); other braces stay as written
PLACEHOLDERS = ("prompt", "prompt_file", "workdir", "session_id")


def frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    """A read-only copy."""
    return MappingProxyType(dict(mapping or {}))


def resumes(resume_command: tuple[str, ...] | None) -> bool:
    """True when a resume command names the session it resumes: a follow-up can then
    continue the agent's own conversation."""
    return resume_command is not None and any("{session_id}" in a for a in resume_command)


@dataclass(frozen=True)
class Preset:
    """A known agent CLI: how to start it, resume it, keep it from phoning home, and read it."""

    name: str
    command: tuple[str, ...]
    resume_command: tuple[str, ...] | None
    #: turns off auto-update, telemetry and other network calls the CLI makes for itself
    env: Mapping[str, str]
    #: variables passed through from the service's environment by default (API keys and the like)
    pass_env: tuple[str, ...]
    #: variables pointing the CLI at its own directory in the agent home (CODEX_HOME=.codex)
    home_vars: Mapping[str, str] = field(default_factory=dict)
    #: files written into the agent home by `prepare_home` before `home_files` are copied
    home_seed: Mapping[str, str] = field(default_factory=dict)
    #: added to `env` when the agent runs as a slot's uid (the sandbox): its worktree's git
    #: directory is in kugetsu's mirror, out of that uid's reach, so git fails in the worktree
    sandbox_env: Mapping[str, str] = field(default_factory=dict)
    #: reads the CLI's output (CustomParser: the tail of any command's output)
    parser: Callable[[re.Pattern[str]], Parser] = CustomParser
    #: what this CLI says when rate limited, besides what every provider says
    #: (parsers.RATE_LIMIT_WORDS): regular expressions, matched case-insensitively
    rate_limit: tuple[str, ...] = ()

    @property
    def sessions(self) -> bool:
        return resumes(self.resume_command)

    def new_parser(self) -> Parser:
        return self.parser(rate_limit_pattern(self.rate_limit))


#: how a command without a preset is read: its exit code and the tail of its output
CUSTOM = Preset(name="custom", command=(), resume_command=None, env=frozen({}), pass_env=())

_OPENAI_KEYS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID")
_ANTHROPIC_KEYS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL")
#: what a CLI's start and resume command lines begin with
_OPENCODE = ("opencode", "run", "--format", "json")
_CLAUDE = (
    "claude",
    "-p",
    "--output-format",
    "stream-json",
    "--verbose",
    "--dangerously-skip-permissions",
)
_CODEX = (
    "codex",
    "exec",
    "--json",
    "--skip-git-repo-check",
    "--dangerously-bypass-approvals-and-sandbox",
    "-c",
    "analytics.enabled=false",
    "-c",
    "features.plugins=false",
    "-c",
    "check_for_update_on_startup=false",
)

PRESETS: dict[str, Preset] = {
    # opencode picks its model and provider from its own config: put an opencode.json in the
    # agent home with `home_files` (".config/opencode/opencode.json") or pass
    # OPENCODE_CONFIG_CONTENT in the table's env.
    "opencode": Preset(
        name="opencode",
        command=(*_OPENCODE, "{prompt}"),
        resume_command=(*_OPENCODE, "--session", "{session_id}", "{prompt}"),
        env=frozen(
            {
                "OPENCODE_DISABLE_AUTOUPDATE": "1",
                "OPENCODE_DISABLE_MODELS_FETCH": "1",
                "OPENCODE_DISABLE_SHARE": "1",
                "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
                # keeps it from asking registry.npmjs.org about its plugin package on every
                # start; set npm_config_offline = "false" in the table's env if your config
                # names npm plugins
                "npm_config_offline": "true",
            }
        ),
        pass_env=(
            *_ANTHROPIC_KEYS,
            *_OPENAI_KEYS,
            "OPENROUTER_API_KEY",
            "GEMINI_API_KEY",
            "GOOGLE_GENERATIVE_AI_API_KEY",
            "GROQ_API_KEY",
            "DEEPSEEK_API_KEY",
            "MISTRAL_API_KEY",
            "XAI_API_KEY",
            "TOGETHER_API_KEY",
            "FIREWORKS_API_KEY",
            "OPENCODE_API_KEY",
        ),
        parser=OpencodeParser,
    ),
    # stream-json (which needs --verbose with -p) prints every assistant message with its usage as
    # it happens, so the meter can stop a run that is over budget before it ends; the last line is
    # the same `result` object that --output-format json prints.
    "claude": Preset(
        name="claude",
        command=(*_CLAUDE, "{prompt}"),
        resume_command=(*_CLAUDE, "--resume", "{session_id}", "{prompt}"),
        env=frozen(
            {
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "DISABLE_TELEMETRY": "1",
                "DISABLE_AUTOUPDATER": "1",
                "DISABLE_ERROR_REPORTING": "1",
                "DISABLE_BUG_COMMAND": "1",
                # --dangerously-skip-permissions is refused when running as root unless this is set
                "IS_SANDBOX": "1",
            }
        ),
        pass_env=(*_ANTHROPIC_KEYS, "CLAUDE_CODE_OAUTH_TOKEN"),
        home_vars=frozen({"CLAUDE_CONFIG_DIR": ".claude"}),
        parser=ClaudeParser,
    ),
    # `exec` defaults to a read-only sandbox, in which the agent cannot change the worktree, and
    # every codex sandbox mode (read-only and workspace-write too) runs commands under its bundled
    # bubblewrap, which needs user namespaces: a default Docker seccomp profile refuses them and
    # then every command the agent runs fails. So, like claude's --dangerously-skip-permissions, the
    # preset runs without codex's own sandbox; the worktree, the per-issue home, the scrubbed
    # environment and the container are the isolation. Where bubblewrap works, a table can use
    # `--sandbox workspace-write` in its own command and resume_command.
    # The -c overrides turn off analytics, the plugin marketplace look-ups (github.com,
    # chatgpt.com) and the update check without needing a config.toml. Flags given before
    # `resume` apply to it as well.
    "codex": Preset(
        name="codex",
        command=(*_CODEX, "{prompt}"),
        resume_command=(*_CODEX, "resume", "{session_id}", "{prompt}"),
        env=frozen({}),
        pass_env=(*_OPENAI_KEYS, "CODEX_API_KEY"),
        home_vars=frozen({"CODEX_HOME": ".codex"}),
        parser=CodexParser,
        # codex words an overloaded provider (and any 5xx) as "experiencing high demand"
        rate_limit=(r"high demand",),
    ),
    # No --model: aider takes it from AIDER_MODEL (put it in the table's env) or from an
    # .aider.conf.yml copied into the home with `home_files`, as the user would configure it anyway.
    "aider": Preset(
        name="aider",
        command=(
            "aider",
            "--yes-always",
            "--no-auto-commits",
            "--no-check-update",
            "--analytics-disable",
            "--no-show-release-notes",
            "--no-show-model-warnings",
            "--no-pretty",
            "--no-gitignore",
            "--input-history-file",
            "/dev/null",
            "--chat-history-file",
            "/dev/null",
            "--no-detect-urls",
            "--message",
            "{prompt}",
        ),
        resume_command=None,
        env=frozen(
            {
                # litellm would otherwise download its model price list on import
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            }
        ),
        pass_env=(
            *_OPENAI_KEYS,
            "OPENAI_API_BASE",
            *_ANTHROPIC_KEYS,
            "OPENROUTER_API_KEY",
            "GEMINI_API_KEY",
            "DEEPSEEK_API_KEY",
            "GROQ_API_KEY",
            "MISTRAL_API_KEY",
            "XAI_API_KEY",
        ),
        # aider downloads litellm's model price list from raw.githubusercontent.com unless its own
        # cache holds a non-empty copy younger than a day; a stub makes it use litellm's bundled map
        home_seed=frozen(
            {".aider/caches/model_prices_and_context_window.json": '{"kugetsu-stub": {}}\n'}
        ),
        # aider opens the worktree's repository as it starts and, finding no git identity there,
        # writes one into the repository's config: refused in the sandbox, and aider dies of it.
        # Without git it edits the files all the same (kugetsu commits them), with no repo map.
        sandbox_env=frozen({"AIDER_GIT": "false"}),
        parser=AiderParser,
    ),
}
