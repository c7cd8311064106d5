"""Celery's task message protocol, version 2: build and parse messages. No I/O.

A message is kombu *headers* + *properties* + a *body*::

    headers    {"lang": "py", "task": name, "id": id, "root_id", "parent_id",
                "group", "group_index", "eta" (ISO 8601 | None),
                "expires" (ISO 8601 | None), "retries", "timelimit" [hard, soft],
                "argsrepr", "kwargsrepr", "origin", "shadow", "ignore_result"}
    properties {"correlation_id": id, "reply_to": str}
    body       [args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]

This is the public format Celery 4+ workers and clients speak, so either side
can be a Celery process. See Celery's "Message Protocol" documentation.

Exceptions travel as Celery encodes them in stored results and errback
arguments: ``{"exc_type", "exc_message": [args...], "exc_module"}``
(:func:`exception_to_dict`, :func:`exception_from_dict`).
"""

from __future__ import annotations

import builtins
import os
import reprlib
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu.exceptions import ContentDisallowed
from kombu.exceptions import DecodeError as KombuDecodeError
from kombu.exceptions import EncodeError as KombuEncodeError
from kombu.serialization import dumps, loads, prepare_accept_content

from .exceptions import DecodeError, EncodeError

_repr = reprlib.Repr()
_repr.maxstring = 256
_repr.maxother = 256
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 32
_repr.maxlevel = 4

ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def _refresh_origin() -> None:
    global ORIGIN
    ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


os.register_at_fork(after_in_child=_refresh_origin)


def to_datetime(value: float | datetime | timedelta | None,
                now: datetime | None = None) -> datetime | None:
    """Turn seconds-from-now, a timedelta or a datetime into an aware UTC datetime.

    A naive datetime is taken to be UTC.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value
    now = now or datetime.now(UTC)
    if isinstance(value, timedelta):
        return now + value
    return now + timedelta(seconds=float(value))


def parse_datetime(value: str | None) -> datetime | None:
    """Parse an ISO 8601 header value; naive means UTC."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


@dataclass(frozen=True)
class Message:
    """An encoded task message, ready for ``Producer.publish``."""

    task_id: str
    name: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes
    content_type: str
    content_encoding: str
    body_tuple: tuple[Any, Any, Any] = field(repr=False, default=((), {}, {}))


def build(
    name: str,
    task_id: str,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    *,
    serializer: str = "json",
    root_id: str | None = None,
    parent_id: str | None = None,
    group_id: str | None = None,
    group_index: int | None = None,
    retries: int = 0,
    eta: datetime | None = None,
    expires: datetime | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    callbacks: list[Any] | None = None,
    errbacks: list[Any] | None = None,
    chain: list[Any] | None = None,
    chord: Any = None,
    reply_to: str = "",
    ignore_result: bool = False,
    extra_headers: Mapping[str, Any] | None = None,
) -> Message:
    """Build and encode a protocol-2 task message.

    :raises EncodeError: ``serializer`` cannot encode the arguments; the
        message names the task and the offending value. Nothing is sent.
    """
    args = list(args or ())
    kwargs = dict(kwargs or {})
    embed = {"callbacks": callbacks, "errbacks": errbacks, "chain": chain, "chord": chord}
    body_tuple = (args, kwargs, embed)
    try:
        content_type, content_encoding, body = dumps(body_tuple, serializer=serializer)
    except (KombuEncodeError, TypeError, ValueError) as exc:
        raise EncodeError(
            f"Cannot send task {name!r}: its arguments cannot be encoded with the "
            f"{serializer!r} serializer ({exc}). Pass only values the serializer supports "
            f"(for JSON: str, int, float, bool, None, list, dict, datetime, UUID, Decimal), "
            f"for example a database id instead of an object. Nothing was sent."
        ) from exc
    if isinstance(body, str):
        body = body.encode(content_encoding or "utf-8")
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": eta.isoformat() if eta else None,
        "expires": expires.isoformat() if expires else None,
        "group": group_id,
        "group_index": group_index,
        "retries": retries,
        "timelimit": [time_limit, soft_time_limit],
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": _repr.repr(tuple(args)),
        "kwargsrepr": _repr.repr(kwargs),
        "origin": ORIGIN,
        "ignore_result": ignore_result,
    }
    if extra_headers:
        clash = set(extra_headers) & set(headers)
        if clash:
            raise ValueError(f"headers= cannot replace the protocol headers {sorted(clash)}")
        headers.update(extra_headers)
    properties = {"correlation_id": task_id, "reply_to": reply_to}
    return Message(task_id, name, headers, properties, body, content_type,
                   content_encoding, body_tuple)


@dataclass
class Context:
    """What a running task knows about its call: ``self.request`` in a bound task."""

    id: str
    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    timelimit: tuple[float | None, float | None] = (None, None)
    callbacks: list[Any] | None = None
    errbacks: list[Any] | None = None
    chain: list[Any] | None = None
    chord: Any = None
    reply_to: str | None = None
    correlation_id: str | None = None
    origin: str | None = None
    ignore_result: bool = False
    delivery_info: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)
    hostname: str | None = None
    called_directly: bool = False
    is_eager: bool = False


