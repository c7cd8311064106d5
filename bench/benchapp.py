"""The app the benchmarks run: one no-op task.

Broker and backend: ``BENCH_REDIS_URL``, or, when ``BENCH_EMBEDDED_DIR`` is
set, the embedded default (SQLite files in that folder).
"""

from __future__ import annotations

import os

from flask import Flask

from flask_tasks import Tasks

tasks = Tasks()


@tasks.task(name="bench.noop")
def noop() -> None:
    return None


def create_app() -> Flask:
    app = Flask(__name__)
    embedded_dir = os.environ.get("BENCH_EMBEDDED_DIR")
    if embedded_dir:
        app.config.update(TASKS_EMBEDDED_DIR=embedded_dir)
    else:
        url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
        app.config.update(BROKER_URL=url, RESULT_BACKEND=url)
    tasks.init_app(app)
    return app
