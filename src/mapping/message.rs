//! Invalidations from SQL: what an application's own transaction asks for
//! with `pg_logical_emit_message(true, 'evictd', '{"keys": [...], "tags":
//! [...], "prefixes": [...]}')` (`evictd_invalidate(...)` in
//! `migrations/`), read from pgoutput's Message messages or Debezium's
//! message events, and turned into [`Action`]s here.
//!
//! Pure and total: any content parses to actions or to an error that says
//! what is wrong with it, which the batcher logs and counts before skipping
//! the message. The keys are the application's own, taken literally (they
//! are not templates): they stay under `redis.prefix` like every key evictd
//! touches, and none may name evictd's reserved `evictd:` keys.

use serde::Deserialize;

use super::compile::Limits;
use super::eval::{Action, ActionKind};
use super::OriginId;

/// The message prefix evictd reads; messages with any other prefix belong
/// to someone else and are passed over.
pub const PREFIX: &str = "evictd";

/// The most keys, tags and prefixes one message may name.
pub const MAX_ENTRIES: usize = 10_000;

/// Where actions of messages come from, as `explain` and logs name it.
pub const ORIGIN_FILE: &str = "<sql message>";

/// The `table` label of what messages invalidate, in metrics (no mapped
/// table's `schema.table` looks like it).
pub const ORIGIN_TABLE: &str = "(sql message)";

/// Keys evictd keeps for itself (the client protocol's namespace).
const RESERVED: &str = "evictd:";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    keys: Option<Vec<String>>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    prefixes: Option<Vec<String>>,
}

/// Parses one message's content into `actions` (appended, with `origin`).
/// On error nothing is appended.
pub fn parse(
    content: &[u8],
    limits: Limits,
    origin: OriginId,
    actions: &mut Vec<Action>,
) -> Result<(), String> {
    let text =
        std::str::from_utf8(content).map_err(|e| format!("the content is not UTF-8 text: {e}"))?;
    let body: Body = serde_json::from_str(text).map_err(|e| {
        format!(
            "the content is not a JSON object of `keys`, `tags` and `prefixes` (arrays of strings): {e}"
        )
    })?;
    if body.keys.is_none() && body.tags.is_none() && body.prefixes.is_none() {
        return Err("the object names no `keys`, `tags` or `prefixes`".into());
    }
    let lists = [
        ("keys", body.keys.unwrap_or_default()),
        ("tags", body.tags.unwrap_or_default()),
        ("prefixes", body.prefixes.unwrap_or_default()),
    ];
    let entries: usize = lists.iter().map(|(_, list)| list.len()).sum();
    if entries > MAX_ENTRIES {
        return Err(format!(
            "the message names {entries} entries, more than the {MAX_ENTRIES} one message may hold: split it"
        ));
    }
    for (field, list) in &lists {
        for (index, entry) in list.iter().enumerate() {
            check_entry(field, index, entry, limits)?;
        }
    }
    let start = actions.len();
    let [(_, keys), (_, tags), (_, prefixes)] = lists;
    actions.reserve(entries);
    let mut push = |kind| actions.push(Action { kind, origin });
    keys.into_iter()
        .for_each(|key| push(ActionKind::Delete(key)));
    tags.into_iter().for_each(|tag| push(ActionKind::Tag(tag)));
    for prefix in prefixes {
        let mut glob = String::with_capacity(prefix.len() + 1);
        super::template::escape_glob(&prefix, &mut glob);
        glob.push('*');
        push(ActionKind::DeletePrefix(glob));
    }
    debug_assert_eq!(actions.len() - start, entries);
    Ok(())
}

fn check_entry(field: &str, index: usize, entry: &str, limits: Limits) -> Result<(), String> {
    let at = format!("{field}[{index}]");
    if entry.is_empty() {
        return Err(format!("{at} is empty"));
    }
    if entry.len() > limits.max_key_bytes {
        return Err(format!(
            "{at} is {} bytes, longer than mappings.max_key_bytes ({})",
            entry.len(),
            limits.max_key_bytes
        ));
    }
    if entry.starts_with(RESERVED) && field != "tags" {
        return Err(format!(
            "{at} `{entry}` starts with `{RESERVED}`, which is reserved for evictd's own keys"
        ));
    }
    if field == "prefixes"
        && entry
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    {
        return Err(format!(
            "{at} `{entry}` does not end with a separator, so it would also delete the keys of its neighbours (`{entry}0...`): end it with one, such as `:`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(content: &str) -> Result<Vec<ActionKind>, String> {
        let mut actions = Vec::new();
        parse(
            content.as_bytes(),
            Limits::default(),
            OriginId(0),
            &mut actions,
        )?;
        Ok(actions.into_iter().map(|action| action.kind).collect())
    }

    #[test]
    fn keys_tags_and_prefixes_become_actions_in_order() {
        let actions =
            parsed(r#"{"keys": ["user:1", "a*b"], "tags": ["team:7"], "prefixes": ["feed:[1]:"]}"#)
                .unwrap();
        assert_eq!(
            actions,
            vec![
                ActionKind::Delete("user:1".into()),
                ActionKind::Delete("a*b".into()),
                ActionKind::Tag("team:7".into()),
                ActionKind::DeletePrefix(r"feed:\[1\]:*".into()),
            ]
        );
        assert_eq!(parsed(r#"{"keys": []}"#).unwrap(), vec![]);
    }

    #[test]
    fn malformed_messages_say_what_is_wrong() {
        let error = |content: &str| parsed(content).unwrap_err();
        assert!(error("not json").starts_with("the content is not a JSON object"));
        assert!(error(r#"{"key": ["a"]}"#).contains("unknown field `key`"));
        assert!(error(r#"{"keys": "a"}"#).contains("expected a sequence"));
        assert!(error(r#"{"keys": [1]}"#).contains("expected a string"));
        assert_eq!(
            error("{}"),
            "the object names no `keys`, `tags` or `prefixes`"
        );
        assert_eq!(error(r#"{"keys": [""]}"#), "keys[0] is empty");
        assert_eq!(
            error(r#"{"keys": ["ok", "evictd:l1:log"]}"#),
            "keys[1] `evictd:l1:log` starts with `evictd:`, which is reserved for evictd's own keys"
        );
        assert!(error(r#"{"prefixes": ["user:1"]}"#)
            .starts_with("prefixes[0] `user:1` does not end with a separator"));
        let long = "k".repeat(1025);
        assert_eq!(
            error(&format!(r#"{{"tags": ["{long}"]}}"#)),
            "tags[0] is 1025 bytes, longer than mappings.max_key_bytes (1024)"
        );
        let many = vec!["\"k\""; MAX_ENTRIES + 1].join(",");
        assert!(error(&format!(r#"{{"keys": [{many}]}}"#)).contains("more than the 10000"));
        let mut actions = Vec::new();
        assert!(parse(&[0xff], Limits::default(), OriginId(0), &mut actions)
            .unwrap_err()
            .starts_with("the content is not UTF-8"));
    }

    #[test]
    fn nothing_is_appended_on_error() {
        let mut actions = Vec::new();
        let _ = parse(
            br#"{"keys": ["a", ""]}"#,
            Limits::default(),
            OriginId(0),
            &mut actions,
        );
        assert!(actions.is_empty());
    }
}
