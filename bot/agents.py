"""Agent CLIs: presets, command lines, environments, and reading what they print.

Nothing here starts a process. The dispatcher asks this module for:

- `resolve(agents_config, name)`: an `AgentSpec`, a preset merged with an ``[agents.NAME]`` table,
  or a custom command;
- `argv_for(spec, ...)`: the argument vector (start, or resume when a session id is known);
- `prepare_home(spec, home)` and `build_env(spec, ...)`: a per-issue home and a scrubbed
  environment;
- `UsageMeter(spec)`: fed line by line while the agent runs, to stop it when over budget;
- `parse_output(spec, output, exit_code)`: an `AgentReport` (summary, session id, usage, failure).

Preset command lines and output formats match these CLI versions (flags change between releases):
opencode 1.18.33, codex 0.169.0, claude code 2.1.197, aider 0.86.2.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from bot.config import AGENT_PLACEHOLDERS

if TYPE_CHECKING:
    from bot.config import AgentsConfig

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_LANG = "C.UTF-8"

#: the marker lines put where the middle of a huge output was dropped (log file, kept output)
OMITTED_RE = re.compile(
    r"^\[(?:kugetsu: \d+ bytes of output omitted|\.\.\. \d+ bytes omitted \.\.\.)\]$"
)

SUMMARY_MAX_CHARS = 3000
SUMMARY_MAX_LINES = 40
FAILURE_MAX_CHARS = 500


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


# ============================================================================ presets


@dataclass(frozen=True)
class Preset:
    """A known agent CLI: how to start it, resume it, and keep it from phoning home."""

    name: str
    command: tuple[str, ...]
    resume_command: tuple[str, ...] | None
    #: turns off auto-update, telemetry and other network calls the CLI makes for itself
    env: Mapping[str, str]
    #: variables passed through from the service's environment by default (API keys and the like)
    pass_env: tuple[str, ...]
    sessions: bool
    #: files written into the agent home by `prepare_home` before `home_files` are copied
    home_seed: Mapping[str, str] = field(default_factory=dict)


_OPENAI_KEYS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID")
_ANTHROPIC_KEYS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL")

PRESETS: dict[str, Preset] = {
    # opencode picks its model and provider from its own config: put an opencode.json in the
    # agent home with `home_files` (".config/opencode/opencode.json") or pass
    # OPENCODE_CONFIG_CONTENT in the table's env.
    "opencode": Preset(
        name="opencode",
        command=("opencode", "run", "--format", "json", "{prompt}"),
        resume_command=(
            "opencode",
            "run",
            "--format",
            "json",
            "--session",
            "{session_id}",
            "{prompt}",
        ),
        env=_frozen(
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
        sessions=True,
    ),
    # stream-json (which needs --verbose with -p) prints every assistant message with its usage as
    # it happens, so the meter can stop a run that is over budget before it ends; the last line is
    # the same `result` object that --output-format json prints.
    "claude": Preset(
        name="claude",
        command=(
            "claude",
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--dangerously-skip-permissions",
            "{prompt}",
        ),
        resume_command=(
            "claude",
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--dangerously-skip-permissions",
            "--resume",
            "{session_id}",
            "{prompt}",
        ),
        env=_frozen(
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
        sessions=True,
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
        command=(
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
            "{prompt}",
        ),
        resume_command=(
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
            "resume",
            "{session_id}",
            "{prompt}",
        ),
        env=_frozen({}),
        pass_env=(*_OPENAI_KEYS, "CODEX_API_KEY"),
        sessions=True,
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
        env=_frozen(
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
        sessions=False,
        # aider downloads litellm's model price list from raw.githubusercontent.com unless its own
        # cache holds a non-empty copy younger than a day; a stub makes it use litellm's bundled map
        home_seed=_frozen(
            {".aider/caches/model_prices_and_context_window.json": '{"kugetsu-stub": {}}\n'}
        ),
    ),
}


# ============================================================================ specs


class UnknownAgent(ValueError):
    """No preset and no [agents.NAME] table has this name (or the table has no command)."""


@dataclass(frozen=True)
class AgentSpec:
    """What the dispatcher runs: a preset merged with an [agents.NAME] table, or a custom command.

    `env` is the table's env only; `build_env` adds the preset's env under it.
    """

    name: str
    preset: str | None
    command: tuple[str, ...]
    resume_command: tuple[str, ...] | None
    env: Mapping[str, str]
    pass_env: tuple[str, ...]
    max_tokens: int | None
    max_cost_usd: float | None
    home_files: Mapping[str, str]

    @property
    def sessions(self) -> bool:
        """True when a follow-up can resume the agent's own session."""
        return self.resume_command is not None and any(
            "{session_id}" in a for a in self.resume_command
        )


