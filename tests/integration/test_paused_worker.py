"""A paused worker loses nothing: pause an idle worker, publish, kill it; the task still runs.

An idle worker waits for messages. kombu and Celery wait with ``BRPOP``,
which takes the message out of the list when Redis *sends* it: a worker
paused right then (SIGSTOP here; a frozen container or a long stall in
production) and killed later had the message only in its socket, in neither
the queue nor the unacknowledged records. Each round here: an idle worker
(waiting, seen as a Redis client blocked in a command or tracking keys) is
SIGSTOPped, an ``acks_late`` task is published, the worker is SIGKILLed, and
only then is the next worker started. The task must end SUCCESS within
``visibility_timeout`` + :data:`MARGIN` of the kill, and run exactly once.
The next worker is the idle worker of the next round. ``-s`` prints each
round: whether the paused worker was seen waiting, where the message was
when the worker was killed, and how long the task took to come back.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from flask_tasks import states
from flask_tasks.transport.embedded import path_from_url
from tests.apps import basic
from tests.helpers import (
    StartWorker,
    pause,
    redis_keys_holding,
    redis_waiting_clients,
    settle,
    wait_for,
)

APP = "tests.apps.basic:create_app"
VISIBILITY = 5.0
#: Seconds after ``visibility_timeout`` within which the task must be done, counted
#: from the kill: the next worker's start (~2 s), a restore sweep, the task itself.
MARGIN = 10.0
CONFIG = json.dumps({"TASKS_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": VISIBILITY}})
ROUNDS = 5


def runs(instance: Path) -> list[str]:
    """The tags ``record`` ran with, in order (one line per run)."""
    path = instance / "runs.txt"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def finished(task_id: str, started: float, bound: float) -> float | None:
    """Seconds from ``started`` until the task was SUCCESS, or None if not within ``bound``."""
    result = basic.tasks.AsyncResult(task_id)
    left = bound - (time.monotonic() - started)
    if not settle(lambda: result.state == states.SUCCESS, timeout=max(left, 0.0),
                  interval=0.05):
        return None
    return time.monotonic() - started


@pytest.mark.timeout(300)
def test_redis_worker_paused_then_killed_loses_no_acks_late_task(
        basic_app: Flask, redis_env: dict[str, str], redis_url: str, start_worker: StartWorker,
        tmp_path: Path) -> None:
    env = {**redis_env, "TEST_CONFIG": CONFIG}
    client = redis.Redis.from_url(redis_url)
    worker = start_worker(APP, "-P", "solo", env=env)
    lost: list[str] = []
    report = []
    for number in range(ROUNDS):
        tag = f"paused-{number}"
        # Idle: the worker waits for a message (blocked in a command, or tracking keys).
        waiting = settle(lambda: redis_waiting_clients(redis_url) > 0, timeout=5.0)
        pause(worker)
        result = basic.record.delay(tag, 0.0)
        # Time for Redis to hand the message to the paused worker, if it would.
        taken = settle(lambda: client.llen("celery") == 0, timeout=0.5)
        where = redis_keys_holding(redis_url, result.id)
        worker.kill_group()
        killed = time.monotonic()
        worker = start_worker(APP, "-P", "solo", env=env)  # the only worker from now on
        delay = finished(result.id, killed, VISIBILITY + MARGIN)
        if delay is None:
            lost.append(tag)
        report.append(f"round {number + 1}: worker seen waiting {waiting}, message "
                      f"{'taken from' if taken else 'still in'} the queue, held in {where} "
                      f"at the kill; " + (f"SUCCESS {delay:.1f} s after the kill"
                                         if delay is not None else "LOST"))
    print("\n".join(["paused then killed (Redis):", *report,
                     f"lost {len(lost)} of {ROUNDS} (visibility_timeout {VISIBILITY} s)"]))
    assert not lost, f"tasks lost: {lost}"
    wait_for(lambda: client.hlen("unacked") == 0, timeout=5, message="every ack sent")
    tags = [f"paused-{number}" for number in range(ROUNDS)]
    assert runs(tmp_path) == tags  # each ran once, on the worker started after the kill


@pytest.fixture()
def embedded_app(basic_app_on: Any) -> Flask:
    """``tests.apps.basic`` on the embedded default, leases of ``VISIBILITY`` seconds."""
    return basic_app_on(None, None, CONFIG)  # type: ignore[no-any-return]


@pytest.mark.timeout(120)
def test_embedded_worker_paused_then_killed_loses_nothing(
        embedded_app: Flask, start_worker: StartWorker, tmp_path: Path) -> None:
    env = {"TEST_CONFIG": CONFIG}
    db = sqlite3.connect(path_from_url(basic.tasks.state(embedded_app).broker_url), timeout=30)

    def leased() -> bool:
        sql = "SELECT COUNT(*) FROM messages WHERE lease_owner IS NOT NULL"
        return bool(db.execute(sql).fetchone()[0])

    worker = start_worker(APP, "-P", "solo", env=env)
    # Idle: the worker polls an empty queue (nothing to observe but time).
    time.sleep(1.0)
    pause(worker)
    result = basic.record.delay("paused-embedded", 0.0)
    claimed = settle(leased, timeout=0.5)  # a paused worker cannot claim; wait as on Redis
    worker.kill_group()
    killed = time.monotonic()
    start_worker(APP, "-P", "solo", env=env)
    delay = finished(result.id, killed, VISIBILITY + MARGIN)
    db.close()
    print(f"paused then killed (embedded): message {'leased' if claimed else 'not leased'} "
          f"at the kill; " + (f"SUCCESS {delay:.1f} s after the kill" if delay is not None
                              else "LOST") + f"; lost {int(delay is None)} of 1")
    assert delay is not None, "the task of the paused worker was lost"
    assert runs(tmp_path) == ["paused-embedded"]
