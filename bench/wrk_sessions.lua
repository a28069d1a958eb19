-- Stream one-second chunks to many sessions: request i goes to session i % sessions with seq floor(i / sessions).
-- Arguments: the chunk body file (with the literal SEQ where the sequence number goes), the session count, a run id.
local counter = 0
init = function(args)
  local file = assert(io.open(args[1], "r"))
  template = file:read("*a")
  file:close()
  sessions = tonumber(args[2])
  run = args[3]
end
request = function()
  local session = counter % sessions
  local seq = math.floor(counter / sessions)
  counter = counter + 1
  local body = template:gsub("SEQ", tostring(seq))
  return wrk.format("POST", "/v1/sessions/" .. run .. "-" .. session .. "/samples",
    {["Content-Type"] = "application/json"}, body)
end
