"""Result backends: where task states and results are stored.

Every backend speaks the :class:`~flask_tasks.backends.base.Backend` contract
and stores results in Celery's layout, so a Celery client can read them.
Backends never import Flask.
"""

from __future__ import annotations

from .base import Backend, DisabledBackend

__all__ = ["Backend", "DisabledBackend"]
