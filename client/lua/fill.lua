-- A fenced fill: store the value only while the key still holds the
-- caller's lease. The lease lives in the key itself (a bare lease, or a
-- cached value being reloaded wrapped in one), so every way evictd
-- invalidates the key (UNLINK, a write-through SET, a tag's members, a
-- pattern SCAN) removes it, and a fill that read the database before that
-- invalidation is refused.
--
-- KEYS[1] the cache key
-- ARGV[1] the lease (`\0evictd:lease:` followed by the caller's token),
-- ARGV[2] the value, ARGV[3] its TTL in ms (0: none)
-- Returns 1 when stored, 0 when refused.
local current = redis.call('GET', KEYS[1])
local lease = ARGV[1]
if current ~= lease and (not current
    or string.sub(current, 1, #lease + 1) ~= lease .. '\0') then
  return 0
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
