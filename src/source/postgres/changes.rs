//! Decoded pgoutput messages -> source-agnostic [`Event`]s: row changes with
//! their relation's schema applied, and transaction boundaries.
//!
//! Pure: the caller feeds messages in WAL order and gets events back. It
//! keeps the relation cache (schema changes mid-stream replace an entry) and
//! which streamed transaction a message belongs to; buffering streamed
//! changes until their commit is the batcher's job, downstream.
//!
//! Old rows are made explicit: a column the source did not send is
//! [`Datum::Missing`], never NULL. When an update carries no old tuple
//! (REPLICA IDENTITY DEFAULT and the key did not change), the old row is the
//! new row's key columns, because those are known to be unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::conn::pg_time;
use super::pgoutput::{Column, Message, OldKind, Relation, Tuple, Value};
use crate::change::{Checkpoint, Datum, Event, Lsn, Op, Row, RowChange, TableName};
use crate::error::{Error, ErrorKind};
use crate::mapping::{message, Mappings};

/// How one relation's tuples become rows.
struct RelationShape {
    table: Arc<TableName>,
    names: Arc<[Arc<str>]>,
    kinds: Vec<Kind>,
    key: Vec<bool>,
    /// Columns some mapping reads; the others are not decoded.
    wanted: Vec<bool>,
    /// Whether any mapping covers the table at all.
    mapped: bool,
    /// The Relation message it was made from, to be made again under
    /// other mappings.
    described: Described,
}

/// An owned copy of a Relation message.
struct Described {
    id: u32,
    namespace: Box<str>,
    name: Box<str>,
    replica_identity: u8,
    /// (name, type OID, type modifier, part of the key)
    columns: Vec<(Box<str>, u32, i32, bool)>,
}

impl Described {
    fn of(relation: &Relation<'_>) -> Described {
        Described {
            id: relation.id,
            namespace: relation.namespace.into(),
            name: relation.name.into(),
            replica_identity: relation.replica_identity,
            columns: relation
                .columns
                .iter()
                .map(|c| (c.name.into(), c.type_oid, c.type_modifier, c.key))
                .collect(),
        }
    }

    fn relation(&self) -> Relation<'_> {
        Relation {
            xid: None,
            id: self.id,
            namespace: &self.namespace,
            name: &self.name,
            replica_identity: self.replica_identity,
            columns: self
                .columns
                .iter()
                .map(|(name, type_oid, type_modifier, key)| Column {
                    key: *key,
                    name,
                    type_oid: *type_oid,
                    type_modifier: *type_modifier,
                })
                .collect(),
        }
    }
}

/// How a column's text becomes a [`Datum`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bool,
    Number,
    Json,
    Text,
}

impl Kind {
    fn of(type_oid: u32) -> Kind {
        match type_oid {
            16 => Kind::Bool,
            20 | 21 | 23 | 26 | 700 | 701 | 1700 => Kind::Number,
            114 | 3802 => Kind::Json,
            _ => Kind::Text,
        }
    }

    fn datum(self, text: &[u8]) -> Datum {
        let text = String::from_utf8_lossy(text);
        match self {
            Kind::Bool => Datum::Bool(text == "t"),
            Kind::Number => Datum::Number(text.into()),
            Kind::Json => Datum::Json(text.into()),
            Kind::Text => Datum::Text(text.into()),
        }
    }
}

/// A column's value in Postgres' text output as the decoder turns it into a
/// [`Datum`], by the column's type: for readers of the database that must
/// see rows as the stream does (the consistency checker, `evictd audit`).
pub(crate) fn datum_of(type_oid: u32, text: &str) -> Datum {
    Kind::of(type_oid).datum(text.as_bytes())
}

/// What the decoders of one pipeline learned of mapped relations, kept
/// across sessions: relations are followed by OID, so a mapped table that
/// is renamed is still recognised (and its drift reported).
#[derive(Clone, Default)]
pub struct RelationMemory(Arc<Mutex<HashMap<u32, Known>>>);

/// One mapped relation as last seen.
struct Known {
    /// The mapped table it is invalidated as.
    mapped: Arc<TableName>,
    /// Its name, columns and replica identity in the last Relation message
    /// (`None` when only the catalog said so, at start).
    seen: Option<(TableName, Vec<Arc<str>>, u8)>,
}

