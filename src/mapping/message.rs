//! Invalidations from SQL: what an application's own transaction asks for
//! with `evictd_invalidate(...)` (in `migrations/`), which emits a logical
//! decoding message with prefix `evictd`, read from pgoutput's Message
//! messages or Debezium's message events, and turned into [`Action`]s here.
//!
//! `pg_logical_emit_message` is executable by every role, so a message is
//! trusted only when it proves where it came from: with secrets configured
//! (`mappings.sql_messages_secret_*`) its content must be a signed
//! envelope, `{"body": "<the invalidation, as JSON text>", "hmac_sha256":
//! "<64 hex digits>"}`, whose HMAC-SHA256 of `body` (its UTF-8 bytes) under
//! one of the secrets verifies. The body is a JSON object of `keys`, `tags`
//! and `prefixes`; without secrets, that object may also come bare. What a
//! message may name is bounded by a [`Scope`]: the patterns of
//! `mappings.sql_messages_allow`, or by default what the mappings could
//! render themselves.
//!
//! Pure and total: any content parses to actions or to a [`Refusal`] that
//! says what is wrong with it, which the batcher logs and counts before
//! skipping the message. The keys are the application's own, taken
//! literally (they are not templates): they stay under `redis.prefix` like
//! every key evictd touches, and none may name evictd's reserved `evictd:`
//! keys.

use std::sync::Arc;

use serde::Deserialize;

use super::compile::Limits;
use super::eval::{Action, ActionKind};
use super::template::{escape_glob, glob_matches};
use super::{Mappings, OriginId};

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

/// Said at start and by `evictd check` when messages are on without a
/// secret.
pub const UNSIGNED_WARNING: &str = "mappings.sql_messages is on without a secret: any role that can connect to the database can make evictd invalidate what the mappings render (pg_logical_emit_message is executable by everyone); set mappings.sql_messages_secret_file and sign with evictd_invalidate() (docs/MAPPINGS.md, \"Invalidations from SQL\")";

/// Keys evictd keeps for itself (the client protocol's namespace).
const RESERVED: &str = "evictd:";

/// Why a message was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its content is not a valid invalidation.
    Malformed(String),
    /// Secrets are configured and it is unsigned, or its signature does not
    /// verify with any of them.
    Unauthenticated(String),
    /// It names a key, tag or prefix outside what messages may name.
    NotAllowed(String),
}

impl Refusal {
    pub fn reason(&self) -> &str {
        match self {
            Refusal::Malformed(reason)
            | Refusal::Unauthenticated(reason)
            | Refusal::NotAllowed(reason) => reason,
        }
    }
}

/// The secrets a message's signature may verify with, the current one
/// first (two during a rotation). Empty: messages are not authenticated.
#[derive(Clone, Debug, Default)]
pub struct Secrets(Arc<[ring::hmac::Key]>);

impl Secrets {
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Secrets {
        Secrets(
            secrets
                .iter()
                .map(|secret| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref()))
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `tag` is the HMAC-SHA256 of `body` under one of the secrets.
    fn verify(&self, body: &[u8], tag: &[u8]) -> bool {
        self.0
            .iter()
            .any(|key| ring::hmac::verify(key, body, tag).is_ok())
    }
}

/// `mappings.sql_messages_allow`: the patterns messages may name, `*`
/// standing for any run of characters and `\` making the next character
/// literal. A kind left out allows nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowList {
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub prefixes: Vec<String>,
}

impl AllowList {
    /// Problems with the patterns, each naming the entry.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (kind, patterns) in self.kinds() {
            for (index, pattern) in patterns.iter().enumerate() {
                if pattern.is_empty() {
                    problems.push(format!("{kind}[{index}] is empty"));
                }
            }
        }
        problems
    }

    fn kinds(&self) -> [(&'static str, &[String]); 3] {
        [
            ("keys", &self.keys),
            ("tags", &self.tags),
            ("prefixes", &self.prefixes),
        ]
    }
}

/// What messages may name, per kind: glob patterns as the L1 broadcast's
/// (`*` any run of characters, `\\` makes the next one literal), matched
/// with the same [`glob_matches`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    keys: Vec<String>,
    tags: Vec<String>,
    prefixes: Vec<String>,
    /// Said in a refusal: where the bound comes from.
    from: &'static str,
}

impl Scope {
    /// The patterns of `mappings.sql_messages_allow`.
    pub fn listed(list: &AllowList) -> Scope {
        Scope {
            keys: list.keys.clone(),
            tags: list.tags.clone(),
            prefixes: list.prefixes.clone(),
            from: "mappings.sql_messages_allow",
        }
    }

