"""The result backend contract: each case takes a fresh backend and asserts one promise."""

from __future__ import annotations

import threading

import pytest

from flask_tasks import states
from flask_tasks.backends.base import Backend
from flask_tasks.result import AsyncResult
from tests.contract import group_contract


def unknown_id_is_pending(backend: Backend) -> None:
    result = AsyncResult("no-such-id", backend)
    assert result.state == states.PENDING and not result.ready() and result.result is None


def success_round_trip(backend: Backend) -> None:
    backend.store_result("t1", {"n": [1, 2]}, states.SUCCESS)
    result = AsyncResult("t1", backend)
    assert result.state == states.SUCCESS
    assert result.get(timeout=1) == {"n": [1, 2]}
    assert result.date_done is not None and result.date_done.tzinfo is not None


def failure_round_trip(backend: Backend) -> None:
    backend.store_result("t2", ZeroDivisionError("division by zero"), states.FAILURE, "TB")
    result = AsyncResult("t2", backend)
    assert result.failed() and result.traceback == "TB"
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        result.get(timeout=1)
    assert isinstance(result.get(propagate=False), ZeroDivisionError)


def custom_state(backend: Backend) -> None:
    backend.store_result("t3", {"done": 3, "total": 10}, "PROGRESS")
    result = AsyncResult("t3", backend)
    assert result.state == "PROGRESS" and result.info == {"done": 3, "total": 10}
    assert result.date_done is None and not result.ready()


def overwrite_keeps_latest(backend: Backend) -> None:
    backend.store_result("t4", None, states.STARTED)
    backend.store_result("t4", 7, states.SUCCESS)
    assert AsyncResult("t4", backend).get(timeout=1) == 7


def forget(backend: Backend) -> None:
    backend.store_result("t5", 1, states.SUCCESS)
    AsyncResult("t5", backend).forget()
    assert AsyncResult("t5", backend).state == states.PENDING


def get_wakes_when_stored(backend: Backend) -> None:
    timer = threading.Timer(0.2, backend.store_result, ("t6", "late", states.SUCCESS))
    timer.start()
    try:
        seen: list[str] = []
        value = AsyncResult("t6", backend).get(timeout=5, interval=0.02,
                                               on_message=lambda m: seen.append(m["status"]))
        assert value == "late" and seen[-1] == states.SUCCESS
    finally:
        timer.cancel()


def celery_layout(backend: Backend) -> None:
    backend.store_result("t7", 5, states.SUCCESS)
    meta = backend.get_task_meta("t7")
    assert {"status", "result", "traceback", "children", "date_done", "task_id"} <= set(meta)


def revokes(backend: Backend) -> None:
    assert backend.revoked() == {}
    backend.revoke("r1", False, 60)
    backend.revoke("r2", True, 60)
    backend.revoke("gone", False, -1)  # already expired
    assert backend.revoked() == {"r1": False, "r2": True}


CASES = [unknown_id_is_pending, success_round_trip, failure_round_trip, custom_state,
         overwrite_keeps_latest, forget, get_wakes_when_stored, celery_layout, revokes,
         *group_contract.CASES]
