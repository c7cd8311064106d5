"""The Redis channel and its acknowledgement emulation; see :mod:`flask_tasks.transport.redis`."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from queue import Empty
from typing import TYPE_CHECKING, Any, ClassVar

from kombu.message import Message
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from ..._redis import round_trip
from ...protocol import envelope_eta
from ..base import ACK_MAX_AGE, Detached, WorkerChannel
from ..dead_letters import DEAD_SUFFIX, MAX_ENTRIES, encode_record
from ..envelope import MAX_MESSAGE_SIZE, BadEnvelope, check_envelope
from . import scripts
from .dead_letters import RedisDeadLetters
from .qos import QoS
from .wake import Wake

if TYPE_CHECKING:
    import redis

#: Suffix of the sorted set that holds a queue list's delayed messages.
ETA_SUFFIX = "eta"

#: Most messages reserved in one round trip.
MAX_BATCH = 100

logger = logging.getLogger("flask_tasks.transport.redis")


_QoS = QoS  # for annotations inside Channel, whose QoS attribute shadows the name


class Channel(kombu_redis.Channel, WorkerChannel):
    """A kombu Redis channel that batches reservations and acks (see the package docs).

    As a :class:`~flask_tasks.transport.base.WorkerChannel` it settles the
    messages of a lost connection by tag, buffers acks, and keeps delayed
    messages in Redis.
    """

    QoS = QoS
    settles_by_tag: ClassVar[bool] = True
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "dead_letter_max_entries", "max_message_size")
    #: Most dead letters kept per queue (None: no limit).
    dead_letter_max_entries: int | None = MAX_ENTRIES
    #: Largest entry taken, bytes; a larger one is set aside.
    max_message_size: int = MAX_MESSAGE_SIZE
    _wake: Wake | None = None
    _shared_client: Any = None
    _shared_pid: int = 0
    #: The last reservation got fewer messages than it asked for.
    _queue_drained = True
    #: (list key, message) popped by BRPOP whose recording failed (connection lost).
    _unrecorded: list[tuple[bytes, bytes]] | None = None

    if TYPE_CHECKING:  # kombu's, untyped: the signatures this class relies on
        @property
        def qos(self) -> _QoS: ...
        def _create_client(self, asynchronous: bool = False) -> redis.Redis: ...
        def _q_for_pri(self, queue: str, pri: int) -> str: ...
        def _get_message_priority(self, message: dict[str, Any], reverse: bool = False) -> int: ...
        def _flush_brpop_reauth(self) -> None: ...

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = kombu_redis.Channel._connparams(self, asynchronous)
        # RESP2: an idle worker waits on the ``__redis__:invalidate`` pub/sub
        # channel (see .wake), which only a RESP2 connection reads as messages.
        params["protocol"] = 2
        return params

    @property
    def wake(self) -> Wake:
        """How this channel waits for messages while its queues are empty (:mod:`.wake`)."""
        if self._wake is None:
            self._wake = Wake(self)
        return self._wake

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._shared_client is None or self._shared_pid != os.getpid():
            self._shared_client = self._create_client()
            self._shared_pid = os.getpid()
        yield self._shared_client

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        if kwargs.get("_publish_batch") is not None or (self._expires and queue in self._expires):
            # kombu's batch and queue-expiry paths
            kombu_redis.Channel._put(self, queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        eta = envelope_eta(message)
        with self.conn_or_acquire() as client:
            if eta is not None and eta > time.time():
                round_trip(client, ("ZADD", key + self.sep + ETA_SUFFIX, eta, dumps(message)))
            else:
                round_trip(client, ("LPUSH", key, dumps(message)))

    def close(self) -> None:
        wake = self._wake
        if wake is not None:
            if wake.armed:
                self._in_poll = None  # type: ignore[assignment]  # no BRPOP reply to read
            wake.close()
        kombu_redis.Channel.close(self)

    # -- WorkerChannel -------------------------------------------------------------
    def can_consume(self) -> bool:
        return self.qos.can_consume()

    @property
    def dead_letters(self) -> RedisDeadLetters:
        return RedisDeadLetters(self.conn_or_acquire, self.sep, self.dead_letter_max_entries)

    def dead_letter(self, message: Message, reason: str) -> bool:
        """Move a delivered message to its queue's dead letters and forget it, atomically."""
        if not isinstance(message, virtual.Message):
            return False
        tag = message.delivery_tag
        queue = message.delivery_info.get("routing_key") or ""
        self.flush_acks(0.0)
        self._set_aside_recorded(queue, [(dumps(message.serializable()).encode(), tag, reason)])
        virtual.QoS.ack(self.qos, tag)  # settled here: nothing left to ack or restore
        return True

    def _dead_key(self, queue: str) -> str:
        return queue + self.sep + DEAD_SUFFIX

    def _set_aside_recorded(self, queue: str,
                            entries: list[tuple[bytes, str | bytes, str]]) -> None:
        """Move recorded (unacked) entries to the dead letters: ``(raw, delivery tag, reason)``."""
        qos, key = self.qos, self._dead_key(queue)
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        ids = []
        for raw, tag, reason in entries:
            ids.append(uuid.uuid4().hex)
            commands.append(("LPUSH", key, encode_record(queue, raw, reason, self.node_name,
                                                         record_id=ids[-1])))
            commands += [("HDEL", qos.unacked_key, tag), ("ZREM", qos.unacked_index_key, tag)]
        if self.dead_letter_max_entries is not None:
            commands.append(("LTRIM", key, 0, self.dead_letter_max_entries - 1))
        commands.append(("EXEC",))
        with self.conn_or_acquire() as client:
            round_trip(client, *commands)
        for letter_id, (_raw, _tag, reason) in zip(ids, entries, strict=True):
            self._log_set_aside(queue, letter_id, reason)

    def _log_set_aside(self, queue: str, letter_id: str, reason: str) -> None:
        self.dead_lettered += 1
        logger.error("Set aside an entry of queue %r as dead letter %s: %s (%d so far; "
                     "`flask tasks dead-letters show %s`)", queue, letter_id, reason,
                     self.dead_lettered, letter_id)

    def schedule(self, message: Message, queue: str) -> bool:
        """Put a message that arrived before its ``eta`` back into Redis, delayed.

        The copy gets a new delivery tag: the worker then acknowledges the
        delivered one, and that (buffered) ack must not touch the copy's
        bookkeeping once it is due and reserved again.
        """
        if not isinstance(message, virtual.Message):
            return False
        envelope = message.serializable()  # as kombu restores a message
        properties = dict(envelope.get("properties") or {}, delivery_tag=str(uuid.uuid4()))
        self._put(queue, {**envelope, "properties": properties})
        return True

    def move_due(self, queues: Sequence[str], limit: int = 1000) -> int:
        """Move delayed messages whose time has come into their queues.

        :param queues: queue names (every priority list of each is checked).
        :param limit: most messages moved per list in this call.
        :returns: how many were moved.
        """
        keys: list[str] = []
        for queue in queues:
            for pri in self.priority_steps:
                key = self._q_for_pri(queue, pri)
                keys += [key + self.sep + ETA_SUFFIX, key]
        with self.conn_or_acquire() as client:
            return int(scripts.move_due(client, keys, [time.time(), limit]))

    def detach(self) -> Detached:
        """The connection is lost: hand over what this channel holds instead of restoring it.

        Messages this channel delivered stay unacknowledged in Redis (restored
        after ``visibility_timeout`` if nobody settles them); the caller settles
        them by tag with :meth:`settle_detached` on a new channel.
        """
        detached = Detached(unrecorded=self._unrecorded or [])
        self._unrecorded = None
        if self._qos is not None:
            detached.acks = self._qos.forget_delivered()
        return detached

    def settle_detached(self, detached: Detached) -> None:
        """Settle messages delivered on an earlier, lost connection (by delivery tag).

        Acks in one round trip, unrecorded messages pushed back to where
        ``BRPOP`` took them (next in line), requeues with kombu's ``restore_by_tag``.
        """
        qos = self.qos
        commands: list[tuple[Any, ...]] = []
        if detached.acks:
            commands += [("ZREM", qos.unacked_index_key, *detached.acks),
                         ("HDEL", qos.unacked_key, *detached.acks)]
        for key, raw in detached.unrecorded:
            # The lost reservation may have recorded it after all: drop that
            # record in the same transaction, so nobody else restores it too.
            tag = _delivery_tag(raw)
            commands += [("MULTI",), ("HDEL", qos.unacked_key, tag),
                         ("ZREM", qos.unacked_index_key, tag), ("RPUSH", key, raw), ("EXEC",)]
        with self.conn_or_acquire() as client:
            if commands:
                round_trip(client, *commands)
            for tag in detached.requeue:
                qos.restore_by_tag(tag, client)

    def flush_acks(self, max_age: float = ACK_MAX_AGE) -> None:
        """Send buffered acknowledgements older than ``max_age`` seconds (each loop turn)."""
        if self._qos is not None:
            self._qos.flush(max_age)

    # -- reservation -----------------------------------------------------------------
    def _brpop_start(self, timeout: float | None = None) -> None:
        # Before a wait that will probably block, send the buffered acks;
        # while messages keep coming they ride along with the next reservation.
        self.flush_acks(0.0 if self._queue_drained else ACK_MAX_AGE)
        if self.wake.available:  # the connection is subscribed: never BRPOP on it
            if self.wake.armed:  # armed by Poller.get: nothing is popped while waiting
                self._in_poll = self.client.connection
                self._brpop_sent_at = None  # no reply to wait for
            return
        kombu_redis.Channel._brpop_start(self, timeout)

    def _brpop_read(self, **options: Any) -> bool:
        if self.wake.available:  # only notifications arrive on the subscribed connection
            armed = self.wake.armed
            self._in_poll = None  # type: ignore[assignment]
            # Read them even when not armed (sent before the last disarm took effect).
            if not (self.wake.woken() and armed):
                raise Empty()
            self.wake.disarm()
            if not self.reserve_now():
                raise Empty()
            return True
        try:
            try:
                dest_item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()
        if not dest_item:
            raise Empty()
        dest_key, item = dest_item
        queue = bytes_to_str(dest_key).rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        budget = self.qos.can_consume_max_estimate()
        more = MAX_BATCH if budget is None else min(MAX_BATCH, max(budget - 1, 0))
        try:
            payloads = self._reserve(queue, item, more)
        except self.connection_errors:
            # Popped, not recorded: only this process has it now (see detach()).
            self._unrecorded = [*(self._unrecorded or []), (dest_key, item)]
            raise
        self._hand_over(payloads, queue)
        return True

    def reserve_now(self) -> int:
        """Pop and record messages from the active queues without blocking; deliver them.

        :returns: how many were delivered.
        """
        budget = self.qos.can_consume_max_estimate()
        left = MAX_BATCH if budget is None else min(MAX_BATCH, budget)
        delivered, drained = 0, True
        for queue in self._queue_cycle.consume(len(self.active_queues)):
            if left <= 0:
                drained = False
                break
            payloads = self._reserve(queue, None, left)
            drained = drained and self._queue_drained
            count = self._hand_over(payloads, queue)
            left -= count
            delivered += count
        self._queue_drained = drained
        return delivered

    def _hand_over(self, payloads: list[dict[str, Any]], queue: str) -> int:
        """Deliver checked envelopes to kombu; returns how many were delivered.

        One that kombu still cannot take is set aside, not raised.
        """
        delivered = 0
        for payload in payloads:
            try:
                self.connection._deliver(payload, queue)
            except self.connection_errors:
                raise
            except Exception as exc:
                tag = payload["properties"]["delivery_tag"]
                self.qos._recorded.discard(tag)
                virtual.QoS.ack(self.qos, tag)
                self._set_aside_recorded(queue, [(dumps(payload).encode(), tag,
                                                  f"it could not be delivered: {exc!r:.300}")])
            else:
                delivered += 1
        return delivered

    def _reserve(self, queue: str, first: bytes | None, more: int) -> list[dict[str, Any]]:
        """Record ``first`` (if any) as unacked and pop/record up to ``more`` others.

        One round trip. Entries that are not well-formed envelopes never
        reach kombu: the script sets aside those it cannot record, and those
        it recorded but :func:`~..envelope.check_envelope` refuses are set
        aside here (they stay recorded until then, so a crash loses none).

        :returns: the decoded messages, ``first`` first.
        """
        qos = self.qos
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        keys += [qos.unacked_key, qos.unacked_index_key, self._dead_key(queue)]
        acks = qos.take_acks()
        max_dead = -1 if self.dead_letter_max_entries is None else self.dead_letter_max_entries
        with self.conn_or_acquire() as client:
            try:
                recorded, dead = scripts.reserve(
                    client, keys, [more, time.time(), first or "", queue, self.node_name,
                                   max_dead, self.max_message_size, *acks])
            except BaseException:
                qos.restore_acks(acks)
                raise
        popped = len(recorded) // 3 + len(dead) // 2 - (1 if first else 0)
        self._queue_drained = popped < more
        for index in range(0, len(dead), 2):
            self._log_set_aside(queue, bytes_to_str(dead[index]), bytes_to_str(dead[index + 1]))
        payloads, refused = [], []
        for raw, tag in zip(recorded[1::3], recorded[2::3], strict=True):
            try:
                payload = check_envelope(raw, self.max_message_size)
            except BadEnvelope as exc:
                refused.append((raw, tag, str(exc)))
                continue
            qos._recorded.add(payload["properties"]["delivery_tag"])
            payloads.append(payload)
        if refused:
            try:
                self._set_aside_recorded(queue, refused)
            except self.connection_errors as exc:  # still recorded: restored, then set aside
                logger.warning("Could not set aside %d malformed entries yet: %s",
                               len(refused), exc)
        return payloads


def _delivery_tag(raw: bytes) -> str:
    """The delivery tag of a raw kombu envelope ("" when it has none)."""
    try:
        return str(loads(bytes_to_str(raw))["properties"]["delivery_tag"])
    except (ValueError, KeyError, TypeError):
        return ""
