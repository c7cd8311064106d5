"""kombu's Redis transport, with fewer round trips on the hot path.

Same keys, same message envelope and the same acknowledgement emulation as
``kombu.transport.redis`` (the ``unacked`` hash and ``unacked_index`` sorted
set, restored after ``visibility_timeout``), so Celery processes on the same
Redis interoperate and kombu's recovery works unchanged. The changes:

1. **One client per channel.** kombu builds a ``redis.Redis`` object for
   every command (about 120 µs each with redis-py 8); we build one per
   channel and process and reuse it.
2. **Batched reservation.** One Lua script pops and records as
   unacknowledged up to the free prefetch budget of messages, atomically: a
   burst of N messages costs one round trip instead of 2·N, and a message
   is never popped without being recorded. While the queues have messages
   the consumer only runs that script (:class:`Poller`); it blocks on
   ``BRPOP`` once they were found empty, and the script then records the
   ``BRPOP``-ed message with the others. ``BRPOP`` pops before the client
   has the message, so the one loss left is a message that arrives at an
   idle worker in the very instant Redis shuts down (kombu and Celery have
   that window on every fetch).
3. **Delayed messages wait on the broker.** A message whose ``eta`` header is
   in the future goes into a sorted set next to its queue list (key
   ``<list key>\x06\x16eta``, score = the eta), not into the list; workers
   move due messages into the list with :meth:`Channel.move_due` (one atomic
   script call for all their queues, a few times a second). Nothing waits
   in a worker's memory, a worker restart loses nothing, and each message
   is moved once however many workers run. (A Celery worker alone never
   moves them: run at least one flask_tasks worker for delayed tasks.)
4. **Settling by tag after a lost connection.** When the connection drops,
   :meth:`Channel.detach` hands the worker what the channel held (buffered
   acks, and a message popped by ``BRPOP`` that could not be recorded)
   instead of kombu restoring every unacknowledged message at once, which
   would run the tasks still running in the pool a second time. Unacked
   messages are keyed by delivery tag in Redis, so once connected again
   :meth:`Channel.settle_detached` acknowledges or requeues them by tag
   from the new connection.
5. **Batched acknowledgements.** ``ack()`` is buffered; buffered acks ride
   along with the next reservation (same round trip), or are flushed in one
   pipeline before a ``BRPOP`` that is likely to block, when they are older
   than :data:`ACK_MAX_AGE` seconds, and before any reject, restore or close.
   A crash can thus leave up to ``ACK_MAX_AGE`` seconds of acks unsent: those
   messages come back after ``visibility_timeout`` (a duplicate, never a loss).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from .._redis import Script, round_trip
from ..protocol import envelope_eta

#: KEYS: the queue's list keys in priority order, then the unacked hash and
#: index. ARGV: how many more to pop, the time, the BRPOP-ed message ('' if none), then
#: tags acknowledged since the last round trip.
#: Returns [key, message, key, message, ...] for the extra messages.
RESERVE = """
local unacked, index = KEYS[#KEYS - 1], KEYS[#KEYS]
local now = tonumber(ARGV[2])
if #ARGV > 3 then
  local tags = {unpack(ARGV, 4)}
  redis.call('ZREM', index, unpack(tags))
  redis.call('HDEL', unacked, unpack(tags))
end
local function record(item)
  if item == '' then return end
  local ok, msg = pcall(cjson.decode, item)
  if not ok or type(msg) ~= 'table' or type(msg.properties) ~= 'table' then return end
  local tag = msg.properties.delivery_tag
  local info = msg.properties.delivery_info or {}
  if not tag then return end
  redis.call('ZADD', index, now, tag)
  redis.call('HSET', unacked, tag, '[' .. item .. ',' .. cjson.encode(info.exchange or '')
             .. ',' .. cjson.encode(info.routing_key or '') .. ']')
end
if ARGV[3] then record(ARGV[3]) end
local out, left = {}, tonumber(ARGV[1])
for i = 1, #KEYS - 2 do
  while left > 0 do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    record(item)
    out[#out + 1] = KEYS[i]
    out[#out + 1] = item
    left = left - 1
  end
end
return out
"""

_reserve = Script(RESERVE)

#: KEYS: pairs of (sorted set, list). ARGV: the time, the most to move per set.
#: Moves due members from each set to the head of its list (they run first,
#: as their time has come); returns how many were moved.
MOVE_DUE = """
local now, limit, moved = ARGV[1], tonumber(ARGV[2]), 0
for i = 1, #KEYS, 2 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now, 'LIMIT', 0, limit)
  for _, member in ipairs(due) do
    redis.call('ZREM', KEYS[i], member)
    redis.call('RPUSH', KEYS[i + 1], member)
    moved = moved + 1
  end
end
return moved
"""
_move_due = Script(MOVE_DUE)

#: Suffix of the sorted set that holds a queue list's delayed messages.
ETA_SUFFIX = "eta"

#: Most messages reserved in one round trip.
MAX_BATCH = 100
#: Seconds an acknowledgement may wait in the buffer.
ACK_MAX_AGE = 0.1


@dataclass
class Detached:
    """What a lost connection's channel still owes Redis, to settle from a new one.

    :param acks: delivery tags to acknowledge (remove from ``unacked``).
    :param requeue: delivery tags to put back on their queue (kombu's ``restore_by_tag``).
    :param unrecorded: ``(list key, raw message)`` popped by ``BRPOP`` but never
        recorded as unacknowledged: pushed back to the list.
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


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation with pre-recorded reservations and buffered acks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: list[str] = []
        self._acks_since = 0.0
        self._recorded: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self._recorded:  # written by the RESERVE script
            self._recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if not self._acks:
            self._acks_since = time.monotonic()
        self._acks.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def take_acks(self) -> list[str]:
        """Hand the buffered tags to a round trip that will remove them."""
        tags, self._acks = self._acks, []
        return tags

    def restore_acks(self, tags: list[str]) -> None:
        """Put back tags whose round trip failed."""
        self._acks[:0] = tags

    def flush(self, max_age: float = 0.0) -> None:
        """Remove buffered acknowledged tags from Redis in one round trip.

        :param max_age: only if the oldest has waited this many seconds.
        """
        if not self._acks or time.monotonic() - self._acks_since < max_age:
            return
        tags, self._acks = self._acks, []
        with self.channel.conn_or_acquire() as client:
            try:
                round_trip(client, ("ZREM", self.unacked_index_key, *tags),
                        ("HDEL", self.unacked_key, *tags))
            except BaseException:
                self.restore_acks(tags)
                raise

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.flush()
        super().reject(delivery_tag, requeue=requeue)

    def forget_delivered(self) -> list[str]:
        """Stop tracking every delivered message, leaving it unacknowledged in Redis.

        Closing the channel then restores nothing. :returns: the buffered acks.
        """
        acks = self.take_acks()
        for tracked in (self._delivered, self._dirty):
            if tracked is not None:
                tracked.clear()
        return acks

    def restore_unacked(self, client: Any = None) -> None:
        self.flush()
        super().restore_unacked(client)

    def restore_unacked_once(self, *args: Any, **kwargs: Any) -> Any:
        # kombu calls this when the channel closes, but restores (and so would
        # flush) only if something is still unacked: send the buffered acks first.
        self.flush()
        return super().restore_unacked_once(*args, **kwargs)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        self.flush()
        super().restore_visible(*args, **kwargs)


class Channel(kombu_redis.Channel):
    """A kombu Redis channel that batches reservations and acks (see the module docs)."""

    QoS = QoS
    _shared_client: Any = None
    _shared_pid: int = 0
    #: The last reservation got fewer messages than it asked for.
    _queue_drained = True
    #: (list key, message) popped by BRPOP whose recording failed (connection lost).
    _unrecorded: list[tuple[bytes, bytes]] | None = None

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
            super()._put(queue, message, **kwargs)  # kombu's batch and queue-expiry paths
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        eta = envelope_eta(message)
        with self.conn_or_acquire() as client:
            if eta is not None and eta > time.time():
                round_trip(client, ("ZADD", key + self.sep + ETA_SUFFIX, eta, dumps(message)))
            else:
                round_trip(client, ("LPUSH", key, dumps(message)))

    def schedule(self, envelope: dict[str, Any], queue: str) -> None:
        """Put a message that arrived before its ``eta`` back on the broker, delayed.

        The copy gets a new delivery tag: the worker then acknowledges the
        delivered one, and that (buffered) ack must not touch the copy's
        bookkeeping once it is due and reserved again.
        """
        properties = dict(envelope.get("properties") or {}, delivery_tag=str(uuid.uuid4()))
        self._put(queue, {**envelope, "properties": properties})

    def move_due(self, queues: list[str], limit: int = 1000) -> int:
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
            return int(_move_due(client, keys, [time.time(), limit]))

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

    def _brpop_start(self, timeout: float | None = None) -> None:
        # Before a BRPOP that will probably block, send the buffered acks;
        # while messages keep coming they ride along with the next reservation.
        self.flush_acks(0.0 if self._queue_drained else ACK_MAX_AGE)
        super()._brpop_start(timeout)

    def _brpop_read(self, **options: Any) -> bool:
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
            raise kombu_redis.Empty()
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
        for payload in payloads:
            self.connection._deliver(payload, queue)
        return True

    def reserve_now(self) -> int:
        """Pop and record messages from the active queues without blocking; deliver them.

        :returns: how many were delivered.
        """
        budget = self.qos.can_consume_max_estimate()
        left = MAX_BATCH if budget is None else min(MAX_BATCH, budget)
        delivered = 0
        for queue in self._queue_cycle.consume(len(self.active_queues)):
            if left <= 0:
                break
            payloads = self._reserve(queue, None, left)
            for payload in payloads:
                self.connection._deliver(payload, queue)
            left -= len(payloads)
            delivered += len(payloads)
        self._queue_drained = left > 0
        return delivered

    def _reserve(self, queue: str, first: bytes | None, more: int) -> list[dict[str, Any]]:
        """Record ``first`` (if any) as unacked and pop/record up to ``more`` others.

        One round trip. :returns: the decoded messages, ``first`` first.
        """
        qos = self.qos
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        keys += [qos.unacked_key, qos.unacked_index_key]
        acks = qos.take_acks()
        with self.conn_or_acquire() as client:
            try:
                reply = _reserve(client, keys, [more, time.time(), first or "", *acks])
            except BaseException:
                qos.restore_acks(acks)
                raise
        self._queue_drained = len(reply) // 2 < more
        payloads = []
        for raw in [first, *reply[1::2]] if first else reply[1::2]:
            payload = loads(bytes_to_str(raw))
            tag = payload.get("properties", {}).get("delivery_tag")
            if tag is not None:
                qos._recorded.add(tag)
            payloads.append(payload)
        return payloads


def _delivery_tag(raw: bytes) -> str:
    """The delivery tag of a raw kombu envelope ("" when it has none)."""
    try:
        return str(loads(bytes_to_str(raw))["properties"]["delivery_tag"])
    except (ValueError, KeyError, TypeError):
        return ""


class Poller(kombu_redis.MultiChannelPoller):
    """kombu's poller, reserving without ``BRPOP`` while queues have messages.

    ``BRPOP`` removes a message before the client has it: if Redis stops right
    then (the reply is lost with the connection), the message is gone. So a
    channel whose last reservation filled up reserves again with the atomic
    pop-and-record script, and blocks on ``BRPOP`` only once its queues were
    found empty (when a message can only arrive while it waits).
    """

    def get(self, callback: Any, timeout: float | None = None) -> None:
        for channel in list(self._channels):
            if (channel.active_queues and not channel._queue_drained
                    and not channel._in_poll and channel.qos.can_consume()):
                if channel.reserve_now():
                    return
        super().get(callback, timeout)


class _ShownAsRedis(type):
    # kombu writes the transport class into URLs it logs ("Connected to ...").
    def __str__(cls) -> str:
        return "redis"


class Transport(kombu_redis.Transport, metaclass=_ShownAsRedis):
    """kombu's Redis transport with :class:`Channel`; used for ``redis://`` and ``rediss://``."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()  # type: ignore[assignment]  # kombu declares None
