//! The on-disk mapping format (v1): TOML files of `[[table]]` entries, read
//! into plain values that remember where each was written.
//!
//! The reader walks TOML's span-carrying tree by hand instead of deriving
//! serde types, so that every unknown field and every wrong type in a file is
//! reported in one run, each at its own line and column.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::diagnostic::{did_you_mean, Diagnostic, Location, SourceFile};

/// A value with the byte span it was written at.
#[derive(Clone, Debug)]
pub struct Located<T> {
    pub value: T,
    pub span: Range<usize>,
}

/// One `[[table]]` entry.
#[derive(Clone, Debug)]
pub struct TableSpec {
    pub span: Range<usize>,
    pub name: Option<Located<String>>,
    /// `keys = [...]` (strings, or inline tables) and `[[table.key]]`
    /// sections, in the order written.
    pub keys: Vec<KeySpec>,
    pub tags: Vec<Located<String>>,
    /// Namespaces whose version each change bumps.
    pub versions: Vec<Located<String>>,
    /// Prefixes under which every key is deleted.
    pub prefixes: Vec<Located<String>>,
    /// CDN surrogate keys (cache tags) purged on every change.
    pub surrogate_keys: Vec<Located<String>>,
    pub on: Option<Located<Vec<Located<String>>>>,
    pub changed: Option<Located<Vec<Located<String>>>>,
    pub refresh: Vec<RefreshSpec>,
    /// `[[table.warm]]`: which rows `evictd warm` fills first.
    pub warm: Vec<WarmSpec>,
    /// `when = "..."`: the row versions the whole entry acts on.
    pub when: Option<Located<String>>,
    /// A field had the wrong type (already reported): checks that depend on
    /// what the entry holds as a whole are skipped.
    pub malformed: bool,
}

/// One key: a template, and in the table form its own `changed` and
/// `when`.
#[derive(Clone, Debug)]
pub struct KeySpec {
    pub span: Range<usize>,
    pub template: Option<Located<String>>,
    pub changed: Option<Located<Vec<Located<String>>>>,
    pub when: Option<Located<String>>,
}

/// One `[[table.refresh]]` entry.
#[derive(Clone, Debug)]
pub struct RefreshSpec {
    pub span: Range<usize>,
    pub key: Option<Located<String>>,
    pub columns: Option<Located<Vec<Located<String>>>>,
    pub ttl: Option<Located<String>>,
    pub jitter: Option<Located<String>>,
    pub when: Option<Located<String>>,
}

/// One `[[table.warm]]` entry: the rows `evictd warm` reads.
#[derive(Clone, Debug)]
pub struct WarmSpec {
    pub span: Range<usize>,
    pub filter: Option<Located<String>>,
    pub order_by: Option<Located<String>>,
    pub limit: Option<Located<u64>>,
}

const WARM_FIELDS: &[&str] = &["where", "order_by", "limit"];

const TABLE_FIELDS: &[&str] = &[
    "name",
    "keys",
    "key",
    "tags",
    "versions",
    "prefixes",
    "surrogate_keys",
    "on",
    "changed",
    "when",
    "refresh",
    "warm",
];
const KEY_FIELDS: &[&str] = &["template", "changed", "when"];
const REFRESH_FIELDS: &[&str] = &["key", "columns", "ttl", "jitter", "when"];

/// Reads one mapping file. Problems go to `diagnostics`; what could be read
/// is returned, so later checks still run on the rest.
pub fn read_file(file: &SourceFile<'_>, diagnostics: &mut Vec<Diagnostic>) -> Vec<TableSpec> {
    let (root, errors) = DeTable::parse_recoverable(file.text);
    let mut reader = Reader { file, diagnostics };
    // Only the first: after a syntax error the parser's guesses at what
    // follows report problems that are not there.
    if let Some(error) = errors.first() {
        let at = error.span().map_or(0, |span| span.start);
        reader.error(
            at,
            format!("invalid TOML: {}", error.message().trim_end()),
            "fix the TOML syntax here or just before (an unclosed `[` or quote shows where the parser gave up)",
        );
        return Vec::new();
    }
    reader.root(root.get_ref())
}

struct Reader<'f, 'd> {
    file: &'f SourceFile<'f>,
    diagnostics: &'d mut Vec<Diagnostic>,
}

impl Reader<'_, '_> {
    fn location(&self, offset: usize) -> Location {
        self.file.locate(offset)
    }

    fn error(&mut self, offset: usize, message: impl Into<String>, help: impl Into<String>) {
        let diagnostic = Diagnostic::at(self.location(offset), message).help(help);
        self.diagnostics.push(diagnostic);
    }

