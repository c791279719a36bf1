-- Invalidates tag sets: deletes every member key, then the sets. Used by
-- evictd on a standalone Redis (in a Cluster the members live on other
-- nodes, and evictd deletes them node by node). A member holding a fill
-- lease (docs/PROTOCOL.md) loses it with the key.
--
-- KEYS the tag sets
-- Returns how many member keys were deleted.
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
end
redis.call('UNLINK', unpack(KEYS))
return deleted
