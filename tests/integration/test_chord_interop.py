"""Celery 5.7's Redis result backend and ours on one Redis: groups and chords are shared.

Celery's side is its own ``RedisBackend`` (``Celery(backend=redis_url)``) reporting
header parts with ``on_chord_part_return``, exactly as its worker does; its body
dispatch (``app.amqp._retry_publish(callback.delay, results)``) is recorded instead
of published. Our side is ``flask_tasks.backends.redis.RedisBackend``.
"""

from __future__ import annotations

import gc
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from flask_tasks import states
from flask_tasks.backends.chords import ChordClaim
from flask_tasks.backends.redis import RedisBackend

OK = states.SUCCESS


class CelerySide:
    """A Celery 5.7 app on the test Redis; ``dispatched`` holds each body it would send."""

    def __init__(self, redis_url: str) -> None:
        from celery import Celery

        self.app = Celery("interop", backend=redis_url, broker="memory://")
        self.backend = self.app.backend
        self.dispatched: list[Any] = []
        self._lock = threading.Lock()
        self.app.amqp._retry_publish = self._publish

    def _publish(self, publish: Any, results: Any) -> None:
        with self._lock:
            self.dispatched.append(results)

    def report(self, gid: str, index: int, value: Any, state: str = OK,
               task_id: str | None = None) -> None:
        from celery.app.task import Context

        request = Context(id=task_id or f"{gid}-t{index}", group=gid, group_index=index,
                          chord=self.app.signature("body"))
        self.backend.on_chord_part_return(request, state, value)


@pytest.fixture()
def celery_side(redis_url: str) -> Iterator[CelerySide]:
    side = CelerySide(redis_url)
    yield side
    # Celery keeps every AsyncResult made as pending; let them go while Redis is up
    # (their __del__ talks to it), not at interpreter exit.
    side.backend._cache.clear()
    for pending in side.backend._pending_results:
        pending.clear()
    gc.collect()
    side.backend.client.close()


def _ours(backend: RedisBackend, gid: str, index: int, value: Any,
          state: str = OK) -> ChordClaim | None:
    return backend.chord_part_return(gid, f"{gid}-t{index}", index, state, value)


def test_celery_sets_the_size_and_we_complete(redis_url: str, celery_side: CelerySide) -> None:
    ours, gid = RedisBackend(redis_url), uuid.uuid4().hex
    celery_side.backend.set_chord_size(gid, 4)
    assert _ours(ours, gid, 2, "ours-2") is None
    celery_side.report(gid, 0, "celery-0")
    celery_side.report(gid, 3, ZeroDivisionError("boom"), state=states.FAILURE)
    celery_side.report(gid, 0, "celery-0-again")  # a duplicate, on Celery's side
    claim = _ours(ours, gid, 1, "ours-1")
    assert claim is not None and celery_side.dispatched == []
    assert claim.values[:3] == ["celery-0", "ours-1", "ours-2"]
    failed = claim.failed_part
    assert failed is not None and failed.index == 3 and failed.task_id == f"{gid}-t3"
    assert isinstance(failed.exception(), ZeroDivisionError)
    assert ours.chord_done(claim)
    celery_side.report(gid, 1, "late")  # Celery's late duplicate: blocked by our done marker
    assert celery_side.dispatched == []
    assert redis.Redis.from_url(redis_url).exists(f"celery-taskset-meta-{gid}.j") == 0


def test_we_set_the_size_and_celery_completes(redis_url: str,
                                              celery_side: CelerySide) -> None:
    ours, gid = RedisBackend(redis_url), uuid.uuid4().hex
    ours.set_chord_size(gid, 3)
    assert _ours(ours, gid, 2, "ours-2") is None
    assert _ours(ours, gid, 0, "ours-0") is None
    celery_side.report(gid, 1, "celery-1")
    assert celery_side.dispatched == [["ours-0", "celery-1", "ours-2"]]
    # Celery cleaned up and left its done marker: our late duplicate neither counts nor claims.
    assert _ours(ours, gid, 1, "late") is None
    client = redis.Redis.from_url(redis_url)
    assert client.get(f"celery-taskset-meta-{gid}.c") == b"done"


def test_one_side_dispatches_when_both_report_the_last_parts(
        redis_url: str, celery_side: CelerySide) -> None:
    ours = RedisBackend(redis_url)
    for round_ in range(30):
        gid = f"{uuid.uuid4().hex}-{round_}"
        celery_side.dispatched.clear()
        ours.set_chord_size(gid, 4)
        _ours(ours, gid, 0, 0)
        celery_side.report(gid, 1, 1)
        barrier = threading.Barrier(4)
        claims: list[ChordClaim] = []

        def mine(index: int, value: Any, gid: str = gid,
                 barrier: threading.Barrier = barrier, claims: list[ChordClaim] = claims) -> None:
            barrier.wait(timeout=10)
            claim = _ours(ours, gid, index, value)
            if claim is not None:
                claims.append(claim)
                assert ours.chord_claim_extend(claim) and ours.chord_done(claim)

        def theirs(index: int, value: Any, gid: str = gid,
                   barrier: threading.Barrier = barrier) -> None:
            barrier.wait(timeout=10)
            celery_side.report(gid, index, value)

        threads = [threading.Thread(target=mine, args=(2, 2)),
                   threading.Thread(target=theirs, args=(3, 3)),
                   threading.Thread(target=theirs, args=(2, "dup")),
                   threading.Thread(target=mine, args=(3, "dup"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        bodies = [claim.values for claim in claims] + celery_side.dispatched
        assert len(bodies) == 1, (round_, bodies)
        assert bodies[0][:2] == [0, 1] and bodies[0][2] in (2, "dup") and \
            bodies[0][3] in (3, "dup"), bodies


def test_groups_saved_by_either_side(redis_url: str, celery_side: CelerySide) -> None:
    from celery.result import AsyncResult, GroupResult

    ours, app = RedisBackend(redis_url, expires=60), celery_side.app
    gid = uuid.uuid4().hex
    ours.save_group(gid, {"result": [[gid, None], [[["a", None], None], [["b", None], None]]]})
    restored = GroupResult.restore(gid, app=app)
    assert restored is not None and [r.id for r in restored.results] == ["a", "b"]
    theirs = uuid.uuid4().hex
    GroupResult(theirs, [AsyncResult("c", app=app)], app=app).save()
    meta = ours.restore_group(theirs)
    assert meta == {"result": [[theirs, None], [[["c", None], None]]]}
    client = redis.Redis.from_url(redis_url)
    celery_bytes = celery_side.backend.encode({"result": restored.as_tuple()})
    assert client.get(f"celery-taskset-meta-{gid}") == celery_bytes.encode()
    assert 0 < client.ttl(f"celery-taskset-meta-{gid}") <= 60
    ours.delete_group(theirs)
    assert GroupResult.restore(theirs, app=app) is None
