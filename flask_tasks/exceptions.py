"""Exceptions raised by flask_tasks.

The hierarchy::

    Exception
    └── TasksError
        ├── ImproperlyConfigured        bad or missing configuration
        │   └── ResultNotAvailable      rpc://: only the process that sent a task reads its result
        ├── NotRegistered               (also a KeyError) unknown task name
        ├── EncodeError                 arguments/result the serializer cannot encode
        ├── PublishRefused              the broker refused a task message (RabbitMQ's nack)
        ├── DecodeError                 a message or result that cannot be decoded
        ├── TimeoutError                (also builtins.TimeoutError) AsyncResult.get() gave up
        ├── TaskRevokedError            the task was revoked
        ├── ChordError                  a chord's header task failed: its body fails with this
        ├── MaxRetriesExceededError     retry() past max_retries
        ├── TimeLimitExceeded           hard time limit: the task was stopped
        ├── Retry                       raised by Task.retry() to request a retry
        ├── Ignore                      raise in a task: store nothing, ack the message
        └── Reject                      raise in a task: reject (optionally requeue) the message
    BaseException
    └── SoftTimeLimitExceeded           raised inside a task when its soft limit passes
    UserWarning
    └── ConfigWarning                   a setting is ignored (e.g. an unsupported Celery name)

Names follow Celery's (``celery.exceptions``) so code written for Celery
catches the same things.
"""

from __future__ import annotations

import builtins
from typing import Any


class TasksError(Exception):
    """Base class of every error flask_tasks raises on purpose."""


class ImproperlyConfigured(TasksError):
    """The configuration is missing or wrong; the message says what to change."""


class ResultNotAvailable(ImproperlyConfigured):
    """``RESULT_BACKEND = "rpc://"``: this process did not send the task, so its result
    never comes here (results are messages to the sender's own reply queue)."""


class NotRegistered(TasksError, KeyError):
    """No task is registered under this name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "task not registered"


class EncodeError(TasksError):
    """A value could not be encoded by the serializer; nothing was sent."""


class PublishRefused(TasksError):
    """The broker refused a task message: RabbitMQ answered a publisher confirm with a
    nack (a queue's length limit with ``overflow: reject-publish``, a resource alarm).
    The message was not queued; the caller decides whether to try again later."""


class DecodeError(TasksError):
    """A message or stored result could not be decoded."""


class TimeoutError(TasksError, builtins.TimeoutError):  # noqa: A001 - Celery's name
    """:meth:`AsyncResult.get` waited longer than its ``timeout``."""


class TaskRevokedError(TasksError):
    """The task was revoked before or while it ran."""


class ChordError(TasksError):
    """A header task of a chord failed (or was revoked): the body's result is this error.

    The message names the failed header task's id and its exception.
    """


class MaxRetriesExceededError(TasksError):
    """:meth:`Task.retry` was called after ``max_retries`` retries."""


class TimeLimitExceeded(TasksError):
    """The task ran past its hard ``time_limit`` and was stopped."""


class Retry(TasksError):
    """Raised by :meth:`Task.retry` to ask the worker to run the task again.

    :param message: why the task is retried.
    :param exc: the exception that caused the retry, if any.
    :param when: seconds (float) or an aware datetime: when to run it again.
    """

    def __init__(
        self, message: str | None = None, exc: BaseException | None = None, when: Any = None
    ) -> None:
        self.message = message
        self.exc = exc
        self.when = when
        super().__init__(message, exc, when)

    def __str__(self) -> str:
        if self.message:
            return self.message
        return f"Retry in {self.when}s: {self.exc!r}" if self.exc else f"Retry in {self.when}s"


class Ignore(TasksError):
    """Raise in a task to make the worker store no state and acknowledge the message."""


class Reject(TasksError):
    """Raise in a task to reject its message.

    :param reason: why, for the log.
    :param requeue: ``True`` puts the message back on its queue; ``False``
        (default) drops it (or dead-letters it where the broker can).
    """

    def __init__(self, reason: Any = None, requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(reason, requeue)


class SoftTimeLimitExceeded(BaseException):
    """Raised inside a task when its ``soft_time_limit`` passes, so it can clean up.

    A ``BaseException`` so that a broad ``except Exception`` in the task does
    not swallow it by accident.
    """


class WorkerLostError(TasksError):
    """The process running the task exited before the task finished."""


class ConfigWarning(UserWarning):
    """A setting is ignored or has no effect; the message names it.

    Issued by :meth:`Tasks.init_app`, for example for a Celery setting in
    ``app.config["CELERY"]`` that flask_tasks does not support. Make it an
    error in tests with ``warnings.simplefilter("error", ConfigWarning)``.
    """


__all__ = [
    "ConfigWarning",
    "DecodeError",
    "EncodeError",
    "Ignore",
    "ImproperlyConfigured",
    "MaxRetriesExceededError",
    "NotRegistered",
    "Reject",
    "Retry",
    "SoftTimeLimitExceeded",
    "TaskRevokedError",
    "TasksError",
    "TimeLimitExceeded",
    "TimeoutError",
    "WorkerLostError",
]
