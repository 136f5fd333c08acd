"""Logging: one line a record, as text or as JSON, with its context, always redacted."""

import io
import json
import logging
import threading

import pytest

from bot.logs import configure_logging, context

TOKEN = "kgt-SECRET-token-0123456789"


@pytest.fixture
def logging_to(monkeypatch):
    """configure_logging(...) writing into a buffer: it writes to stderr, which is set
    here when the test calls it (pytest sets its own stderr again between setup and call)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def configure(*args, **kw) -> io.StringIO:
        stream = io.StringIO()
        monkeypatch.setattr("sys.stderr", stream)
        configure_logging(*args, **kw)
        return stream

    yield configure
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_is_one_object_a_line_with_the_context_fields(logging_to):
    output = logging_to("INFO", [TOKEN], output="json")
    log = logging.getLogger("bot.test")
    log.debug("below the level")
    log.info("task started", extra={"task": 7, "repo": "acme/widget", "issue": 3})
    log.warning("push failed", extra={"error": f"fatal: token {TOKEN} refused"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("task crashed", extra={"task": 7})
    lines = [json.loads(line) for line in output.getvalue().splitlines()]
    assert [(line["level"], line["logger"], line["message"]) for line in lines] == [
        ("INFO", "bot.test", "task started"),
        ("WARNING", "bot.test", "push failed"),
        ("ERROR", "bot.test", "task crashed"),
    ]
    assert (lines[0]["task"], lines[0]["repo"], lines[0]["issue"]) == (7, "acme/widget", 3)
    assert lines[0]["time"].endswith("Z") and "T" in lines[0]["time"]
    assert lines[1]["error"] == "fatal: token [redacted] refused"
    assert "ValueError: boom" in lines[2]["exception"]
    assert TOKEN not in output.getvalue()


def test_text_is_the_message_with_its_fields_as_key_value(logging_to):
    output = logging_to("INFO", [TOKEN])
    logging.getLogger("bot.test").info("mirror fetched", extra={"repo": "acme/widget", "issue": 3})
    [line] = output.getvalue().splitlines()
    assert line.endswith(" INFO bot.test: mirror fetched issue=3 repo=acme/widget")


def test_context_fields_go_on_every_record_of_their_thread_only(logging_to):
    output = logging_to("INFO", [], output="json")
    log = logging.getLogger("bot.test")
    other = threading.Thread(target=lambda: log.info("elsewhere"))
    with context(task=7, repo="acme/widget", issue=3):
        log.info("git step", extra={"step": "fetch"})
        log.info("own field wins", extra={"task": 8})
        other.start()
        other.join()
    log.info("after")
    lines = {line["message"]: line for line in map(json.loads, output.getvalue().splitlines())}
    assert (lines["git step"]["task"], lines["git step"]["step"]) == (7, "fetch")
    assert lines["own field wins"]["task"] == 8
    assert "task" not in lines["elsewhere"] and "task" not in lines["after"]
