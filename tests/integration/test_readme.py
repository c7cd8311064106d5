"""The README's "In your app" example runs as written.

The package is built from the README's own code blocks (each starts with a
``# myapp/<file>.py`` comment), pointed at the test's redis-server, served by a
real worker started with the README's own worker command, and called through
its views.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, wait_for

README = ROOT / "README.md"


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def readme_files() -> dict[str, str]:
    """``{"myapp/tasks.py": source, ...}`` from the "In your app" section."""
    files = {}
    for block in code_blocks(section(README.read_text(), "In your app"), "python"):
        first, _, rest = block.partition("\n")
        match = re.fullmatch(r"# (myapp/\w+\.py)", first)
        assert match, f"a Python block of 'In your app' does not start with its file name: {first}"
        files[match.group(1)] = rest
    return files


def readme_worker_args() -> list[str]:
    shell = "\n".join(code_blocks(section(README.read_text(), "In your app"), "bash"))
    line = next(line for line in shell.splitlines()
                if line.startswith("flask --app myapp tasks worker"))
    return shlex.split(line.partition("#")[0])[5:]


@pytest.fixture()
def myapp(tmp_path: Path, redis_url: str) -> Iterator[Path]:
    """The README's package in ``tmp_path/myapp``, on the test's redis-server."""
    server = redis_url.rsplit("/", 1)[0]
    for name, source in readme_files().items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(source.replace("redis://localhost:6379", server))
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for module in [m for m in sys.modules if m == "myapp" or m.startswith("myapp.")]:
        del sys.modules[module]


def test_readme_has_the_whole_package() -> None:
    assert set(readme_files()) == {"myapp/__init__.py", "myapp/extensions.py",
                                   "myapp/tasks.py", "myapp/views.py"}
    assert readme_worker_args() == ["-c", "2"]


def test_readme_example_runs_as_written(myapp: Path, start_worker: Any) -> None:
    worker = start_worker("myapp", *readme_worker_args(), cwd=myapp)
    assert "myapp.tasks.add" in worker.output

    import myapp as package  # the README's own code, from tmp_path

    client = package.create_app().test_client()
    reply = client.post("/add")
    assert reply.status_code == 202
    task_id = reply.get_json()["task_id"]

    def done() -> dict[str, Any] | None:
        body = client.get(f"/tasks/{task_id}").get_json()
        return body if body["state"] == "SUCCESS" else None
    assert wait_for(done, 20, message=f"task {task_id}") == {"state": "SUCCESS", "result": 5}
    worker.wait_output(f"myapp.tasks.add[{task_id}] succeeded")
