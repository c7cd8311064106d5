from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime, timedelta

import pytest

from flask_tasks import protocol
from flask_tasks.exceptions import DecodeError, EncodeError

JSON = protocol.accept_set(["json"])


def test_build_has_every_protocol2_header() -> None:
    eta = datetime(2030, 1, 1, tzinfo=UTC)
    message = protocol.build("shop.add", "id-1", (2, 3), {"z": 1}, eta=eta, expires=eta,
                             retries=2, time_limit=10, soft_time_limit=5, parent_id="p",
                             root_id="r", group_id="g")
    headers = message.headers
    for key in ("lang", "task", "id", "root_id", "parent_id", "group", "eta", "expires",
                "retries", "timelimit", "argsrepr", "kwargsrepr", "origin"):
        assert key in headers
    assert headers["lang"] == "py" and headers["task"] == "shop.add" and headers["id"] == "id-1"
    assert headers["eta"] == "2030-01-01T00:00:00+00:00"
    assert headers["timelimit"] == [10, 5] and headers["retries"] == 2
    assert headers["argsrepr"] == "(2, 3)" and headers["kwargsrepr"] == "{'z': 1}"
    assert message.properties == {"correlation_id": "id-1", "reply_to": ""}
    assert message.content_type == "application/json"
    assert json.loads(message.body) == [[2, 3], {"z": 1}, {"callbacks": None, "errbacks": None,
                                                           "chain": None, "chord": None}]


def test_root_id_defaults_to_own_id() -> None:
    assert protocol.build("a", "x", (), {}).headers["root_id"] == "x"


def test_round_trip() -> None:
    message = protocol.build("a", "x", [1, "two"], {"k": [3]}, retries=1)
    request = protocol.parse(message.headers, message.body, message.content_type,
                             message.content_encoding, JSON, message.properties,
                             {"routing_key": "celery"})
    assert (request.id, request.task, request.args, request.kwargs) == ("x", "a", [1, "two"],
                                                                       {"k": [3]})
    assert request.retries == 1 and request.correlation_id == "x"
    assert request.delivery_info == {"routing_key": "celery"}


def test_unserializable_argument_raises_encode_error() -> None:
    with pytest.raises(EncodeError, match="'a'.*set"):
        protocol.build("a", "x", ({1},), {})


def test_argsrepr_is_bounded() -> None:
    message = protocol.build("a", "x", ("y" * 10_000,), {})
    assert len(message.headers["argsrepr"]) < 400


@pytest.mark.parametrize("body", [b"not json", b'{"a": 1}', b"[1, 2]", b'["x", {}, {}]'])
def test_malformed_bodies_raise_decode_error(body: bytes) -> None:
    headers = {"task": "a", "id": "x"}
    with pytest.raises(DecodeError):
        protocol.parse(headers, body, "application/json", "utf-8", JSON)


def test_pickle_refused_unless_accepted() -> None:
    body = pickle.dumps(([1], {}, {}))
    headers = {"task": "a", "id": "x"}
    with pytest.raises(DecodeError, match="not accepted"):
        protocol.parse(headers, body, "application/x-python-serialize", "binary", JSON)
    request = protocol.parse(headers, body, "application/x-python-serialize", "binary",
                             protocol.accept_set(["json", "pickle"]))
    assert request.args == [1]


@pytest.mark.parametrize("headers", [None, {}, {"task": "a"}, {"id": "x"}, {"task": 1, "id": "x"}])
def test_headers_must_be_protocol2(headers: dict | None) -> None:
    with pytest.raises(DecodeError):
        protocol.check_headers(headers)


def test_to_datetime() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert protocol.to_datetime(10, now) == now + timedelta(seconds=10)
    assert protocol.to_datetime(timedelta(minutes=1), now) == now + timedelta(minutes=1)
    naive = datetime(2030, 1, 1, 12)
    assert protocol.to_datetime(naive) == naive.replace(tzinfo=UTC)
    assert protocol.to_datetime(None) is None
