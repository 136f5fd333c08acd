"""A tracking comment as HTML, safely: its text is hostile.

A tracking comment holds what an agent wrote, an error message and a log tail, all of
which can come from issue text anyone may write. It is rendered as CommonMark with
markdown-it, with these rules:

- raw HTML passes only as the bare tags kugetsu itself writes (`<sub>`, `<details>`,
  `<summary>` and a few inline ones), rebuilt without any attribute; everything else,
  `<script>`, event handlers and all, is shown as text; HTML comments (kugetsu's
  markers) are dropped;
- links keep only http, https and mailto targets (markdown-it refuses javascript:,
  vbscript:, file: and data:), and open with rel="nofollow noopener noreferrer";
- images are not loaded (a remote image tells a third party who looks): they are shown
  as their text.

The page's Content-Security-Policy allows no inline script either way.
"""

from __future__ import annotations

import html
import re
from typing import Any

from markdown_it import MarkdownIt

#: tags kugetsu writes in its comments, passed through bare (no attributes)
ALLOWED_TAGS = ("sub", "sup", "details", "summary", "br", "b", "i", "em", "strong", "code", "kbd")
_TAG = re.compile(r"<(/?)(" + "|".join(ALLOWED_TAGS) + r")\s*/?>", re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_SCHEMES = ("http://", "https://", "mailto:")


def filter_html(raw: str) -> str:
    """Raw HTML from the comment: allowed bare tags rebuilt, comments dropped, all
    else escaped as text."""
    out, pos = [], 0
    while True:
        lt = raw.find("<", pos)
        if lt < 0:
            out.append(html.escape(raw[pos:]))
            return "".join(out)
        out.append(html.escape(raw[pos:lt]))
        comment = _COMMENT.match(raw, lt)
        if comment:
            pos = comment.end()
            continue
        tag = _TAG.match(raw, lt)
        if tag:
            out.append(f"<{tag.group(1)}{tag.group(2).lower()}>")
            pos = tag.end()
            continue
        out.append("&lt;")
        pos = lt + 1


def _renderer() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": True})
    md.disable("image")

    def html_block(_self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        return filter_html(tokens[idx].content)

    def html_inline(_self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        return filter_html(tokens[idx].content)

    def link_open(_self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        href = str(token.attrGet("href") or "")
        if not href.lower().startswith(_SCHEMES):
            token.attrSet("href", "#")
        token.attrSet("rel", "nofollow noopener noreferrer")
        return str(md.renderer.renderToken(tokens, idx, options, env))  # type: ignore[attr-defined]

    md.add_render_rule("html_block", html_block)
    md.add_render_rule("html_inline", html_inline)
    md.add_render_rule("link_open", link_open)
    return md


_MD = _renderer()


def render(body: str | None) -> str:
    """The comment as HTML that is safe to put in a page."""
    return str(_MD.render(body or ""))
