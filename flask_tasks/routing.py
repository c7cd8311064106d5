"""Which queue a call goes to.

Precedence (as in Celery): the call's ``queue=`` option, then the task's
``queue`` attribute, then ``TASKS_ROUTES``, then ``TASKS_DEFAULT_QUEUE``.
``TASKS_ROUTES`` may be a dict (exact names or ``fnmatch`` globs, first
match wins, exact names first), a callable ``router(name, args, kwargs,
options) -> {"queue": ...} | "queue" | None``, or a list of those.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

from kombu.entity import Exchange, Queue

RouterFunc = Callable[[str, Any, Any, Mapping[str, Any]], Any]


def make_queue(name: str, arguments: Mapping[str, Any] | None = None) -> Queue:
    """Celery's automatic queue: a direct exchange and routing key named like the queue.

    :param arguments: the queue's AMQP arguments (``x-queue-type``,
        ``x-max-priority``...: :attr:`flask_tasks.config.Config.queue_arguments`).
    """
    return Queue(name, Exchange(name, type="direct"), routing_key=name,
                 queue_arguments=dict(arguments) if arguments else None)


class Router:
    """Resolves a queue name for each call.

    :param routes: the ``TASKS_ROUTES`` value (dict, callable, list or None).
    :param default_queue: the ``TASKS_DEFAULT_QUEUE`` value.
    :param queue_arguments: AMQP arguments every queue is declared with (RabbitMQ).
    """

    def __init__(self, routes: Any, default_queue: str,
                 queue_arguments: Mapping[str, Any] | None = None) -> None:
        self.default_queue = default_queue
        self.queue_arguments = dict(queue_arguments or {})
        self._routers: list[RouterFunc] = []
        items = routes if isinstance(routes, (list, tuple)) else [routes] if routes else []
        for item in items:
            if callable(item):
                self._routers.append(item)
            elif isinstance(item, Mapping):
                self._routers.append(self._from_mapping(item))
            else:
                raise TypeError(f"TASKS_ROUTES entries must be dicts or callables, not {item!r}")
        self._queues: dict[str, Queue] = {}
        self._cache: dict[str, str | None] = {}

    @staticmethod
    def _from_mapping(mapping: Mapping[str, Any]) -> RouterFunc:
        exact = {k: v for k, v in mapping.items() if not any(c in k for c in "*?[")}
        globs = [(k, v) for k, v in mapping.items() if k not in exact]

        def route(name: str, args: Any, kwargs: Any, options: Mapping[str, Any]) -> Any:
            if name in exact:
                return exact[name]
            for pattern, value in globs:
                if fnmatch.fnmatchcase(name, pattern):
                    return value
            return None

        route.cacheable = True  # type: ignore[attr-defined]
        return route

    def queue_name(self, name: str, args: Any = None, kwargs: Any = None,
                   options: Mapping[str, Any] | None = None) -> str:
        """The queue for a call of task ``name`` with ``options`` (``queue`` key wins)."""
        options = options or {}
        queue = options.get("queue")
        if queue:
            return str(queue.name if isinstance(queue, Queue) else queue)
        cacheable = all(getattr(r, "cacheable", False) for r in self._routers)
        if cacheable and name in self._cache:
            return self._cache[name] or self.default_queue
        found: str | None = None
        for router in self._routers:
            value = router(name, args, kwargs, options)
            if isinstance(value, str):
                found = value
            elif isinstance(value, Mapping) and value.get("queue"):
                found = str(value["queue"])
            if found:
                break
        if cacheable:
            self._cache[name] = found
        return found or self.default_queue

    def queue(self, name: str) -> Queue:
        """The kombu :class:`~kombu.Queue` for a queue name (cached)."""
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = make_queue(name, self.queue_arguments)
        return queue
