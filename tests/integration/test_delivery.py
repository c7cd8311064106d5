"""The delivery guarantee on Redis, with real processes: acks_late survives kill -9,
and a restart of redis-server while a worker consumes loses and repeats nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flask import Flask

from tests.apps import basic
from tests.helpers import wait_for

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
