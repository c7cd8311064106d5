"""The same no-op task for Dramatiq (only for `throughput.py --compare dramatiq`):
Redis broker, results stored in Redis, run as `dramatiq bench.dramatiq_app -p 2 -t 8`."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
broker = RedisBroker(url=url)
backend = RedisBackend(url=url)
broker.add_middleware(Results(backend=backend))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, queue_name="default")
def noop() -> None:
    return None
