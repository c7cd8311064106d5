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
from ..protocol import parse
from ..registry import unknown_task_message
from ..trace import ACK, REJECT, REQUEUE, SKIP, Outcome, trace_task

__all__ = ["ACK", "REJECT", "REQUEUE", "SKIP", "Job", "Outcome", "run_job", "time_limits"]

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


def run_job(app: Flask, state: AppState, job: Job, hostname: str | None = None) -> Outcome:
    """Decode ``job`` and run it; a message that cannot be run is rejected with a reason.

    A body that cannot be decoded or a task not registered here ends the
    message (``REJECT``) and, when the task id is known, stores FAILURE so
    callers waiting on it learn why.

    :param app: the worker's app (the task body runs in its app context).
    :param state: the app's state: its backend, settings and publisher.
    :param hostname: the worker's node name, for ``request.hostname``.
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
    outcome = trace_task(app, state, task, request, hostname=hostname)
    outcome.tag = job.tag
    return outcome


def _store_failure(state: AppState, task_id: str, exc: BaseException) -> None:
    try:
        state.backend.store_result(task_id, exc, states.FAILURE, str(exc))
    except Exception:
        logger.exception("Could not store the failure of %s", task_id)
