//! Debezium change-event envelopes (JSON) decoded into [`RowChange`]s.
//!
//! Both shapes Kafka Connect's JSON converter writes are read: with the
//! `{"schema": ..., "payload": ...}` wrapper (`schemas.enable=true`), whose
//! field types let values be normalised to pgoutput's text (see
//! [`super::values`]), and the bare payload, whose values are taken as JSON
//! gives them. Ops: `c` insert, `u` update, `d` delete, `r` snapshot read
//! (an insert: the row exists), `t` truncate; `m` (a logical decoding
//! message) is not a row change and is ignored. A tombstone (no value) after
//! a delete is skipped.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustc_hash::FxHashMap;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::values;
use crate::change::{Datum, Op, Row, RowChange, TableName};
use crate::mapping::message::hex;

/// The default of Debezium's `unavailable.value.placeholder` (the
/// setting `kafka.unavailable_value_placeholder` declares the same).
#[cfg(test)]
pub const DEFAULT_UNAVAILABLE_PLACEHOLDER: &str = "__debezium_unavailable_value";

/// Distinct schemas (and tables) remembered before the caches start afresh.
const CACHE_LIMIT: usize = 1024;

/// What one record holds.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Change {
        change: RowChange,
        /// When the source database committed it (`source.ts_ms`).
        commit_time: Option<SystemTime>,
        /// Its Postgres transaction (`source.txId`, low 32 bits: the xid
        /// as the WAL names it), for the visibility gate.
        xid: Option<u32>,
    },
    /// A null value: Kafka's tombstone after a delete, for log compaction.
    Tombstone,
    /// A logical decoding message with evictd's prefix (`op = "m"`,
    /// `pg_logical_emit_message(..., 'evictd', ...)`): its content.
    Message(Vec<u8>),
    /// A well-formed event that is not a row change: a message with
    /// another prefix.
    NotARowChange,
}

/// Decodes one record value with a throwaway [`Decoder`]. The error says
/// what is wrong with it.
#[cfg(test)]
pub fn decode(value: Option<&[u8]>, placeholder: &str) -> Result<Decoded, String> {
    Decoder::new(placeholder).decode(value)
}

/// Decodes records, borrowing from each record's bytes rather than building
/// a JSON tree, and remembering what repeats from record to record: parsed
/// schemas (by their text), table names and column-name lists.
pub struct Decoder {
    placeholder: String,
    schemas: FxHashMap<Box<str>, Arc<Schema>>,
    tables: FxHashMap<Box<str>, Arc<TableName>>,
    columns: FxHashMap<Box<str>, Arc<[Arc<str>]>>,
    scratch: String,
}

/// The envelope's top level, or its `payload`: each part left unparsed.
/// `Some(None)` is a part present as `null`.
#[derive(Deserialize)]
struct Parts<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    schema: Option<Option<&'a RawValue>>,
    #[serde(borrow, default, deserialize_with = "present_payload")]
    payload: Option<Option<Box<Parts<'a>>>>,
    #[serde(borrow, default)]
    op: Option<Text<'a>>,
    #[serde(borrow, default)]
    before: Option<Fields<'a>>,
    #[serde(borrow, default)]
    after: Option<Fields<'a>>,
    #[serde(borrow, default)]
    source: Option<Source<'a>>,
    #[serde(borrow, default)]
    message: Option<MessagePart<'a>>,
}

/// A message event's `message`: its prefix and content (bytes, which
/// Kafka Connect's JSON converter writes as base64, or as hex under
/// `binary.handling.mode=hex`).
#[derive(Deserialize)]
struct MessagePart<'a> {
    #[serde(borrow, default)]
    prefix: Option<Text<'a>>,
    #[serde(borrow, default)]
    content: Option<Text<'a>>,
}

fn present<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<&'de RawValue>>, D::Error> {
    Option::<&RawValue>::deserialize(deserializer).map(Some)
}

fn present_payload<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<Box<Parts<'de>>>>, D::Error> {
    Option::<Box<Parts<'de>>>::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct Source<'a> {
    #[serde(borrow, default)]
    schema: Option<Text<'a>>,
    #[serde(borrow, default)]
    db: Option<Text<'a>>,
    #[serde(borrow, default)]
    table: Option<Text<'a>>,
    #[serde(default)]
    ts_ms: Option<u64>,
    /// The Postgres connector's transaction id (`source.txId`).
    #[serde(rename = "txId", default)]
    tx_id: Option<u64>,
}

