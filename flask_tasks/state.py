"""Per-app state: config, router, result backend, publisher, and sending a task.

:class:`AppState` is what :class:`~flask_tasks.extension.Tasks` keeps for each
app it was initialized on (``tasks.state(app)``).
"""

from __future__ import annotations

import logging
import os
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app, has_app_context

from . import states
from .backends.base import Backend, DisabledBackend
from .config import Config
from .exceptions import ImproperlyConfigured, NotRegistered
from .protocol import accept_set, build, parse, to_datetime
from .publisher import Publisher
from .registry import shared_registry, unknown_task_message
from .result import AsyncResult, EagerResult
from .routing import Router
from .signals import after_task_publish, before_task_publish, send_robust
from .task import Task, current_request

if TYPE_CHECKING:
    from .extension import Tasks

logger = logging.getLogger("flask_tasks.state")

EMBEDDED_BROKER_FILE = "flask_tasks-broker.sqlite"
EMBEDDED_RESULTS_FILE = "flask_tasks-results.sqlite"


def make_backend(url: str | None, config: Config,
                 engine_factory: Callable[[], Any] | None = None) -> Backend:
    """Create the result backend named by ``RESULT_BACKEND`` (no I/O yet).

    :raises ImproperlyConfigured: the URL's scheme is not one we support.
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
        from .backends.sql import SQLBackend

        path = os.path.join(config.embedded_dir, EMBEDDED_RESULTS_FILE)
        return SQLBackend(f"sqlite:///{path}", **common)
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        from .backends.redis import RedisBackend

        return RedisBackend(url, **common)
    if scheme.startswith("db+"):
        from .backends.sql import SQLBackend

        return SQLBackend(url[3:], **common)
    if scheme == "flask-sqlalchemy":
        if engine_factory is None:
            raise ImproperlyConfigured("RESULT_BACKEND = 'flask-sqlalchemy' needs the app's "
                                       "Flask-SQLAlchemy extension (db.init_app(app)).")
        from .backends.sql import SQLBackend

        return SQLBackend(engine_factory=engine_factory, **common)
    if scheme == "disabled":
        return DisabledBackend(**common)
    raise ImproperlyConfigured(
        f"RESULT_BACKEND {url.split('://')[0]!r} is not supported. Use 'redis://host:port/db', "
        f"'rediss://...', 'db+<sqlalchemy url>' (e.g. 'db+postgresql://...'), "
        f"'flask-sqlalchemy' (the app's database), 'disabled', or leave it unset for the "
        f"embedded default."
    )


class AppState:
    """Everything flask_tasks keeps for one app: config, router, backend, publisher.

    Reached with ``tasks.state(app)``; the backend and the publisher are
    created on first use, and reset in a forked child.
    """

    def __init__(self, tasks: Tasks, app: Flask, config: Config) -> None:
        self.tasks = tasks
        self.config = config
        self.import_name = app.import_name
        self.router = Router(config.routes, config.default_queue)
        self.accept = accept_set(config.accept_content)
        if config.broker_url:
            self.broker_url = config.broker_url
        elif config.embedded_dir:
            from .transport.embedded import url_for_path

            self.broker_url = url_for_path(os.path.join(config.embedded_dir, EMBEDDED_BROKER_FILE))
        else:
            raise ImproperlyConfigured("BROKER_URL is unset and the app has no instance path "
                                       "for the embedded broker; set BROKER_URL.")
        self.broker_is_embedded = not config.broker_url
        self._app_ref = weakref.ref(app)
        self._publisher: Publisher | None = None
        engine_factory = None
        if (config.result_backend or "").lower().startswith("flask-sqlalchemy"):
            engine_factory = self._flask_sqlalchemy_engine
        # Built now so a bad RESULT_BACKEND fails in init_app; it connects on first use.
        self._backend: Backend = make_backend(config.result_backend, config, engine_factory)

    @property
    def backend(self) -> Backend:
        """The result backend (it connects on first use)."""
        return self._backend

    def _flask_sqlalchemy_engine(self) -> Any:
        app = self._app_ref()
        db = app.extensions.get("sqlalchemy") if app is not None else None
        if db is None:
            raise ImproperlyConfigured("RESULT_BACKEND = 'flask-sqlalchemy' but the app has no "
                                       "Flask-SQLAlchemy extension; call db.init_app(app).")
        bind = (self.config.result_backend or "").partition("://")[2] or None
        with app.app_context():  # type: ignore[union-attr]
            try:
                return db.engines[bind]
            except KeyError:
                raise ImproperlyConfigured(
                    f"RESULT_BACKEND names the Flask-SQLAlchemy bind {bind!r}, which "
                    f"SQLALCHEMY_BINDS does not define."
                ) from None

    @property
    def publisher(self) -> Publisher:
        """The publisher (its connection is made on first publish)."""
        if self._publisher is None:
            self._publisher = Publisher(
                self.broker_url,
                transport_options=self.config.broker_transport_options,
                pool_limit=self.config.broker_pool_limit,
                connect_timeout=self.config.broker_connection_timeout,
            )
        return self._publisher

    def result(self, task_id: str, task_name: str | None = None) -> AsyncResult[Any]:
        """An :class:`AsyncResult` for ``task_id`` on this app's backend."""
        return AsyncResult(task_id, self.backend, task_name=task_name,
                           revokes_expires=self.config.revokes_expires)

    def get_task(self, name: str) -> Task[Any, Any] | None:
        """The task registered as ``name`` on this app's ``Tasks`` or as a shared task."""
        return self.tasks.registry.get(name) or shared_registry.get(name)

    def task_names(self) -> list[str]:
        """Every task name this app can run, sorted."""
        return sorted(set(self.tasks.registry) | set(shared_registry))

    def _option(self, task: Task[Any, Any] | None, attr: str, value: Any) -> Any:
        if value is not None:
            return value
        return getattr(task, attr, None) if task is not None else None

    def send_task(self, name: str, args: Sequence[Any] | None = None,
                  kwargs: Mapping[str, Any] | None = None, *, task: Task[Any, Any] | None = None,
                  countdown: float | None = None, eta: datetime | None = None,
                  expires: float | timedelta | datetime | None = None,
                  queue: str | None = None, priority: int | None = None,
                  task_id: str | None = None, link: Any = None, link_error: Any = None,
                  retry: bool | None = None, retry_policy: Mapping[str, Any] | None = None,
                  serializer: str | None = None, compression: str | None = None,
                  headers: Mapping[str, Any] | None = None, ignore_result: bool | None = None,
                  time_limit: float | None = None, soft_time_limit: float | None = None,
                  retries: int = 0, **options: Any) -> AsyncResult[Any]:
        """Encode and publish one task message; see :meth:`Task.apply_async`."""
        config = self.config
        unknown = set(options) - {"group_id", "group_index", "chain", "chord", "root_id",
                                  "parent_id"}
        if unknown:
            raise TypeError(f"Unknown apply_async option(s): {sorted(unknown)}")
        if config.always_eager:
            local = task or self.get_task(name)
            if local is None:
                raise NotRegistered(unknown_task_message(name, len(self.task_names())))
            return self.apply_eagerly(local, tuple(args or ()), dict(kwargs or {}),
                                      task_id=task_id)
        task_id = task_id or str(uuid.uuid4())
        parent = current_request.get()
        serializer = self._option(task, "serializer", serializer) or config.serializer
        when = to_datetime(countdown) if countdown is not None else to_datetime(eta)
        expires = self._option(task, "expires", expires)
        ignore = self._option(task, "ignore_result", ignore_result)
        message = build(
            name, task_id, args, kwargs,
            serializer=serializer,
            root_id=options.pop("root_id", None) or (
                (parent.root_id or parent.id) if parent and not parent.called_directly else None),
            parent_id=options.pop("parent_id", None) or (
                parent.id if parent and not parent.called_directly else None),
            retries=retries,
            eta=when,
            expires=to_datetime(expires),
            time_limit=self._option(task, "time_limit", time_limit),
            soft_time_limit=self._option(task, "soft_time_limit", soft_time_limit),
            callbacks=_as_list(link),
            errbacks=_as_list(link_error),
            ignore_result=bool(ignore if ignore is not None else config.ignore_result),
            extra_headers=headers,
            group_id=options.pop("group_id", None),
            group_index=options.pop("group_index", None),
            chain=options.pop("chain", None),
            chord=options.pop("chord", None),
        )
        queue_obj = self.router.queue(self.router.queue_name(
            name, args, kwargs, {"queue": self._option(task, "queue", queue)}))
        policy = dict(config.publish_retry_policy)
        policy.update(retry_policy or {})
        send_robust(before_task_publish, name, body=message.body_tuple,
                    exchange=queue_obj.exchange.name, routing_key=queue_obj.routing_key,
                    headers=message.headers, properties=message.properties,
                    declare=[queue_obj], retry_policy=policy)
        self.publisher.publish(
            message, queue_obj,
            priority=_first(priority, getattr(task, "priority", None), config.default_priority),
            compression=self._option(task, "compression", compression) or config.compression,
            retry=config.publish_retry if retry is None else retry,
            retry_policy=policy,
        )
        send_robust(after_task_publish, name, body=message.body_tuple, headers=message.headers,
                    exchange=queue_obj.exchange.name, routing_key=queue_obj.routing_key)
        return self.result(task_id, name)

    def send_on_commit(self, name: str, args: Sequence[Any] | None = None,
                       kwargs: Mapping[str, Any] | None = None, **options: Any) -> AsyncResult[Any]:
        """:meth:`send_task` once the Flask-SQLAlchemy session commits (never on rollback).

        Without Flask-SQLAlchemy on the app, or outside a transaction, it is sent at once.

        :raises flask_tasks.exceptions.EncodeError: an argument cannot be serialized
            (checked now, not at commit).
        """
        task_id = options.pop("task_id", None) or str(uuid.uuid4())
        serializer = options.get("serializer") or getattr(options.get("task"), "serializer",
                                                          None) or self.config.serializer
        build(name, task_id, args, kwargs, serializer=serializer)  # fail now, not at commit
        app = current_app._get_current_object() if has_app_context() else self._app_ref()  # type: ignore[attr-defined]
        db = app.extensions.get("sqlalchemy") if app is not None else None
        session = db.session() if db is not None else None
        if session is None or not session.in_transaction():
            return self.send_task(name, args, kwargs, task_id=task_id, **options)
        pending = session.info.get(_PENDING_KEY)
        if pending is None:
            from sqlalchemy import event

            pending = session.info[_PENDING_KEY] = []
            event.listen(session, "after_commit", _publish_pending)
            event.listen(session, "after_transaction_end", _drop_pending)
        pending.append((self, name, args, kwargs, task_id, options))
        return self.result(task_id, name)

    def apply_eagerly(self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                      *, task_id: str | None = None, throw: bool | None = None,
                      **options: Any) -> EagerResult[Any]:
        """Run ``task`` here, through an encoded and decoded message; see :meth:`Task.apply`."""
        from .worker.executor import run_task

        task_id = task_id or str(uuid.uuid4())
        serializer = task.serializer or self.config.serializer
        app = current_app._get_current_object() if has_app_context() else self._app_ref()  # type: ignore[attr-defined]
        if app is None:
            raise RuntimeError("The app of this Tasks state is gone")
        retries = 0
        while True:  # a retry runs again at once (countdown and eta are not waited for)
            message = build(task.name, task_id, args, kwargs, serializer=serializer,
                            retries=retries)
            request = parse(message.headers, message.body, message.content_type,
                            message.content_encoding, self.accept, message.properties)
            request.is_eager = True
            outcome = run_task(app, self, task, request, store=self.config.store_eager_result)
            if outcome.state != states.RETRY:
                break
            retries += 1
        propagate = self.config.eager_propagates if throw is None else throw
        if propagate and outcome.exc is not None:
            raise outcome.exc
        meta: dict[str, Any] = {"task_id": task_id, "status": outcome.state,
                "result": outcome.exc if outcome.exc is not None else outcome.retval,
                "traceback": outcome.traceback, "children": [], "date_done": None}
        return EagerResult(task_id, meta, task_name=task.name)

    def reset_after_fork(self) -> None:
        """Forget connections inherited from the parent process."""
        if self._publisher is not None:
            self._publisher.reset_after_fork()
        self._backend.reset_after_fork()


