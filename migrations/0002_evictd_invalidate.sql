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
--
-- Signed. pg_logical_emit_message is executable by every role, so evictd
-- applies only messages signed with the secret it shares with this function
-- (`mappings.sql_messages_secret_file`): the message is
-- {"body": "<the invalidation as JSON text>", "hmac_sha256": "<hex>"}, the
-- HMAC-SHA256 of the body's UTF-8 bytes. The secret lives in
-- evictd.message_secret, which no other role can read; the function runs as
-- its owner (SECURITY DEFINER) and only the roles granted EXECUTE may call
-- it. HMAC is computed with the core sha256() function: pgcrypto is not
-- needed. Set or rotate the secret (as the owner of this migration):
--
--   insert into evictd.message_secret (secret) values ('<secret>')
--     on conflict (only_row) do update set secret = excluded.secret;
--
-- and let the application roles call it:
--
--   grant execute on function evictd_invalidate(text[], text[], text[], boolean) to app;
--
-- With no secret set, messages go out unsigned (evictd without a secret
-- takes them; evictd with one refuses them).

create schema if not exists evictd;
revoke all on schema evictd from public;

-- One row: the secret messages are signed with. Keep this table out of
-- every publication (evictd's own names only mapped tables; with Debezium,
-- list it in table.exclude.list).
create table if not exists evictd.message_secret (
    only_row boolean primary key default true check (only_row),
    secret text not null check (btrim(secret, E' \t\r\n') <> '')
);
revoke all on evictd.message_secret from public;

-- HMAC-SHA256 (RFC 2104) with the core sha256(): 64-byte blocks.
create or replace function evictd.hmac_sha256(key bytea, message bytea)
returns bytea
language plpgsql immutable strict
set search_path = pg_catalog, pg_temp
as $$
declare
    block bytea;
    inner_pad bytea;
    outer_pad bytea;
begin
    if length(key) > 64 then
        key := sha256(key);
    end if;
    block := key || decode(repeat('00', 64 - length(key)), 'hex');
    inner_pad := block;
    outer_pad := block;
    for i in 0..63 loop
        inner_pad := set_byte(inner_pad, i, get_byte(block, i) # 54);  -- 0x36
        outer_pad := set_byte(outer_pad, i, get_byte(block, i) # 92);  -- 0x5c
    end loop;
    return sha256(outer_pad || sha256(inner_pad || message));
end
$$;

create or replace function evictd_invalidate(
    keys text[] default '{}',
    tags text[] default '{}',
    prefixes text[] default '{}',
    transactional boolean default true
) returns pg_lsn
language plpgsql volatile
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    body text := json_build_object('keys', keys, 'tags', tags, 'prefixes', prefixes)::text;
    shared text;
begin
    select btrim(s.secret, E' \t\r\n') into shared from evictd.message_secret s;
    if shared is null then
        return pg_logical_emit_message(transactional, 'evictd', body);
    end if;
    return pg_logical_emit_message(transactional, 'evictd', json_build_object(
        'body', body,
        'hmac_sha256', encode(evictd.hmac_sha256(convert_to(shared, 'UTF8'), convert_to(body, 'UTF8')), 'hex')
    )::text);
end
$$;
revoke all on function evictd_invalidate(text[], text[], text[], boolean) from public;
