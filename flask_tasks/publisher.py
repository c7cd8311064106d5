"""Publishing task messages through kombu's producer pool, with retries.

One :class:`Publisher` per app and process. The kombu connection is made on
first publish (never at import or in ``init_app``) and anew after ``fork``.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue
from kombu.messaging import Producer

from .exceptions import ImproperlyConfigured, PublishRefused
from .protocol import Message, envelope_eta
from .transport.connect import broker_connection, declaration_refused, login_refused
from .transport.delays import delayed_route, is_amqp

logger = logging.getLogger("flask_tasks.publisher")

#: The delay ladder's entry in a connection's declared set (not a queue name).
_LADDER = "\x00ladder"


class Publisher:
    """Sends encoded task messages to the broker.

    Producers (each with its own connection, made on first use) are kept in a
    free list: a publish takes one, uses it, and puts it back, so concurrent
    threads each get their own and at most ``pool_limit`` idle ones are kept.
    A publish is tried once without kombu's retry wrapper; only when the
    connection fails is it sent again through ``Connection.ensure`` with the
    retry policy.

    :param url: the broker URL.
    :param transport_options: kombu transport options.
    :param pool_limit: idle connections kept per process.
    :param connect_timeout: seconds to wait for a connection.
    :param queue_type: RabbitMQ: the type of the delay ladder's queues (``classic``
        or ``quorum``: ``TASKS_DEFAULT_QUEUE_TYPE``), declared with the first
        delayed message on each connection.
    """

    def __init__(self, url: str, *, transport_options: Mapping[str, Any] | None = None,
                 pool_limit: int = 10, connect_timeout: float | None = 4.0,
                 queue_type: str = "classic") -> None:
        self.url = url
        self.queue_type = queue_type
        self.transport_options = dict(transport_options or {})
        self.pool_limit = pool_limit
        self.connect_timeout = connect_timeout
        self._connection: Connection | None = None
        self._free: list[Producer] = []
        self._pid = os.getpid()
        # Queues declared on each connection: kombu's maybe_declare copies and
        # binds the queue on every publish even when it is cached.
        self._declared: weakref.WeakKeyDictionary[Connection, set[str]] = (
            weakref.WeakKeyDictionary())

    @property
    def connection(self) -> Connection:
        """The template connection (not connected; each producer uses a clone)."""
        if self._connection is None or self._pid != os.getpid():
            self.reset_after_fork()
            self._connection = broker_connection(self.url, self.transport_options,
                                                 self.connect_timeout)
        return self._connection

    def _take(self) -> Producer:
        template = self.connection
        try:
            return self._free.pop()  # atomic: no lock needed
        except IndexError:
            return Producer(template.clone(), auto_declare=False)

    def _give_back(self, producer: Producer) -> None:
        if len(self._free) < self.pool_limit and self._pid == os.getpid():
            self._free.append(producer)
        else:
            producer.connection.release()

    def publish(self, message: Message, queue: Queue, *, priority: int | None = None,
                compression: str | None = None, retry: bool = True,
                retry_policy: Mapping[str, Any] | None = None) -> None:
        """Publish ``message`` to ``queue`` (declared on first use on each connection).

        :param retry: retry on connection errors following ``retry_policy``.
        :raises kombu.exceptions.OperationalError: the broker stayed
            unreachable after the retries.
        :raises ImproperlyConfigured: the broker refused the URL's credentials
            or virtual host, or to declare the queue (it exists with other
            arguments); not retried, the message says what to fix.
        :raises PublishRefused: RabbitMQ did not take the message (a negative
            publisher confirm, e.g. a full queue with ``reject-publish``; not retried).
        """
        producer = self._take()
        connection = producer.connection
        # The default exchange delivers straight to the queue named by the
        # routing key, sparing kombu's exchange-table lookup on Redis.
        exchange, routing_key = "", queue.name
        eta = envelope_eta({"headers": message.headers}) if is_amqp(connection) else None
        delayed = eta is not None and eta > time.time()
        if delayed:  # RabbitMQ: down the delay ladder
            exchange, routing_key = delayed_route(eta, queue.name)  # type: ignore[arg-type]
        options = dict(
            exchange=exchange, routing_key=routing_key, content_type=message.content_type,
            content_encoding=message.content_encoding, headers=message.headers,
            compression=compression, priority=priority, delivery_mode=2, **message.properties,
        )
        policy = dict(retry_policy or {})
        try:
            try:
                self._declare(producer, queue, False, policy, delayed)
                producer.publish(message.body, retry=False, **options)
            except connection.recoverable_connection_errors as exc:
                if type(exc).__name__ == "MessageNacked":  # py-amqp's, without importing it
                    raise PublishRefused(
                        f"The broker refused task {message.task_id} for queue {queue.name!r}: "
                        f"RabbitMQ did not confirm the publish (a length limit with overflow "
                        f"'reject-publish', or a resource alarm). It was not queued."
                    ) from exc
                if not retry:
                    raise
                logger.warning("Publishing task %s failed (%s); retrying.", message.task_id, exc)
                self._declared.pop(connection, None)
                self._declare(producer, queue, True, policy, delayed)
                producer.publish(message.body, retry=True, retry_policy=policy, **options)
        except BaseException as exc:
            connection.release()  # a fresh connection next time
            refused = (login_refused(exc, self.url) or declaration_refused(exc)) \
                if isinstance(exc, Exception) else None
            if refused is not None:
                raise ImproperlyConfigured(refused) from exc
            raise
        self._give_back(producer)

    def publish_many(self, items: Sequence[tuple[Message, Queue, int | None, str | None]], *,
                     retry: bool = True, retry_policy: Mapping[str, Any] | None = None,
                     batch_size: int = 1000) -> None:
        """Publish ``(message, queue, priority, compression)`` items in few round trips.

        Where the transport batches (Redis: kombu's ``Producer.batch``, one
        pipeline per ``batch_size`` messages) the messages go out together;
        elsewhere (RabbitMQ, the embedded broker) one by one through
        :meth:`publish`. On a connection error the batch is published again
        one by one through :meth:`publish` with the retry policy (a message
        the failed batch had written may be sent twice: publishing is at
        least once).

        :raises: as :meth:`publish`.
        """
        if not items:
            return
        policy = dict(retry_policy or {})
        producer = self._take()
        connection = producer.connection
        try:
            batches = not is_amqp(connection) and \
                getattr(producer.channel, "create_publish_batch", None) is not None
        except BaseException:
            connection.release()
            raise
        if not batches:
            self._give_back(producer)
            for message, queue, priority, compression in items:
                self.publish(message, queue, priority=priority, compression=compression,
                             retry=retry, retry_policy=policy)
            return
        start = 0
        try:
            for start in range(0, len(items), batch_size):
                part = items[start:start + batch_size]
                for _, queue, _, _ in part:
                    self._declare(producer, queue, False, policy, False)
                with producer.batch(max_size=batch_size + 1):  # flushed at the end only
                    for message, queue, priority, compression in part:
                        producer.publish(
                            message.body, retry=False, exchange="", routing_key=queue.name,
                            content_type=message.content_type,
                            content_encoding=message.content_encoding,
                            headers=message.headers, compression=compression,
                            priority=priority, delivery_mode=2, **message.properties)
        except connection.recoverable_connection_errors as exc:
            connection.release()
            if not retry:
                raise
            logger.warning("Publishing %d tasks failed (%s); publishing them one by one.",
                           len(items) - start, exc)
            for message, queue, priority, compression in items[start:]:  # earlier: flushed
                self.publish(message, queue, priority=priority, compression=compression,
                             retry=True, retry_policy=policy)
            return
        except BaseException:
            connection.release()
            raise
        self._give_back(producer)

    def _declare(self, producer: Producer, queue: Queue, retry: bool,
                 policy: Mapping[str, Any], delayed: bool) -> None:
        """Declare ``queue`` once per connection; on RabbitMQ also bind it to the end of
        the delay ladder, and declare the ladder itself before the first ``delayed``
        message (an app that never delays declares no ladder)."""
        declared = self._declared.setdefault(producer.connection, set())
        ladder = delayed and _LADDER not in declared
        if queue.name in declared and not ladder:
            return
        if queue.name not in declared:
            producer.maybe_declare(queue, retry, **policy)
        if is_amqp(producer.connection):
            # Imported for RabbitMQ only: py-amqp is not needed otherwise.
            from .transport.amqp import bind_queue, declare_ladder

            def declare() -> None:  # on the producer's channel, revived on retry
                if queue.name not in declared:
                    bind_queue(producer.channel, queue)
                if ladder:
                    declare_ladder(producer.channel, self.queue_type)

            if retry:
                producer.connection.ensure(producer, declare, **policy)()
            else:
                declare()
        declared.add(queue.name)
        if ladder:
            declared.add(_LADDER)

    def reset_after_fork(self) -> None:
        """Forget connections inherited from the parent (they belong to it)."""
        self._connection = None
        self._free = []
        self._pid = os.getpid()

    def close(self) -> None:
        """Close this process's idle connections."""
        if self._pid == os.getpid():
            for producer in self._free:
                producer.connection.release()
        self._free = []
        self._connection = None
