"""The embedded broker's dead letters: a ``dead_letters`` table (see :mod:`..dead_letters`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import polling
from ..dead_letters import DeadLetter, DeadLetters, entry_ids
from .sqlite import Params

if TYPE_CHECKING:
    from .channel import Channel

_COLUMNS = "id, queue, reason, time, hostname, entry"


def insert(queue: str, entry: bytes, reason: str, hostname: str,
           max_entries: int | None) -> list[tuple[str, Params]]:
    """The statements that keep ``queue``'s newest letters and add one (it returns its id)."""
    statements: list[tuple[str, Params]] = []
    if max_entries is not None:
        statements.append((
            "DELETE FROM dead_letters WHERE queue = ? AND id NOT IN"
            " (SELECT id FROM dead_letters WHERE queue = ? ORDER BY id DESC LIMIT ?)",
            (queue, queue, max(max_entries - 1, 0))))
    statements.append((
        "INSERT INTO dead_letters (queue, reason, time, hostname, entry) VALUES (?, ?, ?, ?, ?)"
        " RETURNING id", (queue, reason, time.time(), hostname, entry)))
    return statements


class EmbeddedDeadLetters(DeadLetters):
    """Dead letters in the embedded broker's SQLite file.

    :param channel: an embedded channel (its connection and write transactions).
    :param max_entries: most letters kept per queue (None: no limit).
    """

    def __init__(self, channel: Channel, max_entries: int | None) -> None:
        self.channel = channel
        self.max_entries = max_entries

    def add(self, queue: str, entry: bytes, reason: str, hostname: str = "") -> None:
        if self.max_entries == 0:
            return
        self.channel._write(insert(queue, entry, reason, hostname, self.max_entries))

    def list(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        where, params = _where(queue)
        rows = self.channel._query(f"SELECT {_COLUMNS} FROM dead_letters{where}"
                                   " ORDER BY id DESC LIMIT ?", (*params, limit))
        return [_letter(row) for row in rows]

    def get(self, letter_id: str) -> DeadLetter | None:
        if not letter_id.isdigit():
            return None
        rows = self.channel._query(f"SELECT {_COLUMNS} FROM dead_letters WHERE id = ?",
                                   (int(letter_id),))
        return _letter(rows[0]) if rows else None

    def requeue(self, letter_id: str) -> DeadLetter | None:
        letter = self.get(letter_id)
        if letter is None:
            return None
        rows = self.channel._write([
            ("INSERT INTO messages (queue, priority, payload) SELECT queue, 0, entry"
             " FROM dead_letters WHERE id = ?", (int(letter_id),)),
            ("DELETE FROM dead_letters WHERE id = ? RETURNING id", (int(letter_id),)),
        ])
        if not rows:
            return None
        polling.doorbell.ring()
        return letter

    def purge(self, queue: str | None = None) -> int:
        where, params = _where(queue)
        return self.channel._execute(f"DELETE FROM dead_letters{where}", params)

    def count(self, queue: str | None = None) -> int:
        where, params = _where(queue)
        return int(self.channel._query(f"SELECT COUNT(*) FROM dead_letters{where}", params)[0][0])

    def trim(self, max_entries: int | None, max_age: float | None) -> int:
        removed = 0
        if max_age is not None:
            removed += self.channel._execute("DELETE FROM dead_letters WHERE time < ?",
                                             (time.time() - max_age,))
        if max_entries is not None:
            removed += self.channel._execute(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER()"
                " OVER (PARTITION BY queue ORDER BY id DESC) AS n FROM dead_letters)"
                " WHERE n > ?)", (max_entries,))
        return removed


def _where(queue: str | None) -> tuple[str, tuple[Any, ...]]:
    return ("", ()) if queue is None else (" WHERE queue = ?", (queue,))


def _letter(row: tuple[Any, ...]) -> DeadLetter:
    letter_id, queue, reason, when, hostname, entry = row
    raw = entry if isinstance(entry, bytes) else str(entry).encode("utf-8", "surrogateescape")
    task_id, task = entry_ids(raw)
    return DeadLetter(id=str(letter_id), queue=queue, reason=reason, time=float(when),
                      entry=raw, hostname=hostname or "", task_id=task_id, task=task)
