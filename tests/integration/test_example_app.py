"""The example app (``example_app/``): eagerly through the test client, then with a real worker."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.exc import OperationalError

from example_app import create_app, create_tables
from example_app.extensions import db
from example_app.models import Report
from example_app.tasks import analyze_csv
from tests.helpers import ROOT, wait_for

SAMPLE = ROOT / "example_app" / "sample.csv"

SMALL_CSV = """name,qty,price,note
apple,3,1.5,ok
pear,5,2.5,

plum,x,5,n/a
fig,4,,
"""

SMALL_STATS = {
    "qty": {"count": 3, "sum": 12.0, "min": 3.0, "max": 5.0, "mean": 4.0, "non_numeric": 1},
    "price": {"count": 3, "sum": 9.0, "min": 1.5, "max": 5.0, "mean": 3.0, "non_numeric": 0},
}


@pytest.fixture()
def make_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Flask]:
    """``make_app(**config)``: the example app on the embedded default, in ``tmp_path``."""
    for name in ("BROKER_URL", "RESULT_BACKEND", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EXAMPLE_INSTANCE_PATH", str(tmp_path))
    return lambda **config: create_app(config)


@pytest.fixture()
def eager_client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(TASKS_ALWAYS_EAGER=True, TASKS_STORE_EAGER_RESULT=True).test_client()


def status(client: FlaskClient, task_id: str) -> dict[str, Any]:
    reply = client.get(f"/tasks/{task_id}")
    assert reply.status_code == 200
    return reply.get_json()  # type: ignore[no-any-return]


def test_eager_json_and_upload(eager_client: FlaskClient) -> None:
    reply = eager_client.post("/analyze", json={"text": SMALL_CSV, "filename": "fruit.csv"})
    assert reply.status_code == 202
    body = status(eager_client, reply.get_json()["task_id"])
    assert body["state"] == "SUCCESS" and body["error"] is None
    result = body["result"]
    assert result["rows"] == 4
    assert result["columns"] == ["name", "qty", "price", "note"]
    assert result["stats"] == SMALL_STATS
    assert result["filename"] == "fruit.csv"

    upload = {"file": (io.BytesIO(SMALL_CSV.encode()), "upload.csv")}
    reply = eager_client.post("/analyze", data=upload, content_type="multipart/form-data")
    assert reply.status_code == 202
    assert status(eager_client, reply.get_json()["task_id"])["result"]["stats"] == SMALL_STATS

    reports = eager_client.get("/reports").get_json()["reports"]
    assert [r["filename"] for r in reports] == ["upload.csv", "fruit.csv"]
    assert eager_client.get("/").status_code == 200
    assert status(eager_client, "no-such-task")["state"] == "PENDING"


def test_tables_created_by_the_other_process_are_fine(
        make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch) -> None:
    """The web app and the worker start together; the loser of the CREATE TABLE race goes on."""
    app = make_app()
    with app.app_context():
        # What the loser sees: its check said "missing", then CREATE TABLE meets the table.
        monkeypatch.setattr(db, "create_all",
                            lambda: db.metadata.create_all(db.engine, checkfirst=False))
        with pytest.raises(OperationalError, match="already exists"):
            db.create_all()
        create_tables()  # takes the race's outcome for what it is
        db.drop_all()  # a real failure, the tables not there ...
        monkeypatch.setattr(db, "create_all", lambda: (_ for _ in ()).throw(
            OperationalError("CREATE TABLE report", {}, Exception("disk I/O error"))))
        with pytest.raises(OperationalError, match="disk I/O"):
            create_tables()  # ... is not swallowed


@pytest.mark.parametrize("kwargs", [
    {"json": {"text": ""}},
    {"json": {"text": "  \n\n"}},
    {"json": ["not", "an", "object"]},
    {"data": {}},
    {"data": {"text": "1,2\n3,4"}},
    {"json": {"text": "a,a\n1,2"}},
    {"json": {"text": "a,b\n1,2", "delay_per_chunk": 5}},
    {"data": {"file": (io.BytesIO(b"\xff\xfe\x00bad"), "bad.csv")},
     "content_type": "multipart/form-data"},
], ids=["empty", "blank", "json-list", "nothing", "no-header", "duplicate-names",
        "delay-too-long", "not-utf8"])
def test_bad_input_is_400(eager_client: FlaskClient, kwargs: dict[str, Any]) -> None:
    reply = eager_client.post("/analyze", **kwargs)
    assert reply.status_code == 400
    assert reply.get_json()["error"]


def test_too_large_is_413(make_app: Callable[..., Flask]) -> None:
    client = make_app(TASKS_ALWAYS_EAGER=True, TASKS_STORE_EAGER_RESULT=True,
                      MAX_CONTENT_LENGTH=100).test_client()
    big = io.BytesIO(b"a,b\n" + b"1,2\n" * 50)
    reply = client.post("/analyze", data={"file": (big, "big.csv")},
                        content_type="multipart/form-data")
    assert reply.status_code == 413
    assert "too large" in reply.get_json()["error"]


def test_task_rejects_bad_csv(make_app: Callable[..., Flask]) -> None:
    with make_app().app_context():
        with pytest.raises(ValueError, match="empty"):
            analyze_csv("", "empty.csv")
        with pytest.raises(ValueError, match="no header"):
            analyze_csv("1,2\n3,4\n", "numbers.csv")


def test_worker_end_to_end(make_app: Callable[..., Flask], tmp_path: Path,
                           start_worker: Any) -> None:
    app = make_app()
    client = app.test_client()
    start_worker("example_app", "-c", "1", "-P", "threads",
                 env={"EXAMPLE_INSTANCE_PATH": str(tmp_path)})

    with SAMPLE.open("rb") as file:
        form = {"file": (file, "sample.csv"), "delay_per_chunk": "0.1"}
        reply = client.post("/analyze", data=form, content_type="multipart/form-data")
    assert reply.status_code == 202
    task_id = reply.get_json()["task_id"]

    seen: list[str] = []

    def finished() -> dict[str, Any] | None:
        body = status(client, task_id)
        seen.append(body["state"])
        return body if body["state"] in ("SUCCESS", "FAILURE") else None

    body = wait_for(finished, timeout=30, interval=0.05, message="the analysis to finish")
    assert body["state"] == "SUCCESS", body["error"]
    assert "PROGRESS" in seen
    with SAMPLE.open() as text:
        units = [int(row["units"]) for row in csv.DictReader(text)]
    stats = body["result"]["stats"]["units"]
    assert (body["result"]["rows"], stats["count"], stats["sum"]) == (2000, 2000, sum(units))
    with app.app_context():
        report = db.session.get(Report, body["result"]["report_id"])
        assert report is not None and report.task_id == task_id and report.rows == 2000

    # A task that fails in the worker shows up as FAILURE with its error.
    with app.app_context():
        failing = analyze_csv.delay("", "empty.csv")
    body = wait_for(lambda: (b := status(client, failing.id))["state"] == "FAILURE" and b,
                    timeout=30, interval=0.05, message="the failing task to fail")
    assert body["error"] == "ValueError: The CSV is empty."
