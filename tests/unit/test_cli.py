"""The ``flask tasks`` commands that need no worker, through Flask's CLI test runner."""

from __future__ import annotations

import json
from pathlib import Path

from flask import Flask

from flask_tasks import Tasks


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
