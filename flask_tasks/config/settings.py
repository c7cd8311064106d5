"""The table of settings: each key, its default, type, meaning and Celery name.

:data:`SETTINGS` is the one place a setting is declared; :func:`flask_tasks.config.load`
reads ``app.config`` through it and ``docs/configuration.md`` says the same words.
Durations are seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

DEFAULT_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}


def _milliseconds_as_seconds(value: Any) -> Any:
    """Celery's ``..._ms`` settings are milliseconds; ours are seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value / 1000
    return value


def _timedelta_as_seconds(value: Any) -> Any:
    """Celery's ``result_expires`` may be a :class:`~datetime.timedelta` (its default is one)."""
    return value.total_seconds() if isinstance(value, timedelta) else value


def _infinity_as_none(value: Any) -> Any:
    """Celery's "retry forever" is ``float("inf")``; ours is ``None``."""
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return None
    return value


@dataclass(frozen=True)
class Setting:
    """One configuration key: its ``app.config`` name, default, type and meaning.

    :param key: the ``app.config`` key.
    :param attr: the :class:`Config` field it fills.
    :param default: the value when it is unset (must equal the field's default).
    :param types: the accepted types; anything else is :exc:`ImproperlyConfigured`.
    :param doc: one paragraph for ``docs/configuration.md``.
    :param fallbacks: other ``app.config`` keys read when ``key`` is unset.
    :param celery: Celery's (lowercase) name for the setting, read from
        ``app.config["CELERY"]`` when no ``app.config`` key sets it. Several
        names (``imports`` and ``include``) are all read and their lists
        joined. None: Celery has no such setting.
    :param from_celery: turns a value given under the Celery name into ours
        (milliseconds into seconds, for example); a value of the wrong type
        must be returned unchanged so the type check reports it.
    :param explicit_none: an explicit ``None`` is a value (``TASKS_RESULT_EXPIRES``:
        keep forever) instead of "use the default".
    :param choices: the only values allowed (empty: any value of ``types``).
    """

    key: str
    attr: str
    default: Any
    types: tuple[type, ...]
    doc: str
    fallbacks: tuple[str, ...] = ()
    celery: str | tuple[str, ...] | None = None
    from_celery: Callable[[Any], Any] | None = None
    explicit_none: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def celery_names(self) -> tuple[str, ...]:
        """Celery's names for this setting (none, one, or several)."""
        if self.celery is None:
            return ()
        return (self.celery,) if isinstance(self.celery, str) else self.celery


