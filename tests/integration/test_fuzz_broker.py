"""No broker entry can take a worker down: property-based fuzzing against real workers.

Malformed entries are written straight into the queue, as a buggy producer in
another language or someone with broker access would: LPUSH onto the Redis
list ``celery``, INSERT into the embedded broker's ``messages`` table. They
are interleaved with valid ``add`` calls published through the app. One
worker per broker takes every batch Hypothesis draws, and after each batch:

- the worker is alive and never reconnected (a bad entry is not a lost connection);
- every valid task is SUCCESS, with its value;
- every malformed *envelope* (:func:`~flask_tasks.transport.envelope.check_envelope`
  refuses it) is a dead letter, with its reason and its bytes exactly as pushed,
  and nothing else is (the count grows by exactly their number);
- every malformed *task message* in a well-formed envelope is rejected, not
  dead-lettered (``TASKS_DEAD_LETTER_REJECTED`` is off): FAILURE with the reason
  when its id is a readable string;
- nothing is left in the queue or held unacknowledged (so nothing comes back).

A worker is slow to start, so Hypothesis draws many entries per example and
few examples; shrinking is off (every shrink step would be a worker round, and
after a crash every step fails alike): a failure names the batch and the
entries that went wrong. ``-s`` prints the figures.

What "malformed" means for a task message in a well-formed envelope, as
these tests hold it: ``eta`` and ``expires`` must be a string (ISO 8601) or
null, ``timelimit`` null or ``[soft, hard]`` with numbers or nulls,
``retries`` an integer >= 0, ``task`` and ``id`` non-empty strings, the body
``[args, kwargs, embed]`` in an accepted content type (a refused one counts:
its id is readable, so it ends FAILURE), a known content encoding and, if a
``compression`` header says so, compressed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import sqlite3
import string
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from flask import Flask
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from flask_tasks import states
from flask_tasks.result import AsyncResult
from flask_tasks.transport.base import worker_channel
from flask_tasks.transport.connect import broker_connection
from flask_tasks.transport.dead_letters import DeadLetters
from flask_tasks.transport.embedded import path_from_url
from flask_tasks.transport.envelope import BadEnvelope, check_envelope
from tests.apps import basic
from tests.helpers import StartWorker, WorkerProcess, broker_reconnects, wait_for

APP = "tests.apps.basic:create_app"
QUEUE = "celery"
ADD = "tests.apps.basic.add"
#: TASKS_BROKER_MAX_MESSAGE_SIZE for these workers, so an oversize entry is cheap to make.
MAX_SIZE = 256 * 1024
CONFIG = json.dumps({"TASKS_BROKER_MAX_MESSAGE_SIZE": MAX_SIZE})
#: Hypothesis examples per broker; malformed entries and valid tasks drawn per example.
EXAMPLES = 40
BATCH = (30, 90)
VALID_PER_BATCH = (3, 10)
#: Seconds one batch may take to be worked through, and may go without any progress.
BATCH_TIMEOUT = {"redis": 30.0, "embedded": 60.0}
STALL = 10.0

# What must become of an entry.
VALID = "valid"  # published with add.delay: SUCCESS, x + y
DEAD = "dead-letter"  # malformed envelope: a dead letter with its reason
TAG = "bad-tag"  # a bad delivery tag: DEAD on Redis; on the embedded broker, whose
#                  delivery tag is the row id, dead-lettered or run (SUCCESS)
FAILURE = "failure"  # rejected task message, id readable: FAILURE stored, no dead letter
DROPPED = "dropped"  # rejected task message, no readable id: gone, no dead letter
TOLERATED = "tolerated"  # an envelope kombu can take as it is: SUCCESS


# -- entries -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Draft:
    """One entry to push, and what must become of it.

    :param category: what is wrong with it.
    :param fate: one of the fates above.
    :param detail: the drawn values, shortened, for a failure report.
    :param make: ``make(task_id, delivery_tag)``: the entry's bytes (None for VALID).
    :param blob: on the embedded broker, stored as a BLOB (else as TEXT).
    :param args: for VALID, the arguments of ``add``.
    """

    category: str
    fate: str
    detail: str
    make: Callable[[str, str], bytes] | None = field(default=None, repr=False, compare=False)
    blob: bool = False
    args: tuple[int, int] = (0, 0)

    def __repr__(self) -> str:
        stored = " (BLOB)" if self.blob else ""
        return f"<{self.category}{stored}: {self.detail}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how Hypothesis shows it
        printer.text(repr(self))


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


#: A key taken out of the envelope instead of given a value.
MISSING: Any = _Missing()
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def envelope(task_id: str, tag: str) -> dict[str, Any]:
    """A well-formed kombu envelope of ``add(1, 2)``, as the app publishes it (protocol 2)."""
    body = json.dumps([[1, 2], {}, EMBED]).encode()
    return {
        "body": b64(body),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": ADD, "id": task_id, "shadow": None, "eta": None,
                    "expires": None, "group": None, "group_index": None, "retries": 0,
                    "timelimit": [None, None], "root_id": task_id, "parent_id": None,
                    "argsrepr": "(1, 2)", "kwargsrepr": "{}", "origin": "fuzz@test",
                    "ignore_result": False},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": QUEUE},
                       "priority": 0, "body_encoding": "base64", "delivery_tag": tag},
    }


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def put(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``target[path...]`` to ``value``, or remove it if ``value`` is MISSING."""
    for key in path[:-1]:
        target = target[key]
    if value is MISSING:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value


