//! Key and tag templates: literal text with `{column}` placeholders.
//!
//! A placeholder may reach into a json/jsonb column (`{payload.items.0.id}`:
//! object fields and array indexes) and end with one transform
//! (`{email|lower}`: `lower`, `upper`, `trim`, `date`, `hour`, `month`,
//! `hash`).
//!
//! A template is parsed once, at load time, into literal parts and column
//! references. Rendering percent-encodes every value's `%`, `:`, `{`, `}`,
//! `*`, `?`, square brackets and whitespace, so a value can neither collide with
//! another key's structure nor act as a glob in a pattern. `{{` and `}}` are
//! literal braces in the template text.

use crate::change::{is_identifier, Datum};

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    source: Box<str>,
    parts: Box<[Part]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(Box<str>),
    Column(Placeholder),
}

/// `{column.path|transform}`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Placeholder {
    column: Box<str>,
    /// Fields (or array indexes) into a json/jsonb value.
    path: Box<[Box<str>]>,
    transform: Option<Transform>,
}

/// What a placeholder does to its value before it is escaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    Lower,
    Upper,
    Trim,
    /// `YYYY-MM-DD` of a date or timestamp.
    Date,
    /// `YYYY-MM-DD HH` of a timestamp.
    Hour,
    /// `YYYY-MM` of a date or timestamp.
    Month,
    /// 16 lowercase hex digits of the value's 64-bit FNV-1a hash.
    Hash,
}

impl Transform {
    pub const NAMES: [&'static str; 7] =
        ["lower", "upper", "trim", "date", "hour", "month", "hash"];

    /// The name a placeholder writes it with.
    pub fn name(self) -> &'static str {
        match self {
            Transform::Lower => "lower",
            Transform::Upper => "upper",
            Transform::Trim => "trim",
            Transform::Date => "date",
            Transform::Hour => "hour",
            Transform::Month => "month",
            Transform::Hash => "hash",
        }
    }

    fn parse(name: &str) -> Option<Transform> {
        Some(match name {
            "lower" => Transform::Lower,
            "upper" => Transform::Upper,
            "trim" => Transform::Trim,
            "date" => Transform::Date,
            "hour" => Transform::Hour,
            "month" => Transform::Month,
            "hash" => Transform::Hash,
            _ => return None,
        })
    }

    /// `text` transformed; `None` when a truncation does not apply (not a
    /// date or timestamp).
    fn apply(self, text: &str) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            Transform::Lower => Some(text.to_lowercase().into()),
            Transform::Upper => Some(text.to_uppercase().into()),
            Transform::Trim => Some(text.trim().into()),
            Transform::Date => truncate(text, Truncation::Day),
            Transform::Month => truncate(text, Truncation::Month),
            Transform::Hour => truncate(text, Truncation::Hour),
            Transform::Hash => Some(format!("{:016x}", fnv1a(text.as_bytes())).into()),
        }
    }
}

#[derive(Clone, Copy)]
enum Truncation {
    Month,
    Day,
    Hour,
}

/// The leading `YYYY-MM` / `YYYY-MM-DD` / `YYYY-MM-DD HH` of a date or
/// timestamp as Postgres writes it, whatever follows (minutes, a time
/// zone), with ` BC` appended when the text ends with it: the year has four
/// digits or more (`12024-01-31`), and a BC date never renders like the AD
/// one (`0044-03-15 BC`). `None` for text that does not start so.
fn truncate(text: &str, to: Truncation) -> Option<std::borrow::Cow<'_, str>> {
    let bytes = text.as_bytes();
    let year = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if year < 4 {
        return None;
    }
    let digits = |at: usize, sep: u8| {
        bytes.get(at) == Some(&sep)
            && bytes
                .get(at + 1..at + 3)
                .is_some_and(|two| two.iter().all(u8::is_ascii_digit))
    };
    // `-MM` after the year, `-DD` after the month, ` HH` after the day.
    let (month, day, hour) = (year + 3, year + 6, year + 9);
    let end = match to {
        Truncation::Month if digits(year, b'-') => month,
        Truncation::Day if digits(year, b'-') && digits(month, b'-') => day,
        Truncation::Hour if digits(year, b'-') && digits(month, b'-') && digits(day, b' ') => hour,
        _ => return None,
    };
    let head = &text[..end];
    if text.ends_with(" BC") {
        Some(format!("{head} BC").into())
    } else {
        Some(head.into())
    }
}