SETTINGS: tuple[Setting, ...] = (
    Setting("BROKER_URL", "broker_url", None, (str,),
            "Broker URL (``redis://``, ``rediss://``, ``amqp://``, ``embedded:////path``, "
            "any kombu URL). Unset: the embedded broker, a SQLite file in ``app.instance_path``.",
            ("CELERY_BROKER_URL",),
            celery="broker_url"),
    Setting("RESULT_BACKEND", "result_backend", None, (str,),
            "Where results go: ``redis://``/``rediss://``, ``db+<sqlalchemy-url>``, "
            "``flask-sqlalchemy`` (the app's Flask-SQLAlchemy engine), ``disabled``. "
            "Unset: the embedded backend, a SQLite file in ``app.instance_path``.",
            ("CELERY_RESULT_BACKEND",),
            celery="result_backend"),
    Setting("TASKS_ALWAYS_EAGER", "always_eager", False, (bool,),
            "Run ``delay()``/``apply_async()`` in the calling process (for tests). The message "
            "is still encoded and decoded, so what fails in production fails here.",
            celery="task_always_eager"),
    Setting("TASKS_EAGER_PROPAGATES", "eager_propagates", False, (bool,),
            "In eager mode, raise the task's exception from ``delay()`` instead of storing it.",
            celery="task_eager_propagates"),
    Setting("TASKS_STORE_EAGER_RESULT", "store_eager_result", False, (bool,),
            "In eager mode, also store states and results in the result backend, so "
            "``tasks.AsyncResult(id)`` in a later request sees them (Celery's "
            "``task_store_eager_result``).",
            celery="task_store_eager_result"),
    Setting("TASKS_SERIALIZER", "serializer", "json", (str,),
            "Serializer for task messages (any kombu serializer name).",
            celery="task_serializer"),
    Setting("TASKS_RESULT_SERIALIZER", "result_serializer", "json", (str,),
            "Serializer for stored results.",
            celery="result_serializer"),
    Setting("TASKS_ACCEPT_CONTENT", "accept_content", ("json",), (list, tuple),
            "Serializer names or content types the worker accepts; anything else is rejected "
            "and logged. Pickle is never accepted unless listed here.",
            celery="accept_content"),
    Setting("TASKS_COMPRESSION", "compression", None, (str,),
            "Compress message bodies (``gzip``, ``bzip2``, ``zlib``, any kombu compression).",
            celery="task_compression"),
    Setting("TASKS_DEFAULT_QUEUE", "default_queue", "celery", (str,),
            "Queue used when neither the task, the call nor ``TASKS_ROUTES`` name one. "
            "``celery`` by default so Celery workers and clients interoperate.",
            celery="task_default_queue"),
    Setting("TASKS_ROUTES", "routes", None, (dict, list, tuple),
            "Routes: ``{'name or glob*': {'queue': 'q'}}``, a callable "
            "``(name, args, kwargs, options) -> dict | str | None``, or a list of those.",
            celery="task_routes"),
    Setting("TASKS_DEFAULT_PRIORITY", "default_priority", None, (int,),
            "Message priority when a call gives none (0-9; broker support varies).",
            celery="task_default_priority"),
    Setting("TASKS_IGNORE_RESULT", "ignore_result", False, (bool,),
            "Store no result for tasks that do not say otherwise.",
            celery="task_ignore_result"),
    Setting("TASKS_TRACK_STARTED", "track_started", False, (bool,),
            "Store RECEIVED when a worker takes the message and STARTED when the task starts "
            "(two more writes per task) for tasks that do not say otherwise.",
            celery="task_track_started"),
    Setting("TASKS_ACKS_LATE", "acks_late", False, (bool,),
            "Acknowledge messages after the task ran instead of before (at-least-once).",
            celery="task_acks_late"),
    Setting("TASKS_REJECT_ON_WORKER_LOST", "reject_on_worker_lost", False, (bool,),
            "For ``acks_late`` tasks: when the pool process running the task dies, deliver "
            "the message again instead of ending the task FAILURE (``WorkerLostError``).",
            celery="task_reject_on_worker_lost"),
    Setting("TASKS_POISON_MAX_DELIVERIES", "poison_max_deliveries", 3, (int,),
            "With ``reject_on_worker_lost``: after the task killed its pool process this "
            "many times it ends FAILURE instead of running again (a poison message)."),
    Setting("TASKS_TIME_LIMIT", "time_limit", None, (int, float),
            "Seconds a task may run before the worker kills its process (prefork and solo "
            "cannot be interrupted otherwise); the task ends FAILURE with "
            "``TimeLimitExceeded``. None: no limit. Per task/call ``time_limit`` wins.",
            celery="task_time_limit"),
    Setting("TASKS_SOFT_TIME_LIMIT", "soft_time_limit", None, (int, float),
            "Seconds after which ``SoftTimeLimitExceeded`` is raised inside the task (prefork "
            "and solo pools) so it can clean up. None: no limit.",
            celery="task_soft_time_limit"),
    Setting("TASKS_ANNOTATIONS", "annotations", None, (dict,),
            "Options for tasks by name (``'*'`` for all), applied by the worker: "
            "``{'shop.send_mail': {'rate_limit': '10/m'}}``. Today: ``rate_limit``.",
            celery="task_annotations"),
    Setting("TASKS_REVOKES_EXPIRES", "revokes_expires", 10800.0, (int, float),
            "Seconds a revoke is kept: a worker that meets the task within that time "
            "(even one started after the revoke) does not run it."),
    Setting("TASKS_RESULT_EXPIRES", "result_expires", 86400.0, (int, float),
            "Seconds a stored result is kept (0 or None: forever).",
            celery="result_expires", from_celery=_timedelta_as_seconds,
            explicit_none=True),
    Setting("TASKS_RESULT_BACKEND_ALWAYS_RETRY", "result_backend_always_retry", True, (bool,),
            "Retry result-backend writes (results, revokes, forget) that fail because the "
            "store is unreachable, so a result survives a Redis or database restart. "
            "(Celery's default is False.)",
            celery="result_backend_always_retry"),
    Setting("TASKS_RESULT_BACKEND_MAX_RETRIES", "result_backend_max_retries", None, (int,),
            "Retries of one result-backend write before giving up (None: never give up; "
            "a pool process then waits for the store to come back).",
            celery="result_backend_max_retries", from_celery=_infinity_as_none),
    Setting("TASKS_RESULT_BACKEND_BASE_SLEEP_BETWEEN_RETRIES",
            "result_backend_base_sleep_between_retries", 0.01, (int, float),
            "Seconds before the first retry of a result-backend write; doubled on each "
            "retry, with full jitter (Celery's ..._MS setting, in seconds).",
            celery="result_backend_base_sleep_between_retries_ms",
            from_celery=_milliseconds_as_seconds),
    Setting("TASKS_RESULT_BACKEND_MAX_SLEEP_BETWEEN_RETRIES",
            "result_backend_max_sleep_between_retries", 10.0, (int, float),
            "Longest wait, in seconds, between two retries of a result-backend write.",
            celery="result_backend_max_sleep_between_retries_ms",
            from_celery=_milliseconds_as_seconds),
    Setting("TASKS_RESULT_EXTENDED", "result_extended", False, (bool,),
            "Also store the task name, args, kwargs, worker, retries and queue with the result.",
            celery="result_extended"),
    Setting("TASKS_PUBLISH_RETRY", "publish_retry", True, (bool,),
            "Retry publishing when the broker connection fails.",
            celery="task_publish_retry"),
    Setting("TASKS_PUBLISH_RETRY_POLICY", "publish_retry_policy", DEFAULT_RETRY_POLICY, (dict,),
            "kombu retry policy for publishing: ``max_retries``, ``interval_start``, "
            "``interval_step``, ``interval_max`` (seconds).",
            celery="task_publish_retry_policy"),
    Setting("TASKS_BROKER_TRANSPORT_OPTIONS", "broker_transport_options", None, (dict,),
            "Options passed to the kombu transport (e.g. ``{'visibility_timeout': 3600}``).",
            celery="broker_transport_options"),
    Setting("TASKS_BROKER_MAX_MESSAGE_SIZE", "broker_max_message_size", 64 * 1024 * 1024,
            (int,),
            "Largest broker entry, in bytes, a worker takes; a larger one is set aside as a "
            "dead letter."),
    Setting("TASKS_DEAD_LETTER_MAX_ENTRIES", "dead_letter_max_entries", 10_000, (int,),
            "Most dead letters kept per queue (the oldest are dropped first); None: no limit.",
            explicit_none=True),
    Setting("TASKS_DEAD_LETTER_MAX_AGE", "dead_letter_max_age", 7 * 24 * 3600.0,
            (int, float),
            "Seconds a dead letter is kept (default 7 days); None: until purged.",
            explicit_none=True, from_celery=_timedelta_as_seconds),
    Setting("TASKS_DEAD_LETTER_REJECTED", "dead_letter_rejected", False, (bool,),
            "Also set aside task messages rejected for their content (unknown task, bad "
            "arguments or headers, refused content type) as dead letters, instead of "
            "dropping them after storing FAILURE. Malformed broker entries are always set "
            "aside."),
    Setting("TASKS_DEFAULT_QUEUE_TYPE", "default_queue_type", "classic", (str,),
            "RabbitMQ: ``classic`` or ``quorum`` queues (replicated, with a delivery limit: "
            "``TASKS_QUORUM_DELIVERY_LIMIT``). Every flask_tasks and Celery process on the "
            "same queues must declare them alike. Other brokers ignore it.",
            celery="task_default_queue_type", choices=("classic", "quorum")),
    Setting("TASKS_QUORUM_DELIVERY_LIMIT", "quorum_delivery_limit", 20, (int,),
            "Quorum queues: deliveries of a message that end unacknowledged (its worker "
            "killed or disconnected, a shutdown giving back prefetched messages) before it "
            "ends FAILURE instead of being delivered again (the worker reads RabbitMQ's "
            "``x-delivery-count``; 20 is RabbitMQ 4's own default limit)."),
    Setting("TASKS_QUEUE_MAX_PRIORITY", "queue_max_priority", None, (int,),
            "RabbitMQ: declare queues with ``x-max-priority`` (e.g. 10) so that messages "
            "with a higher ``priority`` are delivered first. Classic queues only. An "
            "existing queue keeps the arguments it was declared with.",
            celery="task_queue_max_priority"),
    Setting("TASKS_BROKER_HEARTBEAT", "broker_heartbeat", 120.0, (int, float),
            "RabbitMQ: seconds between the worker's AMQP heartbeats (a dead connection is "
            "noticed within about twice this); None or 0: none.",
            celery="broker_heartbeat", explicit_none=True),
    Setting("TASKS_BROKER_POOL_LIMIT", "broker_pool_limit", 10, (int,),
            "Idle broker connections kept for publishing, per process.",
            celery="broker_pool_limit"),
    Setting("TASKS_BROKER_CONNECTION_TIMEOUT", "broker_connection_timeout", 4.0, (int, float),
            "Seconds to wait when connecting to the broker.",
            celery="broker_connection_timeout"),
    Setting("TASKS_IMPORTS", "imports", (), (list, tuple),
            "Modules the worker imports at start so their tasks are registered.",
            celery=("imports", "include")),
    Setting("TASKS_WORKER_POOL", "worker_pool", "prefork", (str,),
            "Default pool: ``prefork`` (processes), ``threads`` or ``solo``.",
            celery="worker_pool"),
    Setting("TASKS_WORKER_CONCURRENCY", "worker_concurrency", None, (int,),
            "Default number of pool processes/threads (None: the CPU count).",
            celery="worker_concurrency"),
    Setting("TASKS_WORKER_PREFETCH_MULTIPLIER", "worker_prefetch_multiplier", 4, (int,),
            "Messages a worker reserves per pool slot (0: no limit).",
            celery="worker_prefetch_multiplier"),
    Setting("TASKS_WORKER_MAX_TASKS_PER_CHILD", "worker_max_tasks_per_child", None, (int,),
            "Replace a pool process after this many tasks (None: never).",
            celery="worker_max_tasks_per_child"),
    Setting("TASKS_EMBEDDED_DIR", "embedded_dir", None, (str,),
            "Folder for the embedded broker and backend files (None: ``app.instance_path``)."),
)


#: Celery setting name -> our setting, derived from :data:`SETTINGS`.
CELERY_NAMES: dict[str, Setting] = {
    name: setting for setting in SETTINGS for name in setting.celery_names
}
