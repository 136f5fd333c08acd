"""The command registry: every verb, options, quoted replies and code blocks."""

import pytest

from bot.core import commands, render
from bot.core.commands import AUTO, Command, CommandError, parse_comment


@pytest.mark.parametrize(
    "body, verb, text",
    [
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
        (
            "Thanks!\n\n/kugetsu start\nUse the new API.\nKeep it small.",
            "start",
            "Use the new API.\nKeep it small.",
        ),
        ("  /kugetsu stop", "stop", ""),
        ("/kugetsu stop it now please", "stop", ""),
    ],
)
def test_verbs(body, verb, text):
    command = parse_comment(body)
    assert isinstance(command, Command)
    assert command.verb == verb
    assert command.text == text


@pytest.mark.parametrize(
    "body",
    [
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
    ],
)
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


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("/kugetsu continue", "needs instructions"),
        ("/kugetsu start --agent", "needs a value"),
        ("/kugetsu start --bogus x", "unknown option"),
        ("/kugetsu start --max-tokens lots", "needs a whole number"),
        ("/kugetsu start --max-tokens -5", "greater than 0"),
        ("/kugetsu start --agent ../../bin/sh", "agent name"),
        ("/kugetsu start --max-cost nan go", "greater than 0"),
        ("/kugetsu continue --max-cost inf go", "greater than 0"),
        ("/kugetsu start --max-cost -inf go", "greater than 0"),
    ],
)
def test_errors(body, fragment):
    result = parse_comment(body)
    assert isinstance(result, CommandError)
    assert fragment in result.message
    assert result.usage.startswith("`/kugetsu")


def test_custom_command_word():
    assert parse_comment("/bot start", word="/bot").verb == "start"
    assert parse_comment("/kugetsu start", word="/bot") is None


def test_help_is_generated_from_the_registry():
    text = render.help_text("/kugetsu", "kugetsu")
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


# Comments a reader sees one way and kugetsu must not read another way: the command in
# each is hidden from whoever looks at the rendered comment (a quote, a code block, an
# HTML comment, markup), so reading it would run it with the commenter's permission.
@pytest.mark.parametrize(
    "body",
    [
        # str.splitlines() breaks lines where CommonMark does not
        pytest.param("```\nlog line\u2029```\n/kugetsu start\n```", id="U+2029 'closes' a fence"),
        pytest.param("```\nlog line\u2028```\n/kugetsu start\n```", id="U+2028 'closes' a fence"),
        pytest.param("```\nlog\x85```\n/kugetsu start\n```", id="NEL 'closes' a fence"),
        pytest.param("```\nlog\x0b```\n/kugetsu start\n```", id="VT 'closes' a fence"),
        pytest.param("```\nlog\x0c```\n/kugetsu start\n```", id="FF 'closes' a fence"),
        pytest.param("```\nlog\x1c```\n/kugetsu start\n```", id="FS 'closes' a fence"),
        pytest.param("```\nlog\x1d```\n/kugetsu start\n```", id="GS 'closes' a fence"),
        pytest.param("```\nlog\x1e```\n/kugetsu start\n```", id="RS 'closes' a fence"),
        pytest.param("> a reader wrote this\u2029/kugetsu start", id="U+2029 inside a quote"),
        pytest.param("> a reader wrote this\x85/kugetsu stop", id="NEL inside a quote"),
        pytest.param("Quote:\n> reader's words\n/kugetsu start", id="lazy line of a quote"),
        pytest.param("```\r\ncode\r\n```\r\n```\r\n/kugetsu start\r\n```", id="CRLF fences"),
        pytest.param("```\rcode\r```\r```\r/kugetsu start\r```", id="CR fences"),
        # HTML comments: nobody sees what is inside
        pytest.param("<!--\n/kugetsu start\n-->", id="HTML comment over lines"),
        pytest.param("<!-- note:\n\n/kugetsu start\n\n-->", id="HTML comment with blank lines"),
        pytest.param(
            "Looks good <!-- hidden:\n/kugetsu start\n-->", id="HTML comment opened mid-line"
        ),
        pytest.param("Looks good <!-- unclosed\n/kugetsu start", id="HTML comment never closed"),
        pytest.param(
            "- <!--\n/kugetsu start\n-->\n\n/kugetsu stop", id="HTML comment in a list item"
        ),
        pytest.param("> <!--\n\n/kugetsu start", id="HTML comment left open in a quote"),
        # other markup that shows nothing of the line
        pytest.param('See [this](https://example.com "title\n/kugetsu stop\n")', id="link title"),
        pytest.param("See [this](\n/kugetsu\n)", id="link destination on its own line"),
        pytest.param("[ref]:\n/kugetsu 'stop'", id="link reference definition"),
        pytest.param('<img alt="\n/kugetsu start\n" src=x>', id="attribute of a raw tag"),
        pytest.param("`a code span\n/kugetsu start\n`", id="code span over lines"),
        pytest.param("<details>\n\n/kugetsu start\n\n</details>", id="collapsed details"),
        pytest.param('<div title="\n\n/kugetsu start', id="raw HTML block left open"),
        pytest.param("- ```\n  /kugetsu start\n  ```", id="fence in a list item"),
        pytest.param(" \t/kugetsu start", id="indented code by a tab"),
        pytest.param("text `\n2. more\n/kugetsu start`", id="a list that cannot interrupt"),
    ],
)
def test_hidden_commands_are_not_read(body):
    assert parse_comment(body) is None


