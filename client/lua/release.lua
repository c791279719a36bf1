-- Gives a fill right back: deletes the lease only while it is still the
-- caller's (a reader that found no row and does not cache "no row").
--
-- KEYS[1] the lease key; ARGV[1] the lease token.
-- Returns 1 when deleted, 0 when the lease was no longer the caller's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
