//! Load-time checks: mapping specs in, immutable [`Mappings`] out, or every
//! problem of every file with its location and fix.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use evictd_client::protocol::VERSION_NAMESPACE;

use super::condition::Condition;
use super::diagnostic::{did_you_mean, Diagnostic, Location, SourceFile};
use super::spec::{self, KeySpec, Located, RefreshSpec, TableSpec, WarmSpec};
use super::template::Template;
use super::{Mappings, Origin, OriginId, Refresh, Rule, TableMapping, Ttl, Warm};
use crate::change::{is_identifier, Op, OpSet, TableName};

/// Bounds on what one change may render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest rendered key or tag, in bytes (without the global prefix).
    /// A longer rendering falls back to its template's pattern.
    pub max_key_bytes: usize,
    /// Most keys, tags and refreshes one change may render (old and new row
    /// counted separately); enforced when the mappings load.
    pub max_keys_per_change: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: crate::config::settings::usize("mappings.max_key_bytes"),
            max_keys_per_change: crate::config::settings::usize("mappings.max_keys_per_change"),
        }
    }
}

/// Loads every `*.toml` file of `dir`, in name order.
pub fn load_dir(dir: &Path, limits: Limits) -> Result<Mappings, Vec<Diagnostic>> {
    read_dir(dir)?.compile(limits)
}

/// The mapping files of a directory as read: (path, text) in name order,
/// and what could not be read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DirFiles {
    pub files: Vec<(PathBuf, String)>,
    pub diagnostics: Vec<Diagnostic>,
    /// The process ran short of a resource while reading (file
    /// descriptors, memory): what is missing is no problem of the files,
    /// and a reread may succeed.
    pub shortage: bool,
}

impl DirFiles {
    /// The mappings of the files read, or every problem: the files that
    /// could not be read and those of the ones that were.
    pub fn compile(&self, limits: Limits) -> Result<Mappings, Vec<Diagnostic>> {
        match (load_files(&self.files, limits), self.diagnostics.is_empty()) {
            (Ok(mappings), true) => Ok(mappings),
            (Ok(_), false) => Err(self.diagnostics.clone()),
            (Err(more), _) => Err(self.diagnostics.iter().cloned().chain(more).collect()),
        }
    }
}

/// Reads every `*.toml` file of `dir`, in name order: the IO half of
/// [`load_dir`] (live reload compares what it read before compiling).
pub fn read_dir(dir: &Path) -> Result<DirFiles, Vec<Diagnostic>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            let diagnostic = Diagnostic::general(format!(
                "cannot read the mappings directory {}: {error}",
                resolved(dir)
            ));
            if is_shortage(&error) {
                return Ok(DirFiles {
                    files: Vec::new(),
                    diagnostics: vec![diagnostic],
                    shortage: true,
                });
            }
            return Err(vec![diagnostic.help(
                "point `mappings.dir` (or --mappings) at the directory of *.toml mapping files",
            )]);
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        // Everything named *.toml but a directory: a broken or looping
        // symbolic link is reported below, never skipped without a word.
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml") && !path.is_dir())
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(vec![Diagnostic::general(format!(
            "no mapping files (*.toml) in {}",
            resolved(dir)
        ))
        .help("add a file such as orders.toml with a [[table]] section")]);
    }
    let mut files = Vec::with_capacity(paths.len());
    let mut diagnostics = Vec::new();
    let mut shortage = false;
    for path in paths {
        match read_regular(&path) {
            Ok(text) => files.push((path, text)),
            Err((diagnostic, short)) => {
                shortage |= short;
                diagnostics.push(diagnostic);
            }
        }
    }
    Ok(DirFiles {
        files,
        diagnostics,
        shortage,
    })
}

/// `dir` as given and, when relative, the absolute path it resolved to
/// (a relative `mappings.dir` is relative to the config file's folder).
fn resolved(dir: &Path) -> String {
    match std::path::absolute(dir) {
        Ok(absolute) if dir.is_relative() => {
            format!("{} (resolved to {})", dir.display(), absolute.display())
        }
        _ => dir.display().to_string(),
    }
}

