"""flask_tasks' Redis transport against a real redis-server, without a worker.

Reservation pops and records atomically and avoids ``BRPOP`` while messages
remain; a lost connection's messages are settled by delivery tag from a new one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Message, Producer, Queue
from kombu.transport import redis as kombu_redis

from flask_tasks.transport.base import Detached
from flask_tasks.transport.connect import broker_connection

QUEUE = Queue("q", routing_key="q")


@pytest.fixture()
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture()
def connections(redis_url: str) -> Iterator[Any]:
    """Make connections through flask_tasks' transport; all closed at the end."""
    made: list[Connection] = []

    def make() -> Connection:
        conn = broker_connection(redis_url)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.release()


def publish(conn: Connection, count: int) -> None:
    producer = Producer(conn.channel())
    for number in range(count):
        producer.publish({"n": number}, routing_key="q", declare=[QUEUE], serializer="json")


def consume(conn: Connection, prefetch: int, want: int, ack: bool) -> list[Message]:
    """Drain until ``want`` messages arrived (acking each if ``ack``)."""
    got: list[Message] = []

    def on_message(body: Any, message: Message) -> None:
        got.append(message)
        if ack:
            message.ack()

    channel = conn.default_channel
    channel.basic_qos(0, prefetch, False)
    with Consumer(channel, queues=[QUEUE], callbacks=[on_message], accept=["json"]):
        while len(got) < want:
            try:
                conn.drain_events(timeout=2)
            except TimeoutError:
                break
    return got


def test_reservation_records_every_message_it_pops(connections, client: redis.Redis) -> None:
    conn = connections()
    publish(conn, 5)
    got = consume(conn, prefetch=10, want=5, ack=False)
    assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4]  # in order
    assert client.llen("q") == 0
    assert client.hlen("unacked") == 5 and client.zcard("unacked_index") == 5
    for message in got:
        message.ack()
    conn.default_channel.flush_acks(0.0)
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_nothing_leaves_a_list_but_through_the_recording_script(
        connections, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = connections()
    publish(conn, 20)
    channel = conn.default_channel
    waits, brpops = [], []
    original = type(channel)._brpop_start

    def counted(self: Any, timeout: float | None = None) -> None:
        waits.append(client.llen("q"))  # queue length when the channel starts waiting
        original(self, timeout)

    monkeypatch.setattr(type(channel), "_brpop_start", counted)
    monkeypatch.setattr(kombu_redis.Channel, "_brpop_start",
                        lambda self, timeout=None: brpops.append(timeout))
    got = consume(conn, prefetch=4, want=20, ack=True)
    assert len(got) == 20
    # It waits only once the queues were found empty, and never with BRPOP
    # (which pops a message before this process has it): it is woken by a
    # notification and reserves with the pop-and-record script.
    assert all(length == 0 for length in waits), waits
    assert brpops == []


def test_detached_messages_are_not_restored_and_are_settled_by_tag(
        connections, client: redis.Redis) -> None:
    lost = connections()
    publish(lost, 3)
    first, second, third = consume(lost, prefetch=10, want=3, ack=False)
    first.ack()  # buffered: not yet sent when the connection is "lost"
    detached = lost.default_channel.detach()
    assert detached.acks == [first.delivery_tag]
    lost.release()  # closing restores nothing: the worker still holds them
    assert client.llen("q") == 0 and client.hlen("unacked") == 3

    detached.acks.append(second.delivery_tag)  # finished while disconnected
    detached.requeue.append(third.delivery_tag)  # never started: back to the queue
    connections().default_channel.settle_detached(detached)
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    assert client.llen("q") == 1
    again = consume(connections(), prefetch=10, want=1, ack=True)
    assert [m.payload["n"] for m in again] == [third.payload["n"]]


def test_unrecorded_message_goes_back_once(connections, client: redis.Redis) -> None:
    conn = connections()
    publish(conn, 1)
    raw = client.rpop("q")
    assert raw is not None
    # The lost reservation may have recorded it after all: simulate that record.
    tag = json.loads(raw)["properties"]["delivery_tag"]
    client.hset("unacked", tag, b"[]")
    client.zadd("unacked_index", {tag: 1})
    conn.default_channel.settle_detached(Detached(unrecorded=[(b"q", raw)]))
    assert client.lrange("q", 0, -1) == [raw]
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
