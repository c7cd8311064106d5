"""``RESULT_BACKEND = "rpc://"``: states and results travel back to the caller as AMQP messages.

Celery's ``rpc`` backend, on the same wire (RabbitMQ brokers only):

- **The caller** (a process that sends tasks) has one reply queue, named by
  its *oid* (a UUID made per process, a new one after ``fork``): durable,
  auto-delete, ``x-expires`` = ``TASKS_RESULT_EXPIRES`` (Celery's binding).
  It is declared, and consumed, before the first task message is sent
  (:meth:`RPCBackend.on_task_call`); every task message carries the oid in
  its ``reply_to`` property.
- **The worker** publishes every state (RECEIVED, STARTED, progress,
  SUCCESS, FAILURE...) as Celery's meta mapping to the default exchange
  (``""``, Celery's ``Exchange(None)``) with the routing key ``reply_to``,
  ``correlation_id`` = the task id, ``delivery_mode`` 1 (transient, Celery's
  ``result_persistent = False``), in the result serializer. A message
  without ``reply_to`` cannot be answered: its states are dropped (a warning
  once per task).
- **Reading** (:mod:`.replies`): the caller consumes its queue, one thread
  draining it for all; a waiting thread wakes as soon as its task's state
  arrives. What arrives is kept per task id, so a result read once stays
  readable in this process until ``forget()``.

Results are messages, not records: only the process that sent a task reads
its result (:class:`~flask_tasks.exceptions.ResultNotAvailable` anywhere
else), and they are gone when that process exits. Revokes are kept in a
RabbitMQ stream (:mod:`.revokes`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from kombu.connection import Connection
from kombu.exceptions import OperationalError
from kombu.messaging import Producer
from kombu.serialization import dumps

from ...exceptions import ImproperlyConfigured
from ...result import OnMessage
from ...transport.connect import broker_connection, mask_url
from ...transport.delays import is_amqp_url
from ..base import Backend
from .replies import Replies
from .revokes import RevokeStream

__all__ = ["RPCBackend", "check_broker"]

logger = logging.getLogger("flask_tasks.backends")

def check_broker(broker_url: str | None) -> str:
    """The broker URL rpc:// can use (an AMQP one).

    :raises ImproperlyConfigured: no broker URL, or not RabbitMQ.
    """
    scheme = (broker_url or "").split("://", 1)[0].lower()
    if not is_amqp_url(broker_url):
        shown = "the embedded broker" if not broker_url or scheme == "embedded" \
            else mask_url(broker_url)
        raise ImproperlyConfigured(
            f"RESULT_BACKEND = 'rpc://' sends results back as AMQP messages, so it needs a "
            f"RabbitMQ broker (BROKER_URL = 'amqp://...'), not {shown}. Use "
            f"RESULT_BACKEND = 'redis://...' or a SQL database with this broker."
        )
    return str(broker_url)



class RPCBackend(Backend):
    """Results sent back to the caller over RabbitMQ (``RESULT_BACKEND = "rpc://"``).

    :param broker_url: the app's broker URL (``amqp://``); results use their own
        connections to it.
    :param transport_options: the broker's transport options.
    :param connect_timeout: seconds to wait for a connection.
    :param revokes_expires: seconds revokes are kept (the stream's ``x-max-age``).
    :param kwargs: see :class:`Backend` (``expires`` is the reply queue's ``x-expires``).
    :raises ImproperlyConfigured: the broker is not RabbitMQ.
    """

    no_groups = ("RESULT_BACKEND = 'rpc://' cannot save groups nor count chords: its "
                 "results are messages to the caller, not records other workers can read "
                 "(Celery's rpc backend cannot either). Use a Redis or SQL result backend "
                 "for groups and chords.")

    polls = False

    def __init__(self, broker_url: str | None, *,
                 transport_options: Mapping[str, Any] | None = None,
                 connect_timeout: float | None = None,
                 revokes_expires: float = 10800.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.broker_url = check_broker(broker_url)
        self.transport_options = dict(transport_options or {})
        self.connect_timeout = connect_timeout
        self.revokes_expires = revokes_expires
        # The error types of the AMQP transport (no I/O).
        probe = Connection(self.broker_url)
        #: What means "the broker cannot be reached now" (kombu raises OperationalError
        #: when it cannot connect).
        self.retry_errors: tuple[type[BaseException], ...] = (
            probe.recoverable_connection_errors + probe.connection_errors
            + (OSError, OperationalError))
        self._setup()

    def _setup(self) -> None:
        """Per-process state: made at init and again in a forked child."""
        self._pid = os.getpid()
        self._send_lock = threading.Lock()
        self._send_connection: Connection | None = None
        self._producer: Producer | None = None
        self._replies: Replies | None = None
        self._revokes: RevokeStream | None = None
        self._replies_lock = threading.Lock()
        self._unanswerable: OrderedDict[str, None] = OrderedDict()

    def connection(self, **transport_options: Any) -> Connection:
        """A new connection to the broker (not connected yet)."""
        return broker_connection(self.broker_url, {**self.transport_options, **transport_options},
                                 connect_timeout=self.connect_timeout)

    def _fresh(self) -> None:
        if self._pid != os.getpid():
            self._setup()

    @property
    def replies(self) -> Replies:
        """This process's reply queue (made on first use, anew after ``fork``)."""
        self._fresh()
        with self._replies_lock:
            if self._replies is None:
                self._replies = Replies(self.connection, self.accept, self.expires,
                                        self.retry_errors)
            return self._replies

    @property
    def revokes(self) -> RevokeStream:
        """The revokes' stream (made on first use, anew after ``fork``)."""
        self._fresh()
        with self._replies_lock:
            if self._revokes is None:
                self._revokes = RevokeStream(self.connection, self.revokes_expires)
            return self._revokes

    # -- the worker's side: send a state to the caller -------------------------------------
    def store_result(self, task_id: str, result: Any, state: str,
                     traceback: str | None = None, request: Any = None,
                     extended: bool = False, defer: bool = False,
                     reply_to: str | None = None) -> None:
        """Send ``state`` to the caller's reply queue (the message's ``reply_to``).

        Retried like every write while the broker cannot be reached. A task
        sent without ``reply_to`` cannot be answered: nothing is sent.

        :raises EncodeError: ``result`` cannot be encoded; nothing is sent.
        """
        address = getattr(request, "reply_to", None) or reply_to
        if not (address and isinstance(address, str)):
            self._unanswered(task_id, state)
            return
        meta = self.make_meta(task_id, result, state, traceback, request, extended)
        try:
            content_type, encoding, body = dumps(meta, serializer=self.serializer)
        except Exception:
            self.encode(meta)  # raises the EncodeError that says what to do
            raise
        self.retrying(lambda: self._publish(body, content_type, encoding, address, task_id),
                      "the %s result of %s", state, task_id)

    def _unanswered(self, task_id: str, state: str) -> None:
        if task_id in self._unanswerable:
            return
        self._unanswerable[task_id] = None
        if len(self._unanswerable) > 1000:
            self._unanswerable.popitem(last=False)
        logger.warning("Task %s came without reply_to, so with RESULT_BACKEND = 'rpc://' its "
                       "states (%s...) cannot be sent to anyone and are dropped. Its caller "
                       "does not use rpc:// results.", task_id, state)

    def _publish(self, body: Any, content_type: str, encoding: str, address: str,
                 task_id: str) -> None:
        self._fresh()
        with self._send_lock:
            try:
                if self._producer is None:
                    self._send_connection = self.connection()
                    self._producer = Producer(self._send_connection.default_channel)
                self._producer.publish(body, exchange="", routing_key=address,
                                       correlation_id=task_id, content_type=content_type,
                                       content_encoding=encoding, delivery_mode=1,
                                       retry=False)
            except Exception:
                self._drop_sender()
                raise

    def _drop_sender(self) -> None:
        connection, self._send_connection, self._producer = self._send_connection, None, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # already dead
                pass

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """Connection errors (the broker is down or restarting)."""
        return isinstance(exc, self.retry_errors)

    # -- the caller's side -------------------------------------------------------------
    def on_task_call(self, task_id: str) -> str:
        """Declare the reply queue (first call) and remember ``task_id``; the oid.

        :raises Exception: the broker's connection error when the queue cannot
            be declared (the task is not sent: its result would be lost).
        """
        replies = self.replies
        replies.declare()
        replies.sent(task_id)
        return replies.oid

    def get_task_meta(self, task_id: str) -> dict[str, Any]:
        """The latest state of a task this process sent (takes in what arrived; never blocks).

        :raises ResultNotAvailable: this process did not send ``task_id``.
        """
        return self.replies.poll(task_id)

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = 0.5,
                 on_message: OnMessage | None = None) -> dict[str, Any]:
        """Block until the task is ready; woken by its message (``interval`` is unused).

        :raises ResultNotAvailable: this process did not send ``task_id``.
        :raises TimeoutError: not ready within ``timeout`` seconds.
        """
        return self.replies.wait(task_id, timeout, on_message)

    def forget(self, task_id: str) -> None:
        """Drop the state kept for ``task_id`` in this process (nothing is stored elsewhere)."""
        self.replies.forget(task_id)

    # -- revokes -----------------------------------------------------------------------
    def _revoke(self, task_id: str, terminate: bool, expires: float) -> None:
        self.revokes.add(task_id, terminate, expires)

    def revoked(self) -> dict[str, bool]:
        """Unexpired revokes, read from the stream (new entries only; never blocks long)."""
        return self.revokes.read()

    # -- processes ---------------------------------------------------------------------
    def reset_after_fork(self) -> None:
        """Forget the parent's connections and reply queue: the child gets its own oid."""
        self._setup()

    def close(self) -> None:
        if self._pid != os.getpid():
            return
        with self._send_lock:
            self._drop_sender()
        if self._replies is not None:
            self._replies.close()
        if self._revokes is not None:
            self._revokes.close()
