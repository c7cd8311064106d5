"""Hard and soft time limits through a real prefork worker, on Redis and RabbitMQ."""

from __future__ import annotations

import time

import pytest
from flask import Flask

from flask_tasks import states
from flask_tasks.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from tests.apps import basic

APP = "tests.apps.basic:create_app"


def test_hard_limit_kills_and_replaces_the_process(broker_app: Flask, broker_env: dict[str, str],
                                                   start_worker) -> None:
    worker = start_worker(APP, "-P", "prefork", "-c", "1", env=broker_env)
    before = basic.pid.delay().get(timeout=10)
    start = time.monotonic()
    result = basic.overrun.delay(30)
    with pytest.raises(TimeLimitExceeded, match="time limit of 1.0 s"):
        result.get(timeout=15)
    assert time.monotonic() - start < 5
    assert result.state == states.FAILURE
    assert basic.pid.delay().get(timeout=10) != before  # replaced
    worker.wait_output("ran past its time limit")


def test_per_call_hard_limit(broker_app: Flask, broker_env: dict[str, str], start_worker) -> None:
    start_worker(APP, "-P", "prefork", "-c", "1", env=broker_env)
    with pytest.raises(TimeLimitExceeded):
        basic.sleep.apply_async((30,), time_limit=0.5).get(timeout=15)


def test_soft_limit_lets_the_task_clean_up(broker_app: Flask, broker_env: dict[str, str],
                                           start_worker) -> None:
    start_worker(APP, "-P", "prefork", "-c", "1", env=broker_env)
    assert basic.cleans_up.delay(5).get(timeout=10) == "cleaned up"
    with pytest.raises(SoftTimeLimitExceeded):
        basic.sleep.apply_async((5,), soft_time_limit=0.3).get(timeout=10)


def test_a_fast_result_is_not_held_back_by_a_slow_task(broker_app: Flask,
                                                       broker_env: dict[str, str],
                                                       start_worker) -> None:
    start_worker(APP, "-P", "prefork", "-c", "1", env=broker_env)
    assert basic.add.delay(0, 0).get(timeout=10) == 0  # add is known to be fast
    fast = basic.add.delay(1, 1)
    slow = basic.sleep.delay(3)
    assert fast.get(timeout=2) == 2  # not after the 3 s task
    assert slow.get(timeout=10) == 3
