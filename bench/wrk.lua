-- One wrk script for every CAVI benchmark scenario, chosen by env vars:
--   MODE    get | put | search | etcd_put | constant
--   PREFIX  first character of the keys (picks the owning shard)
--   KEYS    number of distinct keys (16 bytes each: PREFIX + 15 digits)
--   VALUE_BYTES  size of a PUT's value (default 100)
--   STOP    1: stop after KEYS answers and touch DONE_FILE (loading),
--           0: run for the duration
-- done() prints one machine-readable line: RESULT <req/s> <p50 us> <p99 us> <errors>
local mode = os.getenv("MODE") or "get"
local prefix = os.getenv("PREFIX") or "a"
local keys = tonumber(os.getenv("KEYS") or "10000")
local stop = os.getenv("STOP") == "1"
local done_file = os.getenv("DONE_FILE")
local value = string.rep("v", tonumber(os.getenv("VALUE_BYTES") or "100"))
local put_body = '{"value":"' .. value .. '"}'
local counter = 0

local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function base64(data)
  return ((data:gsub(".", function(x)
    local r, byte = "", x:byte()
    for i = 8, 1, -1 do r = r .. (byte % 2 ^ i - byte % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return b64chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#data % 3 + 1])
end
local etcd_value = base64(value)

local function next_key()
  local k = string.format("%s%015d", prefix, counter % keys)
  counter = counter + 1
  return k
end

request = function()
  if mode == "get" then
    return wrk.format("GET", "/kv/" .. next_key())
  elseif mode == "put" then
    return wrk.format("PUT", "/kv/" .. next_key(), { ["content-type"] = "application/json" }, put_body)
  elseif mode == "search" then
    return wrk.format("GET", "/search?prefix=&limit=10")
  elseif mode == "etcd_put" then
    local body = '{"key":"' .. base64(next_key()) .. '","value":"' .. etcd_value .. '"}'
    return wrk.format("POST", "/v3/kv/put", { ["content-type"] = "application/json" }, body)
  else
    return wrk.format("GET", "/")
  end
end

local answered = 0
response = function(status, headers, body)
  answered = answered + 1
  if stop and answered == keys then
    -- wrk sleeps out its whole duration even after a thread stops; the
    -- marker tells bench/run.sh to interrupt it.
    if done_file then io.open(done_file, "w"):close() end
    wrk.thread:stop()
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format("RESULT %.0f %.0f %.0f %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), errors))
end
