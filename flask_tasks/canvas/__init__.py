"""Canvas: signatures and the primitives that combine them (Celery's ``celery.canvas``).

- :mod:`.signature`: :class:`Signature` (Celery's dict), :func:`signature`;
- :mod:`.primitives`: :class:`chain`, :class:`group`;
- :mod:`.chords`: :class:`chord`;
- :mod:`.mapping`: :class:`xmap`, :class:`xstarmap`, :class:`chunks`;
- :mod:`.task_methods`: ``Task.s`` / ``si`` / ``signature`` / ``map`` / ``starmap`` / ``chunks``;
- :mod:`.callbacks`: the worker's side (link callbacks, chain steps, errbacks);
- :mod:`.base`: what a signature needs from an app, and how it finds one.
"""

from __future__ import annotations

from .base import CanvasApp, use_app_resolver
from .chords import chord
from .mapping import chunks, xmap, xstarmap
from .primitives import chain, group
from .signature import Signature, maybe_signature, signature

__all__ = [
    "CanvasApp",
    "Signature",
    "chain",
    "chord",
    "chunks",
    "group",
    "maybe_signature",
    "signature",
    "use_app_resolver",
    "xmap",
    "xstarmap",
]
