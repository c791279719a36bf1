//! `explain`: one change in, the commands evictd would send out, each with
//! the mapping rule that asked for it. Shared by `evictd explain` and the
//! console's playground; pure (the column types come from the caller).

use crate::change::{Datum, Op, Row, RowChange};
use crate::mapping::{Mappings, Output};
use crate::plan::plan_changes;

/// What `explain` knows of the table's column types: the database's
/// categories (`pg_type.typcategory`), or offline only which columns a
/// condition compares with a number literal.
pub enum ColumnTypes {
    Database(Vec<(String, char)>),
    Offline(Vec<String>),
}

impl ColumnTypes {
    /// Offline: the columns `table`'s conditions compare with a number.
    pub fn offline(mappings: &Mappings, table: &crate::change::TableName) -> ColumnTypes {
        let numeric = mappings
            .table(table)
            .map(|mapping| {
                mapping
                    .conditions()
                    .flat_map(|(condition, _)| condition.numeric_columns())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        ColumnTypes::Offline(numeric)
    }

    /// `datum` as its column's type: a string for a numeric column is a
    /// number (`"12.50"` compares as 12.50), a number or boolean for a text
    /// column is its text; `note` says when a string was taken as a number
    /// offline.
    fn typed(&self, column: &str, datum: Datum, note: &mut Vec<String>) -> Datum {
        let is_number = |text: &str| text.trim().parse::<f64>().is_ok();
        match (self, datum) {
            (ColumnTypes::Database(categories), datum) => {
                let category = categories
                    .iter()
                    .find(|(name, _)| name == column)
                    .map(|(_, category)| *category);
                match (category, datum) {
                    (Some('N'), Datum::Text(text)) if is_number(&text) => {
                        Datum::Number(text.trim().into())
                    }
                    (Some('B'), Datum::Text(text)) => match &*text.to_ascii_lowercase() {
                        "t" | "true" => Datum::Bool(true),
                        "f" | "false" => Datum::Bool(false),
                        _ => Datum::Text(text),
                    },
                    (Some('S' | 'E' | 'U' | 'D'), Datum::Number(text)) => Datum::Text(text),
                    (_, datum) => datum,
                }
            }
            (ColumnTypes::Offline(numeric), Datum::Text(text))
                if is_number(&text) && numeric.iter().any(|name| name == column) =>
            {
                note.push(format!(
                    "{column}: \"{text}\" was taken as a number, as a condition compares it with one (give --config to take the column types from the database)"
                ));
                Datum::Number(text.trim().into())
            }
            (_, datum) => datum,
        }
    }
}

/// A row from a JSON object of column -> value (`what` names it in
/// errors); `unchanged` columns become unchanged TOAST.
pub fn row_from_json(
    what: &str,
    json: &str,
    unchanged: &[String],
    types: &ColumnTypes,
    notes: &mut Vec<String>,
) -> Result<Row, String> {
    let value: Box<serde_json::value::RawValue> =
        serde_json::from_str(json).map_err(|e| format!("{what}: not JSON: {e}"))?;
    let object: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_str(value.get())
            .map_err(|_| format!("{what}: expected a JSON object of column -> value"))?;
    let mut pairs: Vec<(String, Datum)> = object
        .into_iter()
        .map(|(column, value)| {
            let datum = types.typed(&column, datum_from_json(&value), notes);
            (column, datum)
        })
        .collect();
    for column in unchanged {
        match pairs.iter_mut().find(|(name, _)| name == column) {
            Some((_, datum)) => *datum = Datum::UnchangedToast,
            None => pairs.push((column.clone(), Datum::UnchangedToast)),
        }
    }
    Ok(Row::from_pairs(
        pairs
            .iter()
            .map(|(name, datum)| (name.as_str(), datum.clone())),
    ))
}

/// A value given in JSON: a number keeps its text as written (`12.50`
/// stays `12.50`, as a numeric column's text would), an object or array is
/// a json column's text as written.
fn datum_from_json(value: &serde_json::value::RawValue) -> Datum {
    let json = value.get().trim();
    match json.as_bytes().first() {
        Some(b'n') => Datum::Null,
        Some(b't') => Datum::Bool(true),
        Some(b'f') => Datum::Bool(false),
        Some(b'"') => serde_json::from_str::<String>(json).map_or_else(
            |_| Datum::Text(json.into()),
            |text| Datum::Text(text.into()),
        ),
        Some(b'{' | b'[') => Datum::Json(json.into()),
        _ => Datum::Number(json.into()),
    }
}

/// What one change makes evictd do.
#[derive(Debug, serde::Serialize)]
pub struct Explained {
    /// Each command in the order it is sent, then the CDN purges.
    pub lines: Vec<Line>,
    /// What the evaluator noted (a condition it could not decide, ...).
    pub notes: Vec<String>,
}

/// One command with the rule that asked for it.
#[derive(Debug, serde::Serialize)]
pub struct Line {
    pub command: String,
    /// Where the rule is written (`file:line`).
    pub at: String,
    /// The conditions or `changed` columns that decided it, if any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decided: Vec<String>,
}

impl Line {
    /// `command  # file:line (deciders)`, as `evictd explain` prints it.
    pub fn text(&self) -> String {
        if self.decided.is_empty() {
            format!("{}  # {}", self.command, self.at)
        } else {
            format!(
                "{}  # {} ({})",
                self.command,
                self.at,
                self.decided.join("; ")
            )
        }
    }
}

/// The commands `change` turns into under `mappings`; `default_identity`
/// words the notes for REPLICA IDENTITY DEFAULT.
pub fn explain(mappings: &Mappings, change: &RowChange, default_identity: bool) -> Explained {
    let mut out = Output::with_notes();
    let plan = plan_changes(mappings, [change], &mut out);
    let notes = out
        .notes
        .iter()
        .map(|note| note.kind.describe(mappings, change, default_identity))
        .collect();
    let mapping = mappings.table(&change.table);
    let mut lines: Vec<Line> = plan
        .commands
        .iter()
        .map(|command| {
            let origin = command.origin();
            Line {
                command: command.to_string(),
                at: mappings.origin(origin).file_line(),
                decided: mapping.map(|m| m.deciders(origin)).unwrap_or_default(),
            }
        })
        .collect();
    // CDN purges go out after Redis applied the commands above.
    let purges = plan
        .purges
        .all
        .map(|origin| ("PURGE ALL".to_owned(), origin))
        .into_iter()
        .chain(
            plan.purges
                .keys
                .iter()
                .map(|(key, origin)| (format!("PURGE {key}"), *origin)),
        );
    lines.extend(purges.map(|(command, origin)| Line {
        command,
        at: mappings.origin(origin).file_line(),
        decided: Vec::new(),
    }));
    Explained { lines, notes }
}

/// Whether `op` needs a new row, an old row, both or neither, as a
/// problem to show when one is missing.
pub fn missing_row(op: Op, old: Option<&Row>, new: Option<&Row>) -> Option<&'static str> {
    match op {
        Op::Insert | Op::Update if new.is_none() => Some("needs the new row"),
        Op::Delete | Op::Update if old.is_none() => Some("needs the old row"),
        _ => None,
    }
}