    fn root(&mut self, root: &DeTable<'_>) -> Vec<TableSpec> {
        let mut tables = Vec::new();
        for (key, value) in root.iter() {
            if key.get_ref() != "table" {
                self.unknown_field(key, &["table"], "at the top level");
                continue;
            }
            match value.get_ref() {
                DeValue::Array(entries) if entries.iter().all(|e| e.get_ref().is_table()) => {
                    for entry in entries.iter() {
                        if let DeValue::Table(table) = entry.get_ref() {
                            tables.push(self.table(table, entry.span()));
                        }
                    }
                }
                _ => self.error(
                    key.span().start,
                    "`table` must be an array of tables",
                    "write each mapping as a `[[table]]` section",
                ),
            }
        }
        if tables.is_empty() && root.is_empty() {
            self.error(
                0,
                "the file maps no table",
                "add a `[[table]]` section, or delete the file",
            );
        }
        tables
    }

    fn table(&mut self, table: &DeTable<'_>, span: Range<usize>) -> TableSpec {
        let mut spec = TableSpec {
            span,
            name: None,
            keys: Vec::new(),
            tags: Vec::new(),
            versions: Vec::new(),
            prefixes: Vec::new(),
            surrogate_keys: Vec::new(),
            on: None,
            changed: None,
            refresh: Vec::new(),
            warm: Vec::new(),
            when: None,
            malformed: false,
        };
        let errors_before = self.diagnostics.len();
        for (key, value) in table.iter() {
            match key.get_ref().as_ref() {
                "name" => spec.name = self.string(key, value),
                "keys" => spec.keys.extend(self.keys(key, value)),
                "key" => spec.keys.extend(self.key_sections(key, value)),
                "when" => spec.when = self.string(key, value),
                "tags" => spec.tags = self.strings(key, value).map_or_else(Vec::new, |l| l.value),
                "versions" => {
                    spec.versions = self.strings(key, value).map_or_else(Vec::new, |l| l.value);
                }
                "prefixes" => {
                    spec.prefixes = self.strings(key, value).map_or_else(Vec::new, |l| l.value);
                }
                "surrogate_keys" => {
                    spec.surrogate_keys =
                        self.strings(key, value).map_or_else(Vec::new, |l| l.value);
                }
                "on" => spec.on = self.strings(key, value),
                "changed" => spec.changed = self.strings(key, value),
                "refresh" => spec.refresh = self.refreshes(key, value),
                "warm" => spec.warm = self.warms(key, value),
                _ => self.unknown_field(key, TABLE_FIELDS, "in [[table]]"),
            }
        }
        spec.malformed = self.diagnostics.len() > errors_before;
        spec
    }

