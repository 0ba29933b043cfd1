local rid, n = ARGV[1], tonumber(ARGV[2])
for i = 1, n do
  local b = 2 + (i - 1) * 3
  local kind, key, delta = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3])
  if kind == 'concurrency' then
    redis.call('ZREM', key, rid)
  elseif delta ~= 0 and redis.call('EXISTS', key) == 1 then
    if redis.call('INCRBY', key, delta) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
  end
end
return n
