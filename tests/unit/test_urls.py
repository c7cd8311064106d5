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


# -- a broker that refuses the URL's credentials or virtual host ----------------------------

def test_login_refused_says_what_to_fix_without_the_password() -> None:
    from amqp.exceptions import AccessRefused, ConnectionForced, NotAllowed
    from redis.exceptions import AuthenticationError

    from flask_tasks.transport.connect import login_refused

    url = "amqp://app:hunter2@rabbit:5672/shop"
    login = login_refused(AccessRefused(
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For "
        "details see the broker logfile.", None, 403), url)
    assert login is not None and "refused the login of user 'app'" in login
    vhost = login_refused(NotAllowed("NOT_ALLOWED - vhost shop not found", (10, 40), 530), url)
    assert vhost is not None and "no virtual host 'shop'" in vhost
    denied = login_refused(AccessRefused(
        "ACCESS_REFUSED - access to vhost 'shop' refused for user 'app'", (10, 40), 403), url)
    assert denied is not None and "set_permissions -p shop app" in denied
    redis_auth = login_refused(AuthenticationError("invalid username-password pair"),
                               "redis://:hunter2@cache:6379/0")
    assert redis_auth is not None and "refused the login" in redis_auth
    for text in (login, vhost, denied, redis_auth):
        assert "hunter2" not in text and "**@" in text
    # Errors worth retrying are not refusals.
    assert login_refused(ConnectionForced("CONNECTION_FORCED - shutdown", None, 320), url) is None
    assert login_refused(ConnectionRefusedError(111, "Connection refused"), url) is None
