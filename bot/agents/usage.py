"""Tokens and cost of an agent's run, and the budgets that stop it.

`Usage` is the same for every CLI; `UsageMeter` is fed the agent's output line by line
while it runs, so a run over its budget is stopped before it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.agents.launch import AgentSpec


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


class UsageMeter:
    """Usage and session id seen so far, fed one output line at a time while the agent runs.

    opencode reports each model call as it ends; claude each call as it starts (output tokens
    are only exact at the end, and cost only at the end); codex once, at the end of its turn;
    aider after each reply. A custom command reports nothing.
    """

    def __init__(self, spec: AgentSpec):
        self.spec = spec
        self._parser = spec.new_parser()

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
