"""The command registry: every verb, options, quoted replies and code blocks."""

import pytest

from bot import commands
from bot.commands import AUTO, Command, CommandError, parse_comment


@pytest.mark.parametrize("body, verb, text", [
    ("/kugetsu start", "start", ""),
    ("/kugetsu start fix the tests first", "start", "fix the tests first"),
    ("/kugetsu START now", "start", "now"),
    ("/kugetsu continue add a test", "continue", "add a test"),
    ("/kugetsu stop", "stop", ""),
    ("/kugetsu cancel", "stop", ""),
    ("/kugetsu status", "status", ""),
    ("/kugetsu retry", "retry", ""),
    ("/kugetsu help", "help", ""),
    ("/kugetsu", "help", ""),
    ("/kugetsu please also update the docs", AUTO, "please also update the docs"),
    ("Thanks!\n\n/kugetsu start\nUse the new API.\nKeep it small.", "start",
     "Use the new API.\nKeep it small."),
    ("  /kugetsu stop", "stop", ""),
    ("/kugetsu stop it now please", "stop", ""),
])
def test_verbs(body, verb, text):
    command = parse_comment(body)
    assert isinstance(command, Command)
    assert command.verb == verb
    assert command.text == text


@pytest.mark.parametrize("body", [
    "> /kugetsu stop",
    "> > /kugetsu start",
    "```\n/kugetsu start\n```",
    "~~~sh\n/kugetsu stop\n~~~",
    "    /kugetsu start",
    "we could run /kugetsu start later",
    "/kugetsustart",
    "/kugetsu-bot start",
    "",
    "Quote:\n> /kugetsu stop\nthanks",
])
def test_no_command(body):
    assert parse_comment(body) is None


def test_command_after_a_code_block_is_read():
    body = "```\n/kugetsu stop\n```\n/kugetsu status"
    assert parse_comment(body).verb == "status"


def test_unclosed_fence_hides_the_rest():
    assert parse_comment("```\n/kugetsu stop") is None


def test_options():
    c = parse_comment("/kugetsu start --agent claude --max-tokens 5000 fix it")
    assert (c.verb, c.agent, c.max_tokens, c.text) == ("start", "claude", 5000, "fix it")
    c = parse_comment("/kugetsu --agent=codex continue more tests")
    assert (c.verb, c.agent, c.text) == ("continue", "codex", "more tests")
    c = parse_comment("/kugetsu --max-cost 0.5 do the thing")
    assert (c.verb, c.max_cost_usd, c.text) == (AUTO, 0.5, "do the thing")


@pytest.mark.parametrize("body, fragment", [
    ("/kugetsu continue", "needs instructions"),
    ("/kugetsu start --agent", "needs a value"),
    ("/kugetsu start --bogus x", "unknown option"),
    ("/kugetsu start --max-tokens lots", "needs a int"),
    ("/kugetsu start --max-tokens -5", "greater than 0"),
    ("/kugetsu start --agent ../../bin/sh", "agent name"),
    ("/kugetsu start --max-cost nan go", "greater than 0"),
    ("/kugetsu continue --max-cost inf go", "greater than 0"),
    ("/kugetsu start --max-cost -inf go", "greater than 0"),
])
def test_errors(body, fragment):
    result = parse_comment(body)
    assert isinstance(result, CommandError)
    assert fragment in result.message
    assert result.usage.startswith("`/kugetsu")


def test_custom_command_word():
    assert parse_comment("/bot start", word="/bot").verb == "start"
    assert parse_comment("/kugetsu start", word="/bot") is None


def test_help_is_generated_from_the_registry():
    text = commands.help_text("/kugetsu", "kugetsu")
    for verb in commands.REGISTRY:
        assert f"/kugetsu {verb.usage}" in text
        assert verb.help in text
    for flag in commands.FLAGS:
        assert flag in text
    assert "`/kugetsu cancel`" in text


def test_a_fence_with_an_info_string_does_not_close_a_code_block():
    # CommonMark: "```python" opens a block but cannot close one, so both commands are code
    body = "Thanks!\n\n```\n/kugetsu stop\n```python\n/kugetsu stop\n```"
    assert parse_comment(body) is None
    body = "```\ncode\n```  \n/kugetsu status"  # trailing spaces after a closing fence
    assert parse_comment(body).verb == "status"
