"""What the canvas needs from an app, and how it finds one.

A signature made from a task (``add.s(2)``) sends through that task's app; one
made by name (``signature("tasks.add")``) or received in a message sends
through the app it is bound to (the worker binds the signatures it finds in
a message to its own app state), else through the app the extension gives
(:func:`use_app_resolver`, set by :mod:`flask_tasks.extension` at import:
the app of the running task, else the current app, else the only one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, Unpack

from ..backends.base import Backend
from ..config import Config
from ..options import CALL_OPTIONS, CallOptions
from ..result import AsyncResult, EagerResult

logger = logging.getLogger("flask_tasks.canvas")

#: Options Celery puts in a signature's ``options`` that do not apply here;
#: dropped when a signature is called (a Celery client's chain carries them).
CELERY_ONLY_OPTIONS = frozenset({
    "stamped_headers", "stamps", "subtask_type", "route_name", "exchange", "routing_key",
    "add_to_parent", "shadow", "publisher", "producer", "connection", "chord_size",
    "exchange_type", "delivery_mode", "mandatory", "immediate", "declare", "use_link",
    "ignore_result_from_chord", "result_cls", "replaced_task_nesting", "taskset_id",
})


#: One call for ``send_many``: ``(name, args, kwargs, task or None, options)``.
SendCall = tuple[str, Sequence[Any], Mapping[str, Any], Any, CallOptions]


class CanvasApp(Protocol):
    """What a signature needs from its app (an :class:`~flask_tasks.AppState` is one)."""

    @property
    def config(self) -> Config: ...
    @property
    def backend(self) -> Backend: ...
    def send_task(self, name: str, args: Sequence[Any] | None = None,
                  kwargs: Mapping[str, Any] | None = None, *, task: Any = None,
                  **options: Unpack[CallOptions]) -> AsyncResult[Any]: ...
    def send_many(self, calls: Sequence[SendCall]) -> list[AsyncResult[Any]]: ...
    def apply_eagerly(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                      *, task_id: str | None = None, throw: bool | None = None,
                      **options: Any) -> EagerResult[Any]: ...
    def result(self, task_id: str, task_name: str | None = None) -> AsyncResult[Any]: ...
    def get_task(self, name: str) -> Any: ...


_resolver: list[Callable[[], CanvasApp]] = []


def use_app_resolver(resolver: Callable[[], CanvasApp]) -> None:
    """Set how an unbound signature finds its app (the extension sets it once, at import)."""
    _resolver[:] = [resolver]


def resolve_app() -> CanvasApp:
    """The app an unbound signature is sent through.

    :raises RuntimeError: no resolver is set (``flask_tasks.extension`` not
        imported), or it found no app (its message says why).
    """
    if not _resolver:
        raise RuntimeError("No flask_tasks app to send this signature with: create a Tasks "
                           "extension and call tasks.init_app(app) first.")
    return _resolver[0]()


def call_options(options: Mapping[str, Any]) -> CallOptions:
    """A signature's options as :class:`CallOptions` for ``send_task``.

    Celery's options that do not apply here (:data:`CELERY_ONLY_OPTIONS`) are
    dropped; ``link`` / ``link_error`` become lists of signature dicts.

    :raises TypeError: an option neither this package nor Celery knows
        (a typo in ``.set()``), named by ``send_task``.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in CELERY_ONLY_OPTIONS:
            logger.debug("Option %r of a signature does not apply here; dropped", key)
            continue
        out[key] = value
    for key in ("link", "link_error"):
        if out.get(key) is not None:
            out[key] = as_signature_dicts(out[key])
    unknown = out.keys() - CALL_OPTIONS
    if unknown:  # the same error as apply_async gives
        from_options = ", ".join(sorted(unknown))
        raise TypeError(f"Unknown option(s) in a signature: {from_options}. "
                        f"Known: see flask_tasks.options.CallOptions.")
    return out  # type: ignore[return-value]


def as_signature_dicts(value: Any) -> list[dict[str, Any]]:
    """``link=`` / ``link_error=`` as a list of signature dicts.

    :raises TypeError: an item is not a signature (a mapping with ``task``).
    """
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if not isinstance(item, Mapping) or "task" not in item:
            raise TypeError(f"link= and link_error= take signatures (add.s(), "
                            f"signature('name')), not {type(item).__name__}: {item!r:.100}")
        out.append(item if isinstance(item, dict) else dict(item))
    return out
