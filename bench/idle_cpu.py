"""CPU that waiting costs on the embedded default: an idle worker, an idle ``get()``.

    python bench/idle_cpu.py [--seconds 30]

Uses the zero-configuration default (no ``BROKER_URL``/``RESULT_BACKEND``:
SQLite files in a temporary folder). Starts ``flask tasks worker -c 2 -P
prefork``, runs one task so it is warm, then adds up the CPU time (user +
system) of the worker's processes (main + pool children) over ``--seconds``
seconds with nothing to do. Then calls ``get(timeout=seconds)`` in this
process for a task that never comes and measures this process's CPU time
during it. Prints CPU seconds and the share of one core.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each measure")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-idle-")
    os.environ["BENCH_EMBEDDED_DIR"] = folder
    from bench.benchapp import create_app, noop

    app = create_app()
    app.app_context().push()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen([sys.executable, "-m", "flask", "--app", "bench.benchapp", "tasks",
                               "worker", "-c", "2", "-P", "prefork", "-l", "WARNING"],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        noop.delay().get(timeout=60)
        time.sleep(2.0)  # let the warm-up's back-off run out
        procs = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
        before, start = cpu_seconds(procs), time.monotonic()
        time.sleep(args.seconds)
        used, elapsed = cpu_seconds(procs) - before, time.monotonic() - start
        print(f"idle worker ({len(procs)} processes): {used:.2f} CPU s in {elapsed:.1f} s"
              f" = {100 * used / elapsed:.2f}% of a core")
    finally:
        worker.terminate()
        worker.wait(30)
    result = noop.AsyncResult(str(uuid.uuid4()))
    result.backend.get_task_meta(result.id)  # connect first: measure the waiting only
    before, start = time.process_time(), time.monotonic()
    try:
        result.get(timeout=args.seconds)
    except TimeoutError:
        pass
    used, elapsed = time.process_time() - before, time.monotonic() - start
    print(f"idle get() (interval 0.5 s): {used:.3f} CPU s in {elapsed:.1f} s"
          f" = {100 * used / elapsed:.2f}% of a core")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
