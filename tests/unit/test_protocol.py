from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# -- checking received messages: every header a worker relies on ---------------------
#: Any JSON value (what a broker entry's headers and bodies can hold).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
not_iso = st.text(max_size=30).filter(lambda text: text != "" and not _parses(text))
seconds = st.none() | st.integers(min_value=0, max_value=10**9) | st.floats(
    min_value=0, allow_nan=False)
bad_seconds = (st.integers(max_value=-1) | st.floats(max_value=-1e-9) | st.just(float("nan"))
               | st.booleans() | st.text(max_size=5) | st.lists(st.integers(), max_size=2))


def _parses(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _not(*types: type) -> st.SearchStrategy[Any]:
    """JSON values of none of ``types`` (bool is not an int here)."""
    def wrong(value: Any) -> bool:
        if isinstance(value, bool):
            return bool not in types
        return not isinstance(value, types)
    return json_values.filter(wrong)


#: header -> (values it may have, values it must not have)
HEADERS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "task": (st.text(min_size=1), _not(str) | st.just("")),
    "id": (st.text(min_size=1), _not(str) | st.just("")),
    "eta": (st.none() | st.just("") | st.datetimes(timezones=st.none() | st.just(UTC)).map(
        datetime.isoformat), _not(str, type(None)) | not_iso),
    "expires": (st.none() | st.datetimes(timezones=st.just(UTC)).map(datetime.isoformat)
                | st.just("2030-01-01T00:00:00Z"), _not(str, type(None)) | not_iso),
    "retries": (st.none() | st.integers(min_value=0),
                _not(int, type(None)) | st.integers(max_value=-1)),
    "group_index": (st.none() | st.integers(min_value=0),
                    _not(int, type(None)) | st.integers(max_value=-1)),
    "timelimit": (st.none() | st.tuples(seconds, seconds).map(list) | st.tuples(seconds, seconds),
                  _not(list, type(None))
                  | st.lists(seconds, max_size=5).filter(lambda items: len(items) != 2)
                  | st.tuples(bad_seconds, seconds).map(list)
                  | st.tuples(seconds, bad_seconds).map(list)),
    **{key: (st.none() | st.text(), _not(str, type(None)))
       for key in ("root_id", "parent_id", "group", "shadow", "origin")},
    "ignore_result": (st.none() | st.booleans(), _not(bool, type(None))),
    "compression": (st.none() | st.sampled_from(["gzip", "zlib", "bzip2", "application/x-gzip"]),
                    _not(str, type(None)) | st.text(max_size=10).filter(
                        lambda name: name not in ("gzip", "zlib", "bzip2", "bzip", "lzma", "xz",
                                                  "brotli", "zstd", "application/x-gzip",
                                                  "application/x-bz2", "application/x-lzma"))),
    **{key: (json_values, st.nothing()) for key in ("lang", "argsrepr", "kwargsrepr")},
}


@st.composite
def valid_headers(draw: st.DrawFn) -> dict[str, Any]:
    """Protocol-2 headers, each present or not, each of a type the worker takes."""
    headers = {"task": draw(HEADERS["task"][0]), "id": draw(HEADERS["id"][0])}
    for key in draw(st.sets(st.sampled_from(sorted(HEADERS)))):
        headers[key] = draw(HEADERS[key][0])
    return headers


@given(valid_headers())
def test_headers_of_the_right_types_are_read(headers: dict[str, Any]) -> None:
    checked = protocol.read_headers(headers)
    assert (checked.task, checked.id) == (headers["task"], headers["id"])
    assert checked.retries == (headers.get("retries") or 0)
    assert checked.timelimit == tuple(headers.get("timelimit") or (None, None))
    assert checked.ignore_result is bool(headers.get("ignore_result"))
    for key in ("eta", "expires"):
        value = getattr(checked, key)
        assert (value is None) == (not headers.get(key))
        if value is not None:
            assert value.tzinfo is not None
            assert value.replace(tzinfo=None) == datetime.fromisoformat(headers[key]).replace(
                tzinfo=None)


@given(valid_headers(), st.data())
def test_a_header_of_the_wrong_type_is_named_in_the_reason(headers: dict[str, Any],
                                                           data: st.DataObject) -> None:
    key = data.draw(st.sampled_from([key for key in HEADERS if key not in
                                     ("lang", "argsrepr", "kwargsrepr")]))
    headers[key] = data.draw(HEADERS[key][1], label=key)
    with pytest.raises(protocol.BadMessage, match=f"header '{key}' is ") as raised:
        protocol.read_headers(headers)
    # The ids the headers tell are kept, for the FAILURE a caller waits on.
    assert raised.value.task_id == (headers["id"] if key != "id" else None)
    assert raised.value.name == (headers["task"] if key != "task" else None)
    assert len(str(raised.value)) < 400  # bounded, whatever the value


@given(st.dictionaries(st.sampled_from(sorted(HEADERS)) | st.text(max_size=8), json_values))
def test_any_json_headers_are_read_or_refused_with_a_reason(headers: dict[str, Any]) -> None:
    try:
        checked = protocol.read_headers(headers)
    except protocol.BadMessage as exc:
        assert str(exc)
        task_id = headers.get("id")
        assert exc.task_id == (task_id if isinstance(task_id, str) and task_id else None)
    else:
        assert isinstance(checked.task, str) and isinstance(checked.id, str)
        assert isinstance(checked.retries, int) and not isinstance(checked.retries, bool)