    fn refreshes(
        &mut self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Vec<RefreshSpec> {
        let DeValue::Array(entries) = value.get_ref() else {
            self.wrong_type(
                key,
                "an array of tables",
                "write each as a `[[table.refresh]]` section",
            );
            return Vec::new();
        };
        let mut refreshes = Vec::new();
        for entry in entries.iter() {
            let DeValue::Table(table) = entry.get_ref() else {
                self.wrong_type(
                    key,
                    "an array of tables",
                    "write each as a `[[table.refresh]]` section",
                );
                continue;
            };
            let mut spec = RefreshSpec {
                span: entry.span(),
                key: None,
                columns: None,
                ttl: None,
                jitter: None,
                when: None,
            };
            for (field, value) in table.iter() {
                match field.get_ref().as_ref() {
                    "when" => spec.when = self.string(field, value),
                    "key" => spec.key = self.string(field, value),
                    "columns" => spec.columns = self.strings(field, value),
                    "ttl" => spec.ttl = self.string(field, value),
                    "jitter" => spec.jitter = self.string(field, value),
                    _ => self.unknown_field(field, REFRESH_FIELDS, "in [[table.refresh]]"),
                }
            }
            refreshes.push(spec);
        }
        refreshes
    }

    fn warms(
        &mut self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Vec<WarmSpec> {
        let DeValue::Array(entries) = value.get_ref() else {
            self.wrong_type(
                key,
                "an array of tables",
                "write each as a `[[table.warm]]` section",
            );
            return Vec::new();
        };
        let mut warms = Vec::new();
        for entry in entries.iter() {
            let DeValue::Table(table) = entry.get_ref() else {
                self.wrong_type(
                    key,
                    "an array of tables",
                    "write each as a `[[table.warm]]` section",
                );
                continue;
            };
            let mut spec = WarmSpec {
                span: entry.span(),
                filter: None,
                order_by: None,
                limit: None,
            };
            for (field, value) in table.iter() {
                match field.get_ref().as_ref() {
                    "where" => spec.filter = self.string(field, value),
                    "order_by" => spec.order_by = self.string(field, value),
                    "limit" => match value.get_ref() {
                        DeValue::Integer(integer) => {
                            match u64::from_str_radix(integer.as_str(), integer.radix()) {
                                Ok(limit) if limit > 0 => {
                                    spec.limit = Some(Located {
                                        value: limit,
                                        span: value.span(),
                                    });
                                }
                                _ => self.wrong_type(
                                    field,
                                    "a positive integer",
                                    "write how many rows to warm, e.g. 1000",
                                ),
                            }
                        }
                        _ => self.wrong_type(
                            field,
                            "a positive integer",
                            "write how many rows to warm, e.g. 1000",
                        ),
                    },
                    _ => self.unknown_field(field, WARM_FIELDS, "in [[table.warm]]"),
                }
            }
            warms.push(spec);
        }
        warms
    }

    /// `keys = [...]`: each a template, or an inline table like a
    /// `[[table.key]]` section.
    fn keys(
        &mut self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Vec<KeySpec> {
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                key,
                "an array of strings",
                "write a list, e.g. [\"a\", \"b\"]",
            );
            return Vec::new();
        };
        let mut keys = Vec::with_capacity(items.len());
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(text) => keys.push(KeySpec {
                    span: item.span(),
                    template: Some(Located {
                        value: text.to_string(),
                        span: item.span(),
                    }),
                    changed: None,
                    when: None,
                }),
                DeValue::Table(table) => keys.push(self.key_table(table, item.span())),
                other => self.error(
                    item.span().start,
                    format!(
                        "`keys` must hold templates or tables, found a {}",
                        other.type_str()
                    ),
                    "put each template in double quotes, or write { template = \"...\", when = \"...\" }",
                ),
            }
        }
        keys
    }

    /// `[[table.key]]` sections.
    fn key_sections(
        &mut self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Vec<KeySpec> {
        let help = "write each as a `[[table.key]]` section";
        let DeValue::Array(entries) = value.get_ref() else {
            self.wrong_type(key, "an array of tables", help);
            return Vec::new();
        };
        let mut keys = Vec::new();
        for entry in entries.iter() {
            match entry.get_ref() {
                DeValue::Table(table) => keys.push(self.key_table(table, entry.span())),
                _ => self.wrong_type(key, "an array of tables", help),
            }
        }
        keys
    }

    fn key_table(&mut self, table: &DeTable<'_>, span: Range<usize>) -> KeySpec {
        let mut spec = KeySpec {
            span,
            template: None,
            changed: None,
            when: None,
        };
        for (field, value) in table.iter() {
            match field.get_ref().as_ref() {
                "template" => spec.template = self.string(field, value),
                "changed" => spec.changed = self.strings(field, value),
                "when" => spec.when = self.string(field, value),
                _ => self.unknown_field(field, KEY_FIELDS, "in a key table"),
            }
        }
        spec
    }

    fn string(
        &mut self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Option<Located<String>> {
        match value.get_ref() {
            DeValue::String(text) => Some(Located {
                value: text.to_string(),
                span: value.span(),
            }),
            _ => {
                self.wrong_type(key, "a string", "put the value in double quotes");
                None
            }
        }
    }

    fn strings(
        &mut self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Option<Located<Vec<Located<String>>>> {
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                key,
                "an array of strings",
                "write a list, e.g. [\"a\", \"b\"]",
            );
            return None;
        };
        let mut strings = Vec::with_capacity(items.len());
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(text) => strings.push(Located {
                    value: text.to_string(),
                    span: item.span(),
                }),
                other => self.error(
                    item.span().start,
                    format!(
                        "`{}` must be an array of strings, found a {}",
                        key.get_ref(),
                        other.type_str()
                    ),
                    "put each entry in double quotes",
                ),
            }
        }
        Some(Located {
            value: strings,
            span: value.span(),
        })
    }

    fn wrong_type(&mut self, key: &Spanned<std::borrow::Cow<'_, str>>, expected: &str, help: &str) {
        self.error(
            key.span().start,
            format!("`{}` must be {expected}", key.get_ref()),
            help,
        );
    }

    fn unknown_field(
        &mut self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        known: &[&str],
        place: &str,
    ) {
        let name = key.get_ref();
        let help = match did_you_mean(name, known) {
            Some(near) => format!("did you mean `{near}`?"),
            None => format!("known fields: {}", known.join(", ")),
        };
        self.error(
            key.span().start,
            format!("unknown field `{name}` {place}"),
            help,
        );
    }
}
