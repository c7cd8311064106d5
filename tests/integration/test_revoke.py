"""revoke(): persists for workers started later; terminate=True stops a running task."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flask import Flask

from flask_tasks import states
from flask_tasks.exceptions import TaskRevokedError
from tests.apps import basic
from tests.helpers import wait_for

APP = "tests.apps.basic:create_app"


def test_revoked_before_any_worker_never_runs(broker_app: Flask, broker_env: dict[str, str],
                                               start_worker, tmp_path: Path) -> None:
    result = basic.record.delay("revoked", 0)
    result.revoke()  # no worker is running yet
    start_worker(APP, "-c", "1", env=broker_env)
    with pytest.raises(TaskRevokedError, match="not run"):
        result.get(timeout=10)
    assert result.state == states.REVOKED
    assert basic.add.delay(1, 1).get(timeout=10) == 2
    assert not (tmp_path / "runs.txt").exists()


def test_revoked_while_waiting_in_the_worker(broker_app: Flask, broker_env: dict[str, str],
                                              start_worker, tmp_path: Path) -> None:
    start_worker(APP, "-P", "threads", "-c", "1", env=broker_env)
    busy = basic.sleep.delay(1.5)
    wait_for(lambda: busy.state == states.STARTED, timeout=10, message="busy")
    waiting = basic.record.delay("waiting", 0)  # prefetched behind the sleeping task
    basic.tasks.control.revoke(waiting.id)
    assert busy.get(timeout=10) == 1.5
    with pytest.raises(TaskRevokedError):
        waiting.get(timeout=10)
    assert not (tmp_path / "runs.txt").exists()


def test_terminate_stops_a_running_task(broker_app: Flask, broker_env: dict[str, str],
                                         start_worker) -> None:
    start_worker(APP, "-P", "prefork", "-c", "1", env=broker_env)
    before = basic.pid.delay().get(timeout=10)
    running = basic.sleep.delay(30)
    wait_for(lambda: running.state == states.STARTED, timeout=10, message="started")
    start = time.monotonic()
    running.revoke(terminate=True)
    with pytest.raises(TaskRevokedError, match="process was killed"):
        running.get(timeout=10)
    assert time.monotonic() - start < 5
    assert basic.pid.delay().get(timeout=10) != before


def test_revoke_on_the_embedded_default(embedded_app: Flask, start_worker,
                                        tmp_path: Path) -> None:
    result = basic.record.delay("embedded", 0)
    result.revoke()
    start_worker(APP, "-c", "1")
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10, interval=0.05)
    assert not (tmp_path / "runs.txt").exists()
