"""Adaptive polling of the embedded transport (flask_tasks.transport.polling).

In-process: kombu connections to a SQLite file in ``tmp_path``; the
consumer in the threads below is one of this process's threads.
"""

from __future__ import annotations

import threading
import time
import typing as t
from datetime import UTC, datetime, timedelta
from pathlib import Path
from queue import Empty

import kombu
import pytest

from flask_tasks.transport import embedded
from flask_tasks.transport.embedded import url_for_path
from flask_tasks.transport.polling import Backoff, ChangeWatch, Doorbell

QUEUE = kombu.Queue("q")


@pytest.fixture()
def url(tmp_path: Path) -> str:
    return url_for_path(tmp_path / "broker.sqlite")


def publish(conn: kombu.Connection, n: int, **kwargs: t.Any) -> None:
    conn.Producer().publish({"n": n}, routing_key="q", declare=[QUEUE], **kwargs)


class Counted:
    """Wraps a channel's ``_get`` (the claim query) to count the queries."""

    def __init__(self, channel: t.Any) -> None:
        self.calls = 0
        self._get = channel._get
        channel._get = self

    def __call__(self, queue: str, timeout: float | None = None) -> t.Any:
        self.calls += 1
        return self._get(queue, timeout)


def poll_once(channel: t.Any) -> bool:
    """One poll of a consuming channel: True if it delivered a message."""
    try:
        channel.drain_events()
    except Empty:
        return False
    return True


def test_backoff_doubles_to_the_cap_and_starts_over() -> None:
    backoff = Backoff(0.001, 0.05)
    assert [backoff.next() for _ in range(8)] == [
        0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05]
    backoff.reset()
    assert backoff.next() == 0.001
    assert Backoff(0.1, 0.05).next() == 0.05  # the cap wins
    assert [Backoff(0, 0).next() for _ in range(2)] == [0, 0]  # polling_interval 0: no pause
    with pytest.raises(ValueError, match="min_polling_interval"):
        Backoff(0, 0.05)


def test_change_watch() -> None:
    queries: list[int] = []

    def empty() -> None:
        queries.append(1)
        raise Empty()

    watch = ChangeWatch(period=3600)
    with pytest.raises(Empty):
        watch.poll(1, empty)
    assert len(queries) == 1
    with pytest.raises(Empty):  # same token, nothing found last time: no query
        watch.poll(1, empty)
    assert len(queries) == 1
    with pytest.raises(Empty):
        watch.poll(2, empty)  # the token changed
    assert len(queries) == 2
    with pytest.raises(Empty):
        watch.poll(2, empty)  # no query
    assert watch.poll(3, lambda: "message") == "message"
    with pytest.raises(Empty):
        watch.poll(3, empty)  # found one last time: there may be more
    assert len(queries) == 3
    timed = ChangeWatch(period=0.02)
    with pytest.raises(Empty):
        timed.poll(1, empty)
    time.sleep(0.03)
    with pytest.raises(Empty):
        timed.poll(1, empty)  # the period passed: query (an eta may have come)
    assert len(queries) == 5


def test_doorbell_wakes_a_waiter() -> None:
    bell = Doorbell()
    seen = bell.rings
    assert not bell.wait(seen, 0.01)
    threading.Timer(0.05, bell.ring).start()
    start = time.monotonic()
    assert bell.wait(seen, 5.0)
    assert time.monotonic() - start < 2.0
    assert bell.wait(seen, 5.0)  # already rung since `seen`: at once


def test_idle_polls_skip_the_query_until_another_connection_commits(url: str) -> None:
    with kombu.Connection(url) as consumer_conn, kombu.Connection(url) as producer_conn:
        got: list[int] = []
        consumer = consumer_conn.Consumer(QUEUE, callbacks=[lambda body, m: got.append(body["n"])])
        consumer.consume()
        channel = consumer.channel
        claims = Counted(channel)
        assert not poll_once(channel)
        assert claims.calls == 1
        for _ in range(5):  # data_version unchanged: no claim query
            assert not poll_once(channel)
        assert claims.calls == 1
        publish(producer_conn, 1)  # another connection commits
        publish(producer_conn, 2)
        assert poll_once(channel) and got == [1]
        assert poll_once(channel) and got == [1, 2]  # found one: query again at once
        assert not poll_once(channel)
        calls = claims.calls
        assert not poll_once(channel)
        assert claims.calls == calls
        time.sleep(consumer_conn.transport.polling_interval + 0.01)
        assert not poll_once(channel)  # polling_interval passed: a full poll anyway
        assert claims.calls == calls + 1
        consumer.cancel()


