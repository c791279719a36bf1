//! `when = "..."` conditions: a small, safe expression language over one
//! row version's columns, parsed once at load and evaluated without
//! allocating.
//!
//! ```text
//! expr    := or
//! or      := and ("or" and)*
//! and     := not ("and" not)*
//! not     := "not" not | primary
//! primary := "(" expr ")" | column op literal | column ["not"] "in" "(" literal ("," literal)* ")"
//!          | column "is" ["not"] "null"
//! op      := "=" | "<>" | "!=" | "<" | "<=" | ">" | ">="
//! literal := number | 'text' (with '' for ') | true | false
//! ```
//!
//! Keywords are case-insensitive. Comparisons follow the column's type as
//! the source sent it: numbers compare as numbers, everything else as
//! text; NULL follows SQL (a comparison with NULL is neither true nor
//! false, and the row does not match). A value the change does not carry
//! (an unchanged TOAST value, an old row under REPLICA IDENTITY DEFAULT)
//! makes the result unknown, which the evaluator treats as a match: an
//! invalidation is never skipped on a guess.

use std::cmp::Ordering;
use std::fmt;

use crate::change::{is_identifier, Datum};

/// A parsed condition and the text it was written as.
#[derive(Clone, Debug)]
pub struct Condition {
    source: Box<str>,
    expr: Expr,
}

#[derive(Clone, Debug)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Compare {
        column: Box<str>,
        op: CompareOp,
        literal: Literal,
    },
    In {
        column: Box<str>,
        list: Box<[Literal]>,
        negated: bool,
    },
    IsNull {
        column: Box<str>,
        negated: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CompareOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Debug)]
enum Literal {
    /// As written, and as a number (parsed once, at load).
    Number(Box<str>, Number),
    /// As written, and as a number when it reads as one (`'100'` against
    /// a numeric column compares as 100, as in Postgres).
    Text(Box<str>, Option<Number>),
    Bool(bool),
}

/// A literal's numeric value: exact for a plain decimal, and as a float
/// for values that are not plain decimals (exponents, NaN, infinities).
#[derive(Clone, Debug)]
struct Number {
    decimal: Option<(bool, Box<str>, Box<str>)>,
    float: f64,
}

impl Number {
    fn parse(text: &str) -> Option<Number> {
        let float = parse_float(text)?;
        let decimal = Decimal::parse(text).map(|decimal| {
            (
                decimal.negative,
                decimal.integer.into(),
                decimal.fraction.into(),
            )
        });
        Some(Number { decimal, float })
    }

    /// `value` (a number column's text) against this number.
    fn compare_with(&self, value: &str) -> Option<Ordering> {
        if let (Some(value), Some((negative, integer, fraction))) =
            (Decimal::parse(value), &self.decimal)
        {
            return Some(value.cmp(&Decimal {
                negative: *negative,
                integer,
                fraction,
            }));
        }
        compare_floats(parse_float(value)?, self.float)
    }
}

/// Postgres orders NaN above every number, and equal to itself.
fn compare_floats(a: f64, b: f64) -> Option<Ordering> {
    Some(match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.partial_cmp(&b)?,
    })
}

/// A condition's value on one row version: SQL's three values, and
/// `Unknown` for a value the change did not carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Truth {
    True,
    False,
    Null,
    /// Depends on a value the change did not carry: the first such column.
    Unknown,
}

/// A condition that does not parse: what and where (a byte offset into
/// the condition's text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionError {
    pub offset: usize,
    pub message: String,
    pub help: String,
}

