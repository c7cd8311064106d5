"""The Redis transport's boundary: malformed entries set aside, wake-ups that pop nothing.

Against a real redis-server, without a worker: what the channel hands kombu,
what it moves to the dead letters, and how an idle channel waits.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Message, Producer, Queue

from flask_tasks.transport.base import worker_channel
from flask_tasks.transport.connect import broker_connection
from flask_tasks.transport.dead_letters import decode_record

QUEUE = Queue("q", routing_key="q")
DEAD = "q\x06\x16dead"


@pytest.fixture()
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture()
def connect(redis_url: str) -> Iterator[Any]:
    made: list[Connection] = []

    def make(url: str = redis_url, **options: Any) -> Connection:
        conn = broker_connection(url, options)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.release()


def publish(conn: Connection, count: int, start: int = 0) -> None:
    producer = Producer(conn.default_channel)
    for n in range(start, start + count):
        producer.publish({"n": n}, exchange="", routing_key="q", declare=[QUEUE],
                         serializer="json")


def consume(conn: Connection, want: int, timeout: float = 3.0) -> list[Message]:
    got: list[Message] = []
    channel = conn.default_channel
    channel.basic_qos(0, 100, False)

    def on_message(message: Message) -> None:
        got.append(message)
        message.ack()

    deadline = time.monotonic() + timeout
    with Consumer(channel, queues=[QUEUE], on_message=on_message, accept=["json"]):
        while len(got) < want and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
    channel.flush_acks(0.0)
    return got


def envelope(**changes: Any) -> dict[str, Any]:
    body = base64.b64encode(json.dumps({"n": -1}).encode()).decode()
    properties = {"delivery_tag": str(uuid.uuid4()), "body_encoding": "base64",
                  "delivery_info": {"exchange": "", "routing_key": "q"}, "priority": 0}
    base: dict[str, Any] = {"body": body, "content-encoding": "utf-8",
                            "content-type": "application/json", "headers": {},
                            "properties": properties}
    for key, value in changes.items():
        if key.startswith("p_"):
            properties[key[2:]] = value
        else:
            base[key] = value
    return base


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


#: (entry, words the reason must contain)
MALFORMED: list[tuple[bytes, str]] = [
    (bytes(range(256)), "JSON"),
    (b"plain text", "JSON"),
    (json.dumps(envelope())[:40].encode(), "JSON"),
    (b"123", "properties"),
    (b"null", "properties"),
    (b'"text"', "properties"),
    (b"[]", "properties"),
    (deep(5000), "JSON"),
    (b'{"properties": ' + deep(500) + b', "x": 1}', "properties"),
    (json.dumps({"body": "x"}).encode(), "properties"),
    (json.dumps(envelope(properties=[1, 2])).encode(), "properties"),
    (json.dumps(envelope(p_delivery_tag=None)).encode(), "delivery_tag"),
    (json.dumps(envelope(p_delivery_tag=12)).encode(), "delivery_tag"),
    (json.dumps(envelope(p_delivery_tag={"a": 1})).encode(), "delivery_tag"),
    (json.dumps(envelope(p_delivery_tag="x" * 1000)).encode(), "delivery_tag"),
    (json.dumps(envelope(p_delivery_info="celery")).encode(), "delivery_info"),
    (json.dumps(envelope(body=12)).encode(), "body"),
    (json.dumps(envelope(body="!!not base64!!")).encode(), "base64"),
    (json.dumps(envelope(p_body_encoding="rot13")).encode(), "body_encoding"),
    (json.dumps(envelope(headers=[1])).encode(), "headers"),
    (json.dumps(envelope(headers={"x": json.loads(deep(150))})).encode(), "nests"),
    ("{\"properties\": {\"delivery_tag\": \"é\xff\"}}".encode("latin-1"), "UTF-8"),
]


def test_malformed_entries_are_set_aside_and_valid_ones_delivered(
        connect: Any, client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    conn = connect()
    publish(conn, 3)
    for raw, _ in MALFORMED:
        client.lpush("q", raw)
    publish(conn, 3, start=3)
    with caplog.at_level(logging.ERROR, logger="flask_tasks.transport.redis"):
        got = consume(conn, want=6)
    assert sorted(m.payload["n"] for m in got) == list(range(6))
    assert client.llen("q") == 0
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    letters = [decode_record(r) for r in client.lrange(DEAD, 0, -1)]
    assert len(letters) == len(MALFORMED)
    by_entry = {letter.entry: letter for letter in letters}
    for raw, words in MALFORMED:
        letter = by_entry[raw]  # byte for byte
        assert words in letter.reason, (raw[:60], letter.reason)
        assert letter.queue == "q" and letter.time > 0
    assert worker_channel(conn.default_channel).dead_lettered == len(MALFORMED)
    logged = [r for r in caplog.records if "dead letter" in r.getMessage()]
    assert len(logged) == len(MALFORMED)  # once each


def test_oversize_entries_are_set_aside(connect: Any, client: redis.Redis) -> None:
    conn = connect(max_message_size=2000)
    client.lpush("q", json.dumps(envelope(body="A" * 4000)).encode())
    publish(conn, 1)
    assert [m.payload["n"] for m in consume(conn, want=1)] == [0]
    (record,) = client.lrange(DEAD, 0, -1)
    assert "larger than the limit of 2000 bytes" in decode_record(record).reason


def test_the_store(connect: Any, client: redis.Redis) -> None:
    conn = connect(dead_letter_max_entries=5)
    store = worker_channel(conn.default_channel).dead_letters
    assert store is not None
    for n in range(7):
        store.add("q", f"entry {n}".encode(), f"reason {n}", hostname="w1")
    store.add("other", b"x", "elsewhere")
    assert store.count("q") == 5 and store.count() == 6  # the entry limit holds
    newest = store.list("q", limit=2)
    assert [letter.entry for letter in newest] == [b"entry 6", b"entry 5"]
    assert newest[0].hostname == "w1" and newest[0].reason == "reason 6"
    assert store.get(newest[1].id) == newest[1]
    assert store.get("nope") is None

    valid = json.dumps(envelope()).encode()
    store.add("q", valid, "unknown task at the time")
    letter = store.list("q", limit=1)[0]
    assert store.requeue(letter.id) == letter
    assert store.requeue(letter.id) is None  # gone
    assert client.lrange("q", 0, -1) == [valid]  # published again

    assert store.trim(max_entries=2, max_age=None) == 2  # 4 -> 2 ("other" has 1)
    assert store.count("q") == 2
    old = store.list("q")[-1]
    client.lset(DEAD, -1, json.dumps({**old.as_dict(), "time": 1.0, "entry": None}).encode()
                + b"\n" + old.entry)
    assert store.trim(max_entries=None, max_age=3600) == 1
    assert store.purge("q") == 1 and store.count("q") == 0
    assert store.purge() == 1 and store.count() == 0


def test_an_idle_channel_pops_nothing_before_it_records(connect: Any,
                                                         client: redis.Redis) -> None:
    """What a paused worker would hold: nothing. The message waits in the list."""
    idle = connect()
    channel = idle.default_channel
    channel.basic_qos(0, 10, False)
    consumer = Consumer(channel, queues=[QUEUE], accept=["json"], on_message=lambda m: None)
    consumer.consume()
    with pytest.raises(TimeoutError):
        idle.drain_events(timeout=0.3)  # now waiting, as a worker with nothing to do
    assert channel.wake.armed
    publish(connect(), 1)
    time.sleep(0.2)  # the "paused" consumer reads nothing; the message stays in Redis
    assert client.llen("q") == 1 and client.hlen("unacked") == 0
    # Another consumer takes it.
    assert [m.payload["n"] for m in consume(connect(), want=1)] == [0]


def test_a_waiting_channel_wakes_at_once(connect: Any) -> None:
    conn = connect()
    channel = conn.default_channel
    got: list[float] = []
    consumer = Consumer(channel, queues=[QUEUE], accept=["json"],
                        on_message=lambda m: (got.append(time.monotonic()), m.ack()))
    consumer.consume()
    with pytest.raises(TimeoutError):
        conn.drain_events(timeout=0.3)
    sent = time.monotonic()
    publish(connect(), 1)
    conn.drain_events(timeout=2)
    assert got and got[0] - sent < 0.5


def test_writes_to_other_keys_under_the_prefix_do_not_reserve(
        connect: Any, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = connect()
    channel = conn.default_channel
    consumer = Consumer(channel, queues=[QUEUE], accept=["json"], on_message=lambda m: None)
    consumer.consume()
    with pytest.raises(TimeoutError):
        conn.drain_events(timeout=0.3)
    calls: list[int] = []
    original = type(channel).reserve_now
    monkeypatch.setattr(type(channel), "reserve_now",
                        lambda self: calls.append(1) or original(self))
    for n in range(200):
        client.set(f"q-task-meta-{n}", "x")  # under the prefix "q", not a queue list
    with pytest.raises(TimeoutError):
        conn.drain_events(timeout=0.5)
    assert len(calls) <= 1  # the periodic check at most, not one per write


def test_a_server_refusing_tracking_falls_back_to_brpop(
        connect: Any, client: redis.Redis, redis_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    client.execute_command("ACL", "SETUSER", "limited", "on", ">secret", "~*", "&*",
                           "+@all", "-client|tracking")
    try:
        host = redis_url.split("://", 1)[1]
        conn = connect(f"redis://limited:secret@{host}")
        with caplog.at_level(logging.WARNING, logger="flask_tasks.transport.redis"):
            publish(connect(), 2)
            assert len(consume(conn, want=2)) == 2
            publish(connect(), 1, start=2)  # arrives while it waits with BRPOP
            assert [m.payload["n"] for m in consume(conn, want=1)] == [2]
        assert "refuses CLIENT TRACKING" in caplog.text
        assert conn.default_channel.wake.available is False
    finally:
        client.execute_command("ACL", "DELUSER", "limited")


def test_a_notification_read_after_disarming_is_not_taken_for_a_brpop_reply(
        connect: Any) -> None:
    """A notification sent before the last disarm took effect arrives on the subscribed
    connection while the channel is busy; kombu's poller hands it to the read handler."""
    from queue import Empty

    conn = connect()
    channel = conn.default_channel
    consumer = Consumer(channel, queues=[QUEUE], accept=["json"], on_message=lambda m: None)
    consumer.consume()
    with pytest.raises(TimeoutError):
        conn.drain_events(timeout=0.3)  # armed, waiting
    publish(connect(), 1)  # its notification is now in the subscribed connection
    time.sleep(0.1)
    channel.wake.armed = False  # as if disarmed after the notification was sent
    with pytest.raises(Empty):
        channel._brpop_read()  # read and ignored, never parsed as a BRPOP reply
    assert [m.payload["n"] for m in consume(connect(), want=1)] == [0]  # still in the queue