    /// What the mappings could render themselves: keys and prefixes that
    /// start with the literal text of a key, refresh or prefix template
    /// (before its first placeholder; a template without placeholders
    /// allows exactly its one key), and tags likewise of a tag template.
    pub fn rendered_by(mappings: &Mappings) -> Scope {
        let mut keys = Vec::new();
        let mut tags = Vec::new();
        for table in mappings.tables() {
            let key_rules = table.keys.iter().chain(&table.prefixes);
            keys.extend(key_rules.map(|rule| family(&rule.template)));
            keys.extend(table.refresh.iter().map(|r| family(&r.key)));
            tags.extend(table.tags.iter().map(|rule| family(&rule.template)));
        }
        for patterns in [&mut keys, &mut tags] {
            patterns.sort();
            patterns.dedup();
        }
        Scope {
            prefixes: keys.clone(),
            keys,
            tags,
            from: "the default of mappings.sql_messages_allow: what the mappings render",
        }
    }

    fn allows(&self, kind: &str, entry: &str) -> bool {
        let patterns = match kind {
            "keys" => &self.keys,
            "tags" => &self.tags,
            _ => &self.prefixes,
        };
        patterns.iter().any(|pattern| glob_matches(pattern, entry))
    }
}

/// The glob of what `template` renders: its literal head followed by `*`,
/// or exactly its text when it has no placeholder.
fn family(template: &super::Template) -> String {
    let (head, placeholders) = template.literal_head();
    let mut pattern = String::with_capacity(head.len() + 1);
    escape_glob(head, &mut pattern);
    if placeholders {
        pattern.push('*');
    }
    pattern
}

/// Whether messages are authenticated, and what they may name.
#[derive(Clone, Copy, Debug)]
pub struct Policy<'p> {
    pub secrets: &'p Secrets,
    pub scope: &'p Scope,
}

/// A message's content: the bare invalidation (the lists), or a signed
/// envelope of it (`body` and `hmac_sha256`), whose body is the lists.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Content {
    #[serde(default)]
    keys: Option<Vec<String>>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    prefixes: Option<Vec<String>>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    hmac_sha256: Option<String>,
}

const NOT_AN_INVALIDATION: &str =
    "the content is not a JSON object of `keys`, `tags` and `prefixes` (arrays of strings)";

