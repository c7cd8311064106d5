from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

from flask_tasks import Task, Tasks, shared_task
from flask_tasks.exceptions import ImproperlyConfigured


def make_app(tmp_path: Path, **config: object) -> Flask:
    app = Flask("unit_app", instance_path=str(tmp_path))
    app.config.update(config)
    return app


def test_init_app_registers_extension_and_cli(tmp_path: Path) -> None:
    tasks = Tasks()
    app = make_app(tmp_path)
    tasks.init_app(app)
    assert app.extensions["tasks"] is tasks
    assert "tasks" in app.cli.commands
    assert set(app.cli.commands["tasks"].commands) >= {"worker", "list", "call", "result", "purge"}


def test_init_app_twice_is_an_error(tmp_path: Path) -> None:
    tasks = Tasks()
    app = make_app(tmp_path)
    tasks.init_app(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        Tasks().init_app(app)


def test_init_app_does_no_io(tmp_path: Path) -> None:
    app = make_app(tmp_path, BROKER_URL="redis://127.0.0.1:1/0", RESULT_BACKEND="redis://127.0.0.1:1/0")
    Tasks(app)  # an unreachable broker is not touched until first use
    assert not any(tmp_path.iterdir())


def test_several_apps_keep_their_own_config(tmp_path: Path) -> None:
    tasks = Tasks()
    one = make_app(tmp_path / "one", BROKER_URL="memory://one", RESULT_BACKEND="disabled")
    two = make_app(tmp_path / "two", BROKER_URL="memory://two", TASKS_DEFAULT_QUEUE="other")
    tasks.init_app(one)
    tasks.init_app(two)
    assert tasks.state(one).broker_url == "memory://one"
    assert tasks.state(two).config.default_queue == "other"
    assert tasks.state(two).broker_is_embedded is False
    with one.app_context():
        assert tasks.state() is tasks.state(one)


def test_embedded_default_lives_in_instance_path(tmp_path: Path) -> None:
    tasks = Tasks()
    app = make_app(tmp_path)
    tasks.init_app(app)
    state = tasks.state(app)
    assert state.broker_is_embedded
    assert str(tmp_path) in state.broker_url and state.broker_url.startswith("embedded:")


def test_outside_app_context_is_a_clear_error(tmp_path: Path) -> None:
    tasks = Tasks()
    tasks.init_app(make_app(tmp_path))

    @tasks.task(name="unit.noctx")
    def noctx() -> None: ...

    with pytest.raises(RuntimeError, match="outside of application context"):
        noctx.delay()


@pytest.mark.parametrize("url", ["ftp://x", "mongodb://y"])
def test_unknown_result_backend(tmp_path: Path, url: str) -> None:
    app = make_app(tmp_path, RESULT_BACKEND=url)
    with pytest.raises(ImproperlyConfigured, match="not supported"):
        Tasks().init_app(app)  # at init, not at the first delay()


def test_task_names_and_duplicates(tmp_path: Path) -> None:
    tasks = Tasks()

    @tasks.task(name="unit.dup")
    def first() -> None: ...

    with pytest.raises(ValueError, match="Two tasks are named 'unit.dup'"):
        @tasks.task(name="unit.dup")
        def second() -> None: ...

    def nested() -> Task:
        @tasks.task
        def inner() -> None: ...
        return inner

    with pytest.raises(ImproperlyConfigured, match="Give it a name"):
        nested()


def test_default_name_is_module_and_function() -> None:
    from tests.apps import basic

    assert basic.add.name == "tests.apps.basic.add"
    assert basic.add.__name__ == "add" and basic.add.__doc__ is None
    assert repr(basic.add) == "<@task: tests.apps.basic.add>"


def test_unknown_task_option() -> None:
    tasks = Tasks()
    with pytest.raises(TypeError, match="Unknown task option"):
        @tasks.task(name="unit.opt", retires=3)
        def f() -> None: ...


def test_base_class_and_shared_task(tmp_path: Path) -> None:
    class Base(Task):
        custom = True

    tasks = Tasks()

    @tasks.task(name="unit.based", base=Base)
    def based() -> int:
        return 1

    @shared_task(name="unit.shared")
    def shared(x: int) -> int:
        return x * 2

    app = make_app(tmp_path, TASKS_ALWAYS_EAGER=True)
    tasks.init_app(app)
    assert isinstance(based, Base) and based.custom
    with app.app_context():
        assert "unit.shared" in tasks.state().task_names()
        assert shared.delay(4).get() == 8


def test_worker_banner_hides_passwords(tmp_path: Path) -> None:
    from flask_tasks.worker.main import Worker

    tasks = Tasks()
    app = make_app(tmp_path, BROKER_URL="redis://:s3cret@broker.example:6379/0",
                   RESULT_BACKEND="db+postgresql://user:hunter2@db.example/results")
    tasks.init_app(app)

    @tasks.task(name="unit.bannered")
    def bannered() -> None: ...

    banner = Worker(app, pool="solo", queues=["a", "b"]).banner()
    assert "s3cret" not in banner and "hunter2" not in banner
    assert "redis://:**@broker.example:6379/0" in banner
    assert "postgresql://user:**@db.example/results" in banner
    assert "unit.bannered" in banner and "queues:      a, b" in banner
    assert "solo (concurrency: 1)" in banner
