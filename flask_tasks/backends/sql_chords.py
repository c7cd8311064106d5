"""Groups and chords in SQL (also the embedded default, on SQLite).

Tables (created on first use, with the results table):

- ``celery_tasksetmeta`` — Celery's database backend's group table
  (``taskset_id``, ``result`` = the encoded ``GroupResult.as_tuple()``,
  ``date_done``), so Celery's ``db+`` backend restores our groups.
- ``flask_tasks_chords`` — one row per chord: ``size``, ``extra`` (members
  added at run time), the dispatch claim (``claim_token``, ``claim_until``),
  ``done`` and ``expires_at`` (NULL: kept).
- ``flask_tasks_chord_parts`` — one row per counted part, primary key
  ``(group_id, member)`` with ``member`` = ``"<task_id>:<index>"`` (``+inf``
  without an index), as Redis's ``.d`` set: a duplicate is never counted.

Every operation is one transaction that first writes the chord's row
(:func:`_lock`): on PostgreSQL or MySQL that locks the row, on SQLite it takes
the database's write lock, so the reports of one chord are serialized and the
one that counts the last part sees every other part (no lost completion under
``READ COMMITTED``). The rules are Redis's (:mod:`.redis_chords`); there is
no polling task.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    String,
    Table,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from .chords import ChordClaim, ChordPart, encode_part_result

metadata = MetaData()

tasksetmeta = Table(
    "celery_tasksetmeta",
    metadata,
    Column("id", Integer, Sequence("taskset_id_sequence"), primary_key=True, autoincrement=True),
    Column("taskset_id", String(155), unique=True),
    Column("result", LargeBinary, nullable=True),
    Column("date_done", DateTime, nullable=True, index=True),
    sqlite_autoincrement=True,
)

chords = Table(
    "flask_tasks_chords",
    metadata,
    Column("group_id", String(155), primary_key=True),
    Column("size", Integer, nullable=True),
    Column("extra", Integer, nullable=False, default=0),
    Column("claim_token", String(64), nullable=True),
    Column("claim_until", DateTime, nullable=True),
    Column("done", Integer, nullable=False, default=0),
    Column("expires_at", DateTime, nullable=True, index=True),
)

parts = Table(
    "flask_tasks_chord_parts",
    metadata,
    Column("group_id", String(155), primary_key=True),
    Column("member", String(200), primary_key=True),
    Column("task_id", String(155), nullable=False),
    Column("group_index", Integer, nullable=True),
    Column("state", String(50), nullable=False),
    Column("result", LargeBinary, nullable=True),
)

TABLES = [tasksetmeta, chords, parts]


def utcnow() -> datetime:
    """Naive UTC, as the tables store it."""
    return datetime.now(UTC).replace(tzinfo=None)


def _until(seconds: float | None) -> datetime | None:
    return None if not seconds else utcnow() + timedelta(seconds=seconds)


# -- groups ------------------------------------------------------------------
def save_group(conn: Connection, group_id: str, data: bytes) -> None:
    """Insert or replace the group's row."""
    values = {"result": data, "date_done": utcnow()}
    row = tasksetmeta.c.taskset_id == group_id
    if conn.execute(update(tasksetmeta).where(row).values(**values)).rowcount:
        return
    try:
        with conn.begin_nested():
            conn.execute(insert(tasksetmeta).values(taskset_id=group_id, **values))
    except IntegrityError:  # saved meanwhile by another process
        conn.execute(update(tasksetmeta).where(row).values(**values))


def restore_group(conn: Connection, group_id: str) -> tuple[bytes, datetime | None] | None:
    """The group's encoded result and ``date_done``, or ``None``."""
    row = conn.execute(select(tasksetmeta.c.result, tasksetmeta.c.date_done)
                       .where(tasksetmeta.c.taskset_id == group_id)).first()
    return None if row is None or row.result is None else (bytes(row.result), row.date_done)


def delete_group(conn: Connection, group_id: str) -> None:
    conn.execute(delete(tasksetmeta).where(tasksetmeta.c.taskset_id == group_id))


# -- chords ------------------------------------------------------------------
def _lock(conn: Connection, group_id: str, expires: float | None) -> None:
    """Write the chord's row first (creating it), which serializes the chord's writers.

    A chord not done yet is kept ``expires`` more seconds (``None``: kept).
    """
    row = chords.c.group_id == group_id
    if not conn.execute(update(chords).where(row).values(extra=chords.c.extra)).rowcount:
        try:
            with conn.begin_nested():
                conn.execute(insert(chords).values(group_id=group_id, extra=0, done=0))
        except IntegrityError:  # created meanwhile: now wait for its writer
            conn.execute(update(chords).where(row).values(extra=chords.c.extra))
    conn.execute(update(chords).where(row, chords.c.done == 0)
                 .values(expires_at=_until(expires)))