def short(value: Any, size: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= size else f"{text[:size]}... ({len(text)} chars)"


# -- strategies ------------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers()
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_values: SearchStrategy[Any] = st.recursive(
    scalars, lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3), max_leaves=5)


def json_except(*kinds: type) -> SearchStrategy[Any]:
    """JSON values that are none of ``kinds`` (bool counts as int, as in Python)."""
    return json_values.filter(lambda value: not isinstance(value, kinds))


def not_string_or_null() -> SearchStrategy[Any]:
    return json_except(str, type(None))


def with_value(category: str, fate: str, path: tuple[str, ...],
               values: SearchStrategy[Any]) -> SearchStrategy[Draft]:
    """A well-formed envelope whose ``path`` is set to a drawn value (MISSING: removed)."""
    def draft(value: Any) -> Draft:
        def make(task_id: str, tag: str) -> bytes:
            entry = envelope(task_id, tag)
            put(entry, path, value)
            return dumps(entry)
        return Draft(category, fate, f"{'.'.join(path)} = {short(value)}", make)
    return values.map(draft)


def raw(category: str, values: SearchStrategy[bytes]) -> SearchStrategy[Draft]:
    """An entry that is the drawn bytes themselves (stored as TEXT or as a BLOB)."""
    return st.builds(lambda data, blob: Draft(category, DEAD, short(data),
                                              lambda _id, _tag: data, blob),
                     values, st.booleans())


def text_entries() -> SearchStrategy[bytes]:
    return st.text(max_size=40).map(str.encode)


def truncated() -> SearchStrategy[Draft]:
    def draft(fraction: float) -> Draft:
        def make(task_id: str, tag: str) -> bytes:
            whole = dumps(envelope(task_id, tag))
            return whole[:int(len(whole) * fraction)]
        return Draft("truncated JSON", DEAD, f"first {fraction:.0%}", make)
    return st.floats(0, 1, exclude_max=True).map(draft)


def non_objects() -> SearchStrategy[bytes]:
    top: SearchStrategy[Any] = (json_except(dict) | st.sampled_from([123, None, "text", [], 1e308]))
    nan = st.sampled_from([b"NaN", b"-Infinity", b"[NaN]"])
    huge = st.integers(4301, 6000).map(lambda digits: b"9" * digits)  # past int()'s limit
    return top.map(dumps) | nan | huge


def deep() -> SearchStrategy[Draft]:
    """Nesting past the accepted depth: bare, as objects, or inside an envelope's headers."""
    def draft(form: str, levels: int) -> Draft:
        def make(task_id: str, tag: str) -> bytes:
            if form == "lists":
                return b"[" * levels + b"]" * levels
            if form == "objects":
                return b'{"a":' * levels + b"0" + b"}" * levels
            entry = dumps(envelope(task_id, tag))
            nested = b"[" * levels + b"]" * levels
            return entry.replace(b'"headers": {', b'"headers": {"deep": ' + nested + b", ", 1)
        return Draft("nested deep", DEAD, f"{form}, {levels} levels", make)
    return st.builds(draft, st.sampled_from(["lists", "objects", "headers"]),
                     st.integers(101, 20_000))