/// `open(2)`'s `O_NONBLOCK` on Linux: opening a FIFO for reading then
/// returns at once instead of waiting for a writer.
const O_NONBLOCK: i32 = 0o4000;

/// The text of `path` if it is a regular file (or a link to one). A FIFO,
/// socket or device is reported by name and kind, never opened in a way
/// that could block: a FIFO named `*.toml` would otherwise stop the whole
/// process until something writes to it.
fn read_regular(path: &Path) -> Result<String, (Diagnostic, bool)> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let link = path.is_symlink();
    let cannot_read = |error: std::io::Error| {
        let diagnostic = Diagnostic::general(format!(
            "cannot read {}{}: {error}",
            path.display(),
            if link { " (a symbolic link)" } else { "" }
        ));
        let shortage = is_shortage(&error);
        if link && !shortage {
            (
                diagnostic
                    .help("the link is broken or loops: point it at a mapping file, or remove it"),
                false,
            )
        } else {
            (diagnostic, shortage)
        }
    };
    let not_regular = |file_type: std::fs::FileType| {
        let kind = file_kind(file_type);
        let diagnostic = Diagnostic::general(format!(
            "{}{} is {kind}, not a regular file",
            path.display(),
            if link { " (a symbolic link)" } else { "" }
        ))
        .help("only regular *.toml files are read as mappings: remove it, rename it or move it out of the directory");
        (diagnostic, false)
    };
    // stat first: it names a socket, which open() refuses with ENXIO.
    let metadata = std::fs::metadata(path).map_err(cannot_read)?;
    if !metadata.is_file() {
        return Err(not_regular(metadata.file_type()));
    }
    // Non-blocking, and checked again on the open file: the path may have
    // been replaced by a FIFO since.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .map_err(cannot_read)?;
    let metadata = file.metadata().map_err(cannot_read)?;
    if !metadata.is_file() {
        return Err(not_regular(metadata.file_type()));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(cannot_read)?;
    Ok(text)
}

/// Whether `error` is the process running short (of file descriptors, its
/// own or the system's, or of memory) rather than a problem of the file.
fn is_shortage(error: &std::io::Error) -> bool {
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(error.raw_os_error(), Some(ENOMEM | ENFILE | EMFILE))
}

/// What a directory entry that is not a regular file is, in words.
fn file_kind(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_dir() {
        "a directory"
    } else {
        "not a file"
    }
}

/// Loads one mapping file's text; `path` is only used in locations.
pub fn load_str(path: &str, text: &str, limits: Limits) -> Result<Mappings, Vec<Diagnostic>> {
    load_files(&[(PathBuf::from(path), text.to_owned())], limits)
}

/// Loads several files given as (path, text).
pub fn load_files(
    files: &[(PathBuf, String)],
    limits: Limits,
) -> Result<Mappings, Vec<Diagnostic>> {
    let mut builder = Builder {
        tables: HashMap::new(),
        seen: HashMap::new(),
        origins: Vec::new(),
        origin_tables: Vec::new(),
        diagnostics: Vec::new(),
        limits,
    };
    for (path, text) in files {
        let file = SourceFile::new(path, text);
        let specs = spec::read_file(&file, &mut builder.diagnostics);
        for spec in &specs {
            builder.table(&file, spec);
        }
    }
    if builder.diagnostics.is_empty() {
        // The last origin stands for invalidations from SQL messages.
        builder.origins.push(Origin {
            location: Location {
                file: Path::new(super::message::ORIGIN_FILE).into(),
                line: 0,
                column: 0,
            },
        });
        builder
            .origin_tables
            .push(super::message::ORIGIN_TABLE.into());
        let origin_patterns = origin_patterns(&builder.tables, builder.origins.len());
        Ok(Mappings {
            tables: builder.tables,
            origins: builder.origins,
            origin_tables: builder.origin_tables.into(),
            origin_patterns,
            files: files.len(),
            limits,
        })
    } else {
        let mut diagnostics = builder.diagnostics;
        diagnostics.sort_by_key(|d| {
            d.location
                .as_ref()
                .map(|l| (l.file.clone(), l.line, l.column))
        });
        Err(diagnostics)
    }
}

