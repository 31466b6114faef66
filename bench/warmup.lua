-- wrk script: one pass over sellers 0..N-1 in order (split across threads), then stop.
--
--   wrk -t2 -c64 -d120s -s bench/warmup.lua http://127.0.0.1:PORT -- SELLERS API_KEY THREADS
--
-- Fills the broker's token cache before the timed runs. Each thread reads ids
-- index, index + THREADS, ... and, once it has had a reply for each of them, prints
-- "WARMED <index>" and stops. wrk itself still waits for -d: bench.run interrupts it
-- (SIGINT) when every thread has said so.

local thread_count = 0

function setup(thread)
   thread:set("thread_index", thread_count)
   thread_count = thread_count + 1
end

local sellers, stride, next_id, share, replies = 1, 1, 0, 0, 0
local headers = {}

function init(args)
   sellers = tonumber(args[1]) or error("usage: -- SELLERS API_KEY THREADS")
   headers["Authorization"] = "Bearer " .. (args[2] or "")
   stride = tonumber(args[3]) or 1
   next_id = thread_index or 0
   share = math.floor((sellers - next_id + stride - 1) / stride)
end

function request()
   local id = next_id
   if id >= sellers then
      id = id % sellers -- in-flight extras after the pass: any seller will do
   end
   next_id = next_id + stride
   return wrk.format("GET", string.format("/sellers/seller-%07d/token", id), headers)
end

function response(status, headers, body)
   replies = replies + 1
   if replies == share then
      io.write(string.format("WARMED %d\n", thread_index or 0))
      io.stdout:flush()
      wrk.thread:stop()
   end
end

function done(summary, latency, requests)
   io.write(string.format('BENCH {"requests":%d,"status_errors":%d,"duration_us":%d}\n',
      summary.requests, summary.errors.status, summary.duration))
end
