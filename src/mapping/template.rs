//! Key and tag templates: literal text with `{column}` placeholders.
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
    Column(Box<str>),
}

/// A template syntax error at a byte offset inside the template text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateError {
    pub offset: usize,
    pub message: String,
    pub help: &'static str,
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
                help: "write the key, e.g. \"order:{id}\"",
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
                                "close the placeholder with `}`, or write `{{` for a literal brace",
                        });
                    };
                    let column = &source[start..end];
                    check_column(column, offset)?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal).into()));
                    }
                    parts.push(Part::Column(column.into()));
                    while rest.peek().is_some_and(|&(next, _)| next <= end) {
                        rest.next();
                    }
                }
                '}' => {
                    return Err(TemplateError {
                        offset,
                        message: "unmatched `}` in template".into(),
                        help: "write `}}` for a literal brace",
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

    /// The columns the template reads, in order of appearance.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Column(column) => Some(&**column),
            Part::Literal(_) => None,
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
                Part::Column(column) => match value_of(column) {
                    Datum::Null => return Err(Unrendered::Null(column)),
                    datum => match datum.canonical_text() {
                        Some(text) => escape_value(text, &mut key),
                        None => unavailable = unavailable.or(Some(&**column)),
                    },
                },
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
                Part::Column(column) => match value_of(column) {
                    Some(text) => {
                        let mut escaped = String::with_capacity(text.len());
                        escape_value(text, &mut escaped);
                        escape_glob(&escaped, &mut pattern);
                    }
                    None => {
                        if !pattern.ends_with('*') || pattern.ends_with("\\*") {
                            pattern.push('*');
                        }
                    }
                },
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

fn check_column(column: &str, brace_offset: usize) -> Result<(), TemplateError> {
    if column.is_empty() {
        return Err(TemplateError {
            offset: brace_offset,
            message: "empty placeholder `{}`".into(),
            help: "name a column inside the braces, e.g. `{id}`",
        });
    }
    if !is_identifier(column) {
        return Err(TemplateError {
            offset: brace_offset,
            message: format!("`{{{column}}}` is not a column placeholder"),
            help: "a placeholder holds one column name: letters, digits, `_`, `$`, not starting with a digit",
        });
    }
    Ok(())
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
