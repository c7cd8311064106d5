"""countdown / eta on RabbitMQ: delayed messages wait on the broker's delay ladder.

A real rabbitmq-server (a fresh vhost per test), results in Redis, real workers.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from kombu import Connection, Producer

from flask_tasks import protocol, states
from flask_tasks.transport.delays import MAX_DELAY
from tests.apps import basic
from tests.helpers import queue_length

APP = "tests.apps.basic:create_app"
LADDER = [f"celery_delayed_{level}" for level in range(28)]


@pytest.fixture()
def env(rabbitmq_vhost: str, redis_url: str) -> dict[str, str]:
    return {"TEST_BROKER_URL": rabbitmq_vhost, "TEST_RESULT_BACKEND": redis_url}


@pytest.fixture()
def amqp_app(rabbitmq_vhost: str, redis_url: str, basic_app_on: Any) -> Flask:
    return basic_app_on(rabbitmq_vhost, redis_url)  # type: ignore[no-any-return]


def on_the_ladder(url: str) -> int:
    return sum(queue_length(url, name) for name in LADDER)


def test_countdown_waits_on_the_broker_and_survives_every_worker_restarting(
        amqp_app: Flask, env: dict[str, str], start_worker) -> None:
    worker = start_worker(APP, "-c", "1", env=env)
    sent = time.time()
    result = basic.add.apply_async((1, 2), countdown=3)
    assert basic.add.delay(2, 2).get(timeout=10) == 4  # the worker is not held up
    assert worker.stop() == 0  # no worker at all while it waits
    url = env["TEST_BROKER_URL"]
    assert on_the_ladder(url) == 1 and queue_length(url, "celery") == 0
    assert result.state == states.PENDING
    start_worker(APP, "-c", "1", env=env)
    assert result.get(timeout=15) == 3
    ran_after = result.date_done.timestamp() - sent  # type: ignore[union-attr]
    assert 3.0 <= ran_after < 5.5, ran_after  # never early; whole seconds, rounded up
    assert on_the_ladder(url) == 0


def test_a_retry_countdown_waits_on_the_broker(amqp_app: Flask, env: dict[str, str],
                                              start_worker) -> None:
    start_worker(APP, "-c", "1", env=env)
    tag = uuid.uuid4().hex
    sent = time.time()
    result = basic.backs_off.delay(tag, 2)  # fails twice, retry_backoff 0.2 s
    assert result.get(timeout=20) == 3
    assert time.time() - sent >= 2.0  # two retries, each at least one whole second later


def test_a_message_that_arrives_early_goes_back_down_the_ladder(
        amqp_app: Flask, env: dict[str, str], start_worker) -> None:
    worker = start_worker(APP, "-c", "1", env=env)
    task_id = str(uuid.uuid4())
    eta = datetime.now(UTC) + timedelta(seconds=2)
    message = protocol.build("tests.apps.basic.add", task_id, [4, 4], {}, eta=eta)
    with Connection(env["TEST_BROKER_URL"]) as conn:  # as a client that does not delay
        Producer(conn.default_channel).publish(
            message.body, exchange="", routing_key="celery", headers=message.headers,
            content_type=message.content_type, content_encoding=message.content_encoding,
            **message.properties)
    worker.wait_output(f"Task tests.apps.basic.add[{task_id}] is due at")
    result = basic.tasks.AsyncResult(task_id)
    assert result.get(timeout=15) == 8
    assert result.date_done >= eta  # type: ignore[operator]


def test_a_delay_past_the_ladder_fails_in_the_caller(amqp_app: Flask) -> None:
    with pytest.raises(ValueError, match="longer than RabbitMQ's delayed delivery allows"):
        basic.add.apply_async((1, 1), countdown=MAX_DELAY + 10)
