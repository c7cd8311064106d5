"""URLs shown in logs and banners: passwords hidden, nothing hidden that is not there."""

from __future__ import annotations

import logging

import pytest
from kombu.mixins import ConsumerMixin

from flask_tasks.transport.connect import broker_connection, mask_url

CASES = [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:secret@h:6379/0", "redis://:**@h:6379/0"),
    ("redis://user:secret@h:6379/1", "redis://user:**@h:6379/1"),
    ("redis://user@h:6379/1", "redis://user@h:6379/1"),
    ("amqp://guest:secret@localhost:5672//", "amqp://guest:**@localhost:5672//"),
]


@pytest.mark.parametrize(("url", "shown"), CASES)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize(("url", "shown"), CASES)
def test_connection_as_uri_masks_only_a_real_password(url: str, shown: str) -> None:
    connection = broker_connection(url)
    assert connection.as_uri() == shown
    assert connection.clone().as_uri() == shown
    assert "secret" in connection.as_uri(include_password=True) or "secret" not in url


def test_connected_to_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """kombu's ConsumerMixin logs "Connected to <as_uri()>": no ``:**@`` without a password."""

    class Consumer(ConsumerMixin):
        def __init__(self) -> None:
            self.connection = broker_connection("memory://localhost/")

        def get_consumers(self, consumer_cls, channel):  # type: ignore[no-untyped-def]
            return []

    with caplog.at_level(logging.INFO, logger="kombu.mixins"):
        with Consumer().Consumer():
            pass
    assert "Connected to memory://localhost//" in caplog.text
    assert "**" not in caplog.text


def test_redis_connections_wait_no_longer_than_the_connect_timeout() -> None:
    # kombu's Redis channel reads its socket timeouts from the transport options only.
    options = broker_connection("redis://h:1/0", None, 2.5).transport_options
    assert options["socket_connect_timeout"] == 2.5
    given = {"socket_connect_timeout": 9}
    assert broker_connection("redis://h:1/0", given, 2.5).transport_options == given
    assert "socket_connect_timeout" not in broker_connection("memory://", None, 2.5)\
        .transport_options
