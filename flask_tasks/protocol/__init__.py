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

Modules: :mod:`.message` (build, :class:`Context`, parse), :mod:`.checks`
(headers, content type and encoding), :mod:`.dates` (datetimes on the wire),
:mod:`.codec` (the exception codec). Import from this package.
"""

from __future__ import annotations

from .checks import (
    BadMessage,
    RefusedContent,
    TaskHeaders,
    check_content,
    check_headers,
    describe,
    message_ids,
    read_headers,
)
from .codec import exception_from_dict, exception_to_dict
from .dates import parse_datetime, to_datetime
from .message import Context, Message, accept_set, build, envelope_eta, parse

__all__ = [
    "BadMessage",
    "Context",
    "Message",
    "RefusedContent",
    "TaskHeaders",
    "accept_set",
    "build",
    "check_content",
    "check_headers",
    "describe",
    "envelope_eta",
    "exception_from_dict",
    "exception_to_dict",
    "message_ids",
    "parse",
    "parse_datetime",
    "read_headers",
    "to_datetime",
]
