"""From a configured agent name to a command line, a home and an environment.

Nothing here starts a process (the worker's runner does, through one function). The
runner asks:

- `resolve(agents_config, name)`: an `AgentSpec`, a preset merged with an
  ``[agents.NAME]`` table, or a custom command;
- `argv_for(spec, ...)`: the argument vector (start, or resume when a session id is known);
- `prepare_home(spec, home)` and `build_env(spec, ...)`: a per-issue home and a scrubbed
  environment;
- `parse_output(spec, output, exit_code)`: an `AgentReport` (summary, session id, usage,
  failure); `usage.UsageMeter(spec)` reads the same while the agent runs.

The config's types are met here as the protocols `AgentsSettings` and `AgentTable`:
the config imports this package to check its tables, never the other way round.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bot.agents.parsers import AgentReport, Parser
from bot.agents.presets import CUSTOM, PLACEHOLDERS, PRESETS, Preset, frozen, resumes

logger = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_LANG = "C.UTF-8"


class AgentTable(Protocol):
    """One `[agents.NAME]` table (`config.AgentConfig`)."""

    @property
    def preset(self) -> str | None: ...
    @property
    def command(self) -> tuple[str, ...] | None: ...
    @property
    def resume_command(self) -> tuple[str, ...] | None: ...
    @property
    def env(self) -> Mapping[str, str]: ...
    @property
    def pass_env(self) -> tuple[str, ...] | None: ...
    @property
    def max_tokens(self) -> int | None: ...
    @property
    def max_cost_usd(self) -> float | None: ...
    @property
    def home_files(self) -> Mapping[str, str]: ...


class AgentsSettings(Protocol):
    """The `[agents]` section (`config.AgentsConfig`), as far as resolving a name needs it."""

    @property
    def tables(self) -> Mapping[str, AgentTable]: ...
    @property
    def max_tokens(self) -> int | None: ...
    @property
    def max_cost_usd(self) -> float | None: ...


class UnknownAgent(ValueError):
    """No preset and no [agents.NAME] table has this name (or the table has no command)."""


@dataclass(frozen=True)
class AgentSpec:
    """What the runner runs: a preset merged with an [agents.NAME] table, or a custom command.

    `env` is the table's env only; `build_env` adds the preset's env under it. `base` is
    the preset (`presets.CUSTOM` for a command without one).
    """

    name: str
    base: Preset
    command: tuple[str, ...]
    resume_command: tuple[str, ...] | None
    env: Mapping[str, str]
    pass_env: tuple[str, ...]
    max_tokens: int | None
    max_cost_usd: float | None
    home_files: Mapping[str, str]

    @property
    def preset(self) -> str | None:
        """The name of the preset it is based on; None for a custom command."""
        return None if self.base is CUSTOM else self.base.name

    @property
    def sessions(self) -> bool:
        """True when a follow-up can resume the agent's own session."""
        return resumes(self.resume_command)

    def new_parser(self) -> Parser:
        return self.base.new_parser()


def resolve(agents: AgentsSettings, name: str) -> AgentSpec:
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
            base=preset,
            command=preset.command,
            resume_command=preset.resume_command,
            env=frozen({}),
            pass_env=preset.pass_env,
            max_tokens=agents.max_tokens,
            max_cost_usd=agents.max_cost_usd,
            home_files=frozen({}),
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
        base=base or CUSTOM,
        command=tuple(command),
        resume_command=tuple(resume) if resume is not None else None,
        env=frozen(table.env),
        pass_env=tuple(pass_env),
        max_tokens=table.max_tokens if table.max_tokens is not None else agents.max_tokens,
        max_cost_usd=table.max_cost_usd if table.max_cost_usd is not None else agents.max_cost_usd,
        home_files=frozen(table.home_files),
    )


def agent_path(spec: AgentSpec, environ: Mapping[str, str]) -> str:
    """The PATH the agent runs with (`build_env`'s)."""
    return build_env(spec, home_env={}, task_vars={}, environ=environ, secrets=())["PATH"]


