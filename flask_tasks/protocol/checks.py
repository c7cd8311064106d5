"""A received message trusted in nothing: its headers, content type and encoding checked.

:func:`read_headers` checks the type of every protocol-2 header a worker
relies on, :func:`check_content` the content type and encoding; both raise
only :exc:`BadMessage`, with a reason a person can act on and the task id
and name when the headers give them (:func:`message_ids`).
"""

from __future__ import annotations

import codecs
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kombu.compression import get_decoder

from ..exceptions import DecodeError


class BadMessage(DecodeError):
    """A task message a worker cannot run; ``str()`` is the reason, for a person.

    Raised by :func:`read_headers` and :func:`parse`. The ids are what the
    headers tell, so that the worker can store FAILURE for a caller waiting
    on the id and name the task in its log.

    :param reason: what is wrong with the message.
    :param task_id: the message's task id if its headers have one (a
        non-empty string), else None.
    :param name: the message's task name, likewise.
    """

    def __init__(self, reason: str, task_id: str | None = None, name: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.task_id = task_id
        self.name = name


class RefusedContent(BadMessage):
    """The message's content type is not among the accepted ones (``TASKS_ACCEPT_CONTENT``).

    The sender chose a serializer this worker is configured not to read
    (pickle, say): the worker refuses the message and stores no state.
    """


#: Content encodings kombu hands through as bytes, undecoded.
_BINARY_ENCODINGS = frozenset({"binary", "ascii-8bit"})

#: The headers that are None or a string.
_STRING_HEADERS = ("root_id", "parent_id", "group", "shadow", "origin")

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 4
_short.maxlevel = 2

_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
               float: "number"}


def describe(value: object) -> str:
    """``value`` for an error message: its JSON type and a short repr, ``JSON number 5``.

    Bounded (60 characters a string, 4 items a list, 2 levels), whatever ``value`` is.
    """
    if value is None:
        return "JSON null"
    kind = _JSON_TYPES.get(type(value))
    return f"JSON {kind} {_short.repr(value)}" if kind else \
        f"{type(value).__name__} {_short.repr(value)}"


@dataclass(slots=True)  # not frozen: built for every message, and frozen costs 4x
class TaskHeaders:
    """The protocol-2 headers a worker relies on, checked by :func:`read_headers`."""

    task: str
    id: str
    eta: datetime | None = None
    expires: datetime | None = None
    retries: int = 0
    #: ``(hard, soft)`` time limits, seconds; None: the message sets none.
    timelimit: tuple[float | None, float | None] = (None, None)
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    shadow: str | None = None
    origin: str | None = None
    ignore_result: bool = False
    compression: str | None = None


def message_ids(headers: object) -> tuple[str | None, str | None]:
    """``(task name, task id)`` as ``headers`` tell, each None unless a non-empty string.

    Never raises, whatever ``headers`` is.
    """
    if not isinstance(headers, Mapping):
        return None, None
    try:
        name, task_id = headers.get("task"), headers.get("id")
    except Exception:
        return None, None
    return (name if isinstance(name, str) and name else None,
            task_id if isinstance(task_id, str) and task_id else None)


def read_headers(headers: object) -> TaskHeaders:
    """Check the type of every protocol-2 header a worker relies on, and read them.

    ==================================  ==================================================
    ``task``, ``id``                    non-empty strings
    ``eta``, ``expires``                None or an ISO 8601 date and time (naive: UTC;
                                        ``""``: None; a ``datetime``, as an AMQP
                                        timestamp arrives, is taken as it is)
    ``retries``, ``group_index``        None or an integer >= 0 (not a boolean)
    ``timelimit``                       None or ``[hard, soft]``, each None or a number
                                        of seconds >= 0
    ``root_id``, ``parent_id``,         None or a string
    ``group``, ``shadow``, ``origin``
    ``ignore_result``                   None or a boolean
    ``compression``                     None or a compression kombu knows (``gzip``,
                                        ``zlib``, ``application/x-gzip``, ...)
    ==================================  ==================================================

    Any other header (``lang``, ``argsrepr``, ``kwargsrepr``, your own) may be
    anything. This is what Celery 4+ and flask_tasks clients send.

    :param headers: a received message's headers; nothing about them is trusted.
    :raises BadMessage: naming every header that is wrong and what it should be
        (``header 'eta' is JSON number 5, not an ISO 8601 string``), with the
        ids the headers tell. Never any other exception.
    """
    if not isinstance(headers, Mapping):
        raise BadMessage(f"the message headers are {describe(headers)}, not an object: "
                         f"not a Celery protocol 2 task message")
    name, task_id = message_ids(headers)
    try:
        return _read_headers(headers, name, task_id)
    except BadMessage:
        raise
    except Exception as exc:  # a Mapping that fails to be read
        raise BadMessage(f"the message headers cannot be read ({exc!r:.200})", task_id,
                         name) from exc


