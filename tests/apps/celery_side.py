"""A plain Celery app for the interoperability tests (test-only: celery is a test extra).

It defines tasks with the same names as ``tests.apps.basic`` so a real Celery
worker can run what flask_tasks publishes. Broker and backend: ``TEST_BROKER_URL``
(the backend ``TEST_RESULT_BACKEND`` when set, e.g. ``rpc://``).
"""

from __future__ import annotations

import os

from celery import Celery

url = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("celery_side", broker=url, backend=os.environ.get("TEST_RESULT_BACKEND") or url)
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task(name="tests.apps.basic.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tests.apps.basic.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="tests.apps.basic.mul")
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="tests.apps.basic.xsum")
def xsum(numbers: list[int]) -> int:
    return sum(numbers)


@app.task(name="tests.apps.basic.sleep")
def sleep(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds
