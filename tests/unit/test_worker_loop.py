"""The worker's consume -> dispatch -> settle loop, driven in-process.

No sockets: kombu's ``memory://`` broker (so the worker sees it through the
generic :class:`~flask_tasks.transport.base.PlainChannel`), results in the
embedded SQLite backend of the test's folder, and the ``solo`` or
``threads`` pool, or a fake pool where a process would die or be killed.
Each test drives :meth:`Worker.consume` until its condition holds.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from kombu import Connection, Producer, Queue

from flask_tasks import Tasks, states
from flask_tasks.exceptions import NotRegistered, TimeLimitExceeded, WorkerLostError
from flask_tasks.trace import Outcome
from flask_tasks.transport.base import PlainChannel
from flask_tasks.worker.dispatch import LOST_HEADER
from flask_tasks.worker.executor import Job
from flask_tasks.worker.main import Worker
from flask_tasks.worker.pools import LOST


class DrivenWorker(Worker):
    """A worker whose loop stops once ``until()`` is true; it keeps its kombu channel."""

    until: Callable[[], bool] = staticmethod(lambda: False)
    channel: Any = None

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any,
                         **kwargs: Any) -> None:
        self.channel = channel
        super().on_consume_ready(connection, channel, consumers, **kwargs)

    def on_iteration(self) -> None:
        super().on_iteration()
        if self.until():
            self.should_stop = True

    def held(self) -> int:
        """Messages delivered to this worker and not settled yet."""
        return int(self.prefetch_count - self.channel.qos.can_consume_max_estimate())

    def queued(self) -> int:
        """Messages waiting in the worker's (first) queue on the broker."""
        with Connection("memory://") as conn:
            queue = Queue(self.queues[0]).bind(conn.default_channel)
            return int(queue.queue_declare(passive=True).message_count)

    def run_until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        self.until = lambda: bool(predicate()) or time.monotonic() > deadline
        self.should_stop = False
        for _ in self.consume(safety_interval=0.01):
            pass
        assert predicate(), f"not within {timeout} s"


@pytest.fixture()
def app(tmp_path: Path) -> Iterator[Flask]:
    """An app on memory:// with its own queue; results in the test's folder."""
    app = Flask("loop_app", instance_path=str(tmp_path))
    app.config.update(BROKER_URL="memory://", TASKS_DEFAULT_QUEUE=f"loop-{uuid.uuid4().hex}",
                      TASKS_BROKER_TRANSPORT_OPTIONS={"polling_interval": 0.01})
    yield app


@pytest.fixture()
def tasks(app: Flask) -> Tasks:
    return Tasks(app)


@pytest.fixture()
def make_worker(app: Flask, tasks: Tasks) -> Iterator[Callable[..., DrivenWorker]]:
    made: list[DrivenWorker] = []

    def make(pool: Any = "solo", **options: Any) -> DrivenWorker:
        worker = DrivenWorker(app, tasks.state(app), pool=pool, hostname="loop@test",
                              **options)
        worker.pool.start()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.pool.stop()
    tasks.state(app).publisher.close()


def state_of(tasks: Tasks, app: Flask, task_id: str) -> str:
    return tasks.state(app).result(task_id).state


def publish_raw(app: Flask, tasks: Tasks, body: Any, headers: dict[str, Any] | None,
                serializer: str = "json") -> None:
    """Publish a message that no flask_tasks client would send."""
    name = tasks.state(app).config.default_queue
    with Connection("memory://") as conn:
        Producer(conn.channel()).publish(body, routing_key=name, headers=headers,
                                         serializer=serializer, declare=[Queue(name)])


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_a_message_runs_and_is_acknowledged(app: Flask, tasks: Tasks, make_worker: Any,
                                            pool: str, caplog: pytest.LogCaptureFixture) -> None:
    @tasks.task(name="loop.add")
    def add(x: int, y: int) -> int:
        return x + y

    caplog.set_level(logging.INFO, logger="flask_tasks")
    worker = make_worker(pool, concurrency=2)
    with app.app_context():
        result = add.delay(2, 3)
    worker.run_until(lambda: result.state == states.SUCCESS)
    assert result.get(timeout=1) == 5
    assert isinstance(worker.settler.channel, PlainChannel)
    assert worker.held() == 0 and worker.queued() == 0
    assert f"Task loop.add[{result.id}] received" in caplog.text


