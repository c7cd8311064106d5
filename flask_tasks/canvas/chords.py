"""``chord``: a group (the header) whose results, in order, are given to one task (the
body); the worker's side is :func:`flask_tasks.canvas.callbacks.on_chord_part`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ..result import GroupResult
from .base import CanvasApp
from .primitives import _as_list, _header, _member, _succeeded, group
from .signature import SUBTASK_TYPES, Signature

__all__ = ["chord"]


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


SUBTASK_TYPES.update(chord=chord)