/// The pattern of each origin's template, indexed by [`OriginId`]: what
/// stands for every key (tag, counter) the rule can render.
fn origin_patterns(
    tables: &HashMap<TableName, TableMapping>,
    origins: usize,
) -> Arc<[Option<Arc<str>>]> {
    let mut patterns: Vec<Option<Arc<str>>> = vec![None; origins];
    let mut set = |origin: OriginId, pattern: String| {
        if let Some(slot) = patterns.get_mut(origin.0 as usize) {
            *slot = Some(pattern.into());
        }
    };
    for mapping in tables.values() {
        for rule in mapping.keys.iter().chain(&mapping.tags) {
            set(rule.origin, rule.template.pattern(|_| None));
        }
        for rule in &mapping.versions {
            let pattern = rule.template.pattern(|_| None);
            set(rule.origin, format!("{VERSION_NAMESPACE}{pattern}"));
        }
        for refresh in &mapping.refresh {
            set(refresh.origin, refresh.key.pattern(|_| None));
        }
    }
    patterns.into()
}

struct Builder {
    tables: HashMap<TableName, TableMapping>,
    /// Where each table was first named, for duplicate reports.
    seen: HashMap<TableName, Location>,
    origins: Vec<Origin>,
    /// The table of each origin (`?` for one whose entry had errors).
    origin_tables: Vec<Arc<str>>,
    diagnostics: Vec<Diagnostic>,
    limits: Limits,
}

/// One file being compiled, so that every check can locate its findings.
struct FileScope<'b, 'f> {
    builder: &'b mut Builder,
    file: &'f SourceFile<'f>,
    errors_before: usize,
}

impl Builder {
    fn table(&mut self, file: &SourceFile<'_>, spec: &TableSpec) {
        let mut scope = FileScope {
            errors_before: self.diagnostics.len(),
            builder: self,
            file,
        };
        scope.duplicate(spec);
        let mapping = scope.table(spec);
        let name: Arc<str> = mapping
            .as_ref()
            .map_or_else(|| "?".into(), |mapping| mapping.table.to_string().into());
        self.origin_tables.resize(self.origins.len(), name);
        if let Some(mapping) = mapping {
            let table = mapping.table.as_ref().clone();
            self.tables.insert(table, mapping);
        }
    }
}

impl FileScope<'_, '_> {
    fn error(&mut self, offset: usize, message: impl Into<String>, help: impl Into<String>) {
        let location = self.file.locate(offset);
        let diagnostic = Diagnostic::at(location, message).help(help);
        self.builder.diagnostics.push(diagnostic);
    }

    fn origin(&mut self, offset: usize) -> OriginId {
        let location = self.file.locate(offset);
        let id = u32::try_from(self.builder.origins.len()).expect("fewer than 2^32 rules");
        self.builder.origins.push(Origin { location });
        OriginId(id)
    }

    /// Reports a table mapped a second time (whether or not either entry
    /// has other problems).
    fn duplicate(&mut self, spec: &TableSpec) {
        let Some(name) = &spec.name else {
            return;
        };
        let Ok(table) = TableName::parse(&name.value) else {
            return;
        };
        let location = self.file.locate(name.span.start);
        match self.builder.seen.get(&table) {
            Some(first) => {
                let message = format!("table {table} is mapped twice; first at {first}");
                self.error(
                    name.span.start,
                    message,
                    "merge the two [[table]] entries into one",
                );
            }
            None => {
                self.builder.seen.insert(table, location);
            }
        }
    }

