"""Fencing: a worker whose lease was taken over, and which then tries to publish, is refused.

Worker A claims a task; before A publishes, the task's lease runs out and worker B, on
another machine, recovers the task and claims it (a new lease token). A's attempt then
goes on, as a worker cut off from the database would once it is back: every step that
publishes is refused, at the push, at the pull request, and at finish(), and nothing A
does changes the task B now holds. Tracking comments, replies and reactions are
likewise written only by the holder of the publisher lease. Both backends.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from bot.config import WorkerConfig
from bot.core import render
from bot.core.tasks import Kind, Outcome, State
from bot.store import open_store
from bot.worker.tick import Worker
from bot.workspace import Workspace
from tests.conftest import REPO, TOKEN, task_events
from tests.test_worker import BRANCH, Harness, naming_its_session

pytestmark = pytest.mark.both_modes


@pytest.fixture
def harness(tmp_path, gitea, backend, request):
    url = "" if backend == "sqlite" else request.getfixturevalue("pg_cluster").url_for()
    h = Harness(tmp_path, gitea, database_url=url)
    yield h
    h.close()


def machine_b(h: Harness, tmp_path) -> Worker:
    """A worker on another machine, with a store of its own on the same database."""
    config = replace(
        h.config,
        storage=replace(h.config.storage, data_dir=tmp_path / "machine-b"),
        worker=WorkerConfig(host="machine-b"),
    )
    store = open_store(h.config.storage.database)  # the same database
    workspace = Workspace(
        mirrors_dir=config.storage.mirrors_dir,
        worktrees_dir=config.storage.worktrees_dir,
        remote_url=config.gitea.git_url,
        token=TOKEN,
        author_name="kugetsu",
        author_email="kugetsu@example.invalid",
    )
    return Worker(config, store, h.client, workspace)


def take_over(h: Harness, b: Worker, task_id: int) -> str:
    """The task's lease runs out; B recovers it (its attempt counted) and claims it."""
    h.store._conn().execute(
        "UPDATE tasks SET lease_expires_at = ? WHERE id = ?", (time.time() - 1, task_id)
    )
    assert b.recover() == [task_id]
    [task] = b.store.claim(3, b.worker_id)
    assert task.id == task_id and task.worker_id == b.worker_id
    return task.lease_token


@pytest.mark.parametrize("when", ["before the push", "before the pull request"])
def test_a_worker_whose_lease_was_taken_over_cannot_publish(harness, tmp_path, when, monkeypatch):
    h = harness
    n = h.issue()
    tid = h.enqueue(n, authorized=True)
    [task_a] = h.store.claim(3, h.worker.worker_id)  # what A's launch() claimed
    b = machine_b(h, tmp_path)
    try:
        if when == "before the push":
            token_b = take_over(h, b, tid)
        else:
            push = h.workspace.push
            taken: list[str] = []

            def push_then_lose_the_lease(path, branch):
                push(path, branch)
                taken.append(take_over(h, b, tid))

            monkeypatch.setattr(h.workspace, "push", push_then_lose_the_lease)

        result = h.worker.runner.run(task_a)  # A's attempt goes on as if nothing happened
        assert result.outcome is Outcome.INFRA_ERROR
        assert "lease was taken over" in result.error
        assert h.worker.finish(task_a, result) is None  # finish refused

        if when == "before the push":
            assert h.gitea.file_at(REPO, BRANCH.format(n), "kugetsu_output.txt") is None
        else:
            token_b = taken[0]
            assert h.gitea.file_at(REPO, BRANCH.format(n), "kugetsu_output.txt")  # pushed first
        assert h.gitea.pulls_of(REPO) == {}  # no pull request, no comment on one
        task = h.store.get(tid)
        assert (task.state, task.worker_id, task.lease_token) == (
            State.RUNNING,
            b.worker_id,
            token_b,
        )
        assert task.attempts == 2 and task.pr_number is None and task.files_changed is None
        if when == "before the push":
            # nothing A wrote about its attempt after the takeover reached the task
            assert task.pid is None and task.worktree is None and task.publish_sha is None
        events = [(e["event"], e["detail"]) for e in task_events(h.store, tid)]
        assert events[-1] == ("claimed", b.worker_id)
    finally:
        b.store.close()


