"""flask_tasks: background tasks for Flask, the way Celery does them, on kombu.

``tasks = Tasks()``, ``tasks.init_app(app)``, ``@tasks.task``, ``.delay()``,
``flask tasks worker``. See ``docs/`` for the whole guide.
"""

from __future__ import annotations

from . import exceptions, signals, states
from .app_state import AppState
from .canvas import Signature, chain, chord, chunks, group, signature, xmap, xstarmap
from .extension import Tasks, shared_task
from .result import AsyncResult, EagerResult, GroupResult
from .task import Task

__version__ = "0.1.0"

__all__ = [
    "AppState",
    "AsyncResult",
    "EagerResult",
    "GroupResult",
    "Signature",
    "Task",
    "Tasks",
    "chain",
    "chord",
    "chunks",
    "exceptions",
    "group",
    "shared_task",
    "signals",
    "signature",
    "states",
    "xmap",
    "xstarmap",
]