def bad_base64() -> SearchStrategy[Draft]:
    def draft(payload: bytes, position: int, junk: str) -> Draft:
        encoded = b64(payload)
        spot = position % (len(encoded) + 1)
        body = encoded[:spot] + junk + encoded[spot:]

        def make(task_id: str, tag: str) -> bytes:
            entry = envelope(task_id, tag)
            entry["body"] = body
            return dumps(entry)
        return Draft("body not base64", DEAD, short(body), make)

    def invalid(candidate: Draft) -> bool:
        assert candidate.make is not None
        body = json.loads(candidate.make("x", "x"))["body"]
        try:
            binascii.a2b_base64(body.encode("ascii"), strict_mode=True)
        except (UnicodeEncodeError, binascii.Error):
            return True
        return False
    return st.builds(draft, st.binary(max_size=30), st.integers(0, 60),
                     st.sampled_from(["!", "=", "==x", "*", "é", "\u2603", " ", "\n", "A"])
                     ).filter(invalid)


def oversize() -> SearchStrategy[Draft]:
    def draft(extra: int) -> Draft:
        def make(task_id: str, tag: str) -> bytes:
            entry = envelope(task_id, tag)
            entry["headers"]["pad"] = "x" * (MAX_SIZE + extra)
            return dumps(entry)
        return Draft("oversize", DEAD, f"{MAX_SIZE + extra}+ bytes", make)
    return st.integers(0, 1000).map(draft)


def bad_tags() -> SearchStrategy[Any]:
    long_tag = st.integers(257, 5000).map(lambda size: uuid.uuid4().hex + "t" * size)
    return st.just(MISSING) | st.just("") | json_except(str) | long_tag


def bad_priority(value: Any) -> bool:
    return value is not None and (isinstance(value, bool) or not isinstance(value, int))


def malformed_envelopes() -> SearchStrategy[Draft]:
    """Entries :func:`check_envelope` refuses: each must become a dead letter."""
    return st.one_of(
        raw("random bytes", st.binary(max_size=64)),
        raw("random text", text_entries()),
        truncated(),
        raw("JSON not an object", non_objects()),
        deep(),
        with_value("properties not an object", DEAD, ("properties",),
                   st.just(MISSING) | json_except(dict)),
        with_value("delivery_info not an object", DEAD, ("properties", "delivery_info"),
                   json_except(dict, type(None))),
        with_value("delivery_info.exchange not a string", DEAD,
                   ("properties", "delivery_info", "exchange"), not_string_or_null()),
        with_value("delivery_info.routing_key not a string", DEAD,
                   ("properties", "delivery_info", "routing_key"), not_string_or_null()),
        with_value("body not a string", DEAD, ("body",), st.just(MISSING) | json_except(str)),
        with_value("headers not an object", DEAD, ("headers",),
                   json_except(dict, type(None))),
        with_value("content-type not a string", DEAD, ("content-type",),
                   not_string_or_null()),
        with_value("content-encoding not a string", DEAD, ("content-encoding",),
                   not_string_or_null()),
        with_value("correlation_id not a string", DEAD, ("properties", "correlation_id"),
                   not_string_or_null()),
        with_value("reply_to not a string", DEAD, ("properties", "reply_to"),
                   not_string_or_null()),
        with_value("body_encoding not a string", DEAD, ("properties", "body_encoding"),
                   not_string_or_null()),
        with_value("unknown body_encoding", DEAD, ("properties", "body_encoding"),
                   st.text(max_size=20).filter(lambda name: name != "base64")),
        with_value("priority not an integer", DEAD, ("properties", "priority"),
                   json_values.filter(bad_priority)),
        bad_base64(),
        oversize(),
        with_value("bad delivery tag", TAG, ("properties", "delivery_tag"), bad_tags()),
    )


def body_is(category: str, fate: str, bodies: SearchStrategy[bytes]) -> SearchStrategy[Draft]:
    """A well-formed envelope whose (base64) body is the drawn bytes."""
    def draft(body: bytes) -> Draft:
        def make(task_id: str, tag: str) -> bytes:
            entry = envelope(task_id, tag)
            entry["body"] = b64(body)
            return dumps(entry)
        return Draft(category, fate, short(body), make)
    return bodies.map(draft)


