"""Tests for the SQLite-backed ``embedded://`` kombu transport.

Several tests start real processes (``subprocess`` and ``fork``) that
share one database file, and kill them with ``SIGKILL``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import typing as t
from pathlib import Path

import kombu
import pytest

from flask_tasks.transport.embedded import path_from_url, url_for_path

ROOT = Path(__file__).resolve().parents[2]
QUEUE = kombu.Queue("q")

# A consumer that takes messages from "q" without acking them, reports
# each on stdout, and keeps polling (which renews its leases) forever.
HOLDER = """
import socket, sys, kombu, flask_tasks.transport.embedded
conn = kombu.Connection(sys.argv[1], transport_options={"visibility_timeout": float(sys.argv[2])})
def on_message(body, message):
    print("got", body["n"], flush=True)
with conn.Consumer(kombu.Queue("q"), callbacks=[on_message], prefetch_count=1):
    while True:
        try:
            conn.drain_events(timeout=0.05)
        except TimeoutError:
            pass
"""

# A consumer that acks everything from "q" until the stop file appears,
# then prints the message numbers it saw as JSON.
WORKER = """
import json, os, socket, sys, kombu, flask_tasks.transport.embedded
conn = kombu.Connection(sys.argv[1])
seen = []
def on_message(body, message):
    seen.append(body["n"])
    message.ack()
with conn.Consumer(kombu.Queue("q"), callbacks=[on_message], prefetch_count=1):
    print("ready", flush=True)
    while not os.path.exists(sys.argv[2]):
        try:
            conn.drain_events(timeout=0.05)
        except TimeoutError:
            pass
