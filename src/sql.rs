//! SQL text evictd writes: identifiers and literals quoted as Postgres
//! reads them, and the conditions and selects built from them. Pure.

use crate::change::TableName;

/// `"a" = '1' and "b" = 'x'` (or `true` for no column): the SQL condition
/// that each column equals its text.
pub(crate) fn equalities<T: AsRef<str>>(
    values: impl IntoIterator<Item = (impl AsRef<str>, T)>,
) -> String {
    let conditions: Vec<String> = values
        .into_iter()
        .map(|(column, text)| {
            format!(
                "{} = {}",
                quote_ident(column.as_ref()),
                quote_literal(text.as_ref())
            )
        })
        .collect();
    if conditions.is_empty() {
        "true".into()
    } else {
        conditions.join(" and ")
    }
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `select "a", "b" from "schema"."table"`.
pub fn select_columns(table: &TableName, columns: &[&str]) -> String {
    format!(
        "select {} from {}",
        columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        quote_table(table)
    )
}

pub fn quote_table(table: &TableName) -> String {
    format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&table.name)
    )
}
