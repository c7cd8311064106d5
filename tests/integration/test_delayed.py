"""countdown / eta / expires through real workers: delayed messages wait on the broker."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from flask import Flask

from flask_tasks import states
from flask_tasks.exceptions import TaskRevokedError
from tests.apps import basic
from tests.helpers import wait_for

APP = "tests.apps.basic:create_app"


def test_countdown_waits_on_redis_not_in_the_worker(basic_app: Flask, redis_url: str,
                                                    redis_env: dict[str, str],
                                                    start_worker) -> None:
    start_worker(APP, "-c", "1", env=redis_env)
    client = redis.Redis.from_url(redis_url)
    sent = time.time()
    result = basic.add.apply_async((1, 2), countdown=1.5)
    assert client.zcard("celery\x06\x16eta") == 1 and client.llen("celery") == 0
    assert basic.add.delay(2, 2).get(timeout=10) == 4  # the worker is not held up
    assert result.state == states.PENDING
    assert result.get(timeout=10) == 3
    ran_after = result.date_done.timestamp() - sent  # type: ignore[union-attr]
    assert 1.5 <= ran_after < 3.0, ran_after  # due + move interval + load
    assert client.zcard("celery\x06\x16eta") == 0


def test_eta_survives_worker_restarts_and_runs_once(basic_app: Flask, redis_url: str,
                                                    redis_env: dict[str, str],
                                                    start_worker, tmp_path: Path) -> None:
    first = start_worker(APP, "-c", "1", env=redis_env)
    eta = datetime.now(UTC) + timedelta(seconds=3)
    result = basic.record.apply_async(("once", 0), eta=eta)
    first.stop()
    start_worker(APP, "-c", "1", env=redis_env)
    start_worker(APP, "-c", "1", env=redis_env)  # two workers race to move it
    assert result.get(timeout=15) == "once"
    assert result.date_done >= eta  # type: ignore[operator]
    wait_for(lambda: (tmp_path / "runs.txt").exists(), timeout=5, message="runs.txt")
    time.sleep(0.5)  # a duplicate would have run by now
    assert len((tmp_path / "runs.txt").read_text().splitlines()) == 1


def test_celery_client_countdown_is_kept_on_the_broker(basic_app: Flask, redis_url: str,
                                                       redis_env: dict[str, str],
                                                       start_worker) -> None:
    pytest.importorskip("celery")
    from tests.apps.celery_side import app as celery_app

    celery_app.conf.broker_url = redis_url
    celery_app.conf.result_backend = redis_url
    worker = start_worker(APP, "-c", "1", env=redis_env)
    sent = time.time()
    result = celery_app.send_task("tests.apps.basic.add", args=(4, 5), countdown=1.5)
    assert result.get(timeout=10) == 9
    done = basic.tasks.AsyncResult(result.id).date_done
    assert done is not None and done.timestamp() - sent >= 1.5
    worker.wait_output("kept on the broker until then")


def test_expired_task_is_not_run(basic_app: Flask, redis_env: dict[str, str],
                                 start_worker, tmp_path: Path) -> None:
    result = basic.record.apply_async(("late", 0), expires=0.2)
    time.sleep(0.3)  # expires before any worker sees it
    worker = start_worker(APP, "-c", "1", env=redis_env)
    with pytest.raises(TaskRevokedError, match="expired"):
        result.get(timeout=10)
    assert result.state == states.REVOKED
    assert not (tmp_path / "runs.txt").exists()
    worker.wait_output("expired at")


def test_countdown_on_the_embedded_broker(embedded_app: Flask, start_worker) -> None:
    start_worker(APP, "-P", "threads", "-c", "2")
    sent = time.time()
    delayed = basic.add.apply_async((5, 5), countdown=1.5)
    assert basic.add.delay(1, 1).get(timeout=10, interval=0.05) == 2
    assert delayed.state == states.PENDING
    assert delayed.get(timeout=10, interval=0.05) == 10
    assert delayed.date_done.timestamp() - sent >= 1.5  # type: ignore[union-attr]
