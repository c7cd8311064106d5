"""Result backends: where task states and results are stored.

Every backend speaks the :class:`~flask_tasks.backends.base.Backend` contract
and stores results in Celery's layout, so a Celery client can read them.
Backends never import Flask.
"""

from __future__ import annotations

from .base import Backend, DisabledBackend
from .chords import ChordClaim, ChordPart
from .urls import make_backend

__all__ = ["Backend", "ChordClaim", "ChordPart", "DisabledBackend", "make_backend"]
