"""Publishing a group against publishing its tasks one ``delay()`` at a time.

    python bench/group_publish.py [--tasks 10000] [--runs 5]

Starts its own redis-server (broker and results), then, ``--runs`` times in
turn: ``--tasks`` ``noop.delay()`` calls, and ``group(noop.s() for ...)()``
of as many signatures (built before the clock starts, as an application
builds them before it calls the group). Prints tasks/s of each and their
ratio, per run and the median. The queue is emptied between measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import redis_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with redis_server(None) as url:
        os.environ["BENCH_REDIS_URL"] = url
        from bench.benchapp import create_app, noop
        from flask_tasks import group

        client = redis.Redis.from_url(url)
        delays, groups = [], []
        with create_app().app_context():
            noop.delay()  # connect
            for run in range(1, args.runs + 1):
                client.flushdb()
                start = time.perf_counter()
                for _ in range(args.tasks):
                    noop.delay()
                delays.append(args.tasks / (time.perf_counter() - start))
                client.flushdb()
                signatures = [noop.s() for _ in range(args.tasks)]
                start = time.perf_counter()
                group(signatures)()
                groups.append(args.tasks / (time.perf_counter() - start))
                assert client.llen("celery") == args.tasks
                print(f"run {run}: delay() {delays[-1]:,.0f}/s  group {groups[-1]:,.0f}/s  "
                      f"{groups[-1] / delays[-1]:.2f}x", flush=True)
        d, g = statistics.median(delays), statistics.median(groups)
        print(f"median of {args.runs}: delay() {d:,.0f} tasks/s, group {g:,.0f} tasks/s, "
              f"group / delay() {g / d:.2f}x ({args.tasks:,} tasks)")


if __name__ == "__main__":
    main()
