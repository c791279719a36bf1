//! Mappings: which cache keys and tags each table's row changes touch.
//!
//! - `spec` reads the on-disk format (TOML, format v1) with locations.
//! - `compile` checks it and builds the immutable [`Mappings`]; every
//!   problem in every file is reported at once as a [`Diagnostic`].
//! - `eval` turns one [`RowChange`](crate::change::RowChange) into
//!   [`Action`]s. It does no IO and cannot fail: whatever could go wrong was
//!   rejected at load time, and a value that is not there degrades to a
//!   coarser invalidation, never to silence.
//!
//! **Architecture Invariant:** nothing in this module does IO except reading
//! the mapping files in [`load_dir`].

pub(crate) mod compile;
pub(crate) mod condition;
pub(crate) mod diagnostic;
pub(crate) mod eval;
pub(crate) mod message;
pub(crate) mod spec;
pub(crate) mod template;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::change::{OpSet, TableName};

pub use compile::{load_dir, load_files, load_str, read_dir, DirFiles, Limits};
pub use condition::Condition;
pub use diagnostic::{did_you_mean, Diagnostic, Location};
pub use eval::{Action, ActionKind, Note, NoteKind, Output};
pub use message::{sign, AllowList, UNSIGNED_WARNING};
pub use template::Template;

/// Compiled mappings of every table: immutable once loaded.
#[derive(Debug)]
pub struct Mappings {
    tables: HashMap<TableName, TableMapping>,
    origins: Vec<Origin>,
    /// The table (`schema.table`) each origin's rule belongs to.
    origin_tables: Arc<[Arc<str>]>,
    /// The pattern of each origin's template (`None`: a prefix, a SQL
    /// message), indexed by [`OriginId`].
    origin_patterns: Arc<[Option<Arc<str>>]>,
    files: usize,
    limits: Limits,
}

impl Mappings {
    pub fn table(&self, name: &TableName) -> Option<&TableMapping> {
        self.tables.get(name)
    }

    /// The tables in name order.
    pub fn tables(&self) -> impl Iterator<Item = &TableMapping> {
        let mut tables: Vec<&TableMapping> = self.tables.values().collect();
        tables.sort_by(|a, b| a.table.cmp(&b.table));
        tables.into_iter()
    }

    pub fn origin(&self, id: OriginId) -> &Origin {
        &self.origins[id.0 as usize]
    }

    /// The origin of invalidations from SQL messages (`pg_logical_emit_message`).
    pub fn message_origin(&self) -> OriginId {
        OriginId(u32::try_from(self.origins.len() - 1).unwrap_or(u32::MAX))
    }

    /// The table each origin belongs to, indexed by [`OriginId`]: plans
    /// carry it so that what they invalidate is counted by table.
    pub fn origin_tables(&self) -> Arc<[Arc<str>]> {
        self.origin_tables.clone()
    }

    /// The pattern of each origin's template, indexed by [`OriginId`]:
    /// plans carry it so that exact keys held too long can turn into the
    /// pattern of their family (a second invalidation for read replicas).
    pub fn origin_patterns(&self) -> Arc<[Option<Arc<str>>]> {
        self.origin_patterns.clone()
    }

    /// How many mapping files the tables came from.
    pub fn file_count(&self) -> usize {
        self.files
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }
}

/// The compiled mapping of one table.
#[derive(Debug)]
pub struct TableMapping {
    pub table: Arc<TableName>,
    /// Where the entry's `name` was written.
    pub origin: OriginId,
    pub on: OpSet,
    /// `changed = [...]`: updates that change none of these are skipped.
    pub changed: Option<Box<[Box<str>]>>,
    /// Where each of `changed` was written.
    pub changed_origins: Box<[OriginId]>,
    pub keys: Vec<Rule>,
    pub tags: Vec<Rule>,
    /// `versions = [...]`: namespaces whose version counter each change
    /// bumps (see [`evictd_client::protocol::VERSION_NAMESPACE`]).
    pub versions: Vec<Rule>,
    /// `prefixes = [...]`: every key under each rendered prefix is deleted
    /// (SCAN on every master).
    pub prefixes: Vec<Rule>,
    /// `surrogate_keys = [...]`: CDN surrogate keys (cache tags) purged
    /// after Redis applied the change (see `crate::purge`).
    pub surrogate_keys: Vec<Rule>,
    pub refresh: Vec<Refresh>,
    /// `[[table.warm]]`: the rows `evictd warm` fills (none: the whole
    /// table).
    pub warm: Vec<Warm>,
    /// `when = "..."`: the row versions every rule of the entry acts on.
    pub when: Option<Condition>,
}

