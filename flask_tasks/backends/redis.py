"""Redis result backend, in Celery's layout.

Each result is the JSON meta at key ``celery-task-meta-<id>`` (``SET`` with
an expiry of ``expires`` seconds) and is also ``PUBLISH``-ed on a channel of
the same name, in one pipelined round trip. :meth:`RedisBackend.wait_for`
subscribes to that channel, so ``AsyncResult.get()`` wakes as soon as the
result is stored instead of polling.

Groups and chords use Celery 5.7's keys (``celery-taskset-meta-<group id>``
and its ``.j`` ``.t`` ``.s`` ``.d`` ``.c`` companions, see
:mod:`.redis_chords`), so Celery and flask_tasks may share a chord.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import redis

from .. import states
from .._redis import round_trip
from ..exceptions import TimeoutError
from ..result import OnMessage
from . import redis_chords
from .base import Backend
from .chords import ChordClaim, group_value, seconds

KEY_PREFIX = "celery-task-meta-"
GROUP_PREFIX = redis_chords.GROUP_PREFIX
REVOKED_KEY = "flask_tasks-revoked"


class RedisBackend(Backend):
    """Results in Redis.

    :param url: ``redis://[:password@]host[:port][/db]`` or ``rediss://`` (TLS),
        any URL ``redis.Redis.from_url`` takes.
    :param kwargs: see :class:`Backend`.
    """

    polls = False

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = url
        self._client: redis.Redis | None = None
        self._pid = os.getpid()
        self._pending: list[tuple[Any, ...]] = []

    @property
    def client(self) -> redis.Redis:
        """The redis-py client, created on first use and anew after ``fork``."""
        if self._client is None or self._pid != os.getpid():
            self._client = redis.Redis.from_url(self.url, health_check_interval=30)
            self._pid = os.getpid()
        return self._client

    def _commands(self, task_id: str, meta: dict[str, Any]) -> list[tuple[Any, ...]]:
        key = KEY_PREFIX + task_id
        value = self.encode(meta)
        if self.expires:
            store: tuple[Any, ...] = ("SET", key, value, "EX", max(1, int(self.expires)))
        else:
            store = ("SET", key, value)
        return [store, ("PUBLISH", key, value)]

    def _set(self, task_id: str, meta: dict[str, Any]) -> None:
        round_trip(self.client, *self._commands(task_id, meta))

    def _defer(self, task_id: str, meta: dict[str, Any]) -> None:
        self._pending.extend(self._commands(task_id, meta))

    def flush(self) -> None:
        """Store every deferred result in one round trip (retried; kept until written)."""
        if self._pending:
            self.retrying(self._write_pending, "%d result(s)", len(self._pending) // 2)

    def _write_pending(self) -> None:
        round_trip(self.client, *self._pending)
        self._pending = []

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """Connection errors and timeouts (also while Redis loads its data or fails over)."""
        return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError))

    def _get(self, task_id: str) -> dict[str, Any] | None:
        data = self.client.get(KEY_PREFIX + task_id)
        return None if data is None else self.decode(data)

    def _delete(self, task_id: str) -> None:
        self.client.delete(KEY_PREFIX + task_id)

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        on_message: OnMessage | None = None,
    ) -> dict[str, Any]:
        """Block until the task is ready; woken by the result's ``PUBLISH``.

        ``interval`` is unused (nothing is polled). A restart of Redis while
        waiting is ridden out (the meta is read again once it is back) until
        ``timeout``. See :meth:`Backend.wait_for`.
        """
        meta = self.get_task_meta(task_id)
        if meta["status"] in states.READY_STATES:
            if on_message is not None:
                on_message(meta)
            return meta
        key = KEY_PREFIX + task_id
        deadline = None if timeout is None else time.monotonic() + timeout
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(key)
            # The result may have been stored between the GET and SUBSCRIBE.
            meta = self.get_task_meta(task_id)
            if on_message is not None:
                on_message(meta)
            stale = False
            while meta["status"] not in states.READY_STATES:
                wait = 1.0
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        raise TimeoutError(
                            f"Task {task_id} was not ready within {timeout} s "
                            f"(state {meta['status']})."
                        )
                try:
                    message = pubsub.get_message(timeout=min(wait, 1.0))
                except (redis.ConnectionError, redis.TimeoutError):
                    # Redis went away; the next get_message reconnects and
                    # subscribes again. What was published meanwhile is lost
                    # to us, so the stored meta is read again once back.
                    stale = True
                    time.sleep(min(0.2, max(0.0, wait)))
                    continue
                if stale:
                    stale = False
                    meta = self.get_task_meta(task_id)
                    if on_message is not None:
                        on_message(meta)
                    continue
                if message is None or message.get("type") != "message":
                    continue
                meta = self.decode(message["data"])
                if on_message is not None:
                    on_message(meta)
            return meta
        finally:
            pubsub.close()

    def _revoke(self, task_id: str, terminate: bool, expires: float) -> None:
        """Add ``task_id`` to the sorted set ``flask_tasks-revoked`` (score: expiry time)."""
        round_trip(self.client, ("ZADD", REVOKED_KEY, time.time() + expires,
                              f"{task_id}|{int(terminate)}"))

    def revoked(self) -> dict[str, bool]:
        """Unexpired revokes (expired ones are removed on the way)."""
        now = time.time()
        _, members = round_trip(self.client, ("ZREMRANGEBYSCORE", REVOKED_KEY, "-inf", now),
                             ("ZRANGEBYSCORE", REVOKED_KEY, now, "+inf"))
        found: dict[str, bool] = {}
        for member in members:
            task_id, _, terminate = member.decode().rpartition("|")
            found[task_id] = found.get(task_id, False) or terminate == "1"
        return found

    # -- groups and chords: Celery's keys ------------------------------------
    def _save_group(self, group_id: str, value: Mapping[str, Any]) -> None:
        """``SET`` (with the results' expiry) and ``PUBLISH``, as Celery's ``_save_group``."""
        key = GROUP_PREFIX + group_id
        data = self.encode({"result": group_value(group_id, value)})
        expires = seconds(self.expires)
        store = ("SET", key, data, "EX", expires) if expires else ("SET", key, data)
        round_trip(self.client, store, ("PUBLISH", key, data))

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        data = self.client.get(GROUP_PREFIX + group_id)
        return None if data is None else dict(self.decode(data))

    def _delete_group(self, group_id: str) -> None:
        self.client.delete(GROUP_PREFIX + group_id)

    def _set_chord_size(self, group_id: str, size: int) -> None:
        redis_chords.set_size(self.client, group_id, size, seconds(self.expires))

    def _add_to_chord(self, group_id: str, n: int) -> None:
        self.client.incrby(GROUP_PREFIX + group_id + ".t", n)

    def _chord_part_return(self, group_id: str, task_id: str, group_index: int | None,
                           state: str, result: Any, token: str,
                           claim_expires: float) -> ChordClaim | None:
        return redis_chords.part_return(self.client, self.encode, self.decode, group_id,
                                        task_id, group_index, state, result, token,
                                        claim_expires, seconds(self.expires))

    def _chord_claim_extend(self, claim: ChordClaim, expires: float) -> bool:
        return redis_chords.claim_extend(self.client, claim, expires)

    def _chord_done(self, claim: ChordClaim, done_expires: float) -> bool:
        return redis_chords.done(self.client, claim, done_expires)

    def reset_after_fork(self) -> None:
        self._client = None
        self._pending = []

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None