/// 64-bit FNV-1a: small, stable across platforms and releases, and easy to
/// compute in any language (docs/MAPPINGS.md gives its constants).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Why a placeholder has no text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    /// The column is NULL.
    Null,
    /// The json path leads nowhere: step `0` (counted from 0) is not there.
    PathMissing(usize),
    /// The json path ends at a JSON null.
    JsonNull,
    /// A date truncation of a value that is no date.
    NotADate,
    /// The value is not known (unchanged TOAST, not sent).
    Unknown,
}

impl Placeholder {
    /// The text the placeholder renders from `datum`, or why there is none.
    fn text<'d>(&self, datum: &'d Datum) -> Result<std::borrow::Cow<'d, str>, Miss> {
        if let Datum::Null = datum {
            return Err(Miss::Null);
        }
        let text = datum.canonical_text().ok_or(Miss::Unknown)?;
        let text: std::borrow::Cow<'d, str> = if self.path.is_empty() {
            text.into()
        } else {
            json_path(text, &self.path)?.into()
        };
        match self.transform {
            None => Ok(text),
            Some(transform) => match text {
                std::borrow::Cow::Borrowed(text) => transform.apply(text).ok_or(Miss::NotADate),
                std::borrow::Cow::Owned(text) => transform
                    .apply(&text)
                    .map(|out| std::borrow::Cow::Owned(out.into_owned()))
                    .ok_or(Miss::NotADate),
            },
        }
    }

    /// `column.path` as written.
    fn path_text(&self, steps: usize) -> String {
        let mut text = self.column.to_string();
        for step in self.path.iter().take(steps) {
            text.push('.');
            text.push_str(step);
        }
        text
    }
}

/// The value at `path` in the JSON `text`, as text: a string without its
/// quotes (escapes resolved), anything else exactly as it stands in `text`
/// (a number's digits, an object or array with its spacing and key order).
/// That is Postgres' own `column #>> path`: for `jsonb` the text Postgres
/// gives (numbers as their numeric text, `1.50` stays `1.50`, objects with
/// its key order and spacing), for `json` the text as written. `None` for
/// null or a path that is not there; of duplicate keys the last counts, as
/// in Postgres.
fn json_path(text: &str, path: &[Box<str>]) -> Result<String, Miss> {
    use serde_json::value::RawValue;
    let mut value: &RawValue = serde_json::from_str(text).map_err(|_| Miss::PathMissing(0))?;
    for (at, step) in path.iter().enumerate() {
        let json = value.get();
        let missing = Miss::PathMissing(at);
        value = match json.trim_start().as_bytes().first() {
            Some(b'{') => {
                let fields: Vec<(String, &RawValue)> =
                    serde_json::from_str::<ObjectEntries<'_>>(json)
                        .map_err(|_| missing)?
                        .0;
                fields
                    .into_iter()
                    .rev()
                    .find(|(name, _)| name == &**step)
                    .ok_or(missing)?
                    .1
            }
            Some(b'[') => {
                let index: usize = step.parse().map_err(|_| missing)?;
                let items: Vec<&RawValue> = serde_json::from_str(json).map_err(|_| missing)?;
                *items.get(index).ok_or(missing)?
            }
            _ => return Err(missing),
        };
    }
    let json = value.get().trim();
    match json.as_bytes().first() {
        Some(b'n') => Err(Miss::JsonNull),
        Some(b'"') => serde_json::from_str(json).map_err(|_| Miss::JsonNull),
        _ => Ok(json.to_owned()),
    }
}

