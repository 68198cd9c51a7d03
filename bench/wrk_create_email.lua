-- wrk script of bench/api_overhead.py --client wrk: POSTs a CREATE_EMAIL for a new user each
-- time (bench<FIRST>, bench<FIRST+1>, ...), with Basic authentication when AUTH is set.
-- Run with one wrk thread (-t1): the counter is per thread.
local next_user = tonumber(os.getenv("FIRST") or "0")

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  local auth = os.getenv("AUTH")
  if auth then
    wrk.headers["Authorization"] = "Basic " .. auth
  end
end

function request()
  local body = '{"identity": "bench' .. next_user .. '"}'
  next_user = next_user + 1
  return wrk.format(nil, nil, nil, body)
end
