"""From the worker's buffer to the pool and back: rate limits, time limits, outcomes.

A message that passed the consumer's checks waits in :attr:`Dispatcher.buffer`
until the pool has room and its task's rate limit allows it
(:class:`RateLimits`). Handed to the pool, it is a :class:`Delivery` in
:attr:`Dispatcher.inflight` until its outcome comes back and the message is
settled: early-acknowledged messages when a pool slot takes them,
``acks_late`` ones when they end. A job whose process died fails with
``WorkerLostError``, or, with ``reject_on_worker_lost``, is published again,
at most ``TASKS_POISON_MAX_DELIVERIES`` times (the poison cap). A job past
its hard time limit, or revoked with ``terminate=True``, has its process
killed.

A job the pool refused for its content (``REFUSE``: a bad header or body,
an unknown task) has its message rejected, or, with
``TASKS_DEAD_LETTER_REJECTED``, set aside as a dead letter, when the message
is not acknowledged yet (``acks_late``; early-acknowledged messages are
checked in the main process first when that setting is on). Nothing a
message holds makes the dispatcher raise.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from kombu.message import Message
from kombu.utils.limits import TokenBucket

from .. import states
from ..app_state import AppState
from ..config import parse_rate
from ..exceptions import TimeLimitExceeded, WorkerLostError
from ..protocol import Message as ProtocolMessage
from ..protocol import message_ids
from .consumer import DEAD_LETTER, message_id, routing_key
from .executor import ACK, REFUSE, REJECT, REQUEUE, SKIP, Job, Outcome, time_limits
from .pools import LOST, Pool
from .revokes import Revokes

logger = logging.getLogger("flask_tasks.worker")

#: Header counting how often a message's task killed its pool process.
LOST_HEADER = "x-flask-tasks-lost"


class Settle(Protocol):
    """Settles a message on the broker (:meth:`.consumer.Settler.settle`).

    ``settle(message, ACK | REQUEUE | REJECT | DEAD_LETTER, reason)``.
    """

    def __call__(self, message: Message, action: str, reason: str | None = None) -> None: ...


class Waiting(NamedTuple):
    """A message waiting for the pool, with what its checked headers tell."""

    tag: int
    message: Message
    acks_late: bool
    again_if_lost: bool
    name: str
    task_id: str


@dataclass
class Delivery:
    """A message handed to the pool and not yet settled."""

    message: Message
    acks_late: bool
    name: str
    task_id: str
    acked: bool = False
    #: Deliver again if the pool process dies (acks_late + reject_on_worker_lost).
    again_if_lost: bool = False
    #: Hard time limit, seconds (None: none); when the job was seen started.
    time_limit: float | None = None
    started_at: float | None = None
    timed_out: bool = False
    terminated: bool = False  # revoked with terminate=True while running


class RateLimits:
    """Each task's rate limit in this worker: a token bucket per task name.

    The limit comes from ``TASKS_ANNOTATIONS`` (``"*"``, then the task's
    name), else the task's ``rate_limit``; read once per name.
    """

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._buckets: dict[str, TokenBucket | None] = {}

    def bucket(self, name: str) -> TokenBucket | None:
        """The bucket of task ``name`` (None: no limit)."""
        if name not in self._buckets:
            annotations = self.state.config.annotations or {}
            options = {**annotations.get("*", {}), **annotations.get(name, {})}
            task = self.state.get_task(name)
            limit = options.get("rate_limit") or (task.rate_limit if task else None)
            self._buckets[name] = None
            if limit:
                try:
                    rate = parse_rate(limit)
                except (ValueError, TypeError) as exc:
                    logger.error("Task %s: %s; running it without a rate limit", name, exc)
                else:
                    # Up to 0.1 s worth at once: the loop looks again at least that often.
                    self._buckets[name] = TokenBucket(rate, capacity=max(1.0, rate / 10))
        return self._buckets[name]


class Dispatcher:
    """Feeds the pool from the buffer and settles each message by its outcome.

    :param state: the app's state (tasks, settings, backend, publisher).
    :param pool: the pool that runs the jobs.
    :param revokes: the revoked ids (a revoked message is dropped, not run).
    :param settle: settles a message on the broker.
    :param queues: the worker's queues (the first: where a message goes
        again when its own queue is unknown).
    """

    def __init__(self, state: AppState, pool: Pool, revokes: Revokes, settle: Settle,
                 queues: list[str]) -> None:
        self.state = state
        self.pool = pool
        self.revokes = revokes
        self.settle = settle
        self.queues = queues
        self.limits = RateLimits(state)
        #: Messages waiting for the pool, in arrival order.
        self.buffer: deque[Waiting] = deque()
        #: Messages handed to the pool, by job tag.
        self.inflight: dict[int, Delivery] = {}
        #: Warm shutdown: nothing more goes to the pool.
        self.stopping = False
        self._tags = itertools.count(1)
        # A pool that queues jobs ahead of its processes: early-ack messages are
        # acked when a process starts them; the other pools start them on submit.
        self._ack_on_start = pool.queues_jobs
        self._inline = pool.inline

    def receive(self, message: Message, acks_late: bool, again_if_lost: bool) -> None:
        """Buffer a checked message and dispatch what the pool can take.

        :param message: a message the consumer checked (its headers name the
            task and id; one that does not is rejected).
        :param again_if_lost: deliver it again if its pool process dies.
        """
        name, task_id = message_ids(message.headers)
        if name is None or task_id is None:  # the consumer's checks let no such message by
            logger.error("Rejected message %s: its headers lack 'task' or 'id'",
                         message_id(message))
            self.settle(message, REJECT)
        else:
            self.buffer.append(Waiting(next(self._tags), message, acks_late, again_if_lost,
                                       name, task_id))
        self.dispatch()

    def _next_allowed(self) -> Waiting | None:
        """Take the first buffered message whose task's rate limit allows it now."""
        for position, entry in enumerate(self.buffer):
            bucket = self.limits.bucket(entry.name)
            if bucket is None or bucket.can_consume(1):
                del self.buffer[position]
                return entry
        return None

    def dispatch(self) -> None:
        """Hand buffered messages to the pool while it has room."""
        while self.buffer and self.pool.free() > 0 and not self.stopping:
            entry = self._next_allowed()
            if entry is None:  # all waiting on their rate limits
                return
            tag, message, acks_late, again_if_lost, name, task_id = entry
            if task_id in self.revokes.ids:  # revoked while it waited here
                self.settle(message, ACK)
                self.revokes.report(name, task_id, False, message)
                continue
            headers = message.headers
            delivery = Delivery(message, acks_late, name, task_id, again_if_lost=again_if_lost,
                                time_limit=self._hard_limit(name, headers))
            self.inflight[tag] = delivery
            if not acks_late and not self._ack_on_start:
                self.settle(message, ACK)
                delivery.acked = True
            self.pool.submit(Job(tag, headers, message.body, message.content_type,
                                 message.content_encoding, _as_dict(message.properties),
                                 _as_dict(message.delivery_info)))
            if self._inline:
                self.complete(self.pool.collect(0))

    def _hard_limit(self, name: str, headers: Mapping[str, Any]) -> float | None:
        """The hard time limit of a message, seconds (enforced by the prefork pool only).

        Never raises: a ``timelimit`` header of the wrong type counts as not set.
        """
        task = self.state.get_task(name)
        if not self._ack_on_start or task is None:
            return None
        return time_limits(task, headers.get("timelimit"), self.state.config)[0]

    def ack_started(self) -> None:
        """Note which jobs a pool process has started: ack early-ack messages, time them.

        Then kill the process of any job past its hard time limit, or revoked
        with ``terminate=True`` (prefork).
        """
        if not self._ack_on_start:
            return
        now = time.monotonic()
        for tag in self.pool.started():
            delivery = self.inflight.get(tag)
            if delivery is None:
                continue
            if delivery.started_at is None:
                delivery.started_at = now
            if not delivery.acks_late and not delivery.acked:
                self.settle(delivery.message, ACK)
                delivery.acked = True
            if self.revokes.ids.get(delivery.task_id) and not delivery.terminated:
                logger.warning("Task %s[%s] was revoked with terminate=True: killing its "
                               "process", delivery.name, delivery.task_id)
                delivery.terminated = self.pool.terminate_job(tag)
            if delivery.time_limit and not delivery.timed_out \
                    and now - delivery.started_at > delivery.time_limit:
                logger.error("Task %s[%s] ran past its time limit of %s s: killing its process",
                             delivery.name, delivery.task_id, delivery.time_limit)
                delivery.timed_out = self.pool.terminate_job(tag)

    def complete(self, outcomes: list[Outcome]) -> None:
        """Settle the messages of finished jobs by their outcomes."""
        self.ack_started()
        for outcome in outcomes:
            delivery = self.inflight.pop(outcome.tag, None)
            if delivery is None:
                continue
            action = outcome.action
            unstarted = action == SKIP
            if unstarted:  # queued, never started (warm shutdown): back to the queue
                action = REQUEUE
            elif action == LOST and delivery.terminated:
                self.revokes.report(delivery.name, delivery.task_id, True, delivery.message)
                action = ACK
            elif action == LOST and delivery.timed_out:
                self._worker_lost(delivery, "", TimeLimitExceeded(
                    f"Task {delivery.name}[{delivery.task_id}] ran past its time limit of "
                    f"{delivery.time_limit} s; its process was killed."))
                action = ACK
            elif action == LOST:
                if delivery.again_if_lost:
                    self._deliver_again(delivery, outcome.reason or "")
                else:
                    self._worker_lost(delivery, outcome.reason or "")
                action = ACK
            elif action == REFUSE:  # refused for its content: FAILURE is stored already
                logger.error("%s", outcome.reason or f"Rejected task {delivery.name}"
                             f"[{delivery.task_id}]")
                action = DEAD_LETTER if self.state.config.dead_letter_rejected else REJECT
                if not delivery.acked:  # never ack what was refused
                    self.settle(delivery.message, action, outcome.reason)
                    continue
            elif outcome.reason and action in (REJECT, REQUEUE):
                logger.warning("%s", outcome.reason)
            if delivery.acked:
                continue
            # An early-ack job that started and ended between two looks is acked
            # now, whatever it asked for (Reject(requeue=True) needs acks_late).
            self.settle(delivery.message, action if delivery.acks_late or unstarted else ACK)

    def _deliver_again(self, delivery: Delivery, reason: str) -> None:
        """Its process died: publish the message again, counting the deaths; cap poison.

        A copy with the count in a header goes back to the queue (the caller
        acks the original), so the cap holds on every broker. A count that is
        not an integer >= 0 counts as 0. If the copy cannot be published, the
        task fails (WorkerLostError stored), so a caller still learns its end.
        """
        message = delivery.message
        lost = _lost_count(message.headers.get(LOST_HEADER)) + 1
        limit = self.state.config.poison_max_deliveries
        if lost >= limit:
            self._worker_lost(delivery,
                              f"{reason}; the task killed its process {lost} times, so it is "
                              f"not delivered again (TASKS_POISON_MAX_DELIVERIES={limit})")
            return
        try:
            headers = {**message.headers, LOST_HEADER: lost}
            queue = self.state.router.queue(routing_key(message) or self.queues[0])
            properties = _as_dict(message.properties)
            copy = ProtocolMessage(delivery.task_id, delivery.name, headers,
                                   {key: properties.get(key) or ""
                                    for key in ("correlation_id", "reply_to")},
                                   message.body, message.content_type, message.content_encoding)
            priority = properties.get("priority")
            self.state.publisher.publish(copy, queue, priority=priority
                                         if isinstance(priority, int) else None)
        except Exception as exc:
            logger.exception("Could not deliver task %s[%s] again", delivery.name,
                             delivery.task_id)
            self._worker_lost(delivery,
                              f"{reason}; it could not be delivered again ({exc!r:.200})")
            return
        logger.warning("Task %s[%s] will run again (%s; %d of %d)", delivery.name,
                       delivery.task_id, reason, lost, limit)

    def _worker_lost(self, delivery: Delivery, reason: str,
                     exc: BaseException | None = None) -> None:
        name, task_id = delivery.name, delivery.task_id
        exc = exc or WorkerLostError(reason)
        reason = reason or str(exc)
        logger.error("Task %s[%s] failed: %s", name, task_id, reason)
        try:
            self.state.backend.store_result(
                task_id, exc, states.FAILURE, reason,
                reply_to=_as_dict(delivery.message.properties).get("reply_to"))
        except Exception:
            logger.exception("Could not store the failure of %s", task_id)

    # -- the buffer, when the connection or the worker goes away ---------------------
    def running(self) -> int:
        """Jobs in the pool whose message is not acknowledged yet."""
        return sum(1 for delivery in self.inflight.values() if not delivery.acked)

    def take_waiting(self) -> list[Message]:
        """Empty the buffer; returns its messages, in order."""
        waiting = [entry.message for entry in self.buffer]
        self.buffer.clear()
        return waiting

    def requeue_waiting(self) -> None:
        """Put every buffered message back on its queue (warm shutdown)."""
        while self.buffer:
            self.settle(self.buffer.popleft().message, REQUEUE)


def _as_dict(value: object) -> dict[str, Any]:
    """A message's properties or delivery info as a dict ({} if they are not a mapping)."""
    return dict(value) if isinstance(value, Mapping) else {}


def _lost_count(value: object) -> int:
    """The :data:`LOST_HEADER` of a message: an integer >= 0, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else 0