/// An object's entries in order, duplicates kept.
struct ObjectEntries<'a>(Vec<(String, &'a serde_json::value::RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for ObjectEntries<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = ObjectEntries<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(ObjectEntries(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// A template syntax error at a byte offset inside the template text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateError {
    pub offset: usize,
    pub message: String,
    pub help: String,
}

/// Why a template did not render to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unrendered<'t> {
    /// A placeholder has no value (NULL, a json path that leads nowhere, a
    /// date truncation of no date): the key does not exist. The placeholder
    /// as written (`payload.items.0`), and why.
    Null(&'t str, Absent<'t>),
    /// A placeholder's value is not known (unchanged TOAST, not sent).
    Unavailable(&'t str),
}

/// Why a placeholder has no value; its `Display` says it in words (for
/// `explain`), only when asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Absent<'t> {
    placeholder: &'t Placeholder,
    miss: Miss,
}

impl std::fmt::Display for Absent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let placeholder = self.placeholder;
        match self.miss {
            Miss::Null | Miss::Unknown => write!(f, "{} is NULL", placeholder.column),
            Miss::PathMissing(at) => write!(
                f,
                "{} is not NULL, but it has no `{}`",
                placeholder.column,
                placeholder.path_text(at + 1)
            ),
            Miss::JsonNull => write!(
                f,
                "`{}` is JSON null",
                placeholder.path_text(placeholder.path.len())
            ),
            Miss::NotADate => write!(
                f,
                "`{}` is no date or timestamp, so |{} gives nothing",
                placeholder.path_text(placeholder.path.len()),
                placeholder.transform.map_or("", Transform::name)
            ),
        }
    }
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        if source.is_empty() {
            return Err(TemplateError {
                offset: 0,
                message: "template is empty".into(),
                help: "write the key, e.g. \"order:{id}\"".into(),
            });
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = source.char_indices().peekable();
        while let Some((offset, c)) = rest.next() {
            match c {
                '{' if rest.peek().map(|&(_, c)| c) == Some('{') => {
                    rest.next();
                    literal.push('{');
                }
                '}' if rest.peek().map(|&(_, c)| c) == Some('}') => {
                    rest.next();
                    literal.push('}');
                }
                '{' => {
                    let start = offset + 1;
                    let Some(end) = source[start..].find('}').map(|end| start + end) else {
                        return Err(TemplateError {
                            offset,
                            message: "unclosed `{` in template".into(),
                            help:
                                "close the placeholder with `}`, or write `{{` for a literal brace"
                                    .into(),
                        });
                    };
                    let placeholder = placeholder(&source[start..end], offset)?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal).into()));
                    }
                    parts.push(Part::Column(placeholder));
                    while rest.peek().is_some_and(|&(next, _)| next <= end) {
                        rest.next();
                    }
                }
                '}' => {
                    return Err(TemplateError {
                        offset,
                        message: "unmatched `}` in template".into(),
                        help: "write `}}` for a literal brace".into(),
                    })
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal.into()));
        }
        Ok(Template {
            source: source.into(),
            parts: parts.into(),
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Placeholders that shape their value (a transform or a json path),
    /// as written (`{email|lower}`, `{payload.slug}`), for `explain`.
    pub fn shaped(&self) -> Vec<String> {
        self.parts
            .iter()
            .filter_map(|part| match part {
                Part::Column(p) if p.transform.is_some() || !p.path.is_empty() => {
                    let mut text = format!("{{{}", p.column);
                    for step in &*p.path {
                        text.push('.');
                        text.push_str(step);
                    }
                    if let Some(transform) = p.transform {
                        text.push('|');
                        text.push_str(transform.name());
                    }
                    text.push('}');
                    Some(text)
                }
                _ => None,
            })
            .collect()
    }

    /// The columns the template reads, in order of appearance.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Column(placeholder) => Some(&*placeholder.column),
            Part::Literal(_) => None,
        })
    }

    /// The columns the template reaches into with a json path.
    pub fn json_columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Column(placeholder) if !placeholder.path.is_empty() => Some(&*placeholder.column),
            _ => None,
        })
    }

    /// Why the widest pattern this template can fall back to (every
    /// placeholder unknown: a coarse invalidation, a key over
    /// `max_key_bytes`) would match more than its own key family, if it
    /// would. Such a pattern could delete unrelated keys, so the template is
    /// refused when the mappings load.
    pub fn family_problem(&self) -> Option<(String, &'static str)> {
        let prefix = match self.parts.first() {
            Some(Part::Literal(text)) => &**text,
            Some(Part::Column(_)) => "",
            // An empty template does not parse.
            None => return None,
        };
        if self.parts.len() == 1 && !prefix.is_empty() {
            // No placeholder: the pattern is the key itself.
            return None;
        }
        let pattern = self.pattern(|_| None);
        let source = shortened(&self.source);
        if prefix.is_empty() {
            return Some((
                format!(
                    "`{source}` starts with a placeholder: its fallback pattern `{}` has no literal prefix and would delete keys of every family",
                    shortened(&pattern)
                ),
                "start the template with its family's name and a separator, e.g. \"order:{id}\"",
            ));
        }
        if prefix.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            return Some((
                format!(
                    "`{source}`: its fallback pattern `{}` also matches other families' keys (e.g. `{prefix}s:...`), because the literal prefix `{prefix}` does not end with a separator",
                    shortened(&pattern)
                ),
                "end the literal prefix with a separator such as `:`, e.g. \"order:{id}\"",
            ));
        }
        None
    }

    /// Whether the template ends with literal text whose last character is
    /// a separator (not a letter, digit or `_`): what a prefix needs, so
    /// that `user:{id}:` cannot match the keys of another id.
    pub fn ends_with_separator(&self) -> bool {
        match self.parts.last() {
            Some(Part::Literal(text)) => text
                .chars()
                .next_back()
                .is_some_and(|c| !c.is_alphanumeric() && c != '_'),
            _ => false,
        }
    }

    /// The literal text before the first placeholder, and whether there is
    /// a placeholder at all: every key the template renders starts with
    /// that text (and is exactly it when there is none).
    pub fn literal_head(&self) -> (&str, bool) {
        let head = match self.parts.first() {
            Some(Part::Literal(text)) => text,
            _ => "",
        };
        let placeholders = self
            .parts
            .iter()
            .any(|part| matches!(part, Part::Column(_)));
        (head, placeholders)
    }

    /// Bytes of literal text: a lower bound of every rendered key's length.
    pub fn literal_len(&self) -> usize {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Literal(text) => text.len(),
                Part::Column(_) => 0,
            })
            .sum()
    }

    /// Renders the template with the values `value_of` gives, or says why it
    /// cannot. NULL wins over unavailable: a key with a NULL part does not
    /// exist whatever the other parts are.
    pub fn render<'r>(
        &self,
        value_of: impl Fn(&str) -> &'r Datum,
    ) -> Result<String, Unrendered<'_>> {
        // One pass, each value looked up once; a NULL anywhere still wins
        // over an unavailable value before it.
        let mut unavailable = None;
        let mut key = String::with_capacity(self.literal_len() + 16);
        for part in self.parts.iter() {
            match part {
                Part::Literal(text) => key.push_str(text),
                Part::Column(placeholder) => {
                    match placeholder.text(value_of(&placeholder.column)) {
                        Ok(text) => escape_value(&text, &mut key),
                        Err(Miss::Unknown) => {
                            unavailable = unavailable.or(Some(&*placeholder.column));
                        }
                        Err(miss) => {
                            return Err(Unrendered::Null(
                                &placeholder.column,
                                Absent { placeholder, miss },
                            ))
                        }
                    }
                }
            }
        }
        match unavailable {
            Some(column) => Err(Unrendered::Unavailable(column)),
            None => Ok(key),
        }
    }

    /// A Redis glob that matches every key the template can render whose
    /// known parts equal `value_of`'s: placeholders whose value is unknown
    /// (or all of them, for `|_| None`) become `*`.
    pub fn pattern<'r>(&self, value_of: impl Fn(&str) -> Option<&'r str>) -> String {
        let mut pattern = String::with_capacity(self.source.len());
        for part in self.parts.iter() {
            match part {
                Part::Literal(text) => escape_glob(text, &mut pattern),
                Part::Column(placeholder) => {
                    let datum = value_of(&placeholder.column).map(|text| Datum::Text(text.into()));
                    match datum
                        .as_ref()
                        .and_then(|datum| placeholder.text(datum).ok())
                    {
                        Some(text) => {
                            let mut escaped = String::with_capacity(text.len());
                            escape_value(&text, &mut escaped);
                            escape_glob(&escaped, &mut pattern);
                        }
                        None => {
                            if !pattern.ends_with('*') || pattern.ends_with("\\*") {
                                pattern.push('*');
                            }
                        }
                    }
                }
            }
        }
        pattern
    }
}

