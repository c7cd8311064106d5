"""What every ``flask tasks`` command needs: the app's state, its broker and result backend.

A command that talks to the broker or the result backend fails fast: one
attempt to connect, bounded by ``TASKS_BROKER_CONNECTION_TIMEOUT``, then one
line naming the store (its URL masked by
:func:`~flask_tasks.transport.connect.mask_url`) and the cause, and exit
status 1::

    Error: Cannot reach the broker at redis://:**@127.0.0.1:1/0: Connection refused.

:func:`broker` gives a connected broker connection; :func:`backend_errors`
turns the result backend's connection errors into that line.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import click
from flask import Flask, current_app
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from ..app_state import AppState
from ..exceptions import ImproperlyConfigured
from ..transport.connect import broker_connection, login_refused, mask_url

__all__ = ["app_state", "backend_errors", "broker", "current_state", "describe",
           "split_names", "unreachable"]

#: URL schemes whose kombu transport takes its socket timeouts from transport options.
_REDIS_SCHEMES = ("redis", "rediss")


def app_state(app: Flask) -> AppState:
    """The flask_tasks state of ``app``.

    :raises RuntimeError: the app has no flask_tasks extension.
    """
    ext = app.extensions.get("tasks")
    if ext is None:
        raise RuntimeError("The app has no flask_tasks extension; call tasks.init_app(app).")
    state: AppState = ext.state(app)
    return state


def current_state() -> AppState:
    """The current app's state, with TASKS_IMPORTS imported (their tasks registered)."""
    state = app_state(current_app._get_current_object())  # type: ignore[attr-defined]
    for module in state.config.imports:
        importlib.import_module(module)
    return state


def split_names(_ctx: Any, _param: Any, value: tuple[str, ...]) -> list[str] | None:
    """Click callback: ``-Q a,b -Q c`` -> ``["a", "b", "c"]``; none given -> None."""
    names = [name.strip() for item in value for name in item.split(",") if name.strip()]
    return names or None


def describe(exc: BaseException, timeout: float | None = None, url: str | None = None) -> str:
    """The cause of a connection error, in a few words on one line, without a password.

    The innermost OS error of the chain speaks plainest ("Connection
    refused", "Name or service not known"); a socket timeout becomes "no
    answer within ``timeout`` s". Otherwise the first line of ``exc``.

    :param exc: the error raised (kombu's ``OperationalError``, redis-py's,
        SQLAlchemy's...).
    :param timeout: the connect timeout in seconds, for the timeout wording.
    :param url: the URL connected to: its password, should the message
        quote it, is replaced by ``**``.
    """
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    cause = ""
    for error in chain:
        if isinstance(error, TimeoutError) or "Timeout" in type(error).__name__:
            cause = "no answer" + (f" within {timeout:g} s" if timeout else " in time")
            break
    if not cause:
        for error in reversed(chain):
            if isinstance(error, OSError) and error.strerror:
                cause = error.strerror
                break
    if not cause:
        text = str(exc).strip()
        cause = text.splitlines()[0].strip() if text else type(exc).__name__
    try:
        password = urlsplit(url).password if url and "@" in url else None
    except ValueError:  # unparsable: mask_url shows it without anything after ://
        password = None
    if password:
        for secret in {password, unquote(password)}:
            cause = cause.replace(secret, "**")
    return cause.rstrip(".")


def unreachable(what: str, url: str | None, exc: BaseException,
                timeout: float | None = None) -> click.ClickException:
    """The one-line error for a store that cannot be reached (exit status 1).

    :param what: "the broker", "the result backend".
    :param url: its URL (shown masked).
    """
    refused = login_refused(exc, url)
    if refused is not None:  # reached, but it refused us: say what to fix
        return click.ClickException(refused)
    return click.ClickException(
        f"Cannot reach {what} at {mask_url(url)}: {describe(exc, timeout, url)}.")


def _connection_errors(conn: Connection) -> tuple[type[BaseException], ...]:
    # kombu's Redis transport counts KeyError among its connection errors;
    # a KeyError here is a bug to see, not an unreachable broker.
    errors = [error for error in conn.connection_errors
              if error.__module__ != "builtins" or issubclass(error, OSError)]
    return (OperationalError, *errors)


@contextmanager
def broker(state: AppState) -> Iterator[Connection]:
    """A connection to the app's broker, connected, closed on exit.

    One attempt to connect, bounded by ``TASKS_BROKER_CONNECTION_TIMEOUT``
    seconds (on Redis also each round trip of the command, unless
    ``TASKS_BROKER_TRANSPORT_OPTIONS`` sets ``socket_timeout``). Connection
    errors while connecting or in the ``with`` body become the one-line error.

    :raises click.ClickException: the broker cannot be reached (or stopped
        answering): "Cannot reach the broker at <masked URL>: <cause>."
    """
    url = state.broker_url
    timeout = state.config.broker_connection_timeout
    options = dict(state.config.transport_options)
    if url.partition("://")[0].lower() in _REDIS_SCHEMES:
        # kombu's Redis channel ignores the connection's connect_timeout, and
        # redis-py waits forever by default.
        options.setdefault("socket_connect_timeout", timeout)
        options.setdefault("socket_timeout", timeout)
    conn = broker_connection(url, options, timeout)
    errors = _connection_errors(conn)
    try:
        try:
            conn.ensure_connection(max_retries=0)  # one attempt, no retry sleeps
        except errors as exc:
            raise unreachable("the broker", url, exc, timeout) from None
        except Exception as exc:  # RabbitMQ's refusals are not among its connection errors
            refused = login_refused(exc, url)
            if refused is None:
                raise
            raise click.ClickException(refused) from None
        try:
            yield conn
        except errors as exc:
            raise unreachable("the broker", url, exc, timeout) from None
    finally:
        try:
            conn.release()
        except Exception:  # closing a dead connection may fail: nothing left to do
            pass


@contextmanager
def backend_errors(state: AppState) -> Iterator[None]:
    """Turn the result backend's connection errors in the body into the one-line error.

    The backend tells which errors mean it is unreachable
    (:meth:`~flask_tasks.backends.Backend.exception_safe_to_retry`).

    :raises click.ClickException: the result backend cannot be reached, or
        none is configured.
    """
    try:
        yield
    except ImproperlyConfigured as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        if not state.backend.exception_safe_to_retry(exc):
            raise
        url = state.config.result_backend
        if url:
            raise unreachable("the result backend", url, exc) from None
        raise click.ClickException(  # the embedded default: a SQLite file
            f"Cannot reach the result backend (the embedded default in "
            f"{state.config.embedded_dir}): {describe(exc)}.") from None
