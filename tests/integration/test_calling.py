"""Calling options through a real worker: queues, compression, signals, publish retries.

The tests with a worker run on each broker (``broker``: Redis and RabbitMQ), results in Redis.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from flask import Flask
from kombu.exceptions import OperationalError

from flask_tasks import Tasks, signals, states
from tests.apps import basic
from tests.helpers import first_message_headers, queue_length, wait_for

APP = "tests.apps.basic:create_app"


def test_queues_route_to_the_workers_that_consume_them(broker_app: Flask, broker: str,
                                                      broker_env: dict[str, str],
                                                      start_worker) -> None:
    start_worker(APP, "-c", "1", env=broker_env)  # default queue only
    routed = basic.on_hipri.delay()
    explicit = basic.add.apply_async((1, 2), queue="hipri")
    assert basic.add.delay(2, 2).get(timeout=10) == 4
    assert queue_length(broker, "hipri") == 2 and routed.state == states.PENDING
    start_worker(APP, "-c", "1", "-Q", "hipri,celery", env=broker_env)
    assert routed.get(timeout=10) == "hipri" and explicit.get(timeout=10) == 3


def test_routes_setting(basic_app: Flask, redis_url: str) -> None:
    state = basic.tasks.state(basic_app)
    router = type(state.router)({"tests.apps.basic.a*": {"queue": "a-tasks"}}, "celery")
    assert router.queue_name("tests.apps.basic.add") == "a-tasks"
    assert router.queue_name("tests.apps.basic.fail") == "celery"
    assert router.queue_name("tests.apps.basic.add", options={"queue": "x"}) == "x"


def test_compressed_messages_round_trip(broker_app: Flask, broker_env: dict[str, str],
                                        start_worker) -> None:
    start_worker(APP, "-c", "1", env=broker_env)
    result = basic.add.apply_async((20, 22), compression="gzip")
    assert result.get(timeout=10) == 42


def test_publish_signals(broker_app: Flask, broker: str) -> None:
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
    assert first_message_headers(broker, "celery")["x-tenant"] == "acme"


@pytest.mark.parametrize("url", ["redis://127.0.0.1:{port}/0",
                                 "amqp://guest:guest@127.0.0.1:{port}//"],
                         ids=["redis", "rabbitmq"])
def test_unreachable_broker_is_retried_then_reported(tmp_path, url: str) -> None:
    app = Flask("unreachable", instance_path=str(tmp_path))
    port = __import__("tests.helpers", fromlist=["free_port"]).free_port()
    app.config.update(BROKER_URL=url.format(port=port), RESULT_BACKEND="disabled",
                      TASKS_PUBLISH_RETRY_POLICY={"max_retries": 2, "interval_start": 0.05,
                                                  "interval_step": 0.05, "interval_max": 0.05})
    tasks = Tasks(app)

    @tasks.task(name="unreachable.noop")
    def noop() -> None: ...

    start = time.monotonic()
    with app.app_context(), pytest.raises(OperationalError):
        noop.delay()
    assert time.monotonic() - start < 10


def test_received_then_started_with_track_started(broker_app: Flask,
                                                  broker_env: dict[str, str],
                                                  start_worker) -> None:
    start_worker(APP, "-c", "1", env=broker_env)
    first = basic.sleep.delay(1.5)
    wait_for(lambda: first.state == states.STARTED, timeout=10, message="STARTED")
    queued = basic.sleep.delay(0.1)  # prefetched while the only process is busy
    wait_for(lambda: queued.state == states.RECEIVED, timeout=10, message="RECEIVED")
    assert first.state == states.STARTED
    assert queued.get(timeout=10) == 0.1


#: Brokers for the restart tests. (On RabbitMQ the publisher declares the delay ladder
#: again after a reconnect, through the same retry as the queue.)
RESTART_KINDS = ["redis", "rabbitmq"]


class RestartableBroker:
    """A broker a test may stop and start: its own redis-server (nothing kept: empty after
    a restart), or the session's RabbitMQ node on a fresh vhost (durable queues and
    persistent messages survive a restart)."""

    def __init__(self, request: pytest.FixtureRequest, kind: str, tmp_path) -> None:
        import shutil

        from tests.helpers import RedisServer

        self.kind = kind
        if kind == "redis":
            self.server: Any = RedisServer(shutil.which("redis-server") or "redis-server",
                                           tmp_path).start()
            self.url = self.server.url + "/0"
        else:
            self.server = request.getfixturevalue("rabbitmq_server")
            self.url = request.getfixturevalue("rabbitmq_vhost")
        #: what a restart keeps of the messages that waited
        self.keeps_messages = kind == "rabbitmq"

    def close(self) -> None:
        if self.kind == "redis":
            self.server.stop()
        elif self.server.proc is None:  # a failed test left the session's node stopped
            self.server.start()


@pytest.mark.parametrize("kind", RESTART_KINDS)
def test_publish_survives_a_broker_restart(request: pytest.FixtureRequest, tmp_path,
                                           kind: str) -> None:
    broker = RestartableBroker(request, kind, tmp_path)
    try:
        app = Flask("restart", instance_path=str(tmp_path))
        app.config.update(BROKER_URL=broker.url, RESULT_BACKEND="disabled")
        tasks = Tasks(app)

        @tasks.task(name="restart.noop")
        def noop() -> None: ...

        with app.app_context():
            noop.delay()
            assert queue_length(broker.url, "celery") == 1
            broker.server.restart()  # Redis: empty again; RabbitMQ: the message is kept
            noop.delay()  # the pooled connection is dead: reconnect and retry
            assert queue_length(broker.url, "celery") == 1 + broker.keeps_messages
    finally:
        broker.close()


@pytest.mark.parametrize("kind", RESTART_KINDS)
def test_publish_while_the_broker_is_down_is_retried_until_it_is_back(
        request: pytest.FixtureRequest, tmp_path, kind: str) -> None:
    """retry_policy: a delay() made while the broker is down waits for it, publishes once."""
    import threading

    broker = RestartableBroker(request, kind, tmp_path)
    restart = threading.Timer(1.0, broker.server.start)
    try:
        app = Flask("down", instance_path=str(tmp_path))
        # RabbitMQ takes 5-15 s to start again: the same interval, more retries
        retries = 30 if kind == "redis" else 300
        app.config.update(BROKER_URL=broker.url, RESULT_BACKEND="disabled",
                          TASKS_PUBLISH_RETRY_POLICY={"max_retries": retries,
                                                      "interval_start": 0,
                                                      "interval_step": 0.2, "interval_max": 0.2})
        tasks = Tasks(app)

        @tasks.task(name="down.noop")
        def noop() -> None: ...

        with app.app_context():
            noop.delay()  # a pooled connection exists, then the server goes away
            broker.server.stop()
            restart.start()
            start = time.monotonic()
            noop.delay()
            assert time.monotonic() - start >= 0.5  # it waited for the broker
            # exactly this one on the restarted Redis (empty); RabbitMQ kept the first
            assert queue_length(broker.url, "celery") == 1 + broker.keeps_messages
    finally:
        if restart.is_alive():
            restart.join()
        broker.close()


def test_delay_on_commit_runs_after_the_row_exists(broker_app: Flask,
                                                   broker_env: dict[str, str],
                                                   start_worker) -> None:
    start_worker(APP, "-c", "1", env=broker_env)
    basic.db.session.add(basic.Note(text="committed"))
    result = basic.note_exists.delay_on_commit("committed")
    time.sleep(0.3)  # a task sent now would not find the row
    assert result.state == states.PENDING
    basic.db.session.commit()
    assert result.get(timeout=10) is True
