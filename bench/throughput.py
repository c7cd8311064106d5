"""Throughput, latency and memory of flask_tasks on a local Redis, RabbitMQ or the embedded default.

    python bench/throughput.py [--runs 5] [--tasks 10000] [--compare celery]
    python bench/throughput.py --broker rabbitmq [--runs 5] [--compare celery]
    python bench/throughput.py --broker embedded [--runs 5] [--tasks 10000]

Starts its own ``redis-server`` on a free loopback port (or uses ``--redis-url``);
with ``--broker rabbitmq``, also its own ``rabbitmq-server`` (Debian's, through
``tests.helpers.RabbitMQServer``; ~15 s to start) as the broker, one virtual host
per system, results still in that Redis; with ``--broker embedded``, uses the
zero-configuration default instead (no ``BROKER_URL``/``RESULT_BACKEND``: two
SQLite files in a temporary folder).
Then measures, median of ``--runs`` runs each:

- publish rate: ``noop.delay()`` from one process, tasks/s (RabbitMQ, ``queued/s``:
  also until the broker holds them all: Celery does not ask for publisher confirms);
- drain rate: ``--tasks`` queued no-op tasks, results stored, run by a fresh
  ``flask tasks worker -c 2`` (prefork, ``-l WARNING`` as Celery's default):
  tasks / seconds from the first message taken to the last result stored
  (worker start-up excluded);
- round trip: one ``delay()`` + ``get()`` at a time on a warm worker, p50/p99 ms
  (with ``--gap S``: each after a pause of ``S`` seconds plus up to 0.1 s at
  random, the latency of a worker that has been idle that long);
- idle worker memory: RSS of the worker's processes (main + children), MiB.

With ``--compare celery`` / ``--compare dramatiq`` (repeatable) the same
measures run, in the same run and the same way, against a real Celery worker
(``celery -A bench.celery_app worker -c 2``) and a Dramatiq worker
(``dramatiq bench.dramatiq_app -p 2 -t 8``), same no-op task with results
stored, same Redis (and same RabbitMQ); ratios are printed. Needs ``pip install celery
"dramatiq[redis]"`` for those. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if not binary:
        sys.exit("redis-server not found: install it or pass --redis-url")
    port = free_port()
    workdir = tempfile.mkdtemp()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def rabbitmq_server() -> Iterator[Any]:
    """A private rabbitmq-server (``tests.helpers.RabbitMQServer``), closed on exit."""
    from tests.helpers import RabbitMQServer

    workdir = Path(tempfile.mkdtemp(prefix="bench-rabbitmq-"))
    server = RabbitMQServer(workdir).start()
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def embedded_folder() -> Iterator[str]:
    """A temporary instance folder for the embedded broker and results."""
    folder = tempfile.mkdtemp(prefix="bench-embedded-")
    try:
        yield "embedded:" + folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class RedisStore:
    """Where a side keeps its messages and results: one Redis database."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def flush(self) -> None:
        self.client.flushdb()

    def waiting(self, queue_key: str) -> int:
        """Messages in the queue, not yet taken by a worker."""
        return int(self.client.llen(queue_key))

    def stored(self, keys: list[str]) -> int:
        """How many of ``keys`` have a result."""
        return sum(int(self.client.exists(*keys[i:i + 1000])) for i in range(0, len(keys), 1000))


class RabbitStore(RedisStore):
    """Messages in a RabbitMQ virtual host, results in a Redis database."""

    def __init__(self, broker_url: str, redis_url: str) -> None:
        from kombu import Connection

        super().__init__(redis_url)
        self.connection = Connection(broker_url)
        self._channel: Any = None

    def _queue(self, name: str, purge: bool = False) -> int:
        """Ready messages in queue ``name`` (0 if it does not exist yet); purge them first."""
        from amqp.exceptions import NotFound

        if self._channel is None:
            self._channel = self.connection.channel()
        try:
            if purge:
                self._channel.queue_purge(name)
            return int(self._channel.queue_declare(name, passive=True).message_count)
        except NotFound:  # the broker closed the channel
            self._channel = None
            return 0

    def flush(self) -> None:
        super().flush()
        self._queue("celery", purge=True)

    def waiting(self, queue_key: str) -> int:
        return self._queue(queue_key)

    def settle(self, queue_key: str, n: int, interval: float = 0.01) -> None:
        """Wait until the broker holds the ``n`` messages just published (without
        publisher confirms a publish returns before RabbitMQ has queued the message)."""
        deadline = time.monotonic() + 120
        while self.waiting(queue_key) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {self.waiting(queue_key)} of {n} messages in "
                                 f"{queue_key!r} after 120 s")
            time.sleep(interval)


