-- bench/wrk.lua — the load of bench/load.sh: POST /l3/{patient} (a metered iDoctor route), each
-- request carrying the next user's credentials.
--
-- BENCH_CREDS    a file with one header per line ("Authorization: Bearer ...", "X-API-Key: ...",
--                or "X-User-Id: ..." for the app and nginx, which have no authentication)
-- BENCH_PACE_MS  if set and > 0, each connection waits a random time between its requests,
--                exponentially distributed with this mean (in whole ms, as wrk takes it), so
--                the connections do not fall into step and the arrivals are close to Poisson:
--                an offered load below saturation, for latency. Unset: as fast as possible.
--
-- The requests are formatted once in init(), so wrk spends as little CPU as it can per request:
-- it shares the machine with what it measures. done() prints one machine-readable line.

local pace = tonumber(os.getenv("BENCH_PACE_MS") or "0") or 0
local requests = {}
local counter = 0
local threads = 0

function setup(thread)
  thread:set("thread_index", threads)
  threads = threads + 1
end

function init(args)
  local path = os.getenv("BENCH_CREDS")
  local i = 0
  for line in io.lines(path) do
    local name, value = line:match("^([^:]+):%s*(.-)%s*$")
    if name then
      i = i + 1
      requests[i] = wrk.format("POST", "/l3/p-" .. i, { [name] = value }, "")
    end
  end
  if i == 0 then error("no credentials in " .. tostring(path)) end
  -- Threads start at different users.
  counter = (thread_index or 0) * math.floor(i / 2)
  math.randomseed(os.time() * 100 + (thread_index or 0))
end

function request()
  counter = counter + 1
  return requests[(counter % #requests) + 1]
end

if pace > 0 then
  function delay()
    return math.floor(-math.log(1 - math.random()) * pace + 0.5)
  end
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_us=%d status_errors=%d connect_errors=%d read_errors=%d "
      .. "write_errors=%d timeouts=%d p50_us=%d p90_us=%d p99_us=%d p999_us=%d mean_us=%.1f max_us=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
end
