-- Record the predictions of windows first, first+1, ... unless already recorded, advance the
-- session's next uncommitted window over every recorded one, and drop the samples no window
-- still needs. Returns the indices this call recorded (JSON) and the samples left per modality (JSON).
-- KEYS[1] meta hash, KEYS[2] buffer hash, KEYS[3] predictions zset (members '<window>:<json>').
-- ARGV: ttl_ms, keep, first, then one JSON prediction per window.
local meta, buffers, predictions = KEYS[1], KEYS[2], KEYS[3]
local ttl, keep, first = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', meta) == 0 then return {'[]', '{}'} end

local layout = cjson.decode(redis.call('HGET', meta, 'layout'))
local received, offsets = {}, {}
for i, name in ipairs(layout.modalities) do
  received[i] = tonumber(redis.call('HGET', meta, 'received:' .. name))
  offsets[i] = tonumber(redis.call('HGET', meta, 'offset:' .. name))
end
local ready = complete_windows(layout, received)

-- A window is recorded once: never below the next uncommitted one, never twice above it,
-- never before it is complete. Members are prefixed with their window so that equal
-- predictions of different windows stay distinct.
local next_window = tonumber(redis.call('HGET', meta, 'next_window'))
local recorded = {}
for j = 4, #ARGV do
  local window = first + j - 4
  if window >= next_window and window < ready and redis.call('ZCOUNT', predictions, window, window) == 0 then
    redis.call('ZADD', predictions, window, window .. ':' .. ARGV[j])
    recorded[#recorded + 1] = window
  end
end
while redis.call('ZCOUNT', predictions, next_window, next_window) > 0 do next_window = next_window + 1 end
redis.call('HSET', meta, 'next_window', tostring(next_window))

local buffered = {}
for i, name in ipairs(layout.modalities) do
  local keep_from = math.min(next_window * layout.hop[i], received[i])
  if keep_from > offsets[i] then
    local buffer = redis.call('HGET', buffers, name) or ''
    redis.call('HSET', buffers, name, string.sub(buffer, (keep_from - offsets[i]) * 4 * layout.channels[i] + 1))
    redis.call('HSET', meta, 'offset:' .. name, tostring(keep_from))
    offsets[i] = keep_from
  end
  buffered[name] = received[i] - offsets[i]
end

-- Keep the newest committed predictions, and any recorded ahead of a gap.
redis.call('ZREMRANGEBYSCORE', predictions, '-inf', '(' .. (next_window - keep))
redis.call('PEXPIRE', meta, ttl)
redis.call('PEXPIRE', buffers, ttl)
redis.call('PEXPIRE', predictions, ttl)
return {cjson.encode(recorded), cjson.encode(buffered)}
