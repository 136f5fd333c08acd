"""A scripted fake LLM server for running real agent CLIs offline (standard library only).

One `ThreadingHTTPServer` on 127.0.0.1 speaks three wire formats:

- OpenAI Chat Completions  ``POST /v1/chat/completions`` (streaming SSE or not), ``GET /v1/models``
  (opencode, aider);
- OpenAI Responses         ``POST /v1/responses`` (codex);
- Anthropic Messages       ``POST /v1/messages`` (claude code).

A script is a list of steps (`text`, `write_file`, `tool_call`, `http_error`). The step answering a
request is chosen by the number of assistant turns since the last real user message in that request,
so a new prompt, or a resumed session, starts the script again from its first step. Past the end of
the script the last step repeats (an error step therefore keeps failing until the client gives up).
A request without tools whose system prompt asks for a title (opencode's first request) gets a
plain-text title and does not use up a step.

Every request body is kept in `.requests` (parsed JSON) so a test can check what the model saw.

    with FakeLLM([write_file("hello.txt", "hi\\n"), text("Done.")]) as llm:
        ... point the CLI at llm.url ...
        assert "hello" in llm.requests[-1]["messages"][1]["content"]
"""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "fake-model"

# ---------------------------------------------------------------------------- script steps


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class WriteFile:
    """Write a file, with the tool each client knows (a `whole` edit block when there are no
    tools)."""

    path: str
    content: str
    text: str = ""


@dataclass(frozen=True)
class ToolCall:
    """A raw tool call, for clients and tools `WriteFile` does not cover."""

    name: str
    arguments: Mapping[str, Any]
    text: str = ""


@dataclass(frozen=True)
class HTTPError:
    """An error response. With `times`, only the first `times` requests that reach this step fail;
    later ones move on to the next step without counting as a turn (a flaky API that recovers)."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] | None = None
    times: int | None = None


Step = Text | WriteFile | ToolCall | HTTPError


def text(value: str) -> Text:
    return Text(value)


def write_file(path: str, content: str, text: str = "") -> WriteFile:
    return WriteFile(path, content, text)


def tool_call(name: str, arguments: Mapping[str, Any], text: str = "") -> ToolCall:
    return ToolCall(name, dict(arguments), text)


def http_error(
    status: int,
    headers: Mapping[str, str] | None = None,
    body: Mapping[str, Any] | None = None,
    times: int | None = None,
) -> HTTPError:
    return HTTPError(status, dict(headers or {}), body, times)


DEFAULT_SCRIPT: tuple[Step, ...] = (
    write_file("hello.txt", "hello from the fake model\n", "I will create hello.txt."),
    text("Done: hello.txt now says hello."),
)

#: usage reported for every reply; fixed so parsers and tests can predict the sums
USAGE = {"input": 1000, "output": 20, "cache_read": 200, "cache_write": 100}

TITLE = "Fake title"

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


# ---------------------------------------------------------------------------- the server


class FakeLLM:
    """Context manager running the fake server on a free port of 127.0.0.1."""

    def __init__(self, script: Sequence[Step] = DEFAULT_SCRIPT, *, model: str = MODEL):
        self._script: list[Step] = list(script)
        self.model = model
        self.requests: list[dict[str, Any]] = []
        #: (method, path, body) for every request, in order
        self.calls: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ids = 0
        self._served: dict[int, int] = {}

    @property
    def script(self) -> list[Step]:
        return self._script

    @script.setter
    def script(self, steps: Sequence[Step]) -> None:
        """Replace the script (e.g. before resuming a session); flaky-error counts start over."""
        with self._lock:
            self._script = list(steps)
            self._served.clear()

    # -- lifecycle
    def __enter__(self) -> FakeLLM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeLLM is not running"
        return self._server.server_address[1]

    @property
    def base(self) -> str:
        """``http://127.0.0.1:PORT`` (Anthropic clients add ``/v1`` themselves)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` (OpenAI-style base URL)."""
        return self.base + "/v1"

    # -- inspection helpers
    def dump(self) -> str:
        """Every request body as one JSON text, to search for strings that must (not) be there."""
        with self._lock:
            return json.dumps(self.requests)

    def agent_requests(self) -> list[dict[str, Any]]:
        """Requests that offered tools or came from a client that never does (not title
        requests)."""
        with self._lock:
            return [r for r in self.requests if not _is_title_request(r)]

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}_{self._ids:04d}"

    def _record(self, method: str, path: str, body: Any) -> None:
        with self._lock:
            self.calls.append((method, path, body))
            if isinstance(body, dict):
                self.requests.append(body)

    def step_for(self, turns: int) -> Step:
        """The step answering a request made `turns` assistant turns after the last user message.

        Flaky errors (`times` set) that already failed their share are dropped from the script
        first, so they never take a turn's place."""
        with self._lock:
            live = [
                (i, s)
                for i, s in enumerate(self._script)
                if not (
                    isinstance(s, HTTPError)
                    and s.times is not None
                    and self._served.get(i, 0) >= s.times
                )
            ]
            if not live:
                live = (
                    [(len(self._script) - 1, self._script[-1])]
                    if self._script
                    else [(-1, Text(""))]
                )
            index, step = live[min(turns, len(live) - 1)]
            self._served[index] = self._served.get(index, 0) + 1
            return step


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # clients that give up (timeouts, retries, killed processes) reset connections; not news
        pass


