"""Run one task message: decode, find the task, run it in the app context, store the result.

Used by every pool (in the process or thread that runs the task) and by
eager mode. Never raises for a task's own error: the outcome says what happened.
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
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from flask import Flask

from .. import states
from ..exceptions import (
    DecodeError,
    EncodeError,
    Ignore,
    NotRegistered,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TaskRevokedError,
)
from ..protocol import Request, parse
from ..registry import unknown_task_message
from ..signals import (
    send_robust,
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_revoked,
    task_success,
)
from ..task import Task, current_request

if TYPE_CHECKING:
    from ..state import AppState

logger = logging.getLogger("flask_tasks.worker")

HOSTNAME = socket.gethostname()

#: What the consumer does with the message after the job (SKIP: never started).
ACK, REJECT, REQUEUE, SKIP = "ack", "reject", "requeue", "skip"


@dataclass
class Job:
    """One message handed to the pool (picklable, small)."""

    tag: int
    headers: dict[str, Any]
    body: bytes
    content_type: str
    content_encoding: str
    properties: dict[str, Any]
    delivery_info: dict[str, Any]


@dataclass
class Outcome:
    """What happened to one job."""

    tag: int = 0
    state: str = states.SUCCESS
    retval: Any = None
    exc: BaseException | None = None
    traceback: str | None = None
    runtime: float = 0.0
    action: str = ACK
    reason: str | None = None


def _call_handler(task: Task[Any, Any], handler: str, *args: Any) -> None:
    try:
        getattr(task, handler)(*args)
    except Exception:
        logger.exception("Handler %s.%s of task %s raised", type(task).__name__, handler, task.name)


def _raise_soft_limit(signum: int, frame: Any) -> None:
    raise SoftTimeLimitExceeded("soft time limit exceeded")


class _SoftLimit:
    """Raise :class:`SoftTimeLimitExceeded` in this (main) thread after ``seconds``.

    Uses ``SIGALRM``, so only where the task runs in a process's main thread
    (prefork children, solo); elsewhere it does nothing.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds if seconds and hasattr(signal, "setitimer") \
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


def time_limits(task: Task[Any, Any], timelimit: Any, config: Any) -> tuple[float | None,
                                                                            float | None]:
    """(hard, soft) seconds for a call: the message's, else the task's, else the worker's.

    :param timelimit: the message's ``timelimit`` header, ``[hard, soft]`` (may be None).
    """
    hard, soft = timelimit if isinstance(timelimit, (list, tuple)) and len(timelimit) == 2 \
        else (None, None)
    first = [v for v in (hard, task.time_limit, config.time_limit) if v is not None]
    second = [v for v in (soft, task.soft_time_limit, config.soft_time_limit) if v is not None]
    return (float(first[0]) if first else None, float(second[0]) if second else None)


#: Outcomes after which ``after_return`` is not called (the task did not return).
_NO_AFTER_RETURN = frozenset({states.IGNORED, states.RETRY, states.REJECTED})

#: Handlers that run after the final state was stored (they may read it).
_AFTER_STORE_HANDLERS = ("on_success", "on_failure", "after_return")


def _flush_if_watched(state: AppState, task: Task[Any, Any]) -> None:
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


def run_task(app: Flask, state: AppState, task: Task[Any, Any], request: Request, *,
             store: bool = True, hostname: str | None = None) -> Outcome:
    """Run ``task`` for ``request`` inside ``app``'s app context.

    :param store: store STARTED (with ``track_started``) and the final state
        in the result backend, unless the task or call ignores results.
    :returns: the :class:`Outcome`; the task's exception is in ``outcome.exc``.
    """
    config = state.config
    backend = state.backend
    request.hostname = hostname or HOSTNAME
    ignore = task.ignore_result if task.ignore_result is not None else config.ignore_result
    store = store and not (ignore or request.ignore_result or backend.disabled)
    track = task.track_started if task.track_started is not None else config.track_started
    extended = config.result_extended
    task_id, args, kwargs = request.id, request.args, request.kwargs
    outcome = Outcome()
    if store and track:
        backend.store_result(task_id, {"pid": os.getpid(), "hostname": request.hostname},
                             states.STARTED, request=request, extended=extended)
    token = current_request.set(request)
    start = time.perf_counter()
    try:
        with app.app_context():
            send_robust(task_prerun, task, task_id=task_id, task=task, args=args, kwargs=kwargs)
            try:
                _call_handler(task, "before_start", task_id, args, kwargs)
                with _SoftLimit(None if request.is_eager
                                else time_limits(task, request.timelimit, config)[1]):
                    retval = _run(task, args, kwargs)
                if store:
                    backend.store_result(task_id, retval, states.SUCCESS, request=request,
                                         extended=extended, defer=True)
                    _flush_if_watched(state, task)
                if request.is_eager:  # what a caller would get back from a worker
                    retval = backend.decode(backend.encode(retval))
            except Retry as exc:
                outcome.runtime = time.perf_counter() - start
                _retry(task, request, outcome, exc, store, state)
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
                _fail(task, request, outcome, exc, store, state)
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
        current_request.reset(token)
    return outcome


