"""Groups and chords in the store: the values, the refusals, and the SQL tables Celery reads.

The rules themselves are the contract (tests/contract/group_contract.py), run on SQL by
tests/unit/test_backends.py and on Redis and the embedded default by the integration tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flask_tasks import states
from flask_tasks.backends.base import DisabledBackend
from flask_tasks.backends.chords import ChordClaim, ChordPart, encode_part_result
from flask_tasks.backends.sql import SQLBackend
from flask_tasks.exceptions import ImproperlyConfigured


def test_parts_and_claims() -> None:
    ok = ChordPart("a", 0, states.SUCCESS, 3)
    bad = ChordPart("b", 1, states.FAILURE,
                    encode_part_result(states.FAILURE, KeyError("k")))
    retried = ChordPart("c", None, states.RETRY, "not a mapping")
    assert not ok.failed and ok.exception() is None
    assert bad.failed and isinstance(bad.exception(), KeyError)
    assert not retried.failed and str(retried.exception()) == "not a mapping"
    claim = ChordClaim("g", "tok", (ok, bad), 10.0)
    assert claim.failed_part is bad and claim.values == [3, bad.result]
    assert encode_part_result(states.SUCCESS, ValueError("kept")).args == ("kept",)


def test_backends_without_groups_say_so() -> None:
    backend = DisabledBackend()
    with pytest.raises(ImproperlyConfigured, match="groups"):
        backend.save_group("g", {"result": []})
    with pytest.raises(ImproperlyConfigured, match="RESULT_BACKEND"):
        backend.chord_part_return("g", "t", 0, states.SUCCESS, 1)


def test_rpc_backend_refuses_chords() -> None:
    from flask_tasks.backends.rpc import RPCBackend

    assert RPCBackend.no_groups is not None and "chords" in RPCBackend.no_groups


def test_celery_database_backend_restores_our_groups(tmp_path: Path) -> None:
    from celery import Celery
    from celery.result import AsyncResult, GroupResult

    url = f"sqlite:///{tmp_path}/results.sqlite"
    ours = SQLBackend(url)
    celery_app = Celery("interop", backend=f"db+{url}", broker="memory://")
    ours.save_group("g1", {"result": [["g1", None], [[["a", None], None], [["b", None], None]]]})
    restored = celery_app.backend.restore_group("g1")
    assert isinstance(restored, GroupResult) and [r.id for r in restored.results] == ["a", "b"]
    theirs = GroupResult("g2", [AsyncResult("c", app=celery_app)], app=celery_app)
    celery_app.backend.save_group("g2", theirs)
    meta = ours.restore_group("g2")
    assert meta is not None and meta["result"] == [["g2", None], [[["c", None], None]]]
    assert meta["date_done"] is not None


def test_sql_cleanup_removes_finished_chords(tmp_path: Path) -> None:
    backend = SQLBackend(f"sqlite:///{tmp_path}/results.sqlite", expires=None)
    backend.set_chord_size("g", 1)
    claim = backend.chord_part_return("g", "t", 0, states.SUCCESS, 1)
    assert claim is not None and backend.chord_done(claim, done_expires=0.001)
    import time

    time.sleep(0.01)
    assert backend.cleanup() == 1  # the done row, once its marker expired
    backend.set_chord_size("g", 1)  # and the group id can be used again
    assert backend.chord_part_return("g", "t", 0, states.SUCCESS, 2) is not None
