local rid, lease_ms, n, prefix = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local DAY = 86400000

-- days since 1970-01-01 <-> proleptic Gregorian (y, m, d); H. Hinnant's algorithms
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local out = {0, 0, now}
local plan = {}
local failed = 0
for i = 1, n do
  local b = 4 + (i - 1) * 5
  local kind, scope = ARGV[b + 1], ARGV[b + 2]
  local limit, cost, win = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  local key, ttl
  local cur, prev, elapsed, reset = 0, 0, 0, 0
  local ok
  if kind == 'requests' or kind == 'tokens' then
    local idx = math.floor(now / win)
    elapsed = now - idx * win
    key = prefix .. kind .. ':' .. scope .. ':' .. idx
    cur = tonumber(redis.call('GET', key) or '0')
    prev = tonumber(redis.call('GET', prefix .. kind .. ':' .. scope .. ':' .. (idx - 1)) or '0')
    ok = prev * (win - elapsed) + (cur + cost) * win <= limit * win
    reset = win - elapsed
    ttl = (idx + 2) * win - now + 1000
  elseif kind == 'spend_day' then
    local day = math.floor(now / DAY)
    key = prefix .. 'spend_day:' .. scope .. ':' .. day
    cur = tonumber(redis.call('GET', key) or '0')
    elapsed = now - day * DAY
    reset = (day + 1) * DAY - now
    ok = cur + cost <= limit
    ttl = reset + 3600000
  elseif kind == 'spend_month' then
    local y, m = civil_from_days(math.floor(now / DAY))
    key = prefix .. 'spend_month:' .. scope .. ':' .. (y * 12 + m - 1)
    cur = tonumber(redis.call('GET', key) or '0')
    local ny, nm = y, m + 1
    if nm > 12 then ny, nm = y + 1, 1 end
    reset = days_from_civil(ny, nm, 1) * DAY - now
    ok = cur + cost <= limit
    ttl = reset + 3600000
  else
    key = prefix .. 'concurrency:' .. scope
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    cur = redis.call('ZCARD', key)
    ok = cur + cost <= limit
    ttl = lease_ms + 1000
  end
  plan[i] = {kind, key, cost, ttl}
  out[#out + 1] = key
  out[#out + 1] = cur
  out[#out + 1] = prev
  out[#out + 1] = elapsed
  out[#out + 1] = reset
  if not ok and failed == 0 then failed = i end
end
if failed == 0 then
  for i = 1, n do
    local kind, key, cost, ttl = plan[i][1], plan[i][2], plan[i][3], plan[i][4]
    if kind == 'concurrency' then
      redis.call('ZADD', key, now + lease_ms, rid)
      if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
    else
      redis.call('INCRBY', key, cost)
      redis.call('PEXPIRE', key, ttl)
    end
  end
  out[1] = 1
end
out[2] = failed
return out
