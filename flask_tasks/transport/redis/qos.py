"""The Redis channel's acknowledgement state: kombu's emulation, with buffered acks.

kombu records each delivered message in the ``unacked`` hash and
``unacked_index`` sorted set and removes it on ack. Here the reservation
script records (so :meth:`QoS.append` skips kombu's own write for those), and
acks are buffered and sent in one round trip (:meth:`QoS.flush`), or ride
along with the next reservation (:meth:`QoS.take_acks`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from ..._redis import round_trip


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation with pre-recorded reservations and buffered acks."""

    if TYPE_CHECKING:  # kombu's, untyped: the signatures this module relies on
        def can_consume(self) -> bool: ...
        def can_consume_max_estimate(self) -> int | None: ...
        def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None: ...

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kombu_redis.QoS.__init__(self, *args, **kwargs)
        self._acks: list[str] = []
        self._acks_since = 0.0
        self._recorded: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self._recorded:  # written by the RESERVE script
            self._recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            kombu_redis.QoS.append(self, message, delivery_tag)

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
        kombu_redis.QoS.reject(self, delivery_tag, requeue=requeue)

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
        kombu_redis.QoS.restore_unacked(self, client)

    def restore_unacked_once(self, *args: Any, **kwargs: Any) -> Any:
        # kombu calls this when the channel closes, but restores (and so would
        # flush) only if something is still unacked: send the buffered acks first.
        self.flush()
        return kombu_redis.QoS.restore_unacked_once(self, *args, **kwargs)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        self.flush()
        kombu_redis.QoS.restore_visible(self, *args, **kwargs)