/// A placeholder's text read back from a rendered key (`evictd trace`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    /// The placeholder as written, without braces: `email|lower`.
    pub placeholder: String,
    pub column: String,
    /// The text the key holds, percent-escapes undone.
    pub value: String,
    /// Whether the value is the column's own text (no json path, no
    /// transform).
    pub exact: bool,
    /// The json path into the column, if any.
    pub path: Vec<String>,
    /// The transform's name, if any.
    pub transform: Option<&'static str>,
}

impl Template {
    /// What each placeholder holds when this template rendered `key`, or
    /// `None` when it cannot have. Where two readings are possible (a
    /// value holding the next literal), the shortest first value wins.
    pub fn captures(&self, key: &str) -> Option<Vec<Capture>> {
        let texts = capture_parts(&self.parts, key)?;
        let placeholders = self.parts.iter().filter_map(|part| match part {
            Part::Column(placeholder) => Some(placeholder),
            Part::Literal(_) => None,
        });
        Some(
            placeholders
                .zip(texts)
                .map(|(placeholder, text)| Capture {
                    placeholder: placeholder.written(),
                    column: placeholder.column.to_string(),
                    value: unescape_value(text),
                    exact: placeholder.path.is_empty() && placeholder.transform.is_none(),
                    path: placeholder.path.iter().map(ToString::to_string).collect(),
                    transform: placeholder.transform.map(Transform::name),
                })
                .collect(),
        )
    }

