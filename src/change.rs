//! The source-agnostic change model: what every source yields and what the
//! mapping evaluator reads.
//!
//! A [`RowChange`] is one committed row change (or a TRUNCATE) with the old
//! and new row as far as the source knows them. Every source yields the same
//! [`Event`]s: row changes, then the commit that ends their transaction with
//! the [`Checkpoint`] that acknowledges it (a WAL position, or the next
//! offsets of Kafka partitions), so that a change and the position that
//! acknowledges it can never drift apart.
//!
//! Values are kept in their canonical text form (pgoutput's text output), so
//! one mapping renders the same keys whatever the source. A value the source
//! did not send is [`Datum::UnchangedToast`] or [`Datum::Missing`], never a
//! NULL or an empty string: the evaluator must be able to tell "absent" from
//! "NULL".

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

/// A schema-qualified table name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: Box<str>,
    pub name: Box<str>,
}

impl TableName {
    pub fn new(schema: &str, name: &str) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parses `schema.table` or `table` (meaning `public.table`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split('.').collect();
        let (schema, name) = match parts.as_slice() {
            [name] => ("public", *name),
            [schema, name] => (*schema, *name),
            _ => return Err(format!("`{text}` is not `table` or `schema.table`")),
        };
        for part in [schema, name] {
            if !is_identifier(part) {
                return Err(format!(
                    "`{text}` is not a table name: `{part}` is not an identifier (letters, digits, `_`, `$`; not starting with a digit)"
                ));
            }
        }
        Ok(TableName::new(schema, name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Whether `text` is an unquoted SQL identifier as evictd accepts them in
/// mappings (column and table names).
pub fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) if c.is_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

/// The kind of row change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Insert, Op::Update, Op::Delete, Op::Truncate];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }

    pub fn parse(text: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == text)
    }

    /// A bit for [`OpSet`].
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Op`]s, as in a mapping's `on = [...]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OpSet(u8);

impl OpSet {
    pub const ALL: OpSet = OpSet(0b1111);

    pub fn insert(&mut self, op: Op) {
        self.0 |= op.bit();
    }

    pub fn contains(self, op: Op) -> bool {
        self.0 & op.bit() != 0
    }

    /// Its operations, in [`Op::ALL`]'s order.
    pub fn iter(self) -> impl Iterator<Item = Op> {
        Op::ALL.into_iter().filter(move |op| self.contains(*op))
    }
}

/// One column value as the source delivered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// Canonical text of a value that is a string in JSON.
    Text(Box<str>),
    /// Canonical text of an integer, numeric or floating point value.
    Number(Box<str>),
    /// A boolean; its canonical text is `t` or `f` as in pgoutput.
    Bool(bool),
    /// The text of a json/jsonb value.
    Json(Box<str>),
    /// An unchanged TOASTed value the source did not send (pgoutput `'u'`,
    /// Debezium's unavailable-value placeholder). Its value is unknown here.
    UnchangedToast,
    /// A column the source did not send at all (a non-key column of an old
    /// row under REPLICA IDENTITY DEFAULT). Its value is unknown here.
    Missing,
}

impl Datum {
    pub fn text(text: &str) -> Datum {
        Datum::Text(text.into())
    }

    /// The canonical text a key template renders, or `None` for NULL and for
    /// values that are not known.
    pub fn canonical_text(&self) -> Option<&str> {
        match self {
            Datum::Text(text) | Datum::Number(text) | Datum::Json(text) => Some(text),
            Datum::Bool(true) => Some("t"),
            Datum::Bool(false) => Some("f"),
            Datum::Null | Datum::UnchangedToast | Datum::Missing => None,
        }
    }

    /// Whether the value is known (possibly NULL).
    pub fn is_known(&self) -> bool {
        !matches!(self, Datum::UnchangedToast | Datum::Missing)
    }
}

/// A row: column names shared by every row of a relation, and one value per
/// column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    names: Arc<[Arc<str>]>,
    values: Vec<Datum>,
}

impl Row {
    /// A row over `names`; `values` must have one entry per name.
    pub fn new(names: Arc<[Arc<str>]>, values: Vec<Datum>) -> Row {
        assert_eq!(names.len(), values.len(), "one value per column");
        Row { names, values }
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, Datum)>) -> Row {
        let (names, values): (Vec<Arc<str>>, Vec<Datum>) = pairs
            .into_iter()
            .map(|(name, value)| (Arc::from(name), value))
            .unzip();
        Row::new(names.into(), values)
    }

    /// The value of `column`; [`Datum::Missing`] when the row has no such
    /// column.
    pub fn get(&self, column: &str) -> &Datum {
        self.names
            .iter()
            .position(|name| &**name == column)
            .map_or(&Datum::Missing, |index| &self.values[index])
    }

    pub fn columns(&self) -> impl Iterator<Item = (&str, &Datum)> {
        self.names.iter().map(|name| &**name).zip(&self.values)
    }
}

