//! The pure evaluator: one [`RowChange`] in, cache [`Action`]s out.
//!
//! Updates render every template on the old row and on the new row, and act
//! on both renderings when they differ (a row moving from user 1 to user 2
//! touches both users' keys). Inserts use the new row, deletes the old row,
//! TRUNCATE every key the templates can produce.
//!
//! **Architecture Invariant:** a key is never rendered from a value that is
//! not there. A placeholder whose value is unknown (unchanged TOAST, a column
//! REPLICA IDENTITY DEFAULT did not send) turns the key into a pattern over
//! that placeholder; a refresh whose value is not fully known deletes its key
//! instead. A NULL placeholder means the key does not exist, so it is skipped
//! and counted.

use std::fmt::Write as _;

use super::condition::{Condition, Truth};
use super::template::{escape_glob, Template, Unrendered};
use super::{Mappings, OriginId, Refresh, TableMapping, Ttl};
use crate::change::{Datum, Op, Row, RowChange, TableName};
use evictd_client::protocol::VERSION_NAMESPACE;

/// One thing to do to the cache, and the rule it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub kind: ActionKind,
    pub origin: OriginId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionKind {
    /// Delete this key.
    Delete(String),
    /// Delete every key matching this glob (SCAN + UNLINK).
    DeleteMatching(String),
    /// Delete every key under a mapping's `prefixes` entry: this glob (the
    /// rendered prefix and `*`), by SCAN + UNLINK.
    DeletePrefix(String),
    /// Delete the members of this tag set and the set.
    Tag(String),
    /// Invalidate every tag set whose name matches this glob.
    TagMatching(String),
    /// Bump this namespace version counter (a full counter key,
    /// `evictd:ns:<namespace>`, without the prefix).
    Bump(String),
    /// Bump every namespace counter matching this glob (SCAN + bump).
    BumpMatching(String),
    /// Purge this surrogate key from every CDN target.
    Purge(String),
    /// Purge everything cached at every CDN target: a surrogate key's value
    /// was not known (or TRUNCATE), and a CDN has no pattern purge.
    PurgeAll,
    /// Write `value` (a JSON object) to `key`.
    Refresh {
        key: String,
        value: String,
        ttl: Option<Ttl>,
    },
}

/// Something the evaluator did instead of the obvious, for `explain` and
/// metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub origin: OriginId,
    pub kind: NoteKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoteKind {
    /// The table has no mapping.
    Unmapped,
    /// The op is not in the mapping's `on`.
    OpNotMapped(Op),
    /// An update changed none of the `changed` columns.
    Unchanged,
    /// A placeholder was NULL, so the key does not exist.
    NullPlaceholder {
        template: Box<str>,
        column: Box<str>,
        /// Why, in words: `payload is NULL`, or which step of a json path
        /// was missing, or what was no date.
        why: Box<str>,
    },
    /// A placeholder's value was unknown: a pattern was used instead.
    Unavailable {
        template: Box<str>,
        column: Box<str>,
    },
    /// A rendering was longer than `max_key_bytes`: a pattern was used.
    KeyTooLong { template: Box<str>, bytes: usize },
    /// A refresh value column was unknown: the key is deleted instead.
    RefreshFallback { key: Box<str>, column: Box<str> },
    /// A row version did not match a `when`: what it governs was not
    /// rendered from that version.
    ConditionNotMet {
        condition: Box<str>,
        row: &'static str,
    },
    /// A `when` read a value the change does not carry: taken as a match.
    ConditionUnknown {
        condition: Box<str>,
        row: &'static str,
        column: Box<str>,
    },
    /// An update changed none of a key's own `changed` columns.
    KeyUnchanged { template: Box<str> },
}

