"""Which backend a ``RESULT_BACKEND`` URL names: :func:`make_backend`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..exceptions import ImproperlyConfigured
from .base import Backend, DisabledBackend

#: The embedded backend's SQLite file, in ``TASKS_EMBEDDED_DIR`` (the app's instance folder).
EMBEDDED_RESULTS_FILE = "flask_tasks-results.sqlite"


def make_backend(url: str | None, config: Config,
                 engine_factory: Callable[[], Any] | None = None,
                 broker_url: str | None = None) -> Backend:
    """Create the result backend named by ``RESULT_BACKEND`` (no I/O yet).

    Each backend module is imported only when a URL names it, so an app on
    Redis never imports SQLAlchemy, and one on SQL never imports redis.

    :param url: the ``RESULT_BACKEND`` value; ``None`` is the embedded
        default, a SQLite file in ``config.embedded_dir``.
    :param config: the app's settings (serializer, expiry, write retries).
    :param engine_factory: returns the app's Flask-SQLAlchemy engine, for
        ``RESULT_BACKEND = 'flask-sqlalchemy'`` (called on first use).
    :param broker_url: the app's broker URL, for ``rpc://`` (which sends results
        through RabbitMQ; ``None`` or another broker is an error).
    :raises ImproperlyConfigured: the URL's scheme is not one we support, or
        what it needs (an instance folder, Flask-SQLAlchemy, RabbitMQ) is missing.
    """
    common: dict[str, Any] = {
        "serializer": config.result_serializer,
        "expires": config.result_expires,
        "always_retry": config.result_backend_always_retry,
        "max_retries": config.result_backend_max_retries,
        "base_sleep": config.result_backend_base_sleep_between_retries,
        "max_sleep": config.result_backend_max_sleep_between_retries,
    }
    if url is None:
        if not config.embedded_dir:
            raise ImproperlyConfigured("RESULT_BACKEND is unset and the app has no instance "
                                       "path for the embedded backend; set RESULT_BACKEND.")
        from .sql import SQLBackend  # imported only when configured: see the docstring

        path = os.path.join(config.embedded_dir, EMBEDDED_RESULTS_FILE)
        return SQLBackend(f"sqlite:///{path}", **common)
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisBackend  # imported when configured

        return RedisBackend(url, **common)
    if scheme.startswith("db+"):
        from .sql import SQLBackend  # imported when configured

        return SQLBackend(url[3:], **common)
    if scheme == "flask-sqlalchemy":
        if engine_factory is None:
            raise ImproperlyConfigured("RESULT_BACKEND = 'flask-sqlalchemy' needs the app's "
                                       "Flask-SQLAlchemy extension (db.init_app(app)).")
        from .sql import SQLBackend  # imported when configured

        return SQLBackend(engine_factory=engine_factory, **common)
    if scheme == "rpc":
        from .rpc import RPCBackend  # imported when configured

        return RPCBackend(broker_url, transport_options=config.transport_options,
                          connect_timeout=config.broker_connection_timeout,
                          revokes_expires=config.revokes_expires, **common)
    if scheme == "disabled":
        return DisabledBackend(**common)
    raise ImproperlyConfigured(
        f"RESULT_BACKEND {url.split('://')[0]!r} is not supported. Use 'redis://host:port/db', "
        f"'rediss://...', 'db+<sqlalchemy url>' (e.g. 'db+postgresql://...'), "
        f"'flask-sqlalchemy' (the app's database), 'rpc://' (back to the caller over "
        f"RabbitMQ), 'disabled', or leave it unset for the "
        f"embedded default."
    )
