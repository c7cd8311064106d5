"""Celery's built-in canvas tasks, registered in every app: ``celery.map``,
``celery.starmap`` and ``celery.chunks`` (what ``task.map()``, ``task.starmap()``
and ``task.chunks()`` send, and what a Celery client sends for them)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any, cast

from flask import Flask

from .canvas import Signature
from .canvas.base import resolve_app
from .registry import Registry, make_task
from .task import Task, TaskApp, current_state


def _task(sig: Mapping[str, Any]) -> Task[Any, Any]:
    """The registered task a signature dict names (in the app running this call)."""
    return cast(Task[Any, Any], Signature.from_dict(sig, current_state.get()).type)


def _map(task: Mapping[str, Any], it: Iterable[Any]) -> list[Any]:
    """``[task(item) for item in it]``, in this process (Celery's ``celery.map``)."""
    fn = _task(task)
    return [fn(item) for item in it]


def _starmap(task: Mapping[str, Any], it: Iterable[Sequence[Any]]) -> list[Any]:
    """``[task(*item) for item in it]``, in this process (Celery's ``celery.starmap``)."""
    fn = _task(task)
    return [fn(*item) for item in it]


def _chunks(task: Mapping[str, Any], it: Iterable[Sequence[Any]], n: int) -> list[list[Any]]:
    """``task(*item)`` for each item, in parts of ``n``: one list per part.

    Celery's ``celery.chunks`` publishes a group of parts from the worker
    instead; ``task.chunks(...)`` never sends this task (it sends the parts).
    """
    fn, items = _task(task), iter(it)
    return [[fn(*item) for item in part] for part in iter(lambda: list(islice(items, n)), [])]


class _CurrentApp:
    """The owner of the built-in tasks: the app running the call, else the current one."""

    @property
    def default_app(self) -> Flask | None:
        return None

    def state(self, app: Flask | None = None) -> TaskApp:
        state = current_state.get()
        return state if state is not None else cast(TaskApp, resolve_app())


#: The built-in tasks, looked up after an app's own and the shared ones.
builtin_tasks = Registry()
for _name, _fn in (("celery.map", _map), ("celery.starmap", _starmap),
                   ("celery.chunks", _chunks)):
    builtin_tasks.register(make_task(_fn, _CurrentApp(), {"name": _name, "bind": False}))
