"""Task registries: name -> :class:`~flask_tasks.task.Task`; :func:`make_task` makes one."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .exceptions import NotRegistered
from .task import Task, TaskOwner


class Registry:
    """A mapping of task names to tasks that refuses two different tasks with one name."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task[Any, Any]] = {}

    def register(self, task: Task[Any, Any], also_free_in: Iterable[Registry] = ()) -> None:
        """Add ``task`` under ``task.name``, the one check every definition goes through.

        Registering the same function again (a module imported twice, a
        reloader) replaces the old entry.

        :param also_free_in: registries that share this one's names (an
            app's tasks and the shared tasks): the name must be free there too.
        :raises ValueError: another function already uses this name, here or there.
        """
        for registry in (self, *also_free_in):
            registry.check_free(task)
        self._tasks[task.name] = task

    def check_free(self, task: Task[Any, Any]) -> None:
        """Raise if another function already uses ``task.name`` here.

        :raises ValueError: the name is taken by a different function.
        """
        existing = self._tasks.get(task.name)
        if existing is not None and existing.origin != task.origin:
            raise ValueError(
                f"Two tasks are named {task.name!r}: {existing.origin} and {task.origin}. "
                f"Give one of them another name with @tasks.task(name=...)."
            )

    def get(self, name: str) -> Task[Any, Any] | None:
        """Return the task named ``name``, or None."""
        return self._tasks.get(name)

    def __getitem__(self, name: str) -> Task[Any, Any]:
        task = self._tasks.get(name)
        if task is None:
            raise NotRegistered(unknown_task_message(name, len(self._tasks)))
        return task

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        """Sorted task names."""
        return sorted(self._tasks)


def unknown_task_message(name: str, known: int) -> str:
    """The error text for a task name nobody registered."""
    return (
        f"Task {name!r} is not registered in this worker ({known} tasks are; see "
        f"`flask tasks list`). Import its module in the app factory or list it in "
        f"TASKS_IMPORTS."
    )


#: Tasks defined with :func:`flask_tasks.shared_task`, visible to every app.
shared_registry = Registry()


def make_task(fn: Callable[..., Any], tasks: TaskOwner,
              options: Mapping[str, Any]) -> Task[Any, Any]:
    """Create the task object for ``fn`` from ``@task`` options.

    ``base`` defaults to :class:`Task`.

    :param tasks: what sends the task (a ``Tasks``, or the shared tasks' owner).
    """
    base = options.get("base") or Task
    if not (isinstance(base, type) and issubclass(base, Task)):
        raise TypeError(f"base= must be a subclass of flask_tasks.Task, not {base!r}")
    task = base()
    task._tasks = tasks
    task._bind_function(fn, options)
    return task
