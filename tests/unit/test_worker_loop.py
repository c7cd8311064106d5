"""The worker's consume -> dispatch -> settle loop, driven in-process.

No sockets: kombu's ``memory://`` broker (so the worker sees it through the
generic :class:`~flask_tasks.transport.base.PlainChannel`), results in the
embedded SQLite backend of the test's folder, and the ``solo`` or
``threads`` pool, or a fake pool where a process would die or be killed.
Each test drives :meth:`Worker.consume` until its condition holds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from kombu import Connection, Producer, Queue
from kombu.message import Message

from flask_tasks import Tasks, protocol, states
from flask_tasks.exceptions import DecodeError, NotRegistered, TimeLimitExceeded, WorkerLostError
from flask_tasks.trace import ACK, REFUSE, Outcome
from flask_tasks.transport.base import PlainChannel
from flask_tasks.worker import executor
from flask_tasks.worker.consumer import Consumer, Settler, message_id
from flask_tasks.worker.dispatch import LOST_HEADER
from flask_tasks.worker.executor import Job, run_job
from flask_tasks.worker.main import Worker
from flask_tasks.worker.pools import LOST
from flask_tasks.worker.revokes import Revokes
from tests.unit.test_protocol import HEADERS, json_values, valid_headers


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
                serializer: str = "json", **options: Any) -> None:
    """Publish a message that no flask_tasks client would send (``options``: publish's)."""
    name = tasks.state(app).config.default_queue
    with Connection("memory://") as conn:
        Producer(conn.channel()).publish(body, routing_key=name, headers=headers,
                                         serializer=serializer, declare=[Queue(name)],
                                         **options)


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
    def skip_queued(self) -> None: ...
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


# -- no message takes the worker down ----------------------------------------------
class RecordingChannel(PlainChannel):
    """A worker channel whose broker keeps dead letters: records them, acks the message."""

    def __init__(self, channel: Any) -> None:
        super().__init__(channel)
        self.letters: list[tuple[str, str]] = []

    def dead_letter(self, message: Message, reason: str) -> bool:
        self.letters.append((message_id(message), reason))
        message.ack()
        return True


class FakeKombuChannel:
    """What a kombu Message needs of its channel: records acks and rejects."""

    no_ack_consumers = None

    def __init__(self) -> None:
        self.acked: list[Any] = []
        self.rejected: list[Any] = []

    def basic_ack(self, tag: Any, multiple: bool = False) -> None:
        self.acked.append(tag)

    def basic_reject(self, tag: Any, requeue: bool = False) -> None:
        self.rejected.append(tag)


class Checked:
    """A Consumer of the app's state on a fake channel; records what it stores and hands on."""

    def __init__(self, tasks: Tasks, app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
        self.state = tasks.state(app)
        self.kombu_channel = FakeKombuChannel()
        self.settler = Settler(Connection("memory://"))
        self.settler.attach(self.kombu_channel)
        self.dead = RecordingChannel(self.kombu_channel)
        self.stored: list[tuple[str, BaseException, str]] = []
        self.received: list[Message] = []
        monkeypatch.setattr(self.state.backend, "store_result",
                            lambda task_id, result, state, *a, **k:
                            self.stored.append((task_id, result, state)))
        self.consumer = Consumer(self.state, ["q"], Revokes(self.state, "h"), self.settler,
                                 lambda message, *flags: self.received.append(message),
                                 sender=None)
        self.logged: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: self.logged.append(record.getMessage())  # type: ignore
        logging.getLogger("flask_tasks.worker").addHandler(handler)
        self._handler = handler

    def close(self) -> None:
        logging.getLogger("flask_tasks.worker").removeHandler(self._handler)

    def deliver(self, headers: Any, body: bytes, content_type: Any = "application/json",
                encoding: Any = "utf-8", dead_letters: bool = False) -> Message:
        """Deliver one message as kombu does: on_message, or on_decode_error if kombu
        could not decompress it."""
        self.state.config = self.state.config.replace(dead_letter_rejected=dead_letters)
        self.settler.channel = self.dead if dead_letters else PlainChannel(self.kombu_channel)
        self.stored.clear(), self.received.clear(), self.logged.clear(),
        self.dead.letters.clear()
        message = Message(body=body, delivery_tag=str(uuid.uuid4()), content_type=content_type,
                          content_encoding=encoding,
                          headers=headers if isinstance(headers, dict) else None,
                          channel=self.kombu_channel)
        if not isinstance(headers, dict):  # kombu's Message would fail on them: still checked
            message.headers = headers
        if message.errors:
            try:
                message._reraise_error()
            except Exception as exc:
                self.consumer.on_decode_error(message, exc)
        else:
            self.consumer.on_message(message)
        return message

    def settled(self, message: Message) -> str:
        tag = message.delivery_tag
        done = [what for what, tags in (("acked", self.kombu_channel.acked),
                                        ("rejected", self.kombu_channel.rejected)) if tag in tags]
        if any(letter[0] == message_id(message) for letter in self.dead.letters):
            done = ["dead-lettered"] if done == ["acked"] else done + ["dead-lettered"]
        return "+".join(done) or "handed on"


@pytest.fixture()
def checked(app: Flask, tasks: Tasks, monkeypatch: pytest.MonkeyPatch) -> Iterator[Checked]:
    @tasks.task(name="hyp.add")
    def add(x: int, y: int) -> int:
        return x + y

    harness = Checked(tasks, app, monkeypatch)
    yield harness
    harness.close()


GOOD_BODY = json.dumps([[1, 2], {}, {}]).encode()


@st.composite
def task_messages(draw: st.DrawFn) -> tuple[Any, bytes, Any, Any]:
    """Headers valid or with one header of the wrong type, any JSON headers, or none;
    a good body, any JSON, or bytes; content types and encodings good and bad."""
    headers: Any = draw(valid_headers())
    if draw(st.booleans()):
        headers["task"] = "hyp.add"
    kind = draw(st.sampled_from(["valid", "valid", "one wrong", "any"]))
    if kind == "one wrong":
        key = draw(st.sampled_from(CHECKED_HEADERS))
        headers[key] = draw(HEADERS[key][1], label=key)
    elif kind == "any":
        headers = draw(json_values | st.dictionaries(st.sampled_from(sorted(HEADERS)),
                                                     json_values))
    body = draw(st.sampled_from([GOOD_BODY, None]))
    if body is None:
        body = draw(json_values.map(lambda value: json.dumps(value).encode())
                    | st.binary(max_size=30))
    content_type = draw(st.sampled_from(["application/json"] * 4
                                        + ["application/x-python-serialize", None, 5]))
    encoding = draw(st.sampled_from(["utf-8"] * 4 + ["binary", "no-such-codec", None, 5]))
    return headers, body, content_type, encoding


CHECKED_HEADERS = sorted(key for key in HEADERS if key not in ("lang", "argsrepr", "kwargsrepr"))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(message=task_messages(), dead_letters=st.booleans())
def test_on_message_never_raises_and_ends_every_message_where_a_caller_sees_it(
        checked: Checked, message: tuple[Any, bytes, Any, Any], dead_letters: bool) -> None:
    headers, body, content_type, encoding = message
    delivered = checked.deliver(headers, body, content_type, encoding, dead_letters)
    settled = checked.settled(delivered)
    event(settled)
    name, task_id = protocol.message_ids(delivered.headers)
    if settled == "handed on":
        assert checked.received == [delivered]
        assert protocol.read_headers(delivered.headers).task == "hyp.add"
        assert content_type == "application/json"
        assert protocol.check_content(content_type, encoding) is None
        return
    assert checked.received == []
    assert settled == ("dead-lettered" if dead_letters else "rejected")
    failures = [(stored_id, exc) for stored_id, exc, state in checked.stored
                if state == states.FAILURE]
    if task_id is not None:  # a refused content type too: the caller learns why
        [(stored_id, exc)] = failures
        assert stored_id == task_id and str(exc)
        assert any(task_id[:200] in line for line in checked.logged)
    else:
        assert failures == []
    assert any(line.startswith("Rejected ") for line in checked.logged)


@pytest.mark.parametrize(("header", "value", "reason"), [
    ("eta", 5, "header 'eta' is JSON number 5, not an ISO 8601 string"),
    ("expires", [1], "header 'expires' is JSON array [1], not an ISO 8601 string"),
    ("eta", "tomorrow", "header 'eta' is 'tomorrow', not an ISO 8601 date and time"),
    ("retries", "x", "header 'retries' is JSON string 'x', not an integer >= 0"),
    ("retries", True, "header 'retries' is JSON boolean True, not an integer >= 0"),
    ("timelimit", ["a", "b"], "header 'timelimit' is JSON array ['a', 'b'], not [hard, soft]"),
    ("timelimit", 5, "header 'timelimit' is JSON number 5, not [hard, soft]"),
    ("group", {}, "header 'group' is JSON object {}, not a string or null"),
    ("ignore_result", "yes", "header 'ignore_result' is JSON string 'yes', not a boolean"),
])
def test_a_header_of_the_wrong_type_is_refused_with_failure_stored(
        checked: Checked, header: str, value: Any, reason: str) -> None:
    task_id = str(uuid.uuid4())
    delivered = checked.deliver({"task": "hyp.add", "id": task_id, header: value}, GOOD_BODY)
    assert checked.settled(delivered) == "rejected"
    [(stored_id, exc, state)] = checked.stored
    assert (stored_id, state) == (task_id, states.FAILURE)
    assert isinstance(exc, DecodeError) and reason in str(exc)
    assert f"Rejected task hyp.add[{task_id}]: {reason}" in checked.logged[0]


def test_garbage_that_does_not_decompress_is_refused_with_failure_stored(
        checked: Checked) -> None:
    task_id = str(uuid.uuid4())
    delivered = checked.deliver({"task": "hyp.add", "id": task_id, "compression": "zlib"},
                                b"not zlib at all")
    assert delivered.errors  # kombu could not decompress it: on_decode_error
    assert checked.settled(delivered) == "rejected"
    [(stored_id, exc, state)] = checked.stored
    assert stored_id == task_id and "does not decompress as 'zlib'" in str(exc)
    unknown = checked.deliver({"task": "hyp.add", "id": task_id, "compression": "nope"},
                              GOOD_BODY)
    assert checked.settled(unknown) == "rejected"
    assert "header 'compression' is 'nope', not a compression kombu knows" \
        in str(checked.stored[0][1])


def test_a_refused_content_type_is_never_decoded_and_fails_its_task(checked: Checked) -> None:
    delivered = checked.deliver({"task": "hyp.add", "id": "p1"}, GOOD_BODY,
                                "application/x-python-serialize", "binary", dead_letters=True)
    assert checked.settled(delivered) == "dead-lettered" and checked.received == []
    [(task_id, error, state)] = checked.stored
    assert (task_id, state) == ("p1", states.FAILURE) and "is not accepted" in str(error)
    assert "Rejected task hyp.add[p1]: content type 'application/x-python-serialize' is not " \
        "accepted" in checked.logged[0]
    assert checked.dead.letters == [("p1", "content type 'application/x-python-serialize' is "
                                     "not accepted (accepted: json; see TASKS_ACCEPT_CONTENT).")]


def test_with_dead_letters_a_bad_body_is_set_aside_before_anything_acks_it(
        checked: Checked) -> None:
    delivered = checked.deliver({"task": "hyp.add", "id": "b1"}, b'{"not": "a body"}',
                                dead_letters=True)
    assert checked.settled(delivered) == "dead-lettered"
    assert "not [args, kwargs, embed]" in checked.dead.letters[0][1]
    assert checked.stored[0][0] == "b1" and checked.received == []
    checked.deliver({"task": "hyp.add", "id": "b2"}, b'{"not": "a body"}')
    assert len(checked.received) == 1  # without: decoded in the pool, as before


def test_a_broker_without_dead_letters_rejects_instead(checked: Checked) -> None:
    checked.dead.dead_letter = lambda message, reason: False  # type: ignore[method-assign]
    delivered = checked.deliver({"task": "hyp.nope", "id": "n1"}, GOOD_BODY, dead_letters=True)
    assert checked.settled(delivered) == "rejected"
    assert isinstance(checked.stored[0][1], NotRegistered)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(message=task_messages())
def test_run_job_never_raises_and_stores_failure_for_a_refused_message(
        app: Flask, tasks: Tasks, checked: Checked, message: tuple[Any, bytes, Any, Any]) -> None:
    headers, body, content_type, encoding = message
    checked.stored.clear()
    job = Job(1, headers, body, content_type, encoding, {}, {})
    outcome = run_job(app, checked.state, job, hostname="h")
    event(f"{outcome.action} {outcome.state}")
    name, task_id = protocol.message_ids(headers)
    if outcome.action == REFUSE:
        assert outcome.reason and outcome.reason.startswith("Rejected ")
        if task_id is not None:
            assert task_id in outcome.reason
        failures = [stored for stored in checked.stored if stored[2] == states.FAILURE]
        assert len(failures) == (1 if task_id is not None else 0)
    else:  # it ran (or had expired): add(1, 2), or a TypeError for other arguments
        assert protocol.read_headers(headers).task == "hyp.add"
        assert (outcome.state, outcome.retval) in ((states.SUCCESS, 3), (states.REVOKED, None)) \
            or (outcome.state == states.FAILURE and isinstance(outcome.exc, TypeError))


def test_an_internal_error_in_run_job_names_the_task_and_stores_failure(
        app: Flask, checked: Checked, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the trace broke")

    monkeypatch.setattr(executor, "trace_task", broken)
    job = Job(7, {"task": "hyp.add", "id": "i1"}, GOOD_BODY, "application/json", "utf-8",
              {}, {})
    outcome = run_job(app, checked.state, job)
    assert outcome.state == states.FAILURE and outcome.action == ACK
    assert "Internal error running task hyp.add[i1] (job 7)" in caplog.text
    assert [(task_id, state) for task_id, _, state in checked.stored] == [("i1", states.FAILURE)]


def test_bad_messages_do_not_take_the_loop_down(app: Flask, tasks: Tasks, make_worker: Any,
                                                caplog: pytest.LogCaptureFixture) -> None:
    @tasks.task(name="loop.sum")
    def total(x: int, y: int) -> int:
        return x + y

    bad = {f"bad-{n}": {key: value} for n, (key, value) in enumerate(
        [("eta", 5), ("expires", 5), ("retries", "x"), ("timelimit", ["a", "b"]),
         ("timelimit", 7), ("parent_id", 1), ("ignore_result", "no")])}
    for task_id, header in bad.items():
        publish_raw(app, tasks, GOOD_BODY, {"task": "loop.sum", "id": task_id, **header},
                    content_type="application/json", content_encoding="utf-8")
    bad["bad-encoding"] = {}
    publish_raw(app, tasks, GOOD_BODY, {"task": "loop.sum", "id": "bad-encoding"},
                content_type="application/json", content_encoding="no-such-codec")
    with app.app_context():
        after = total.delay(2, 2)
    worker = make_worker("solo")
    worker.run_until(lambda: after.state == states.SUCCESS
                     and all(state_of(tasks, app, task_id) == states.FAILURE
                             for task_id in bad))
    for task_id in bad:
        assert f"Rejected task loop.sum[{task_id}]: " in caplog.text
        assert isinstance(tasks.state(app).result(task_id).result, DecodeError)
    assert worker.held() == 0 and worker.queued() == 0


def test_a_body_that_does_not_decompress_fails_the_task(app: Flask, tasks: Tasks,
                                                        make_worker: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    @tasks.task(name="loop.sum")
    def total(x: int, y: int) -> int:
        return x + y

    for task_id, compression in (("zlib-1", "zlib"), ("nope-1", "nope")):
        publish_raw(app, tasks, b"garbage", {"task": "loop.sum", "id": task_id,
                                             "compression": compression},
                    content_type="application/json", content_encoding="utf-8")
    with app.app_context():
        after = total.delay(2, 2)
    worker = make_worker("solo")
    worker.run_until(lambda: after.state == states.SUCCESS
                     and state_of(tasks, app, "zlib-1") == states.FAILURE
                     and state_of(tasks, app, "nope-1") == states.FAILURE)
    assert "Rejected task loop.sum[zlib-1]: the body does not decompress as 'zlib'" \
        in caplog.text
    assert "Rejected task loop.sum[nope-1]: header 'compression' is 'nope'" in caplog.text
    assert worker.held() == 0 and worker.queued() == 0


class DeadLetterWorker(DrivenWorker):
    """A worker on memory:// whose channel keeps dead letters (:class:`RecordingChannel`)."""

    letters: RecordingChannel

    @contextmanager
    def extra_context(self, connection: Any, channel: Any) -> Iterator[None]:
        with super().extra_context(connection, channel):
            self.letters = RecordingChannel(channel)
            self.settler.channel = self._channel = self.letters
            yield


class RefusingPool(DyingPool):
    """An inline pool that refuses every job for its content, as run_job does."""

    name = "refusing"

    def submit(self, job: Job) -> None:
        self.jobs.append(job)
        self._done.append(Outcome(tag=job.tag, state=states.REJECTED, action=REFUSE,
                                  reason=f"Rejected task {job.headers['task']}"
                                         f"[{job.headers['id']}]: refused in the pool"))


@pytest.mark.parametrize("dead_letters", [True, False])
def test_rejections_are_set_aside_as_dead_letters_when_asked(
        app: Flask, tasks: Tasks, dead_letters: bool, caplog: pytest.LogCaptureFixture) -> None:
    state = tasks.state(app)
    state.config = state.config.replace(dead_letter_rejected=dead_letters)

    @tasks.task(name="loop.late_refused", acks_late=True)
    def late_refused() -> None: ...

    @tasks.task(name="loop.early_refused")
    def early_refused() -> None: ...

    unknown = str(uuid.uuid4())
    publish_raw(app, tasks, [[], {}, {}], {"task": "loop.nope", "id": unknown})
    publish_raw(app, tasks, [[], {}, {}], {"task": "loop.late_refused", "id": "eta-1",
                                           "eta": 5})
    with app.app_context():
        late, early = late_refused.delay(), early_refused.delay()
    worker = DeadLetterWorker(app, state, pool=RefusingPool, hostname="loop@test")
    worker.run_until(lambda: f"[{early.id}]: refused in the pool" in caplog.text
                     and f"[{late.id}]: refused in the pool" in caplog.text
                     and state_of(tasks, app, unknown) == states.FAILURE
                     and state_of(tasks, app, "eta-1") == states.FAILURE)
    letters = {task_id: reason for task_id, reason in worker.letters.letters}
    if dead_letters:
        # The consumer's refusals, and the pool's of a message not acknowledged yet.
        assert set(letters) == {unknown, "eta-1", late.id}
        assert "not registered" in letters[unknown]
        assert "header 'eta' is JSON number 5" in letters["eta-1"]
        assert letters[late.id].endswith("refused in the pool")
    else:
        assert letters == {}
    assert isinstance(state.result(unknown).result, NotRegistered)
    assert worker.held() == 0 and worker.queued() == 0  # early: acked when it was taken