def backoff_delay(factor: bool | float, retries: int, maximum: float, jitter: bool) -> float:
    """Seconds before retry number ``retries + 1`` with exponential backoff (Celery's rule).

    ``factor × 2 ** retries`` seconds (``factor`` True means 1), at most
    ``maximum``; with ``jitter`` a random value between 0 and that.
    """
    delay = min(float(maximum), (1.0 if factor is True else float(factor)) * 2 ** retries)
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


def _retry(task: Task[Any, Any], request: Request, outcome: Outcome, signal: Retry, store: bool,
           state: AppState) -> None:
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


def _fail(task: Task[Any, Any], request: Request, outcome: Outcome, exc: BaseException,
          store: bool, state: AppState) -> None:
    text = "".join(tb_module.format_exception(exc))
    outcome.state, outcome.exc, outcome.traceback = states.FAILURE, exc, text
    if store:
        try:
            state.backend.store_result(request.id, exc, states.FAILURE, text, request=request,
                                       extended=state.config.result_extended, defer=True)
            _flush_if_watched(state, task)
        except Exception:
            logger.exception("Could not store the failure of task %s[%s]", task.name, request.id)
    _call_handler(task, "on_failure", exc, request.id, request.args, request.kwargs, text)
    send_robust(task_failure, task, task_id=request.id, exception=exc, args=request.args,
                kwargs=request.kwargs, traceback=text, einfo=text)
    if task.throws and isinstance(exc, task.throws):
        logger.info("Task %s[%s] raised expected: %r", task.name, request.id, exc)
    elif isinstance(exc, EncodeError):
        logger.error("Task %s[%s] failed: %s", task.name, request.id, exc)
    else:
        logger.error("Task %s[%s] raised unexpected: %r\n%s", task.name, request.id, exc, text)


def execute(app: Flask, state: AppState, job: Job, hostname: str | None = None) -> Outcome:
    """Decode ``job`` and run it; a message that cannot be run is rejected with a reason.

    A body that cannot be decoded or a task not registered here ends the
    message (``REJECT``) and, when the task id is known, stores FAILURE so
    callers waiting on it learn why.
    """
    try:
        request = parse(job.headers, job.body, job.content_type, job.content_encoding,
                        state.accept, job.properties, job.delivery_info)
    except DecodeError as exc:
        task_id = (job.headers or {}).get("id") if isinstance(job.headers, dict) else None
        reason = f"Rejected message {task_id or '(no id)'}: {exc}"
        if isinstance(task_id, str) and task_id and not str(exc).startswith("content type"):
            _store_failure(state, task_id, exc)
        return Outcome(tag=job.tag, state=states.REJECTED, action=REJECT, reason=reason, exc=exc)
    task = state.get_task(request.task)
    if task is None:
        error = NotRegistered(unknown_task_message(request.task, len(state.task_names())))
        _store_failure(state, request.id, error)
        return Outcome(tag=job.tag, state=states.REJECTED, action=REJECT, exc=error,
                       reason=f"Rejected task {request.task}[{request.id}]: {error}")
    if request.expires is not None and request.expires < datetime.now(timezone.utc):
        return _expired(state, task, request, job.tag)
    outcome = run_task(app, state, task, request, hostname=hostname)
    outcome.tag = job.tag
    return outcome


def _expired(state: AppState, task: Task[Any, Any], request: Request, tag: int) -> Outcome:
    """A task past its ``expires``: not run, REVOKED, ``task_revoked(expired=True)``."""
    exc = TaskRevokedError(f"Task {task.name}[{request.id}] expired at "
                           f"{request.expires.isoformat() if request.expires else '?'}: not run.")
    logger.warning("%s", exc)
    ignore = task.ignore_result if task.ignore_result is not None else state.config.ignore_result
    if not (ignore or request.ignore_result or state.backend.disabled):
        try:
            state.backend.store_result(request.id, exc, states.REVOKED, str(exc), request=request)
        except Exception:
            logger.exception("Could not store the revocation of %s", request.id)
    send_robust(task_revoked, task, request=request, terminated=False, signum=None, expired=True)
    return Outcome(tag=tag, state=states.REVOKED, exc=exc, action=ACK, reason=str(exc))


def _store_failure(state: AppState, task_id: str, exc: BaseException) -> None:
    try:
        state.backend.store_result(task_id, exc, states.FAILURE, str(exc))
    except Exception:
        logger.exception("Could not store the failure of %s", task_id)
