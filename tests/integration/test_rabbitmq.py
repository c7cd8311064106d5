"""What RabbitMQ users expect: clear login errors, publisher confirms, priorities, quorum
queues with their delivery limit, heartbeats that hold while the pool is busy.

A real rabbitmq-server (a fresh vhost per test), results in Redis, real workers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from kombu import Connection

from flask_tasks import states
from flask_tasks.exceptions import ImproperlyConfigured, PublishRefused, WorkerLostError
from tests.apps import basic
from tests.helpers import ROOT, RabbitMQServer, broker_settled, queue_length, wait_for

APP = "tests.apps.basic:create_app"


def env_for(url: str, redis_url: str, **config: Any) -> dict[str, str]:
    env = {"TEST_BROKER_URL": url, "TEST_RESULT_BACKEND": redis_url}
    if config:
        env["TEST_CONFIG"] = json.dumps(config)
    return env


def with_password(url: str, password: str) -> str:
    return url.replace("guest:guest@", f"guest:{password}@", 1)


# -- a broker that refuses us ------------------------------------------------------------

@pytest.mark.parametrize("what", ["password", "vhost"])
def test_a_refused_login_stops_the_worker_with_one_line_and_no_password(
        what: str, rabbitmq_server: RabbitMQServer, redis_url: str, start_worker) -> None:
    secret = f"s3cret-{uuid.uuid4().hex[:6]}"
    url = with_password(rabbitmq_server.url, secret) if what == "password" \
        else rabbitmq_server.url.rstrip("/") + "/no-such-vhost"
    worker = start_worker(APP, "-P", "solo", env=env_for(url, redis_url), ready=False)
    assert worker.proc.wait(30) == 78  # EX_CONFIG: not retried forever
    output = worker.output
    expected = "refused the login of user 'guest'" if what == "password" \
        else "has no virtual host 'no-such-vhost'"
    assert expected in output, output
    assert "Traceback" not in output and "trying again" not in output
    assert secret not in output


def test_a_refused_login_raises_in_the_caller_and_the_cli(
        rabbitmq_server: RabbitMQServer, redis_url: str, basic_app_on: Any) -> None:
    secret = f"s3cret-{uuid.uuid4().hex[:6]}"
    url = with_password(rabbitmq_server.url, secret)
    basic_app_on(url, redis_url)
    started = time.monotonic()
    with pytest.raises(ImproperlyConfigured, match="refused the login of user 'guest'") as info:
        basic.add.delay(1, 2)
    assert time.monotonic() - started < 5  # not retried
    assert secret not in str(info.value)
    proc = subprocess.run(
        [sys.executable, "-m", "flask", "--app", APP, "tasks", "purge", "-f"],
        env={**_base_env(), **env_for(url, redis_url)}, cwd=ROOT, capture_output=True,
        text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("Error: The broker at amqp://guest:**@"), proc.stderr
    assert "Traceback" not in proc.stderr and secret not in proc.stderr


def _base_env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if not key.startswith("TEST_")}


# -- publisher confirms ------------------------------------------------------------------

@pytest.mark.parametrize("confirm", [True, False])
def test_a_publish_the_broker_refuses_raises_in_the_caller(
        confirm: bool, rabbitmq_server: RabbitMQServer, rabbitmq_vhost: str, redis_url: str,
        basic_app_on: Any) -> None:
    vhost = rabbitmq_vhost.rsplit("/", 1)[1]
    # A policy, not queue arguments: the queue is declared as flask_tasks declares it.
    rabbitmq_server.ctl("set_policy", "-p", vhost, "full", "^celery$",
                        '{"max-length": 1, "overflow": "reject-publish"}',
                        "--apply-to", "queues")
    config = {} if confirm else {"TASKS_BROKER_TRANSPORT_OPTIONS": {"confirm_publish": False}}
    basic_app_on(rabbitmq_vhost, redis_url, json.dumps(config))
    basic.add.delay(1, 1)  # fills the queue
    wait_for(lambda: queue_length(rabbitmq_vhost, "celery") == 1)
    if confirm:
        with pytest.raises(PublishRefused, match="refused task .* for queue 'celery'"):
            basic.add.delay(2, 2)
    else:
        basic.add.delay(2, 2)  # dropped by the broker, and nobody is told
    assert queue_length(rabbitmq_vhost, "celery") == 1


# -- priorities ----------------------------------------------------------------------------

def test_higher_priority_tasks_are_delivered_first(
        rabbitmq_server: RabbitMQServer, rabbitmq_vhost: str, redis_url: str,
        basic_app_on: Any, start_worker) -> None:
    config = {"TASKS_QUEUE_MAX_PRIORITY": 10}
    basic_app_on(rabbitmq_vhost, redis_url, json.dumps(config))
    low = [basic.add.apply_async((i, 0), priority=1) for i in range(5)]
    high = basic.add.apply_async((100, 0), priority=9)
    vhost = rabbitmq_vhost.rsplit("/", 1)[1]
    arguments = rabbitmq_server.ctl("list_queues", "-p", vhost, "--no-table-headers",
                                    "name", "arguments")
    assert "x-max-priority" in arguments, arguments
    start_worker(APP, "-P", "solo", "--prefetch-multiplier", "1",
                 env=env_for(rabbitmq_vhost, redis_url, **config))
    assert high.get(timeout=15) == 100
    done = [result.get(timeout=15) for result in low]
    assert done == [0, 1, 2, 3, 4]
    first_low = min(result.date_done for result in low)  # type: ignore[type-var]
    assert high.date_done < first_low  # type: ignore[operator]


def test_priorities_with_quorum_queues_are_refused_at_init() -> None:
    from flask_tasks.config import load

    with pytest.raises(ImproperlyConfigured, match="classic queues"):
        load({"TASKS_QUEUE_MAX_PRIORITY": 10, "TASKS_DEFAULT_QUEUE_TYPE": "quorum"})
    with pytest.raises(ImproperlyConfigured, match="'classic' or 'quorum', not 'stream'"):
        load({"TASKS_DEFAULT_QUEUE_TYPE": "stream"})


# -- quorum queues ---------------------------------------------------------------------------

def _return_unacked(url: str, queue: str, times: int) -> None:
    """Take the first message of ``queue`` without acknowledging it, ``times`` times."""
    for _ in range(times):
        with Connection(url) as conn:
            channel = conn.channel()
            message = None
            for _ in range(100):
                message = channel.basic_get(queue, no_ack=False)
                if message is not None:
                    break
                time.sleep(0.05)
            assert message is not None
        # closing the connection gives it back, counted in x-delivery-count


def test_quorum_queues_run_tasks_and_cap_deliveries(
        rabbitmq_server: RabbitMQServer, rabbitmq_vhost: str, redis_url: str,
        basic_app_on: Any, start_worker) -> None:
    config = {"TASKS_DEFAULT_QUEUE_TYPE": "quorum", "TASKS_QUORUM_DELIVERY_LIMIT": 2}
    basic_app_on(rabbitmq_vhost, redis_url, json.dumps(config))
    env = env_for(rabbitmq_vhost, redis_url, **config)
    capped = basic.add.delay(1, 1)
    _return_unacked(rabbitmq_vhost, "celery", 2)  # two deliveries that ended unacknowledged
    vhost = rabbitmq_vhost.rsplit("/", 1)[1]
    listed = rabbitmq_server.ctl("list_queues", "-p", vhost, "--no-table-headers",
                                 "name", "type", "arguments")
    assert any(line.split()[:2] == ["celery", "quorum"] for line in listed.splitlines()), listed
    once = basic.add.delay(2, 2)
    worker = start_worker(APP, "-c", "1", env=env)
    assert once.get(timeout=15) == 4  # below the limit: it runs
    with pytest.raises(WorkerLostError, match="not run again"):
        capped.get(timeout=15)
    assert capped.state == states.FAILURE
    wait_for(lambda: broker_settled(rabbitmq_vhost), timeout=10)
    worker.wait_output("TASKS_QUORUM_DELIVERY_LIMIT=2")


# -- heartbeats ------------------------------------------------------------------------------

def test_heartbeats_hold_the_connection_while_a_warm_shutdown_waits_for_a_long_task(
        rabbitmq_server: RabbitMQServer, rabbitmq_vhost: str, redis_url: str,
        basic_app_on: Any, start_worker) -> None:
    config = {"TASKS_BROKER_HEARTBEAT": 1}
    basic_app_on(rabbitmq_vhost, redis_url, json.dumps(config))
    worker = start_worker(APP, "-c", "1", "-P", "threads",
                          env=env_for(rabbitmq_vhost, redis_url, **config))
    vhost = rabbitmq_vhost.rsplit("/", 1)[1]
    timeouts = rabbitmq_server.ctl("list_connections", "--no-table-headers", "vhost",
                                   "timeout")
    assert any(line.split() == [vhost, "1"] for line in timeouts.splitlines()), timeouts
    # The warm shutdown waits on the pool, not on the broker, for 6 heartbeat intervals;
    # the acks_late task's acknowledgement needs the connection alive at the end.
    missed_before = rabbitmq_server.log_tail(100_000).count("missed heartbeats")
    slow = basic.slow_late.delay(6)
    wait_for(lambda: slow.state == states.STARTED, timeout=10)
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 0
    assert slow.get(timeout=5) == 6
    assert rabbitmq_server.log_tail(100_000).count("missed heartbeats") == missed_before
    wait_for(lambda: broker_settled(rabbitmq_vhost), timeout=10)  # acked, not given back


def test_a_queue_declared_otherwise_stops_the_worker_and_the_caller_with_what_to_fix(
        rabbitmq_vhost: str, redis_url: str, basic_app_on: Any, start_worker) -> None:
    from kombu import Exchange, Queue

    with Connection(rabbitmq_vhost) as conn:  # as a Celery app with quorum queues would
        Queue("celery", Exchange("celery", "direct"), "celery",
              queue_arguments={"x-queue-type": "quorum"})(conn.default_channel).declare()
    worker = start_worker(APP, "-P", "solo", env=env_for(rabbitmq_vhost, redis_url),
                          ready=False)
    assert worker.proc.wait(30) == 78
    output = worker.output
    assert "inequivalent arg 'x-queue-type' for queue 'celery'" in output, output
    assert "TASKS_DEFAULT_QUEUE_TYPE" in output and "Traceback" not in output
    basic_app_on(rabbitmq_vhost, redis_url)
    with pytest.raises(ImproperlyConfigured, match="inequivalent arg 'x-queue-type'"):
        basic.add.delay(1, 2)
    # Declared alike, it works.
    config = {"TASKS_DEFAULT_QUEUE_TYPE": "quorum"}
    basic_app_on(rabbitmq_vhost, redis_url, json.dumps(config))
    start_worker(APP, "-P", "solo", env=env_for(rabbitmq_vhost, redis_url, **config))
    assert basic.add.delay(1, 2).get(timeout=15) == 3


def test_quorum_queues_delay_on_a_quorum_ladder_as_celery_declares_it(
        rabbitmq_server: RabbitMQServer, redis_url: str, basic_app_on: Any,
        start_worker) -> None:
    # A vhost of its own, left in place: RabbitMQ 3.10's at-least-once dead-letter
    # workers of quorum queues crash when their vhost is deleted, which can take the
    # session's node down with them.
    name = f"quorum-{uuid.uuid4().hex[:8]}"
    url = rabbitmq_server.add_vhost(name)
    config = {"TASKS_DEFAULT_QUEUE_TYPE": "quorum"}
    basic_app_on(url, redis_url, json.dumps(config))
    start_worker(APP, "-c", "1", env=env_for(url, redis_url, **config))
    sent = time.time()
    result = basic.add.apply_async((2, 3), countdown=2)
    assert result.get(timeout=15) == 5
    ran_after = result.date_done.timestamp() - sent  # type: ignore[union-attr]
    assert 2.0 <= ran_after < 4.5, ran_after
    listed = rabbitmq_server.ctl("list_queues", "-p", name, "--no-table-headers", "name", "type")
    types = dict(line.split()[:2] for line in listed.splitlines() if len(line.split()) >= 2)
    assert types["celery"] == "quorum" and types["celery_delayed_0"] == "quorum", types
    assert len([queue for queue in types if queue.startswith("celery_delayed_")]) == 28


def test_an_app_that_never_delays_declares_no_ladder(
        rabbitmq_server: RabbitMQServer, rabbitmq_vhost: str, redis_url: str,
        basic_app_on: Any, start_worker) -> None:
    basic_app_on(rabbitmq_vhost, redis_url)
    start_worker(APP, "-c", "1", env=env_for(rabbitmq_vhost, redis_url))
    assert basic.add.delay(1, 1).get(timeout=15) == 2
    vhost = rabbitmq_vhost.rsplit("/", 1)[1]
    listed = rabbitmq_server.ctl("list_queues", "-p", vhost, "--no-table-headers", "name")
    assert listed.split() == ["celery"], listed
    assert basic.add.apply_async((2, 2), countdown=1).get(timeout=15) == 4
    listed = rabbitmq_server.ctl("list_queues", "-p", vhost, "--no-table-headers", "name")
    assert len(listed.split()) == 29, listed  # the ladder, declared by the first delay
