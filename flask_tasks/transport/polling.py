"""Adaptive polling for kombu virtual transports that must poll (the embedded broker).

A consumer that polls at a fixed interval either wastes CPU while idle or
adds that interval to every message's latency. Here it polls again soon
after it found a message and backs off while it finds none:

- :class:`Backoff`: the pause after an empty poll starts at
  ``min_polling_interval`` and doubles up to ``polling_interval`` seconds; a
  delivery starts it over. :class:`Transport` keeps it across
  ``drain_events`` calls, so a caller that drains with a short timeout in a
  loop backs off as well.
- :class:`ChangeWatch`: an idle poll skips the query when nothing changed
  since the last query found nothing (:meth:`Channel.change_token`; for
  SQLite ``PRAGMA data_version``, a few microseconds), but queries at least
  every ``polling_interval`` seconds, since messages also become ready by
  time alone (an ``eta`` passes, a lease runs out).
- :data:`doorbell`: a transport rings it when it makes a message ready in
  this process; the pollers of this process then poll at once.

Never imports Flask.
"""

from __future__ import annotations

import os
import threading
import time
import typing as t
from collections.abc import Callable, Hashable
from queue import Empty

from kombu.transport import virtual

T = t.TypeVar("T")


class Backoff:
    """Pauses between polls: ``minimum`` seconds, doubling up to ``maximum``.

    :param minimum: seconds of the first pause after :meth:`reset`; more
        than 0 unless ``maximum`` is 0 too.
    :param maximum: seconds of the longest pause (0: never pause).
    :raises ValueError: a negative bound, or a zero ``minimum`` with a
        positive ``maximum`` (it would never grow).
    """

    def __init__(self, minimum: float, maximum: float) -> None:
        if maximum < 0 or minimum < 0 or (minimum == 0 and maximum > 0):
            raise ValueError(f"Polling intervals must be positive seconds, not {minimum!r}"
                             f" (min_polling_interval) and {maximum!r} (polling_interval).")
        self.minimum = min(minimum, maximum)
        self.maximum = maximum
        self._next = self.minimum

    def reset(self) -> None:
        """Start over at ``minimum`` (a message was found)."""
        self._next = self.minimum

    def next(self) -> float:
        """Return the pause to take now, in seconds, and double the next one."""
        pause = self._next
        self._next = min(pause * 2, self.maximum)
        return pause


class ChangeWatch:
    """Tells whether a poll must run its query or may report nothing at once.

    A poll must query when the last query found a message (there may be
    more), when the change token differs from the last query's, or when
    ``period`` seconds passed since the last query.

    :param period: seconds between queries at the least.
    """

    def __init__(self, period: float) -> None:
        self.period = period
        self._token: Hashable = None
        self._found = True
        self._due = 0.0

    def poll(self, token: Hashable, query: Callable[[], T]) -> T:
        """Run ``query()`` if due and return what it returns.

        :param token: a value that changes whenever new data may be there;
            read it *before* the query, so a change during the query is
            seen by the next poll.
        :raises queue.Empty: not due, or ``query()`` found nothing.
        """
        now = time.monotonic()
        if not (self._found or token != self._token or now >= self._due):
            raise Empty()
        try:
            result = query()
        except Empty:
            self._token, self._found, self._due = token, False, now + self.period
            raise
        self._token, self._found, self._due = token, True, now + self.period
        return result


class Doorbell:
    """Wakes this process's pollers when a message becomes ready in it."""

    def __init__(self) -> None:
        self._bell = threading.Condition(threading.Lock())
        #: How often it rang; a poller reads it before it polls.
        self.rings = 0

    def ring(self) -> None:
        """Wake every poller waiting in :meth:`wait`."""
        with self._bell:
            self.rings += 1
            self._bell.notify_all()

    def wait(self, seen: int, timeout: float) -> bool:
        """Sleep ``timeout`` seconds, or less if :attr:`rings` is no longer ``seen``.

        :returns: True if it rang.
        """
        with self._bell:
            return self._bell.wait_for(lambda: self.rings != seen, timeout)

    def _reset_after_fork(self) -> None:
        self._bell = threading.Condition(threading.Lock())  # another thread may have held it


#: The doorbell of this process.
doorbell = Doorbell()
os.register_at_fork(after_in_child=doorbell._reset_after_fork)


class Channel(virtual.Channel):
    """A virtual channel whose idle polls skip the query while nothing changed.

    Subclasses override :meth:`change_token`, and ring the :data:`doorbell`
    when they make a message ready (publish, requeue).
    """

    if t.TYPE_CHECKING:  # kombu's, untyped: the signatures flask_tasks' channels rely on
        def _get_message_priority(self, message: dict[str, t.Any],
                                  reverse: bool = False) -> int: ...
        def basic_consume(self, queue: str, no_ack: bool, *args: t.Any,
                          **kwargs: t.Any) -> t.Any: ...
        def basic_cancel(self, consumer_tag: str) -> t.Any: ...
        def close(self) -> None: ...

    def __init__(self, connection: Transport, **kwargs: t.Any) -> None:
        virtual.Channel.__init__(self, connection, **kwargs)
        self._watch = ChangeWatch(float(connection.polling_interval or 0))

    def change_token(self) -> Hashable:
        """A value that changes whenever a message may have become ready.

        The default changes every time: every poll queries.
        """
        return object()

    def drain_events(self, timeout: float | None = None, callback: t.Any = None) -> t.Any:
        if not (self._consumers and self.qos.can_consume()):
            raise Empty()
        def poll() -> t.Any:
            return virtual.Channel.drain_events(self, timeout, callback)

        return self._watch.poll(self.change_token(), poll)


class Transport(virtual.Transport):
    """A virtual transport that polls with :class:`Backoff` pauses and the :data:`doorbell`.

    :param client: the :class:`kombu.Connection`; its transport options
        ``polling_interval`` and ``min_polling_interval`` (seconds) bound
        the pauses.
    """

    Channel: type[virtual.Channel] = Channel
    #: Longest pause between polls of idle queues, seconds.
    polling_interval = 0.05
    #: First pause after a message was found, seconds; it doubles on each empty poll.
    min_polling_interval = 0.001

    def __init__(self, client: t.Any, **kwargs: t.Any) -> None:
        virtual.Transport.__init__(self, client, **kwargs)
        options = client.transport_options
        self.min_polling_interval = float(options.get("min_polling_interval",
                                                      self.min_polling_interval))
        self.backoff = Backoff(self.min_polling_interval, float(self.polling_interval or 0))

    def drain_events(self, connection: t.Any, timeout: float | None = None,
                     **kwargs: t.Any) -> None:
        """Deliver one message, polling with back-off.

        :param timeout: seconds to poll at most (None: until a message comes).
        :raises TimeoutError: no message within ``timeout`` (``socket.timeout``).
        """
        start, get = time.monotonic(), t.cast(t.Any, self.cycle).get
        while True:
            seen = doorbell.rings
            try:
                get(self._deliver, timeout=timeout)
            except Empty:
                left = None if timeout is None else timeout - (time.monotonic() - start)
                if left is not None and left <= 0:
                    raise TimeoutError() from None
                pause = self.backoff.next()
                if doorbell.wait(seen, pause if left is None else min(pause, left)):
                    self.backoff.reset()
            else:
                self.backoff.reset()
                return