@given(json_values.filter(lambda value: not isinstance(value, dict)))
def test_headers_that_are_not_an_object_are_refused(headers: Any) -> None:
    with pytest.raises(protocol.BadMessage, match="not an object") as raised:
        protocol.read_headers(headers)
    assert (raised.value.task_id, raised.value.name) == (None, None)


def test_the_reason_says_what_is_wrong_and_what_was_expected() -> None:
    with pytest.raises(protocol.BadMessage) as raised:
        protocol.read_headers({"task": "a", "id": "x", "eta": 5, "retries": "x",
                               "timelimit": ["a", "b"]})
    assert str(raised.value) == (
        "header 'eta' is JSON number 5, not an ISO 8601 string; header 'retries' is JSON "
        "string 'x', not an integer >= 0; header 'timelimit' is JSON array ['a', 'b'], not "
        "[hard, soft] (each null or a number of seconds >= 0)")


def test_what_celery_sends_is_read() -> None:
    """Celery 5's as_task_v2 headers, ISO 8601 with an offset, and an AMQP timestamp."""
    headers = {"lang": "py", "task": "proj.add", "id": "c1", "shadow": None,
               "eta": "2030-01-01T10:00:00.123456+00:00", "expires": "2030-01-01T11:00:00Z",
               "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
               "root_id": "c1", "parent_id": None, "argsrepr": "(2, 3)", "kwargsrepr": "{}",
               "origin": "gen123@host", "ignore_result": False, "stamped_headers": None,
               "stamps": {}}
    checked = protocol.read_headers(headers)
    assert checked.eta == datetime(2030, 1, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert checked.expires == datetime(2030, 1, 1, 11, tzinfo=UTC)
    amqp = protocol.read_headers({"task": "a", "id": "x", "eta": datetime(2030, 1, 1)})
    assert amqp.eta == datetime(2030, 1, 1, tzinfo=UTC)


def test_a_message_flask_tasks_builds_passes_the_check() -> None:
    eta = datetime(2030, 1, 1, tzinfo=UTC)
    message = protocol.build("a", "x", (1,), {}, eta=eta, expires=eta, retries=3,
                             time_limit=10, soft_time_limit=5.5, group_id="g", group_index=2)
    checked = protocol.read_headers(message.headers)
    assert (checked.eta, checked.retries, checked.timelimit) == (eta, 3, (10, 5.5))


@pytest.mark.parametrize(("content_type", "encoding", "reason"), [
    ("application/json", "no-such-codec", "content-encoding 'no-such-codec' is not an encoding"),
    ("application/json", 5, "content-encoding is JSON number 5, not a string"),
    (["application/json"], "utf-8", "content-type is JSON array"),
])
def test_a_content_encoding_nobody_knows_is_refused(content_type: Any, encoding: Any,
                                                    reason: str) -> None:
    headers = {"task": "a", "id": "x"}
    with pytest.raises(protocol.BadMessage, match=reason) as raised:
        protocol.parse(headers, b"[[], {}, {}]", content_type, encoding, JSON)
    assert raised.value.task_id == "x"
    for fine in ("utf-8", "UTF8", "binary", "latin-1", "", None):
        assert protocol.check_content("application/json", fine) is None


@pytest.mark.parametrize(("body", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, "cannot be decoded"),  # deeper than the recursion limit
    (b'["ab", {}, {}]', "its args are JSON string 'ab', not an array"),
    (b"[[], [], {}]", "its kwargs are JSON array \\[\\], not an object"),
    (b'[[], {}, "x"]', "its embed is JSON string 'x', not an object or null"),
    (b'[[], {}, {"callbacks": 5}]', "its embed's 'callbacks' is JSON number 5"),
    (b"", "the body is empty, not \\[args, kwargs, embed\\]"),
])
def test_bodies_that_are_not_args_kwargs_embed_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(protocol.BadMessage, match=reason) as raised:
        protocol.parse({"task": "a", "id": "x"}, body, "application/json", "utf-8", JSON)
    assert (raised.value.task_id, raised.value.name) == ("x", "a")


def test_kwargs_keys_must_be_strings() -> None:
    body = pickle.dumps(([], {1: 2}, {}))
    with pytest.raises(protocol.BadMessage, match="kwargs have the key JSON number 1"):
        protocol.parse({"task": "a", "id": "x"}, body, "application/x-python-serialize",
                       "binary", protocol.accept_set(["pickle"]))


def test_a_refused_content_type_is_told_apart() -> None:
    with pytest.raises(protocol.RefusedContent):
        protocol.parse({"task": "a", "id": "x"}, pickle.dumps(([], {}, {})),
                       "application/x-python-serialize", "binary", JSON)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(valid_headers(), json_values | st.binary(max_size=40), st.sampled_from(
    ["application/json", "application/x-python-serialize", "text/plain", "", None]),
    st.sampled_from(["utf-8", "binary", "bogus", None]), json_values)
def test_parse_returns_a_context_or_refuses_whatever_the_message(
        headers: dict[str, Any], body: Any, content_type: str | None, encoding: str | None,
        properties: Any) -> None:
    raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
    try:
        request = protocol.parse(headers, raw, content_type, encoding, JSON, properties,
                                 properties)
    except protocol.BadMessage as exc:
        assert exc.task_id == headers["id"] and str(exc)
    else:
        assert isinstance(request.args, list) and isinstance(request.kwargs, dict)
        assert all(isinstance(key, str) for key in request.kwargs)
        assert request.reply_to is None or isinstance(request.reply_to, str)
