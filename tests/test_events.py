"""Signature checks and parsing, on deliveries shaped like Gitea's."""

import hashlib
import hmac
import urllib.parse

import pytest

from bot.core import events
from bot.core.events import CommentEvent, Delivery, Ignored, IssueEvent, WebhookError
from tests import payloads


def test_valid_gitea_signature():
    body, headers = payloads.label_delivery(["kugetsu"])
    events.verify_signature(payloads.SECRET, body, headers)


def test_hub_signature_256_is_accepted_alone():
    body, headers = payloads.label_delivery(["kugetsu"])
    headers = {"X-Hub-Signature-256": headers["X-Hub-Signature-256"]}
    events.verify_signature(payloads.SECRET, body, headers)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b, h: (b, {k: v for k, v in h.items() if "Signature" not in k}),
        lambda b, h: (b + b" ", h),
        lambda b, h: (b, {**h, "X-Gitea-Signature": "0" * 64}),
        lambda b, h: (
            b,
            {
                **h,
                "X-Gitea-Signature": "",
                "X-Gogs-Signature": "",
                "X-Hub-Signature-256": "sha256=",
            },
        ),
    ],
)
def test_bad_signatures(mutate):
    body, headers = mutate(*payloads.label_delivery(["kugetsu"]))
    with pytest.raises(WebhookError) as exc:
        events.verify_signature(payloads.SECRET, body, headers)
    assert exc.value.status == 401


def test_wrong_secret():
    body, headers = payloads.label_delivery(["kugetsu"])
    with pytest.raises(WebhookError):
        events.verify_signature("another-secret", body, headers)


def test_form_content_type_signs_the_json_inside():
    json_body = payloads.encode(payloads.issue_payload("label_updated", labels=["kugetsu"]))
    form = ("payload=" + urllib.parse.quote(json_body.decode())).encode()
    signed = events.signed_bytes("application/x-www-form-urlencoded", form)
    assert signed == json_body
    sig = hmac.new(payloads.SECRET.encode(), json_body, hashlib.sha256).hexdigest()
    events.verify_signature(payloads.SECRET, signed, {"X-Gitea-Signature": sig})


@pytest.mark.parametrize(
    "ctype, status", [("text/plain", 415), ("", 415), ("application/x-www-form-urlencoded", 400)]
)
def test_content_types(ctype, status):
    with pytest.raises(WebhookError) as exc:
        events.signed_bytes(ctype, b"hello")
    assert exc.value.status == status


def test_json_with_charset_is_json():
    assert events.signed_bytes("application/json; charset=utf-8", b"{}") == b"{}"


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies(payload):
    with pytest.raises(WebhookError) as exc:
        events.load_json(payload)
    assert exc.value.status == 400


def test_parse_label_updated():
    data = payloads.issue_payload(
        "label_updated",
        12,
        labels=["bug", "kugetsu"],
        sender="bob",
        author="bob",
        permission="admin",
    )
    event = events.parse(Delivery("d", "issues", "issue_label"), data)
    assert event == IssueEvent(
        "label_updated",
        "acme/widget",
        12,
        "Fix the widget",
        "It is broken.",
        ("bug", "kugetsu"),
        False,
        "bob",
        "admin",
    )


def test_a_label_event_never_takes_the_issue_authors_permission_for_the_labellers():
    # Gitea fills repository.permissions with the issue author's on issue events
    data = payloads.issue_payload(
        "label_updated", 12, labels=["kugetsu"], sender="adam", author="rita", permission="read"
    )
    event = events.parse(Delivery("d", "issues", "issue_label"), data)
    assert (event.sender, event.permission) == ("adam", None)


def test_a_comment_event_carries_the_commenters_permission():
    data = payloads.comment_payload("/kugetsu start", sender="rita", permission="read")
    event = events.parse(Delivery("d", "issue_comment", "issue_comment"), data)
    assert (event.sender, event.permission) == ("rita", "read")


def _set(data, path, value):
    *parents, last = path.split(".")
    for part in parents:
        data = data[part]
    data[last] = value


BAD_VALUES = [
    ("repository.full_name", "widget", "not owner/name"),
    ("repository.full_name", "acme/widget/x", "not owner/name"),
    ("repository.full_name", "../widget", "owner '..' is not a name"),
    ("repository.full_name", "acme/..", "repository name '..' is not a name"),
    ("repository.full_name", "acme/.", "repository name '.' is not a name"),
    ("repository.full_name", "/widget", "not letters, digits"),
    ("repository.full_name", "ac me/widget", "not letters, digits"),
    ("repository.full_name", "acme/wid?get", "not letters, digits"),
    ("repository.full_name", "a" * 41 + "/widget", "longer than 40"),
    ("repository.full_name", "acme/" + "w" * 101, "longer than 100"),
    ("issue.number", 0, "between 1 and"),
    ("issue.number", -9223372036854775808, "between 1 and"),
    ("issue.number", 2**63, "between 1 and"),
    ("issue.number", 10**40, "between 1 and"),
    ("issue.number", 7.0, "wrong type"),
    ("comment.id", 2**63, "between 1 and"),
    ("comment.id", -1, "between 1 and"),
    ("sender.login", "..", "login '..' is not a name"),
    ("sender.login", "../alice", "not letters, digits"),
    ("sender.login", "", "not letters, digits"),
    ("sender.login", "x" * 41, "longer than 40"),
    ("issue.title", ["not", "text"], "wrong type"),
]


@pytest.mark.parametrize("path, value, reason", BAD_VALUES)
def test_values_that_would_reach_a_path_or_the_database_are_400(path, value, reason):
    data = payloads.comment_payload("/kugetsu start")
    _set(data, path, value)
    with pytest.raises(WebhookError) as exc:
        events.parse(Delivery("d", "issue_comment", "issue_comment"), data)
    assert exc.value.status == 400 and reason in exc.value.reason
    assert "\n" not in exc.value.reason and len(exc.value.reason) < 200


