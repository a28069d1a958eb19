-- Append one chunk to a session and return every complete window not yet committed, atomically.
-- KEYS[1] meta hash, KEYS[2] buffer hash (one binary float32 field per modality), KEYS[3] predictions zset,
-- KEYS[4] events stream, KEYS[5] history list (their expiry is refreshed with the session's), KEYS[6] the index of
-- the shard's active sessions (score: last activity).
-- ARGV: seq, ttl_ms, now, model, layout_json, origin, generation (model, layout, time origin and generation apply
-- when seq 0 starts the session), the session's news channel, the session's id, then modality/bytes pairs.
-- Nothing is written unless the whole chunk is accepted. Starting the session is news for its event readers.
local meta, buffers, predictions = KEYS[1], KEYS[2], KEYS[3]
local seq, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])

local last = redis.call('HGET', meta, 'seq')
local fresh = not last
local model, layout_json, started, generation, next_window
if fresh then
  if seq ~= 0 then return {'conflict', '0'} end
  last, model, layout_json, started, generation, next_window = -1, ARGV[4], ARGV[5], ARGV[6], ARGV[7], 0
else
  last = tonumber(last)
  model, layout_json, started, generation = redis.call('HGET', meta, 'model'), redis.call('HGET', meta, 'layout'),
    redis.call('HGET', meta, 'started'), redis.call('HGET', meta, 'generation')
  next_window = tonumber(redis.call('HGET', meta, 'next_window'))
end
local layout = cjson.decode(layout_json)
local received, offsets = {}, {}
for i, name in ipairs(layout.modalities) do
  received[i] = tonumber(redis.call('HGET', meta, 'received:' .. name) or '0')
  offsets[i] = tonumber(redis.call('HGET', meta, 'offset:' .. name) or '0')
end

local status = 'ok'
if seq == last then
  status = 'duplicate'
elseif seq ~= last + 1 then
  return {'conflict', tostring(last + 1)}
else
  local index, incoming = {}, {}
  for i, name in ipairs(layout.modalities) do index[name] = i end
  for j = 10, #ARGV, 2 do
    local i = index[ARGV[j]]
    if not i then return {'modalities', model, layout_json} end
    incoming[i] = ARGV[j + 1]
  end
  for i, name in ipairs(layout.modalities) do
    local added = #(incoming[i] or '') / (4 * layout.channels[i])
    if received[i] + added - offsets[i] > layout.max_buffer[i] then return {'overflow', name} end
  end
  if fresh then
    redis.call('HSET', meta, 'model', model, 'layout', layout_json, 'started', started, 'generation', generation,
      'next_window', '0')
    redis.call('DEL', KEYS[4], KEYS[5])  -- what an ended session of the same id left behind
    redis.call('SPUBLISH', ARGV[8], 'started')
  end
  for i, samples in pairs(incoming) do
    local name = layout.modalities[i]
    redis.call('HSET', buffers, name, (redis.call('HGET', buffers, name) or '') .. samples)
    received[i] = received[i] + #samples / (4 * layout.channels[i])
  end
  for i, name in ipairs(layout.modalities) do
    redis.call('HSET', meta, 'received:' .. name, tostring(received[i]), 'offset:' .. name, tostring(offsets[i]))
  end
  redis.call('HSET', meta, 'seq', tostring(seq), 'updated', ARGV[3])
end

-- Windows complete in every modality and not committed yet: a retry gets them again.
local ready = complete_windows(layout, received)
local count = math.max(0, ready - next_window)
local spans = {}
for i, name in ipairs(layout.modalities) do
  spans[i] = ''
  if count > 0 then
    local size = 4 * layout.channels[i]
    local start = next_window * layout.hop[i] - offsets[i]
    local stop = (next_window + count - 1) * layout.hop[i] + layout.window[i] - offsets[i]
    spans[i] = string.sub(redis.call('HGET', buffers, name) or '', start * size + 1, stop * size)
  end
end
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ttl) end
redis.call('ZADD', KEYS[6], ARGV[3], ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', tonumber(ARGV[3]) - ttl / 1000)
local reply = {status, tostring(seq), model, layout_json, started, cjson.encode(received),
  cjson.encode(offsets), tostring(next_window), tostring(count), redis.call('HGET', meta, 'tracker') or '', generation}
for i = 1, #layout.modalities do reply[#reply + 1] = spans[i] end
return reply
