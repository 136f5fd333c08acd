"""One set of rules keeps secrets out of what kugetsu writes, wherever it writes it."""

import logging

import pytest
import responses

from bot.gitea import GiteaClient, Unauthorized
from bot.logs import RedactingFilter
from bot.redact import MASK, redact

TOKEN = "kgt-SECRET-token-0123456789"
SECRETS = (TOKEN, "whsec-987654")


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"token {TOKEN} in a message", f"token {MASK} in a message"),
        ("whsec-987654 and whsec-987654", f"{MASK} and {MASK}"),
        # an Authorization header's value, whatever the token is and however it is spelt
        ("Authorization: token abcdef\nnext line", f"Authorization: {MASK}\nnext line"),
        ("authorization:Bearer x.y.z", f"authorization:{MASK}"),
        # credentials in a URL
        (
            "fetch https://bob:pa55@git.example/acme/w.git",
            f"fetch https://{MASK}@git.example/acme/w.git",
        ),
        ("http://oauth2@host/x", f"http://{MASK}@host/x"),
        # what is not a secret stays
        ("https://git.example/acme/widget.git", "https://git.example/acme/widget.git"),
        ("mail bob@example.org", "mail bob@example.org"),
    ],
)
def test_redact(text, expected):
    assert redact(text, SECRETS) == expected


def test_a_secret_holding_another_is_masked_whole_and_short_ones_are_left_alone():
    assert redact("abcdef-123", ("abcdef", "abcdef-123")) == MASK
    assert redact("a b c", ("a", "b")) == "a b c"  # would mask ordinary text


@responses.activate
def test_gitea_errors_are_redacted_by_the_same_rules():
    responses.get(
        "https://git.example/api/v1/user",
        json={"message": f"bad token {TOKEN}"},
        status=401,
    )
    client = GiteaClient("https://git.example", TOKEN, retries=0)
    with pytest.raises(Unauthorized) as info:
        client.get_user()
    assert info.value.message == f"bad token {MASK}"


def test_log_records_are_redacted_by_the_same_rules():
    record = logging.LogRecord(
        "bot", logging.WARNING, __file__, 1, "push to %s failed", ("https://u:p@h/r.git",), None
    )
    record.detail = f"header Authorization: token {TOKEN}"
    RedactingFilter(SECRETS).filter(record)
    assert record.getMessage() == f"push to https://{MASK}@h/r.git failed"
    assert record.detail == f"header Authorization: {MASK}"
