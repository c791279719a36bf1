-- Gives a fill right back: deletes the key while it still holds the
-- caller's lease, bare or wrapped around a value being reloaded (a reader
-- that found no row and does not cache "no row", or could not register
-- the tags).
--
-- KEYS[1] the cache key; ARGV[1] the lease.
-- Returns 1 when deleted, 0 when the key no longer held the lease.
local current = redis.call('GET', KEYS[1])
local lease = ARGV[1]
if current == lease or (current
    and string.sub(current, 1, #lease + 1) == lease .. '\0') then
  return redis.call('DEL', KEYS[1])
end
return 0
