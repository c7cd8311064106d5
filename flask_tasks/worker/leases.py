"""Renewing a lease-holding broker's leases (embedded) while the main loop may be busy."""

from __future__ import annotations

import logging
import threading

from ..transport.base import WorkerChannel

logger = logging.getLogger("flask_tasks.worker")


class LeaseKeeper:
    """Renews a lease-based broker's leases from a thread while the main loop may be blocked.

    The embedded broker redelivers a message whose lease ran out; its channel
    renews while the main loop polls, but a solo pool running a long task, or
    a full pool, keeps the loop from polling.
    """

    def __init__(self) -> None:
        self._stop: threading.Event | None = None

    def start(self, channel: WorkerChannel) -> None:
        """Renew ``channel``'s leases every third of its lease time (if it has leases)."""
        timeout = channel.lease_timeout
        if timeout is None:
            return
        every = max(0.5, timeout / 3)
        stop = self._stop = threading.Event()

        def keep() -> None:
            while not stop.wait(every):
                try:
                    channel.renew_leases()
                except Exception as exc:  # the next poll renews, or the broker is gone
                    logger.debug("Renewing leases failed: %s", exc)

        threading.Thread(target=keep, name="LeaseKeeper", daemon=True).start()

    def stop(self) -> None:
        """Stop renewing (the channel goes away)."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
