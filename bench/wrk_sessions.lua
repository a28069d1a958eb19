-- Stream one-second chunks to many sessions: request i goes to session i % sessions with seq floor(i / sessions).
-- Arguments: the first chunk's body file (a whole window of samples, so that it completes one), the next
-- chunks' body file (one hop of samples, completing one window each), both with the literal SEQ where the
-- sequence number goes; the session count; a run id.
local counter = 0
local function read(path)
  local file = assert(io.open(path, "r"))
  local text = file:read("*a")
  file:close()
  return text
end
init = function(args)
  first = read(args[1])
  template = read(args[2])
  sessions = tonumber(args[3])
  run = args[4]
end
request = function()
  local session = counter % sessions
  local seq = math.floor(counter / sessions)
  counter = counter + 1
  local body = (seq == 0 and first or template):gsub("SEQ", tostring(seq))
  return wrk.format("POST", "/v1/sessions/" .. run .. "-" .. session .. "/samples",
    {["Content-Type"] = "application/json"}, body)
end
