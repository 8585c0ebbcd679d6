-- wrk script of benchmarks/serving.py: POST the body in the file named by $WRK_BODY, then print
-- the run's figures as one JSON line (latencies in microseconds).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local body = io.open(os.getenv("WRK_BODY"), "rb")
wrk.body = body:read("*a")
body:close()

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "socket_errors": %d, "non_2xx": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    errors.connect + errors.read + errors.write + errors.timeout, errors.status))
end
