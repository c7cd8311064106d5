"""The canvas methods of :class:`~flask_tasks.Task`: ``s``, ``si``, ``signature``,
``map``, ``starmap``, ``chunks``, and the argument checks they share with
``delay()`` (a mixin, so ``task.py`` stays about calling)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ParamSpec, Protocol

from .mapping import chunks, xmap, xstarmap
from .signature import Signature

P = ParamSpec("P")


class _Typed(Protocol[P]):
    """A task seen through its own signature (``Task[P, R]`` is one): ``si`` checks statically."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...
    def _check_partial(self, args: Sequence[Any], kwargs: Mapping[str, Any],
                       complete: bool) -> None: ...


class CanvasMethods:
    """Signatures of a task, and its argument checks; mixed into :class:`~flask_tasks.Task`."""

    name: str
    typing: bool
    _signature: inspect.Signature | None

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Check that the call matches the function's signature.

        :raises TypeError: wrong number or names of arguments (as a direct call would).
        """
        self._check_partial(args, kwargs, complete=True)

    def _check_partial(self, args: Sequence[Any], kwargs: Mapping[str, Any],
                       complete: bool) -> None:
        """Check arguments now; partial ones may be too few, never too many or unknown.

        :raises TypeError: as ``delay()`` would (``complete``: the arguments are final).
        """
        if self.typing and self._signature is not None:
            try:
                if complete:
                    self._signature.bind(*args, **kwargs)
                else:
                    self._signature.bind_partial(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.name}() called with wrong arguments: {exc}") from None

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature with partial arguments: ``add.s(2)``, later ``.delay(5)`` runs ``add(5, 2)``.

        :raises TypeError: more or other arguments than the function takes.
        """
        self._check_partial(args, kwargs, complete=False)
        return Signature(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task here (defined by :class:`~flask_tasks.Task`)."""
        raise NotImplementedError

    def si(self: _Typed[P], *args: P.args, **kwargs: P.kwargs) -> Signature:
        """An immutable signature: a parent's return value is not added to its arguments.

        Type-checked against the function, as ``delay()`` is.

        :raises TypeError: the arguments do not fit the function.
        """
        self._check_partial(args, kwargs, complete=True)
        return Signature(self, args, kwargs, immutable=True)

    def signature(self, args: Sequence[Any] | None = None,
                  kwargs: Mapping[str, Any] | None = None, *, immutable: bool = False,
                  **options: Any) -> Signature:
        """A signature with options: ``add.signature((2, 5), countdown=10)``."""
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        self._check_partial(args, kwargs, complete=immutable)
        return Signature(self, args, kwargs, options=options, immutable=immutable)

    subtask = signature

    def map(self, it: Iterable[Any]) -> xmap:
        """One ``celery.map`` task that calls this task on each item: ``xsum.map([[1, 2]])``."""
        return xmap(self.s(), it)

    def starmap(self, it: Iterable[Sequence[Any]]) -> xstarmap:
        """One ``celery.starmap`` task calling this task with each item's arguments."""
        return xstarmap(self.s(), it)

    def chunks(self, it: Iterable[Sequence[Any]], n: int) -> chunks:
        """``it`` in parts of ``n``, one ``celery.starmap`` task per part (a group)."""
        return chunks(self.s(), it, n)
