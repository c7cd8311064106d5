"""A kombu transport that keeps its messages in one local SQLite file.

The zero-configuration default broker: processes on one machine (web
server, workers) share queues through one database file, with no server
to run. Importing this module registers the ``embedded`` scheme::

    kombu.Connection("embedded:////var/lib/app/broker.sqlite")  # absolute
    kombu.Connection("embedded:///broker.sqlite")  # relative to the CWD

Design: one ``messages`` row per queued message. A consumer *claims* the
first ready row (highest ``priority`` first, 0-9, as in AMQP; then
oldest) with one ``UPDATE ... RETURNING`` inside ``BEGIN IMMEDIATE``,
stamping it with a lease (owner token and ``lease_until``). The row stays
until the message is acked (deleted) or rejected (``requeue=False``
deletes it, ``requeue=True`` clears the lease). Closing a channel clears
the leases of the messages it holds. Consumers poll (:mod:`.polling`)
``min_polling_interval`` after a message, doubling up to
``polling_interval``; an idle poll reads only SQLite's ``data_version``
until another connection commits (or ``polling_interval`` passes).

Guarantees:

- At most one consumer holds a message at a time, across processes.
- If the holder dies without acking (even ``kill -9``), the message is
  redelivered once its lease expires, ``visibility_timeout`` seconds
  after the last renewal: at least once, with
  ``delivery_info["redelivered"]`` set.
- A slow consumer keeps its messages: while polled, a channel renews the
  leases of the messages it holds (delivered, not acked) every
  ``visibility_timeout / 3`` seconds; a worker that blocks while running
  a task calls :meth:`Channel.renew_leases` from another thread instead.

Limits: one machine, on a local file system (SQLite locking is not safe
on NFS or other network shares); a few hundred to a few thousand messages
per second (use Redis beyond that). Leases use the wall clock: a large
clock jump may redeliver early. Only ``direct`` and ``topic`` exchanges
work, not ``fanout`` (``Transport.implements`` says so). As in kombu's
other virtual transports, exchange bindings live in process memory: a
producer that routes through a named exchange must declare the queue
(``publish(..., declare=[queue])``); the default exchange always works.

Transport options (all seconds): ``visibility_timeout`` (default 30),
``polling_interval`` (0.05), ``min_polling_interval`` (0.001),
``busy_timeout`` (30, wait for the file lock), ``housekeeping_interval``
(60, WAL truncation and vacuum).
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
from urllib.parse import quote, unquote

import kombu.transport
from kombu.transport import virtual
from kombu.utils.json import dumps, loads

from ..protocol import envelope_eta
from . import polling

logger = logging.getLogger("flask_tasks.transport.embedded")

SCHEME = "embedded"

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: stale acks are harmless
    queue TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, payload TEXT NOT NULL,
    lease_until REAL, lease_owner TEXT, deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_claim ON messages (queue, priority DESC, id);
CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY);
COMMIT;
"""
_READY = "queue = ? AND (lease_until IS NULL OR lease_until < ?)"
_PICK = f"SELECT id FROM messages WHERE {_READY} ORDER BY priority DESC, id LIMIT 1"
_CLAIM = (
    "UPDATE messages SET lease_until = ?, lease_owner = ?,"
    f" deliveries = deliveries + 1 WHERE id = ({_PICK})"
    " RETURNING id, payload, deliveries"
)
_TAKE = f"DELETE FROM messages WHERE id = ({_PICK}) RETURNING id, payload, deliveries + 1"

Params = t.Sequence[t.Any]

# Connections opened before a fork. SQLite must not touch them in the
# child, not even to close them, so they are kept alive here.
_inherited: list[sqlite3.Connection] = []
_state_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _state_lock
    _state_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def url_for_path(path: str | os.PathLike[str]) -> str:
    """Return the ``embedded://`` URL of a database file.

    :param path: The database file; made absolute against the CWD.
    """
    return f"{SCHEME}:///" + quote(os.path.abspath(os.fspath(path)))


def path_from_url(url: str) -> str:
    """Return the absolute database path that an ``embedded`` URL names.

    As in SQLAlchemy, ``embedded:////abs/file`` (four slashes) is an
    absolute path and ``embedded:///file`` is relative to the CWD. A
    value without ``://`` is taken as a plain path.

    :param url: The URL, or a plain file system path.
    :raises ValueError: The URL names a host or no file.
    """
    target = url
    if "://" in url:
        rest = url.partition("://")[2].split("?", 1)[0]
        if not rest.startswith("/"):
            raise ValueError(
                f"Invalid broker URL {url!r}: use {SCHEME}:////absolute/path"
                f" or {SCHEME}:///relative/path."
            )
        target = unquote(rest[1:])
    if not target or target == "localhost":
        raise ValueError(f"No database file in broker URL {url!r}.")
    return os.path.abspath(target)


