"""Helpers shared by the test suites: waiting, free ports, worker and script subprocesses."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1:<free port>.

    :param binary: the ``redis-server`` executable.
    :param workdir: its working folder.
    :param persistent: append-only file with fsync on every write (survives restarts);
        default: nothing is kept.
    """

    def __init__(self, binary: str, workdir: Path, persistent: bool = False) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--dir", str(workdir)]
        # persistent: every write is on disk before it is answered, so a restart keeps it
        self.cmd += ["--appendonly", "yes", "--appendfsync", "always"] if persistent \
            else ["--appendonly", "no"]
        self.proc: subprocess.Popen[bytes] | None = None

    def _answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(self._answers, timeout=10, message="redis-server to answer PING")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port (empty: nothing is saved)."""
        self.stop()
        self.start()


class OutputReader:
    """Collects a subprocess's merged stdout/stderr lines from a thread of its own.

    :param proc: a process started with ``stdout=PIPE, text=True``.
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        """Everything read so far."""
        return "".join(self.lines)

    def join(self, timeout: float = 5.0) -> None:
        """Wait until the process closed its output (or ``timeout`` seconds)."""
        self._thread.join(timeout)


class WorkerProcess:
    """``flask --app APP tasks worker ...`` as a real subprocess, its output captured.

    :param app: the ``--app`` value.
    :param args: extra worker arguments.
    :param env: extra environment variables.
    :param cwd: the folder it runs in (also put first on ``PYTHONPATH``).
    """

    def __init__(self, app: str, args: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        path = os.pathsep.join(dict.fromkeys([str(cwd), str(ROOT)]))
        full_env = {**os.environ, **env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        self.cmd = [sys.executable, "-m", "flask", "--app", app, "tasks", "worker", *args]
        self.proc = subprocess.Popen(self.cmd, env=full_env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.output_reader = OutputReader(self.proc)

    @property
    def output(self) -> str:
        return self.output_reader.text

    def wait_ready(self, timeout: float = 20.0) -> WorkerProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.output}")
            return " ready." in self.output
        wait_for(ready, timeout, message=f"worker ready; output so far:\n{self.output}")
        return self

    def wait_output(self, text: str, timeout: float = 10.0) -> None:
        wait_for(lambda: text in self.output, timeout,
                 message=f"{text!r} in worker output:\n{self.output}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        """Warm-stop (SIGTERM) and wait; kill the whole group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.output_reader.join()
        return self.proc.returncode

    def kill_group(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class ExampleScript:
    """``scripts/run-example.sh`` of ``project`` in its own session, its output captured."""

    def __init__(self, project: Path, python: str, instance: Path, port: int) -> None:
        env = {key: value for key, value in os.environ.items()
               if key not in ("PYTHONPATH", "VIRTUAL_ENV", "BROKER_URL", "RESULT_BACKEND")}
        env.update(PYTHON=python, PORT=str(port), EXAMPLE_INSTANCE_PATH=str(instance),
                   PYTHONUNBUFFERED="1")
        self.port = port
        self.proc = subprocess.Popen(
            ["bash", str(project / "scripts" / "run-example.sh")], cwd=project, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
        self.session = self.proc.pid
        self.output_reader = OutputReader(self.proc)

    @property
    def output(self) -> str:
        return self.output_reader.text

    def wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"run-example.sh exited with {self.proc.returncode} "
                                     f"before it was ready:\n{self.output}")
            return "  Ready." in self.output
        wait_for(ready, timeout, interval=0.1, message=f"the example to be ready:\n{self.output}")

    def pid_of(self, name: str) -> int:
        match = re.search(rf"^  {name}: +pid (\d+), log (\S+)$", self.output, re.MULTILINE)
        assert match, self.output
        return int(match.group(1))

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run-example.sh still runs after {timeout} s:\n"
                                 f"{self.output}") from None
        self.output_reader.join()
        return code

    def leftovers(self) -> list[str]:
        """Processes of the script's session still alive (its children and theirs)."""
        alive = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getsid(proc.pid) == self.session and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])}")
            except (ProcessLookupError, psutil.Error):
                continue
        return alive

    def kill_session(self) -> None:
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) == self.session:
                    proc.kill()
            except (ProcessLookupError, psutil.Error):
                continue


# -- The broker boundary: reconnects, paused workers, where a message is -------------------

#: ``start_worker`` (the conftest fixture): ``start_worker(app, *args, env=..., ready=...)``.
StartWorker = Callable[..., WorkerProcess]

#: Log lines by which a worker shows that it lost, or could not reach, its broker.
RECONNECT_MARKERS = ("Connection to broker lost", "Cannot connect to")


def broker_reconnects(output: str) -> int:
    """How many times a worker's output shows a lost broker connection.

    The most of: kombu's "Connection to broker lost" and the worker's "Cannot
    connect to" lines, and the "Connected to" lines after the first (kombu logs
    one on every connection).
    """
    lines = output.splitlines()
    lost = sum(any(marker in line for marker in RECONNECT_MARKERS) for line in lines)
    connected = sum("Connected to " in line for line in lines)
    return max(lost, connected - 1, 0)


def settle(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> bool:
    """:func:`wait_for` for a condition that may rightly never hold: False after ``timeout``."""
    try:
        wait_for(predicate, timeout, interval)
    except AssertionError:
        return False
    return True


def pause(worker: WorkerProcess) -> None:
    """SIGSTOP the worker's process group (its pool processes too); SIGKILL still ends it."""
    os.killpg(worker.proc.pid, signal.SIGSTOP)


def redis_waiting_clients(url: str) -> int:
    """How many clients of the Redis at ``url`` wait for data: blocked in a command
    (BRPOP, BLMOVE...: flag ``b``) or with key tracking on (CLIENT TRACKING: flag ``t``)."""
    import redis

    clients = redis.Redis.from_url(url).client_list()
    return sum("b" in client["flags"] or "t" in client["flags"] for client in clients)


def redis_keys_holding(url: str, needle: str) -> list[str]:
    """The keys of the Redis at ``url`` whose value contains ``needle`` (lists, hashes,
    sorted sets, sets, strings), e.g. where a task id is right now."""
    import redis

    client: Any = redis.Redis.from_url(url)  # redis-py's unions of bytes and str
    found = []
    data = needle.encode()
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "hash":
            values = [*client.hkeys(key), *client.hvals(key)]
        elif kind == "zset":
            values = client.zrange(key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "string":
            values = [client.get(key) or b""]
        else:
            values = []
        if any(data in value for value in values):
            found.append(key.decode("utf-8", "backslashreplace"))
    return sorted(found)
