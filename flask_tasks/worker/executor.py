"""The pool side of one message: decode a :class:`Job`, find its task, run it with trace.

:func:`run_job` runs in the process or thread of the pool that took the job;
the call itself (app context, handlers, signals, results, retries, time
limits) is :func:`flask_tasks.trace.trace_task`, the same path eager mode
and ``Task.apply`` take. Never raises for a task's own error: the
:class:`Outcome` says what happened and what to do with the message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Flask

from .. import states
from ..app_state import AppState
from ..exceptions import DecodeError, NotRegistered
from ..options import time_limits
from ..protocol import BadMessage, message_ids, parse
from ..registry import unknown_task_message
from ..trace import ACK, REFUSE, REJECT, REQUEUE, SKIP, Outcome, trace_task

__all__ = ["ACK", "REFUSE", "REJECT", "REQUEUE", "SKIP", "Job", "Outcome", "label", "refusal",
           "run_job", "time_limits"]

logger = logging.getLogger("flask_tasks.worker")


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
    #: Stamped by the pool: jobs of a generation older than the pool's
    #: :meth:`~.pools.Pool.skip_queued` mark come back SKIPPED, unstarted.
    generation: int = 0


def run_job(app: Flask, state: AppState, job: Job, hostname: str | None = None) -> Outcome:
    """Decode ``job`` and run it; a message that cannot be run is refused with a reason.

    A message :func:`~flask_tasks.protocol.parse` refuses (a header of the
    wrong type, a content encoding nobody knows, a body that cannot be
    decoded or is not ``[args, kwargs, embed]``) or a task not registered
    here ends the message (``REFUSE``: rejected, or set aside as a dead
    letter) and, when the task id can be read, stores FAILURE so callers
    waiting on it learn why (a content type ``TASKS_ACCEPT_CONTENT`` does not
    accept too: it is never decoded).

    Never raises (but for ``BaseException`` s such as ``KeyboardInterrupt``):
    an error of the worker's own is logged with the task's name and id,
    stored as FAILURE and the message acknowledged.

    :param app: the worker's app (the task body runs in its app context).
    :param state: the app's state: its backend, settings and publisher.
    :param hostname: the worker's node name, for ``request.hostname``.
    """
    try:
        return _run_job(app, state, job, hostname)
    except Exception as exc:
        name, task_id = message_ids(job.headers)
        logger.exception("Internal error running task %s[%s] (job %s)", name or "?",
                         task_id or "no id", job.tag)
        reason = f"Internal error of the worker running task {name or '?'}[{task_id}]: {exc!r}"
        if task_id is not None:
            _store_failure(state, task_id, exc, reason, job)
        return Outcome(tag=job.tag, state=states.FAILURE, action=ACK, reason=reason, exc=exc)


def _run_job(app: Flask, state: AppState, job: Job, hostname: str | None) -> Outcome:
    try:
        request = parse(job.headers, job.body, job.content_type, job.content_encoding,
                        state.accept, job.properties, job.delivery_info)
    except BadMessage as exc:
        failure = refusal(exc)
        if exc.task_id is not None:
            _store_failure(state, exc.task_id, failure, str(failure), job)
        return Outcome(tag=job.tag, state=states.REJECTED, action=REFUSE, exc=failure,
                       reason=f"Rejected {label(exc.name, exc.task_id)}: {exc}")
    task = state.get_task(request.task)
    if task is None:
        error = NotRegistered(unknown_task_message(request.task, len(state.task_names())))
        _store_failure(state, request.id, error, str(error), job)
        return Outcome(tag=job.tag, state=states.REJECTED, action=REFUSE, exc=error,
                       reason=f"Rejected task {request.task}[{request.id}]: {error}")
    outcome = trace_task(app, state, task, request, hostname=hostname)
    outcome.tag = job.tag
    return outcome


def refusal(exc: BadMessage) -> DecodeError:
    """What a caller waiting on a refused message gets: a ``DecodeError`` with the reason."""
    return DecodeError(f"The worker rejected the message, the task did not run: {exc}")


def label(name: str | None, task_id: str | None) -> str:
    """How a log line names a message: ``task <name>[<id>]``, else ``message <id>``.

    :param name: the task name its headers tell (None: unreadable).
    :param task_id: the task id its headers tell (None: unreadable).
    """
    if task_id is None:
        return f"task {name} (no id)" if name else "message (no id)"
    return f"task {name}[{task_id}]" if name else f"message {task_id}"


def _store_failure(state: AppState, task_id: str, exc: BaseException, reason: str,
                   job: Job) -> None:
    try:
        state.backend.store_result(task_id, exc, states.FAILURE, reason,
                                   reply_to=job.properties.get("reply_to"))
    except Exception:
        logger.exception("Could not store the failure of %s", task_id)
