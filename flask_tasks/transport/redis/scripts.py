"""The Lua scripts of the Redis transport: reserve a batch, move due delayed messages, dead letters.

Each runs atomically in Redis, in one round trip (:class:`flask_tasks._redis.Script`).
"""

from __future__ import annotations

from ..._redis import Script

#: KEYS: the queue's list keys in priority order, then the unacked hash and
#: index, then the queue's dead-letter list. ARGV: how many more to pop, the
#: time, the BRPOP-ed message ('' if none), the queue's name, the worker's node
#: name, the most dead letters kept (-1: no limit), the largest entry (bytes),
#: then tags acknowledged since the last round trip.
#: An entry that cannot be recorded (too large, not JSON, no ``properties``
#: object, no string delivery tag) is moved to the dead-letter list in the
#: same atomic step, as ``<JSON meta>\n<entry>`` (see ``transport/dead_letters``).
#: Returns {{key, message, tag, key, message, tag, ...}, {id, reason, id, reason, ...}}:
#: the recorded messages with their delivery tags, then the entries set aside.
RESERVE = """
local dead_key = KEYS[#KEYS]
local unacked, index = KEYS[#KEYS - 2], KEYS[#KEYS - 1]
local now, queue, node = tonumber(ARGV[2]), ARGV[4], ARGV[5]
local max_dead, max_size = tonumber(ARGV[6]), tonumber(ARGV[7])
if #ARGV > 7 then
  local tags = {unpack(ARGV, 8)}
  redis.call('ZREM', index, unpack(tags))
  redis.call('HDEL', unacked, unpack(tags))
end
local dead, seq = {}, 0
local function set_aside(item, reason)
  seq = seq + 1
  local id = string.sub(redis.sha1hex(ARGV[2] .. ':' .. seq .. ':' .. item), 1, 32)
  local meta = cjson.encode({id = id, queue = queue, reason = reason, time = now,
                             hostname = node})
  redis.call('LPUSH', dead_key, meta .. '\\n' .. item)
  if max_dead >= 0 then redis.call('LTRIM', dead_key, 0, max_dead - 1) end
  dead[#dead + 1] = id
  dead[#dead + 1] = reason
end
-- the tag: recorded (the worker gets it); false: set aside.
local function record(item)
  if #item > max_size then
    set_aside(item, 'entry of ' .. #item .. ' bytes is larger than the limit of '
              .. max_size .. ' bytes (TASKS_BROKER_MAX_MESSAGE_SIZE)')
    return false
  end
  local ok, msg = pcall(cjson.decode, item)
  if not ok then set_aside(item, 'entry is not JSON'); return false end
  if type(msg) ~= 'table' or type(msg.properties) ~= 'table' then
    set_aside(item, 'properties is missing or not an object'); return false
  end
  local tag = msg.properties.delivery_tag
  if type(tag) ~= 'string' or tag == '' or #tag > 256 then
    set_aside(item, 'properties.delivery_tag is missing, empty, not a string or longer '
              .. 'than 256'); return false
  end
  local info = msg.properties.delivery_info
  if type(info) ~= 'table' then info = {} end
  local exchange, routing_key = info.exchange, info.routing_key
  if type(exchange) ~= 'string' then exchange = '' end
  if type(routing_key) ~= 'string' then routing_key = '' end
  redis.call('ZADD', index, now, tag)
  redis.call('HSET', unacked, tag, '[' .. item .. ',' .. cjson.encode(exchange)
             .. ',' .. cjson.encode(routing_key) .. ']')
  return tag
end
local out, left = {}, tonumber(ARGV[1])
local function take(key, item)
  local tag = record(item)
  if tag then
    out[#out + 1] = key
    out[#out + 1] = item
    out[#out + 1] = tag
  end
end
if ARGV[3] ~= '' then take('', ARGV[3]) end
for i = 1, #KEYS - 3 do
  while left > 0 do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    take(KEYS[i], item)
    left = left - 1
  end
end
return {out, dead}
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

#: KEYS: dead-letter lists. ARGV: the most kept per list (-1: no limit), the
#: oldest time kept (seconds since the epoch; -1: no limit). Returns how many
#: were dropped.
TRIM_DEAD = """
local max_dead, oldest, removed = tonumber(ARGV[1]), tonumber(ARGV[2]), 0
for _, key in ipairs(KEYS) do
  if max_dead >= 0 then
    local extra = redis.call('LLEN', key) - max_dead
    if extra > 0 then
      redis.call('LTRIM', key, 0, max_dead - 1)
      removed = removed + extra
    end
  end
  while oldest >= 0 do
    local last = redis.call('LINDEX', key, -1)
    if not last then break end
    local nl = string.find(last, '\\n', 1, true)
    local ok, meta = pcall(cjson.decode, string.sub(last, 1, (nl or 1) - 1))
    local when = ok and type(meta) == 'table' and tonumber(meta.time)
    if not when or when >= oldest then break end
    redis.call('RPOP', key)
    removed = removed + 1
  end
end
return removed
"""

trim_dead = Script(TRIM_DEAD)

#: KEYS: a dead-letter list, the queue list. ARGV: the record, the entry.
#: Removes the record and, if it was there, publishes the entry again.
REQUEUE_DEAD = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

requeue_dead = Script(REQUEUE_DEAD)
