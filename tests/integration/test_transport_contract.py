"""The transport contract against flask_tasks' Redis transport (a real redis-server) and
the embedded transport (a temporary SQLite file)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from flask_tasks.transport.embedded import url_for_path
from tests.contract import transport_contract
from tests.contract.transport_contract import QUEUE, VISIBILITY, Broker, Taker


def lose_redis_consumer(taker: Taker) -> None:
    # A killed process: its connection is gone and nothing was restored;
    # what it held stays in Redis's unacked bookkeeping.
    taker.worker.detach()
    taker.connection.release()


def lose_embedded_consumer(taker: Taker) -> None:
    # A killed process: it no longer polls, so its leases are not renewed.
    return None


@pytest.fixture()
def redis_broker(redis_url: str) -> Iterator[Broker]:
    client = redis.Redis.from_url(redis_url)
    broker = Broker(redis_url, {"visibility_timeout": VISIBILITY, "unacked_restore_throttle": 1},
                    first_priority=0, lose=lose_redis_consumer, settles_by_tag=True,
                    holds_leases=False, push_raw=lambda raw: client.lpush(QUEUE, raw) and None)
    yield broker
    broker.close()


@pytest.fixture()
def embedded_broker(tmp_path: Path) -> Iterator[Broker]:
    path = tmp_path / "broker.sqlite"

    def push_raw(raw: bytes) -> None:
        broker.connect().default_channel._db()  # creates the file and its tables
        with sqlite3.connect(path) as db:
            db.execute("INSERT INTO messages (queue, priority, payload) VALUES (?, 0, ?)",
                       (QUEUE, raw))

    broker = Broker(url_for_path(path), {"visibility_timeout": VISIBILITY},
                    first_priority=9, lose=lose_embedded_consumer, settles_by_tag=False,
                    holds_leases=True, push_raw=push_raw)
    yield broker
    broker.close()


@pytest.mark.parametrize("case", transport_contract.CASES, ids=lambda c: c.__name__)
def test_redis_transport(redis_broker: Broker, case: Callable[[Broker], None]) -> None:
    case(redis_broker)


@pytest.mark.parametrize("case", transport_contract.CASES, ids=lambda c: c.__name__)
def test_embedded_transport(embedded_broker: Broker, case: Callable[[Broker], None]) -> None:
    case(embedded_broker)
