"""Retries through a real worker: same id, RETRY state, countdown honoured, limits."""

from __future__ import annotations

import pytest
from flask import Flask

from flask_tasks import states
from tests.apps import basic

APP = "tests.apps.basic:create_app"


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_retry_until_success(broker_app: Flask, broker_env: dict[str, str], start_worker,
                              pool: str) -> None:
    worker = start_worker(APP, "-P", pool, "-c", "2", env=broker_env)
    seen: list[str] = []
    result = basic.flaky.delay(2)
    value = result.get(timeout=15, on_message=lambda meta: seen.append(meta["status"]))
    assert value == {"retries": 2, "id": result.id}
    assert states.RETRY in seen or "retry: Retry in 0.3s" in worker.output
    worker.wait_output(f"Task tests.apps.basic.flaky[{result.id}] retry: Retry in 0.3s")


def test_retries_exhausted_reraise_the_cause(broker_app: Flask, broker_env: dict[str, str],
                                              start_worker) -> None:
    start_worker(APP, "-c", "1", env=broker_env)
    result = basic.flaky.delay(10)
    with pytest.raises(ConnectionError, match="attempt 3"):
        result.get(timeout=15)
    assert result.state == states.FAILURE
