-- Takes the right to reload a cached value (early refresh, or past its
-- TTL within the stale window): wraps the value in the caller's lease,
-- keeping its TTL, so that readers still get the value while the caller
-- reloads, and an invalidation meanwhile removes the lease with the value.
--
-- KEYS[1] the cache key
-- ARGV[1] the lease (`\0evictd:lease:` followed by the caller's token),
-- ARGV[2] what every lease starts with (`\0evictd:lease:`)
-- Returns 1 when taken, 0 when the key is gone or already has a lease.
local current = redis.call('GET', KEYS[1])
if not current or string.sub(current, 1, #ARGV[2]) == ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1] .. '\0' .. current, 'KEEPTTL')
return 1
