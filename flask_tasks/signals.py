"""Blinker signals sent by flask_tasks.

Connect with ``@task_success.connect`` (receives every sender) or
``task_success.connect(fn, sender=my_task)``. A receiver that raises is
logged and does not break the task, the publish or the worker.

=====================  ===========================  ===========================================
signal                 sender                       keyword arguments
=====================  ===========================  ===========================================
before_task_publish    task name (str)              ``body`` (tuple), ``exchange``,
                                                    ``routing_key``, ``headers`` (dict,
                                                    mutable), ``properties``, ``declare``,
                                                    ``retry_policy``
after_task_publish     task name (str)              ``body``, ``headers``, ``exchange``,
                                                    ``routing_key``
task_received          the worker (Worker)          ``request``: the message headers (dict:
                                                    ``task``, ``id``, ``eta``, ...)
task_prerun            the task (Task)              ``task_id``, ``task``, ``args``, ``kwargs``
task_postrun           the task                     ``task_id``, ``task``, ``args``,
                                                    ``kwargs``, ``retval``, ``state``
task_success           the task                     ``result``
task_failure           the task                     ``task_id``, ``exception``, ``args``,
                                                    ``kwargs``, ``traceback`` (str), ``einfo``
task_retry             the task                     ``request``, ``reason``, ``einfo``
task_revoked           the task                     ``request``, ``terminated``, ``signum``,
                                                    ``expired``
worker_process_init    the worker                   — (in each new prefork child, before it
                                                    takes tasks: reopen what must not be
                                                    shared across fork)
worker_ready           the worker                   —
worker_shutdown        the worker                   —
=====================  ===========================  ===========================================

In prefork workers the task signals and ``worker_process_init`` fire in the
child process that runs the task; ``task_received``, ``worker_ready``,
``worker_shutdown`` and ``task_revoked`` for a revoked (not an expired) task
fire in the main worker process.
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import NamedSignal, Namespace

logger = logging.getLogger("flask_tasks.signals")

_signals = Namespace()

before_task_publish = _signals.signal("before-task-publish")
after_task_publish = _signals.signal("after-task-publish")
task_received = _signals.signal("task-received")
task_prerun = _signals.signal("task-prerun")
task_postrun = _signals.signal("task-postrun")
task_success = _signals.signal("task-success")
task_failure = _signals.signal("task-failure")
task_retry = _signals.signal("task-retry")
task_revoked = _signals.signal("task-revoked")
worker_process_init = _signals.signal("worker-process-init")
worker_ready = _signals.signal("worker-ready")
worker_shutdown = _signals.signal("worker-shutdown")


def send_robust(signal: NamedSignal, sender: Any, **kwargs: Any) -> None:
    """Send ``signal``, logging (not raising) any error from a receiver.

    Cheap when nobody listens: blinker's ``receivers`` is checked first.
    """
    if not signal.receivers:
        return
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except Exception:
            logger.exception("Receiver %r of signal %r raised", receiver, signal.name)


__all__ = [
    "after_task_publish",
    "before_task_publish",
    "send_robust",
    "task_failure",
    "task_postrun",
    "task_prerun",
    "task_received",
    "task_retry",
    "task_revoked",
    "task_success",
    "worker_process_init",
    "worker_ready",
    "worker_shutdown",
]