impl RelationMemory {
    /// Remembers the OIDs the live checks found for mapped tables.
    pub fn seed(&self, oids: impl IntoIterator<Item = (u32, Arc<TableName>)>) {
        let mut known = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for (oid, mapped) in oids {
            known.entry(oid).or_insert(Known { mapped, seen: None });
        }
    }
}

/// A Relation message for a mapped table: what is wrong with it now (or
/// `None`), and whether it is new to this process or its name, columns or
/// replica identity changed since it was last seen (the live checks then
/// run again at once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaChange {
    pub table: Arc<TableName>,
    pub problem: Option<String>,
    pub changed: bool,
}

/// Turns pgoutput messages into [`Event`]s.
pub struct ChangeDecoder {
    mappings: Arc<Mappings>,
    relations: HashMap<u32, RelationShape>,
    memory: RelationMemory,
    schema_changes: Vec<SchemaChange>,
    /// The streamed transaction whose block we are in.
    stream_xid: Option<u32>,
    /// Inside Begin..Commit of a regular transaction.
    in_txn: bool,
    /// That transaction's xid, for logs.
    txn_xid: Option<u32>,
}

impl ChangeDecoder {
    #[cfg(test)]
    pub fn new(mappings: Arc<Mappings>) -> ChangeDecoder {
        ChangeDecoder::with_memory(mappings, RelationMemory::default())
    }

    /// A decoder that shares what earlier sessions learned of relations.
    pub fn with_memory(mappings: Arc<Mappings>, memory: RelationMemory) -> ChangeDecoder {
        ChangeDecoder {
            mappings,
            relations: HashMap::new(),
            memory,
            schema_changes: Vec::new(),
            stream_xid: None,
            in_txn: false,
            txn_xid: None,
        }
    }

    /// Whether the next message must be decoded with a streamed xid.
    pub fn in_stream_block(&self) -> bool {
        self.stream_xid.is_some()
    }

    /// Whether a regular transaction is open (Begin seen, Commit not yet).
    pub fn in_transaction(&self) -> bool {
        self.in_txn
    }

    /// Handles one message, appending what it means to `events`.
    pub fn handle(&mut self, message: Message<'_>, events: &mut Vec<Event>) -> Result<(), Error> {
        match message {
            Message::Begin { xid, .. } => {
                self.in_txn = true;
                self.txn_xid = Some(xid);
                events.push(Event::Begin { xid });
            }
            Message::Commit {
                end_lsn,
                commit_time,
                ..
            } => {
                self.in_txn = false;
                events.push(Event::Commit {
                    checkpoint: Checkpoint::Lsn(Lsn(end_lsn)),
                    commit_time: Some(pg_time(commit_time)),
                });
            }
            Message::Relation(relation) => self.relation(&relation),
            Message::Insert { xid, relation, new } => {
                if let Some(shape) = self.mapped(relation)? {
                    let new = shape.row(&new, false);
                    self.push(
                        xid,
                        shape_change(shape, Op::Insert, None, Some(new)),
                        events,
                    );
                }
            }
            Message::Update {
                xid,
                relation,
                old,
                new,
            } => {
                if let Some(shape) = self.mapped(relation)? {
                    let new = shape.row(&new, false);
                    let old = match old {
                        Some((kind, old)) => shape.row(&old, kind == OldKind::Key),
                        None => shape.key_columns_of(&new),
                    };
                    self.push(
                        xid,
                        shape_change(shape, Op::Update, Some(old), Some(new)),
                        events,
                    );
                }
            }
            Message::Delete {
                xid,
                relation,
                old: (kind, old),
            } => {
                if let Some(shape) = self.mapped(relation)? {
                    let old = shape.row(&old, kind == OldKind::Key);
                    self.push(
                        xid,
                        shape_change(shape, Op::Delete, Some(old), None),
                        events,
                    );
                }
            }
            Message::Truncate { xid, relations, .. } => {
                for relation in relations {
                    if let Some(shape) = self.mapped(relation)? {
                        let change = shape_change(shape, Op::Truncate, None, None);
                        self.push(xid, change, events);
                    }
                }
            }
            Message::StreamStart { xid, .. } => self.stream_xid = Some(xid),
            Message::StreamStop => self.stream_xid = None,
            Message::StreamCommit {
                xid,
                end_lsn,
                commit_time,
                ..
            } => events.push(Event::StreamCommit {
                xid,
                checkpoint: Checkpoint::Lsn(Lsn(end_lsn)),
                commit_time: Some(pg_time(commit_time)),
            }),
            Message::StreamAbort { xid, subxid } => events.push(Event::StreamAbort { xid, subxid }),
            Message::Message {
                xid,
                transactional,
                lsn,
                prefix,
                content,
            } if prefix == message::PREFIX => {
                let stream = if transactional {
                    self.stream_of(xid)
                } else {
                    None
                };
                let position = match xid.or(self.txn_xid) {
                    Some(xid) if transactional => format!("lsn {} xid {xid}", Lsn(lsn)),
                    _ => format!("lsn {}", Lsn(lsn)),
                };
                events.push(Event::Message {
                    stream,
                    position: position.into(),
                    content: content.into(),
                });
            }
            Message::Origin { .. } | Message::Type { .. } | Message::Message { .. } => {}
        }
        Ok(())
    }