@pytest.mark.parametrize(
    "path, value, reason", [v for v in BAD_VALUES if not v[0].startswith("comment.")]
)
def test_issue_events_check_the_same_values(path, value, reason):
    data = payloads.issue_payload("label_updated", labels=["kugetsu"])
    _set(data, path, value)
    with pytest.raises(WebhookError) as exc:
        events.parse(Delivery("d", "issues", "issue_label"), data)
    assert exc.value.status == 400 and reason in exc.value.reason


def test_the_largest_numbers_are_accepted():
    data = payloads.comment_payload("/kugetsu start", 2**63 - 1, comment_id=2**63 - 1)
    event = events.parse(Delivery("d", "issue_comment", "issue_comment"), data)
    assert (event.number, event.comment_id) == (2**63 - 1, 2**63 - 1)


def test_an_integer_python_will_not_convert_is_400():
    body = b'{"action": "created", "id": ' + b"9" * 5000 + b"}"
    with pytest.raises(WebhookError) as exc:
        events.load_json(body)
    assert exc.value.status == 400


def test_parse_comment_on_pull_request():
    data = payloads.comment_payload(
        "/kugetsu continue x", 13, is_pull=True, comment_id=55, permission="read"
    )
    event = events.parse(Delivery("d", "issue_comment", "pull_request_comment"), data)
    assert isinstance(event, CommentEvent)
    assert (event.number, event.is_pull, event.comment_id, event.permission) == (
        13,
        True,
        55,
        "read",
    )


@pytest.mark.parametrize("drop", ["repository", "sender", "issue", "comment", "action"])
def test_missing_fields_are_400(drop):
    data = payloads.comment_payload("/kugetsu start")
    del data[drop]
    with pytest.raises(WebhookError) as exc:
        events.parse(Delivery("d", "issue_comment", "issue_comment"), data)
    assert exc.value.status == 400 and drop in exc.value.reason


def test_wrong_type_is_400():
    data = payloads.comment_payload("/kugetsu start")
    data["issue"]["number"] = "7"
    with pytest.raises(WebhookError):
        events.parse(Delivery("d", "issue_comment", "issue_comment"), data)


def test_other_events_are_ignored():
    event = events.parse(Delivery("d", "push", "push"), {"ref": "refs/heads/main"})
    assert isinstance(event, Ignored)


def test_delivery_headers():
    body, headers = payloads.label_delivery(["kugetsu"])
    d = events.delivery_of(headers, body)
    assert (d.event, d.event_type, d.id) == ("issues", "issue_label", headers["X-Gitea-Delivery"])
    with pytest.raises(WebhookError):
        events.delivery_of({}, body)
    assert events.delivery_of({"X-Gitea-Event": "issues"}, body).id.startswith("sha256:")


def review_data(event_type="pull_request_review_rejected", content=None, **changes):
    data = {
        "action": "reviewed",
        "number": 13,
        "pull_request": {"number": 13, "head": {"ref": "kugetsu/issue-7"}},
        "requested_reviewer": None,
        "repository": payloads.repository(permission="admin"),
        "sender": payloads.user("bob"),
        "commit_id": "",
        "review": {"type": event_type, "content": content},
    }
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "event, event_type, state",
    [
        ("pull_request_approved", "pull_request_review_approved", "APPROVED"),
        ("pull_request_rejected", "pull_request_review_rejected", "REQUEST_CHANGES"),
        # `pull_request_comment` as X-Gitea-Event is a review comment, not a PR comment
        ("pull_request_comment", "pull_request_review_comment", "COMMENT"),
        # a sender without event types: the event names the state alone
        ("pull_request_rejected", "pull_request_rejected", "REQUEST_CHANGES"),
    ],
)
def test_a_submitted_review_is_parsed_without_an_id_or_its_line_comments(event, event_type, state):
    data = review_data(event_type if event_type.startswith("pull_request_review") else event)
    parsed = events.parse(Delivery("d", event, event_type), data)
    assert parsed == events.ReviewEvent("acme/widget", 13, state, "", "bob")
    assert events.REVIEW_EVENTS == ("pull_request_review",)  # the hook API's name for them


def test_review_deliveries_of_another_shape():
    ignored = events.parse(
        Delivery("d", "pull_request_approved", "pull_request_review_approved"),
        review_data(action="dismissed"),
    )
    assert isinstance(ignored, Ignored)
    no_number = review_data()
    del no_number["pull_request"]
    for bad in (review_data(review="x"), review_data(content=5), no_number):
        with pytest.raises(WebhookError) as exc:
            events.parse(
                Delivery("d", "pull_request_rejected", "pull_request_review_rejected"), bad
            )
        assert exc.value.status == 400


def test_a_comment_on_a_pull_request_carries_where_its_commits_live():
    pull = {
        "number": 21,
        "head": {"ref": "fix", "repo": {"full_name": "carol/widget"}},
        "allow_maintainer_edit": True,
    }
    data = payloads.comment_payload("/kugetsu x", 21, is_pull=True, pull=pull)
    event = events.parse(Delivery("d", "issue_comment", "pull_request_comment"), data)
    assert event.pull == events.PullHead("carol/widget", "fix", True)
    pull["head"]["repo"] = None  # the fork was deleted
    event = events.parse(Delivery("d", "issue_comment", "pull_request_comment"), data)
    assert event.pull == events.PullHead(None, "fix", True)
    pull["head"]["repo"] = {"full_name": "../x"}
    with pytest.raises(WebhookError):
        events.parse(Delivery("d", "issue_comment", "pull_request_comment"), data)
