"""Groups and chords in the result store: the values every backend exchanges.

A **group** is saved as Celery's mapping ``{"result": GroupResult.as_tuple()}``
(:meth:`~flask_tasks.backends.base.Backend.save_group`).

A **chord** is counted in the store, never polled (no ``chord_unlock`` task):

1. the caller sets the header's size (:meth:`~.Backend.set_chord_size`) before
   it sends the header's last task; a header task that adds members to the
   header at run time adds to the count (:meth:`~.Backend.add_to_chord`);
2. each header task, once final, reports its state and result
   (:meth:`~.Backend.chord_part_return`). A ``(task id, group index)`` pair
   counts once, whatever its later runs return (a redelivered ``acks_late``
   task, a duplicate message). The call that finds every member counted takes
   the **dispatch claim** (a token that expires, :data:`CLAIM_EXPIRES` seconds
   by default) in the same atomic step and gets a :class:`ChordClaim`: the
   header's results in header order. Every other call gets ``None``;
3. the holder runs the body (or fails it with ``ChordError`` naming
   :attr:`ChordClaim.failed_part`), extending the claim first when that may take
   long (:meth:`~.Backend.chord_claim_extend`), then calls
   :meth:`~.Backend.chord_done`: the chord's state is removed and a *done*
   marker kept for :data:`DONE_EXPIRES` seconds, so a late duplicate can
   neither count again nor claim again.

A holder that dies leaves its claim to expire; the next report of any header
member (a redelivery) then takes it again. On Redis these are Celery 5.7's keys
and rules (``celery-taskset-meta-<group id>.j/.t/.s/.d/.c``), so Celery workers
and ours may report parts of one chord and only one of them dispatches its body.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import states
from ..exceptions import ImproperlyConfigured
from ..protocol import exception_from_dict, exception_to_dict

__all__ = ["CLAIM_EXPIRES", "DONE_EXPIRES", "ChordClaim", "ChordPart", "GroupStore",
           "encode_part_result", "group_value"]

#: Seconds a dispatch claim lasts unless extended (Celery 5.7's default:
#: twice ``result_chord_join_timeout``, 5 s).
CLAIM_EXPIRES = 10.0
#: Seconds the done marker outlives a finished chord (Celery 5.7: at least 300).
DONE_EXPIRES = 300.0


@dataclass(frozen=True)
class ChordPart:
    """One header task's final state, as counted.

    :param task_id: the header task's id.
    :param index: its position in the header (``group_index``); ``None`` when it
        was reported without one (such parts come after the indexed ones).
    :param state: its final state (``SUCCESS``, ``FAILURE``, ``REVOKED``...).
    :param result: its return value, or for an exception state the stored
        exception mapping (see :meth:`exception`).
    """

    task_id: str
    index: int | None
    state: str
    result: Any

    @property
    def failed(self) -> bool:
        """True when the state fails the chord (``FAILURE``, ``REVOKED``)."""
        return self.state in states.PROPAGATE_STATES

    def exception(self) -> BaseException | None:
        """The exception of a part in an exception state, rebuilt; else ``None``."""
        if self.state not in states.EXCEPTION_STATES:
            return None
        if isinstance(self.result, Mapping) and "exc_type" in self.result:
            return exception_from_dict(self.result)
        return Exception(self.result)


@dataclass(frozen=True)
class ChordClaim:
    """The right to dispatch a chord's body, held by one caller.

    :param group_id: the chord's header group id.
    :param token: what proves the claim is ours (a random hex string).
    :param parts: every counted header part, in header order.
    :param expires: seconds the claim was taken for.
    """

    group_id: str
    token: str
    parts: tuple[ChordPart, ...]
    expires: float

    @property
    def failed_part(self) -> ChordPart | None:
        """The first part, in header order, whose state fails the chord."""
        return next((part for part in self.parts if part.failed), None)

    @property
    def values(self) -> list[Any]:
        """The parts' results in header order (what the body is called with)."""
        return [part.result for part in self.parts]