/// One committed row change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowChange {
    pub table: Arc<TableName>,
    pub op: Op,
    /// The old row: present on deletes and on updates when the source sent it
    /// (REPLICA IDENTITY FULL, or key columns when a key changed).
    pub old: Option<Row>,
    /// The new row: present on inserts and updates.
    pub new: Option<Row>,
}

/// A write-ahead log position: the client crate's [`Position`], one type
/// for what evictd acknowledges and what a reader waits for.
///
/// [`Position`]: evictd_client::Position
pub use evictd_client::Position as Lsn;

/// A partition of a Kafka topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// The next offset to read of each partition: everything before it is
/// covered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Offsets(pub BTreeMap<Partition, i64>);

impl Offsets {
    /// The offsets of one record: its partition's next offset.
    pub fn after(partition: Partition, offset: i64) -> Offsets {
        Offsets(BTreeMap::from([(partition, offset + 1)]))
    }

    /// Takes in a later checkpoint's offsets (never moving one backwards).
    pub fn absorb(&mut self, later: &Offsets) {
        for (partition, next) in &later.0 {
            let entry = self.0.entry(partition.clone()).or_insert(*next);
            *entry = (*entry).max(*next);
        }
    }
}

/// The position that acknowledges a transaction once it is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checkpoint {
    /// The transaction's commit `end_lsn` in the Postgres WAL.
    Lsn(Lsn),
    /// The next offsets of the Kafka partitions the records came from.
    Offsets(Offsets),
}

impl Checkpoint {
    /// Takes in the checkpoint of a later transaction: one plan carries the
    /// checkpoint that covers every transaction in it.
    pub fn absorb(&mut self, later: Checkpoint) {
        match (self, later) {
            (Checkpoint::Offsets(offsets), Checkpoint::Offsets(later)) => offsets.absorb(&later),
            (this, later) => *this = later,
        }
    }
}

/// What a source yields, in order: changes, and the commits that end their
/// transactions. Map and plan ([`crate::pipeline`]'s batcher) take these
/// from every source alike.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A regular transaction begins (Postgres): its changes and its commit
    /// follow. Sources without transactions send none.
    Begin { xid: u32 },
    /// A row change; `stream` is `(xid, subxid)` inside a streamed
    /// transaction, whose changes must wait for its Stream Commit.
    Change {
        stream: Option<(u32, u32)>,
        change: RowChange,
    },
    /// An invalidation the transaction asked for in SQL (a logical
    /// decoding message with evictd's prefix): its content, applied in
    /// order with the row changes around it; `stream` as for changes. A
    /// non-transactional message comes outside any transaction and is
    /// applied at once.
    Message {
        stream: Option<(u32, u32)>,
        /// Where the source read it, for logs: `lsn 0/16B3748` (and its
        /// `xid`), or `topic/partition offset N`.
        position: Box<str>,
        content: Box<[u8]>,
    },
    /// A transaction committed; its changes came before. A source without
    /// transactions (Kafka) commits after every record.
    Commit {
        checkpoint: Checkpoint,
        commit_time: Option<SystemTime>,
    },
    /// A streamed transaction committed.
    StreamCommit {
        xid: u32,
        checkpoint: Checkpoint,
        commit_time: Option<SystemTime>,
    },
    /// A streamed transaction (`subxid == xid`) or one of its
    /// subtransactions aborted: drop its buffered changes.
    StreamAbort { xid: u32, subxid: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips() {
        let lsn = Lsn::parse("0/16B3748").unwrap();
        assert_eq!(lsn.0, 0x16B3748);
        assert_eq!(lsn.to_string(), "0/16B3748");
        assert_eq!(Lsn::parse("1/0").unwrap().0, 1 << 32);
        assert_eq!(Lsn::parse("nope"), None);
    }

    #[test]
    fn offsets_absorb_later_ones_and_never_move_back() {
        let p = |n| Partition {
            topic: "t".into(),
            partition: n,
        };
        let mut checkpoint = Checkpoint::Offsets(Offsets::after(p(0), 9));
        checkpoint.absorb(Checkpoint::Offsets(Offsets::after(p(1), 4)));
        checkpoint.absorb(Checkpoint::Offsets(Offsets::after(p(0), 3)));
        let expected = Offsets(BTreeMap::from([(p(0), 10), (p(1), 5)]));
        assert_eq!(checkpoint, Checkpoint::Offsets(expected));
        let mut lsn = Checkpoint::Lsn(Lsn(1));
        lsn.absorb(Checkpoint::Lsn(Lsn(2)));
        assert_eq!(lsn, Checkpoint::Lsn(Lsn(2)));
    }

    #[test]
    fn table_names() {
        assert_eq!(
            TableName::parse("orders").unwrap().to_string(),
            "public.orders"
        );
        assert_eq!(
            TableName::parse("app.orders").unwrap().to_string(),
            "app.orders"
        );
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("1abc").is_err());
        assert!(TableName::parse("").is_err());
    }

    #[test]
    fn missing_column_reads_as_missing() {
        let row = Row::from_pairs([("id", Datum::text("1"))]);
        assert_eq!(row.get("id"), &Datum::text("1"));
        assert_eq!(row.get("other"), &Datum::Missing);
    }
}
