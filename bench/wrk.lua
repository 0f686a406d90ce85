-- Closed-loop load for `python -m bench.run`, run as `wrk -t C -c C ...` (one connection per thread).
--
-- wrk normally drops the requests in flight when its duration ends, which would leave answers the
-- gateway billed but nobody counted. Here each thread stops itself after the first response that
-- arrives past its own deadline (BENCH_DURATION seconds after its first request); with one
-- connection per thread nothing is in flight at that moment, so the counts are exact. wrk's `-d`
-- is set a few seconds longer, only so that it never cuts a thread short.
--
-- Environment: BENCH_DURATION (seconds), BENCH_BODY (file with the JSON body), BENCH_KEYS
-- (comma-separated API keys, thread i uses key i mod n; empty for the direct runs),
-- BENCH_STREAM_EVERY (k > 0: every k-th thread sends BENCH_STREAM_BODY instead).
-- It prints one line, `BENCH_RESULT {json}`, that bench/wrk.py reads.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec_t;
int clock_gettime(int clk_id, bench_timespec_t *tp);
]]
local timespec = ffi.new("bench_timespec_t")
local CLOCK_MONOTONIC = 1

local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) / 1e9
end

local function read_file(path)
  local handle = assert(io.open(path, "rb"))
  local data = handle:read("*a")
  handle:close()
  return data
end

local threads = {}
local created = 0

function setup(thread)
  thread:set("index", created)
  created = created + 1
  table.insert(threads, thread)
end

function init(args)
  local keys = {}
  for key in string.gmatch(os.getenv("BENCH_KEYS") or "", "[^,]+") do
    table.insert(keys, key)
  end
  local every = tonumber(os.getenv("BENCH_STREAM_EVERY") or "0") or 0
  streaming = every > 0 and (index % every) == every - 1
  local body = read_file(streaming and os.getenv("BENCH_STREAM_BODY") or os.getenv("BENCH_BODY"))
  local headers = { ["Content-Type"] = "application/json" }
  if #keys > 0 then
    headers["Authorization"] = "Bearer " .. keys[(index % #keys) + 1]
  end
  prepared = wrk.format("POST", wrk.path, headers, body)
  duration = tonumber(os.getenv("BENCH_DURATION"))
  ok, bad, started, last = 0, 0, 0, 0
  deadline = nil
end

function request()
  if deadline == nil then
    started = now()
    deadline = started + duration
  end
  return prepared
end

function response(status, headers, body)
  local t = now()
  local good = status == 200
  if good then
    if streaming then
      good = body:sub(-14) == "data: [DONE]\n\n" and not body:find("event: error", 1, true)
    else
      good = body:find('"choices"', 1, true) ~= nil
    end
  end
  if good then
    ok = ok + 1
  else
    bad = bad + 1
  end
  last = t
  if t >= deadline then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local total_ok, total_bad, first, final = 0, 0, math.huge, 0
  for _, thread in ipairs(threads) do
    total_ok = total_ok + (thread:get("ok") or 0)
    total_bad = total_bad + (thread:get("bad") or 0)
    local s = thread:get("started") or 0
    if s > 0 and s < first then
      first = s
    end
    local l = thread:get("last") or 0
    if l > final then
      final = l
    end
  end
  local elapsed = 0
  if final > 0 and first < math.huge then
    elapsed = final - first
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"ok":%d,"bad":%d,"elapsed":%.6f,"requests":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,'
      .. '"connect":%d,"read":%d,"write":%d,"timeout":%d}\n',
    total_ok, total_bad, elapsed, summary.requests,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.timeout
  ))
end
