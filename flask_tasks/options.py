"""The options of a task and of a call, declared once, and the one fallback rule.

:class:`CallOptions` declares what ``apply_async`` and ``Tasks.send_task``
accept (a ``TypedDict``, so mypy checks the keyword names and types of every
call), :class:`RetryOptions` the same without ``countdown`` and ``eta`` for
``Task.retry``; canvas signatures carry the same keys in their ``options``.
:data:`TASK_OPTIONS` names what ``@tasks.task(...)`` accepts.

Every option falls back the same way: the call's value, else the task's
attribute of the same name, else the app's ``TASKS_*`` setting; ``None``
means "not given". :func:`resolve` applies that rule once per call and gives
a :class:`ResolvedOptions` that builds the message; :func:`time_limits` is the
same rule for the limits a worker enforces (the message's, else the task's,
else the worker's).
"""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol, TypedDict, TypeVar

from .config import Config
from .protocol import Context, Message, build, to_datetime

T = TypeVar("T")

#: Options ``@tasks.task(...)`` accepts, with Celery's names.
TASK_OPTIONS = frozenset({
    "name", "bind", "base", "ignore_result", "acks_late", "track_started", "queue",
    "priority", "serializer", "compression", "max_retries", "default_retry_delay",
    "autoretry_for", "dont_autoretry_for", "retry_backoff", "retry_backoff_max",
    "retry_jitter", "retry_kwargs", "rate_limit", "time_limit", "soft_time_limit",
    "expires", "throws", "reject_on_worker_lost", "typing",
})


class RetryOptions(TypedDict, total=False):
    """:class:`CallOptions` but ``countdown`` and ``eta``, which :meth:`Task.retry` names itself."""

    #: Seconds from now, a timedelta or a datetime after which the task is not
    #: run (it ends REVOKED). Default: the task's ``expires``.
    expires: float | timedelta | datetime | None
    #: Queue name. Default: the task's, then ``TASKS_ROUTES``, then ``TASKS_DEFAULT_QUEUE``.
    queue: str | None
    #: Message priority, 0-9 (broker support varies). Default: the task's,
    #: then ``TASKS_DEFAULT_PRIORITY``.
    priority: int | None
    #: The id to use. Default: a new UUID4.
    task_id: str | None
    #: Signature(s) to call with the result on success.
    link: Any
    #: Signature(s) to call on failure.
    link_error: Any
    #: Retry publishing on connection errors. Default: ``TASKS_PUBLISH_RETRY``.
    retry: bool | None
    #: kombu retry policy (``max_retries``, ``interval_start``, ``interval_step``,
    #: ``interval_max`` seconds), over ``TASKS_PUBLISH_RETRY_POLICY``.
    retry_policy: Mapping[str, Any] | None
    #: Message serializer. Default: the task's, then ``TASKS_SERIALIZER``.
    serializer: str | None
    #: Body compression (``gzip``, ``zlib``, ``bzip2``...). Default: the
    #: task's, then ``TASKS_COMPRESSION``.
    compression: str | None
    #: Extra message headers (they cannot replace the protocol's own).
    headers: Mapping[str, Any] | None
    #: Store no result for this call. Default: the task's, then ``TASKS_IGNORE_RESULT``.
    ignore_result: bool | None
    #: Hard and soft time limits for this call, seconds. Default: the task's
    #: (the worker applies ``TASKS_TIME_LIMIT`` / ``TASKS_SOFT_TIME_LIMIT``).
    time_limit: float | None
    soft_time_limit: float | None
    # Set by retries and the canvas rather than in everyday calls.
    #: How many times this task ran before (``request.retries``).
    retries: int
    #: The first task of the workflow. Default: the running task's root, else this task.
    root_id: str | None
    #: The task that sent this one. Default: the running task, if any.
    parent_id: str | None
    group_id: str | None
    group_index: int | None
    chain: list[Any] | None
    chord: Any
    #: Where the worker sends the task's states (``rpc://``). Default: this
    #: process's reply queue when RESULT_BACKEND is ``rpc://``, else none.
    reply_to: str | None


class CallOptions(RetryOptions, total=False):
    """The options of one call, all optional; ``None`` means "not given".

    Used as ``**options: Unpack[CallOptions]`` by :meth:`Task.apply_async`
    and :meth:`Tasks.send_task`; see each key below.
    """

    #: Run no earlier than this many seconds from now.
    countdown: float | None
    #: Run no earlier than this datetime (naive means UTC).
    eta: datetime | None