impl Condition {
    pub fn parse(source: &str) -> Result<Condition, ConditionError> {
        let tokens = tokenize(source)?;
        let mut parser = Parser {
            tokens: &tokens,
            at: 0,
            end: source.len(),
        };
        let expr = parser.or()?;
        if let Some(token) = parser.peek() {
            return Err(ConditionError {
                offset: token.offset,
                message: format!("unexpected `{}` in the condition", token.text(source)),
                help: "join comparisons with `and` / `or`, and close every parenthesis".into(),
            });
        }
        Ok(Condition {
            source: source.into(),
            expr,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every column the condition reads, in order of appearance.
    pub fn columns(&self) -> Vec<&str> {
        let mut columns = Vec::new();
        self.expr.columns(&mut columns);
        columns
    }

    /// The columns compared with a number literal (`total >= 100`, `n in
    /// (1, 2)`): `explain` takes a string given for one of them as a
    /// number, as the column's type would be.
    pub fn numeric_columns(&self) -> Vec<&str> {
        let mut columns = Vec::new();
        self.expr.numeric_columns(&mut columns);
        columns
    }

    /// The condition on the row whose values `value_of` gives; with
    /// `Unknown`, the first column whose value was not known.
    pub fn eval<'r>(&self, value_of: impl Fn(&str) -> &'r Datum) -> (Truth, Option<&str>) {
        let mut missing = None;
        let truth = self.expr.eval(&value_of, &mut missing);
        (truth, missing)
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Expr {
    fn columns<'e>(&'e self, out: &mut Vec<&'e str>) {
        match self {
            Expr::Or(a, b) | Expr::And(a, b) => {
                a.columns(out);
                b.columns(out);
            }
            Expr::Not(a) => a.columns(out),
            Expr::Compare { column, .. }
            | Expr::In { column, .. }
            | Expr::IsNull { column, .. } => {
                if !out.contains(&&**column) {
                    out.push(column);
                }
            }
        }
    }

    fn numeric_columns<'e>(&'e self, out: &mut Vec<&'e str>) {
        let numeric = |literal: &Literal| matches!(literal, Literal::Number(..));
        match self {
            Expr::Or(a, b) | Expr::And(a, b) => {
                a.numeric_columns(out);
                b.numeric_columns(out);
            }
            Expr::Not(a) => a.numeric_columns(out),
            Expr::Compare {
                column, literal, ..
            } if numeric(literal) => out.push(column),
            Expr::In { column, list, .. } if list.iter().any(numeric) => out.push(column),
            Expr::Compare { .. } | Expr::In { .. } | Expr::IsNull { .. } => {}
        }
    }

    fn eval<'r, 'e>(
        &'e self,
        value_of: &impl Fn(&str) -> &'r Datum,
        missing: &mut Option<&'e str>,
    ) -> Truth {
        match self {
            // True decides an `or` and False an `and` whatever the other
            // side is: it is not evaluated.
            Expr::Or(a, b) => match a.eval(value_of, missing) {
                Truth::True => Truth::True,
                first => or(first, b.eval(value_of, missing)),
            },
            Expr::And(a, b) => match a.eval(value_of, missing) {
                Truth::False => Truth::False,
                first => and(first, b.eval(value_of, missing)),
            },
            Expr::Not(a) => match a.eval(value_of, missing) {
                Truth::True => Truth::False,
                Truth::False => Truth::True,
                other => other,
            },
            Expr::IsNull { column, negated } => match value_of(column) {
                Datum::UnchangedToast | Datum::Missing => unknown(column, missing),
                Datum::Null => truth(!negated),
                _ => truth(*negated),
            },
            Expr::Compare {
                column,
                op,
                literal,
            } => match value_of(column) {
                Datum::UnchangedToast | Datum::Missing => unknown(column, missing),
                Datum::Null => Truth::Null,
                value => truth(op.holds(compare(value, literal))),
            },
            Expr::In {
                column,
                list,
                negated,
            } => match value_of(column) {
                Datum::UnchangedToast | Datum::Missing => unknown(column, missing),
                Datum::Null => Truth::Null,
                value => {
                    let found = list
                        .iter()
                        .any(|literal| compare(value, literal) == Ordering::Equal);
                    truth(found != *negated)
                }
            },
        }
    }
}

fn unknown<'e>(column: &'e str, missing: &mut Option<&'e str>) -> Truth {
    missing.get_or_insert(column);
    Truth::Unknown
}

fn truth(value: bool) -> Truth {
    if value {
        Truth::True
    } else {
        Truth::False
    }
}

fn and(a: Truth, b: Truth) -> Truth {
    match (a, b) {
        (Truth::False, _) | (_, Truth::False) => Truth::False,
        (Truth::Unknown, _) | (_, Truth::Unknown) => Truth::Unknown,
        (Truth::Null, _) | (_, Truth::Null) => Truth::Null,
        _ => Truth::True,
    }
}

fn or(a: Truth, b: Truth) -> Truth {
    match (a, b) {
        (Truth::True, _) | (_, Truth::True) => Truth::True,
        (Truth::Unknown, _) | (_, Truth::Unknown) => Truth::Unknown,
        (Truth::Null, _) | (_, Truth::Null) => Truth::Null,
        _ => Truth::False,
    }
}

impl CompareOp {
    fn holds(self, ordering: Ordering) -> bool {
        match self {
            CompareOp::Eq => ordering == Ordering::Equal,
            CompareOp::Ne => ordering != Ordering::Equal,
            CompareOp::Lt => ordering == Ordering::Less,
            CompareOp::Le => ordering != Ordering::Greater,
            CompareOp::Gt => ordering == Ordering::Greater,
            CompareOp::Ge => ordering != Ordering::Less,
        }
    }
}

/// A (non-NULL, known) value against a literal: numerically for a numeric
/// column and a literal that reads as a number, else as text.
fn compare(value: &Datum, literal: &Literal) -> Ordering {
    let text = value.canonical_text().unwrap_or("");
    match (value, literal) {
        (Datum::Number(_), Literal::Number(written, number))
        | (Datum::Number(_), Literal::Text(written, Some(number))) => number
            .compare_with(text)
            .unwrap_or_else(|| text.cmp(written)),
        (Datum::Bool(value), Literal::Bool(literal)) => value.cmp(literal),
        (Datum::Bool(value), Literal::Text(written, _)) => match parse_bool(written) {
            Some(literal) => value.cmp(&literal),
            None => text.cmp(written),
        },
        (_, Literal::Number(written, _) | Literal::Text(written, _)) => text.cmp(written),
        (_, Literal::Bool(literal)) => text.cmp(if *literal { "true" } else { "false" }),
    }
}

/// Postgres' spellings of a boolean.
fn parse_bool(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "t" | "true" | "yes" | "y" | "on" | "1" => Some(true),
        "f" | "false" | "no" | "n" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        other => other.parse().ok(),
    }
}

