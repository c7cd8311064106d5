"""Dead letters: broker entries set aside with the reason, for a person to act on.

A worker never crashes on, retries or silently drops what it cannot use. An
entry that is not a well-formed envelope (:mod:`.envelope`), and, when
``TASKS_DEAD_LETTER_REJECTED`` is on, a task message rejected for its content
(unknown task, bad arguments, refused content type), is moved to the
broker's dead-letter store with the reason, acknowledged (never restored),
logged once and counted. ``flask tasks dead-letters`` lists, shows,
re-queues and purges them.

Where they are kept:

- **Redis**: a list beside each queue, key ``<queue>\\x06\\x16dead`` (kombu's
  separator, as the delayed-message sorted set ``<queue>\\x06\\x16eta``),
  newest first. Each item is a :func:`encode_record`: one line of JSON
  metadata, a newline, then the entry's bytes exactly as they were.
- **The embedded broker**: a ``dead_letters`` table in its SQLite file.

Both stores are bounded: at most ``TASKS_DEAD_LETTER_MAX_ENTRIES`` per queue
(the oldest go first) and none older than ``TASKS_DEAD_LETTER_MAX_AGE``
seconds (trimmed by the workers' housekeeping). A broker without a store
(RabbitMQ: it has its own dead-letter exchanges) gives no
:class:`DeadLetters`.

Never imports Flask.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEAD_SUFFIX", "MAX_AGE", "MAX_ENTRIES", "DeadLetter", "DeadLetters",
           "decode_record", "encode_record", "entry_ids"]

#: Suffix of the Redis list beside a queue that holds its dead letters.
DEAD_SUFFIX = "dead"
#: Most dead letters kept per queue, by default (``TASKS_DEAD_LETTER_MAX_ENTRIES``).
MAX_ENTRIES = 10_000
#: Seconds a dead letter is kept, by default (``TASKS_DEAD_LETTER_MAX_AGE``): 7 days.
MAX_AGE = 7 * 24 * 3600.0


@dataclass(frozen=True)
class DeadLetter:
    """One entry set aside.

    :param id: its id in the store (what ``show`` and ``requeue`` take).
    :param queue: the queue it was taken from (and goes back to on requeue).
    :param reason: why it was set aside, for a person.
    :param time: when, as seconds since the epoch (UTC).
    :param entry: the raw entry, byte for byte as the broker held it.
    :param hostname: the worker that set it aside ("" if unknown).
    :param task_id: the task id, when the entry is a readable task message.
    :param task: the task name, likewise.
    """

    id: str
    queue: str
    reason: str
    time: float
    entry: bytes = field(repr=False)
    hostname: str = ""
    task_id: str | None = None
    task: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the entry as text (undecodable bytes escaped as ``\\udcXX``)."""
        return {"id": self.id, "queue": self.queue, "reason": self.reason, "time": self.time,
                "hostname": self.hostname, "task_id": self.task_id, "task": self.task,
                "entry": self.entry.decode("utf-8", "surrogateescape")}


def entry_ids(entry: bytes) -> tuple[str | None, str | None]:
    """``(task_id, task)`` of a raw entry if it is readable as a task message, else Nones."""
    try:
        headers = json.loads(entry).get("headers")
        task_id, task = headers.get("id"), headers.get("task")
    except (ValueError, RecursionError, AttributeError, TypeError):
        return None, None
    return (task_id if isinstance(task_id, str) else None,
            task if isinstance(task, str) else None)


def encode_record(queue: str, entry: bytes, reason: str, hostname: str = "",
                  now: float | None = None, record_id: str | None = None) -> bytes:
    """The Redis form of a dead letter: a JSON line, a newline, the entry's bytes."""
    meta = {"id": record_id or uuid.uuid4().hex, "queue": queue, "reason": reason,
            "time": time.time() if now is None else now, "hostname": hostname}
    return json.dumps(meta, ensure_ascii=True).encode() + b"\n" + entry


def decode_record(record: bytes) -> DeadLetter:
    """Read a :func:`encode_record` back.

    :raises ValueError: not a dead-letter record.
    """
    head, sep, entry = record.partition(b"\n")
    meta = json.loads(head) if sep else None
    if not isinstance(meta, dict) or not isinstance(meta.get("id"), str):
        raise ValueError("not a dead-letter record")
    task_id, task = entry_ids(entry)
    return DeadLetter(id=meta["id"], queue=str(meta.get("queue", "")),
                      reason=str(meta.get("reason", "")), time=float(meta.get("time") or 0),
                      entry=entry, hostname=str(meta.get("hostname") or ""),
                      task_id=task_id, task=task)


class DeadLetters(ABC):
    """A broker's dead-letter store (Redis lists, the embedded broker's table).

    ``queue`` arguments are queue names; ``None`` means every queue that has
    dead letters. Raises the broker's connection errors when it is unreachable.
    """

    @abstractmethod
    def add(self, queue: str, entry: bytes, reason: str, hostname: str = "") -> None:
        """Set ``entry`` aside (then trim the queue's letters to the entry limit)."""

    @abstractmethod
    def list(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters (of ``queue``), newest first."""

    @abstractmethod
    def get(self, letter_id: str) -> DeadLetter | None:
        """The dead letter ``letter_id``, or None."""

    @abstractmethod
    def requeue(self, letter_id: str) -> DeadLetter | None:
        """Publish the entry again on its queue (at the back) and drop the letter, atomically.

        :returns: the letter requeued, or None if there is no such letter.
        """

    @abstractmethod
    def purge(self, queue: str | None = None) -> int:
        """Delete the dead letters (of ``queue``); returns how many."""

    @abstractmethod
    def count(self, queue: str | None = None) -> int:
        """How many dead letters there are (of ``queue``)."""

    @abstractmethod
    def trim(self, max_entries: int | None, max_age: float | None) -> int:
        """Drop letters beyond ``max_entries`` per queue or older than ``max_age`` seconds.

        :returns: how many were dropped.
        """
