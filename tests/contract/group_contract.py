"""The group and chord part of the result backend contract (see flask_tasks.backends.chords).

Each case takes a fresh backend; they are part of ``backend_contract.CASES``.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
import traceback
import uuid
from typing import Any

import pytest

from flask_tasks import states
from flask_tasks.backends.base import Backend
from flask_tasks.backends.chords import ChordClaim
from tests.helpers import wait_for

OK = states.SUCCESS


def _gid() -> str:
    return uuid.uuid4().hex


def _tuple(group_id: str, *task_ids: str) -> list[Any]:
    """``GroupResult.as_tuple()`` after a JSON round trip."""
    return [[group_id, None], [[[tid, None], None] for tid in task_ids]]


def group_save_restore_delete(backend: Backend) -> None:
    gid = _gid()
    assert backend.restore_group(gid) is None
    backend.save_group(gid, {"result": _tuple(gid, "a", "b")})
    assert backend.restore_group(gid)["result"] == _tuple(gid, "a", "b")  # type: ignore[index]
    backend.save_group(gid, {"result": _tuple(gid, "c")})  # saved again: replaced
    assert backend.restore_group(gid)["result"] == _tuple(gid, "c")  # type: ignore[index]
    backend.delete_group(gid)
    assert backend.restore_group(gid) is None
    with pytest.raises(ValueError, match="as_tuple"):
        backend.save_group(gid, {"results": []})


def group_expiry(backend: Backend) -> None:
    kept, gone = _gid(), _gid()
    backend.expires = 1.0
    backend.save_group(gone, {"result": _tuple(gone, "a")})
    time.sleep(1.1)
    wait_for(lambda: backend.cleanup() >= 0 and backend.restore_group(gone) is None,
             timeout=5, message="the group to expire")
    backend.expires = None  # kept
    backend.save_group(kept, {"result": _tuple(kept, "a")})
    backend.cleanup()
    assert backend.restore_group(kept) is not None


def _report(backend: Backend, gid: str, index: int | None, value: Any = None, *,
            task_id: str | None = None, state: str = OK, **kwargs: Any) -> ChordClaim | None:
    tid = task_id or f"{gid}-t{index}"
    return backend.chord_part_return(gid, tid, index, state,
                                     f"v{index}" if value is None else value, **kwargs)


def chord_out_of_order_in_index_order(backend: Backend) -> None:
    gid = _gid()
    backend.set_chord_size(gid, 4)
    assert [_report(backend, gid, i) for i in (2, 0, 3)] == [None, None, None]
    claim = _report(backend, gid, 1)
    assert claim is not None and claim.group_id == gid and claim.token
    assert [p.index for p in claim.parts] == [0, 1, 2, 3]
    assert [p.task_id for p in claim.parts] == [f"{gid}-t{i}" for i in range(4)]
    assert claim.values == ["v0", "v1", "v2", "v3"]
    assert {p.state for p in claim.parts} == {OK} and claim.failed_part is None


def chord_parts_before_size(backend: Backend) -> None:
    gid = _gid()
    assert _report(backend, gid, 0) is None  # counted, though the size is not set yet
    backend.set_chord_size(gid, 2)
    claim = _report(backend, gid, 1)
    assert claim is not None and claim.values == ["v0", "v1"]


def chord_duplicates_count_once(backend: Backend) -> None:
    gid = _gid()
    backend.set_chord_size(gid, 3)
    assert _report(backend, gid, 0, "first") is None
    assert _report(backend, gid, 0, "second") is None  # a redelivered run: not counted
    assert _report(backend, gid, 1, "x", state=states.FAILURE) is None
    assert _report(backend, gid, 1, "y") is None
    claim = _report(backend, gid, 2)
    assert claim is not None and claim.values == ["first", "x", "v2"]
    assert [p.state for p in claim.parts] == [OK, states.FAILURE, OK]


def chord_same_task_id_two_indexes(backend: Backend) -> None:
    gid = _gid()  # a reused frozen signature: one task id at two places in the header
    backend.set_chord_size(gid, 2)
    assert _report(backend, gid, 0, "a", task_id="same") is None
    claim = _report(backend, gid, 1, "b", task_id="same")
    assert claim is not None and claim.values == ["a", "b"]


def chord_add_to_chord(backend: Backend) -> None:
    gid = _gid()
    backend.set_chord_size(gid, 2)
    backend.add_to_chord(gid, 1)
    assert _report(backend, gid, 0) is None and _report(backend, gid, 1) is None
    claim = _report(backend, gid, None, "late", task_id="added")
    assert claim is not None and claim.values == ["v0", "v1", "late"]
    assert claim.parts[-1].index is None


def chord_failure_states(backend: Backend) -> None:
    gid = _gid()
    backend.set_chord_size(gid, 3)
    _report(backend, gid, 0)
    _report(backend, gid, 2, ValueError("revoked", 2), state=states.REVOKED)
    claim = _report(backend, gid, 1, ZeroDivisionError("division by zero"),
                    state=states.FAILURE)
    assert claim is not None
    failed = claim.failed_part
    assert failed is not None and failed.index == 1 and failed.task_id == f"{gid}-t1"
    exc = failed.exception()
    assert isinstance(exc, ZeroDivisionError) and exc.args == ("division by zero",)
    assert failed.result["exc_type"] == "ZeroDivisionError"
    last = claim.parts[2]
    assert last.failed and isinstance(last.exception(), ValueError)
    assert last.exception().args == ("revoked", 2)  # type: ignore[union-attr]
    assert claim.parts[0].exception() is None and not claim.parts[0].failed


def chord_done_blocks_late_duplicates(backend: Backend) -> None:
    gid = _gid()
    backend.set_chord_size(gid, 2)
    _report(backend, gid, 0)
    claim = _report(backend, gid, 1)
    assert claim is not None
    assert backend.chord_claim_extend(claim, 5.0)
    assert backend.chord_done(claim)
    assert _report(backend, gid, 1, "late") is None  # a late duplicate
    assert _report(backend, gid, 0, "late") is None
    assert _report(backend, gid, 7, "stray") is None  # nor can anything else count
    assert not backend.chord_claim_extend(claim) and not backend.chord_done(claim)
    # A frozen chord applied again (same group id) is a new run, as in Celery.
    backend.set_chord_size(gid, 1)
    again = _report(backend, gid, 0, "again", task_id="new")
    assert again is not None and again.values == ["again"] and again.token != claim.token


def chord_claim_expires(backend: Backend) -> None:
    gid = _gid()
    backend.set_chord_size(gid, 2)
    _report(backend, gid, 0)
    first = _report(backend, gid, 1, claim_expires=0.3)
    assert first is not None
    assert _report(backend, gid, 1, "dup") is None  # claimed: a duplicate gets nothing
    # The holder died: once its claim expires, a redelivered part takes it again.
    second = wait_for(lambda: _report(backend, gid, 1, "dup", claim_expires=30),
                      timeout=5, interval=0.05, message="the claim to be taken again")
    assert second.token != first.token and second.values == ["v0", "v1"]
    assert not backend.chord_claim_extend(first, 5)  # someone else holds it
    assert not backend.chord_done(first)
    assert backend.chord_claim_extend(second, 30) and backend.chord_done(second)


def chord_claim_reacquired_by_holder(backend: Backend) -> None:
    gid = _gid()
    backend.set_chord_size(gid, 1)
    claim = _report(backend, gid, 0, claim_expires=0.2)
    assert claim is not None
    time.sleep(0.3)  # expired, and nobody took it: the holder may take it again
    assert backend.chord_claim_extend(claim, 5.0)
    assert _report(backend, gid, 0, "dup") is None
    assert backend.chord_done(claim)


def chord_retry_keeps_own_claim(backend: Backend) -> None:
    gid = _gid()  # a call retried after its reply was lost keeps the claim it took
    backend.set_chord_size(gid, 1)
    args = (gid, "t0", 0, OK, 1)
    first = backend._chord_part_return(*args, "tok", 10.0)
    assert first is not None
    again = backend._chord_part_return(*args, "tok", 10.0)
    assert again is not None and again.token == "tok"
    assert backend._chord_part_return(*args, "other", 10.0) is None


def chord_without_expiry(backend: Backend) -> None:
    backend.expires = None  # TASKS_RESULT_EXPIRES = None (celery#5237)
    gid = _gid()
    backend.save_group(gid, {"result": _tuple(gid, "a", "b")})
    backend.set_chord_size(gid, 2)
    _report(backend, gid, 1)
    claim = _report(backend, gid, 0)
    assert claim is not None and claim.values == ["v0", "v1"]
    assert backend.chord_done(claim)
    backend.cleanup()
    assert _report(backend, gid, 0) is None
    assert backend.restore_group(gid) is not None


ROUNDS = 50
PREFILLED = 3


def _reporter(backend: Backend, prefix: str, which: int, barrier: Any, out: Any) -> None:
    """A process reporting part PREFILLED + which of every round's chord."""
    try:
        backend.reset_after_fork()
        for r in range(ROUNDS):
            barrier.wait(timeout=30)
            gid, index = f"{prefix}-{r}", PREFILLED + which
            claim = backend.chord_part_return(gid, f"t{index}", index, OK, f"proc{which}")
            out.put((r, None if claim is None else claim.values))
    except BaseException:
        out.put((-1, traceback.format_exc()))