/// A plain decimal: sign, integer digits without leading zeros, fraction
/// digits without trailing zeros.
#[derive(PartialEq, Eq)]
struct Decimal<'t> {
    negative: bool,
    integer: &'t str,
    fraction: &'t str,
}

impl<'t> Decimal<'t> {
    fn parse(text: &'t str) -> Option<Decimal<'t>> {
        let (negative, digits) = match text.as_bytes().first()? {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let (integer, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
        if (integer.is_empty() && fraction.is_empty())
            || !all_digits(integer)
            || !all_digits(fraction)
        {
            return None;
        }
        let integer = integer.trim_start_matches('0');
        let fraction = fraction.trim_end_matches('0');
        // -0 is 0.
        let negative = negative && !(integer.is_empty() && fraction.is_empty());
        Some(Decimal {
            negative,
            integer,
            fraction,
        })
    }

    fn magnitude_cmp(&self, other: &Decimal<'_>) -> Ordering {
        self.integer
            .len()
            .cmp(&other.integer.len())
            .then_with(|| self.integer.cmp(other.integer))
            .then_with(|| self.fraction.cmp(other.fraction))
    }
}

impl Ord for Decimal<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.negative, other.negative) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => self.magnitude_cmp(other),
            (true, true) => other.magnitude_cmp(self),
        }
    }
}

impl PartialOrd for Decimal<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Clone, Debug, PartialEq)]
enum TokenKind {
    Word(String),
    Number(String),
    Text(String),
    Op(&'static str),
    Open,
    Close,
    Comma,
}

#[derive(Clone, Debug)]
struct Token {
    kind: TokenKind,
    offset: usize,
    len: usize,
}

impl Token {
    fn text<'s>(&self, source: &'s str) -> &'s str {
        &source[self.offset..self.offset + self.len]
    }

    fn keyword(&self, word: &str) -> bool {
        matches!(&self.kind, TokenKind::Word(w) if w.eq_ignore_ascii_case(word))
    }
}

const KEYWORDS: &[&str] = &["and", "or", "not", "in", "is", "null", "true", "false"];

