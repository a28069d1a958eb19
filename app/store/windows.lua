-- Shared by the session scripts: how many windows every modality covers completely.
local function complete_windows(layout, received)
  local ready = math.huge
  for i = 1, #layout.modalities do
    local complete = 0
    if received[i] >= layout.window[i] then
      complete = math.floor((received[i] - layout.window[i]) / layout.hop[i]) + 1
    end
    ready = math.min(ready, complete)
  end
  return ready
end

