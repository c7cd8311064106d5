"""The result backend contract against a real Redis, SQL over the app's Flask-SQLAlchemy,
and the embedded default."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_tasks import Tasks, states
from flask_tasks.backends.redis import RedisBackend
from tests.contract import backend_contract


@pytest.mark.parametrize("case", backend_contract.CASES, ids=lambda c: c.__name__)
def test_redis_contract(redis_url: str, case) -> None:  # type: ignore[no-untyped-def]
    case(RedisBackend(redis_url))


def test_redis_layout_is_celerys(redis_url: str) -> None:
    RedisBackend(redis_url, expires=60).store_result("abc", 5, states.SUCCESS)
    client = redis.Redis.from_url(redis_url)
    meta = json.loads(client.get("celery-task-meta-abc"))
    assert meta["status"] == "SUCCESS" and meta["result"] == 5 and meta["task_id"] == "abc"
    assert 0 < client.ttl("celery-task-meta-abc") <= 60


@pytest.mark.parametrize("expires", [60.0, None])
def test_redis_chord_keys_are_celerys(redis_url: str, expires: float | None) -> None:
    backend, gid = RedisBackend(redis_url, expires=expires), uuid.uuid4().hex
    client = redis.Redis.from_url(redis_url)
    key = f"celery-taskset-meta-{gid}"
    backend.save_group(gid, {"result": [[gid, None], []]})
    backend.set_chord_size(gid, 2)
    backend.add_to_chord(gid, 1)
    backend.chord_part_return(gid, "t0", 0, states.SUCCESS, {"a": 1})
    backend.chord_part_return(gid, "t1", None, states.FAILURE, KeyError("k"))
    assert client.get(key + ".s") == b"2" and client.get(key + ".t") == b"1"
    assert client.smembers(key + ".d") == {b"t0:0", b"t1:+inf"}
    entries = client.zrange(key + ".j", 0, -1, withscores=True)
    assert [json.loads(member) for member, _ in entries] == [
        [1, "t0", "SUCCESS", {"a": 1}],
        [1, "t1", "FAILURE", {"exc_type": "KeyError", "exc_message": ["k"],
                              "exc_module": "builtins"}]]
    assert [score for _, score in entries] == [0.0, float("inf")]
    for suffix in ("", ".s", ".t", ".j", ".d"):
        ttl = client.ttl(key + suffix)
        assert (0 < ttl <= 60) if expires else ttl == -1, (suffix, ttl)
    claim = backend.chord_part_return(gid, "t2", 2, states.SUCCESS, 2)
    assert claim is not None and client.get(key + ".c") == claim.token.encode()
    assert 0 < client.pttl(key + ".c") <= 10_000
    assert backend.chord_done(claim)
    assert client.exists(key + ".s", key + ".t", key + ".j", key + ".d") == 0
    assert client.get(key + ".c") == b"done" and 0 < client.ttl(key + ".c") <= 300
    assert client.exists(key) == 1  # the saved group stays, as with Celery


@pytest.mark.parametrize("case", backend_contract.CASES, ids=lambda c: c.__name__)
def test_embedded_contract(embedded_app: Flask, case) -> None:  # type: ignore[no-untyped-def]
    backend = embedded_app.extensions["tasks"].state(embedded_app).backend
    assert backend.url.endswith("flask_tasks-results.sqlite")
    case(backend)


@pytest.mark.parametrize("case", backend_contract.CASES, ids=lambda c: c.__name__)
def test_flask_sqlalchemy_contract(tmp_path: Path, case) -> None:  # type: ignore[no-untyped-def]
    app = Flask("fsa", instance_path=str(tmp_path))
    app.config.update(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/app.db",
                      RESULT_BACKEND="flask-sqlalchemy", BROKER_URL="memory://")
    db = SQLAlchemy(app)
    tasks = Tasks(app)
    backend = tasks.state(app).backend
    case(backend)
    with app.app_context():
        assert "celery_taskmeta" in db.inspect(db.engine).get_table_names()
