"""Task semantics on the embedded default (SQLite broker and results), through a real worker.

The same behaviours as the Redis tests in ``test_retry.py``, ``test_time_limits.py``,
``test_rate_limit.py`` and ``test_delayed.py``: retries (explicit and ``autoretry_for``
with backoff), time limits, rate limits and ``expires``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask

from flask_tasks import states
from flask_tasks.exceptions import SoftTimeLimitExceeded, TaskRevokedError, TimeLimitExceeded
from tests.apps import basic
from tests.helpers import WorkerProcess, wait_for

APP = "tests.apps.basic:create_app"
POLL = 0.05  # AsyncResult.get() polls the SQLite results; the default 0.5 s is slow


def runs(tmp_path: Path) -> list[str]:
    """The tags in ``runs.txt`` (one line per run of ``record`` / ``backs_off``)."""
    path = tmp_path / "runs.txt"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def count_lines(worker: WorkerProcess, text: str, expected: int) -> None:
    """Wait until ``text`` is in the worker's output exactly ``expected`` times."""
    wait_for(lambda: worker.output.count(text) >= expected, timeout=5,
             message=f"{expected} x {text!r} in worker output:\n{worker.output}")
    assert worker.output.count(text) == expected, worker.output


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_retry_until_success(embedded_app: Flask, start_worker, pool: str) -> None:
    worker = start_worker(APP, "-P", pool, "-c", "2")
    seen: list[str] = []
    sent = time.time()
    result = basic.flaky.delay(2)
    value = result.get(timeout=15, interval=POLL,
                       on_message=lambda meta: seen.append(meta["status"]))
    assert value == {"retries": 2, "id": result.id}  # same id, request.retries counted up
    assert states.RETRY in seen and seen[-1] == states.SUCCESS, seen
    assert result.date_done.timestamp() - sent >= 0.6  # type: ignore[union-attr]  # 2 x 0.3 s
    name = f"Task tests.apps.basic.flaky[{result.id}]"
    count_lines(worker, f"{name} retry: Retry in 0.3s", 2)
    count_lines(worker, f"{name} received", 3)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_retries_exhausted_reraise_the_cause(embedded_app: Flask, start_worker,
                                             pool: str) -> None:
    worker = start_worker(APP, "-P", pool, "-c", "1")
    result = basic.flaky.delay(10)
    with pytest.raises(ConnectionError, match="attempt 3"):
        result.get(timeout=15, interval=POLL)
    assert result.state == states.FAILURE
    name = f"Task tests.apps.basic.flaky[{result.id}]"
    count_lines(worker, f"{name} retry: Retry in 0.3s", 3)  # max_retries=3: 4 runs
    count_lines(worker, f"{name} received", 4)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_autoretry_with_backoff(embedded_app: Flask, start_worker, tmp_path: Path,
                                pool: str) -> None:
    start_worker(APP, "-P", pool, "-c", "2")
    succeeds = basic.backs_off.delay("ok", 3)  # fails 3 times, the 4th run returns
    gives_up = basic.backs_off.delay("out", 10)  # fails every time: 3 retries, then FAILURE
    assert succeeds.get(timeout=20, interval=POLL) == 4
    with pytest.raises(ConnectionError, match="out run 4"):
        gives_up.get(timeout=20, interval=POLL)
    assert gives_up.state == states.FAILURE
    assert sorted(runs(tmp_path)) == ["ok"] * 4 + ["out"] * 4
    for tag in ("ok", "out"):
        times = [float(line) for line in (tmp_path / f"times-{tag}.txt").read_text().split()]
        gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
        # retry_backoff=0.2 without jitter: 0.2, 0.4, 0.8 s (never earlier)
        assert all(gap >= due for gap, due in zip(gaps, [0.2, 0.4, 0.8], strict=True)), gaps
        assert sum(gaps) < 5.0, gaps  # not 1, 2, 4 s (factor ignored) nor 180 s


def test_hard_time_limit_kills_and_the_worker_keeps_serving(embedded_app: Flask,
                                                            start_worker) -> None:
    worker = start_worker(APP, "-P", "prefork", "-c", "1")
    before = basic.pid.delay().get(timeout=10, interval=POLL)
    start = time.monotonic()
    result = basic.overrun.delay(30)
    with pytest.raises(TimeLimitExceeded, match="time limit of 1.0 s"):
        result.get(timeout=15, interval=POLL)
    assert time.monotonic() - start < 10  # not the 30 s sleep
    assert result.state == states.FAILURE
    assert basic.pid.delay().get(timeout=10, interval=POLL) != before  # process replaced
    assert basic.add.delay(2, 3).get(timeout=10, interval=POLL) == 5
    worker.wait_output("ran past its time limit")


def test_soft_time_limit_lets_the_task_clean_up(embedded_app: Flask, start_worker) -> None:
    start_worker(APP, "-P", "prefork", "-c", "1")
    start = time.monotonic()
    assert basic.cleans_up.delay(5).get(timeout=10, interval=POLL) == "cleaned up"
    with pytest.raises(SoftTimeLimitExceeded):
        basic.sleep.apply_async((5,), soft_time_limit=0.3).get(timeout=10, interval=POLL)
    assert time.monotonic() - start < 8  # neither slept its 5 s
    assert basic.add.delay(1, 1).get(timeout=10, interval=POLL) == 2


def test_rate_limit_spaces_out_the_task_only(embedded_app: Flask, start_worker) -> None:
    start_worker(APP, "-c", "2")
    basic.add.delay(0, 0).get(timeout=10, interval=POLL)  # warm
    start = time.monotonic()
    limited = [basic.limited.delay(i) for i in range(10)]  # 5/s
    other = basic.add.delay(1, 1)
    assert other.get(timeout=10, interval=POLL) == 2
    assert [r.get(timeout=20, interval=POLL) for r in limited] == list(range(10))
    assert time.monotonic() - start >= 1.4  # 10 at 5/s (the first one or two at once)
    # not queued behind the limited ones, although it was sent after them
    assert other.date_done < limited[-1].date_done  # type: ignore[operator]


def test_expired_before_any_worker_is_not_run(embedded_app: Flask, start_worker,
                                              tmp_path: Path) -> None:
    expired = datetime.now(UTC) - timedelta(seconds=1)
    result = basic.record.apply_async(("late", 0), expires=expired)
    worker = start_worker(APP, "-c", "1")
    with pytest.raises(TaskRevokedError, match="expired"):
        result.get(timeout=10, interval=POLL)
    assert result.state == states.REVOKED
    assert basic.add.delay(1, 1).get(timeout=10, interval=POLL) == 2
    assert runs(tmp_path) == []
    worker.wait_output("expired at")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_expires_while_waiting_behind_a_busy_task(embedded_app: Flask, start_worker,
                                                  tmp_path: Path, pool: str) -> None:
    start_worker(APP, "-P", pool, "-c", "1")
    busy = basic.sleep.delay(1.5)
    wait_for(lambda: busy.state == states.STARTED, timeout=10, message="busy task started")
    late = basic.record.apply_async(("late", 0), expires=0.5)  # waits behind it, 1 s too long
    fresh = basic.record.apply_async(("fresh", 0), expires=60)
    assert busy.get(timeout=10, interval=POLL) == 1.5
    with pytest.raises(TaskRevokedError, match="expired"):
        late.get(timeout=10, interval=POLL)
    assert late.state == states.REVOKED
    assert fresh.get(timeout=10, interval=POLL) == "fresh"
    assert runs(tmp_path) == ["fresh"]