def chord_one_claim_under_contention(backend: Backend) -> None:
    """Threads and two processes report the last parts at once: one claim, every round."""
    ctx = multiprocessing.get_context("fork")
    prefix = _gid()
    size = PREFILLED + 3
    barrier = ctx.Barrier(2 + 3)
    out = ctx.Queue()
    procs = [ctx.Process(target=_reporter, args=(backend, prefix, which, barrier, out),
                         daemon=True) for which in (0, 1)]
    for proc in procs:
        proc.start()
    try:
        for r in range(ROUNDS):
            gid = f"{prefix}-{r}"
            backend.set_chord_size(gid, size)
            for i in range(PREFILLED):
                assert backend.chord_part_return(gid, f"t{i}", i, OK, i) is None
            got: list[Any] = []

            def report(index: int, value: str, gid: str = gid, got: list[Any] = got) -> None:
                barrier.wait(timeout=30)
                claim = backend.chord_part_return(gid, f"t{index}", index, OK, value)
                got.append(None if claim is None else claim.values)

            threads = [threading.Thread(target=report, args=args)
                       for args in ((5, "last"), (5, "last-dup"), (3, "dup-of-proc0"))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            for _ in procs:
                try:
                    round_, values = out.get(timeout=60)
                except queue.Empty:
                    raise AssertionError(f"round {r}: a reporter process did not answer") \
                        from None
                assert round_ == r, values
                got.append(values)
            claims = [values for values in got if values is not None]
            assert len(got) == 5 and len(claims) == 1, (r, got)
            values = claims[0]
            assert values[:PREFILLED] == [0, 1, 2] and values[4] == "proc1", values
            assert values[3] in ("proc0", "dup-of-proc0") and values[5] in ("last", "last-dup")
    finally:
        barrier.abort()  # a failed round: the processes stop waiting
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


CASES = [group_save_restore_delete, group_expiry, chord_out_of_order_in_index_order,
         chord_parts_before_size, chord_duplicates_count_once, chord_same_task_id_two_indexes,
         chord_add_to_chord, chord_failure_states, chord_done_blocks_late_duplicates,
         chord_claim_expires, chord_claim_reacquired_by_holder, chord_retry_keeps_own_claim,
         chord_without_expiry, chord_one_claim_under_contention]
