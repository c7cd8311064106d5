"""Build a protocol-2 message, parse one into a :class:`Context` (``task.request``)."""

from __future__ import annotations

import os
import reprlib
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kombu.exceptions import ContentDisallowed
from kombu.exceptions import EncodeError as KombuEncodeError
from kombu.serialization import dumps, loads, prepare_accept_content

from ..exceptions import EncodeError
from .checks import BadMessage, RefusedContent, check_content, describe, read_headers
from .dates import parse_datetime

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
    #: Results of the tasks this call sent from the worker (callbacks, a
    #: chain's next step): Celery's ``request.children``, stored in the meta.
    children: list[Any] = field(default_factory=list)


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
    except (ValueError, OverflowError):
        return None


# -- checking a received message ---------------------------------------------


def parse(
    headers: object,
    body: object,
    content_type: object,
    content_encoding: object,
    accept: set[str] | None,
    properties: object = None,
    delivery_info: object = None,
) -> Context:
    """Check and decode a protocol-2 message into a :class:`Context`.

    Nothing about the message is trusted: whatever it holds, this returns a
    :class:`Context` or raises :exc:`BadMessage`.

    :param accept: content types allowed, from :func:`accept_set` (None: any).
    :raises RefusedContent: its content type is not in ``accept``.
    :raises BadMessage: a header :func:`read_headers` refuses, a content type
        or encoding :func:`check_content` refuses, a body that cannot be
        decoded (too deeply nested, say), or one that is not
        ``[args, kwargs, embed]`` with a list of arguments, an object of
        keyword arguments with string keys, and an object (or null) for embed.
    """
    checked = read_headers(headers)
    ids = checked.id, checked.task
    problem = check_content(content_type, content_encoding)
    if problem:
        raise BadMessage(problem, *ids)
    try:
        decoded = loads(body, content_type, content_encoding, accept=accept)
    except ContentDisallowed as exc:
        raise RefusedContent(f"content type {content_type!r} is not accepted: {exc}",
                             *ids) from exc
    except Exception as exc:  # kombu's DecodeError (RecursionError inside), no serializer...
        raise BadMessage(f"the body cannot be decoded as {content_type!r}: {str(exc)[:200]}",
                         *ids) from exc
    if not body:  # kombu hands an empty body back as it is
        raise BadMessage("the body is empty, not [args, kwargs, embed] (protocol 2)", *ids)
    if not isinstance(decoded, (list, tuple)) or len(decoded) != 3:
        raise BadMessage(f"the body is {describe(decoded)}, not [args, kwargs, embed] "
                         f"(protocol 2)", *ids)
    args, kwargs, embed = decoded
    problems = []
    if not isinstance(args, (list, tuple)):
        problems.append(f"its args are {describe(args)}, not an array")
    if not isinstance(kwargs, dict):
        problems.append(f"its kwargs are {describe(kwargs)}, not an object")
    elif not all(isinstance(key, str) for key in kwargs):
        bad = next(key for key in kwargs if not isinstance(key, str))
        problems.append(f"its kwargs have the key {describe(bad)}, not a string")
    if embed is None:
        embed = {}
    elif not isinstance(embed, dict):
        problems.append(f"its embed is {describe(embed)}, not an object or null")
    else:
        for key in ("callbacks", "errbacks", "chain"):
            if embed.get(key) is not None and not isinstance(embed[key], list):
                problems.append(f"its embed's {key!r} is {describe(embed[key])}, "
                                f"not an array or null")
    if problems:
        raise BadMessage(f"the body is not [args, kwargs, embed] (protocol 2): "
                         f"{'; '.join(problems)}", *ids)
    props = properties if isinstance(properties, Mapping) else {}
    raw = headers if isinstance(headers, Mapping) else {}
    return Context(
        id=checked.id,
        task=checked.task,
        args=list(args),
        kwargs=dict(kwargs),
        retries=checked.retries,
        eta=checked.eta,
        expires=checked.expires,
        root_id=checked.root_id,
        parent_id=checked.parent_id,
        group=checked.group,
        group_index=checked.group_index,
        timelimit=checked.timelimit,
        callbacks=embed.get("callbacks"),
        errbacks=embed.get("errbacks"),
        chain=embed.get("chain"),
        chord=embed.get("chord"),
        reply_to=_string(props.get("reply_to")),
        correlation_id=_string(props.get("correlation_id")),
        origin=checked.origin,
        ignore_result=checked.ignore_result,
        delivery_info=dict(delivery_info) if isinstance(delivery_info, Mapping) else {},
        headers=dict(raw),
    )


def _string(value: object) -> str | None:
    return value if isinstance(value, str) else None
