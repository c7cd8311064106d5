"""SQL result backend through SQLAlchemy, in Celery's table layout.

Results live in ``celery_taskmeta`` with Celery's columns (``id``,
``task_id``, ``status``, ``result`` as a pickled value, ``date_done``,
``traceback``, and the extended ``name``, ``args``, ``kwargs``, ``worker``,
``retries``, ``queue``), so Celery's database backend can read what we store.

The ``result`` column holds a pickle, as in Celery; we only ever write
JSON-shaped values there and read it back with an unpickler that accepts
plain data types only (containers, numbers, strings, dates), so a tampered
row cannot run code. SQL databases are polled by ``AsyncResult.get()``.

Groups and chords: :mod:`.sql_chords` (Celery's ``celery_tasksetmeta`` for
groups, our own tables for chord counters).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu.utils.json import loads as json_loads
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.types import TypeDecorator

from .. import states
from ..exceptions import DecodeError
from . import sql_chords
from .base import Backend
from .chords import ChordClaim, group_value

_SAFE_GLOBALS = {
    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "time"),
    ("datetime", "timedelta"), ("datetime", "timezone"), ("decimal", "Decimal"),
    ("uuid", "UUID"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "complex"), ("builtins", "bytearray"), ("_codecs", "encode"),
    ("copyreg", "_reconstructor"), ("builtins", "object"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise DecodeError(
            f"Refusing to unpickle {module}.{name} from the result table: only plain "
            f"data is read back."
        )


class SafePickleType(TypeDecorator[Any]):
    """A ``PickleType``-compatible column that only unpickles plain data."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> bytes | None:
        return None if value is None else pickle.dumps(value, protocol=4)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        value = bytes(value)
        if not value.startswith(b"\x80"):  # not a pickle: newer Celery stores JSON bytes
            try:
                return json_loads(value)
            except ValueError as exc:
                raise DecodeError(f"A stored result is neither a pickle nor JSON: {exc}") from exc
        try:
            return _SafeUnpickler(io.BytesIO(value)).load()
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"A stored result cannot be unpickled: {exc}") from exc


metadata = MetaData()

taskmeta = Table(
    "celery_taskmeta",
    metadata,
    Column("id", Integer, Sequence("task_id_sequence"), primary_key=True, autoincrement=True),
    Column("task_id", String(155), unique=True),
    Column("status", String(50)),
    Column("result", SafePickleType, nullable=True),
    Column("date_done", DateTime, nullable=True),
    Column("traceback", Text, nullable=True),
    Column("name", String(155), nullable=True),
    Column("args", LargeBinary, nullable=True),
    Column("kwargs", LargeBinary, nullable=True),
    Column("worker", String(155), nullable=True),
    Column("retries", Integer, nullable=True),
    Column("queue", String(155), nullable=True),
    sqlite_autoincrement=True,
)


