"""``task.map(it)``, ``task.starmap(it)``, ``task.chunks(it, n)``: one call per item,
run by Celery's built-in tasks ``celery.map``, ``celery.starmap`` and ``celery.chunks``
(:mod:`flask_tasks.builtins`), as Celery's dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

from ..result import GroupResult
from .primitives import group as _group
from .signature import SUBTASK_TYPES, Signature

__all__ = ["chunks", "xmap", "xstarmap"]


class xmap(Signature):  # noqa: N801 - Celery's name
    """``task.map(it)``: one message (``celery.map``) that calls ``task(item)`` for each item."""

    task_name = "celery.map"

    def __init__(self, task: Mapping[str, Any], it: Iterable[Any], **options: Any) -> None:
        Signature.__init__(self, self.task_name, (), {"task": task, "it": list(it)},
                           options=options, subtask_type=self.subtask, immutable=True)

    subtask = "xmap"


class xstarmap(xmap):  # noqa: N801 - Celery's name
    """``task.starmap(it)``: one message (``celery.starmap``) calling ``task(*item)`` each."""

    task_name = "celery.starmap"
    subtask = "xstarmap"


class chunks(Signature):  # noqa: N801 - Celery's name
    """``task.chunks(it, n)``: ``it`` in parts of ``n``, each part one ``celery.starmap``.

    Sending it sends a group of those messages (as Celery does); ``get()``
    gives one list of values per part.
    """

    def __init__(self, task: Mapping[str, Any], it: Iterable[Any], n: int,
                 **options: Any) -> None:
        if n < 1:
            raise ValueError(f"chunks() needs a part size of at least 1, not {n}")
        Signature.__init__(self, "celery.chunks", (), {"task": task, "it": list(it), "n": n},
                           options=options, subtask_type="chunks", immutable=True)

    def group(self) -> _group:
        """The group of ``celery.starmap`` calls, one per part."""
        task, items, n = self.kwargs["task"], iter(self.kwargs["it"]), int(self.kwargs["n"])
        parts = iter(lambda: list(islice(items, n)), [])
        members = [xstarmap(task, part) for part in parts]
        for member in members:
            member._app = self._app
        return _group(members, app=self._app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, **options: Any) -> GroupResult:
        """Send one ``celery.starmap`` message per part; returns the :class:`GroupResult`."""
        return self.group().apply_async(args, kwargs, **dict(self.options, **options))

    def apply(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> GroupResult:
        """Run every part here (eager mode)."""
        return self.group().apply(args, kwargs, **dict(self.options, **options))


SUBTASK_TYPES.update(xmap=xmap, xstarmap=xstarmap, chunks=chunks)
