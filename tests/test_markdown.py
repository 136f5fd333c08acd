"""Which lines a reader sees: kugetsu never reads a line that a CommonMark parser hides.

markdown-it-py (a CommonMark parser) is the reference here: for random comments made
of the pieces that hide text (fences, quotes, HTML, code spans, links, lists...), every
line kugetsu counts as plain text must start a line of paragraph text in the parsed
document. kugetsu may hide more than the parser (it is cautious where Gitea's renderer
or the browser could differ); it must never hide less.
"""

from __future__ import annotations

import importlib
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.core import markdown

markdown_it = pytest.importorskip("markdown_it")


@pytest.fixture(scope="module")
def commonmark():
    """A CommonMark parser that reports where each visible line of a paragraph starts."""
    html_re = importlib.import_module("markdown_it.common.html_re")
    utils = importlib.import_module("markdown_it.common.utils")
    html_inline = importlib.import_module("markdown_it.rules_inline.html_inline")

    with pytest.MonkeyPatch.context() as mp:
        # CommonMark trims paragraphs of spaces and tabs only (markdown-it also trims
        # U+2028 and the like, which would shift its line numbers)
        mp.setattr(utils, "MD_TRIM_CHARS", " \t\n")
        # CommonMark 0.31: an HTML comment ends at the first "-->"
        mp.setattr(
            html_inline,
            "HTML_TAG_RE",
            re.compile(
                "(?:"
                + "|".join(
                    [
                        html_re.open_tag,
                        html_re.close_tag,
                        r"<!--(?:>|->|[\s\S]*?-->)",
                        html_re.processing,
                        html_re.declaration,
                        html_re.cdata,
                    ]
                )
                + ")"
            ),
        )

        def record_breaks(state, silent):
            src, pos = state.src, state.pos
            if src[pos] == "\n":
                state.env.setdefault(src, set()).add(pos + 1)
            elif src.startswith("\\\n", pos):
                state.env.setdefault(src, set()).add(pos + 2)
            return False  # the newline rule still makes the break

        md = markdown_it.MarkdownIt("commonmark")
        md.inline.ruler.before("newline", "record_breaks", record_breaks)

        def visible_starts(text: str) -> set[int]:
            env: dict = {}
            tokens = md.parse(text, env)
            starts, quoted = set(), 0
            for k, token in enumerate(tokens):
                if token.type == "blockquote_open":
                    quoted += 1
                elif token.type == "blockquote_close":
                    quoted -= 1
                elif (
                    token.type == "inline"
                    and not quoted
                    and tokens[k - 1].type in ("paragraph_open", "heading_open")
                ):
                    first = token.map[0]
                    starts.add(first)
                    for pos in env.get(token.content, ()):
                        starts.add(first + token.content.count("\n", 0, pos))
            return starts

        yield visible_starts


#: constructs that may span lines: (what opens one, what closes it)
PAIRS = [
    ("`", "`"),
    ("``", "``"),
    ("```", "```"),
    ("~~~", "~~~"),
    ("<!--", "-->"),
    ("<a b='", "'>"),
    ('<a b="', '">'),
    ("<a", ">"),
    ('[a](/u "', '")'),
    ("[a](/u '", "')"),
    ("[a](/u (", "))"),
    ("[a](", ")"),
    ("[x]:", "/u"),
    ("[x]: /u", " 't'"),
    ("<?", "?>"),
    ("<![CDATA[", "]]>"),
    ("<!X", ">"),
    ("<details>", "</details>"),
    ("<pre>", "</pre>"),
    ("<script>", "</script>"),
    ('<div title="', '">'),
    ("<div>", "</div>"),
]
#: what a line may start with: quotes, list items, indentation, headings
PREFIXES = [
    "",
    "",
    "",
    "",
    "> ",
    ">> ",
    "- ",
    "* ",
    "1. ",
    "2. ",
    "1) ",
    "  ",
    "   ",
    "    ",
    "\t",
    "# ",
    " ",
    "  - ",
]
#: text, markup, and the characters that other tools take for line breaks
PIECES = (
    [o for o, _ in PAIRS]
    + [c for _, c in PAIRS]
    + [
        "x",
        "a b",
        " ",
        "*",
        "|",
        "\\",
        "\\`",
        "&lt;",
        "<http://a>",
        "<b>",
        "</b>",
        "<!---->",
        "<!-->",
        "<!-- x -->",
        "[x][y]",
        "![",
        "[",
        "]",
        "(",
        "<",
        "/>",
        "=",
        "===",
        "---",
        "-",
        "***",
        "* * *",
        "\u2028",
        "\u2029",
        "\x0b",
        "\x0c",
        "\x85",
        "/k",
        "/k x",
    ]
)
TEXT = st.lists(st.sampled_from(PIECES), max_size=4).map("".join)
LINE = st.tuples(st.sampled_from(PREFIXES), TEXT).map("".join)
#: lines around a construct: it opens at the end of one line, a command follows, it closes
SPAN = st.builds(
    lambda pair, p1, t1, inner, p2, t2: [p1 + t1 + pair[0], *inner, p2 + pair[1] + t2],
    st.sampled_from(PAIRS),
    st.sampled_from(PREFIXES),
    TEXT,
    st.lists(st.one_of(st.just("/k"), LINE, st.just("")), min_size=1, max_size=3),
    st.sampled_from(PREFIXES),
    TEXT,
)
LINES = st.lists(
    st.one_of(LINE.map(lambda line: [line]), st.just(["/k"]), st.just([""]), SPAN),
    min_size=1,
    max_size=8,
).map(lambda groups: [x for g in groups for x in g])
COMMENT = st.tuples(LINES, st.sampled_from(["\n", "\r\n", "\r"])).map(lambda t: t[1].join(t[0]))


@settings(
    max_examples=2000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(COMMENT)
def test_never_reads_a_line_that_commonmark_hides(commonmark, text):
    lines = markdown.split_lines(text)
    seen = commonmark(text)
    for index in markdown.plain_lines(lines):
        if lines[index].lstrip().startswith("/k"):
            assert index in seen, (text, index)


@pytest.mark.parametrize(
    "text, lines",
    [
        ("a\nb", ["a", "b"]),
        ("a\r\nb\rc", ["a", "b", "c"]),
        *[(f"a{c}b", [f"a{c}b"]) for c in "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"],
        ("a\n", ["a", ""]),
    ],
)
def test_lines_break_only_where_commonmark_breaks_them(text, lines):
    assert markdown.split_lines(text) == lines


def test_plain_lines_of_a_comment():
    text = (
        "Thanks!\n\n> quoted\nlazy\n\n```\ncode\n```\n<!--\nhidden\n-->\n"
        "text `span`\n    indented\n- item\n  more"
    )
    lines = markdown.split_lines(text)
    assert [lines[i] for i in markdown.plain_lines(lines)] == [
        "Thanks!",
        "text `span`",
        "- item",
        "  more",
    ]