revoked_table = Table(
    "flask_tasks_revoked",
    metadata,
    Column("task_id", String(155), primary_key=True),
    Column("terminate", Integer, nullable=False, default=0),
    Column("expires_at", DateTime, nullable=False),
)


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``; SQLite files get WAL mode and a busy timeout."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class SQLBackend(Backend):
    """Results in a SQL database.

    :param url: a SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``);
        for ``RESULT_BACKEND = "db+<url>"`` the ``db+`` prefix is removed first.
    :param engine_factory: instead of ``url``, a callable returning the engine
        to use (how the app's Flask-SQLAlchemy engine is reused).
    :param kwargs: see :class:`Backend`.

    The table is created on first use if it does not exist.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        engine_factory: Callable[[], Engine] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if url is None and engine_factory is None:
            raise ValueError("SQLBackend needs a url or an engine_factory")
        self.url = url
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self._pid = os.getpid()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, created (and the table with it) on first use."""
        if self._engine is not None and self._pid != os.getpid():
            self._engine.dispose(close=False)
            self._pid = os.getpid()
        if self._engine is None:
            engine = self._engine_factory() if self._engine_factory else make_engine(self.url or "")
            tables = [taskmeta, revoked_table, *sql_chords.TABLES]
            try:
                metadata.create_all(engine, tables=[taskmeta, revoked_table], checkfirst=True)
                sql_chords.metadata.create_all(engine, checkfirst=True)
            except (OperationalError, ProgrammingError):
                # Another process created it between our check and CREATE TABLE.
                if not all(inspect(engine).has_table(t.name) for t in tables):
                    raise
            self._engine = engine
        return self._engine

    def _set(self, task_id: str, meta: dict[str, Any]) -> None:
        # Normalize through the result serializer, as the Redis backend does,
        # so a value that would not survive JSON fails here too.
        result = self.decode(self.encode(meta["result"]))
        done = meta.get("date_done")
        values: dict[str, Any] = {
            "status": meta["status"],
            "result": result,
            "traceback": meta.get("traceback"),
            "date_done": datetime.fromisoformat(done).astimezone(UTC).replace(tzinfo=None)
            if done else datetime.now(UTC).replace(tzinfo=None),
        }
        if "name" in meta:
            values.update(
                name=meta["name"], args=self.encode(meta["args"]),
                kwargs=self.encode(meta["kwargs"]),
                worker=meta.get("worker"), retries=meta.get("retries"), queue=meta.get("queue"),
            )
        with self.engine.begin() as conn:
            row = taskmeta.c.task_id == task_id
            changed = conn.execute(update(taskmeta).where(row).values(**values))
            if changed.rowcount:
                return
            try:
                with conn.begin_nested():
                    conn.execute(insert(taskmeta).values(task_id=task_id, **values))
            except IntegrityError:  # inserted meanwhile by another process
                conn.execute(update(taskmeta).where(taskmeta.c.task_id == task_id).values(**values))

    def _get(self, task_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(taskmeta.c.status, taskmeta.c.result, taskmeta.c.traceback,
                       taskmeta.c.date_done).where(taskmeta.c.task_id == task_id)
            ).first()
        if row is None:
            return None
        done = row.date_done
        return {
            "task_id": task_id,
            "status": row.status,
            "result": row.result,
            "traceback": row.traceback,
            "children": [],
            "date_done": done.replace(tzinfo=UTC).isoformat()
            if done is not None and row.status in states.READY_STATES else None,
        }

    def _delete(self, task_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(taskmeta).where(taskmeta.c.task_id == task_id))

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """Lost or refused connections and locks (``OperationalError``), not missing tables."""
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        return isinstance(exc, OperationalError) and "no such" not in str(exc)

    def _revoke(self, task_id: str, terminate: bool, expires: float) -> None:
        """Record a revoke in ``flask_tasks_revoked`` (kept ``expires`` seconds)."""
        until = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=expires)
        values = {"terminate": int(terminate), "expires_at": until}
        with self.engine.begin() as conn:
            changed = conn.execute(update(revoked_table)
                                   .where(revoked_table.c.task_id == task_id).values(**values))
            if not changed.rowcount:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(revoked_table).values(task_id=task_id, **values))
                except IntegrityError:
                    pass  # revoked meanwhile by someone else

    def revoked(self) -> dict[str, bool]:
        """Unexpired revokes (expired ones are removed on the way)."""
        now = datetime.now(UTC).replace(tzinfo=None)
        with self.engine.begin() as conn:
            conn.execute(delete(revoked_table).where(revoked_table.c.expires_at <= now))
            rows = conn.execute(select(revoked_table.c.task_id, revoked_table.c.terminate))
            return {row.task_id: bool(row.terminate) for row in rows}

    def cleanup(self) -> int:
        """Delete results and groups older than ``expires`` seconds, and expired chords.

        :returns: how many rows were removed.
        """
        with self.engine.begin() as conn:
            removed = sql_chords.cleanup(conn, self.expires)
            if not self.expires:
                return removed
            cutoff = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=self.expires)
            return removed + (conn.execute(delete(taskmeta).where(taskmeta.c.date_done < cutoff))
                              .rowcount or 0)

    # -- groups and chords ---------------------------------------------------
    def _save_group(self, group_id: str, value: Mapping[str, Any]) -> None:
        data = self.encode(group_value(group_id, value))
        with self.engine.begin() as conn:
            sql_chords.save_group(conn, group_id, data)

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            found = sql_chords.restore_group(conn, group_id)
        if found is None:
            return None
        data, done = found
        return {"result": self.decode(data),
                "date_done": None if done is None else done.replace(tzinfo=UTC).isoformat()}

    def _delete_group(self, group_id: str) -> None:
        with self.engine.begin() as conn:
            sql_chords.delete_group(conn, group_id)

    def _set_chord_size(self, group_id: str, size: int) -> None:
        with self.engine.begin() as conn:
            sql_chords.set_size(conn, group_id, size, self.expires)

    def _add_to_chord(self, group_id: str, n: int) -> None:
        with self.engine.begin() as conn:
            sql_chords.add(conn, group_id, n, self.expires)

    def _chord_part_return(self, group_id: str, task_id: str, group_index: int | None,
                           state: str, result: Any, token: str,
                           claim_expires: float) -> ChordClaim | None:
        with self.engine.begin() as conn:
            return sql_chords.part_return(conn, self.encode, self.decode, group_id, task_id,
                                          group_index, state, result, token, claim_expires,
                                          self.expires)

    def _chord_claim_extend(self, claim: ChordClaim, expires: float) -> bool:
        with self.engine.begin() as conn:
            return sql_chords.claim_extend(conn, claim, expires)

    def _chord_done(self, claim: ChordClaim, done_expires: float) -> bool:
        with self.engine.begin() as conn:
            return sql_chords.done(conn, claim, done_expires)

    def reset_after_fork(self) -> None:
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._pid = os.getpid()

    def close(self) -> None:
        if self._engine is not None and self._pid == os.getpid():
            self._engine.dispose()
