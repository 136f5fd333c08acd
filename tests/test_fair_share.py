"""Fair share: slots go round-robin across repositories, then across requesters within a
repository, oldest first within each; the queue positions in comments are that order."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.core.tasks import Kind, Outcome, State
from bot.store import open_store
from tests.conftest import REPO, enqueue, fake_agent, task_events, wait_for
from tests.test_worker import Harness

OTHER = "acme/gadget"


def add(store, repo: str, issue: int, by: str = "alice") -> int:
    return enqueue(
        store,
        repo=repo,
        issue=issue,
        kind=Kind.START,
        prompt="",
        agent="fake",
        requested_by=by,
        max_attempts=3,
        authorized=True,
    )


def finish(store, task_id: int) -> None:
    assert store.transition(
        task_id, State.RUNNING, State.COMPLETED, event="done", outcome=Outcome.SUCCEEDED
    )


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "db.sqlite")
    yield s
    s.close()


def waiting(store) -> list[int]:
    places = store.pending_positions(1000)
    assert [p for _, p in places] == list(range(1, len(places) + 1))
    return [t.id for t, _ in places]


@pytest.mark.parametrize("b_arrives", ["while the first of A runs", "before anything starts"])
def test_one_repositorys_backlog_does_not_starve_another_repositorys_task(store, b_arrives):
    a = [add(store, REPO, issue) for issue in range(1, 7)]
    started = []
    if b_arrives == "while the first of A runs":
        started += [t.id for t in store.claim(1, "w")]
    b = add(store, OTHER, 1)
    assert store.queue_position(b) == (1 if started else 2)
    while True:
        if started and store.get(started[-1]).state is State.RUNNING:
            finish(store, started[-1])
        shown = waiting(store)
        claimed = [t.id for t in store.claim(1, "w")]
        if not claimed:
            break
        assert claimed == shown[:1]  # the task shown first is the one that starts
        started += claimed
    assert started.index(b) <= 1  # B starts second or sooner
    assert sorted(started) == sorted([*a, b])
    assert started == [a[0], b, *a[1:]]


def test_a_hundred_waiting_tasks_take_one_turn_in_each_round(store):
    backlog = [add(store, REPO, issue) for issue in range(1, 101)]
    assert len(store.claim(3, "w")) == 3
    single = add(store, OTHER, 1)
    assert store.queue_position(single) == 1
    finish(store, backlog[0])
    assert [t.id for t in store.claim(3, "w")] == [single]


def test_requesters_within_a_repository_take_turns_oldest_first(store):
    alice = [add(store, REPO, issue, "alice") for issue in range(1, 5)]
    bob = [add(store, REPO, issue, "bob") for issue in range(5, 7)]
    carol = add(store, REPO, 7, "carol")
    assert waiting(store) == [alice[0], bob[0], carol, alice[1], bob[1], alice[2], alice[3]]
    # a running task of alice's is her turn taken: bob and carol go first
    assert [t.id for t in store.claim(1, "w")] == [alice[0]]
    assert waiting(store) == [bob[0], carol, alice[1], bob[1], alice[2], alice[3]]


def test_a_follow_up_still_waits_for_its_issues_running_task(store):
    first = add(store, REPO, 1)
    follow = enqueue(
        store,
        repo=REPO,
        issue=1,
        kind=Kind.CONTINUE,
        prompt="more",
        agent="fake",
        requested_by="bob",
        max_attempts=3,
        authorized=True,
    )
    assert [t.id for t in store.claim(5, "w")] == [first]
    assert store.claim(5, "w") == []
    finish(store, first)
    assert [t.id for t in store.claim(5, "w")] == [follow]


class RoundRobin:
    """The rule as a person would play it out: each slot goes to the repository served
    longest ago (never served: first), within it to the requester served longest ago,
    and to that requester's oldest task; among those never served, the oldest task
    first."""

    def __init__(self) -> None:
        self.waiting: list[tuple[int, str, str]] = []
        self.served: dict[object, int] = {}
        self.turns = 0

    def next(self) -> tuple[int, str, str] | None:
        def pick(group: list[tuple[int, str, str]], key) -> list[tuple[int, str, str]]:
            def rank(k):
                mine = [t for t in group if key(t) == k]
                return (self.served.get(k, 0), min(mine)[0])

            best = min({key(t) for t in group}, key=rank)
            return [t for t in group if key(t) == best]

        if not self.waiting:
            return None
        mine = pick(self.waiting, lambda t: t[1])
        theirs = pick(mine, lambda t: (t[1], t[2]))
        return min(theirs)

    def claim(self) -> int | None:
        task = self.next()
        if task is None:
            return None
        self.turns += 1
        self.served[task[1]] = self.served[(task[1], task[2])] = self.turns
        self.waiting.remove(task)
        return task[0]

    def played_out(self) -> list[int]:
        copy = RoundRobin()
        copy.waiting, copy.served, copy.turns = list(self.waiting), dict(self.served), self.turns
        return [t for t in iter(copy.claim, None)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from("abc"), st.sampled_from("uvw")),  # a task is queued
            st.just("start"),  # the next task starts (and the one before it is done)
        ),
        max_size=24,
    )
)
def test_the_queue_is_the_round_robin_and_tasks_start_in_the_order_shown(steps):
    model = RoundRobin()
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "db.sqlite")
        try:
            running = None
            for issue, step in enumerate(steps, start=1):
                if step == "start":
                    if running is not None:
                        finish(store, running)
                    shown = waiting(store)
                    assert shown == model.played_out()
                    claimed = [t.id for t in store.claim(1, "w")]
                    assert claimed == ([c] if (c := model.claim()) is not None else [])
                    assert claimed == shown[:1]
                    running = claimed[0] if claimed else None
                else:
                    repo, user = f"o/{step[0]}", step[1]
                    model.waiting.append((add(store, repo, issue, user), repo, user))
            # with every slot free, claimed one at a time, they start in the order shown
            shown = waiting(store)
            assert shown == model.played_out()
            assert [store.queue_position(t) for t in shown] == list(range(1, len(shown) + 1))
            started = []
            while claimed := store.claim(len(steps) + 2, "w", max_claims=1):
                started += [t.id for t in claimed]
            assert started == shown
        finally:
            store.close()


@pytest.mark.both_modes
def test_b_starts_second_and_the_comments_showed_that_order(tmp_path, gitea):
    """The worker, real agents and tracking comments: six tasks on A, the first one at
    work, then one on B, at limit 1."""
    gitea.create_repo(OTHER)
    gitea.set_permission(OTHER, "alice", "write")
    gate = tmp_path / "gate"
    h = Harness(tmp_path, gitea, limit=1, agents={"fake": fake_agent(FAKE_GATE=str(gate))})
    h.worker.publisher.position_refresh_seconds = 0.0  # every pass brings positions up to date
    try:

        def queue(repo: str) -> int:
            issue = gitea.create_issue(repo, "Something", "Do it.")
            return enqueue(
                h.store,
                repo=repo,
                issue=issue,
                kind=Kind.START,
                prompt="",
                agent="fake",
                requested_by="alice",
                max_attempts=3,
                permission_hint="write",
            )

        a = [queue(REPO) for _ in range(6)]
        wait_for(
            lambda: h.store.get(a[0]).state is State.RUNNING, tick=h.worker.run_tick, what="A1"
        )
        b = queue(OTHER)

        def shown() -> dict[int, int] | None:
            places = {}
            for task_id in [*a[1:], b]:
                body = next(
                    (
                        c["body"]
                        for c in gitea.comments.values()
                        if c["body"].startswith(f"<!-- kugetsu:task={task_id} -->")
                    ),
                    "",
                )
                found = re.search(r"position (\d+) in the queue", body)
                if not found:
                    return None
                places[task_id] = int(found[1])
            return places if sorted(places.values()) == list(range(1, 7)) else None

        places = wait_for(shown, tick=h.worker.run_tick, what="the queued comments")
        assert isinstance(places, dict)
        gate.touch()
        h.settle(*a, b)
        claims = sorted(
            (event["at"], task_id)
            for task_id in [*a, b]
            for event in task_events(h.store, task_id)
            if event["event"] == "claimed"
        )
        started = [task_id for _, task_id in claims]
        assert started.index(b) == 1  # B starts second
        assert sorted(places, key=places.__getitem__) == started[1:]
        assert all(h.store.get(t).outcome is Outcome.SUCCEEDED for t in [*a, b])
    finally:
        h.close()
