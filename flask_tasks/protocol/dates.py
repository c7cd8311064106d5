"""Datetimes on the wire: seconds, timedeltas and ISO 8601 strings as aware UTC datetimes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def to_datetime(value: float | datetime | timedelta | None,
                now: datetime | None = None) -> datetime | None:
    """Turn seconds-from-now, a timedelta or a datetime into an aware UTC datetime.

    A naive datetime is taken to be UTC.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value
    now = now or datetime.now(UTC)
    if isinstance(value, timedelta):
        return now + value
    return now + timedelta(seconds=float(value))


def parse_datetime(value: str | None) -> datetime | None:
    """Parse an ISO 8601 header value; naive means UTC."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed
