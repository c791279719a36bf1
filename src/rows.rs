//! Rows read from the database in the stream's own terms (each value as
//! the source would send it), for what compares the cache with the rows:
//! the consistency checker, `evictd audit` and warming.

use std::collections::HashMap;
use std::sync::Arc;

use crate::change::{Datum, Lsn, Row, TableName};
use crate::config::SecretUrl;
use crate::error::{Error, ErrorKind};
use crate::mapping::eval::render_refresh;
use crate::mapping::Refresh;
use crate::source::postgres::changes::datum_of;
use crate::sql::{quote_literal, quote_table, select_columns};

/// The database as the checks read it: rows in the stream's own terms.
pub struct Database {
    pub(crate) url: SecretUrl,
    pub(crate) client: std::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
    /// Each table's column types, learned once.
    pub(crate) types: HashMap<TableName, Arc<HashMap<String, u32>>>,
}

impl Database {
    pub fn new(url: SecretUrl) -> Database {
        Database {
            url,
            client: std::sync::Mutex::new(None),
            types: HashMap::new(),
        }
    }

    /// The connection, made again after it closed.
    pub(crate) async fn client(&self) -> Result<Arc<tokio_postgres::Client>, Error> {
        let lock = || {
            self.client
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(client) = lock().as_ref().filter(|client| !client.is_closed()) {
            return Ok(Arc::clone(client));
        }
        let client = crate::catalog::connect(&self.url)
            .await
            .map(Arc::new)
            .map_err(|e| Error::catalog("cannot connect to the database", e))?;
        *lock() = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Learns `table`'s column types, once.
    pub async fn learn(&mut self, table: &TableName) {
        if self.types.contains_key(table) {
            return;
        }
        let sql = format!(
            "select attname, atttypid::int8::text from pg_attribute where attrelid = {}::regclass and attnum > 0 and not attisdropped",
            quote_literal(&quote_table(table))
        );
        let Ok(rows) = self.query(&sql).await else {
            return;
        };
        let types = rows
            .into_iter()
            .filter_map(|row| {
                let name = row.first()?.clone()?;
                let oid = row.get(1)?.as_deref()?.parse().ok()?;
                Some((name, oid))
            })
            .collect();
        self.types.insert(table.clone(), Arc::new(types));
    }

    /// Runs `sql` (one statement, or several: the rows of them all), every
    /// value as text.
    pub async fn query(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, Error> {
        let client = self.client().await?;
        let messages = client
            .simple_query(sql)
            .await
            .map_err(|e| Error::postgres("the query failed", e))?;
        Ok(messages
            .into_iter()
            .filter_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|index| row.get(index).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    /// The rows of `table` matching `filter` (at most `limit`) as the
    /// stream would show them, `columns` of each.
    pub fn rows(
        &self,
        table: &TableName,
        columns: &[&str],
        texts: Vec<Vec<Option<String>>>,
    ) -> Result<Vec<Row>, Error> {
        let unknown = |what: String| Error::new(ErrorKind::Config, what);
        let types = self
            .types
            .get(table)
            .ok_or_else(|| unknown(format!("cannot read the columns of {table}")))?;
        let names: Arc<[Arc<str>]> = columns.iter().map(|c| Arc::from(*c)).collect();
        let oids = columns
            .iter()
            .map(|column| {
                types
                    .get(*column)
                    .copied()
                    .ok_or_else(|| unknown(format!("{table} has no column `{column}`")))
            })
            .collect::<Result<Vec<u32>, Error>>()?;
        Ok(texts
            .into_iter()
            .map(|texts| {
                let values = oids
                    .iter()
                    .zip(texts)
                    .map(|(&oid, text)| match text {
                        Some(text) => datum_of(oid, &text),
                        None => Datum::Null,
                    })
                    .collect();
                Row::new(names.clone(), values)
            })
            .collect())
    }

    /// The value `refresh` renders from the row of `table` matching
    /// `filter` (`None`: no such row), and a WAL position after the read.
    pub(crate) async fn render(
        &self,
        table: &TableName,
        refresh: &Refresh,
        filter: &str,
    ) -> Result<(Option<String>, Lsn), Error> {
        let columns = refresh_columns(refresh);
        let select = format!("{} where {filter} limit 2", select_columns(table, &columns));
        let texts = self.query(&select).await?;
        let lsn = self
            .query(&format!(
                "select {}::text",
                crate::source::postgres::control::WAL_INSERT_POSITION_NOW
            ))
            .await?
            .first()
            .and_then(|row| row.first().cloned().flatten())
            .and_then(|text| Lsn::parse(&text))
            .ok_or_else(|| Error::new(ErrorKind::Protocol, "cannot read the WAL position"))?;
        if texts.len() > 1 {
            return Err(Error::new(
                ErrorKind::Config,
                format!("several rows of {table} match {filter}"),
            ));
        }
        let rows = self.rows(table, &columns, texts)?;
        let rendered = match rows.first() {
            None => None,
            Some(row) => Some(
                render_refresh(refresh, row)
                    .ok_or_else(|| {
                        Error::new(ErrorKind::Config, "the row's refresh cannot be rendered")
                    })?
                    .1,
            ),
        };
        Ok((rendered, lsn))
    }
}

/// An error with its causes, `: `-separated.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The columns a refresh reads: its value's and its key's.
pub fn refresh_columns(refresh: &Refresh) -> Vec<&str> {
    let mut columns: Vec<&str> = refresh.columns.iter().map(|c| &**c).collect();
    for column in refresh.key.columns() {
        if !columns.contains(&column) {
            columns.push(column);
        }
    }
    columns
}
