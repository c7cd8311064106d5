"""Worker memory with many delayed tasks: they wait on the broker, not in the worker.

    python bench/scheduled.py [--tasks 100000]

Starts its own redis-server, measures an idle ``flask tasks worker -c 2``'s RSS,
schedules ``--tasks`` no-op tasks one hour ahead (``countdown=3600``), starts a
fresh worker and measures it again, and prints Redis's memory for them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import redis_server  # noqa: E402


def worker_rss(env: dict[str, str]) -> tuple[float, float]:
    """(main, main + children) RSS in MiB of a worker idle for 5 s."""
    proc = subprocess.Popen([sys.executable, "-m", "flask", "--app", "bench.benchapp", "tasks",
                             "worker", "-c", "2", "-l", "WARNING"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(5)
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children()]
        rss = [p.memory_info().rss / 2**20 for p in procs]
    finally:
        proc.terminate()
        proc.wait(30)
    return rss[0], sum(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    args = parser.parse_args()
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