impl NoteKind {
    /// The note in words, as `evictd explain` prints it for `change`;
    /// `default`: the old row is as REPLICA IDENTITY DEFAULT sends it.
    pub fn describe(&self, mappings: &Mappings, change: &RowChange, default: bool) -> String {
        match self {
            NoteKind::Unmapped => {
                let tables: Vec<String> = mappings.tables().map(|t| t.table.to_string()).collect();
                format!(
                    "{} is not mapped (mapped: {})",
                    change.table,
                    tables.join(", ")
                )
            }
            NoteKind::OpNotMapped(op) => format!("{op} is not in the mapping's `on`"),
            NoteKind::Unchanged => "the update changes none of the `changed` columns".into(),
            NoteKind::NullPlaceholder { why, template, .. } => {
                format!("`{template}` skipped: {why}")
            }
            NoteKind::Unavailable { template, column } => {
                format!(
                    "`{template}`: {}, so its pattern is used (a MATCH command below)",
                    unknown(change, default, column)
                )
            }
            NoteKind::KeyTooLong { template, bytes } => {
                format!("`{template}` rendered {bytes} bytes, over max_key_bytes, so its pattern is used (a MATCH command below)")
            }
            NoteKind::ConditionNotMet { condition, row } => {
                format!("the {row} row does not match `when = \"{condition}\"`: nothing is rendered from it for what that condition governs")
            }
            NoteKind::ConditionUnknown {
                condition,
                row,
                column,
            } => {
                let side = RowChange {
                    old: if *row == "old" {
                        change.old.clone()
                    } else {
                        None
                    },
                    new: if *row == "new" {
                        change.new.clone()
                    } else {
                        None
                    },
                    ..change.clone()
                };
                format!(
                    "`when = \"{condition}\"` is taken as true for the {row} row: {}",
                    unknown(&side, default, column)
                )
            }
            NoteKind::KeyUnchanged { template } => {
                format!("`{template}` skipped: the update changes none of its `changed` columns")
            }
            NoteKind::RefreshFallback { key, column } => {
                // A refresh's value comes from the new row only.
                let new_only = RowChange {
                    old: None,
                    ..change.clone()
                };
                format!(
                    "refresh of {key} deletes it instead: {}",
                    unknown(&new_only, default, column)
                )
            }
        }
    }
}

/// Why the value of `column` is not known, for a note.
fn unknown(change: &RowChange, default: bool, column: &str) -> String {
    let new = change.new.as_ref().map(|row| row.get(column));
    let old = change.old.as_ref().map(|row| row.get(column));
    if new == Some(&Datum::UnchangedToast) {
        return format!(
            "{column} is an unchanged TOAST value (--unchanged), which the source does not send"
        );
    }
    let old_missing = change.old.is_some() && old == Some(&Datum::Missing);
    if default && old_missing {
        return format!("REPLICA IDENTITY DEFAULT does not send the old {column}");
    }
    let mut missing = Vec::new();
    if old_missing {
        missing.push("--old");
    }
    if change.new.is_some() && new == Some(&Datum::Missing) {
        missing.push("--new");
    }
    if missing.is_empty() {
        return format!("the value of {column} is not known");
    }
    format!(
        "{column} is not in {} (give it; mark an unchanged TOAST value with --unchanged {column})",
        missing.join(" or ")
    )
}

/// Counts of the evaluator's fallbacks, kept whether or not notes are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoteCounts {
    pub unmapped: u64,
    pub filtered: u64,
    pub null_skipped: u64,
    pub coarse: u64,
    pub refresh_fallbacks: u64,
    /// Row versions a `when` left out.
    pub condition_skipped: u64,
    /// `when`s taken as a match because a value was not known.
    pub condition_unknown: u64,
}

/// Where [`Mappings::eval`] writes; reuse one across changes.
#[derive(Debug, Default)]
pub struct Output {
    pub actions: Vec<Action>,
    /// Filled only when `keep_notes` is set (`explain`, tests).
    pub notes: Vec<Note>,
    pub counts: NoteCounts,
    pub keep_notes: bool,
}

impl Output {
    pub fn with_notes() -> Output {
        Output {
            keep_notes: true,
            ..Output::default()
        }
    }

    pub fn clear(&mut self) {
        self.actions.clear();
        self.notes.clear();
    }

    fn push(&mut self, origin: OriginId, kind: ActionKind) {
        self.actions.push(Action { kind, origin });
    }

    fn note(&mut self, origin: OriginId, kind: impl FnOnce() -> NoteKind) {
        if self.keep_notes {
            self.notes.push(Note {
                origin,
                kind: kind(),
            });
        }
    }
}

