"""``flask tasks ...``: the click group registered on ``app.cli`` by ``init_app``.

Thin: parse flags, then call the worker or the extension. A command that
talks to the broker or the result backend fails fast with one line
(:mod:`.context`); the ``dead-letters`` group is in :mod:`.dead_letters`.
"""

from __future__ import annotations

import json
import logging
import sys

import click
from flask import current_app
from flask.cli import AppGroup

from ..exceptions import TimeoutError
from .context import app_state, backend_errors, broker, current_state, split_names
from .dead_letters import dead_letters_cli

__all__ = ["LOG_FORMAT", "setup_logging", "tasks_cli"]

tasks_cli = AppGroup("tasks", help="Run workers and inspect tasks (flask_tasks).")
tasks_cli.add_command(dead_letters_cli)

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"


def setup_logging(level: str) -> None:
    """Send flask_tasks' and the app's log records to stderr at ``level`` (worker only).

    :raises click.BadParameter: ``level`` is not a log level name.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise click.BadParameter(f"unknown log level {level!r}", param_hint="--loglevel")
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.handlers[:] = [handler]
    root.setLevel(numeric)


@tasks_cli.command("worker")
@click.option("-P", "--pool", type=click.Choice(["prefork", "threads", "solo"]), default=None,
              help="Pool: processes (default), threads, or the main thread.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=None,
              help="Processes/threads in the pool (default: the CPU count).")
@click.option("-Q", "--queues", multiple=True, callback=split_names,
              help="Queues to consume, comma-separated (default: TASKS_DEFAULT_QUEUE).")
@click.option("-l", "--loglevel", default="INFO", show_default=True,
              help="DEBUG, INFO, WARNING, ERROR or CRITICAL.")
@click.option("-n", "--hostname", default=None, help="Node name (default: tasks@<host>).")
@click.option("--prefetch-multiplier", type=click.IntRange(min=0), default=None,
              help="Messages reserved per pool slot (0: unlimited; default 4).")
@click.option("--max-tasks-per-child", type=click.IntRange(min=1), default=None,
              help="Replace a pool process after this many tasks.")
def worker_command(pool: str | None, concurrency: int | None, queues: list[str] | None,
                   loglevel: str, hostname: str | None, prefetch_multiplier: int | None,
                   max_tasks_per_child: int | None) -> None:
    """Start a worker that runs this app's tasks."""
    # Imported when a worker starts, not with the extension: a web process
    # never needs the worker, its pools or kombu's consumer loop.
    from ..worker.main import Worker

    setup_logging(loglevel)
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    worker = Worker(app, app_state(app), pool=pool, concurrency=concurrency, queues=queues,
                    hostname=hostname, prefetch_multiplier=prefetch_multiplier,
                    max_tasks_per_child=max_tasks_per_child)
    click.echo(worker.banner())
    worker.install_signal_handlers()
    sys.exit(worker.start())


@tasks_cli.command("list")
def list_command() -> None:
    """List the registered task names."""
    for name in current_state().task_names():
        click.echo(name)


@tasks_cli.command("call")
@click.argument("name")
@click.option("-a", "--args", "args_json", default="[]", help="Positional arguments as JSON.")
@click.option("-k", "--kwargs", "kwargs_json", default="{}", help="Keyword arguments as JSON.")
@click.option("-Q", "--queue", default=None, help="Queue to send to.")
@click.option("--countdown", type=float, default=None, help="Seconds to wait before running.")
def call_command(name: str, args_json: str, kwargs_json: str, queue: str | None,
                 countdown: float | None) -> None:
    """Send task NAME and print its id."""
    try:
        args, kwargs = json.loads(args_json), json.loads(kwargs_json)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from exc
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise click.BadParameter("--args must be a JSON list and --kwargs a JSON object")
    state = current_state()
    ext = current_app.extensions["tasks"]
    if state.config.always_eager:  # runs here: no broker
        result = ext.send_task(name, args, kwargs, queue=queue, countdown=countdown)
    else:
        # Connected first, once, within the connect timeout: the publisher
        # would retry an unreachable broker per TASKS_PUBLISH_RETRY_POLICY.
        # A failure of the publish itself also ends in the one line.
        with broker(state):
            result = ext.send_task(name, args, kwargs, queue=queue, countdown=countdown)
    click.echo(result.id)


@tasks_cli.command("result")
@click.argument("task_id")
@click.option("--wait", "timeout", type=float, default=None,
              help="Wait up to this many seconds for the task to be ready.")
def result_command(task_id: str, timeout: float | None) -> None:
    """Print the state and result of TASK_ID as JSON."""
    state = app_state(current_app._get_current_object())  # type: ignore[attr-defined]
    result = current_app.extensions["tasks"].AsyncResult(task_id)
    with backend_errors(state):
        if timeout is not None:
            try:
                result.get(timeout=timeout, propagate=False)
            except TimeoutError as exc:
                raise click.ClickException(str(exc)) from None
        value, task_state, traceback = result.result, result.state, result.traceback
    click.echo(json.dumps({
        "id": task_id, "state": task_state,
        "result": repr(value) if isinstance(value, BaseException) else value,
        "traceback": traceback,
    }, default=str, indent=2))


@tasks_cli.command("purge")
@click.option("-Q", "--queues", multiple=True, callback=split_names,
              help="Queues to empty (default: TASKS_DEFAULT_QUEUE).")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
def purge_command(queues: list[str] | None, force: bool) -> None:
    """Delete every waiting message from the queues."""
    state = current_state()
    names = queues or [state.config.default_queue]
    if not force:
        click.confirm(f"Delete all messages waiting in {', '.join(names)}?", abort=True)
    total = 0
    with broker(state) as conn:
        channel = conn.default_channel
        for name in names:
            queue = state.router.queue(name)(channel)
            queue.declare()
            total += queue.purge() or 0
    click.echo(f"Purged {total} message(s) from {', '.join(names)}.")