#: The keys of :class:`CallOptions`.
CALL_OPTIONS: frozenset[str] = CallOptions.__optional_keys__


class TaskDefaults(Protocol):
    """The task attributes a call falls back on (a :class:`~flask_tasks.Task` has them all)."""

    @property
    def serializer(self) -> str | None: ...
    @property
    def compression(self) -> str | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def queue(self) -> str | None: ...
    @property
    def expires(self) -> float | datetime | None: ...
    @property
    def ignore_result(self) -> bool | None: ...
    @property
    def time_limit(self) -> float | None: ...
    @property
    def soft_time_limit(self) -> float | None: ...


@dataclass(frozen=True)
class _NoTask:
    """The defaults of a task that is not known here (sent by name): none."""

    serializer: str | None = None
    compression: str | None = None
    priority: int | None = None
    queue: str | None = None
    expires: float | datetime | None = None
    ignore_result: bool | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None


_NO_TASK = _NoTask()


def first(*values: T | None, default: T) -> T:
    """The first of ``values`` that is not None, else ``default``.

    The fallback rule: ``first(call, task, default=config)``.
    """
    for value in values:
        if value is not None:
            return value
    return default


def check_task_options(options: Mapping[str, Any], where: str) -> None:
    """Refuse ``@tasks.task(...)`` options :data:`TASK_OPTIONS` does not name.

    :param where: the function's name, for the message.
    :raises TypeError: an unknown option; the message names it and the known ones.
    """
    unknown = set(options) - TASK_OPTIONS
    if unknown:
        raise TypeError(f"Unknown task option(s) {sorted(unknown)} for {where}; "
                        f"known options: {sorted(TASK_OPTIONS)}.")


def check_call_options(options: Mapping[str, Any]) -> None:
    """Refuse options :class:`CallOptions` does not declare.

    :raises TypeError: an unknown option; the message names it (and the
        option it probably meant).
    """
    unknown = sorted(options.keys() - CALL_OPTIONS)
    if unknown:
        meant = [match for name in unknown
                 for match in difflib.get_close_matches(name, CALL_OPTIONS, n=1)]
        hint = f" (did you mean {', '.join(map(repr, meant))}?)" if meant else ""
        raise TypeError(f"Unknown apply_async option(s): {unknown}{hint}")


class ResolvedOptions(NamedTuple):
    """One call's options after "call, else task, else config": what is built and published.

    Immutable (a named tuple: it is made for every message, and builds faster than
    a frozen dataclass).
    """

    task_id: str
    serializer: str
    compression: str | None
    priority: int | None
    #: The call's or the task's queue; None: the router decides (routes, then the default).
    queue: str | None
    eta: datetime | None
    expires: datetime | None
    time_limit: float | None
    soft_time_limit: float | None
    ignore_result: bool
    #: Whether and how to retry publishing.
    retry: bool
    retry_policy: dict[str, Any]
    headers: Mapping[str, Any] | None = None
    callbacks: list[Any] | None = None
    errbacks: list[Any] | None = None
    retries: int = 0
    root_id: str | None = None
    parent_id: str | None = None
    group_id: str | None = None
    group_index: int | None = None
    chain: list[Any] | None = None
    chord: Any = None
    #: The call's ``reply_to``; None: the backend's (:meth:`Backend.on_task_call`).
    reply_to: str | None = None

    def message(self, name: str, args: Sequence[Any] | None,
                kwargs: Mapping[str, Any] | None, reply_to: str = "") -> Message:
        """Build and encode the task message for this call.

        :param reply_to: the message's ``reply_to`` property.

        :raises flask_tasks.exceptions.EncodeError: the serializer cannot encode the arguments.
        :raises ValueError: ``headers`` would replace protocol headers.
        """
        return build(
            name, self.task_id, args, kwargs, serializer=self.serializer, root_id=self.root_id,
            parent_id=self.parent_id, group_id=self.group_id, group_index=self.group_index,
            retries=self.retries, eta=self.eta, expires=self.expires,
            time_limit=self.time_limit, soft_time_limit=self.soft_time_limit,
            callbacks=self.callbacks, errbacks=self.errbacks, chain=self.chain,
            chord=self.chord, ignore_result=self.ignore_result, extra_headers=self.headers,
            reply_to=reply_to,
        )


