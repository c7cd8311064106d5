"""Imported only through TASKS_IMPORTS by tests/unit/test_fixes.py."""

from flask_tasks import shared_task


@shared_task(name="imported.via_tasks_imports")
def via_imports() -> int:
    return 1
