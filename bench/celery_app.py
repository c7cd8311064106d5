"""The same no-op task for a real Celery worker (only for `throughput.py --compare celery`).

Broker and backend: ``BENCH_REDIS_URL``; ``BENCH_BROKER_URL`` (e.g. RabbitMQ)
overrides the broker only, results stay in Redis (as in ``bench.benchapp``).
``BENCH_CONFIRM_PUBLISH=1`` turns RabbitMQ's publisher confirms on (flask_tasks'
default; Celery's is off).
"""

from __future__ import annotations

import os

from celery import Celery

url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("bench", broker=os.environ.get("BENCH_BROKER_URL") or url, backend=url)
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
if os.environ.get("BENCH_CONFIRM_PUBLISH") == "1":
    app.conf.broker_transport_options = {"confirm_publish": True}


@app.task(name="bench.noop")
def noop() -> None:
    return None
