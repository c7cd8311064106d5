"""``flask tasks dead-letters``: list, show, requeue and purge the broker's dead letters.

A worker sets aside ("dead-letters") the broker entries it cannot use, with
the reason (:mod:`flask_tasks.transport.dead_letters`). These commands read
that store through the broker connection of :func:`.context.broker` (so an
unreachable broker is one line, within the connect timeout); a broker that
keeps no dead letters (RabbitMQ, ``memory://``) is an error that says so.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import click
from flask import current_app
from flask.cli import AppGroup

from ..app_state import AppState
from ..transport.base import worker_channel
from ..transport.dead_letters import DeadLetter, DeadLetters
from .context import app_state, broker, split_names

__all__ = ["dead_letters_cli", "store"]

dead_letters_cli = AppGroup(
    "dead-letters",
    short_help="List, show, requeue and purge dead letters.",
    help="List, show, requeue and purge the broker entries workers set aside (dead letters).")

#: Control characters shown escaped (a raw entry may hold terminal escape sequences).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SEE_LIST = "see `flask tasks dead-letters list`"


@contextmanager
def store(state: AppState) -> Iterator[DeadLetters]:
    """The dead-letter store of ``state``'s broker, over a connection closed on exit.

    :raises click.ClickException: the broker cannot be reached (within
        ``TASKS_BROKER_CONNECTION_TIMEOUT`` seconds), or it keeps no dead letters.
    """
    with broker(state) as conn:
        letters = worker_channel(conn.default_channel).dead_letters
        if letters is None:
            scheme = state.broker_url.partition("://")[0]
            raise click.ClickException(
                f"This broker ({scheme}) keeps no dead letters: flask_tasks keeps them on "
                f"Redis and on the embedded broker. RabbitMQ has its own dead-letter "
                f"exchanges (the x-dead-letter-exchange queue argument).")
        yield letters


def _state() -> AppState:
    return app_state(current_app._get_current_object())  # type: ignore[attr-defined]


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _printable(text: str) -> str:
    """``text`` with control characters (but newlines and tabs) escaped as ``\\xNN``."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _task(letter: DeadLetter) -> str:
    """``name[id]`` as Celery logs a task; what is known of it; ``-`` for neither."""
    if letter.task and letter.task_id:
        return f"{letter.task}[{letter.task_id}]"
    return letter.task or (f"[{letter.task_id}]" if letter.task_id else "-")


def _selected(queues: Sequence[str] | None) -> list[str | None]:
    """The store's ``queue`` arguments for ``-Q``: those names, or None for every queue."""
    return list(queues) if queues else [None]


def _where(queues: Sequence[str] | None) -> str:
    return f" in {', '.join(queues)}" if queues else ""


def _shorten(text: str, width: int) -> str:
    text = _printable(" ".join(text.split()))
    return text if len(text) <= width else text[:max(1, width - 3)] + "..."


def _table(letters: Sequence[DeadLetter]) -> list[str]:
    """Rows of id, time, queue, task and reason, the reason cut to the terminal's width."""
    header = ("ID", "TIME (UTC)", "QUEUE", "TASK")
    rows = [(letter.id, _utc(letter.time), _printable(letter.queue), _printable(_task(letter)))
            for letter in letters]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(4)]
    reason_width = max(40, shutil.get_terminal_size((120, 24)).columns - sum(widths) - 8)

    def line(cells: Sequence[str], reason: str) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        return "  ".join([*padded, reason]).rstrip()

    lines = [line(header, "REASON")]
    for row, letter in zip(rows, letters, strict=True):
        lines.append(line(row, _shorten(letter.reason, reason_width)))
    return lines


@dead_letters_cli.command("list")
@click.option("-Q", "--queues", multiple=True, callback=split_names,
              help="Only these queues, comma-separated (default: every queue).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Show at most this many, the newest.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, entries included.")
def list_command(queues: list[str] | None, limit: int, as_json: bool) -> None:
    """List dead letters, newest first, with why each was set aside."""
    with store(_state()) as letters:
        found = [letter for queue in _selected(queues)
                 for letter in letters.list(queue, limit=limit)]
        found = sorted(found, key=lambda letter: letter.time, reverse=True)[:limit]
        total = len(found) if as_json else sum(letters.count(queue)
                                                for queue in _selected(queues))
    if as_json:
        click.echo(json.dumps([letter.as_dict() for letter in found], indent=2))
        return
    if not found:
        click.echo(f"No dead letters{_where(queues)}.")
        return
    for line in _table(found):
        click.echo(line)
    if len(found) < total:
        click.echo(f"The newest {len(found)} of {total} dead letter(s){_where(queues)} "
                   f"(--limit {limit}).")
    else:
        click.echo(f"{total} dead letter(s){_where(queues)}.")


