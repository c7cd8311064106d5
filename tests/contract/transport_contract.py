"""The transport contract: what a worker relies on from a broker transport.

Each case takes a :class:`Broker` (a fresh, empty broker of one kind) and
asserts one promise: kombu's (publish, consume, ack, reject, requeue,
redelivery of what a lost consumer held, priorities) and the worker-facing
:class:`~flask_tasks.transport.base.WorkerChannel` methods, with the
semantics their docstrings give. ``tests/integration/test_transport_contract.py``
runs every case against flask_tasks' Redis and embedded transports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu import Connection, Consumer, Message, Producer, Queue

from flask_tasks.transport.base import Detached, WorkerChannel, worker_channel
from flask_tasks.transport.connect import broker_connection

QUEUE = "contract"
#: The visibility timeout / lease time the brokers under test are given, seconds.
VISIBILITY = 1.5


@dataclass
class Broker:
    """A broker under test.

    :param url: its URL.
    :param options: transport options (a short visibility timeout).
    :param first_priority: the priority delivered first (Redis: 0, as kombu and
        Celery; embedded: 9, as AMQP).
    :param lose: makes a consumer vanish as a killed process would: what it
        holds stays held until the broker gives it to someone else.
    :param settles_by_tag: its channels settle a lost connection's messages by tag.
    :param holds_leases: its channels hold leases that must be renewed.
    :param push_raw: puts a raw entry into :data:`QUEUE` behind kombu's back (as
        a buggy producer or someone with broker access would).
    """

    url: str
    options: dict[str, Any]
    first_priority: int
    lose: Callable[[Taker], None]
    settles_by_tag: bool
    holds_leases: bool
    push_raw: Callable[[bytes], None]
    connections: list[Connection] = field(default_factory=list)

    def connect(self) -> Connection:
        connection = broker_connection(self.url, self.options)
        self.connections.append(connection)
        return connection

    def close(self) -> None:
        for connection in self.connections:
            connection.release()


class Taker:
    """Consumes :data:`QUEUE` on a connection of its own, keeping what arrives unsettled."""

    def __init__(self, broker: Broker, prefetch: int = 10) -> None:
        self.connection = broker.connect()
        self.channel = self.connection.default_channel
        self.channel.basic_qos(0, prefetch, False)
        self.got: list[Message] = []
        self.consumer = Consumer(self.channel, queues=[Queue(QUEUE)], accept=["json"],
                                 on_message=self.got.append)
        self.consumer.consume()

    @property
    def worker(self) -> WorkerChannel:
        return worker_channel(self.channel)

    def take(self, want: int, timeout: float = 5.0) -> list[Message]:
        """Drain until ``want`` more messages came (or ``timeout`` seconds); return the new ones."""
        start, deadline = len(self.got), time.monotonic() + timeout
        while len(self.got) - start < want and time.monotonic() < deadline:
            try:
                self.connection.drain_events(timeout=0.05)
            except TimeoutError:
                pass
        return self.got[start:]

    def nothing_for(self, seconds: float) -> bool:
        """Nothing arrives for ``seconds``."""
        return not self.take(1, timeout=seconds)


def publish(broker: Broker, *bodies: Any, **options: Any) -> None:
    connection = broker.connect()
    producer = Producer(connection.default_channel)
    for body in bodies:
        producer.publish(body, routing_key=QUEUE, declare=[Queue(QUEUE)], serializer="json",
                         **options)


def eta_in(seconds: float) -> dict[str, str]:
    return {"eta": (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()}


def sleep_until_due(headers: dict[str, str]) -> None:
    due = datetime.fromisoformat(headers["eta"]).timestamp()
    time.sleep(max(0.0, due - time.time()) + 0.05)


def bodies(messages: list[Message]) -> list[Any]:
    return [message.payload for message in messages]


# -- kombu's promises -----------------------------------------------------------------
def consumes_in_order(broker: Broker) -> None:
    publish(broker, 0, 1, 2)
    assert bodies(Taker(broker).take(3)) == [0, 1, 2]


def acked_is_gone(broker: Broker) -> None:
    publish(broker, "a")
    taker = Taker(broker)
    [message] = taker.take(1)
    message.ack()
    taker.worker.flush_acks(0.0)
    taker.connection.release()
    assert Taker(broker).nothing_for(0.3)


def reject_drops(broker: Broker) -> None:
    publish(broker, "a", "b")
    taker = Taker(broker, prefetch=1)
    [first] = taker.take(1)
    first.reject(requeue=False)
    assert bodies(taker.take(1)) == ["b"]
    assert taker.nothing_for(0.3)


def reject_with_requeue_delivers_again(broker: Broker) -> None:
    publish(broker, "a")
    taker = Taker(broker)
    [message] = taker.take(1)
    message.reject(requeue=True)
    assert bodies(taker.take(1)) == ["a"]


def a_clean_close_gives_back_what_was_held(broker: Broker) -> None:
    publish(broker, "a", "b")
    taker = Taker(broker)
    assert len(taker.take(2)) == 2
    taker.connection.release()
    assert sorted(bodies(Taker(broker).take(2, timeout=2))) == ["a", "b"]


def a_lost_consumers_messages_come_back_after_the_visibility_timeout(broker: Broker) -> None:
    publish(broker, "acked", "held")
    lost = Taker(broker, prefetch=2)
    taking = time.monotonic()
    acked, held = lost.take(2)
    acked.ack()
    lost.worker.flush_acks(0.0)  # sent: a buffered ack would be lost with the consumer
    broker.lose(lost)
    other = Taker(broker)
    [again] = other.take(1, timeout=VISIBILITY + 5)
    assert again.payload == "held"
    assert time.monotonic() - taking >= VISIBILITY - 0.05  # not before its time
    again.ack()
    assert other.nothing_for(VISIBILITY + 0.5)  # and the acked one never


def priorities(broker: Broker) -> None:
    first, last = broker.first_priority, 9 - broker.first_priority
    publish(broker, "later", priority=last)
    publish(broker, "first", priority=first)
    assert bodies(Taker(broker).take(2)) == ["first", "later"]


def a_delayed_message_waits_until_due(broker: Broker) -> None:
    eta = eta_in(1.0)
    publish(broker, "delayed", headers=eta)
    publish(broker, "now")
    taker = Taker(broker)
    assert bodies(taker.take(1)) == ["now"]
    assert taker.worker.move_due([QUEUE]) == 0  # not due yet
    assert taker.nothing_for(0.3)
    sleep_until_due(eta)
    taker.worker.move_due([QUEUE])  # where the broker keeps delayed messages aside
    assert bodies(taker.take(1)) == ["delayed"]


# -- the worker's channel -------------------------------------------------------------
def the_channel_is_its_own_worker_channel(broker: Broker) -> None:
    channel = Taker(broker).channel
    assert worker_channel(channel) is channel
    assert channel.settles_by_tag == broker.settles_by_tag
    assert (channel.lease_timeout is not None) == broker.holds_leases


def can_consume_follows_the_prefetch_limit(broker: Broker) -> None:
    publish(broker, "a", "b")
    taker = Taker(broker, prefetch=1)
    [message] = taker.take(1)
    assert not taker.worker.can_consume()
    assert taker.nothing_for(0.2)  # the limit holds
    message.ack()
    assert taker.worker.can_consume()
    assert bodies(taker.take(1)) == ["b"]


def schedule_keeps_an_early_message_until_due(broker: Broker) -> None:
    publish(broker, "early")
    taker = Taker(broker)
    [message] = taker.take(1)
    # As if it had come before its eta (a Celery client, or plain kombu):
    eta = eta_in(1.0)
    message.headers.update(eta)
    assert taker.worker.schedule(message, QUEUE)
    message.ack()
    taker.worker.flush_acks(0.0)
    assert taker.nothing_for(0.3)
    sleep_until_due(eta)
    taker.worker.move_due([QUEUE])
    [copy] = taker.take(1)
    assert copy.payload == "early" and copy.delivery_tag != message.delivery_tag
    copy.ack()
    taker.worker.flush_acks(0.0)
    taker.connection.release()
    assert Taker(broker).nothing_for(0.3)  # the copy's ack did not miss


def detach_then_settle_by_tag(broker: Broker) -> None:
    if not broker.settles_by_tag:  # the broker redelivers what a lost connection held
        assert not Taker(broker).worker.detach()
        return
    publish(broker, "acked", "finished", "waiting")
    lost = Taker(broker)
    taking = time.monotonic()
    acked, finished, waiting = lost.take(3)
    acked.ack()
    detached = lost.worker.detach()
    lost.connection.release()  # a lost connection: its channel restores nothing now
    watcher = Taker(broker)
    assert watcher.nothing_for(0.2)
    detached.acks.append(finished.delivery_tag)  # its task finished during the outage
    detached.requeue.append(waiting.delivery_tag)  # never started: back to the queue
    assert acked.delivery_tag in detached.acks
    Taker(broker).worker.settle_detached(detached)
    [again] = watcher.take(1)
    assert again.payload == "waiting"
    assert time.monotonic() - taking < VISIBILITY  # requeued at once, not restored late
    again.ack()
    # Nothing settled comes back after the visibility timeout either.
    assert watcher.nothing_for(VISIBILITY + 1.0)


def settle_detached_of_nothing_is_harmless(broker: Broker) -> None:
    publish(broker, "a")
    taker = Taker(broker)
    if taker.worker.settles_by_tag:
        taker.worker.settle_detached(Detached())
    assert bodies(taker.take(1)) == ["a"]


def renewed_leases_keep_a_message_held(broker: Broker) -> None:
    publish(broker, "slow")
    holder = Taker(broker)
    [message] = holder.take(1)
    channel = holder.worker
    if not broker.holds_leases:
        assert channel.renew_leases() == 0
        return
    assert channel.lease_timeout == VISIBILITY
    stop = threading.Event()

    def renew() -> None:  # as the worker's lease keeper does, while its loop is busy
        while not stop.wait(VISIBILITY / 3):
            channel.renew_leases()

    keeper = threading.Thread(target=renew, daemon=True)
    keeper.start()
    try:
        assert Taker(broker).nothing_for(VISIBILITY * 2.5)
    finally:
        stop.set()
        keeper.join()
    message.ack()


# -- the defensive boundary and dead letters ------------------------------------------
#: Entries no kombu consumer can use: (entry, a word of the reason).
MALFORMED = [
    (bytes(range(1, 256)), ""),  # not UTF-8, not JSON: either is the reason
    (b"not json at all", "JSON"),
    (b'{"body": "eyJuIjogMX0=", "properties": {"body_encoding": "ba', "JSON"),
    (b"123", "object"),
    (b"null", "object"),
    (b"[]", "object"),
    (b"[" * 3000 + b"]" * 3000, ""),  # too deep for the parser
    (b'{"body": "x", "properties": "none"}', "properties"),
    (b'{"body": 5, "properties": {"delivery_tag": "t1", "delivery_info": {}}}', "body"),
    (b'{"body": "%%%", "properties": {"delivery_tag": "t2", "body_encoding": "base64"}}',
     "base64"),
    (b'{"body": "x", "properties": {"delivery_tag": "t3", "body_encoding": "rot13"}}',
     "body_encoding"),
    (b'{"body": "x", "headers": 7, "properties": {"delivery_tag": "t4"}}', "headers"),
    (b'{"body": "x", "properties": {"delivery_tag": "t5", "delivery_info": []}}',
     "delivery_info"),
]


def dead_letters_of(broker: Broker) -> Any:
    store = worker_channel(broker.connect().default_channel).dead_letters
    assert store is not None
    return store


def malformed_entries_are_set_aside_never_delivered(broker: Broker) -> None:
    publish(broker, "before")
    for raw, _ in MALFORMED:
        broker.push_raw(raw)
    publish(broker, "after")
    taker = Taker(broker, prefetch=100)
    assert bodies(taker.take(2)) == ["before", "after"]
    assert taker.worker.dead_lettered == len(MALFORMED)
    letters = dead_letters_of(broker).list(QUEUE, limit=100)
    assert sorted(letter.entry for letter in letters) == sorted(raw for raw, _ in MALFORMED)
    reasons = {letter.entry: letter.reason for letter in letters}
    for raw, word in MALFORMED:
        assert reasons[raw] and word in reasons[raw], (raw[:40], reasons[raw])
    for message in taker.got:
        message.ack()
    taker.worker.flush_acks(0.0)
    time.sleep(VISIBILITY + 1.2)  # set aside means settled: nothing comes back
    assert Taker(broker).nothing_for(0.5)


def dead_letter_sets_a_delivered_message_aside(broker: Broker) -> None:
    publish(broker, {"task": "unknown"})
    taker = Taker(broker)
    [message] = taker.take(1)
    assert taker.worker.dead_letter(message, "no such task here")
    [letter] = dead_letters_of(broker).list(QUEUE)
    assert letter.reason == "no such task here" and letter.queue == QUEUE
    time.sleep(VISIBILITY + 1.2)
    assert Taker(broker).nothing_for(0.5)
    assert dead_letters_of(broker).requeue(letter.id) is not None
    assert bodies(Taker(broker).take(1)) == [{"task": "unknown"}]  # published again
    assert dead_letters_of(broker).count() == 0


def the_dead_letter_store(broker: Broker) -> None:
    store = dead_letters_of(broker)
    assert store.count() == 0 and store.list() == []
    for n in range(4):
        store.add(QUEUE, f"entry {n}".encode(), f"reason {n}", hostname="node")
    store.add("elsewhere", b"x", "other queue")
    assert store.count(QUEUE) == 4 and store.count() == 5
    newest = store.list(QUEUE, limit=2)
    assert [letter.entry for letter in newest] == [b"entry 3", b"entry 2"]
    assert newest[0].reason == "reason 3" and newest[0].hostname == "node"
    assert store.get(newest[0].id) == newest[0] and store.get("0") is None
    assert store.trim(max_entries=3, max_age=None) == 1
    assert store.count(QUEUE) == 3
    assert store.trim(max_entries=None, max_age=3600) == 0
    assert store.purge(QUEUE) == 3 and store.count() == 1
    assert store.purge() == 1 and store.count() == 0


CASES = [
    consumes_in_order,
    acked_is_gone,
    reject_drops,
    reject_with_requeue_delivers_again,
    a_clean_close_gives_back_what_was_held,
    a_lost_consumers_messages_come_back_after_the_visibility_timeout,
    priorities,
    a_delayed_message_waits_until_due,
    the_channel_is_its_own_worker_channel,
    can_consume_follows_the_prefetch_limit,
    schedule_keeps_an_early_message_until_due,
    detach_then_settle_by_tag,
    settle_detached_of_nothing_is_harmless,
    renewed_leases_keep_a_message_held,
    malformed_entries_are_set_aside_never_delivered,
    dead_letter_sets_a_delivered_message_aside,
    the_dead_letter_store,
]
