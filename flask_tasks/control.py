"""Telling workers what to do: ``tasks.control``.

Today: :meth:`Control.revoke`. A revoke is stored in the result backend,
which every worker reads a few times a second, so it reaches workers that
are not running yet too; no broadcast channel is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from .config import Config
from .result import ResultStore


class Controlled(Protocol):
    """What :class:`Control` needs of an app (an :class:`~flask_tasks.app_state.AppState`)."""

    @property
    def backend(self) -> ResultStore: ...

    @property
    def config(self) -> Config: ...


class Control:
    """``tasks.control`` for the current app.

    :param state: returns the current app's state (an
        :class:`~flask_tasks.app_state.AppState`).
    """

    def __init__(self, state: Callable[[], Controlled]) -> None:
        self._state = state

    def revoke(self, task_id: str | Iterable[str], terminate: bool = False,
               signal: str = "SIGKILL") -> None:
        """Make sure these tasks do not run; with ``terminate``, stop them if they run.

        See :meth:`flask_tasks.AsyncResult.revoke`.

        :param task_id: one id or several.
        :raises NotImplementedError: the result backend cannot store revokes.
        """
        state = self._state()
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        for one in ids:
            state.backend.revoke(one, terminate, state.config.revokes_expires)
