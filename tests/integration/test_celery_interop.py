"""Wire compatibility with real Celery (a test-only dependency), in both directions."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from flask import Flask

from tests.apps import basic
from tests.helpers import ROOT, wait_for

celery = pytest.importorskip("celery") if not os.environ.get("CI") else __import__("celery")

APP = "tests.apps.basic:create_app"


@pytest.fixture()
def celery_worker(redis_url: str) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "TEST_BROKER_URL": redis_url, "PYTHONPATH": str(ROOT)}
    log = ROOT / ".celery-worker.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.apps.celery_side", "worker",
             "-P", "solo", "-c", "1", "-l", "INFO", "--without-heartbeat", "--without-gossip",
             "--without-mingle"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: " ready." in log.read_text() or proc.poll() is not None, timeout=60,
                 message="celery worker ready")
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        proc.terminate()
        proc.wait(20)
        log.unlink(missing_ok=True)


def test_celery_worker_runs_flask_tasks_messages(basic_app: Flask, celery_worker) -> None:
    assert basic.add.delay(2, 3).get(timeout=20) == 5
    with pytest.raises(ValueError, match="from flask_tasks"):
        basic.fail.delay("from flask_tasks").get(timeout=20)


def test_flask_tasks_worker_runs_celery_client_messages(basic_app: Flask, redis_url: str,
                                                        start_worker) -> None:
    from tests.apps.celery_side import app as celery_app

    start_worker(APP, "-c", "1", env={"TEST_BROKER_URL": redis_url,
                                      "TEST_RESULT_BACKEND": redis_url})
    result = celery_app.send_task("tests.apps.basic.add", args=(2, 3))
    assert result.get(timeout=20) == 5
    failed = celery_app.send_task("tests.apps.basic.fail", args=("from celery",))
    with pytest.raises(ValueError, match="from celery"):
        failed.get(timeout=20)
    # ...and flask_tasks reads the same results.
    assert basic.tasks.AsyncResult(result.id).get(timeout=5) == 5


def test_celery_worker_runs_flask_tasks_canvas(basic_app: Flask, celery_worker) -> None:
    from flask_tasks import chain, group

    result = chain(basic.add.s(4, 4), basic.mul.s(8), basic.mul.s(2))()
    assert result.get(timeout=20) == 128 and result.parent.get(timeout=5) == 64
    assert group(basic.add.s(i, i) for i in range(4))().get(timeout=20) == [0, 2, 4, 6]
    assert basic.xsum.map([[1, 2], [3, 4]]).delay().get(timeout=20) == [3, 7]
    assert basic.add.apply_async((1, 1), link=basic.mul.s(5)).get(timeout=20) == 2


def test_flask_tasks_worker_runs_celery_client_canvas(basic_app: Flask, redis_url: str,
                                                      start_worker) -> None:
    from celery import chain as celery_chain
    from celery import group as celery_group

    from tests.apps.celery_side import add, mul, xsum

    start_worker(APP, "-c", "2", env={"TEST_BROKER_URL": redis_url,
                                      "TEST_RESULT_BACKEND": redis_url})
    result = celery_chain(add.s(4, 4), mul.s(8), mul.s(2))()
    assert result.get(timeout=20) == 128 and result.parent.get(timeout=5) == 64
    assert celery_group(add.s(i, i) for i in range(4))().get(timeout=20) == [0, 2, 4, 6]
    assert xsum.map([[1, 2], [3, 4]]).delay().get(timeout=20) == [3, 7]
    assert add.starmap([(1, 2), (3, 4)]).delay().get(timeout=20) == [3, 7]
    # ...and flask_tasks reads the chain's last result.
    assert basic.tasks.AsyncResult(result.id).get(timeout=5) == 128


def test_celery_worker_runs_a_flask_tasks_chord(basic_app: Flask, celery_worker) -> None:
    """A chord we publish: a Celery 5.7 worker counts its header in Celery's Redis keys
    (the size we set) and sends the body we froze."""
    from flask_tasks import chord, group

    result = chord(basic.add.s(i, i) for i in range(5))(basic.xsum.s())
    assert result.get(timeout=30) == 20
    assert (group(basic.add.s(1, 1), basic.add.s(2, 2)) | basic.xsum.s())().get(timeout=30) == 6


def test_flask_tasks_worker_runs_a_celery_client_chord(basic_app: Flask, redis_url: str,
                                                       start_worker) -> None:
    from celery import chord as celery_chord

    from tests.apps.celery_side import add, xsum

    start_worker(APP, "-c", "2", env={"TEST_BROKER_URL": redis_url,
                                      "TEST_RESULT_BACKEND": redis_url})
    result = celery_chord(add.s(i, i) for i in range(5))(xsum.s())
    assert result.get(timeout=30) == 20
    assert basic.tasks.AsyncResult(result.id).get(timeout=5) == 20


def test_a_chord_whose_header_celery_and_flask_tasks_workers_share_completes_once(
        basic_app: Flask, redis_url: str, celery_worker, start_worker) -> None:
    """Header tasks run by a Celery 5.7 worker and a flask_tasks worker on one queue, mixed:
    both count in the same Redis keys, and exactly one of them sends the body, once."""
    from flask_tasks import chord

    worker = start_worker(APP, "-P", "threads", "-c", "2",
                          env={"TEST_BROKER_URL": redis_url, "TEST_RESULT_BACKEND": redis_url})
    celery_log = ROOT / ".celery-worker.log"
    for _ in range(3):
        result = chord(basic.sleep.s(0.1) for _ in range(12))(basic.xsum.s())
        assert result.get(timeout=60) == pytest.approx(1.2)
    time.sleep(1)  # a second body, if any, would have run by now
    ours, theirs = worker.output, celery_log.read_text()
    header_ours = ours.count("Task tests.apps.basic.sleep[")
    header_theirs = theirs.count("Task tests.apps.basic.sleep[")
    assert header_ours and header_theirs, (header_ours, header_theirs)  # really mixed
    bodies = (ours.count("Task tests.apps.basic.xsum[") // 2  # "received" and "succeeded"
              + theirs.count("Task tests.apps.basic.xsum[") // 2)
    assert bodies == 3, (ours, theirs)


def test_package_never_imports_celery() -> None:
    code = ("import flask_tasks, flask_tasks.worker.main, flask_tasks.cli, sys; "
            "assert 'celery' not in sys.modules, 'celery was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
