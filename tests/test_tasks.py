"""The pure task model: transitions and the one retry policy."""

import pytest

from bot.core.tasks import (
    TRANSITIONS,
    AttemptResult,
    InvalidTransition,
    Outcome,
    RetryPolicy,
    State,
    backoff_for,
    check_transition,
    doubling,
)

POLICY = RetryPolicy(max_attempts=3, backoff=(10.0, 20.0))


@pytest.mark.parametrize(
    "result, attempts, state, delay, refund",
    [
        (AttemptResult(Outcome.SUCCEEDED), 1, State.COMPLETED, None, False),
        (AttemptResult(Outcome.NO_CHANGES), 1, State.COMPLETED, None, False),
        (AttemptResult(Outcome.CANCELLED), 1, State.CANCELLED, None, False),
        (AttemptResult(Outcome.AGENT_FAILED), 1, State.PENDING, 10.0, False),
        (AttemptResult(Outcome.TIMED_OUT), 2, State.PENDING, 20.0, False),
        (AttemptResult(Outcome.INFRA_ERROR), 2, State.PENDING, 20.0, False),
        (AttemptResult(Outcome.AGENT_FAILED), 3, State.FAILED, None, False),
        (AttemptResult(Outcome.INFRA_ERROR), 3, State.FAILED, None, False),
        # an attempt that must not be retried (an unknown agent, a budget) fails at once
        (AttemptResult(Outcome.AGENT_FAILED, retry=False), 1, State.FAILED, None, False),
        # waiting for Gitea: back in the queue after the wait, the attempt given back,
        # even on the last attempt
        (
            AttemptResult(Outcome.INFRA_ERROR, requeue=True, delay=15.0),
            3,
            State.PENDING,
            15.0,
            True,
        ),
    ],
)
def test_the_retry_policy(result, attempts, state, delay, refund):
    decision = POLICY.decide(result, attempts, 3)
    assert (decision.state, decision.retry_in, decision.refund) == (state, delay, refund)


def test_the_retry_policy_reads_the_tasks_own_attempts():
    # a task keeps the max_attempts it was queued with, whatever the config says now
    assert POLICY.decide(AttemptResult(Outcome.TIMED_OUT), 3, 5).state is State.PENDING
    assert POLICY.decide(AttemptResult(Outcome.TIMED_OUT), 1, 1).state is State.FAILED


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


def test_doubling_waits_twice_as_long_each_time_up_to_its_most_however_many_failures():
    assert [doubling(5.0, n, 600.0) for n in (1, 2, 3, 7, 8)] == [5.0, 10.0, 20.0, 320.0, 600.0]
    assert doubling(5.0, 5000, 600.0) == 600.0  # 5.0 * 2 ** 4999 is no float
