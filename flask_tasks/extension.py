"""The Flask extension: :class:`Tasks`, its ``init_app`` and per-app state."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, overload

from flask import Flask, current_app, has_app_context

from . import config as config_module
from .registry import Registry, shared_registry
from .result import AsyncResult
from .control import Control
from .state import AppState
from .task import Task, make_task

if TYPE_CHECKING:
    from typing import Concatenate

P = ParamSpec("P")
R = TypeVar("R")

_all_extensions: weakref.WeakSet[Tasks] = weakref.WeakSet()


class Tasks:
    """The flask_tasks extension.

    ``tasks = Tasks()`` at module level, ``tasks.init_app(app)`` in the app
    factory (or ``Tasks(app)``). One ``Tasks`` can serve several apps, each
    with its own config; tasks defined with ``@tasks.task`` are shared by all
    of them. Per-app state is kept in a weak mapping, never on ``self``.

    :param app: an app to initialize at once (also used for calls made
        outside an app context).
    """

    def __init__(self, app: Flask | None = None) -> None:
        self.registry = Registry()
        self._states: weakref.WeakKeyDictionary[Flask, AppState] = weakref.WeakKeyDictionary()
        self._default_app: weakref.ref[Flask] | None = None
        _all_extensions.add(self)
        if app is not None:
            self._default_app = weakref.ref(app)
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the app's config, register ``app.extensions["tasks"]`` and ``flask tasks``.

        No connection is made here.

        :raises RuntimeError: the app already has a ``Tasks`` extension.
        :raises ImproperlyConfigured: a setting has the wrong type or value.
        """
        if "tasks" in app.extensions:
            raise RuntimeError(
                "A 'Tasks' instance has already been registered on this Flask app. "
                "Import and use that instance instead."
            )
        config = config_module.load(app.config, app.instance_path)
        self._states[app] = AppState(self, app, config)
        app.extensions["tasks"] = self
        from .cli import tasks_cli

        if "tasks" not in app.cli.commands:
            app.cli.add_command(tasks_cli)

    def state(self, app: Flask | None = None) -> AppState:
        """The :class:`AppState` of ``app`` (default: the current app).

        :raises RuntimeError: ``app`` was not initialized with this extension.
        """
        if app is None:
            return self._current_state()
        try:
            return self._states[app]
        except KeyError:
            raise RuntimeError(
                f"The app {app.import_name!r} is not registered with this Tasks instance. "
                f"Call tasks.init_app(app) in the app factory."
            ) from None

    def _current_state(self) -> AppState:
        if has_app_context():
            return self.state(current_app._get_current_object())  # type: ignore[attr-defined]
        app = self._default_app() if self._default_app is not None else None
        if app is None:
            raise RuntimeError(
                "Working outside of application context: flask_tasks needs to know which app's "
                "broker to use. Call this inside a request or `with app.app_context():`."
            )
        return self.state(app)

    # -- defining tasks ----------------------------------------------------------
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, *, bind: Literal[True], **options: Any
             ) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...

    @overload
    def task(self, *, bind: Literal[False] = ..., **options: Any
             ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(  # type: ignore[misc]  # mypy cannot match **options against positional-only fn
        self, fn: Callable[..., Any] | None = None, /, *, bind: bool = False, **options: Any
    ) -> Any:
        """Turn a function into a task: ``@tasks.task`` or ``@tasks.task(**options)``.

        Options (all optional; ``None`` means the app's ``TASKS_*`` setting):
        ``name`` (default ``"<module>.<function>"``), ``bind``, ``base``
        (a :class:`Task` subclass), ``queue``, ``ignore_result``,
        ``acks_late``, ``track_started``, ``priority``, ``serializer``,
        ``max_retries``, ``default_retry_delay`` (seconds), ``autoretry_for``,
        ``retry_backoff``, ``rate_limit``, ``time_limit`` / ``soft_time_limit``
        (seconds), ``expires``, ``throws``, ``typing``.

        :raises ValueError: another task already has this name.
        :raises ImproperlyConfigured: the function is in ``__main__`` or
            nested in a function and was given no ``name``.
        """
        options["bind"] = bind

        def decorator(f: Callable[..., Any]) -> Task[Any, Any]:
            task = make_task(f, self, options)
            shared_registry.check_free(task)
            self.registry.register(task)
            return task

        return decorator(fn) if fn is not None else decorator

    # -- calling and results -------------------------------------------------------
    def send_task(self, name: str, args: Sequence[Any] | None = None,
                  kwargs: Mapping[str, Any] | None = None, **options: Any) -> AsyncResult[Any]:
        """Send a task by name (it need not be importable here); options as :meth:`Task.apply_async`.

        :raises flask_tasks.exceptions.EncodeError: an argument cannot be serialized.
        """
        return self._current_state().send_task(name, args, kwargs,
                                               task=self._current_state().get_task(name), **options)

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:  # noqa: N802 - Celery's name
        """The :class:`AsyncResult` of ``task_id`` on the current app's result backend."""
        return self._current_state().result(task_id)

    @property
    def control(self) -> Control:
        """Remote control of workers: ``tasks.control.revoke(task_id, terminate=False)``."""
        return Control(self._current_state)


@overload
def shared_task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def shared_task(*, bind: Literal[True], **options: Any
                ) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...


@overload
def shared_task(*, bind: Literal[False] = ..., **options: Any
                ) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def shared_task(  # type: ignore[misc]  # as Tasks.task
    fn: Callable[..., Any] | None = None, /, *, bind: bool = False, **options: Any
) -> Any:
    """Define a task without the ``Tasks`` object (for blueprints and libraries).

    It is visible to every app and is sent through the current app's ``Tasks``
    extension. Options as :meth:`Tasks.task`; typed the same way.

    :raises ValueError: another task already has this name.
    """
    options["bind"] = bind

    def decorator(f: Callable[..., Any]) -> Task[Any, Any]:
        task = make_task(f, None, options)
        for ext in list(_all_extensions):
            ext.registry.check_free(task)
        shared_registry.register(task)
        return task

    return decorator(fn) if fn is not None else decorator


def _reset_after_fork() -> None:
    for ext in list(_all_extensions):
        for state in list(ext._states.values()):
            state.reset_after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)