def not_protocol_2(value: Any) -> bool:
    return not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], list)
                and isinstance(value[1], dict))


def bad_timelimit(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, list) or len(value) != 2:
        return True
    return any(isinstance(limit, bool) or not isinstance(limit, (int, float, type(None)))
               for limit in value)


BAD_DATES = st.sampled_from(["not a date", "yesterday", "2024-13-45T99:99:99", "10 o'clock"])


def malformed_task_messages() -> SearchStrategy[Draft]:
    """Well-formed envelopes of task messages the worker must reject (not dead-letter)."""
    wrong_args = st.sampled_from([[[1], {}, EMBED], [[1, 2, 3], {}, EMBED],
                                  [[1, 2], {"z": 1}, EMBED], [["a", 1], {}, EMBED]])
    return st.one_of(
        with_value("eta of the wrong type", FAILURE, ("headers", "eta"),
                   not_string_or_null() | BAD_DATES),
        with_value("expires of the wrong type", FAILURE, ("headers", "expires"),
                   not_string_or_null() | BAD_DATES),
        with_value("timelimit of the wrong type", FAILURE, ("headers", "timelimit"),
                   json_values.filter(bad_timelimit) | st.just(["a"])),
        with_value("retries not an integer", FAILURE, ("headers", "retries"),
                   st.text(string.ascii_letters, min_size=1, max_size=5)
                   | st.integers(max_value=-1)
                   | st.lists(scalars, min_size=1, max_size=3)
                   | st.dictionaries(st.text(max_size=3), scalars, max_size=2)),
        with_value("task name not a string", FAILURE, ("headers", "task"),
                   st.just(MISSING) | st.just("") | json_except(str)),
        with_value("unknown task", FAILURE, ("headers", "task"),
                   st.text(max_size=12).map(lambda name: "fuzz.unknown." + name)),
        with_value("unknown content-encoding", FAILURE, ("content-encoding",),
                   st.text(string.ascii_lowercase, max_size=8).map(lambda n: "x-fuzz-" + n)),
        with_value("compressed body that does not decompress", FAILURE,
                   ("headers", "compression"),
                   st.sampled_from(["zlib", "bzip2", "application/x-gzip"])
                   | st.text(string.ascii_lowercase, max_size=6).map(lambda n: "x-fuzz-" + n)),
        with_value("refused content-type", FAILURE, ("content-type",),
                   st.sampled_from(["application/x-python-serialize", "application/x-yaml",
                                    "text/plain", "application/x-msgpack"])),
        body_is("body not [args, kwargs, embed]", FAILURE,
                json_values.filter(not_protocol_2).map(dumps)),
        body_is("body not JSON", FAILURE,
                st.sampled_from([b"not json", b"{", b"[1, 2"])
                | st.binary(max_size=16).map(lambda data: b"\xff" + data)),
        body_is("wrong arguments", FAILURE, wrong_args.map(dumps)),
        with_value("no readable task id", DROPPED, ("headers", "id"),
                   st.just(MISSING) | st.just("") | json_except(str)),
        with_value("no headers", DROPPED, ("headers",), st.just(MISSING) | st.none()),
        with_value("no delivery_info", TOLERATED, ("properties", "delivery_info"),
                   st.just(MISSING) | st.none()),
    )


def valid_tasks() -> SearchStrategy[Draft]:
    return st.builds(lambda x, y: Draft("valid add", VALID, f"add({x}, {y})", args=(x, y)),
                     st.integers(-1000, 1000), st.integers(-1000, 1000))


@st.composite
def batches(draw: st.DrawFn) -> list[Draft]:
    """Malformed envelopes and task messages, with a few valid tasks in between."""
    batch = draw(st.lists(st.one_of(malformed_envelopes(), malformed_task_messages()),
                          min_size=BATCH[0], max_size=BATCH[1]))
    for valid in draw(st.lists(valid_tasks(), min_size=VALID_PER_BATCH[0],
                               max_size=VALID_PER_BATCH[1])):
        batch.insert(draw(st.integers(0, len(batch))), valid)
    # New objects: Hypothesis then reports a failing batch by each entry's repr.
    return [dataclasses.replace(draft) for draft in batch]


