"""Revoked task ids: read from the result backend, and what a worker does with one.

``revoke()`` records ids in the result backend; every worker reads them at
most :data:`REVOKE_INTERVAL` seconds later (:class:`Revokes`). A revoked
message is acknowledged and not run, or, with ``terminate=True``, its
running process is killed; either way :meth:`Revokes.report` stores
``REVOKED``, counts it for its chord if it is a chord's header task (the
chord then fails), and sends ``task_revoked``.
"""

from __future__ import annotations

import logging
import time

from kombu.message import Message

from .. import states
from ..app_state import AppState
from ..canvas import callbacks
from ..exceptions import TaskRevokedError
from ..protocol import Context, parse
from ..signals import send_robust, task_revoked

logger = logging.getLogger("flask_tasks.worker")

#: Seconds between reads of the revoked task ids.
REVOKE_INTERVAL = 0.5


class Revokes:
    """The revoked task ids this worker knows, read from the app's result backend.

    :param state: the app's state (its backend and tasks).
    :param hostname: the worker's node name, for the request ``task_revoked`` gets.
    """

    def __init__(self, state: AppState, hostname: str) -> None:
        self.state = state
        self.hostname = hostname
        #: task id -> terminate (``revoke(terminate=True)``); replaced on each read.
        self.ids: dict[str, bool] = {}
        self._read_at = 0.0

    def refresh(self) -> None:
        """Read the revoked ids from the result backend now."""
        self._read_at = time.monotonic()
        try:
            self.ids = self.state.backend.revoked()
        except Exception as exc:  # a backend that cannot, or a passing error: keep the last
            logger.debug("Reading revokes failed: %s", exc)

    def refresh_if_due(self, now: float) -> None:
        """:meth:`refresh` if the last read is older than :data:`REVOKE_INTERVAL` seconds.

        :param now: :func:`time.monotonic` now.
        """
        if now - self._read_at > REVOKE_INTERVAL:
            self.refresh()

    def report(self, name: str, task_id: str, terminated: bool, message: Message) -> None:
        """Store ``REVOKED`` for a task not run (or killed) and send ``task_revoked``.

        :param terminated: its process was killed while it ran.
        """
        exc = TaskRevokedError(f"Task {name}[{task_id}] was revoked"
                               + ("; its process was killed." if terminated else ": not run."))
        logger.warning("%s", exc)
        try:
            self.state.backend.store_result(task_id, exc, states.REVOKED, str(exc),
                                            reply_to=message.properties.get("reply_to"))
        except Exception:
            logger.exception("Could not store the revocation of %s", task_id)
        request = self._request(message, name, task_id)
        if request.chord:  # a revoked header task ends its chord (never raises)
            callbacks.on_chord_part(self.state, request, states.REVOKED, exc)
        task = self.state.get_task(name)
        if task is not None:
            send_robust(task_revoked, task, request=request,
                        terminated=terminated, signum=9 if terminated else None, expired=False)

    def _request(self, message: Message, name: str, task_id: str) -> Context:
        """The :class:`Context` of a message the main process settles itself (for signals)."""
        try:
            request = parse(message.headers, message.body, message.content_type,
                            message.content_encoding, self.state.accept,
                            message.properties, message.delivery_info)
        except Exception:  # undecodable: what the headers tell
            request = Context(id=task_id, task=name, headers=dict(message.headers))
        request.hostname = self.hostname
        return request
