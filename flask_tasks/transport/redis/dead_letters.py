"""The Redis dead-letter store: a list beside each queue (see :mod:`..dead_letters`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from ..._redis import round_trip
from ..dead_letters import DEAD_SUFFIX, DeadLetter, DeadLetters, decode_record, encode_record
from . import scripts

#: Records read per LRANGE while looking for one.
_PAGE = 500


class RedisDeadLetters(DeadLetters):
    """Dead letters in ``<queue>\\x06\\x16dead`` lists, newest first.

    :param acquire: gives the channel's Redis client (``Channel.conn_or_acquire``).
    :param sep: kombu's key separator.
    :param max_entries: most letters kept per queue (None: no limit).
    """

    def __init__(self, acquire: Callable[[], AbstractContextManager[Any]], sep: str,
                 max_entries: int | None) -> None:
        self._acquire = acquire
        self.sep = sep
        self.max_entries = max_entries

    def key(self, queue: str) -> str:
        """The dead-letter list of ``queue``."""
        return queue + self.sep + DEAD_SUFFIX

    def _keys(self, queue: str | None) -> list[str]:
        if queue is not None:
            return [self.key(queue)]
        pattern = "*" + self.sep + DEAD_SUFFIX
        with self._acquire() as client:
            found = {k.decode() if isinstance(k, bytes) else k
                     for k in client.scan_iter(match=pattern, count=1000)}
        return sorted(found)

    def add(self, queue: str, entry: bytes, reason: str, hostname: str = "") -> None:
        record = encode_record(queue, entry, reason, hostname)
        commands: list[tuple[Any, ...]] = [("LPUSH", self.key(queue), record)]
        if self.max_entries is not None:
            commands.append(("LTRIM", self.key(queue), 0, self.max_entries - 1))
        with self._acquire() as client:
            round_trip(client, *commands)

    def _records(self, queue: str | None) -> Iterator[tuple[str, bytes]]:
        """Every (key, record), newest first per queue."""
        for key in self._keys(queue):
            start = 0
            while True:
                with self._acquire() as client:
                    page = client.lrange(key, start, start + _PAGE - 1)
                for record in page:
                    yield key, record
                if len(page) < _PAGE:
                    break
                start += _PAGE

    def list(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        for key in self._keys(queue):
            with self._acquire() as client:
                records = client.lrange(key, 0, max(limit, 1) - 1)
            letters += [letter for letter in map(_read, records) if letter is not None]
        letters.sort(key=lambda letter: letter.time, reverse=True)
        return letters[:limit]

    def _find(self, letter_id: str) -> tuple[str, bytes, DeadLetter] | None:
        needle = f'"id": "{letter_id}"'.encode()
        for key, record in self._records(None):
            head = record.partition(b"\n")[0]
            if needle in head or f'"id":"{letter_id}"'.encode() in head:
                letter = _read(record)
                if letter is not None and letter.id == letter_id:
                    return key, record, letter
        return None

    def get(self, letter_id: str) -> DeadLetter | None:
        found = self._find(letter_id)
        return found[2] if found else None

    def requeue(self, letter_id: str) -> DeadLetter | None:
        found = self._find(letter_id)
        if found is None:
            return None
        key, record, letter = found
        with self._acquire() as client:
            done = scripts.requeue_dead(client, [key, letter.queue], [record, letter.entry])
        return letter if done else None

    def purge(self, queue: str | None = None) -> int:
        keys = self._keys(queue)
        if not keys:
            return 0
        with self._acquire() as client:
            replies = round_trip(client, *[("LLEN", key) for key in keys], ("DEL", *keys))
        return sum(int(count) for count in replies[:-1])

    def count(self, queue: str | None = None) -> int:
        keys = self._keys(queue)
        if not keys:
            return 0
        with self._acquire() as client:
            return sum(int(n) for n in round_trip(client, *[("LLEN", key) for key in keys]))

    def trim(self, max_entries: int | None, max_age: float | None) -> int:
        keys = self._keys(None)
        if not keys or (max_entries is None and max_age is None):
            return 0
        oldest = -1.0 if max_age is None else time.time() - max_age
        with self._acquire() as client:
            return int(scripts.trim_dead(client, keys,
                                         [-1 if max_entries is None else max_entries, oldest]))


def _read(record: bytes) -> DeadLetter | None:
    try:
        return decode_record(record)
    except (ValueError, TypeError, RecursionError):
        return None
