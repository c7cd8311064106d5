"""The defensive boundary: check_envelope on generated input, and the dead-letter record form."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flask_tasks.transport.dead_letters import decode_record, encode_record, entry_ids
from flask_tasks.transport.envelope import MAX_DEPTH, BadEnvelope, check_envelope, depth

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def valid() -> dict[str, Any]:
    return {"body": base64.b64encode(b"[[], {}, {}]").decode(), "content-encoding": "utf-8",
            "content-type": "application/json", "headers": {"id": "1", "task": "t"},
            "properties": {"delivery_tag": "tag-1", "body_encoding": "base64",
                           "delivery_info": {"exchange": "", "routing_key": "celery"},
                           "priority": 0}}


def assert_safe_for_kombu(envelope: dict[str, Any]) -> None:
    """What kombu's virtual Message and our consumer rely on, once checked."""
    properties = envelope["properties"]
    assert isinstance(properties, dict)
    assert isinstance(properties["delivery_tag"], str) and properties["delivery_tag"]
    assert isinstance(properties["delivery_info"], dict)
    assert isinstance(envelope["headers"], dict)
    assert isinstance(envelope["body"], str)
    if properties.get("body_encoding") == "base64":
        base64.b64decode(envelope["body"], validate=True)


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_any_bytes_are_an_envelope_or_a_reason(raw: bytes) -> None:
    try:
        assert_safe_for_kombu(check_envelope(raw))
    except BadEnvelope as exc:
        assert str(exc)


@settings(max_examples=400)
@given(json_values)
def test_any_json_is_an_envelope_or_a_reason(value: Any) -> None:
    try:
        assert_safe_for_kombu(check_envelope(json.dumps(value)))
    except BadEnvelope as exc:
        assert str(exc)


@settings(max_examples=600)
@given(st.sampled_from(["body", "headers", "properties", "content-type", "content-encoding",
                        "p.delivery_tag", "p.delivery_info", "p.body_encoding", "p.priority",
                        "p.correlation_id", "i.exchange", "i.routing_key"]),
       json_values)
def test_any_field_of_any_type(field: str, value: Any) -> None:
    envelope = valid()
    target = envelope
    if field.startswith("p."):
        target, field = envelope["properties"], field[2:]
    elif field.startswith("i."):
        target, field = envelope["properties"]["delivery_info"], field[2:]
    target[field] = value
    raw = json.dumps(envelope).encode()
    try:
        assert_safe_for_kombu(check_envelope(raw))
    except BadEnvelope as exc:
        assert str(exc)


@pytest.mark.parametrize(("change", "reason"), [
    ({"properties": None}, "properties is missing, not an object"),
    ({"properties": "x"}, "properties is JSON string, not an object"),
    ({"body": 1}, "body is JSON number, not a string"),
    ({"headers": []}, "headers is JSON array, not an object"),
])
def test_reasons_name_the_field_and_the_type(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(BadEnvelope, match=reason):
        check_envelope(json.dumps({**valid(), **change}))


def test_limits() -> None:
    with pytest.raises(BadEnvelope, match="larger than the limit of 100 bytes"):
        check_envelope(json.dumps(valid()), max_size=100)
    with pytest.raises(BadEnvelope, match="nests too deeply"):
        check_envelope(b"[" * 100_000 + b"]" * 100_000)
    nested: Any = 1
    for _ in range(MAX_DEPTH + 5):
        nested = [nested]
    with pytest.raises(BadEnvelope, match=f"more than {MAX_DEPTH} levels"):
        check_envelope(json.dumps({**valid(), "headers": {"deep": nested}}))
    assert depth(nested, limit=10) == 11  # stops counting past the limit
    untagged = valid()
    del untagged["properties"]["delivery_tag"]
    with pytest.raises(BadEnvelope, match="delivery_tag is missing"):
        check_envelope(json.dumps(untagged))
    assert check_envelope(json.dumps(untagged), require_tag=False)  # the embedded broker's


@given(st.text(max_size=30), st.binary(max_size=200), st.text(max_size=100))
def test_a_record_gives_the_entry_back_byte_for_byte(queue: str, entry: bytes,
                                                     reason: str) -> None:
    letter = decode_record(encode_record(queue, entry, reason, "node", now=5.0))
    assert (letter.queue, letter.entry, letter.reason, letter.time) == (queue, entry, reason, 5.0)
    assert letter.as_dict()["entry"].encode("utf-8", "surrogateescape") == entry


def test_entry_ids_of_a_task_message_and_of_garbage() -> None:
    assert entry_ids(json.dumps(valid()).encode()) == ("1", "t")
    assert entry_ids(b"\xff garbage") == (None, None)
    assert entry_ids(json.dumps({"headers": {"id": 5}}).encode()) == (None, None)
