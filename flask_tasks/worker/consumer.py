"""The broker side of the worker: check each message, settle it.

- :class:`Consumer` checks each delivered message cheaply (content type,
  the type of every protocol-2 header it relies on, a registered task, not
  revoked, due) and hands it on, or refuses it: a logged reason naming the
  task and id, FAILURE stored for the id, the message rejected or, with
  ``TASKS_DEAD_LETTER_REJECTED``, set aside as a dead letter. No message
  content makes it raise. The body is decoded where the task runs (and here too with
  ``TASKS_DEAD_LETTER_REJECTED``, so a bad body is set aside before anything
  acknowledges it). A message that came before its ``eta`` goes back to the
  broker's delayed store.
- :class:`Settler` acknowledges, requeues, rejects or sets aside messages. When the
  connection is lost, on a transport that settles by tag (Redis), it keeps
  what the lost channel owes and settles it over the next connection, so
  tasks still running in the pool are not delivered twice.

What each needs from the transport is
:class:`~flask_tasks.transport.base.WorkerChannel`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from kombu.connection import Connection
from kombu.message import Message

from .. import states
from ..app_state import AppState
from ..exceptions import NotRegistered, WorkerLostError
from ..protocol import (
    BadMessage,
    TaskHeaders,
    check_content,
    describe,
    message_ids,
    parse,
    read_headers,
)
from ..registry import unknown_task_message
from ..signals import send_robust, task_received
from ..transport.base import Detached, PlainChannel, WorkerChannel, worker_channel
from ..transport.delays import strip_delay
from .executor import ACK, REJECT, REQUEUE, label, refusal
from .revokes import Revokes

logger = logging.getLogger("flask_tasks.worker")

#: Takes a checked message: ``receive(message, acks_late, again_if_lost)``.
Receive = Callable[[Message, bool, bool], None]

#: A settle action beside ACK, REQUEUE and REJECT: set the message aside as a
#: dead letter with the reason (rejected if the broker keeps no dead letters).
DEAD_LETTER = "dead-letter"

#: Pickle's content type: never decoded in the worker's main process.
PICKLE = "application/x-python-serialize"

#: Longest id a log line shows, characters.
_MAX_SHOWN = 200


def message_id(message: object) -> str:
    """What a log line calls a message: its task id, else correlation id, else delivery tag.

    Never raises, whatever the message holds (at most 200 characters).
    """
    task_id = message_ids(getattr(message, "headers", None))[1]
    if task_id is not None:
        return task_id[:_MAX_SHOWN]
    properties = getattr(message, "properties", None)
    correlation = properties.get("correlation_id") if isinstance(properties, dict) else None
    if isinstance(correlation, str) and correlation:
        return correlation[:_MAX_SHOWN]
    tag = getattr(message, "delivery_tag", None)
    return str(tag)[:_MAX_SHOWN] if isinstance(tag, (str, int)) else "(no id)"


def routing_key(message: Message) -> str | None:
    """The routing key a message was sent with (None: none, or not a string).

    A message that came through RabbitMQ's delay ladder is delivered with the
    delay's binary digits in front of it: they are dropped.
    """
    info = message.delivery_info
    key = info.get("routing_key") if isinstance(info, Mapping) else None
    return strip_delay(key) or None if isinstance(key, str) and key else None


def _peek(body: object) -> str:
    """The start of a body, for a log line (200 characters at most)."""
    if isinstance(body, (bytes, str)):
        return repr(body[:_MAX_SHOWN])[:_MAX_SHOWN]
    return describe(body)


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

    def settle(self, message: Message, action: str, reason: str | None = None) -> None:
        """``ACK``, ``REQUEUE``, ``DEAD_LETTER`` or (any other action) reject ``message``.

        :param reason: why a ``DEAD_LETTER`` is set aside (kept with it).
        """
        if message.channel is not self._kombu_channel and self._by_tag:
            # Delivered on a lost connection: settled by tag over this one (a
            # dead letter cannot be: it is dropped, as a rejected message is).
            tags = self.detached.requeue if action == REQUEUE else self.detached.acks
            tags.append(message.delivery_tag)
            return
        try:
            if action == ACK:
                message.ack()
            elif action == REQUEUE:
                message.requeue()
            elif action == DEAD_LETTER:
                self._dead_letter(message, reason or "rejected")
            else:
                message.reject(requeue=False)
        except self.connection.connection_errors + self.connection.channel_errors as exc:
            logger.warning("Could not %s message %s (connection lost: %s); the broker will "
                           "redeliver it if it was unacknowledged.", action,
                           message_id(message), exc)

    def _dead_letter(self, message: Message, reason: str) -> None:
        """Set ``message`` aside as a dead letter; reject it if the broker keeps none."""
        try:
            if self.channel.dead_letter(message, reason):
                return
        except self.connection.connection_errors + self.connection.channel_errors:
            raise
        except Exception:
            logger.exception("Could not set message %s aside as a dead letter; rejecting it",
                             message_id(message))
        if not message.acknowledged:
            message.reject(requeue=False)

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
        """Check a message, then hand it on, or refuse it with a logged reason.

        A refused message is rejected, or set aside as a dead letter with
        ``TASKS_DEAD_LETTER_REJECTED``; FAILURE with the reason is stored for
        its task id when the headers give one (not for a content type
        ``TASKS_ACCEPT_CONTENT`` does not accept). Nothing a message holds
        makes this raise: only the broker's connection errors get through
        (kombu reconnects), and what the pool or dispatcher raises.
        """
        try:
            checked = self._check(message)
        except self._broker_errors():
            raise
        except Exception as exc:  # a check of ours failed: refuse the message, keep the worker
            logger.exception("Internal error checking message %s", message_id(message))
            if not message.acknowledged:
                name, task_id = message_ids(message.headers)
                self._refuse(message, f"the worker could not check it ({exc!r:.200})", name,
                             task_id)
            return
        if checked is not None:
            acks_late, again_if_lost = checked
            self.receive(message, acks_late, again_if_lost)

    def on_decode_error(self, message: object, exc: Exception) -> None:
        """Refuse a message kombu could not make readable, as :meth:`on_message` would.

        kombu calls this instead of ``on_message`` when it cannot decompress
        the body as its ``compression`` header says (or cannot re-encode a
        text body). A raw entry kombu could not even make a message of is
        only logged: the transport's own checks are there for that.
        """
        if not isinstance(message, Message):
            logger.error("A broker entry kombu cannot read was dropped: %s",
                         str(exc)[:_MAX_SHOWN])
            return
        try:
            name, task_id = message_ids(message.headers)
            if self._refused_content_type(message, name, task_id):
                return
            try:
                headers = read_headers(message.headers)
            except BadMessage as bad:
                reason = str(bad)
            else:
                reason = (f"the body does not decompress as {headers.compression!r} "
                          f"({str(exc)[:_MAX_SHOWN]})" if headers.compression
                          else f"the body cannot be read ({str(exc)[:_MAX_SHOWN]})")
            self._refuse(message, reason, name, task_id)
        except self._broker_errors():
            raise
        except Exception:
            logger.exception("Internal error refusing message %s", message_id(message))

    def _broker_errors(self) -> tuple[type[BaseException], ...]:
        connection = self.settler.connection
        return tuple(connection.connection_errors) + tuple(connection.channel_errors)

    def _check(self, message: Message) -> tuple[bool, bool] | None:
        """Check ``message``: ``(acks_late, again_if_lost)`` to hand it on, None if settled here."""
        name, task_id = message_ids(message.headers)
        if self._refused_content_type(message, name, task_id):
            return None
        try:
            headers = read_headers(message.headers)
            problem = check_content(message.content_type, message.content_encoding)
            if problem:
                raise BadMessage(problem, headers.id, headers.task)
        except BadMessage as exc:
            self._refuse(message, str(exc), exc.name, exc.task_id)
            return None
        name, task_id = headers.task, headers.id
        task = self.state.get_task(name)
        config = self.state.config
        if task is None:
            text = unknown_task_message(name, len(self.state.task_names()))
            self._refuse(message, text, name, task_id, failure=NotRegistered(text))
            return None
        if config.dead_letter_rejected and message.content_type != PICKLE:
            # Decoded here too, so that a bad body is set aside before a pool
            # slot acknowledges the message (pickle runs code: only in the pool).
            try:
                parse(message.headers, message.body, message.content_type,
                      message.content_encoding, self.state.accept)
            except BadMessage as exc:
                self._refuse(message, str(exc), name, task_id)
                return None
        if task_id in self.revokes.ids:
            self.settler.settle(message, ACK)
            self.revokes.report(name, task_id, False, message)
            return None
        delivered = message.headers.get("x-delivery-count")  # RabbitMQ quorum queues
        if type(delivered) is int and delivered >= config.quorum_delivery_limit:
            text = (f"delivered {delivered} times without being acknowledged (its worker was "
                    f"killed or lost its connection each time), so it is not run again "
                    f"(TASKS_QUORUM_DELIVERY_LIMIT={config.quorum_delivery_limit})")
            self._refuse(message, text, name, task_id, failure=WorkerLostError(text))
            return None
        if self._delay(message, headers):
            return None
        logger.info("Task %s[%s] received", name, task_id)
        acks_late = task.acks_late if task.acks_late is not None else config.acks_late
        track = task.track_started if task.track_started is not None else config.track_started
        ignore = task.ignore_result if task.ignore_result is not None else config.ignore_result
        if track and not (ignore or headers.ignore_result) and not self.state.backend.disabled:
            try:
                self.state.backend.store_result(task_id, None, states.RECEIVED,
                                                reply_to=message.properties.get("reply_to"))
            except Exception:  # informational: the task still runs
                logger.exception("Could not store the reception of task %s[%s]", name, task_id)
        send_robust(task_received, self.sender, request=message.headers)
        again = task.reject_on_worker_lost if task.reject_on_worker_lost is not None \
            else config.reject_on_worker_lost
        return acks_late, acks_late and again

    def _refused_content_type(self, message: Message, name: str | None,
                              task_id: str | None) -> bool:
        """Refuse a message whose content type is not accepted (never decoded; FAILURE stored)."""
        content_type = message.content_type
        accept = self.state.accept
        if not accept or not (content_type is None or isinstance(content_type, str)) \
                or content_type in accept:
            return False  # accepted, or not a string: check_content's to refuse
        self._refuse(message, f"content type {content_type!r} is not accepted (accepted: "
                     f"{', '.join(sorted(self.state.config.accept_content))}; see "
                     f"TASKS_ACCEPT_CONTENT).", name, task_id)
        return True

    def _refuse(self, message: Message, reason: str, name: str | None, task_id: str | None,
                *, store: bool = True, failure: BaseException | None = None) -> None:
        """Refuse a message for its content: log, store FAILURE, reject or set it aside.

        :param reason: why, for a person (the log line, the dead letter).
        :param name: its task name, if readable.
        :param task_id: its task id, if readable: FAILURE is stored for it.
        :param store: store FAILURE for ``task_id``.
        :param failure: the error stored (default: a ``DecodeError`` with the reason).
        """
        if task_id is not None:
            logger.error("Rejected %s: %s", label(name, task_id), reason)
        else:
            logger.error("Rejected message %s%s: %s. Body: %s", message_id(message),
                         f" (task {name})" if name else "", reason, _peek(message.body))
        if store and task_id is not None:
            error = failure if failure is not None else refusal(BadMessage(reason))
            try:
                self.state.backend.store_result(task_id, error, states.FAILURE, str(error),
                                                reply_to=message.properties.get("reply_to"))
            except Exception:
                logger.exception("Could not store the failure of %s", task_id)
        action = DEAD_LETTER if self.state.config.dead_letter_rejected else REJECT
        self.settler.settle(message, action, reason)

    def _delay(self, message: Message, headers: TaskHeaders) -> bool:
        """Send a message that came before its ``eta`` back to the broker's delayed store.

        :returns: True if it went back (and was acknowledged here).
        """
        eta = headers.eta
        if eta is None or eta.timestamp() <= time.time() + 0.05:
            return False
        queue = routing_key(message) or self.queues[0]
        if not self.settler.channel.schedule(message, queue):
            if not self._warned_eta:
                self._warned_eta = True
                logger.warning("This broker keeps no delayed messages: tasks with an eta or "
                               "countdown run as soon as they arrive (Redis and the embedded "
                               "broker wait for the eta).")
            return False
        self.settler.settle(message, ACK)
        logger.info("Task %s[%s] is due at %s: kept on the broker until then",
                    headers.task, headers.id, eta.isoformat())
        return True