impl TableMapping {
    /// Every column the mapping reads, sorted and deduplicated.
    pub fn columns(&self) -> Vec<&str> {
        let mut columns: Vec<&str> = self
            .templates()
            .flat_map(|(template, _)| template.columns())
            .chain(self.changed.iter().flatten().map(|c| &**c))
            .chain(
                self.refresh
                    .iter()
                    .flat_map(|r| r.columns.iter().map(|c| &**c)),
            )
            .chain(self.condition_columns())
            .chain(
                self.keys
                    .iter()
                    .flat_map(|rule| rule.changed.iter().flatten().map(|c| &**c)),
            )
            .collect();
        columns.sort_unstable();
        columns.dedup();
        columns
    }

    /// Every column a `when` of the entry, its keys or its refreshes reads.
    pub fn condition_columns(&self) -> impl Iterator<Item = &str> {
        self.conditions()
            .flat_map(|(condition, _)| condition.columns())
    }

    /// Every condition with the origin of what it governs (the entry's
    /// for the entry's own).
    pub fn conditions(&self) -> impl Iterator<Item = (&Condition, OriginId)> {
        let own = self.when.iter().map(|when| (when, self.origin));
        let keys = self
            .keys
            .iter()
            .filter_map(|rule| rule.when.as_ref().map(|when| (when, rule.origin)));
        let refreshes = self
            .refresh
            .iter()
            .filter_map(|r| r.when.as_ref().map(|when| (when, r.origin)));
        own.chain(keys).chain(refreshes)
    }

    /// What shaped the commands of the rule written at `origin`, as
    /// written: the conditions that govern it (the entry's, then its own)
    /// and the placeholders that transform their value or reach into json.
    /// For `explain`.
    pub fn deciders(&self, origin: OriginId) -> Vec<String> {
        let own = self
            .keys
            .iter()
            .find(|rule| rule.origin == origin)
            .and_then(|rule| rule.when.as_ref())
            .or_else(|| {
                self.refresh
                    .iter()
                    .find(|r| r.origin == origin)
                    .and_then(|r| r.when.as_ref())
            });
        let conditions = self
            .when
            .iter()
            .chain(own)
            .map(|when| format!("when \"{}\"", when.source()));
        let shaped = self
            .templates()
            .filter(|(_, at)| *at == origin)
            .flat_map(|(template, _)| template.shaped());
        conditions.chain(shaped).collect()
    }

    /// Every key, tag and namespace template with its origin: these are
    /// rendered from the old row on updates and deletes.
    pub fn templates(&self) -> impl Iterator<Item = (&Template, OriginId)> {
        let rules = self
            .keys
            .iter()
            .chain(&self.tags)
            .chain(&self.versions)
            .chain(&self.prefixes)
            .chain(&self.surrogate_keys);
        rules
            .map(|rule| (&rule.template, rule.origin))
            .chain(self.refresh.iter().map(|r| (&r.key, r.origin)))
    }
}

/// A key or tag template and where it was written.
#[derive(Debug)]
pub struct Rule {
    pub template: Template,
    pub origin: OriginId,
    /// A key's own `changed` (the key table form): updates that change
    /// none of these leave the key alone.
    pub changed: Option<Box<[Box<str>]>>,
    /// A key's own `when`: row versions that do not match leave it alone.
    pub when: Option<Condition>,
}

/// A `[[table.warm]]` query: SQL the database runs as written (the
/// mapping files are the operator's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warm {
    /// `where = "..."`: a condition on the table's rows.
    pub filter: Option<String>,
    /// `order_by = "..."` (with `limit`): the rows that matter most first.
    pub order_by: Option<String>,
    pub limit: Option<u64>,
    pub origin: OriginId,
}

/// A write-through refresh: `key` is SET to a JSON object of `columns` of the
/// new row.
#[derive(Debug)]
pub struct Refresh {
    pub key: Template,
    pub columns: Box<[Box<str>]>,
    /// Where each of `columns` was written.
    pub column_origins: Box<[OriginId]>,
    pub ttl: Option<Ttl>,
    pub origin: OriginId,
    /// `when = "..."`: only a new row that matches is written; an old one
    /// that matches has its key deleted when the key moves or the row
    /// stops matching.
    pub when: Option<Condition>,
}

/// A refresh's expiry: `seconds`, varied at random by up to `jitter_bp`
/// basis points (1/100 of a percent) either way when the key is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ttl {
    pub seconds: u64,
    pub jitter_bp: u32,
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EX {}", self.seconds)?;
        if self.jitter_bp > 0 {
            let percent = f64::from(self.jitter_bp) / 100.0;
            write!(f, " JITTER {percent}%")?;
        }
        Ok(())
    }
}

/// Index of an [`Origin`] in [`Mappings`]: small enough to travel with every
/// action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OriginId(pub u32);

/// Where a rule was written, for `explain` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub location: Location,
}

impl Origin {
    /// `file:line`, as `explain` prints it.
    pub fn file_line(&self) -> String {
        format!(
            "{}:{}",
            display_path(&self.location.file),
            self.location.line
        )
    }
}

fn display_path(path: &Path) -> String {
    path.display().to_string()
}
