"""Behaviour pinned after review: options, headers, names, config edge cases, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import insert

from flask_tasks import Tasks, shared_task, states
from flask_tasks.backends.sql import SQLBackend, taskmeta
from flask_tasks.config import load
from flask_tasks.exceptions import DecodeError


def make_app(tmp_path: Path, **config: Any) -> Flask:
    app = Flask("fixes_app", instance_path=str(tmp_path))
    app.config.update(config)
    return app


def capture(tasks: Tasks, app: Flask) -> list[dict[str, Any]]:
    """Record what would be published (a unit-test double for the broker)."""
    sent: list[dict[str, Any]] = []
    publisher = tasks.state(app).publisher
    publisher.publish = lambda message, queue, **kw: sent.append(  # type: ignore[method-assign]
        {"message": message, "queue": queue.name, **kw})
    return sent


def test_priority_precedence(tmp_path: Path) -> None:
    tasks = Tasks()
    app = make_app(tmp_path, TASKS_DEFAULT_PRIORITY=3, RESULT_BACKEND="disabled")
    tasks.init_app(app)

    @tasks.task(name="fixes.plain")
    def plain() -> None: ...

    @tasks.task(name="fixes.urgent", priority=9)
    def urgent() -> None: ...

    sent = capture(tasks, app)
    with app.app_context():
        plain.delay()
        urgent.delay()
        plain.apply_async(priority=1)
    assert [s["priority"] for s in sent] == [3, 9, 1]


def test_result_expires_none_means_forever() -> None:
    assert load({"TASKS_RESULT_EXPIRES": None}).result_expires is None
    assert load({}).result_expires == 86400.0


def test_apply_checks_arguments_and_eager_rejects_unknown_options(tmp_path: Path) -> None:
    tasks = Tasks()
    app = make_app(tmp_path, TASKS_ALWAYS_EAGER=True)
    tasks.init_app(app)

    @tasks.task(name="fixes.one")
    def one(x: int) -> int:
        return x

    with app.app_context():
        with pytest.raises(TypeError, match="wrong arguments"):
            one.apply(())
        with pytest.raises(TypeError, match="Unknown apply_async option"):
            one.apply_async((1,), contdown=5)


def test_headers_cannot_replace_protocol_headers(tmp_path: Path) -> None:
    tasks = Tasks()
    app = make_app(tmp_path, RESULT_BACKEND="disabled")
    tasks.init_app(app)

    @tasks.task(name="fixes.h")
    def h() -> None: ...

    sent = capture(tasks, app)
    with app.app_context():
        with pytest.raises(ValueError, match="protocol headers \\['id'\\]"):
            h.apply_async(headers={"id": "forged"})
        h.apply_async(headers={"x-trace": "abc"})
    assert sent[0]["message"].headers["x-trace"] == "abc"


def test_shared_and_app_task_names_clash() -> None:
    tasks = Tasks()

    @tasks.task(name="fixes.clash")
    def mine() -> None: ...

    with pytest.raises(ValueError, match="Two tasks are named 'fixes.clash'"):
        @shared_task(name="fixes.clash")
        def theirs() -> None: ...

    @shared_task(name="fixes.clash2")
    def shared_first() -> None: ...

    with pytest.raises(ValueError, match="Two tasks are named 'fixes.clash2'"):
        @tasks.task(name="fixes.clash2")
        def app_second() -> None: ...


def test_sql_reads_celery_json_rows_and_reports_garbage(tmp_path: Path) -> None:
    backend = SQLBackend(f"sqlite:///{tmp_path}/r.sqlite")
    backend.store_result("ours", 1, states.SUCCESS)  # creates the table
    with backend.engine.begin() as conn:
        conn.execute(insert(taskmeta).values(task_id="celery57", status="SUCCESS",
                                             result=None))
        conn.exec_driver_sql("UPDATE celery_taskmeta SET result = ? WHERE task_id = 'celery57'",
                             (json.dumps({"n": 5}).encode(),))
        conn.execute(insert(taskmeta).values(task_id="junk", status="SUCCESS", result=None))
        conn.exec_driver_sql("UPDATE celery_taskmeta SET result = ? WHERE task_id = 'junk'",
                             (b"\x00not a result",))
    assert backend.get_task_meta("celery57")["result"] == {"n": 5}
    with pytest.raises(DecodeError):
        backend.get_task_meta("junk")


def test_cli_list_imports_and_result_timeout(tmp_path: Path) -> None:
    tasks = Tasks()
    app = make_app(tmp_path, TASKS_IMPORTS=["tests.unit.imported_tasks"])
    tasks.init_app(app)
    runner = app.test_cli_runner()
    listed = runner.invoke(args=["tasks", "list"])
    assert listed.exit_code == 0 and "imported.via_tasks_imports" in listed.output
    waited = runner.invoke(args=["tasks", "result", "no-such-id", "--wait", "0.1"])
    assert waited.exit_code == 1 and "not ready within 0.1 s" in waited.output
    shown = runner.invoke(args=["tasks", "result", "no-such-id"])
    assert json.loads(shown.output)["state"] == "PENDING"
