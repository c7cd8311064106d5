"""The primitives: :class:`chain`, :class:`group`, :class:`xmap`, :class:`xstarmap`,
:class:`chunks` — signatures of several calls, as Celery's dicts.

and :class:`chord`: a group whose results, in order, are given to one task
(the worker's side is :func:`flask_tasks.canvas.callbacks.on_chord_part`).
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
    "{what} is not supported: a callback after every task of a group is a chord. "
    "Write chord(header)(body), chord(header, body)() or group(...) | task in a chain."
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
    """A group (the header) whose results, in order, are given to one task (the body).

    ``chord(add.s(i, i) for i in range(10))(xsum.s())`` or
    ``chord(header, body)()``; ``group(...) | task`` in a chain becomes one.
    The body runs once, when every header task has finished: the store
    counts the header's parts (see :mod:`flask_tasks.backends.chords`) and
    the worker that reports the last part dispatches the body. A failed header
    task fails the body with :class:`~flask_tasks.exceptions.ChordError`.

    On the wire, as Celery sends it: each header message carries the frozen
    body's dict in its ``chord`` field, and the header's group id and its place.
    """

    def __init__(self, header: Any = None, body: Any = None, **options: Any) -> None:
        head = _header(header)
        Signature.__init__(self, "celery.chord", (),
                           {"header": head,
                            "body": Signature.from_dict(body).clone() if body is not None
                            else None},
                           options=options, subtask_type="chord")

    @classmethod
    def _rebuild(cls, d: Mapping[str, Any], app: CanvasApp | None) -> Signature:
        sig = super()._rebuild(d, app)
        kwargs = dict(sig.kwargs)
        header = kwargs.get("header")
        kwargs["header"] = (_member(header, app) if isinstance(header, Mapping)
                            else _header(header, app))
        body = kwargs.get("body")
        kwargs["body"] = _member(body, app) if body is not None else None
        sig["kwargs"] = kwargs
        return sig

    @property
    def tasks(self) -> list[Signature]:
        """The header's tasks, in order."""
        return self.header.tasks

    @property
    def header(self) -> group:
        """The header group."""
        return self.kwargs["header"]  # type: ignore[no-any-return]

    @property
    def body(self) -> Signature | None:
        """The body: called with the list of the header's results."""
        return self.kwargs.get("body")

    @property
    def app(self) -> CanvasApp:
        if self._app is not None:
            return self._app
        for sig in [self.body, *self.tasks]:
            if sig is not None and (sig._app is not None or sig._type is not None):
                return sig.app
        return super().app

    def __call__(self, body: Any = None, **options: Any) -> Any:
        """``chord(header)(body)``: send the chord; returns the body's result."""
        sig = self.clone()
        if body is not None:
            sig.kwargs["body"] = Signature.from_dict(body).clone()
        return sig.apply_async((), {}, **options)

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def _ready_body(self) -> Signature:
        body = self.body
        if body is None:
            raise ValueError("This chord has no body: chord(header)(body) or "
                             "chord(header, body)().")
        return body

    def freeze(self, _id: str | None = None, group_id: str | None = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Fix the header's group id, its tasks' ids and the body's; returns the body's result."""
        body = self._ready_body()
        head = self.header
        gid = head.options.setdefault("task_id", str(uuid.uuid4()))
        header_result = head.freeze(gid, root_id=root_id, parent_id=parent_id)
        result = body.freeze(_id, root_id=root_id)
        result.parent = header_result
        return result

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """Send the header, its messages carrying the body; returns the body's result.

        The header's size is stored first (``set_chord_size``), so the worker
        that reports the last header task knows it is the last. Call-time
        arguments go to each header task (as for a group). Options apply to
        the header's tasks, except ``task_id`` (the body's).

        :raises NotImplementedError: a header member is itself a chain, group or chord.
        """
        app = self.app
        if app.config.always_eager:
            return self.apply(args, kwargs, **options)
        opts = dict(self.options, **options)
        body_id = opts.pop("task_id", None)
        opts.pop("chain", None)  # never to the header (celery#3771)
        opts.pop("chord", None)
        opts.pop("group_id", None)
        opts.pop("group_index", None)
        body = self._ready_body().clone()  # keeps a frozen id
        if opts.get("link"):
            for callback in _as_list(opts.pop("link")):
                body.link(callback)
        for errback in _as_list(opts.pop("link_error", None)):
            body.link_error(errback)
        head = self.header
        members = [t.clone(args, kwargs) for t in head.tasks]
        for t in members:
            if type(t) is not Signature:
                raise NotImplementedError(
                    "A chord's header may only hold task signatures here (not "
                    f"{t.subtask_type}s): run that part as its own chord or chain.")
        gid = head.options.get("task_id") or str(uuid.uuid4())
        root_id = opts.get("root_id")
        result = body.freeze(body_id or body.id, root_id=root_id)
        if not members:  # nothing to wait for: the body runs at once, with []
            return body.apply_async(([],))
        header_results = [t.freeze(group_id=gid, group_index=i, root_id=root_id,
                                   parent_id=opts.get("parent_id"))
                          for i, t in enumerate(members)]
        body_dict = dict(body)
        app.backend.set_chord_size(gid, len(members))
        calls = [t._call(app, None, None, dict(opts, group_id=gid, group_index=i,
                                                 chord=body_dict))
                 for i, t in enumerate(members)]
        app.send_many(calls)
        result.parent = GroupResult(gid, header_results, backend=app.backend)
        return result

    def apply(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Any:
        """Run the header here, then the body with its results (eager mode).

        A failed header task ends the chord: its result is returned (``get()``
        raises its error; with ``TASKS_EAGER_PROPAGATES`` the call raises it).
        """
        opts = dict(self.options, **options)
        body = self._ready_body().clone()
        body_id = opts.pop("task_id", None)
        opts.pop("chain", None)
        for callback in _as_list(opts.pop("link", None)):
            body.link(callback)
        for errback in _as_list(opts.pop("link_error", None)):
            body.link_error(errback)
        header = self.header.apply(args, kwargs, **opts)
        failed = next((r for r in header.results if not _succeeded(r)), None)
        if failed is not None:
            return failed
        call: dict[str, Any] = {"task_id": body_id} if body_id else {}
        result = body.apply(([r.get() for r in header.results],), **call)
        result.parent = header
        return result


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


SUBTASK_TYPES.update(chain=chain, group=group, chord=chord, xmap=xmap, xstarmap=xstarmap,
                     chunks=chunks)
