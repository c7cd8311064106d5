"""The background task: analyze a CSV file, report progress, store a :class:`Report`."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from .extensions import db, tasks
from .models import Report

logger = logging.getLogger(__name__)

#: Rows parsed between two progress updates.
CHUNK_ROWS = 200


def _number(value: str) -> float | None:
    """``value`` as a finite float, or None if it is not a number."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _rows(text: str) -> Iterator[list[str]]:
    """The CSV records of ``text``, blank lines skipped."""
    return (row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row))


def read_header(text: str) -> list[str]:
    """The column names of ``text``.

    :raises ValueError: the text is empty, or its first row is not a header.
    """
    try:
        header = next(_rows(text), None)
    except csv.Error as exc:
        raise ValueError(f"Not valid CSV: {exc}") from None
    if header is None:
        raise ValueError("The CSV is empty.")
    names = [name.strip() for name in header]
    if all(_number(name) is not None for name in names):
        raise ValueError("The CSV has no header: its first row is all numbers. "
                         "Add a first line with the column names.")
    if "" in names or len(set(names)) != len(names):
        raise ValueError("The CSV header must give every column a distinct, non-empty name.")
    return names


class ColumnStats:
    """Running count/sum/min/max of one column's numbers, and its non-numeric count."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.non_numeric = 0

    def add(self, cell: str) -> None:
        if not cell.strip():
            return
        number = _number(cell)
        if number is None:
            self.non_numeric += 1
            return
        self.count += 1
        self.total += number
        self.min = min(self.min, number)
        self.max = max(self.max, number)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sum": round(self.total, 6), "min": self.min,
                "max": self.max, "mean": round(self.total / self.count, 6),
                "non_numeric": self.non_numeric}


@tasks.task(bind=True, track_started=True)
def analyze_csv(self: Any, text: str, filename: str,
                delay_per_chunk: float = 0.0) -> dict[str, Any]:
    """Compute per-column statistics of a CSV text and store them as a :class:`Report`.

    Stores ``PROGRESS`` with ``{"done": rows, "total": rows}`` after every
    :data:`CHUNK_ROWS` rows; ``delay_per_chunk`` (seconds) slows it down for demos.

    :returns: :meth:`Report.to_dict` of the new report.
    :raises ValueError: the CSV is empty or has no header row.
    """
    columns = read_header(text)
    total = sum(1 for _ in _rows(text)) - 1
    stats = {name: ColumnStats() for name in columns}
    records = itertools.islice(_rows(text), 1, None)  # skip the header
    done = 0
    self.update_state(state="PROGRESS", meta={"done": 0, "total": total})
    while chunk := list(itertools.islice(records, CHUNK_ROWS)):
        for row in chunk:
            # Short rows: the missing cells are blank.
            for name, cell in zip(columns, row, strict=False):
                stats[name].add(cell)
        done += len(chunk)
        self.update_state(state="PROGRESS", meta={"done": done, "total": total})
        if delay_per_chunk:
            time.sleep(delay_per_chunk)
    report = Report(filename=filename, rows=done, columns=columns, task_id=self.request.id,
                    stats={name: s.as_dict() for name, s in stats.items() if s.count})
    db.session.add(report)
    db.session.commit()
    logger.info("Report %s: %s, %d rows, %d columns", report.id, filename, done, len(columns))
    return report.to_dict()
