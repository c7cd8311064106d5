"""Retries in eager mode (the worker's own path is in tests/integration/test_retry.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_tasks import Task, Tasks, signals, states
from flask_tasks.exceptions import MaxRetriesExceededError
from flask_tasks.trace import backoff_delay

tasks = Tasks()
attempts: list[int] = []
retried: list[str] = []


class Tracking(Task):
    def on_retry(self, exc, task_id, args, kwargs, einfo):  # type: ignore[no-untyped-def]
        retried.append(type(exc).__name__)


@tasks.task(name="retry.flaky", bind=True, base=Tracking, max_retries=3)
def flaky(self: Task, fail_times: int) -> int:
    attempts.append(self.request.retries)
    if self.request.retries < fail_times:
        raise self.retry(exc=ConnectionError("down"), countdown=5)
    return self.request.retries


@tasks.task(name="retry.auto", autoretry_for=(KeyError,), max_retries=2, retry_backoff=True)
def auto() -> None:
    attempts.append(1)
    raise KeyError("missing")


@tasks.task(name="retry.no_exc", bind=True, max_retries=1)
def no_exc(self: Task) -> None:
    raise self.retry(countdown=1)


@tasks.task(name="retry.dont", autoretry_for=(LookupError,), dont_autoretry_for=(KeyError,))
def dont() -> None:
    attempts.append(1)
    raise KeyError("not retried")


@pytest.fixture()
def app(tmp_path: Path) -> Iterator[Flask]:
    app = Flask("retry_app", instance_path=str(tmp_path))
    app.config.update(TASKS_ALWAYS_EAGER=True)
    tasks.init_app(app)
    attempts.clear()
    retried.clear()
    with app.app_context():
        yield app


def test_retry_runs_again_with_more_retries(app: Flask) -> None:
    seen: list[Any] = []
    with signals.task_retry.connected_to(lambda sender, **kw: seen.append(kw["request"].retries)):
        result = flaky.delay(2)
    assert result.get() == 2 and attempts == [0, 1, 2]
    assert retried == ["ConnectionError", "ConnectionError"] and seen == [0, 1]


def test_max_retries_reraises_the_cause(app: Flask) -> None:
    result = flaky.delay(10)
    assert attempts == [0, 1, 2, 3]  # the first run and 3 retries
    assert result.state == states.FAILURE
    with pytest.raises(ConnectionError, match="down"):
        result.get()


def test_max_retries_without_exc(app: Flask) -> None:
    with pytest.raises(MaxRetriesExceededError, match="max_retries=1"):
        no_exc.delay().get()


def test_autoretry_for(app: Flask) -> None:
    result = auto.delay()
    assert len(attempts) == 3 and result.state == states.FAILURE
    with pytest.raises(KeyError):
        result.get()
    dont.delay()
    assert len(attempts) == 4  # dont_autoretry_for: one attempt


def test_retry_outside_a_worker_raises_the_cause(app: Flask) -> None:
    with pytest.raises(ConnectionError):
        flaky(1)  # a direct call: nothing to retry


def test_backoff_delay() -> None:
    assert [backoff_delay(True, n, 600, False) for n in range(4)] == [1, 2, 4, 8]
    assert backoff_delay(3, 2, 600, False) == 12
    assert backoff_delay(True, 20, 600, False) == 600
    assert all(0 <= backoff_delay(True, 3, 600, True) <= 8 for _ in range(50))
