"""The result backend contract, run against every backend that needs no server.

The Redis backend runs the same contract in tests/integration/test_backend_contract.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from flask_tasks import states
from flask_tasks.backends.base import Backend, exception_from_dict, exception_to_dict
from flask_tasks.backends.sql import SQLBackend
from flask_tasks.exceptions import DecodeError, EncodeError, TimeoutError
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
