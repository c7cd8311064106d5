"""Countdown on RabbitMQ: a task delayed by hours runs once, on time, across worker restarts.

    python bench/amqp_countdown.py [--delay 7200] [--tasks 5] [--restart-every 600]

Starts its own rabbitmq-server and redis-server (results and run stamps),
publishes ``--tasks`` ``bench.stamp`` tasks with ``countdown=--delay`` while a
worker runs, then replaces the worker every ``--restart-every`` seconds (kill -9
and SIGTERM in turn, and one stretch with no worker at all) until they are
due. Prints each task's runs and how late it ran (seconds after its due time;
flask_tasks rounds a delay up to the next whole second, so 0 to 1 s is on time).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import redis_server  # noqa: E402
from tests.helpers import RabbitMQServer  # noqa: E402


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "flask", "--app", "bench.benchapp", "tasks",
                             "worker", "-c", "2", "-l", "WARNING"], env=env, cwd=ROOT,
                            start_new_session=True)


def stop_worker(proc: subprocess.Popen[bytes], kill: bool) -> None:
    os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=7200.0, help="countdown, seconds")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--restart-every", type=float, default=600.0, metavar="S")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-rabbitmq-"))
    rabbit = RabbitMQServer(workdir).start()
    try:
        with redis_server(None) as redis_url:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_REDIS_URL": redis_url,
                   "BENCH_BROKER_URL": rabbit.url}
            os.environ.update(env)
            from bench.benchapp import create_app, stamp

            client = redis.Redis.from_url(redis_url)
            worker = start_worker(env)
            time.sleep(3)
            published = time.time()
            due = published + args.delay
            with create_app().app_context():
                for _ in range(args.tasks):
                    stamp.apply_async(("runs", due), countdown=args.delay)
            print(f"published {args.tasks} tasks at {time.ctime(published)}, "
                  f"due {time.ctime(due)}", flush=True)
            restarts, kill, gap_done = 0, True, False
            while time.time() < due + 30:
                time.sleep(min(args.restart_every, max(due + 30 - time.time(), 0.1)))
                if time.time() >= due - 5:
                    break
                stop_worker(worker, kill)
                kind = "kill -9" if kill else "SIGTERM"
                if not gap_done:  # once: no worker at all for a while
                    time.sleep(min(args.restart_every / 2, 60))
                    gap_done = True
                    kind += ", then no worker for a while"
                worker = start_worker(env)
                restarts += 1
                kill = not kill
                print(f"{time.ctime()}: worker replaced ({kind}), {restarts} so far",
                      flush=True)
            deadline = due + 60
            while time.time() < deadline and client.llen("runs") < args.tasks:
                time.sleep(0.5)
            time.sleep(5)  # duplicates, if any, would show up now
            stop_worker(worker, kill=False)
            runs = [json.loads(item) for item in client.lrange("runs", 0, -1)]
    finally:
        rabbit.close()
    late = sorted(run["ran"] - run["due"] for run in runs)
    print(f"delay {args.delay:.0f} s, {args.tasks} tasks, {restarts} worker replacements")
    print(f"runs: {len(runs)} (of {args.tasks}: {len(runs) - args.tasks:+d})")
    if late:
        print(f"late by: min {late[0]:.3f} s, max {late[-1]:.3f} s "
              f"(never early: {all(x >= 0 for x in late)})")


if __name__ == "__main__":
    main()
