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
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import ConfigWarning, ImproperlyConfigured
from .settings import (
    CELERY_NAMES,
    DEFAULT_RETRY_POLICY,
    SETTINGS,
    Setting,
)

__all__ = ["CELERY_NAMES", "DEFAULT_RETRY_POLICY", "SETTINGS", "Config", "Setting", "load",
           "parse_rate"]


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
    broker_max_message_size: int = 64 * 1024 * 1024
    dead_letter_max_entries: int | None = 10_000
    dead_letter_max_age: float | None = 7 * 24 * 3600.0
    dead_letter_rejected: bool = False
    default_queue_type: str = "classic"
    quorum_delivery_limit: int = 20
    queue_max_priority: int | None = None
    broker_heartbeat: float | None = 120.0
    broker_pool_limit: int = 10
    broker_connection_timeout: float = 4.0
    imports: tuple[str, ...] = ()
    worker_pool: str = "prefork"
    worker_concurrency: int | None = None
    worker_prefetch_multiplier: int = 4
    worker_max_tasks_per_child: int | None = None
    embedded_dir: str | None = None

    @property
    def transport_options(self) -> dict[str, Any]:
        """kombu transport options: ``TASKS_BROKER_TRANSPORT_OPTIONS`` over the dead-letter
        and message-size settings (``dead_letter_max_entries``, ``max_message_size``),
        which flask_tasks' transports read."""
        return {"dead_letter_max_entries": self.dead_letter_max_entries,
                "max_message_size": self.broker_max_message_size,
                **(self.broker_transport_options or {})}

    @property
    def queue_arguments(self) -> dict[str, Any]:
        """The AMQP arguments every queue is declared with (RabbitMQ): the queue type and
        ``x-max-priority``, exactly as Celery declares them (a queue declared with other
        arguments is refused), so empty for classic queues without priorities. The
        quorum delivery limit is the worker's (``x-delivery-count``), not an argument."""
        arguments: dict[str, Any] = {}
        if self.default_queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        if self.queue_max_priority is not None:
            arguments["x-max-priority"] = self.queue_max_priority
        return arguments

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
    _check_queue_settings(values)
    return Config(**values)


def _check_queue_settings(values: Mapping[str, Any]) -> None:
    """Refuse queue settings RabbitMQ would refuse, before anything is declared."""
    queue_type = values.get("default_queue_type", "classic")
    priority = values.get("queue_max_priority")
    if priority is not None:
        if not 1 <= priority <= 255:
            raise ImproperlyConfigured(
                f"TASKS_QUEUE_MAX_PRIORITY must be between 1 and 255 (10 is usual), "
                f"not {priority!r}.")
        if queue_type == "quorum":
            raise ImproperlyConfigured(
                "TASKS_QUEUE_MAX_PRIORITY needs classic queues: RabbitMQ's quorum queues "
                "have no x-max-priority. Unset one of TASKS_QUEUE_MAX_PRIORITY and "
                "TASKS_DEFAULT_QUEUE_TYPE = 'quorum'.")
    limit = values.get("quorum_delivery_limit", 1)
    if limit < 1:
        raise ImproperlyConfigured(
            f"TASKS_QUORUM_DELIVERY_LIMIT must be at least 1, not {limit!r}.")


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
    # flask_tasks/, two folders up from flask_tasks/config/__init__.py
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
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
    if setting.choices and value not in setting.choices:
        allowed = " or ".join(repr(choice) for choice in setting.choices)
        raise ImproperlyConfigured(f"{where} must be {allowed}, not {value!r}.")
    if setting.attr in ("accept_content", "imports"):
        value = tuple(value)
    return value
