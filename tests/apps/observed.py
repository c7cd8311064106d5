"""``tests.apps.basic`` with a receiver on every signal and tasks whose handlers report.

Every signal and every handler of :class:`Observed` appends one JSON line to
``observed.jsonl`` in the app's instance folder (one ``open(..., "a")`` and
one short write per event, so lines of several processes do not mix): the
event name, ``pid``, ``thread`` and the documented arguments, made JSON-safe.

Receivers are connected by :func:`create_app` (the worker's app), not at
import: the test process imports this module only to register the tasks.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from flask import Flask, has_app_context

from flask_tasks import Task, signals
from tests.apps import basic

FILENAME = "observed.jsonl"

_folder: list[str] = []  # the instance folder of the app create_app() made


def _short(value: Any) -> str:
    return repr(value)[:200]


def write(event: str, **fields: Any) -> None:
    """Append one line for ``event`` (nothing before create_app() ran)."""
    if not _folder:
        return
    line = {"event": event, "pid": os.getpid(), "thread": threading.current_thread().name,
            "time": time.time(), "app_context": has_app_context(), **fields}
    with open(os.path.join(_folder[0], FILENAME), "a") as out:
        out.write(json.dumps(line, default=_short) + "\n")


def _stored_state(task: Task[Any, Any], task_id: str) -> str:
    """The state the result backend holds for ``task_id`` right now."""
    try:
        return task.AsyncResult(task_id).state
    except Exception as exc:  # pragma: no cover - shown in the line instead
        return f"error: {exc!r}"


class Observed(Task):  # type: ignore[type-arg]
    """A base class whose five handlers report their arguments."""

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        write("before_start", task=self.name, task_id=task_id, args=args, kwargs=kwargs)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        write("on_success", task=self.name, task_id=task_id, args=args, kwargs=kwargs,
              retval=retval, stored=_stored_state(self, task_id))

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        write("on_failure", task=self.name, task_id=task_id, args=args, kwargs=kwargs,
              exc_type=type(exc).__name__, exc=str(exc), einfo_type=type(einfo).__name__,
              einfo=str(einfo)[-300:], stored=_stored_state(self, task_id))

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                 einfo: Any) -> None:
        write("on_retry", task=self.name, task_id=task_id, args=args, kwargs=kwargs,
              exc_type=type(exc).__name__, exc=str(exc), einfo_type=type(einfo).__name__,
              einfo=str(einfo)[-300:], retries=self.request.retries,
              stored=_stored_state(self, task_id))

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any,
                     einfo: Any) -> None:
        write("after_return", task=self.name, task_id=task_id, args=args, kwargs=kwargs,
              status=status, retval=_short(retval), retval_type=type(retval).__name__,
              einfo_type=type(einfo).__name__, einfo=None if einfo is None else str(einfo)[-300:])


@basic.tasks.task(base=Observed, name="tests.apps.observed.ok")
def ok(x: int, y: int) -> int:
    return x + y


@basic.tasks.task(base=Observed, name="tests.apps.observed.boom")
def boom(message: str) -> None:
    raise ValueError(message)


@basic.tasks.task(base=Observed, bind=True, name="tests.apps.observed.retry_once")
def retry_once(self: Task, tag: str) -> dict:  # type: ignore[type-arg]
    """Retry once (after 0.1 s) with ``KeyError(tag)`` as the cause, then return."""
    if self.request.retries == 0:
        raise self.retry(exc=KeyError(tag), countdown=0.1)
    return {"tag": tag, "retries": self.request.retries}


@basic.tasks.task(base=Observed, name="tests.apps.observed.slow")
def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# -- receivers (module-level, connected with weak=False) --------------------------------

def _task_name(sender: Any) -> Any:
    return getattr(sender, "name", sender)


def on_before_task_publish(sender: Any, headers: dict[str, Any], **kwargs: Any) -> None:
    write("before_task_publish", sender=sender, task_id=headers.get("id"),
          retries=headers.get("retries"), eta=headers.get("eta"),
          routing_key=kwargs.get("routing_key"))


def on_after_task_publish(sender: Any, headers: dict[str, Any], **kwargs: Any) -> None:
    write("after_task_publish", sender=sender, task_id=headers.get("id"),
          retries=headers.get("retries"))


def on_task_received(sender: Any, request: Any, **kwargs: Any) -> None:
    write("task_received", sender_type=type(sender).__name__, request_type=type(request).__name__,
          task=request.get("task"), task_id=request.get("id"), retries=request.get("retries"))


def on_task_prerun(sender: Any, task_id: str, task: Any, args: Any, kwargs: Any,
                   **extra: Any) -> None:
    write("task_prerun", sender=_task_name(sender), task_is_sender=task is sender,
          task_id=task_id, args=args, kwargs=kwargs)


def on_task_postrun(sender: Any, task_id: str, task: Any, args: Any, kwargs: Any, retval: Any,
                    state: str, **extra: Any) -> None:
    write("task_postrun", sender=_task_name(sender), task_is_sender=task is sender,
          task_id=task_id, args=args, kwargs=kwargs, retval=retval, state=state)


def on_task_success(sender: Any, result: Any, **kwargs: Any) -> None:
    task_id = sender.request.id
    write("task_success", sender=_task_name(sender), task_id=task_id, result=result,
          stored=_stored_state(sender, task_id))


def on_task_failure(sender: Any, task_id: str, exception: BaseException, args: Any, kwargs: Any,
                    traceback: Any, einfo: Any, **extra: Any) -> None:
    write("task_failure", sender=_task_name(sender), task_id=task_id,
          exc_type=type(exception).__name__, exc=str(exception), args=args, kwargs=kwargs,
          traceback_type=type(traceback).__name__, traceback=str(traceback)[-300:],
          einfo_is_traceback=einfo == traceback, stored=_stored_state(sender, task_id))


def on_task_retry(sender: Any, request: Any, reason: Any, einfo: Any, **kwargs: Any) -> None:
    write("task_retry", sender=_task_name(sender), request_type=type(request).__name__,
          task_id=request.id, retries=request.retries, reason_type=type(reason).__name__,
          reason_exc_type=type(reason.exc).__name__, reason_when=reason.when,
          einfo_type=type(einfo).__name__, einfo=str(einfo)[-300:])


def on_task_revoked(sender: Any, request: Any, terminated: bool, signum: Any, expired: bool,
                    **kwargs: Any) -> None:
    write("task_revoked", sender=_task_name(sender), request_type=type(request).__name__,
          task_id=None if request is None else request.id, terminated=terminated,
          signum=signum, expired=expired)


def on_worker_process_init(sender: Any, **kwargs: Any) -> None:
    write("worker_process_init", sender_type=type(sender).__name__, ppid=os.getppid())


def on_worker_ready(sender: Any, **kwargs: Any) -> None:
    write("worker_ready", sender_type=type(sender).__name__)


def on_worker_shutdown(sender: Any, **kwargs: Any) -> None:
    write("worker_shutdown", sender_type=type(sender).__name__)


#: Every signal flask_tasks.signals defines (the test checks the list is complete).
RECEIVERS = {
    signals.before_task_publish: on_before_task_publish,
    signals.after_task_publish: on_after_task_publish,
    signals.task_received: on_task_received,
    signals.task_prerun: on_task_prerun,
    signals.task_postrun: on_task_postrun,
    signals.task_success: on_task_success,
    signals.task_failure: on_task_failure,
    signals.task_retry: on_task_retry,
    signals.task_revoked: on_task_revoked,
    signals.worker_process_init: on_worker_process_init,
    signals.worker_ready: on_worker_ready,
    signals.worker_shutdown: on_worker_shutdown,
}


def create_app() -> Flask:
    """``tests.apps.basic.create_app()`` plus the receivers, writing to its instance folder."""
    app = basic.create_app()
    _folder[:] = [app.instance_path]
    for signal, receiver in RECEIVERS.items():
        signal.connect(receiver, weak=False)  # the same function twice: connected once
    return app
