"""The app's extension objects, created unbound and bound in :func:`example_app.create_app`."""

from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy

from flask_tasks import Tasks

db = SQLAlchemy()
tasks = Tasks()
