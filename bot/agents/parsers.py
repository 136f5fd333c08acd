"""Reading what an agent CLI prints: its summary, session id, usage, and how it failed.

Pure. One `Parser` per output format, fed line by line (while the agent runs, by the
`UsageMeter`; afterwards, by `launch.parse_output` on the output kept), and asked for
an `AgentReport` at the end. Each preset (`presets.PRESETS`) names its parser and the
words its CLI uses for a rate limit. Lines that are not what the CLI prints (garbage,
stderr noise, a line cut in half, the marker of an omitted middle) are skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bot.agents.usage import Usage

#: the marker lines put where the middle of a huge output was dropped (log file, kept output)
OMITTED_RE = re.compile(
    r"^\[(?:kugetsu: \d+ bytes of output omitted|\.\.\. \d+ bytes omitted \.\.\.)\]$"
)

SUMMARY_MAX_CHARS = 3000
SUMMARY_MAX_LINES = 40
FAILURE_MAX_CHARS = 500


@dataclass
class AgentReport:
    summary: str
    session_id: str | None
    usage: Usage
    #: the run failed even if the exit code says 0 (aider exits 0 when the API kept failing)
    failed: bool
    failure: str | None
    #: the failure is an HTTP 429, a quota, a rate limit or an overloaded provider (never set
    #: without `failed`: a run that hit a limit and recovered is not rate limited)
    rate_limited: bool


_ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*(\x07|\x1b\\)")
#: what any provider's rate limit, quota or overload says (a preset adds its CLI's own words)
RATE_LIMIT_WORDS = (
    r"\b(429|529)\b",
    r"rate[ _-]?limit",
    r"too many requests",
    r"(?<![a-z])quota(?![a-z])",
    r"overloaded",
    r"resource[ _]exhausted",
    r"usage limit",
    r"out of credits",
    r"spend cap",
    r"credit limit",
)


def rate_limit_pattern(extra: Iterable[str] = ()) -> re.Pattern[str]:
    """One pattern for RATE_LIMIT_WORDS and `extra`, case-insensitive."""
    return re.compile("|".join((*RATE_LIMIT_WORDS, *extra)), re.IGNORECASE)


RATE_LIMIT = rate_limit_pattern()


def _strip_ansi(text: str) -> str:
    return _ANSI_RE.sub("", text)


def _json_line(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _dict(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one: a CLI's event may lack any field."""
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, (int, float)):
        return max(0, int(value))
    return 0


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _short(text: str, limit: int = FAILURE_MAX_CHARS) -> str:
    text = " ".join(_strip_ansi(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tail(
    output: str, max_chars: int = SUMMARY_MAX_CHARS, max_lines: int = SUMMARY_MAX_LINES
) -> str:
    """The end of an output: at most `max_lines` lines and `max_chars` characters, ANSI removed."""
    lines = _strip_ansi(output).rstrip().splitlines()[-max_lines:]
    text = "\n".join(lines).strip()
    return text[-max_chars:]


def _exit_failure(exit_code: int) -> str:
    if exit_code < 0:
        return f"killed by signal {-exit_code}"
    return f"exited with code {exit_code}"


#: words of a line that tells why a program failed (stderr and stdout arrive as one stream)
_ERROR_LINE_RE = re.compile(
    r"error|exception|fatal|panic|traceback|failed|failure|denied|not found|no such|"
    r"cannot|can't|refused|invalid|unauthori[sz]ed|forbidden|\b[45]\d\d\b",
    re.IGNORECASE,
)
#: how far back from the end an error line is looked for
ERROR_LINE_SCAN = 200


def error_line(output: str) -> str:
    """The line of a failed run's output that says what went wrong: the last one that
    reads as an error (a traceback's last line, `Error: ...`, `fatal: ...`), not only the
    last lines, which a program often fills with usage text or its own farewell. JSON
    event lines are a CLI's own record, not its error; without an error line, the last
    line. ANSI colours removed, at most FAILURE_MAX_CHARS characters."""
    lines = [
        line.strip()
        for line in _strip_ansi(output).splitlines()[-ERROR_LINE_SCAN:]
        if line.strip() and not OMITTED_RE.match(line.strip())
    ]
    plain = [line for line in lines if not line.startswith(("{", "["))]
    for line in reversed(plain):
        if _ERROR_LINE_RE.search(line):
            return _short(line)
    return _short(plain[-1]) if plain else ""


# ============================================================================ per-preset parsers


class Parser:
    """Reads an agent's output line by line; `report` turns what it saw into an AgentReport."""

    def __init__(self, rate_limit: re.Pattern[str] = RATE_LIMIT) -> None:
        self.usage = Usage()
        self.session_id: str | None = None
        self._rate_limit = rate_limit

    def rate_limited(self, text: str) -> bool:
        """True if `text` says the provider is rate limiting or out of quota."""
        return bool(self._rate_limit.search(text or ""))

    def feed(self, line: str) -> None:
        raise NotImplementedError

    def report(self, output: str, exit_code: int) -> AgentReport:
        raise NotImplementedError

    def _finish(
        self,
        *,
        summary: str,
        exit_code: int,
        error: str | None,
        rate_limited: bool,
        completed: bool,
        output: str = "",
    ) -> AgentReport:
        """Common rules: an error or a non-zero exit fails the run; so does a clean exit that never
        reached the CLI's own end-of-run marker. A non-zero exit with no error of the CLI's own
        is told with the line of `output` that says what went wrong (`error_line`)."""
        failure = None
        if error:
            failure = _short(error)
        elif exit_code != 0:
            line = error_line(output)
            failure = _exit_failure(exit_code) + (f": {line}" if line else "")
        elif not completed:
            failure = "the agent ended without a final result"
        failed = failure is not None
        return AgentReport(
            summary=summary.strip(),
            session_id=self.session_id,
            usage=self.usage,
            failed=failed,
            failure=failure,
            rate_limited=failed and rate_limited,
        )


class OpencodeParser(Parser):
    """`opencode run --format json`: one JSON event a line, each with `sessionID`.

    `text` parts carry the assistant's words, `step_finish` the tokens and cost of one model call,
    and an `error` event the failure that ended the run (after opencode's own retries).
    """

    def __init__(self, rate_limit: re.Pattern[str] = RATE_LIMIT) -> None:
        super().__init__(rate_limit)
        self._texts: list[tuple[str, str]] = []  # (messageID, text)
        self._errors: list[dict[str, Any]] = []
        self._finished = False

    def feed(self, line: str) -> None:
        event = _json_line(line)
        if event is None:
            return
        sid = event.get("sessionID")
        if isinstance(sid, str) and sid and self.session_id is None:
            self.session_id = sid
        part = _dict(event.get("part"))
        kind = event.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            self._texts.append((str(part.get("messageID", "")), part["text"]))
        elif kind == "step_finish":
            tokens = _dict(part.get("tokens"))
            cache = _dict(tokens.get("cache"))
            self.usage.input_tokens += _int(tokens.get("input"))
            self.usage.output_tokens += _int(tokens.get("output")) + _int(tokens.get("reasoning"))
            self.usage.cache_read_tokens += _int(cache.get("read"))
            self.usage.cache_write_tokens += _int(cache.get("write"))
            cost = _float(part.get("cost"))
            if cost is not None:
                self.usage.cost_usd = (self.usage.cost_usd or 0.0) + cost
            reason = part.get("reason")
            if isinstance(reason, str) and reason not in ("tool-calls", "tool_calls"):
                self._finished = True
        elif kind == "error":
            self._errors.append(_dict(event.get("error")))

    def report(self, output: str, exit_code: int) -> AgentReport:
        summary = ""
        if self._texts:
            last_message = self._texts[-1][0]
            summary = "\n\n".join(t for m, t in self._texts if m == last_message)
        error, limited = None, False
        if self._errors:
            err = self._errors[-1]
            data = _dict(err.get("data"))
            status = data.get("statusCode")
            message = str(data.get("message") or err.get("message") or "")
            error = f"{err.get('name') or 'error'}: {message or 'no message'}"
            if isinstance(status, int):
                error += f" (HTTP {status})"
            limited = status in (429, 529) or self.rate_limited(
                " ".join([message, str(err.get("name") or ""), str(data.get("responseBody") or "")])
            )
        return self._finish(
            summary=summary,
            exit_code=exit_code,
            error=error,
            rate_limited=limited,
            completed=self._finished,
            output=output,
        )


class ClaudeParser(Parser):
    """`claude -p --output-format stream-json --verbose` (plain `json` output parses too).

    `assistant` events carry each model call's usage as it starts (several events share one
    message id; the last one counts); the closing `result` event has the run's exact totals,
    `total_cost_usd`, `session_id`, `is_error` and `api_error_status`.
    """

    def __init__(self, rate_limit: re.Pattern[str] = RATE_LIMIT) -> None:
        super().__init__(rate_limit)
        self._live: dict[str, dict[str, Any]] = {}
        self._last_text = ""
        self._result: dict[str, Any] | None = None
        self._error_kind: str | None = None

    def feed(self, line: str) -> None:
        event = _json_line(line)
        if event is None:
            return
        sid = event.get("session_id")
        if isinstance(sid, str) and sid:
            self.session_id = sid
        kind = event.get("type")
        if kind == "assistant" and isinstance(event.get("message"), dict):
            message = event["message"]
            if isinstance(event.get("error"), str):
                self._error_kind = event["error"]
            for block in message.get("content") or []:
                if isinstance(block, dict) and block.get("type") == "text" and block.get("text"):
                    self._last_text = block["text"]
            if self._result is None and isinstance(message.get("usage"), dict):
                self._live[str(message.get("id", len(self._live)))] = message["usage"]
                self._set_usage(self._live.values(), cost=None)
        elif kind == "result" and ("subtype" in event or isinstance(event.get("is_error"), bool)):
            self._result = event
            usage = _dict(event.get("usage"))
            self._set_usage([usage], cost=_float(event.get("total_cost_usd")))

    def _set_usage(self, usages: Iterable[Mapping[str, Any]], cost: float | None) -> None:
        total = Usage(cost_usd=cost)
        for u in usages:
            total.input_tokens += _int(u.get("input_tokens"))
            total.output_tokens += _int(u.get("output_tokens"))
            total.cache_read_tokens += _int(u.get("cache_read_input_tokens"))
            total.cache_write_tokens += _int(u.get("cache_creation_input_tokens"))
        self.usage = total

    def report(self, output: str, exit_code: int) -> AgentReport:
        result = self._result
        if result is None:
            return self._finish(
                summary=self._last_text,
                exit_code=exit_code,
                error=None,
                rate_limited=False,
                completed=False,
                output=output,
            )
        text = result["result"] if isinstance(result.get("result"), str) else ""
        error, limited = None, False
        status = result.get("api_error_status")
        if result.get("is_error") or str(result.get("subtype", "success")) != "success":
            error = text or str(result.get("subtype") or "error")
            if isinstance(status, int) and str(status) not in error:
                error += f" (HTTP {status})"
            limited = (
                status in (429, 529)
                or self._error_kind in ("rate_limit", "overloaded")
                or self.rate_limited(text)
            )
        summary = text if error is None else ""
        return self._finish(
            summary=summary,
            exit_code=exit_code,
            error=error,
            rate_limited=limited,
            completed=True,
            output=output,
        )


class CodexParser(Parser):
    """`codex exec --json`: `thread.started` (thread_id), `item.completed` items (agent_message
    text, command_execution, non-fatal `error` items), `turn.completed` with usage, or
    `turn.failed`. Top-level `error` events also report retries that may still succeed.

    codex reports the thread's cumulative usage, so after `resume` it includes earlier runs.
    """

    def __init__(self, rate_limit: re.Pattern[str] = RATE_LIMIT) -> None:
        super().__init__(rate_limit)
        self._last_message = ""
        self._turn_failed: str | None = None
        self._last_error: str | None = None
        self._completed = False

    def feed(self, line: str) -> None:
        event = _json_line(line)
        if event is None:
            return
        kind = event.get("type")
        if kind == "thread.started" and isinstance(event.get("thread_id"), str):
            self.session_id = event["thread_id"]
        elif kind == "item.completed" and isinstance(event.get("item"), dict):
            item = event["item"]
            if item.get("type") == "agent_message" and isinstance(item.get("text"), str):
                self._last_message = item["text"]
        elif kind == "turn.completed":
            self._completed = True
            u = _dict(event.get("usage"))
            cached = _int(u.get("cached_input_tokens"))
            written = _int(u.get("cache_write_input_tokens"))
            self.usage = Usage(
                input_tokens=max(0, _int(u.get("input_tokens")) - cached - written),
                output_tokens=_int(u.get("output_tokens")),
                cache_read_tokens=cached,
                cache_write_tokens=written,
            )
        elif kind == "turn.failed":
            err = _dict(event.get("error"))
            self._turn_failed = str(err.get("message") or "turn failed")
        elif kind == "error" and isinstance(event.get("message"), str):
            self._last_error = event["message"]

    def report(self, output: str, exit_code: int) -> AgentReport:
        error = self._turn_failed
        if error is None and exit_code != 0 and self._last_error:
            error = self._last_error
        limited = error is not None and self.rate_limited(error)
        return self._finish(
            summary=self._last_message,
            exit_code=exit_code,
            error=error,
            rate_limited=limited,
            completed=self._completed,
            output=output,
        )


_AIDER_TOKENS_RE = re.compile(
    r"^Tokens: (?P<sent>[\d.]+k?) sent"
    r"(?:, (?P<write>[\d.]+k?) cache write)?(?:, (?P<hit>[\d.]+k?) cache hit)?"
    r", (?P<received>[\d.]+k?) received\."
)
_AIDER_COST_RE = re.compile(r"Cost: \$(?P<message>[\d.]+) message, \$(?P<session>[\d.]+) session\.")
_AIDER_ERROR_RE = re.compile(r"^litellm\.(?P<name>[A-Za-z]+(?:Error|Exception)): ?(?P<message>.*)$")
_AIDER_HEADER_RE = re.compile(
    r"^(Aider v|Model: |Weak model: |Git repo: |Repo-map: |Added .* to the chat|"
    r"Main model: |Editor model: |Cur working dir: |Git working dir: )"
)
# aider's own explanation lines printed under an API error, not part of the provider's message
_AIDER_HINTS = ("The API provider", "Retrying in ", "https://", "Try again", "Or visit ")


def _aider_count(value: str | None) -> int:
    """aider prints 595, 2.3k or 12k: back to a whole number (to within its rounding)."""
    if not value:
        return 0
    if value.endswith("k"):
        return round(float(value[:-1]) * 1000)
    return int(float(value))


class AiderParser(Parser):
    """aider's plain text (`--no-pretty`). Each `Tokens: ... sent, ... received.` line reports one
    reply (counts are rounded to 0.1k); `Cost: $x message, $y session.` gives the running total.

    aider retries API errors for about a minute and then exits 0, so a run whose last event is
    an API error (`litellm.SomethingError: ...`) with no reply after it is a failure.
    """

    def __init__(self, rate_limit: re.Pattern[str] = RATE_LIMIT) -> None:
        super().__init__(rate_limit)
        self._error: tuple[str, str] | None = (
            None  # (exception name, message) of the last API error
        )
        self._replies = 0

    def feed(self, line: str) -> None:
        line = _strip_ansi(line).rstrip()
        m = _AIDER_TOKENS_RE.match(line)
        if m:
            sent, hit, write = (
                _aider_count(m["sent"]),
                _aider_count(m["hit"]),
                _aider_count(m["write"]),
            )
            self.usage.input_tokens += max(0, sent - hit - write)
            self.usage.cache_read_tokens += hit
            self.usage.cache_write_tokens += write
            self.usage.output_tokens += _aider_count(m["received"])
            self._replies += 1
            self._error = None
        c = _AIDER_COST_RE.search(line)
        if c:
            self.usage.cost_usd = float(c["session"])
            return
        e = _AIDER_ERROR_RE.match(line)
        if e and not m:
            self._error = (e["name"], e["message"])
        elif (
            self._error is not None
            and line
            and not line.startswith(_AIDER_HINTS)
            and len(self._error[1]) < 400
        ):
            # the provider's message often wraps onto the next lines
            self._error = (self._error[0], f"{self._error[1]} {line}".strip())

    def report(self, output: str, exit_code: int) -> AgentReport:
        error, limited = None, False
        if self._error is not None:
            name, message = self._error
            error = f"{name}: {message}".strip()
            limited = name in ("RateLimitError",) or self.rate_limited(message)
        elif self._replies == 0 and exit_code == 0:
            error = "aider printed no reply from the model"
        return self._finish(
            summary=_aider_last_reply(output),
            exit_code=exit_code,
            error=error,
            rate_limited=limited,
            completed=True,
            output=output,
        )


def _aider_last_reply(output: str) -> str:
    """The text of aider's last reply: the lines just before its last `Tokens:` line, back to the
    previous `Tokens:` line, the start-up header or an omission marker."""
    lines = _strip_ansi(output).splitlines()
    ends = [i for i, line in enumerate(lines) if _AIDER_TOKENS_RE.match(line.strip())]
    if not ends:
        return tail(output)
    end = ends[-1]
    start = ends[-2] + 1 if len(ends) > 1 else 0
    for i in range(end - 1, start - 1, -1):
        if _AIDER_HEADER_RE.match(lines[i]) or OMITTED_RE.match(lines[i].strip()):
            start = i + 1
            break
    return tail("\n".join(lines[start:end]))


class CustomParser(Parser):
    """Any other command: no usage, no session; the summary is the tail of its output and
    failure is a non-zero exit (rate limits are recognised only in the tail of a failed run)."""

    def feed(self, line: str) -> None:
        pass

    def report(self, output: str, exit_code: int) -> AgentReport:
        summary = tail(output)
        limited = exit_code != 0 and self.rate_limited(summary)
        return self._finish(
            summary=summary,
            exit_code=exit_code,
            error=None,
            rate_limited=limited,
            completed=True,
            output=output,
        )
