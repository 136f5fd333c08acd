"""The receiver's process settings (bot.httpserver.prepare_interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

from bot.httpserver import SWITCH_INTERVAL_SECONDS


def test_prepare_interpreter_freezes_start_up_objects_and_shortens_gil_waits():
    # In a child: freezing the test process's objects would keep them for good.
    code = (
        "import gc, json, sys, flask\n"
        "before = (gc.get_freeze_count(), sys.getswitchinterval())\n"
        "from bot.httpserver import prepare_interpreter\n"
        "prepare_interpreter()\n"
        "print(json.dumps([before, [gc.get_freeze_count(), sys.getswitchinterval()]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    (frozen_before, interval_before), (frozen_after, interval_after) = json.loads(out.stdout)
    assert frozen_before == 0 and interval_before == 0.005
    assert frozen_after > 10000  # flask, werkzeug and the rest of start-up
    assert interval_after == SWITCH_INTERVAL_SECONDS < interval_before


def _hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_server_flushes_answers_from_the_handler_thread_without_a_deprecation_warning():
    import warnings

    from bot.httpserver import HttpServer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        server = HttpServer(_hello, "127.0.0.1", 0, threads=2).start()
    try:
        assert server._server.adj.send_bytes == 1
        assert _get(server.url + "/") == b"hello"
    finally:
        server.stop()
    assert [w for w in caught if issubclass(w.category, DeprecationWarning)] == []
