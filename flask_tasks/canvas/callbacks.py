"""The worker's side of the canvas, called by :func:`flask_tasks.trace.trace_task`.

After a success, :func:`on_success` sends the ``link`` callbacks (with the
return value, unless immutable) and the chain's next step (popped from the
message's ``chain`` field, the rest passed on); after a failure,
:func:`on_failure` calls the ``link_error`` errbacks with Celery's two
conventions. In eager mode both run in-process (``apply``).

A header task of a chord (its message has a ``chord`` field), once final,
reports its state through :func:`on_chord_part`; the one call that completes
the chord and wins the store's dispatch claim sends the body (or fails it
with :class:`~flask_tasks.exceptions.ChordError`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

from .. import states
from ..exceptions import ChordError
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


#: Seconds the dispatch claim is extended to before the body is sent: enough
#: for the publisher's retries while the broker is away.
CHORD_CLAIM_EXTEND = 60.0


def on_chord_part(app: CanvasApp, request: Context, state: str, result: Any) -> None:
    """Count ``request`` (a chord's header task, now final) and dispatch the body if ours.

    ``result`` is the return value, or the exception in ``FAILURE`` /
    ``REVOKED``. The store counts each header task once
    (:meth:`~flask_tasks.backends.base.Backend.chord_part_return`); only the
    caller given the claim sends the body with the header's values in order,
    or, when a header task failed, stores ``FAILURE`` with a
    :class:`~flask_tasks.exceptions.ChordError` for the body and calls the
    body's errbacks. Never raises: errors are logged.
    """
    if request.is_eager or not request.group or not isinstance(request.chord, Mapping):
        return
    try:
        backend = app.backend
        claim = backend.chord_part_return(request.group, request.id, request.group_index,
                                          state, result)
        if claim is None:
            return
        try:
            if not backend.chord_claim_extend(claim, CHORD_CLAIM_EXTEND):
                logger.warning("Chord %s: the dispatch claim was lost; another caller "
                               "sends its body", request.group)
                return
            body = Signature.from_dict(request.chord, app)
            failed = claim.failed_part
            if failed is None:
                body.apply_async((claim.values,))
            else:
                _fail_chord(app, request, body, failed.task_id, failed.state,
                            failed.exception())
        finally:
            backend.chord_done(claim)
    except Exception:
        logger.exception("Chord %s: the part of task %s[%s] could not be counted or its "
                         "body sent", request.group, request.task, request.id)


def _fail_chord(app: CanvasApp, request: Context, body: Signature, task_id: str,
                state: str, exc: BaseException | None) -> None:
    """Store ``FAILURE`` (a ``ChordError``) for the body and call its errbacks."""
    reason = ChordError(f"Dependency {task_id} raised {exc!r}" if state == states.FAILURE
                        else f"Dependency {task_id} ended {state}: {exc!r}")
    target = body.tasks[-1] if body.subtask_type == "chain" else body  # type: ignore[attr-defined]
    body_id = target.id
    if body_id is None:
        logger.error("Chord %s failed (%s) but its body has no task id", request.group, reason)
        return
    app.backend.store_result(body_id, reason, states.FAILURE, str(reason))
    logger.error("Chord %s: %s; its body %s[%s] fails", request.group, reason, target.task,
                 body_id)
    errbacks = list(body.options.get("link_error") or ())
    if target is not body:
        errbacks += list(target.options.get("link_error") or ())
    if errbacks:
        body_request = Context(id=body_id, task=target.task, args=list(target.args),
                               kwargs=dict(target.kwargs), errbacks=errbacks,
                               root_id=request.root_id, parent_id=request.id,
                               group=request.group, hostname=request.hostname)
        on_failure(app, body_request, reason, str(reason))


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
