"""Gitea's permissions: the one order, and what a request shows of its requester's."""

import pytest

from bot.core.permissions import LABELLER, at_least, in_delivery, shown


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
    assert at_least(have, need) is ok


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
def test_what_a_request_itself_shows(hint, expected):
    assert shown(hint) == expected


@pytest.mark.parametrize(
    "repository, expected",
    [
        ({"permissions": {"admin": True, "push": True, "pull": True}}, "admin"),
        ({"permissions": {"admin": False, "push": True, "pull": True}}, "write"),
        ({"permissions": {"admin": False, "push": False, "pull": True}}, "read"),
        ({"permissions": {"admin": False, "push": False, "pull": False}}, "none"),
        ({"permissions": None}, None),
        ({}, None),
        ("not an object", None),
    ],
)
def test_the_permission_a_delivery_carries(repository, expected):
    assert in_delivery(repository) == expected