class EmbeddedStore:
    """The embedded default's two SQLite files (names as in ``flask_tasks.app_state``)."""

    def __init__(self, folder: str) -> None:
        self.paths = {"broker": Path(folder, "flask_tasks-broker.sqlite"),
                      "results": Path(folder, "flask_tasks-results.sqlite")}
        self._conns: dict[str, sqlite3.Connection] = {}

    def _query(self, db: str, sql: str, params: tuple[Any, ...] = ()) -> int:
        if db not in self._conns:
            if not self.paths[db].exists():
                return 0
            self._conns[db] = sqlite3.connect(self.paths[db], timeout=30, isolation_level=None)
        try:
            cursor = self._conns[db].execute(sql, params)
        except sqlite3.OperationalError as exc:  # the table is made on first use
            if "no such table" in str(exc):
                return 0
            raise
        row = cursor.fetchone()
        return int(row[0]) if row else cursor.rowcount

    def flush(self) -> None:
        self._query("broker", "DELETE FROM messages")
        self._query("results", "DELETE FROM celery_taskmeta")

    def waiting(self, queue_key: str) -> int:
        return self._query("broker", "SELECT COUNT(*) FROM messages WHERE queue = ?"
                           " AND lease_owner IS NULL", (queue_key,))

    def stored(self, keys: list[str]) -> int:
        # Counting the rows is cheap; the ids are checked once they are all there
        # (the table was flushed before the tasks were sent).
        if len(keys) > 1:
            rows = self._query("results", "SELECT COUNT(*) FROM celery_taskmeta")
            if rows < len(keys):
                return rows
        sql = ("SELECT COUNT(*) FROM celery_taskmeta"
               " WHERE task_id IN (SELECT value FROM json_each(?))")
        return sum(self._query("results", sql, (json.dumps(keys[i:i + 1000]),))
                   for i in range(0, len(keys), 1000))


