"""Every setting flask_tasks reads, in one table, turned into a frozen :class:`Config`.

Settings are read once, in :meth:`Tasks.init_app`, from ``app.config``.
``BROKER_URL`` and ``RESULT_BACKEND`` keep the names of the Flask docs'
Celery pattern (``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND`` are
accepted as fallbacks); every other key is ``TASKS_<NAME>``. The Flask docs'
``app.config["CELERY"] = {"broker_url": ..., ...}`` dict is read too: each
:class:`Setting` names its Celery equivalent, and a key in ``app.config``
wins over the dict. Durations are seconds. ``docs/configuration.md`` is
generated from the same words.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .exceptions import ConfigWarning, ImproperlyConfigured

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


@dataclass(frozen=True)
class Config:
    """The settings of one app, read once by :meth:`Tasks.init_app`. Immutable."""

    broker_url: str | None = None
    result_backend: str | None = None
    always_eager: bool = False
    eager_propagates: bool = False
    store_eager_result: bool = False
    serializer: str = "json"
    result_serializer: str = "json"
    accept_content: tuple[str, ...] = ("json",)
    compression: str | None = None
    default_queue: str = "celery"
    routes: Any = None
    default_priority: int | None = None
    ignore_result: bool = False
    track_started: bool = False
    acks_late: bool = False
    reject_on_worker_lost: bool = False
    time_limit: float | None = None
    soft_time_limit: float | None = None
    annotations: Mapping[str, Any] | None = None
    revokes_expires: float = 10800.0
    poison_max_deliveries: int = 3
    result_expires: float | None = 86400.0
    result_backend_always_retry: bool = True
    result_backend_max_retries: int | None = None
    result_backend_base_sleep_between_retries: float = 0.01
    result_backend_max_sleep_between_retries: float = 10.0
    result_extended: bool = False
    publish_retry: bool = True
    publish_retry_policy: Mapping[str, Any] = field(
        default_factory=lambda: dict(DEFAULT_RETRY_POLICY)
    )
    broker_transport_options: Mapping[str, Any] | None = None
    broker_pool_limit: int = 10
    broker_connection_timeout: float = 4.0
    imports: tuple[str, ...] = ()
    worker_pool: str = "prefork"
    worker_concurrency: int | None = None
    worker_prefetch_multiplier: int = 4
    worker_max_tasks_per_child: int | None = None
    embedded_dir: str | None = None

    def replace(self, **changes: Any) -> Config:
        """Return a copy with ``changes`` applied (for tests and the CLI)."""
        return dataclasses.replace(self, **changes)


_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(value: str | float) -> float:
    """A Celery rate limit (``"10/s"``, ``"100/m"``, ``"5/h"``, or a number per second) as tasks/s.

    :raises ValueError: not one of those forms, or not positive.
    """
    if isinstance(value, (int, float)):
        return float(value)
    count, _, unit = str(value).strip().partition("/")
    try:
        per_second = float(count) / _RATE_UNITS[unit.strip().lower()[:1] or "s"]
    except (KeyError, ValueError):
        raise ValueError(f"rate_limit {value!r} is not like '10/s', '100/m' or '5/h'") from None
    if per_second <= 0:
        raise ValueError(f"rate_limit {value!r} must be positive")
    return per_second


def load(mapping: Mapping[str, Any], instance_path: str | None = None) -> Config:
    """Build a :class:`Config` from ``app.config``.

    Each setting is read from its ``app.config`` key, then its fallbacks
    (``CELERY_BROKER_URL``...), then its Celery name in
    ``app.config["CELERY"]``; the first that is set (not ``None``) wins.

    :param mapping: the Flask config (any mapping).
    :param instance_path: the app's instance folder, the default home of the
        embedded broker and backend files.
    :raises ImproperlyConfigured: a value has the wrong type (the message
        names the key, and the Celery name for a value from
        ``app.config["CELERY"]``), or ``app.config["CELERY"]`` is not a mapping.
    """
    celery = _celery_dict(mapping)
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        found = _lookup(setting, mapping, celery)
        if found is not None:
            values[setting.attr] = found[0]
    if values.get("embedded_dir") is None and instance_path is not None:
        values["embedded_dir"] = os.fspath(instance_path)
    if values.get("result_expires") == 0:
        values["result_expires"] = None
    return Config(**values)


def _celery_dict(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    """``app.config["CELERY"]`` (empty when unset); warns about the names we do not read."""
    celery = mapping.get("CELERY")
    if celery is None:
        return {}
    if not isinstance(celery, Mapping):
        raise ImproperlyConfigured(
            f"app.config['CELERY'] must be a dict of Celery settings, e.g. "
            f"{{'broker_url': 'redis://localhost:6379/0', 'task_ignore_result': True}}, "
            f"not a {type(celery).__name__}."
        )
    ignored = [name for name in celery if name not in CELERY_NAMES]
    if ignored:
        names = ", ".join(repr(name) for name in ignored)
        warnings.warn(
            f"app.config['CELERY'] sets {names}, which flask_tasks does not support, so "
            f"{'it is' if len(ignored) == 1 else 'they are'} ignored. The Celery names "
            f"flask_tasks reads are listed in its docs (configuration.md, \"Celery's "
            f"setting names\").",
            ConfigWarning,
            stacklevel=_caller_outside_package(),
        )
    return celery


def _caller_outside_package() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside flask_tasks.

    So a warning from ``init_app`` names the app factory's line, whether it
    called ``tasks.init_app(app)`` or ``Tasks(app)``.
    """
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
        level += 1
    return level


def _lookup(setting: Setting, mapping: Mapping[str, Any],
            celery: Mapping[str, Any]) -> tuple[Any] | None:
    """The checked value of ``setting`` (in a 1-tuple, as it may be None), or None if unset."""
    for key in (setting.key, *setting.fallbacks):
        value = mapping.get(key)
        if value is not None:
            return (_checked(setting, value, key),)
    if setting.explicit_none and setting.key in mapping:
        return (None,)
    given = [name for name in setting.celery_names if name in celery
             and (celery[name] is not None or setting.explicit_none)]
    if not given:
        return None
    parts = []
    for name in given:
        value = celery[name]
        if setting.from_celery is not None:
            value = setting.from_celery(value)
        if value is None:  # None under explicit_none, or Celery's inf retries: our None
            return (None,)
        parts.append(_checked(setting, value, f"app.config['CELERY'][{name!r}] ({setting.key})"))
    if len(parts) == 1:
        return (parts[0],)
    return (tuple(item for part in parts for item in part),)  # imports + include


def _checked(setting: Setting, value: Any, where: str) -> Any:
    """``value`` if it has one of the setting's types (lists become tuples where a tuple is kept).

    :param where: how to name the value in an error (a key, or the Celery name).
    :raises ImproperlyConfigured: the value has the wrong type.
    """
    if isinstance(value, bool) and bool not in setting.types and int in setting.types:
        raise ImproperlyConfigured(f"{where} must be a number, not {value!r}.")
    if not isinstance(value, setting.types) and not (
        setting.attr == "routes" and callable(value)
    ):
        names = " or ".join(t.__name__ for t in setting.types)
        raise ImproperlyConfigured(
            f"{where} must be {names}, not {type(value).__name__} ({value!r})."
        )
    if setting.attr in ("accept_content", "imports"):
        value = tuple(value)
    return value
