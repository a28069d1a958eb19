-- Append one chunk to a session and claim every window it completes, atomically.
-- KEYS[1] meta hash, KEYS[2] buffer hash (one binary field per modality), KEYS[3] predictions zset.
-- ARGV: seq, ttl_ms, now, model, layout_json, then modality/bytes pairs of the chunk.
local meta, buffers, predictions = KEYS[1], KEYS[2], KEYS[3]
local seq, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])

local function state(layout)
  local received, offsets = {}, {}
  for i, name in ipairs(layout.modalities) do
    received[i] = tonumber(redis.call('HGET', meta, 'received:' .. name))
    offsets[i] = tonumber(redis.call('HGET', meta, 'offset:' .. name))
  end
  return received, offsets
end

local function touch()
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', buffers, ttl)
  redis.call('PEXPIRE', predictions, ttl)
end

local last = redis.call('HGET', meta, 'seq')
if not last then
  if seq ~= 0 then return {'conflict', '0'} end
  redis.call('HSET', meta, 'seq', '-1', 'model', ARGV[4], 'layout', ARGV[5], 'started', ARGV[3], 'next_window', '0')
  for _, name in ipairs(cjson.decode(ARGV[5]).modalities) do
    redis.call('HSET', meta, 'received:' .. name, '0', 'offset:' .. name, '0')
  end
  last = -1
else
  last = tonumber(last)
end
local layout = cjson.decode(redis.call('HGET', meta, 'layout'))
local received, offsets = state(layout)
local header = {redis.call('HGET', meta, 'model'), redis.call('HGET', meta, 'layout'), redis.call('HGET', meta, 'started')}

if seq == last then
  touch()
  return {'duplicate', tostring(last), header[1], header[2], header[3], cjson.encode(received), cjson.encode(offsets)}
end
if seq ~= last + 1 then return {'conflict', tostring(last + 1)} end

-- Check the whole chunk before writing anything.
local index = {}
for i, name in ipairs(layout.modalities) do index[name] = i end
local incoming = {}
for j = 6, #ARGV, 2 do
  local i = index[ARGV[j]]
  if not i then return {'modalities', header[1], header[2]} end
  incoming[i] = ARGV[j + 1]
end
for i, name in ipairs(layout.modalities) do
  local added = #(incoming[i] or '') / (4 * layout.channels[i])
  if received[i] + added - offsets[i] > layout.max_buffer[i] then return {'overflow', name} end
end

for i, samples in pairs(incoming) do
  local modality = layout.modalities[i]
  redis.call('HSET', buffers, modality, (redis.call('HGET', buffers, modality) or '') .. samples)
  received[i] = received[i] + #samples / (4 * layout.channels[i])
end

-- Windows complete in every modality, not yet claimed by any process.
local first = tonumber(redis.call('HGET', meta, 'next_window'))
local ready = math.huge
for i = 1, #layout.modalities do
  local complete = 0
  if received[i] >= layout.window[i] then
    complete = math.floor((received[i] - layout.window[i]) / layout.hop[i]) + 1
  end
  ready = math.min(ready, complete)
end
local count = math.max(0, ready - first)

local spans = {}
for i, modality in ipairs(layout.modalities) do
  local size = 4 * layout.channels[i]
  local buffer = redis.call('HGET', buffers, modality) or ''
  if count > 0 then
    local start = first * layout.hop[i] - offsets[i]
    local stop = (first + count - 1) * layout.hop[i] + layout.window[i] - offsets[i]
    spans[i] = string.sub(buffer, start * size + 1, stop * size)
  else
    spans[i] = ''
  end
  -- Samples before the next window's start are needed by no future window.
  local keep_from = math.min((first + count) * layout.hop[i], received[i])
  redis.call('HSET', buffers, modality, string.sub(buffer, (keep_from - offsets[i]) * size + 1))
  offsets[i] = keep_from
  redis.call('HSET', meta, 'received:' .. modality, tostring(received[i]), 'offset:' .. modality, tostring(keep_from))
end
redis.call('HSET', meta, 'seq', tostring(seq), 'next_window', tostring(first + count), 'updated', ARGV[3])
touch()
local reply = {'ok', tostring(seq), header[1], header[2], header[3], cjson.encode(received), cjson.encode(offsets),
  tostring(first), tostring(count)}
for i = 1, #layout.modalities do reply[#reply + 1] = spans[i] end
return reply