def find_program(spec: AgentSpec, environ: Mapping[str, str]) -> str | None:
    """Where the agent's program is: the first word of its command, an executable file
    named as a path or found on the PATH the agent gets; None if there is none."""
    return shutil.which(spec.command[0], path=agent_path(spec, environ))


def configured(agents: AgentsSettings) -> frozenset[str]:
    """Every agent a name may stand for: the presets and the `[agents.NAME]` tables."""
    return frozenset(PRESETS) | frozenset(agents.tables)


def available(agents: AgentsSettings, environ: Mapping[str, str]) -> frozenset[str]:
    """The agents a request may name, and that `help` lists: those configured that
    resolve and whose program is installed."""
    found = set()
    for name in sorted(configured(agents)):
        try:
            spec = resolve(agents, name)
        except UnknownAgent:
            continue
        if find_program(spec, environ) is not None:
            found.add(name)
    return frozenset(found)


# ============================================================================ command lines

_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


def fill(
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

    def value(match: re.Match[str]) -> str:
        found = values[match.group(1)]
        if found is None:
            raise ValueError(f"the command uses {{{match.group(1)}}} but there is no value for it")
        return found

    return [_PLACEHOLDER_RE.sub(value, arg) for arg in template]


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
        return fill(
            spec.resume_command,
            prompt=prompt,
            prompt_file=prompt_file,
            workdir=workdir,
            session_id=session_id,
        )
    return fill(
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


def _inside(home: Path, rel: str) -> Path:
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ValueError(f"home file {rel!r} must be a relative path inside the agent home")
    return home / rel


def prepare_home(spec: AgentSpec, home: Path) -> dict[str, str]:
    """Create the per-issue agent home and return the variables that point the CLI at it.

    HOME and the four XDG directories always, and the preset's `home_vars` (CODEX_HOME for
    codex, CLAUDE_CONFIG_DIR for claude).
    The preset's seed files are written and `spec.home_files` (relative path in the home <- source
    file) are copied each time, so a changed source reaches the next run. Everything else in an
    existing home is left alone: a follow-up on the same issue finds the CLI's own session there.
    """
    home = Path(home).absolute()
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    env = {"HOME": str(home)}
    dirs = dict(_XDG)
    dirs.update(spec.base.home_vars)
    for var, rel in dirs.items():
        path = home / rel
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    for rel, content in spec.base.home_seed.items():
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
    sandboxed: bool = False,
) -> dict[str, str]:
    """The agent's whole environment, built up from nothing.

    In order (later wins): PATH and LANG from `environ` (or defaults), `home_env`, the preset's env,
    its `sandbox_env` when the agent runs as a slot's uid (`sandboxed`), the table's env, each
    `pass_env` name present in `environ`, then `task_vars`. Nothing else from `environ` gets
    through. A variable whose value contains one of `secrets` is dropped, with a warning that
    names the variable and never the value.
    """
    env: dict[str, str] = {
        "PATH": environ.get("PATH") or DEFAULT_PATH,
        "LANG": environ.get("LANG") or DEFAULT_LANG,
    }
    env.update(home_env)
    env.update(spec.base.env)
    if sandboxed:
        env.update(spec.base.sandbox_env)
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
                "variable dropped from the agent's environment: its value contains a secret",
                extra={"agent": spec.name, "variable": name},
            )
    return env


# ============================================================================ output


def parse_output(spec: AgentSpec, output: str, exit_code: int) -> AgentReport:
    """What the agent's output says happened.

    Lines that are not what the CLI prints (garbage, stderr noise, a line cut in half, the
    `[kugetsu: N bytes of output omitted]` marker) are skipped. From a log whose middle was
    omitted, opencode and aider usage misses what was omitted; the `UsageMeter` fed while the
    agent ran saw everything.
    """
    parser = spec.new_parser()
    for line in output.splitlines():
        parser.feed(line)
    return parser.report(output, exit_code)
