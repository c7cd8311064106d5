"""``RESULT_BACKEND = "rpc://"``: states and results come back to the caller over RabbitMQ.

A real rabbitmq-server (a fresh vhost per test), real workers; Celery 5.7 on
the other side for the interoperability tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
from flask import Flask
from kombu import Connection, Producer

from flask_tasks import protocol, states
from flask_tasks.exceptions import ResultNotAvailable, TaskRevokedError, TimeoutError
from tests.apps import basic
from tests.helpers import ROOT, wait_for

APP = "tests.apps.basic:create_app"


@pytest.fixture()
def env(rabbitmq_vhost: str) -> dict[str, str]:
    return {"TEST_BROKER_URL": rabbitmq_vhost, "TEST_RESULT_BACKEND": "rpc://"}


@pytest.fixture()
def rpc_app(rabbitmq_vhost: str, basic_app_on: Any) -> Flask:
    return basic_app_on(rabbitmq_vhost, "rpc://")  # type: ignore[no-any-return]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_results_failures_and_progress_come_back(rpc_app: Flask, env: dict[str, str],
                                                 start_worker, pool: str) -> None:
    start_worker(APP, "-P", pool, "-c", "2", env=env)
    assert basic.add.delay(2, 3).get(timeout=15) == 5
    with pytest.raises(ValueError, match="over rpc"):
        basic.fail.delay("over rpc").get(timeout=15)
    failed = basic.fail.delay("kept")
    assert isinstance(failed.get(timeout=15, propagate=False), ValueError)
    assert failed.state == states.FAILURE and "ValueError" in (failed.traceback or "")

    waiting = basic.progress_then_wait.delay(1.0)
    wait_for(lambda: waiting.state == "PROGRESS", timeout=15, message="PROGRESS seen")
    assert waiting.info == {"done": 1, "total": 2}
    seen: list[str] = []
    assert waiting.get(timeout=15, on_message=lambda meta: seen.append(meta["status"])) \
        == "done"
    assert seen[-1] == states.SUCCESS
    # A result read once stays readable here (the message is gone from the broker).
    again = basic.tasks.AsyncResult(waiting.id)
    assert again.state == states.SUCCESS and again.get(timeout=1) == "done"
    again.forget()
    assert basic.tasks.AsyncResult(waiting.id).state == states.PENDING


def test_states_on_the_way_and_after_a_retry(rpc_app: Flask, env: dict[str, str],
                                         start_worker) -> None:
    start_worker(APP, "-P", "threads", "-c", "1", env=env)
    result = basic.sleep.delay(0.5)  # track_started=True
    seen: list[str] = []
    assert result.get(timeout=15, on_message=lambda meta: seen.append(meta["status"])) == 0.5
    assert states.STARTED in seen and seen[-1] == states.SUCCESS, seen
    # A retry is published by the worker, and its states still come here.
    retried = basic.flaky.delay(1)
    seen = []
    assert retried.get(timeout=20, on_message=lambda meta: seen.append(meta["status"])) \
        == {"retries": 1, "id": retried.id}
    assert states.RETRY in seen, seen


def test_get_times_out(rpc_app: Flask) -> None:
    result = basic.add.delay(1, 1)  # no worker
    begin = time.monotonic()
    with pytest.raises(TimeoutError, match="not ready within 0.3 s"):
        result.get(timeout=0.3)
    assert time.monotonic() - begin < 2
    assert result.state == states.PENDING


def test_threads_wait_on_different_tasks(rpc_app: Flask, env: dict[str, str],
                                         start_worker) -> None:
    start_worker(APP, "-P", "threads", "-c", "4", env=env)
    results = {seconds: basic.sleep.delay(seconds) for seconds in (0.8, 0.2, 0.5, 0.1)}
    got: dict[float, Any] = {}
    woke: dict[float, float] = {}

    def wait(seconds: float) -> None:
        got[seconds] = results[seconds].get(timeout=20)
        woke[seconds] = time.monotonic()

    threads = [threading.Thread(target=wait, args=(seconds,)) for seconds in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert got == {seconds: seconds for seconds in results}
    assert woke[0.1] < woke[0.8] and woke[0.2] < woke[0.8]  # each woke for its own task


def test_a_result_is_read_only_where_the_task_was_sent(rpc_app: Flask, env: dict[str, str],
                                                       start_worker) -> None:
    with pytest.raises(ResultNotAvailable, match="not sent by this process"):
        _ = basic.tasks.AsyncResult(str(uuid.uuid4())).state
    with pytest.raises(ResultNotAvailable, match="redis://"):
        basic.tasks.AsyncResult(str(uuid.uuid4())).get(timeout=1)
    start_worker(APP, "-c", "1", env=env)
    result = basic.add.delay(20, 22)
    assert result.get(timeout=15) == 42
    cli = subprocess.run([sys.executable, "-m", "flask", "--app", APP, "tasks", "result",
                          result.id], env={**os.environ, **env}, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 1, cli.stdout
    assert "not sent by this process" in cli.stderr and "Traceback" not in cli.stderr


def test_ignore_result_and_a_message_without_reply_to(rpc_app: Flask, env: dict[str, str],
                                                      start_worker) -> None:
    worker = start_worker(APP, "-c", "1", env=env)
    quiet = basic.quiet.delay()
    task_id = str(uuid.uuid4())
    message = protocol.build("tests.apps.basic.add", task_id, [1, 2], {})
    assert message.properties["reply_to"] == ""
    with Connection(env["TEST_BROKER_URL"]) as conn:  # a client without rpc:// results
        Producer(conn.default_channel).publish(
            message.body, exchange="", routing_key="celery", headers=message.headers,
            content_type=message.content_type, content_encoding=message.content_encoding,
            **message.properties)
    worker.wait_output(f"Task {task_id} came without reply_to")
    assert basic.add.delay(3, 4).get(timeout=15) == 7  # the worker goes on
    worker.wait_output(f"Task tests.apps.basic.quiet[{quiet.id}] succeeded")
    assert quiet.state == states.PENDING  # nothing was sent back
    assert worker.output.count(f"Task {task_id} came without reply_to") == 1
    assert "Traceback" not in worker.output


def test_revokes_reach_running_workers_and_later_ones(rpc_app: Flask, env: dict[str, str],
                                                      start_worker) -> None:
    worker = start_worker(APP, "-P", "threads", "-c", "1", env=env)
    busy = basic.sleep.delay(1.5)
    wait_for(lambda: busy.state == states.STARTED, timeout=15, message="busy started")
    waiting = basic.add.delay(1, 1)  # prefetched behind the sleeping task
    waiting.revoke()
    with pytest.raises(TaskRevokedError):
        waiting.get(timeout=15)
    assert waiting.state == states.REVOKED
    assert busy.get(timeout=15) == 1.5
    assert worker.stop() == 0

    later = basic.add.delay(2, 2)  # no worker now
    later.revoke()
    start_worker(APP, "-c", "1", env=env)
    with pytest.raises(TaskRevokedError):
        later.get(timeout=15)
    assert basic.add.delay(3, 3).get(timeout=15) == 6


def test_terminate_stops_a_running_task(rpc_app: Flask, env: dict[str, str],
                                         start_worker) -> None:
    start_worker(APP, "-P", "prefork", "-c", "1", env=env)
    running = basic.sleep.delay(30)
    wait_for(lambda: running.state == states.STARTED, timeout=15, message="started")
    running.revoke(terminate=True)
    with pytest.raises(TaskRevokedError, match="its process was killed"):
        running.get(timeout=15)  # sent by the worker's main process
    assert basic.add.delay(1, 2).get(timeout=15) == 3


def test_celery_client_gets_a_result_from_a_flask_tasks_worker(
        rpc_app: Flask, env: dict[str, str], start_worker) -> None:
    celery = pytest.importorskip("celery") if not os.environ.get("CI") \
        else __import__("celery")
    start_worker(APP, "-c", "1", env=env)
    client = celery.Celery("rpc_client", broker=env["TEST_BROKER_URL"], backend="rpc://")
    try:
        assert client.send_task("tests.apps.basic.add", args=(2, 3)).get(timeout=20) == 5
        with pytest.raises(ValueError, match="from celery"):
            client.send_task("tests.apps.basic.fail", args=("from celery",)).get(timeout=20)
    finally:
        client.close()


def test_flask_tasks_client_gets_a_result_from_a_celery_worker(rpc_app: Flask,
                                                               env: dict[str, str]) -> None:
    pytest.importorskip("celery") if not os.environ.get("CI") else __import__("celery")
    log = ROOT / f".celery-rpc-worker-{uuid.uuid4().hex[:8]}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.apps.celery_side", "worker",
             "-P", "solo", "-c", "1", "-l", "INFO", "--without-heartbeat", "--without-gossip",
             "--without-mingle"],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: " ready." in log.read_text() or proc.poll() is not None, timeout=60,
                 message="celery worker ready")
        assert proc.poll() is None, log.read_text()
        assert basic.add.delay(2, 3).get(timeout=20) == 5, log.read_text()
        with pytest.raises(ValueError, match="from flask_tasks"):
            basic.fail.delay("from flask_tasks").get(timeout=20)
    finally:
        proc.terminate()
        proc.wait(20)
        log.unlink(missing_ok=True)
