"""The worker's main process: consume, dispatch to the pool, acknowledge, shut down.

One thread runs kombu's :class:`~kombu.mixins.ConsumerMixin` loop (which
reconnects by itself). A message is checked cheaply here (content type,
protocol-2 headers, a registered task name) and either rejected with a
logged reason or handed to the pool; the body is decoded where the task
runs. Early-acknowledged tasks are acked when a pool slot takes them,
``acks_late`` tasks when their outcome comes back.

Lost broker connection: kombu reconnects. On Redis, messages the pool still
holds are not restored to the queue (they would run twice); they finish and
are acknowledged by delivery tag over the new connection, and messages that
were waiting in the worker go back to the queue (see
:class:`flask_tasks.transport.redis.Detached`).

Shutdown: the first SIGINT/SIGTERM stops consuming, returns reserved but
unstarted messages to the queue, lets running tasks finish and acks them
(warm); a second one kills running tasks and exits at once (cold).
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import Flask
from kombu import Connection, Consumer, Message
from kombu.mixins import ConsumerMixin
from kombu.utils.limits import TokenBucket

from .. import states
from ..config import parse_rate
from ..exceptions import NotRegistered, TaskRevokedError, TimeLimitExceeded, WorkerLostError
from ..extension import Tasks
from ..protocol import Message as ProtocolMessage
from ..protocol import Context, check_headers, parse, parse_datetime
from ..publisher import broker_connection, mask_url
from ..registry import unknown_task_message
from ..signals import (
    send_robust,
    task_received,
    task_revoked,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from ..app_state import AppState
from ..transport.redis import Detached
from .executor import ACK, REJECT, REQUEUE, SKIP, Job, Outcome, run_job, time_limits
from .pools import LOST, POOLS, PreforkPool

logger = logging.getLogger("flask_tasks.worker")

#: Exit codes of ``flask tasks worker``.
EX_OK = 0
EX_FAILURE = 1
EX_COLD = 2

CLEANUP_INTERVAL = 3600.0
#: Header counting how often a message's task killed its pool process.
LOST_HEADER = "x-flask-tasks-lost"
#: Seconds between reads of the revoked task ids.
REVOKE_INTERVAL = 0.5
#: Seconds between moves of due delayed messages into their queues.
MOVE_INTERVAL = 0.2


@dataclass
class _Delivery:
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


class Worker(ConsumerMixin):
    """Consumes task messages for one app and runs them in a pool.

    :param app: the Flask app; every task runs in its app context.
    :param pool: ``"prefork"``, ``"threads"`` or ``"solo"``.
    :param concurrency: pool size (None: ``TASKS_WORKER_CONCURRENCY``, then the CPU count).
    :param queues: queue names to consume (None: ``TASKS_DEFAULT_QUEUE``).
    :param hostname: node name, shown in logs and stored results (default ``tasks@<host>``).
    :param prefetch_multiplier: messages reserved per pool slot (0: unlimited).
    :param max_tasks_per_child: replace a prefork child after this many tasks.
    """

    def __init__(self, app: Flask, *, pool: str | None = None, concurrency: int | None = None,
                 queues: list[str] | None = None, hostname: str | None = None,
                 prefetch_multiplier: int | None = None,
                 max_tasks_per_child: int | None = None) -> None:
        ext = app.extensions.get("tasks")
        if not isinstance(ext, Tasks):
            raise RuntimeError("The app has no flask_tasks extension; call tasks.init_app(app).")
        self.app = app
        self.state: AppState = ext.state(app)
        config = self.state.config
        for module in config.imports:
            importlib.import_module(module)
        self.pool_name = pool or config.worker_pool
        if self.pool_name not in POOLS:
            raise ValueError(f"Unknown pool {self.pool_name!r}; choose one of {sorted(POOLS)}")
        self.concurrency = 1 if self.pool_name == "solo" else (
            concurrency or config.worker_concurrency or os.cpu_count() or 1)
        self.queues = queues or [config.default_queue]
        self.hostname = hostname or f"tasks@{socket.gethostname()}"
        multiplier = config.worker_prefetch_multiplier if prefetch_multiplier is None \
            else prefetch_multiplier
        self.prefetch_count = self.concurrency * multiplier
        self.max_tasks_per_child = max_tasks_per_child or config.worker_max_tasks_per_child
        self.connection: Connection = broker_connection(
            self.state.broker_url, config.broker_transport_options,
            config.broker_connection_timeout)
        self.pool = POOLS[self.pool_name](
            self._run_job, limit=self.concurrency,
            max_tasks_per_child=self.max_tasks_per_child, on_child_start=self._child_init,
            flush=self.state.backend.flush,
            # jobs queued ahead of the processes: the prefetch (at least two per process)
            depth=max(self.prefetch_count, 2 * self.concurrency) if self.prefetch_count
            else 4 * self.concurrency)
        # A prefork pool queues jobs ahead of its processes: early-ack messages are
        # acked when a process starts them; the other pools start them on submit.
        self._ack_on_start = isinstance(self.pool, PreforkPool)
        self._tags = itertools.count(1)
        self._buffer: deque[tuple[int, Message, bool, bool]] = deque()
        self._buckets: dict[str, TokenBucket | None] = {}  # task name -> its rate limit
        self._revoked: dict[str, bool] = {}  # task id -> terminate (from the backend)
        self._last_revoke_check = 0.0
        self._inflight: dict[int, _Delivery] = {}
        self._consumers: list[Consumer] = []
        self._warm = False
        self._cold = False
        self._last_cleanup = time.monotonic()
        self._ready_sent = False  # worker_ready is sent once, not on every reconnect
        self._warned_eta = False
        # Hooks of kombu's emulated QoS (Redis, embedded), found on connect.
        self._flush_acks: Callable[..., None] | None = None
        self._can_consume: Callable[[], bool] | None = None
        self._move_due: Callable[[list[str]], int] | None = None
        self._schedule: Callable[[dict[str, Any], str], None] | None = None
        self._last_move = 0.0
        # The current channel, and what earlier (lost) channels still owe the broker.
        self._channel: Any = None
        self._settle_detached: Callable[[Detached], None] | None = None
        self._detached = Detached()
        self.exit_code = EX_OK

    # -- running a job (inside the pool) ---------------------------------------------
    def _run_job(self, job: Job) -> Outcome:
        return run_job(self.app, self.state, job, hostname=self.hostname)

    def _child_init(self) -> None:
        """In a new prefork child: drop the parent's database connections, tell receivers.

        Final results may wait for the pool's flush (one round trip per batch).
        """
        self.state.backend.batching = True
        db = self.app.extensions.get("sqlalchemy")
        if db is not None:
            try:
                with self.app.app_context():
                    for engine in db.engines.values():
                        engine.dispose(close=False)  # the parent keeps using its sockets
            except Exception:
                logger.exception("Could not reset the app's database engines after fork")
        send_robust(worker_process_init, self)

    # -- ConsumerMixin -----------------------------------------------------------------
    def get_consumers(self, consumer_cls: type[Consumer], channel: Any) -> list[Consumer]:
        channel.basic_qos(0, self.prefetch_count, False)
        queues = [self.state.router.queue(name) for name in self.queues]
        # ConsumerMixin hands us a Consumer class with the channel already bound.
        self._consumers = [consumer_cls(queues=queues, on_message=self.on_message,  # type: ignore[call-arg]
                                        no_ack=False, accept=None)]
        return self._consumers

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        if self._warm:  # asked to stop while the broker is away: stop now
            logger.warning("Stopping without a broker connection (%s).", exc)
            raise SystemExit(EX_OK)
        logger.warning("Cannot connect to %s (%s); trying again in %.1f s.",
                       mask_url(self.state.broker_url), str(exc).rstrip("."), interval)

    def on_connection_revived(self) -> None:
        if self._inflight or self._buffer:
            # Messages of the old connection cannot be acked any more; the
            # broker redelivers the unacknowledged ones.
            self._buffer.clear()

    @contextmanager
    def extra_context(self, connection: Any, channel: Any) -> Iterator[None]:
        """Around consuming on one connection: when it is lost, detach what it held."""
        try:
            yield
        except connection.connection_errors + connection.channel_errors:
            self._detach(channel)
            raise

    def _detach(self, channel: Any) -> None:
        """Keep the lost channel's messages for settling over the next connection.

        Without this, closing the channel would put every unacknowledged
        message back on the queue, including those still running in the pool.
        """
        detach = getattr(channel, "detach", None)
        if detach is None:  # other transports: the broker redelivers unacked messages
            return
        detached: Detached = detach()
        detached.requeue += [entry[1].delivery_tag for entry in self._buffer]
        self._buffer.clear()
        self._detached.merge(detached)
        running = sum(1 for delivery in self._inflight.values() if not delivery.acked)
        waiting = len(detached.requeue) + len(detached.unrecorded)
        if running or waiting:
            logger.warning("Broker connection lost with %d task(s) in the pool and %d waiting: "
                           "the pool's tasks go on and are acknowledged once connected again; "
                           "the waiting ones go back to the queue.", running, waiting)

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any,
                         **kwargs: Any) -> None:
        if hasattr(channel, "renew_leases"):
            self._keep_leases(channel)
        self._flush_acks = getattr(channel, "flush_acks", None)
        self._channel = channel
        self._settle_detached = getattr(channel, "settle_detached", None)
        # Brokers that keep delayed messages themselves (flask_tasks' Redis).
        self._move_due = getattr(channel, "move_due", None)
        self._schedule = getattr(channel, "schedule", None)
        # kombu's emulated QoS (Redis, embedded): while it is full, draining
        # events only sleeps; the pool is what to wait on then.
        qos = getattr(channel, "qos", None)
        self._can_consume = getattr(qos, "can_consume", None)
        self._refresh_revoked()
        if not self._ready_sent:
            self._ready_sent = True
            logger.info("%s ready.", self.hostname)
            send_robust(worker_ready, self)

    def _keep_leases(self, channel: Any) -> None:
        """Renew a lease-based broker's leases while the main loop may be blocked.

        The embedded broker redelivers a message whose lease ran out; the main
        loop renews while it polls, but a solo pool running a long task, or a
        full pool, keeps it from polling.
        """
        every = max(0.5, float(getattr(channel, "visibility_timeout", 30.0)) / 3)

        def keep() -> None:
            while not self.should_stop and not channel.closed:
                time.sleep(every)
                try:
                    channel.renew_leases()
                except Exception as exc:  # the next poll renews, or the broker is gone
                    logger.debug("Renewing leases failed: %s", exc)

        threading.Thread(target=keep, name="LeaseKeeper", daemon=True).start()

    def on_message(self, message: Message) -> None:
        """Check a message, then queue it for the pool (or reject it with a reason)."""
        content_type = message.content_type
        if self.state.accept and content_type not in self.state.accept:
            logger.error("Rejected message %s: content type %r is not accepted (accepted: %s; "
                         "see TASKS_ACCEPT_CONTENT).", _message_id(message), content_type,
                         ", ".join(sorted(self.state.config.accept_content)))
            message.reject(requeue=False)
            return
        try:
            name, task_id = check_headers(message.headers)
        except Exception as exc:
            logger.error("Rejected message %s: %s. Body: %.200r", _message_id(message), exc,
                         message.body)
            message.reject(requeue=False)
            return
        task = self.state.get_task(name)
        if task is None:
            text = unknown_task_message(name, len(self.state.task_names()))
            logger.error("Rejected task %s[%s]: %s", name, task_id, text)
            try:
                self.state.backend.store_result(task_id, NotRegistered(text), states.FAILURE,
                                                text)
            except Exception:
                logger.exception("Could not store the failure of %s", task_id)
            message.reject(requeue=False)
            return
        if task_id in self._revoked:
            self._drop_revoked(message, name, task_id)
            return
        if self._delay(message, name, task_id):
            return
        logger.info("Task %s[%s] received", name, task_id)
        config = self.state.config
        acks_late = task.acks_late if task.acks_late is not None else config.acks_late
        track = task.track_started if task.track_started is not None else config.track_started
        ignore = task.ignore_result if task.ignore_result is not None else config.ignore_result
        if track and not (ignore or message.headers.get("ignore_result")) \
                and not self.state.backend.disabled:
            self.state.backend.store_result(task_id, None, states.RECEIVED)
        send_robust(task_received, self, request=message.headers)
        again = task.reject_on_worker_lost if task.reject_on_worker_lost is not None \
            else config.reject_on_worker_lost
        self._buffer.append((next(self._tags), message, acks_late, acks_late and again))
        self._dispatch()

    def _hard_limit(self, headers: dict[str, Any]) -> float | None:
        """The hard time limit of a message (enforced by the prefork pool only)."""
        task = self.state.get_task(headers["task"])
        if not self._ack_on_start or task is None:
            return None
        return time_limits(task, headers.get("timelimit"), self.state.config)[0]

    def _delay(self, message: Message, name: str, task_id: str) -> bool:
        """Send a message that came before its ``eta`` back to the broker's delayed store.

        :returns: True if it went back (and was acknowledged here).
        """
        eta = parse_datetime(message.headers.get("eta"))
        if eta is None or eta.timestamp() <= time.time() + 0.05:
            return False
        if self._schedule is None:
            if not self._warned_eta:
                self._warned_eta = True
                logger.warning("This broker keeps no delayed messages: tasks with an eta or "
                               "countdown run as soon as they arrive (Redis and the embedded "
                               "broker wait for the eta).")
            return False
        raw = getattr(message, "_raw", None)
        queue = message.delivery_info.get("routing_key") or self.queues[0]
        if not isinstance(raw, dict):
            return False
        self._schedule(raw, queue)
        self._settle(message, ACK)
        logger.info("Task %s[%s] is due at %s: kept on the broker until then",
                    name, task_id, eta.isoformat())
        return True

    # -- dispatch and completion -------------------------------------------------------
    def _bucket(self, name: str) -> TokenBucket | None:
        """The rate limit of task ``name`` in this worker (annotations, then the task)."""
        if name not in self._buckets:
            annotations = self.state.config.annotations or {}
            options = {**annotations.get("*", {}), **annotations.get(name, {})}
            task = self.state.get_task(name)
            limit = options.get("rate_limit") or (task.rate_limit if task else None)
            self._buckets[name] = None
            if limit:
                try:
                    rate = parse_rate(limit)
                except ValueError as exc:
                    logger.error("Task %s: %s; running it without a rate limit", name, exc)
                else:
                    # Up to 0.1 s worth at once: the loop looks again at least that often.
                    self._buckets[name] = TokenBucket(rate, capacity=max(1.0, rate / 10))
        return self._buckets[name]

    def _next_allowed(self) -> tuple[int, Message, bool, bool] | None:
        """Take the first buffered message whose task's rate limit allows it now."""
        for position, entry in enumerate(self._buffer):
            bucket = self._bucket(entry[1].headers["task"])
            if bucket is None or bucket.can_consume(1):
                del self._buffer[position]
                return entry
        return None

    def _dispatch(self) -> None:
        while self._buffer and self.pool.free() > 0 and not self._warm:
            entry = self._next_allowed()
            if entry is None:  # all waiting on their rate limits
                return
            tag, message, acks_late, again_if_lost = entry
            headers = message.headers
            if headers["id"] in self._revoked:  # revoked while it waited here
                self._drop_revoked(message, headers["task"], headers["id"])
                continue
            delivery = _Delivery(message, acks_late, headers["task"], headers["id"],
                                 again_if_lost=again_if_lost,
                                 time_limit=self._hard_limit(headers))
            self._inflight[tag] = delivery
            if not acks_late and not self._ack_on_start:
                self._settle(message, ACK)
                delivery.acked = True
            self.pool.submit(Job(tag, headers, message.body, message.content_type,
                                 message.content_encoding, dict(message.properties),
                                 dict(message.delivery_info)))
            if self.pool_name == "solo":
                self._complete(self.pool.collect(0))

    def _settle(self, message: Message, action: str) -> None:
        if message.channel is not self._channel and self._settle_detached is not None:
            # Delivered on a lost connection: settled by tag over this one.
            tags = self._detached.requeue if action == REQUEUE else self._detached.acks
            tags.append(message.delivery_tag)
            return
        try:
            if action == ACK:
                message.ack()
            elif action == REQUEUE:
                message.requeue()
            else:
                message.reject(requeue=False)
        except self.connection.connection_errors + self.connection.channel_errors as exc:
            logger.warning("Could not %s message %s (connection lost: %s); the broker will "
                           "redeliver it if it was unacknowledged.", action,
                           _message_id(message), exc)

    def _ack_started(self) -> None:
        """Note which jobs a pool process has started: ack early-ack messages, time them.

        Then kill the process of any job past its hard time limit (prefork).
        """
        if not self._ack_on_start:
            return
        now = time.monotonic()
        for tag in self.pool.started():
            delivery = self._inflight.get(tag)
            if delivery is None:
                continue
            if delivery.started_at is None:
                delivery.started_at = now
            if not delivery.acks_late and not delivery.acked:
                self._settle(delivery.message, ACK)
                delivery.acked = True
            if self._revoked.get(delivery.task_id) and not delivery.terminated:
                logger.warning("Task %s[%s] was revoked with terminate=True: killing its "
                               "process", delivery.name, delivery.task_id)
                delivery.terminated = self.pool.terminate_job(tag)  # type: ignore[attr-defined]
            if delivery.time_limit and not delivery.timed_out \
                    and now - delivery.started_at > delivery.time_limit:
                logger.error("Task %s[%s] ran past its time limit of %s s: killing its process",
                             delivery.name, delivery.task_id, delivery.time_limit)
                delivery.timed_out = self.pool.terminate_job(tag)  # type: ignore[attr-defined]

    def _complete(self, outcomes: list[Outcome]) -> None:
        self._ack_started()
        for outcome in outcomes:
            delivery = self._inflight.pop(outcome.tag, None)
            if delivery is None:
                continue
            action = outcome.action
            unstarted = action == SKIP
            if unstarted:  # queued, never started (warm shutdown): back to the queue
                action = REQUEUE
            elif action == LOST and delivery.terminated:
                self._store_revoked(delivery.name, delivery.task_id, terminated=True,
                                    message=delivery.message)
                action = ACK
            elif action == LOST and delivery.timed_out:
                self._worker_lost(delivery.name, delivery.task_id, "", TimeLimitExceeded(
                    f"Task {delivery.name}[{delivery.task_id}] ran past its time limit of "
                    f"{delivery.time_limit} s; its process was killed."))
                action = ACK
            elif action == LOST:
                if delivery.again_if_lost:
                    self._deliver_again(delivery, outcome.reason or "")
                else:
                    self._worker_lost(delivery.name, delivery.task_id, outcome.reason or "")
                action = ACK
            elif outcome.reason and action in (REJECT, REQUEUE):
                logger.warning("%s", outcome.reason)
            if delivery.acked:
                continue
            # An early-ack job that started and ended between two looks is acked
            # now, whatever it asked for (Reject(requeue=True) needs acks_late).
            self._settle(delivery.message, action if delivery.acks_late or unstarted else ACK)

    def _deliver_again(self, delivery: _Delivery, reason: str) -> None:
        """Its process died: publish the message again, counting the deaths; cap poison.

        A copy with the count in a header goes back to the queue (the caller
        acks the original), so the cap holds on every broker.
        """
        message = delivery.message
        lost = int(message.headers.get(LOST_HEADER) or 0) + 1
        limit = self.state.config.poison_max_deliveries
        if lost >= limit:
            self._worker_lost(delivery.name, delivery.task_id,
                              f"{reason}; the task killed its process {lost} times, so it is "
                              f"not delivered again (TASKS_POISON_MAX_DELIVERIES={limit})")
            return
        headers = {**message.headers, LOST_HEADER: lost}
        queue = self.state.router.queue(message.delivery_info.get("routing_key")
                                        or self.queues[0])
        properties = {key: message.properties.get(key, "")
                      for key in ("correlation_id", "reply_to")}
        copy = ProtocolMessage(delivery.task_id, delivery.name, headers, properties,
                               message.body, message.content_type, message.content_encoding)
        try:
            self.state.publisher.publish(copy, queue, priority=message.properties.get("priority"))
        except Exception:
            logger.exception("Could not deliver task %s[%s] again", delivery.name,
                             delivery.task_id)
            return
        logger.warning("Task %s[%s] will run again (%s; %d of %d)", delivery.name,
                       delivery.task_id, reason, lost, limit)

    def _refresh_revoked(self) -> None:
        """Read the revokes from the result backend (every :data:`REVOKE_INTERVAL` seconds)."""
        self._last_revoke_check = time.monotonic()
        try:
            self._revoked = self.state.backend.revoked()
        except Exception as exc:  # a backend that cannot, or a passing error: keep the last
            logger.debug("Reading revokes failed: %s", exc)

    def _drop_revoked(self, message: Message, name: str, task_id: str) -> None:
        self._settle(message, ACK)
        self._store_revoked(name, task_id, terminated=False, message=message)

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

    def _store_revoked(self, name: str, task_id: str, terminated: bool,
                       message: Message) -> None:
        exc = TaskRevokedError(f"Task {name}[{task_id}] was revoked"
                               + ("; its process was killed." if terminated else ": not run."))
        logger.warning("%s", exc)
        try:
            self.state.backend.store_result(task_id, exc, states.REVOKED, str(exc))
        except Exception:
            logger.exception("Could not store the revocation of %s", task_id)
        task = self.state.get_task(name)
        if task is not None:
            send_robust(task_revoked, task, request=self._request(message, name, task_id),
                        terminated=terminated, signum=9 if terminated else None, expired=False)

    def _worker_lost(self, name: str, task_id: str, reason: str,
                     exc: BaseException | None = None) -> None:
        exc = exc or WorkerLostError(reason)
        reason = reason or str(exc)
        logger.error("Task %s[%s] failed: %s", name, task_id, reason)
        try:
            self.state.backend.store_result(task_id, exc, states.FAILURE, reason)
        except Exception:
            logger.exception("Could not store the failure of %s", task_id)

    def _send_detached(self) -> None:
        """Settle what lost connections still owe, over the current one (one round trip)."""
        if not self._detached or self._settle_detached is None:
            return
        detached, self._detached = self._detached, Detached()
        try:
            self._settle_detached(detached)
        except BaseException:
            self._detached.merge(detached)  # tried again on the next connection
            raise
        logger.info("Settled %d message(s) of the lost broker connection (%d acked, "
                    "%d back to the queue)", len(detached.acks) + len(detached.requeue)
                    + len(detached.unrecorded), len(detached.acks),
                    len(detached.requeue) + len(detached.unrecorded))

    def on_iteration(self) -> None:
        self._complete(self.pool.collect(0))
        self._dispatch()
        self._ack_started()
        self._send_detached()
        # Wait on the pool, not the broker, while nothing more can be taken:
        # the pool is full with messages waiting, or the prefetch limit is
        # reached (acknowledging started jobs frees it).
        while not self._warm and self.pool.busy() and (
                (self._buffer and self.pool.free() == 0)
                or (self._can_consume is not None and not self._can_consume())):
            self._complete(self.pool.collect(0.05))
            if time.monotonic() - self._last_revoke_check > REVOKE_INTERVAL:
                self._refresh_revoked()
            self._dispatch()
            self._ack_started()
        if self._flush_acks is not None:
            self._flush_acks()
        if self._warm:
            self._drain_for_shutdown()
            return
        now = time.monotonic()
        if now - self._last_revoke_check > REVOKE_INTERVAL:
            self._refresh_revoked()
        if self._move_due is not None and now - self._last_move > MOVE_INTERVAL:
            self._last_move = now
            self._move_due_messages()
        if now - self._last_cleanup > CLEANUP_INTERVAL:
            self._last_cleanup = now
            self._cleanup()

    def _move_due_messages(self) -> None:
        assert self._move_due is not None
        try:
            moved = self._move_due(self.queues)
        except self.connection.connection_errors as exc:
            logger.warning("Moving due delayed messages failed: %s", exc)
            return
        if moved:
            logger.debug("Moved %d due delayed message(s) to their queues", moved)

    def _cleanup(self) -> None:
        try:
            removed = self.state.backend.cleanup()
            if removed:
                logger.info("Removed %d expired results", removed)
        except Exception:
            logger.exception("Cleaning expired results failed")

    def _drain_for_shutdown(self) -> None:
        for consumer in self._consumers:
            try:
                consumer.cancel()
            except Exception:
                pass
        while self._buffer:
            message = self._buffer.popleft()[1]
            self._settle(message, REQUEUE)
        self.pool.begin_shutdown()
        while self.pool.busy() and not self._cold:
            self._complete(self.pool.collect(0.5))
        self._send_detached()
        if self._flush_acks is not None:
            self._flush_acks(0.0)
        self.should_stop = True

    # -- lifecycle ---------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """First SIGINT/SIGTERM: warm shutdown; second: cold."""
        def handler(signum: int, frame: Any) -> None:
            if not self._warm:
                logger.warning("worker: Warm shutdown (%s): finishing %d running task(s); "
                               "press Ctrl-C again for a cold shutdown.",
                               signal.Signals(signum).name, len(self.pool.started()))
                self._warm = True
            else:
                logger.warning("worker: Cold shutdown (%s)", signal.Signals(signum).name)
                self._cold = True
                self.exit_code = EX_COLD
                self.pool.stop(cold=True)
                raise SystemExit(EX_COLD)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def banner(self) -> str:
        """The text printed at start: URLs (passwords hidden), pool, queues, tasks."""
        backend = self.state.config.result_backend
        lines = [
            f" -------------- {self.hostname} (flask_tasks)",
            f" app:         {self.app.import_name}",
            f" broker:      {mask_url(self.state.broker_url)}"
            + ("  (embedded)" if self.state.broker_is_embedded else ""),
            f" results:     {mask_url(backend) if backend else 'embedded (SQLite)'}",
            f" pool:        {self.pool_name} (concurrency: {self.concurrency})",
            f" prefetch:    {self.prefetch_count or 'unlimited'}",
            f" queues:      {', '.join(self.queues)}",
            "",
            " [tasks]",
        ]
        lines += [f"   . {name}" for name in self.state.task_names()] or ["   (none)"]
        return "\n".join(lines)

    def start(self) -> int:
        """Run until shut down; returns the process exit code."""
        self.pool.start()
        try:
            self.run(safety_interval=0.1)
        except SystemExit as exc:
            self.exit_code = exc.code if isinstance(exc.code, int) else EX_COLD
        finally:
            self.pool.stop(cold=self._cold)
            send_robust(worker_shutdown, self)
            try:
                self.connection.release()
            except Exception:
                pass
        return self.exit_code


def _message_id(message: Message) -> str:
    headers = message.headers or {}
    value = headers.get("id") if isinstance(headers, dict) else None
    return str(value or message.properties.get("correlation_id") or message.delivery_tag)