print(json.dumps(seen), flush=True)
"""


def spawn(script: str, *args: str) -> subprocess.Popen[str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_until(condition: t.Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])


def publish(conn: kombu.Connection, *numbers: int, **kwargs: t.Any) -> None:
    producer = conn.Producer()
    for n in numbers:
        producer.publish({"n": n}, routing_key="q", declare=[QUEUE], **kwargs)


def consume(
    conn: kombu.Connection,
    count: int = 1,
    timeout: float = 5.0,
    ack: bool = False,
    prefetch: int | None = None,
) -> list[kombu.Message]:
    """Drain up to ``count`` messages from "q", or fewer before ``timeout``."""
    got: list[kombu.Message] = []

    def on_message(body: t.Any, message: kombu.Message) -> None:
        got.append(message)
        if ack:
            message.ack()

    deadline = time.monotonic() + timeout
    with conn.Consumer(QUEUE, callbacks=[on_message], prefetch_count=prefetch):
        while len(got) < count and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.05)
            except TimeoutError:
                pass
    return got


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "broker.sqlite"


@pytest.fixture()
def url(db: Path) -> str:
    return url_for_path(db)


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert path_from_url("embedded:////tmp/x.sqlite") == "/tmp/x.sqlite"
    assert url_for_path("/tmp/x.sqlite") == "embedded:////tmp/x.sqlite"
    weird = tmp_path / "a dir" / "b%c.sqlite"
    assert path_from_url(url_for_path(weird)) == str(weird)
    monkeypatch.chdir(tmp_path)
    assert path_from_url("embedded:///rel.sqlite") == str(tmp_path / "rel.sqlite")
    for bad in ("embedded://host/x.sqlite", "embedded://", "embedded:///"):
        with pytest.raises(ValueError):
            path_from_url(bad)
    with kombu.Connection("embedded:////" + str(tmp_path / "d" / "b.sqlite").lstrip("/")) as conn:
        assert conn.transport.path == str(tmp_path / "d" / "b.sqlite")
        assert conn.transport.polling_interval == 0.05
        assert not conn.transport.implements.exchange_type & {"fanout"}
        publish(conn, 1)
    assert (tmp_path / "d" / "b.sqlite").exists()  # parent directory created


def test_publish_consume_ack_deletes_row(url: str, db: Path) -> None:
    with kombu.Connection(url) as conn:
        publish(conn, 1, 2)
        assert rows(db) == 2
        messages = consume(conn, 2)
        assert [m.payload["n"] for m in messages] == [1, 2]
        assert rows(db) == 2  # delivered but unacked rows stay
        for m in messages:
            m.ack()
        assert rows(db) == 0
        assert not messages[0].delivery_info["redelivered"]


def test_reject_and_requeue(url: str, db: Path) -> None:
    with kombu.Connection(url) as conn:
        publish(conn, 1)
        (first,) = consume(conn)
        first.reject(requeue=True)
        (second,) = consume(conn, timeout=1)
        assert second.payload["n"] == 1
        assert second.delivery_info["redelivered"]
        second.requeue()
        (third,) = consume(conn, timeout=1)
        third.reject(requeue=False)
        assert rows(db) == 0
        assert consume(conn, timeout=0.2) == []


def test_close_without_ack_redelivers_at_once(url: str) -> None:
    with kombu.Connection(url) as conn:
        publish(conn, 7)
        assert len(consume(conn)) == 1  # not acked
    with kombu.Connection(url) as conn:  # visibility_timeout is 30 s
        (message,) = consume(conn, timeout=2)
        assert message.payload["n"] == 7
        message.ack()


def test_held_message_is_not_delivered_twice(url: str) -> None:
    options = {"visibility_timeout": 30}
    with kombu.Connection(url, transport_options=options) as a, kombu.Connection(url) as b:
        publish(a, 1, 2)
        assert [m.payload["n"] for m in consume(a, 1, prefetch=1)] == [1]
        assert [m.payload["n"] for m in consume(b, 2, timeout=0.5)] == [2]


def test_no_ack_consumer_removes_rows(url: str, db: Path) -> None:
    with kombu.Connection(url) as conn:
        publish(conn, 1, 2)
        got: list[int] = []
        with conn.Consumer(QUEUE, callbacks=[lambda body, m: got.append(body["n"])], no_ack=True):
            wait_until(lambda: _drain_once(conn) or len(got) == 2, timeout=5)
        assert got == [1, 2]
        assert rows(db) == 0
        channel = conn.channel()
        publish(conn, 3)
        assert channel.basic_get("q", no_ack=True).payload["n"] == 3
        assert rows(db) == 0


def _drain_once(conn: kombu.Connection) -> bool:
    try:
        conn.drain_events(timeout=0.05)
    except TimeoutError:
        pass
    return False


def test_prefetch_and_priority(url: str) -> None:
    with kombu.Connection(url) as conn:
        publish(conn, 1, priority=1)
        publish(conn, 2, priority=5)
        publish(conn, 3, priority=1)
        held = consume(conn, 3, timeout=0.5, prefetch=1)
        assert [m.payload["n"] for m in held] == [2]  # highest priority first, one at a time
        held[0].ack()
        assert [m.payload["n"] for m in consume(conn, 2, ack=True)] == [1, 3]


def test_named_direct_exchange(url: str) -> None:
    exchange = kombu.Exchange("tasks", "direct")
    queue = kombu.Queue("q", exchange, routing_key="rk")
    with kombu.Connection(url) as producer_conn, kombu.Connection(url) as consumer_conn:
        producer = producer_conn.Producer()
        producer.publish({"n": 5}, exchange=exchange, routing_key="rk", declare=[queue])
        (message,) = consume(consumer_conn, ack=True)
        assert message.payload["n"] == 5
        assert message.delivery_info["exchange"] == "tasks"


def test_lease_renewal_keeps_slow_message(url: str) -> None:
    options = {"visibility_timeout": 0.5}
    with kombu.Connection(url, transport_options=options) as a, kombu.Connection(url) as b:
        publish(a, 1)
        held = []
        consumer = a.Consumer(QUEUE, callbacks=[lambda body, m: held.append(m)], prefetch_count=1)
        consumer.consume()
        wait_until(lambda: _drain_once(a) or bool(held))
        # "a" keeps polling (renewing) for 3 x visibility_timeout; "b" gets nothing.
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            _drain_once(a)
            assert consume(b, timeout=0.05) == []
        # The public method renews too, without polling.
        channel = held[0].channel
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            assert channel.renew_leases() == 1
            assert consume(b, timeout=0.05) == []
        held[0].ack()
        assert channel.renew_leases() == 0


def test_lease_expires_when_holder_is_killed(url: str) -> None:
    with kombu.Connection(url) as conn:
        publish(conn, 42)
        holder = spawn(HOLDER, url, "0.5")
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().split() == ["got", "42"]
            # While the holder lives it renews its lease: nobody else gets it.
            assert consume(conn, timeout=1.5) == []
        finally:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
        killed = time.monotonic()
        (message,) = consume(conn, timeout=5)
        assert message.payload["n"] == 42
        assert message.delivery_info["redelivered"]
        assert time.monotonic() - killed < 2
        message.ack()


def test_processes_share_messages_exactly_once(url: str, db: Path, tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    workers = [spawn(WORKER, url, str(stop)) for _ in range(3)]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        with kombu.Connection(url) as conn:
            publish(conn, *range(500))
        wait_until(lambda: rows(db) == 0, timeout=15)
    finally:
        stop.touch()
    seen: list[int] = []
    busy = 0
    for worker in workers:
        out, _ = worker.communicate(timeout=10)
        mine = json.loads(out.strip().splitlines()[-1])
        busy += bool(mine)
        seen.extend(mine)
    assert busy >= 2, "the messages should have been shared between processes"
    assert len(seen) == 500
    assert sorted(seen) == list(range(500))


def _publish_in_child(url: str) -> None:
    with kombu.Connection(url) as conn:
        publish(conn, 2)


def _publish_with_inherited(conn: kombu.Connection) -> None:
    publish(conn, 3)
    conn.release()


def test_fork_safety(url: str) -> None:
    ctx = multiprocessing.get_context("fork")
    with kombu.Connection(url) as conn:
        publish(conn, 1)  # opens the sqlite connection in the parent
        for target, arg in ((_publish_in_child, url), (_publish_with_inherited, conn)):
            child = ctx.Process(target=target, args=(arg,))
            child.start()
            child.join(10)
            assert child.exitcode == 0
        publish(conn, 4)  # the parent's connection still works
        got = consume(conn, 4, ack=True)
        assert sorted(m.payload["n"] for m in got) == [1, 2, 3, 4]


def test_file_does_not_grow_under_steady_load(url: str, db: Path) -> None:
    options = {"housekeeping_interval": 0.05}

    def size() -> int:  # the database and its write-ahead log (not the fixed 32 KiB -shm)
        return sum(p.stat().st_size for p in db.parent.glob("broker.sqlite*")
                   if not p.name.endswith("-shm"))

    with kombu.Connection(url, transport_options=options) as conn:
        producer = conn.Producer()
        for _ in range(5):  # each round moves ~450 KB of messages through the file
            for n in range(200):
                producer.publish({"n": n, "pad": "x" * 2000}, routing_key="q", declare=[QUEUE])
            assert size() > 256 * 1024
            assert len(consume(conn, 200, ack=True)) == 200
            assert rows(db) == 0
            # Polling runs housekeeping: free pages are vacuumed, the WAL truncated.
            wait_until(lambda: _drain_once(conn) or size() < 64 * 1024, timeout=5)