def accept_set(names: Sequence[str]) -> set[str]:
    """Turn serializer names (``"json"``) or content types into the set kombu checks."""
    return set(prepare_accept_content(list(names)))


def envelope_eta(envelope: Mapping[str, Any]) -> float | None:
    """The ``eta`` header of a kombu message envelope as a UNIX time, or None."""
    headers = envelope.get("headers") or {}
    value = headers.get("eta") if isinstance(headers, Mapping) else None
    if not value or not isinstance(value, str):
        return None
    try:
        return parse_datetime(value).timestamp()  # type: ignore[union-attr]
    except ValueError:
        return None


def check_headers(headers: Mapping[str, Any] | None) -> tuple[str, str]:
    """Return ``(task name, task id)`` from protocol-2 headers.

    :raises DecodeError: the headers are not a protocol-2 task message.
    """
    if not isinstance(headers, Mapping):
        raise DecodeError("the message has no headers: not a protocol 2 task message")
    name, task_id = headers.get("task"), headers.get("id")
    if not isinstance(name, str) or not isinstance(task_id, str) or not name or not task_id:
        raise DecodeError(
            "the message headers lack 'task' and 'id': not a Celery protocol 2 task message"
        )
    return name, task_id


def parse(
    headers: Mapping[str, Any],
    body: bytes,
    content_type: str,
    content_encoding: str,
    accept: set[str] | None,
    properties: Mapping[str, Any] | None = None,
    delivery_info: Mapping[str, Any] | None = None,
) -> Context:
    """Decode a protocol-2 message into a :class:`Context`.

    :param accept: content types allowed, from :func:`accept_set` (None: any).
    :raises DecodeError: the body cannot be decoded, its content type is not
        accepted, or it does not have the ``[args, kwargs, embed]`` shape.
    """
    name, task_id = check_headers(headers)
    try:
        decoded = loads(body, content_type, content_encoding, accept=accept)
    except ContentDisallowed as exc:
        raise DecodeError(f"content type {content_type!r} is not accepted: {exc}") from exc
    except (KombuDecodeError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"the body cannot be decoded as {content_type!r}: {exc}") from exc
    if (
        not isinstance(decoded, (list, tuple))
        or len(decoded) != 3
        or not isinstance(decoded[0], (list, tuple))
        or not isinstance(decoded[1], dict)
    ):
        raise DecodeError("the body is not [args, kwargs, embed] (protocol 2)")
    args, kwargs, embed = decoded
    embed = embed if isinstance(embed, dict) else {}
    timelimit = headers.get("timelimit") or (None, None)
    props = properties or {}
    return Context(
        id=task_id,
        task=name,
        args=list(args),
        kwargs=dict(kwargs),
        retries=int(headers.get("retries") or 0),
        eta=parse_datetime(headers.get("eta")),
        expires=parse_datetime(headers.get("expires")),
        root_id=headers.get("root_id"),
        parent_id=headers.get("parent_id"),
        group=headers.get("group"),
        group_index=headers.get("group_index"),
        timelimit=(timelimit[0], timelimit[1]) if len(timelimit) == 2 else (None, None),
        callbacks=embed.get("callbacks"),
        errbacks=embed.get("errbacks"),
        chain=embed.get("chain"),
        chord=embed.get("chord"),
        reply_to=props.get("reply_to"),
        correlation_id=props.get("correlation_id"),
        origin=headers.get("origin"),
        ignore_result=bool(headers.get("ignore_result")),
        delivery_info=dict(delivery_info or {}),
        headers=dict(headers),
    )


# -- the exception codec ---------------------------------------------------
_rebuilt: dict[tuple[str, str], type[BaseException]] = {}


def exception_to_dict(exc: BaseException) -> dict[str, Any]:
    """Encode ``exc`` the way Celery does (type name, args, module)."""
    cls = type(exc)
    args: list[Any] = []
    for arg in exc.args:
        args.append(arg if isinstance(arg, (str, int, float, bool, type(None))) else repr(arg))
    return {"exc_type": cls.__qualname__, "exc_message": args, "exc_module": cls.__module__}


def exception_from_dict(data: Mapping[str, Any]) -> BaseException:
    """Rebuild an exception stored by :func:`exception_to_dict` (or by Celery).

    The original class is used when its module is already imported and the
    name is an exception class there (modules are never imported on the
    say-so of stored data); otherwise a stand-in class with the same name and
    module is made, so ``type(exc).__name__`` still tells what happened.
    """
    name = str(data.get("exc_type") or "Exception")
    module_name = str(data.get("exc_module") or "builtins")
    message = data.get("exc_message", ())
    args = tuple(message) if isinstance(message, (list, tuple)) else (message,)
    module = builtins if module_name == "builtins" else sys.modules.get(module_name)
    cls: Any = module
    for part in name.split("."):
        cls = getattr(cls, part, None) if cls is not None else None
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        key = (module_name, name)
        cls = _rebuilt.get(key)
        if cls is None:
            cls = type(name.rsplit(".", 1)[-1], (Exception,), {"__module__": module_name})
            _rebuilt[key] = cls
    try:
        exc: BaseException = cls(*args)
    except Exception:
        fallback: type[BaseException] = type(name.rsplit(".", 1)[-1], (Exception,),
                                             {"__module__": module_name})
        exc = fallback(*args)
    return exc