class Side:
    """One system under test: send a no-op, find its result, start a worker.

    :param url: the Redis URL, or ``embedded:<folder>`` for the embedded default.
    :param broker_url: the broker, when it is not ``url`` (RabbitMQ; results stay in Redis).
    """

    def __init__(self, name: str, url: str, extra_args: list[str] | None = None,
                 broker_url: str | None = None) -> None:
        self.name = name
        self.url = url
        self.embedded = url.startswith("embedded:")
        self.store: RedisStore | EmbeddedStore
        if broker_url:
            self.store = RabbitStore(broker_url, url)
            self.env = {**os.environ, "BENCH_REDIS_URL": url, "BENCH_BROKER_URL": broker_url,
                        "PYTHONPATH": str(ROOT)}
            os.environ.update(BENCH_REDIS_URL=url, BENCH_BROKER_URL=broker_url)
        elif self.embedded:
            folder = url.partition(":")[2]
            self.store = EmbeddedStore(folder)
            self.env = {**os.environ, "BENCH_EMBEDDED_DIR": folder, "PYTHONPATH": str(ROOT)}
            os.environ["BENCH_EMBEDDED_DIR"] = folder
        else:
            self.store = RedisStore(url)
            self.env = {**os.environ, "BENCH_REDIS_URL": url, "PYTHONPATH": str(ROOT)}
            os.environ["BENCH_REDIS_URL"] = url
        if name == "flask_tasks":
            from bench.benchapp import create_app, noop

            self.app = create_app()
            self.app.app_context().push()
            self.send: Callable[[], Any] = noop.delay
            self.queue_key = "celery"
            self.worker_cmd = [sys.executable, "-m", "flask", "--app", "bench.benchapp", "tasks",
                               "worker", "-c", "2", "-P", "prefork", "-l", "WARNING",
                               *(extra_args or [])]
        elif name == "celery":
            from bench.celery_app import noop as celery_noop

            self.send = celery_noop.delay
            self.queue_key = "celery"
            self.worker_cmd = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker",
                               "-c", "2", "-P", "prefork", "-l", "WARNING", "--without-gossip",
                               "--without-mingle", "--without-heartbeat"]
        else:
            from bench import dramatiq_app

            self.dramatiq = dramatiq_app
            self.send = dramatiq_app.noop.send
            self.queue_key = "dramatiq:default"
            self.worker_cmd = [sys.executable, "-m", "dramatiq", "bench.dramatiq_app",
                               "--processes", "2", "--threads", "8"]

    def result_key(self, handle: Any) -> str:
        if self.name == "dramatiq":
            return str(self.dramatiq.backend.build_message_key(handle))
        return handle.id if self.embedded else "celery-task-meta-" + handle.id

    def round_trip(self) -> None:
        handle = self.send()
        if self.name == "dramatiq":
            handle.get_result(block=True, timeout=10_000)
        else:
            handle.get(timeout=10)

    def start_worker(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.worker_cmd, env=self.env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure_publish(side: Side, n: int) -> float:
    side.store.flush()
    start = time.perf_counter()
    for _ in range(n):
        side.send()
    return n / (time.perf_counter() - start)


def measure_publish_queued(side: Side, n: int) -> float:
    """RabbitMQ: n / (first ``send()`` .. the broker holds all n in the queue).

    Without publisher confirms (Celery's default), ``send()`` returns once the
    message is written to the socket; this counts until RabbitMQ has queued them.
    """
    store = side.store
    assert isinstance(store, RabbitStore)
    store.flush()
    start = time.perf_counter()
    for _ in range(n):
        side.send()
    store.settle(side.queue_key, n, interval=0.001)
    return n / (time.perf_counter() - start)


def measure_drain(side: Side, n: int) -> float:
    """N / (first message taken .. last result stored), the same way for every system."""
    store = side.store
    store.flush()
    keys = [side.result_key(side.send()) for _ in range(n)]
    if isinstance(store, RabbitStore):
        store.settle(side.queue_key, n)
    worker = side.start_worker()
    try:
        deadline = time.monotonic() + 300
        while store.waiting(side.queue_key) >= n and time.monotonic() < deadline:
            time.sleep(0.001)
        began = time.perf_counter()
        while not store.stored(keys[-1:]) and time.monotonic() < deadline:
            time.sleep(0.002)
        while store.stored(keys) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"{side.name}: timed out waiting for results")
            time.sleep(0.002)
        elapsed = time.perf_counter() - began
    finally:
        stop(worker)
    return n / elapsed


def measure_latency_and_rss(side: Side, samples: int,
                            gap: float = 0.0) -> tuple[float, float, float, float]:
    side.store.flush()
    worker = side.start_worker()
    try:
        deadline = time.monotonic() + 60
        while True:  # warm: the worker is up and has run tasks
            try:
                side.round_trip()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        for _ in range(50):
            side.round_trip()
        times = []
        for _ in range(samples):
            if gap:
                time.sleep(gap + random.uniform(0.0, 0.1))
            start = time.perf_counter()
            side.round_trip()
            times.append((time.perf_counter() - start) * 1000)
        time.sleep(1.0)
        procs = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
        rss = [p.memory_info().rss / 2**20 for p in procs]
    finally:
        stop(worker)
    times.sort()
    return (statistics.median(times), times[int(len(times) * 0.99) - 1], rss[0], sum(rss))