@pytest.mark.parametrize(
    "body, verb",
    [
        pytest.param("/kugetsu start\r\nfix it", "start", id="CRLF"),
        pytest.param("thanks\r/kugetsu status", "status", id="CR"),
        pytest.param(
            "<!--\n/kugetsu start\n-->\n/kugetsu status", "status", id="after an HTML comment"
        ),
        pytest.param(
            "Looks good <!-- note --> to me\n/kugetsu status",
            "status",
            id="after an inline HTML comment",
        ),
        pytest.param("```\n<!--\n```\n/kugetsu status", "status", id="a fence hides '<!--'"),
        pytest.param(
            "Use `<!--` to hide text.\n/kugetsu status", "status", id="a code span hides '<!--'"
        ),
        pytest.param("> quoted\n\n/kugetsu status", "status", id="after a quote and a blank line"),
        pytest.param("- item\n  /kugetsu status", "status", id="in a list item"),
        pytest.param(
            "See [the docs](https://example.com).\n/kugetsu status", "status", id="after a link"
        ),
        pytest.param(
            "log\u2029/kugetsu start\n/kugetsu status", "status", id="U+2029 is not a line break"
        ),
    ],
)
def test_visible_commands_are_read(body, verb):
    command = parse_comment(body)
    assert isinstance(command, Command) and command.verb == verb


def test_instructions_keep_their_lines_whatever_the_line_breaks():
    command = parse_comment("/kugetsu start\r\nfirst\rsecond\nthird")
    assert command.text == "first\nsecond\nthird"


def test_a_command_past_the_read_limit_is_not_read_and_one_before_it_is():
    filler = ("word " * 15 + "\n") * (commands.MAX_COMMAND_SCAN_CHARS // 76 + 10)
    assert parse_comment(filler + "/kugetsu start") is None
    assert parse_comment("/kugetsu status\n" + filler).verb == "status"


def test_a_command_line_longer_than_the_read_limit_is_read_whole():
    long = "x" * commands.MAX_COMMAND_SCAN_CHARS * 2
    command = parse_comment(f"/kugetsu start {long}\nand more")
    assert (command.verb, command.text) == ("start", f"{long}\nand more")


def test_a_span_that_closes_past_the_read_limit_still_hides_what_it_covers():
    filler = "x" * commands.MAX_COMMAND_SCAN_CHARS
    assert parse_comment(f"`\n/kugetsu start\n{filler}\n`") is None


@pytest.mark.parametrize(
    "body, bound",
    [
        ("/kugetsu start --max-tokens 99999999999999999999", "at most 1,000,000,000,000"),
        ("/kugetsu start --max-tokens 1000000000001", "at most 1,000,000,000,000"),
        ("/kugetsu start --max-tokens " + "9" * 5000, "needs a whole number"),
        ("/kugetsu start --max-cost 1e300", "at most 1,000,000"),
        ("/kugetsu start --max-cost 1000000.01", "at most 1,000,000"),
    ],
)
def test_budgets_are_bounded_with_the_bound_in_the_reply(body, bound):
    result = parse_comment(body)
    assert isinstance(result, CommandError) and bound in result.message
    assert len(result.message) < 200


def test_the_largest_budgets_are_accepted():
    c = parse_comment(
        f"/kugetsu start --max-tokens {commands.MAX_TOKENS} --max-cost {commands.MAX_COST_USD}"
    )
    assert (c.max_tokens, c.max_cost_usd) == (commands.MAX_TOKENS, commands.MAX_COST_USD)


@pytest.mark.parametrize(
    "body, word, suggestions",
    [
        ("/kugetsu stpo", "stpo", ("stop",)),
        ("/kugetsu retyr", "retry", None),
        ("/kugetsu Stauts", "Stauts", ("status", "start")),
        ("/kugetsu --agent claude frobnicate", "frobnicate", ()),
    ],
)
def test_a_lone_word_that_is_no_verb_is_not_a_request(body, word, suggestions):
    command = parse_comment(body)
    assert isinstance(command, commands.UnknownVerb)
    if suggestions is not None:
        assert (command.word, command.suggestions) == (word, suggestions)
    else:
        assert command.suggestions[0] == word


@pytest.mark.parametrize(
    "body",
    [
        "/kugetsu fix the flaky test",
        "/kugetsu fix.",
        "/kugetsu refactor\nthe parser",
        "/kugetsu v2",
    ],
)
def test_a_sentence_or_a_word_that_is_not_verb_like_is_still_a_request(body):
    assert parse_comment(body).verb == AUTO


def test_in_a_review_the_word_alone_asks_for_work_on_the_review():
    alone = parse_comment("/kugetsu", instructions=True)
    assert (alone.verb, alone.text) == (AUTO, "")
    assert parse_comment("/kugetsu continue", instructions=True).verb == "continue"
    assert parse_comment("/kugetsu help", instructions=True).verb == "help"
    assert isinstance(parse_comment("/kugetsu continue"), CommandError)
