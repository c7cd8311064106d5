"""kombu's Redis transport, with fewer round trips on the hot path.

Same keys, same message envelope and the same acknowledgement emulation as
``kombu.transport.redis`` (the ``unacked`` hash and ``unacked_index`` sorted
set, restored after ``visibility_timeout``), so Celery processes on the same
Redis interoperate and kombu's recovery works unchanged. The changes:

1. **One client per channel.** kombu builds a ``redis.Redis`` object for
   every command (about 120 µs each with redis-py 8); we build one per
   channel and process and reuse it.
2. **Batched reservation, and nothing popped before it is recorded.** One
   Lua script pops and records as unacknowledged up to the free prefetch
   budget of messages, atomically: a burst of N messages costs one round
   trip instead of 2·N. While the queues have messages the consumer only
   runs that script (:class:`Poller`); once they were found empty it waits
   on a notification (:mod:`.wake`, Redis's client-tracking broadcast of
   writes to the queue lists), never with ``BRPOP``, which pops a message
   when Redis *sends* it, so a worker paused and killed while idle, or a
   Redis stopping at that instant, would lose it.
   The script also sets aside what it cannot record, and what it recorded is
   checked in full (:mod:`..envelope`): malformed entries go to the dead
   letters beside the queue (:mod:`..dead_letters`) and never reach kombu.
3. **Delayed messages wait on the broker.** A message whose ``eta`` header is
   in the future goes into a sorted set next to its queue list (key
   ``<list key>\x06\x16eta``, score = the eta), not into the list; workers
   move due messages into the list with :meth:`Channel.move_due` (one atomic
   script call for all their queues, a few times a second; the Lua scripts
   are in :mod:`.scripts`). Nothing waits
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
5. **Redelivery that does not wait for idleness.** Unacknowledged messages
   older than ``visibility_timeout`` (a dead worker's) are restored every
   :data:`RESTORE_INTERVAL` seconds, busy or idle; kombu restores them only
   when a poll finds nothing, so under steady load they never came back.
6. **Batched acknowledgements.** ``ack()`` is buffered; buffered acks ride
   along with the next reservation (same round trip), or are flushed in one
   pipeline before a wait that is likely to block, when they are older
   than :data:`~flask_tasks.transport.base.ACK_MAX_AGE` seconds, and before
   any reject, restore or close.
   A crash can thus leave up to ``ACK_MAX_AGE`` seconds of acks unsent: those
   messages come back after ``visibility_timeout`` (a duplicate, never a loss).

:class:`Channel` is a :class:`~flask_tasks.transport.base.WorkerChannel`:
4 and 6 are what it does for a worker, with :meth:`Channel.schedule` (a
message that came before its ``eta`` goes back to the sorted set),
:meth:`Channel.move_due` and its dead letters (:mod:`.dead_letters`). The
acknowledgement state is in :mod:`.qos`. Never imports Flask.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from kombu.transport import redis as kombu_redis

from .channel import ETA_SUFFIX, MAX_BATCH, Channel
from .qos import QoS

logger = logging.getLogger("flask_tasks.transport.redis")

#: Seconds between restores of unacknowledged messages past ``visibility_timeout``.
RESTORE_INTERVAL = 1.0

__all__ = ["ETA_SUFFIX", "MAX_BATCH", "RESTORE_INTERVAL", "Channel", "Poller", "QoS",
           "Transport"]


class Poller(kombu_redis.MultiChannelPoller):
    """kombu's poller, taking messages only with the atomic pop-and-record script.

    ``BRPOP`` removes a message when Redis sends it: if Redis stops right then,
    or the worker is paused and killed before it reads the reply, the message
    is gone. So a channel whose last reservation filled up reserves again with
    the script; once its queues were found empty it waits on a notification
    (:mod:`.wake`) and reserves when woken. ``BRPOP`` is used only on a server
    that refuses notifications.

    Every :data:`RESTORE_INTERVAL` seconds, busy or idle, it also restores
    the unacknowledged messages older than ``visibility_timeout`` (a dead
    worker's), which kombu does only when a poll finds nothing.
    """

    if TYPE_CHECKING:  # kombu's, untyped
        def __init__(self) -> None: ...

    _last_restore = 0.0

    def get(self, callback: Any, timeout: float | None = None) -> None:
        self._restore_if_due()
        for channel in list(self._channels):
            if not (channel.active_queues and channel.qos.can_consume()):
                continue
            wake = channel.wake
            if channel._in_poll:  # waiting: on a notification, or a BRPOP was sent
                if wake.armed and wake.due_check() and channel.reserve_now():
                    wake.disarm()
                    channel._in_poll = None
                    return
                continue
            if not channel._queue_drained and channel.reserve_now():
                return
            if not wake.armed and wake.arm() and channel.reserve_now():
                wake.disarm()  # came before the arming: busy again
                return
        kombu_redis.MultiChannelPoller.get(self, callback, timeout)

    def _restore_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_restore < RESTORE_INTERVAL:
            return
        self._last_restore = now
        for channel in self._channels:
            if channel.active_queues:  # the records are shared: one channel does it
                try:
                    channel.qos.restore_visible(num=channel.unacked_restore_limit, interval=1)
                except channel.connection_errors as exc:
                    logger.debug("Restoring unacknowledged messages failed: %s", exc)
                except Exception:
                    logger.exception("Restoring unacknowledged messages failed")
                return


class _ShownAsRedis(type):
    # kombu writes the transport class into URLs it logs ("Connected to ...").
    def __str__(cls) -> str:
        return "redis"


class Transport(kombu_redis.Transport, metaclass=_ShownAsRedis):
    """kombu's Redis transport with :class:`Channel`; used for ``redis://`` and ``rediss://``."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kombu_redis.Transport.__init__(self, *args, **kwargs)
        self.cycle = Poller()  # type: ignore[assignment]  # kombu declares None