/// A JSON string, borrowed unless it held escapes.
#[derive(Debug)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(text)))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }
        }
        deserializer.deserialize_str(TextVisitor(std::marker::PhantomData))
    }
}

/// An object's fields in order, values unparsed.
struct Fields<'a>(Vec<(Text<'a>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for FieldsVisitor<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Fields<'a>, M::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((name, value)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
                    fields.push((name, value));
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor(std::marker::PhantomData))
    }
}

/// A field's type as the envelope schema declares it.
#[derive(Debug, Default)]
struct FieldType {
    kind: Option<String>,
    name: Option<String>,
    scale: Option<u32>,
    /// The element type of an array.
    items: Option<Box<FieldType>>,
}

impl FieldType {
    fn parse(field: &Value) -> FieldType {
        let text = |key: &str| field.get(key).and_then(Value::as_str).map(str::to_owned);
        let scale = field
            .pointer("/parameters/scale")
            .and_then(|scale| match scale {
                Value::String(text) => text.parse().ok(),
                other => other.as_u64().and_then(|n| u32::try_from(n).ok()),
            });
        FieldType {
            kind: text("type"),
            name: text("name"),
            scale,
            items: field
                .get("items")
                .map(|items| Box::new(FieldType::parse(items))),
        }
    }
}

/// The `before` and `after` field types of one envelope schema.
#[derive(Debug, Default)]
struct Schema {
    before: FxHashMap<String, FieldType>,
    after: FxHashMap<String, FieldType>,
}

impl Schema {
    fn parse(raw: &str) -> Schema {
        let Ok(schema) = serde_json::from_str::<Value>(raw) else {
            return Schema::default();
        };
        let side = |side: &str| -> FxHashMap<String, FieldType> {
            let fields = schema
                .get("fields")
                .and_then(Value::as_array)
                .and_then(|fields| {
                    fields
                        .iter()
                        .find(|field| field.get("field").and_then(Value::as_str) == Some(side))
                })
                .and_then(|side| side.get("fields"))
                .and_then(Value::as_array);
            fields
                .into_iter()
                .flatten()
                .filter_map(|field| {
                    let name = field.get("field").and_then(Value::as_str)?;
                    Some((name.to_owned(), FieldType::parse(field)))
                })
                .collect()
        };
        Schema {
            before: side("before"),
            after: side("after"),
        }
    }
}

