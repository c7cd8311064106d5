"""``worker_channel``: a kombu channel that declares nothing gets the generic adapter."""

from __future__ import annotations

from kombu import Connection, Consumer, Message, Producer, Queue

from flask_tasks.transport.base import Detached, PlainChannel, WorkerChannel, worker_channel


def test_a_channel_of_no_known_kind_gets_what_any_broker_does() -> None:
    channel = worker_channel(object())
    assert isinstance(channel, PlainChannel) and not channel.settles_by_tag
    assert channel.can_consume() and channel.lease_timeout is None
    assert channel.detach() == Detached() and not channel.detach()
    assert channel.move_due(["q"]) == 0 and channel.renew_leases() == 0
    channel.flush_acks(0.0)  # nothing buffered: nothing to do


def test_kombus_virtual_channels_report_their_prefetch_limit() -> None:
    queue = Queue("worker-channel-q")
    with Connection("memory://") as conn:
        Producer(conn.default_channel).publish({"n": 1}, routing_key=queue.name, declare=[queue])
        kombu_channel = conn.channel()
        kombu_channel.basic_qos(0, 1, False)
        channel = worker_channel(kombu_channel)
        got: list[Message] = []
        with Consumer(kombu_channel, queues=[queue], on_message=got.append):
            assert channel.can_consume()
            conn.drain_events(timeout=1)
            assert len(got) == 1 and not channel.can_consume()
            got[0].ack()
            assert channel.can_consume()
        assert not channel.schedule(got[0], queue.name)  # memory:// keeps no delayed store


def test_a_channel_that_mixes_it_in_is_its_own() -> None:
    class Declared(WorkerChannel):
        settles_by_tag = True

    channel = Declared()
    assert worker_channel(channel) is channel
