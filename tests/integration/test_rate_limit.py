"""Rate limits per worker: limited tasks are spaced out, the others are not held up."""

from __future__ import annotations

import json
import time

import pytest
from flask import Flask

from tests.apps import basic

APP = "tests.apps.basic:create_app"


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_rate_limit_spaces_out_the_task_only(broker_app: Flask, broker_env: dict[str, str],
                                              start_worker, pool: str) -> None:
    start_worker(APP, "-P", pool, "-c", "2", env=broker_env)
    basic.add.delay(0, 0).get(timeout=10)  # warm
    start = time.monotonic()
    limited = [basic.limited.delay(i) for i in range(10)]  # 5/s
    other = basic.add.delay(1, 1)
    assert other.get(timeout=10) == 2
    assert time.monotonic() - start < 1.0  # not queued behind the limited ones
    assert [r.get(timeout=20) for r in limited] == list(range(10))
    assert time.monotonic() - start >= 1.4  # 10 at 5/s (the first one or two at once)


def test_annotations_set_a_rate_limit(broker_app: Flask, broker_env: dict[str, str],
                                       start_worker) -> None:
    config = json.dumps({"TASKS_ANNOTATIONS": {"tests.apps.basic.add": {"rate_limit": "4/s"}}})
    start_worker(APP, "-c", "2", env={**broker_env, "TEST_CONFIG": config})
    start = time.monotonic()
    results = [basic.add.delay(i, 0) for i in range(6)]
    assert [r.get(timeout=20) for r in results] == list(range(6))
    assert time.monotonic() - start >= 1.0
