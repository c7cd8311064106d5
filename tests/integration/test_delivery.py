"""The delivery guarantee on Redis and RabbitMQ, with real processes: acks_late survives
kill -9, and a restart of the broker while a worker consumes loses nothing (and, on Redis,
repeats nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flask import Flask

from tests.apps import basic
from tests.helpers import RabbitMQServer, settle, wait_for

APP = "tests.apps.basic:create_app"
SHORT_VISIBILITY = json.dumps({"TASKS_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": 2}})


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_acks_late_task_of_a_killed_worker_runs_again(basic_app: Flask,
                                                      redis_env: dict[str, str],
                                                      start_worker, tmp_path: Path,
                                                      pool: str) -> None:
    env = {**redis_env, "TEST_CONFIG": SHORT_VISIBILITY}
    first = start_worker(APP, "-P", pool, "-c", "1", env=env)
    result = basic.record.delay("victim", 2.0)
    runs_file = tmp_path / "runs.txt"
    # Killed once the task really runs (STARTED is stored just before the function).
    wait_for(lambda: runs_file.exists() and "victim" in runs_file.read_text(), timeout=10,
             message="task running")
    first.kill_group()  # kill -9: no ack, no clean shutdown, unacked stays in Redis
    start_worker(APP, "-P", pool, "-c", "1", env=env)  # restores it after visibility_timeout
    assert result.get(timeout=40) == "victim"
    runs = (tmp_path / "runs.txt").read_text().split()[::2]
    assert runs == ["victim", "victim"]  # 0 lost; the killed run and the finished one


def test_redis_restart_while_consuming_loses_nothing(redis_server: str, tmp_path: Path,
                                                     monkeypatch, start_worker) -> None:
    import shutil
    import time

    from tests.helpers import RedisServer

    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(shutil.which("redis-server") or "redis-server", workdir,
                         persistent=True).start()
    try:
        url = server.url + "/0"
        monkeypatch.setenv("TEST_BROKER_URL", url)
        monkeypatch.setenv("TEST_RESULT_BACKEND", url)
        monkeypatch.setenv("TEST_INSTANCE_PATH", str(tmp_path))
        monkeypatch.setenv("TEST_CONFIG", SHORT_VISIBILITY)
        app = basic.create_app()
        start_worker(APP, "-c", "2", env={"TEST_BROKER_URL": url, "TEST_RESULT_BACKEND": url,
                                          "TEST_CONFIG": SHORT_VISIBILITY})
        tags = [f"t{i}" for i in range(30)]
        with app.app_context():
            results = [basic.record.delay(tag, 0.1) for tag in tags[:15]]
            time.sleep(0.3)  # the worker is in the middle of them
            server.restart()
            results += [basic.record.delay(tag, 0.1) for tag in tags[15:]]  # reconnects
            assert sorted(r.get(timeout=60) for r in results) == sorted(tags)
        runs = (tmp_path / "runs.txt").read_text().split()[::2]
        print(f"broker restart: {len(set(tags) - set(runs))} lost, "
              f"{len(runs) - len(set(runs))} duplicated of {len(tags)}")
        assert set(runs) == set(tags)  # nothing lost
        # Nothing run twice: tasks running across the restart were acknowledged by
        # delivery tag over the new connection, not restored to the queue.
        assert sorted(runs) == sorted(tags)
    finally:
        server.stop()


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_acks_late_task_of_a_killed_worker_runs_again_on_rabbitmq(
        rabbitmq_vhost: str, redis_url: str, start_worker, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, pool: str) -> None:
    monkeypatch.setenv("TEST_BROKER_URL", rabbitmq_vhost)
    monkeypatch.setenv("TEST_RESULT_BACKEND", redis_url)
    monkeypatch.setenv("TEST_INSTANCE_PATH", str(tmp_path))
    app = basic.create_app()
    env = {"TEST_BROKER_URL": rabbitmq_vhost, "TEST_RESULT_BACKEND": redis_url}
    first = start_worker(APP, "-P", pool, "-c", "1", env=env)
    with app.app_context():
        result = basic.record.delay("victim", 2.0)
        runs_file = tmp_path / "runs.txt"
        wait_for(lambda: runs_file.exists() and "victim" in runs_file.read_text(), timeout=10,
                 message="task running")
        first.kill_group()  # kill -9: the connection drops with the message unacknowledged
        # RabbitMQ requeues it as soon as it sees the connection closed: no visibility timeout
        start_worker(APP, "-P", pool, "-c", "1", env=env)
        assert result.get(timeout=40) == "victim"
    runs = runs_file.read_text().split()[::2]
    assert runs == ["victim", "victim"]  # 0 lost; the killed run and the finished one


def test_rabbitmq_restart_while_consuming_loses_nothing(
        rabbitmq_server: RabbitMQServer, rabbitmq_vhost: str, redis_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, start_worker) -> None:
    import time

    monkeypatch.setenv("TEST_BROKER_URL", rabbitmq_vhost)
    monkeypatch.setenv("TEST_RESULT_BACKEND", redis_url)
    monkeypatch.setenv("TEST_INSTANCE_PATH", str(tmp_path))
    app = basic.create_app()
    worker = start_worker(APP, "-c", "2", env={"TEST_BROKER_URL": rabbitmq_vhost,
                                               "TEST_RESULT_BACKEND": redis_url})
    tags = [f"t{i}" for i in range(30)]
    runs_file = tmp_path / "runs.txt"
    try:
        with app.app_context():
            # Durable queue, persistent messages (delivery_mode=2): they survive the restart.
            results = [basic.record.delay(tag, 0.1) for tag in tags[:15]]
            time.sleep(0.3)  # the worker is in the middle of them
            rabbitmq_server.restart()  # the same node on the same data; waits for AMQP
            results += [basic.record.delay(tag, 0.1) for tag in tags[15:]]  # reconnects
            settle(lambda: all(r.ready() for r in results), timeout=90, interval=0.2)
            states = {tag: r.state for tag, r in zip(tags, results, strict=True)}
    finally:
        if rabbitmq_server.proc is None:  # the restart failed half-way: leave the node up
            rabbitmq_server.start()
    runs = runs_file.read_text().split()[::2] if runs_file.exists() else []
    lost = sorted(tag for tag in tags if tag not in runs or states[tag] != "SUCCESS")
    twice = sorted({tag for tag in runs if runs.count(tag) > 1})
    duplicated = len(runs) - len(set(runs))
    print(f"rabbitmq restart: {len(lost)} lost {lost}, {duplicated} duplicated {twice} "
          f"of {len(tags)}; worker reconnects: {worker.output.count('Connected to ') - 1}")
    assert not lost
    assert set(runs) == set(tags)
    # acks_late, at least once: the node requeues every message unacknowledged on the
    # dropped connection. The pool's queued jobs are skipped when the connection is lost
    # (they do not run: the node delivers them again), but the running ones, and those
    # started before the worker noticed the loss, run again (their acknowledgements
    # fail). They are at most the worker's prefetch count (-c 2 x multiplier 4; measured:
    # 2 to 4), and only messages the worker held when the node stopped.
    assert duplicated <= 2 * 4
    assert set(twice) <= set(tags[:15])
    assert max(runs.count(tag) for tag in tags) <= 2
