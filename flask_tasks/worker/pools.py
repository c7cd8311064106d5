"""Pools that run jobs: ``prefork`` (child processes), ``threads`` and ``solo``.

Every pool has the same small interface, driven by the worker's main loop
(one thread; no pool method is called from anywhere else)::

    start()                 create the processes/threads
    free() -> int           how many jobs it can take now
    busy() -> int           how many jobs are running
    submit(job)             run a job (only when free() > 0)
    started() -> list[int]  tags of submitted jobs that have started (a job
                            may wait in a queue ahead of the pool first)
    collect(timeout)        outcomes of finished jobs; waits up to ``timeout``
                            seconds when none are ready (0: never waits)
    begin_shutdown()        stop starting queued jobs: they come back SKIPPED
    skip_queued()           jobs queued so far will not start: they come back
                            SKIPPED (their broker connection was lost)
    stop(cold)              end the pool; cold kills running jobs
    terminate_job(tag)      kill the process running a job (False: cannot)

and says how it runs them: ``name`` (what ``-P`` takes), ``inline`` (submit
runs the job at once, in the caller's thread) and ``queues_jobs`` (a
submitted job may wait before it starts; ``started()`` tells, and
``terminate_job()`` can kill it).

A prefork child whose process dies (killed, segfault, ``os._exit``) is
replaced; its job's outcome says ``lost``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from .executor import Job, Outcome
from .prefork import LOST, PreforkPool, internal_error

logger = logging.getLogger("flask_tasks.worker")

#: A job runner: ``run(job) -> Outcome`` (executes inside the pool).
Runner = Callable[[Job], Outcome]

__all__ = ["LOST", "POOLS", "Pool", "PreforkPool", "SoloPool", "ThreadPool"]


class Pool(Protocol):
    """The interface the worker drives; see the module docstring."""

    name: ClassVar[str]
    inline: ClassVar[bool]
    queues_jobs: ClassVar[bool]
    limit: int

    def __init__(self, runner: Runner, limit: int, *, max_tasks_per_child: int | None = None,
                 on_child_start: Callable[[], None] | None = None, depth: int | None = None,
                 flush: Callable[[], None] | None = None) -> None: ...
    def start(self) -> None: ...
    def free(self) -> int: ...
    def busy(self) -> int: ...
    def submit(self, job: Job) -> None: ...
    def started(self) -> list[int]: ...
    def collect(self, timeout: float) -> list[Outcome]: ...
    def begin_shutdown(self) -> None: ...
    def skip_queued(self) -> None: ...
    def stop(self, cold: bool = False) -> None: ...
    def terminate_job(self, tag: int) -> bool: ...


class SoloPool:
    """Runs each job in the worker's own thread, one at a time."""

    name: ClassVar[str] = "solo"
    inline: ClassVar[bool] = True
    queues_jobs: ClassVar[bool] = False

    def __init__(self, runner: Runner, limit: int = 1, **_: Any) -> None:
        self.runner = runner
        self.limit = 1
        self._done: list[Outcome] = []
        self._running: int | None = None

    def start(self) -> None:
        return None

    def free(self) -> int:
        return 1

    def busy(self) -> int:
        return 0

    def submit(self, job: Job) -> None:
        self._running = job.tag
        try:
            self._done.append(self.runner(job))
        finally:
            self._running = None

    def started(self) -> list[int]:
        return [] if self._running is None else [self._running]

    def collect(self, timeout: float) -> list[Outcome]:
        done, self._done = self._done, []
        return done

    def begin_shutdown(self) -> None:
        return None

    def skip_queued(self) -> None:
        return None  # runs each job as it is submitted: none is queued

    def stop(self, cold: bool = False) -> None:
        return None

    def terminate_job(self, tag: int) -> bool:
        return False  # it runs in the worker's own thread


class ThreadPool:
    """Runs jobs on ``limit`` threads of the worker process."""

    name: ClassVar[str] = "threads"
    inline: ClassVar[bool] = False
    queues_jobs: ClassVar[bool] = False

    def __init__(self, runner: Runner, limit: int, **_: Any) -> None:
        self.runner = runner
        self.limit = limit
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._running: set[int] = set()

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
                outcome = internal_error(job, exc)
            self._done.put(outcome)

    def free(self) -> int:
        return self.limit - len(self._running)

    def busy(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        self._running.add(job.tag)
        self._jobs.put(job)

    def started(self) -> list[int]:
        return list(self._running)  # an idle thread takes each job at once

    def begin_shutdown(self) -> None:
        return None

    def skip_queued(self) -> None:
        return None  # an idle thread takes each job at once: none is queued

    def collect(self, timeout: float) -> list[Outcome]:
        done: list[Outcome] = []
        try:
            done.append(self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait())
            while True:
                done.append(self._done.get_nowait())
        except queue.Empty:
            pass
        for outcome in done:
            self._running.discard(outcome.tag)
        return done

    def stop(self, cold: bool = False) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        if not cold:
            for thread in self._threads:
                thread.join(timeout=5)

    def terminate_job(self, tag: int) -> bool:
        return False  # a thread cannot be killed


#: The pools ``-P`` names.
POOLS: dict[str, type[Pool]] = {pool.name: pool for pool in (PreforkPool, ThreadPool, SoloPool)}
