"""The ``flask tasks`` commands that need no worker, through Flask's CLI test runner.

The ``dead-letters`` commands run on ``memory://`` against :class:`FakeDeadLetters`
(an in-memory store standing in for the broker's, put in place of the
channel's by patching ``worker_channel`` where the commands look it up).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskCliRunner
from kombu.exceptions import OperationalError

from flask_tasks import Tasks
from flask_tasks.cli import context
from flask_tasks.cli import dead_letters as dead_letters_cli
from flask_tasks.transport.dead_letters import DeadLetter, DeadLetters, entry_ids

T0 = 1_714_564_800.0  # 2024-05-01T12:00:00Z
PASSWORD = "s3cret-pw"


def test_cli_list_imports_and_result_timeout(tmp_path: Path) -> None:
    tasks = Tasks()
    app = Flask("cli_app", instance_path=str(tmp_path))
    app.config["TASKS_IMPORTS"] = ["tests.unit.imported_tasks"]
    tasks.init_app(app)
    runner = app.test_cli_runner()
    listed = runner.invoke(args=["tasks", "list"])
    assert listed.exit_code == 0 and "imported.via_tasks_imports" in listed.output
    waited = runner.invoke(args=["tasks", "result", "no-such-id", "--wait", "0.1"])
    assert waited.exit_code == 1 and "not ready within 0.1 s" in waited.output
    shown = runner.invoke(args=["tasks", "result", "no-such-id"])
    assert json.loads(shown.output)["state"] == "PENDING"


# -- fail fast: the one-line error ---------------------------------------------------


def chained(outer: BaseException, *inner: BaseException) -> BaseException:
    """``outer`` raised from ``inner[0]``, raised from ``inner[1]``..."""
    for cause, error in zip(inner, (outer, *inner), strict=False):
        error.__cause__ = cause
    return outer


@pytest.mark.parametrize(("exc", "url", "cause"), [
    (chained(OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
             redis.ConnectionError("Error 111"), ConnectionRefusedError(111, "Connection refused")),
     None, "Connection refused"),
    (chained(OperationalError("Timeout reading from socket"), redis.TimeoutError("x"),
             TimeoutError("timed out")), None, "no answer within 1.5 s"),
    (OperationalError("(psycopg.OperationalError) server closed the connection.\n"
                      "(Background on this error at: https://sqlalche.me/e/20/e3q8)"),
     None, "(psycopg.OperationalError) server closed the connection"),
    (OperationalError(f"auth as user:{PASSWORD} refused."), f"redis://user:{PASSWORD}@host:1/0",
     "auth as user:** refused"),
    (OperationalError("auth with p@ss@ or p%40ss%40 refused"), "redis://u:p%40ss%40@host:1/0",
     "auth with ** or ** refused"),
    (OperationalError(), None, "OperationalError"),
])
def test_describe_gives_the_cause_on_one_line_without_password(exc: BaseException,
                                                               url: str | None,
                                                               cause: str) -> None:
    assert context.describe(exc, 1.5, url) == cause


def test_result_backend_unreachable_is_one_line_with_masked_url(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = Tasks()
    app = Flask("cli_app", instance_path=str(tmp_path))
    app.config["RESULT_BACKEND"] = f"redis://:{PASSWORD}@127.0.0.1:1/1"
    tasks.init_app(app)
    backend = tasks.state(app).backend

    def unreachable(task_id: str) -> dict[str, Any] | None:
        raise chained(redis.ConnectionError("Error 111 connecting to 127.0.0.1:1."),
                      ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(backend, "_get", unreachable)
    runner = app.test_cli_runner()
    for args in (["no-such-id"], ["no-such-id", "--wait", "5"]):
        result = runner.invoke(args=["tasks", "result", *args])
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr == ("Error: Cannot reach the result backend at "
                                 "redis://:**@127.0.0.1:1/1: Connection refused.\n")

    def broken(task_id: str) -> dict[str, Any] | None:
        raise ValueError("a bug, not an outage")

    monkeypatch.setattr(backend, "_get", broken)  # shown as the bug it is
    result = runner.invoke(args=["tasks", "result", "no-such-id"])
    assert isinstance(result.exception, ValueError)


def test_result_with_results_disabled_is_one_line(tmp_path: Path) -> None:
    tasks = Tasks()
    app = Flask("cli_app", instance_path=str(tmp_path))
    app.config["RESULT_BACKEND"] = "disabled"
    tasks.init_app(app)
    result = app.test_cli_runner().invoke(args=["tasks", "result", "no-such-id"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: No result backend is configured")


# -- dead-letters ---------------------------------------------------------------------


class FakeDeadLetters(DeadLetters):
    """Dead letters in a list, newest first; ``requeued`` holds what went back, in order."""

    def __init__(self, letters: list[DeadLetter]) -> None:
        self.letters = sorted(letters, key=lambda letter: letter.time, reverse=True)
        self.requeued: list[DeadLetter] = []
        self.fail_with: BaseException | None = None

    def _of(self, queue: str | None) -> list[DeadLetter]:
        if self.fail_with is not None:
            raise self.fail_with
        return [letter for letter in self.letters if queue is None or letter.queue == queue]

    def add(self, queue: str, entry: bytes, reason: str, hostname: str = "") -> None:
        self.letters.insert(0, letter(f"again-{len(self.letters)}", queue, T0 + 1000, entry,
                                      reason))

    def list(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        return self._of(queue)[:limit]

    def get(self, letter_id: str) -> DeadLetter | None:
        return next((found for found in self._of(None) if found.id == letter_id), None)

    def requeue(self, letter_id: str) -> DeadLetter | None:
        found = self.get(letter_id)
        if found is not None:
            self.letters.remove(found)
            self.requeued.append(found)
        return found

    def purge(self, queue: str | None = None) -> int:
        gone = self._of(queue)
        self.letters = [kept for kept in self.letters if kept not in gone]
        return len(gone)

    def count(self, queue: str | None = None) -> int:
        return len(self._of(queue))

    def trim(self, max_entries: int | None, max_age: float | None) -> int:
        return 0


def letter(letter_id: str, queue: str, time: float, entry: bytes, reason: str) -> DeadLetter:
    task_id, task = entry_ids(entry)
    return DeadLetter(id=letter_id, queue=queue, reason=reason, time=time, entry=entry,
                      hostname="tasks@host", task_id=task_id, task=task)


def task_entry(task: str, task_id: str) -> bytes:
    return json.dumps({"body": "W1tdLCB7fSwge31d", "headers": {"id": task_id, "task": task},
                       "content-type": "application/json"}).encode()


LONG_REASON = "Task 'shop.gone' is not registered in this worker\n(12 tasks are). " + "x" * 300


@pytest.fixture()
def store() -> FakeDeadLetters:
    return FakeDeadLetters([
        letter("old1", "celery", T0, task_entry("shop.gone", "tid-1"), LONG_REASON),
        letter("mid2", "hipri", T0 + 60, b"\xffnot json\x1b[31m", "Not a kombu envelope"),
        letter("new3", "celery", T0 + 120, task_entry("shop.gone", "tid-3"), "Unknown task"),
    ])


@pytest.fixture()
def runner(tmp_path: Path, store: FakeDeadLetters,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[FlaskCliRunner]:
    tasks = Tasks()
    app = Flask("cli_app", instance_path=str(tmp_path))
    app.config["BROKER_URL"] = f"memory://user:{PASSWORD}@localhost/"
    tasks.init_app(app)
    channel = SimpleNamespace(dead_letters=store)
    monkeypatch.setattr(dead_letters_cli, "worker_channel", lambda kombu_channel: channel)
    monkeypatch.setenv("COLUMNS", "120")
    yield app.test_cli_runner()


def rows(output: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line) for line in output.splitlines()]


def test_list_is_a_table_newest_first_with_a_count(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["tasks", "dead-letters", "list"])
    assert result.exit_code == 0, result.output
    table = rows(result.output)
    assert table[0] == ["ID", "TIME (UTC)", "QUEUE", "TASK", "REASON"]
    assert [row[:4] for row in table[1:4]] == [
        ["new3", "2024-05-01T12:02:00Z", "celery", "shop.gone[tid-3]"],
        ["mid2", "2024-05-01T12:01:00Z", "hipri", "-"],
        ["old1", "2024-05-01T12:00:00Z", "celery", "shop.gone[tid-1]"]]
    reason = table[3][4]  # one line, cut to the terminal's width
    assert reason.startswith("Task 'shop.gone' is not registered in this worker (12 tasks")
    assert reason.endswith("...") and len(result.output.splitlines()[3]) <= 120
    assert table[4:] == [["3 dead letter(s)."]]


def test_list_filters_limits_and_prints_json(runner: FlaskCliRunner,
                                             store: FakeDeadLetters) -> None:
    hipri = runner.invoke(args=["tasks", "dead-letters", "list", "-Q", "hipri"])
    assert [row[0] for row in rows(hipri.output)] == ["ID", "mid2", "1 dead letter(s) in hipri."]
    both = runner.invoke(args=["tasks", "dead-letters", "list", "-Q", "hipri,celery",
                               "--limit", "2"])
    assert [row[0] for row in rows(both.output)] == [
        "ID", "new3", "mid2", "The newest 2 of 3 dead letter(s) in hipri, celery (--limit 2)."]
    printed = runner.invoke(args=["tasks", "dead-letters", "list", "--json"])
    assert printed.exit_code == 0
    assert json.loads(printed.output) == [found.as_dict() for found in store.letters]
    none = runner.invoke(args=["tasks", "dead-letters", "list", "-Q", "empty"])
    assert none.output == "No dead letters in empty.\n"


def test_show_prints_everything_with_the_entry_escaped(runner: FlaskCliRunner,
                                                      store: FakeDeadLetters) -> None:
    shown = runner.invoke(args=["tasks", "dead-letters", "show", "mid2"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[:7] == ["id:       mid2", "queue:    hipri",
                         "time:     2024-05-01T12:01:00Z (UTC)", "hostname: tasks@host",
                         "task:     -", "task id:  -", "reason:   Not a kombu envelope"]
    assert lines[7].startswith("entry:    14 byte(s)")
    assert lines[8:] == ["\\xffnot json\\x1b[31m"]  # no raw byte reaches the terminal
    as_json = json.loads(runner.invoke(args=["tasks", "dead-letters", "show", "mid2",
                                             "--json"]).output)
    assert as_json == store.get("mid2").as_dict()  # type: ignore[union-attr]
    assert as_json["entry"] == "\udcffnot json\x1b[31m"
    long = runner.invoke(args=["tasks", "dead-letters", "show", "old1"])
    assert f"reason:   {LONG_REASON}\n" in long.output  # in full
    unknown = runner.invoke(args=["tasks", "dead-letters", "show", "nope"])
    assert unknown.exit_code == 1
    assert "No dead letter has the id 'nope'" in unknown.stderr


def test_requeue_by_id_prints_each_and_refuses_unknown_ids(runner: FlaskCliRunner,
                                                          store: FakeDeadLetters) -> None:
    unknown = runner.invoke(args=["tasks", "dead-letters", "requeue", "old1", "nope"])
    assert unknown.exit_code == 1 and "'nope'" in unknown.stderr
    assert "nothing was requeued" in unknown.stderr and store.requeued == []
    done = runner.invoke(args=["tasks", "dead-letters", "requeue", "old1", "mid2", "old1"])
    assert done.exit_code == 0, done.output
    assert done.output.splitlines() == ["Requeued old1 to celery: shop.gone[tid-1]",
                                        "Requeued mid2 to hipri: -",
                                        "Requeued 2 dead letter(s)."]
    assert [found.id for found in store.requeued] == ["old1", "mid2"]
    assert [found.id for found in store.letters] == ["new3"]


def test_requeue_reports_letters_gone_meanwhile(runner: FlaskCliRunner, store: FakeDeadLetters,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "requeue", lambda letter_id: None)  # someone was faster
    result = runner.invoke(args=["tasks", "dead-letters", "requeue", "old1"])
    assert result.exit_code == 1 and "Requeued 0 dead letter(s)." in result.stdout
    assert "1 dead letter(s) were gone before they could be requeued" in result.stderr


def test_requeue_all_takes_the_letters_of_now_oldest_first(runner: FlaskCliRunner,
                                                          store: FakeDeadLetters,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    requeue = store.requeue

    def set_aside_again(letter_id: str) -> DeadLetter | None:
        found = requeue(letter_id)  # the cause is not fixed: a worker sets it aside again
        if found is not None:
            store.add(found.queue, found.entry, found.reason)
        return found

    monkeypatch.setattr(store, "requeue", set_aside_again)
    result = runner.invoke(args=["tasks", "dead-letters", "requeue", "--all", "-Q", "celery"])
    assert result.exit_code == 0, result.output
    # Each goes to the back of its queue: the oldest, requeued first, runs first.
    assert [found.id for found in store.requeued] == ["old1", "new3"]
    assert result.output.splitlines()[-1] == "Requeued 2 dead letter(s)."
    everything = runner.invoke(args=["tasks", "dead-letters", "requeue", "--all"])
    assert everything.output.splitlines()[-1] == "Requeued 3 dead letter(s)."  # no loop
    store.letters.clear()
    empty = runner.invoke(args=["tasks", "dead-letters", "requeue", "--all"])
    assert empty.exit_code == 0 and empty.output == "No dead letters.\n"


@pytest.mark.parametrize("args", [[], ["old1", "--all"], ["old1", "-Q", "celery"]])
def test_requeue_needs_ids_or_all(runner: FlaskCliRunner, store: FakeDeadLetters,
                                  args: list[str]) -> None:
    result = runner.invoke(args=["tasks", "dead-letters", "requeue", *args])
    assert result.exit_code == 2 and store.requeued == []


def test_purge_asks_unless_forced_and_says_how_many(runner: FlaskCliRunner,
                                                    store: FakeDeadLetters) -> None:
    declined = runner.invoke(args=["tasks", "dead-letters", "purge", "-Q", "celery"],
                             input="n\n")
    assert declined.exit_code == 1 and "Delete 2 dead letter(s) in celery?" in declined.output
    assert store.count() == 3
    accepted = runner.invoke(args=["tasks", "dead-letters", "purge", "-Q", "celery"],
                             input="y\n")
    assert accepted.exit_code == 0 and store.count() == 1
    assert accepted.output.endswith("Purged 2 dead letter(s) in celery.\n")
    forced = runner.invoke(args=["tasks", "dead-letters", "purge", "-f"])
    assert forced.output == "Purged 1 dead letter(s).\n" and store.count() == 0
    nothing = runner.invoke(args=["tasks", "dead-letters", "purge"])  # nothing to ask about
    assert nothing.exit_code == 0 and nothing.output == "No dead letters.\n"


def test_a_broker_error_in_a_command_is_one_line_without_password(
        runner: FlaskCliRunner, store: FakeDeadLetters) -> None:
    store.fail_with = chained(OperationalError("Error 111 connecting to localhost:1."),
                              ConnectionRefusedError(111, "Connection refused"))
    for args in (["list"], ["show", "old1"], ["requeue", "--all"], ["purge", "-f"]):
        result = runner.invoke(args=["tasks", "dead-letters", *args])
        assert result.exit_code == 1 and PASSWORD not in result.output
        assert result.stderr == ("Error: Cannot reach the broker at "
                                 "memory://user:**@localhost/: Connection refused.\n")


def test_a_broker_without_a_store_says_so(tmp_path: Path) -> None:
    tasks = Tasks()
    app = Flask("cli_app", instance_path=str(tmp_path))
    app.config["BROKER_URL"] = "memory://"
    tasks.init_app(app)
    for args in (["list"], ["show", "x"], ["requeue", "x"], ["purge", "-f"]):
        result = app.test_cli_runner().invoke(args=["tasks", "dead-letters", *args])
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: This broker (memory) keeps no dead letters")

