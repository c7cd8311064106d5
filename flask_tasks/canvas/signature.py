"""The :class:`Signature`: one task call as Celery's dict, to send now or later.

A signature is a ``dict`` with Celery's keys (``task``, ``args``, ``kwargs``,
``options``, ``subtask_type``, ``immutable``), so it goes through JSON and
through a Celery process unchanged. The task object and the app it was made
with ride along as attributes, never in the dict.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ..exceptions import NotRegistered
from ..result import AsyncResult
from .base import CanvasApp, SendCall, call_options, resolve_app

#: ``subtask_type`` -> the class :meth:`Signature.from_dict` builds (filled by
#: primitives, chords and mapping).
SUBTASK_TYPES: dict[str, type[Signature]] = {}


class Signature(dict[str, Any]):
    """A task call: name, partial arguments and options.

    :param task: a task (``add``), a task name, or a signature dict to copy.
    :param args: partial positional arguments; arguments given at call time
        come first (``add.s(2).delay(5)`` runs ``add(5, 2)``).
    :param kwargs: partial keyword arguments; call-time ones are added.
    :param options: :meth:`apply_async` options (``countdown``, ``queue``, ``link``...).
    :param immutable: ignore call-time arguments (a parent's result).
    :param app: the app state to send with (default: the task's, else the current one).
    """

    _type: Any = None
    _app: CanvasApp | None = None

    def __init__(self, task: Any = None, args: Sequence[Any] | None = None,
                 kwargs: Mapping[str, Any] | None = None,
                 options: Mapping[str, Any] | None = None, subtask_type: str | None = None,
                 immutable: bool = False, app: CanvasApp | None = None,
                 **ex: Any) -> None:
        self._app = app
        if isinstance(task, Mapping):  # a copy: freezing it never changes the original
            super().__init__(task)
            self["args"] = self.get("args") or ()
            self["kwargs"] = dict(self.get("kwargs") or {})
            self["options"] = {key: list(value) if key in ("link", "link_error")
                               and isinstance(value, list) else value
                               for key, value in (self.get("options") or {}).items()}
            self.setdefault("subtask_type", None)
            self.setdefault("immutable", False)
            return
        name = getattr(task, "name", task)
        if not isinstance(name, str):
            raise TypeError(f"signature() takes a task, a task name or a signature dict, "
                            f"not {type(task).__name__}")
        if not isinstance(task, str):
            self._type = task
        super().__init__(task=name, args=tuple(args or ()), kwargs=dict(kwargs or {}),
                         options=dict(options or {}, **ex), subtask_type=subtask_type,
                         immutable=immutable)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: CanvasApp | None = None) -> Signature:
        """A signature (or chain, group...) from its dict, by ``subtask_type``.

        :raises TypeError: ``d`` is not a signature dict (no ``task``).
        """
        if isinstance(d, Signature) and app is None:
            return d
        if not isinstance(d, Mapping) or not isinstance(d.get("task"), str):
            raise TypeError(f"Not a signature (a mapping with a 'task' name): {d!r:.100}")
        kind = SUBTASK_TYPES.get(d.get("subtask_type") or "", Signature)
        return kind._rebuild(d, app if app is not None else getattr(d, "_app", None))

    @classmethod
    def _rebuild(cls, d: Mapping[str, Any], app: CanvasApp | None) -> Signature:
        sig = cls.__new__(cls)
        Signature.__init__(sig, d, app=app)
        sig._type = getattr(d, "_type", None)
        return sig

    # -- the dict's fields ---------------------------------------------------------
    @property
    def task(self) -> str:
        """The task name."""
        return str(self["task"])

    @property
    def name(self) -> str:
        """The task name (as :attr:`task`)."""
        return str(self["task"])

    @property
    def args(self) -> tuple[Any, ...]:
        """The partial positional arguments."""
        return tuple(self["args"] or ())

    @args.setter
    def args(self, value: Sequence[Any]) -> None:
        self["args"] = tuple(value)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The partial keyword arguments."""
        return self["kwargs"]  # type: ignore[no-any-return]

    @property
    def options(self) -> dict[str, Any]:
        """The call options (``task_id`` once frozen, ``link``, ``queue``...)."""
        return self["options"]  # type: ignore[no-any-return]

    @property
    def subtask_type(self) -> str | None:
        """``None`` for a task call; ``"chain"``, ``"group"``... for the primitives."""
        return self.get("subtask_type")

    @property
    def immutable(self) -> bool:
        """Whether call-time arguments (a parent's result) are ignored."""
        return bool(self.get("immutable"))

    @property
    def id(self) -> str | None:
        """The task id once frozen (or given as ``task_id``), else ``None``."""
        return self.options.get("task_id")

    @property
    def app(self) -> CanvasApp:
        """The app this signature is sent with (see :mod:`flask_tasks.canvas.base`)."""
        if self._app is not None:
            return self._app
        if self._type is not None:
            return self._type._state()  # type: ignore[no-any-return]
        return resolve_app()

    @property
    def type(self) -> Any:
        """The registered task this signature calls.

        :raises NotRegistered: no task of that name in this app.
        """
        if self._type is not None:
            return self._type
        task = self.app.get_task(self.task)
        if task is None:
            raise NotRegistered(f"Task {self.task!r} is not registered here, so this signature "
                                f"cannot run in this process (it can still be sent).")
        return task

    def _local_task(self, app: CanvasApp) -> Any:
        return self._type if self._type is not None else app.get_task(self.task)

    # -- building --------------------------------------------------------------------
    def _merge(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
               options: Mapping[str, Any] | None = None
               ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
        """(args, kwargs, options) with call-time ones added (arguments: unless immutable)."""
        merged = dict(self.options, **(options or {}))
        if self.immutable:
            return self.args, dict(self.kwargs), merged
        return (tuple(args or ()) + self.args, dict(self.kwargs, **(kwargs or {})), merged)

    def clone(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Signature:
        """A copy with more partial arguments and options (the original is unchanged)."""
        args2, kwargs2, options2 = self._merge(args, kwargs, options)
        for key in ("link", "link_error"):
            if isinstance(options2.get(key), list):
                options2[key] = list(options2[key])
        copy = dict(self, args=args2, kwargs=kwargs2, options=options2)
        sig = type(self)._rebuild(copy, self._app)
        sig._type = self._type
        return sig

    partial = clone

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        """Set options (``queue="hipri"``, ``countdown=10``...) in place; returns ``self``."""
        if immutable is not None:
            self["immutable"] = immutable
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        """Make call-time arguments ignored (True) or prepended (False)."""
        self["immutable"] = immutable

    def freeze(self, _id: str | None = None, group_id: str | None = None,
               root_id: str | None = None, parent_id: str | None = None,
               group_index: int | None = None) -> Any:
        """Fix the task id now (and the ids given); returns the result to come.

        Calling a frozen signature twice sends two messages with one id.
        """
        opts = self.options
        task_id = opts.setdefault("task_id", _id or str(uuid.uuid4()))
        if root_id:
            opts["root_id"] = root_id
        if parent_id:
            opts["parent_id"] = parent_id
        if group_id and "group_id" not in opts:
            opts["group_id"] = group_id
        if group_index is not None:
            opts["group_index"] = group_index
        try:
            app = self.app
        except RuntimeError:  # no app here: a result that cannot be read yet
            return AsyncResult(task_id, None, task_name=self.task)  # type: ignore[arg-type]
        if "reply_to" not in opts:  # rpc://: its states come back to this process
            reply_to = app.backend.on_task_call(task_id)
            if reply_to:
                opts["reply_to"] = reply_to
        return app.result(task_id, self.task)

    def link(self, callback: Mapping[str, Any]) -> Any:
        """Call ``callback`` with this task's return value when it succeeds; returns it."""
        self.options.setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback: Mapping[str, Any]) -> Any:
        """Call ``errback`` when this task fails; returns it.

        A task whose function takes more than one positional argument is
        called in the failed task's worker with ``(request, exc, traceback)``;
        any other is sent as a task with the failed task's id (Celery's two
        conventions).
        """
        self.options.setdefault("link_error", []).append(errback)
        return errback

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        """``a | b``: the chain of ``a`` then ``b`` (a chain is flattened, not nested)."""
        if isinstance(other, Mapping):
            make_chain: Any = SUBTASK_TYPES["chain"]
            return make_chain(self, other)  # type: ignore[no-any-return]
        return NotImplemented

    def __repr__(self) -> str:
        args = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{'%' if self.immutable else ''}{self.task}({', '.join(args)})"

    # -- calling ---------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task body here and now (nothing is sent)."""
        args2, kwargs2, _ = self._merge(args, kwargs)
        return self.type(*args2, **kwargs2)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """``apply_async(args, kwargs)``: send with the partial arguments completed."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """Send the call: call-time arguments first, then the partial ones; options merged.

        A registered task's arguments are checked as ``delay()`` checks them.

        :returns: an :class:`~flask_tasks.AsyncResult` (an ``EagerResult`` in eager mode).
        :raises TypeError: the arguments do not fit the function, or an unknown option.
        """
        app = self.app
        name, args2, kwargs2, task, call = self._call(app, args, kwargs, options)
        return app.send_task(name, args2, kwargs2, task=task, **call)

    def _call(self, app: CanvasApp, args: Sequence[Any] | None,
              kwargs: Mapping[str, Any] | None, options: Mapping[str, Any]) -> SendCall:
        """``(name, args, kwargs, task, options)`` to send, arguments checked.

        :raises TypeError: the arguments do not fit the function, or an unknown option.
        """
        args2, kwargs2, opts = self._merge(args, kwargs, options)
        task = self._local_task(app)
        if task is not None:
            task.check_arguments(args2, kwargs2)
        return self.task, args2, kwargs2, task, call_options(opts)

    def apply(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Any:
        """Run the call in this process, as ``Task.apply`` does; returns an ``EagerResult``.

        :raises NotRegistered: the task is not registered here.
        """
        args2, kwargs2, opts = self._merge(args, kwargs, options)
        app = self.app
        task = self.type
        task.check_arguments(args2, kwargs2)
        throw = opts.pop("throw", None)
        call: dict[str, Any] = dict(call_options(opts))
        task_id = call.pop("task_id", None)
        return app.apply_eagerly(task, args2, kwargs2, task_id=task_id, throw=throw, **call)


def signature(varies: Any, args: Sequence[Any] | None = None,
              kwargs: Mapping[str, Any] | None = None, **options: Any) -> Signature:
    """A :class:`Signature` from a task name, a task or a signature dict (Celery's ``signature``).

    ``signature("tasks.add", args=(2, 2), countdown=10)``; a dict (from JSON,
    from a Celery process) becomes the right class (a chain, a group...).
    """
    if isinstance(varies, Mapping):
        if isinstance(varies, Signature):
            return varies.clone()
        return Signature.from_dict(varies)
    return Signature(varies, args, kwargs, options=options)


def maybe_signature(d: Any, app: CanvasApp | None = None) -> Signature | None:
    """``d`` as a signature bound to ``app`` (``None`` stays ``None``)."""
    if d is None:
        return None
    return Signature.from_dict(d, app=app)