/// How the templates of one side of a change see its values.
#[derive(Clone, Copy)]
enum Side<'c> {
    /// The old row; `None` when the source sent none.
    Old(Option<&'c Row>),
    /// The new row, with unchanged TOAST values taken from the old row when
    /// the old row has them.
    New(&'c Row, Option<&'c Row>),
}

impl<'c> Side<'c> {
    fn is_old(self) -> bool {
        matches!(self, Side::Old(_))
    }

    /// `old` or `new`, for notes.
    fn name(self) -> &'static str {
        if self.is_old() {
            "old"
        } else {
            "new"
        }
    }

    fn value(self, column: &str) -> &'c Datum {
        match self {
            Side::Old(old) => old.map_or(&Datum::Missing, |row| row.get(column)),
            Side::New(new, old) => match new.get(column) {
                Datum::UnchangedToast => old
                    .map(|row| row.get(column))
                    .filter(|value| value.is_known())
                    .unwrap_or(&Datum::UnchangedToast),
                value => value,
            },
        }
    }
}

/// What a template is used as: decides the action kinds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Key,
    Tag,
    Version,
    Prefix,
    Surrogate,
}

impl Mappings {
    /// Appends the actions for `change` to `out`, in the order they apply.
    pub fn eval(&self, change: &RowChange, out: &mut Output) {
        let Some(mapping) = self.table(&change.table) else {
            out.counts.unmapped += 1;
            out.note(OriginId(0), || NoteKind::Unmapped);
            return;
        };
        if !mapping.on.contains(change.op) {
            out.counts.filtered += 1;
            out.note(mapping.origin, || NoteKind::OpNotMapped(change.op));
            return;
        }
        let (old, new) = (change.old.as_ref(), change.new.as_ref());
        let sides: &[Side<'_>] = match (change.op, new) {
            (Op::Truncate, _) => return self.truncate(mapping, out),
            (Op::Insert, Some(new)) => &[Side::New(new, None)],
            (Op::Update, Some(new)) => {
                if is_unchanged(mapping, old, new) {
                    out.counts.filtered += 1;
                    out.note(mapping.origin, || NoteKind::Unchanged);
                    return;
                }
                &[Side::Old(old), Side::New(new, old)]
            }
            // A delete, or an insert/update without a new row (no source
            // sends that): act on what is known of the old row.
            _ => &[Side::Old(old)],
        };
        let mut matching = [Side::Old(None); 2];
        let sides = match &mapping.when {
            None => sides,
            Some(when) => keep_matching(when, mapping.origin, sides, &mut matching, out),
        };
        if sides.is_empty() {
            return;
        }
        for rule in &mapping.keys {
            if let (Some(changed), Op::Update, Some(new)) = (&rule.changed, change.op, new) {
                if unchanged(changed, old, new) {
                    out.counts.filtered += 1;
                    out.note(rule.origin, || NoteKind::KeyUnchanged {
                        template: rule.template.source().into(),
                    });
                    continue;
                }
            }
            let mut matching = [Side::Old(None); 2];
            let sides = match &rule.when {
                None => sides,
                Some(when) => keep_matching(when, rule.origin, sides, &mut matching, out),
            };
            self.render_all(&rule.template, rule.origin, Use::Key, sides, out);
        }
        for rule in &mapping.tags {
            self.render_all(&rule.template, rule.origin, Use::Tag, sides, out);
        }
        for rule in &mapping.versions {
            self.render_all(&rule.template, rule.origin, Use::Version, sides, out);
        }
        for rule in &mapping.prefixes {
            self.render_all(&rule.template, rule.origin, Use::Prefix, sides, out);
        }
        for rule in &mapping.surrogate_keys {
            self.render_all(&rule.template, rule.origin, Use::Surrogate, sides, out);
        }
        self.refreshes(mapping, sides, out);
    }

    /// Appends the refreshes `eval` would append for `row` inserted into
    /// the table of `mapping` (one of these mappings), and nothing else:
    /// what warming stores.
    pub fn eval_refreshes(&self, mapping: &TableMapping, row: &Row, out: &mut Output) {
        if !mapping.on.contains(Op::Insert) {
            return;
        }
        let sides = &[Side::New(row, None)];
        let mut matching = [Side::Old(None); 2];
        let sides = match &mapping.when {
            None => sides,
            Some(when) => keep_matching(when, mapping.origin, sides, &mut matching, out),
        };
        if !sides.is_empty() {
            self.refreshes(mapping, sides, out);
        }
    }