    fn push(&self, xid: Option<u32>, change: RowChange, events: &mut Vec<Event>) {
        let stream = self.stream_of(xid);
        events.push(Event::Change { stream, change });
    }

    /// The (transaction, subtransaction) of a message inside a streamed
    /// block.
    fn stream_of(&self, xid: Option<u32>) -> Option<(u32, u32)> {
        match (self.stream_xid, xid) {
            (Some(top), Some(sub)) => Some((top, sub)),
            (Some(top), None) => Some((top, top)),
            (None, _) => None,
        }
    }

    /// The Relation messages of mapped tables seen since the last call.
    pub fn take_schema_changes(&mut self) -> Vec<SchemaChange> {
        std::mem::take(&mut self.schema_changes)
    }

    fn relation(&mut self, relation: &Relation<'_>) {
        let named = TableName::new(relation.namespace, relation.name);
        let columns: Vec<Arc<str>> = relation.columns.iter().map(|c| Arc::from(c.name)).collect();
        let mut memory = self.memory.0.lock().unwrap_or_else(PoisonError::into_inner);
        let known = memory.get(&relation.id);
        // A mapped table keeps its mapping under a new name (or schema):
        // its keys do not depend on the name, and missing its changes is
        // the one thing evictd must not do.
        let (table, renamed) = match known {
            Some(known)
                if self.mappings.table(&named).is_none()
                    && self.mappings.table(&known.mapped).is_some() =>
            {
                (known.mapped.clone(), *known.mapped != named)
            }
            _ => (Arc::new(named.clone()), false),
        };
        let mapping = self.mappings.table(&table);
        if let Some(mapping) = mapping {
            // The first Relation message of a table in this process counts
            // as a change too: the catalog may have changed since the
            // checks at start (a replica identity set and undone), and
            // waiting for the next minute's check would leave /readyz wrong.
            let changed =
                known
                    .and_then(|known| known.seen.as_ref())
                    .is_none_or(|(name, seen, identity)| {
                        *name != named || *seen != columns || *identity != relation.replica_identity
                    });
            let mut problems = Vec::new();
            if renamed {
                problems.push(format!(
                    "renamed to {named}: its changes are still invalidated under the mapping of {table}; name {named} in the mappings and restart evictd"
                ));
            }
            let missing: Vec<&str> = mapping
                .columns()
                .into_iter()
                .filter(|column| !columns.iter().any(|c| &**c == *column))
                .collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "column(s) {} of the mapping are not in {named} any more (dropped or renamed): every change deletes the keys that use them by pattern",
                    missing.join(", ")
                ));
            }
            self.schema_changes.push(SchemaChange {
                table: table.clone(),
                problem: (!problems.is_empty()).then(|| problems.join("; ")),
                changed,
            });
            memory.insert(
                relation.id,
                Known {
                    mapped: table.clone(),
                    seen: Some((named, columns.clone(), relation.replica_identity)),
                },
            );
        }
        drop(memory);
        let wanted_columns = mapping.map(|m| m.columns()).unwrap_or_default();
        let shape = RelationShape {
            names: columns.into(),
            kinds: relation
                .columns
                .iter()
                .map(|c| Kind::of(c.type_oid))
                .collect(),
            key: relation.columns.iter().map(|c| c.key).collect(),
            wanted: relation
                .columns
                .iter()
                .map(|c| wanted_columns.contains(&c.name))
                .collect(),
            mapped: mapping.is_some(),
            table,
            described: Described::of(relation),
        };
        self.relations.insert(relation.id, shape);
    }

    /// Decodes with `mappings` from now on (a reload): every relation seen
    /// so far is made again, so that a newly mapped table's changes are
    /// decoded and an unmapped one's are not. Call it between transactions.
    pub fn set_mappings(&mut self, mappings: Arc<Mappings>) {
        self.mappings = mappings;
        let described: Vec<Described> = self
            .relations
            .drain()
            .map(|(_, shape)| shape.described)
            .collect();
        for relation in &described {
            self.relation(&relation.relation());
        }
    }

    /// The relation's shape when some mapping covers it.
    fn mapped(&self, relation: u32) -> Result<Option<&RelationShape>, Error> {
        match self.relations.get(&relation) {
            Some(shape) => Ok(shape.mapped.then_some(shape)),
            None => Err(Error::new(
                ErrorKind::Protocol,
                format!("a change for relation {relation}, which no Relation message described"),
            )),
        }
    }
}

