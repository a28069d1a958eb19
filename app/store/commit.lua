-- Commit classified windows, if no other process committed them first: a compare-and-set on the
-- session's next uncommitted window. On success record the predictions, store the tracker state,
-- append the events to the session's log (transitions also to the shared outbox, once webhook
-- delivery has opened it) and the closed
-- segments to its history, then drop the samples no window still needs.
-- KEYS: meta hash, buffer hash, predictions zset (members '<window>:<json>'), events stream,
--   history list, the shard's outbox stream.
-- ARGV: ttl_ms, keep_predictions, first, tracker_json, keep_events, keep_segments, keep_outbox,
--   session_id, generation, the session's news channel, the outbox's news channel, then a count and that many
--   predictions, a count and that many segments, then event type/data pairs.
-- Returns {'gone'}, {'stale', next_window, tracker_json} or {'ok', buffered_json, event_ids...}.
-- New events are news for the session's event readers, transitions queued for the outbox's.
local meta, buffers, predictions, events, history, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ttl, keep, first = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
-- Gone too: a session ended and started again under the same id since these windows were handed out.
if redis.call('HGET', meta, 'generation') ~= ARGV[9] then return {'gone'} end

local next_window = tonumber(redis.call('HGET', meta, 'next_window'))
if next_window ~= first then
  return {'stale', tostring(next_window), redis.call('HGET', meta, 'tracker') or ''}
end

local layout = cjson.decode(redis.call('HGET', meta, 'layout'))
local received, offsets = {}, {}
for i, name in ipairs(layout.modalities) do
  received[i] = tonumber(redis.call('HGET', meta, 'received:' .. name))
  offsets[i] = tonumber(redis.call('HGET', meta, 'offset:' .. name))
end
local count = tonumber(ARGV[12])
if first + count > complete_windows(layout, received) then
  return redis.error_reply('a commit may only record complete windows')
end

-- Members are prefixed with their window so that equal predictions of different windows stay distinct.
for j = 1, count do
  local window = first + j - 1
  redis.call('ZADD', predictions, window, window .. ':' .. ARGV[12 + j])
end
next_window = first + count
redis.call('HSET', meta, 'next_window', tostring(next_window), 'tracker', ARGV[4])
redis.call('ZREMRANGEBYSCORE', predictions, '-inf', '(' .. (next_window - keep))

local segments_at = 13 + count
for j = 1, tonumber(ARGV[segments_at]) do redis.call('RPUSH', history, ARGV[segments_at + j]) end
redis.call('LTRIM', history, -tonumber(ARGV[6]), -1)

local reply, queue, queued = {'ok', ''}, redis.call('EXISTS', outbox) == 1, false
for j = segments_at + tonumber(ARGV[segments_at]) + 1, #ARGV, 2 do
  local kind, data = ARGV[j], ARGV[j + 1]
  local id = redis.call('XADD', events, 'MAXLEN', ARGV[5], '*', 'type', kind, 'data', data)
  if kind == 'transition' and queue then
    redis.call('XADD', outbox, 'MAXLEN', ARGV[7], '*', 'session', ARGV[8], 'event', id, 'data', data)
    queued = true
  end
  reply[#reply + 1] = id
end
if #reply > 2 then redis.call('SPUBLISH', ARGV[10], 'events') end
if queued then redis.call('SPUBLISH', ARGV[11], 'transitions') end

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
reply[2] = cjson.encode(buffered)
for _, key in ipairs({meta, buffers, predictions, events, history}) do redis.call('PEXPIRE', key, ttl) end
return reply