def test_acks_late_is_acknowledged_when_the_task_has_ended(app: Flask, tasks: Tasks,
                                                          make_worker: Any) -> None:
    started, release = threading.Event(), threading.Event()

    @tasks.task(name="loop.late", acks_late=True)
    def late() -> str:
        started.set()
        release.wait(5)
        return "done"

    worker = make_worker("threads", concurrency=1)
    with app.app_context():
        result = late.delay()
    worker.run_until(started.is_set)
    assert worker.held() == 1  # running: not acknowledged yet
    release.set()
    worker.run_until(lambda: result.state == states.SUCCESS and worker.held() == 0)
    assert worker.queued() == 0


def test_early_ack_is_sent_before_the_task_runs(app: Flask, tasks: Tasks,
                                               make_worker: Any) -> None:
    seen: list[int] = []
    worker: DrivenWorker

    @tasks.task(name="loop.early")
    def early() -> None:
        seen.append(worker.held())

    worker = make_worker("solo")
    with app.app_context():
        result = early.delay()
    worker.run_until(lambda: result.state == states.SUCCESS)
    assert seen == [0]


def test_a_rate_limited_task_waits_while_others_run(app: Flask, tasks: Tasks,
                                                   make_worker: Any) -> None:
    ran: list[tuple[str, float]] = []

    @tasks.task(name="loop.limited", rate_limit="5/s")
    def limited() -> None:
        ran.append(("limited", time.monotonic()))

    @tasks.task(name="loop.free")
    def free() -> None:
        ran.append(("free", time.monotonic()))

    worker = make_worker("solo")
    with app.app_context():
        for _ in range(3):
            limited.delay()
        free.delay()
    worker.run_until(lambda: len(ran) == 4)
    assert [name for name, _ in ran] == ["limited", "free", "limited", "limited"]
    times = [at for name, at in ran if name == "limited"]
    # 5 per second, bursts of one: 0.2 s apart (a little less for the bucket's clock)
    assert all(later - earlier >= 0.15 for earlier, later in pairwise(times)), times
    assert worker.held() == 0 and worker.queued() == 0


