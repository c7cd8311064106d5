"""A task goes from the caller to a real worker subprocess and back: on Redis, on RabbitMQ
(results in Redis) and embedded."""

from __future__ import annotations

import os

import pytest
from flask import Flask

from flask_tasks import states
from tests.apps import basic

APP = "tests.apps.basic:create_app"


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_round_trip(broker_app: Flask, broker_env: dict[str, str], start_worker,
                     pool: str) -> None:
    worker = start_worker(APP, "-P", pool, "-c", "2", env=broker_env)
    result = basic.add.delay(2, 3)
    assert result.get(timeout=10) == 5
    assert result.state == states.SUCCESS
    assert result.successful() and result.ready() and not result.failed()
    assert result.date_done is not None and result.date_done.tzinfo is not None
    worker.wait_output(f"Task tests.apps.basic.add[{result.id}] received")
    worker.wait_output(f"Task tests.apps.basic.add[{result.id}] succeeded in")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_failure_reraises_with_type_and_traceback(broker_app: Flask, broker_env: dict[str, str],
                                                  start_worker, pool: str) -> None:
    worker = start_worker(APP, "-P", pool, "-c", "2", env=broker_env)
    result = basic.fail.delay("bad input")
    with pytest.raises(ValueError, match="bad input"):
        result.get(timeout=10)
    assert result.state == states.FAILURE
    assert "raise ValueError(message)" in (result.traceback or "")
    assert isinstance(result.get(propagate=False), ValueError)
    worker.wait_output("raised unexpected: ValueError('bad input')")


def test_progress_and_request(broker_app: Flask, broker_env: dict[str, str],
                              start_worker) -> None:
    start_worker(APP, "-c", "1", env=broker_env)
    seen: list[str] = []
    result = basic.progress.delay(3)
    value = result.get(timeout=10, on_message=lambda meta: seen.append(meta["status"]))
    assert value == {"steps": 3, "id": result.id}
    assert seen[-1] == states.SUCCESS


def test_app_context_and_teardown(broker_app: Flask, broker_env: dict[str, str],
                                  start_worker) -> None:
    start_worker(APP, "-P", "solo", env=broker_env)
    assert basic.app_info.delay().get(timeout=10)["app"] == "tests.apps.basic"
    # The same process runs both (solo): an uncommitted row must not leak into the next task.
    assert basic.leave_pending_row.delay("draft").get(timeout=10) == 1
    assert basic.pending_rows.delay().get(timeout=10) == 0


def test_track_started_and_ignore_result(broker_app: Flask, broker_env: dict[str, str],
                                         start_worker) -> None:
    start_worker(APP, "-c", "1", env=broker_env)
    slow = basic.sleep.delay(1.0)
    from tests.helpers import wait_for

    wait_for(lambda: slow.state == states.STARTED, timeout=10, message="STARTED")
    assert slow.info["pid"] != os.getpid()
    assert slow.get(timeout=10) == 1.0
    quiet = basic.quiet.delay()
    done = basic.add.delay(1, 1)
    assert done.get(timeout=10) == 2
    assert quiet.state == states.PENDING  # never stored


def test_unencodable_result_fails_clearly(broker_app: Flask, broker_env: dict[str, str],
                                          start_worker) -> None:
    start_worker(APP, "-c", "1", env=broker_env)
    result = basic.bad_result.delay()
    with pytest.raises(Exception, match="cannot be encoded"):
        result.get(timeout=10)
    assert result.state == states.FAILURE


def test_forget(broker_app: Flask, broker_env: dict[str, str],
                start_worker) -> None:
    start_worker(APP, "-c", "1", env=broker_env)
    result = basic.add.delay(1, 2)
    assert result.get(timeout=10) == 3
    result.forget()
    assert basic.tasks.AsyncResult(result.id).state == states.PENDING


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_embedded_round_trip(embedded_app: Flask, start_worker, pool: str) -> None:
    start_worker(APP, "-P", pool, "-c", "2")
    results = [basic.add.delay(i, i) for i in range(20)]
    assert [r.get(timeout=20, interval=0.05) for r in results] == [2 * i for i in range(20)]
    progress = basic.progress.delay(2)
    assert progress.get(timeout=10, interval=0.05)["steps"] == 2
    with pytest.raises(ValueError):
        basic.fail.delay("embedded").get(timeout=10, interval=0.05)


def test_progress_is_visible_while_a_prefork_task_runs(broker_app: Flask,
                                                       broker_env: dict[str, str],
                                                       start_worker) -> None:
    from tests.helpers import wait_for

    start_worker(APP, "-P", "prefork", "-c", "2", env=broker_env)
    result = basic.progress_then_wait.delay(3.0)
    wait_for(lambda: result.state == "PROGRESS", timeout=2.5, message="PROGRESS while running")
    assert result.info == {"done": 1, "total": 2}
    assert result.get(timeout=10) == "done"
