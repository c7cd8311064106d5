"""The result backend contract, run against every backend that needs no server.

The Redis backend runs the same contract in tests/integration/test_backend_contract.py.
"""

from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import insert

from flask_tasks import states
from flask_tasks.backends.base import Backend
from flask_tasks.backends.sql import SQLBackend, taskmeta
from flask_tasks.exceptions import DecodeError, EncodeError, TimeoutError
from flask_tasks.protocol import exception_from_dict, exception_to_dict
from flask_tasks.result import AsyncResult
from tests.contract import backend_contract


class Custom(Exception):
    pass


@pytest.fixture()
def sql_backend(tmp_path: Path) -> Backend:
    return SQLBackend(f"sqlite:///{tmp_path}/results.sqlite")


@pytest.mark.parametrize("case", backend_contract.CASES, ids=lambda c: c.__name__)
def test_sql_contract(sql_backend: Backend, case) -> None:  # type: ignore[no-untyped-def]
    case(sql_backend)


def test_exception_round_trip() -> None:
    rebuilt = exception_from_dict(exception_to_dict(Custom("x", 1)))
    assert type(rebuilt) is Custom and rebuilt.args == ("x", 1)
    unknown = exception_from_dict({"exc_type": "Gone", "exc_module": "not.imported",
                                   "exc_message": ["why"]})
    assert type(unknown).__name__ == "Gone" and str(unknown) == "why"
    not_exception = exception_from_dict({"exc_type": "path", "exc_module": "os",
                                         "exc_message": ["x"]})
    assert isinstance(not_exception, Exception) and type(not_exception).__name__ == "path"


def test_sql_refuses_to_unpickle_code(sql_backend: SQLBackend) -> None:
    sql_backend.store_result("evil", 1, states.SUCCESS)

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    with sql_backend.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE celery_taskmeta SET result = ? WHERE task_id = 'evil'",
                             (pickle.dumps(Evil()),))
    with pytest.raises(DecodeError, match="Refusing to unpickle builtins.print"):
        sql_backend.get_task_meta("evil")


def test_sql_cleanup_removes_expired(tmp_path: Path) -> None:
    backend = SQLBackend(f"sqlite:///{tmp_path}/r.sqlite", expires=0.0001)
    backend.store_result("old", 1, states.SUCCESS)
    import time
    time.sleep(0.01)
    assert backend.cleanup() == 1
    assert backend.get_task_meta("old")["status"] == states.PENDING


def test_unencodable_result(sql_backend: Backend) -> None:
    with pytest.raises(EncodeError):
        sql_backend.store_result("s", {1, 2}, states.SUCCESS)


def test_polling_get_times_out(sql_backend: Backend) -> None:
    with pytest.raises(TimeoutError, match="not ready within 0.05 s"):
        AsyncResult("never", sql_backend).get(timeout=0.05, interval=0.01)


class Unreachable(Exception):
    """Stands for a connection error of the store."""


class FlakyBackend(Backend):
    """Stores in a dict; the first ``failures`` writes raise ``error``."""

    def __init__(self, failures: int, error: Exception, **kwargs: object) -> None:
        super().__init__(base_sleep=0.0, **kwargs)  # type: ignore[arg-type]
        self.failures, self.error = failures, error
        self.stored: dict[str, dict[str, object]] = {}
        self.attempts = 0

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, Unreachable)

    def _set(self, task_id: str, meta: dict[str, object]) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error
        self.stored[task_id] = meta


def test_writes_are_retried_while_the_store_is_unreachable(caplog) -> None:  # type: ignore[no-untyped-def]
    backend = FlakyBackend(5, Unreachable("connection refused"))
    backend.store_result("t1", 42, states.SUCCESS)
    assert backend.stored["t1"]["result"] == 42 and backend.attempts == 6
    # warned on retries 1, 2 and 4, not on every one
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 3


def test_errors_not_safe_to_retry_are_raised_at_once() -> None:
    backend = FlakyBackend(1, ValueError("bad data"))
    with pytest.raises(ValueError):
        backend.store_result("t1", 42, states.SUCCESS)
    assert backend.attempts == 1


