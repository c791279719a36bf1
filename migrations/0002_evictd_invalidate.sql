-- Invalidations from SQL, inside the application's own transaction:
--
--   select evictd_invalidate(keys => array['user:42'], tags => array['team:7']);
--
-- emits a logical decoding message with evictd's prefix. evictd applies it in
-- commit order with the transaction's row changes, and drops it if the
-- transaction rolls back (transactional => false applies it at once, commit
-- or not). evictd reads it only with `[mappings] sql_messages = true`. Keys
-- are the application's own (under redis.prefix); prefixes must end with a
-- separator such as ':'. Returns the message's WAL position.
create or replace function evictd_invalidate(
    keys text[] default '{}',
    tags text[] default '{}',
    prefixes text[] default '{}',
    transactional boolean default true
) returns pg_lsn
language sql volatile
as $$ select pg_logical_emit_message(transactional, 'evictd', json_build_object('keys', keys, 'tags', tags, 'prefixes', prefixes)::text) $$;
