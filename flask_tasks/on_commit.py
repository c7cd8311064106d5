"""Sending a task once the Flask-SQLAlchemy transaction commits: ``apply_async(on_commit=True)``.

The call is checked and encoded at once; the message waits in the session's
``info`` until the outermost transaction commits (``after_commit``), and is
dropped, with a log line, if it ends otherwise (``after_transaction_end``).
A savepoint's commit or rollback is not the end: the real one is waited for.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from flask import Flask

from .options import CallOptions, resolve
from .result import AsyncResult
from .task import Task, TaskApp

#: Named as in the docs (docs/calling.md), from before this module had its own file.
logger = logging.getLogger("flask_tasks.on_commit")

#: Where a session keeps the calls that wait for its commit.
_PENDING_KEY = "flask_tasks.on_commit"


def send_on_commit(state: TaskApp, app: Flask | None, name: str, args: Sequence[Any] | None,
                   kwargs: Mapping[str, Any] | None, task: Task[Any, Any] | None,
                   options: CallOptions) -> AsyncResult[Any]:
    """``state.send_task(...)`` once ``app``'s Flask-SQLAlchemy session commits (never on rollback).

    Without Flask-SQLAlchemy on the app, or outside a transaction, it is sent at once.

    :param state: what sends the call, now or at the commit.
    :param app: the app whose ``db.session`` decides (``None``: send at once).
    :returns: the result of the id the call will have.
    :raises flask_tasks.exceptions.EncodeError: an argument cannot be serialized
        (checked now, not at commit).
    :raises TypeError: an unknown option.
    """
    options = {**options, "task_id": options.get("task_id") or str(uuid.uuid4())}
    resolved = resolve(options, task, state.config)
    resolved.message(name, args, kwargs)  # fail now, not at commit
    db = app.extensions.get("sqlalchemy") if app is not None else None
    session = db.session() if db is not None else None
    if session is None or not session.in_transaction():
        return state.send_task(name, args, kwargs, task=task, **options)
    pending = session.info.get(_PENDING_KEY)
    if pending is None:
        # Only apps that use Flask-SQLAlchemy get here: others never import SQLAlchemy's events.
        from sqlalchemy import event

        pending = session.info[_PENDING_KEY] = []
        event.listen(session, "after_commit", _publish_pending)
        event.listen(session, "after_transaction_end", _drop_pending)
    pending.append((state, name, args, kwargs, task, options))
    return state.result(resolved.task_id, name)


def _publish_pending(session: Any) -> None:
    """``after_commit``: send what waited for this commit (not a savepoint's)."""
    if session.in_nested_transaction():  # a savepoint: the real commit is still to come
        return
    pending = session.info.get(_PENDING_KEY) or []
    session.info[_PENDING_KEY] = []
    for state, name, args, kwargs, task, options in pending:
        try:
            state.send_task(name, args, kwargs, task=task, **options)
        except Exception:  # the commit is done: report, and send the others
            logger.exception("Could not send task %s[%s] after the commit", name,
                             options["task_id"])


def _drop_pending(session: Any, transaction: Any) -> None:
    """``after_transaction_end`` of the outermost transaction: what is left is never sent.

    After a commit nothing is left (``after_commit`` sent it); after a rollback
    or a close without commit, the waiting tasks are dropped, with a log line.
    """
    if transaction.parent is not None:  # a savepoint ended: wait for the real end
        return
    dropped = session.info.get(_PENDING_KEY) or []
    session.info[_PENDING_KEY] = []
    for _state, name, _args, _kwargs, _task, options in dropped:
        logger.info("Task %s[%s] not sent: the transaction ended without a commit",
                    name, options["task_id"])
