"""Pools that run jobs: ``prefork`` (child processes), ``threads`` and ``solo``.

Every pool has the same small interface, driven by the worker's main loop
(one thread; no pool method is called from anywhere else)::

    start()                 create the processes/threads
    free() -> int           how many jobs it can take now
    busy() -> int           how many jobs are running
    submit(job)             run a job (only when free() > 0)
    collect(timeout)        outcomes of finished jobs; waits up to ``timeout``
                            seconds when none are ready (0: never waits)
    stop(cold)              end the pool; cold kills running jobs

A prefork child whose process dies (killed, segfault, ``os._exit``) is
replaced; its job's outcome says ``lost``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from .executor import ACK, Job, Outcome

logger = logging.getLogger("flask_tasks.worker")

#: A job runner: ``run(job) -> Outcome`` (executes inside the pool).
Runner = Callable[[Job], Outcome]

LOST = "lost"


class Pool(Protocol):
    """The interface the worker drives; see the module docstring."""

    limit: int

    def start(self) -> None: ...
    def free(self) -> int: ...
    def busy(self) -> int: ...
    def submit(self, job: Job) -> None: ...
    def collect(self, timeout: float) -> list[Outcome]: ...
    def stop(self, cold: bool = False) -> None: ...


class SoloPool:
    """Runs each job in the worker's own thread, one at a time."""

    def __init__(self, runner: Runner, limit: int = 1, **_: Any) -> None:
        self.runner = runner
        self.limit = 1
        self._done: list[Outcome] = []

    def start(self) -> None:
        return None

    def free(self) -> int:
        return 1

    def busy(self) -> int:
        return 0

    def submit(self, job: Job) -> None:
        self._done.append(self.runner(job))

    def collect(self, timeout: float) -> list[Outcome]:
        done, self._done = self._done, []
        return done

    def stop(self, cold: bool = False) -> None:
        return None