def test_max_retries_and_always_retry_off_bound_the_retries() -> None:
    bounded = FlakyBackend(10, Unreachable("down"), max_retries=2)
    with pytest.raises(Unreachable):
        bounded.store_result("t1", 42, states.SUCCESS)
    assert bounded.attempts == 3  # the write and 2 retries
    off = FlakyBackend(10, Unreachable("down"), always_retry=False)
    with pytest.raises(Unreachable):
        off.store_result("t1", 42, states.SUCCESS)
    assert off.attempts == 1


def test_retry_waits_grow_and_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("flask_tasks.backends.base.time.sleep", waits.append)
    monkeypatch.setattr("flask_tasks.backends.base.random.uniform", lambda low, high: high)
    backend = FlakyBackend(6, Unreachable("down"))
    backend.base_sleep, backend.max_sleep = 0.5, 3.0
    backend.store_result("t1", 1, states.SUCCESS)
    assert waits == [1.0, 2.0, 3.0, 3.0, 3.0, 3.0]


def test_sql_backend_retries_operational_errors_only(sql_backend: SQLBackend) -> None:
    from sqlalchemy.exc import OperationalError

    assert sql_backend.exception_safe_to_retry(
        OperationalError("INSERT", {}, Exception("database is locked")))
    assert not sql_backend.exception_safe_to_retry(
        OperationalError("INSERT", {}, Exception("no such table: celery_taskmeta")))
    assert not sql_backend.exception_safe_to_retry(ValueError("x"))


class Scripted(Backend):
    """Reads the states of one task from a script, one per poll (then the last)."""

    def __init__(self, script: list[str]) -> None:
        super().__init__()
        self.script = script
        self.reads = 0

    def _get(self, task_id: str) -> dict[str, object] | None:
        state = self.script[min(self.reads, len(self.script) - 1)]
        self.reads += 1
        return {"task_id": task_id, "status": state, "result": None, "traceback": None,
                "children": [], "date_done": None}


def test_polling_waits_double_up_to_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("flask_tasks.backends.base.time.sleep", waits.append)
    script = [states.PENDING] * 10 + [states.STARTED] * 3 + [states.SUCCESS]
    meta = Scripted(script).wait_for("t", interval=0.05)
    assert meta["status"] == states.SUCCESS
    assert waits[:10] == [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05, 0.05, 0.05]
    assert waits[10:] == [0.001, 0.002, 0.004]  # STARTED seen: the task runs, look soon
    assert max(waits) <= 0.05
    # An interval below the first wait caps every wait, the first one included.
    waits.clear()
    Scripted([states.PENDING] * 3 + [states.SUCCESS]).wait_for("t", interval=0.0005)
    assert waits == [0.0005] * 3


def test_polling_get_sees_a_result_soon_after_it_is_stored(sql_backend: Backend) -> None:
    sql_backend.store_result("warm", 1, states.SUCCESS)  # the table exists, the engine is up
    threading.Timer(0.05, sql_backend.store_result, ("soon", 2, states.SUCCESS)).start()
    start = time.monotonic()
    assert AsyncResult("soon", sql_backend).get(timeout=10) == 2  # default interval: 0.5 s
    assert time.monotonic() - start < 0.3


def test_sql_reads_celery_json_rows_and_reports_garbage(tmp_path: Path) -> None:
    backend = SQLBackend(f"sqlite:///{tmp_path}/r.sqlite")
    backend.store_result("ours", 1, states.SUCCESS)  # creates the table
    with backend.engine.begin() as conn:
        conn.execute(insert(taskmeta).values(task_id="celery57", status="SUCCESS",
                                             result=None))
        conn.exec_driver_sql("UPDATE celery_taskmeta SET result = ? WHERE task_id = 'celery57'",
                             (json.dumps({"n": 5}).encode(),))
        conn.execute(insert(taskmeta).values(task_id="junk", status="SUCCESS", result=None))
        conn.exec_driver_sql("UPDATE celery_taskmeta SET result = ? WHERE task_id = 'junk'",
                             (b"\x00not a result",))
    assert backend.get_task_meta("celery57")["result"] == {"n": 5}
    with pytest.raises(DecodeError):
        backend.get_task_meta("junk")
