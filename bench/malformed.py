"""A bulk of malformed broker entries among valid tasks: how fast a worker gets through it.

    python bench/malformed.py [--malformed 2000] [--valid 300] [--runs 3]

The issue's scenario: ``--malformed`` entries of many kinds (random bytes,
text, truncated JSON, JSON that is not an envelope, deep nesting, wrong
types, bad base64, an unknown body encoding) pushed straight into the Redis
list ``celery``, interleaved with ``--valid`` ``noop`` tasks published
through the app; then a fresh ``flask tasks worker -c 2`` is started and
timed until every valid result is stored and every malformed entry is a dead
letter. Prints entries/s, the worker's crashes (exit before the end) and
reconnects (log lines), and the dead-letter count. Starts its own
``redis-server`` on a free port. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import redis_server, stop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def envelope(**props: object) -> dict[str, object]:
    body = base64.b64encode(b'[[], {}, {"callbacks": null, "errbacks": null, "chain": null, '
                            b'"chord": null}]').decode()
    properties: dict[str, object] = {"delivery_tag": str(uuid.uuid4()),
                                     "body_encoding": "base64", "priority": 0,
                                     "delivery_info": {"exchange": "", "routing_key": "celery"}}
    properties.update(props)
    return {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"lang": "py", "task": "bench.noop", "id": str(uuid.uuid4())},
            "properties": properties}


def malformed(rng: random.Random) -> bytes:
    """One malformed entry of a kind picked at random."""
    kinds = [
        lambda: rng.randbytes(rng.randint(1, 200)),
        lambda: "".join(rng.choice("abc {}[]\":,") for _ in range(50)).encode(),
        lambda: json.dumps(envelope())[: rng.randint(1, 80)].encode(),
        lambda: rng.choice([b"123", b"null", b'"text"', b"[]", b"{}"]),
        lambda: b"[" * 5000 + b"]" * 5000,
        lambda: json.dumps({**envelope(), "properties": "x"}).encode(),
        lambda: json.dumps(envelope(delivery_info=[1])).encode(),
        lambda: json.dumps({**envelope(), "body": 5}).encode(),
        lambda: json.dumps({**envelope(), "body": "%%%"}).encode(),
        lambda: json.dumps(envelope(body_encoding="rot13")).encode(),
        lambda: json.dumps(envelope(delivery_tag=7)).encode(),
        lambda: json.dumps({"body": "x"}).encode(),
    ]
    return rng.choice(kinds)()


def run_once(url: str, n_bad: int, n_good: int, seed: int) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    client.flushall()
    env = {**os.environ, "BENCH_REDIS_URL": url, "PYTHONPATH": str(ROOT)}
    rng = random.Random(seed)
    per_valid = max(n_bad // n_good, 1)
    for _ in range(n_good):  # a valid task after every n_bad / n_good malformed entries
        for _ in range(per_valid):
            client.lpush("celery", malformed(rng))
        client.lpush("celery", json.dumps(envelope()).encode())
    n_bad = per_valid * n_good
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the worker
    start = time.monotonic()
    worker = subprocess.Popen([sys.executable, "-m", "flask", "--app",
                               "bench.benchapp:create_app", "tasks", "worker", "-c", "2",
                               "-l", "INFO"], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    crashed = False
    try:
        while time.monotonic() - start < 120:
            if worker.poll() is not None:
                crashed = True
                break
            done = sum(1 for _ in client.scan_iter("celery-task-meta-*", count=1000))
            if done >= n_good and client.llen("celery\x06\x16dead") >= n_bad:
                break
            time.sleep(0.02)
        elapsed = time.monotonic() - start
    finally:
        stop(worker)
    log.seek(0)
    output = log.read().decode(errors="replace")
    log.close()
    connected = output.count("Connected to")
    return {"seconds": elapsed, "entries/s": (n_bad + n_good) / elapsed,
            "crashes": float(crashed), "reconnects": float(max(connected - 1, 0)),
            "dead letters": float(client.llen("celery\x06\x16dead")),
            "valid done": float(sum(1 for _ in client.scan_iter("celery-task-meta-*"))),
            "malformed": float(n_bad), "valid": float(n_good)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--malformed", type=int, default=2000)
    parser.add_argument("--valid", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with redis_server(None) as url:
        results = [run_once(url, args.malformed, args.valid, seed) for seed in range(args.runs)]
    for index, result in enumerate(results, 1):
        print(f"run {index}: " + "  ".join(f"{k} {v:.1f}" for k, v in result.items()))
    print(f"median entries/s {statistics.median(r['entries/s'] for r in results):.0f}; "
          f"crashes {sum(r['crashes'] for r in results):.0f}, reconnects "
          f"{sum(r['reconnects'] for r in results):.0f} in {len(results)} runs")


if __name__ == "__main__":
    main()