def test_a_put_on_the_same_connection_is_seen_at_once(url: str) -> None:
    # A connection's own commits do not change its data_version; the
    # doorbell tells its channels instead.
    with kombu.Connection(url) as conn:
        got: list[int] = []
        consumer = conn.Consumer(QUEUE, callbacks=[lambda body, m: got.append(body["n"])])
        consumer.consume()
        assert not poll_once(consumer.channel)
        assert not poll_once(consumer.channel)
        conn.Producer(channel=consumer.channel).publish(
            {"n": 7}, routing_key="q", declare=[QUEUE])
        assert poll_once(consumer.channel) and got == [7]
        consumer.cancel()


def test_a_due_eta_is_seen_without_any_commit(url: str) -> None:
    options = {"polling_interval": 0.05}
    with kombu.Connection(url, transport_options=options) as conn:
        got: list[float] = []
        consumer = conn.Consumer(QUEUE, callbacks=[lambda body, m: got.append(time.time())])
        consumer.consume()
        eta = datetime.now(UTC) + timedelta(seconds=0.3)
        publish(conn, 1, headers={"eta": eta.isoformat()})
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.1)
            except TimeoutError:
                pass
        assert got, "the delayed message was never delivered"
        assert got[0] >= eta.timestamp()
        consumer.cancel()


def test_back_off_lasts_across_drain_calls_and_resets_on_delivery(url: str) -> None:
    options = {"polling_interval": 0.04, "min_polling_interval": 0.001}
    with kombu.Connection(url, transport_options=options) as conn, \
            kombu.Connection(url) as producer_conn:
        consumer = conn.Consumer(QUEUE, callbacks=[lambda body, m: None])
        consumer.consume()
        backoff = conn.transport.backoff
        for _ in range(20):  # a caller draining with a short timeout in a loop
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.01)
        assert backoff._next == 0.04  # backed off to the cap, not restarted per call
        publish(producer_conn, 1)
        conn.drain_events(timeout=5)
        assert backoff._next == 0.001
        consumer.cancel()


def test_a_warm_consumer_sees_a_message_long_before_polling_interval(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Publishes that do not ring this process's doorbell, as from another
    # process; polling_interval 1 s: only the back-off after a delivery
    # explains a fast second delivery.
    monkeypatch.setattr(embedded.polling.doorbell, "ring", lambda: None)
    got: list[float] = []
    stop = threading.Event()

    def consume() -> None:
        conn = kombu.Connection(url, transport_options={"polling_interval": 1.0})
        with conn, conn.Consumer(QUEUE, callbacks=[lambda body, m: got.append(time.monotonic())]):
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=1.0)
                except TimeoutError:
                    pass

    with kombu.Connection(url) as producer_conn:
        publish(producer_conn, 0)
        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                time.sleep(0.005)
            assert got
            time.sleep(0.01)
            sent = time.monotonic()
            publish(producer_conn, 1)
            while len(got) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(got) == 2
            assert got[1] - sent < 0.5
        finally:
            stop.set()
            thread.join(5)


def test_a_publish_in_this_process_wakes_an_idle_consumer(url: str) -> None:
    # An idle consumer pauses polling_interval (10 s) between polls; the
    # doorbell wakes it when this process publishes. The first drain
    # call's timeout is long too, so only the doorbell can explain it.
    options = {"polling_interval": 10.0}
    got: list[float] = []
    with kombu.Connection(url, transport_options=options) as conn, \
            kombu.Connection(url) as producer_conn:
        conn.transport.backoff = Backoff(10.0, 10.0)  # idle for long already

        def on_message(body: t.Any, message: kombu.Message) -> None:
            got.append(time.monotonic())

        with conn.Consumer(QUEUE, callbacks=[on_message]):
            thread = threading.Thread(target=lambda: conn.drain_events(timeout=30), daemon=True)
            thread.start()
            time.sleep(0.2)  # the consumer polled once and sleeps
            sent = time.monotonic()
            publish(producer_conn, 1)
            thread.join(20)
        assert got and got[0] - sent < 2.0
