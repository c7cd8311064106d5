"""Routing through RabbitMQ's delay ladder (pure functions: transport/delays.py)."""

from __future__ import annotations

import pytest
from kombu.transport.native_delayed_delivery import MAX_NUMBER_OF_BITS_TO_USE

from flask_tasks.transport.connect import broker_connection
from flask_tasks.transport.delays import (
    DELAY_EXCHANGE,
    MAX_DELAY,
    delayed_route,
    is_amqp,
    strip_delay,
)


def delay_of(routing_key: str) -> int:
    bits = routing_key.split(".")[:MAX_NUMBER_OF_BITS_TO_USE]
    return int("".join(bits), 2)


@pytest.mark.parametrize(("seconds", "expected"), [
    (0.2, 1), (1.0, 1), (1.01, 2), (5.0, 5), (3600.5, 3601), (-10, 1),
])
def test_never_early_at_most_a_second_late(seconds: float, expected: int) -> None:
    exchange, key = delayed_route(1000.0 + seconds, "celery", now=1000.0)
    assert exchange == DELAY_EXCHANGE == "celery_delayed_27"
    assert delay_of(key) == expected and key.endswith(".celery")


def test_a_delayed_key_is_delayed_again_from_its_original() -> None:
    _, once = delayed_route(1010.0, "celery", now=1000.0)
    _, twice = delayed_route(1003.0, once, now=1000.0)  # a message put back, then delayed
    assert strip_delay(once) == strip_delay(twice) == "celery" and delay_of(twice) == 3
    assert strip_delay("celery") == "celery"
    assert strip_delay("1.0.celery") == "1.0.celery"  # not 28 digits: not a delay prefix


def test_the_longest_delay() -> None:
    assert delay_of(delayed_route(float(MAX_DELAY), "q", now=0.0)[1]) == MAX_DELAY
    with pytest.raises(ValueError, match="longer than RabbitMQ's delayed delivery allows"):
        delayed_route(float(MAX_DELAY + 1), "q", now=0.0)


def test_is_amqp() -> None:
    assert is_amqp(broker_connection("amqp://guest@localhost//"))
    assert is_amqp(broker_connection("pyamqp://guest@localhost//"))
    assert not is_amqp(broker_connection("redis://localhost/0"))
    assert not is_amqp(broker_connection("memory://"))
