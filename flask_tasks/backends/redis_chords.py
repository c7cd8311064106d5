"""Chords on Redis, in Celery 5.7's keys and with its once-only rules.

For the header group ``<gid>`` (``P`` = ``celery-taskset-meta-<gid>``)::

    P      the saved group (``{"result": GroupResult.as_tuple()}``), JSON
    P.s    the header's size (set before its last task is sent)
    P.t    members added at run time (``INCRBY``)
    P.j    the counted parts: a sorted set, score = group index (``+inf``
           without one), member = the JSON ``[1, task_id, state, result]``
    P.d    the set of ``"<task_id>:<score>"`` already counted
    P.c    the dispatch claim: a token with an expiry; ``done`` once finished

Celery 5.7's scripts (``CHORD_PART_RETURN_LUA``, ``CHORD_CLAIM_EXTEND_LUA``,
``CHORD_CLEANUP_LUA`` in ``celery/backends/redis.py``) and ours below update
these keys with the same rules, each in one atomic script, so a chord whose
parts are reported by both Celery and flask_tasks workers is claimed once:

- a part counts only if its ``"<task_id>:<score>"`` was not in ``P.d``;
- nothing is recorded once ``P.c`` is ``done``;
- the part that makes ``ZCARD(P.j) == P.s + P.t`` takes ``P.c`` with
  ``SET NX`` in the same script (any later report does too, once a claim
  has expired: how a redelivered part recovers a claim whose holder died);
- the keys' expiry is renewed on every part (none with ``expires=None``);
- a claim is extended while its token is in ``P.c``, or taken again when
  ``P.c`` is gone and ``P.s`` remains; cleanup deletes ``.j .t .s .d`` and
  sets ``P.c`` to ``done`` only while it still holds the caller's token.

Two differences that Celery cannot observe: our part script also accepts a
claim already holding the caller's own token (a call retried after a lost
reply keeps its claim) and returns the counted parts with the claim, read in
the same atomic step; expiries of claims are in milliseconds (``PX``).
Celery's unordered mode (``result_chord_ordered=False``, a list at ``P.j``)
is not supported: Celery's default, the sorted set, is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from .._redis import Script, round_trip
from .chords import ChordClaim, ChordPart, encode_part_result, index_of

GROUP_PREFIX = "celery-taskset-meta-"

# KEYS: P.j P.t P.s P.d P P.c
# ARGV: task id, entry, score, expires s, group expires s, claim ms, token
# Returns {-1} when done, {count, 0} when not claimed, {count, 1, parts} when claimed.
_PART_RETURN = Script("""
local claim = redis.call('GET', KEYS[6])
if claim == 'done' then
    return {-1, 0}
end
if redis.call('SADD', KEYS[4], ARGV[1] .. ':' .. ARGV[3]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
end
local count = redis.call('ZCARD', KEYS[1])
local expires = tonumber(ARGV[4])
if expires > 0 then
    for i = 1, 4 do
        redis.call('EXPIRE', KEYS[i], expires)
    end
    if tonumber(ARGV[5]) > 0 then
        redis.call('EXPIRE', KEYS[5], ARGV[5])
    end
end
local size = redis.call('GET', KEYS[3])
if not size or count ~= tonumber(size) + tonumber(redis.call('GET', KEYS[2]) or 0) then
    return {count, 0}
end
if claim ~= ARGV[7] and not redis.call('SET', KEYS[6], ARGV[7], 'NX', 'PX', ARGV[6]) then
    return {count, 0}
end
return {count, 1, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
""")

# KEYS: P.c P.s; ARGV: token, claim ms. Returns 1 when the claim is (again) ours.
_CLAIM_EXTEND = Script("""
local claim = redis.call('GET', KEYS[1])
if claim == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if not claim and redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
""")

# KEYS: P.c P.j P.t P.s P.d; ARGV: token, done ms. Returns 1 when cleaned up.
_DONE = Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
return 1
""")


def _keys(group_id: str, *suffixes: str) -> list[str]:
    return [GROUP_PREFIX + group_id + suffix for suffix in suffixes]


def _ms(value: float) -> int:
    return max(1, int(value * 1000))


def set_size(client: redis.Redis, group_id: str, size: int, expires: int) -> None:
    """Celery's ``set_chord_size``: drop ``P.c`` (a new run), then ``SET P.s``."""
    claim, skey = _keys(group_id, ".c", ".s")
    store = ("SET", skey, size, "EX", expires) if expires else ("SET", skey, size)
    round_trip(client, ("DEL", claim), store)


def part_return(client: redis.Redis, encode: Callable[[Any], bytes],
                decode: Callable[[bytes], Any], group_id: str, task_id: str,
                group_index: int | None, state: str, result: Any, token: str,
                claim_expires: float, expires: int) -> ChordClaim | None:
    """Run the part script; decode the parts when it claimed."""
    score = "+inf" if group_index is None else str(int(group_index))
    entry = encode([1, task_id, state, encode_part_result(state, result)])
    keys = _keys(group_id, ".j", ".t", ".s", ".d", "", ".c")
    reply = _PART_RETURN(client, keys, [task_id, entry, score, expires, expires,
                                        _ms(claim_expires), token])
    if reply[0] == -1 or not reply[1]:
        return None
    flat = reply[2]
    parts = []
    for member, member_score in zip(flat[::2], flat[1::2], strict=True):
        _, tid, part_state, value = decode(member)
        parts.append(ChordPart(str(tid), index_of(float(member_score)), str(part_state), value))
    return ChordClaim(group_id, token, tuple(parts), claim_expires)


def claim_extend(client: redis.Redis, claim: ChordClaim, expires: float) -> bool:
    """Run the extend script."""
    keys = _keys(claim.group_id, ".c", ".s")
    return bool(_CLAIM_EXTEND(client, keys, [claim.token, _ms(expires)]))


def done(client: redis.Redis, claim: ChordClaim, done_expires: float) -> bool:
    """Run the cleanup script."""
    keys = _keys(claim.group_id, ".c", ".j", ".t", ".s", ".d")
    return bool(_DONE(client, keys, [claim.token, _ms(done_expires)]))
