"""Per-app state: config, router, result backend, publisher, and sending a task.

:class:`AppState` is what :class:`~flask_tasks.extension.Tasks` keeps for each
app it was initialized on (``tasks.state(app)``).
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

from flask import Flask, current_app, has_app_context

from . import on_commit, states
from .backends import Backend, make_backend
from .builtins import builtin_tasks
from .config import Config
from .exceptions import ImproperlyConfigured, NotRegistered
from .options import CallOptions, as_list, check_call_options, first, resolve
from .protocol import accept_set, build, parse
from .publisher import Publisher
from .registry import Registry, shared_registry, unknown_task_message
from .result import AsyncResult, EagerResult
from .routing import Router
from .signals import after_task_publish, before_task_publish, send_robust
from .task import Task, current_request
from .trace import trace_task
from .transport.delays import is_amqp_url
from .transport.embedded import url_for_path

#: The options eager mode carries into the message it builds (the canvas's);
#: ``apply()`` uses these (and ``task_id``, ``throw``) and ignores others, as Celery's.
EAGER_OPTIONS = frozenset({"link", "link_error", "chain", "group_id", "group_index",
                           "parent_id", "root_id"})

#: The embedded broker's SQLite file, in ``TASKS_EMBEDDED_DIR`` (the app's instance folder).
EMBEDDED_BROKER_FILE = "flask_tasks-broker.sqlite"


class AppState:
    """Everything flask_tasks keeps for one app: config, router, backend, publisher.

    Reached with ``tasks.state(app)``; the backend and the publisher are
    created on first use, and reset in a forked child.
    """

    def __init__(self, registry: Registry, app: Flask, config: Config) -> None:
        #: The tasks of the ``Tasks`` extension this state belongs to.
        self.registry = registry
        self.config = config
        self.import_name = app.import_name
        self.accept = accept_set(config.accept_content)
        if config.broker_url:
            self.broker_url = config.broker_url
        elif config.embedded_dir:
            self.broker_url = url_for_path(os.path.join(config.embedded_dir, EMBEDDED_BROKER_FILE))
        else:
            raise ImproperlyConfigured("BROKER_URL is unset and the app has no instance path "
                                       "for the embedded broker; set BROKER_URL.")
        self.broker_is_embedded = not config.broker_url
        self.router = Router(config.routes, config.default_queue,
                             config.queue_arguments if is_amqp_url(self.broker_url) else None)
        self._app_ref = weakref.ref(app)
        self._publisher: Publisher | None = None
        engine_factory = None
        if (config.result_backend or "").lower().startswith("flask-sqlalchemy"):
            engine_factory = self._flask_sqlalchemy_engine
        # Built now so a bad RESULT_BACKEND fails in init_app; it connects on first use.
        self._backend: Backend = make_backend(config.result_backend, config, engine_factory,
                                              broker_url=self.broker_url)

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
                transport_options=self.config.transport_options,
                pool_limit=self.config.broker_pool_limit,
                connect_timeout=self.config.broker_connection_timeout,
                queue_type=self.config.default_queue_type,
            )
        return self._publisher

    def result(self, task_id: str, task_name: str | None = None) -> AsyncResult[Any]:
        """An :class:`AsyncResult` for ``task_id`` on this app's backend."""
        return AsyncResult(task_id, self.backend, task_name=task_name,
                           revokes_expires=self.config.revokes_expires)

    def get_task(self, name: str) -> Task[Any, Any] | None:
        """The task registered as ``name`` on this app's ``Tasks``, as a shared task, or
        built in (``celery.map``, ``celery.starmap``, ``celery.chunks``)."""
        return self.registry.get(name) or shared_registry.get(name) or builtin_tasks.get(name)

    def task_names(self) -> list[str]:
        """Every task name this app can run, sorted."""
        return sorted(set(self.registry) | set(shared_registry))

    def _app(self) -> Flask | None:
        """The app a call runs in: the current one, else this state's (None if it is gone)."""
        if has_app_context():
            return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]
        return self._app_ref()

    def send_task(self, name: str, args: Sequence[Any] | None = None,
                  kwargs: Mapping[str, Any] | None = None, *, task: Task[Any, Any] | None = None,
                  **options: Unpack[CallOptions]) -> AsyncResult[Any]:
        """Encode and publish one task message; see :meth:`Task.apply_async`.

        :param task: the task, for its defaults (``None``: sent by name).
        :param options: :class:`~flask_tasks.options.CallOptions`, resolved
            once (the call's, else the task's, else this app's settings).
        :raises TypeError: an unknown option (the message names it).
        :raises NotRegistered: eager mode, and no task of that name here.
        """
        config = self.config
        if config.always_eager:
            check_call_options(options)
            local = task or self.get_task(name)
            if local is None:
                raise NotRegistered(unknown_task_message(name, len(self.task_names())))
            canvas: dict[str, Any] = {k: v for k, v in options.items() if k in EAGER_OPTIONS}
            return self.apply_eagerly(local, tuple(args or ()), dict(kwargs or {}),
                                      task_id=options.get("task_id"), **canvas)
        call = resolve(options, task, config, current_request.get())
        reply_to = call.reply_to if call.reply_to is not None \
            else self.backend.on_task_call(call.task_id)
        message = call.message(name, args, kwargs, reply_to)
        queue = self.router.queue(self.router.queue_name(name, args, kwargs, {"queue": call.queue}))
        send_robust(before_task_publish, name, body=message.body_tuple,
                    exchange=queue.exchange.name, routing_key=queue.routing_key,
                    headers=message.headers, properties=message.properties,
                    declare=[queue], retry_policy=call.retry_policy)
        self.publisher.publish(message, queue, priority=call.priority,
                               compression=call.compression, retry=call.retry,
                               retry_policy=call.retry_policy)
        send_robust(after_task_publish, name, body=message.body_tuple, headers=message.headers,
                    exchange=queue.exchange.name, routing_key=queue.routing_key)
        return self.result(call.task_id, name)

    def send_many(self, calls: Sequence[tuple[str, Sequence[Any], Mapping[str, Any],
                                              Task[Any, Any] | None, CallOptions]]
                  ) -> list[AsyncResult[Any]]:
        """Send several task messages in as few broker round trips as the transport allows.

        Each call is ``(name, args, kwargs, task, options)`` as for
        :meth:`send_task`; all are encoded (and checked) before any is sent, so
        an argument that cannot be encoded sends nothing. A group is sent this
        way. The publish retry options of the first call apply to all.

        :raises: as :meth:`send_task`.
        """
        config = self.config
        if config.always_eager or not calls:
            return [self.send_task(name, args, kwargs, task=task, **options)
                    for name, args, kwargs, task, options in calls]
        parent = current_request.get()
        items, sent, first_call = [], [], None
        for name, args, kwargs, task, options in calls:
            call = resolve(options, task, config, parent)
            first_call = first_call or call
            reply_to = call.reply_to if call.reply_to is not None \
                else self.backend.on_task_call(call.task_id)
            message = call.message(name, args, kwargs, reply_to)
            queue = self.router.queue(self.router.queue_name(name, args, kwargs,
                                                             {"queue": call.queue}))
            items.append((message, queue, call.priority, call.compression))
            sent.append((name, message, queue, call))
        for name, message, queue, call in sent:
            send_robust(before_task_publish, name, body=message.body_tuple,
                        exchange=queue.exchange.name, routing_key=queue.routing_key,
                        headers=message.headers, properties=message.properties,
                        declare=[queue], retry_policy=call.retry_policy)
        assert first_call is not None
        self.publisher.publish_many(items, retry=first_call.retry,
                                    retry_policy=first_call.retry_policy)
        for name, message, queue, _ in sent:
            send_robust(after_task_publish, name, body=message.body_tuple,
                        headers=message.headers, exchange=queue.exchange.name,
                        routing_key=queue.routing_key)
        return [self.result(call.task_id, name) for name, _, _, call in sent]

    def send_on_commit(self, name: str, args: Sequence[Any] | None = None,
                       kwargs: Mapping[str, Any] | None = None, *,
                       task: Task[Any, Any] | None = None,
                       **options: Unpack[CallOptions]) -> AsyncResult[Any]:
        """:meth:`send_task` once the Flask-SQLAlchemy session commits (never on rollback).

        Without Flask-SQLAlchemy on the app, or outside a transaction, it is
        sent at once. See :mod:`flask_tasks.on_commit`.

        :raises flask_tasks.exceptions.EncodeError: an argument cannot be serialized
            (checked now, not at commit).
        """
        return on_commit.send_on_commit(self, self._app(), name, args, kwargs, task, options)

    def apply_eagerly(self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                      *, task_id: str | None = None, throw: bool | None = None,
                      **options: Any) -> EagerResult[Any]:
        """Run ``task`` here, through an encoded and decoded message; see :meth:`Task.apply`.

        Runs with :func:`~flask_tasks.trace.trace_task`, as a worker would; a
        retry runs again at once (its countdown or eta is not waited for).
        """
        task_id = task_id or str(uuid.uuid4())
        serializer = first(task.serializer, default=self.config.serializer)
        canvas: dict[str, Any] = {
            "callbacks": as_list(options.get("link")),
            "errbacks": as_list(options.get("link_error")),
            "chain": options.get("chain"), "group_id": options.get("group_id"),
            "group_index": options.get("group_index"), "parent_id": options.get("parent_id"),
            "root_id": options.get("root_id")}
        app = self._app()
        if app is None:
            raise RuntimeError("The app of this Tasks state is gone")
        retries = 0
        while True:
            message = build(task.name, task_id, args, kwargs, serializer=serializer,
                            retries=retries, **canvas)
            request = parse(message.headers, message.body, message.content_type,
                            message.content_encoding, self.accept, message.properties)
            request.is_eager = True
            outcome = trace_task(app, self, task, request, store=self.config.store_eager_result)
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