    /// Each refresh of `mapping` whose condition holds, on `sides`.
    fn refreshes(&self, mapping: &TableMapping, sides: &[Side<'_>], out: &mut Output) {
        for refresh in &mapping.refresh {
            let mut matching = [Side::Old(None); 2];
            let sides = match &refresh.when {
                None => sides,
                Some(when) => keep_matching(when, refresh.origin, sides, &mut matching, out),
            };
            self.refresh(refresh, sides, out);
        }
    }

    /// Renders `template` on each side, skipping a rendering equal to the
    /// previous one.
    fn render_all(
        &self,
        template: &Template,
        origin: OriginId,
        use_: Use,
        sides: &[Side<'_>],
        out: &mut Output,
    ) {
        let mut previous: Option<usize> = None;
        // The side that last rendered an exact key: a side with the same
        // known values renders the same key, so it need not be rendered
        // (most updates leave the key columns alone).
        let mut exact: Option<Side<'_>> = None;
        for &side in sides {
            if let Some(rendered) = exact {
                let same = template.columns().all(|column| {
                    let value = rendered.value(column);
                    value.is_known() && value == side.value(column)
                });
                if same {
                    continue;
                }
            }
            let Some(action) = self.render(template, origin, use_, side, out) else {
                continue;
            };
            exact = matches!(
                action,
                ActionKind::Delete(_)
                    | ActionKind::Tag(_)
                    | ActionKind::Bump(_)
                    | ActionKind::DeletePrefix(_)
                    | ActionKind::Purge(_)
            )
            .then_some(side);
            let repeated = previous
                .is_some_and(|index| action_text(&out.actions[index].kind) == action_text(&action));
            if !repeated {
                out.push(origin, action);
                previous = Some(out.actions.len() - 1);
            }
        }
    }

    /// One template on one side: the exact key, a pattern when a value is
    /// unknown or the key too long, or nothing when a placeholder is NULL.
    fn render(
        &self,
        template: &Template,
        origin: OriginId,
        use_: Use,
        side: Side<'_>,
        out: &mut Output,
    ) -> Option<ActionKind> {
        let exact = |key: String| match use_ {
            Use::Key => ActionKind::Delete(key),
            Use::Tag => ActionKind::Tag(key),
            Use::Version => ActionKind::Bump(format!("{VERSION_NAMESPACE}{key}")),
            Use::Prefix => {
                let mut pattern = String::with_capacity(key.len() + 1);
                escape_glob(&key, &mut pattern);
                pattern.push('*');
                ActionKind::DeletePrefix(pattern)
            }
            Use::Surrogate => ActionKind::Purge(key),
        };
        let matching = |pattern: String| match use_ {
            Use::Key => ActionKind::DeleteMatching(pattern),
            Use::Tag => ActionKind::TagMatching(pattern),
            Use::Version => ActionKind::BumpMatching(format!("{VERSION_NAMESPACE}{pattern}")),
            Use::Prefix => ActionKind::DeletePrefix(format!("{pattern}*")),
            Use::Surrogate => {
                drop(pattern);
                ActionKind::PurgeAll
            }
        };
        match template.render(|column| side.value(column)) {
            Ok(key) if key.len() > self.limits().max_key_bytes => {
                out.counts.coarse += 1;
                out.note(origin, || NoteKind::KeyTooLong {
                    template: template.source().into(),
                    bytes: key.len(),
                });
                Some(matching(template.pattern(|_| None)))
            }
            Ok(key) => Some(exact(key)),
            Err(Unrendered::Null(column, absent)) => {
                out.counts.null_skipped += 1;
                out.note(origin, || NoteKind::NullPlaceholder {
                    template: template.source().into(),
                    column: column.into(),
                    why: absent.to_string().into(),
                });
                None
            }
            Err(Unrendered::Unavailable(column)) => {
                out.counts.coarse += 1;
                out.note(origin, || NoteKind::Unavailable {
                    template: template.source().into(),
                    column: column.into(),
                });
                Some(matching(
                    template.pattern(|column| side.value(column).canonical_text()),
                ))
            }
        }
    }

    fn refresh(&self, refresh: &Refresh, sides: &[Side<'_>], out: &mut Output) {
        let origin = refresh.origin;
        let old_side = sides.iter().copied().find(|side| side.is_old());
        let new_side = sides.iter().copied().find(|side| !side.is_old());
        let old_action =
            old_side.and_then(|side| self.render(&refresh.key, origin, Use::Key, side, out));
        let new_key =
            new_side.map(|side| (side, self.render(&refresh.key, origin, Use::Key, side, out)));
        let new_text = new_key
            .as_ref()
            .and_then(|(_, action)| action.as_ref().map(action_text));
        if let Some(old_action) = old_action {
            if Some(action_text(&old_action)) != new_text {
                out.push(origin, old_action);
            }
        }
        let Some((side, Some(action))) = new_key else {
            return;
        };
        let ActionKind::Delete(key) = action else {
            // The key itself could not be rendered exactly: delete by pattern.
            return out.push(origin, action);
        };
        match refresh_value(refresh, side) {
            Ok(value) => out.push(
                origin,
                ActionKind::Refresh {
                    key,
                    value,
                    ttl: refresh.ttl,
                },
            ),
            Err(column) => {
                out.counts.refresh_fallbacks += 1;
                out.note(origin, || NoteKind::RefreshFallback {
                    key: key.as_str().into(),
                    column: column.into(),
                });
                out.push(origin, ActionKind::Delete(key));
            }
        }
    }

    /// The coarse invalidation of `table`, whatever its `on` says: every
    /// key, refresh key and tag its templates can produce. For when the
    /// exact changes are not known (a transaction too large to track).
    pub fn eval_coarse(&self, table: &TableName, out: &mut Output) {
        if let Some(mapping) = self.table(table) {
            self.truncate(mapping, out);
        }
    }

    /// Every key, refresh key, tag and namespace the table's templates can
    /// produce.
    fn truncate(&self, mapping: &TableMapping, out: &mut Output) {
        for rule in &mapping.keys {
            out.push(
                rule.origin,
                ActionKind::DeleteMatching(rule.template.pattern(|_| None)),
            );
        }
        for refresh in &mapping.refresh {
            out.push(
                refresh.origin,
                ActionKind::DeleteMatching(refresh.key.pattern(|_| None)),
            );
        }
        for rule in &mapping.tags {
            out.push(
                rule.origin,
                ActionKind::TagMatching(rule.template.pattern(|_| None)),
            );
        }
        for rule in &mapping.prefixes {
            let pattern = rule.template.pattern(|_| None);
            out.push(rule.origin, ActionKind::DeletePrefix(format!("{pattern}*")));
        }
        for rule in &mapping.versions {
            let pattern = rule.template.pattern(|_| None);
            out.push(
                rule.origin,
                ActionKind::BumpMatching(format!("{VERSION_NAMESPACE}{pattern}")),
            );
        }
        if let Some(rule) = mapping.surrogate_keys.first() {
            out.push(rule.origin, ActionKind::PurgeAll);
        }
    }
}

fn action_text(action: &ActionKind) -> &str {
    match action {
        ActionKind::Delete(text)
        | ActionKind::DeleteMatching(text)
        | ActionKind::DeletePrefix(text)
        | ActionKind::Tag(text)
        | ActionKind::TagMatching(text)
        | ActionKind::Bump(text)
        | ActionKind::BumpMatching(text)
        | ActionKind::Purge(text)
        | ActionKind::Refresh { key: text, .. } => text,
        ActionKind::PurgeAll => "",
    }
}

/// Whether an update is known to have changed none of the mapping's
/// `changed`.
fn is_unchanged(mapping: &TableMapping, old: Option<&Row>, new: &Row) -> bool {
    mapping
        .changed
        .as_ref()
        .is_some_and(|changed| unchanged(changed, old, new))
}

/// The row versions of `sides` that match `when` (or whose match is not
/// known: never skip an invalidation on a guess), kept in `kept`.
fn keep_matching<'k, 'c>(
    when: &Condition,
    origin: OriginId,
    sides: &[Side<'c>],
    kept: &'k mut [Side<'c>; 2],
    out: &mut Output,
) -> &'k [Side<'c>] {
    let mut count = 0;
    for &side in sides {
        let (truth, missing) = when.eval(|column| side.value(column));
        match truth {
            Truth::True => {}
            Truth::Unknown => {
                out.counts.condition_unknown += 1;
                out.note(origin, || NoteKind::ConditionUnknown {
                    condition: when.source().into(),
                    row: side.name(),
                    column: missing.unwrap_or("?").into(),
                });
            }
            Truth::False | Truth::Null => {
                out.counts.condition_skipped += 1;
                out.note(origin, || NoteKind::ConditionNotMet {
                    condition: when.source().into(),
                    row: side.name(),
                });
                continue;
            }
        }
        kept[count] = side;
        count += 1;
    }
    &kept[..count]
}

/// Whether an update is known to have changed none of `changed`. A column
/// whose old value is unknown counts as changed.
fn unchanged(changed: &[Box<str>], old: Option<&Row>, new: &Row) -> bool {
    let old = Side::Old(old);
    changed
        .iter()
        .all(|column| match (old.value(column), new.get(column)) {
            (_, Datum::UnchangedToast) => true,
            (before, after) if before.is_known() => before == after,
            _ => false,
        })
}

/// The key and value `refresh` writes for `row` (as a new row), or `None`
/// when a value it needs is not known or NULL in the key.
pub(crate) fn render_refresh(refresh: &Refresh, row: &Row) -> Option<(String, String)> {
    let side = Side::New(row, None);
    let key = refresh.key.render(|column| side.value(column)).ok()?;
    refresh_value(refresh, side).ok().map(|value| (key, value))
}

/// The JSON object of the refresh's columns, or the first column whose value
/// is not known.
fn refresh_value<'m>(refresh: &'m Refresh, side: Side<'_>) -> Result<String, &'m str> {
    let mut json = String::with_capacity(16 * refresh.columns.len());
    json.push('{');
    for (index, column) in refresh.columns.iter().enumerate() {
        if index > 0 {
            json.push(',');
        }
        write_json_string(column, &mut json);
        json.push(':');
        match side.value(column) {
            Datum::Null => json.push_str("null"),
            Datum::Bool(value) => {
                let _ = write!(json, "{value}");
            }
            Datum::Number(text) if is_json_number(text) => json.push_str(text),
            Datum::Json(text) => json.push_str(text),
            Datum::Text(text) | Datum::Number(text) => write_json_string(text, &mut json),
            Datum::UnchangedToast | Datum::Missing => return Err(column),
        }
    }
    json.push('}');
    Ok(json)
}

/// Appends `text` as a JSON string.
pub fn write_json_string(text: &str, out: &mut String) {
    out.push('"');
    // Keys are almost always plain: copy them whole (the L1 message writes
    // every key of a batch through here).
    if !text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(text);
        out.push('"');
        return;
    }
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Whether `text` is a JSON number (Postgres' NaN and Infinity are not).
fn is_json_number(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (int, rest) = digits.split_at(
        digits
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(digits.len()),
    );
    if int.is_empty() || (int.len() > 1 && int.starts_with('0')) {
        return false;
    }
    let rest = match rest.strip_prefix('.') {
        Some(fraction) => {
            let end = fraction
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(fraction.len());
            if end == 0 {
                return false;
            }
            &fraction[end..]
        }
        None => rest,
    };
    match rest.strip_prefix(['e', 'E']) {
        Some(exponent) => {
            let exponent = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            !exponent.is_empty() && exponent.bytes().all(|b| b.is_ascii_digit())
        }
        None => rest.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers() {
        for good in ["0", "7", "-12.50", "1e10", "2.5E-3"] {
            assert!(is_json_number(good), "{good}");
        }
        for bad in ["NaN", "Infinity", "-", "01", "1.", ".5", "1e", ""] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }

    #[test]
    fn json_strings_escape() {
        let mut out = String::new();
        write_json_string("a\"b\\c\n\u{1}é", &mut out);
        assert_eq!(out, r#""a\"b\\c\n\u0001é""#);
        out.clear();
        write_json_string("order:1:é", &mut out);
        assert_eq!(out, r#""order:1:é""#);
    }
}