class ThreadPool:
    """Runs jobs on ``limit`` threads of the worker process."""

    def __init__(self, runner: Runner, limit: int, **_: Any) -> None:
        self.runner = runner
        self.limit = limit
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._running = 0

    def start(self) -> None:
        for n in range(self.limit):
            thread = threading.Thread(target=self._loop, name=f"ThreadPoolWorker-{n + 1}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                outcome = self.runner(job)
            except BaseException as exc:  # the runner itself failed: never lose the tag
                logger.exception("Internal error running job %s", job.tag)
                outcome = Outcome(tag=job.tag, state="FAILURE", action=ACK, reason=repr(exc))
            self._done.put(outcome)

    def free(self) -> int:
        return self.limit - self._running

    def busy(self) -> int:
        return self._running

    def submit(self, job: Job) -> None:
        self._running += 1
        self._jobs.put(job)

    def collect(self, timeout: float) -> list[Outcome]:
        done: list[Outcome] = []
        try:
            done.append(self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait())
            while True:
                done.append(self._done.get_nowait())
        except queue.Empty:
            pass
        self._running -= len(done)
        return done

    def stop(self, cold: bool = False) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        if not cold:
            for thread in self._threads:
                thread.join(timeout=5)


class _Child:
    def __init__(self, index: int, process: multiprocessing.process.BaseProcess,
                 conn: Connection) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.job: Job | None = None


def _child_main(conn: Connection, runner: Runner, max_tasks: int | None,
                on_start: Callable[[], None] | None, inherited: list[Connection]) -> None:
    # Signals are for the main process, which decides warm or cold shutdown
    # (a terminal's Ctrl-C and systemd's stop reach every process of the group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for other in inherited:  # siblings' pipe ends: holding them hides their EOF
        other.close()
    if on_start is not None:
        on_start()
    done = 0
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            break
        if job is None:
            break
        try:
            outcome = runner(job)
        except BaseException as exc:
            logger.exception("Internal error running job %s", job.tag)
            outcome = Outcome(tag=job.tag, state="FAILURE", action=ACK, reason=repr(exc))
        # Exceptions and return values stay here: they may not pickle.
        done += 1
        retiring = bool(max_tasks and done >= max_tasks)
        conn.send((outcome.tag, outcome.state, outcome.action, outcome.reason, outcome.runtime,
                   retiring))
        if retiring:
            break
    conn.close()
    os._exit(0)  # skip atexit handlers inherited from the parent


class PreforkPool:
    """Runs jobs in ``limit`` forked child processes, one job per child at a time.

    :param runner: called in the child for each job.
    :param max_tasks_per_child: replace a child after this many jobs.
    :param on_child_start: called in each new child before it takes jobs.
    """

    def __init__(self, runner: Runner, limit: int, max_tasks_per_child: int | None = None,
                 on_child_start: Callable[[], None] | None = None, **_: Any) -> None:
        self.runner = runner
        self.limit = limit
        self.max_tasks_per_child = max_tasks_per_child
        self.on_child_start = on_child_start
        self._ctx = multiprocessing.get_context("fork")
        self._children: list[_Child] = []
        self._idle: list[_Child] = []
        self._by_conn: dict[Connection, _Child] = {}
        self._by_sentinel: dict[int, _Child] = {}

    def _spawn(self, index: int) -> _Child:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_child_main, name=f"ForkPoolWorker-{index}",
            args=(child_conn, self.runner, self.max_tasks_per_child, self.on_child_start,
                  [c.conn for c in self._children]),
            daemon=True,
        )
        process.start()
        child_conn.close()
        child = _Child(index, process, parent_conn)
        self._children.append(child)
        self._idle.append(child)
        self._by_conn[parent_conn] = child
        self._by_sentinel[process.sentinel] = child
        return child

    def start(self) -> None:
        for n in range(self.limit):
            self._spawn(n + 1)

    def free(self) -> int:
        return len(self._idle)

    def busy(self) -> int:
        return len(self._children) - len(self._idle)

    def pids(self) -> list[int]:
        """Process ids of the current children."""
        return [c.process.pid for c in self._children if c.process.pid is not None]

    def submit(self, job: Job) -> None:
        child = self._idle.pop()
        child.job = job
        try:
            child.conn.send(job)
        except OSError:  # died between jobs; collect() will replace it and report the job
            pass

    def collect(self, timeout: float) -> list[Outcome]:
        waitables: list[Any] = [c.conn for c in self._children if c.job is not None]
        waitables += list(self._by_sentinel)
        if not waitables:
            return []
        ready = wait(waitables, timeout=timeout)
        done: list[Outcome] = []
        dead: list[_Child] = []
        for item in ready:
            if isinstance(item, int):
                dead.append(self._by_sentinel[item])
                continue
            child = self._by_conn[item]  # type: ignore[index]
            try:
                tag, state, action, reason, runtime, retiring = child.conn.recv()
            except (EOFError, OSError):
                dead.append(child)
                continue
            child.job = None
            done.append(Outcome(tag=tag, state=state, action=action, reason=reason,
                                runtime=runtime))
            if retiring:
                dead.append(child)
            elif child not in dead:
                self._idle.append(child)
        for child in dict.fromkeys(dead):
            done.extend(self._replace(child))
        return done

    def _replace(self, child: _Child) -> list[Outcome]:
        child.process.join(timeout=1)
        code = child.process.exitcode
        self._children.remove(child)
        if child in self._idle:
            self._idle.remove(child)
        self._by_conn.pop(child.conn, None)
        self._by_sentinel.pop(child.process.sentinel, None)
        child.conn.close()
        lost: list[Outcome] = []
        if child.job is not None:
            reason = (f"Worker process {child.process.pid} exited with code {code} "
                      f"(signal {-code})" if code is not None and code < 0 else
                      f"Worker process {child.process.pid} exited with code {code}")
            logger.error("Process %s died while running a task: %s", child.process.name, reason)
            lost.append(Outcome(tag=child.job.tag, state="FAILURE", action=LOST, reason=reason))
        elif code not in (0, None):
            logger.warning("Process %s exited with code %s; replacing it",
                           child.process.name, code)
        if self._running:
            self._spawn(child.index)
        return lost

    _running = True

    def stop(self, cold: bool = False) -> None:
        self._running = False
        for child in self._children:
            if cold:
                if child.process.is_alive():
                    child.process.kill()
            else:
                try:
                    child.conn.send(None)
                except OSError:
                    pass
        for child in self._children:
            child.process.join(timeout=10)
            if child.process.is_alive():
                child.process.kill()
                child.process.join(timeout=5)


POOLS: dict[str, type[Any]] = {"prefork": PreforkPool, "threads": ThreadPool, "solo": SoloPool}
