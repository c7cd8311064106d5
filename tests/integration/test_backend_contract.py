"""The result backend contract against a real Redis (and SQL over the app's Flask-SQLAlchemy)."""

from __future__ import annotations

import json
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
