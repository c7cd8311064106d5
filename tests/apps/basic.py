"""The app the integration tests run workers for. Configured from the environment:

``TEST_BROKER_URL`` / ``TEST_RESULT_BACKEND`` (unset: the embedded default),
``TEST_INSTANCE_PATH`` (the instance folder), ``TEST_CONFIG`` (extra JSON config).
"""

from __future__ import annotations

import json
import os
import time

from flask import Flask, current_app, g
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from flask_tasks import Tasks
from flask_tasks.exceptions import Ignore, Reject, SoftTimeLimitExceeded

tasks = Tasks()
db = SQLAlchemy()


class Note(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


@tasks.task
def add(x: int, y: int) -> int:
    return x + y


@tasks.task
def fail(message: str) -> None:
    raise ValueError(message)


@tasks.task(track_started=True)
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@tasks.task(bind=True)
def progress(self, steps: int) -> dict:
    for done in range(1, steps + 1):
        self.update_state(state="PROGRESS", meta={"done": done, "total": steps})
    return {"steps": steps, "id": self.request.id}


@tasks.task(bind=True)
def progress_then_wait(self, seconds: float) -> str:
    self.update_state(state="PROGRESS", meta={"done": 1, "total": 2})
    time.sleep(seconds)
    return "done"


@tasks.task
def app_info() -> dict:
    g.touched = True
    return {"app": current_app.import_name, "pid": os.getpid()}


@tasks.task
def pid() -> int:
    return os.getpid()


@tasks.task
def bad_result() -> object:
    return {1, 2}


@tasks.task
def die() -> None:
    os.kill(os.getpid(), 9)


@tasks.task(acks_late=True, reject_on_worker_lost=True)
def die_late(tag: str, times: int) -> str:
    """Kill its own process the first ``times`` runs (counted in the instance folder)."""
    path = os.path.join(current_app.instance_path, f"die-{tag}.txt")
    with open(path, "a") as out:
        out.write("x")
    with open(path) as counted:
        if len(counted.read()) <= times:
            os.kill(os.getpid(), 9)
    return tag


@tasks.task
def leave_pending_row(text: str) -> int:
    db.session.add(Note(text=text))  # never committed: teardown must discard it
    return len(db.session.new)


@tasks.task
def pending_rows() -> int:
    return len(db.session.new)


@tasks.task
def note_exists(text: str) -> bool:
    return db.session.query(Note).filter_by(text=text).first() is not None


@tasks.task(ignore_result=True)
def quiet() -> int:
    return 1


@tasks.task(acks_late=True, track_started=True)
def slow_late(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@tasks.task(acks_late=True, track_started=True)
def record(tag: str, seconds: float) -> str:
    """Append ``tag`` to ``runs.txt`` in the instance folder (counts executions), then sleep."""
    with open(os.path.join(current_app.instance_path, "runs.txt"), "a") as out:
        out.write(f"{tag} {os.getpid()}\n")
    time.sleep(seconds)
    return tag


@tasks.task(bind=True, time_limit=1.0)
def overrun(self, seconds: float) -> str:
    time.sleep(seconds)
    return "finished"


@tasks.task(soft_time_limit=0.5)
def cleans_up(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@tasks.task(rate_limit="5/s")
def limited(n: int) -> int:
    return n


@tasks.task(queue="hipri")
def on_hipri() -> str:
    return "hipri"


@tasks.task(bind=True, max_retries=3)
def flaky(self, fail_times: int) -> dict:
    """Fails ``fail_times`` times (retrying after 0.3 s), then returns what it saw."""
    if self.request.retries < fail_times:
        raise self.retry(exc=ConnectionError(f"attempt {self.request.retries}"), countdown=0.3)
    return {"retries": self.request.retries, "id": self.request.id}


def _count_run(tag: str) -> int:
    """Append ``tag`` to ``runs.txt`` in the instance folder; how many runs ``tag`` has had."""
    path = os.path.join(current_app.instance_path, "runs.txt")
    with open(path, "a") as out:
        out.write(f"{tag} {os.getpid()}\n")
    with open(path) as runs:
        return sum(line.split()[0] == tag for line in runs)


@tasks.task(bind=True, acks_late=True)
def ignored(self, tag: str, custom_state: str | None = None) -> str:
    """Count a run, store ``custom_state`` (if given) with ``update_state``, raise Ignore."""
    _count_run(tag)
    if custom_state:
        self.update_state(state=custom_state, meta={"tag": tag})
    raise Ignore()


@tasks.task(acks_late=True)
def rejected(tag: str) -> str:
    """Count a run, then raise ``Reject(requeue=False)``: the message is dropped."""
    _count_run(tag)
    raise Reject(f"no use for {tag}", requeue=False)


@tasks.task(acks_late=True)
def requeued_once(tag: str) -> int:
    """Raise ``Reject(requeue=True)`` on the first run; return the run number after that."""
    runs = _count_run(tag)
    if runs == 1:
        raise Reject(f"try {tag} again", requeue=True)
    return runs


@tasks.task
def requeued_early(tag: str) -> str:
    """Count a run, then ``Reject(requeue=True)`` without acks_late: already acked, so ends."""
    _count_run(tag)
    raise Reject(f"cannot requeue {tag}", requeue=True)


@tasks.task(autoretry_for=(ConnectionError,), retry_backoff=0.2, retry_jitter=False,
            max_retries=3)
def backs_off(tag: str, fail_times: int) -> int:
    """Count a run, note its time in ``times-<tag>.txt``; fail the first ``fail_times`` runs."""
    runs = _count_run(tag)
    with open(os.path.join(current_app.instance_path, f"times-{tag}.txt"), "a") as out:
        out.write(f"{time.time()}\n")
    if runs <= fail_times:
        raise ConnectionError(f"{tag} run {runs}")
    return runs


@tasks.task
def mul(x: int, y: int) -> int:
    return x * y


@tasks.task
def xsum(numbers: list[int]) -> int:
    return sum(numbers)


def _canvas_note(line: str) -> None:
    """Append ``line`` to ``canvas.txt`` in the instance folder (what callbacks saw)."""
    with open(os.path.join(current_app.instance_path, "canvas.txt"), "a") as out:
        out.write(line + "\n")


@tasks.task
def note(value: object, tag: str) -> object:
    """A link callback: note the parent's value, return it."""
    _canvas_note(f"note {tag} {json.dumps(value)}")
    return value


@tasks.task
def on_error(request: object, exc: BaseException, traceback: str) -> None:
    """An errback of Celery's new convention: called in the failed task's worker."""
    _canvas_note(f"on_error {getattr(request, 'id', None)} {type(exc).__name__} "
                 f"{'Traceback' in traceback}")


@tasks.task
def on_error_id(task_id: str) -> None:
    """An errback of Celery's old convention: sent as a task with the failed task's id."""
    _canvas_note(f"on_error_id {task_id}")


def create_app() -> Flask:
    app = Flask(__name__, instance_path=os.environ.get("TEST_INSTANCE_PATH") or None)
    broker = os.environ.get("TEST_BROKER_URL")
    backend = os.environ.get("TEST_RESULT_BACKEND")
    if broker:
        app.config["BROKER_URL"] = broker
    if backend:
        app.config["RESULT_BACKEND"] = backend
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(app.instance_path, "app.db")
    app.config.update(json.loads(os.environ.get("TEST_CONFIG") or "{}"))
    db.init_app(app)
    tasks.init_app(app)
    with app.app_context():
        os.makedirs(app.instance_path, exist_ok=True)
        db.create_all()
    return app
