"""Calling options through a real worker: queues, compression, signals, publish retries."""

from __future__ import annotations

import time

import pytest
import redis
from flask import Flask
from kombu.exceptions import OperationalError

from flask_tasks import Tasks, signals, states
from tests.apps import basic
from tests.helpers import wait_for

APP = "tests.apps.basic:create_app"


def test_queues_route_to_the_workers_that_consume_them(basic_app: Flask, redis_url: str,
                                                      redis_env: dict[str, str],
                                                      start_worker) -> None:
    start_worker(APP, "-c", "1", env=redis_env)  # default queue only
    routed = basic.on_hipri.delay()
    explicit = basic.add.apply_async((1, 2), queue="hipri")
    assert basic.add.delay(2, 2).get(timeout=10) == 4
    client = redis.Redis.from_url(redis_url)
    assert client.llen("hipri") == 2 and routed.state == states.PENDING
    start_worker(APP, "-c", "1", "-Q", "hipri,celery", env=redis_env)
    assert routed.get(timeout=10) == "hipri" and explicit.get(timeout=10) == 3


def test_routes_setting(basic_app: Flask, redis_url: str) -> None:
    state = basic.tasks.state(basic_app)
    router = type(state.router)({"tests.apps.basic.a*": {"queue": "a-tasks"}}, "celery")
    assert router.queue_name("tests.apps.basic.add") == "a-tasks"
    assert router.queue_name("tests.apps.basic.fail") == "celery"
    assert router.queue_name("tests.apps.basic.add", options={"queue": "x"}) == "x"


def test_compressed_messages_round_trip(basic_app: Flask, redis_url: str,
                                        redis_env: dict[str, str], start_worker) -> None:
    start_worker(APP, "-c", "1", env=redis_env)
    result = basic.add.apply_async((20, 22), compression="gzip")
    assert result.get(timeout=10) == 42


def test_publish_signals(basic_app: Flask, redis_url: str) -> None:
    seen: list[tuple[str, str]] = []

    def before(sender: str, **kw: object) -> None:
        headers = kw["headers"]
        assert isinstance(headers, dict)
        headers["x-tenant"] = "acme"  # receivers may add headers
        seen.append(("before", sender))

    def after(sender: str, **kw: object) -> None:
        seen.append(("after", sender))

    with signals.before_task_publish.connected_to(before), \
            signals.after_task_publish.connected_to(after):
        basic.add.delay(1, 1)
    assert seen == [("before", "tests.apps.basic.add"), ("after", "tests.apps.basic.add")]
    raw = redis.Redis.from_url(redis_url).lindex("celery", 0)
    assert raw is not None and b'"x-tenant": "acme"' in raw


def test_unreachable_broker_is_retried_then_reported(tmp_path) -> None:
    app = Flask("unreachable", instance_path=str(tmp_path))
    port = __import__("tests.helpers", fromlist=["free_port"]).free_port()
    app.config.update(BROKER_URL=f"redis://127.0.0.1:{port}/0", RESULT_BACKEND="disabled",
                      TASKS_PUBLISH_RETRY_POLICY={"max_retries": 2, "interval_start": 0.05,
                                                  "interval_step": 0.05, "interval_max": 0.05})
    tasks = Tasks(app)

    @tasks.task(name="unreachable.noop")
    def noop() -> None: ...

    start = time.monotonic()
    with app.app_context(), pytest.raises(OperationalError):
        noop.delay()
    assert time.monotonic() - start < 10


def test_received_then_started_with_track_started(basic_app: Flask, redis_env: dict[str, str],
                                                  start_worker) -> None:
    start_worker(APP, "-c", "1", env=redis_env)
    first = basic.sleep.delay(1.5)
    wait_for(lambda: first.state == states.STARTED, timeout=10, message="STARTED")
    queued = basic.sleep.delay(0.1)  # prefetched while the only process is busy
    wait_for(lambda: queued.state == states.RECEIVED, timeout=10, message="RECEIVED")
    assert first.state == states.STARTED
    assert queued.get(timeout=10) == 0.1


def test_publish_survives_a_broker_restart(tmp_path) -> None:
    import shutil

    from tests.helpers import RedisServer

    server = RedisServer(shutil.which("redis-server") or "redis-server", tmp_path).start()
    try:
        client = redis.Redis.from_url(server.url)
        app = Flask("restart", instance_path=str(tmp_path))
        app.config.update(BROKER_URL=server.url + "/0", RESULT_BACKEND="disabled")
        tasks = Tasks(app)

        @tasks.task(name="restart.noop")
        def noop() -> None: ...

        with app.app_context():
            noop.delay()
            assert client.llen("celery") == 1
            server.restart()  # empty again
            noop.delay()  # the pooled connection is dead: reconnect and retry
            assert client.llen("celery") == 1
    finally:
        server.stop()


def test_publish_while_the_broker_is_down_is_retried_until_it_is_back(tmp_path) -> None:
    """retry_policy: a delay() made while redis-server is down waits for it, publishes once."""
    import shutil
    import threading

    from tests.helpers import RedisServer

    server = RedisServer(shutil.which("redis-server") or "redis-server", tmp_path).start()
    restart = threading.Timer(1.0, server.start)
    try:
        client = redis.Redis.from_url(server.url)
        app = Flask("down", instance_path=str(tmp_path))
        app.config.update(BROKER_URL=server.url + "/0", RESULT_BACKEND="disabled",
                          TASKS_PUBLISH_RETRY_POLICY={"max_retries": 30, "interval_start": 0,
                                                      "interval_step": 0.2, "interval_max": 0.2})
        tasks = Tasks(app)

        @tasks.task(name="down.noop")
        def noop() -> None: ...

        with app.app_context():
            noop.delay()  # a pooled connection exists, then the server goes away
            server.stop()
            restart.start()
            start = time.monotonic()
            noop.delay()
            assert time.monotonic() - start >= 0.5  # it waited for the broker
            assert client.llen("celery") == 1  # the restarted server is empty: exactly this one
    finally:
        if restart.is_alive():
            restart.join()
        server.stop()


def test_delay_on_commit_runs_after_the_row_exists(basic_app: Flask, redis_env: dict[str, str],
                                                   start_worker) -> None:
    start_worker(APP, "-c", "1", env=redis_env)
    basic.db.session.add(basic.Note(text="committed"))
    result = basic.note_exists.delay_on_commit("committed")
    time.sleep(0.3)  # a task sent now would not find the row
    assert result.state == states.PENDING
    basic.db.session.commit()
    assert result.get(timeout=10) is True
