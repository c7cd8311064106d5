"""The app the benchmarks run: one no-op task.

Broker and backend: ``BENCH_REDIS_URL``, or, when ``BENCH_EMBEDDED_DIR`` is
set, the embedded default (SQLite files in that folder). ``BENCH_BROKER_URL``
(e.g. RabbitMQ) overrides the broker only; results stay where they were.
``BENCH_CONFIRM_PUBLISH=0`` turns RabbitMQ's publisher confirms off (Celery's default;
``bench.celery_app`` turns them on with ``1``).
"""

from __future__ import annotations

import json
import os
import time

from flask import Flask

from flask_tasks import Tasks

tasks = Tasks()


@tasks.task(name="bench.noop")
def noop() -> None:
    return None


@tasks.task(name="bench.stamp")
def stamp(key: str, due: float) -> float:
    """Append ``{"due", "ran", "pid"}`` to the Redis list ``key`` of ``BENCH_REDIS_URL``."""
    import redis

    ran = time.time()
    client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    client.rpush(key, json.dumps({"due": due, "ran": ran, "pid": os.getpid()}))
    return ran


def create_app() -> Flask:
    app = Flask(__name__)
    embedded_dir = os.environ.get("BENCH_EMBEDDED_DIR")
    if embedded_dir:
        app.config.update(TASKS_EMBEDDED_DIR=embedded_dir)
    else:
        url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
        app.config.update(BROKER_URL=url, RESULT_BACKEND=url)
    if os.environ.get("BENCH_BROKER_URL"):
        app.config.update(BROKER_URL=os.environ["BENCH_BROKER_URL"])
    if os.environ.get("BENCH_CONFIRM_PUBLISH") == "0":  # RabbitMQ: as Celery's default
        app.config.update(TASKS_BROKER_TRANSPORT_OPTIONS={"confirm_publish": False})
    tasks.init_app(app)
    return app
