"""``Ignore`` and ``Reject`` raised in a task, through a real worker (Celery's semantics).

``Ignore``: nothing stored, message acked. ``Reject(requeue=False)``: message
dropped, nothing stored. ``Reject(requeue=True)``: message back on its queue,
delivered again. Each test ends by running a marker task and checking that the
broker holds nothing and the task ran exactly as often as it should. The worker tests
run on each broker (``broker``: Redis and RabbitMQ, results in Redis), then on the
embedded default.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import redis
from flask import Flask

from flask_tasks import states
from flask_tasks.app_state import EMBEDDED_BROKER_FILE
from tests.apps import basic
from tests.helpers import broker_settled, wait_for

APP = "tests.apps.basic:create_app"
POOLS = [("prefork", "2"), ("threads", "2")]


def runs(tmp_path: Path, tag: str) -> int:
    """How many times a task counted a run of ``tag`` (``runs.txt`` in the instance folder)."""
    path = tmp_path / "runs.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(line.split()[0] == tag for line in lines)


def stored(redis_url: str, task_id: str) -> bool:
    """Whether any state at all is stored for ``task_id`` in the Redis result backend
    (the result backend is Redis whatever the broker)."""
    return bool(redis.Redis.from_url(redis_url).exists(f"celery-task-meta-{task_id}"))


def embedded_settled(tmp_path: Path) -> bool:
    """No message row left in the embedded broker (queued, leased or requeued)."""
    with sqlite3.connect(tmp_path / EMBEDDED_BROKER_FILE) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]) == 0


def run_marker(tag: str) -> None:
    """Run one more task to completion: the worker went on serving after the outcome."""
    assert basic.record.delay(tag, 0).get(timeout=15, interval=0.05) == tag


# -- Redis and RabbitMQ (the ``broker`` parameter) ----------------------------------------

@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_ignore_stores_nothing_and_acks(broker_app: Flask, broker_env: dict[str, str],
                                        broker: str, redis_url: str, start_worker,
                                        tmp_path: Path, pool: str, concurrency: str) -> None:
    worker = start_worker(APP, "-P", pool, "-c", concurrency, env=broker_env)
    result = basic.ignored.delay("ignore")  # acks_late: the ack is the worker's decision
    worker.wait_output(f"Task tests.apps.basic.ignored[{result.id}] ignored", timeout=15)
    run_marker("marker")
    wait_for(lambda: broker_settled(broker), timeout=10, message="queue and unacked empty")
    assert result.state == states.PENDING
    assert not stored(redis_url, result.id)
    assert runs(tmp_path, "ignore") == 1


@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_ignore_keeps_the_state_the_task_stored(broker_app: Flask, broker_env: dict[str, str],
                                                broker: str, start_worker, tmp_path: Path,
                                                pool: str, concurrency: str) -> None:
    start_worker(APP, "-P", pool, "-c", concurrency, env=broker_env)
    result = basic.ignored.delay("custom", "HALFWAY")
    wait_for(lambda: result.state == "HALFWAY", timeout=15, message="custom state stored")
    run_marker("marker")
    wait_for(lambda: broker_settled(broker), timeout=10, message="queue and unacked empty")
    assert result.state == "HALFWAY"
    assert result.info == {"tag": "custom"}
    assert not result.ready()
    assert runs(tmp_path, "custom") == 1


@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_reject_drops_the_message(broker_app: Flask, broker_env: dict[str, str], broker: str,
                                  redis_url: str, start_worker, tmp_path: Path, pool: str,
                                  concurrency: str) -> None:
    worker = start_worker(APP, "-P", pool, "-c", concurrency, env=broker_env)
    result = basic.rejected.delay("drop")
    line = f"Task tests.apps.basic.rejected[{result.id}] rejected: no use for drop"
    worker.wait_output(line, timeout=15)  # the task and the reason, in the worker's log
    run_marker("marker")
    wait_for(lambda: broker_settled(broker), timeout=10, message="queue and unacked empty")
    assert result.state == states.PENDING
    assert not stored(redis_url, result.id)
    assert runs(tmp_path, "drop") == 1
    assert worker.output.count(line) == 1


@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_reject_requeue_delivers_again(broker_app: Flask, broker_env: dict[str, str],
                                       broker: str, start_worker, tmp_path: Path, pool: str,
                                       concurrency: str) -> None:
    worker = start_worker(APP, "-P", pool, "-c", concurrency, env=broker_env)
    result = basic.requeued_once.delay("again")
    assert result.get(timeout=15, interval=0.05) == 2  # the second run succeeds
    assert result.state == states.SUCCESS
    worker.wait_output(f"requeued_once[{result.id}] rejected (requeue): try again again")
    run_marker("marker")
    wait_for(lambda: broker_settled(broker), timeout=10, message="queue and unacked empty")
    assert runs(tmp_path, "again") == 2
    assert worker.output.count(f"Task tests.apps.basic.requeued_once[{result.id}] received") == 2


@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_reject_requeue_without_acks_late_only_ends_the_task(
        broker_app: Flask, broker_env: dict[str, str], broker: str, redis_url: str,
        start_worker, tmp_path: Path, pool: str, concurrency: str) -> None:
    # As in Celery: the message was acknowledged when the task started; nothing to requeue.
    worker = start_worker(APP, "-P", pool, "-c", concurrency, env=broker_env)
    result = basic.requeued_early.delay("early")
    wait_for(lambda: runs(tmp_path, "early") >= 1, timeout=15, message="task ran")
    run_marker("marker")
    wait_for(lambda: broker_settled(broker), timeout=10, message="queue and unacked empty")
    run_marker("marker")  # one more round: a requeued copy would have run by now
    assert runs(tmp_path, "early") == 1
    assert result.state == states.PENDING
    assert not stored(redis_url, result.id)
    assert worker.output.count(f"Task tests.apps.basic.requeued_early[{result.id}] received") \
        == 1


# -- the embedded default broker (SQLite) ------------------------------------------------

def test_ignore_on_the_embedded_default(embedded_app: Flask, start_worker,
                                        tmp_path: Path) -> None:
    start_worker(APP, "-c", "1")
    result = basic.ignored.delay("custom", "HALFWAY")
    wait_for(lambda: result.state == "HALFWAY", timeout=15, message="custom state stored")
    run_marker("marker")
    wait_for(lambda: embedded_settled(tmp_path), timeout=10, message="no message left")
    assert result.state == "HALFWAY"
    assert runs(tmp_path, "custom") == 1


def test_reject_on_the_embedded_default(embedded_app: Flask, start_worker,
                                        tmp_path: Path) -> None:
    worker = start_worker(APP, "-c", "1")
    result = basic.rejected.delay("drop")
    worker.wait_output("no use for drop", timeout=15)
    run_marker("marker")
    wait_for(lambda: embedded_settled(tmp_path), timeout=10, message="no message left")
    assert result.state == states.PENDING
    assert runs(tmp_path, "drop") == 1


def test_reject_requeue_on_the_embedded_default(embedded_app: Flask, start_worker,
                                                tmp_path: Path) -> None:
    worker = start_worker(APP, "-c", "1")
    result = basic.requeued_once.delay("again")
    assert result.get(timeout=15, interval=0.05) == 2
    assert result.state == states.SUCCESS
    worker.wait_output("try again again")
    run_marker("marker")
    wait_for(lambda: embedded_settled(tmp_path), timeout=10, message="no message left")
    assert runs(tmp_path, "again") == 2


def test_reject_requeue_without_acks_late_on_the_embedded_default(embedded_app: Flask,
                                                                  start_worker,
                                                                  tmp_path: Path) -> None:
    worker = start_worker(APP, "-P", "prefork", "-c", "1")
    result = basic.requeued_early.delay("early")
    wait_for(lambda: runs(tmp_path, "early") >= 1, timeout=15, message="task ran")
    run_marker("marker")
    wait_for(lambda: embedded_settled(tmp_path), timeout=10, message="no message left")
    run_marker("marker")
    assert runs(tmp_path, "early") == 1
    assert worker.output.count(f"Task tests.apps.basic.requeued_early[{result.id}] received") \
        == 1
