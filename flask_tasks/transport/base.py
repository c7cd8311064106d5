"""What the worker needs from a transport: :class:`WorkerChannel`.

kombu's interface gives a worker channels that deliver messages and
messages it acknowledges, requeues or rejects. flask_tasks' own transports
can do more for a worker, and the worker needs it:

=========================  ==================================================
``can_consume()``          the broker side may take another message now
                           (kombu's emulated prefetch); False: wait on the pool
``flush_acks(max_age)``    send acknowledgements the channel buffers
``settles_by_tag``         messages of a lost connection can be settled by
                           delivery tag over the next one:
``detach()``               the connection is lost: hand over what the channel
                           still owes instead of restoring it all
``settle_detached(d)``     settle that, over a new channel
``schedule(message, q)``   put a message that came before its ``eta`` back
                           into the broker's delayed store
``move_due(queues)``       move delayed messages whose time has come into
                           their queues
``lease_timeout``          seconds a held message stays leased without
``renew_leases()``         renewal, and renewing them from another thread
``dead_letters``           the broker's dead-letter store (None: it keeps none)
``dead_letter(m, reason)`` set a delivered message aside there, acknowledged
``dead_lettered``          how many entries this channel set aside
=========================  ==================================================

:class:`WorkerChannel` declares them once, with the defaults that are right
for any other kombu channel (amqp://, memory://, ...): the broker itself
redelivers what was not acknowledged, keeps no delayed messages and holds
no leases. flask_tasks' channels mix it in and override what they do
(:mod:`.redis`, :mod:`.embedded`); :func:`worker_channel` gives the worker
the :class:`WorkerChannel` of any kombu channel, so the worker calls these
methods and never probes a channel for optional hooks.

Never imports Flask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from kombu.message import Message
from kombu.transport import virtual

from .dead_letters import DeadLetters

__all__ = ["ACK_MAX_AGE", "Detached", "PlainChannel", "WorkerChannel", "register_adapter",
           "worker_channel"]

#: Seconds a buffered acknowledgement may wait, by default (:meth:`WorkerChannel.flush_acks`).
ACK_MAX_AGE = 0.1


@dataclass
class Detached:
    """What a lost connection's channel still owes the broker, to settle from a new one.

    :param acks: delivery tags to acknowledge.
    :param requeue: delivery tags to put back on their queue.
    :param unrecorded: ``(queue key, raw message)`` pairs the transport took
        from a queue but could not record as held (the connection was lost in
        between): put back where they were taken from.
    """

    acks: list[str] = field(default_factory=list)
    requeue: list[str] = field(default_factory=list)
    unrecorded: list[tuple[bytes, bytes]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.acks or self.requeue or self.unrecorded)

    def merge(self, other: Detached) -> None:
        """Add ``other``'s entries to these."""
        self.acks += other.acks
        self.requeue += other.requeue
        self.unrecorded += other.unrecorded


class WorkerChannel:
    """The worker's view of a channel; the defaults suit any kombu channel.

    The worker calls these from its main thread only, except
    :meth:`renew_leases` (from a thread of its own, while the main thread
    may be busy).
    """

    #: Messages delivered on a lost connection can be settled by delivery tag
    #: over a new one (:meth:`detach`, :meth:`settle_detached`). False: the
    #: broker redelivers every message the lost connection had not acknowledged.
    settles_by_tag: ClassVar[bool] = False
    #: Entries this channel set aside as dead letters (malformed, or rejected).
    dead_lettered: int = 0
    #: The worker's node name, written into the dead letters it sets aside.
    node_name: str = ""
    #: The type the broker's queues are declared with (RabbitMQ: ``classic`` or
    #: ``quorum``, ``TASKS_DEFAULT_QUEUE_TYPE``), for queues a channel declares
    #: itself (RabbitMQ's delay ladder).
    queue_type: str = "classic"

    @property
    def dead_letters(self) -> DeadLetters | None:
        """The broker's dead-letter store (:mod:`.dead_letters`); None: it keeps none."""
        return None

    def dead_letter(self, message: Message, reason: str) -> bool:
        """Set a delivered message aside as a dead letter and acknowledge it, atomically.

        :returns: False if the broker keeps no dead letters (the caller
            rejects the message instead).
        """
        return False

    @property
    def lease_timeout(self) -> float | None:
        """Seconds a held message stays leased without :meth:`renew_leases` (None: no leases)."""
        return None

    def can_consume(self) -> bool:
        """Whether the channel may take another message now (its prefetch limit allows it)."""
        return True

    def flush_acks(self, max_age: float = ACK_MAX_AGE) -> None:
        """Send the acknowledgements buffered for longer than ``max_age`` seconds.

        The default buffers nothing. ``flush_acks(0.0)`` sends them all.
        """
        return None

    def detach(self) -> Detached:
        """The connection is lost: stop tracking the delivered messages, return what is owed.

        Called only if :attr:`settles_by_tag`. Closing the channel afterwards
        must restore nothing: the caller settles the messages it still holds
        with :meth:`settle_detached` over a new connection.
        """
        return Detached()

    def settle_detached(self, detached: Detached) -> None:
        """Settle messages delivered on an earlier, lost connection, by delivery tag.

        Called only if :attr:`settles_by_tag`.
        """
        return None

    def schedule(self, message: Message, queue: str) -> bool:
        """Put ``message``, which arrived before its ``eta``, back into the broker's delayed store.

        The copy goes to ``queue`` once due; the caller acknowledges
        ``message`` afterwards.

        :returns: False if the broker keeps no delayed messages (the caller
            runs the task now).
        """
        return False

    def move_due(self, queues: Sequence[str]) -> int:
        """Move the delayed messages of ``queues`` whose time has come into the queues.

        :returns: how many were moved (0 where delayed messages become
            ready by themselves, or are not kept).
        """
        return 0

    def renew_leases(self) -> int:
        """Extend the leases of the messages this channel holds (thread safe).

        :returns: how many leases were renewed.
        """
        return 0


class PlainChannel(WorkerChannel):
    """The :class:`WorkerChannel` of a kombu channel that declares none of its own.

    :param channel: the kombu channel. For kombu's virtual transports
        (memory://, ...), :meth:`can_consume` asks its emulated QoS.
    """

    def __init__(self, channel: object) -> None:
        self.channel = channel
        self._qos = channel.qos if isinstance(channel, virtual.Channel) else None

    def can_consume(self) -> bool:
        return self._qos is None or bool(self._qos.can_consume())


#: kombu channel class -> the WorkerChannel that adapts it (:func:`register_adapter`).
_ADAPTERS: dict[type, Callable[[object], WorkerChannel]] = {}


def register_adapter(channel_class: type, adapter: Callable[[object], WorkerChannel]) -> None:
    """Make :func:`worker_channel` adapt channels of ``channel_class`` with ``adapter``.

    A transport module that adapts a kombu transport it does not own
    (:mod:`.amqp`) registers itself when imported; :func:`.connect.broker_connection`
    imports it for the URLs it serves.
    """
    _ADAPTERS[channel_class] = adapter


def worker_channel(channel: object) -> WorkerChannel:
    """The :class:`WorkerChannel` of a kombu channel: itself, if it is one; else its
    registered adapter's; else a :class:`PlainChannel`."""
    if isinstance(channel, WorkerChannel):
        return channel
    for cls in type(channel).__mro__:
        adapter = _ADAPTERS.get(cls)
        if adapter is not None:
            return adapter(channel)
    return PlainChannel(channel)
