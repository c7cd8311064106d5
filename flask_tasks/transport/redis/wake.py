"""How an idle Redis consumer waits for messages without taking one it may never record.

kombu waits with ``BRPOP``, which removes the message from its list when
Redis *sends* it: a worker paused (SIGSTOP, a frozen container, heavy
swapping) and then killed while that reply sits in its socket loses the
message, since it is in neither the queue nor the unacknowledged records.

Here an idle channel waits on a notification instead, and then takes messages
with the atomic pop-and-record script, so nothing leaves a list before it is
recorded as held:

1. **Arm.** A dedicated connection turns on Redis's client-side caching
   invalidation in broadcast mode for the queues' keys (``CLIENT TRACKING ON
   REDIRECT <id> BCAST NOLOOP PREFIX <queue> ...``), sent to the channel's
   waiting connection, which is subscribed to ``__redis__:invalidate`` (RESP2).
   Redis then publishes the name of every key written under those prefixes
   (``LPUSH`` by any producer, Celery's included; a restore; a due delayed
   message moved in). Then the queues are checked once more: a message that
   came before the arming is found by that check, one that comes after it
   rings.
2. **Wait** on the waiting connection in kombu's poller, where ``BRPOP`` would be.
3. **Woken** by a notification naming one of the queue lists: disarm (so a
   busy worker is not sent a notification for every message others take)
   and reserve with the script. A notification for another key under the
   same prefix (a result key ``celery-task-meta-...``) is read and ignored.

While armed the queues are also checked every :data:`CHECK_INTERVAL` seconds,
so a lost notification (a dropped connection) costs at most that much delay.
A server that refuses ``CLIENT TRACKING`` (before Redis 6, or an ACL without
it) falls back to ``BRPOP`` with a logged warning: the window above is then open.

Never imports Flask.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import ResponseError

if TYPE_CHECKING:
    from .channel import Channel

logger = logging.getLogger("flask_tasks.transport.redis")

#: The pub/sub channel Redis sends invalidations to (RESP2 redirection).
INVALIDATE = b"__redis__:invalidate"
#: Seconds between checks of the queues while armed (a lost notification's cost).
CHECK_INTERVAL = 1.0


class Wake:
    """The wake-up of one :class:`~.channel.Channel`: armed, waiting, woken, disarmed.

    :param channel: the channel whose queues are watched.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        #: None: not tried yet; False: the server refused, ``BRPOP`` is used.
        self.available: bool | None = None
        self.armed = False
        self.armed_at = 0.0
        self._tracker: Any = None  # a redis-py Connection of its own
        self._unread = 0  # replies of commands sent to it and not read yet
        self._sock: Any = None
        self._client_id: int | None = None
        self._keys: set[bytes] = set()

    def _listener(self) -> Any:
        """The channel's waiting connection (kombu's ``BRPOP`` one), subscribed."""
        client = self.channel.client
        if getattr(client, "connection", None) is None:
            client.connection = client.connection_pool.get_connection()
        connection = client.connection
        if connection._sock is None:
            connection.connect()
        if connection._sock is not self._sock:  # new connection: subscribe it
            connection.send_command("CLIENT", "ID")
            self._client_id = int(connection.read_response())
            connection.send_command("SUBSCRIBE", INVALIDATE)
            connection.read_response()
            self._sock = connection._sock
        return connection

    def _watched(self) -> tuple[list[str], set[bytes]]:
        """The tracking prefixes (no one a prefix of another) and the list keys woken for."""
        channel = self.channel
        queues = sorted(channel.active_queues)
        keys = {channel._q_for_pri(queue, pri).encode() for queue in queues
                for pri in channel.priority_steps}
        prefixes: list[str] = []
        for queue in queues:
            if not any(queue.startswith(kept) for kept in prefixes):
                prefixes.append(queue)
        return prefixes, keys

    def arm(self) -> bool:
        """Start receiving notifications for the queues (then the caller checks them once).

        :returns: False if the server refuses (``BRPOP`` is used from now on).
        """
        if self.available is False:
            return False
        channel = self.channel
        try:
            listener = self._listener()
            self.drain(listener)
            prefixes, self._keys = self._watched()
            command: list[Any] = ["CLIENT", "TRACKING", "ON", "REDIRECT", self._client_id,
                                  "BCAST", "NOLOOP"]
            for prefix in prefixes:
                command += ["PREFIX", prefix]
            self._send(("CLIENT", "TRACKING", "OFF"), tuple(command))
            self._read()
        except ResponseError as exc:
            self.available = False
            self._sock = None
            channel.client.connection.disconnect()  # leave subscribed mode
            logger.warning(
                "This Redis server refuses CLIENT TRACKING (%s): idle workers wait with "
                "BRPOP, and a worker paused then killed while idle can lose the message "
                "Redis handed it (see docs/delivery.md).", exc)
            return False
        self.available = True
        self.armed, self.armed_at = True, time.monotonic()
        return True

    def disarm(self) -> None:
        """Stop the notifications (the channel is busy, or closing).

        The command is sent without waiting for its reply (read before the
        next arming): a woken channel reserves at once.
        """
        if not self.armed:
            return
        self.armed = False
        if self._tracker is not None:
            self._send(("CLIENT", "TRACKING", "OFF"))

    def _send(self, *commands: tuple[Any, ...]) -> None:
        if self._tracker is None:
            params = self.channel._connparams()
            connection_class = params.pop("connection_class", redis.Connection)
            params.pop("max_connections", None)
            self._tracker = connection_class(**params)
        try:
            self._tracker.send_packed_command(self._tracker.pack_commands(commands))
        except BaseException:
            self._drop()
            raise
        self._unread += len(commands)

    def _read(self) -> None:
        """Read every pending reply; raises the first error among them."""
        error: ResponseError | None = None
        try:
            while self._unread:
                self._unread -= 1
                try:
                    self._tracker.read_response()
                except ResponseError as exc:
                    error = error or exc
        except BaseException:
            self._drop()
            raise
        if error is not None:
            raise error

    def _drop(self) -> None:
        tracker, self._tracker, self._unread = self._tracker, None, 0
        if tracker is not None:
            tracker.disconnect()

    def due_check(self) -> bool:
        """Whether the armed channel should check its queues now (every CHECK_INTERVAL s)."""
        now = time.monotonic()
        if self.armed and now - self.armed_at >= CHECK_INTERVAL:
            self.armed_at = now
            return True
        return False

    def woken(self) -> bool:
        """Read what the waiting connection received; whether it names a watched list."""
        connection = self.channel.client.connection
        if connection is None or connection._sock is None:
            return True  # lost: check the queues (and subscribe again when armed next)
        return self.drain(connection)

    def drain(self, connection: Any) -> bool:
        """Read every pending notification; whether one names a watched list (or all keys)."""
        relevant = False
        while connection.can_read(timeout=0):
            reply = connection.read_response()
            if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message"):
                continue  # a subscribe confirmation
            keys = reply[2]
            if keys is None or not isinstance(keys, list) or self._keys.intersection(keys):
                relevant = True  # None: FLUSHDB / FLUSHALL
        return relevant

    def close(self) -> None:
        """Drop the tracking connection."""
        self.armed = False
        try:
            self._drop()
        except Exception:  # closing anyway
            pass
