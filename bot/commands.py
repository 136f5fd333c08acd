"""Slash commands: one registry of verbs with their usage and help text.

Pure. `parse_comment()` finds the first command line of a comment, skipping
quoted lines (`> /kugetsu stop`) and fenced or indented code blocks; `help_text()`
is generated from the registry, so help can never drift from what is parsed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Verb:
    name: str
    usage: str
    help: str
    aliases: tuple[str, ...] = ()
    text: str = "none"           # "none" | "optional" | "required"
    needs_permission: bool = True


REGISTRY: tuple[Verb, ...] = (
    Verb("start", "start [instructions]",
         "Start work on this issue; optional instructions are added to the issue text.",
         text="optional"),
    Verb("continue", "continue <instructions>",
         "Follow up in the same worktree, branch and agent session (on the issue or its PR).",
         text="required"),
    Verb("stop", "stop", "Stop the running or queued task for this issue.", aliases=("cancel",)),
    Verb("status", "status", "Reply with the state of this issue's tasks.",
         needs_permission=False),
    Verb("retry", "retry", "Queue the last failed or stopped task again, with fresh attempts."),
    Verb("help", "help", "Show this help.", needs_permission=False),
)

FLAGS = {
    "--agent": ("agent", str, "run this request with the named agent"),
    "--max-tokens": ("max_tokens", int, "stop the agent when it has used this many tokens"),
    "--max-cost": ("max_cost_usd", float, "stop the agent when it has cost this many USD"),
}

_BY_NAME = {alias: verb for verb in REGISTRY for alias in (verb.name, *verb.aliases)}
AUTO = "auto"  # text without a verb: continue if the issue has a task, else start


@dataclass(frozen=True)
class Command:
    verb: str                          # a registry name, or AUTO
    text: str = ""
    agent: str | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CommandError:
    message: str
    usage: str


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _command_lines(body: str, word: str) -> list[tuple[int, str]]:
    """Lines that may carry a command: outside code blocks, not quoted, not indented code."""
    out = []
    fence: str | None = None
    for index, line in enumerate(body.splitlines()):
        m = _FENCE.match(line)
        if fence is not None:
            # CommonMark: a closing fence is the same character, at least as long, and
            # nothing after it but spaces ("```python" inside a block does not close it)
            if (m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence)
                    and not line[m.end():].strip()):
                fence = None
            continue
        if m:
            fence = m.group(1)
            continue
        if line.startswith(("    ", "\t")):
            continue  # indented code block
        stripped = line.strip()
        if stripped.startswith(">"):
            continue  # quoted reply
        if stripped == word or stripped.startswith(word + " ") or stripped.startswith(word + "\t"):
            out.append((index, stripped))
    return out


def _split_flags(words: list[str]) -> tuple[dict, list[str], str | None]:
    """Consume leading --flags; returns (options, rest, error)."""
    options: dict = {}
    rest = list(words)
    while rest and rest[0].startswith("--"):
        flag, _, inline = rest.pop(0).partition("=")
        if flag not in FLAGS:
            return options, rest, f"unknown option {flag}"
        if not inline:
            if not rest:
                return options, rest, f"{flag} needs a value"
            inline = rest.pop(0)
        key, kind, _ = FLAGS[flag]
        try:
            value = kind(inline)
        except ValueError:
            return options, rest, f"{flag} needs a {kind.__name__}, got {inline!r}"
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value > 0):
            return options, rest, f"{flag} must be a number greater than 0"
        if key == "agent" and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            return options, rest, f"{flag} takes an agent name, got {inline!r}"
        options[key] = value
    return options, rest, None


def parse_comment(body: str, word: str = "/kugetsu") -> Command | CommandError | None:
    """The command in a comment, an error to answer with usage, or None if there is none.

    The instruction text is the rest of the command line plus the lines after it,
    so multi-line instructions work.
    """
    lines = _command_lines(body, word)
    if not lines:
        return None
    index, line = lines[0]
    after = line[len(word):].strip()
    words = after.split()
    options, rest, error = _split_flags(words)
    if error:
        return CommandError(error, usage_line(word))
    verb_name = rest[0].lower() if rest else ""
    verb = _BY_NAME.get(verb_name)
    if verb is not None:
        rest = rest[1:]
        more, rest, error = _split_flags(rest)
        if error:
            return CommandError(error, usage_line(word, verb))
        options.update(more)
    following = "\n".join(body.splitlines()[index + 1:]).strip()
    text = " ".join(rest)
    if following:
        text = f"{text}\n{following}".strip()

    if verb is None:
        if not text:
            return Command("help", options=options)
        return Command(AUTO, text=text, options=options, **options)
    if verb.text == "none":
        text = ""  # trailing words after a control verb are ignored, not guessed at
    if verb.text == "required" and not text:
        return CommandError(f"{verb.name} needs instructions", usage_line(word, verb))
    return Command(verb.name, text=text, options=options, **options)


def usage_line(word: str, verb: Verb | None = None) -> str:
    if verb is not None:
        return f"`{word} {verb.usage}`"
    return f"`{word} <{'|'.join(v.name for v in REGISTRY)}> ...`"


def help_text(word: str = "/kugetsu", label: str = "kugetsu") -> str:
    rows = ["| command | what it does |", "|---|---|"]
    for verb in REGISTRY:
        alias = f" (also `{word} {verb.aliases[0]}`)" if verb.aliases else ""
        rows.append(f"| `{word} {verb.usage}`{alias} | {verb.help} |")
    rows.append(f"| `{word} <instructions>` | Continue if this issue already has a task, "
                "else start. |")
    flags = "\n".join(f"- `{flag} ...`: {desc}" for flag, (_, _, desc) in FLAGS.items())
    return (
        f"**kugetsu** turns this issue into a pull request written by an AI coding agent. "
        f"Add the label `{label}`, or comment one of these on its own line:\n\n"
        + "\n".join(rows)
        + f"\n\nOptions, after the command word or the verb:\n{flags}\n\n"
        "Quoted lines and code blocks are never read as commands. Starting, following up, "
        "stopping and retrying need write access to the repository."
    )