def set_size(conn: Connection, group_id: str, size: int, expires: float | None) -> None:
    """Set the size and start a new run: the claim and the done marker are cleared."""
    _lock(conn, group_id, expires)
    conn.execute(update(chords).where(chords.c.group_id == group_id)
                 .values(size=size, claim_token=None, claim_until=None, done=0,
                         expires_at=_until(expires)))


def add(conn: Connection, group_id: str, n: int, expires: float | None) -> None:
    _lock(conn, group_id, expires)
    conn.execute(update(chords).where(chords.c.group_id == group_id)
                 .values(extra=chords.c.extra + n))


def part_return(conn: Connection, encode: Callable[[Any], bytes],
                decode: Callable[[bytes], Any], group_id: str, task_id: str,
                group_index: int | None, state: str, result: Any, token: str,
                claim_expires: float, expires: float | None) -> ChordClaim | None:
    """Count the part once; take the claim when it completes the chord."""
    _lock(conn, group_id, expires)
    chord = conn.execute(select(chords).where(chords.c.group_id == group_id)).one()
    if chord.done:
        return None
    member = f"{task_id}:{'+inf' if group_index is None else int(group_index)}"
    counted = conn.execute(select(parts.c.member).where(
        parts.c.group_id == group_id, parts.c.member == member)).first()
    if counted is None:
        conn.execute(insert(parts).values(
            group_id=group_id, member=member, task_id=task_id,
            group_index=None if group_index is None else int(group_index), state=state,
            result=encode(encode_part_result(state, result))))
    if chord.size is None:
        return None
    count = conn.execute(select(func.count()).select_from(parts)
                         .where(parts.c.group_id == group_id)).scalar_one()
    if count != chord.size + chord.extra:
        return None
    now = utcnow()
    free = chord.claim_token is None or chord.claim_until is None or chord.claim_until <= now
    if not free and chord.claim_token != token:
        return None
    conn.execute(update(chords).where(chords.c.group_id == group_id).values(
        claim_token=token, claim_until=now + timedelta(seconds=claim_expires)))
    rows = conn.execute(select(parts.c.task_id, parts.c.group_index, parts.c.state,
                               parts.c.result)
                        .where(parts.c.group_id == group_id)
                        .order_by(parts.c.group_index.is_(None), parts.c.group_index,
                                  parts.c.member))
    found = tuple(ChordPart(row.task_id, row.group_index, row.state,
                            None if row.result is None else decode(bytes(row.result)))
                  for row in rows)
    return ChordClaim(group_id, token, found, claim_expires)


def claim_extend(conn: Connection, claim: ChordClaim, expires: float) -> bool:
    """Extend our live claim, or take an expired or absent one while the chord has a size."""
    now = utcnow()
    row = chords.c.group_id == claim.group_id
    until = now + timedelta(seconds=expires)
    ours = and_(chords.c.claim_token == claim.token, chords.c.claim_until > now)
    free = and_(chords.c.size.is_not(None),
                or_(chords.c.claim_token.is_(None), chords.c.claim_until <= now))
    changed = conn.execute(update(chords).where(row, chords.c.done == 0, or_(ours, free))
                           .values(claim_token=claim.token, claim_until=until))
    return bool(changed.rowcount)


def done(conn: Connection, claim: ChordClaim, done_expires: float) -> bool:
    """Remove the chord's parts and keep a done row, while the claim is ours."""
    now = utcnow()
    changed = conn.execute(
        update(chords).where(chords.c.group_id == claim.group_id, chords.c.done == 0,
                             chords.c.claim_token == claim.token, chords.c.claim_until > now)
        .values(done=1, size=None, extra=0, claim_token=None, claim_until=None,
                expires_at=now + timedelta(seconds=done_expires)))
    if not changed.rowcount:
        return False
    conn.execute(delete(parts).where(parts.c.group_id == claim.group_id))
    return True


def cleanup(conn: Connection, results_expires: float | None) -> int:
    """Delete expired chords (with their parts) and, with an expiry, old groups."""
    now = utcnow()
    expired = select(chords.c.group_id).where(chords.c.expires_at <= now)
    conn.execute(delete(parts).where(parts.c.group_id.in_(expired)))
    removed = conn.execute(delete(chords).where(chords.c.expires_at <= now)).rowcount or 0
    if results_expires:
        cutoff = now - timedelta(seconds=results_expires)
        removed += conn.execute(delete(tasksetmeta)
                                .where(tasksetmeta.c.date_done < cutoff)).rowcount or 0
    return removed
