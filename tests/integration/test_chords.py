"""Chords through real workers: ``chord(header)(body)``, ``chord(header, body)()`` and
``group | task`` in a chain, on Redis and on RabbitMQ (results in Redis), with the
prefork and the threads pool, and on the embedded default; a failing header task
fails the body with ``ChordError`` and runs its errbacks; the body runs exactly
once when the worker running the (``acks_late``) header is killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from flask import Flask

from flask_tasks import GroupResult, chord, group, states
from flask_tasks.exceptions import ChordError
from tests.apps import basic
from tests.helpers import wait_for

APP = "tests.apps.basic:create_app"
SHORT_VISIBILITY = json.dumps({"TASKS_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": 2}})


def lines(app: Flask, name: str) -> list[str]:
    path = os.path.join(app.instance_path, name)
    if not os.path.exists(path):
        return []
    with open(path) as text:
        return [line.strip() for line in text]


def run_the_chords(app: Flask) -> None:
    result = chord(basic.add.s(i, i) for i in range(10))(basic.xsum.s())
    assert result.get(timeout=30) == 90
    assert isinstance(result.parent, GroupResult)
    assert result.parent.get(timeout=5) == [i + i for i in range(10)]
    assert chord([basic.add.s(1, 2), basic.add.s(3, 4)], basic.xsum.s())().get(timeout=30) == 10
    # partial arguments at call time go to every header task
    assert chord([basic.add.s(1), basic.add.s(2)], basic.xsum.s()).apply_async(
        (10,)).get(timeout=30) == 23


def run_the_chord_failure(app: Flask) -> None:
    body = basic.note.s("never")
    body.link_error(basic.on_error.s())
    body.link_error(basic.on_error_id.s())
    result = chord([basic.add.s(1, 1), basic.fail.s("boom"), basic.add.s(2, 2)])(body)
    failed_id = result.parent.results[1].id
    with pytest.raises(ChordError, match=failed_id):
        result.get(timeout=30)
    assert result.state == states.FAILURE
    with pytest.raises(ChordError, match="boom"):
        result.get(timeout=5)
    expected = {f"on_error {result.id} ChordError False", f"on_error_id {result.id}"}
    wait_for(lambda: expected <= set(lines(app, "canvas.txt")), timeout=20,
             message=f"the body's errbacks; seen {lines(app, 'canvas.txt')}")
    assert not [line for line in lines(app, "canvas.txt") if "never" in line]


def run_the_upgrade(app: Flask) -> None:
    """``group | task`` in a chain is a chord: each header task runs once (celery#5958)."""
    flow = (basic.add.s(1, 1) | group(basic.record.si(f"g{i}", 0.0) for i in range(4))
            | basic.note.s("chained"))
    assert flow().get(timeout=30) == ["g0", "g1", "g2", "g3"]
    assert (group(basic.add.s(i, i) for i in range(3)) | basic.xsum.s() | basic.mul.s(2))(
    ).get(timeout=30) == 12
    time.sleep(1)  # a duplicate would have run by now
    runs = sorted(line.split()[0] for line in lines(app, "runs.txt"))
    assert runs == ["g0", "g1", "g2", "g3"]
    assert len([line for line in lines(app, "canvas.txt") if "chained" in line]) == 1


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_chords(broker_app: Flask, broker_env: dict[str, str], start_worker, pool: str) -> None:
    start_worker(APP, "-P", pool, "-c", "2", env=broker_env)
    run_the_chords(broker_app)
    run_the_chord_failure(broker_app)
    run_the_upgrade(broker_app)


def test_chords_on_the_embedded_default(embedded_app: Flask, start_worker) -> None:
    start_worker(APP, "-c", "2")
    run_the_chords(embedded_app)
    run_the_chord_failure(embedded_app)
    run_the_upgrade(embedded_app)


def test_chord_with_results_kept_forever(redis_url: str, basic_app_on, start_worker) -> None:
    """``TASKS_RESULT_EXPIRES=None`` (celery#5237)."""
    config = json.dumps({"TASKS_RESULT_EXPIRES": None})
    app = basic_app_on(redis_url, redis_url, config)
    start_worker(APP, "-c", "2", env={"TEST_BROKER_URL": redis_url,
                                      "TEST_RESULT_BACKEND": redis_url, "TEST_CONFIG": config})
    assert app.extensions is not None
    assert chord(basic.add.s(i, i) for i in range(5))(basic.xsum.s()).get(timeout=30) == 20


@pytest.mark.parametrize("trial", range(3))
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_the_body_runs_once_when_the_header_worker_is_killed(
        basic_app: Flask, redis_env: dict[str, str], start_worker, tmp_path: Path,
        pool: str, trial: int) -> None:
    """kill -9 mid-header, ``acks_late`` header tasks redelivered: the body runs exactly once
    (celery#2911, #4207, #2952)."""
    env = {**redis_env, "TEST_CONFIG": SHORT_VISIBILITY}
    first = start_worker(APP, "-P", pool, "-c", "1", env=env)
    result = chord(basic.record.s(f"h{i}", 0.5) for i in range(6))(basic.note.s("body"))
    runs_file = tmp_path / "runs.txt"
    wait_for(lambda: runs_file.exists() and len(runs_file.read_text().split()) >= 2 * (2 + trial),
             timeout=20, message="the header running")
    first.kill_group()  # kill -9: unacked header messages come back after visibility_timeout
    start_worker(APP, "-P", pool, "-c", "1", env=env)
    assert result.get(timeout=60) == [f"h{i}" for i in range(6)]
    time.sleep(4)  # past another visibility timeout: a duplicate body would have run
    bodies = [line for line in lines(basic_app, "canvas.txt") if line.startswith("note body")]
    assert len(bodies) == 1, bodies
    runs = runs_file.read_text().split()[::2]
    assert sorted(set(runs)) == [f"h{i}" for i in range(6)]
    assert len(runs) > 6, runs  # the task killed mid-run ran again (redelivered)


def test_a_revoked_header_task_ends_the_chord(basic_app: Flask, redis_env: dict[str, str],
                                              start_worker) -> None:
    """A header member revoked before it runs fails the body (celery#10526): no hanging get()."""
    result = chord([basic.add.s(1, 1), basic.add.s(2, 2)])(basic.xsum.s())
    revoked = result.parent.results[1]
    revoked.revoke()  # no worker yet: it is dropped when taken
    start_worker(APP, "-c", "1", env=redis_env)
    with pytest.raises(ChordError, match=revoked.id):
        result.get(timeout=20)
    assert revoked.state == states.REVOKED
