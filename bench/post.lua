-- wrk script for bench/throughput.mjs: POSTs a Mattermost push payload the way Mattermost's
-- server does (no Content-Type, User-Agent Mattermost-Bot/1.1) and checks every answer.
-- Usage: BENCH_PAYLOAD=payload.json BENCH_RUN=7 wrk ... -s post.lua URL
-- Each request gets its own ack_id of the original's length (26 chars: "b", run, thread,
-- counter), as Mattermost gives every push its own: the relay drops a resent ack_id as a
-- duplicate, so replaying one payload verbatim would measure its dedup, not its delivery.
-- done() prints one line "BENCH_RESULT {json}" that throughput.mjs reads.

local threads = {}

local f = assert(io.open(os.getenv("BENCH_PAYLOAD") or "", "rb"), "set BENCH_PAYLOAD to a payload file")
local body = f:read("*a")
f:close()
local run = tonumber(os.getenv("BENCH_RUN") or "0") % 100000

wrk.method = "POST"
wrk.path = "/api/v1/send_push"
wrk.body = body
wrk.headers["Content-Type"] = nil
wrk.headers["User-Agent"] = "Mattermost-Bot/1.1"

function setup(thread)
  table.insert(threads, thread)
  thread:set("tag", string.format("b%05d%02d", run, #threads % 100))
end

function init(args)
  ok = 0           -- 2xx with {"status":"OK"}
  bad_status = 0   -- anything but 2xx
  bad_body = 0     -- 2xx whose body is not status OK
  last_bad = ""
  counter = 0
end

local head, tail -- the formatted request around the ack_id's value

function request()
  if not head then
    local req = wrk.format(nil, nil, nil, body)
    local _, open = string.find(req, '"ack_id"%s*:%s*"')
    assert(open, "the payload has no ack_id")
    local close = string.find(req, '"', open + 1, true)
    head, tail = string.sub(req, 1, open), string.sub(req, close)
  end
  counter = counter + 1
  return head .. tag .. string.format("%018d", counter) .. tail
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    bad_status = bad_status + 1
    last_bad = status .. " " .. string.sub(body or "", 1, 120)
  elseif body and string.find(body, '^%s*{%s*"status"%s*:%s*"OK"%s*}%s*$') then
    ok = ok + 1
  else
    bad_body = bad_body + 1
    last_bad = status .. " " .. string.sub(body or "", 1, 120)
  end
end

function done(summary, latency, requests)
  local t_ok, t_status, t_body, sample = 0, 0, 0, ""
  for _, thread in ipairs(threads) do
    t_ok = t_ok + thread:get("ok")
    t_status = t_status + thread:get("bad_status")
    t_body = t_body + thread:get("bad_body")
    local s = thread:get("last_bad")
    if s ~= "" then sample = s end
  end
  local e = summary.errors
  sample = string.gsub(sample, '[%c"\\]', " ")
  io.write(string.format(
    'BENCH_RESULT {"duration_us":%d,"requests":%d,"ok":%d,"bad_status":%d,"bad_body":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_timeout":%d,"lat_p50_us":%d,"lat_p99_us":%d,"sample_bad":"%s"}\n',
    summary.duration, summary.requests, t_ok, t_status, t_body,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), sample))
end