@dead_letters_cli.command("show")
@click.argument("letter_id")
@click.option("--json", "as_json", is_flag=True, help="Print it as a JSON object.")
def show_command(letter_id: str, as_json: bool) -> None:
    """Show one dead letter, its raw entry included."""
    with store(_state()) as letters:
        letter = letters.get(letter_id)
    if letter is None:
        raise click.ClickException(f"No dead letter has the id {letter_id!r} ({_SEE_LIST}).")
    if as_json:  # the entry as text, undecodable bytes as \udcXX (JSON-escaped)
        click.echo(json.dumps(letter.as_dict(), indent=2))
        return
    fields = [("id", letter.id), ("queue", letter.queue), ("time", _utc(letter.time) + " (UTC)"),
              ("hostname", letter.hostname or "-"), ("task", letter.task or "-"),
              ("task id", letter.task_id or "-"), ("reason", letter.reason),
              ("entry", f"{len(letter.entry)} byte(s), undecodable bytes and control "
                        f"characters escaped as \\xNN:")]
    for name, value in fields:
        click.echo(f"{name + ':':<10}{_printable(value)}")
    click.echo(_printable(letter.entry.decode("utf-8", "backslashreplace")))


@dead_letters_cli.command("requeue")
@click.argument("letter_ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Requeue every dead letter (of -Q queues).")
@click.option("-Q", "--queues", multiple=True, callback=split_names,
              help="With --all: only these queues, comma-separated (default: every queue).")
def requeue_command(letter_ids: tuple[str, ...], every: bool,
                    queues: list[str] | None) -> None:
    """Requeue dead letters: publish them again on their queues.

    Put dead letters LETTER_IDS (or --all) back on their queues, at the back
    as if just sent, once the cause is fixed (e.g. the task is now
    registered); --all requeues the oldest first. An unknown id: nothing is
    requeued.
    """
    if bool(letter_ids) == every:
        raise click.UsageError("Give the ids of the dead letters to requeue, or --all.")
    if queues and not every:
        raise click.UsageError("-Q/--queues goes with --all (an id names its letter).")
    requeued = 0
    gone: list[str] = []
    with store(_state()) as letters:
        if every:
            # The letters as they are now, oldest first (each goes to the back
            # of its queue): one set aside again meanwhile (its cause not
            # fixed) is not requeued in a loop.
            found = [letter for queue in _selected(queues)
                     if (count := letters.count(queue))
                     for letter in letters.list(queue, limit=count)]
            chosen = [letter.id for letter in sorted(found, key=lambda letter: letter.time)]
            if not chosen:
                click.echo(f"No dead letters{_where(queues)}.")
                return
        else:
            chosen = list(dict.fromkeys(letter_ids))
            unknown = [letter_id for letter_id in chosen if letters.get(letter_id) is None]
            if unknown:
                raise click.ClickException(
                    f"No dead letter has the id {', '.join(map(repr, unknown))} ({_SEE_LIST}); "
                    f"nothing was requeued.")
        for letter_id in chosen:
            letter = letters.requeue(letter_id)
            if letter is None:  # requeued or purged by someone else meanwhile
                gone.append(letter_id)
                continue
            requeued += 1
            click.echo(f"Requeued {letter.id} to {_printable(letter.queue)}: "
                       f"{_printable(_task(letter))}")
    click.echo(f"Requeued {requeued} dead letter(s).")
    if gone:
        raise click.ClickException(
            f"{len(gone)} dead letter(s) were gone before they could be requeued (requeued "
            f"or purged meanwhile): {', '.join(gone)}.")


@dead_letters_cli.command("purge")
@click.option("-Q", "--queues", multiple=True, callback=split_names,
              help="Only these queues, comma-separated (default: every queue).")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
def purge_command(queues: list[str] | None, force: bool) -> None:
    """Delete dead letters (for good)."""
    names = _selected(queues)
    with store(_state()) as letters:
        if not force:
            count = sum(letters.count(queue) for queue in names)
            if not count:
                click.echo(f"No dead letters{_where(queues)}.")
                return
            click.confirm(f"Delete {count} dead letter(s){_where(queues)}?", abort=True)
        purged = sum(letters.purge(queue) for queue in names)
    click.echo(f"Purged {purged} dead letter(s){_where(queues)}.")
