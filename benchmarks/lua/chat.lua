-- wrk script: POST /v1/chat/completions with a unique prompt per request (so a
-- response cache always misses), non-stream or stream, and a JSON summary from done().
--
-- Configured by environment variables (read in each wrk thread):
--   BENCH_PATH          request path            (default /v1/chat/completions)
--   BENCH_MODEL         "model" field           (default chat)
--   BENCH_STREAM        1 = "stream": true      (default 0)
--   BENCH_PROMPT_BYTES  pad the prompt to about this many bytes (default 0: short prompt)
--   BENCH_AUTH          bearer key; adds Authorization (default: none)
--
--   BENCH_STREAM=1 wrk -t1 -c16 -d5s --latency -s benchmarks/lua/chat.lua http://127.0.0.1:8080

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
  model = os.getenv("BENCH_MODEL") or "chat"
  stream = os.getenv("BENCH_STREAM") == "1"
  local pad_bytes = tonumber(os.getenv("BENCH_PROMPT_BYTES") or "0") or 0
  pad = ""
  if pad_bytes > 0 then pad = " " .. string.rep("lorem ", math.floor(pad_bytes / 6)) end
  headers = { ["Content-Type"] = "application/json" }
  local auth = os.getenv("BENCH_AUTH")
  if auth and auth ~= "" then headers["Authorization"] = "Bearer " .. auth end
  prefix = '{"model":"' .. model .. '","max_tokens":16,' .. (stream and '"stream":true,' or '')
    .. '"messages":[{"role":"user","content":"Say hello, request '
  n = 0
  tid = tid or 1
end

function request()
  n = n + 1
  local body = prefix .. tid .. "-" .. n .. pad .. '"}]}'
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  local p = {}
  for _, q in ipairs({50, 75, 90, 99, 99.9}) do
    table.insert(p, string.format('"%s":%d', tostring(q), latency:percentile(q)))
  end
  io.write(string.format(
    'BENCHJSON {"duration_us":%d,"requests":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"mean":%.1f,"stdev":%.1f,"min":%d,"max":%d,"p":{%s}}}\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max, table.concat(p, ",")))
end
