"""Bad input gets a clear error, loses nothing, and the worker keeps serving."""

from __future__ import annotations

import json
import pickle
import uuid

import pytest
import redis
from flask import Flask
from kombu import Connection

from flask_tasks import states
from flask_tasks.exceptions import DecodeError, EncodeError, NotRegistered
from flask_tasks.routing import make_queue
from tests.apps import basic

APP = "tests.apps.basic:create_app"


@pytest.fixture()
def worker(start_worker, redis_url: str):
    return start_worker(APP, "-c", "2", env={"TEST_BROKER_URL": redis_url,
                                             "TEST_RESULT_BACKEND": redis_url})


def publish_raw(url: str, body: bytes, content_type: str, headers: dict | None,
                content_encoding: str | None = None) -> None:
    with Connection(url) as conn:
        conn.Producer().publish(body, exchange=make_queue("celery").exchange, routing_key="celery",
                                declare=[make_queue("celery")], content_type=content_type,
                                content_encoding=content_encoding or (
                                    "binary" if content_type != "application/json" else "utf-8"),
                                headers=headers or {})


def test_unserializable_argument_fails_in_caller_and_sends_nothing(basic_app: Flask,
                                                                  redis_url: str) -> None:
    with pytest.raises(EncodeError, match="cannot be encoded with the 'json' serializer"):
        basic.add.delay({1, 2}, 3)
    assert redis.Redis.from_url(redis_url).llen("celery") == 0


def test_wrong_arguments_fail_in_caller(basic_app: Flask, redis_url: str) -> None:
    with pytest.raises(TypeError, match="tests.apps.basic.add"):
        basic.add.delay(1)  # type: ignore[call-arg]
    assert redis.Redis.from_url(redis_url).llen("celery") == 0


def test_unknown_task_is_rejected_and_marked_failed(basic_app: Flask, worker) -> None:
    result = basic.tasks.send_task("nobody.defined.this", args=(1,))
    with pytest.raises(NotRegistered, match="not registered in this worker"):
        result.get(timeout=10)
    assert result.state == states.FAILURE
    worker.wait_output("Rejected task nobody.defined.this")
    assert basic.add.delay(1, 1).get(timeout=10) == 2


def test_garbage_message_is_rejected_and_worker_keeps_serving(basic_app: Flask, worker,
                                                               redis_url: str) -> None:
    publish_raw(redis_url, b"this is not json", "application/json", None)
    worker.wait_output("Rejected message")
    bad_body = {"lang": "py", "task": "tests.apps.basic.add", "id": "bad-body-1"}
    publish_raw(redis_url, b'{"not": "a protocol 2 body"}', "application/json", bad_body)
    result = basic.tasks.AsyncResult("bad-body-1")
    with pytest.raises(Exception, match="not \\[args, kwargs, embed\\]"):
        result.get(timeout=10)
    assert basic.add.delay(2, 2).get(timeout=10) == 4
    assert worker.proc.poll() is None


def test_pickle_message_refused_when_only_json_accepted(basic_app: Flask, worker,
                                                        redis_url: str) -> None:
    headers = {"lang": "py", "task": "tests.apps.basic.add", "id": "pickled-1"}
    publish_raw(redis_url, pickle.dumps(((2, 3), {}, {})), "application/x-python-serialize",
                headers)
    worker.wait_output("content type 'application/x-python-serialize' is not accepted")
    result = basic.tasks.AsyncResult("pickled-1")
    with pytest.raises(DecodeError, match="is not accepted"):  # the caller learns why
        result.get(timeout=10)
    assert result.state == states.FAILURE  # never decoded, never ran
    assert basic.add.delay(3, 3).get(timeout=10) == 6
    assert redis.Redis.from_url(redis_url).llen("celery") == 0


ADD = "tests.apps.basic.add"
GOOD_BODY = json.dumps([[2, 3], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                     "chord": None}]).encode()


@pytest.mark.parametrize(("headers", "body", "encoding", "reason"), [
    pytest.param({"eta": 5}, GOOD_BODY, "utf-8",
                 "header 'eta' is JSON number 5, not an ISO 8601 string", id="eta-number"),
    pytest.param({"timelimit": ["a", "b"]}, GOOD_BODY, "utf-8",
                 "header 'timelimit' is JSON array \\['a', 'b'\\], not \\[hard, soft\\]",
                 id="timelimit-strings"),
    pytest.param({"retries": "x"}, GOOD_BODY, "utf-8",
                 "header 'retries' is JSON string 'x', not an integer >= 0", id="retries-string"),
    pytest.param({"expires": 5}, GOOD_BODY, "utf-8",
                 "header 'expires' is JSON number 5, not an ISO 8601 string",
                 id="expires-number"),
    pytest.param({}, GOOD_BODY, "no-such-codec",
                 "content-encoding 'no-such-codec' is not an encoding Python knows",
                 id="content-encoding"),
    pytest.param({"compression": "zlib"}, b"this is not zlib data", "utf-8",
                 "the body does not decompress as 'zlib'", id="compression-garbage"),
])
def test_a_rejected_message_fails_its_task_and_the_worker_keeps_serving(
        basic_app: Flask, worker, redis_url: str, headers: dict, body: bytes, encoding: str,
        reason: str) -> None:
    task_id = f"bad-{uuid.uuid4()}"
    publish_raw(redis_url, body, "application/json",
                {"lang": "py", "task": ADD, "id": task_id, **headers}, encoding)
    result = basic.tasks.AsyncResult(task_id)
    with pytest.raises(DecodeError, match=reason):
        result.get(timeout=10)
    assert result.state == states.FAILURE
    worker.wait_output(f"Rejected task {ADD}[{task_id}]: ")
    assert basic.add.delay(2, 2).get(timeout=10) == 4
    assert worker.proc.poll() is None
    assert redis.Redis.from_url(redis_url).llen("celery") == 0
