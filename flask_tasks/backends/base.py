"""The result backend contract, and the encoding shared by every backend.

A stored result is Celery's *meta* mapping::

    {"task_id": str, "status": state, "result": value | exception dict | meta dict,
     "traceback": str | None, "children": [], "date_done": ISO 8601 str | None,
     # when known: "group_id", "parent_id";
     # with TASKS_RESULT_EXTENDED: "name", "args", "kwargs", "worker", "retries", "queue"}

An exception is stored as ``{"exc_type": "ZeroDivisionError", "exc_message":
[args...], "exc_module": "builtins"}`` (:func:`flask_tasks.protocol.exception_to_dict`)
and rebuilt with its own type when that type can be found in an already
imported module (:func:`flask_tasks.protocol.exception_from_dict`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kombu.serialization import dumps, loads, registry

from .. import states
from ..exceptions import DecodeError, EncodeError, ImproperlyConfigured, TimeoutError
from ..protocol import exception_to_dict
from ..result import OnMessage
from .chords import GroupStore

logger = logging.getLogger("flask_tasks.backends")

def now_iso() -> str:
    """The current UTC time as ISO 8601 (Celery's ``date_done`` format)."""
    return datetime.now(UTC).isoformat()


class Backend(GroupStore):
    """Base class of result backends.

    :param serializer: kombu serializer name for stored values (default ``json``).
    :param expires: seconds a result is kept; ``None`` keeps it forever.
    :param accept: content types allowed when decoding (default: the serializer's).
    :param always_retry: retry writes (results, revokes, ``forget``) that fail
        because the store is unreachable (:meth:`exception_safe_to_retry`),
        so a task's result survives a restart of the store (default True).
    :param max_retries: give up after this many retries (None, the default:
        never give up).
    :param base_sleep: seconds before the first retry; the wait doubles on each
        retry (with full jitter) up to ``max_sleep`` seconds (defaults 0.01, 10).

    Subclasses implement :meth:`_set`, :meth:`_get`, :meth:`_delete` and may
    override :meth:`wait_for` (when they can be woken instead of polled),
    :meth:`cleanup` (when expired results are not removed by the store itself)
    and :meth:`exception_safe_to_retry`. Groups and chords: see
    :class:`~flask_tasks.backends.chords.GroupStore`.
    """

    #: True when :meth:`wait_for` must poll (``interval`` applies).
    polls = True
    #: Seconds :meth:`wait_for` waits before its second poll; each later wait
    #: is twice the one before, up to the caller's ``interval``.
    first_poll_interval = 0.001
    #: True when the backend stores nothing (``disabled``).
    disabled = False
    #: Set by a prefork pool process: ``store_result(..., defer=True)`` may wait
    #: for :meth:`flush` (the pool flushes before it reports the jobs).
    batching = False

    def __init__(
        self,
        *,
        serializer: str = "json",
        expires: float | None = 86400.0,
        accept: set[str] | None = None,
        always_retry: bool = True,
        max_retries: int | None = None,
        base_sleep: float = 0.01,
        max_sleep: float = 10.0,
    ) -> None:
        self.serializer = serializer
        self.content_type = registry.name_to_type.get(serializer, serializer)
        self.expires = expires
        self.accept = accept if accept is not None else {self.content_type}
        self.always_retry = always_retry
        self.max_retries = max_retries
        self.base_sleep = base_sleep
        self.max_sleep = max_sleep

    # -- the storage contract ------------------------------------------------
    def _set(self, task_id: str, meta: dict[str, Any]) -> None:
        raise NotImplementedError

    def _get(self, task_id: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def _delete(self, task_id: str) -> None:
        raise NotImplementedError

    def _revoke(self, task_id: str, terminate: bool, expires: float) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot store revokes")

    # -- retrying writes -----------------------------------------------------
    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """True when ``exc`` means the store could not be reached (the write may be retried)."""
        return False

    def retrying(self, write: Callable[[], Any], what: str, *what_args: Any) -> Any:
        """Call ``write()``; while it fails with an error safe to retry, wait and call it again.

        Waits grow from :attr:`base_sleep` to :attr:`max_sleep` seconds
        (exponential, full jitter); a warning is logged on the first retry
        and on every power of two after it.

        :param what: what is being written, for the log: a ``%``-format string
            filled with ``what_args`` only when a retry is logged.
        :returns: what ``write`` returned.
        :raises Exception: ``write``'s error when it is not safe to retry, when
            :attr:`always_retry` is off, or after :attr:`max_retries` retries.
        """
        retries = 0
        while True:
            try:
                return write()
            except Exception as exc:
                if not (self.always_retry and self.exception_safe_to_retry(exc)):
                    raise
                if self.max_retries is not None and retries >= self.max_retries:
                    logger.error("Gave up writing %s after %d retries: %s",
                                 what % what_args, retries, exc)
                    raise
                retries += 1
                wait = random.uniform(0.0, min(self.max_sleep, self.base_sleep * 2 ** retries))
                if retries & (retries - 1) == 0:  # 1, 2, 4, 8...
                    logger.warning("Writing %s failed (%s: %s); retry %d in %.2f s",
                                   what % what_args, type(exc).__name__, exc, retries, wait)
                time.sleep(wait)

    # -- encoding ------------------------------------------------------------
    def encode(self, value: Any) -> bytes:
        """Serialize ``value`` with the result serializer.

        :raises EncodeError: the serializer cannot encode it.
        """
        try:
            _, _, data = dumps(value, serializer=self.serializer)
        except Exception as exc:
            raise EncodeError(
                f"The result cannot be encoded with the {self.serializer!r} result "
                f"serializer: {exc}. Return only values it supports (for JSON: str, int, "
                f"float, bool, None, list, dict)."
            ) from exc
        return data.encode("utf-8") if isinstance(data, str) else data

    def decode(self, data: bytes | str) -> Any:
        """Deserialize a stored value.

        :raises DecodeError: the value is not valid for the serializer.
        """
        try:
            return loads(data, self.content_type, "utf-8", accept=self.accept)
        except Exception as exc:
            raise DecodeError(f"A stored result cannot be decoded: {exc}") from exc

    def make_meta(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        extended: bool = False,
    ) -> dict[str, Any]:
        """Build Celery's meta mapping for a state change (exceptions encoded)."""
        if isinstance(result, BaseException):
            result = exception_to_dict(result)
        meta: dict[str, Any] = {
            "status": state,
            "result": result,
            "traceback": traceback,
            # What the task sent (link callbacks, the chain's next step), as Celery's
            # result tuples; set by the worker on the request (``request.children``).
            "children": [child.as_tuple() for child in getattr(request, "children", None)
                         or ()],
            "date_done": now_iso() if state in states.READY_STATES else None,
            "task_id": task_id,
        }
        if request is not None:
            if getattr(request, "group", None):
                meta["group_id"] = request.group
            if getattr(request, "parent_id", None):
                meta["parent_id"] = request.parent_id
            if extended:
                meta.update(
                    name=request.task,
                    args=request.args,
                    kwargs=request.kwargs,
                    worker=request.hostname,
                    retries=request.retries,
                    queue=(request.delivery_info or {}).get("routing_key"),
                )
        return meta

    # -- public API ----------------------------------------------------------
    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        extended: bool = False,
        defer: bool = False,
        reply_to: str | None = None,
    ) -> None:
        """Store ``state`` and ``result`` (a value, an exception or a meta dict).

        :param defer: the write may wait for :meth:`flush` when :attr:`batching`
            is on (the worker uses it for final states only, never for progress).
        :param reply_to: the task message's ``reply_to`` property, when no
            ``request`` is given: where ``rpc://`` sends the state (other
            backends ignore it).
        :raises EncodeError: ``result`` cannot be encoded; nothing is stored.
        """
        meta = self.make_meta(task_id, result, state, traceback, request, extended)
        if defer and self.batching:
            self._defer(task_id, meta)
        else:
            self.retrying(lambda: self._set(task_id, meta), "the %s result of %s", state, task_id)

    def _defer(self, task_id: str, meta: dict[str, Any]) -> None:
        """Queue a write for :meth:`flush` (backends that cannot batch write now)."""
        self.retrying(lambda: self._set(task_id, meta), "the %s result of %s",
                      meta["status"], task_id)

    def flush(self) -> None:
        """Write what :meth:`store_result` deferred, in as few round trips as possible.

        Retried like every write; what could not be written stays queued.
        """

    def on_task_call(self, task_id: str) -> str:
        """Called for each task message this process sends, before it is sent.

        :returns: the message's ``reply_to``: ``""`` except where results come
            back to the caller (``rpc://``: this process's reply queue, declared
            on the first call).
        """
        return ""

    def get_task_meta(self, task_id: str) -> dict[str, Any]:
        """Return the stored meta, or a PENDING meta for an unknown id."""
        meta = self._get(task_id)
        if meta is None:
            return {"status": states.PENDING, "result": None, "traceback": None,
                    "children": [], "date_done": None, "task_id": task_id}
        return meta

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        on_message: OnMessage | None = None,
    ) -> dict[str, Any]:
        """Block until the task is ready and return its meta, by polling.

        The first wait between polls is :attr:`first_poll_interval`; each
        later one doubles, up to ``interval``. A state change (``STARTED``,
        progress) starts the waits over.

        :param timeout: seconds to wait at most (None: forever).
        :param interval: the longest wait between polls, seconds.
        :param on_message: called with each meta seen whose state changed.
        :raises TimeoutError: not ready within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_state = None
        wait = min(self.first_poll_interval, interval)
        while True:
            meta = self.get_task_meta(task_id)
            if meta["status"] != last_state:
                if on_message is not None:
                    on_message(meta)
                if last_state is not None:
                    wait = min(self.first_poll_interval, interval)
            last_state = meta["status"]
            if meta["status"] in states.READY_STATES:
                return meta
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"Task {task_id} was not ready within {timeout} s "
                                   f"(state {meta['status']}).")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            time.sleep(wait if left is None else min(wait, left))
            wait = min(wait * 2, interval)

    def forget(self, task_id: str) -> None:
        """Delete the stored result of ``task_id`` (it reads as PENDING afterwards)."""
        self.retrying(lambda: self._delete(task_id), "the deletion of %s", task_id)

    def revoke(self, task_id: str, terminate: bool, expires: float) -> None:
        """Record that ``task_id`` must not run (and, with ``terminate``, be stopped).

        :param expires: seconds the record is kept (workers started later see it).
        :raises NotImplementedError: the backend cannot store revokes.
        """
        self.retrying(lambda: self._revoke(task_id, terminate, expires),
                      "the revoke of %s", task_id)

    def revoked(self) -> dict[str, bool]:
        """The unexpired revokes: task id -> terminate."""
        return {}

    def cleanup(self) -> int:
        """Remove expired results where the store does not do it itself.

        :returns: how many results were removed.
        """
        return 0

    def reset_after_fork(self) -> None:
        """Drop connections inherited from the parent process (without closing them)."""

    def close(self) -> None:
        """Release connections."""


class DisabledBackend(Backend):
    """``RESULT_BACKEND = "disabled"``: nothing is stored; reading results is an error."""

    disabled = True
    polls = False
    no_groups = ("No result backend is configured (RESULT_BACKEND = 'disabled'), so groups "
                 "cannot be saved nor chords counted. Set RESULT_BACKEND, e.g. "
                 "'redis://localhost:6379/1'.")

    def _set(self, task_id: str, meta: dict[str, Any]) -> None:
        return None

    def _get(self, task_id: str) -> dict[str, Any] | None:
        raise ImproperlyConfigured(
            "No result backend is configured (RESULT_BACKEND = 'disabled'), so task "
            "states cannot be read. Set RESULT_BACKEND, e.g. 'redis://localhost:6379/1'."
        )

    def _delete(self, task_id: str) -> None:
        return None
