"""The Flask extension: :class:`Tasks`, its ``init_app`` and per-app state."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, Unpack, overload

from flask import Flask, current_app, has_app_context

from . import config as config_module
from .app_state import AppState
from .canvas import CanvasApp, use_app_resolver
from .cli import tasks_cli
from .control import Control
from .exceptions import ImproperlyConfigured
from .options import CallOptions
from .registry import Registry, make_task, shared_registry
from .result import AsyncResult, GroupResult
from .task import Task, current_state

P = ParamSpec("P")
R = TypeVar("R")

_all_extensions: weakref.WeakSet[Tasks] = weakref.WeakSet()


class Tasks:
    """The flask_tasks extension.

    ``tasks = Tasks()`` at module level, ``tasks.init_app(app)`` in the app
    factory (or ``Tasks(app)``). One ``Tasks`` can serve several apps, each
    with its own config; tasks defined with ``@tasks.task`` are shared by all
    of them. Per-app state is kept in a weak mapping, never on ``self``.

    :param app: an app to initialize at once (``Tasks(app)`` is ``Tasks()``
        then ``init_app(app)``). Outside an app context, tasks are sent with
        the only app the extension is bound to (:attr:`default_app`).
    """

    def __init__(self, app: Flask | None = None) -> None:
        self.registry = Registry()
        self._states: weakref.WeakKeyDictionary[Flask, AppState] = weakref.WeakKeyDictionary()
        _all_extensions.add(self)
        if app is not None:
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
        self._states[app] = AppState(self.registry, app, config)
        app.extensions["tasks"] = self
        if "tasks" not in app.cli.commands:
            app.cli.add_command(tasks_cli)

    @property
    def default_app(self) -> Flask | None:
        """The app used outside an app context: the only app this extension is bound to.

        That is the app of ``Tasks(app)`` or of a single ``init_app``, as in a
        Celery shell. ``None`` when the extension is bound to no app, or to
        several (then only an app context says which one to use).
        """
        apps = _live_apps(lambda: list(self._states.keys()))
        return apps[0] if len(apps) == 1 else None

    def state(self, app: Flask | None = None) -> AppState:
        """The :class:`AppState` of ``app``.

        :param app: the app; ``None`` means the current app, or outside an
            app context :attr:`default_app`.
        :raises RuntimeError: ``app`` was not initialized with this extension,
            or there is no app context and the extension is bound to no app
            or to several.
        """
        if app is None:
            app = self._app_for_call()
        try:
            return self._states[app]
        except KeyError:
            raise RuntimeError(
                f"The app {app.import_name!r} is not registered with this Tasks instance. "
                f"Call tasks.init_app(app) in the app factory."
            ) from None

    def _app_for_call(self) -> Flask:
        if has_app_context():
            return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]
        apps = _live_apps(lambda: list(self._states.keys()))
        if len(apps) == 1:
            return apps[0]
        if not apps:
            raise RuntimeError(
                "Working outside of application context, and this Tasks instance is not "
                "bound to an app yet, so flask_tasks does not know which app's broker to use. "
                "Call tasks.init_app(app) in the app factory, and call tasks inside a request "
                "or `with app.app_context():`."
            )
        raise RuntimeError(
            f"Working outside of application context, and this Tasks instance is bound to "
            f"{len(apps)} apps ({_names(apps)}), so flask_tasks does not know which app's "
            f"broker to use. Call it inside a request or `with app.app_context():`."
        )

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
            self.registry.register(task, also_free_in=[shared_registry])
            return task

        return decorator(fn) if fn is not None else decorator

    # -- calling and results -------------------------------------------------------
    def send_task(self, name: str, args: Sequence[Any] | None = None,
                  kwargs: Mapping[str, Any] | None = None,
                  **options: Unpack[CallOptions]) -> AsyncResult[Any]:
        """Send a task by name (it need not be importable here); see :meth:`Task.apply_async`.

        Sent with the current app, or outside an app context with :attr:`default_app`.
        The options are :class:`~flask_tasks.options.CallOptions`; one not
        given is the task's (when it is registered here), else the app's setting.

        :raises flask_tasks.exceptions.EncodeError: an argument cannot be serialized.
        :raises TypeError: an unknown option (the message names it).
        :raises RuntimeError: no app context, and the extension is bound to
            no app or to several.
        """
        state = self.state()
        return state.send_task(name, args, kwargs, task=state.get_task(name), **options)

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:  # noqa: N802 - Celery's name
        """The :class:`AsyncResult` of ``task_id`` on the current app's result backend.

        Outside an app context: on :attr:`default_app`'s.

        :raises RuntimeError: no app context, and the extension is bound to
            no app or to several.
        """
        return self.state().result(task_id)

    def GroupResult(self, group_id: str) -> GroupResult:  # noqa: N802 - Celery's name
        """The group saved with :meth:`GroupResult.save` as ``group_id``, restored.

        :raises LookupError: no group of that id is stored (never saved, or expired).
        :raises NotImplementedError: the result backend cannot store groups.
        """
        state = self.state()
        found = GroupResult.restore(group_id, state.backend, state.result)
        if found is None:
            raise LookupError(f"No group {group_id!r} is stored in the result backend: "
                              f"call .save() on its GroupResult first (it expires with "
                              f"TASKS_RESULT_EXPIRES).")
        return found

    @property
    def control(self) -> Control:
        """Remote control of workers: ``tasks.control.revoke(task_id, terminate=False)``."""
        return Control(self.state)


class _CurrentAppTasks:
    """What shared tasks are sent through: the ``Tasks`` extension of the current app.

    Outside an app context, the only app in the process that has a
    flask_tasks extension (:class:`flask_tasks.task.TaskOwner`).
    """

    @property
    def default_app(self) -> Flask | None:
        """The only live app with a flask_tasks extension, or ``None`` (none or several)."""
        apps = _live_apps(_all_apps)
        return apps[0] if len(apps) == 1 else None

    def state(self, app: Flask | None = None) -> AppState:
        """The :class:`AppState` of ``app`` (default: the current app, else the only one).

        :raises ImproperlyConfigured: the app has no flask_tasks extension.
        :raises RuntimeError: no app context, and no app or several apps in
            this process have a flask_tasks extension.
        """
        if app is None:
            app = self._app_for_call()
        ext = app.extensions.get("tasks")
        if not isinstance(ext, Tasks):
            raise ImproperlyConfigured(
                f"The app {app.import_name!r} has no flask_tasks extension, so shared "
                f"tasks have nowhere to go. Call tasks.init_app(app) in the app factory."
            )
        return ext.state(app)

    def _app_for_call(self) -> Flask:
        if has_app_context():
            return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]
        apps = _live_apps(_all_apps)
        if len(apps) == 1:
            return apps[0]
        found = (f"{len(apps)} apps in this process have one ({_names(apps)})" if apps
                 else "no app in this process has one yet (call tasks.init_app(app))")
        raise RuntimeError(
            f"Working outside of application context: flask_tasks sends a shared task "
            f"through the current app's extension, or else through the only app that "
            f"has one, and {found}. Call it inside a request or "
            f"`with app.app_context():`."
        )


_current_app_tasks = _CurrentAppTasks()


def _all_apps() -> list[Flask]:
    """Every app some ``Tasks`` extension in this process is bound to."""
    return [app for ext in list(_all_extensions) for app in list(ext._states.keys())]


def _live_apps(apps: Callable[[], list[Flask]]) -> list[Flask]:
    """``apps()``, without the apps the program has dropped.

    Apps are held weakly, but a Flask app sits in reference cycles (its
    static view is a bound method), so an app nobody uses any more stays in
    a weak mapping until the cycle collector runs. Before concluding that
    there are several apps, collect once.
    """
    found = apps()
    if len(found) <= 1:
        return found
    del found  # a strong reference would keep them all alive
    gc.collect()
    return apps()


def _names(apps: Sequence[Flask]) -> str:
    return ", ".join(repr(app.import_name) for app in apps)


@overload
def shared_task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def shared_task(*, bind: Literal[True], **options: Any
                ) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...


@overload
def shared_task(*, bind: Literal[False] = ..., **options: Any
                ) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def shared_task(
    fn: Callable[..., Any] | None = None, /, *, bind: bool = False, **options: Any
) -> Any:
    """Define a task without the ``Tasks`` object (for blueprints and libraries).

    It is visible to every app and is sent through the current app's ``Tasks``
    extension; outside an app context, through the only app in the process
    that has one. Options as :meth:`Tasks.task`; typed the same way.

    :raises ValueError: another task already has this name.
    """
    options["bind"] = bind

    def decorator(f: Callable[..., Any]) -> Task[Any, Any]:
        task = make_task(f, _current_app_tasks, options)
        shared_registry.register(task, also_free_in=[ext.registry for ext in list(_all_extensions)])
        return task

    return decorator(fn) if fn is not None else decorator


def _canvas_app() -> CanvasApp:
    """The app an unbound signature is sent with: the running task's, else the current one."""
    state = current_state.get()
    return state if state is not None else _current_app_tasks.state()


use_app_resolver(_canvas_app)


def _reset_after_fork() -> None:
    for ext in list(_all_extensions):
        for state in list(ext._states.values()):
            state.reset_after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)

