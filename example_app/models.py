"""Database models: one :class:`Report` per finished CSV analysis."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from .extensions import db


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    """SQLite gives datetimes back without their time zone; they are UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Report(db.Model):  # type: ignore[name-defined,misc]
    """The outcome of one ``analyze_csv`` task."""

    id: Mapped[int] = mapped_column(primary_key=True)
    filename: Mapped[str] = mapped_column(String(255))
    created: Mapped[datetime] = mapped_column(default=_utcnow)
    rows: Mapped[int]
    #: Column names, in file order.
    columns: Mapped[list[str]] = mapped_column(JSON)
    #: ``{column: {"count", "sum", "min", "max", "mean", "non_numeric"}}`` for numeric columns.
    stats: Mapped[dict[str, Any]] = mapped_column(JSON)
    task_id: Mapped[str] = mapped_column(String(36), index=True)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data (also the task's return value)."""
        return {
            "report_id": self.id,
            "filename": self.filename,
            "created": _as_utc(self.created).isoformat(),
            "rows": self.rows,
            "columns": self.columns,
            "stats": self.stats,
            "task_id": self.task_id,
        }