# -- the brokers -----------------------------------------------------------------------------
class Broker:
    """Where entries are pushed, and what is still queued or held there."""

    name = ""

    def push(self, entries: list[tuple[bytes, bool]]) -> list[bytes]:
        """Push ``(entry, as_blob)`` pairs into the queue, in order; returns them as stored."""
        raise NotImplementedError

    def pending(self) -> int:
        """Messages still in the queue or held unacknowledged by a worker."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class RedisBroker(Broker):
    name = "redis"

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def push(self, entries: list[tuple[bytes, bool]]) -> list[bytes]:
        pipe = self.client.pipeline(transaction=False)
        for entry, _ in entries:
            pipe.lpush(QUEUE, entry)
        pipe.execute()
        return [entry for entry, _ in entries]

    def pending(self) -> int:
        return int(self.client.llen(QUEUE)) + int(self.client.hlen("unacked"))

    def close(self) -> None:
        self.client.close()


class EmbeddedBroker(Broker):
    """The embedded broker's SQLite file: a malformed entry is a row with a bad payload."""

    name = "embedded"

    def __init__(self, url: str) -> None:
        self.db = sqlite3.connect(path_from_url(url), timeout=30, isolation_level=None)

    def push(self, entries: list[tuple[bytes, bool]]) -> list[bytes]:
        rows: list[tuple[str, bytes | str]] = []
        stored = []
        for entry, blob in entries:
            if blob:
                rows.append((QUEUE, entry))
                stored.append(entry)
            else:
                try:
                    text = entry.decode("utf-8")
                except UnicodeDecodeError:
                    text = entry.decode("latin-1")
                rows.append((QUEUE, text))
                stored.append(text.encode("utf-8"))
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT INTO messages (queue, priority, payload) VALUES (?, 0, ?)",
                            rows)
        self.db.execute("COMMIT")
        return stored

    def pending(self) -> int:
        sql = "SELECT COUNT(*) FROM messages WHERE queue = ?"
        return int(self.db.execute(sql, (QUEUE,)).fetchone()[0])

    def close(self) -> None:
        self.db.close()


@dataclass
class Figures:
    """What the fuzzing did, printed at the end."""

    broker: str
    examples: int = 0
    entries: int = 0
    by_fate: Counter[str] = field(default_factory=Counter)
    by_category: Counter[str] = field(default_factory=Counter)
    dead_lettered: int = 0
    failures_stored: int = 0
    valid_done: int = 0
    tags_run: int = 0
    crashes: int = 0
    reconnects: int = 0
    seconds: float = 0.0

    def report(self) -> str:
        rate = self.entries / self.seconds if self.seconds else 0.0
        categories = ", ".join(f"{name} {count}" for name, count
                               in sorted(self.by_category.items()))
        return (f"fuzz {self.broker}: {self.entries} entries tried in {self.examples} "
                f"batches ({dict(self.by_fate)}), {self.crashes} crashes, "
                f"{self.reconnects} reconnects, {self.dead_lettered} dead-lettered, "
                f"{self.failures_stored} FAILURE stored, {self.valid_done} valid tasks done"
                f"{f', {self.tags_run} bad-tag entries run' if self.tags_run else ''}; "
                f"{self.seconds:.1f} s, {rate:.0f} entries/s\n  by category: {categories}")


@contextmanager
def dead_letter_store(app: Flask) -> Iterator[DeadLetters | None]:
    """The dead letters of the app's broker, through the store the worker writes to.

    None if the broker's channel keeps none: the batches still run (a crash or a
    reconnect shows first), and the first one fails on the missing letters.
    """
    state = basic.tasks.state(app)
    connection = broker_connection(state.broker_url, state.config.transport_options)
    try:
        yield worker_channel(connection.default_channel).dead_letters
    finally:
        connection.release()


# -- one batch ---------------------------------------------------------------------------
def check_against_contract(draft: Draft, entry: bytes) -> None:
    """The entry is malformed as an envelope exactly when its draft says so."""
    try:
        check_envelope(entry, max_size=MAX_SIZE)
    except BadEnvelope as exc:
        assert draft.fate in (DEAD, TAG), f"check_envelope refuses {draft} ({exc})"
    else:
        assert draft.fate not in (DEAD, TAG), f"check_envelope accepts {draft}"