    fn table(&mut self, spec: &TableSpec) -> Option<TableMapping> {
        let Some(name) = &spec.name else {
            self.error(
                spec.span.start,
                "[[table]] entry has no `name`",
                "add `name = \"schema.table\"` to the entry",
            );
            return None;
        };
        let table = match TableName::parse(&name.value) {
            Ok(table) => Arc::new(table),
            Err(message) => {
                self.error(name.span.start, message, "write `table` or `schema.table`");
                return None;
            }
        };
        let origin = self.origin(name.span.start);
        let on = self.ops(spec.on.as_ref());
        let changed = self.changed(spec.changed.as_ref());
        let changed_origins = spec
            .changed
            .as_ref()
            .map_or_else(Box::default, |changed| self.element_origins(&changed.value));
        let keys = self.key_rules(&spec.keys);
        let when = spec.when.as_ref().and_then(|when| self.condition(when));
        let tags = self.rules(&spec.tags, "tags");
        let versions = self.rules(&spec.versions, "versions");
        let prefixes = self.rules(&spec.prefixes, "prefixes");
        for (rule, written) in prefixes.iter().zip(&spec.prefixes) {
            if !rule.template.ends_with_separator() {
                self.error(
                    written.span.start,
                    format!("prefix `{}` does not end with a separator", written.value),
                    format!("end it with one, e.g. \"{}:\": without, its SCAN would also delete keys that merely start with the same text (`user:1` matches `user:10...`)", written.value),
                );
            }
        }
        let surrogate_keys = self.rules(&spec.surrogate_keys, "surrogate_keys");
        let warm: Vec<Warm> = spec.warm.iter().map(|w| self.warm(w, spec)).collect();
        let refresh: Vec<Refresh> = spec
            .refresh
            .iter()
            .filter_map(|r| self.refresh(r, &spec.keys))
            .collect();
        if spec.keys.is_empty()
            && spec.tags.is_empty()
            && spec.versions.is_empty()
            && spec.prefixes.is_empty()
            && spec.surrogate_keys.is_empty()
            && spec.refresh.is_empty()
            && !spec.malformed
        {
            self.error(
                name.span.start,
                format!("table {table} maps nothing"),
                "give it `keys`, `tags`, `versions`, `prefixes`, `surrogate_keys` or a [[table.refresh]]",
            );
        }
        let renderings = 2
            * (keys.len()
                + tags.len()
                + versions.len()
                + prefixes.len()
                + surrogate_keys.len()
                + refresh.len());
        if renderings > self.builder.limits.max_keys_per_change {
            self.error(
                name.span.start,
                format!(
                    "table {table} renders up to {renderings} keys per change (old and new row), more than max_keys_per_change = {}",
                    self.builder.limits.max_keys_per_change
                ),
                "use tags for large groups of keys, or raise `mappings.max_keys_per_change`",
            );
        }
        if self.builder.diagnostics.len() > self.errors_before {
            return None;
        }
        Some(TableMapping {
            table,
            origin,
            on,
            changed,
            changed_origins,
            keys,
            tags,
            versions,
            prefixes,
            surrogate_keys,
            refresh,
            warm,
            when,
        })
    }

    fn warm(&mut self, spec: &WarmSpec, table: &TableSpec) -> Warm {
        if table.refresh.is_empty() {
            self.error(
                spec.span.start,
                "[[table.warm]] on an entry with no [[table.refresh]]: there is nothing to warm",
                "add a [[table.refresh]] section, or remove the [[table.warm]] one",
            );
        }
        if spec.order_by.is_some() && spec.limit.is_none() {
            self.error(
                spec.span.start,
                "[[table.warm]] has `order_by` but no `limit`",
                "add `limit = N`: an ordered warm reads its rows in one query",
            );
        }
        for text in [&spec.filter, &spec.order_by].into_iter().flatten() {
            if text.value.contains(';') {
                self.error(
                    text.span.start,
                    "a [[table.warm]] clause may not contain `;`",
                    "write one SQL condition or ordering",
                );
            }
        }
        Warm {
            filter: spec.filter.as_ref().map(|f| f.value.clone()),
            order_by: spec.order_by.as_ref().map(|o| o.value.clone()),
            limit: spec.limit.as_ref().map(|l| l.value),
            origin: self.origin(spec.span.start),
        }
    }

