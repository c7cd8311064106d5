"""delay_on_commit / apply_async(on_commit=True) with Flask-SQLAlchemy (the broker a double)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from flask_tasks import Tasks
from flask_tasks.exceptions import EncodeError

tasks = Tasks()
db = SQLAlchemy()


class Row(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)


@tasks.task(name="oncommit.use")
def use(row_id: int) -> None: ...


@pytest.fixture()
def app(tmp_path: Path) -> Iterator[tuple[Flask, list[dict[str, Any]]]]:
    app = Flask("oncommit", instance_path=str(tmp_path))
    app.config.update(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/app.db",
                      RESULT_BACKEND="disabled", BROKER_URL="memory://")
    db.init_app(app)
    tasks.init_app(app)
    sent: list[dict[str, Any]] = []
    tasks.state(app).publisher.publish = (  # type: ignore[method-assign]
        lambda message, queue, **kw: sent.append({"id": message.task_id}))
    with app.app_context():
        db.create_all()
        yield app, sent


def test_sent_after_commit_only(app: tuple[Flask, list[dict[str, Any]]]) -> None:
    _, sent = app
    row = Row()
    db.session.add(row)
    db.session.flush()
    result = use.delay_on_commit(row.id)
    assert sent == []
    db.session.commit()
    assert sent == [{"id": result.id}]
    db.session.add(Row())
    db.session.commit()
    assert len(sent) == 1  # sent once


def test_never_sent_after_rollback(app: tuple[Flask, list[dict[str, Any]]]) -> None:
    _, sent = app
    db.session.add(Row())
    use.apply_async((1,), on_commit=True)
    db.session.rollback()
    db.session.add(Row())
    db.session.commit()
    assert sent == []


def test_outside_a_transaction_it_is_sent_at_once(app: tuple[Flask, list[dict[str, Any]]]) -> None:
    _, sent = app
    result = use.delay_on_commit(7)
    assert sent == [{"id": result.id}]


def test_bad_arguments_fail_now(app: tuple[Flask, list[dict[str, Any]]]) -> None:
    _, sent = app
    db.session.add(Row())
    with pytest.raises(EncodeError):
        use.delay_on_commit({1})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        use.delay_on_commit()  # type: ignore[call-arg]
    db.session.commit()
    assert sent == []


def test_savepoints_wait_for_the_real_commit(app: tuple[Flask, list[dict[str, Any]]]) -> None:
    _, sent = app
    db.session.add(Row())
    with db.session.begin_nested():
        use.delay_on_commit(1)
    assert sent == []  # a savepoint released is not the commit
    db.session.commit()
    assert len(sent) == 1


def test_closing_without_commit_drops_and_logs(app: tuple[Flask, list[dict[str, Any]]],
                                               caplog: pytest.LogCaptureFixture) -> None:
    _, sent = app
    db.session.add(Row())
    result = use.delay_on_commit(1)
    with caplog.at_level("INFO", logger="flask_tasks.on_commit"):
        db.session.remove()  # what Flask-SQLAlchemy does at the end of a request
    assert f"[{result.id}] not sent" in caplog.text
    db.session.add(Row())
    db.session.commit()
    assert sent == []