def test_a_revoked_message_is_dropped(app: Flask, tasks: Tasks, make_worker: Any,
                                      caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    @tasks.task(name="loop.revoked")
    def revoked() -> None:
        ran.append("revoked")

    @tasks.task(name="loop.kept")
    def kept() -> None:
        ran.append("kept")

    caplog.set_level(logging.INFO, logger="flask_tasks")
    task_id = str(uuid.uuid4())
    with app.app_context():
        tasks.control.revoke(task_id)
        revoked.apply_async(task_id=task_id)
        other = kept.delay()
    worker = make_worker("solo")
    worker.run_until(lambda: other.state == states.SUCCESS
                     and state_of(tasks, app, task_id) == states.REVOKED)
    assert ran == ["kept"]
    assert f"Task loop.revoked[{task_id}] was revoked: not run." in caplog.text
    assert f"Task loop.revoked[{task_id}] received" not in caplog.text  # dropped on arrival
    assert worker.held() == 0 and worker.queued() == 0


def test_a_message_revoked_while_it_waits_in_the_worker_is_dropped(
        app: Flask, tasks: Tasks, make_worker: Any) -> None:
    ran: list[str] = []

    @tasks.task(name="loop.slowly", rate_limit="20/m")  # one every 3 s
    def slowly(n: str) -> None:
        ran.append(n)

    worker = make_worker("solo")
    with app.app_context():
        first, waiting = slowly.delay("first"), slowly.delay("waiting")

    # It is dropped when its turn comes (its rate limit allows it), not run.
    def revoke_once_it_waits() -> bool:  # the loop must go on: a reconnect drops the buffer
        if first.state == states.SUCCESS and len(worker.dispatcher.buffer) == 1:
            with app.app_context():
                waiting.revoke()
        return waiting.state == states.REVOKED

    worker.run_until(revoke_once_it_waits)
    assert ran == ["first"]
    assert worker.held() == 0 and worker.queued() == 0


def test_malformed_messages_are_rejected_with_a_reason(app: Flask, tasks: Tasks,
                                                       make_worker: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    unknown_id = str(uuid.uuid4())
    publish_raw(app, tasks, {"hello": 1}, None)
    publish_raw(app, tasks, [[2, 3], {}, {}], {"task": "loop.any", "id": "p1"}, "pickle")
    publish_raw(app, tasks, [[], {}, {}], {"task": "loop.nope", "id": unknown_id})
    worker = make_worker("solo")
    reasons = [
        "lack 'task' and 'id': not a Celery protocol 2 task message",
        "content type 'application/x-python-serialize' is not accepted",
        f"Rejected task loop.nope[{unknown_id}]: Task 'loop.nope' is not registered",
    ]
    worker.run_until(lambda: all(reason in caplog.text for reason in reasons))
    assert worker.held() == 0 and worker.queued() == 0
    result = tasks.state(app).result(unknown_id)
    assert result.state == states.FAILURE and isinstance(result.result, NotRegistered)


class DyingPool:
    """A pool whose process dies in every job, as with a task that kills its process."""

    name = "dying"
    inline = True
    queues_jobs = False

    def __init__(self, runner: Any, limit: int, **_: Any) -> None:
        self.limit = 1
        self.jobs: list[Job] = []
        self._done: list[Outcome] = []

    def start(self) -> None: ...
    def free(self) -> int: return 1
    def busy(self) -> int: return 0
    def started(self) -> list[int]: return []
    def begin_shutdown(self) -> None: ...
    def stop(self, cold: bool = False) -> None: ...
    def terminate_job(self, tag: int) -> bool: return False

    def submit(self, job: Job) -> None:
        self.jobs.append(job)
        self._done.append(Outcome(tag=job.tag, state=states.FAILURE, action=LOST,
                                  reason="Worker process 4242 exited with code -9 (signal 9)"))

    def collect(self, timeout: float) -> list[Outcome]:
        done, self._done = self._done, []
        return done


def test_a_poison_message_is_delivered_again_up_to_the_cap(app: Flask, tasks: Tasks,
                                                          make_worker: Any,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    @tasks.task(name="loop.poison", acks_late=True, reject_on_worker_lost=True)
    def poison() -> None: ...

    @tasks.task(name="loop.lost")  # not acks_late: fails at the first death
    def lost() -> None: ...

    worker = make_worker(DyingPool)
    with app.app_context():
        result = poison.delay()
        once = lost.delay()
    worker.run_until(lambda: result.state == states.FAILURE and once.state == states.FAILURE)
    pool = worker.pool
    assert isinstance(pool, DyingPool)
    deaths = [job.headers.get(LOST_HEADER) for job in pool.jobs
              if job.headers["task"] == "loop.poison"]
    assert deaths == [None, 1, 2]  # TASKS_POISON_MAX_DELIVERIES = 3
    assert "will run again (Worker process 4242 exited with code -9 (signal 9); 1 of 3)" \
        in caplog.text
    assert isinstance(result.result, WorkerLostError)
    assert "killed its process 3 times" in str(result.result)
    assert isinstance(once.result, WorkerLostError)
    assert [job.headers["task"] for job in pool.jobs].count("loop.lost") == 1
    assert worker.held() == 0 and worker.queued() == 0


class KillablePool(DyingPool):
    """A pool whose jobs wait in a queue, start when collected, and run until killed."""

    name = "killable"
    inline = False
    queues_jobs = True

    def __init__(self, runner: Any, limit: int, **_: Any) -> None:
        super().__init__(runner, limit)
        self.running: list[int] = []
        self.killed: list[int] = []

    def busy(self) -> int:
        return len(self.running)

    def started(self) -> list[int]:
        return list(self.running)

    def submit(self, job: Job) -> None:
        self.jobs.append(job)
        self.running.append(job.tag)

    def terminate_job(self, tag: int) -> bool:
        self.killed.append(tag)
        return True

    def collect(self, timeout: float) -> list[Outcome]:
        dead = [tag for tag in self.running if tag in self.killed]
        self.running = [tag for tag in self.running if tag not in dead]
        return [Outcome(tag=tag, state=states.FAILURE, action=LOST, reason="killed")
                for tag in dead]


def test_a_job_past_its_hard_time_limit_is_killed(app: Flask, tasks: Tasks,
                                                 make_worker: Any) -> None:
    @tasks.task(name="loop.stuck", time_limit=0.1)
    def stuck() -> None: ...

    worker = make_worker(KillablePool)
    with app.app_context():
        result = stuck.delay()
    worker.run_until(lambda: result.state == states.FAILURE)
    pool = worker.pool
    assert isinstance(pool, KillablePool)
    assert len(pool.killed) == 1
    assert isinstance(result.result, TimeLimitExceeded)
    assert "ran past its time limit of 0.1 s" in str(result.result)
    assert worker.held() == 0  # acknowledged when it started


def test_an_early_message_runs_at_once_on_a_broker_without_delayed_store(
        app: Flask, tasks: Tasks, make_worker: Any, caplog: pytest.LogCaptureFixture) -> None:
    @tasks.task(name="loop.later")
    def later() -> int:
        return 1

    worker = make_worker("solo")
    with app.app_context():
        result = later.apply_async(countdown=60)
    worker.run_until(lambda: result.state == states.SUCCESS)
    assert "This broker keeps no delayed messages" in caplog.text
