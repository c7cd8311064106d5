"""The embedded broker's promises, through real worker processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from tests.apps import basic
from tests.helpers import wait_for

APP = "tests.apps.basic:create_app"
SHORT_LEASE = json.dumps({"TASKS_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": 1.0}})


@pytest.fixture()
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    monkeypatch.delenv("TEST_BROKER_URL", raising=False)
    monkeypatch.delenv("TEST_RESULT_BACKEND", raising=False)
    monkeypatch.setenv("TEST_INSTANCE_PATH", str(tmp_path))
    monkeypatch.setenv("TEST_CONFIG", SHORT_LEASE)
    app = basic.create_app()
    with app.app_context():
        yield app


def runs(app: Flask) -> list[str]:
    path = Path(app.instance_path) / "runs.txt"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_long_acks_late_task_keeps_its_lease(app: Flask, start_worker, pool: str) -> None:
    env = {"TEST_CONFIG": SHORT_LEASE}
    start_worker(APP, "-P", pool, "-c", "1", env=env)
    start_worker(APP, "-P", pool, "-c", "1", env=env)
    result = basic.record.delay("long", 4.0)  # 4 lease lengths
    assert result.get(timeout=20, interval=0.05) == "long"
    assert len(runs(app)) == 1


def test_killed_workers_task_is_redelivered(app: Flask, start_worker) -> None:
    env = {"TEST_CONFIG": SHORT_LEASE}
    first = start_worker(APP, "-P", "solo", env=env)
    result = basic.record.delay("victim", 2.0)
    # Killed once the task really runs (STARTED is stored just before the function).
    wait_for(lambda: [line.split()[0] for line in runs(app)] == ["victim"], timeout=10,
             message="task running")
    first.kill_group()  # kill -9: no ack, no clean shutdown
    start_worker(APP, "-P", "solo", env=env)
    assert result.get(timeout=20, interval=0.05) == "victim"
    assert [line.split()[0] for line in runs(app)] == ["victim", "victim"]