/// A JSON value, borrowed where it can be.
enum Json<'a> {
    Null,
    Bool(bool),
    /// A number's text exactly as sent.
    Number(&'a str),
    Str(Cow<'a, str>),
    /// An object or array (a `VariableScaleDecimal`, say).
    Compound(Value),
}

impl<'a> Json<'a> {
    fn parse(raw: &'a RawValue) -> Result<Json<'a>, String> {
        let text = raw.get().trim();
        let invalid = |e: serde_json::Error| format!("invalid JSON value: {e}");
        Ok(match text.as_bytes().first() {
            Some(b'n') => Json::Null,
            Some(b't') => Json::Bool(true),
            Some(b'f') => Json::Bool(false),
            Some(b'"') => Json::Str(serde_json::from_str::<Text<'a>>(text).map_err(invalid)?.0),
            Some(b'{' | b'[') => Json::Compound(serde_json::from_str(text).map_err(invalid)?),
            _ => Json::Number(text),
        })
    }
}

impl Decoder {
    pub fn new(placeholder: &str) -> Decoder {
        Decoder {
            placeholder: placeholder.to_owned(),
            schemas: FxHashMap::default(),
            tables: FxHashMap::default(),
            columns: FxHashMap::default(),
            scratch: String::new(),
        }
    }

    /// Decodes one record value. The error says what is wrong with it.
    pub fn decode(&mut self, value: Option<&[u8]>) -> Result<Decoded, String> {
        let Some(value) = value else {
            return Ok(Decoded::Tombstone);
        };
        let text = std::str::from_utf8(value).map_err(|e| format!("not valid JSON: {e}"))?;
        let trimmed = text.trim_start();
        if trimmed.starts_with("null") {
            serde_json::from_str::<()>(text).map_err(|e| format!("not valid JSON: {e}"))?;
            return Ok(Decoded::Tombstone);
        }
        if !trimmed.starts_with('{') {
            serde_json::from_str::<de::IgnoredAny>(text)
                .map_err(|e| format!("not valid JSON: {e}"))?;
            return Err("not a Debezium envelope: the value is not a JSON object".into());
        }
        let mut top: Parts<'_> = serde_json::from_str(text).map_err(|e| envelope_error(&e))?;
        let (parts, schema) = match (&top.op, top.payload.take()) {
            (None, Some(None)) => return Ok(Decoded::Tombstone),
            (None, Some(Some(payload))) => {
                let schema = top.schema.flatten().map(|raw| self.schema(raw.get()));
                (*payload, schema)
            }
            _ => (top, None),
        };
        self.envelope(parts, schema.as_deref())
    }

    fn schema(&mut self, raw: &str) -> Arc<Schema> {
        if let Some(schema) = self.schemas.get(raw) {
            return schema.clone();
        }
        if self.schemas.len() >= CACHE_LIMIT {
            self.schemas.clear();
        }
        let schema = Arc::new(Schema::parse(raw));
        self.schemas.insert(raw.into(), schema.clone());
        schema
    }

    fn envelope(&mut self, parts: Parts<'_>, schema: Option<&Schema>) -> Result<Decoded, String> {
        let op = match &parts.op {
            Some(Text(op)) => op,
            None => return Err("not a Debezium envelope: no `op` field".into()),
        };
        let op = match &**op {
            "c" | "r" => Op::Insert,
            "u" => Op::Update,
            "d" => Op::Delete,
            "t" => Op::Truncate,
            "m" => return message(parts.message),
            other => return Err(format!("unknown Debezium op `{other}`")),
        };
        let source = parts
            .source
            .ok_or("not a Debezium envelope: no `source` object")?;
        let table = self.table(&source)?;
        let commit_time = source
            .ts_ms
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        let old = match &parts.before {
            Some(fields) if op != Op::Insert => {
                Some(self.row(&table, fields, "before", schema.map(|s| &s.before))?)
            }
            _ => None,
        };
        let new = match &parts.after {
            Some(fields) if matches!(op, Op::Insert | Op::Update) => {
                Some(self.row(&table, fields, "after", schema.map(|s| &s.after))?)
            }
            _ => None,
        };
        let missing = |side: &str| format!("a `{}` event without `{side}`", op_letter(op));
        match op {
            Op::Insert | Op::Update if new.is_none() => return Err(missing("after")),
            Op::Delete if old.is_none() => return Err(missing("before")),
            _ => {}
        }
        Ok(Decoded::Change {
            change: RowChange {
                table,
                op,
                old,
                new,
            },
            commit_time,
            // The low 32 bits are the xid, whatever epoch came with it.
            #[allow(clippy::cast_possible_truncation)]
            xid: source.tx_id.map(|tx_id| tx_id as u32),
        })
    }

    /// `source.schema` + `source.table`, or `source.db` + `source.table` for
    /// sources without schemas (MySQL).
    fn table(&mut self, source: &Source<'_>) -> Result<Arc<TableName>, String> {
        fn text<'s>(field: &'s Option<Text<'_>>) -> Option<&'s str> {
            field
                .as_ref()
                .map(|Text(text)| &**text)
                .filter(|text| !text.is_empty())
        }
        let table = text(&source.table).ok_or("not a Debezium envelope: no `source.table`")?;
        let schema = text(&source.schema)
            .or_else(|| text(&source.db))
            .ok_or("not a Debezium envelope: no `source.schema` or `source.db`")?;
        self.scratch.clear();
        self.scratch.push_str(schema);
        self.scratch.push('.');
        self.scratch.push_str(table);
        if let Some(name) = self.tables.get(self.scratch.as_str()) {
            return Ok(name.clone());
        }
        if self.tables.len() >= CACHE_LIMIT {
            self.tables.clear();
        }
        let name = Arc::new(TableName::new(schema, table));
        self.tables
            .insert(self.scratch.as_str().into(), name.clone());
        Ok(name)
    }

    /// The row in `before` or `after`, typed by the schema when there is one.
    fn row(
        &mut self,
        table: &TableName,
        Fields(fields): &Fields<'_>,
        side: &str,
        types: Option<&FxHashMap<String, FieldType>>,
    ) -> Result<Row, String> {
        let mut values = Vec::with_capacity(fields.len());
        for (Text(name), value) in fields {
            let field_type = types.and_then(|types| types.get(&**name));
            let value = Json::parse(value).map_err(|e| format!("`{side}.{name}`: {e}"))?;
            let datum = datum(value, field_type, &self.placeholder)
                .map_err(|e| format!("`{side}.{name}`: {e}"))?;
            values.push(datum);
        }
        Ok(Row::new(self.column_names(table, fields), values))
    }

    /// The shared column-name list of `table` for these fields.
    fn column_names(
        &mut self,
        table: &TableName,
        fields: &[(Text<'_>, &RawValue)],
    ) -> Arc<[Arc<str>]> {
        self.scratch.clear();
        self.scratch.push_str(&table.schema);
        self.scratch.push('.');
        self.scratch.push_str(&table.name);
        for (Text(name), _) in fields {
            self.scratch.push('\0');
            self.scratch.push_str(name);
        }
        if let Some(names) = self.columns.get(self.scratch.as_str()) {
            return names.clone();
        }
        if self.columns.len() >= CACHE_LIMIT {
            self.columns.clear();
        }
        let names: Arc<[Arc<str>]> = fields
            .iter()
            .map(|(Text(name), _)| Arc::from(&**name))
            .collect();
        self.columns
            .insert(self.scratch.as_str().into(), names.clone());
        names
    }
}

fn envelope_error(error: &serde_json::Error) -> String {
    if error.is_syntax() || error.is_eof() {
        format!("not valid JSON: {error}")
    } else {
        format!("not a Debezium envelope: {error}")
    }
}

/// A message event: evictd's own with its content decoded, any other
/// passed over.
fn message(part: Option<MessagePart<'_>>) -> Result<Decoded, String> {
    let part = part.ok_or("a message event (`op` \"m\") without `message`")?;
    if part.prefix.as_ref().map(|p| &*p.0) != Some(crate::mapping::message::PREFIX) {
        return Ok(Decoded::NotARowChange);
    }
    let content = part
        .content
        .ok_or("an evictd message event without `message.content`")?;
    bytes(&content.0)
        .map(Decoded::Message)
        .ok_or_else(|| {
            "an evictd message event whose `message.content` is neither base64 nor hex (set Debezium's binary.handling.mode to bytes, base64 or hex)".into()
        })
}

/// Bytes as Kafka Connect writes them in JSON: base64 (standard or URL-safe
/// alphabet, padded or not, as [`values::base64_decode`] reads them), or
/// hex.
fn bytes(text: &str) -> Option<Vec<u8>> {
    // Hex first: JSON content (`{`, `[`) in hex starts `7b` or `5b`, which
    // base64 would also accept as something else.
    hex(text)
        .filter(|bytes| matches!(bytes.first(), Some(b'{' | b'[')))
        .or_else(|| values::base64_decode(text))
        .or_else(|| hex(text))
}

fn op_letter(op: Op) -> &'static str {
    match op {
        Op::Insert => "c",
        Op::Update => "u",
        Op::Delete => "d",
        Op::Truncate => "t",
    }
}

/// One value in canonical text, typed by its field schema when known.
fn datum(value: Json<'_>, field: Option<&FieldType>, placeholder: &str) -> Result<Datum, String> {
    let kind = field.and_then(|f| f.kind.as_deref());
    let name = field.and_then(|f| f.name.as_deref());
    if let Json::Str(text) = &value {
        if text == placeholder {
            return Ok(Datum::UnchangedToast);
        }
        if kind == Some("bytes")
            && values::base64_decode(text).is_some_and(|bytes| bytes == placeholder.as_bytes())
        {
            return Ok(Datum::UnchangedToast);
        }
    }
    if matches!(value, Json::Null) {
        return Ok(Datum::Null);
    }
    let bad = |what: &str| format!("{what} expected for {}", name.or(kind).unwrap_or("?"));
    let integer = || match &value {
        Json::Number(text) => text.parse::<i64>().map_err(|_| bad("an integer")),
        _ => Err(bad("an integer")),
    };
    let string = || match &value {
        Json::Str(text) => Ok(&**text),
        _ => Err(bad("a string")),
    };
    Ok(match name {
        Some("org.apache.kafka.connect.data.Decimal") => match &value {
            Json::Str(text) => {
                let bytes = values::base64_decode(text).ok_or_else(|| bad("base64"))?;
                let scale = field
                    .and_then(|f| f.scale)
                    .ok_or("a Decimal schema without `parameters.scale`")?;
                Datum::Number(values::decimal_from_bytes(&bytes, scale).into())
            }
            Json::Number(text) => Datum::Number((*text).into()),
            _ => return Err(bad("base64 or a number")),
        },
        Some("io.debezium.data.VariableScaleDecimal") => {
            let Json::Compound(object) = &value else {
                return Err(bad("an object with `scale`"));
            };
            let scale = object
                .get("scale")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad("an object with `scale`"))?;
            let bytes = object
                .get("value")
                .and_then(Value::as_str)
                .and_then(values::base64_decode)
                .ok_or_else(|| bad("an object with base64 `value`"))?;
            Datum::Number(values::decimal_from_bytes(&bytes, scale).into())
        }
        Some("io.debezium.time.Date" | "org.apache.kafka.connect.data.Date") => {
            let days = integer()?;
            match values::infinite_date(days) {
                Some(infinite) => Datum::Text(infinite.into()),
                None => Datum::Text(values::date_from_days(days).into()),
            }
        }
        Some("io.debezium.time.Interval") => Datum::Text(
            values::interval_from_iso(string()?)
                .ok_or_else(|| bad("an ISO-8601 duration"))?
                .into(),
        ),
        Some(
            name @ ("io.debezium.time.Timestamp"
            | "org.apache.kafka.connect.data.Timestamp"
            | "io.debezium.time.MicroTimestamp"
            | "io.debezium.time.NanoTimestamp"),
        ) => {
            let raw = integer()?;
            match values::infinite_timestamp(raw) {
                Some(infinite) => Datum::Text(infinite.into()),
                None => {
                    let micros = match name {
                        "io.debezium.time.MicroTimestamp" => Some(raw),
                        "io.debezium.time.NanoTimestamp" => Some(raw.div_euclid(1000)),
                        _ => raw.checked_mul(1000),
                    };
                    let micros = micros.ok_or_else(|| bad("a timestamp"))?;
                    Datum::Text(values::timestamp_from_micros(micros).into())
                }
            }
        }
        Some("io.debezium.time.ZonedTimestamp") => Datum::Text(
            values::timestamptz_from_iso(string()?)
                .ok_or_else(|| bad("an ISO-8601 timestamp"))?
                .into(),
        ),
        Some("io.debezium.time.Time" | "org.apache.kafka.connect.data.Time") => {
            Datum::Text(values::time_from_micros(integer()? * 1000).into())
        }
        Some("io.debezium.time.MicroTime") => {
            Datum::Text(values::time_from_micros(integer()?).into())
        }
        Some("io.debezium.time.NanoTime") => {
            Datum::Text(values::time_from_micros(integer()? / 1000).into())
        }
        Some("io.debezium.time.ZonedTime") => Datum::Text(
            values::timetz_from_iso(string()?)
                .ok_or_else(|| bad("an ISO-8601 time"))?
                .into(),
        ),
        Some("io.debezium.data.Json") => Datum::Json(string()?.into()),
        _ if matches!(kind, Some("float" | "double")) => {
            let text = match &value {
                Json::Number(text) => text,
                Json::Str(text) => &**text,
                _ => return Err(bad("a floating point number")),
            };
            Datum::Number(
                values::float_text(text, kind == Some("float"))
                    .ok_or_else(|| bad("a floating point number"))?
                    .into(),
            )
        }
        _ => match (kind, value) {
            (_, Json::Compound(Value::Array(elements))) => Datum::Text(
                array_text(
                    &elements,
                    field.and_then(|f| f.items.as_deref()),
                    placeholder,
                )?
                .into(),
            ),
            (_, Json::Bool(flag)) => Datum::Bool(flag),
            (_, Json::Number(text)) => Datum::Number(text.into()),
            (Some("bytes"), Json::Str(text)) => Datum::Text(
                values::bytea_hex(&values::base64_decode(&text).ok_or_else(|| bad("base64"))?)
                    .into(),
            ),
            (_, Json::Str(text)) => Datum::Text(text.into()),
            (_, Json::Compound(other)) => Datum::Json(other.to_string().into()),
            (_, Json::Null) => Datum::Null,
        },
    })
}

/// A JSON array as Postgres prints the array (`{1,2}`, `{a,"b c",NULL}`),
/// each element normalised by the array's item type.
fn array_text(
    elements: &[Value],
    items: Option<&FieldType>,
    placeholder: &str,
) -> Result<String, String> {
    let mut text = String::from("{");
    for (index, element) in elements.iter().enumerate() {
        if index > 0 {
            text.push(',');
        }
        let number;
        let json = match element {
            Value::Null => Json::Null,
            Value::Bool(flag) => Json::Bool(*flag),
            Value::Number(value) => {
                number = value.to_string();
                Json::Number(&number)
            }
            Value::String(value) => Json::Str(Cow::Borrowed(value)),
            other => Json::Compound(other.clone()),
        };
        match datum(json, items, placeholder)? {
            // A nested array is written as it is, not quoted.
            Datum::Text(nested) if matches!(element, Value::Array(_)) => text.push_str(&nested),
            Datum::UnchangedToast | Datum::Missing => {
                return Err("an unavailable value inside an array".into())
            }
            value => values::push_array_element(&mut text, value.canonical_text()),
        }
    }
    text.push('}');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(json: &str) -> RowChange {
        match decode(Some(json.as_bytes()), DEFAULT_UNAVAILABLE_PLACEHOLDER).unwrap() {
            Decoded::Change { change, .. } => change,
            other => panic!("not a change: {other:?}"),
        }
    }

    #[test]
    fn bare_payload_update_keeps_old_and_new() {
        let change = change(
            r#"{"before":{"id":1,"customer_id":7},"after":{"id":1,"customer_id":8},
                "source":{"schema":"public","table":"orders","ts_ms":1700000000000},"op":"u"}"#,
        );
        assert_eq!(change.op, Op::Update);
        assert_eq!(change.table.to_string(), "public.orders");
        assert_eq!(
            change.old.unwrap().get("customer_id"),
            &Datum::Number("7".into())
        );
        assert_eq!(
            change.new.unwrap().get("customer_id"),
            &Datum::Number("8".into())
        );
    }

    #[test]
    fn mysql_style_source_uses_db() {
        let change =
            change(r#"{"after":{"id":1},"source":{"db":"shop","table":"users"},"op":"c"}"#);
        assert_eq!(change.table.to_string(), "shop.users");
        assert!(change.old.is_none());
    }

    #[test]
    fn snapshot_reads_are_inserts_and_truncates_carry_no_rows() {
        let read =
            change(r#"{"after":{"id":1},"source":{"schema":"public","table":"t"},"op":"r"}"#);
        assert_eq!(read.op, Op::Insert);
        let truncate = change(r#"{"source":{"schema":"public","table":"t"},"op":"t"}"#);
        assert_eq!(truncate.op, Op::Truncate);
        assert!(truncate.old.is_none() && truncate.new.is_none());
    }

    #[test]
    fn placeholder_is_an_unchanged_toast() {
        let change = change(
            r#"{"before":null,"after":{"id":1,"bio":"__debezium_unavailable_value"},
                "source":{"schema":"public","table":"t"},"op":"u"}"#,
        );
        assert_eq!(change.new.unwrap().get("bio"), &Datum::UnchangedToast);
        assert!(change.old.is_none());
    }

    #[test]
    fn tombstones_and_messages() {
        let placeholder = DEFAULT_UNAVAILABLE_PLACEHOLDER;
        assert_eq!(decode(None, placeholder).unwrap(), Decoded::Tombstone);
        assert_eq!(
            decode(Some(b"null"), placeholder).unwrap(),
            Decoded::Tombstone
        );
        assert_eq!(
            decode(Some(br#"{"schema":null,"payload":null}"#), placeholder).unwrap(),
            Decoded::Tombstone
        );
        assert_eq!(
            decode(
                Some(br#"{"op":"m","source":{"schema":"public","table":""},"message":{"prefix":"other","content":"eA=="}}"#),
                placeholder
            )
            .unwrap(),
            Decoded::NotARowChange
        );
    }

    #[test]
    fn evictd_message_events_carry_their_content() {
        let placeholder = DEFAULT_UNAVAILABLE_PLACEHOLDER;
        let content = br#"{"keys":["user:1"]}"#;
        // base64 (Kafka Connect's JSON form of bytes), URL-safe and hex.
        for encoded in [
            "eyJrZXlzIjpbInVzZXI6MSJdfQ==",
            "eyJrZXlzIjpbInVzZXI6MSJdfQ",
            "7b226b657973223a5b22757365723a31225d7d",
        ] {
            let event = format!(
                r#"{{"schema":{{}},"payload":{{"op":"m","ts_ms":1,"source":{{"txId":7}},"message":{{"prefix":"evictd","content":"{encoded}"}}}}}}"#
            );
            assert_eq!(
                decode(Some(event.as_bytes()), placeholder).unwrap(),
                Decoded::Message(content.to_vec()),
                "{encoded}"
            );
        }
        let error = |json: &str| decode(Some(json.as_bytes()), placeholder).unwrap_err();
        assert_eq!(
            error(r#"{"op":"m","source":{}}"#),
            "a message event (`op` \"m\") without `message`"
        );
        assert!(
            error(r#"{"op":"m","message":{"prefix":"evictd","content":"%%"}}"#)
                .contains("neither base64 nor hex")
        );
    }

    #[test]
    fn bad_records_say_what_is_wrong() {
        let placeholder = DEFAULT_UNAVAILABLE_PLACEHOLDER;
        let error = |json: &[u8]| decode(Some(json), placeholder).unwrap_err();
        assert!(error(b"{not json").starts_with("not valid JSON"));
        assert_eq!(
            error(b"[1]"),
            "not a Debezium envelope: the value is not a JSON object"
        );
        assert_eq!(
            error(br#"{"id":1}"#),
            "not a Debezium envelope: no `op` field"
        );
        assert_eq!(
            error(br#"{"op":"x","source":{}}"#),
            "unknown Debezium op `x`"
        );
        assert_eq!(
            error(br#"{"op":"c","source":{"schema":"public"}}"#),
            "not a Debezium envelope: no `source.table`"
        );
        assert_eq!(
            error(br#"{"op":"d","source":{"schema":"public","table":"t"}}"#),
            "a `d` event without `before`"
        );
    }

    #[test]
    fn schema_typed_values_match_pgoutput_text() {
        let json = r#"{"schema":{"type":"struct","fields":[
            {"field":"before","type":"struct","optional":true,"fields":[]},
            {"field":"after","type":"struct","optional":true,"fields":[
              {"field":"id","type":"int64"},
              {"field":"price","type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"}},
              {"field":"amount","type":"struct","name":"io.debezium.data.VariableScaleDecimal"},
              {"field":"day","type":"int32","name":"io.debezium.time.Date"},
              {"field":"at","type":"int64","name":"io.debezium.time.MicroTimestamp"},
              {"field":"at_ms","type":"int64","name":"io.debezium.time.Timestamp"},
              {"field":"at_tz","type":"string","name":"io.debezium.time.ZonedTimestamp"},
              {"field":"ok","type":"boolean"},
              {"field":"blob","type":"bytes"},
              {"field":"token","type":"string","name":"io.debezium.data.Uuid"}]}]},
          "payload":{"before":null,"after":{"id":9007199254740993,"price":"BOI=",
              "amount":{"scale":3,"value":"BQ=="},"day":19753,"at":1706704496789000,
              "at_ms":1706704496000,"at_tz":"2024-01-31T12:34:56.5Z","ok":true,
              "blob":"3q0=","token":"5f0b6f5c-8c1e-4c53-9d42-7f3b0f0c1a2b"},
            "source":{"schema":"public","table":"t"},"op":"c"}}"#;
        let row = change(json).new.unwrap();
        let text = |column| row.get(column).canonical_text().unwrap().to_owned();
        assert_eq!(text("id"), "9007199254740993");
        assert_eq!(text("price"), "12.50");
        assert_eq!(text("amount"), "0.005");
        assert_eq!(text("day"), "2024-01-31");
        assert_eq!(text("at"), "2024-01-31 12:34:56.789");
        assert_eq!(text("at_ms"), "2024-01-31 12:34:56");
        assert_eq!(text("at_tz"), "2024-01-31 12:34:56.5+00");
        assert_eq!(text("ok"), "t");
        assert_eq!(text("blob"), "\\xdead");
        assert_eq!(text("token"), "5f0b6f5c-8c1e-4c53-9d42-7f3b0f0c1a2b");
    }

    #[test]
    fn floats_intervals_arrays_and_infinite_dates_match_pgoutput_text() {
        let json = r#"{"schema":{"type":"struct","fields":[
            {"field":"before","type":"struct","optional":true,"fields":[]},
            {"field":"after","type":"struct","optional":true,"fields":[
              {"field":"r","type":"float"},
              {"field":"d","type":"double"},
              {"field":"nan","type":"double"},
              {"field":"iv","type":"string","name":"io.debezium.time.Interval"},
              {"field":"day","type":"int32","name":"io.debezium.time.Date"},
              {"field":"ints","type":"array","items":{"type":"int32","optional":true}},
              {"field":"words","type":"array","items":{"type":"string","optional":true}},
              {"field":"days","type":"array","items":{"type":"int32","name":"io.debezium.time.Date"}},
              {"field":"nested","type":"array","items":{"type":"array","items":{"type":"int32"}}}]}]},
          "payload":{"before":null,"after":{"r":3.4028235E38,"d":1.0E15,"nan":"NaN",
              "iv":"P-1Y-2M3DT-4H-5M-6S","day":2146033979,"ints":[1,2],
              "words":["a","b c","",null,"NULL"],"days":[19753,-2147472691],
              "nested":[[1,2],[3,4]]},
            "source":{"schema":"public","table":"t"},"op":"c"}}"#;
        let row = change(json).new.unwrap();
        let text = |column| row.get(column).canonical_text().unwrap().to_owned();
        assert_eq!(text("r"), "3.4028235e+38");
        assert_eq!(text("d"), "1e+15");
        assert_eq!(text("nan"), "NaN");
        assert_eq!(text("iv"), "-1 years -2 mons +3 days -04:05:06");
        assert_eq!(text("day"), "infinity");
        assert_eq!(text("ints"), "{1,2}");
        assert_eq!(text("words"), r#"{a,"b c","",NULL,"NULL"}"#);
        assert_eq!(text("days"), "{2024-01-31,-infinity}");
        assert_eq!(text("nested"), "{{1,2},{3,4}}");
    }

    #[test]
    fn one_decoder_across_records_keeps_each_rows_own_columns() {
        let mut decoder = Decoder::new(DEFAULT_UNAVAILABLE_PLACEHOLDER);
        let mut decode = |json: &str| match decoder.decode(Some(json.as_bytes())).unwrap() {
            Decoded::Change { change, .. } => change.new.unwrap(),
            other => panic!("not a change: {other:?}"),
        };
        let a = decode(
            r#"{"after":{"id":1,"na\u006de":"x\"y"},"source":{"schema":"public","table":"t"},"op":"c"}"#,
        );
        let b = decode(r#"{"after":{"id":2},"source":{"schema":"public","table":"t"},"op":"c"}"#);
        let c = decode(
            r#"{"after":{"id":3,"name":"z"},"source":{"schema":"public","table":"t"},"op":"c"}"#,
        );
        assert_eq!(a.get("name"), &Datum::text("x\"y"));
        assert_eq!(b.get("name"), &Datum::Missing);
        assert_eq!(b.get("id"), &Datum::Number("2".into()));
        assert_eq!(c.get("name"), &Datum::text("z"));
    }

    #[test]
    fn infinite_timestamps_read_as_postgres_prints_them() {
        let json = r#"{"schema":{"type":"struct","fields":[
            {"field":"after","type":"struct","fields":[
              {"field":"ms","type":"int64","name":"io.debezium.time.Timestamp"},
              {"field":"us","type":"int64","name":"io.debezium.time.MicroTimestamp"},
              {"field":"ns","type":"int64","name":"io.debezium.time.NanoTimestamp"},
              {"field":"neg","type":"int64","name":"io.debezium.time.MicroTimestamp"},
              {"field":"tz","type":"string","name":"io.debezium.time.ZonedTimestamp"},
              {"field":"neg_tz","type":"string","name":"io.debezium.time.ZonedTimestamp"}]}]},
          "payload":{"after":{"ms":9223372036825200000,"us":9223372036825200000,
              "ns":9223372036825200000,"neg":-9223372036832400000,
              "tz":"infinity","neg_tz":"-infinity"},
            "source":{"schema":"public","table":"t"},"op":"c"}}"#;
        let row = change(json).new.unwrap();
        let text = |column| row.get(column).canonical_text().unwrap().to_owned();
        assert_eq!(
            [text("ms"), text("us"), text("ns"), text("tz")],
            ["infinity", "infinity", "infinity", "infinity"]
        );
        assert_eq!([text("neg"), text("neg_tz")], ["-infinity", "-infinity"]);
    }

    #[test]
    fn a_bad_value_names_its_column() {
        let json = r#"{"schema":{"type":"struct","fields":[
            {"field":"after","type":"struct","fields":[
              {"field":"day","type":"int32","name":"io.debezium.time.Date"}]}]},
          "payload":{"after":{"day":"soon"},"source":{"schema":"public","table":"t"},"op":"c"}}"#;
        let error = decode(Some(json.as_bytes()), DEFAULT_UNAVAILABLE_PLACEHOLDER).unwrap_err();
        assert_eq!(
            error,
            "`after.day`: an integer expected for io.debezium.time.Date"
        );
    }
}
