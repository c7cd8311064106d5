"""The prefork pool: forked child processes fed from one shared job queue.

See :class:`PreforkPool`. The interface it implements is described in
:mod:`flask_tasks.worker.pools`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, ClassVar

from ..protocol import message_ids
from .executor import ACK, SKIP, Job, Outcome

logger = logging.getLogger("flask_tasks.worker")

#: A job runner: ``run(job) -> Outcome`` (executes inside the child).
Runner = Callable[[Job], Outcome]

#: The outcome action of a job whose process died.
LOST = "lost"


def internal_error(job: Job, exc: BaseException) -> Outcome:
    """The outcome of a job whose runner raised: logged with the task's name and id, acked.

    (:func:`~.executor.run_job` raises only ``BaseException`` s such as
    ``KeyboardInterrupt``; other runners may raise anything.)
    """
    name, task_id = message_ids(job.headers)
    logger.exception("Internal error running task %s[%s] (job %s)", name or "?",
                     task_id or "no id", job.tag)
    return Outcome(tag=job.tag, state="FAILURE", action=ACK,
                   reason=f"Internal error running task {name or '?'}[{task_id}]: {exc!r}")


class _Child:
    def __init__(self, index: int, process: multiprocessing.process.BaseProcess,
                 conn: Connection) -> None:
        self.index = index
        self.process = process
        self.conn = conn


#: A prefork child reports (and stores the final results of) at most this many
#: jobs at once, and holds a finished job's report at most this many seconds.
BATCH_MAX = 64
BATCH_WINDOW = 0.002
#: Only jobs of tasks whose last run took less than this (seconds) join a
#: batch; before any other job the batch is reported, so a finished job is
#: never held back by a slow one.
FAST_JOB = 0.001

_NOTHING: Any = object()


def _take(jobs: Connection, lock: Any, block: bool) -> Any:
    """Take the next job from the shared queue (``_NOTHING`` if none and not ``block``).

    Waits for data *without* the lock and holds it only while reading a
    message that is already there: a child killed while idle (the usual
    case for ``kill``) never leaves the lock taken and the pool stalled.
    """
    while True:
        if not jobs.poll(None if block else 0):
            return _NOTHING
        with lock:
            if jobs.poll(0):
                return jobs.recv()
        if not block:
            return _NOTHING


class _Slots:
    """Shared memory: per child, the tags of the jobs it started and has not reported.

    The main process reads them to acknowledge started jobs and to know
    which jobs a child that died took with it.
    """

    def __init__(self, ctx: Any, children: int) -> None:
        self.per = BATCH_MAX + 1
        self.tags = ctx.Array("q", children * self.per, lock=False)
        self.counts = ctx.Array("i", children, lock=False)

    def add(self, index: int, tag: int) -> None:
        count = self.counts[index]
        self.tags[index * self.per + count] = tag  # the tag first, then the count
        self.counts[index] = count + 1

    def clear(self, index: int) -> None:
        self.counts[index] = 0

    def of(self, index: int) -> list[int]:
        base = index * self.per
        return list(self.tags[base:base + self.counts[index]])


def _child_main(index: int, jobs: Connection, lock: Any, conn: Connection, slots: _Slots,
                stopping: Any, stale: Any, runner: Runner, flush: Callable[[], None] | None,
                max_tasks: int | None, on_start: Callable[[], None] | None,
                inherited: list[Connection]) -> None:
    # Signals are for the main process, which decides warm or cold shutdown
    # (a terminal's Ctrl-C and systemd's stop reach every process of the group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for other in inherited:  # siblings' pipe ends: holding them hides their EOF
        other.close()
    if on_start is not None:
        on_start()
    reports: list[tuple[Any, ...]] = []
    first = 0.0

    def report() -> None:
        # Results first (one round trip for the batch), then tell the main process.
        if flush is not None:
            try:
                flush()
            except Exception:
                logger.exception("Storing the results of %d task(s) failed", len(reports))
        conn.send(reports)
        slots.clear(index)
        reports.clear()

    done = 0
    last_runtime: dict[str, float] = {}  # task name -> seconds its last run took
    while True:
        try:
            # Block only with nothing to report: a job that is already queued
            # joins the batch, otherwise the batch is reported now.
            job = _take(jobs, lock, block=not reports)
        except (EOFError, OSError):
            break
        if job is _NOTHING:
            report()
            continue
        if job is None:
            break
        if stopping.value or job.generation < stale.value:
            # warm shutdown, or the connection it came on is gone: hand it back unstarted
            reports.append((job.tag, "SKIPPED", SKIP, None, 0.0, False))
            continue
        name = job.headers.get("task") if isinstance(job.headers, dict) else None
        if reports and last_runtime.get(str(name), 1.0) >= FAST_JOB:
            report()  # this one may be slow: do not hold the others back
        if not reports:
            first = time.monotonic()
        slots.add(index, job.tag)
        try:
            outcome = runner(job)
        except BaseException as exc:  # the runner itself failed: never lose the tag
            outcome = internal_error(job, exc)
        last_runtime[str(name)] = outcome.runtime
        done += 1
        retiring = bool(max_tasks and done >= max_tasks)
        # Exceptions and return values stay here: they may not pickle.
        reports.append((outcome.tag, outcome.state, outcome.action, outcome.reason,
                        outcome.runtime, retiring))
        if retiring or len(reports) >= BATCH_MAX or time.monotonic() - first >= BATCH_WINDOW:
            report()
        if retiring:
            break
    if reports:
        report()
    conn.close()
    os._exit(0)  # skip atexit handlers inherited from the parent


class PreforkPool:
    """Runs jobs in ``limit`` forked child processes.

    Jobs go through one shared queue that holds up to ``depth`` jobs, so a
    child that finishes takes the next job at once (no round trip through the
    main process), and no job waits behind a long task while another child
    is free. Each child writes the tags of the jobs it starts into shared
    slots: the main process acknowledges early-ack jobs when they start (as
    Celery does when a pool process accepts a job) and knows the jobs of a
    child that dies. Each child reports outcomes on its own pipe; when jobs
    come back to back it reports them (and ``flush``-es their stored results)
    together, at most :data:`BATCH_MAX` jobs or :data:`BATCH_WINDOW` seconds
    at a time.

    :param runner: called in the child for each job.
    :param depth: jobs submitted and not finished, at most (default ``2 * limit``).
    :param flush: called in the child before it reports a batch (stores the
        results the backend deferred).
    :param max_tasks_per_child: replace a child after this many jobs.
    :param on_child_start: called in each new child before it takes jobs.
    """

    name: ClassVar[str] = "prefork"
    inline: ClassVar[bool] = False
    queues_jobs: ClassVar[bool] = True

    def __init__(self, runner: Runner, limit: int, max_tasks_per_child: int | None = None,
                 on_child_start: Callable[[], None] | None = None, depth: int | None = None,
                 flush: Callable[[], None] | None = None, **_: Any) -> None:
        self.runner = runner
        self.limit = limit
        self.depth = max(depth or 2 * limit, limit)
        self.max_tasks_per_child = max_tasks_per_child
        self.on_child_start = on_child_start
        self.flush = flush
        self._ctx = multiprocessing.get_context("fork")
        # One writer (the main process), several readers (children).
        self._jobs_out, self._jobs_in = self._ctx.Pipe(duplex=False)
        self._jobs_lock = self._ctx.Lock()
        self._slots = _Slots(self._ctx, limit)
        self._stopping = self._ctx.Value("b", 0, lock=False)
        # Jobs stamped with a generation below this are skipped (skip_queued).
        self._stale = self._ctx.Value("q", 0, lock=False)
        self._generation = 0
        self._children: dict[int, _Child] = {}
        self._by_conn: dict[Any, _Child] = {}
        self._by_sentinel: dict[int, _Child] = {}
        self._outstanding: set[int] = set()
        self._running = True

    def _spawn(self, index: int) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=False)
        self._slots.clear(index)
        process = self._ctx.Process(
            target=_child_main, name=f"ForkPoolWorker-{index + 1}",
            args=(index, self._jobs_out, self._jobs_lock, child_conn, self._slots,
                  self._stopping, self._stale, self.runner, self.flush, self.max_tasks_per_child,
                  self.on_child_start,
                  # the job pipe's write end too: a child holding it would never see EOF
                  [self._jobs_in, *(c.conn for c in self._children.values())]),
            daemon=True,
        )
        process.start()
        child_conn.close()
        child = _Child(index, process, parent_conn)
        self._children[index] = child
        self._by_conn[parent_conn] = child
        self._by_sentinel[process.sentinel] = child

    def start(self) -> None:
        for index in range(self.limit):
            self._spawn(index)

    def free(self) -> int:
        return self.depth - len(self._outstanding)

    def busy(self) -> int:
        return len(self._outstanding)

    def pids(self) -> list[int]:
        """Process ids of the current children."""
        return [c.process.pid for c in self._children.values() if c.process.pid is not None]

    def submit(self, job: Job) -> None:
        self._outstanding.add(job.tag)
        job.generation = self._generation
        self._jobs_in.send(job)

    def skip_queued(self) -> None:
        """Jobs submitted so far that no child has started will not start: they come
        back SKIPPED. For a lost broker connection that redelivers them by itself."""
        self._generation += 1
        self._stale.value = self._generation

    def started(self) -> list[int]:
        return [tag for index in self._children for tag in self._slots.of(index)]

    def terminate_job(self, tag: int) -> bool:
        """Kill the process running job ``tag`` (its hard time limit passed).

        :returns: False if no process is running it (it just ended).
        """
        for index, child in self._children.items():
            if tag in self._slots.of(index):
                child.process.kill()
                return True
        return False

    def begin_shutdown(self) -> None:
        self._running = False  # children that exit now are not replaced
        self._stopping.value = 1
        for _ in self._children:
            self._jobs_in.send(None)  # wakes idle children; queued jobs come back SKIPPED

    def collect(self, timeout: float) -> list[Outcome]:
        waitables: list[Any] = [*self._by_conn, *self._by_sentinel]
        ready = wait(waitables, timeout=timeout)
        done: list[Outcome] = []
        dead: list[_Child] = []
        for item in ready:
            child = self._by_sentinel[item] if isinstance(item, int) else self._by_conn[item]
            if isinstance(item, int):
                dead.append(child)
                continue
            try:
                while True:  # everything this child has reported so far
                    for tag, state, action, reason, runtime, retiring in child.conn.recv():
                        self._outstanding.discard(tag)
                        done.append(Outcome(tag=tag, state=state, action=action,
                                            reason=reason, runtime=runtime))
                        if retiring:
                            dead.append(child)
                    if not child.conn.poll():
                        break
            except (EOFError, OSError):
                dead.append(child)
        for child in dict.fromkeys(dead):
            done.extend(self._replace(child))
        return done

    def _replace(self, child: _Child) -> list[Outcome]:
        child.process.join(timeout=5)
        code = child.process.exitcode
        while child.conn.poll():  # outcomes sent just before it exited
            try:
                reports = child.conn.recv()
            except (EOFError, OSError):
                break
            for report in reports:
                self._outstanding.discard(report[0])
        del self._children[child.index]
        self._by_conn.pop(child.conn, None)
        self._by_sentinel.pop(child.process.sentinel, None)
        child.conn.close()
        lost: list[Outcome] = []
        reason = (f"Worker process {child.process.pid} exited with code {code} "
                  f"(signal {-code})" if code is not None and code < 0 else
                  f"Worker process {child.process.pid} exited with code {code}")
        for tag in self._slots.of(child.index):  # started, never reported
            if tag in self._outstanding:
                self._outstanding.discard(tag)
                logger.error("Process %s died while running a task: %s", child.process.name,
                             reason)
                lost.append(Outcome(tag=tag, state="FAILURE", action=LOST, reason=reason))
        if not lost and code not in (0, None):
            logger.warning("Process %s exited with code %s; replacing it",
                           child.process.name, code)
        if self._running:
            self._spawn(child.index)
        return lost

    def stop(self, cold: bool = False) -> None:
        self._running = False
        children = list(self._children.values())
        if cold:
            for child in children:
                if child.process.is_alive():
                    child.process.kill()
        elif not self._stopping.value:
            self.begin_shutdown()
        for child in children:
            child.process.join(timeout=10)
            if child.process.is_alive():
                child.process.kill()
                child.process.join(timeout=5)
