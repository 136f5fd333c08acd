"""Which lines of a Gitea comment a reader sees as plain text.

Pure. Gitea renders comments as CommonMark (plus GitHub's tables) and the browser
shows the result after Gitea's HTML sanitizer. A slash command is read only from a
line that a reader sees start as plain paragraph text: never from a quoted line
(or the lazy lines that continue a quote), a fenced or indented code block, an HTML
block, an HTML comment (on its own lines or opened mid-line), a code span, a raw
HTML tag, a link's destination or title, a link reference definition, or the content
of an element that a reader does not see (`<details>`, `<script>`, ...).

Lines break only where CommonMark breaks them: at "\\n", "\\r\\n" and "\\r". U+2028,
U+2029, NEL, VT, FF and the file separators are characters inside a line.

Where the rendering cannot be known line by line (a list item that may or may not
interrupt a paragraph, raw HTML that a browser may still hold open), a line counts
as hidden: a command that is not read is answered by nothing, while a hidden command
that is read runs with the permission of whoever posted the comment. Everything is
linear in the size of the comment.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
#: "blank" in CommonMark: spaces and tabs only (str.isspace() would take U+2029 too)
_BLANK = re.compile(r"[ \t]*\Z")
_LIST_MARKER = re.compile(r"(?:[-+*]|[0-9]{1,9}[.)])(?=[ \t]|\Z)")
_FENCE = re.compile(r"(`{3,}|~{3,})(.*)\Z")
_ATX_HEADING = re.compile(r"#{1,6}(?:[ \t]|\Z)")
_THEMATIC_BREAK = re.compile(r"(?:(?:\*[ \t]*){3,}|(?:-[ \t]*){3,}|(?:_[ \t]*){3,})\Z")
#: a setext underline, or (in a list item's lazy line) plain text: it is not known which
_SETEXT = re.compile(r"(?:=+|-{1,2})[ \t]*\Z")
_QUOTE_MARKER = re.compile(r"[ ]{0,3}>[ ]?")

_TAG_NAME = r"[A-Za-z][A-Za-z0-9-]*"
_ATTRIBUTE = (
    r"""(?:\s+[A-Za-z_:][A-Za-z0-9_.:-]*+"""
    r"""(?:\s*=\s*(?:[^\s"'=<>`]++|'[^']*+'|"[^"]*+"))?+)"""
)
_OPEN_TAG = re.compile(rf"<({_TAG_NAME})(?:{_ATTRIBUTE})*+\s*(/?)>")
_CLOSE_TAG = re.compile(rf"</({_TAG_NAME})\s*>")
_DECLARATION = re.compile(r"<![A-Za-z]")
_HTML_START = re.compile(r"<[A-Za-z/!?]")

#: HTML blocks (CommonMark 4.6): types 1 to 5 end at a line holding their end marker
_HTML_BLOCK_UNTIL = (
    (
        re.compile(r"<(?:script|pre|style|textarea)(?:\s|>|\Z)", re.I),
        re.compile(r"</(?:script|pre|style|textarea)>", re.I),
    ),
    (re.compile(r"<!--"), re.compile(r"-->")),
    (re.compile(r"<\?"), re.compile(r"\?>")),
    (re.compile(r"<![A-Za-z]"), re.compile(r">")),
    (re.compile(r"<!\[CDATA\["), re.compile(r"\]\]>")),
)
#: type 6 ends at a blank line and may interrupt a paragraph
_HTML_BLOCK_6 = re.compile(
    r"</?(?:address|article|aside|base|basefont|blockquote|body|caption|center|col|colgroup|dd"
    r"|details|dialog|dir|div|dl|dt|fieldset|figcaption|figure|footer|form|frame|frameset"
    r"|h[1-6]|head|header|hr|html|iframe|legend|li|link|main|menu|menuitem|nav|noframes|ol"
    r"|optgroup|option|p|param|search|section|summary|table|tbody|td|tfoot|th|thead|title|tr"
    r"|track|ul)(?:\s|/?>|\Z)",
    re.I,
)
#: type 7, a whole tag alone on its line, ends at a blank line and cannot interrupt a paragraph
#: (taken broadly, as some renderers do: any tag name, any Unicode space after it)
_HTML_BLOCK_7 = re.compile(rf"(?:<{_TAG_NAME}(?:{_ATTRIBUTE})*+\s*/?>|</{_TAG_NAME}\s*>)\s*\Z")
#: a link reference definition shows nothing; its label may go on to the next line
_LINK_DEFINITION = re.compile(r"\[(?:[^\]\\]|\\.)*(?:\]:|\Z)")
_AUTOLINK = re.compile(r"<(?:[A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]*|[^\s<>@\\]+@[A-Za-z0-9.-]+)>")
#: how deep quotes in quotes (or in list items) are followed before giving up
MAX_DEPTH = 8

#: elements whose content a reader does not see (collapsed, removed by the sanitizer, or
#: never rendered as text); their content is hidden until the matching end tag
HIDING_ELEMENTS = frozenset(
    {
        "details",
        "script",
        "style",
        "textarea",
        "template",
        "noscript",
        "iframe",
        "object",
        "title",
        "xmp",
        "noembed",
        "noframes",
        "select",
        "svg",
        "math",
        "plaintext",
    }
)
_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
#: the characters a line must start with to be anything but paragraph text
_BLOCK_START = frozenset(" \t>`~#-*+_=[<|0123456789")
_SPACE = re.compile(r"\s*+")
_NON_SPACE = re.compile(r"\S*+")
_ANGLE_DESTINATION = re.compile(r"<(?:[^<>\n\\]|\\.)*+>")
_DEST_CHAR = r"(?:[^\s()\\]|\\.)"
_DEST_NESTED = rf"\({_DEST_CHAR}*+\)"
for _ in range(2):
    _DEST_NESTED = rf"\((?:{_DEST_CHAR}|{_DEST_NESTED})*+\)"
#: a destination, with its parentheses balanced (nested three deep at most here)
_DESTINATION = re.compile(rf"(?:{_DEST_CHAR}|{_DEST_NESTED})*+", re.S)
_TITLE_AND_CLOSE = re.compile(
    r"""(?:\s++(?:"(?:[^"\\]|\\.)*+"|'(?:[^'\\]|\\.)*+'|\((?:[^()\\]|\\.)*+\)))?+\s*+\)""", re.S
)
_INLINE_SPECIAL = re.compile(r"[\\`<]|\]\(")
_RAW_SPECIAL = re.compile(r"<")


def _end_of(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """Where a match of `pattern`, which matches the empty string too, ends at `pos`."""
    m = pattern.match(text, pos)
    assert m is not None
    return m.end()


def split_lines(text: str, maxsplit: int = 0) -> list[str]:
    """The lines of `text` as CommonMark sees them (at most maxsplit + 1, if given)."""
    return _LINE_BREAK.split(text, maxsplit)


def plain_lines(lines: Sequence[str], *, complete: bool = True) -> list[int]:
    """Indexes of the lines whose first character a reader sees as paragraph text.

    `complete=False`: the lines are the start of a longer text, whose rest may still
    close what they leave open.
    """
    return _Reader(lines).run(complete)


def _columns(line: str) -> tuple[int, str]:
    """(indentation in columns, the rest), with tabs at stops of 4."""
    expanded = line.expandtabs(4) if "\t" in line else line
    rest = expanded.lstrip(" ")
    return len(expanded) - len(rest), rest


def _containers(line: str) -> tuple[int, int, str, str]:
    """Step over list markers: (content column, indent of the rest, the rest, first marker)."""
    text = line.expandtabs(4) if "\t" in line else line
    n, column, marker = len(text), 0, ""
    while True:
        j = column
        while j < n and text[j] == " ":
            j += 1
        if j - column > 3:
            return column, j - column, text[j:], marker
        m = _LIST_MARKER.match(text, j)
        if not m:
            return column, j - column, text[j:], marker
        k = m.end()
        while k < n and text[k] == " ":
            k += 1
        if k - m.end() > 4 or k == n:
            k = min(k, m.end() + 1)  # the content is indented code, or the item is empty
        column, marker = k, marker or m.group(0)


def _unquote(line: str) -> str:
    pos = 0
    while m := _QUOTE_MARKER.match(line, pos):
        pos = m.end()
    return line[pos:]


class _Reader:
    def __init__(self, lines: Sequence[str], depth: int = 0, hiding: int = 0):
        self.lines = lines
        self.depth = depth
        self.visible: list[int] = []
        self.segment: list[int] = []  # lines of one run of paragraph text
        self.starts: set[int] = set()  # of those, the lines that may start a command
        self.hide_chunk = False  # until the next blank line or definite break
        self.pipes = False  # a table may have started in this chunk
        self.lazy_quote = False  # a blockquote's paragraph may still go on
        self.quote: list[str] = []  # the lines of the current blockquote
        self.hiding = hiding  # open elements from HIDING_ELEMENTS
        self.stopped = False  # something was left open: nothing after is read
        self.seen_list = False  # a list item was seen: a list may still be open
        self.in_paragraph = False  # a paragraph may be open (and go on)

    # ------------------------------------------------------------------ blocks

    def run(self, complete: bool = True) -> list[int]:
        i = 0
        while i < len(self.lines) and not self.stopped:
            i = self._line(i)
        self._flush(ambiguous=not complete)
        self._end_quote()
        return sorted(self.visible)

    def _line(self, i: int) -> int:
        """Read the block that starts at line i; returns the index of the line after it."""
        line = self.lines[i]
        if _BLANK.match(line):
            self._flush(ambiguous=False)
            self._end_quote()
            self.hide_chunk = self.pipes = self.in_paragraph = False
            return i + 1
        if (
            line[0] not in _BLOCK_START
            and not self.lazy_quote
            and not self.pipes
            and "|" not in line
        ):
            self._begin(i, starts=True)  # the common case: a line of paragraph text
            return i + 1
        indent, rest = _columns(line)
        if indent < 4 and _THEMATIC_BREAK.match(rest):
            self._definite_break()
            return i + 1
        column, indent, rest, first_marker = _containers(line)
        marker = bool(first_marker)
        self.seen_list = self.seen_list or marker
        # A list item interrupts a paragraph only if it is a bullet or starts at 1, and
        # only where no list is open already: which of the two is not known here.
        uncertain = bool(
            marker
            and (self.in_paragraph or self.lazy_quote)
            and first_marker[0] not in "-+*"
            and int(first_marker[:-1]) != 1
        )
        if indent >= 4:
            if self.lazy_quote:
                self.quote.append(line)
            elif marker:
                self._flush(ambiguous=True)  # a list item that starts with indented code
            elif not self.seen_list and (self.segment or not self.in_paragraph):
                if self.segment:
                    self.segment.append(i)  # paragraph continuation, never a command start
                # otherwise indented code
            elif self.seen_list and rest.startswith(("<", "[", "`", "~", ">")):
                # In a list item this may start a block (which may interrupt a paragraph
                # there), and elsewhere it is code or text: they read on differently.
                self._flush(ambiguous=True)
                self.stopped = True
            else:
                # code, or text of a paragraph that may still be open or of a list item:
                # what comes before may go on into it, and what it leaves open after it
                self._flush(ambiguous=True)
                self._begin(i, starts=False)
                self._flush(ambiguous=True)
            return i + 1
        start = column + indent
        if uncertain and (rest.startswith((">", "<")) or _FENCE.match(rest)):
            self._flush(ambiguous=True)
            self.stopped = True  # a block, or text that goes on: they read on differently
            return i + 1
        if rest.startswith(">"):
            self._flush(ambiguous=marker)
            self.quote.append(line)
            self.lazy_quote = True
            return i + 1
        fence = _FENCE.match(rest)
        if fence and not (fence.group(1)[0] == "`" and "`" in fence.group(2)):
            self._definite_break()
            return self._fence(i + 1, fence.group(1), column if marker else start, marker)
        if rest.startswith("<"):
            for opener, closer in _HTML_BLOCK_UNTIL:
                if opener.match(rest):
                    self._definite_break()
                    return self._html_until(i, closer, column if marker else start)
            if _HTML_BLOCK_6.match(rest):
                self._definite_break()
                return self._html_to_blank(i, column if marker else start, marker)
            if _HTML_BLOCK_7.match(rest):
                # A tag alone on its line: an HTML block, unless it continues a paragraph
                # (which may be open, as in a quote whose last block is not known). Hidden
                # to the next blank line either way, and what came before may go on.
                self._flush(ambiguous=True)
                self._end_quote()
                return self._html_to_blank(i, column if marker else start, marker)
        if marker and _THEMATIC_BREAK.match(rest):
            self._flush(ambiguous=uncertain)  # a list item that holds a rule
            return i + 1
        if _ATX_HEADING.match(rest):
            self._definite_break()
            self._begin(i, starts=False)
            self._flush(ambiguous=False)  # a heading is one line; what it opens ends there
            self.in_paragraph = False
            return i + 1
        if self.lazy_quote:
            self.quote.append(line)  # continues the quote's paragraph (or ends it: hidden)
            return i + 1
        if "|" in rest and not self.pipes:
            # GitHub tables: the line before the delimiter row is the header, and every row
            # is a block of its own. Whether a table starts here is not known line by line.
            self.pipes = True
            if len(self.segment) > 1:
                last = self.segment.pop()
                was_start = last in self.starts
                self.starts.discard(last)
                self._flush(ambiguous=True)
                self._begin(last, starts=was_start)
            self._flush(ambiguous=True)
        elif marker or _SETEXT.match(rest) or self.pipes:
            self._flush(ambiguous=True)
            if not rest.strip(" \t"):
                return i + 1  # an empty list item: no paragraph of its own
            if _SETEXT.match(rest):
                # a setext underline (no paragraph is open after it), or text of one
                self.in_paragraph = True
                return i + 1
        if _LINK_DEFINITION.match(rest):
            # A link reference definition shows nothing, and may run over the next lines.
            # It cannot interrupt a paragraph, but where a paragraph ends is not always
            # known here (after an empty list item, say), so hide from here on.
            self._flush(ambiguous=True)
            self.hide_chunk = True
        self._begin(i, starts=True)
        return i + 1

    def _begin(self, i: int, starts: bool) -> None:
        self.in_paragraph = True
        self.segment.append(i)
        if starts:
            self.starts.add(i)

    def _definite_break(self) -> None:
        self._flush(ambiguous=False)
        self._end_quote()
        self.hide_chunk = self.in_paragraph = False

    def _end_quote(self) -> None:
        """A quote shows no command, but raw HTML in it can leave something open."""
        if self.quote and not self.stopped:
            if self.depth >= MAX_DEPTH:
                self.stopped = True
            else:
                inner = _Reader(
                    [_unquote(line) for line in self.quote], self.depth + 1, self.hiding
                )
                inner.run()
                self.hiding = max(self.hiding, inner.hiding)
                self.stopped = inner.stopped
        self.quote = []
        self.lazy_quote = False

    def _fence(self, i: int, fence: str, content: int, marker: bool) -> int:
        """Skip a fenced code block; returns the first line after it.

        `content` is the column a list item's lines must reach (with `marker`), or the
        fence's own indentation.
        """
        lines = self.lines
        while i < len(lines):
            line = lines[i]
            if _BLANK.match(line):
                i += 1
                continue
            indent, rest = _columns(line)
            if indent < content:
                if marker:
                    return i  # the list item ends here, and the fence with it
                # The fence is either top-level (this line is code) or in a list item
                # (the fence has ended). Those read what follows differently: stop.
                self.stopped = True
                return i
            if indent - content <= 3 if marker else indent <= 3:
                m = _FENCE.match(rest)
                if (
                    m
                    and m.group(1)[0] == fence[0]
                    and len(m.group(1)) >= len(fence)
                    and not m.group(2).strip(" \t")
                ):
                    return i + 1
            i += 1
        return i

    def _html_until(self, i: int, closer: re.Pattern[str], content: int) -> int:
        """An HTML block of types 1-5: hidden through the line that holds its end marker."""
        lines, taken = self.lines, list[str]()
        while i < len(lines):
            line = lines[i]
            if taken and content > 0 and not _BLANK.match(line) and _columns(line)[0] < content:
                # the list item (and the block) may end here, with the HTML still open
                self.stopped = True
                return i
            taken.append(line)
            if closer.search(line):
                self._check_closed(taken)
                return i + 1
            i += 1
        self.stopped = True  # never closed: the rest of the comment is inside it
        return i

    def _html_to_blank(self, i: int, content: int, marker: bool) -> int:
        """An HTML block of types 6 or 7: hidden through the next blank line."""
        lines, taken = self.lines, list[str]()
        while i < len(lines) and not _BLANK.match(lines[i]):
            if taken and content > 0 and _columns(lines[i])[0] < content:
                if not marker:
                    self.stopped = True  # top-level block, or a list item that ended
                    return i
                break  # the list item ends here, and the block with it
            taken.append(lines[i])
            i += 1
        self._check_closed(taken)
        return i

    def _check_closed(self, lines: list[str]) -> None:
        """Raw HTML goes to the browser as it is: whatever it leaves open hides the rest."""
        scan = _Inline("\n".join(lines), self.hiding, raw=True)
        scan.run()
        self.hiding = scan.hiding
        if scan.unclosed:
            self.stopped = True

    # ------------------------------------------------------------------ inline

    def _flush(self, ambiguous: bool) -> None:
        """Read the inline content of the current segment and keep its visible line starts.

        `ambiguous`: the segment may go on into the next one (a list item may or may not
        interrupt a paragraph). Then a construct left open here may close there and hide
        all that lies between, so nothing after it is read until the chunk ends.
        """
        if not self.segment:
            return
        lines = self.lines
        if not self.hiding and not any(_INLINE_SPECIAL.search(lines[i]) for i in self.segment):
            # nothing here can hide anything: every line start is seen
            if not self.hide_chunk:
                self.visible.extend(i for i in self.segment if i in self.starts)
            self.segment, self.starts = [], set()
            return
        offsets, pos = [], 0
        for index in self.segment:
            offsets.append(pos)
            pos += len(lines[index]) + 1
        scan = _Inline("\n".join(lines[index] for index in self.segment), self.hiding)
        scan.run()
        self.hiding = scan.hiding
        if scan.unclosed_comment:
            # CommonMark shows an unclosed "<!--" as text; a renderer that does not would
            # hide all that follows, so nothing after it is read
            self.stopped = True
        # joined to the next segment, what is left open here may close there
        open_from = scan.dangling if ambiguous and scan.dangling is not None else None
        if not self.hide_chunk:
            for index, offset in zip(self.segment, offsets, strict=False):
                if index in self.starts:
                    line = lines[index]
                    first = offset + len(line) - len(line.lstrip(" \t"))
                    if not scan.hidden_at(first) and (open_from is None or first < open_from):
                        self.visible.append(index)
        if open_from is not None:
            self.hide_chunk = True
        self.segment, self.starts = [], set()


class _Inline:
    """Code spans, raw HTML and link tails in one run of text (CommonMark section 6).

    With `raw`, the text is an HTML block as the browser gets it: only HTML counts.
    """

    def __init__(self, text: str, hiding: int, *, raw: bool = False):
        self.text = text
        self.raw = raw
        self.hiding = hiding
        self.ranges: list[tuple[int, int]] = []  # hidden, sorted, not overlapping
        self.dangling: int | None = None  # where the first opener that did not close is
        self.unclosed_comment = False
        self.unclosed = False  # raw HTML that the browser still holds open
        self._hiding_from = 0
        self._absent: set[str] = set()  # end markers that do not occur any more
        self._runs: dict[int, list[int]] = {}
        self._dest_run = (0, 0, False)  # (from, to, a title may follow) of a link destination
        if not raw:
            for m in re.finditer(r"`+", text):
                self._runs.setdefault(m.end() - m.start(), []).append(m.start())

    def hidden_at(self, pos: int) -> bool:
        i = bisect.bisect_right(self.ranges, (pos, len(self.text) + 2)) - 1
        return i >= 0 and self.ranges[i][0] <= pos < self.ranges[i][1]

    def _hide(self, start: int, end: int) -> None:
        if not self.hiding:
            self.ranges.append((start, end))

    def _dangle(self, i: int) -> None:
        if self.dangling is None:
            self.dangling = i

    def _find(self, marker: str, start: int) -> int:
        if marker in self._absent:
            return -1
        found = self.text.find(marker, start)
        if found < 0:
            self._absent.add(marker)
        return found

    def run(self) -> None:
        text, pos = self.text, 0
        special = _RAW_SPECIAL if self.raw else _INLINE_SPECIAL
        while not self.unclosed_comment:
            m = special.search(text, pos)
            if m is None:
                break
            i = m.start()
            c = text[i]
            if c == "\\":
                pos = i + 2 if i + 1 < len(text) and text[i + 1] in _ASCII_PUNCTUATION else i + 1
            elif c == "`":
                pos = self._code_span(i)
            elif c == "<":
                pos = self._html(i)
            else:
                pos = self._link_tail(i)
        if self.hiding:
            self.ranges.append((self._hiding_from, len(text) + 1))
        self.unclosed = self.unclosed or self.unclosed_comment

    def _code_span(self, i: int) -> int:
        text = self.text
        end = i
        while end < len(text) and text[end] == "`":
            end += 1
        starts = self._runs.get(end - i, [])
        k = bisect.bisect_left(starts, end)
        if k < len(starts):
            close = starts[k] + end - i
            self._hide(i, close)
            return close
        self._dangle(i)  # literal backticks here; joined to more text they may open a span
        return end

    def _html(self, i: int) -> int:
        text = self.text
        if text.startswith("<!--", i):
            if text.startswith(">", i + 4) or text.startswith("->", i + 4):
                end = i + (5 if text[i + 4] == ">" else 6)
            else:
                found = self._find("-->", i + 4)
                if found < 0:
                    self.unclosed_comment = True
                    self._dangle(i)
                    self._hide(i, len(text) + 1)
                    return len(text)
                end = found + 3
                body = text[i + 4 : found]
                if (
                    ("--" in body or body.endswith("-"))
                    and not self.raw
                    and _INLINE_SPECIAL.search(body)
                ):
                    # CommonMark 0.30 (Gitea's renderer) shows this as text, 0.31 hides it:
                    # what it holds may open a code span or not, so the rest is hidden
                    self._dangle(i)
                    self._hide(i, len(text) + 1)
                    return len(text)
            self._hide(i, end)
            return end
        for prefix, marker in (("<?", "?>"), ("<![CDATA[", "]]>")):
            if text.startswith(prefix, i):
                found = self._find(marker, i + len(prefix))
                if found < 0:
                    return self._not_html(i)
                self._hide(i, found + len(marker))
                return found + len(marker)
        if _DECLARATION.match(text, i):
            found = self._find(">", i)
            if found < 0:
                return self._not_html(i)
            self._hide(i, found + 1)
            return found + 1
        m = _AUTOLINK.match(text, i)
        if m:
            return m.end()  # shown as a link
        m = _OPEN_TAG.match(text, i)
        closing = m is None
        if m is None:
            m = _CLOSE_TAG.match(text, i)
            if m is None:
                return self._not_html(i)
        name = m.group(1).lower()
        if name in HIDING_ELEMENTS and not closing and not m.group(2):
            if not self.hiding:
                self._hiding_from = i
            self.hiding += 1
        elif name in HIDING_ELEMENTS and closing and self.hiding:
            self.hiding -= 1
            if not self.hiding:
                self.ranges.append((self._hiding_from, m.end()))
                return m.end()
        self._hide(i, m.end())
        return m.end()

    def _not_html(self, i: int) -> int:
        if _HTML_START.match(self.text, i):
            self.unclosed = True
            self._dangle(i)
        return i + 1

    def _link_tail(self, i: int) -> int:
        """`](destination "title")`: neither shows as text, and either may be on a line
        of its own (a title may even span several).

        Read exactly (CommonMark's destination, with balanced parentheses), since what a
        link tail covers is not read for code spans and the like. When that finds no
        link but the text up to the next space could still be a destination with a
        title after it (parentheses nested deeper than read here), what follows cannot
        be told: it is hidden, and so is the rest of the chunk.
        """
        text = self.text
        j = _end_of(_SPACE, text, i + 2)
        if text.startswith("<", j):
            m = _ANGLE_DESTINATION.match(text, j)
            end = _TITLE_AND_CLOSE.match(text, m.end()) if m else None
        else:
            end = _TITLE_AND_CLOSE.match(text, _end_of(_DESTINATION, text, j))
            if end is None:
                run = self._dest_run
                if not run[0] <= j < run[1]:
                    stop = _end_of(_NON_SPACE, text, j)
                    deep = (
                        text.count("(", j, stop) > 3
                        and _TITLE_AND_CLOSE.match(text, stop) is not None
                    )
                    run = self._dest_run = (j, stop, deep)
                # a run of text always ends at the same place, with the same tail after it
                if run[2]:
                    self._dangle(i)
                    self._hide(i, len(text) + 1)
                    return len(text)
        if end is None:
            self._dangle(i)
            return i + 2
        self._hide(i, end.end())
        return end.end()
