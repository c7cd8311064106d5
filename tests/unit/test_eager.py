"""Eager mode and direct calls: in-process, but through an encoded message."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask, current_app, g

from flask_tasks import EagerResult, Task, Tasks, signals, states
from flask_tasks.exceptions import EncodeError, Ignore

tasks = Tasks()
calls: list[str] = []


class Tracking(Task):
    def before_start(self, task_id, args, kwargs):  # type: ignore[no-untyped-def]
        calls.append("before_start")

    def on_success(self, retval, task_id, args, kwargs):  # type: ignore[no-untyped-def]
        calls.append(f"on_success:{retval}")

    def on_failure(self, exc, task_id, args, kwargs, einfo):  # type: ignore[no-untyped-def]
        calls.append(f"on_failure:{type(exc).__name__}")

    def after_return(self, status, retval, task_id, args, kwargs, einfo):  # type: ignore[no-untyped-def]
        calls.append(f"after_return:{status}" + (f":{type(retval).__name__}"
                                                     if isinstance(retval, Exception) else ""))


@tasks.task(name="eager.add", base=Tracking)
def add(x: int, y: int) -> int:
    return x + y


@tasks.task(name="eager.boom", base=Tracking)
def boom() -> None:
    raise KeyError("missing")


@tasks.task(name="eager.ignored", base=Tracking)
def ignored() -> None:
    raise Ignore()


@tasks.task(name="eager.retried", base=Tracking, bind=True, max_retries=1)
def retried(self: Task) -> str:
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return "second"


@tasks.task(name="eager.ctx", bind=True)
def ctx(self: Task) -> dict:
    g.seen = True
    return {"app": current_app.name, "id": self.request.id, "eager": self.request.is_eager,
            "args": self.request.args}


@tasks.task(name="eager.tuple")
def returns_tuple() -> tuple:
    return (1, 2)


@tasks.task(name="eager.set")
def returns_set() -> set:
    return {1}


@pytest.fixture()
def app(tmp_path: Path) -> Iterator[Flask]:
    app = Flask("eager_app", instance_path=str(tmp_path))
    app.config.update(TASKS_ALWAYS_EAGER=True)
    tasks.init_app(app)
    teardowns: list[object] = []
    app.teardown_appcontext(lambda exc: teardowns.append(exc))
    app.extensions["teardowns"] = teardowns
    calls.clear()
    with app.app_context():
        yield app


def test_delay_runs_here_and_returns_eager_result(app: Flask) -> None:
    result = add.delay(2, 3)
    assert isinstance(result, EagerResult)
    assert result.get() == 5 and result.state == states.SUCCESS and result.successful()
    assert calls == ["before_start", "on_success:5", "after_return:SUCCESS"]


def test_eager_still_encodes(app: Flask) -> None:
    with pytest.raises(EncodeError):
        add.delay({1}, 2)  # type: ignore[arg-type]
    assert returns_tuple.delay().get() == [1, 2]  # JSON turns tuples into lists, as in production
    result = returns_set.delay()
    assert result.state == states.FAILURE
    with pytest.raises(EncodeError):
        result.get()


def test_failure_is_stored_not_raised_unless_propagating(app: Flask) -> None:
    result = boom.delay()
    assert result.state == states.FAILURE and result.failed()
    assert "KeyError" in (result.traceback or "")
    with pytest.raises(KeyError):
        result.get()
    assert calls[-2:] == ["on_failure:KeyError", "after_return:FAILURE:KeyError"]
    with pytest.raises(KeyError):
        boom.apply(throw=True)


def test_after_return_only_after_success_or_failure(app: Flask) -> None:
    """As in Celery: no after_return after Ignore or a retry (task_postrun still)."""
    postrun: list[str] = []

    def on_postrun(sender: object, **kwargs: object) -> None:
        postrun.append(str(kwargs["state"]))

    signals.task_postrun.connect(on_postrun)
    try:
        ignored.delay()
        assert calls == ["before_start"]
        calls.clear()
        assert retried.delay().get() == "second"
        assert calls == ["before_start", "before_start", "on_success:second",
                         "after_return:SUCCESS"]
    finally:
        signals.task_postrun.disconnect(on_postrun)
    assert postrun == [states.IGNORED, states.RETRY, states.SUCCESS]


def test_runs_in_app_context_with_teardown(app: Flask) -> None:
    before = len(app.extensions["teardowns"])
    value = ctx.delay().get()
    assert value["app"] == "eager_app" and value["eager"] is True and value["id"]
    assert len(app.extensions["teardowns"]) == before + 1


def test_direct_call_runs_function(app: Flask) -> None:
    assert add(2, 2) == 4
    assert ctx()["args"] == []


def test_signals_fire(app: Flask) -> None:
    seen: list[tuple[str, object]] = []

    def on_prerun(sender, **kw):  # type: ignore[no-untyped-def]
        seen.append(("prerun", kw["task_id"]))

    def on_success(sender, **kw):  # type: ignore[no-untyped-def]
        seen.append(("success", kw["result"]))

    def broken(sender, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("receiver bug")

    with signals.task_prerun.connected_to(on_prerun), \
            signals.task_success.connected_to(on_success), \
            signals.task_postrun.connected_to(broken):
        result = add.delay(1, 1)
    assert seen == [("prerun", result.id), ("success", 2)]
    assert result.get() == 2


def test_apply_without_eager_config(tmp_path: Path) -> None:
    app = Flask("apply_app", instance_path=str(tmp_path))
    other = Tasks(app)

    @other.task(name="eager.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    with app.app_context():
        assert mul.apply((3, 4)).get() == 12
    assert mul.apply((2, 4)).get() == 8  # Tasks(app) serves calls outside a context too


def test_store_eager_result(tmp_path: Path) -> None:
    app = Flask("store_eager", instance_path=str(tmp_path))
    app.config.update(TASKS_ALWAYS_EAGER=True, TASKS_STORE_EAGER_RESULT=True)
    tasks.init_app(app)
    with app.app_context():
        result = add.delay(20, 22)
        assert tasks.AsyncResult(result.id).get(timeout=1) == 42
        assert tasks.AsyncResult(boom.delay().id).state == states.FAILURE
