"""Slash commands: one registry of verbs with their usage and help text.

Pure. `parse_comment()` finds the first command line of a comment: a line that a
reader of the rendered comment sees as plain text (`core.markdown` decides which, so
quoted lines, code blocks and HTML comments are never read); the help text
(`core.render.help_text`) is generated from the registry, so help can never drift from
what is parsed.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from bot.core import markdown, names


@dataclass(frozen=True)
class Verb:
    name: str
    usage: str
    help: str
    aliases: tuple[str, ...] = ()
    text: str = "none"  # "none" | "optional" | "required"
    needs_permission: bool = True


REGISTRY: tuple[Verb, ...] = (
    Verb(
        "start",
        "start [instructions]",
        "Start work on this issue; optional instructions are added to the issue text.",
        text="optional",
    ),
    Verb(
        "continue",
        "continue <instructions>",
        "Follow up in the same worktree, branch and agent session (on the issue or its PR).",
        text="required",
    ),
    Verb("stop", "stop", "Stop the running or queued task for this issue.", aliases=("cancel",)),
    Verb("status", "status", "Reply with the state of this issue's tasks.", needs_permission=False),
    Verb("retry", "retry", "Queue the last failed or stopped task again, with fresh attempts."),
    Verb("help", "help", "Show this help.", needs_permission=False),
)

#: the largest budgets a request may set: far above any real run, and bounded so that a
#: number of any size is answered with a reason instead of overflowing later
MAX_TOKENS = 10**12
MAX_COST_USD = 1_000_000

FLAGS = {
    "--agent": ("agent", str, "run this request with the named agent", None),
    "--max-tokens": (
        "max_tokens",
        int,
        "stop the agent when it has used this many tokens",
        MAX_TOKENS,
    ),
    "--max-cost": (
        "max_cost_usd",
        float,
        "stop the agent when it has cost this many USD",
        MAX_COST_USD,
    ),
}
_KIND_NAMES = {int: "a whole number", float: "a number"}

#: a command is looked for in this much of a comment, so a huge one costs no more to read
MAX_COMMAND_SCAN_CHARS = 64 * 1024

_BY_NAME = {alias: verb for verb in REGISTRY for alias in (verb.name, *verb.aliases)}
AUTO = "auto"  # text without a verb: continue if the issue has a task, else start


@dataclass(frozen=True)
class Command:
    verb: str  # a registry name, or AUTO
    text: str = ""
    agent: str | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommandError:
    message: str
    usage: str


@dataclass(frozen=True)
class UnknownVerb:
    """A command of one word that is no verb (`/kugetsu stpo`): a typo far more often than
    an instruction, so it is answered with the help instead of a paid run."""

    word: str
    #: the verbs it is close to, best first
    suggestions: tuple[str, ...] = ()


#: a word that reads as a verb: letters alone, as verbs are written
_VERB_LIKE = re.compile(r"[A-Za-z][A-Za-z-]{1,29}")


def _command_line(body: str, word: str) -> tuple[int, str, str] | None:
    """The first line that a reader sees as plain text and that starts with the word:
    (its index, the line, the rest of the comment after it).

    Only lines that start in the first MAX_COMMAND_SCAN_CHARS characters are looked at
    (the last of them read only up to there: its start is all that matters).
    """
    complete = len(body) <= MAX_COMMAND_SCAN_CHARS
    lines = markdown.split_lines(body if complete else body[:MAX_COMMAND_SCAN_CHARS])
    for index in markdown.plain_lines(lines, complete=complete):
        if lines[index].strip().startswith(word):
            parts = [*markdown.split_lines(body, maxsplit=index + 1), ""]
            stripped, rest = parts[index].strip(), parts[index + 1]
            if (
                stripped == word
                or stripped.startswith(word + " ")
                or stripped.startswith(word + "\t")
            ):
                return index, stripped, rest
    return None


def _split_flags(words: list[str]) -> tuple[dict[str, Any], list[str], str | None]:
    """Consume leading --flags; returns (options, rest, error)."""
    options: dict[str, Any] = {}
    rest = list(words)
    while rest and rest[0].startswith("--"):
        flag, _, inline = rest.pop(0).partition("=")
        if flag not in FLAGS:
            return options, rest, f"unknown option {flag}"
        if not inline:
            if not rest:
                return options, rest, f"{flag} needs a value"
            inline = rest.pop(0)
        key, kind, _, limit = FLAGS[flag]
        try:
            value = kind(inline)
        except ValueError:  # also an int of more than 4,300 digits
            return (
                options,
                rest,
                f"{flag} needs {_KIND_NAMES.get(kind, kind.__name__)}, got {names.shown(inline)}",
            )
        if limit is not None and not (math.isfinite(value) and 0 < value <= limit):
            return options, rest, f"{flag} must be greater than 0 and at most {limit:,}"
        if key == "agent" and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            return options, rest, f"{flag} takes an agent name, got {inline!r}"
        options[key] = value
    return options, rest, None


def parse_comment(
    body: str, word: str = "/kugetsu", *, instructions: bool = False
) -> Command | CommandError | UnknownVerb | None:
    """The command in a comment, an error to answer with usage, or None if there is none.

    The instruction text is the rest of the command line plus the lines after it,
    so multi-line instructions work. With `instructions`, what the command is written in
    says what to do (a review's comments): the word alone, or `continue` without text,
    then asks for work instead of for help or for text.
    """
    if word not in body:
        return None  # most comments: no need to read their markdown
    found = _command_line(body, word)
    if found is None:
        return None
    _index, line, after_line = found
    after = line[len(word) :].strip()
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
    following = "\n".join(markdown.split_lines(after_line)).strip()
    text = " ".join(rest)
    if following:
        text = f"{text}\n{following}".strip()

    if verb is None:
        if not text:
            if instructions:
                return Command(AUTO, options=options, **options)
            return Command("help", options=options)
        if len(rest) == 1 and not following and _VERB_LIKE.fullmatch(rest[0]):
            return UnknownVerb(rest[0], suggest(rest[0]))
        return Command(AUTO, text=text, options=options, **options)
    if verb.text == "none":
        text = ""  # trailing words after a control verb are ignored, not guessed at
    if verb.text == "required" and not text and not instructions:
        return CommandError(f"{verb.name} needs instructions", usage_line(word, verb))
    return Command(verb.name, text=text, options=options, **options)


def suggest(word: str) -> tuple[str, ...]:
    """The verbs (or their aliases) a mistyped word is close to, best first."""
    return tuple(difflib.get_close_matches(word.lower(), list(_BY_NAME), n=2, cutoff=0.6))


def usage_line(word: str, verb: Verb | None = None) -> str:
    if verb is not None:
        return f"`{word} {verb.usage}`"
    return f"`{word} <{'|'.join(v.name for v in REGISTRY)}> ...`"
