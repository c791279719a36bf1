//! The START_REPLICATION command for the server's protocol version (the
//! slot and publication themselves are [`super::control`]'s).

use crate::sql::quote_ident;

/// START_REPLICATION for the slot, from its confirmed position, with the
/// newest pgoutput protocol evictd speaks that the server supports:
/// version 2 with streaming of large in-progress transactions from PG 14,
/// version 1 before; with logical decoding messages when `messages` (they
/// too need PG 14; the caller checks).
pub fn start_command(slot: &str, publication: &str, server_version: u32, messages: bool) -> String {
    let mut options = if server_version >= 140_000 {
        "proto_version '2', streaming 'on'".to_owned()
    } else {
        "proto_version '1'".to_owned()
    };
    if messages {
        options.push_str(", messages 'true'");
    }
    format!(
        "START_REPLICATION SLOT {} LOGICAL 0/0 ({options}, publication_names '{}')",
        quote_ident(slot),
        publication.replace('\'', "''")
    )
}