    fn ops(&mut self, on: Option<&Located<Vec<Located<String>>>>) -> OpSet {
        let Some(on) = on else {
            return OpSet::ALL;
        };
        let mut ops = OpSet::default();
        for op in &on.value {
            match Op::parse(&op.value) {
                Some(parsed) => ops.insert(parsed),
                None => {
                    let names = Op::ALL.map(Op::as_str);
                    let help = match did_you_mean(&op.value, &names) {
                        Some(near) => format!("did you mean \"{near}\"?"),
                        None => "use insert, update, delete or truncate".to_owned(),
                    };
                    self.error(
                        op.span.start,
                        format!("unknown op `{}` in `on`", op.value),
                        help,
                    );
                }
            }
        }
        if on.value.is_empty() {
            self.error(
                on.span.start,
                "`on` is empty, so the mapping would never apply",
                "list the ops to act on, or remove `on` for all four",
            );
        }
        ops
    }

    fn changed(
        &mut self,
        changed: Option<&Located<Vec<Located<String>>>>,
    ) -> Option<Box<[Box<str>]>> {
        let changed = changed?;
        if changed.value.is_empty() {
            self.error(
                changed.span.start,
                "`changed` is empty, so every update would be skipped",
                "list the columns whose change matters, or remove `changed`",
            );
        }
        let columns = self.column_names(&changed.value, "changed");
        Some(columns)
    }

    fn column_names(&mut self, columns: &[Located<String>], field: &str) -> Box<[Box<str>]> {
        for column in columns {
            if !is_identifier(&column.value) {
                self.error(
                    column.span.start,
                    format!("`{}` in `{field}` is not a column name", column.value),
                    "write a column name: letters, digits, `_`, `$`, not starting with a digit",
                );
            }
        }
        columns.iter().map(|c| c.value.as_str().into()).collect()
    }

    /// Where each element of a list was written, for checks that find a
    /// problem with one of them later (a column the table lacks).
    fn element_origins(&mut self, elements: &[Located<String>]) -> Box<[OriginId]> {
        elements
            .iter()
            .map(|element| self.origin(element.span.start))
            .collect()
    }

    fn rules(&mut self, templates: &[Located<String>], field: &str) -> Vec<Rule> {
        let mut rules: Vec<Rule> = Vec::with_capacity(templates.len());
        for (index, written) in templates.iter().enumerate() {
            let Some(template) = self.template(written) else {
                continue;
            };
            if templates[..index]
                .iter()
                .any(|earlier| earlier.value == written.value)
            {
                self.error(
                    written.span.start,
                    format!("`{}` is listed twice in `{field}`", written.value),
                    "remove the duplicate",
                );
                continue;
            }
            let origin = self.origin(written.span.start);
            rules.push(Rule {
                template,
                origin,
                changed: None,
                when: None,
            });
        }
        rules
    }

    /// `keys`: templates, each with its own `changed` and `when` in the
    /// table form.
    fn key_rules(&mut self, keys: &[KeySpec]) -> Vec<Rule> {
        let mut rules: Vec<Rule> = Vec::with_capacity(keys.len());
        for (index, key) in keys.iter().enumerate() {
            let Some(written) = &key.template else {
                self.error(
                    key.span.start,
                    "a key table has no `template`",
                    "add `template = \"...\"`, the key to delete",
                );
                continue;
            };
            let changed = self.changed(key.changed.as_ref());
            let when = key.when.as_ref().and_then(|when| self.condition(when));
            let Some(template) = self.template(written) else {
                continue;
            };
            let twice = keys[..index].iter().any(|earlier| {
                earlier
                    .template
                    .as_ref()
                    .is_some_and(|earlier| earlier.value == written.value)
            });
            if twice {
                self.error(
                    written.span.start,
                    format!("`{}` is listed twice in `keys`", written.value),
                    "remove the duplicate, or merge the two into one key table",
                );
                continue;
            }
            let origin = self.origin(written.span.start);
            rules.push(Rule {
                template,
                origin,
                changed,
                when,
            });
        }
        rules
    }

