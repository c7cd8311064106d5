"""``rpc://`` without a server: configuration, the caller-only rule, reply_to, fork.

The round trips over RabbitMQ are in ``tests/integration/test_rpc_results.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_tasks import Tasks, states
from flask_tasks.backends import make_backend
from flask_tasks.backends.rpc import RPCBackend
from flask_tasks.backends.rpc.replies import newer
from flask_tasks.config import Config
from flask_tasks.exceptions import ImproperlyConfigured, ResultNotAvailable

#: Nothing listens there: a test that connected would fail.
NOWHERE = "amqp://guest:guest@127.0.0.1:1//"


def rpc_app(tmp_path: Path, broker: str | None) -> tuple[Flask, Tasks]:
    tasks = Tasks()
    app = Flask("rpc_app", instance_path=str(tmp_path))
    app.config["RESULT_BACKEND"] = "rpc://"
    if broker is not None:
        app.config["BROKER_URL"] = broker
    tasks.init_app(app)
    return app, tasks


@pytest.mark.parametrize("broker", [None, "redis://127.0.0.1:6379/0", "memory://"])
def test_rpc_needs_a_rabbitmq_broker(tmp_path: Path, broker: str | None) -> None:
    with pytest.raises(ImproperlyConfigured, match="needs a RabbitMQ broker") as info:
        rpc_app(tmp_path, broker)
    assert ("embedded broker" if broker is None else broker.split(":")[0]) in str(info.value)


def test_rpc_backend_is_made_without_io(tmp_path: Path) -> None:
    backend = make_backend("rpc://", Config(result_expires=60.0, revokes_expires=120.0),
                           broker_url=NOWHERE)
    assert isinstance(backend, RPCBackend) and not backend.polls
    assert backend.expires == 60.0 and backend.revokes_expires == 120.0
    app, tasks = rpc_app(tmp_path, NOWHERE)  # init_app connects to nothing either
    assert isinstance(tasks.state(app).backend, RPCBackend)


def test_a_task_this_process_did_not_send_is_a_clear_error() -> None:
    backend = RPCBackend(NOWHERE)
    for read in (backend.get_task_meta, backend.wait_for):
        with pytest.raises(ResultNotAvailable, match="not sent by this process") as info:
            read("someone-elses")
        assert "RESULT_BACKEND = 'redis://" in str(info.value)
    assert issubclass(ResultNotAvailable, ImproperlyConfigured)  # `flask tasks result`: 1 line


def test_a_state_without_reply_to_is_dropped_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    backend = RPCBackend(NOWHERE)
    with caplog.at_level(logging.WARNING, "flask_tasks.backends"):
        backend.store_result("t1", None, states.STARTED)  # would fail if it connected
        backend.store_result("t1", 3, states.SUCCESS, reply_to="")
        backend.store_result("t2", 3, states.SUCCESS)
    warned = [r.getMessage() for r in caplog.records if "without reply_to" in r.getMessage()]
    assert len(warned) == 2 and "t1" in warned[0] and "t2" in warned[1]


def test_send_task_puts_this_process_oid_in_reply_to(tmp_path: Path) -> None:
    app, tasks = rpc_app(tmp_path, NOWHERE)
    state = tasks.state(app)
    backend = state.backend
    assert isinstance(backend, RPCBackend)
    declared: list[str] = []
    backend.replies.declare = lambda: declared.append("queue")  # type: ignore[method-assign]
    sent: list[Any] = []
    state.publisher.publish = (  # type: ignore[method-assign]
        lambda message, queue, **kw: sent.append(message))

    @tasks.task(name="rpc.add")
    def add(x: int, y: int) -> int:
        return x + y

    with app.app_context():
        result = add.delay(1, 2)
        add.apply_async((1, 2), reply_to="somewhere")
    oid = backend.replies.oid
    assert [m.properties["reply_to"] for m in sent] == [oid, "somewhere"]
    assert declared == ["queue"]  # a call with its own reply_to needs no reply queue
    backend.replies.forget(result.id)  # known here: forgetting it is no error


def test_states_kept_per_task_ready_ones_final() -> None:
    backend = RPCBackend(NOWHERE)
    replies = backend.replies
    replies.sent("a")
    replies.sent("b")

    class Arrived:
        def __init__(self, task_id: str, status: str, result: Any = None) -> None:
            self.properties = {"correlation_id": task_id}
            self.meta = {"task_id": task_id, "status": status, "result": result}

        def decode(self) -> dict[str, Any]:
            return dict(self.meta)

    for message in (Arrived("a", states.STARTED), Arrived("b", states.SUCCESS, 2),
                    Arrived("a", states.SUCCESS, 1), Arrived("a", states.RECEIVED)):
        replies._on_message(message)  # type: ignore[arg-type]
    # Ready states are answered from what arrived, without touching the broker.
    assert backend.get_task_meta("a")["result"] == 1
    assert backend.wait_for("b", timeout=0)["result"] == 2
    backend.forget("b")
    assert backend.get_task_meta("a")["status"] == states.SUCCESS


def test_newer_state() -> None:
    def meta(status: str) -> dict[str, Any]:
        return {"status": status}

    assert newer(None, meta(states.RECEIVED))
    assert newer(meta(states.STARTED), meta("PROGRESS"))
    assert not newer(meta(states.SUCCESS), meta(states.STARTED))
    assert not newer(meta(states.STARTED), meta(states.RECEIVED))  # late, from the main process
    assert newer(meta(states.RETRY), meta(states.RECEIVED))


def test_a_forked_child_gets_its_own_oid_and_forgets_the_parents_tasks() -> None:
    backend = RPCBackend(NOWHERE)
    parent = backend.replies
    parent.sent("sent-by-parent")
    backend._pid = -1  # as in a forked child (reset_after_fork does the same)
    child = backend.replies
    assert child.oid != parent.oid
    with pytest.raises(ResultNotAvailable):
        backend.get_task_meta("sent-by-parent")
    backend.reset_after_fork()
    assert backend.replies.oid not in (parent.oid, child.oid)