fn tokenize(source: &str) -> Result<Vec<Token>, ConditionError> {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let start = at;
        let byte = bytes[at];
        let kind = match byte {
            b' ' | b'\t' | b'\n' | b'\r' => {
                at += 1;
                continue;
            }
            b'(' => {
                at += 1;
                TokenKind::Open
            }
            b')' => {
                at += 1;
                TokenKind::Close
            }
            b',' => {
                at += 1;
                TokenKind::Comma
            }
            b'=' => {
                at += 1;
                TokenKind::Op("=")
            }
            b'<' | b'>' | b'!' => {
                let two = source.get(at..at + 2).unwrap_or("");
                let op = match two {
                    "<=" => "<=",
                    ">=" => ">=",
                    "<>" => "<>",
                    "!=" => "<>",
                    _ if byte == b'<' => "<",
                    _ if byte == b'>' => ">",
                    _ => {
                        return Err(ConditionError {
                            offset: at,
                            message: "`!` must be followed by `=`".into(),
                            help: "write `<>` or `!=` for \"not equal\"".into(),
                        })
                    }
                };
                at += if matches!(two, "<=" | ">=" | "<>" | "!=") {
                    2
                } else {
                    1
                };
                TokenKind::Op(op)
            }
            b'\'' => {
                let mut text = String::new();
                at += 1;
                loop {
                    match source[at..].find('\'') {
                        None => {
                            return Err(ConditionError {
                                offset: start,
                                message: "unterminated text literal".into(),
                                help: "close it with `'` (write `''` for a quote inside)".into(),
                            })
                        }
                        Some(quote) => {
                            text.push_str(&source[at..at + quote]);
                            at += quote + 1;
                            if bytes.get(at) == Some(&b'\'') {
                                text.push('\'');
                                at += 1;
                            } else {
                                break;
                            }
                        }
                    }
                }
                TokenKind::Text(text)
            }
            b'-' | b'0'..=b'9' | b'.' => {
                at += 1;
                while at < bytes.len()
                    && (bytes[at].is_ascii_alphanumeric()
                        || bytes[at] == b'.'
                        || ((bytes[at] == b'+' || bytes[at] == b'-')
                            && matches!(bytes[at - 1], b'e' | b'E')))
                {
                    at += 1;
                }
                let text = &source[start..at];
                if Decimal::parse(text).is_none() && text.parse::<f64>().is_err() {
                    return Err(ConditionError {
                        offset: start,
                        message: format!("`{text}` is not a number"),
                        help: "write numbers like 100, -2.5 or 1e6; quote text with '...'".into(),
                    });
                }
                TokenKind::Number(text.to_owned())
            }
            b'"' => {
                return Err(ConditionError {
                    offset: at,
                    message: "double quotes are not allowed in a condition".into(),
                    help: "write column names bare and text in single quotes, e.g. status = 'paid'"
                        .into(),
                })
            }
            _ if byte.is_ascii_alphabetic() || byte == b'_' => {
                while at < bytes.len()
                    && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_' || bytes[at] == b'$')
                {
                    at += 1;
                }
                TokenKind::Word(source[start..at].to_owned())
            }
            _ => {
                let character = source[at..].chars().next().unwrap_or('?');
                return Err(ConditionError {
                    offset: at,
                    message: format!("unexpected `{character}` in the condition"),
                    help: "conditions compare columns with =, <>, <, <=, >, >=, in (...), is [not] null, joined by and, or, not".into(),
                });
            }
        };
        tokens.push(Token {
            kind,
            offset: start,
            len: at - start,
        });
    }
    Ok(tokens)
}

