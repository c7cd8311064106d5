"""The broker goes away and comes back: the worker reconnects by itself."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from tests.apps import basic
from tests.helpers import RedisServer

APP = "tests.apps.basic:create_app"


@pytest.fixture()
def own_redis(redis_server: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to restart (after the session's CI check)."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(shutil.which("redis-server") or "redis-server", workdir).start()
    yield server
    server.stop()


def test_worker_reconnects_after_redis_restart(own_redis: RedisServer, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               start_worker) -> None:
    url = own_redis.url + "/0"
    monkeypatch.setenv("TEST_BROKER_URL", url)
    monkeypatch.setenv("TEST_RESULT_BACKEND", url)
    monkeypatch.setenv("TEST_INSTANCE_PATH", str(tmp_path))
    app: Flask = basic.create_app()
    worker = start_worker(APP, "-c", "1", env={"TEST_BROKER_URL": url,
                                              "TEST_RESULT_BACKEND": url})
    with app.app_context():
        assert basic.add.delay(1, 1).get(timeout=10) == 2
        own_redis.restart()
        # Published after the restart: the worker must reconnect on its own to run it.
        assert basic.add.delay(2, 2).get(timeout=30) == 4
    assert worker.proc.poll() is None


def test_result_backend_rides_out_a_redis_outage(own_redis: RedisServer) -> None:
    """A result written while Redis is down is stored once it is back; a waiting get() wakes."""
    import threading
    import time

    from flask_tasks import states
    from flask_tasks.backends.redis import RedisBackend

    writer = RedisBackend(own_redis.url + "/0", max_sleep=0.2)
    reader = RedisBackend(own_redis.url + "/0")
    got: list[dict[str, object]] = []
    waiting = threading.Thread(target=lambda: got.append(reader.wait_for("t1", timeout=30)))
    waiting.start()
    time.sleep(0.3)  # subscribed
    own_redis.stop()
    restart = threading.Timer(1.0, own_redis.start)  # back in a second
    restart.start()
    started = time.monotonic()
    try:
        writer.store_result("t1", 42, states.SUCCESS)  # retried until Redis answers
    finally:
        restart.join()
    assert time.monotonic() - started >= 0.5
    waiting.join(30)
    assert got and got[0]["status"] == states.SUCCESS and got[0]["result"] == 42
    assert writer.get_task_meta("t1")["result"] == 42
