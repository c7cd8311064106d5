"""Worker memory with many delayed tasks: they wait on the broker, not in the worker.

    python bench/scheduled.py [--tasks 100000]
    python bench/scheduled.py --broker rabbitmq [--tasks 100000]

Starts its own redis-server, measures an idle ``flask tasks worker -c 2``'s RSS,
schedules ``--tasks`` no-op tasks one hour ahead (``countdown=3600``), starts a
fresh worker and measures it again, and prints Redis's memory for them.

With ``--broker rabbitmq``, also starts its own rabbitmq-server
(``tests.helpers.RabbitMQServer``) as the broker (results stay in Redis): the
delayed tasks wait in its ladder of TTL queues ``celery_delayed_0..27``; prints
how many messages each queue holds (``rabbitmqctl list_queues``) after the
publish and after the fresh worker ran, and that the worker's queue ``celery``
stays empty.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import redis
from flask import Flask

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import rabbitmq_server, redis_server  # noqa: E402


def worker_rss(env: dict[str, str],
               while_running: Callable[[], None] | None = None) -> tuple[float, float]:
    """(main, main + children) RSS in MiB of a worker idle for 5 s (then ``while_running()``)."""
    proc = subprocess.Popen([sys.executable, "-m", "flask", "--app", "bench.benchapp", "tasks",
                             "worker", "-c", "2", "-l", "WARNING"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(5)
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children()]
        rss = [p.memory_info().rss / 2**20 for p in procs]
        if while_running is not None:
            while_running()
    finally:
        proc.terminate()
        proc.wait(30)
    return rss[0], sum(rss)


def rabbit_queues(rabbit: Any) -> dict[str, tuple[int, int, int]]:
    """Queue name -> (messages, of which unacknowledged, memory bytes), from rabbitmqctl."""
    out = rabbit.ctl("list_queues", "--no-table-headers", "name", "messages",
                     "messages_unacknowledged", "memory")
    queues = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[1].isdigit():
            queues[fields[0]] = (int(fields[1]), int(fields[2]), int(fields[3]))
    return queues


def describe(queues: dict[str, tuple[int, int, int]]) -> str:
    ladder = {name: q for name, q in queues.items() if name.startswith("celery_delayed_")}
    held = {name: q[0] for name, q in sorted(ladder.items()) if q[0]}
    memory = sum(q[2] for q in ladder.values()) / 2**20
    celery = queues.get("celery", (0, 0, 0))
    return (f"ladder queues ({len(ladder)}) hold {sum(q[0] for q in ladder.values()):,} messages"
            f"{' ' + str(held) if held else ''}, queue memory {memory:.1f} MiB; "
            f"queue 'celery' holds {celery[0]} ({celery[1]} unacknowledged)")


def beam_rss(rabbit: Any) -> float:
    """RSS in MiB of the node's beam.smp (0 if not found)."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "beam.smp" and str(rabbit.workdir) in (proc.info["cmdline"] or []):
            return float(proc.memory_info().rss / 2**20)
    return 0.0


