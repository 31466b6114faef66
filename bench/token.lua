-- wrk script: GET /sellers/seller-NNNNNNN/token for a random seller, with the API key.
--
--   wrk -t2 -c64 -d15s --latency -s bench/token.lua http://127.0.0.1:PORT -- SELLERS API_KEY [zipf S]
--
-- The seller is drawn uniformly from 0..SELLERS-1, or by Zipf's law with exponent S (rank k
-- with probability ~ 1/k^S: a few sellers are most of the reads, as on a real platform). Zipf
-- ranks come from the inverse of the continuous approximation of its CDF (exact enough for a
-- benchmark, and O(1) per draw: no million-entry table per wrk thread), and rank k is seller
-- (k-1)*7919 mod SELLERS, so the hot sellers are spread over the table, not its first rows.
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
local zipf = nil -- {s, lo, span} when drawing by Zipf's law

function init(args)
   sellers = tonumber(args[1]) or error("usage: -- SELLERS API_KEY [zipf S]")
   headers["Authorization"] = "Bearer " .. (args[2] or "")
   if args[3] == "zipf" then
      local s = tonumber(args[4]) or 1.1
      local function h(x) return (x ^ (1 - s) - 1) / (1 - s) end
      zipf = {s = s, lo = h(0.5), span = h(sellers + 0.5) - h(0.5)}
   end
   local index = thread_index or 0
   math.randomseed(os.time() * 1000 + index * 7919 + math.floor(os.clock() * 1e6))
   math.random() -- LuaJIT: the first draws right after seeding are poorly spread
end

local function draw()
   if zipf == nil then
      return math.random(0, sellers - 1)
   end
   local u = zipf.lo + math.random() * zipf.span
   local rank = math.floor((1 + u * (1 - zipf.s)) ^ (1 / (1 - zipf.s)) + 0.5)
   rank = math.max(1, math.min(sellers, rank))
   return ((rank - 1) * 7919) % sellers
end

function request()
   local path = string.format("/sellers/seller-%07d/token", draw())
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