class GroupStore:
    """The group and chord part of the backend contract (a base of :class:`~.base.Backend`).

    Backends implement the ``_`` methods; the public ones check that the
    backend stores groups and retry while the store is unreachable
    (:meth:`~.base.Backend.retrying`).
    """

    #: Why this backend stores no groups or chords (``None``: it does).
    no_groups: str | None = None

    if TYPE_CHECKING:
        def retrying(self, write: Callable[[], Any], what: str, *what_args: Any) -> Any: ...

    def _groups(self) -> None:
        if self.no_groups is not None:
            raise ImproperlyConfigured(self.no_groups)

    def save_group(self, group_id: str, value: Mapping[str, Any]) -> None:
        """Save a group: Celery's mapping ``{"result": GroupResult.as_tuple()}``.

        Kept ``expires`` seconds (``None``: kept). Saving again replaces it.

        :raises ValueError: ``value`` has no ``"result"``.
        :raises ImproperlyConfigured: the backend stores no groups (``rpc://``).
        """
        self._groups()
        self.retrying(lambda: self._save_group(group_id, value), "group %s", group_id)

    def restore_group(self, group_id: str) -> dict[str, Any] | None:
        """The saved mapping of a group (``"result"``; SQL adds ``"date_done"``), or ``None``."""
        self._groups()
        return self._restore_group(group_id)

    def delete_group(self, group_id: str) -> None:
        """Delete a saved group (restoring it returns ``None`` afterwards)."""
        self._groups()
        self.retrying(lambda: self._delete_group(group_id), "the deletion of group %s",
                      group_id)

    def set_chord_size(self, group_id: str, size: int) -> None:
        """Set how many header tasks the chord of ``group_id`` waits for.

        Call it before the header's last task is sent. It starts a new run of
        the chord: a claim or done marker left by an earlier run with the same
        group id (a frozen chord applied again) is cleared, as Celery does.
        """
        self._groups()
        self.retrying(lambda: self._set_chord_size(group_id, size), "chord size %s", group_id)

    def add_to_chord(self, group_id: str, n: int = 1) -> None:
        """Count ``n`` more header members (tasks a header task adds at run time)."""
        self._groups()
        self.retrying(lambda: self._add_to_chord(group_id, n), "chord %s", group_id)

    def chord_part_return(
        self,
        group_id: str,
        task_id: str,
        group_index: int | None,
        state: str,
        result: Any,
        claim_expires: float = CLAIM_EXPIRES,
    ) -> ChordClaim | None:
        """Count a header task's final state once; return the claim to the caller that completes.

        Atomic: the part is recorded unless ``(task_id, group_index)`` was
        already (a duplicate never counts twice, nor replaces the first
        result); then, when every member is counted and nobody holds the
        dispatch claim, the claim is taken for this caller. A retried call
        (the store went away mid-call) keeps its token, so a claim it took
        before the connection broke is still its own.

        :param group_index: the task's position in the header (``None``:
            after every indexed one).
        :param state: its final state; :param result: its value, or its
            exception in an exception state.
        :param claim_expires: seconds the claim lasts unless extended.
        :returns: a :class:`ChordClaim` to the one caller that must dispatch
            the body, with every part in header order; otherwise ``None``
            (not complete yet, claimed by another, or done already).
        """
        self._groups()
        token = uuid.uuid4().hex
        return self.retrying(  # type: ignore[no-any-return]
            lambda: self._chord_part_return(group_id, task_id, group_index, state, result,
                                            token, claim_expires),
            "part %s of chord %s", task_id, group_id)

    def chord_claim_extend(self, claim: ChordClaim, expires: float | None = None) -> bool:
        """Extend our claim, or take it again when it expired and the chord is not done.

        :param expires: seconds from now (None: ``claim.expires``).
        :returns: False when another caller holds the claim or the chord is done:
            the body must not be dispatched.
        """
        self._groups()
        lasting = claim.expires if expires is None else expires
        return self.retrying(  # type: ignore[no-any-return]
            lambda: self._chord_claim_extend(claim, lasting), "the claim of chord %s",
            claim.group_id)

    def chord_done(self, claim: ChordClaim, done_expires: float = DONE_EXPIRES) -> bool:
        """Release the claim: remove the chord's state, keep a done marker ``done_expires`` s.

        :returns: False when the claim was no longer ours (it expired); the
            chord's state is then left as it is.
        """
        self._groups()
        return self.retrying(  # type: ignore[no-any-return]
            lambda: self._chord_done(claim, done_expires), "the end of chord %s",
            claim.group_id)

    def _save_group(self, group_id: str, value: Mapping[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot store groups")

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        raise NotImplementedError(f"{type(self).__name__} cannot store groups")

    def _delete_group(self, group_id: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot store groups")

    def _set_chord_size(self, group_id: str, size: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot count chords")

    def _add_to_chord(self, group_id: str, n: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot count chords")

    def _chord_part_return(self, group_id: str, task_id: str, group_index: int | None,
                           state: str, result: Any, token: str,
                           claim_expires: float) -> ChordClaim | None:
        raise NotImplementedError(f"{type(self).__name__} cannot count chords")

    def _chord_claim_extend(self, claim: ChordClaim, expires: float) -> bool:
        raise NotImplementedError(f"{type(self).__name__} cannot count chords")

    def _chord_done(self, claim: ChordClaim, done_expires: float) -> bool:
        raise NotImplementedError(f"{type(self).__name__} cannot count chords")


def encode_part_result(state: str, result: Any) -> Any:
    """A header result as stored: an exception in an exception state becomes a mapping."""
    if state in states.EXCEPTION_STATES and isinstance(result, BaseException):
        return exception_to_dict(result)
    return result


def group_value(group_id: str, value: Mapping[str, Any]) -> Any:
    """The ``"result"`` of a group's saved mapping (what is stored).

    :raises ValueError: ``value`` has no ``"result"``.
    """
    if "result" not in value:
        raise ValueError(f"The saved value of group {group_id} must be Celery's mapping "
                         f"{{'result': GroupResult.as_tuple()}}, not {dict(value)!r}.")
    return value["result"]


def index_of(score: float) -> int | None:
    """A stored header position: ``+inf`` (no ``group_index``) is ``None``."""
    return None if math.isinf(score) else int(score)


def seconds(value: float | None) -> int:
    """Whole seconds for an expiry (at least 1); ``None`` or 0: 0, no expiry."""
    return max(1, int(value)) if value else 0