def run_batch(batch: list[Draft], broker: Broker, store: DeadLetters | None,
              worker: WorkerProcess, figures: Figures) -> None:
    """Push one batch, interleaved with valid tasks; check what became of every entry."""
    started = time.monotonic()

    def dead_count() -> int:
        return store.count(QUEUE) if store is not None else 0

    dead_before = dead_count()
    must_die: list[bytes] = []
    may_die: list[tuple[bytes, str, Draft]] = []  # TAG on the embedded broker
    failures: list[tuple[str, Draft]] = []
    succeed: list[tuple[str, int, Draft]] = []
    run: list[tuple[bytes, bool]] = []
    drafts_of_run: list[tuple[Draft, str]] = []

    def flush() -> None:
        stored = broker.push(run)
        for (draft, task_id), entry in zip(drafts_of_run, stored, strict=True):
            if draft.fate == DEAD or (draft.fate == TAG and broker.name == "redis"):
                must_die.append(entry)
            elif draft.fate == TAG:
                may_die.append((entry, task_id, draft))
            elif draft.fate == FAILURE:
                failures.append((task_id, draft))
            elif draft.fate == TOLERATED:
                succeed.append((task_id, 3, draft))
        run.clear()
        drafts_of_run.clear()

    for draft in batch:
        figures.by_fate[draft.fate] += 1
        figures.by_category[draft.category] += 1
        if draft.fate == VALID:
            flush()
            sent = basic.add.delay(*draft.args)
            succeed.append((sent.id, sum(draft.args), draft))
            continue
        assert draft.make is not None
        task_id, tag = str(uuid.uuid4()), str(uuid.uuid4())
        entry = draft.make(task_id, tag)
        check_against_contract(draft, entry)
        run.append((entry, draft.blob))
        drafts_of_run.append((draft, task_id))
    flush()
    figures.entries += len(batch)
    figures.examples += 1

    results: dict[str, AsyncResult[Any]] = {}

    def result(task_id: str) -> AsyncResult[Any]:
        """The task's result (a ready one is cached by AsyncResult)."""
        if task_id not in results:
            results[task_id] = basic.tasks.AsyncResult(task_id)
        return results[task_id]

    def tags_run() -> int:
        return sum(result(task_id).successful() for _, task_id, _ in may_die)

    last_progress: list[Any] = [None, time.monotonic()]  # (pending, waiting, letters), since

    def done() -> bool:
        if worker.proc.poll() is not None:
            figures.crashes = 1
            raise AssertionError(f"the worker exited with {worker.proc.returncode}; last "
                                 f"output:\n{worker.output[-3000:]}")
        reconnects = broker_reconnects(worker.output)
        if reconnects:
            figures.reconnects = reconnects
            raise AssertionError(f"the worker reconnected {reconnects} time(s); last "
                                 f"output:\n{worker.output[-3000:]}")
        pending = broker.pending()
        waiting = sum(not result(task_id).ready()
                      for task_id in [*(entry[0] for entry in succeed),
                                      *(entry[0] for entry in failures)])
        expected = len(must_die) + len(may_die) - tags_run()
        assert store is not None or pending or not expected, \
            f"{expected} malformed entries were taken, and the broker keeps no dead letters " \
            f"(WorkerChannel.dead_letters is None)"
        missing_letters = max(expected - (dead_count() - dead_before), 0)
        progress = (pending, waiting, missing_letters)
        if progress != last_progress[0]:
            last_progress[:] = [progress, time.monotonic()]
        elif time.monotonic() - last_progress[1] > STALL:
            raise AssertionError(f"no progress for {STALL} s")
        return not (pending or waiting or missing_letters)

    def unfinished() -> str:
        lines = [f"pending in the broker: {broker.pending()}",
                 f"dead letters: {dead_count() - dead_before} new, {len(must_die)} "
                 f"expected (+ up to {len(may_die)} bad-tag entries, {tags_run()} of them run)"]
        for task_id, _, draft in succeed:
            if not result(task_id).ready():
                lines.append(f"not done: {draft} ({result(task_id).state})")
        for task_id, draft in failures:
            if not result(task_id).ready():
                lines.append(f"no FAILURE stored: {draft} ({result(task_id).state})")
        return "\n  ".join(lines)

    try:
        wait_for(done, timeout=BATCH_TIMEOUT[broker.name], interval=0.05,
                 message="the batch to be worked through")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n  {unfinished()}") from None
    figures.seconds += time.monotonic() - started

    wrong = []
    for task_id, value, draft in succeed:
        outcome = result(task_id)
        if outcome.state != states.SUCCESS or outcome.result != value:
            wrong.append(f"{draft}: {outcome.state} {short(outcome.result)}, not SUCCESS {value}")
        elif draft.fate == VALID:
            figures.valid_done += 1
    for task_id, draft in failures:
        outcome = result(task_id)
        if outcome.state != states.FAILURE:
            wrong.append(f"{draft}: {outcome.state}, not FAILURE")
        elif not str(outcome.result):
            wrong.append(f"{draft}: FAILURE without a reason ({outcome.result!r})")
        else:
            figures.failures_stored += 1
    run_tags = [entry for entry, task_id, _ in may_die if result(task_id).successful()]
    figures.tags_run += len(run_tags)

    expected = Counter(must_die) + Counter(entry for entry, _, _ in may_die)
    expected -= Counter(run_tags)
    added = dead_count() - dead_before
    letters = store.list(QUEUE, limit=max(added, 1))[:added] if store is not None else []
    figures.dead_lettered += added
    got = Counter(letter.entry for letter in letters)
    for letter in letters:
        if not letter.reason.strip() or letter.queue != QUEUE:
            wrong.append(f"dead letter {letter.id} of queue {letter.queue!r} has reason "
                         f"{letter.reason!r}: {short(letter.entry)}")
    if got != expected:
        missing, extra = expected - got, got - expected
        wrong.append(f"{added} dead letters, {sum(expected.values())} expected; not "
                     f"dead-lettered: {[short(entry) for entry in missing]}; dead-lettered "
                     f"but should not be: {[short(entry) for entry in extra]}")
    assert not wrong, "\n  ".join([f"{len(wrong)} entries went wrong:", *wrong])


