"""The embedded broker's SQLite file: its schema, the claim statements, opening it."""

from __future__ import annotations

import os
import sqlite3
import time
import typing as t

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: stale acks are harmless
    queue TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, payload TEXT NOT NULL,
    lease_until REAL, lease_owner TEXT, deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_claim ON messages (queue, priority DESC, id);
CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, reason TEXT NOT NULL,
    time REAL NOT NULL, hostname TEXT NOT NULL DEFAULT '', entry BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_queue ON dead_letters (queue, id);
COMMIT;
"""
#: A message of queue ``?`` that may be claimed at time ``?``.
READY = "queue = ? AND (lease_until IS NULL OR lease_until < ?)"
PICK = f"SELECT id FROM messages WHERE {READY} ORDER BY priority DESC, id LIMIT 1"
CLAIM = (
    "UPDATE messages SET lease_until = ?, lease_owner = ?,"
    f" deliveries = deliveries + 1 WHERE id = ({PICK})"
    " RETURNING id, payload, deliveries"
)
TAKE = f"DELETE FROM messages WHERE id = ({PICK}) RETURNING id, payload, deliveries + 1"

Params = t.Sequence[t.Any]


def row_id(delivery_tag: t.Any) -> int:
    """The row id of a delivery tag (``"<row id>.<delivery>"``)."""
    return int(str(delivery_tag).partition(".")[0])


def connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    """Open the database file ``path`` in WAL mode, creating it and its tables if missing."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    conn = sqlite3.connect(path, busy_timeout, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA journal_size_limit = 16777216")
    deadline = time.monotonic() + busy_timeout
    while True:  # switching to WAL can fail at once while a peer creates the file
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # new file only
                conn.execute("PRAGMA journal_mode = WAL").fetchall()
            conn.executescript(_SCHEMA)
            return conn
        except sqlite3.OperationalError:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.05)
