"""Task results: :class:`AsyncResult` reads a task's state from the backend;
:class:`GroupResult` is the results of a group, in order.

``tasks.AsyncResult(task_id)`` (or ``my_task.AsyncResult(task_id)``) builds
one for the current app; ``delay()``/``apply_async()`` return one. What a
result needs from a backend is :class:`ResultStore` (every backend in
:mod:`flask_tasks.backends` is one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from . import states
from .protocol import exception_from_dict

R = TypeVar("R")

#: Called with a task's meta mapping on each state change ``get()`` sees.
OnMessage = Callable[[dict[str, Any]], None]


class ResultStore(Protocol):
    """What :class:`AsyncResult` reads and changes in a result backend."""

    def get_task_meta(self, task_id: str) -> dict[str, Any]:
        """The stored meta of ``task_id`` (a PENDING meta for an unknown id)."""

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = 0.5,
                 on_message: OnMessage | None = None) -> dict[str, Any]:
        """Block until ``task_id`` is ready and return its meta.

        :raises flask_tasks.exceptions.TimeoutError: not ready within ``timeout`` seconds.
        """

    def forget(self, task_id: str) -> None:
        """Delete the stored result of ``task_id``."""

    def revoke(self, task_id: str, terminate: bool, expires: float) -> None:
        """Store a revoke of ``task_id`` for ``expires`` seconds."""


class AsyncResult(Generic[R]):
    """The state and result of one task, read from the result backend.

    :param id: the task id.
    :param backend: the result backend of the app the task was sent with.
    :param task_name: the task's name, when known.

    Reading ``state``/``result`` asks the backend each time until the task is
    ready; a ready result is cached.
    """

    def __init__(self, id: str, backend: ResultStore, task_name: str | None = None,
                 revokes_expires: float = 10800.0, parent: Any = None) -> None:
        self.id = id
        self.backend = backend
        self.task_name = task_name
        self.revokes_expires = revokes_expires
        #: The result of the task before this one in a chain (``None``: none known).
        self.parent: AsyncResult[Any] | GroupResult | None = parent
        self._cache: dict[str, Any] | None = None

    def as_tuple(self) -> tuple[Any, Any]:
        """Celery's tuple form: ``((id, parent's tuple or None), None)``."""
        return (self.id, self.parent.as_tuple() if self.parent is not None else None), None

    @property
    def children(self) -> list[AsyncResult[Any] | GroupResult]:
        """The results of the tasks this one sent (its callbacks, a chain's next step).

        Read from the stored meta (``children``), as Celery records it; empty
        until the task is ready, or when the backend records none.
        """
        found = self._get_meta().get("children") or []
        return [result_from_tuple(child, self._child) for child in found]

    def _child(self, task_id: str) -> AsyncResult[Any]:
        return AsyncResult(task_id, self.backend, revokes_expires=self.revokes_expires)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.id}>"

    def __str__(self) -> str:
        return self.id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        return isinstance(other, str) and other == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _get_meta(self) -> dict[str, Any]:
        if self._cache is not None:
            return self._cache
        meta = self.backend.get_task_meta(self.id)
        if meta["status"] in states.READY_STATES:
            self._cache = meta
        return meta

    def _decoded(self, meta: dict[str, Any]) -> Any:
        value = meta.get("result")
        if meta["status"] in states.EXCEPTION_STATES and isinstance(value, dict) \
                and "exc_type" in value:
            return exception_from_dict(value)
        return value

    @property
    def state(self) -> str:
        """The task's state (``PENDING`` for an unknown id), see :mod:`flask_tasks.states`."""
        return str(self._get_meta()["status"])

    status = state

    @property
    def result(self) -> Any:
        """The return value, the exception (FAILURE), or the ``meta`` of a custom state."""
        return self._decoded(self._get_meta())

    info = result

    @property
    def traceback(self) -> str | None:
        """The formatted traceback of a failed task, else ``None``."""
        return self._get_meta().get("traceback")

    @property
    def date_done(self) -> datetime | None:
        """When the task became ready (aware UTC datetime), else ``None``."""
        done = self._get_meta().get("date_done")
        return datetime.fromisoformat(done) if isinstance(done, str) else done

    def ready(self) -> bool:
        """True once the task is SUCCESS, FAILURE or REVOKED."""
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        """True if the task ended SUCCESS."""
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        """True if the task ended FAILURE."""
        return self.state == states.FAILURE

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        on_message: OnMessage | None = None,
    ) -> R:
        """Wait for the task to be ready and return its result.

        :param timeout: seconds to wait at most; ``None`` waits forever.
        :param propagate: re-raise the task's exception (with its own type
            where it can be rebuilt) if it failed; ``False`` returns it.
        :param interval: the longest wait between polls, seconds, for backends
            that poll (SQL, embedded): they poll again after 1 ms, then wait
            twice as long each time up to ``interval``. Redis is woken by the
            stored result instead.
        :param on_message: called with the backend's meta mapping on each
            state change seen (progress updates included).
        :raises flask_tasks.exceptions.TimeoutError: not ready within ``timeout``.
        """
        if self._cache is None:
            meta = self.backend.wait_for(self.id, timeout=timeout, interval=interval,
                                         on_message=on_message)
            self._cache = meta
        value = self._decoded(self._cache)
        if propagate and self._cache["status"] in states.PROPAGATE_STATES \
                and isinstance(value, BaseException):
            raise value
        return value  # type: ignore[no-any-return]

    wait = get

    def forget(self) -> None:
        """Delete the stored result; the id reads as PENDING afterwards."""
        self._cache = None
        self.backend.forget(self.id)

    def revoke(self, terminate: bool = False, signal: str = "SIGKILL") -> None:
        """Make sure the task does not run; with ``terminate``, stop it if it runs.

        The revoke is stored in the result backend for ``TASKS_REVOKES_EXPIRES``
        seconds (3 hours by default); every worker, also one started later,
        reads it at most 0.5 s later and does not start the task (state
        REVOKED). With ``terminate=True`` a prefork worker running it kills
        the process (``signal`` is accepted for Celery compatibility; the
        process is always killed with SIGKILL).

        :raises NotImplementedError: the result backend cannot store revokes
            (``RESULT_BACKEND = "disabled"``).
        """
        self.backend.revoke(self.id, terminate, self.revokes_expires)