def fuzz(broker: Broker, store: DeadLetters | None, worker: WorkerProcess,
         figures: Figures) -> None:
    """Run the Hypothesis examples against one running worker."""
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example,
                                     HealthCheck.filter_too_much])
    @given(batch=batches())
    def examples(batch: list[Draft]) -> None:
        run_batch(batch, broker, store, worker, figures)

    started = time.monotonic()
    try:
        examples()
        assert worker.proc.poll() is None, "the worker exited"
        figures.reconnects = broker_reconnects(worker.output)
        assert figures.reconnects == 0, worker.output[-3000:]
    finally:
        print(figures.report() + f" (wall {time.monotonic() - started:.1f} s)")


# -- the tests ---------------------------------------------------------------------------
@pytest.fixture()
def embedded_fuzz_app(basic_app_on: Any) -> Flask:
    """``tests.apps.basic`` on the embedded default, with the fuzz config, in an app context."""
    return basic_app_on(None, None, CONFIG)  # type: ignore[no-any-return]


@pytest.mark.timeout(600)
def test_fuzzed_redis_entries_never_take_the_worker_down(
        basic_app: Flask, redis_env: dict[str, str], redis_url: str,
        start_worker: StartWorker) -> None:
    worker = start_worker(APP, "-c", "2", env={**redis_env, "TEST_CONFIG": CONFIG})
    broker = RedisBroker(redis_url)
    try:
        with dead_letter_store(basic_app) as store:
            fuzz(broker, store, worker, Figures("redis"))
    finally:
        broker.close()


@pytest.mark.timeout(600)
def test_fuzzed_embedded_entries_never_take_the_worker_down(
        embedded_fuzz_app: Flask, start_worker: StartWorker) -> None:
    worker = start_worker(APP, "-c", "2", env={"TEST_CONFIG": CONFIG})
    broker = EmbeddedBroker(basic.tasks.state(embedded_fuzz_app).broker_url)
    try:
        with dead_letter_store(embedded_fuzz_app) as store:
            fuzz(broker, store, worker, Figures("embedded"))
    finally:
        broker.close()
