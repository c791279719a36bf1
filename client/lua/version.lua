-- A reader's read of a namespace version: the counter's value, or, when
-- there is none, a new counter starting at ARGV[1] (the reader's clock in
-- microseconds since 1970). Starting from the clock rather than 0 means a
-- counter that was deleted or evicted comes back above every version it
-- held before, so nothing cached under an old version is ever read again.
--
-- KEYS[1] the counter; ARGV[1] the start. Returns the version.
local current = redis.call('GET', KEYS[1])
if current then
  return tonumber(current)
end
redis.call('SET', KEYS[1], ARGV[1])
return tonumber(ARGV[1])
