"""Send a batch of Redis commands in one round trip, without redis-py's ``Pipeline``.

redis-py's pipeline object costs about twice the CPU of the round trip
itself; on the hot paths (store a result, reserve messages, flush acks,
publish) we write the packed commands on a pooled connection and read the
replies, through redis-py's public ``Connection`` methods.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.exceptions import NoScriptError, ResponseError

_RETRY_ON = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)


def round_trip(client: redis.Redis, *commands: tuple[Any, ...]) -> list[Any]:
    """Run ``commands`` in one round trip and return their replies, in order.

    A connection that fails is dropped and the batch is sent once more on a
    fresh one (as redis-py does for a single command).

    :raises redis.ResponseError: one of the commands failed (the first error).
    :raises redis.ConnectionError: the server stayed unreachable.
    """
    pool = client.connection_pool
    for attempt in (1, 2):
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            error: ResponseError | None = None
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:  # the connection is still in step
                    error = error or exc
                    replies.append(exc)
            if error is not None:
                raise error
            return replies
        except _RETRY_ON:
            conn.disconnect()
            if attempt == 2:
                raise
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
    raise AssertionError("unreachable")


class Script:
    """A Lua script run with ``EVALSHA`` (loaded again after ``NOSCRIPT``)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha: str | None = None

    def __call__(self, client: redis.Redis, keys: list[Any], args: list[Any]) -> Any:
        """Run the script; returns its reply."""
        if self.sha is None:
            self.sha = client.script_load(self.source)
        try:
            return round_trip(client, ("EVALSHA", self.sha, len(keys), *keys, *args))[0]
        except NoScriptError:  # the server restarted or flushed its scripts
            self.sha = client.script_load(self.source)
            return round_trip(client, ("EVALSHA", self.sha, len(keys), *keys, *args))[0]