struct Parser<'t> {
    tokens: &'t [Token],
    at: usize,
    /// The end of the text, for errors at the end.
    end: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    fn eat_keyword(&mut self, word: &str) -> bool {
        if self.peek().is_some_and(|token| token.keyword(word)) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn offset(&self) -> usize {
        self.peek().map_or(self.end, |token| token.offset)
    }

    fn error(&self, message: impl Into<String>, help: impl Into<String>) -> ConditionError {
        ConditionError {
            offset: self.offset(),
            message: message.into(),
            help: help.into(),
        }
    }

    fn or(&mut self) -> Result<Expr, ConditionError> {
        let mut left = self.and()?;
        while self.eat_keyword("or") {
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ConditionError> {
        let mut left = self.not()?;
        while self.eat_keyword("and") {
            let right = self.not()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, ConditionError> {
        if self.eat_keyword("not") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, ConditionError> {
        let Some(token) = self.next() else {
            self.at -= 1;
            return Err(self.error(
                "the condition ends where a comparison should be",
                "finish it, e.g. `status = 'paid'`",
            ));
        };
        let column = match &token.kind {
            TokenKind::Open => {
                let inner = self.or()?;
                if !matches!(self.next().map(|t| t.kind), Some(TokenKind::Close)) {
                    self.at -= 1;
                    return Err(self.error("`(` is not closed", "add the matching `)`"));
                }
                return Ok(inner);
            }
            TokenKind::Word(word)
                if !KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(word))
                    && is_identifier(word) =>
            {
                word.clone()
            }
            _ => {
                self.at -= 1;
                return Err(self.error(
                    format!("expected a column name, found `{}`", token_text(&token)),
                    "a comparison starts with a column: `total > 100`",
                ));
            }
        };
        let column: Box<str> = column.into();
        if self.eat_keyword("is") {
            let negated = self.eat_keyword("not");
            if !self.eat_keyword("null") {
                return Err(self.error(
                    "`is` must be followed by `null` or `not null`",
                    "write `column is null` or `column is not null`",
                ));
            }
            return Ok(Expr::IsNull { column, negated });
        }
        let negated = self.eat_keyword("not");
        if self.eat_keyword("in") {
            if !matches!(self.next().map(|t| t.kind), Some(TokenKind::Open)) {
                self.at -= 1;
                return Err(self.error(
                    "`in` must be followed by a list in parentheses",
                    "write `status in ('paid', 'shipped')`",
                ));
            }
            let mut list = vec![self.literal()?];
            loop {
                match self.next().map(|t| t.kind) {
                    Some(TokenKind::Comma) => list.push(self.literal()?),
                    Some(TokenKind::Close) => break,
                    _ => {
                        self.at -= 1;
                        return Err(self.error(
                            "expected `,` or `)` in the list",
                            "separate the values with commas and close the list",
                        ));
                    }
                }
            }
            return Ok(Expr::In {
                column,
                list: list.into(),
                negated,
            });
        }
        if negated {
            return Err(self.error(
                "`not` after a column must be followed by `in`",
                "write `not (column = ...)` to negate a comparison",
            ));
        }
        let op = match self.next().map(|t| t.kind) {
            Some(TokenKind::Op(op)) => match op {
                "=" => CompareOp::Eq,
                "<>" => CompareOp::Ne,
                "<" => CompareOp::Lt,
                "<=" => CompareOp::Le,
                ">" => CompareOp::Gt,
                _ => CompareOp::Ge,
            },
            _ => {
                self.at -= 1;
                return Err(self.error(
                    format!("expected a comparison after `{column}`"),
                    "use =, <>, <, <=, >, >=, in (...), or is [not] null",
                ));
            }
        };
        let literal = self.literal()?;
        Ok(Expr::Compare {
            column,
            op,
            literal,
        })
    }

    fn literal(&mut self) -> Result<Literal, ConditionError> {
        let token = self.next();
        match token.as_ref().map(|t| &t.kind) {
            Some(TokenKind::Number(number)) => {
                let parsed = Number::parse(number).ok_or_else(|| ConditionError {
                    offset: token.as_ref().map_or(self.end, |t| t.offset),
                    message: format!("`{number}` is not a number"),
                    help: "write numbers like 100, -2.5 or 1e6".into(),
                })?;
                Ok(Literal::Number(number.as_str().into(), parsed))
            }
            Some(TokenKind::Text(text)) => Ok(Literal::Text(
                text.as_str().into(),
                Number::parse(text.trim()),
            )),
            Some(TokenKind::Word(word)) if word.eq_ignore_ascii_case("true") => {
                Ok(Literal::Bool(true))
            }
            Some(TokenKind::Word(word)) if word.eq_ignore_ascii_case("false") => {
                Ok(Literal::Bool(false))
            }
            Some(TokenKind::Word(word)) if word.eq_ignore_ascii_case("null") => {
                self.at -= 1;
                Err(self.error(
                    "a comparison with null is never true",
                    "write `column is null` or `column is not null`",
                ))
            }
            _ => {
                self.at -= 1;
                let found = token
                    .as_ref()
                    .map_or("the end".to_owned(), |t| format!("`{}`", token_text(t)));
                Err(self.error(
                    format!("expected a value, found {found}"),
                    "compare with a number, 'text' in single quotes, true or false (columns cannot be compared with each other)",
                ))
            }
        }
    }
}

fn token_text(token: &Token) -> String {
    match &token.kind {
        TokenKind::Word(text) | TokenKind::Number(text) => text.clone(),
        TokenKind::Text(text) => format!("'{text}'"),
        TokenKind::Op(op) => (*op).to_owned(),
        TokenKind::Open => "(".into(),
        TokenKind::Close => ")".into(),
        TokenKind::Comma => ",".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Row;

    fn row() -> Row {
        Row::from_pairs([
            ("status", Datum::text("paid")),
            ("total", Datum::Number("120.50".into())),
            (
                "big",
                Datum::Number("123456789012345678901234567890.1".into()),
            ),
            ("note", Datum::Null),
            ("done", Datum::Bool(true)),
            ("body", Datum::UnchangedToast),
            ("score", Datum::Number("1e+20".into())),
        ])
    }

    fn truth(source: &str) -> Truth {
        let row = row();
        Condition::parse(source)
            .unwrap_or_else(|e| panic!("{source}: {e:?}"))
            .eval(|column| row.get(column))
            .0
    }

    #[test]
    fn every_operator_on_numbers_text_booleans_and_nulls() {
        let cases: &[(&str, Truth)] = &[
            ("status = 'paid'", Truth::True),
            ("status <> 'paid'", Truth::False),
            ("status != 'draft'", Truth::True),
            ("total > 100", Truth::True),
            ("total > 120.5", Truth::False),
            ("total >= 120.5", Truth::True),
            ("total = 120.500", Truth::True),
            ("total < 99", Truth::False),
            ("total <= '120.50'", Truth::True),
            ("total > 9", Truth::True),
            ("big > 123456789012345678901234567890", Truth::True),
            ("big < -1", Truth::False),
            ("score > 1e19", Truth::True),
            ("status in ('new', 'paid')", Truth::True),
            ("status not in ('new', 'paid')", Truth::False),
            ("total in (1, 120.5)", Truth::True),
            ("note is null", Truth::True),
            ("note is not null", Truth::False),
            ("status is null", Truth::False),
            ("note = 'x'", Truth::Null),
            ("not note = 'x'", Truth::Null),
            ("note = 'x' or status = 'paid'", Truth::True),
            ("note = 'x' and status = 'paid'", Truth::Null),
            ("done = true", Truth::True),
            ("done = 'f'", Truth::False),
            ("NOT (status = 'paid' AND total > 1000)", Truth::True),
            (
                "status = 'paid' and total > 100 or note is null",
                Truth::True,
            ),
            ("body = 'x'", Truth::Unknown),
            ("body = 'x' or status = 'paid'", Truth::True),
            ("body = 'x' and status = 'draft'", Truth::False),
            ("body is null", Truth::Unknown),
        ];
        for (source, expected) in cases {
            assert_eq!(truth(source), *expected, "{source}");
        }
    }

    #[test]
    fn the_first_unknown_column_is_named() {
        let row = row();
        let condition = Condition::parse("status = 'paid' and body <> 'x'").unwrap();
        assert_eq!(
            condition.eval(|column| row.get(column)),
            (Truth::Unknown, Some("body"))
        );
        assert_eq!(condition.columns(), ["status", "body"]);
    }

    #[test]
    fn errors_say_what_and_where() {
        let cases: &[(&str, usize, &str)] = &[
            ("status = ", 9, "expected a value, found the end"),
            ("status == 'x'", 8, "expected a value, found `=`"),
            ("status = 'x", 9, "unterminated text literal"),
            ("(status = 'x'", 13, "`(` is not closed"),
            (
                "status = 'x' total > 1",
                13,
                "unexpected `total` in the condition",
            ),
            ("status = other", 9, "expected a value, found `other`"),
            ("status = null", 9, "a comparison with null is never true"),
            (
                "\"status\" = 'x'",
                0,
                "double quotes are not allowed in a condition",
            ),
            ("total > 1.2.3", 8, "`1.2.3` is not a number"),
            (
                "status is 'x'",
                10,
                "`is` must be followed by `null` or `not null`",
            ),
            (
                "status in 'x'",
                10,
                "`in` must be followed by a list in parentheses",
            ),
            ("and = 1", 0, "expected a column name, found `and`"),
            ("total ~ 1", 6, "unexpected `~` in the condition"),
            ("", 0, "the condition ends where a comparison should be"),
        ];
        for (source, offset, message) in cases {
            let error = Condition::parse(source).unwrap_err();
            assert_eq!(
                (error.offset, error.message.as_str()),
                (*offset, *message),
                "{source}"
            );
        }
    }
}
