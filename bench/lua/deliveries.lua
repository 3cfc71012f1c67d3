-- POST deliveries, one Idempotency-Key per request, and tally the answers.
--
--   BENCH_PAYLOAD=body.json BENCH_WRK_OUT=out.json wrk -s deliveries.lua URL -- MODE PREFIX KEYS PCT
--
-- MODE new: a key never sent before on every request (PREFIX-thread-counter);
--      dup: a key drawn from the fixed set dup-1 .. dup-KEYS, sent once before the run;
--      mix: PCT percent from that set, the rest new.
-- Each thread keeps the event ids of its 202 and 200 answers; done() writes them, the counts and
-- the latency percentiles (microseconds) as JSON to BENCH_WRK_OUT, for the bench to check.

local function read_file(path)
  local file = assert(io.open(path, "rb"))
  local text = file:read("*a")
  file:close()
  return text
end

local payload = read_file(os.getenv("BENCH_PAYLOAD"))
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  mode = args[1] or "new"
  prefix = args[2] or "k"
  dup_keys = tonumber(args[3] or "256")
  dup_percent = tonumber(args[4] or "20")
  counter = 0
  new_ids, dup_ids, others = {}, {}, 0
  headers = { ["Content-Type"] = "application/json" }
  math.randomseed(tid * 1000003 + os.time())
end

function request()
  counter = counter + 1
  if mode == "dup" or (mode == "mix" and math.random(100) <= dup_percent) then
    headers["Idempotency-Key"] = "dup-" .. math.random(dup_keys)
  else
    headers["Idempotency-Key"] = prefix .. "-" .. tid .. "-" .. counter
  end
  return wrk.format("POST", wrk.path, headers, payload)
end

function response(status, _, body)
  if status == 202 then
    new_ids[#new_ids + 1] = string.match(body, '"event_id":"([^"]+)"') or "?"
  elseif status == 200 then
    dup_ids[#dup_ids + 1] = string.match(body, '"event_id":"([^"]+)"') or "?"
  else
    others = others + 1
  end
end

local function quoted(list)
  local parts = {}
  for i, id in ipairs(list) do
    parts[i] = '"' .. id .. '"'
  end
  return "[" .. table.concat(parts, ",") .. "]"
end

function done(summary, latency, _)
  local rows = {}
  for i, thread in ipairs(threads) do
    rows[i] = string.format(
      '{"new_ids":%s,"dup_ids":%s,"others":%d}',
      quoted(thread:get("new_ids")), quoted(thread:get("dup_ids")), thread:get("others")
    )
  end
  local errors = summary.errors
  local out = assert(io.open(os.getenv("BENCH_WRK_OUT"), "w"))
  out:write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"threads":[%s]}',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    table.concat(rows, ",")
  ))
  out:close()
end
