//! Key and tag templates: literal text with `{column}` placeholders.
//!
//! A placeholder may reach into a json/jsonb column (`{payload.items.0.id}`:
//! object fields and array indexes) and end with one transform
//! (`{email|lower}`: `lower`, `upper`, `trim`, `date`, `hour`, `month`,
//! `hash`).
//!
//! A template is parsed once, at load time, into literal parts and column
//! references. Rendering percent-encodes every value's `%`, `:`, `{`, `}`,
//! `*`, `?`, `[`, `]` and whitespace, so a value can neither collide with
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
        let prefix = |len: usize| {
            let date_like = text.len() >= len
                && text.as_bytes()[..len.min(10)].iter().enumerate().all(
                    |(index, byte)| match index {
                        4 | 7 => *byte == b'-',
                        _ => byte.is_ascii_digit(),
                    },
                );
            date_like.then(|| std::borrow::Cow::Borrowed(&text[..len]))
        };
        match self {
            Transform::Lower => Some(text.to_lowercase().into()),
            Transform::Upper => Some(text.to_uppercase().into()),
            Transform::Trim => Some(text.trim().into()),
            Transform::Date => prefix(10),
            Transform::Month => prefix(7),
            Transform::Hour => prefix(13).filter(|hour| {
                hour.as_bytes()[10] == b' ' && hour.as_bytes()[11..].iter().all(u8::is_ascii_digit)
            }),
            Transform::Hash => Some(format!("{:016x}", fnv1a(text.as_bytes())).into()),
        }
    }
}

/// 64-bit FNV-1a: small, stable across platforms and releases, and easy to
/// compute in any language (the README gives its constants).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl Placeholder {
    /// The text the placeholder renders from `datum`: `Err(true)` for NULL
    /// (or a json path that leads nowhere, or a truncation of a value that
    /// is not a date), `Err(false)` when the value is not known.
    fn text<'d>(&self, datum: &'d Datum) -> Result<std::borrow::Cow<'d, str>, bool> {
        if let Datum::Null = datum {
            return Err(true);
        }
        let text = datum.canonical_text().ok_or(false)?;
        let text: std::borrow::Cow<'d, str> = if self.path.is_empty() {
            text.into()
        } else {
            json_path(text, &self.path).ok_or(true)?.into()
        };
        match self.transform {
            None => Ok(text),
            Some(transform) => match text {
                std::borrow::Cow::Borrowed(text) => transform.apply(text).ok_or(true),
                std::borrow::Cow::Owned(text) => transform
                    .apply(&text)
                    .map(|out| std::borrow::Cow::Owned(out.into_owned()))
                    .ok_or(true),
            },
        }
    }
}

/// The value at `path` in the JSON `text`, as text (a string without its
/// quotes, a number or boolean as written, an object or array as compact
/// JSON); `None` for null or a path that is not there.
fn json_path(text: &str, path: &[Box<str>]) -> Option<String> {
    let mut value: serde_json::Value = serde_json::from_str(text).ok()?;
    for step in path {
        value = match value {
            serde_json::Value::Object(mut fields) => fields.remove(&**step)?,
            serde_json::Value::Array(mut items) => {
                let index: usize = step.parse().ok()?;
                if index >= items.len() {
                    return None;
                }
                items.swap_remove(index)
            }
            _ => return None,
        };
    }
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(text) => Some(text),
        other => Some(other.to_string()),
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
    /// A placeholder's value is NULL: the key does not exist.
    Null(&'t str),
    /// A placeholder's value is not known (unchanged TOAST, not sent).
    Unavailable(&'t str),
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
                        Err(true) => return Err(Unrendered::Null(&placeholder.column)),
                        Err(false) => unavailable = unavailable.or(Some(&*placeholder.column)),
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

/// Whether `key` matches a glob made by [`Template::pattern`]; defined
/// once in the protocol the clients share, since their L1 applies the same
/// patterns.
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
    fn escapes_structural_characters() {
        assert_eq!(
            render("k:{a}", "1:2*3?[x]{y} z%"),
            "k:1%3A2%2A3%3F%5Bx%5D%7By%7D%20z%25"
        );
        assert_eq!(render("k:{a}", "héllo→"), "k:héllo→");
        assert_eq!(render("k:{a}", ""), "k:");
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
