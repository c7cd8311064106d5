"""Calling in-process, the broker a double: option precedence, argument and header checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_tasks import Tasks


def make_app(tmp_path: Path, **config: Any) -> Flask:
    app = Flask("calling_app", instance_path=str(tmp_path))
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

    @tasks.task(name="calling.plain")
    def plain() -> None: ...

    @tasks.task(name="calling.urgent", priority=9)
    def urgent() -> None: ...

    sent = capture(tasks, app)
    with app.app_context():
        plain.delay()
        urgent.delay()
        plain.apply_async(priority=1)
    assert [s["priority"] for s in sent] == [3, 9, 1]


def test_apply_checks_arguments_and_eager_rejects_unknown_options(tmp_path: Path) -> None:
    tasks = Tasks()
    app = make_app(tmp_path, TASKS_ALWAYS_EAGER=True)
    tasks.init_app(app)

    @tasks.task(name="calling.one")
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

    @tasks.task(name="calling.h")
    def h() -> None: ...

    sent = capture(tasks, app)
    with app.app_context():
        with pytest.raises(ValueError, match="protocol headers \\['id'\\]"):
            h.apply_async(headers={"id": "forged"})
        h.apply_async(headers={"x-trace": "abc"})
    assert sent[0]["message"].headers["x-trace"] == "abc"