def resolve(options: CallOptions, task: TaskDefaults | None, config: Config,
            parent: Context | None = None) -> ResolvedOptions:
    """Resolve one call's options: the call's, else the task's, else the app's setting.

    :param options: the call's options.
    :param task: the task (``None``: sent by name, no task defaults).
    :param config: the app's settings.
    :param parent: the request of the task running in this context, if any
        (it becomes the parent, and gives the root).
    :raises TypeError: an option :class:`CallOptions` does not declare.
    """
    check_call_options(options)
    call = options
    t: TaskDefaults = task if task is not None else _NO_TASK  # the task's defaults
    sender = parent if parent is not None and not parent.called_directly else None
    countdown = call.get("countdown")
    policy = dict(config.publish_retry_policy)
    policy.update(call.get("retry_policy") or {})
    return ResolvedOptions(
        task_id=call.get("task_id") or str(uuid.uuid4()),
        serializer=first(call.get("serializer"), t.serializer, default=config.serializer),
        compression=first(call.get("compression"), t.compression, default=config.compression),
        priority=first(call.get("priority"), t.priority, default=config.default_priority),
        queue=first(call.get("queue"), t.queue, default=None),
        eta=to_datetime(countdown) if countdown is not None else to_datetime(call.get("eta")),
        expires=to_datetime(first(call.get("expires"), t.expires, default=None)),
        time_limit=first(call.get("time_limit"), t.time_limit, default=None),
        soft_time_limit=first(call.get("soft_time_limit"), t.soft_time_limit, default=None),
        ignore_result=bool(first(call.get("ignore_result"), t.ignore_result,
                                 default=config.ignore_result)),
        retry=first(call.get("retry"), default=config.publish_retry),
        retry_policy=policy,
        headers=call.get("headers"),
        callbacks=as_list(call.get("link")),
        errbacks=as_list(call.get("link_error")),
        retries=call.get("retries", 0),
        root_id=call.get("root_id") or ((sender.root_id or sender.id) if sender else None),
        parent_id=call.get("parent_id") or (sender.id if sender else None),
        group_id=call.get("group_id"),
        group_index=call.get("group_index"),
        chain=call.get("chain"),
        chord=call.get("chord"),
        reply_to=call.get("reply_to"),
    )


def retry_options(request: Context, retries: int, countdown: float | None,
                  eta: datetime | None, options: RetryOptions) -> CallOptions:
    """The options of a retry of ``request``: its id, expiry, limits, root and parent, its queue.

    :param retries: the retry's ``request.retries``.
    :param options: the options given to ``retry()``; ``queue`` replaces the
        queue the message came from.
    :raises TypeError: ``options`` sets one that the retry sets itself.
    """
    hard, soft = request.timelimit
    again: RetryOptions = {
        "task_id": request.id, "retries": retries, "expires": request.expires,
        "time_limit": hard, "soft_time_limit": soft,
        "root_id": request.root_id, "parent_id": request.parent_id,
        "reply_to": request.reply_to or "",  # the states still go to the first caller
    }
    clash = sorted(again.keys() & options.keys())
    if clash:
        raise TypeError(f"retry() got multiple values for the option(s) {clash}")
    again["queue"] = (request.delivery_info or {}).get("routing_key") or None
    again.update(options)
    return {**again, "countdown": countdown, "eta": eta}


def time_limits(task: TaskDefaults, timelimit: Any,
                config: Config) -> tuple[float | None, float | None]:
    """(hard, soft) seconds for a call: the message's, else the task's, else the worker's.

    Never raises for the message's value: a header that is not ``[hard, soft]``
    with numbers of seconds >= 0 counts as not set (the worker refuses such a
    message before it gets here: :func:`~flask_tasks.protocol.read_headers`).

    :param timelimit: the message's ``timelimit`` header, ``[hard, soft]`` (may be None).
    :returns: ``None`` for a limit nobody set.
    """
    hard, soft = timelimit if isinstance(timelimit, (list, tuple)) and len(timelimit) == 2 \
        else (None, None)
    hard, soft = _seconds(hard), _seconds(soft)
    hard = first(hard, task.time_limit, config.time_limit, default=None)
    soft = first(soft, task.soft_time_limit, config.soft_time_limit, default=None)
    return (float(hard) if hard is not None else None, float(soft) if soft is not None else None)


def _seconds(value: Any) -> float | None:
    """A message's time limit as seconds; None unless a number >= 0 (NaN is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if seconds >= 0 else None


def as_list(value: Any) -> list[Any] | None:
    """``link`` / ``link_error`` as a list of signature dicts (None: none)."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("task"), str):
            raise TypeError(f"link= and link_error= take signatures (add.s(), "
                            f"signature('name')), not {type(item).__name__}: {item!r:.100}")
    return [item if isinstance(item, dict) else dict(item) for item in items]
