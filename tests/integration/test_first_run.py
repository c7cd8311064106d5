"""The README's first command, as a newcomer runs it: ``scripts/run-example.sh``.

The fresh-install test builds a brand-new virtualenv, installs the project into it
the way a user does (``pip install .``: not editable, no test extra), and runs the
script from a copy of the project whose ``flask_tasks/`` source folder is removed,
so only the installed package and its declared dependencies can be imported. A
runtime dependency missing from ``pyproject.toml`` fails it.

The other tests run the script with the test's own Python: when the worker or the
web app dies, the script stops the other, says which one died and exits non-zero.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
import venv
from pathlib import Path
from typing import Any
from urllib.request import Request, urlopen

import pytest

from tests.helpers import ROOT, wait_for

SAMPLE = ROOT / "example_app" / "sample.csv"
SAMPLE_ROWS = 2000
#: Left out of the copy of the project: caches, local state, and the source
#: package itself (the installed one must be used).
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "instance", "__pycache__", "*.egg-info",
                                    "build", "dist", ".*_cache", "*.sqlite*", "*.db")


def http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None
         ) -> tuple[int, Any]:
    import json

    with urlopen(Request(url, data=data, headers=headers or {}), timeout=10) as reply:
        return reply.status, json.loads(reply.read())


def upload(port: int, path: Path, **fields: str) -> tuple[int, Any]:
    """POST ``path`` as the multipart field ``file`` (as ``curl -F file=@path``)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             .encode() for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{path.name}"\r\nContent-Type: text/csv\r\n\r\n'.encode()
                 + path.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return http(f"http://127.0.0.1:{port}/analyze", body,
                {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def follow(port: int, task_id: str, timeout: float) -> list[dict[str, Any]]:
    """Every distinct reply of ``/tasks/<id>`` until SUCCESS or FAILURE."""
    seen: list[dict[str, Any]] = []

    def done() -> bool:
        status, body = http(f"http://127.0.0.1:{port}/tasks/{task_id}")
        assert status == 200
        if not seen or body != seen[-1]:
            seen.append(body)
        return body["state"] in ("SUCCESS", "FAILURE")
    wait_for(done, timeout, interval=0.05, message=f"task {task_id} to finish; seen {seen}")
    return seen


def make_virtualenv(path: Path) -> str:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return str(path / "bin" / "python")


@pytest.mark.timeout(900)
def test_fresh_install_runs_the_example_end_to_end(tmp_path: Path, run_script: Any) -> None:
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=NOT_COPIED)
    python = make_virtualenv(tmp_path / "venv")
    started = time.monotonic()
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    str(project)], check=True, timeout=600, env={
                        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                        "PIP_NO_INPUT": "1"})
    installed = time.monotonic()
    shutil.rmtree(project / "flask_tasks")  # only the installed package can be imported
    freeze = subprocess.run([python, "-m", "pip", "freeze"], check=True, capture_output=True,
                            text=True).stdout
    names = {re.split(r"[=@ ]", line, maxsplit=1)[0].lower() for line in freeze.splitlines()}
    assert not names & {"pytest", "celery", "psutil", "mypy"}, freeze  # no test extra
    where = subprocess.run([python, "-c", "import flask_tasks; print(flask_tasks.__file__)"],
                           cwd=project, check=True, capture_output=True, text=True).stdout
    assert "site-packages" in where, where  # installed, not editable, not the source tree

    script = run_script(project, python)
    script.wait_ready(timeout=90)
    status, body = upload(script.port, SAMPLE, delay_per_chunk="0.2")
    assert status == 202, body
    seen = follow(script.port, body["task_id"], timeout=60)

    final = seen[-1]
    assert final["state"] == "SUCCESS", seen
    assert final["result"]["rows"] == SAMPLE_ROWS
    assert final["result"]["filename"] == "sample.csv"
    assert set(final["result"]["stats"]) == {"units", "unit_price", "discount", "rating"}
    progress = [reply["progress"] for reply in seen if reply["state"] == "PROGRESS"]
    assert progress, f"no PROGRESS state seen: {seen}"
    assert all(p["total"] == SAMPLE_ROWS and 0 <= p["done"] <= SAMPLE_ROWS for p in progress)
    assert any(0 < p["done"] < SAMPLE_ROWS for p in progress), progress
    ran = time.monotonic()

    script.proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert script.wait_exit(timeout=30) == 130, script.output
    assert "Stopping the worker" in script.output
    wait_for(lambda: not script.leftovers(), 10, message=f"no process left: {script.leftovers()}")
    print(f"fresh install: pip install {installed - started:.1f} s, "
          f"first run {ran - installed:.1f} s")


def test_worker_death_stops_the_web_app(run_script: Any) -> None:
    script = run_script()
    script.wait_ready(timeout=60)
    os.kill(script.pid_of("worker"), signal.SIGKILL)
    assert script.wait_exit(timeout=30) == 1, script.output
    assert "The worker exited (killed by SIGKILL), so the example is stopped." in script.output
    assert re.search(r"Its log: \S+/worker\.log", script.output), script.output
    wait_for(lambda: not script.leftovers(), 10, message=f"no process left: {script.leftovers()}")


def test_web_app_that_cannot_start_stops_the_worker(run_script: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        script = run_script(port=taken.getsockname()[1])
        assert script.wait_exit(timeout=60) == 1, script.output
    assert "The web app exited (status 1), so the example is stopped." in script.output
    assert re.search(r"Its log: \S+/web\.log", script.output), script.output
    assert "Address already in use" in script.output
    assert "  Ready." not in script.output
    wait_for(lambda: not script.leftovers(), 30, message=f"no process left: {script.leftovers()}")
