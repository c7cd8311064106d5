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


# -- RabbitMQ: a private rabbitmq-server, broker-agnostic queue checks ---------------------

#: Where Debian's package puts the server's own scripts (/usr/sbin/rabbitmq-server is a
#: wrapper that switches to the rabbitmq user through su).
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


class RabbitMQServer:
    """A private ``rabbitmq-server`` node on 127.0.0.1:<free port>, with its own epmd.

    Runs as the ``rabbitmq`` user when started by root (Debian's package runs it so),
    else as the current user. Everything it writes is under ``workdir``; ``restart()``
    starts the same node on the same data, so durable queues and persistent
    messages survive it.

    :param workdir: its folder (mnesia, logs, HOME with the Erlang cookie).
    :param binary_dir: the folder of ``rabbitmq-server`` and ``rabbitmqctl``.
    """

    #: The running servers by AMQP port, so that helpers given only a URL find the node.
    by_port: dict[int, RabbitMQServer] = {}

    def __init__(self, workdir: Path, binary_dir: Path = RABBITMQ_BIN) -> None:
        import pwd
        import uuid

        self.workdir = workdir
        self.binary_dir = binary_dir
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.node = f"ftest-{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.user = pwd.getpwnam("rabbitmq") if os.geteuid() == 0 else None
        for sub in ("mnesia", "log"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            for path in (workdir, workdir / "mnesia", workdir / "log"):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
            "HOME": str(workdir), "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq"),  # none: no /etc config
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None  # seconds the last start took

    def _popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        user = {} if self.user is None else {
            "user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        return subprocess.Popen(cmd, env=self.env, cwd=self.workdir, start_new_session=True,
                                **user, **kw)

    def _answers(self) -> bool:
        from kombu import Connection

        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"rabbitmq-server exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
        try:
            with Connection(self.url, connect_timeout=1) as conn:
                conn.connect()
            return True
        except Exception:  # noqa: BLE001 - refused, reset, not ready yet: all mean "not yet"
            return False

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of its log and of its stdout/stderr."""
        parts = []
        for path in [*sorted((self.workdir / "log").glob("*.log")), self.workdir / "stdout.log"]:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts) or "(no log written)"

    def start(self, timeout: float = 60.0) -> RabbitMQServer:
        """Start the node (and its epmd, once) and wait until AMQP connections succeed."""
        begin = time.monotonic()
        if self.epmd is None:
            self.epmd = self._popen(["epmd", "-port", str(self.epmd_port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(self.workdir / "stdout.log", "ab") as out:
            self.proc = self._popen([str(self.binary_dir / "rabbitmq-server")],
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        RabbitMQServer.by_port[self.port] = self
        try:
            wait_for(self._answers, timeout=timeout, interval=0.2,
                     message=f"rabbitmq-server {self.node} to accept AMQP on {self.port}")
        except AssertionError as error:
            self.stop()
            raise AssertionError(f"{error}\n{self.log_tail()}") from None
        self.started_in = time.monotonic() - begin
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the node's process group (a clean stop); SIGKILL if it hangs."""
        if self.proc is None:
            return
        _end_group(self.proc, timeout)
        self.proc = None

    def close(self) -> None:
        """Stop the node and its epmd: nothing of it is left running."""
        self.stop()
        if self.epmd is not None:
            _end_group(self.epmd, 5)
            self.epmd = None
        RabbitMQServer.by_port.pop(self.port, None)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start the same node on the same data (durable queues survive)."""
        self.stop()
        self.start(timeout)

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` as the node's user; its output."""
        proc = self._popen([str(self.binary_dir / "rabbitmqctl"), "-n", self.node, "-q", *args],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} exited with "
                                 f"{proc.returncode}:\n{out.decode(errors='replace')}")
        return out.decode()

    def add_vhost(self, name: str) -> str:
        """A new virtual host ``name``, all permissions for guest; its AMQP URL."""
        self.ctl("eval", f'ok = rabbit_vhost:add(<<"{name}">>, <<"tests">>), '
                 f'rabbit_auth_backend_internal:set_permissions(<<"guest">>, <<"{name}">>, '
                 f'<<".*">>, <<".*">>, <<".*">>, <<"tests">>).')
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{name}"

    def delete_vhost(self, name: str) -> None:
        self.ctl("delete_vhost", name)


def _end_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process group of ``proc`` (its session leader); SIGKILL after ``timeout``.

    Then kills what is left of its descendants (beam.smp's erl_child_setup makes a
    process group of its own).
    """
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    for leftover in descendants:
        try:
            leftover.kill()
        except psutil.Error:
            continue


def _rabbitmq_node(url: str) -> tuple[RabbitMQServer, str]:
    """The :class:`RabbitMQServer` an ``amqp://`` URL points at, and the URL's vhost."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    server = RabbitMQServer.by_port.get(parts.port or 5672)
    if server is None:
        raise AssertionError(f"no RabbitMQServer of these tests listens on {parts.port}")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return server, vhost


def queue_length(url: str, name: str) -> int:
    """How many messages wait (ready, not delivered) on queue ``name`` of the broker at
    ``url``; 0 for a queue that does not exist. Redis: LLEN; amqp: a passive declare."""
    if url.startswith("redis"):
        import redis

        return int(redis.Redis.from_url(url).llen(name))
    from amqp.exceptions import NotFound
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        try:
            _, count, _ = conn.default_channel.queue_declare(name, passive=True)
        except NotFound:
            return 0
        return int(count)


def broker_settled(url: str, queue: str = "celery") -> bool:
    """Nothing waits on ``queue`` and nothing delivered is unacknowledged.

    Redis: the list and kombu's ``unacked`` hash are empty; RabbitMQ: the queue's
    ready and unacknowledged counts are 0 (``rabbitmqctl list_queues``, ~0.4 s).
    """
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        return client.llen(queue) == 0 and client.hlen("unacked") == 0
    server, vhost = _rabbitmq_node(url)
    for line in server.ctl("list_queues", "-p", vhost, "--no-table-headers", "name",
                           "messages_ready", "messages_unacknowledged").splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == queue:
            return fields[1:] == ["0", "0"]
    return True  # no such queue: nothing in it


def first_message_headers(url: str, queue: str) -> dict[str, Any]:
    """The headers of the first message waiting on ``queue``, left where it is
    (amqp: fetched unacknowledged, back on the queue when the connection closes)."""
    if url.startswith("redis"):
        import json

        import redis

        raw = redis.Redis.from_url(url).lindex(queue, -1)  # LPUSH: the oldest is last
        assert raw is not None, f"no message on {queue}"
        return dict(json.loads(raw)["headers"])
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        message = conn.default_channel.basic_get(queue, no_ack=False)
        assert message is not None, f"no message on {queue}"
        return dict(message.headers)