def run_all(sides: dict[str, Side], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each run measures every system in turn, so drift of the machine hits all alike."""
    raw: dict[str, dict[str, list[float]]] = {n: {} for n in sides}
    for number in range(args.runs):
        for name, side in sides.items():
            lat = measure_latency_and_rss(side, args.samples, args.gap)
            row = {"publish/s": measure_publish(side, args.tasks)}
            if isinstance(side.store, RabbitStore):
                row["queued/s"] = measure_publish_queued(side, args.tasks)
            row |= {"drain/s": measure_drain(side, args.tasks),
                    "p50 ms": lat[0], "p99 ms": lat[1], "rss main MiB": lat[2],
                    "rss total MiB": lat[3]}
            for key, value in row.items():
                raw[name].setdefault(key, []).append(value)
            figures = "  ".join(f"{k} {v:.1f}" for k, v in row.items())
            print(f"run {number + 1} {name:<13}" + figures,
                  flush=True)
    return {name: {key: statistics.median(values) for key, values in rows.items()}
            for name, rows in raw.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per measure (median)")
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per publish/drain run")
    parser.add_argument("--samples", type=int, default=500, help="round trips per latency run")
    parser.add_argument("--gap", type=float, default=0.0, metavar="S",
                        help="pause S seconds (plus up to 0.1 s at random) before each round trip")
    parser.add_argument("--broker", choices=["redis", "rabbitmq", "embedded"], default="redis",
                        help="redis (default); rabbitmq: a private rabbitmq-server as the "
                             "broker, results in Redis; or embedded: the zero-configuration "
                             "default (SQLite broker and results in a temporary folder)")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    parser.add_argument("--compare", choices=["celery", "dramatiq"], action="append", default=[],
                        help="also measure this system in the same run (repeatable)")
    parser.add_argument("--also", default=None, metavar="ARGS",
                        help="also measure flask_tasks with these extra worker arguments, "
                             "e.g. --also='--prefetch-multiplier 16'")
    args = parser.parse_args()
    if args.broker == "embedded" and args.compare:
        parser.error("--compare needs Redis (Celery and Dramatiq run on it): "
                     "drop --broker embedded")
    if args.broker == "rabbitmq" and "dramatiq" in args.compare:
        parser.error("--broker rabbitmq compares with Celery only")
    if args.broker == "rabbitmq":
        with rabbitmq_server() as rabbit, redis_server(args.redis_url) as url:
            # One virtual host per system: their queues and exchanges never meet.
            brokers = {name: rabbit.add_vhost(name) for name in ["flask_tasks", *args.compare]}
            versions = rabbit.ctl("eval", "rabbit_misc:version().").strip()
            print(f"rabbitmq {versions}: {rabbit.url} (vhosts {', '.join(brokers)}), "
                  f"results: {url}, runs: {args.runs}, tasks: {args.tasks}, "
                  f"samples: {args.samples}, gap: {args.gap} s, cpus: {os.cpu_count()}",
                  flush=True)
            sides = {"flask_tasks": Side("flask_tasks", url, broker_url=brokers["flask_tasks"])}
            if args.also:
                sides["ft " + args.also.replace("--prefetch-multiplier", "-m")] = Side(
                    "flask_tasks", url, args.also.split(), broker_url=brokers["flask_tasks"])
            for other in args.compare:
                sides[other] = Side(other, url, broker_url=brokers[other])
            results = run_all(sides, args)
    else:
        with (embedded_folder() if args.broker == "embedded"
              else redis_server(args.redis_url)) as url:
            print(f"{args.broker}: {url.partition('embedded:')[2] or url}, runs: {args.runs}, "
                  f"tasks: {args.tasks}, samples: {args.samples}, gap: {args.gap} s, "
                  f"cpus: {os.cpu_count()}")
            sides = {"flask_tasks": Side("flask_tasks", url)}
            if args.also:
                sides["ft " + args.also.replace("--prefetch-multiplier", "-m")] = Side(
                    "flask_tasks", url, args.also.split())
            for other in args.compare:
                sides[other] = Side(other, url)
            results = run_all(sides, args)
    names = list(results)
    ratios = [f"ft/{n}" for n in names[1:]]
    title = f"median of {args.runs} runs"
    print(f"\n{title:<16}" + "".join(f"{n[:12]:>13}" for n in names)
          + "".join(f"{r[:12]:>13}" for r in ratios))
    for key in results["flask_tasks"]:
        row = f"{key:<16}" + "".join(f"{results[n][key]:>13.1f}" for n in names)
        row += "".join(f"{results['flask_tasks'][key] / results[n][key]:>12.2f}x"
                       for n in names[1:])
        print(row)


if __name__ == "__main__":
    main()
