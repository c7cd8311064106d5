"""The embedded broker's channel: claims, leases and acknowledgements on the SQLite rows.

See :mod:`flask_tasks.transport.embedded` for the design and its guarantees.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import typing as t
import uuid
from queue import Empty

from kombu import message as kombu_message
from kombu.transport import virtual
from kombu.utils.json import dumps

from ...protocol import envelope_eta
from .. import polling
from ..base import WorkerChannel
from ..dead_letters import MAX_ENTRIES
from ..envelope import MAX_MESSAGE_SIZE, BadEnvelope, check_envelope
from . import dead_letters
from .sqlite import CLAIM, PICK, READY, TAKE, Params, connect, row_id

if t.TYPE_CHECKING:
    from . import Transport

logger = logging.getLogger("flask_tasks.transport.embedded")

#: Most malformed rows set aside in one claim before it gives up for this poll.
MAX_SET_ASIDE = 100

# Connections opened before a fork. SQLite must not touch them in the
# child, not even to close them, so they are kept alive here.
_inherited: list[sqlite3.Connection] = []
_state_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _state_lock
    _state_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


class QoS(virtual.QoS):
    """Acknowledgement state that acts on the database rows.

    ``ack`` and ``reject(requeue=False)`` delete the row;
    ``reject(requeue=True)`` and ``restore_unacked`` (on a clean close,
    through :meth:`Channel._restore`) clear its lease.
    """

    channel: Channel

    if t.TYPE_CHECKING:  # kombu's, untyped: the signatures this module relies on
        def can_consume(self) -> bool: ...
        def _quick_ack(self, delivery_tag: t.Any) -> None: ...
        def append(self, message: t.Any, delivery_tag: t.Any) -> None: ...

    def ack(self, delivery_tag: t.Any) -> None:
        self.channel._delete_row(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: t.Any, requeue: bool = False) -> None:
        if requeue:
            self.channel._release(delivery_tag)
        else:
            self.channel._delete_row(delivery_tag)
        self._quick_ack(delivery_tag)

    def held_ids(self) -> list[int]:
        """Return the row ids of the delivered, not yet acked messages."""
        for _ in range(10):  # another thread may ack while we iterate
            try:
                delivered, dirty = self._delivered, self._dirty
                return [row_id(tag) for tag in delivered if tag not in dirty]
            except RuntimeError:
                continue
        return []


_QoS = QoS  # for annotations inside Channel, whose QoS attribute shadows the name


class Channel(polling.Channel, WorkerChannel):
    """A channel with its own SQLite connection, opened lazily per process.

    As a :class:`~flask_tasks.transport.base.WorkerChannel` it holds leases
    (:meth:`renew_leases`) and keeps delayed messages (:meth:`schedule`).

    :param connection: The :class:`Transport` this channel belongs to.
    """

    QoS = QoS
    from_transport_options = (*virtual.Channel.from_transport_options,  # type: ignore[assignment]
                              "visibility_timeout", "busy_timeout", "housekeeping_interval",
                              "dead_letter_max_entries", "max_message_size")
    #: Most dead letters kept per queue (None: no limit).
    dead_letter_max_entries: int | None = MAX_ENTRIES
    #: Largest entry taken, bytes; a larger one is set aside.
    max_message_size: int = MAX_MESSAGE_SIZE
    #: Seconds a delivered message stays leased without renewal.
    visibility_timeout: float = 30.0
    #: Seconds to wait for the database lock before failing.
    busy_timeout: float = 30.0
    #: Seconds between WAL truncation and free-page vacuum.
    housekeeping_interval: float = 60.0

    if t.TYPE_CHECKING:  # kombu's, untyped: the signatures this class relies on
        _qos: _QoS | None
        _tag_to_queue: dict[str, str]
        @property
        def qos(self) -> _QoS: ...
        Message: type[virtual.Message]

    def __init__(self, connection: Transport, **kwargs: t.Any) -> None:
        polling.Channel.__init__(self, connection, **kwargs)
        self.visibility_timeout = float(self.visibility_timeout)
        if self.visibility_timeout <= 0:
            raise ValueError("visibility_timeout must be positive.")
        self.busy_timeout = float(self.busy_timeout)
        self.housekeeping_interval = float(self.housekeeping_interval)
        self.path: str = connection.path
        self._pid: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._owner = ""
        self._noack_queues: set[str] = set()
        self._last_renew = self._last_housekeeping = time.monotonic()

    def _db(self) -> tuple[sqlite3.Connection, threading.RLock, str]:
        with _state_lock:
            pid = os.getpid()
            if pid != self._pid:  # first use, or first use after a fork
                if self._conn is not None:
                    _inherited.append(self._conn)
                self._conn, self._pid, self._lock = None, pid, threading.RLock()
                self._owner = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex}"
            if self._conn is None:
                self._conn = connect(self.path, self.busy_timeout)
            return self._conn, self._lock, self._owner

    def _query(self, sql: str, params: Params = ()) -> list[t.Any]:
        conn, lock, _ = self._db()
        with lock:  # fetch under the lock: threads share the connection
            return conn.execute(sql, params).fetchall()

    def _execute(self, sql: str, params: Params = ()) -> int:
        conn, lock, _ = self._db()
        with lock:
            return conn.execute(sql, params).rowcount

    def _write(self, statements: list[tuple[str, Params]]) -> list[t.Any]:
        """Run statements in one write transaction; return the last's rows."""
        conn, lock, _ = self._db()
        with lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows: list[t.Any] = []
                for sql, params in statements:
                    rows = conn.execute(sql, params).fetchall()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return rows

    # -- messages and leases ---------------------------------------------

    def _put(self, queue: str, message: dict[str, t.Any], **kwargs: t.Any) -> None:
        # A message with a future ``eta`` header is stored leased by nobody
        # until then: no consumer can claim it before it is due.
        sql = "INSERT INTO messages (queue, priority, payload, lease_until) VALUES (?, ?, ?, ?)"
        priority = self._get_message_priority(message)
        eta = envelope_eta(message)
        not_before = eta if eta is not None and eta > time.time() else None
        self._execute(sql, (queue, priority, dumps(message), not_before))
        polling.doorbell.ring()

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, t.Any]:
        return self._claim(queue, no_ack=queue in self._noack_queues)

    def _claim(self, queue: str, no_ack: bool) -> dict[str, t.Any]:
        for _ in range(MAX_SET_ASIDE):  # malformed rows are set aside; the next is tried
            if not self._query(PICK, (queue, time.time())):
                raise Empty()  # an idle poll is one indexed read, no write lock
            now, owner = time.time(), self._db()[2]
            if no_ack:  # no ack will come: take the row out now
                rows = self._write([(TAKE, (queue, now))])
            else:
                lease = (now + self.visibility_timeout, owner, queue, now)
                rows = self._write([(CLAIM, lease)])
            if not rows:
                raise Empty()  # another consumer was faster
            row, payload, deliveries = rows[0]
            try:
                message = check_envelope(payload, self.max_message_size, require_tag=False)
            except BadEnvelope as exc:
                self._set_aside_row(queue, row, payload, str(exc), taken=no_ack)
                continue
            props = message["properties"]
            props["delivery_tag"] = f"{row}.{deliveries}"
            props["delivery_info"]["redelivered"] = deliveries > 1
            return message
        raise Empty()

    def _set_aside_row(self, queue: str, row: int, payload: t.Any, reason: str,
                       taken: bool = False) -> None:
        """Move a claimed row to the dead letters, atomically (a crash leaves it leased)."""
        entry = payload if isinstance(payload, bytes) else str(payload).encode(
            "utf-8", "surrogateescape")
        statements: list[tuple[str, Params]] = []
        if not taken:
            statements.append(("DELETE FROM messages WHERE id = ? AND lease_owner = ?",
                               (row, self._db()[2])))
        statements += dead_letters.insert(queue, entry, reason, self.node_name,
                                          self.dead_letter_max_entries)
        letter_id = self._write(statements)[0][0]
        self.dead_lettered += 1
        logger.error("Set aside an entry of queue %r as dead letter %s: %s (%d so far; "
                     "`flask tasks dead-letters show %s`)", queue, letter_id, reason,
                     self.dead_lettered, letter_id)

    def _delete_row(self, delivery_tag: t.Any) -> None:
        self._execute("DELETE FROM messages WHERE id = ?", (row_id(delivery_tag),))

    def _release(self, delivery_tag: t.Any) -> None:
        sql = (
            "UPDATE messages SET lease_until = NULL, lease_owner = NULL"
            " WHERE id = ? AND lease_owner = ?"
        )
        self._execute(sql, (row_id(delivery_tag), self._db()[2]))
        polling.doorbell.ring()

    def _restore(self, message: virtual.Message) -> None:
        self._release(message.delivery_tag)

    # -- WorkerChannel -----------------------------------------------------

    @property
    def lease_timeout(self) -> float:
        return self.visibility_timeout

    @property
    def dead_letters(self) -> dead_letters.EmbeddedDeadLetters:
        return dead_letters.EmbeddedDeadLetters(self, self.dead_letter_max_entries)

    def dead_letter(self, message: kombu_message.Message, reason: str) -> bool:
        """Move a delivered message's row to the dead letters and forget it, atomically."""
        if not isinstance(message, virtual.Message):
            return False
        tag = message.delivery_tag
        queue = message.delivery_info.get("routing_key") or ""
        self._set_aside_row(queue, row_id(tag), dumps(message.serializable()).encode(), reason)
        self.qos._quick_ack(tag)
        return True

    def can_consume(self) -> bool:
        return self.qos.can_consume()

    def renew_leases(self) -> int:
        """Extend the leases of the messages this channel holds.

        The channel calls this itself while it is polled. A worker that
        blocks while running a task should call it from another thread
        at least every ``visibility_timeout / 3`` seconds. Thread safe.

        :return: The number of leases renewed; fewer than the messages
            held if some leases expired and were claimed by others.
        """
        self._last_renew = time.monotonic()
        ids = self._qos.held_ids() if self._qos is not None else []
        if not ids:
            return 0
        sql = (
            "UPDATE messages SET lease_until = ? WHERE lease_owner = ?"
            " AND id IN (SELECT value FROM json_each(?))"
        )
        until = time.time() + self.visibility_timeout
        count = self._execute(sql, (until, self._db()[2], json.dumps(ids)))
        if count < len(ids):
            logger.debug("Renewed %d of %d held leases.", count, len(ids))
        return count

    def schedule(self, message: kombu_message.Message, queue: str) -> bool:
        """Store a copy of a message that arrived before its ``eta``, leased until then."""
        if not isinstance(message, virtual.Message):
            return False
        self._put(queue, message.serializable())  # as kombu restores a message
        return True

    # -- polling -----------------------------------------------------------

    def _maintain(self) -> None:
        now = time.monotonic()
        held = self._qos is not None and self._qos._delivered
        if held and now - self._last_renew >= self.visibility_timeout / 3:
            self.renew_leases()
        if now - self._last_housekeeping < self.housekeeping_interval:
            return
        self._last_housekeeping = now
        conn, lock, _ = self._db()
        with lock:
            conn.executescript("PRAGMA incremental_vacuum;")  # execute() frees one page
            conn.execute("PRAGMA busy_timeout = 100")  # never stall a poll
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.OperationalError:  # busy: next time, then
                pass
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")

    def change_token(self) -> tuple[int, int]:
        """Commits by other connections (SQLite's ``data_version``), puts in this process."""
        return self._query("PRAGMA data_version")[0][0], polling.doorbell.rings

    def drain_events(self, timeout: float | None = None, callback: t.Any = None) -> t.Any:
        self._maintain()  # also when prefetch is full and nothing is fetched
        return super().drain_events(timeout=timeout, callback=callback)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: t.Any) -> t.Any:
        self._maintain()
        try:
            message = self.Message(self._claim(queue, no_ack=no_ack), channel=self)
        except Empty:
            return None
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def basic_consume(self, queue: str, no_ack: bool, *args: t.Any, **kw: t.Any) -> t.Any:
        if no_ack:
            self._noack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kw)

    def basic_cancel(self, consumer_tag: str) -> t.Any:
        self._noack_queues.discard(self._tag_to_queue.get(consumer_tag, ""))
        return super().basic_cancel(consumer_tag)

    # -- queues ------------------------------------------------------------

    def _new_queue(self, queue: str, **kwargs: t.Any) -> None:
        self._execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue,))

    def _has_queue(self, queue: str, **kwargs: t.Any) -> bool:
        return bool(self._query("SELECT 1 FROM queues WHERE name = ?", (queue,)))

    def _size(self, queue: str) -> int:
        sql = f"SELECT COUNT(*) FROM messages WHERE {READY}"
        return int(self._query(sql, (queue, time.time()))[0][0])

    def _purge(self, queue: str) -> int:
        sql = f"DELETE FROM messages WHERE {READY}"  # held messages stay
        return self._execute(sql, (queue, time.time()))

    def _delete(self, queue: str, *args: t.Any, **kwargs: t.Any) -> None:
        sql = ("DELETE FROM messages WHERE queue = ?", "DELETE FROM queues WHERE name = ?")
        self._write([(sql[0], (queue,)), (sql[1], (queue,))])

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: t.Any
    ) -> None:
        # The base class only deletes queues that this process bound.
        if not (if_empty and self._size(queue)):
            self._delete(queue)
            self.state.queue_bindings_delete(queue)

    def close(self) -> None:
        super().close()  # clears the leases of unacked messages first
        with _state_lock:
            conn, self._conn = self._conn, None
            if conn is not None and self._pid != os.getpid():
                _inherited.append(conn)
                conn = None
        if conn is not None:
            conn.close()
