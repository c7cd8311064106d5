"""The defensive boundary: a raw broker entry checked before kombu or the protocol sees it.

kombu's virtual transports keep each message as one JSON *envelope*::

    {"body": str, "content-type": str, "content-encoding": str,
     "headers": {...}, "properties": {"delivery_tag": str, "body_encoding": "base64",
                                      "delivery_info": {...}, "priority": int, ...}}

Anything can be in a queue list or a row (a buggy producer in another
language, a half-written script, someone with broker access), and kombu
trusts the shape: a missing key or a wrong type raises deep inside its
consumer loop. :func:`check_envelope` parses an entry without trusting it
(size and nesting limits, every type kombu relies on, the body decodable
as its ``body_encoding`` says) and raises :exc:`BadEnvelope` with a reason a
person can act on. What fails goes to the dead letters (:mod:`.dead_letters`).

Never imports Flask.
"""

from __future__ import annotations

import binascii
from typing import Any

from kombu.utils.json import loads

__all__ = ["MAX_DEPTH", "MAX_MESSAGE_SIZE", "BadEnvelope", "check_envelope", "depth"]

#: Largest entry accepted by default, bytes (``TASKS_BROKER_MAX_MESSAGE_SIZE``).
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: Deepest nesting of lists and objects accepted in an envelope.
MAX_DEPTH = 100
#: Longest delivery tag accepted, characters.
MAX_TAG_LENGTH = 256

_STRING_PROPERTIES = ("delivery_tag", "body_encoding", "correlation_id", "reply_to")


class BadEnvelope(ValueError):
    """An entry that is not a well-formed kombu envelope; ``str()`` is the reason."""


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply lists and dicts nest in ``value`` (0 for a scalar), counted up to ``limit + 1``.

    Iterative: no recursion, whatever the input.
    """
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def check_envelope(raw: bytes | str, max_size: int = MAX_MESSAGE_SIZE,
                   require_tag: bool = True) -> dict[str, Any]:
    """Parse and check one raw broker entry.

    :param raw: the entry as the broker holds it.
    :param max_size: largest accepted entry, bytes.
    :param require_tag: the entry must carry its delivery tag (Redis); the
        embedded broker makes its own.
    :returns: the envelope, safe to hand to kombu (``properties`` and
        ``delivery_info`` are dicts, the delivery tag a string, ``body`` a
        string decodable as its ``body_encoding`` says, ``headers`` a dict).
    :raises BadEnvelope: with the reason, for anything else.
    """
    size = len(raw)
    if size > max_size:
        raise BadEnvelope(f"entry of {size} bytes is larger than the limit of {max_size} "
                          f"bytes (TASKS_BROKER_MAX_MESSAGE_SIZE)")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadEnvelope(f"entry is not UTF-8 text ({exc.reason} at byte {exc.start})") \
                from None
    else:
        text = raw
    try:
        envelope = loads(text)  # kombu's: its envelope may carry its typed values
    except RecursionError:
        raise BadEnvelope("entry nests too deeply to be parsed") from None
    except ValueError as exc:
        raise BadEnvelope(f"entry is not JSON ({exc})") from None
    if not isinstance(envelope, dict):
        raise BadEnvelope(f"entry is JSON {_json_type(envelope)}, not an object")
    if (text.count("[") + text.count("{") > MAX_DEPTH  # cheap: deep needs many brackets
            and depth(envelope) > MAX_DEPTH):
        raise BadEnvelope(f"entry nests more than {MAX_DEPTH} levels deep")
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        raise BadEnvelope(_wrong_type("properties", properties, "an object"))
    for key in _STRING_PROPERTIES:
        if properties.get(key) is not None and not isinstance(properties[key], str):
            raise BadEnvelope(_wrong_type(f"properties.{key}", properties[key], "a string"))
    tag = properties.get("delivery_tag")
    if require_tag and (not tag or len(tag) > MAX_TAG_LENGTH):
        raise BadEnvelope("properties.delivery_tag is missing or empty" if not tag
                          else f"properties.delivery_tag is longer than {MAX_TAG_LENGTH}")
    info = properties.get("delivery_info")
    if info is None:
        properties["delivery_info"] = info = {}
    if not isinstance(info, dict):
        raise BadEnvelope(_wrong_type("properties.delivery_info", info, "an object"))
    for key in ("exchange", "routing_key"):
        if info.get(key) is not None and not isinstance(info[key], str):
            raise BadEnvelope(_wrong_type(f"properties.delivery_info.{key}", info[key],
                                          "a string"))
    priority = properties.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise BadEnvelope(_wrong_type("properties.priority", priority, "an integer"))
    headers = envelope.get("headers")
    if headers is None:
        envelope["headers"] = {}
    elif not isinstance(headers, dict):
        raise BadEnvelope(_wrong_type("headers", headers, "an object"))
    for key in ("content-type", "content-encoding"):
        if envelope.get(key) is not None and not isinstance(envelope[key], str):
            raise BadEnvelope(_wrong_type(key, envelope[key], "a string"))
    body = envelope.get("body")
    if not isinstance(body, str):
        raise BadEnvelope(_wrong_type("body", body, "a string"))
    encoding = properties.get("body_encoding")
    if encoding == "base64":
        try:
            binascii.a2b_base64(body.encode("ascii"), strict_mode=True)
        except (UnicodeEncodeError, binascii.Error) as exc:
            raise BadEnvelope(f"body is not valid base64 ({exc})") from None
    elif encoding is not None:
        raise BadEnvelope(f"unknown properties.body_encoding {encoding[:40]!r} "
                          f"(kombu knows 'base64')")
    return envelope


def _wrong_type(name: str, value: Any, expected: str) -> str:
    shown = "missing" if value is None else f"JSON {_json_type(value)}"
    return f"{name} is {shown}, not {expected}"


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)
