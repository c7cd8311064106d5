"""The primitives: :class:`chain` and :class:`group`, signatures of several calls as
Celery's dicts (:class:`~.chords.chord` is in :mod:`.chords`; ``map``, ``starmap``
and ``chunks`` in :mod:`.mapping`).

A chain whose group is followed by more steps becomes a chord (Celery's upgrade):
the chord class is found through the subtask registry (``SUBTASK_TYPES``), which
:mod:`.chords` fills when the canvas package is imported.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..result import GroupResult
from .base import CanvasApp
from .signature import SUBTASK_TYPES, Signature

_CHORD_NOT_YET = (
    "{what} is not supported: a callback after every task of a group is a chord. "
    "Write chord(header)(body), chord(header, body)() or group(...) | task in a chain."
)


def _steps(tasks: tuple[Any, ...]) -> list[Signature]:
    """``chain(a, b)`` or ``chain([a, b])`` / a generator: the signatures."""
    if len(tasks) == 1 and not isinstance(tasks[0], Mapping) and isinstance(tasks[0], Iterable):
        tasks = tuple(tasks[0])
    return [Signature.from_dict(t) for t in tasks]


class _Tasks(Signature):
    """A signature whose ``kwargs["tasks"]`` are signatures (a chain's steps, a group's
    members): rebuilt from a dict with each of them rebuilt too."""

    @classmethod
    def _rebuild(cls, d: Mapping[str, Any], app: CanvasApp | None) -> Signature:
        sig = super()._rebuild(d, app)
        sig["kwargs"] = dict(sig.kwargs, tasks=[_member(t, app)
                                                for t in sig.kwargs.get("tasks") or ()])
        return sig

    @property
    def tasks(self) -> list[Signature]:
        """The steps of a chain, first to last; the members of a group, in order."""
        return self.kwargs["tasks"]  # type: ignore[no-any-return]


class chain(_Tasks):  # noqa: N801 - Celery's name
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
        tasks = _upgrade(tasks)
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
        tasks = _upgrade(self.tasks)
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


class group(_Tasks):  # noqa: N801 - Celery's name
    """Run the tasks in parallel: ``group(add.s(i, i) for i in range(10))()``.

    Returns a :class:`~flask_tasks.result.GroupResult`; its ``get()`` gives
    the values in the group's order. Each task's message carries the group's
    id (``group``) and its place (``group_index``), as Celery's do.
    """

    def __init__(self, *tasks: Any, app: CanvasApp | None = None, **options: Any) -> None:
        Signature.__init__(self, "celery.group", (), {"tasks": _steps(tasks)}, options=options,
                           subtask_type="group", app=app)


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


def _member(task: Any, app: CanvasApp | None) -> Signature:
    """A member of a rebuilt chain or group: a copy, bound to ``app`` when given."""
    if isinstance(task, Signature) and app is None:
        return task.clone()
    return Signature.from_dict(task, app)


def _header(header: Any, app: CanvasApp | None = None) -> group:
    """A chord's header as a group: a group (copied), signatures, or nothing."""
    if isinstance(header, group):
        head = group(header.tasks, app=header._app if app is None else app)
        head["options"] = dict(header.options)
        return head
    if header is None:
        return group(app=app)
    head = group(_steps((header,)), app=app)
    if app is not None:
        head["kwargs"]["tasks"] = [_member(t, app) for t in head.tasks]
    return head


def _upgrade(tasks: list[Signature]) -> list[Signature]:
    """A group followed by more steps becomes a chord whose body is those steps (Celery's)."""
    for i, task in enumerate(tasks[:-1]):
        if isinstance(task, group):
            rest = tasks[i + 1:]
            body = rest[0] if len(rest) == 1 else chain(*rest)
            chord: Any = SUBTASK_TYPES["chord"]  # registered by .chords (it imports this)
            upgraded = chord(task, body)
            upgraded._app = task._app
            return [*tasks[:i], upgraded]
    return tasks


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _succeeded(result: Any) -> bool:
    return bool(result.successful())


SUBTASK_TYPES.update(chain=chain, group=group)
