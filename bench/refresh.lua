-- wrk script: POST /oauth/token (grant_type=refresh_token) to the simulator alone, each
-- request with the next unused refresh token from a file (one per line, split across threads).
--
--   wrk -t2 -c64 -d5s --latency -s bench/refresh.lua http://127.0.0.1:PORT \
--       -- TOKEN_FILE CLIENT_ID CLIENT_SECRET THREADS
--
-- Refresh tokens are single-use: once a thread has used all of its own it wraps around,
-- and those requests are refused (400 invalid_grant, counted in "status_errors").

local thread_count = 0

function setup(thread)
   thread:set("thread_index", thread_count)
   thread_count = thread_count + 1
end

local tokens = {}
local next_token = 1
local prefix = ""
local headers = { ["Content-Type"] = "application/x-www-form-urlencoded" }

function init(args)
   local path, client_id, secret = args[1], args[2], args[3]
   local stride = tonumber(args[4]) or 1
   local index = thread_index or 0
   local line_no = 0
   for line in io.lines(path) do
      if line_no % stride == index and line ~= "" then
         tokens[#tokens + 1] = line
      end
      line_no = line_no + 1
   end
   if #tokens == 0 then error("no refresh tokens for thread " .. index) end
   prefix = "grant_type=refresh_token&client_id=" .. client_id
      .. "&client_secret=" .. secret .. "&refresh_token="
end

function request()
   local token = tokens[next_token]
   next_token = next_token % #tokens + 1
   return wrk.format("POST", "/oauth/token", headers, prefix .. token)
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
