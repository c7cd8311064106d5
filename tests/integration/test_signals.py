"""Signals and task handlers through a real worker on a real redis-server.

The worker runs ``tests.apps.observed``, whose receivers and ``base=`` handlers
append one JSON line per event to ``observed.jsonl`` in the instance folder:
these tests check each event's arguments, their order for one task id, and
the process (and thread) each fired in, as docs/signals.md and docs/tasks.md
describe them.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from blinker import NamedSignal
from flask import Flask

from flask_tasks import signals, states
from flask_tasks.exceptions import TaskRevokedError
from tests.apps import observed
from tests.helpers import ROOT, wait_for

APP = "tests.apps.observed:create_app"
POOLS = ["prefork", "threads"]

#: Events sent where the task runs (signals and handlers).
TASK_SIDE = {"task_prerun", "before_start", "before_task_publish", "after_task_publish",
             "on_success", "task_success", "on_failure", "task_failure", "on_retry",
             "task_retry", "after_return", "task_postrun"}
HANDLERS = {"before_start", "on_success", "on_failure", "on_retry", "after_return"}
SUCCESS_RUN = ["task_prerun", "before_start", "on_success", "task_success", "after_return",
               "task_postrun"]
FAILURE_RUN = ["task_prerun", "before_start", "on_failure", "task_failure", "after_return",
               "task_postrun"]
# retry() publishes the next run before it raises; no after_return after a retry.
RETRY_RUN = ["task_prerun", "before_start", "before_task_publish", "after_task_publish",
             "on_retry", "task_retry", "task_postrun"]


class Events:
    """The lines of ``observed.jsonl``, in the order they were written."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / observed.FILENAME

    def __call__(self, event: str | None = None, task_id: str | None = None,
                 **fields: Any) -> list[dict[str, Any]]:
        """The lines of ``event`` (all without), for ``task_id``, with these field values."""
        if not self.path.exists():
            return []
        lines = [json.loads(line) for line in self.path.read_text().splitlines()]
        return [line for line in lines if (event is None or line["event"] == event)
                and (task_id is None or line.get("task_id") == task_id)
                and all(line.get(key) == value for key, value in fields.items())]

    def wait(self, event: str, task_id: str | None = None, count: int = 1,
             timeout: float = 10.0, **fields: Any) -> list[dict[str, Any]]:
        """Wait until at least ``count`` such lines were written; return them."""
        def found() -> list[dict[str, Any]]:
            lines = self(event, task_id, **fields)
            return lines if len(lines) >= count else []
        return wait_for(found, timeout, message=f"{count} x {event} for {task_id} {fields}; "
                                                f"seen: {self()}")

    def runs(self, task_id: str) -> list[list[dict[str, Any]]]:
        """The task-side events of ``task_id``, one list per run (a run starts at task_prerun)."""
        runs: list[list[dict[str, Any]]] = []
        for line in self(task_id=task_id):
            if line["event"] == "task_prerun":
                runs.append([])
            if line["event"] in TASK_SIDE:
                assert runs, f"{line['event']} before task_prerun: {self(task_id=task_id)}"
                runs[-1].append(line)
        return runs


def names(run: list[dict[str, Any]]) -> list[str]:
    return [line["event"] for line in run]


def one(run: list[dict[str, Any]], event: str) -> dict[str, Any]:
    found = [line for line in run if line["event"] == event]
    assert len(found) == 1, f"{event}: {run}"
    return found[0]


def check_where(run: list[dict[str, Any]], pool: str, main_pid: int, children: set[int]) -> None:
    """All of one run in one process and thread: a prefork child, or a main-process pool thread."""
    assert len({(line["pid"], line["thread"]) for line in run}) == 1, run
    if pool == "prefork":
        assert run[0]["pid"] in children and run[0]["pid"] != main_pid, (run, children)
    else:
        assert run[0]["pid"] == main_pid and run[0]["thread"] != "MainThread", run
    for line in run:  # task_prerun and the handlers run inside the app context
        if line["event"] == "task_prerun" or line["event"] in HANDLERS:
            assert line["app_context"], line


def in_main(line: dict[str, Any], main_pid: int) -> None:
    assert (line["pid"], line["thread"]) == (main_pid, "MainThread"), line


def children_of(events: Events, pool: str, main_pid: int) -> set[int]:
    """The prefork children (one worker_process_init each, sent by the Worker, in the child)."""
    if pool == "prefork":  # -c 2: two children, each may still be starting
        events.wait("worker_process_init", count=2)
    inits = events("worker_process_init")
    if pool != "prefork":
        assert inits == []  # never with -P threads
        return set()
    pids = {line["pid"] for line in inits}
    assert len(pids) == len(inits), inits  # once per child
    for line in inits:
        assert line["sender_type"] == "Worker" and line["ppid"] == main_pid, line
        assert line["pid"] != main_pid
    return pids


