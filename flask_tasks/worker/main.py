"""The worker's main process: start, the consume loop, housekeeping, signals, shutdown.

:class:`Worker` runs kombu's :class:`~kombu.mixins.ConsumerMixin` loop in one
thread (it reconnects by itself) and composes the parts that do the work:

- :class:`~.consumer.Consumer` checks each message from the broker and
  :class:`~.consumer.Settler` settles it (:mod:`.consumer`);
- :class:`~.dispatch.Dispatcher` feeds the pool and settles each message by
  its outcome (:mod:`.dispatch`);
- :class:`~.revokes.Revokes` knows the revoked task ids (:mod:`.revokes`);
- the pool runs the jobs (:mod:`.pools`, :mod:`.prefork`).

Each loop turn collects the pool's outcomes, dispatches, settles what a
lost connection still owes, flushes buffered acks, then does the
housekeeping that is due: reading revokes, moving due delayed messages,
cleaning expired results. A further part (a pidbox node for remote control,
an event dispatcher, a heartbeat) is composed the same way: built in
``__init__``, its kombu consumer added in :meth:`Worker.get_consumers`, its
timer in :meth:`Worker.on_iteration`.

Lost broker connection: kombu reconnects. On Redis, messages the pool still
holds are not restored to the queue (they would run twice); they finish and
are acknowledged by delivery tag over the new connection, and messages that
were waiting in the worker go back to the queue.

Shutdown: the first SIGINT/SIGTERM stops consuming, returns reserved but
unstarted messages to the queue, lets running tasks finish and acks them
(warm); a second one kills running tasks and exits at once (cold).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from flask import Flask
from kombu.connection import Connection
from kombu.messaging import Consumer as KombuConsumer
from kombu.mixins import ConsumerMixin

from ..app_state import AppState
from ..signals import send_robust, worker_process_init, worker_ready, worker_shutdown
from ..transport.base import WorkerChannel
from ..transport.connect import (
    broker_connection,
    declaration_refused,
    login_refused,
    mask_url,
)
from ..transport.delays import is_amqp
from .consumer import Consumer, Settler
from .dispatch import Dispatcher
from .executor import Job, Outcome, run_job
from .housekeeping import Housekeeping
from .leases import LeaseKeeper
from .pools import POOLS, Pool
from .revokes import Revokes

logger = logging.getLogger("flask_tasks.worker")

#: Exit codes of ``flask tasks worker``.
EX_OK = 0
EX_FAILURE = 1
EX_COLD = 2
#: The broker refused the worker's credentials or virtual host (sysexits' EX_CONFIG).
EX_CONFIG = 78

#: Seconds between two reads of the broker's heartbeats while the main loop waits
#: on the pool (RabbitMQ with heartbeats only).
KEEP_ALIVE_INTERVAL = 1.0


class Worker(ConsumerMixin):
    """Consumes task messages for one app and runs them in a pool.

    :param app: the Flask app; every task runs in its app context.
    :param state: the app's flask_tasks state (``tasks.state(app)``).
    :param pool: a name in :data:`~.pools.POOLS` (``"prefork"``, ``"threads"``,
        ``"solo"``) or a :class:`~.pools.Pool` class (None: ``TASKS_WORKER_POOL``).
    :param concurrency: pool size (None: ``TASKS_WORKER_CONCURRENCY``, then the CPU count).
    :param queues: queue names to consume (None: ``TASKS_DEFAULT_QUEUE``).
    :param hostname: node name, shown in logs and stored results (default ``tasks@<host>``).
    :param prefetch_multiplier: messages reserved per pool slot (0: unlimited).
    :param max_tasks_per_child: replace a prefork child after this many tasks.
    :raises ValueError: an unknown pool name.
    """

    if TYPE_CHECKING:  # kombu's, untyped
        def run(self, _tokens: int = 1, **kwargs: Any) -> None: ...
        def create_connection(self) -> Connection: ...

    def __init__(self, app: Flask, state: AppState, *, pool: str | type[Pool] | None = None,
                 concurrency: int | None = None, queues: list[str] | None = None,
                 hostname: str | None = None, prefetch_multiplier: int | None = None,
                 max_tasks_per_child: int | None = None) -> None:
        self.app = app
        self.state = state
        config = state.config
        for module in config.imports:
            importlib.import_module(module)
        pool_cls = _pool_class(pool or config.worker_pool)
        self.pool_name = pool_cls.name
        self.concurrency = 1 if pool_cls.inline else (
            concurrency or config.worker_concurrency or os.cpu_count() or 1)
        self.queues = queues or [config.default_queue]
        self.hostname = hostname or f"tasks@{socket.gethostname()}"
        multiplier = config.worker_prefetch_multiplier if prefetch_multiplier is None \
            else prefetch_multiplier
        self.prefetch_count = self.concurrency * multiplier
        self.max_tasks_per_child = max_tasks_per_child or config.worker_max_tasks_per_child
        self.connection: Connection = broker_connection(
            state.broker_url, config.transport_options, config.broker_connection_timeout,
            heartbeat=config.broker_heartbeat)
        self.pool: Pool = pool_cls(
            self._run_job, self.concurrency, max_tasks_per_child=self.max_tasks_per_child,
            on_child_start=self._child_init, flush=state.backend.flush,
            # jobs queued ahead of the processes: the prefetch (at least two per process)
            depth=max(self.prefetch_count, 2 * self.concurrency) if self.prefetch_count
            else 4 * self.concurrency)
        self.revokes = Revokes(state, self.hostname)
        self.settler = Settler(self.connection)
        self.dispatcher = Dispatcher(state, self.pool, self.revokes, self.settler.settle,
                                     self.queues)
        self.consumer = Consumer(state, self.queues, self.revokes, self.settler,
                                 self.dispatcher.receive, sender=self)
        self.leases = LeaseKeeper()
        self._channel: WorkerChannel = self.settler.channel
        self._consumers: list[KombuConsumer] = []
        self._warm = False
        self._cold = False
        self.housekeeping = Housekeeping(state, self.queues, self.connection)
        self._dead_lettered_before = 0  # by channels of earlier connections
        self._ready_sent = False  # worker_ready is sent once, not on every reconnect
        self._live: Connection | None = None  # the connection consuming now, if any
        self._last_keep_alive = 0.0
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
    def get_consumers(self, consumer_cls: Callable[..., KombuConsumer],
                      channel: Any) -> list[KombuConsumer]:
        channel.basic_qos(0, self.prefetch_count, False)
        queues = [self.state.router.queue(name) for name in self.queues]
        if is_amqp(self.connection):
            # RabbitMQ keeps delayed messages on a ladder of queues: bind our queues
            # to its end (imported for RabbitMQ only: py-amqp). The ladder itself is
            # declared by whoever first sends a delayed message down it.
            from ..transport.amqp import bind_queue

            try:
                for queue in queues:
                    queue(channel).declare()
                    bind_queue(channel, queue)
            except Exception as exc:  # a queue that exists with other arguments
                reason = declaration_refused(exc)
                if reason is None:
                    raise
                logger.critical("%s", reason)  # retrying would fail the same way
                raise SystemExit(EX_CONFIG) from None
        # ConsumerMixin hands us a Consumer class with the channel already bound.
        self._consumers = [consumer_cls(queues=queues, on_message=self.consumer.on_message,
                                        no_ack=False, accept=None)]
        return self._consumers

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        # kombu calls this, not on_message, for a body it cannot decompress.
        self.consumer.on_decode_error(message, exc)

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        if self._warm:  # asked to stop while the broker is away: stop now
            logger.warning("Stopping without a broker connection (%s).", exc)
            raise SystemExit(EX_OK)
        logger.warning("Cannot connect to %s (%s); trying again in %.1f s.",
                       mask_url(self.state.broker_url), str(exc).rstrip("."), interval)

    @contextmanager
    def establish_connection(self) -> Iterator[Connection]:
        """kombu's, except that a broker refusing our credentials or virtual host stops
        the worker with a one-line reason (exit status 78) instead of retrying forever."""
        with self.create_connection() as conn:
            try:
                conn.ensure_connection(self.on_connection_error, self.connect_max_retries)
            except Exception as exc:
                reason = login_refused(exc, self.state.broker_url)
                if reason is None:
                    raise
                logger.critical("%s", reason)
                raise SystemExit(EX_CONFIG) from None
            yield conn

    def on_connection_revived(self) -> None:
        # Messages that waited in the worker cannot be acked over the old
        # connection any more; the broker redelivers the unacknowledged ones.
        self.dispatcher.buffer.clear()

    @contextmanager
    def extra_context(self, connection: Any, channel: Any) -> Iterator[None]:
        """Around consuming on one connection: settle over its channel; when it is lost, detach."""
        self._dead_lettered_before += self._channel.dead_lettered  # the lost connection's
        self._channel = self.settler.attach(channel)
        self._channel.node_name = self.hostname  # written into the dead letters it sets aside
        self._channel.queue_type = self.state.config.default_queue_type
        self._live = connection
        try:
            yield
        except connection.connection_errors + connection.channel_errors:
            if self._channel.settles_by_tag:  # else the broker redelivers what was unacked
                self.settler.detach(self.dispatcher.take_waiting(), self.dispatcher.running())
            else:
                # The broker (RabbitMQ) delivers again every message this connection had
                # not acknowledged: jobs queued in the pool must not start as well.
                self.pool.skip_queued()
            raise
        finally:
            self._live = None
            self.leases.stop()

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any,
                         **kwargs: Any) -> None:
        self.leases.start(self._channel)
        self.revokes.refresh()
        if not self._ready_sent:
            self._ready_sent = True
            logger.info("%s ready.", self.hostname)
            send_robust(worker_ready, self)

    def on_iteration(self) -> None:
        dispatcher, pool, channel = self.dispatcher, self.pool, self._channel
        self._keep_alive()
        dispatcher.complete(pool.collect(0))
        dispatcher.dispatch()
        dispatcher.ack_started()
        self.settler.settle_detached()
        # Wait on the pool, not the broker, while nothing more can be taken:
        # the pool is full with messages waiting, or the prefetch limit is
        # reached (acknowledging started jobs frees it).
        while not self._warm and pool.busy() and (
                (dispatcher.buffer and pool.free() == 0) or not channel.can_consume()):
            dispatcher.complete(pool.collect(0.05))
            self._keep_alive()
            self.revokes.refresh_if_due(time.monotonic())
            dispatcher.dispatch()
            dispatcher.ack_started()
        channel.flush_acks()
        if self._warm:
            self._drain_for_shutdown()
            return
        now = time.monotonic()
        self.revokes.refresh_if_due(now)
        self.housekeeping.run_due(channel, now)

    def _keep_alive(self) -> None:
        """RabbitMQ with heartbeats: read what the broker sent (its heartbeats) and send
        ours when due, also while the loop waits on the pool rather than the broker."""
        live = self._live
        if live is None or not live.heartbeat:
            return
        now = time.monotonic()
        if now - self._last_keep_alive < KEEP_ALIVE_INTERVAL:
            return
        self._last_keep_alive = now
        try:
            live.drain_events(timeout=0)  # consumers deliver into the buffer, as always
        except TimeoutError:
            pass
        live.heartbeat_check(rate=2)

    @property
    def dead_lettered(self) -> int:
        """Broker entries this worker set aside as dead letters since it started."""
        return self._dead_lettered_before + self._channel.dead_lettered

    def _drain_for_shutdown(self) -> None:
        for consumer in self._consumers:
            try:
                consumer.cancel()
            except Exception:
                pass
        self.dispatcher.requeue_waiting()
        self.pool.begin_shutdown()
        while self.pool.busy() and not self._cold:
            self.dispatcher.complete(self.pool.collect(0.5))
            self._keep_alive()
        self.settler.settle_detached()
        self._channel.flush_acks(0.0)
        self.should_stop = True

    # -- lifecycle ---------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """First SIGINT/SIGTERM: warm shutdown; second: cold."""
        def handler(signum: int, frame: Any) -> None:
            if not self._warm and self._live is None and not self.pool.busy():
                # Not connected (the broker is away, or refuses us): nothing to finish.
                logger.warning("worker: Stopping (%s) without a broker connection.",
                               signal.Signals(signum).name)
                self._warm = True
                raise SystemExit(EX_OK)
            if not self._warm:
                logger.warning("worker: Warm shutdown (%s): finishing %d running task(s); "
                               "press Ctrl-C again for a cold shutdown.",
                               signal.Signals(signum).name, len(self.pool.started()))
                self._warm = self.dispatcher.stopping = True
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
            if self.dead_lettered:
                logger.warning("%d broker entr%s set aside as dead letters while this worker "
                               "ran: see `flask tasks dead-letters list`.", self.dead_lettered,
                               "y was" if self.dead_lettered == 1 else "ies were")
            send_robust(worker_shutdown, self)
            try:
                self.connection.release()
            except Exception:
                pass
        return self.exit_code


def _pool_class(pool: str | type[Pool]) -> type[Pool]:
    if not isinstance(pool, str):
        return pool
    if pool not in POOLS:
        raise ValueError(f"Unknown pool {pool!r}; choose one of {sorted(POOLS)}")
    return POOLS[pool]
