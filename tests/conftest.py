"""Session fixtures: a real redis-server and a private rabbitmq-server on free loopback
ports, worker subprocesses; ``broker``: each integration test on Redis and on RabbitMQ."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from tests.helpers import (
    RABBITMQ_BIN,
    ROOT,
    ExampleScript,
    RabbitMQServer,
    RedisServer,
    WorkerProcess,
    free_port,
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``redis-server`` on 127.0.0.1:<free port>; yields ``redis://127.0.0.1:<port>``.

    Without redis-server the test is skipped, except under CI, where it fails.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (CI must install it: see .ci/run)")
        pytest.skip("redis-server is not installed")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture()
def redis_url(redis_server: str) -> Iterator[str]:
    """A clean Redis database for one test: ``redis://127.0.0.1:<port>/0``."""
    client = redis.Redis.from_url(redis_server + "/0")
    client.flushall()
    yield redis_server + "/0"
    client.flushall()


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[RabbitMQServer]:
    """A private ``rabbitmq-server`` node (Debian's package) on 127.0.0.1:<free port>.

    Its own node name, distribution and epmd ports, data and logs under a temporary
    folder owned by the rabbitmq user (removed at the end); stopped with its epmd at
    the end of the session. Without rabbitmq-server the test is skipped, except under CI, where
    it fails. A node that does not accept AMQP within 60 s fails with its log tail.
    """
    if not (RABBITMQ_BIN / "rabbitmq-server").exists() or shutil.which("epmd") is None:
        if os.environ.get("CI"):
            pytest.fail("rabbitmq-server is not installed (CI must install it: "
                        "scripts/test.sh does)")
        pytest.skip("rabbitmq-server is not installed")
    # Not under pytest's basetemp: that is private to this user (0700), and the node
    # runs as the rabbitmq user. mkdtemp's folder is 0700 too, then owned by rabbitmq.
    workdir = Path(tempfile.mkdtemp(prefix="flask-tasks-rabbitmq-"))
    server = RabbitMQServer(workdir)
    try:
        server.start(timeout=60)
        yield server
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq_server: RabbitMQServer) -> str:
    """The session's RabbitMQ, default vhost: ``amqp://guest:guest@127.0.0.1:<port>//``."""
    return rabbitmq_server.url


@pytest.fixture()
def rabbitmq_vhost(rabbitmq_server: RabbitMQServer) -> Iterator[str]:
    """A clean RabbitMQ virtual host for one test (~0.4 s); its ``amqp://`` URL.

    Deleted at the end, with every queue, exchange and message the test left.
    """
    name = f"test-{uuid.uuid4().hex[:12]}"
    url = rabbitmq_server.add_vhost(name)
    yield url
    rabbitmq_server.delete_vhost(name)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The broker URL for the app and its workers: the test's Redis, or a fresh
    RabbitMQ vhost. The result backend is Redis (``redis_url``) in both cases."""
    if request.param == "redis":
        return redis_url
    return str(request.getfixturevalue("rabbitmq_vhost"))


@pytest.fixture()
def basic_app_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``basic_app_on(broker, backend, config=None)``: ``tests.apps.basic`` on that broker
    and result backend (None: the embedded default), ``TEST_CONFIG`` ``config`` (JSON),
    instance folder ``tmp_path``, in an app context (popped at the end)."""
    from tests.apps import basic

    contexts: list[Any] = []

    def make(broker: str | None, backend: str | None, config: str | None = None) -> Flask:
        for key, value in (("TEST_BROKER_URL", broker), ("TEST_RESULT_BACKEND", backend),
                           ("TEST_CONFIG", config)):
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        monkeypatch.setenv("TEST_INSTANCE_PATH", str(tmp_path))
        app = basic.create_app()
        contexts.append(app.app_context())
        contexts[-1].push()
        return app

    yield make
    for context in reversed(contexts):
        context.pop()


@pytest.fixture()
def broker_app(broker: str, redis_url: str, basic_app_on: Any) -> Flask:
    """``tests.apps.basic`` on ``broker``, results in Redis, instance ``tmp_path``, in an
    app context."""
    return basic_app_on(broker, redis_url)  # type: ignore[no-any-return]


@pytest.fixture()
def broker_env(broker: str, redis_url: str) -> dict[str, str]:
    """Environment for a worker of ``tests.apps.basic`` on ``broker``, results in Redis."""
    return {"TEST_BROKER_URL": broker, "TEST_RESULT_BACKEND": redis_url}


@pytest.fixture()
def start_worker(tmp_path: Path) -> Iterator[object]:
    """Start worker subprocesses: ``start_worker(app, *args, env={...}, cwd=None)``.

    All are stopped at the end.
    """
    workers: list[WorkerProcess] = []

    def start(app: str, *args: str, env: dict[str, str] | None = None,
              ready: bool = True, cwd: Path | None = None) -> WorkerProcess:
        worker = WorkerProcess(app, list(args),
                               {"TEST_INSTANCE_PATH": str(tmp_path), **(env or {})},
                               cwd=cwd or ROOT)
        workers.append(worker)
        return worker.wait_ready() if ready else worker

    yield start
    for number, worker in enumerate(workers, 1):
        worker.stop()
        worker.kill_group()
        # pytest shows this only when the test failed: the workers' logs.
        print(f"--- worker {number}: {' '.join(worker.cmd[3:])}\n{worker.output}")


@pytest.fixture()
def basic_app(redis_url: str, basic_app_on: Any) -> Flask:
    """``tests.apps.basic`` on the test's Redis, instance folder ``tmp_path``, in an app context."""
    return basic_app_on(redis_url, redis_url)  # type: ignore[no-any-return]


@pytest.fixture()
def redis_env(redis_url: str) -> dict[str, str]:
    """Environment for a worker of ``tests.apps.basic`` on the test's Redis."""
    return {"TEST_BROKER_URL": redis_url, "TEST_RESULT_BACKEND": redis_url}


@pytest.fixture()
def embedded_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """``tests.apps.basic`` on the embedded default (instance ``tmp_path``), in an app context."""
    from tests.apps import basic

    monkeypatch.delenv("TEST_BROKER_URL", raising=False)
    monkeypatch.delenv("TEST_RESULT_BACKEND", raising=False)
    monkeypatch.setenv("TEST_INSTANCE_PATH", str(tmp_path))
    app = basic.create_app()
    with app.app_context():
        yield app


@pytest.fixture()
def run_script(tmp_path: Path) -> Iterator[Any]:
    """``run_script(project, python, port)``: start scripts/run-example.sh of ``project``.

    At the end each is stopped (SIGTERM) and whatever its session left is killed.
    """
    scripts: list[ExampleScript] = []

    def start(project: Path = ROOT, python: str = sys.executable,
              port: int | None = None) -> ExampleScript:
        script = ExampleScript(project, python, tmp_path / f"instance-{len(scripts)}",
                               port or free_port())
        scripts.append(script)
        return script

    yield start
    for script in scripts:
        if script.proc.poll() is None:
            script.proc.send_signal(signal.SIGTERM)
            try:
                script.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        script.kill_session()
        print(f"--- run-example.sh output:\n{script.output}")  # shown when a test fails