    /// A `when` condition, or its error at the offending character.
    fn condition(&mut self, written: &Located<String>) -> Option<Condition> {
        match Condition::parse(&written.value) {
            Ok(condition) => Some(condition),
            Err(error) => {
                let quote = string_quote_len(self.file.text, &written.span);
                self.error(
                    written.span.start + quote + error.offset,
                    format!("in `when`: {}", error.message),
                    error.help,
                );
                None
            }
        }
    }

    fn template(&mut self, written: &Located<String>) -> Option<Template> {
        if written.value.starts_with(RESERVED) {
            self.error(
                written.span.start,
                format!(
                    "`{}` is under `{RESERVED}`, where evictd keeps its own keys",
                    written.value
                ),
                "give the family another name, e.g. \"app:...\"",
            );
            return None;
        }
        match Template::parse(&written.value) {
            Ok(template) => {
                let max = self.builder.limits.max_key_bytes;
                if template.literal_len() > max {
                    self.error(
                        written.span.start,
                        format!(
                            "template `{}` is longer than max_key_bytes = {max}",
                            written.value
                        ),
                        "shorten the template, or raise `mappings.max_key_bytes`",
                    );
                    return None;
                }
                if let Some((message, help)) = template.family_problem() {
                    self.error(written.span.start, message, help);
                    return None;
                }
                Some(template)
            }
            Err(error) => {
                let quote = string_quote_len(self.file.text, &written.span);
                self.error(
                    written.span.start + quote + error.offset,
                    error.message,
                    error.help,
                );
                None
            }
        }
    }

    fn refresh(&mut self, spec: &RefreshSpec, delete_keys: &[KeySpec]) -> Option<Refresh> {
        let Some(key) = &spec.key else {
            self.error(
                spec.span.start,
                "[[table.refresh]] has no `key`",
                "add `key = \"...\"`, the key to write",
            );
            return None;
        };
        let template = self.template(key);
        let when = spec.when.as_ref().and_then(|when| self.condition(when));
        let deleted = delete_keys
            .iter()
            .filter_map(|delete| delete.template.as_ref());
        if deleted.into_iter().any(|delete| delete.value == key.value) {
            self.error(
                key.span.start,
                format!("refresh key `{}` is also a delete key in `keys`", key.value),
                "remove it from `keys`: the refresh already replaces the stale value",
            );
        }
        let columns = match &spec.columns {
            Some(columns) if !columns.value.is_empty() => {
                self.column_names(&columns.value, "columns")
            }
            Some(columns) => {
                self.error(
                    columns.span.start,
                    "`columns` is empty",
                    "list the columns the cached value holds",
                );
                Box::default()
            }
            None => {
                self.error(
                    key.span.start,
                    "[[table.refresh]] has no `columns`",
                    "add `columns = [...]`, the columns of the JSON value",
                );
                Box::default()
            }
        };
        let ttl = self.ttl(spec);
        let origin = self.origin(key.span.start);
        let column_origins = spec
            .columns
            .as_ref()
            .map_or_else(Box::default, |columns| self.element_origins(&columns.value));
        Some(Refresh {
            key: template?,
            columns,
            column_origins,
            ttl,
            origin,
            when,
        })
    }

    fn ttl(&mut self, spec: &RefreshSpec) -> Option<Ttl> {
        let jitter_bp = spec.jitter.as_ref().and_then(|jitter| self.jitter(jitter));
        let Some(ttl) = &spec.ttl else {
            if let Some(jitter) = &spec.jitter {
                self.error(
                    jitter.span.start,
                    "`jitter` without `ttl`",
                    "add a `ttl` for the jitter to vary, or remove `jitter`",
                );
            }
            return None;
        };
        match parse_ttl(&ttl.value) {
            Ok(seconds) => Some(Ttl {
                seconds,
                jitter_bp: jitter_bp.unwrap_or(0),
            }),
            Err(why) => {
                self.error(
                    ttl.span.start,
                    format!("bad ttl `{}`: {why}", ttl.value),
                    TTL_HELP,
                );
                None
            }
        }
    }