_PENDING_KEY = "flask_tasks.on_commit"


def _publish_pending(session: Any) -> None:
    """``after_commit``: send what waited for this commit (not a savepoint's)."""
    if session.in_nested_transaction():  # a savepoint: the real commit is still to come
        return
    pending = session.info.get(_PENDING_KEY) or []
    session.info[_PENDING_KEY] = []
    for state, name, args, kwargs, task_id, options in pending:
        try:
            state.send_task(name, args, kwargs, task_id=task_id, **options)
        except Exception:  # the commit is done: report, and send the others
            logger.exception("Could not send task %s[%s] after the commit", name, task_id)


def _drop_pending(session: Any, transaction: Any) -> None:
    """``after_transaction_end`` of the outermost transaction: what is left is never sent.

    After a commit nothing is left (``after_commit`` sent it); after a rollback
    or a close without commit, the waiting tasks are dropped, with a log line.
    """
    if transaction.parent is not None:  # a savepoint ended: wait for the real end
        return
    dropped = session.info.get(_PENDING_KEY) or []
    session.info[_PENDING_KEY] = []
    for _, name, _args, _kwargs, task_id, _ in dropped:
        logger.info("Task %s[%s] not sent: the transaction ended without a commit",
                    name, task_id)


def _first(*values: Any) -> Any:
    """The first value that is not None (or None)."""
    return next((v for v in values if v is not None), None)


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    return [dict(item) if isinstance(item, Mapping) else item for item in items]
