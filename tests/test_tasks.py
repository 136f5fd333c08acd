"""The pure task model: transitions and the one retry policy."""

import pytest

from bot.tasks import (
    LABELLER,
    TRANSITIONS,
    InvalidTransition,
    Outcome,
    State,
    backoff_for,
    check_transition,
    decide,
    doubling,
    fallback_permission,
    permission_at_least,
)


@pytest.mark.parametrize(
    "outcome, attempts, state, delay",
    [
        (Outcome.SUCCEEDED, 1, State.COMPLETED, None),
        (Outcome.NO_CHANGES, 1, State.COMPLETED, None),
        (Outcome.CANCELLED, 1, State.CANCELLED, None),
        (Outcome.AGENT_FAILED, 1, State.PENDING, 10.0),
        (Outcome.TIMED_OUT, 2, State.PENDING, 20.0),
        (Outcome.INFRA_ERROR, 2, State.PENDING, 20.0),
        (Outcome.AGENT_FAILED, 3, State.FAILED, None),
        (Outcome.INFRA_ERROR, 3, State.FAILED, None),
    ],
)
def test_decide(outcome, attempts, state, delay):
    decision = decide(outcome, attempts, 3, (10.0, 20.0))
    assert decision.state is state and decision.retry_in == delay


def test_backoff_repeats_its_last_entry():
    assert [backoff_for(a, (5, 60)) for a in (1, 2, 3, 9)] == [5, 60, 60, 60]


def test_transitions():
    check_transition(State.PENDING, State.RUNNING)
    check_transition(State.FAILED, State.PENDING)
    for terminal in (State.COMPLETED, State.REJECTED):
        assert TRANSITIONS[terminal] == frozenset()
    with pytest.raises(InvalidTransition):
        check_transition(State.COMPLETED, State.PENDING)
    with pytest.raises(InvalidTransition):
        check_transition(State.PENDING, State.COMPLETED)


@pytest.mark.parametrize(
    "have, need, ok",
    [
        ("write", "write", True),
        ("admin", "write", True),
        ("owner", "admin", True),
        ("read", "write", False),
        ("none", "read", False),
        (None, "read", False),
        ("weird", "read", False),
    ],
)
def test_permission_order(have, need, ok):
    assert permission_at_least(have, need) is ok


def test_doubling_waits_twice_as_long_each_time_up_to_its_most_however_many_failures():
    assert [doubling(5.0, n, 600.0) for n in (1, 2, 3, 7, 8)] == [5.0, 10.0, 20.0, 320.0, 600.0]
    assert doubling(5.0, 5000, 600.0) == 600.0  # 5.0 * 2 ** 4999 is no float


@pytest.mark.parametrize(
    "hint, expected",
    [
        ("admin", ("admin", True)),
        ("write", ("write", True)),
        ("read", ("read", True)),
        ("none", ("none", True)),
        (LABELLER, ("write", False)),  # at least write: Gitea lets only writers change labels
        (None, ("none", True)),
        ("root", ("none", True)),
    ],
)
def test_fallback_permission_is_what_the_request_itself_shows(hint, expected):
    assert fallback_permission(hint) == expected
