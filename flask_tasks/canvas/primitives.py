"""The primitives: :class:`chain`, :class:`group`, :class:`xmap`, :class:`xstarmap`,
:class:`chunks` — signatures of several calls, as Celery's dicts.

``chord`` is declared so that code written for Celery fails clearly: calling
one raises :class:`NotImplementedError` (chords come in a later release).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

from ..result import GroupResult
from .base import CanvasApp
from .signature import SUBTASK_TYPES, Signature

_CHORD_NOT_YET = (
    "Chords are not there yet in flask_tasks: {what} needs one (a callback after every "
    "task of a group). Get the group's results with group(...)().get() and call the "
    "body yourself, or run it on Celery for now."
)


def _steps(tasks: tuple[Any, ...]) -> list[Signature]:
    """``chain(a, b)`` or ``chain([a, b])`` / a generator: the signatures."""
    if len(tasks) == 1 and not isinstance(tasks[0], Mapping) and isinstance(tasks[0], Iterable):
        tasks = tuple(tasks[0])
    return [Signature.from_dict(t) for t in tasks]


class chain(Signature):  # noqa: N801 - Celery's name
    """Run the tasks one after the other, each getting the previous one's return value.

    ``chain(add.s(4, 4), mul.s(8))()`` or ``add.s(4, 4) | mul.s(8)``. The
    result is the *last* task's, with ``.parent`` links back to the first.
    On the wire the remaining steps travel in the message's ``chain`` field
    (reversed; the worker pops the next one), as Celery sends them.
    """

    def __init__(self, *tasks: Any, **options: Any) -> None:
        steps: list[Signature] = []
        for sig in _steps(tasks):
            steps.extend(sig.tasks if isinstance(sig, chain) and not sig.options else [sig])
        Signature.__init__(self, "celery.chain", (), {"tasks": steps}, options=options,
                           subtask_type="chain")

    @classmethod
    def _rebuild(cls, d: Mapping[str, Any], app: CanvasApp | None) -> Signature:
        sig = super()._rebuild(d, app)
        sig["kwargs"] = dict(sig.kwargs, tasks=[_member(t, app)
                                                for t in sig.kwargs.get("tasks") or ()])
        return sig

    @property
    def tasks(self) -> list[Signature]:
        """The steps, first to last."""
        return self.kwargs["tasks"]  # type: ignore[no-any-return]

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        if isinstance(other, Mapping):
            return chain(*self.tasks, other, **self.options)
        return NotImplemented

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Send the chain (Celery's ``chain()``); see :meth:`apply_async`."""
        return self.apply_async(args, kwargs)

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks) or "chain()"

    def _prepare(self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None,
                 opts: dict[str, Any], clone: bool = True) -> tuple[list[Signature], list[Any]]:
        """Freeze the steps, last first; returns (steps reversed, their results reversed).

        ``task_id``, ``group_id`` and ``group_index`` in ``opts`` go to the last
        step, ``link`` too; ``link_error`` to every step. They are removed from ``opts``.
        """
        tasks = [t.clone() if clone else t for t in self.tasks]
        if not tasks:
            raise ValueError("An empty chain has nothing to run.")
        args = tuple(args or ()) + self.args  # a chain's own partial arguments (a clone's)
        if (args or kwargs) and not self.immutable:
            tasks[0] = tasks[0].clone(args, kwargs)
        for t in tasks[:-1]:
            if isinstance(t, group):
                raise NotImplementedError(_CHORD_NOT_YET.format(what="a group followed by "
                                                                      "another step in a chain"))
        last_id, group_id = opts.pop("task_id", None), opts.pop("group_id", None)
        group_index = opts.pop("group_index", None)
        links, errbacks = opts.pop("link", None), opts.pop("link_error", None)
        for errback in _as_list(errbacks):
            for t in tasks:
                t.link_error(errback)
        for callback in _as_list(links):
            tasks[-1].link(callback)
        steps = list(reversed(tasks))
        results = [steps[0].freeze(last_id, group_id=group_id, group_index=group_index)]
        results += [t.freeze() for t in steps[1:]]
        for later, earlier in zip(results, results[1:], strict=False):
            later.parent = earlier
        return steps, results

    def freeze(self, _id: str | None = None, group_id: str | None = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Fix every step's id now; returns the last step's result (with parents)."""
        opts = {"task_id": _id, "group_id": group_id, "group_index": group_index}
        return self._prepare(None, None, opts, clone=False)[1][0]

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """Send the first step; the rest ride in its message's ``chain`` field.

        Options apply to the first step, except ``task_id`` (the last
        step's), ``link`` (the last step's) and ``link_error`` (every step's).

        :returns: the last step's result; ``.parent`` leads back to the first.
        :raises NotImplementedError: a group is followed by another step (a chord).
        """
        app = self.app
        if app.config.always_eager:
            return self.apply(args, kwargs, **options)
        opts = dict(self.options, **options)
        steps, results = self._prepare(args, kwargs, opts)
        first = steps.pop()
        sent = first.apply_async(chain=steps or None, **opts)
        return sent if not steps else results[0]

    def apply(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Any:
        """Run the steps here, one after the other (eager mode); returns the last result.

        A failed step ends the chain: its result is returned (``.get()`` raises),
        or with ``TASKS_EAGER_PROPAGATES`` (or ``throw=True``) its error is raised.
        """
        opts = dict(self.options, **options)
        opts.pop("task_id", None)
        links, errbacks = _as_list(opts.pop("link", None)), _as_list(opts.pop("link_error", None))
        last: Any = None
        tasks = self.tasks
        args = tuple(args or ()) + self.args
        for i, task in enumerate(tasks):
            sig = task.clone(args, kwargs) if i == 0 and not self.immutable else task.clone()
            for errback in errbacks:
                sig.link_error(errback)
            if i == len(tasks) - 1:
                for callback in links:
                    sig.link(callback)
            result = sig.apply((last.get(),) if last is not None else None, **opts)
            result.parent = last
            last = result
            if not _succeeded(result):
                break
        return last


class group(Signature):  # noqa: N801 - Celery's name
    """Run the tasks in parallel: ``group(add.s(i, i) for i in range(10))()``.

    Returns a :class:`~flask_tasks.result.GroupResult`; its ``get()`` gives
    the values in the group's order. Each task's message carries the group's
    id (``group``) and its place (``group_index``), as Celery's do.
    """

    def __init__(self, *tasks: Any, app: CanvasApp | None = None, **options: Any) -> None:
        Signature.__init__(self, "celery.group", (), {"tasks": _steps(tasks)}, options=options,
                           subtask_type="group", app=app)

    @classmethod
    def _rebuild(cls, d: Mapping[str, Any], app: CanvasApp | None) -> Signature:
        sig = super()._rebuild(d, app)
        sig["kwargs"] = dict(sig.kwargs, tasks=[_member(t, app)
                                                for t in sig.kwargs.get("tasks") or ()])
        return sig

    @property
    def tasks(self) -> list[Signature]:
        """The members, in order."""
        return self.kwargs["tasks"]  # type: ignore[no-any-return]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Send the group (Celery's ``group()``); see :meth:`apply_async`."""
        return self.apply_async(args, kwargs)

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"

    def link(self, callback: Mapping[str, Any]) -> Any:
        """Not there yet: a callback after a whole group is a chord.

        :raises NotImplementedError: always.
        """
        raise NotImplementedError(_CHORD_NOT_YET.format(what="a group's link()"))

    def link_error(self, errback: Mapping[str, Any]) -> Any:
        """Call ``errback`` when any member fails (it is linked to each member)."""
        for task in self.tasks:
            task.link_error(errback)
        return errback

    def freeze(self, _id: str | None = None, group_id: str | None = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> GroupResult:
        """Fix the group's id and every member's; returns the :class:`GroupResult`."""
        gid = self.options.setdefault("task_id", _id or str(uuid.uuid4()))
        results = [t.freeze(group_id=gid, group_index=i, root_id=root_id, parent_id=parent_id)
                   for i, t in enumerate(self.tasks)]
        return GroupResult(gid, results, backend=self._backend())

    def _backend(self) -> Any:
        try:
            return self.app.backend
        except RuntimeError:
            return None

    def _member_options(self, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        opts = dict(self.options, **options)
        if opts.get("link"):
            raise NotImplementedError(_CHORD_NOT_YET.format(what="a group's link="))
        if opts.pop("chain", None):
            raise NotImplementedError(_CHORD_NOT_YET.format(what="a group followed by "
                                                                  "another step in a chain"))
        gid = opts.pop("task_id", None) or str(uuid.uuid4())
        self.options["task_id"] = gid
        opts.pop("group_id", None)
        opts.pop("group_index", None)
        return gid, opts

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, **options: Any) -> GroupResult:
        """Send every member, partial arguments given to each; returns the :class:`GroupResult`.

        A group of plain signatures is checked whole (a member whose arguments
        do not fit sends nothing) and published in as few broker round trips
        as the transport allows (Redis: one pipeline per 1,000 messages).

        :raises NotImplementedError: ``link=`` or a next step (a chord).
        """
        app = self.app
        if app.config.always_eager:
            return self.apply(args, kwargs, **options)
        gid, opts = self._member_options(options)
        if all(type(task) is Signature for task in self.tasks):  # all checked, then
            calls = [task._call(app, args, kwargs, dict(opts, group_id=gid, group_index=i))
                     for i, task in enumerate(self.tasks)]  # published in few round trips
            return GroupResult(gid, app.send_many(calls), backend=app.backend)
        results = [task.clone(args, kwargs).apply_async(group_id=gid, group_index=i, **opts)
                   for i, task in enumerate(self.tasks)]
        return GroupResult(gid, results, backend=app.backend)

    def apply(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> GroupResult:
        """Run every member here, in order (eager mode); returns the :class:`GroupResult`."""
        gid, opts = self._member_options(options)
        results = [task.clone(args, kwargs).apply(group_id=gid, group_index=i, **opts)
                   for i, task in enumerate(self.tasks)]
        return GroupResult(gid, results, backend=self.app.backend)


_group = group


class chord(Signature):  # noqa: N801 - Celery's name
    """Not there yet: declared so that Celery code fails with a clear message.

    :raises NotImplementedError: when called, sent or run.
    """

    def __init__(self, header: Any = None, body: Any = None, **options: Any) -> None:
        Signature.__init__(self, "celery.chord", (), {"header": header, "body": body},
                           options=options, subtask_type="chord")

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_CHORD_NOT_YET.format(what="chord()"))

    __call__ = apply_async = apply = delay = freeze = _refuse


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


def _member(task: Any, app: CanvasApp | None) -> Signature:
    """A member of a rebuilt chain or group: a copy, bound to ``app`` when given."""
    if isinstance(task, Signature) and app is None:
        return task.clone()
    return Signature.from_dict(task, app)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _succeeded(result: Any) -> bool:
    return bool(result.successful())


SUBTASK_TYPES.update(chain=chain, group=group, chord=chord, xmap=xmap, xstarmap=xstarmap,
                     chunks=chunks)
