"""The worker's side of the canvas, called by :func:`flask_tasks.trace.trace_task`.

After a success, :func:`on_success` sends the ``link`` callbacks (with the
return value, unless immutable) and the chain's next step (popped from the
message's ``chain`` field, the rest passed on); after a failure,
:func:`on_failure` calls the ``link_error`` errbacks with Celery's two
conventions. In eager mode both run in-process (``apply``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

from ..protocol import Context
from .base import CanvasApp
from .signature import Signature

logger = logging.getLogger("flask_tasks.canvas")


def on_success(app: CanvasApp, request: Context, retval: Any) -> list[Any]:
    """Send ``request``'s callbacks and its chain's next step with ``retval``.

    Each goes out with ``parent_id`` = this task, ``root_id`` = its root.

    :returns: the results of what was sent (the task's ``children``).
    :raises Exception: a callback could not be sent (the caller fails the task).
    """
    parent = {"parent_id": request.id, "root_id": request.root_id or request.id}
    children = [_send(Signature.from_dict(callback, app), (retval,), request.is_eager, parent)
                for callback in request.callbacks or ()]
    if request.chain:
        rest = list(request.chain)
        step = Signature.from_dict(rest.pop(), app)
        children.append(_send(step, (retval,), request.is_eager, dict(parent, chain=rest)))
    return children


def on_failure(app: CanvasApp, request: Context, exc: BaseException, traceback: str) -> None:
    """Call ``request``'s errbacks (never raises: a failing errback is logged).

    An errback whose task function takes more than one positional argument
    (or ``*args``) is called here, in this worker, with ``(request, exc,
    traceback)``; any other (a bound task, a class-based one, one not
    registered here) is sent with the failed task's id, as Celery does.
    """
    parent = {"parent_id": request.id, "root_id": request.root_id or request.id}
    for errback in request.errbacks or ():
        try:
            sig = Signature.from_dict(errback, app)
            task = sig._local_task(app)
            if task is not None and takes_request(task):
                sig(request, exc, traceback)
            else:
                _send(sig, (request.id,), request.is_eager, parent)
        except Exception:
            logger.exception("Errback %r of task %s[%s] failed", _name(errback), request.task,
                             request.id)


def takes_request(task: Any) -> bool:
    """Whether an errback task is called with ``(request, exc, traceback)`` (Celery's rule).

    True for a function task (not bound) with more than one positional
    parameter or ``*args``.
    """
    fn = getattr(task, "_fn", None)
    if fn is None or getattr(task, "bind", False):
        return False
    try:
        spec = inspect.getfullargspec(fn)
    except TypeError:
        return False
    return bool(spec.varargs) or len(spec.args) > 1


def _send(sig: Signature, args: tuple[Any, ...], eager: bool, options: dict[str, Any]) -> Any:
    if eager:
        return sig.apply(args, **options)
    return sig.apply_async(args, **options)


def _name(errback: Any) -> str:
    return str(errback.get("task")) if isinstance(errback, Mapping) else repr(errback)
