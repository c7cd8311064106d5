"""flask_tasks: background tasks for Flask, the way Celery does them, on kombu.

``tasks = Tasks()``, ``tasks.init_app(app)``, ``@tasks.task``, ``.delay()``,
``flask tasks worker``. See ``docs/`` for the whole guide.
"""

from __future__ import annotations

from . import exceptions, signals, states
from .app_state import AppState
from .extension import Tasks, shared_task
from .result import AsyncResult, EagerResult
from .task import Task

__version__ = "0.1.0"

__all__ = [
    "AppState",
    "AsyncResult",
    "EagerResult",
    "Task",
    "Tasks",
    "exceptions",
    "shared_task",
    "signals",
    "states",
]