class EagerResult(AsyncResult[R]):
    """The result of a task run in this process (``apply()`` or eager mode).

    Same interface as :class:`AsyncResult`; nothing is read from a backend.
    """

    def __init__(self, id: str, meta: dict[str, Any], task_name: str | None = None) -> None:
        super().__init__(id, backend=None, task_name=task_name)  # type: ignore[arg-type]
        self._cache = meta

    def _get_meta(self) -> dict[str, Any]:
        assert self._cache is not None
        return self._cache

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            on_message: Callable[[dict[str, Any]], None] | None = None) -> R:
        """Return the result at once (it is already known); see :meth:`AsyncResult.get`."""
        if on_message is not None:
            on_message(self._get_meta())
        return super().get(timeout, propagate, interval)

    def forget(self) -> None:
        """Nothing to forget: eager results are not stored."""


class GroupResult:
    """The results of a group's tasks, in the group's order.

    :param id: the group id (the ``group`` header of each member's message).
    :param results: the members' results.
    :param backend: the result backend (for :meth:`save`).
    """

    def __init__(self, id: str, results: list[Any] | None = None, backend: Any = None,
                 parent: Any = None) -> None:
        self.id = id
        self.results: list[Any] = list(results or [])
        self.backend = backend
        self.parent: Any = parent

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __iter__(self) -> Any:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> Any:
        return self.results[index]

    @property
    def children(self) -> list[Any]:
        """The members' results (as :attr:`results`)."""
        return self.results

    def ready(self) -> bool:
        """True once every member is ready."""
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        """True once every member ended SUCCESS."""
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        """True if any member ended FAILURE."""
        return any(r.failed() for r in self.results)

    def waiting(self) -> bool:
        """True while a member is not ready."""
        return not self.ready()

    def completed_count(self) -> int:
        """How many members ended SUCCESS."""
        return sum(1 for r in self.results if r.successful())

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float = 0.5) -> list[Any]:
        """Wait for every member; the values in order (see :meth:`join`)."""
        return self.join(timeout, propagate, interval)

    def join(self, timeout: float | None = None, propagate: bool = True,
             interval: float = 0.5) -> list[Any]:
        """Wait for the members one by one and return their values in order.

        :param timeout: seconds for the whole group (``None``: no limit).
        :param propagate: raise the first failed member's exception
            (``False``: it is in the list in that member's place).
        :raises flask_tasks.exceptions.TimeoutError: not all ready within ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            values.append(result.get(timeout=left, propagate=propagate, interval=interval))
        return values

    def revoke(self, terminate: bool = False, signal: str = "SIGKILL") -> None:
        """Revoke every member (see :meth:`AsyncResult.revoke`)."""
        for result in self.results:
            result.revoke(terminate=terminate, signal=signal)

    def forget(self) -> None:
        """Forget every member's stored result."""
        for result in self.results:
            result.forget()

    def as_tuple(self) -> tuple[Any, Any]:
        """Celery's tuple form: ``((id, parent's tuple), [member tuples])``."""
        parent = self.parent.as_tuple() if self.parent is not None else None
        return (self.id, parent), [r.as_tuple() for r in self.results]

    def save(self) -> GroupResult:
        """Store the group (Celery's ``celery-taskset-meta-<id>``) so ``tasks.GroupResult(id)``
        restores it; returns ``self``.

        :raises NotImplementedError: the result backend cannot store groups.
        """
        save = getattr(self.backend, "save_group", None)
        if save is None:
            raise NotImplementedError(f"The result backend {type(self.backend).__name__} "
                                      f"cannot store groups.")
        save(self.id, {"result": self.as_tuple()})
        return self

    @classmethod
    def restore(cls, group_id: str, backend: Any,
                make: Callable[[str], AsyncResult[Any]] | None = None) -> GroupResult | None:
        """The group saved as ``group_id``, or ``None`` if none was saved.

        :param make: builds a member's result from its id (default: a plain
            :class:`AsyncResult` on ``backend``).
        """
        restore = getattr(backend, "restore_group", None)
        if restore is None:
            raise NotImplementedError(f"The result backend {type(backend).__name__} "
                                      f"cannot store groups.")
        meta = restore(group_id)
        if not meta:
            return None
        value = meta.get("result") if isinstance(meta, dict) else meta
        if isinstance(value, GroupResult):
            return value
        restored = result_from_tuple(value, make or (lambda i: AsyncResult(i, backend)))
        if not isinstance(restored, GroupResult):
            return None
        restored.backend = backend
        return restored


def result_from_tuple(value: Any, make: Callable[[str], AsyncResult[Any]]) -> Any:
    """An :class:`AsyncResult` or :class:`GroupResult` from Celery's tuple form.

    :param make: builds a task's result from its id.
    """
    node, members = value
    task_id, parent = node if isinstance(node, (list, tuple)) else (node, None)
    parent_result = result_from_tuple(parent, make) if parent else None
    if members is not None:
        backend = None
        results = [result_from_tuple(m, make) for m in members]
        if results:
            backend = getattr(results[0], "backend", None)
        return GroupResult(task_id, results, backend=backend, parent=parent_result)
    result = make(task_id)
    result.parent = parent_result
    return result
