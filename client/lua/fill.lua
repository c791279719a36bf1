-- A fenced fill: store the value only while the fill right (the lease) is
-- still the caller's. evictd deletes the lease with every invalidation of
-- the key (delete, refresh, tag, pattern), so a fill that read the
-- database before such an invalidation is refused.
--
-- KEYS[1] the cache key, KEYS[2] its lease key (same Cluster slot)
-- ARGV[1] the lease token, ARGV[2] the value, ARGV[3] TTL in ms (0: none)
-- Returns 1 when stored, 0 when refused.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
