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

As a worker's channel (:class:`~flask_tasks.transport.base.WorkerChannel`)
it holds leases (``lease_timeout``, ``renew_leases``) and keeps delayed
messages (``schedule``); due ones need no moving. The channel is in
:mod:`.channel`, the SQLite file's schema and opening in :mod:`.sqlite`.
Never imports Flask.
"""

from __future__ import annotations

import os
import sqlite3
import typing as t
from urllib.parse import quote, unquote

import kombu.transport
from kombu.transport import virtual

from .. import polling
from .channel import Channel, QoS

__all__ = ["SCHEME", "Channel", "QoS", "Transport", "path_from_url", "url_for_path"]

SCHEME = "embedded"


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
        polling.Transport.__init__(self, client, **kwargs)

    def driver_version(self) -> str:
        return sqlite3.sqlite_version

    @property
    def default_connection_params(self) -> dict[str, t.Any]:
        return {}  # no "localhost" default: the URL must name a file


kombu.transport.TRANSPORT_ALIASES[SCHEME] = "flask_tasks.transport.embedded:Transport"