    /// [`Template::captures`] of the longest start of `key` this template
    /// renders (a `prefixes` rule: every key under the prefix goes), with
    /// that start.
    pub fn captures_prefix<'k>(&self, key: &'k str) -> Option<(&'k str, Vec<Capture>)> {
        let ends = key
            .char_indices()
            .map(|(at, _)| at)
            .skip(1)
            .chain([key.len()]);
        let ends: Vec<usize> = ends.collect();
        ends.into_iter()
            .rev()
            .find_map(|end| Some((&key[..end], self.captures(&key[..end])?)))
    }
}

/// The text of each placeholder of `parts` in `key`, in order: literals
/// must match exactly, placeholders take no structural character (the
/// renderer escapes them), shortest first with backtracking.
fn capture_parts<'k>(parts: &[Part], key: &'k str) -> Option<Vec<&'k str>> {
    let Some((first, rest)) = parts.split_first() else {
        return key.is_empty().then(Vec::new);
    };
    match first {
        Part::Literal(text) => capture_parts(rest, key.strip_prefix(&**text)?),
        Part::Column(_) => {
            let longest = key
                .bytes()
                .position(|byte| needs_escape(byte) && byte != b'%')
                .unwrap_or(key.len());
            let ends = key[..longest]
                .char_indices()
                .map(|(at, _)| at)
                .chain([longest]);
            for end in ends {
                if let Some(mut texts) = capture_parts(rest, &key[end..]) {
                    texts.insert(0, &key[..end]);
                    return Some(texts);
                }
            }
            None
        }
    }
}

