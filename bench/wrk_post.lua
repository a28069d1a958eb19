-- POST the file named by the first script argument to the target URL.
init = function(args)
  local file = assert(io.open(args[1], "r"))
  wrk.body = file:read("*a")
  file:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