/// Parses one message's content into `actions` (appended, with `origin`).
/// On a refusal nothing is appended.
pub fn parse(
    content: &[u8],
    policy: Policy<'_>,
    limits: Limits,
    origin: OriginId,
    actions: &mut Vec<Action>,
) -> Result<(), Refusal> {
    let body = authenticate(content, policy.secrets)?;
    let lists = [
        ("keys", body.keys.unwrap_or_default()),
        ("tags", body.tags.unwrap_or_default()),
        ("prefixes", body.prefixes.unwrap_or_default()),
    ];
    let entries: usize = lists.iter().map(|(_, list)| list.len()).sum();
    if entries > MAX_ENTRIES {
        return Err(Refusal::Malformed(format!(
            "the message names {entries} entries, more than the {MAX_ENTRIES} one message may hold: split it"
        )));
    }
    for (field, list) in &lists {
        for (index, entry) in list.iter().enumerate() {
            check_entry(field, index, entry, limits).map_err(Refusal::Malformed)?;
        }
    }
    for (field, list) in &lists {
        for (index, entry) in list.iter().enumerate() {
            if !policy.scope.allows(field, entry) {
                return Err(Refusal::NotAllowed(format!(
                    "{field}[{index}] `{entry}` is not among the {field} messages may name ({})",
                    policy.scope.from
                )));
            }
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
        escape_glob(&prefix, &mut glob);
        glob.push('*');
        push(ActionKind::DeletePrefix(glob));
    }
    debug_assert_eq!(actions.len() - start, entries);
    Ok(())
}

/// The invalidation a message carries, once its signature verifies (or,
/// without secrets, as it comes).
fn authenticate(content: &[u8], secrets: &Secrets) -> Result<Content, Refusal> {
    let unauthenticated = |why: &str| {
        Refusal::Unauthenticated(format!(
            "{why}; with mappings.sql_messages_secret set, only messages signed by evictd_invalidate() are applied"
        ))
    };
    let text = match std::str::from_utf8(content) {
        Ok(text) => text,
        Err(_) if !secrets.is_empty() => return Err(unauthenticated("the content is not UTF-8")),
        Err(e) => {
            return Err(Refusal::Malformed(format!(
                "the content is not UTF-8 text: {e}"
            )))
        }
    };
    let mut parsed: Content = match serde_json::from_str(text) {
        Ok(parsed) => parsed,
        Err(_) if !secrets.is_empty() => {
            return Err(unauthenticated("the content is not a signed envelope"))
        }
        Err(e) => return Err(Refusal::Malformed(format!("{NOT_AN_INVALIDATION}: {e}"))),
    };
    let lists = parsed.keys.is_some() || parsed.tags.is_some() || parsed.prefixes.is_some();
    let body = match (parsed.body.take(), parsed.hmac_sha256.take()) {
        (None, None) if !secrets.is_empty() => {
            return Err(unauthenticated("the message is not signed"))
        }
        (None, None) => parsed,
        (Some(body), Some(signature)) if !lists => {
            if !secrets.is_empty() {
                let tag = hex(&signature).filter(|tag| tag.len() == 32);
                let Some(tag) = tag else {
                    return Err(unauthenticated(
                        "`hmac_sha256` is not 64 hexadecimal digits",
                    ));
                };
                if !secrets.verify(body.as_bytes(), &tag) {
                    return Err(unauthenticated(
                        "the signature does not verify with the configured secret(s)",
                    ));
                }
            }
            let inner: Content = serde_json::from_str(&body)
                .map_err(|e| Refusal::Malformed(format!("`body`: {NOT_AN_INVALIDATION}: {e}")))?;
            if inner.body.is_some() || inner.hmac_sha256.is_some() {
                return Err(Refusal::Malformed(
                    "`body` holds another envelope: it is the object of `keys`, `tags` and `prefixes`".into(),
                ));
            }
            inner
        }
        _ if !secrets.is_empty() => {
            return Err(unauthenticated("the content is not a signed envelope"))
        }
        _ => return Err(Refusal::Malformed(
            "a signed message is exactly `body` and `hmac_sha256`, with the lists inside `body`"
                .into(),
        )),
    };
    if body.keys.is_none() && body.tags.is_none() && body.prefixes.is_none() {
        return Err(Refusal::Malformed(
            "the object names no `keys`, `tags` or `prefixes`".into(),
        ));
    }
    Ok(body)
}

/// `body` signed with `secret` as `evictd_invalidate()` signs it: the
/// envelope `{"body": ..., "hmac_sha256": ...}`, for applications that emit
/// messages themselves.
pub fn sign(secret: &[u8], body: &str) -> String {
    let hex = hmac_sha256_hex(secret, &[body.as_bytes()]);
    serde_json::json!({"body": body, "hmac_sha256": hex}).to_string()
}

/// Lowercase hex of HMAC-SHA256 with `secret` over `parts`, one after the
/// other: the signatures evictd makes (messages, webhook purges).
pub(crate) fn hmac_sha256_hex(secret: &[u8], parts: &[&[u8]]) -> String {
    use std::fmt::Write as _;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut context = ring::hmac::Context::with_key(&key);
    for part in parts {
        context.update(part);
    }
    let mut hex = String::with_capacity(64);
    for byte in context.sign().as_ref() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Bytes written as hexadecimal digits (either case), two per byte.
pub(crate) fn hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
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

    fn scope_all() -> Scope {
        Scope::listed(&AllowList {
            keys: vec!["*".into()],
            tags: vec!["*".into()],
            prefixes: vec!["*".into()],
        })
    }

    fn parsed_with(
        content: &str,
        secrets: &Secrets,
        scope: &Scope,
    ) -> Result<Vec<ActionKind>, Refusal> {
        let mut actions = Vec::new();
        parse(
            content.as_bytes(),
            Policy { secrets, scope },
            Limits::default(),
            OriginId(0),
            &mut actions,
        )?;
        Ok(actions.into_iter().map(|action| action.kind).collect())
    }

    /// Parses without secrets, naming anything.
    fn parse_open(content: &[u8], actions: &mut Vec<Action>) -> Result<(), Refusal> {
        let secrets = Secrets::default();
        let scope = scope_all();
        let policy = Policy {
            secrets: &secrets,
            scope: &scope,
        };
        parse(content, policy, Limits::default(), OriginId(0), actions)
    }

    fn parsed(content: &str) -> Result<Vec<ActionKind>, String> {
        parsed_with(content, &Secrets::default(), &scope_all()).map_err(|r| r.reason().to_owned())
    }

    fn signed(secret: &str, body: &str) -> String {
        sign(secret.as_bytes(), body)
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // As Python's hmac.new(b"new-secret", body, sha256).hexdigest().
        let envelope = signed("new-secret", r#"{"keys": ["user:1"]}"#);
        assert_eq!(
            envelope,
            r#"{"body":"{\"keys\": [\"user:1\"]}","hmac_sha256":"22c6219104661ed06b781847307b234995a4e8e7fd342261bdca2fcad874cb9b"}"#
        );
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
        assert!(error(r#"{"body": "{}", "hmac_sha256": "00", "keys": []}"#)
            .starts_with("a signed message is exactly `body` and `hmac_sha256`"));
        let refusal = parse_open(&[0xff], &mut Vec::new()).unwrap_err();
        assert!(refusal.reason().starts_with("the content is not UTF-8"));
    }

    #[test]
    fn with_secrets_only_messages_signed_with_one_of_them_are_applied() {
        let secrets = Secrets::new(&["new-secret", "old-secret"]);
        let scope = scope_all();
        let body = r#"{"keys": ["user:1"], "tags": ["team:7"]}"#;
        let applied = vec![
            ActionKind::Delete("user:1".into()),
            ActionKind::Tag("team:7".into()),
        ];
        // Both secrets of a rotation verify.
        for secret in ["new-secret", "old-secret"] {
            assert_eq!(
                parsed_with(&signed(secret, body), &secrets, &scope),
                Ok(applied.clone())
            );
        }
        let refused = |content: &str| match parsed_with(content, &secrets, &scope) {
            Err(Refusal::Unauthenticated(reason)) => reason,
            other => panic!("{content}: {other:?}"),
        };
        assert!(refused(body).starts_with("the message is not signed"));
        assert!(refused(&signed("guessed", body)).starts_with("the signature does not verify"));
        assert!(refused("not json").starts_with("the content is not a signed envelope"));
        // A signature is over `body` exactly: another body with it fails.
        let tampered = signed("new-secret", body).replace("user:1", "user:*");
        assert!(refused(&tampered).starts_with("the signature does not verify"));
        let short = r#"{"body": "{}", "hmac_sha256": "abc"}"#;
        assert!(refused(short).contains("64 hexadecimal digits"));
        // Without secrets, a signed envelope is taken as it comes.
        assert_eq!(
            parsed_with(&signed("any", body), &Secrets::default(), &scope),
            Ok(applied)
        );
        // A verified body is still checked.
        assert!(matches!(
            parsed_with(&signed("new-secret", r#"{"keys": [""]}"#), &secrets, &scope),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn a_message_may_name_only_what_its_scope_allows() {
        let scope = Scope::listed(&AllowList {
            keys: vec!["report:*".into(), "exact".into(), "a*b*c".into()],
            tags: vec!["team:*".into()],
            prefixes: vec![],
        });
        let check = |content: &str| parsed_with(content, &Secrets::default(), &scope);
        assert!(
            check(r#"{"keys": ["report:7", "exact", "a-b-c", "abc"], "tags": ["team:1"]}"#).is_ok()
        );
        for (content, reason) in [
            (r#"{"keys": ["exact2"]}"#, "keys[0] `exact2` is not among the keys messages may name (mappings.sql_messages_allow)"),
            (r#"{"keys": ["a-b"]}"#, "keys[0] `a-b` is not among"),
            (r#"{"tags": ["user:1"]}"#, "tags[0] `user:1` is not among"),
            (r#"{"prefixes": ["report:"]}"#, "prefixes[0] `report:` is not among"),
        ] {
            match check(content) {
                Err(Refusal::NotAllowed(got)) => assert!(got.starts_with(reason), "{got}"),
                other => panic!("{content}: {other:?}"),
            }
        }
    }

    #[test]
    fn by_default_a_message_may_name_what_the_mappings_render() {
        let mappings = crate::mapping::compile::load_str(
            "t.toml",
            r#"
[[table]]
name = "orders"
keys = ["order:{id}", "orders:all"]
tags = ["user:{user_id}"]
prefixes = ["feed:{user_id}:"]
"#,
            Limits::default(),
        )
        .unwrap();
        let scope = Scope::rendered_by(&mappings);
        let allowed = |field: &str, entry: &str| scope.allows(field, entry);
        assert!(allowed("keys", "order:1"));
        assert!(allowed("keys", "orders:all"));
        assert!(!allowed("keys", "orders:all:2"));
        assert!(allowed("keys", "feed:1:page:2"));
        assert!(allowed("prefixes", "order:1:"));
        assert!(allowed("tags", "user:9"));
        assert!(!allowed("tags", "order:1"));
        assert!(!allowed("keys", "user:1"));
        let narrow = crate::mapping::compile::load_str(
            "t.toml",
            "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n",
            Limits::default(),
        )
        .unwrap();
        let scope = Scope::rendered_by(&narrow);
        assert!(!scope.allows("keys", "user:1"));
        assert!(!scope.allows("prefixes", "o"));
        assert!(!scope.allows("tags", "user:1"));
    }

    #[test]
    fn a_template_family_is_its_escaped_literal_head() {
        let family = |source: &str| family(&crate::mapping::Template::parse(source).unwrap());
        assert_eq!(family("order:{id}"), "order:*");
        assert_eq!(family("orders:all"), "orders:all");
        assert_eq!(family("a*b:{id}"), "a\\*b:*");
    }

    #[test]
    fn nothing_is_appended_on_error() {
        let mut actions = Vec::new();
        let _ = parse_open(br#"{"keys": ["a", ""]}"#, &mut actions);
        assert!(actions.is_empty());
    }
}