/// `text` with the renderer's percent-escapes (`%3A`) undone.
pub fn unescape_value(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[at] == b'%' {
            if let (Some(high), Some(low)) = (
                bytes.get(at + 1).copied().and_then(hex),
                bytes.get(at + 2).copied().and_then(hex),
            ) {
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                at += 3;
                continue;
            }
        }
        out.push(bytes[at]);
        at += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Placeholder {
    /// The placeholder as written, without braces.
    fn written(&self) -> String {
        let mut text = self.path_text(self.path.len());
        if let Some(transform) = self.transform {
            text.push('|');
            text.push_str(transform.name());
        }
        text
    }
}

/// `text`, cut to 60 characters for a message.
fn shortened(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(60) {
        Some((end, _)) => format!("{}...", &text[..end]).into(),
        None => text.into(),
    }
}

/// `column`, `column.path.0`, `column|transform` or both.
fn placeholder(text: &str, brace_offset: usize) -> Result<Placeholder, TemplateError> {
    if text.is_empty() {
        return Err(TemplateError {
            offset: brace_offset,
            message: "empty placeholder `{}`".into(),
            help: "name a column inside the braces, e.g. `{id}`".into(),
        });
    }
    let (reference, transform) = match text.split_once('|') {
        Some((reference, name)) => {
            let name = name.trim();
            let Some(transform) = Transform::parse(name) else {
                let help = match crate::mapping::diagnostic::did_you_mean(name, &Transform::NAMES) {
                    Some(near) => format!("did you mean `{near}`?"),
                    None => format!("transforms: {}", Transform::NAMES.join(", ")),
                };
                return Err(TemplateError {
                    offset: brace_offset + 1 + reference.len() + 1,
                    message: format!("unknown transform `{name}` in `{{{text}}}`"),
                    help,
                });
            };
            (reference, Some(transform))
        }
        None => (text, None),
    };
    let mut steps = reference.split('.');
    let column = steps.next().unwrap_or("");
    if !is_identifier(column) {
        return Err(TemplateError {
            offset: brace_offset,
            message: format!("`{{{text}}}` is not a column placeholder"),
            help: "a placeholder holds one column name (letters, digits, `_`, `$`, not starting with a digit), then optionally `.field` steps into a json column and one `|transform`".into(),
        });
    }
    let path: Vec<Box<str>> = steps.map(Box::from).collect();
    if let Some(bad) = path.iter().find(|step| {
        step.is_empty()
            || !step
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'$')
    }) {
        let what = if bad.is_empty() {
            "an empty step".to_owned()
        } else {
            format!("`{bad}`")
        };
        return Err(TemplateError {
            offset: brace_offset,
            message: format!("`{{{text}}}`: {what} is not a json field or array index"),
            help: "write the path as `.field` and `.0` steps, e.g. `{payload.items.0.id}`".into(),
        });
    }
    Ok(Placeholder {
        column: column.into(),
        path: path.into(),
        transform,
    })
}

/// Bytes that are percent-encoded in rendered values.
fn needs_escape(byte: u8) -> bool {
    matches!(byte, b'%' | b':' | b'{' | b'}' | b'*' | b'?' | b'[' | b']')
        || byte.is_ascii_whitespace()
        || byte == 0x0b
}

/// Appends `value` to `out` with the structural and glob characters
/// percent-encoded. Everything else, unicode included, is kept as is.
pub fn escape_value(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut clean_from = 0;
    for (index, byte) in value.bytes().enumerate() {
        if needs_escape(byte) {
            out.push_str(&value[clean_from..index]);
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xF)]));
            clean_from = index + 1;
        }
    }
    out.push_str(&value[clean_from..]);
}