def _row_id(delivery_tag: t.Any) -> int:
    return int(str(delivery_tag).partition(".")[0])  # tag: "<row id>.<delivery>"


def _connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    conn = sqlite3.connect(path, busy_timeout, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA journal_size_limit = 16777216")
    deadline = time.monotonic() + busy_timeout
    while True:  # switching to WAL can fail at once while a peer creates the file
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # new file only
                conn.execute("PRAGMA journal_mode = WAL").fetchall()
            conn.executescript(_SCHEMA)
            return conn
        except sqlite3.OperationalError:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.05)


class QoS(virtual.QoS):
    """Acknowledgement state that acts on the database rows.

    ``ack`` and ``reject(requeue=False)`` delete the row;
    ``reject(requeue=True)`` and ``restore_unacked`` (on a clean close,
    through :meth:`Channel._restore`) clear its lease.
    """

    channel: Channel

    def ack(self, delivery_tag: t.Any) -> None:
        self.channel._delete_row(delivery_tag)
        super().ack(delivery_tag)

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
                delivered, dirty = t.cast(dict, self._delivered), t.cast(set, self._dirty)
                return [_row_id(tag) for tag in delivered if tag not in dirty]
            except RuntimeError:
                continue
        return []


class Channel(polling.Channel):
    """A channel with its own SQLite connection, opened lazily per process.

    :param connection: The :class:`Transport` this channel belongs to.
    """

    QoS = QoS
    from_transport_options = (*virtual.Channel.from_transport_options,  # type: ignore[assignment]
                              "visibility_timeout", "busy_timeout", "housekeeping_interval")
    #: Seconds a delivered message stays leased without renewal.
    visibility_timeout: float = 30.0
    #: Seconds to wait for the database lock before failing.
    busy_timeout: float = 30.0
    #: Seconds between WAL truncation and free-page vacuum.
    housekeeping_interval: float = 60.0

    def __init__(self, connection: Transport, **kwargs: t.Any) -> None:
        super().__init__(connection, **kwargs)
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
                self._conn = _connect(self.path, self.busy_timeout)
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
        if not self._query(_PICK, (queue, time.time())):
            raise Empty()  # an idle poll is one indexed read, no write lock
        now, owner = time.time(), self._db()[2]
        if no_ack:  # no ack will come: take the row out now
            rows = self._write([(_TAKE, (queue, now))])
        else:
            lease = (now + self.visibility_timeout, owner, queue, now)
            rows = self._write([(_CLAIM, lease)])
        if not rows:
            raise Empty()  # another consumer was faster
        row_id, payload, deliveries = rows[0]
        message: dict[str, t.Any] = loads(payload)
        props = message["properties"]
        props["delivery_tag"] = f"{row_id}.{deliveries}"
        props.setdefault("delivery_info", {})["redelivered"] = deliveries > 1
        return message

    def _delete_row(self, delivery_tag: t.Any) -> None:
        self._execute("DELETE FROM messages WHERE id = ?", (_row_id(delivery_tag),))

    def _release(self, delivery_tag: t.Any) -> None:
        sql = (
            "UPDATE messages SET lease_until = NULL, lease_owner = NULL"
            " WHERE id = ? AND lease_owner = ?"
        )
        self._execute(sql, (_row_id(delivery_tag), self._db()[2]))
        polling.doorbell.ring()

    def _restore(self, message: virtual.Message) -> None:
        self._release(message.delivery_tag)

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
        sql = f"SELECT COUNT(*) FROM messages WHERE {_READY}"
        return int(self._query(sql, (queue, time.time()))[0][0])

    def _purge(self, queue: str) -> int:
        sql = f"DELETE FROM messages WHERE {_READY}"  # held messages stay
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


class Transport(polling.Transport):
    """The kombu transport for ``embedded://`` URLs; see the module docs.

    :param client: The :class:`kombu.Connection` using this transport.
    :raises ValueError: The URL names no database file.
    """

    Channel = Channel
    can_parse_url = True  # kombu passes the whole URL as the hostname
    driver_type = "sqlite"
    driver_name = "sqlite3"
    implements = virtual.Transport.implements.extend(
        asynchronous=False, exchange_type=frozenset(["direct", "topic"]), heartbeats=False
    )
    connection_errors: tuple[type[BaseException], ...] = (  # type: ignore[assignment]
        *virtual.Transport.connection_errors, sqlite3.OperationalError)

    def __init__(self, client: t.Any, **kwargs: t.Any) -> None:
        #: Absolute path of the database file.
        self.path = path_from_url(client.hostname or "")
        super().__init__(client, **kwargs)

    def driver_version(self) -> str:
        return sqlite3.sqlite_version

    @property
    def default_connection_params(self) -> dict[str, t.Any]:
        return {}  # no "localhost" default: the URL must name a file


kombu.transport.TRANSPORT_ALIASES[SCHEME] = "flask_tasks.transport.embedded:Transport"