def resolve(agents: AgentsConfig, name: str) -> AgentSpec:
    """The spec for `name`: an [agents.NAME] table (based on its `preset`, or on the preset of the
    same name), else a bare preset. Every field the table sets replaces the preset's; the table's
    budget defaults to the global [agents] one."""
    table = agents.tables.get(name)
    if table is None:
        preset = PRESETS.get(name)
        if preset is None:
            raise UnknownAgent(
                f"unknown agent {name!r}: presets are {', '.join(sorted(PRESETS))}; "
                f"tables are {', '.join(sorted(agents.tables)) or '(none)'}"
            )
        return AgentSpec(
            name=name,
            preset=preset.name,
            command=preset.command,
            resume_command=preset.resume_command,
            env=_frozen({}),
            pass_env=preset.pass_env,
            max_tokens=agents.max_tokens,
            max_cost_usd=agents.max_cost_usd,
            home_files=_frozen({}),
        )

    base_name = table.preset or (name if name in PRESETS else None)
    base: Preset | None = None
    if base_name is not None:
        base = PRESETS.get(base_name)
        if base is None:
            raise UnknownAgent(
                f"agent {name!r} names an unknown preset {base_name!r}: "
                f"presets are {', '.join(sorted(PRESETS))}"
            )
    command = table.command if table.command is not None else (base.command if base else None)
    if not command:
        raise UnknownAgent(f"agent {name!r} has no command and no preset")
    resume = (
        table.resume_command
        if table.resume_command is not None
        else (base.resume_command if base else None)
    )
    pass_env = table.pass_env if table.pass_env is not None else (base.pass_env if base else ())
    return AgentSpec(
        name=name,
        preset=base.name if base else None,
        command=tuple(command),
        resume_command=tuple(resume) if resume is not None else None,
        env=_frozen(table.env),
        pass_env=tuple(pass_env),
        max_tokens=table.max_tokens if table.max_tokens is not None else agents.max_tokens,
        max_cost_usd=table.max_cost_usd if table.max_cost_usd is not None else agents.max_cost_usd,
        home_files=_frozen(table.home_files),
    )


# ============================================================================ command lines

_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(AGENT_PLACEHOLDERS) + r")\}")


def render(
    template: Sequence[str], *, prompt: str, prompt_file: str, workdir: str, session_id: str | None
) -> list[str]:
    """Fill {prompt}, {prompt_file}, {workdir} and {session_id} inside each argument.

    Only those four names are replaced; any other braces stay as written. Each template argument
    gives exactly one argument, so a prompt with spaces, quotes or newlines stays one argv element
    and no shell ever sees it. A {session_id} with no session id is an error.
    """
    values = {
        "prompt": prompt,
        "prompt_file": prompt_file,
        "workdir": workdir,
        "session_id": session_id,
    }

    def fill(match: re.Match[str]) -> str:
        value = values[match.group(1)]
        if value is None:
            raise ValueError(f"the command uses {{{match.group(1)}}} but there is no value for it")
        return value

    return [_PLACEHOLDER_RE.sub(fill, arg) for arg in template]


def argv_for(
    spec: AgentSpec,
    *,
    prompt: str,
    prompt_file: str,
    workdir: str,
    session_id: str | None,
    new_session_id: str | None = None,
) -> list[str]:
    """The resume command when a session id is known and the spec can resume; else the command.

    A `command` may name the session it starts ({session_id}, as in claude's `--session-id`):
    it is filled with `new_session_id` (see `new_session_id()`).
    """
    if session_id and spec.sessions:
        assert spec.resume_command is not None
        return render(
            spec.resume_command,
            prompt=prompt,
            prompt_file=prompt_file,
            workdir=workdir,
            session_id=session_id,
        )
    return render(
        spec.command,
        prompt=prompt,
        prompt_file=prompt_file,
        workdir=workdir,
        session_id=new_session_id,
    )


