-- wrk script: GET one fixed path with one Authorization header (the proxy benchmark).
--
--   wrk -t2 -c64 -d10s -s bench/fixed.lua http://127.0.0.1:PORT -- PATH AUTHORIZATION
--
-- setup() and done() (its one BENCH line) are token.lua's.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "token.lua")

local path = "/"
local headers = {}

function init(args)
   path = args[1] or error("usage: -- PATH AUTHORIZATION")
   headers["Authorization"] = args[2]
end

function request()
   return wrk.format("GET", path, headers)
end
