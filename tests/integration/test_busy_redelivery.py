"""A dead worker's messages come back while every worker is busy, not only when one idles.

kombu restores unacknowledged messages older than ``visibility_timeout`` only
when a poll finds the queues empty: under steady load, the messages of a
SIGKILLed worker never came back. Here worker A (``-c 1``, prefetch 4)
reserves four ``acks_late`` tasks, one of them running, and is SIGKILLed;
worker B (``-c 1``) is started into a queue that a thread keeps from ever
emptying (short tasks, refilled whenever fewer than :data:`LOW` wait). Each
of A's tasks must be SUCCESS within ``visibility_timeout`` + :data:`SLACK`
seconds of the kill (docs/delivery.md: ``visibility_timeout`` + 1 s + the
time until a worker takes its next message; here also B's start, ~2 s, and
A's tasks themselves, 1.8 s, run one after the other on B). ``-s`` prints
each task's delays and what B did meanwhile.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from flask_tasks import states
from flask_tasks.result import AsyncResult
from tests.apps import basic
from tests.helpers import StartWorker, redis_waiting_clients, wait_for

APP = "tests.apps.basic:create_app"
VISIBILITY = 5.0
SLACK = 5.0
CONFIG = json.dumps({"TASKS_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": VISIBILITY}})
#: A's tasks: (tag, seconds). The first runs when A is killed, the others wait in A.
HELD = [("held-0", 1.5), ("held-1", 0.1), ("held-2", 0.1), ("held-3", 0.1)]
#: The queue is refilled with FILL short tasks of FILLER_SECONDS whenever fewer than LOW wait.
LOW, FILL, FILLER_SECONDS = 8, 8, 0.05


class Filler(threading.Thread):
    """Keeps the queue from emptying, and samples it (length; any worker waiting idle)."""

    def __init__(self, app: Flask, url: str) -> None:
        super().__init__(name="Filler", daemon=True)
        self.app = app
        self.url = url
        self.client = redis.Redis.from_url(url)
        self.stopped = threading.Event()
        self.measuring = False
        self.published: list[AsyncResult[Any]] = []
        self.samples = 0
        self.shortest = 1 << 30
        self.idle_samples = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.app.app_context():
                while not self.stopped.is_set():
                    length = int(self.client.llen("celery"))
                    if self.measuring:
                        self.samples += 1
                        self.shortest = min(self.shortest, length)
                        self.idle_samples += redis_waiting_clients(self.url) > 0
                    if length < LOW:
                        self.published += [basic.sleep.delay(FILLER_SECONDS)
                                           for _ in range(FILL)]
                    self.stopped.wait(0.02)
        except BaseException as exc:  # shown by the test
            self.error = exc

    def done(self) -> int:
        return sum(result.state == states.SUCCESS for result in self.published)


def runs(instance: Path) -> list[str]:
    """The tags ``record`` ran with, in order (one line per run)."""
    path = instance / "runs.txt"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(120)
def test_killed_workers_tasks_return_while_every_worker_is_busy(
        basic_app: Flask, redis_env: dict[str, str], redis_url: str, start_worker: StartWorker,
        tmp_path: Path) -> None:
    env = {**redis_env, "TEST_CONFIG": CONFIG}
    client = redis.Redis.from_url(redis_url)
    first = start_worker(APP, "-c", "1", env=env)
    held = {tag: basic.record.delay(tag, seconds) for tag, seconds in HELD}
    # A runs the first and holds the other three (acks_late: all four unacknowledged);
    # its prefetch (4) is full, so it takes none of the filler's tasks.
    wait_for(lambda: runs(tmp_path) == ["held-0"] and client.hlen("unacked") == len(HELD),
             timeout=10, interval=0.01, message="worker A running one task and holding four")
    filler = Filler(basic_app, redis_url)
    filler.start()
    wait_for(lambda: client.llen("celery") >= LOW, timeout=5, message="a full queue")
    first.kill_group()  # kill -9: the four stay recorded as unacknowledged
    killed = time.monotonic()
    try:
        start_worker(APP, "-c", "1", env=env)  # the only worker, busy from its first message
        filler.measuring = True
        fillers_before = filler.done()
        redelivered: dict[str, float] = {}
        succeeded: dict[str, float] = {}

        def all_done() -> bool:
            now = time.monotonic() - killed
            seen = runs(tmp_path)[1:]  # after A's run of held-0
            for tag, result in held.items():
                if tag not in redelivered and tag in seen:
                    redelivered[tag] = now
                if tag not in succeeded and result.state == states.SUCCESS:
                    succeeded[tag] = now
            return len(succeeded) == len(held)

        finished = True
        try:
            wait_for(all_done, timeout=VISIBILITY + SLACK + 20, interval=0.05,
                     message="A's tasks to succeed")
        except AssertionError:
            finished = False
        filler.measuring = False
        fillers = filler.done() - fillers_before
    finally:
        filler.stopped.set()
        filler.join(10)
    lines = [f"busy redelivery (visibility_timeout {VISIBILITY} s, bound "
             f"{VISIBILITY + SLACK} s after the kill):"]
    for tag, _ in HELD:
        again = redelivered.get(tag)
        done = succeeded.get(tag)
        lines.append(f"  {tag}: ran again {again:.1f} s, " if again is not None
                     else f"  {tag}: never ran again, ")
        lines[-1] += f"SUCCESS {done:.1f} s after the kill" if done is not None else "not SUCCESS"
    lines.append(f"  meanwhile B ran {fillers} filler tasks; shortest queue seen "
                 f"{filler.shortest} in {filler.samples} samples; a worker seen waiting idle in "
                 f"{filler.idle_samples} of them")
    print("\n".join(lines))

    assert filler.error is None, f"the filler failed: {filler.error!r}"
    # The premise: the queue never emptied, so no worker could idle.
    assert filler.samples and filler.shortest > 0, "the queue emptied: B was not kept busy"
    assert fillers > 0, "B ran none of the filler tasks"
    assert finished, f"A's tasks did not all succeed: {sorted(set(held) - set(succeeded))}"
    late = {tag: round(delay, 1) for tag, delay in succeeded.items()
            if delay > VISIBILITY + SLACK}
    assert not late, f"SUCCESS later than {VISIBILITY + SLACK} s after the kill: {late}"
    # Each ran once more (held-0 also ran on A): restored once, not twice.
    assert sorted(runs(tmp_path)) == sorted(["held-0", *held])
