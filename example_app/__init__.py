"""An example Flask app with background tasks: upload a CSV, watch it being analyzed.

Run it with ``scripts/run-example.sh``, or by hand::

    flask --app example_app tasks worker -c 2     # the worker, in one terminal
    flask --app example_app run                   # the web app, in another

Configured from the environment (all optional):

- ``BROKER_URL`` / ``RESULT_BACKEND``: e.g. ``redis://localhost:6379/0``; unset,
  flask_tasks uses its embedded default (SQLite files in the instance folder).
- ``DATABASE_URL``: the app's database (default: ``example.db`` in the instance folder).
- ``EXAMPLE_INSTANCE_PATH``: the instance folder (default: Flask's, ``./instance``).
  The web app and the worker must agree on it when they use the embedded default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from . import extensions

#: Largest accepted upload, in bytes.
MAX_UPLOAD_BYTES = 5 * 1024 * 1024


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """The app factory; ``test_config`` overrides settings (e.g. ``TASKS_ALWAYS_EAGER``)."""
    instance_path = os.environ.get("EXAMPLE_INSTANCE_PATH")
    app = Flask(__name__, instance_path=os.path.abspath(instance_path) if instance_path else None)
    database = os.environ.get("DATABASE_URL") or "sqlite:///" + os.path.join(
        app.instance_path, "example.db")
    app.config.from_mapping(
        SQLALCHEMY_DATABASE_URI=database,
        MAX_CONTENT_LENGTH=MAX_UPLOAD_BYTES,
        MAX_FORM_MEMORY_SIZE=MAX_UPLOAD_BYTES,  # pasted text arrives as a form field
    )
    for key in ("BROKER_URL", "RESULT_BACKEND"):
        if os.environ.get(key):
            app.config[key] = os.environ[key]
    app.config.update(test_config or {})
    os.makedirs(app.instance_path, exist_ok=True)

    extensions.db.init_app(app)
    extensions.tasks.init_app(app)  # reads BROKER_URL, RESULT_BACKEND, TASKS_* now

    from . import views  # imports the models and registers the task

    app.register_blueprint(views.bp)
    with app.app_context():
        create_tables()
    return app


def create_tables() -> None:
    """Create the app's tables; safe when the web app and the worker start together.

    Both processes run :func:`create_app` at the same moment, and SQLite's
    "check, then CREATE TABLE" is not atomic: the loser of that race gets
    ``table ... already exists``, which only means the winner did the work.
    """
    try:
        extensions.db.create_all()
    except OperationalError:
        inspector = inspect(extensions.db.engine)
        if not all(inspector.has_table(name) for name in extensions.db.metadata.tables):
            raise

