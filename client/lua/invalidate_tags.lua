-- Invalidates tag sets: deletes every member key and its lease, then the
-- sets. Used by evictd on a standalone Redis (in a Cluster the members
-- live on other nodes, and evictd deletes them node by node).
--
-- KEYS the tag sets; ARGV[1] the lease key prefix (`<prefix>evictd:lease:`),
-- or empty to leave leases alone (evictd's `redis.fill_leases = false`)
-- Returns how many member keys were deleted.
local lease_prefix = ARGV[1]
local function lease(key)
  local open = string.find(key, '{', 1, true)
  if open then
    local close = string.find(key, '}', open + 1, true)
    if close and close > open + 1 then
      return lease_prefix .. key
    end
  end
  return lease_prefix .. '{' .. key .. '}'
end
local members = redis.pcall('SUNION', unpack(KEYS))
if members.err then
  members = {}
  for _, tag in ipairs(KEYS) do
    if redis.call('TYPE', tag).ok == 'set' then
      for _, member in ipairs(redis.call('SMEMBERS', tag)) do
        members[#members + 1] = member
      end
    end
  end
end
local deleted = 0
for i = 1, #members, 500 do
  local last = math.min(i + 499, #members)
  deleted = deleted + redis.call('UNLINK', unpack(members, i, last))
  if lease_prefix ~= '' then
    local leases = {}
    for j = i, last do
      leases[#leases + 1] = lease(members[j])
    end
    redis.call('UNLINK', unpack(leases))
  end
end
redis.call('UNLINK', unpack(KEYS))
return deleted