def _read_headers(headers: Mapping[Any, Any], name: str | None,
                  task_id: str | None) -> TaskHeaders:
    raw_name, raw_id = headers.get("task"), headers.get("id")
    if raw_name is None and raw_id is None:
        raise BadMessage("the message headers lack 'task' and 'id': not a Celery protocol 2 "
                         "task message")
    problems: list[str] = []
    for key, value in (("task", raw_name), ("id", raw_id)):
        if value is None:
            problems.append(f"header {key!r} is missing")
        elif not isinstance(value, str) or not value:
            problems.append(f"header {key!r} is {describe(value)}, not a non-empty string")
    eta = _datetime_header(headers, "eta", problems)
    expires = _datetime_header(headers, "expires", problems)
    retries = _count_header(headers, "retries", problems)
    group_index = _count_header(headers, "group_index", problems)
    timelimit = headers.get("timelimit")
    if timelimit is None:
        timelimit = (None, None)
    elif not isinstance(timelimit, (list, tuple)) or len(timelimit) != 2 \
            or not all(_is_seconds(limit) for limit in timelimit):
        problems.append(f"header 'timelimit' is {describe(timelimit)}, not [hard, soft] "
                        f"(each null or a number of seconds >= 0)")
        timelimit = (None, None)
    strings: dict[str, str | None] = {}
    for key in _STRING_HEADERS:
        value = headers.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"header {key!r} is {describe(value)}, not a string or null")
            value = None
        strings[key] = value
    ignore_result = headers.get("ignore_result")
    if ignore_result is not None and not isinstance(ignore_result, bool):
        problems.append(f"header 'ignore_result' is {describe(ignore_result)}, "
                        f"not a boolean or null")
    compression = headers.get("compression")
    if compression is not None:
        if not isinstance(compression, str):
            problems.append(f"header 'compression' is {describe(compression)}, "
                            f"not a string or null")
        elif not _known_compression(compression):
            problems.append(f"header 'compression' is {_short.repr(compression)}, not a "
                            f"compression kombu knows (such as 'gzip' or 'zlib')")
    if problems or name is None or task_id is None:
        raise BadMessage("; ".join(problems), task_id, name)
    return TaskHeaders(
        task=name, id=task_id, eta=eta, expires=expires, retries=retries or 0,
        timelimit=(timelimit[0], timelimit[1]), group_index=group_index,
        ignore_result=bool(ignore_result), compression=compression, **strings)


def _datetime_header(headers: Mapping[Any, Any], key: str,
                     problems: list[str]) -> datetime | None:
    value = headers.get(key)
    if value is None or (isinstance(value, str) and not value):
        return None
    if isinstance(value, datetime):  # an AMQP timestamp
        parsed = value
    elif not isinstance(value, str):
        problems.append(f"header {key!r} is {describe(value)}, not an ISO 8601 string")
        return None
    else:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            problems.append(f"header {key!r} is {_short.repr(value)}, not an ISO 8601 date "
                            f"and time such as '2030-01-31T12:00:00+00:00'")
            return None
    try:
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        parsed.timestamp()
    except (ValueError, OverflowError, TypeError) as exc:
        problems.append(f"header {key!r} is {_short.repr(value)}: {exc}")
        return None
    return parsed


def _count_header(headers: Mapping[Any, Any], key: str, problems: list[str]) -> int | None:
    value = headers.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problems.append(f"header {key!r} is {describe(value)}, not an integer >= 0")
        return None
    return value


def _is_seconds(value: object) -> bool:
    """None, or a number of seconds >= 0 a float can hold (NaN is not)."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return float(value) >= 0
    except OverflowError:
        return False


def _known_compression(name: str) -> bool:
    try:
        get_decoder(name)
    except (KeyError, TypeError):
        return False
    return True


def check_headers(headers: object) -> tuple[str, str]:
    """Return ``(task name, task id)`` from protocol-2 headers, checked by :func:`read_headers`.

    :raises BadMessage: the headers are not a protocol-2 task message, or one
        of them has the wrong type.
    """
    checked = read_headers(headers)
    return checked.task, checked.id


def check_content(content_type: object, content_encoding: object) -> str | None:
    """Why a message's content type or content encoding is unusable; None if they are fine.

    Whether the content type is *accepted* is checked where the body is
    decoded (``accept``). A content encoding must be empty, ``binary`` or
    an encoding Python knows (``utf-8``, ``latin-1``, ...).
    """
    if content_type is not None and not isinstance(content_type, str):
        return f"content-type is {describe(content_type)}, not a string"
    if content_encoding is None or content_encoding == "":
        return None
    if not isinstance(content_encoding, str):
        return f"content-encoding is {describe(content_encoding)}, not a string"
    if content_encoding.lower() in _BINARY_ENCODINGS:
        return None
    try:
        codecs.lookup(content_encoding)
    except (LookupError, ValueError, TypeError):
        return (f"content-encoding {_short.repr(content_encoding)} is not an encoding Python "
                f"knows (such as 'utf-8', or 'binary')")
    return None
