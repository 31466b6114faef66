-- wrk script: GET /sellers/seller-NNNNNNN/token for a random seller, with the API key.
--
--   wrk -t2 -c64 -d15s --latency -s bench/token.lua http://127.0.0.1:PORT -- SELLERS API_KEY
--
-- Each thread seeds its own generator. done() prints one machine-readable line:
--   BENCH {"requests":..,"p50_us":..,...}
-- Errors: "status" are responses >= 400 (wrk's own count: neither server answers 3xx, so
-- that is every non-2xx), the rest are socket errors. No response() callback: defining one
-- makes wrk hand every reply to Lua, which costs the load generator CPU on a small machine.

local thread_count = 0

function setup(thread)
   thread:set("thread_index", thread_count)
   thread_count = thread_count + 1
end

local sellers = 1
local headers = {}

function init(args)
   sellers = tonumber(args[1]) or error("usage: -- SELLERS API_KEY")
   headers["Authorization"] = "Bearer " .. (args[2] or "")
   local index = thread_index or 0
   math.randomseed(os.time() * 1000 + index * 7919 + math.floor(os.clock() * 1e6))
   math.random() -- LuaJIT: the first draws right after seeding are poorly spread
end

function request()
   local path = string.format("/sellers/seller-%07d/token", math.random(0, sellers - 1))
   return wrk.format("GET", path, headers)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"status_errors":%d,'
         .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,'
         .. '"p50_us":%d,"p90_us":%d,"p95_us":%d,"p99_us":%d,"p999_us":%d,'
         .. '"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes, e.status,
      e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(95),
      latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
