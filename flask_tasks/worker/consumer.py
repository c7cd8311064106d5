"""The broker side of the worker: check each message, settle it, keep leases.

- :class:`Consumer` checks each delivered message cheaply (content type,
  protocol-2 headers, a registered task, not revoked, due) and hands it on,
  or rejects it with a logged reason; the body is decoded where the task
  runs. A message that came before its ``eta`` goes back to the broker's
  delayed store.
- :class:`Settler` acknowledges, requeues or rejects messages. When the
  connection is lost, on a transport that settles by tag (Redis), it keeps
  what the lost channel owes and settles it over the next connection, so
  tasks still running in the pool are not delivered twice.
- :class:`LeaseKeeper` renews a lease-holding broker's leases (embedded)
  while the main loop may be busy.

What each needs from the transport is
:class:`~flask_tasks.transport.base.WorkerChannel`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kombu.connection import Connection
from kombu.message import Message

from .. import states
from ..app_state import AppState
from ..exceptions import NotRegistered
from ..protocol import check_headers, parse_datetime
from ..registry import unknown_task_message
from ..signals import send_robust, task_received
from ..transport.base import Detached, PlainChannel, WorkerChannel, worker_channel
from .executor import ACK, REQUEUE
from .revokes import Revokes

logger = logging.getLogger("flask_tasks.worker")

#: Takes a checked message: ``receive(message, acks_late, again_if_lost)``.
Receive = Callable[[Message, bool, bool], None]


def message_id(message: Message) -> str:
    """What a log line calls a message: its task id, else correlation id, else delivery tag."""
    headers = message.headers or {}
    value = headers.get("id") if isinstance(headers, dict) else None
    return str(value or message.properties.get("correlation_id") or message.delivery_tag)


class Settler:
    """Settles messages on the broker: acknowledge, requeue or reject.

    :param connection: the worker's broker connection (its error classes).
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        #: The current connection's channel, as the worker sees it.
        self.channel: WorkerChannel = PlainChannel(None)
        self._kombu_channel: object = None
        self._by_tag = False
        #: What lost connections still owe the broker, settled over the current one.
        self.detached = Detached()

    def attach(self, channel: object) -> WorkerChannel:
        """Settle over ``channel`` (a new connection's) from now on; returns its WorkerChannel."""
        self._kombu_channel = channel
        self.channel = worker_channel(channel)
        self._by_tag = self.channel.settles_by_tag
        return self.channel

    def settle(self, message: Message, action: str) -> None:
        """``ACK``, ``REQUEUE`` or (any other action) reject ``message``."""
        if message.channel is not self._kombu_channel and self._by_tag:
            # Delivered on a lost connection: settled by tag over this one.
            tags = self.detached.requeue if action == REQUEUE else self.detached.acks
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
                           message_id(message), exc)

    def detach(self, waiting: list[Message], running: int) -> None:
        """The connection is lost: keep what its channel owes, to settle over the next one.

        Called only if the channel :attr:`~WorkerChannel.settles_by_tag`;
        without this, closing the channel would put every unacknowledged
        message back on the queue, including those still running in the pool.

        :param waiting: messages that waited in the worker: back to the queue.
        :param running: how many tasks in the pool still hold their message.
        """
        detached = self.channel.detach()
        detached.requeue += [message.delivery_tag for message in waiting]
        self.detached.merge(detached)
        waiting_count = len(detached.requeue) + len(detached.unrecorded)
        if running or waiting_count:
            logger.warning("Broker connection lost with %d task(s) in the pool and %d waiting: "
                           "the pool's tasks go on and are acknowledged once connected again; "
                           "the waiting ones go back to the queue.", running, waiting_count)

    def settle_detached(self) -> None:
        """Settle what lost connections still owe, over the current one (one round trip)."""
        if not self.detached or not self._by_tag:
            return
        detached, self.detached = self.detached, Detached()
        try:
            self.channel.settle_detached(detached)
        except BaseException:
            self.detached.merge(detached)  # tried again on the next connection
            raise
        logger.info("Settled %d message(s) of the lost broker connection (%d acked, "
                    "%d back to the queue)", len(detached.acks) + len(detached.requeue)
                    + len(detached.unrecorded), len(detached.acks),
                    len(detached.requeue) + len(detached.unrecorded))


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


class Consumer:
    """Checks each message the broker delivers, then hands it on or rejects it.

    :param state: the app's state (accepted content, tasks, settings, backend).
    :param queues: the queues consumed (the first: a message's queue when
        its delivery info names none).
    :param revokes: the revoked ids (a revoked message is dropped).
    :param settler: settles the messages dropped or put back here.
    :param receive: takes each message that passed the checks.
    :param sender: the sender of ``task_received`` (the worker).
    """

    def __init__(self, state: AppState, queues: list[str], revokes: Revokes, settler: Settler,
                 receive: Receive, sender: object) -> None:
        self.state = state
        self.queues = queues
        self.revokes = revokes
        self.settler = settler
        self.receive = receive
        self.sender = sender
        self._warned_eta = False

    def on_message(self, message: Message) -> None:
        """Check a message, then hand it on (or reject it with a reason)."""
        content_type = message.content_type
        if self.state.accept and content_type not in self.state.accept:
            logger.error("Rejected message %s: content type %r is not accepted (accepted: %s; "
                         "see TASKS_ACCEPT_CONTENT).", message_id(message), content_type,
                         ", ".join(sorted(self.state.config.accept_content)))
            message.reject(requeue=False)
            return
        try:
            name, task_id = check_headers(message.headers)
        except Exception as exc:
            logger.error("Rejected message %s: %s. Body: %.200r", message_id(message), exc,
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
        if task_id in self.revokes.ids:
            self.settler.settle(message, ACK)
            self.revokes.report(name, task_id, False, message)
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
        send_robust(task_received, self.sender, request=message.headers)
        again = task.reject_on_worker_lost if task.reject_on_worker_lost is not None \
            else config.reject_on_worker_lost
        self.receive(message, acks_late, acks_late and again)

    def _delay(self, message: Message, name: str, task_id: str) -> bool:
        """Send a message that came before its ``eta`` back to the broker's delayed store.

        :returns: True if it went back (and was acknowledged here).
        """
        eta = parse_datetime(message.headers.get("eta"))
        if eta is None or eta.timestamp() <= time.time() + 0.05:
            return False
        queue = message.delivery_info.get("routing_key") or self.queues[0]
        if not self.settler.channel.schedule(message, queue):
            if not self._warned_eta:
                self._warned_eta = True
                logger.warning("This broker keeps no delayed messages: tasks with an eta or "
                               "countdown run as soon as they arrive (Redis and the embedded "
                               "broker wait for the eta).")
            return False
        self.settler.settle(message, ACK)
        logger.info("Task %s[%s] is due at %s: kept on the broker until then",
                    name, task_id, eta.isoformat())
        return True
