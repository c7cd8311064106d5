"""RabbitMQ (``amqp://``, ``pyamqp://``): delayed messages that wait on the broker, no plugin.

RabbitMQ keeps no delayed messages, and a worker holding an early message
unacknowledged until its ``eta`` would hold it in memory (and block its
prefetch). flask_tasks uses the design Celery 5.5 adopted for quorum queues,
"native delayed delivery", through kombu's own implementation
(:mod:`kombu.transport.native_delayed_delivery`), so Celery and flask_tasks
processes share one ladder:

- 28 levels of a topic exchange and a queue, ``celery_delayed_27`` down to
  ``celery_delayed_0``. The queue of level *n* holds messages for ``2**n``
  seconds (``x-message-ttl``) and then dead-letters them into level
  *n - 1*; level 0 dead-letters into the topic exchange
  ``celery_delayed_delivery``.
- A delayed message is published to ``celery_delayed_27`` with the delay in
  whole seconds written as 28 binary digits in front of its routing key
  (``0.0.….1.0.1.celery`` for 5 s to ``celery``): each level's digit says
  whether it waits there or passes straight down. Up to ``2**28 - 1`` s
  (8.5 years).
- Each worker queue is bound to ``celery_delayed_delivery`` with
  ``#.<queue>``, so the message lands in its queue when due. Nothing waits in
  a worker; a restart of every worker loses nothing (the ladder queues are
  durable); the broker holds 100,000 delayed messages as it holds any.

The delay is rounded *up* to a whole second (never early; at most 1 s late).
:func:`bind_queue` runs once per queue and connection (publisher and worker);
:func:`declare_ladder` once per connection before the first delayed message
(publisher) or early arrival (worker), with the queues' type
(``TASKS_DEFAULT_QUEUE_TYPE``): an app that never delays declares no ladder.

Never imports Flask.
"""

from __future__ import annotations

from typing import Any

from kombu.entity import Exchange, Queue
from kombu.message import Message
from kombu.messaging import Producer
from kombu.transport import pyamqp
from kombu.transport.native_delayed_delivery import (
    CELERY_DELAYED_DELIVERY_EXCHANGE,
    declare_native_delayed_delivery_exchanges_and_queues,
)

from ..protocol import envelope_eta
from .base import WorkerChannel, register_adapter
from .delays import DELAY_EXCHANGE, MAX_DELAY, delayed_route, is_amqp, strip_delay

__all__ = ["DELAY_EXCHANGE", "MAX_DELAY", "AmqpChannel", "bind_queue", "declare_ladder",
           "delayed_route", "is_amqp", "strip_delay"]



class _OneChannel:
    """What kombu's ladder declaration takes for a connection: it only opens a channel."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def channel(self) -> Any:
        return self._channel


def declare_ladder(channel: Any, queue_type: str = "classic") -> None:
    """Declare the delay ladder's exchanges and queues on ``channel`` (idempotent).

    kombu's declarations (56 of them), so Celery and flask_tasks share the ladder.

    :param queue_type: the type of the ladder's queues: the task queues' type
        (``TASKS_DEFAULT_QUEUE_TYPE``). With quorum queues the ladder is Celery's
        own (Celery 5.5+ declares it for quorum queues only), and it dead-letters
        *at least once*; classic queues' dead-lettering is at most once (a broker
        crash in the middle of a move may drop the message).
    """
    declare_native_delayed_delivery_exchanges_and_queues(
        _OneChannel(channel), queue_type)  # type: ignore[arg-type]  # duck-typed: channel()


def bind_queue(channel: Any, queue: Queue) -> None:
    """Bind ``queue`` to ``celery_delayed_delivery`` with ``#.<its routing key>``.

    The queue itself is bound (not its exchange), so queues on direct
    exchanges, as flask_tasks declares them, receive their delayed messages too.
    """
    Exchange(CELERY_DELAYED_DELIVERY_EXCHANGE, type="topic", channel=channel).declare()
    queue.bind(channel).bind_to(CELERY_DELAYED_DELIVERY_EXCHANGE,
                                routing_key=f"#.{queue.routing_key or queue.name}")


class AmqpChannel(WorkerChannel):
    """The :class:`WorkerChannel` of a RabbitMQ channel: it keeps delayed messages.

    A message that arrives before its ``eta`` (a Celery client publishing
    with ``countdown`` straight to the queue) goes back through the ladder.
    Everything else is the broker's own: it redelivers what was not
    acknowledged, and prefetch is AMQP's ``basic.qos``.

    :param channel: the kombu channel (py-amqp).
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._ladder = False  # declared on this channel

    def schedule(self, message: Message, queue: str) -> bool:
        eta = envelope_eta({"headers": message.headers})
        if eta is None:
            return False
        if not self._ladder:
            declare_ladder(self.channel, self.queue_type)
            self._ladder = True
        exchange, routing_key = delayed_route(eta, queue)
        properties = message.properties
        kept = {key: properties[key] for key in ("correlation_id", "reply_to", "priority",
                                                 "expiration", "message_id", "timestamp")
                if properties.get(key) is not None}
        Producer(self.channel).publish(
            message.body, exchange=exchange, routing_key=routing_key, headers=message.headers,
            content_type=message.content_type, content_encoding=message.content_encoding,
            delivery_mode=2, retry=False, **kept)
        return True


register_adapter(pyamqp.Channel, AmqpChannel)
