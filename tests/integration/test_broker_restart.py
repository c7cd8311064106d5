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
