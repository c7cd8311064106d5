"""Broker connections with flask_tasks' transports, and URLs shown without their password.

:func:`broker_connection` is how every flask_tasks process connects to its
broker (the publisher, the worker, ``flask tasks purge``); :func:`mask_url`
is the one way a URL reaches a log line, a banner or an error.

Never imports Flask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kombu.connection import Connection
from kombu.utils.url import sanitize_url

__all__ = ["OWN_OPTIONS", "BrokerConnection", "broker_connection", "mask_url"]

#: Transport options only flask_tasks' transports (Redis, embedded) read; not
#: given to kombu's others (py-amqp passes its options on to the socket layer).
OWN_OPTIONS = ("dead_letter_max_entries", "max_message_size")


def mask_url(url: str | None) -> str:
    """``url`` with its password replaced by ``**``: the one way URLs are shown."""
    if not url:
        return str(url)
    if "@" not in url:
        return url
    try:
        return str(sanitize_url(url))
    except Exception:  # an unparsable URL: hide everything between :// and @
        head, sep, tail = url.partition("://")
        return f"{head}{sep}**@{tail.rsplit('@', 1)[-1]}" if "@" in tail else url


class BrokerConnection(Connection):
    """kombu's :class:`~kombu.Connection`, shown without a password it does not have.

    kombu's ``as_uri()`` (which ``ConsumerMixin`` logs as "Connected to ...")
    writes ``:**@`` even when the URL has no password; here a URL without one
    is shown as it is, and one with a password still has it masked.
    """

    if TYPE_CHECKING:  # kombu's own is untyped
        def __init__(self, hostname: str, **kwargs: Any) -> None: ...

    def as_uri(self, include_password: bool = False, mask: str = "**",
               *args: Any, **kwargs: Any) -> str:
        if not include_password and not self.password:
            include_password = True  # nothing to hide
        return str(Connection.as_uri(self, include_password, mask, *args, **kwargs))


def broker_connection(url: str, transport_options: Mapping[str, Any] | None = None,
                      connect_timeout: float | None = None) -> Connection:
    """A kombu :class:`~kombu.Connection` for ``url`` (not connected yet).

    ``embedded://`` URLs get the embedded transport (:mod:`.embedded`),
    ``redis://`` and ``rediss://`` flask_tasks' Redis transport (:mod:`.redis`);
    other URLs kombu's own.

    :param connect_timeout: seconds to wait for a connection (on Redis also
        its ``socket_connect_timeout``, unless the transport options set one).
    """
    # Each transport is imported only when a URL names it (Flask-SQLAlchemy's
    # way with optional features): redis-py alone takes ~60 ms to import.
    if url.startswith("embedded:"):
        from . import embedded  # noqa: F401 - registers the scheme with kombu

    options = dict(transport_options or {})
    connection = BrokerConnection(url, transport_options=options,
                                  connect_timeout=connect_timeout)
    if connection.transport_cls in ("redis", "rediss"):
        from .redis import Transport

        connection.transport_cls = Transport  # kombu's, with batched round trips
        if connect_timeout is not None:
            # kombu's Redis channel ignores the connection's connect_timeout, and
            # redis-py would wait for the OS (minutes, for a host that never answers).
            options.setdefault("socket_connect_timeout", connect_timeout)
    elif not url.startswith("embedded:"):
        for key in OWN_OPTIONS:
            options.pop(key, None)
    if connection.transport_cls in ("amqp", "pyamqp", "amqps"):
        from . import amqp  # noqa: F401 - registers its WorkerChannel (delayed delivery)
    return connection
