"""The worker's timers: delayed messages moved when due, expired results and old dead
letters removed. :meth:`Housekeeping.run_due` is called from the main loop; each job
runs when its interval has passed, and a failure is logged, never raised.
"""

from __future__ import annotations

import logging
import time

from kombu.connection import Connection

from ..app_state import AppState
from ..transport.base import WorkerChannel

logger = logging.getLogger("flask_tasks.worker")

#: Seconds between cleanups of expired results.
CLEANUP_INTERVAL = 3600.0
#: Seconds between moves of due delayed messages into their queues.
MOVE_INTERVAL = 0.2
#: Seconds between trims of the dead letters to their size and age limits.
TRIM_INTERVAL = 60.0


class Housekeeping:
    """Runs the worker's periodic jobs on the channel of the moment.

    :param state: the app's state (the backend, the dead-letter settings).
    :param queues: the queues the worker consumes (their delayed messages are moved).
    :param connection: the worker's broker connection (its error classes).
    """

    def __init__(self, state: AppState, queues: list[str], connection: Connection) -> None:
        self.state = state
        self.queues = queues
        self.connection = connection
        self._last_cleanup = time.monotonic()
        self._last_move = 0.0
        self._last_trim = 0.0

    def run_due(self, channel: WorkerChannel, now: float) -> None:
        """Run the jobs whose interval has passed at ``now`` (``time.monotonic()``)."""
        if now - self._last_move > MOVE_INTERVAL:
            self._last_move = now
            self.move_due(channel)
        if now - self._last_cleanup > CLEANUP_INTERVAL:
            self._last_cleanup = now
            self.cleanup()
        if now - self._last_trim > TRIM_INTERVAL:
            self._last_trim = now
            self.trim_dead_letters(channel)

    def move_due(self, channel: WorkerChannel) -> None:
        """Move due delayed messages into the queues (brokers that keep them, such as Redis)."""
        try:
            moved = channel.move_due(self.queues)
        except self.connection.connection_errors as exc:
            logger.warning("Moving due delayed messages failed: %s", exc)
            return
        if moved:
            logger.debug("Moved %d due delayed message(s) to their queues", moved)

    def trim_dead_letters(self, channel: WorkerChannel) -> None:
        """Drop dead letters past ``TASKS_DEAD_LETTER_MAX_ENTRIES`` / ``_MAX_AGE``."""
        store, config = channel.dead_letters, self.state.config
        if store is None:
            return
        try:
            removed = store.trim(config.dead_letter_max_entries, config.dead_letter_max_age)
        except Exception as exc:  # the broker is away: next time
            logger.warning("Trimming the dead letters failed: %s", exc)
            return
        if removed:
            logger.info("Dropped %d dead letter(s) past TASKS_DEAD_LETTER_MAX_ENTRIES or "
                        "TASKS_DEAD_LETTER_MAX_AGE", removed)

    def cleanup(self) -> None:
        """Remove expired results where the store does not expire them itself (SQL)."""
        try:
            removed = self.state.backend.cleanup()
            if removed:
                logger.info("Removed %d expired results", removed)
        except Exception:
            logger.exception("Cleaning expired results failed")
