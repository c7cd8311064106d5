"""Routing a message through RabbitMQ's delay ladder: pure functions, no I/O.

See :mod:`.amqp` for the ladder. Kept apart so the worker's consumer can
read a delayed message's routing key without importing py-amqp.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

from kombu.transport.native_delayed_delivery import (
    MAX_NUMBER_OF_BITS_TO_USE,
    calculate_routing_key,
    level_name,
)

__all__ = ["AMQP_SCHEMES", "DELAY_EXCHANGE", "MAX_DELAY", "delayed_route", "is_amqp",
           "is_amqp_url", "strip_delay"]

#: Where a delayed message is published: the top of the ladder.
DELAY_EXCHANGE = level_name(MAX_NUMBER_OF_BITS_TO_USE - 1)
#: Longest delay, seconds.
MAX_DELAY = 2 ** MAX_NUMBER_OF_BITS_TO_USE - 1

_PREFIX = re.compile(rf"^(?:[01]\.){{{MAX_NUMBER_OF_BITS_TO_USE}}}")


def delayed_route(eta: float, routing_key: str, now: float | None = None) -> tuple[str, str]:
    """``(exchange, routing key)`` that deliver a message to ``routing_key`` at ``eta``.

    :param eta: when it is due, seconds since the epoch.
    :raises ValueError: the delay is longer than :data:`MAX_DELAY` seconds.
    """
    delay = math.ceil(eta - (time.time() if now is None else now))
    if delay > MAX_DELAY:
        raise ValueError(f"A delay of {delay} s is longer than RabbitMQ's delayed delivery "
                         f"allows ({MAX_DELAY} s, about 8.5 years).")
    return DELAY_EXCHANGE, calculate_routing_key(max(delay, 1), strip_delay(routing_key))


def strip_delay(routing_key: str) -> str:
    """A routing key without the ladder's 28 binary digits (as the message was sent)."""
    return _PREFIX.sub("", routing_key, count=1)


#: Broker URL schemes of RabbitMQ (kombu's py-amqp transport).
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def is_amqp_url(url: str | None) -> bool:
    """Whether a broker URL names RabbitMQ (``amqp://``, ``amqps://``, ``pyamqp://``)."""
    return (url or "").partition("://")[0].lower() in AMQP_SCHEMES


def is_amqp(connection: Any) -> bool:
    """Whether a kombu connection speaks AMQP (RabbitMQ): its messages wait on the ladder."""
    transport = getattr(connection, "transport", None)
    return getattr(transport, "driver_type", None) == "amqp"
