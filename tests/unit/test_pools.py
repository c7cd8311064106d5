"""The pools' own contract: jobs skipped before they start (a lost broker connection)."""

from __future__ import annotations

import time

import pytest

from flask_tasks.worker.executor import ACK, SKIP, Job, Outcome
from flask_tasks.worker.pools import POOLS, PreforkPool
from tests.helpers import wait_for


def _job(tag: int) -> Job:
    return Job(tag=tag, headers={"task": "t", "id": str(tag)}, body=b"", content_type="",
               content_encoding="", properties={}, delivery_info={})


def _slow(job: Job) -> Outcome:
    time.sleep(0.3)
    return Outcome(tag=job.tag, state="SUCCESS", action=ACK)


def _collect(pool: PreforkPool, count: int) -> dict[int, str]:
    done: dict[int, str] = {}
    deadline = time.monotonic() + 10
    while len(done) < count and time.monotonic() < deadline:
        done.update((outcome.tag, outcome.action) for outcome in pool.collect(0.1))
    return done


def test_prefork_skip_queued_hands_back_the_jobs_not_started_yet() -> None:
    pool = PreforkPool(_slow, 1, depth=4)
    pool.start()
    try:
        for tag in (1, 2, 3):
            pool.submit(_job(tag))
        wait_for(lambda: pool.started() == [1], timeout=5)
        pool.skip_queued()  # 2 and 3 wait in the queue: they must not start
        pool.submit(_job(4))  # submitted afterwards (a new connection's): it runs
        done = _collect(pool, 4)
    finally:
        pool.stop()
    assert done == {1: ACK, 2: SKIP, 3: SKIP, 4: ACK}
    assert pool.busy() == 0


def test_prefork_without_skip_runs_every_queued_job() -> None:
    pool = PreforkPool(_slow, 1, depth=4)
    pool.start()
    try:
        for tag in (1, 2, 3):
            pool.submit(_job(tag))
        done = _collect(pool, 3)
    finally:
        pool.stop()
    assert done == {1: ACK, 2: ACK, 3: ACK}


@pytest.mark.parametrize("name", ["threads", "solo"])
def test_pools_that_queue_nothing_skip_nothing(name: str) -> None:
    pool = POOLS[name](_slow, 1)
    pool.start()
    try:
        pool.submit(_job(1))
        pool.skip_queued()
        done: list[Outcome] = []
        deadline = time.monotonic() + 5
        while not done and time.monotonic() < deadline:
            done += pool.collect(0.1)
    finally:
        pool.stop()
    assert [(outcome.tag, outcome.action) for outcome in done] == [(1, ACK)]
