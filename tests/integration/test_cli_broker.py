"""``flask tasks`` commands against unreachable brokers and result backends, and dead letters.

An unreachable broker or result backend is one line on stderr naming its URL
(password masked) and the cause, exit status 1, within the connect timeout:
against a closed port (refused at once) and against a server that accepts
connections but never answers (only the timeout ends the wait). Then the
``dead-letters`` commands on a real Redis, its store filled through the store's
own interface, and on the embedded broker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask
from kombu.connection import Connection

from flask_tasks.transport.base import worker_channel
from flask_tasks.transport.connect import broker_connection
from flask_tasks.transport.dead_letters import DeadLetters
from tests.apps import basic
from tests.helpers import ROOT, WorkerProcess, free_port

APP = "tests.apps.basic:create_app"
PASSWORD = "s3cret-pw"
TIMEOUT = 1.0  # TASKS_BROKER_CONNECTION_TIMEOUT in these tests, seconds
#: Seconds a command may take beyond the timeout, in-process.
MARGIN = 1.0
#: ...and as a subprocess, which first imports Flask, kombu and the app (~0.6 s here).
STARTUP = 8.0

BROKER_COMMANDS = [["purge", "-f"], ["call", "tests.apps.basic.add", "-a", "[1, 2]"],
                   ["dead-letters", "list"], ["dead-letters", "show", "x"],
                   ["dead-letters", "requeue", "--all"], ["dead-letters", "purge", "-f"]]
BACKEND_COMMANDS = [["result", "some-id"], ["result", "some-id", "--wait", "5"]]


@pytest.fixture()
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (the kernel does) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield int(server.getsockname()[1])


def run_cli(*args: str, broker: str, backend: str | None = None,
            timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """``flask --app tests.apps.basic:create_app tasks ARGS``; the process and its seconds."""
    env = {**os.environ, "TEST_BROKER_URL": broker, "TEST_RESULT_BACKEND": backend or broker,
           "TEST_CONFIG": json.dumps({"TASKS_BROKER_CONNECTION_TIMEOUT": TIMEOUT}),
           "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flask", "--app", APP, "tasks", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return done, time.monotonic() - started


@pytest.mark.parametrize("args", BROKER_COMMANDS + BACKEND_COMMANDS, ids=" ".join)
def test_closed_port_is_one_line_with_masked_url(args: list[str], tmp_path: Path) -> None:
    port = free_port()
    broker = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    # The backend is reachable for the broker's commands, the broker for the backend's.
    backend = f"db+sqlite:///{tmp_path / 'results.sqlite'}"
    if args[0] == "result":
        broker, backend = backend.replace("db+sqlite", "embedded"), broker.replace("/0", "/1")
    done, seconds = run_cli(*args, broker=broker, backend=backend)
    what, url = (("the result backend", f"redis://:**@127.0.0.1:{port}/1") if args[0] == "result"
                 else ("the broker", f"redis://:**@127.0.0.1:{port}/0"))
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert done.stderr == f"Error: Cannot reach {what} at {url}: Connection refused.\n"
    assert PASSWORD not in done.stderr
    assert seconds < TIMEOUT + STARTUP


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
@pytest.mark.parametrize("args", BROKER_COMMANDS, ids=" ".join)
def test_silent_broker_fails_within_the_connect_timeout(
        args: list[str], scheme: str, silent_port: int, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = (f"redis://:{PASSWORD}@127.0.0.1:{silent_port}/0" if scheme == "redis"
           else f"amqp://guest:{PASSWORD}@127.0.0.1:{silent_port}//")
    monkeypatch.setenv("TEST_BROKER_URL", url)
    monkeypatch.setenv("TEST_RESULT_BACKEND", f"db+sqlite:///{tmp_path / 'results.sqlite'}")
    monkeypatch.setenv("TEST_INSTANCE_PATH", str(tmp_path))
    monkeypatch.setenv("TEST_CONFIG", json.dumps({"TASKS_BROKER_CONNECTION_TIMEOUT": TIMEOUT}))
    app = basic.create_app()
    started = time.monotonic()
    result = app.test_cli_runner().invoke(args=["tasks", *args])
    seconds = time.monotonic() - started
    masked = url.replace(PASSWORD, "**")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (f"Error: Cannot reach the broker at {masked}: "
                             f"no answer within {TIMEOUT:g} s.\n")
    assert TIMEOUT * 0.9 <= seconds < TIMEOUT + MARGIN


# -- dead-letters on Redis and the embedded broker ---------------------------------


def broker_store(app: Flask) -> tuple[DeadLetters, Connection]:
    """The app's broker's dead-letter store, and the connection to close afterwards."""
    state = basic.tasks.state(app)
    conn = broker_connection(state.broker_url, state.config.transport_options)
    store = worker_channel(conn.default_channel).dead_letters
    assert store is not None, f"{state.broker_url} keeps no dead letters (store not landed?)"
    return store, conn


def test_dead_letters_on_redis_list_show_requeue_purge(
        basic_app: Flask, redis_url: str, start_worker: Callable[..., WorkerProcess]) -> None:
    client = redis.Redis.from_url(redis_url)
    first = basic.add.delay(2, 3)
    raw = client.rpop("celery")  # as a worker would find it, taken off the queue
    assert isinstance(raw, bytes)
    store, conn = broker_store(basic_app)
    try:
        store.add("celery", raw, "Task 'tests.apps.basic.add' is not registered (test)",
                  hostname="tasks@test")
        time.sleep(0.01)  # a later time, so the next is the newest
        store.add("hipri", b"\xffnot json\x1b[31m", "Not a kombu envelope (test)")
    finally:
        conn.release()
    runner = basic_app.test_cli_runner()

    listed = runner.invoke(args=["tasks", "dead-letters", "list"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split() == ["ID", "TIME", "(UTC)", "QUEUE", "TASK", "REASON"]
    assert lines[1].split()[2:4] == ["hipri", "-"]
    assert lines[2].split()[2:4] == ["celery", f"tests.apps.basic.add[{first.id}]"]
    assert lines[3:] == ["2 dead letter(s)."]
    letters = json.loads(runner.invoke(args=["tasks", "dead-letters", "list", "--json"]).output)
    garbage_id, task_id = letters[0]["id"], letters[1]["id"]
    assert letters[1]["task_id"] == first.id and letters[1]["entry"] == raw.decode()

    shown = runner.invoke(args=["tasks", "dead-letters", "show", garbage_id])
    assert shown.exit_code == 0 and shown.output.endswith("\n\\xffnot json\\x1b[31m\n")
    assert "reason:   Not a kombu envelope (test)" in shown.output

    unknown = runner.invoke(args=["tasks", "dead-letters", "requeue", task_id, "nope"])
    assert unknown.exit_code == 1 and "'nope'" in unknown.stderr
    second = basic.add.delay(3, 4)  # waiting in the queue: the requeued one goes after it
    requeued = runner.invoke(args=["tasks", "dead-letters", "requeue", task_id])
    assert requeued.output.splitlines() == [
        f"Requeued {task_id} to celery: tests.apps.basic.add[{first.id}]",
        "Requeued 1 dead letter(s)."]
    queued = client.lrange("celery", 0, -1)  # a worker takes from the right end
    assert len(queued) == 2 and queued[0] == raw  # byte for byte, at the back
    assert second.id.encode() in queued[1]
    start_worker(APP, "-P", "solo", env={"TEST_BROKER_URL": redis_url,
                                         "TEST_RESULT_BACKEND": redis_url})
    assert first.get(timeout=10) == 5 and second.get(timeout=10) == 7

    declined = runner.invoke(args=["tasks", "dead-letters", "purge"], input="n\n")
    assert declined.exit_code == 1 and "Delete 1 dead letter(s)?" in declined.output
    purged = runner.invoke(args=["tasks", "dead-letters", "purge"], input="y\n")
    assert purged.output.endswith("Purged 1 dead letter(s).\n")
    assert runner.invoke(args=["tasks", "dead-letters", "list"]).output == "No dead letters.\n"


def test_dead_letters_on_the_embedded_broker(embedded_app: Flask) -> None:
    store, conn = broker_store(embedded_app)
    try:
        store.add("celery", b"garbage \xff", "Not JSON (test)", hostname="tasks@test")
    finally:
        conn.release()
    runner = embedded_app.test_cli_runner()
    letters = json.loads(runner.invoke(args=["tasks", "dead-letters", "list", "--json"]).output)
    assert [(found["queue"], found["entry"]) for found in letters] == [
        ("celery", "garbage \udcff")]
    letter_id = letters[0]["id"]
    shown = runner.invoke(args=["tasks", "dead-letters", "show", letter_id])
    assert shown.output.endswith("\ngarbage \\xff\n")
    unknown = runner.invoke(args=["tasks", "dead-letters", "requeue", letter_id, "999"])
    assert unknown.exit_code == 1 and "'999'" in unknown.stderr
    requeued = runner.invoke(args=["tasks", "dead-letters", "requeue", "--all"])
    assert requeued.output.splitlines() == [f"Requeued {letter_id} to celery: -",
                                            "Requeued 1 dead letter(s)."]
    assert runner.invoke(args=["tasks", "dead-letters", "list"]).output == "No dead letters.\n"
    # Back in its queue, where `flask tasks purge` finds it.
    purged = runner.invoke(args=["tasks", "purge", "-f"])
    assert purged.output == "Purged 1 message(s) from celery.\n"