fn shape_change(shape: &RelationShape, op: Op, old: Option<Row>, new: Option<Row>) -> RowChange {
    RowChange {
        table: shape.table.clone(),
        op,
        old,
        new,
    }
}

impl RelationShape {
    /// A row from a tuple; `key_only` tuples send NULL for non-key columns,
    /// which are really not sent at all.
    fn row(&self, tuple: &Tuple<'_>, key_only: bool) -> Row {
        let mut values = Vec::with_capacity(self.names.len());
        for (index, value) in tuple.values().take(self.names.len()).enumerate() {
            let wanted = self.wanted.get(index).copied().unwrap_or(false);
            let sent = !key_only || self.key.get(index).copied().unwrap_or(false);
            values.push(match value {
                _ if !wanted || !sent => Datum::Missing,
                Value::Null => Datum::Null,
                Value::UnchangedToast => Datum::UnchangedToast,
                Value::Text(text) => self.kinds[index].datum(text),
                // evictd never asks for binary values.
                Value::Binary(_) => Datum::Missing,
            });
        }
        // A tuple shorter than the relation (columns added since) leaves
        // the rest unknown.
        values.resize(self.names.len(), Datum::Missing);
        Row::new(self.names.clone(), values)
    }

    /// The old row of an update that carried none: the key columns of the
    /// new row, everything else unknown.
    fn key_columns_of(&self, new: &Row) -> Row {
        let values = new
            .columns()
            .zip(&self.key)
            .map(|((_, value), &key)| if key { value.clone() } else { Datum::Missing })
            .collect();
        Row::new(self.names.clone(), values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{load_str, Limits};
    use crate::source::postgres::pgoutput::decode;

    fn decoder() -> ChangeDecoder {
        let mappings = load_str(
            "m.toml",
            "[[table]]\nname = \"t\"\nkeys = [\"t:{id}\"]\n",
            Limits::default(),
        )
        .unwrap();
        ChangeDecoder::new(Arc::new(mappings))
    }

    fn insert_for(relation: u32) -> Vec<u8> {
        let mut buf = vec![b'I'];
        buf.extend(relation.to_be_bytes());
        buf.push(b'N');
        buf.extend(1_u16.to_be_bytes());
        buf.extend([b't', 0, 0, 0, 1, b'7']);
        buf
    }

    #[test]
    fn a_change_for_an_unknown_relation_is_an_error_not_a_guess() {
        let mut events = Vec::new();
        let bytes = insert_for(99);
        let error = decoder()
            .handle(decode(&bytes, false).unwrap(), &mut events)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "a change for relation 99, which no Relation message described"
        );
        assert!(!error.is_transient());
        assert!(events.is_empty());
    }

    #[test]
    fn a_tuple_longer_than_its_relation_does_not_panic() {
        let mut decoder = decoder();
        let mut relation = vec![b'R'];
        relation.extend(5_u32.to_be_bytes());
        relation.extend(b"public\0t\0d");
        relation.extend(0_u16.to_be_bytes());
        let mut events = Vec::new();
        decoder
            .handle(decode(&relation, false).unwrap(), &mut events)
            .unwrap();
        decoder
            .handle(decode(&insert_for(5), false).unwrap(), &mut events)
            .unwrap();
        let [Event::Change { change, .. }] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert_eq!(change.new.as_ref().unwrap().get("id"), &Datum::Missing);
    }

    /// A Relation message: `columns` of type int8, the first one the key.
    fn relation_message(id: u32, name: &str, columns: &[&str]) -> Vec<u8> {
        relation_with_identity(id, name, columns, b'd')
    }

    /// A Relation message with replica identity `identity` (`d`, `n`, `f`,
    /// `i`).
    fn relation_with_identity(id: u32, name: &str, columns: &[&str], identity: u8) -> Vec<u8> {
        let mut buf = vec![b'R'];
        buf.extend(id.to_be_bytes());
        buf.extend(b"public\0");
        buf.extend(name.as_bytes());
        buf.push(0);
        buf.push(identity);
        buf.extend(u16::try_from(columns.len()).unwrap().to_be_bytes());
        for (index, column) in columns.iter().enumerate() {
            buf.push(u8::from(index == 0));
            buf.extend(column.as_bytes());
            buf.push(0);
            buf.extend(20_u32.to_be_bytes());
            buf.extend((-1_i32).to_be_bytes());
        }
        buf
    }

    #[test]
    fn a_changed_replica_identity_is_a_schema_change() {
        let mut decoder = decoder();
        let mut events = Vec::new();
        for identity in [b'n', b'n', b'f'] {
            let message = relation_with_identity(5, "t", &["id"], identity);
            decoder
                .handle(decode(&message, false).unwrap(), &mut events)
                .unwrap();
        }
        let changed: Vec<bool> = decoder
            .take_schema_changes()
            .iter()
            .map(|change| change.changed)
            .collect();
        // First seen, the same again, then `REPLICA IDENTITY NOTHING`
        // undone: the live checks run again at once the first and last time.
        assert_eq!(changed, [true, false, true]);
    }

    #[test]
    fn a_renamed_mapped_relation_keeps_its_mapping_and_says_so() {
        let mut decoder = decoder();
        let mut events = Vec::new();
        for message in [
            relation_message(5, "t", &["id"]),
            insert_for(5),
            relation_message(5, "t2", &["id"]),
            insert_for(5),
        ] {
            decoder
                .handle(decode(&message, false).unwrap(), &mut events)
                .unwrap();
        }
        let tables: Vec<String> = events
            .iter()
            .map(|event| match event {
                Event::Change { change, .. } => change.table.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(tables, ["public.t", "public.t"]);
        let changes = decoder.take_schema_changes();
        assert_eq!(changes.len(), 2);
        assert_eq!(
            (changes[0].problem.as_deref(), changes[0].changed),
            (None, true)
        );
        let renamed = changes[1].problem.as_deref().unwrap();
        assert!(renamed.starts_with("renamed to public.t2"), "{renamed}");
        assert!(changes[1].changed);

        // A new session of the same pipeline still knows the relation.
        let mut next = ChangeDecoder::with_memory(decoder.mappings.clone(), decoder.memory.clone());
        next.handle(
            decode(&relation_message(5, "t2", &["id"]), false).unwrap(),
            &mut events,
        )
        .unwrap();
        let changes = next.take_schema_changes();
        assert!(changes[0]
            .problem
            .as_deref()
            .unwrap()
            .starts_with("renamed"));
        assert!(!changes[0].changed);
    }

    #[test]
    fn a_mapped_column_missing_from_the_relation_is_a_problem() {
        let mut decoder = decoder();
        let mut events = Vec::new();
        decoder
            .handle(
                decode(&relation_message(5, "t", &["other"]), false).unwrap(),
                &mut events,
            )
            .unwrap();
        let changes = decoder.take_schema_changes();
        let problem = changes[0].problem.as_deref().unwrap();
        assert!(
            problem.starts_with("column(s) id of the mapping"),
            "{problem}"
        );
    }
}
