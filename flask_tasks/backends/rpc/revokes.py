"""Revokes for ``rpc://``: kept on RabbitMQ in a stream, read by every worker.

``rpc://`` stores no results anywhere a worker could read revokes from, so
they go to a RabbitMQ *stream* queue, :data:`QUEUE` (``x-queue-type:
stream``, durable, ``x-max-age`` = ``TASKS_REVOKES_EXPIRES``, small segments
so that retention can drop old ones). A stream is an append-only log every
consumer reads from its own offset: a worker started later reads it from the
first entry and learns every unexpired revoke, and nothing is consumed away.

Each entry is JSON ``{"task_id": str, "terminate": bool, "expires": unix time}``,
published with publisher confirms (``revoke()`` returns once RabbitMQ has it).
A reader subscribes at ``x-stream-offset: first`` with a prefetch limit and
acknowledges each entry (a stream needs both). Its first :meth:`RevokeStream.read`
catches up with the stream: it appends a marker entry ``{"marker": id}`` and
reads until its marker comes back, so every revoke confirmed before it is
known (the stream's message count lags, it cannot tell). Later reads take
only what has arrived, without blocking.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from amqp.exceptions import PreconditionFailed
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.message import Message
from kombu.messaging import Consumer, Producer

logger = logging.getLogger("flask_tasks.backends")

#: The stream's name.
QUEUE = "flask_tasks.revokes"
#: Bytes per stream segment: retention (``x-max-age``) drops whole segments.
SEGMENT_BYTES = 1_000_000
#: Entries delivered ahead of the acknowledgements (a stream consumer must set one).
PREFETCH = 1000
#: Seconds a first read waits at most to catch up with the stream.
CATCH_UP = 5.0


def stream(max_age: float) -> Queue:
    """The revokes' stream queue, entries kept ``max_age`` seconds (at least 1)."""
    return Queue(QUEUE, routing_key=QUEUE, durable=True, queue_arguments={
        "x-queue-type": "stream", "x-max-age": f"{max(1, int(max_age))}s",
        "x-stream-max-segment-size-bytes": SEGMENT_BYTES,
    }, consumer_arguments={"x-stream-offset": "first"})


def declare(connection: Connection, queue: Queue) -> tuple[Any, int]:
    """Declare the stream; a channel to use and how many entries the stream holds.

    A stream declared earlier with another ``x-max-age`` (TASKS_REVOKES_EXPIRES
    changed) is used as it is, with a warning.
    """
    channel = connection.channel()
    try:
        return channel, int(queue(channel).queue_declare().message_count)
    except PreconditionFailed as exc:  # that channel is closed now: use a new one
        logger.warning("The stream %s exists with other arguments (%s); it is used as it is. "
                       "Delete it to apply TASKS_REVOKES_EXPIRES.", QUEUE, exc)
        channel = connection.channel()
        return channel, int(queue(channel).queue_declare(passive=True).message_count)


class RevokeStream:
    """Add revokes to the stream; read the unexpired ones.

    :param connect: makes a new broker connection (extra transport options as keywords).
    :param max_age: seconds entries are kept (the stream's ``x-max-age``).
    """

    def __init__(self, connect: Callable[..., Connection], max_age: float) -> None:
        self._connect = connect
        self.queue = stream(max_age)
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._known: dict[str, tuple[bool, float]] = {}  # task id -> (terminate, expires at)
        self._marker: str | None = None  # the marker a first read waits for

    def add(self, task_id: str, terminate: bool, expires: float) -> None:
        """Append a revoke of ``task_id``, kept ``expires`` seconds (confirmed by RabbitMQ)."""
        entry = {"task_id": task_id, "terminate": terminate, "expires": time.time() + expires}
        with self._connect(confirm_publish=True) as connection:
            channel, _ = declare(connection, self.queue)
            Producer(channel).publish(
                entry, exchange="", routing_key=QUEUE, serializer="json", delivery_mode=2,
                retry=False)

    def _on_message(self, message: Message) -> None:
        try:
            entry = message.decode()
            if isinstance(entry, dict) and "marker" in entry:  # a reader's, catching up
                if entry["marker"] == self._marker:
                    self._marker = None
                return
            task_id, terminate, expires = entry["task_id"], entry["terminate"], entry["expires"]
            if not isinstance(task_id, str):
                raise TypeError("task_id is not a string")
            if expires > time.time():
                old = self._known.get(task_id)
                self._known[task_id] = (bool(terminate) or (old is not None and old[0]),
                                        max(float(expires), old[1] if old else 0.0))
        except Exception as exc:  # not ours: skipped
            logger.warning("Skipped an entry of %s that is not a revoke: %r", QUEUE, exc)
        finally:
            message.ack()

    def _subscribe(self) -> None:
        """Connect, read the stream from its first entry, and catch up with it."""
        connection = self._connect()
        try:
            channel, _ = declare(connection, self.queue)
            channel.basic_qos(0, PREFETCH, False)
            Consumer(channel, [self.queue], no_ack=False, auto_declare=False,
                     on_message=self._on_message).consume()
            self._marker = marker = uuid.uuid4().hex
            Producer(channel).publish({"marker": marker}, exchange="", routing_key=QUEUE,
                                      serializer="json", delivery_mode=2, retry=False)
            self._connection = connection
            deadline = time.monotonic() + CATCH_UP
            while self._marker is not None and time.monotonic() < deadline:
                try:
                    connection.drain_events(timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    break
            if self._marker is not None:
                logger.warning("Could not read all of %s within %.0f s; the rest of the "
                               "revokes are read later.", QUEUE, CATCH_UP)
        except Exception:
            self._drop(connection)
            raise

    def _drop(self, connection: Any) -> None:
        """Forget a connection that failed (the next read connects again) and close it."""
        self._connection = None
        try:
            connection.close()
        except Exception:  # dead already
            pass

    def read(self) -> dict[str, bool]:
        """The unexpired revokes (task id -> terminate), with what arrived since the last read.

        :raises Exception: the broker's error when it cannot be reached (the
            next read connects again and reads the stream from its start).
        """
        with self._lock:
            if self._connection is None:
                self._subscribe()
            else:
                connection = self._connection
                try:
                    while True:
                        connection.drain_events(timeout=0)
                except TimeoutError:
                    pass
                except Exception:
                    self._drop(connection)
                    raise
            now = time.time()
            self._known = {task_id: entry for task_id, entry in self._known.items()
                           if entry[1] > now}
            return {task_id: entry[0] for task_id, entry in self._known.items()}

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # dead already
                pass