    fn jitter(&mut self, jitter: &Located<String>) -> Option<u32> {
        let share = jitter
            .value
            .strip_suffix('%')
            .and_then(|number| number.trim().parse::<f64>().ok())
            .filter(|share| (0.0..100.0).contains(share));
        match share {
            // In range 0..100, so the rounded basis points fit a u32.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Some(share) => Some((share * 100.0).round() as u32),
            None => {
                self.error(
                    jitter.span.start,
                    format!("bad jitter `{}`", jitter.value),
                    "write a percentage of the ttl from 0% to below 100%, e.g. \"10%\"",
                );
                None
            }
        }
    }
}

/// Bytes of the opening quote of the TOML string written at `span`.
fn string_quote_len(text: &str, span: &Range<usize>) -> usize {
    let written = text.get(span.clone()).unwrap_or_default();
    if written.starts_with("\"\"\"") || written.starts_with("'''") {
        3
    } else {
        1
    }
}

/// Where evictd keeps its own keys (the broadcast log, namespace counters,
/// continuity records): no mapping may render a key there.
const RESERVED: &str = "evictd:";

/// The longest TTL a mapping may give: 365 days.
const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;

const TTL_HELP: &str = "write whole numbers with the units s, m, h and d, largest first, from 1s to 365d: e.g. \"30s\", \"15m\", \"1h30m\", \"7d\"";

/// A mapping's TTL in seconds: whole numbers with units `s`, `m`, `h`, `d`,
/// each unit at most once and largest first (`30s`, `15m`, `1h30m`, `7d`),
/// from 1 s to 365 d. Else why not.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("it is empty".into());
    }
    let mut total: u64 = 0;
    let mut previous_unit = u64::MAX;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("`{rest}` does not start with a whole number"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| "the number is too large".to_owned())?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim_end();
        let seconds = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "" => return Err(format!("`{number}` has no unit")),
            "ms" | "us" | "µs" | "ns" => return Err("a TTL is whole seconds".into()),
            other => return Err(format!("`{other}` is not a unit")),
        };
        if seconds >= previous_unit {
            return Err("give each unit once, largest first".into());
        }
        previous_unit = seconds;
        total = number
            .checked_mul(seconds)
            .and_then(|part| total.checked_add(part))
            .filter(|total| *total <= MAX_TTL_SECONDS)
            .ok_or_else(|| "it is longer than 365d".to_owned())?;
        rest = rest[unit_len..].trim_start();
    }
    if total == 0 {
        return Err("it must be at least 1s".into());
    }
    Ok(total)
}

#[cfg(test)]
mod ttl_tests {
    use super::parse_ttl;

    #[test]
    fn the_ttl_grammar() {
        for (text, seconds) in [
            ("30s", 30),
            ("15m", 900),
            ("1h30m", 5400),
            ("1h 30m", 5400),
            ("7d", 604_800),
            ("365d", 31_536_000),
        ] {
            assert_eq!(parse_ttl(text), Ok(seconds), "{text}");
        }
        for (text, why) in [
            (
                "five minutes",
                "`five minutes` does not start with a whole number",
            ),
            ("5", "`5` has no unit"),
            ("5ms", "a TTL is whole seconds"),
            ("100y", "`y` is not a unit"),
            ("366d", "it is longer than 365d"),
            ("30m1h", "give each unit once, largest first"),
            ("0s", "it must be at least 1s"),
            ("", "it is empty"),
        ] {
            assert_eq!(parse_ttl(text), Err(why.to_owned()), "{text}");
        }
    }
}