def new_session_id(spec: AgentSpec, session_id: str | None = None) -> str | None:
    """A fresh session id (a UUID) when this run starts the session, rather than resuming
    `session_id` (see `argv_for`), and the spec's `command` names the session it starts."""
    if session_id and spec.sessions:
        return None  # argv_for resumes
    if any("{session_id}" in arg for arg in spec.command):
        return str(uuid.uuid4())
    return None


# ============================================================================ home and environment

_XDG = {
    "XDG_CONFIG_HOME": ".config",
    "XDG_DATA_HOME": ".local/share",
    "XDG_CACHE_HOME": ".cache",
    "XDG_STATE_HOME": ".local/state",
}
_PRESET_HOME_VARS = {"codex": {"CODEX_HOME": ".codex"}, "claude": {"CLAUDE_CONFIG_DIR": ".claude"}}


def _inside(home: Path, rel: str) -> Path:
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ValueError(f"home file {rel!r} must be a relative path inside the agent home")
    return home / rel


def prepare_home(spec: AgentSpec, home: Path) -> dict[str, str]:
    """Create the per-issue agent home and return the variables that point the CLI at it.

    HOME and the four XDG directories always; CODEX_HOME for codex, CLAUDE_CONFIG_DIR for claude.
    The preset's seed files are written and `spec.home_files` (relative path in the home <- source
    file) are copied each time, so a changed source reaches the next run. Everything else in an
    existing home is left alone: a follow-up on the same issue finds the CLI's own session there.
    """
    home = Path(home).absolute()
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    env = {"HOME": str(home)}
    dirs = dict(_XDG)
    dirs.update(_PRESET_HOME_VARS.get(spec.preset or "", {}))
    for var, rel in dirs.items():
        path = home / rel
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    preset = PRESETS.get(spec.preset or "")
    for rel, content in (preset.home_seed if preset else {}).items():
        dest = _inside(home, rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(content)
    for rel, source in spec.home_files.items():
        dest = _inside(home, rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        dest.chmod(0o600)
    return env


def build_env(
    spec: AgentSpec,
    *,
    home_env: Mapping[str, str],
    task_vars: Mapping[str, str],
    environ: Mapping[str, str],
    secrets: Sequence[str],
) -> dict[str, str]:
    """The agent's whole environment, built up from nothing.

    In order (later wins): PATH and LANG from `environ` (or defaults), `home_env`, the preset's env,
    the table's env, each `pass_env` name present in `environ`, then `task_vars`. Nothing else from
    `environ` gets through. A variable whose value contains one of `secrets` is dropped, with a
    warning that names the variable and never the value.
    """
    env: dict[str, str] = {
        "PATH": environ.get("PATH") or DEFAULT_PATH,
        "LANG": environ.get("LANG") or DEFAULT_LANG,
    }
    env.update(home_env)
    preset = PRESETS.get(spec.preset or "")
    if preset is not None:
        env.update(preset.env)
    env.update(spec.env)
    for name in spec.pass_env:
        if name in environ:
            env[name] = environ[name]
    env.update(task_vars)
    live_secrets = [s for s in secrets if s]
    for name in list(env):
        if any(s in env[name] for s in live_secrets):
            del env[name]
            logger.warning(
                "agent %s: dropped %s from its environment: the value contains a secret",
                spec.name,
                name,
            )
    return env


# ============================================================================ usage and budget


@dataclass
class Usage:
    """Tokens and cost of one agent run, normalised across CLIs.

    `input_tokens` is fresh (uncached) input only; cached input read back is `cache_read_tokens`
    and input written to a prompt cache is `cache_write_tokens`; `output_tokens` includes reasoning.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float | None = None

    @property
    def total_tokens(self) -> int:
        """Every token the model read or wrote: input + output + cache_read + cache_write.

        Cached reads are counted in full although they are billed cheaper: this is what the
        providers report as total tokens, and `max_cost_usd` is the budget for money.
        """
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "total_tokens": self.total_tokens,
            "cost_usd": self.cost_usd,
        }


def budget_exceeded(usage: Usage, max_tokens: int | None, max_cost_usd: float | None) -> str | None:
    """A reason when usage is over either limit (strictly more than allowed); else None."""
    if max_tokens is not None and usage.total_tokens > max_tokens:
        return f"token budget exceeded: {usage.total_tokens} tokens used, limit {max_tokens}"
    if max_cost_usd is not None and usage.cost_usd is not None and usage.cost_usd > max_cost_usd:
        return f"cost budget exceeded: ${usage.cost_usd:.4f} spent, limit ${max_cost_usd:.2f}"
    return None


@dataclass
class AgentReport:
    summary: str
    session_id: str | None
    usage: Usage
    #: the run failed even if the exit code says 0 (aider exits 0 when the API kept failing)
    failed: bool
    failure: str | None
    #: the failure is an HTTP 429, a quota, a rate limit or an overloaded provider (never set
    #: without `failed`: a run that hit a limit and recovered is not rate limited)
    rate_limited: bool


# ======================================================================= output parsing helpers

_ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*(\x07|\x1b\\)")
_RATE_LIMIT_RE = re.compile(
    r"\b(429|529)\b|rate[ _-]?limit|too many requests|(?<![a-z])quota(?![a-z])|overloaded"
    r"|resource[ _]exhausted|usage limit|out of credits|spend cap|credit limit",
    re.IGNORECASE,
)


def is_rate_limit_text(text: str) -> bool:
    return bool(_RATE_LIMIT_RE.search(text or ""))


def _strip_ansi(text: str) -> str:
    return _ANSI_RE.sub("", text)


def _json_line(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _dict(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one: a CLI's event may lack any field."""
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, (int, float)):
        return max(0, int(value))
    return 0


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _short(text: str, limit: int = FAILURE_MAX_CHARS) -> str:
    text = " ".join(_strip_ansi(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tail(
    output: str, max_chars: int = SUMMARY_MAX_CHARS, max_lines: int = SUMMARY_MAX_LINES
) -> str:
    """The end of an output: at most `max_lines` lines and `max_chars` characters, ANSI removed."""
    lines = _strip_ansi(output).rstrip().splitlines()[-max_lines:]
    text = "\n".join(lines).strip()
    return text[-max_chars:]


def _exit_failure(exit_code: int) -> str:
    if exit_code < 0:
        return f"killed by signal {-exit_code}"
    return f"exited with code {exit_code}"


# ============================================================================ per-preset parsers


class _Parser:
    """Reads an agent's output line by line; `report` turns what it saw into an AgentReport."""

    def __init__(self) -> None:
        self.usage = Usage()
        self.session_id: str | None = None

    def feed(self, line: str) -> None:
        raise NotImplementedError

    def report(self, output: str, exit_code: int) -> AgentReport:
        raise NotImplementedError

    def _finish(
        self,
        *,
        summary: str,
        exit_code: int,
        error: str | None,
        rate_limited: bool,
        completed: bool,
    ) -> AgentReport:
        """Common rules: an error or a non-zero exit fails the run; so does a clean exit that never
        reached the CLI's own end-of-run marker."""
        failure = None
        if error:
            failure = _short(error)
        elif exit_code != 0:
            failure = _exit_failure(exit_code)
        elif not completed:
            failure = "the agent ended without a final result"
        failed = failure is not None
        return AgentReport(
            summary=summary.strip(),
            session_id=self.session_id,
            usage=self.usage,
            failed=failed,
            failure=failure,
            rate_limited=failed and rate_limited,
        )


class _OpencodeParser(_Parser):
    """`opencode run --format json`: one JSON event a line, each with `sessionID`.

    `text` parts carry the assistant's words, `step_finish` the tokens and cost of one model call,
    and an `error` event the failure that ended the run (after opencode's own retries).
    """

    def __init__(self) -> None:
        super().__init__()
        self._texts: list[tuple[str, str]] = []  # (messageID, text)
        self._errors: list[dict[str, Any]] = []
        self._finished = False

    def feed(self, line: str) -> None:
        event = _json_line(line)
        if event is None:
            return
        sid = event.get("sessionID")
        if isinstance(sid, str) and sid and self.session_id is None:
            self.session_id = sid
        part = _dict(event.get("part"))
        kind = event.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            self._texts.append((str(part.get("messageID", "")), part["text"]))
        elif kind == "step_finish":
            tokens = _dict(part.get("tokens"))
            cache = _dict(tokens.get("cache"))
            self.usage.input_tokens += _int(tokens.get("input"))
            self.usage.output_tokens += _int(tokens.get("output")) + _int(tokens.get("reasoning"))
            self.usage.cache_read_tokens += _int(cache.get("read"))
            self.usage.cache_write_tokens += _int(cache.get("write"))
            cost = _float(part.get("cost"))
            if cost is not None:
                self.usage.cost_usd = (self.usage.cost_usd or 0.0) + cost
            reason = part.get("reason")
            if isinstance(reason, str) and reason not in ("tool-calls", "tool_calls"):
                self._finished = True
        elif kind == "error":
            self._errors.append(_dict(event.get("error")))

    def report(self, output: str, exit_code: int) -> AgentReport:
        summary = ""
        if self._texts:
            last_message = self._texts[-1][0]
            summary = "\n\n".join(t for m, t in self._texts if m == last_message)
        error, limited = None, False
        if self._errors:
            err = self._errors[-1]
            data = _dict(err.get("data"))
            status = data.get("statusCode")
            message = str(data.get("message") or err.get("message") or "")
            error = f"{err.get('name') or 'error'}: {message or 'no message'}"
            if isinstance(status, int):
                error += f" (HTTP {status})"
            limited = status in (429, 529) or is_rate_limit_text(
                " ".join([message, str(err.get("name") or ""), str(data.get("responseBody") or "")])
            )
        return self._finish(
            summary=summary,
            exit_code=exit_code,
            error=error,
            rate_limited=limited,
            completed=self._finished,
        )


class _ClaudeParser(_Parser):
    """`claude -p --output-format stream-json --verbose` (plain `json` output parses too).

    `assistant` events carry each model call's usage as it starts (several events share one
    message id; the last one counts); the closing `result` event has the run's exact totals,
    `total_cost_usd`, `session_id`, `is_error` and `api_error_status`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[str, dict[str, Any]] = {}
        self._last_text = ""
        self._result: dict[str, Any] | None = None
        self._error_kind: str | None = None

    def feed(self, line: str) -> None:
        event = _json_line(line)
        if event is None:
            return
        sid = event.get("session_id")
        if isinstance(sid, str) and sid:
            self.session_id = sid
        kind = event.get("type")
        if kind == "assistant" and isinstance(event.get("message"), dict):
            message = event["message"]
            if isinstance(event.get("error"), str):
                self._error_kind = event["error"]
            for block in message.get("content") or []:
                if isinstance(block, dict) and block.get("type") == "text" and block.get("text"):
                    self._last_text = block["text"]
            if self._result is None and isinstance(message.get("usage"), dict):
                self._live[str(message.get("id", len(self._live)))] = message["usage"]
                self._set_usage(self._live.values(), cost=None)
        elif kind == "result" and ("subtype" in event or isinstance(event.get("is_error"), bool)):
            self._result = event
            usage = _dict(event.get("usage"))
            self._set_usage([usage], cost=_float(event.get("total_cost_usd")))

    def _set_usage(self, usages: Iterable[Mapping[str, Any]], cost: float | None) -> None:
        total = Usage(cost_usd=cost)
        for u in usages:
            total.input_tokens += _int(u.get("input_tokens"))
            total.output_tokens += _int(u.get("output_tokens"))
            total.cache_read_tokens += _int(u.get("cache_read_input_tokens"))
            total.cache_write_tokens += _int(u.get("cache_creation_input_tokens"))
        self.usage = total

    def report(self, output: str, exit_code: int) -> AgentReport:
        result = self._result
        if result is None:
            return self._finish(
                summary=self._last_text,
                exit_code=exit_code,
                error=None,
                rate_limited=False,
                completed=False,
            )
        text = result["result"] if isinstance(result.get("result"), str) else ""
        error, limited = None, False
        status = result.get("api_error_status")
        if result.get("is_error") or str(result.get("subtype", "success")) != "success":
            error = text or str(result.get("subtype") or "error")
            if isinstance(status, int) and str(status) not in error:
                error += f" (HTTP {status})"
            limited = (
                status in (429, 529)
                or self._error_kind in ("rate_limit", "overloaded")
                or is_rate_limit_text(text)
            )
        summary = text if error is None else ""
        return self._finish(
            summary=summary, exit_code=exit_code, error=error, rate_limited=limited, completed=True
        )


class _CodexParser(_Parser):
    """`codex exec --json`: `thread.started` (thread_id), `item.completed` items (agent_message
    text, command_execution, non-fatal `error` items), `turn.completed` with usage, or
    `turn.failed`. Top-level `error` events also report retries that may still succeed.

    codex reports the thread's cumulative usage, so after `resume` it includes earlier runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_message = ""
        self._turn_failed: str | None = None
        self._last_error: str | None = None
        self._completed = False

    def feed(self, line: str) -> None:
        event = _json_line(line)
        if event is None:
            return
        kind = event.get("type")
        if kind == "thread.started" and isinstance(event.get("thread_id"), str):
            self.session_id = event["thread_id"]
        elif kind == "item.completed" and isinstance(event.get("item"), dict):
            item = event["item"]
            if item.get("type") == "agent_message" and isinstance(item.get("text"), str):
                self._last_message = item["text"]
        elif kind == "turn.completed":
            self._completed = True
            u = _dict(event.get("usage"))
            cached = _int(u.get("cached_input_tokens"))
            written = _int(u.get("cache_write_input_tokens"))
            self.usage = Usage(
                input_tokens=max(0, _int(u.get("input_tokens")) - cached - written),
                output_tokens=_int(u.get("output_tokens")),
                cache_read_tokens=cached,
                cache_write_tokens=written,
            )
        elif kind == "turn.failed":
            err = _dict(event.get("error"))
            self._turn_failed = str(err.get("message") or "turn failed")
        elif kind == "error" and isinstance(event.get("message"), str):
            self._last_error = event["message"]

    def report(self, output: str, exit_code: int) -> AgentReport:
        error = self._turn_failed
        if error is None and exit_code != 0 and self._last_error:
            error = self._last_error
        # codex words an overloaded provider (and any 5xx) as "experiencing high demand"
        limited = error is not None and (
            is_rate_limit_text(error) or "high demand" in error.lower()
        )
        return self._finish(
            summary=self._last_message,
            exit_code=exit_code,
            error=error,
            rate_limited=limited,
            completed=self._completed,
        )


_AIDER_TOKENS_RE = re.compile(
    r"^Tokens: (?P<sent>[\d.]+k?) sent"
    r"(?:, (?P<write>[\d.]+k?) cache write)?(?:, (?P<hit>[\d.]+k?) cache hit)?"
    r", (?P<received>[\d.]+k?) received\."
)
_AIDER_COST_RE = re.compile(r"Cost: \$(?P<message>[\d.]+) message, \$(?P<session>[\d.]+) session\.")
_AIDER_ERROR_RE = re.compile(r"^litellm\.(?P<name>[A-Za-z]+(?:Error|Exception)): ?(?P<message>.*)$")
_AIDER_HEADER_RE = re.compile(
    r"^(Aider v|Model: |Weak model: |Git repo: |Repo-map: |Added .* to the chat|"
    r"Main model: |Editor model: |Cur working dir: |Git working dir: )"
)
# aider's own explanation lines printed under an API error, not part of the provider's message
_AIDER_HINTS = ("The API provider", "Retrying in ", "https://", "Try again", "Or visit ")


def _aider_count(value: str | None) -> int:
    """aider prints 595, 2.3k or 12k: back to a whole number (to within its rounding)."""
    if not value:
        return 0
    if value.endswith("k"):
        return round(float(value[:-1]) * 1000)
    return int(float(value))


class _AiderParser(_Parser):
    """aider's plain text (`--no-pretty`). Each `Tokens: ... sent, ... received.` line reports one
    reply (counts are rounded to 0.1k); `Cost: $x message, $y session.` gives the running total.

    aider retries API errors for about a minute and then exits 0, so a run whose last event is
    an API error (`litellm.SomethingError: ...`) with no reply after it is a failure.
    """

    def __init__(self) -> None:
        super().__init__()
        self._error: tuple[str, str] | None = (
            None  # (exception name, message) of the last API error
        )
        self._replies = 0

    def feed(self, line: str) -> None:
        line = _strip_ansi(line).rstrip()
        m = _AIDER_TOKENS_RE.match(line)
        if m:
            sent, hit, write = (
                _aider_count(m["sent"]),
                _aider_count(m["hit"]),
                _aider_count(m["write"]),
            )
            self.usage.input_tokens += max(0, sent - hit - write)
            self.usage.cache_read_tokens += hit
            self.usage.cache_write_tokens += write
            self.usage.output_tokens += _aider_count(m["received"])
            self._replies += 1
            self._error = None
        c = _AIDER_COST_RE.search(line)
        if c:
            self.usage.cost_usd = float(c["session"])
            return
        e = _AIDER_ERROR_RE.match(line)
        if e and not m:
            self._error = (e["name"], e["message"])
        elif (
            self._error is not None
            and line
            and not line.startswith(_AIDER_HINTS)
            and len(self._error[1]) < 400
        ):
            # the provider's message often wraps onto the next lines
            self._error = (self._error[0], f"{self._error[1]} {line}".strip())

    def report(self, output: str, exit_code: int) -> AgentReport:
        error, limited = None, False
        if self._error is not None:
            name, message = self._error
            error = f"{name}: {message}".strip()
            limited = name in ("RateLimitError",) or is_rate_limit_text(message)
        elif self._replies == 0 and exit_code == 0:
            error = "aider printed no reply from the model"
        return self._finish(
            summary=_aider_last_reply(output),
            exit_code=exit_code,
            error=error,
            rate_limited=limited,
            completed=True,
        )


def _aider_last_reply(output: str) -> str:
    """The text of aider's last reply: the lines just before its last `Tokens:` line, back to the
    previous `Tokens:` line, the start-up header or an omission marker."""
    lines = _strip_ansi(output).splitlines()
    ends = [i for i, line in enumerate(lines) if _AIDER_TOKENS_RE.match(line.strip())]
    if not ends:
        return tail(output)
    end = ends[-1]
    start = ends[-2] + 1 if len(ends) > 1 else 0
    for i in range(end - 1, start - 1, -1):
        if _AIDER_HEADER_RE.match(lines[i]) or OMITTED_RE.match(lines[i].strip()):
            start = i + 1
            break
    return tail("\n".join(lines[start:end]))


class _CustomParser(_Parser):
    """Any other command: no usage, no session; the summary is the tail of its output and
    failure is a non-zero exit (rate limits are recognised only in the tail of a failed run)."""

    def feed(self, line: str) -> None:
        pass

    def report(self, output: str, exit_code: int) -> AgentReport:
        summary = tail(output)
        error, limited = None, False
        if exit_code != 0:
            last = "\n".join(summary.splitlines()[-3:])
            error = _exit_failure(exit_code) + (f": {last}" if last else "")
            limited = is_rate_limit_text(summary)
        return self._finish(
            summary=summary, exit_code=exit_code, error=error, rate_limited=limited, completed=True
        )


_PARSERS: dict[str, Callable[[], _Parser]] = {
    "opencode": _OpencodeParser,
    "claude": _ClaudeParser,
    "codex": _CodexParser,
    "aider": _AiderParser,
}


def _parser_for(spec: AgentSpec) -> _Parser:
    return _PARSERS.get(spec.preset or "", _CustomParser)()


def parse_output(spec: AgentSpec, output: str, exit_code: int) -> AgentReport:
    """What the agent's output says happened.

    Lines that are not what the CLI prints (garbage, stderr noise, a line cut in half, the
    `[kugetsu: N bytes of output omitted]` marker) are skipped. From a log whose middle was
    omitted, opencode and aider usage misses what was omitted; the `UsageMeter` fed while the
    agent ran saw everything.
    """
    parser = _parser_for(spec)
    for line in output.splitlines():
        parser.feed(line)
    return parser.report(output, exit_code)


class UsageMeter:
    """Usage and session id seen so far, fed one output line at a time while the agent runs.

    opencode reports each model call as it ends; claude each call as it starts (output tokens
    are only exact at the end, and cost only at the end); codex once, at the end of its turn;
    aider after each reply. A custom command reports nothing.
    """

    def __init__(self, spec: AgentSpec):
        self.spec = spec
        self._parser = _parser_for(spec)

    def feed(self, line: str) -> None:
        self._parser.feed(line)

    @property
    def usage(self) -> Usage:
        return self._parser.usage

    @property
    def session_id(self) -> str | None:
        return self._parser.session_id

    def exceeded(self, max_tokens: int | None, max_cost_usd: float | None) -> str | None:
        return budget_exceeded(self.usage, max_tokens, max_cost_usd)