def test_every_signal_is_observed_and_documented() -> None:
    """The observed app listens to every signal the module defines; the docs list each one."""
    defined = {name: value for name, value in vars(signals).items()
               if isinstance(value, NamedSignal)}
    assert set(observed.RECEIVERS) == set(defined.values())
    assert set(defined) <= set(signals.__all__)
    table = (ROOT / "docs" / "signals.md").read_text()
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE)) == set(defined)


@pytest.mark.parametrize("pool", POOLS)
def test_success_failure_and_retry(basic_app: Flask, redis_env: dict[str, str], start_worker,
                                   tmp_path: Path, pool: str) -> None:
    worker = start_worker(APP, "-P", pool, "-c", "2", env=redis_env)
    main_pid = worker.proc.pid
    events = Events(tmp_path)
    good = observed.ok.apply_async((2,), {"y": 3})
    bad = observed.boom.delay("bad input")
    again = observed.retry_once.delay("r1")
    assert good.get(timeout=10) == 5
    with pytest.raises(ValueError, match="bad input"):
        bad.get(timeout=10)
    assert again.get(timeout=10) == {"tag": "r1", "retries": 1}
    events.wait("task_postrun", good.id)
    events.wait("task_postrun", bad.id)
    events.wait("task_postrun", again.id, count=2)
    children = children_of(events, pool, main_pid)

    # task_received: the Worker, in the main process, with the message headers.
    for result, count in ((good, 1), (bad, 1), (again, 2)):
        received = events("task_received", result.id)
        assert len(received) == count, received
        for line in received:
            in_main(line, main_pid)
            assert (line["sender_type"], line["request_type"]) == ("Worker", "dict"), line
        first_run = events.runs(result.id)[0][0]
        assert received[0]["time"] <= first_run["time"]
    assert [line["retries"] for line in events("task_received", again.id)] == [0, 1]
    assert events("task_received", good.id)[0]["task"] == "tests.apps.observed.ok"

    # Success: order, arguments, and the handlers' documented values.
    [run] = events.runs(good.id)
    assert names(run) == SUCCESS_RUN
    check_where(run, pool, main_pid, children)
    prerun = one(run, "task_prerun")
    assert prerun["sender"] == "tests.apps.observed.ok" and prerun["task_is_sender"]
    for line in run:
        if "args" in line:
            assert (line["args"], line["kwargs"]) == ([2], {"y": 3}), line
    assert one(run, "on_success")["retval"] == 5
    assert one(run, "task_success")["result"] == 5
    after = one(run, "after_return")
    assert (after["status"], after["retval"], after["retval_type"], after["einfo_type"]) == \
        (states.SUCCESS, "5", "int", "NoneType")
    postrun = one(run, "task_postrun")
    assert (postrun["retval"], postrun["state"], postrun["task_is_sender"]) == \
        (5, states.SUCCESS, True)

    # Failure: the exception, the traceback text (a str), FAILURE everywhere.
    [run] = events.runs(bad.id)
    assert names(run) == FAILURE_RUN
    check_where(run, pool, main_pid, children)
    on_failure = one(run, "on_failure")
    assert (on_failure["exc_type"], on_failure["exc"], on_failure["einfo_type"]) == \
        ("ValueError", "bad input", "str")
    assert "ValueError: bad input" in on_failure["einfo"]
    failure = one(run, "task_failure")
    assert failure["sender"] == "tests.apps.observed.boom" and failure["task_id"] == bad.id
    assert (failure["exc_type"], failure["exc"], failure["traceback_type"]) == \
        ("ValueError", "bad input", "str")
    assert "ValueError: bad input" in failure["traceback"] and failure["einfo_is_traceback"]
    assert (failure["args"], failure["kwargs"]) == (["bad input"], {})
    after = one(run, "after_return")
    assert (after["status"], after["retval_type"], after["einfo_type"]) == \
        (states.FAILURE, "ValueError", "str")
    assert "ValueError: bad input" in after["einfo"]
    postrun = one(run, "task_postrun")
    assert (postrun["retval"], postrun["state"]) == (None, states.FAILURE)

    # Retry: the first run retries (no after_return), the second succeeds.
    first, second = events.runs(again.id)
    assert names(first) == RETRY_RUN
    assert names(second) == SUCCESS_RUN
    check_where(first, pool, main_pid, children)
    check_where(second, pool, main_pid, children)
    published = one(first, "before_task_publish")  # the retry is sent from where it ran
    assert (published["sender"], published["retries"]) == ("tests.apps.observed.retry_once", 1)
    assert published["eta"] is not None
    assert one(first, "after_task_publish")["retries"] == 1
    on_retry = one(first, "on_retry")
    assert (on_retry["exc_type"], on_retry["einfo_type"], on_retry["retries"]) == \
        ("KeyError", "str", 0)
    assert "KeyError: 'r1'" in on_retry["einfo"]
    assert on_retry["stored"] == states.RETRY  # "the retry was sent and RETRY was stored"
    retry = one(first, "task_retry")
    assert (retry["sender"], retry["task_id"], retry["request_type"], retry["retries"]) == \
        ("tests.apps.observed.retry_once", again.id, "Context", 0)
    assert (retry["reason_type"], retry["reason_exc_type"], retry["reason_when"]) == \
        ("Retry", "KeyError", 0.1)
    assert retry["einfo_type"] == "str" and "KeyError: 'r1'" in retry["einfo"]
    assert (one(first, "task_postrun")["state"], one(first, "task_postrun")["retval"]) == \
        (states.RETRY, None)
    assert one(second, "on_success")["retval"] == {"tag": "r1", "retries": 1}
    assert one(second, "after_return")["status"] == states.SUCCESS
    assert one(second, "task_postrun")["state"] == states.SUCCESS
    assert len(events("after_return", again.id)) == 1  # not after the retry

    # The final state is stored before on_success/task_success and on_failure/task_failure
    # run, also where a prefork child batches its results.
    [run] = events.runs(good.id)
    assert one(run, "on_success")["stored"] == one(run, "task_success")["stored"] == \
        states.SUCCESS
    [run] = events.runs(bad.id)
    assert one(run, "on_failure")["stored"] == one(run, "task_failure")["stored"] == \
        states.FAILURE

    # Worker signals: worker_ready once, worker_shutdown last, both in the main process.
    assert worker.stop() == 0
    ready = events("worker_ready")
    assert len(ready) == 1 and ready[0]["sender_type"] == "Worker", ready
    in_main(ready[0], main_pid)
    everything = events()
    shutdown = everything[-1]
    assert shutdown["event"] == "worker_shutdown" and shutdown["sender_type"] == "Worker"
    in_main(shutdown, main_pid)
    assert len(events("worker_shutdown")) == 1
    if pool == "prefork":
        assert len(children) == 2  # -c 2, nothing replaced
        for pid in children:  # each child's worker_process_init before it took a task
            mine = [line["event"] for line in everything if line["pid"] == pid]
            assert mine[0] == "worker_process_init", mine


