"""Run one call of a task: the one path for pool processes, eager mode and ``Task.apply``.

Modelled on Celery's ``celery/app/trace.py``. :func:`trace_task` gets the
app, the app's state (its result backend, its settings, and the way a retry
is published) and the decoded :class:`~flask_tasks.protocol.Context`;
nothing is found through ``current_app``. It never raises for the task's own
error: the :class:`Outcome` says what happened. One call, in order:

1. past its ``expires``: not run; REVOKED stored (and counted for its chord),
   ``task_revoked(expired=True)``;
2. STARTED stored (with ``track_started``);
3. inside ``app.app_context()``: ``task_prerun``, ``before_start``, the body
   (with the soft time limit; an ``autoretry_for`` exception becomes
   :meth:`Task.retry`), then one of

   - success: the ``link`` callbacks and the chain's next step sent (with
     the return value; their results are ``request.children``), SUCCESS
     stored, a chord's header task counted
     (:func:`flask_tasks.canvas.callbacks.on_chord_part`), ``on_success``,
     ``task_success``;
   - :class:`~flask_tasks.exceptions.Retry`: RETRY stored, ``on_retry``, ``task_retry``;
   - :class:`~flask_tasks.exceptions.Ignore` / :class:`~flask_tasks.exceptions.Reject`:
     nothing stored, the worker acks, rejects or requeues;
   - an exception: FAILURE stored, the ``link_error`` errbacks
     (:func:`flask_tasks.canvas.callbacks.on_failure`), a chord's header task
     counted (its chord fails), ``on_failure``, ``task_failure``;

   then ``after_return`` (not after a retry, Ignore or Reject) and ``task_postrun``;
   the app context's teardown runs last.

Handlers and signal receivers that raise are logged, never propagated.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time
import traceback as tb_module
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import Flask

from . import states
from .canvas import callbacks
from .exceptions import (
    EncodeError,
    Ignore,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TaskRevokedError,
)
from .options import first, time_limits
from .protocol import Context
from .signals import (
    send_robust,
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_revoked,
    task_success,
)
from .task import Task, TaskApp, current_request, current_state

#: The worker's logger: "Task ...[id] succeeded in ..." lines are the worker's log.
logger = logging.getLogger("flask_tasks.worker")

#: ``request.hostname`` when the runner gives none.
HOSTNAME = socket.gethostname()

#: What the consumer does with the message after the call (SKIP: never started).
ACK, REJECT, REQUEUE, SKIP = "ack", "reject", "requeue", "skip"
#: The message was refused for its content (not a task message this worker can
#: run): rejected, or set aside as a dead letter with ``TASKS_DEAD_LETTER_REJECTED``.
REFUSE = "refuse"


@dataclass
class Outcome:
    """What happened to one call (and, in a worker, what to do with its message)."""

    tag: int = 0
    state: str = states.SUCCESS
    retval: Any = None
    exc: BaseException | None = None
    traceback: str | None = None
    #: Seconds the body ran.
    runtime: float = 0.0
    action: str = ACK
    reason: str | None = None


#: Outcomes after which ``after_return`` is not called (the task did not return).
_NO_AFTER_RETURN = frozenset({states.IGNORED, states.RETRY, states.REJECTED})

#: Handlers that run after the final state was stored (they may read it).
_AFTER_STORE_HANDLERS = ("on_success", "on_failure", "after_return")


def trace_task(app: Flask, state: TaskApp, task: Task[Any, Any], request: Context, *,
               store: bool = True, hostname: str | None = None) -> Outcome:
    """Run ``task`` for ``request`` inside ``app``'s app context; see the module docstring.

    :param app: the app whose context the body runs in.
    :param state: the app's state: ``state.backend`` stores, ``state.config``
        gives the defaults, and :meth:`Task.retry` and :meth:`Task.update_state`
        in the body go through it (not through ``current_app``).
    :param task: the task to run.
    :param request: the decoded call; ``request.is_eager`` for in-process calls
        (no soft time limit, the return value goes through the result
        serializer as it would through a worker).
    :param store: store STARTED (with ``track_started``) and the final state,
        unless the task or the call ignores results or the backend is disabled.
    :param hostname: ``request.hostname`` (default: this machine's name).
    :returns: the :class:`Outcome`; the task's exception is in ``outcome.exc``.
    """
    config, backend = state.config, state.backend
    ignore = first(task.ignore_result, default=config.ignore_result)
    store = store and not (ignore or request.ignore_result or backend.disabled)
    if request.expires is not None and request.expires < datetime.now(UTC):
        return _expired(state, task, request, store)
    request.hostname = hostname or HOSTNAME
    extended = config.result_extended
    task_id, args, kwargs = request.id, request.args, request.kwargs
    outcome = Outcome()
    if store and first(task.track_started, default=config.track_started):
        try:
            backend.store_result(task_id, {"pid": os.getpid(), "hostname": request.hostname},
                                 states.STARTED, request=request, extended=extended)
        except Exception:  # the task still runs; its final state is stored as usual
            logger.exception("Could not store the start of task %s[%s]", task.name, task_id)
    tokens = current_request.set(request), current_state.set(state)
    start = time.perf_counter()
    try:
        with app.app_context():
            send_robust(task_prerun, task, task_id=task_id, task=task, args=args, kwargs=kwargs)
            try:
                _call_handler(task, "before_start", task_id, args, kwargs)
                with _SoftLimit(None if request.is_eager
                                else time_limits(task, request.timelimit, config)[1]):
                    retval = _run(task, args, kwargs)
                if request.callbacks or request.chain:
                    # Sent before the result is stored, as Celery does, so that
                    # the stored meta can name them (request.children).
                    request.children = callbacks.on_success(state, request, retval)
                if store:
                    backend.store_result(task_id, retval, states.SUCCESS, request=request,
                                         extended=extended, defer=True)
                    _flush_if_watched(state, task)
                if request.chord:  # after the result is stored; never raises
                    callbacks.on_chord_part(state, request, states.SUCCESS, retval)
                if request.is_eager:  # what a caller would get back from a worker
                    retval = backend.decode(backend.encode(retval))
            except Retry as exc:
                outcome.runtime = time.perf_counter() - start
                _retry(state, task, request, outcome, exc, store)
            except Ignore:
                outcome.state = states.IGNORED
                logger.info("Task %s[%s] ignored", task.name, task_id)
            except Reject as exc:
                outcome.state = states.REJECTED
                # The worker requeues only an unacknowledged (acks_late) message.
                outcome.action = REQUEUE if exc.requeue else REJECT
                outcome.reason = (f"Task {task.name}[{task_id}] rejected"
                                  f"{' (requeue)' if exc.requeue else ''}"
                                  f"{': ' + str(exc.reason) if exc.reason else ''}")
            except (Exception, SoftTimeLimitExceeded) as exc:
                outcome.runtime = time.perf_counter() - start
                _fail(state, task, request, outcome, exc, store)
            else:
                outcome.runtime = time.perf_counter() - start
                outcome.retval = retval
                _call_handler(task, "on_success", retval, task_id, args, kwargs)
                send_robust(task_success, task, result=retval)
                if logger.isEnabledFor(logging.INFO):
                    logger.info("Task %s[%s] succeeded in %.6fs: %.200r",
                                task.name, task_id, outcome.runtime, retval)
            finally:
                if outcome.state not in _NO_AFTER_RETURN:  # as Celery's IGNORE_STATES
                    retval_or_exc = outcome.exc if outcome.exc is not None else outcome.retval
                    _call_handler(task, "after_return", outcome.state, retval_or_exc, task_id,
                                  args, kwargs, outcome.traceback)
                send_robust(task_postrun, task, task_id=task_id, task=task, args=args,
                            kwargs=kwargs, retval=outcome.retval, state=outcome.state)
    finally:
        current_state.reset(tokens[1])
        current_request.reset(tokens[0])
    return outcome


def backoff_delay(factor: bool | float, retries: int, maximum: float, jitter: bool) -> float:
    """Seconds before retry number ``retries + 1`` with exponential backoff (Celery's rule).

    ``factor × 2 ** retries`` seconds (``factor`` True means 1), at most
    ``maximum``; with ``jitter`` a random value between 0 and that. Cheap for
    any ``retries`` a message may carry (the exponent is capped at 64).
    """
    delay = min(float(maximum),
                (1.0 if factor is True else float(factor)) * 2.0 ** min(max(retries, 0), 64))
    return random.uniform(0, delay) if jitter else delay


def _run(task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Run the task body, turning an ``autoretry_for`` exception into :meth:`Task.retry`."""
    try:
        return task.run(*args, **kwargs)
    except Retry:
        raise
    except Exception as exc:
        if task.autoretry_for and isinstance(exc, task.autoretry_for) and not (
                task.dont_autoretry_for and isinstance(exc, task.dont_autoretry_for)):
            options = dict(task.retry_kwargs or {})
            if task.retry_backoff and "countdown" not in options:
                options["countdown"] = backoff_delay(task.retry_backoff, task.request.retries,
                                                     task.retry_backoff_max, task.retry_jitter)
            task.retry(exc=exc, **options)
        raise


def _retry(state: TaskApp, task: Task[Any, Any], request: Context, outcome: Outcome,
           signal: Retry, store: bool) -> None:
    cause: BaseException = signal.exc if signal.exc is not None else signal
    text = "".join(tb_module.format_exception(cause))
    outcome.state, outcome.traceback = states.RETRY, text
    if store:
        try:
            state.backend.store_result(request.id, cause, states.RETRY, text, request=request)
        except Exception:
            logger.exception("Could not store the retry of task %s[%s]", task.name, request.id)
    _call_handler(task, "on_retry", cause, request.id, request.args, request.kwargs, text)
    send_robust(task_retry, task, request=request, reason=signal, einfo=text)
    logger.info("Task %s[%s] retry: %s", task.name, request.id, signal)


def _fail(state: TaskApp, task: Task[Any, Any], request: Context, outcome: Outcome,
          exc: BaseException, store: bool) -> None:
    text = "".join(tb_module.format_exception(exc))
    outcome.state, outcome.exc, outcome.traceback = states.FAILURE, exc, text
    if store:
        try:
            state.backend.store_result(request.id, exc, states.FAILURE, text, request=request,
                                       extended=state.config.result_extended, defer=True)
            _flush_if_watched(state, task)
        except Exception:
            logger.exception("Could not store the failure of task %s[%s]", task.name, request.id)
    if request.errbacks:  # after FAILURE is stored, before on_failure; never raises
        callbacks.on_failure(state, request, exc, text)
    if request.chord:  # the chord ends: its body fails (never raises)
        callbacks.on_chord_part(state, request, states.FAILURE, exc)
    _call_handler(task, "on_failure", exc, request.id, request.args, request.kwargs, text)
    send_robust(task_failure, task, task_id=request.id, exception=exc, args=request.args,
                kwargs=request.kwargs, traceback=text, einfo=text)
    if task.throws and isinstance(exc, task.throws):
        logger.info("Task %s[%s] raised expected: %r", task.name, request.id, exc)
    elif isinstance(exc, EncodeError):
        logger.error("Task %s[%s] failed: %s", task.name, request.id, exc)
    else:
        logger.error("Task %s[%s] raised unexpected: %r\n%s", task.name, request.id, exc, text)


def _expired(state: TaskApp, task: Task[Any, Any], request: Context, store: bool) -> Outcome:
    """A call past its ``expires``: not run, REVOKED, ``task_revoked(expired=True)``."""
    exc = TaskRevokedError(f"Task {task.name}[{request.id}] expired at "
                           f"{request.expires.isoformat() if request.expires else '?'}: not run.")
    logger.warning("%s", exc)
    if store:
        try:
            state.backend.store_result(request.id, exc, states.REVOKED, str(exc), request=request)
        except Exception:
            logger.exception("Could not store the revocation of %s", request.id)
    if request.chord:  # a revoked header task ends the chord
        callbacks.on_chord_part(state, request, states.REVOKED, exc)
    send_robust(task_revoked, task, request=request, terminated=False, signum=None, expired=True)
    return Outcome(state=states.REVOKED, exc=exc, action=ACK, reason=str(exc))


def _call_handler(task: Task[Any, Any], handler: str, *args: Any) -> None:
    try:
        getattr(task, handler)(*args)
    except Exception:
        logger.exception("Handler %s.%s of task %s raised", type(task).__name__, handler, task.name)


def _flush_if_watched(state: TaskApp, task: Task[Any, Any]) -> None:
    """Write a deferred final state now if a handler or receiver runs after it.

    A prefork child batches final results (``backend.batching``); the
    handlers and signals that follow are documented to run after the state
    was stored, so with one of them the batch is written first.
    """
    backend = state.backend
    if backend.batching and (
            _overrides_after_store(type(task))
            or task_success.receivers or task_failure.receivers or task_postrun.receivers):
        backend.flush()


_overriding: dict[type, bool] = {}  # task class -> defines an after-store handler


def _overrides_after_store(cls: type) -> bool:
    """Whether a task class defines one of :data:`_AFTER_STORE_HANDLERS` (looked up once)."""
    found = _overriding.get(cls)
    if found is None:
        found = _overriding[cls] = any(getattr(cls, name) is not getattr(Task, name)
                                       for name in _AFTER_STORE_HANDLERS)
    return found


#: Longest soft time limit the timer is set to, seconds (~31 years; setitimer
#: refuses values past ~9.2e9).
_LONGEST_TIMER = 1e9


def _raise_soft_limit(signum: int, frame: Any) -> None:
    raise SoftTimeLimitExceeded("soft time limit exceeded")


class _SoftLimit:
    """Raise :class:`SoftTimeLimitExceeded` in this (main) thread after ``seconds``.

    Uses ``SIGALRM``, so only where the task runs in a process's main thread
    (prefork children, solo); elsewhere it does nothing. A limit longer than
    :data:`_LONGEST_TIMER` (the timer cannot hold more) is that long.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = min(seconds, _LONGEST_TIMER) if seconds and seconds > 0 \
            and hasattr(signal, "setitimer") \
            and threading.current_thread() is threading.main_thread() else None
        self.previous: Any = None

    def __enter__(self) -> None:
        if self.seconds:
            self.previous = signal.signal(signal.SIGALRM, _raise_soft_limit)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc_info: Any) -> None:
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous or signal.SIG_DFL)