/// Appends literal `text` to a glob, escaping glob metacharacters.
pub fn escape_glob(text: &str, out: &mut String) {
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

// Whether `key` matches a glob made by `Template::pattern`; defined once in
// the protocol the clients share, since their L1 applies the same patterns.
pub use evictd_client::protocol::glob_matches;

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, value: &str) -> String {
        let datum = Datum::text(value);
        Template::parse(template)
            .unwrap()
            .render(|_| &datum)
            .unwrap()
    }

    #[test]
    fn captures_read_a_rendered_key_back() {
        let template = Template::parse("user:{id}:orders:{status|lower}").unwrap();
        let captures = template.captures("user:7:orders:new").unwrap();
        assert_eq!(
            captures
                .iter()
                .map(|c| (c.placeholder.as_str(), c.value.as_str(), c.exact))
                .collect::<Vec<_>>(),
            [("id", "7", true), ("status|lower", "new", false)]
        );
        // Escapes undone; a value never holds a structural character.
        let escaped = render("k:{a}", "1:2 x%");
        let captures = Template::parse("k:{a}")
            .unwrap()
            .captures(&escaped)
            .unwrap();
        assert_eq!(captures[0].value, "1:2 x%");
        assert_eq!(template.captures("user:7:orders"), None);
        assert_eq!(template.captures("order:7:orders:new"), None);
        assert_eq!(
            Template::parse("order:{id}")
                .unwrap()
                .captures("order:1:status"),
            None
        );
        // Two placeholders next to each other: the first takes the least.
        let two = Template::parse("p{a}{b}").unwrap().captures("pxy").unwrap();
        assert_eq!((two[0].value.as_str(), two[1].value.as_str()), ("", "xy"));
        // A prefix rule: the longest start of the key it renders.
        let prefix = Template::parse("category:{id}:").unwrap();
        let (start, captures) = prefix.captures_prefix("category:5:page:2").unwrap();
        assert_eq!((start, captures[0].value.as_str()), ("category:5:", "5"));
        assert_eq!(prefix.captures_prefix("product:5:page"), None);
        assert_eq!(unescape_value("%41%zz%"), "A%zz%");
    }

    #[test]
    fn escapes_structural_characters() {
        assert_eq!(
            render("k:{a}", "1:2*3?[x]{y} z%"),
            "k:1%3A2%2A3%3F%5Bx%5D%7By%7D%20z%25"
        );
        assert_eq!(render("k:{a}", "héllo→"), "k:héllo→");
        assert_eq!(render("k:{a}", ""), "k:");
    }

    #[test]
    fn json_paths_render_the_text_as_it_stands_never_through_a_float() {
        let at = |text: &str, path: &str| {
            let path: Vec<Box<str>> = path.split('.').map(Box::from).collect();
            json_path(text, &path)
        };
        assert_eq!(at(r#"{"n": 1.50}"#, "n"), Ok("1.50".into()));
        assert_eq!(at(r#"{"n": 1E2}"#, "n"), Ok("1E2".into()));
        assert_eq!(at(r#"{"n": 0.000001}"#, "n"), Ok("0.000001".into()));
        assert_eq!(
            at(r#"{"n": 12345678901234567890.123}"#, "n"),
            Ok("12345678901234567890.123".into())
        );
        assert_eq!(
            at(r#"{"o": {"b": 1,  "a": [1, 2.0]}}"#, "o"),
            Ok(r#"{"b": 1,  "a": [1, 2.0]}"#.into())
        );
        assert_eq!(at(r#"{"o": {"a": [1, 2.0]}}"#, "o.a.1"), Ok("2.0".into()));
        assert_eq!(at(r#"{"s": "a\u00e9\"b"}"#, "s"), Ok("aé\"b".into()));
        assert_eq!(at(r#"{"t": true}"#, "t"), Ok("true".into()));
        // Of duplicate keys the last counts, as in Postgres.
        assert_eq!(at(r#"{"a": 1, "a": 2}"#, "a"), Ok("2".into()));
        assert_eq!(at(r#"{"a": null}"#, "a"), Err(Miss::JsonNull));
        assert_eq!(at(r#"{"a": {"b": 1}}"#, "a.c"), Err(Miss::PathMissing(1)));
        assert_eq!(at(r#"{"a": [1]}"#, "a.3"), Err(Miss::PathMissing(1)));
        assert_eq!(at(r#"{"a": 1}"#, "b.c"), Err(Miss::PathMissing(0)));
    }

    #[test]
    fn date_truncations_keep_long_years_and_bc() {
        let cut = |text: &str, to: Truncation| truncate(text, to).map(|c| c.into_owned());
        assert_eq!(
            cut("2024-01-31", Truncation::Day).as_deref(),
            Some("2024-01-31")
        );
        assert_eq!(
            cut("12024-01-31", Truncation::Day).as_deref(),
            Some("12024-01-31")
        );
        assert_eq!(
            cut("0044-03-15 BC", Truncation::Day).as_deref(),
            Some("0044-03-15 BC")
        );
        assert_eq!(
            cut("0044-03-15 10:00:00+00 BC", Truncation::Hour).as_deref(),
            Some("0044-03-15 10 BC")
        );
        assert_eq!(
            cut("0044-03-15 BC", Truncation::Month).as_deref(),
            Some("0044-03 BC")
        );
        assert_eq!(
            cut("2024-01-31 12:34:56.5+00", Truncation::Hour).as_deref(),
            Some("2024-01-31 12")
        );
        assert_eq!(cut("2024-01-31", Truncation::Hour), None);
        assert_eq!(cut("infinity", Truncation::Day), None);
        assert_eq!(cut("soon", Truncation::Month), None);
        assert_eq!(cut("024-01-31", Truncation::Day), None);
        assert_eq!(cut("2024-1-31", Truncation::Day), None);
    }

    #[test]
    fn a_missing_value_says_why() {
        let template = Template::parse("k:{payload.items.3.id}").unwrap();
        let datum = Datum::Json(r#"{"items": [1]}"#.into());
        match template.render(|_| &datum) {
            Err(Unrendered::Null(column, why)) => {
                assert_eq!(column, "payload");
                assert_eq!(
                    why.to_string(),
                    "payload is not NULL, but it has no `payload.items.3`"
                );
            }
            other => panic!("{other:?}"),
        }
        let template = Template::parse("k:{d|date}").unwrap();
        let datum = Datum::text("soon");
        let why = template.render(|_| &datum).unwrap_err();
        assert!(matches!(why, Unrendered::Null("d", _)));
        if let Unrendered::Null(_, why) = why {
            assert_eq!(
                why.to_string(),
                "`d` is no date or timestamp, so |date gives nothing"
            );
        }
    }

    #[test]
    fn literal_braces() {
        let template = Template::parse("{{x}}:{id}").unwrap();
        assert_eq!(template.columns().collect::<Vec<_>>(), ["id"]);
        let one = Datum::text("1");
        assert_eq!(template.render(|_| &one).unwrap(), "{x}:1");
    }

    #[test]
    fn syntax_errors_point_at_the_brace() {
        let error = Template::parse("user:{id").unwrap_err();
        assert_eq!(
            (error.offset, error.message.as_str()),
            (5, "unclosed `{` in template")
        );
        assert_eq!(Template::parse("a}b").unwrap_err().offset, 1);
        assert_eq!(Template::parse("a:{}").unwrap_err().offset, 2);
        assert_eq!(Template::parse("a:{x y}").unwrap_err().offset, 2);
    }

    #[test]
    fn patterns() {
        let template = Template::parse("user:{id}:orders*{x}").unwrap();
        assert_eq!(template.pattern(|_| None), "user:*:orders\\**");
        let pattern = template.pattern(|column| (column == "id").then_some("a:b"));
        assert_eq!(pattern, "user:a%3Ab:orders\\**");
        assert!(glob_matches(&pattern, "user:a%3Ab:orders*7"));
        assert!(!glob_matches(&pattern, "user:a%3Ab:ordersX7"));
        assert!(glob_matches("a*b*c", "aXXbYYc"));
        assert!(!glob_matches("a*b*c", "aXXbYY"));
    }

    #[test]
    fn a_fallback_pattern_must_stay_inside_its_key_family() {
        let refused = |source: &str| Template::parse(source).unwrap().family_problem();
        for ok in [
            "order:{id}",
            "user:{id}:orders",
            "a-{x}",
            "categories:tree",
            "x/{a}{b}",
        ] {
            assert_eq!(refused(ok), None, "{ok}");
        }
        let (message, _) = refused("{id}").expect("refused");
        assert!(message.contains("no literal prefix"), "{message}");
        let many = "{id}".repeat(10_000);
        assert!(refused(&many).is_some());
        assert!(refused("order_{id}").is_some());
        let (message, _) = refused("order{id}").expect("refused");
        assert!(message.contains("`order*` also matches"), "{message}");
    }
}
