"""Agent CLIs: what kugetsu knows of each, and how it runs and reads one.

- `presets`: one `Preset` object per CLI (command lines, environment, home variables,
  seed files, output parser, rate-limit words); adding a CLI is one entry;
- `launch`: from a configured name to an `AgentSpec`, its command line, home and
  environment, and reading its output when it ends;
- `parsers`: one parser per output format, giving an `AgentReport`;
- `usage`: tokens and cost, budgets, and the `UsageMeter` fed while the agent runs.

Nothing here starts a process: `bot.worker.runner` does.
"""

from bot.agents.launch import (
    DEFAULT_PATH,
    AgentSpec,
    UnknownAgent,
    agent_path,
    argv_for,
    available,
    build_env,
    configured,
    fill,
    find_program,
    new_session_id,
    parse_output,
    prepare_home,
    resolve,
)
from bot.agents.parsers import AgentReport
from bot.agents.presets import PLACEHOLDERS, PRESETS, Preset
from bot.agents.usage import Usage, UsageMeter, budget_exceeded

__all__ = [
    "DEFAULT_PATH",
    "PLACEHOLDERS",
    "PRESETS",
    "AgentReport",
    "AgentSpec",
    "Preset",
    "UnknownAgent",
    "Usage",
    "UsageMeter",
    "agent_path",
    "argv_for",
    "available",
    "budget_exceeded",
    "build_env",
    "configured",
    "fill",
    "find_program",
    "new_session_id",
    "parse_output",
    "prepare_home",
    "resolve",
]