def test_only_the_publisher_lease_holder_writes_tracking_comments(harness):
    h = harness
    n = h.issue()
    tid = h.enqueue(n, authorized=True)
    # another node holds the publisher lease: this one writes nothing on Gitea
    assert h.store.try_lease("publisher", "machine-b-1-x", 3600)
    h.worker.tick()
    assert h.tracking_comments(n) == []
    assert h.store.get(tid).comment_id is None
    # ... and when this node held it but another took it over meanwhile, the write that
    # comes after the takeover is refused, not made over the new holder
    h.store._conn().execute("DELETE FROM leases WHERE name = 'publisher'")
    assert h.worker._publisher_lease()
    h.store._conn().execute(
        "UPDATE leases SET owner = 'machine-b-1-x', expires_at = ? WHERE name = 'publisher'",
        (time.time() + 3600,),
    )
    h.worker.tick()
    assert h.tracking_comments(n) == []
    # once it is free, this node takes it and catches up
    h.store._conn().execute("DELETE FROM leases WHERE name = 'publisher'")
    h.worker._lease_renew_at = float("-inf")
    h.worker.tick()
    assert len(h.tracking_comments(n)) == 1


def test_a_follow_up_on_another_node_rebuilds_the_worktree_and_starts_a_fresh_session(
    tmp_path, gitea, pg_cluster
):
    """The issue's worktree and agent session are on a node that is gone: the follow-up
    runs here from the pushed branch, with the earlier request and result in its prompt,
    no session resumed, and its comment says so."""
    envfile = tmp_path / "env.json"
    agent = naming_its_session(envfile)
    h = Harness(tmp_path, gitea, database_url=pg_cluster.url_for(), agents={"fake": agent})
    try:
        n = h.issue()
        first = h.enqueue(n, prompt="add a greeting", authorized=True)
        h.settle(first)
        assert h.store.get(first).state is State.COMPLETED
        old_session = h.store.get(first).session_id
        # the earlier work was done on another machine, which is gone
        h.store.set_issue(None, REPO, n, node="gone-machine:/data")
        follow = h.enqueue(n, prompt="now say goodbye too", kind=Kind.CONTINUE, authorized=True)
        h.settle(follow)
        task = h.store.get(follow)
        assert (task.state, task.moved_from) == (State.COMPLETED, "gone-machine:/data")
        argv = json.loads(envfile.read_text())["argv"]
        assert argv[1] == "--session-id" and argv[2] != old_session  # a fresh session
        prompt = h.config.storage.prompt_path(follow).read_text()
        assert "add a greeting" in prompt and "now say goodbye too" in prompt
        assert h.store.issue_row(None, REPO, n)["node"] == h.worker.node
        [pr] = h.gitea.pulls_of(REPO).values()  # the same pull request, on the same branch
        assert pr["head"]["ref"] == BRANCH.format(n)
        [comment] = [c for c in h.tracking_comments(n) if render.marker(follow) in c["body"]]
        assert "Continued on another worker" in comment["body"]
        [earlier] = [c for c in h.tracking_comments(n) if render.marker(first) in c["body"]]
        assert "Continued on another worker" not in earlier["body"]
    finally:
        h.close()


def test_the_database_side_of_the_daily_cleanup_runs_on_one_node(harness, tmp_path):
    """Two nodes run their daily prune; the one that holds the cleanup lease deletes the
    old finished tasks, the other only its own files."""
    h = harness
    b = machine_b(h, tmp_path)

    def old_finished_task() -> int:
        tid = h.enqueue(h.issue(), authorized=True)
        assert h.store.transition(tid, State.PENDING, State.CANCELLED, event="cancelled")
        h.store._conn().execute(
            "UPDATE tasks SET finished_at = 1, updated_at = 1 WHERE id = ?", (tid,)
        )
        return tid

    try:
        first = old_finished_task()
        assert h.worker.cleanup(1).tasks == 1 and h.store.get(first) is None
        # the other node's prune, the same day: the lease is this node's, so not again
        second = old_finished_task()
        assert b.cleanup(1).tasks == 0 and h.store.get(second) is not None
        # and once the holder is gone (its lease ran out), the other node takes it on
        h.store._conn().execute("UPDATE leases SET expires_at = 0 WHERE name = 'cleanup'")
        assert b.cleanup(1).tasks == 1 and h.store.get(second) is None
    finally:
        b.store.close()
