"""``trace_task`` driven in-process: the app, the backend and the config come from its arguments."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app
from hypothesis import given
from hypothesis import strategies as st

from flask_tasks import Task, Tasks, signals, states
from flask_tasks.backends.base import Backend
from flask_tasks.config import Config
from flask_tasks.exceptions import Reject
from flask_tasks.options import time_limits
from flask_tasks.protocol import Context, accept_set, build, parse
from flask_tasks.result import AsyncResult
from flask_tasks.trace import ACK, REQUEUE, backoff_delay, trace_task


class MemoryBackend(Backend):
    """Keeps the stored metas in a dict (a test double for the storage contract)."""

    def __init__(self) -> None:
        super().__init__()
        self.metas: dict[str, dict[str, Any]] = {}
        self.states: list[str] = []

    def _set(self, task_id: str, meta: dict[str, Any]) -> None:
        self.metas[task_id] = meta
        self.states.append(meta["status"])

    def _get(self, task_id: str) -> dict[str, Any] | None:
        return self.metas.get(task_id)

    def _delete(self, task_id: str) -> None:
        self.metas.pop(task_id, None)


class FakeState:
    """The state trace is given: a backend, a config, and a send_task that records."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.backend = MemoryBackend()
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, *,
                  task: Any = None, **options: Any) -> AsyncResult[Any]:
        self.sent.append({"name": name, "args": args, "kwargs": kwargs, **options})
        return self.result(options.get("task_id") or "", name)

    def send_on_commit(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        raise AssertionError("not used by trace")

    def apply_eagerly(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not used by trace")

    def result(self, task_id: str, task_name: str | None = None) -> AsyncResult[Any]:
        return AsyncResult(task_id, self.backend, task_name=task_name)


# Defined on a Tasks bound to no app: anything that looked its state up through
# current_app would fail with "not registered with this Tasks instance".
unbound = Tasks()
calls: list[str] = []


class Tracking(Task):
    def before_start(self, task_id, args, kwargs):  # type: ignore[no-untyped-def]
        calls.append(f"before_start:{current_app.name}")

    def on_success(self, retval, task_id, args, kwargs):  # type: ignore[no-untyped-def]
        calls.append(f"on_success:{retval}")

    def on_failure(self, exc, task_id, args, kwargs, einfo):  # type: ignore[no-untyped-def]
        calls.append(f"on_failure:{type(exc).__name__}")

    def on_retry(self, exc, task_id, args, kwargs, einfo):  # type: ignore[no-untyped-def]
        calls.append(f"on_retry:{type(exc).__name__}")

    def after_return(self, status, retval, task_id, args, kwargs, einfo):  # type: ignore[no-untyped-def]
        calls.append(f"after_return:{status}")


@unbound.task(name="trace.add", base=Tracking)
def add(x: int, y: int) -> int:
    return x + y


@unbound.task(name="trace.boom", base=Tracking)
def boom() -> None:
    raise KeyError("missing")


@unbound.task(name="trace.flaky", base=Tracking, bind=True, max_retries=2)
def flaky(self: Task) -> None:
    raise self.retry(exc=ConnectionError("down"), countdown=30, priority=4)


@unbound.task(name="trace.progress", bind=True)
def progress(self: Task) -> str:
    self.update_state(state="PROGRESS", meta={"done": 1})
    return "ok"


@unbound.task(name="trace.reject")
def reject() -> None:
    raise Reject("not now", requeue=True)


@unbound.task(name="trace.context")
def context() -> str:
    return str(current_app.name)


@pytest.fixture()
def app(tmp_path: Path) -> Iterator[Flask]:
    calls.clear()
    yield Flask("trace_app", instance_path=str(tmp_path))


def request_for(task: Task, *args: Any, delivery_info: dict[str, Any] | None = None,
                **options: Any) -> Context:
    """A request as a worker decodes it from a message."""
    message = build(task.name, options.pop("task_id", "id-1"), args, {}, **options)
    return parse(message.headers, message.body, message.content_type, message.content_encoding,
                 accept_set(["json"]), message.properties, delivery_info)


def test_success_runs_in_the_given_app_and_stores_in_the_given_backend(app: Flask) -> None:
    state = FakeState()
    seen: list[str] = []

    def record(name: str) -> Any:
        return lambda sender, **kw: seen.append(name)

    with signals.task_prerun.connected_to(record("prerun")), \
            signals.task_success.connected_to(record("success")), \
            signals.task_postrun.connected_to(record("postrun")):
        outcome = trace_task(app, state, add, request_for(add, 2, 3), hostname="w1")
    assert (outcome.state, outcome.retval, outcome.action) == (states.SUCCESS, 5, ACK)
    assert calls == ["before_start:trace_app", "on_success:5", "after_return:SUCCESS"]
    assert seen == ["prerun", "success", "postrun"]
    assert state.backend.metas["id-1"]["result"] == 5 and state.backend.states == ["SUCCESS"]
    assert trace_task(app, state, context, request_for(context)).retval == "trace_app"


def test_failure_is_stored_and_handled_not_raised(app: Flask) -> None:
    state = FakeState()
    failures: list[object] = []
    with signals.task_failure.connected_to(lambda sender, **kw: failures.append(kw["exception"])):
        outcome = trace_task(app, state, boom, request_for(boom))
    assert outcome.state == states.FAILURE and isinstance(outcome.exc, KeyError)
    assert "KeyError" in (outcome.traceback or "")
    assert calls == ["before_start:trace_app", "on_failure:KeyError", "after_return:FAILURE"]
    assert failures == [outcome.exc]
    assert state.backend.metas["id-1"]["status"] == states.FAILURE


def test_retry_is_published_through_the_given_state(app: Flask) -> None:
    """Not through current_app: the task's own Tasks is bound to no app at all."""
    state = FakeState()
    retried: list[int] = []
    def on_retry(sender: Any, **kw: Any) -> None:
        retried.append(kw["request"].retries)

    with signals.task_retry.connected_to(on_retry):
        outcome = trace_task(app, state, flaky,
                             request_for(flaky, delivery_info={"routing_key": "hipri"},
                                         time_limit=9.0))
    assert outcome.state == states.RETRY and retried == [0]
    assert calls == ["before_start:trace_app", "on_retry:ConnectionError"]  # no after_return
    assert state.backend.states == [states.RETRY]
    [sent] = state.sent
    assert sent["name"] == "trace.flaky" and sent["task_id"] == "id-1"
    assert sent["retries"] == 1 and sent["countdown"] == 30 and sent["priority"] == 4
    assert sent["queue"] == "hipri" and sent["time_limit"] == 9.0


def test_update_state_goes_to_the_given_backend(app: Flask) -> None:
    state = FakeState()
    outcome = trace_task(app, state, progress, request_for(progress))
    assert outcome.retval == "ok" and state.backend.states == ["PROGRESS", states.SUCCESS]


def test_config_comes_from_the_given_state(app: Flask) -> None:
    tracked = FakeState(Config(track_started=True))
    trace_task(app, tracked, add, request_for(add, 1, 1))
    assert tracked.backend.states == [states.STARTED, states.SUCCESS]
    ignoring = FakeState(Config(ignore_result=True))
    assert trace_task(app, ignoring, add, request_for(add, 1, 1)).retval == 2
    assert ignoring.backend.states == []
    assert trace_task(app, FakeState(), add, request_for(add, 1, 1), store=False).retval == 2


def test_expired_call_is_not_run(app: Flask) -> None:
    state = FakeState()
    revoked: list[bool] = []
    past = datetime.now(UTC) - timedelta(seconds=5)
    with signals.task_revoked.connected_to(lambda sender, **kw: revoked.append(kw["expired"])):
        outcome = trace_task(app, state, add, request_for(add, 1, 2, expires=past))
    assert outcome.state == states.REVOKED and calls == [] and revoked == [True]
    assert state.backend.states == [states.REVOKED]


def test_reject_tells_the_worker_to_requeue(app: Flask) -> None:
    state = FakeState()
    outcome = trace_task(app, state, reject, request_for(reject))
    assert (outcome.state, outcome.action) == (states.REJECTED, REQUEUE)
    assert "not now" in (outcome.reason or "") and state.backend.states == []


# -- what a message carries cannot make trace raise --------------------------------
def test_a_soft_time_limit_past_what_the_timer_holds_still_runs(app: Flask) -> None:
    state = FakeState()
    request = request_for(add, 1, 2, soft_time_limit=1e12)  # setitimer refuses > ~9.2e9 s
    assert request.timelimit == (None, 1e12)
    outcome = trace_task(app, state, add, request)
    assert (outcome.state, outcome.retval) == (states.SUCCESS, 3)


def test_a_failing_started_store_does_not_stop_the_task(app: Flask,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    state = FakeState(Config(track_started=True))
    real = state.backend._set

    def no_started(task_id: str, meta: dict[str, Any]) -> None:
        if meta["status"] == states.STARTED:
            raise ConnectionError("results down")
        real(task_id, meta)

    state.backend._set = no_started  # type: ignore[method-assign]
    outcome = trace_task(app, state, add, request_for(add, 2, 2))
    assert outcome.retval == 4 and state.backend.states == [states.SUCCESS]
    assert "Could not store the start of task trace.add[id-1]" in caplog.text


@given(st.integers(min_value=0, max_value=10**12), st.floats(min_value=0, max_value=1e6))
def test_backoff_is_cheap_and_bounded_for_any_retries(retries: int, maximum: float) -> None:
    assert 0 <= backoff_delay(True, retries, maximum, jitter=False) <= maximum
    assert 0 <= backoff_delay(0.5, retries, maximum, jitter=True) <= maximum


@given(st.one_of(st.none(), st.integers(), st.floats(), st.text(), st.booleans(),
                 st.lists(st.one_of(st.none(), st.integers(), st.floats(), st.text(),
                                    st.booleans(), st.integers(min_value=10**400)),
                          max_size=3)))
def test_time_limits_never_raise_on_a_message_value(timelimit: Any) -> None:
    hard, soft = time_limits(add, timelimit, Config(time_limit=30.0))
    assert hard is None or (isinstance(hard, float) and hard >= 0)
    assert soft is None or (isinstance(soft, float) and soft >= 0)
    if not (isinstance(timelimit, list) and len(timelimit) == 2):
        assert (hard, soft) == (30.0, None)  # the worker's, as if the message set none
