"""The caller's side of rpc://: this process's reply queue and the states it brought.

One reply queue per process, named by its *oid* (a UUID, a new one after
``fork``): durable, auto-delete, ``x-expires`` = ``TASKS_RESULT_EXPIRES``, as
Celery's binding. It is declared and consumed (without acknowledgements, as
Celery does) before the first task message is sent. One thread at a time
drains the connection for every waiting thread; the others wait on a
condition and wake as soon as a state arrives. What arrives is kept per task
id (the latest state; a ready one is never replaced).
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue
from kombu.message import Message
from kombu.messaging import Consumer

from ... import states
from ...exceptions import ResultNotAvailable, TimeoutError
from ...result import OnMessage
from ...transport.connect import mask_url

logger = logging.getLogger("flask_tasks.backends")

#: The task ids a process remembers sending (with their latest state); the oldest are
#: forgotten past this many, and read as never sent.
MAX_KEPT = 100_000
#: Longest single wait on the connection, seconds (a waiter checks its deadline between).
DRAIN_STEP = 1.0


def not_sent_here(task_id: str) -> ResultNotAvailable:
    """The error for reading the result of a task this process did not send."""
    return ResultNotAvailable(
        f"Task {task_id} was not sent by this process, and with RESULT_BACKEND = 'rpc://' "
        f"only the process that sent a task receives its states and result (they are "
        f"messages to its own reply queue, gone when it exits). Read it where it was sent, "
        f"or use a result backend that stores results (RESULT_BACKEND = 'redis://...' or "
        f"'db+postgresql://...') to read them from any process or `flask tasks result`."
    )


def pending(task_id: str) -> dict[str, Any]:
    """The meta of a task whose first state has not arrived."""
    return {"status": states.PENDING, "result": None, "traceback": None, "children": [],
            "date_done": None, "task_id": task_id}


def newer(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """True when ``new`` replaces ``old`` as a task's latest state.

    A ready state is final; RECEIVED (sent by a worker's main process, while a
    prefork child sends the rest on its own connection) may arrive after
    STARTED or progress and does not replace them.
    """
    if old is None:
        return True
    if old["status"] in states.READY_STATES:
        return False
    return new["status"] != states.RECEIVED or old["status"] in (states.PENDING, states.RETRY)


class Replies:
    """This process's reply queue and the states it brought: the caller's side of rpc://.

    :param connect: makes a new (unconnected) broker connection.
    :param accept: content types accepted in replies.
    :param expires: the queue's ``x-expires``, seconds (None: never).
    :param retry_errors: what means the broker cannot be reached now (the
        connection is made again).
    """

    def __init__(self, connect: Any, accept: set[str], expires: float | None,
                 retry_errors: tuple[type[BaseException], ...]) -> None:
        #: The reply queue's name and every message's ``reply_to``.
        self.oid = str(uuid.uuid4())
        self.queue = Queue(self.oid, routing_key=self.oid, durable=True, auto_delete=True,
                           expires=expires)
        self._connect = connect
        self._accept = accept
        self._retry_errors = retry_errors
        #: Notified whenever a state arrives or the connection is free again.
        self.changed = threading.Condition()
        #: task id -> its latest state (None: sent, nothing arrived yet). LRU order.
        self._metas: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self._busy = False  # a thread uses the connection (outside the lock)
        self._connection: Connection | None = None

    # -- bookkeeping (under self.changed) ------------------------------------------------
    def sent(self, task_id: str) -> None:
        """Remember that this process sent ``task_id`` (its states come here)."""
        with self.changed:
            self._keep(task_id, self._metas.get(task_id))

    def _keep(self, task_id: str, meta: dict[str, Any] | None) -> None:
        """Keep ``meta`` as the latest state of ``task_id`` (under the lock), newest last."""
        self._metas[task_id] = meta
        self._metas.move_to_end(task_id)
        while len(self._metas) > MAX_KEPT:
            self._metas.popitem(last=False)

    def forget(self, task_id: str) -> None:
        """Drop what arrived for ``task_id`` (it reads as PENDING again)."""
        with self.changed:
            if task_id in self._metas:
                self._metas[task_id] = None

    def _latest(self, task_id: str) -> dict[str, Any] | None:
        if task_id not in self._metas:
            raise not_sent_here(task_id)
        return self._metas[task_id]

    def _on_message(self, message: Message) -> None:
        """A state arrived (called in the thread that drains)."""
        try:
            meta = message.decode()
            if not isinstance(meta, dict) or not isinstance(meta.get("status"), str):
                raise ValueError(f"no state in {meta!r:.200}")
            task_id = (message.properties or {}).get("correlation_id") or meta["task_id"]
            meta.setdefault("task_id", task_id)
        except Exception as exc:
            logger.warning("Dropped a reply on %s that is not a task state: %r", self.oid, exc)
            return
        with self.changed:
            if newer(self._metas.get(task_id), meta):
                self._keep(task_id, meta)
            self.changed.notify_all()

    # -- the connection (used by the thread that set _busy) -------------------------------
    def _take(self) -> bool:
        """Take the connection if it is free (under the lock)."""
        if self._busy:
            return False
        self._busy = True
        return True

    def _give_back(self) -> None:
        with self.changed:
            self._busy = False
            self.changed.notify_all()

    def _ensure(self) -> Connection:
        """The connection, consuming the reply queue (declared) from the first call on."""
        if self._connection is None:
            connection = self._connect()
            try:
                channel = connection.default_channel
                self.queue(channel).declare()
                Consumer(channel, [self.queue], no_ack=True, accept=self._accept,
                         on_message=self._on_message, auto_declare=False).consume()
            except Exception:
                self._drop(connection)
                raise
            self._connection = connection
        return self._connection

    def _drop(self, connection: Connection | None = None) -> None:
        connection = connection or self._connection
        self._connection = None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # a dead connection may fail to close: nothing left to do
                pass

    def _drain(self, timeout: float) -> None:
        """Receive what arrives within ``timeout`` seconds (0: only what is here)."""
        connection = self._ensure()
        try:
            if timeout <= 0:
                # A round trip: the server sends what it delivered before the answer.
                connection.default_channel.queue_declare(self.oid, passive=True)
            while True:
                connection.drain_events(timeout=timeout)
                timeout = 0
        except builtins.TimeoutError:
            return
        except self._retry_errors as exc:
            logger.warning("rpc:// lost its connection to %s (%s: %s); reconnecting. States "
                           "sent meanwhile are lost.", mask_url(connection.as_uri()),
                           type(exc).__name__, exc)
            self._drop()
            raise

    def declare(self) -> None:
        """Declare and consume the reply queue, unless it is (before a task is sent)."""
        with self.changed:
            while True:
                if self._connection is not None:  # consuming already
                    return
                if self._take():
                    break
                self.changed.wait()
        try:
            self._ensure()
        finally:
            self._give_back()

    # -- reading -----------------------------------------------------------------------
    def poll(self, task_id: str) -> dict[str, Any]:
        """The latest state of ``task_id``, after taking in what has arrived (never blocks).

        :raises ResultNotAvailable: this process did not send ``task_id``.
        """
        with self.changed:
            meta = self._latest(task_id)
            if (meta is not None and meta["status"] in states.READY_STATES) \
                    or not self._take():
                return meta or pending(task_id)
        try:
            try:
                self._drain(0)
            except self._retry_errors:  # a connection that went stale while idle
                self._drain(0)
        finally:
            self._give_back()
        with self.changed:
            return self._metas.get(task_id) or pending(task_id)

    def wait(self, task_id: str, timeout: float | None,
             on_message: OnMessage | None) -> dict[str, Any]:
        """Block until ``task_id`` is ready; woken by its message.

        :raises ResultNotAvailable: this process did not send ``task_id``.
        :raises TimeoutError: not ready within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last: str | None = None
        while True:
            drain = False
            with self.changed:
                meta = self._latest(task_id) or pending(task_id)
                left = DRAIN_STEP if deadline is None else deadline - time.monotonic()
                ready = meta["status"] in states.READY_STATES
                if not ready and left > 0:
                    drain = self._take()
                    if not drain and meta["status"] == last:
                        self.changed.wait(min(left, DRAIN_STEP))
                        continue
            if meta["status"] != last:
                last = meta["status"]
                if on_message is not None:
                    on_message(meta)
            if ready:
                return meta
            if left <= 0:
                raise TimeoutError(f"Task {task_id} was not ready within {timeout} s "
                                   f"(state {meta['status']}).")
            if drain:
                try:
                    self._drain(min(left, DRAIN_STEP))
                except self._retry_errors as exc:  # the broker is away: try again shortly
                    logger.debug("Waiting for %s: %r", task_id, exc)
                    time.sleep(min(0.2, max(0.0, left)))
                finally:
                    self._give_back()

    def close(self) -> None:
        with self.changed:
            if self._busy:
                return  # a thread is waiting on it; it goes with the process
            self._drop()
