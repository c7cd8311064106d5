"""The Lua scripts of the Redis transport: reserve a batch, move due delayed messages.

Each runs atomically in Redis, in one round trip (:class:`flask_tasks._redis.Script`).
"""

from __future__ import annotations

from ..._redis import Script

#: KEYS: the queue's list keys in priority order, then the unacked hash and
#: index. ARGV: how many more to pop, the time, the BRPOP-ed message ('' if none), then
#: tags acknowledged since the last round trip.
#: Returns [key, message, key, message, ...] for the extra messages.
RESERVE = """
local unacked, index = KEYS[#KEYS - 1], KEYS[#KEYS]
local now = tonumber(ARGV[2])
if #ARGV > 3 then
  local tags = {unpack(ARGV, 4)}
  redis.call('ZREM', index, unpack(tags))
  redis.call('HDEL', unacked, unpack(tags))
end
local function record(item)
  if item == '' then return end
  local ok, msg = pcall(cjson.decode, item)
  if not ok or type(msg) ~= 'table' or type(msg.properties) ~= 'table' then return end
  local tag = msg.properties.delivery_tag
  local info = msg.properties.delivery_info or {}
  if not tag then return end
  redis.call('ZADD', index, now, tag)
  redis.call('HSET', unacked, tag, '[' .. item .. ',' .. cjson.encode(info.exchange or '')
             .. ',' .. cjson.encode(info.routing_key or '') .. ']')
end
if ARGV[3] then record(ARGV[3]) end
local out, left = {}, tonumber(ARGV[1])
for i = 1, #KEYS - 2 do
  while left > 0 do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    record(item)
    out[#out + 1] = KEYS[i]
    out[#out + 1] = item
    left = left - 1
  end
end
return out
"""

reserve = Script(RESERVE)

#: KEYS: pairs of (sorted set, list). ARGV: the time, the most to move per set.
#: Moves due members from each set to the head of its list (they run first,
#: as their time has come); returns how many were moved.
MOVE_DUE = """
local now, limit, moved = ARGV[1], tonumber(ARGV[2]), 0
for i = 1, #KEYS, 2 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now, 'LIMIT', 0, limit)
  for _, member in ipairs(due) do
    redis.call('ZREM', KEYS[i], member)
    redis.call('RPUSH', KEYS[i + 1], member)
    moved = moved + 1
  end
end
return moved
"""

move_due = Script(MOVE_DUE)
