"""Task states, with Celery's names and values.

``PENDING`` is also what an unknown id reports: the backend cannot tell a
task that was never sent from one that has not started yet.
"""

from __future__ import annotations

PENDING = "PENDING"
RECEIVED = "RECEIVED"
STARTED = "STARTED"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
REJECTED = "REJECTED"
IGNORED = "IGNORED"

#: States after which the result does not change any more.
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
#: Ready states whose result is an exception.
EXCEPTION_STATES = frozenset({RETRY, FAILURE, REVOKED})
#: Ready states that are failures (``get()`` raises for them).
PROPAGATE_STATES = frozenset({FAILURE, REVOKED})
UNREADY_STATES = frozenset({PENDING, RECEIVED, STARTED, REJECTED, RETRY})

ALL_STATES = frozenset(
    {PENDING, RECEIVED, STARTED, RETRY, SUCCESS, FAILURE, REVOKED, REJECTED, IGNORED}
)
