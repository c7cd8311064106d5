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

from .delays import is_amqp_url

__all__ = ["OWN_OPTIONS", "BrokerConnection", "broker_connection", "declaration_refused",
           "login_refused", "mask_url"]

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
                      connect_timeout: float | None = None,
                      heartbeat: float | None = None) -> Connection:
    """A kombu :class:`~kombu.Connection` for ``url`` (not connected yet).

    ``embedded://`` URLs get the embedded transport (:mod:`.embedded`),
    ``redis://`` and ``rediss://`` flask_tasks' Redis transport (:mod:`.redis`);
    other URLs kombu's own. On RabbitMQ, publisher confirms are on unless the
    transport options say ``confirm_publish: False``: a publish returns once
    the broker has the message, and one it refuses raises
    :exc:`amqp.exceptions.MessageNacked`.

    :param connect_timeout: seconds to wait for a connection (on Redis also
        its ``socket_connect_timeout``, unless the transport options set one).
    :param heartbeat: seconds between AMQP heartbeats (RabbitMQ; None or 0:
        none). Whoever holds the connection calls its ``heartbeat_check()``.
    """
    # Each transport is imported only when a URL names it (Flask-SQLAlchemy's
    # way with optional features): redis-py alone takes ~60 ms to import.
    if url.startswith("embedded:"):
        from . import embedded  # noqa: F401 - registers the scheme with kombu

    options = dict(transport_options or {})
    rabbitmq = is_amqp_url(url)
    if rabbitmq:
        options.setdefault("confirm_publish", True)
    connection = BrokerConnection(url, transport_options=options,
                                  connect_timeout=connect_timeout,
                                  heartbeat=(heartbeat or 0) if rabbitmq else 0)
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


def login_refused(exc: BaseException, url: str | None) -> str | None:
    """What to fix, in one sentence, when ``exc`` says the broker refused ``url``'s
    credentials or virtual host; None for any other error (one worth retrying).

    RabbitMQ: ``ACCESS_REFUSED`` (403: a wrong user name or password, or a
    user without access to the virtual host) and ``NOT_ALLOWED`` (530: no such
    virtual host). Redis: a refused ``AUTH`` (a wrong password or ACL user,
    or a password the server requires and the URL lacks). The password is never shown.
    """
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(url or "")
        user, vhost = parts.username, unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    except ValueError:
        user, vhost = None, "?"
    names = {cls.__name__ for cls in type(exc).__mro__}
    shown = mask_url(url)
    reply = (str(getattr(exc, "reply_text", "") or exc).splitlines() or [""])[0].rstrip(".")
    code = getattr(exc, "reply_code", None)
    if type(exc).__module__.startswith("amqp"):
        if code == 403 or "AccessRefused" in names:
            if "vhost" in reply.lower():
                return (f"The broker at {shown} refused user {user!r} access to virtual host "
                        f"{vhost!r} ({reply}). Grant it (rabbitmqctl set_permissions -p "
                        f"{vhost} {user} '.*' '.*' '.*') or fix the virtual host in BROKER_URL.")
            return (f"The broker at {shown} refused the login of user {user!r}: check the user "
                    f"name and password in BROKER_URL ({reply}).")
        if code == 530 or "NotAllowed" in names:
            return (f"The broker at {shown} has no virtual host {vhost!r} ({reply}): create it "
                    f"(rabbitmqctl add_vhost {vhost}) or fix the path of BROKER_URL "
                    f"(amqp://host// is the default virtual host '/').")
        return None
    if "AuthenticationError" in names or "AuthenticationWrongNumberOfArgsError" in names \
            or reply.startswith(("NOAUTH", "WRONGPASS")):
        return (f"The broker at {shown} refused the login: check the user name and password "
                f"in BROKER_URL ({reply}).")
    return None


def declaration_refused(exc: BaseException) -> str | None:
    """What to fix, in one sentence, when RabbitMQ refused to declare a queue or exchange
    because it exists with other arguments (``PRECONDITION_FAILED``, 406: another
    ``x-queue-type``, ``x-max-priority``...); None for any other error.

    Redeclaring never changes an existing queue, and every process that declares it
    (Celery's included) must ask for the same arguments.
    """
    if not type(exc).__module__.startswith("amqp") or getattr(exc, "reply_code", None) != 406:
        return None
    reply = (str(getattr(exc, "reply_text", "") or exc).splitlines() or [""])[0]
    return (f"RabbitMQ refused a declaration: {reply}. A queue keeps the arguments it was "
            f"first declared with: make TASKS_DEFAULT_QUEUE_TYPE and TASKS_QUEUE_MAX_PRIORITY "
            f"(and Celery's task_default_queue_type, task_queue_max_priority) match it, or "
            f"delete it once it is empty (rabbitmqctl delete_queue NAME) so it is declared "
            f"anew.")
