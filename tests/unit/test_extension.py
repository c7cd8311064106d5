from __future__ import annotations

import weakref
from pathlib import Path

import kombu
import pytest
from flask import Flask, current_app, has_app_context

from flask_tasks import Task, Tasks, shared_task
from flask_tasks import extension as extension_module
from flask_tasks.exceptions import ConfigWarning, ImproperlyConfigured


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


def test_outside_app_context_with_several_apps_is_a_clear_error(tmp_path: Path) -> None:
    tasks = Tasks()
    one, two = make_app(tmp_path / "one"), Flask("other_app", instance_path=str(tmp_path / "two"))
    tasks.init_app(one)
    tasks.init_app(two)

    @tasks.task(name="unit.noctx")
    def noctx() -> bool:
        return has_app_context()

    assert tasks.default_app is None
    expected = r"outside of application context.*2 apps.*with app\.app_context\(\):"
    for call in (noctx.delay, lambda: tasks.send_task("unit.noctx"),
                 lambda: tasks.AsyncResult("some-id"), lambda: tasks.control.revoke("x")):
        with pytest.raises(RuntimeError, match=expected):
            call()
    assert noctx() is False  # a direct call runs without an app context
    with two.app_context():
        assert tasks.state() is tasks.state(two)


def test_outside_app_context_with_no_app_is_a_clear_error() -> None:
    tasks = Tasks()

    @tasks.task(name="unit.noapp")
    def noapp() -> None: ...

    with pytest.raises(RuntimeError, match=r"not bound to an app yet.*init_app"):
        noapp.delay()


def _take_message(queue: str) -> kombu.Message:
    with kombu.Connection("memory://") as conn:
        message = conn.SimpleQueue(queue).get(timeout=1)
        message.ack()
        return message


@pytest.mark.parametrize("bind", ["init_app", "constructor"])
def test_outside_app_context_the_only_app_is_used(tmp_path: Path, bind: str) -> None:
    queue = f"unit-only-app-{bind}"
    app = make_app(tmp_path, BROKER_URL="memory://", RESULT_BACKEND="disabled",
                   TASKS_DEFAULT_QUEUE=queue)
    tasks = Tasks(app) if bind == "constructor" else Tasks()
    if bind == "init_app":
        tasks.init_app(app)

    @tasks.task(name="unit.only_app")
    def only_app(x: int) -> str:
        return current_app.import_name

    assert not has_app_context()
    assert tasks.default_app is app
    result = only_app.delay(1)
    message = _take_message(queue)
    assert message.headers["task"] == "unit.only_app" and message.headers["id"] == result.id
    result = tasks.send_task("unit.only_app", args=(2,))
    assert _take_message(queue).headers["id"] == result.id
    assert tasks.AsyncResult("abc").backend is tasks.state(app).backend
    assert only_app(3) == "unit_app"  # a direct call runs in the app's context


def test_outside_app_context_eager_runs_in_the_only_app(tmp_path: Path) -> None:
    tasks = Tasks()
    app = make_app(tmp_path, TASKS_ALWAYS_EAGER=True, RESULT_BACKEND="disabled")
    tasks.init_app(app)  # apps are held weakly: the test keeps its own reference

    @tasks.task(name="unit.eager_only_app")
    def where() -> str:
        return current_app.import_name

    assert where.delay().get() == "unit_app"
    assert where.apply().get() == "unit_app"


def test_dropped_apps_do_not_count(tmp_path: Path) -> None:
    tasks = Tasks()
    dropped = make_app(tmp_path / "old", TASKS_ALWAYS_EAGER=True)
    tasks.init_app(dropped)
    gone = weakref.ref(dropped)
    del dropped  # kept only by its own reference cycles until the collector runs
    app = make_app(tmp_path / "new", TASKS_ALWAYS_EAGER=True, RESULT_BACKEND="disabled")
    tasks.init_app(app)

    @tasks.task(name="unit.after_drop")
    def after_drop() -> int:
        return 1

    assert after_drop.delay().get() == 1
    assert gone() is None and tasks.default_app is app


@pytest.fixture()
def isolated_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the ``Tasks`` objects other tests left in this process (shared tasks see them all)."""
    monkeypatch.setattr(extension_module, "_all_extensions", weakref.WeakSet())


@pytest.mark.usefixtures("isolated_extensions")
def test_shared_task_outside_app_context(tmp_path: Path) -> None:
    @shared_task(name="unit.shared_noctx")
    def shared_noctx(x: int) -> str:
        return f"{current_app.import_name}:{x}"

    with pytest.raises(RuntimeError, match=r"no app in this process has one.*init_app"):
        shared_noctx.delay(1)

    one = make_app(tmp_path / "one", TASKS_ALWAYS_EAGER=True, RESULT_BACKEND="disabled")
    Tasks().init_app(one)
    assert shared_noctx.delay(2).get() == "unit_app:2"  # the only app with the extension
    assert shared_noctx(3) == "unit_app:3"

    two = Flask("second_app", instance_path=str(tmp_path / "two"))
    two.config.update(TASKS_ALWAYS_EAGER=True, RESULT_BACKEND="disabled")
    Tasks(two)
    with pytest.raises(RuntimeError,
                       match=r"outside of application context.*2 apps.*with app\.app_context\(\):"):
        shared_noctx.delay(4)
    with two.app_context():
        assert shared_noctx.delay(5).get() == "second_app:5"
    with one.app_context():
        assert shared_noctx.delay(6).get() == "unit_app:6"


@pytest.mark.parametrize("bind", ["init_app", "constructor"])
def test_celery_dict_in_app_config(tmp_path: Path, bind: str) -> None:
    app = make_app(tmp_path, CELERY={"broker_url": "memory://celery", "result_backend": "disabled",
                                     "task_ignore_result": True, "timezone": "UTC"},
                   TASKS_DEFAULT_QUEUE="explicit")
    if bind == "constructor":
        with pytest.warns(ConfigWarning, match="'timezone'") as record:
            tasks = Tasks(app)
    else:
        tasks = Tasks()
        with pytest.warns(ConfigWarning, match="'timezone'") as record:
            tasks.init_app(app)
    assert record[0].filename == __file__  # points at the app factory's line
    state = tasks.state(app)
    assert state.broker_url == "memory://celery" and not state.broker_is_embedded
    assert state.config.ignore_result is True and state.config.default_queue == "explicit"


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

    banner = Worker(app, tasks.state(app), pool="solo", queues=["a", "b"]).banner()
    assert "s3cret" not in banner and "hunter2" not in banner
    assert "redis://:**@broker.example:6379/0" in banner
    assert "postgresql://user:**@db.example/results" in banner
    assert "unit.bannered" in banner and "queues:      a, b" in banner
    assert "solo (concurrency: 1)" in banner


def test_shared_and_app_task_names_clash() -> None:
    tasks = Tasks()

    @tasks.task(name="extension.clash")
    def mine() -> None: ...

    with pytest.raises(ValueError, match="Two tasks are named 'extension.clash'"):
        @shared_task(name="extension.clash")
        def theirs() -> None: ...

    @shared_task(name="extension.clash2")
    def shared_first() -> None: ...

    with pytest.raises(ValueError, match="Two tasks are named 'extension.clash2'"):
        @tasks.task(name="extension.clash2")
        def app_second() -> None: ...