# ---------------------------------------------------------------------------- request reading


def _text_of(content: Any) -> str:
    """Concatenated text of a message content (string or list of blocks/parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    out.append(part["text"])
                elif "content" in part:
                    out.append(_text_of(part["content"]))
        return "\n".join(out)
    return ""


def _system_text(body: Mapping[str, Any]) -> str:
    parts = [_text_of(body.get("system")), _text_of(body.get("instructions"))]
    for msg in body.get("messages") or []:
        if isinstance(msg, dict) and msg.get("role") in ("system", "developer"):
            parts.append(_text_of(msg.get("content")))
    for item in body.get("input") or []:
        if isinstance(item, dict) and item.get("role") in ("system", "developer", "user"):
            parts.append(_text_of(item.get("content")))
    return "\n".join(parts)


def _is_title_request(body: Mapping[str, Any]) -> bool:
    if body.get("tools"):
        return False
    system = _system_text(body).lower()
    return "title" in system and "generat" in system


def _turns_chat(messages: Sequence[Any]) -> int:
    last_user = -1
    for i, msg in enumerate(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            last_user = i
    return sum(
        1 for m in messages[last_user + 1 :] if isinstance(m, dict) and m.get("role") == "assistant"
    )


def _turns_anthropic(messages: Sequence[Any]) -> int:
    def is_real_user(msg: Any) -> bool:
        if not isinstance(msg, dict) or msg.get("role") != "user":
            return False
        content = msg.get("content")
        if isinstance(content, list):
            return not any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)
        return True

    last_user = -1
    for i, msg in enumerate(messages):
        if is_real_user(msg):
            last_user = i
    return sum(
        1 for m in messages[last_user + 1 :] if isinstance(m, dict) and m.get("role") == "assistant"
    )


_INJECTED_PREFIXES = (
    "<environment_context",
    "<user_instructions",
    "# AGENTS.md",
    "<permissions",
    "<collaboration_mode",
    "<skills_instructions",
    "<turn_aborted",
)


def _turns_responses(items: Sequence[Any]) -> int:
    def is_real_user(item: Any) -> bool:
        if not isinstance(item, dict) or item.get("role") != "user":
            return False
        return not _text_of(item.get("content")).lstrip().startswith(_INJECTED_PREFIXES)

    last_user = -1
    for i, item in enumerate(items):
        if is_real_user(item):
            last_user = i
    turns, in_turn = 0, False
    for item in items[last_user + 1 :]:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        assistant = kind in (
            "function_call",
            "reasoning",
            "custom_tool_call",
            "local_shell_call",
        ) or (kind == "message" and item.get("role") == "assistant")
        if assistant and not in_turn:
            turns += 1
        in_turn = assistant
    return turns


_CWD_PATTERNS = (
    re.compile(r"Primary working directory: *(\S+)"),
    re.compile(r"<cwd>([^<]+)</cwd>"),
    re.compile(r"Working directory: *(\S+)"),
)


def _cwd(body: Mapping[str, Any]) -> str | None:
    blob = _system_text(body) + "\n" + json.dumps(body.get("messages") or [])[:20000]
    for pattern in _CWD_PATTERNS:
        m = pattern.search(blob)
        if m:
            return m.group(1).strip()
    return None


def _whole_edit(step: WriteFile) -> str:
    lead = (step.text + "\n\n") if step.text else ""
    content = step.content if step.content.endswith("\n") else step.content + "\n"
    return f"{lead}{step.path}\n```\n{content}```\n"


# ---------------------------------------------------------------------------- handler


class _Handler(BaseHTTPRequestHandler):
    owner: FakeLLM
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # -- plumbing
    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = self._read_chunked()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _read_chunked(self) -> bytes:
        data = b""
        while True:
            size = int(self.rfile.readline().strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return data
            data += self.rfile.read(size)
            self.rfile.readline()

    def _send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _sse(self, data: Any, event: str | None = None) -> None:
        chunk = ""
        if event:
            chunk += f"event: {event}\n"
        chunk += "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n"
        self.wfile.write(chunk.encode())
        self.wfile.flush()

    def _error(self, step: HTTPError, flavour: str) -> None:
        message = f"fake error {step.status}"
        if step.body is not None:
            payload: Any = step.body
        elif flavour == "anthropic":
            payload = {
                "type": "error",
                "error": {"type": _STATUS_TYPES.get(step.status, "api_error"), "message": message},
            }
        else:
            payload = {
                "error": {
                    "message": message,
                    "type": _STATUS_TYPES.get(step.status, "api_error"),
                    "code": "rate_limit_exceeded" if step.status == 429 else None,
                }
            }
        self._send_json(step.status, payload, step.headers)

    # -- routes
    def do_GET(self) -> None:
        self.owner._record("GET", self.path, None)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.endswith("/models"):
            model = {
                "id": self.owner.model,
                "object": "model",
                "created": 0,
                "owned_by": "fake",
                "type": "model",
                "display_name": "Fake",
                "created_at": "2024-01-01T00:00:00Z",
            }
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [model],
                    "models": [model],
                    "has_more": False,
                    "first_id": model["id"],
                    "last_id": model["id"],
                },
            )
        else:
            self._send_json(404, {"error": {"message": f"no route {path}"}})

    def do_HEAD(self) -> None:
        self.owner._record("HEAD", self.path, None)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        body = self._read_body()
        self.owner._record("POST", self.path, body)
        path = self.path.split("?", 1)[0].rstrip("/")
        if not isinstance(body, dict):
            self._send_json(400, {"error": {"message": "body must be a JSON object"}})
        elif path.endswith("/chat/completions"):
            self._chat(body)
        elif path.endswith("/responses"):
            self._responses(body)
        elif path.endswith("/messages/count_tokens"):
            self._send_json(200, {"input_tokens": USAGE["input"]})
        elif path.endswith("/messages"):
            self._anthropic(body)
        else:
            self._send_json(404, {"error": {"message": f"no route {path}"}})

    # -- OpenAI Chat Completions
    def _chat(self, body: dict[str, Any]) -> None:
        owner = self.owner
        step: Step
        if _is_title_request(body):
            step = Text(TITLE)
        else:
            step = owner.step_for(_turns_chat(body.get("messages") or []))
        if isinstance(step, HTTPError):
            return self._error(step, "openai")
        has_tools = bool(body.get("tools"))
        content, calls = "", []
        if isinstance(step, Text):
            content = step.text
        elif isinstance(step, WriteFile) and not has_tools:
            content = _whole_edit(step)
        elif isinstance(step, WriteFile):
            content = step.text
            calls.append(("write", {"filePath": step.path, "content": step.content}))
        elif isinstance(step, ToolCall):
            content = step.text
            calls.append((step.name, dict(step.arguments)))
        calls = [(owner._next_id("call"), name, json.dumps(args)) for name, args in calls]
        finish = "tool_calls" if calls else "stop"
        usage = {
            "prompt_tokens": USAGE["input"] + USAGE["cache_read"],
            "completion_tokens": USAGE["output"],
            "total_tokens": USAGE["input"] + USAGE["cache_read"] + USAGE["output"],
            "prompt_tokens_details": {"cached_tokens": USAGE["cache_read"]},
        }
        cid, model, created = (
            owner._next_id("chatcmpl"),
            body.get("model") or owner.model,
            int(time.time()),
        )
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": content or None}
            if calls:
                message["tool_calls"] = [
                    {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                    for i, n, a in calls
                ]
            return self._send_json(
                200,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "usage": usage,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                },
            )

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }

        self._start_sse()
        self._sse(chunk({"role": "assistant", "content": ""}))
        if content:
            self._sse(chunk({"content": content}))
        for index, (call_id, name, args) in enumerate(calls):
            self._sse(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call_id,
                                "type": "function",
                                "function": {"name": name, "arguments": ""},
                            }
                        ]
                    }
                )
            )
            self._sse(chunk({"tool_calls": [{"index": index, "function": {"arguments": args}}]}))
        self._sse(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            self._sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        self._sse("[DONE]")

    # -- OpenAI Responses (codex)
    def _responses(self, body: dict[str, Any]) -> None:
        owner = self.owner
        items_in = body.get("input") or []
        if isinstance(items_in, str):
            items_in = [{"role": "user", "content": items_in}]
        step = owner.step_for(_turns_responses(items_in))
        if isinstance(step, HTTPError):
            return self._error(step, "openai")
        text_out, calls = "", []
        if isinstance(step, Text):
            text_out = step.text
        elif isinstance(step, WriteFile):
            text_out = step.text
            target = step.path
            cmd = f"printf %s {shlex.quote(step.content)} > {shlex.quote(target)}"
            calls.append(("exec_command", {"cmd": cmd}))
        elif isinstance(step, ToolCall):
            text_out = step.text
            calls.append((step.name, dict(step.arguments)))
        rid = owner._next_id("resp")
        items: list[dict[str, Any]] = []
        if text_out:
            items.append(
                {
                    "type": "message",
                    "id": owner._next_id("msg"),
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text_out, "annotations": []}],
                }
            )
        for name, args in calls:
            items.append(
                {
                    "type": "function_call",
                    "id": owner._next_id("fc"),
                    "call_id": owner._next_id("call"),
                    "name": name,
                    "arguments": json.dumps(args),
                    "status": "completed",
                }
            )
        usage = {
            "input_tokens": USAGE["input"] + USAGE["cache_read"],
            "input_tokens_details": {"cached_tokens": USAGE["cache_read"]},
            "output_tokens": USAGE["output"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": USAGE["input"] + USAGE["cache_read"] + USAGE["output"],
        }
        model = body.get("model") or owner.model
        base = {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "status": "in_progress",
            "output": [],
            "usage": None,
        }
        done = {**base, "status": "completed", "output": items, "usage": usage}
        if not body.get("stream"):
            return self._send_json(200, done)
        self._start_sse()
        seq = iter(range(1_000_000))
        self._sse(
            {"type": "response.created", "sequence_number": next(seq), "response": base},
            "response.created",
        )
        for index, item in enumerate(items):
            started = {**item, "status": "in_progress"}
            if item["type"] == "message":
                started["content"] = []
            else:
                started["arguments"] = ""
            self._sse(
                {
                    "type": "response.output_item.added",
                    "sequence_number": next(seq),
                    "output_index": index,
                    "item": started,
                },
                "response.output_item.added",
            )
            if item["type"] == "message":
                t = item["content"][0]["text"]
                self._sse(
                    {
                        "type": "response.content_part.added",
                        "sequence_number": next(seq),
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": []},
                    },
                    "response.content_part.added",
                )
                self._sse(
                    {
                        "type": "response.output_text.delta",
                        "sequence_number": next(seq),
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "delta": t,
                    },
                    "response.output_text.delta",
                )
                self._sse(
                    {
                        "type": "response.output_text.done",
                        "sequence_number": next(seq),
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "text": t,
                    },
                    "response.output_text.done",
                )
                self._sse(
                    {
                        "type": "response.content_part.done",
                        "sequence_number": next(seq),
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "part": item["content"][0],
                    },
                    "response.content_part.done",
                )
            else:
                self._sse(
                    {
                        "type": "response.function_call_arguments.delta",
                        "sequence_number": next(seq),
                        "item_id": item["id"],
                        "output_index": index,
                        "delta": item["arguments"],
                    },
                    "response.function_call_arguments.delta",
                )
                self._sse(
                    {
                        "type": "response.function_call_arguments.done",
                        "sequence_number": next(seq),
                        "item_id": item["id"],
                        "output_index": index,
                        "arguments": item["arguments"],
                    },
                    "response.function_call_arguments.done",
                )
            self._sse(
                {
                    "type": "response.output_item.done",
                    "sequence_number": next(seq),
                    "output_index": index,
                    "item": item,
                },
                "response.output_item.done",
            )
        self._sse(
            {"type": "response.completed", "sequence_number": next(seq), "response": done},
            "response.completed",
        )

    # -- Anthropic Messages (claude code)
    def _anthropic(self, body: dict[str, Any]) -> None:
        owner = self.owner
        if _is_title_request(body):
            step: Step = Text(TITLE)
        else:
            step = owner.step_for(_turns_anthropic(body.get("messages") or []))
        if isinstance(step, HTTPError):
            return self._error(step, "anthropic")
        blocks: list[dict[str, Any]] = []
        if isinstance(step, Text):
            blocks.append({"type": "text", "text": step.text})
        elif isinstance(step, (WriteFile, ToolCall)):
            if step.text:
                blocks.append({"type": "text", "text": step.text})
            if isinstance(step, WriteFile):
                path = step.path
                if not path.startswith("/"):
                    path = (_cwd(body) or "/tmp").rstrip("/") + "/" + path
                name, args = "Write", {"file_path": path, "content": step.content}
            else:
                name, args = step.name, dict(step.arguments)
            blocks.append(
                {"type": "tool_use", "id": owner._next_id("toolu"), "name": name, "input": args}
            )
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        mid, model = owner._next_id("msg"), body.get("model") or owner.model
        usage = {
            "input_tokens": USAGE["input"],
            "output_tokens": USAGE["output"],
            "cache_read_input_tokens": USAGE["cache_read"],
            "cache_creation_input_tokens": USAGE["cache_write"],
        }
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": blocks,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }
        if not body.get("stream"):
            return self._send_json(200, message)
        self._start_sse()
        self._sse(
            {
                "type": "message_start",
                "message": {
                    **message,
                    "content": [],
                    "stop_reason": None,
                    "usage": {**usage, "output_tokens": 1},
                },
            },
            "message_start",
        )
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                self._sse(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    },
                    "content_block_start",
                )
                self._sse(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "text_delta", "text": block["text"]},
                    },
                    "content_block_delta",
                )
            else:
                self._sse(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {
                            "type": "tool_use",
                            "id": block["id"],
                            "name": block["name"],
                            "input": {},
                        },
                    },
                    "content_block_start",
                )
                self._sse(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {
                            "type": "input_json_delta",
                            "partial_json": json.dumps(block["input"]),
                        },
                    },
                    "content_block_delta",
                )
            self._sse({"type": "content_block_stop", "index": index}, "content_block_stop")
        self._sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": USAGE["output"]},
            },
            "message_delta",
        )
        self._sse({"type": "message_stop"}, "message_stop")


def litellm_metadata(model: str = MODEL) -> dict[str, Any]:
    """The fake model as litellm knows models (aider's `.aider.model.metadata.json`), under the
    name aider is given (`openai/<model>`): one it does not know, it looks up in a price list it
    would download."""
    return {
        f"openai/{model}": {
            "max_tokens": 4096,
            "max_input_tokens": 128000,
            "max_output_tokens": 4096,
            "input_cost_per_token": 3e-6,
            "output_cost_per_token": 1.5e-5,
            "litellm_provider": "openai",
            "mode": "chat",
        }
    }


def conversation_text(body: Mapping[str, Any]) -> str:
    """All message text of one request (chat `messages`, Responses `input`, Anthropic
    `messages`)."""
    parts: list[str] = []
    for msg in list(body.get("messages") or []) + list(body.get("input") or []):
        if isinstance(msg, dict):
            parts.append(_text_of(msg.get("content")))
            if msg.get("type") in ("function_call", "function_call_output"):
                parts.append(str(msg.get("arguments") or msg.get("output") or ""))
            for call in msg.get("tool_calls") or []:
                parts.append(str((call.get("function") or {}).get("arguments", "")))
    return "\n".join(parts)


__all__ = [
    "DEFAULT_SCRIPT",
    "MODEL",
    "USAGE",
    "FakeLLM",
    "HTTPError",
    "Text",
    "ToolCall",
    "WriteFile",
    "conversation_text",
    "http_error",
    "litellm_metadata",
    "text",
    "tool_call",
    "write_file",
]