class WarningCount(logging.Handler):
    """Counts the records it is given (flask_tasks' publish retries)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def main_rabbitmq(args: argparse.Namespace) -> None:
    with rabbitmq_server() as rabbit, redis_server(None) as url:
        os.environ.update(BENCH_REDIS_URL=url, BENCH_BROKER_URL=rabbit.url)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        from bench.benchapp import create_app, noop, tasks

        empty = worker_rss(env)
        beam_before = beam_rss(rabbit)
        print(f"idle worker before the publish: {describe(rabbit_queues(rabbit))}", flush=True)
        if args.tcp_user_timeout is None:
            app = create_app()
        else:  # the publisher only (the worker keeps py-amqp's default)
            app = Flask("bench.scheduled")
            app.config.update(BROKER_URL=rabbit.url, RESULT_BACKEND=url,
                              TASKS_BROKER_TRANSPORT_OPTIONS={"socket_settings": {
                                  socket.TCP_USER_TIMEOUT: args.tcp_user_timeout}})
            tasks.init_app(app)
        retries = WarningCount()
        logging.getLogger("flask_tasks.publisher").addHandler(retries)
        with app.app_context():
            start = time.perf_counter()
            for _ in range(args.tasks):
                noop.apply_async(countdown=3600)
            elapsed = time.perf_counter() - start
        # Unconfirmed publishes (confirm_publish off) may still be on their way: wait until
        # the broker has queued them all,
        # or has queued nothing more for 10 s.
        held, changed = -1, time.monotonic()
        while True:
            queues = rabbit_queues(rabbit)
            now = sum(q[0] for n, q in queues.items() if n.startswith("celery_delayed_"))
            if now != held:
                held, changed = now, time.monotonic()
            if held >= args.tasks or time.monotonic() - changed > 10:
                break
            time.sleep(1)
        settled = time.perf_counter() - start
        print(f"published {args.tasks:,} tasks with countdown=3600 in {elapsed:.1f} s "
              f"({args.tasks / elapsed:,.0f}/s); the broker stopped growing at {held:,} "
              f"~{settled:.0f} s after the first; 'Publishing task ... failed (...); "
              f"retrying.' warnings: {retries.count}", flush=True)
        if held < args.tasks:
            print(f"LOST: the broker holds {held:,} of the {args.tasks:,} published tasks "
                  f"({args.tasks - held:,} missing; apply_async raised no error)", flush=True)
        print(f"after the publish: {describe(queues)}", flush=True)
        samples: list[str] = []

        def watch() -> None:  # the fresh worker is up: its queue, three times over ~10 s
            for number in range(3):
                if number:
                    time.sleep(5)
                samples.append(describe(rabbit_queues(rabbit)))

        loaded = worker_rss(env, watch)
        for number, sample in enumerate(samples):
            print(f"fresh worker running, {5 + 5 * number}+ s: {sample}", flush=True)
        print(f"after that worker stopped: {describe(rabbit_queues(rabbit))}")
        print(f"worker RSS, MiB (main / main + children): empty {empty[0]:.1f} / {empty[1]:.1f}, "
              f"with {held:,} delayed on RabbitMQ {loaded[0]:.1f} / {loaded[1]:.1f}")
        print(f"rabbitmq-server (beam.smp) RSS, MiB: before the publish {beam_before:.1f}, "
              f"now {beam_rss(rabbit):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis",
                        help="redis (default), or rabbitmq as the broker (results in Redis)")
    parser.add_argument("--tcp-user-timeout", type=int, default=None, metavar="MS",
                        help="rabbitmq: the publisher's TCP_USER_TIMEOUT (py-amqp's default "
                             "1000 ms; 0: the kernel's, none), through "
                             "TASKS_BROKER_TRANSPORT_OPTIONS['socket_settings']")
    args = parser.parse_args()
    if args.broker == "rabbitmq":
        main_rabbitmq(args)
        return
    with redis_server(None) as url:
        os.environ["BENCH_REDIS_URL"] = url
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        from bench.benchapp import create_app, noop

        client = redis.Redis.from_url(url)
        empty = worker_rss(env)
        with create_app().app_context():
            start = time.perf_counter()
            for _ in range(args.tasks):
                noop.apply_async(countdown=3600)
            elapsed = time.perf_counter() - start
        scheduled = client.zcard("celery\x06\x16eta")
        used = client.info("memory")["used_memory"] / 2**20
        loaded = worker_rss(env)
        print(f"scheduled {scheduled:,} tasks in {elapsed:.1f} s; in the queue now: "
              f"{client.llen('celery')}; Redis memory {used:.1f} MiB")
        print(f"worker RSS, MiB (main / main + children): empty {empty[0]:.1f} / {empty[1]:.1f}, "
              f"with {scheduled:,} scheduled {loaded[0]:.1f} / {loaded[1]:.1f}")
        left = client.zcard("celery" + chr(6) + chr(22) + "eta")
        print(f"still scheduled after the worker ran: {left:,}")


if __name__ == "__main__":
    main()
