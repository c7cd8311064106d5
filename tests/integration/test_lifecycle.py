"""Worker lifecycle: warm and cold shutdown, dead children, max tasks per child."""

from __future__ import annotations

import signal

import pytest
import redis
from flask import Flask

from flask_tasks import states
from flask_tasks.exceptions import WorkerLostError
from tests.apps import basic
from tests.helpers import wait_for

APP = "tests.apps.basic:create_app"


def env(url: str) -> dict[str, str]:
    return {"TEST_BROKER_URL": url, "TEST_RESULT_BACKEND": url}


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_warm_shutdown_finishes_running_task_and_leaves_the_rest(
        basic_app: Flask, redis_url: str, start_worker, pool: str) -> None:
    worker = start_worker(APP, "-P", pool, "-c", "1", env=env(redis_url))
    running = basic.sleep.delay(1.5)
    wait_for(lambda: running.state == states.STARTED, timeout=10, message="task started")
    waiting = [basic.add.delay(i, i) for i in range(3)]  # reserved (prefetched), not started
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(20) == 0
    assert running.get(timeout=1) == 1.5
    assert "Warm shutdown" in worker.output
    # The reserved tasks went back to the queue, untouched.
    assert all(r.state == states.PENDING for r in waiting)
    assert redis.Redis.from_url(redis_url).llen("celery") == 3
    # ...and the next worker runs them.
    start_worker(APP, "-c", "1", env=env(redis_url))
    assert [r.get(timeout=10) for r in waiting] == [0, 2, 4]


def test_acks_late_task_survives_cold_shutdown(basic_app: Flask, redis_url: str,
                                               start_worker) -> None:
    worker = start_worker(APP, "-c", "1", env=env(redis_url))
    late = basic.slow_late.delay(30)
    wait_for(lambda: late.state == states.STARTED, timeout=10, message="task started")
    worker.signal(signal.SIGTERM)
    worker.wait_output("Warm shutdown")
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(20) != 0
    assert "Cold shutdown" in worker.output
    # Not acknowledged: kombu gave it back to the queue on the way out.
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.llen("celery") == 1, timeout=10, message="message restored")


def test_dead_child_is_replaced_and_its_task_fails(basic_app: Flask, redis_url: str,
                                                   start_worker) -> None:
    worker = start_worker(APP, "-P", "prefork", "-c", "1", env=env(redis_url))
    before = basic.pid.delay().get(timeout=10)
    result = basic.die.delay()
    with pytest.raises(WorkerLostError, match="signal 9"):
        result.get(timeout=10)
    after = basic.pid.delay().get(timeout=10)
    assert after != before
    worker.wait_output("died while running a task")


def test_max_tasks_per_child(basic_app: Flask, redis_url: str, start_worker) -> None:
    start_worker(APP, "-c", "1", "--max-tasks-per-child", "2", env=env(redis_url))
    pids = [basic.pid.delay().get(timeout=10) for _ in range(4)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]


def test_killing_an_idle_child_does_not_stall_the_pool(basic_app: Flask, redis_env: dict[str, str],
                                                       start_worker) -> None:
    import os

    import psutil

    worker = start_worker(APP, "-P", "prefork", "-c", "2", env=redis_env)
    assert basic.add.delay(1, 1).get(timeout=10) == 2
    children = psutil.Process(worker.proc.pid).children()
    assert len(children) == 2
    for child in children:  # both idle, waiting for work
        os.kill(child.pid, 9)
        wait_for(lambda child=child: not child.is_running()
                 or child.status() == psutil.STATUS_ZOMBIE, timeout=5, message="child gone")
    results = [basic.add.delay(i, i) for i in range(6)]
    assert [r.get(timeout=15) for r in results] == [0, 2, 4, 6, 8, 10]


def test_warm_shutdown_sends_every_ack(basic_app: Flask, redis_url: str,
                                       redis_env: dict[str, str], start_worker) -> None:
    worker = start_worker(APP, "-c", "2", env=redis_env)
    late = [basic.slow_late.delay(0.5) for _ in range(2)]
    wait_for(lambda: all(r.state == states.STARTED for r in late), timeout=10,
             message="both started")
    assert worker.stop() == 0
    assert [r.get(timeout=1) for r in late] == [0.5, 0.5]
    client = redis.Redis.from_url(redis_url)
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_children_exit_when_the_main_process_is_killed(basic_app: Flask,
                                                       redis_env: dict[str, str],
                                                       start_worker) -> None:
    import os

    import psutil

    worker = start_worker(APP, "-P", "prefork", "-c", "2", env=redis_env)
    assert basic.add.delay(1, 1).get(timeout=10) == 2
    children = psutil.Process(worker.proc.pid).children()
    os.kill(worker.proc.pid, 9)
    worker.proc.wait(5)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphaned children: {alive}"


def test_reject_on_worker_lost_runs_the_task_again(basic_app: Flask, redis_env: dict[str, str],
                                                   start_worker) -> None:
    worker = start_worker(APP, "-P", "prefork", "-c", "1", env=redis_env)
    result = basic.die_late.delay("twice", 2)  # dies twice, succeeds the third time
    assert result.get(timeout=20) == "twice"
    worker.wait_output("will run again")


def test_poison_message_ends_failure_after_the_cap(basic_app: Flask, redis_url: str,
                                                   redis_env: dict[str, str],
                                                   start_worker) -> None:
    start_worker(APP, "-P", "prefork", "-c", "1", env=redis_env)
    result = basic.die_late.delay("poison", 100)  # kills its process every time
    with pytest.raises(WorkerLostError, match="killed its process 3 times"):
        result.get(timeout=30)
    client = redis.Redis.from_url(redis_url)
    assert client.llen("celery") == 0
    wait_for(lambda: client.hlen("unacked") == 0, timeout=5, message="acks flushed")
    assert basic.add.delay(1, 2).get(timeout=10) == 3  # and the worker keeps serving
