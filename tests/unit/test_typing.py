"""``Task[P, R]``: ``delay()`` is checked against the function's own signature by mypy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).parent / "typecheck" / "sample.py"
ROOT = Path(__file__).resolve().parents[2]


def test_delay_type_checks_against_the_function_signature() -> None:
    pytest.importorskip("mypy")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--hide-error-context",
         "--no-incremental", "--follow-imports=silent", str(SAMPLE)],
        capture_output=True, text=True, cwd=ROOT, env={"MYPYPATH": str(ROOT), "PATH": ""},
    )
    reported = {int(m.group(1)) for m in re.finditer(r"sample\.py:(\d+): error", proc.stdout)}
    expected = {n for n, line in enumerate(SAMPLE.read_text().splitlines(), 1)
                if line.endswith("# error")}
    assert reported == expected, proc.stdout