@pytest.mark.parametrize("pool", POOLS)
def test_revoked_and_expired(basic_app: Flask, redis_env: dict[str, str], start_worker,
                             tmp_path: Path, pool: str) -> None:
    revoked = observed.ok.delay(1, 1)
    revoked.revoke()  # read by the worker before it consumes
    expired = observed.ok.apply_async((2, 2), expires=datetime.now(UTC)
                                      - timedelta(seconds=1))
    worker = start_worker(APP, "-P", pool, "-c", "2", env=redis_env)
    main_pid = worker.proc.pid
    events = Events(tmp_path)
    with pytest.raises(TaskRevokedError, match="not run"):
        revoked.get(timeout=10)
    with pytest.raises(TaskRevokedError, match="expired"):
        expired.get(timeout=10)
    assert observed.ok.delay(3, 4).get(timeout=10) == 7  # both were before it in the queue
    children = children_of(events, pool, main_pid)

    # A revoked message: dropped by the main process, with its Context, expired=False.
    [line] = events.wait("task_revoked", revoked.id)
    in_main(line, main_pid)
    assert (line["sender"], line["request_type"], line["terminated"], line["signum"],
            line["expired"]) == ("tests.apps.observed.ok", "Context", False, None, False)
    assert events(task_id=revoked.id) == [line]  # not even task_received: never queued for the pool

    # An expired message: received, then revoked where it would have run, expired=True.
    [line] = events.wait("task_revoked", expired.id)
    assert (line["sender"], line["request_type"], line["terminated"], line["signum"],
            line["expired"]) == ("tests.apps.observed.ok", "Context", False, None, True)
    check_where([line], pool, main_pid, children)
    received, revoked_line = events(task_id=expired.id)  # nothing else: no task_prerun,
    assert (received["event"], revoked_line) == ("task_received", line)  # no handlers
    in_main(received, main_pid)

    if pool == "prefork":
        # revoke(terminate=True) kills the child: task_revoked(terminated=True, signum=9)
        # from the main process; the replacement child sends worker_process_init.
        running = observed.slow.delay(30)
        [prerun] = events.wait("task_prerun", running.id)
        running.revoke(terminate=True)
        with pytest.raises(TaskRevokedError, match="process was killed"):
            running.get(timeout=10)
        [terminated] = events.wait("task_revoked", sender="tests.apps.observed.slow")
        in_main(terminated, main_pid)
        assert (terminated["sender"], terminated["request_type"], terminated["terminated"],
                terminated["signum"], terminated["expired"]) == \
            ("tests.apps.observed.slow", "Context", True, 9, False)
        assert terminated["task_id"] == running.id
        assert [x["event"] for x in events(task_id=running.id)] == \
            ["task_received", "task_prerun", "before_start", "task_revoked"]  # no postrun
        inits = events.wait("worker_process_init", count=3)
        assert len(inits) == 3 and prerun["pid"] not in {x["pid"] for x in inits[2:]}
        assert {x["pid"] for x in inits[:2]} == children and inits[2]["ppid"] == main_pid
        assert observed.ok.delay(5, 5).get(timeout=10) == 10
