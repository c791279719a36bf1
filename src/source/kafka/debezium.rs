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

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use super::values;
use crate::change::{Datum, Op, Row, RowChange, TableName};

/// The default of Debezium's `unavailable.value.placeholder`.
pub const DEFAULT_UNAVAILABLE_PLACEHOLDER: &str = "__debezium_unavailable_value";

/// What one record holds.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Change {
        change: RowChange,
        /// When the source database committed it (`source.ts_ms`).
        commit_time: Option<SystemTime>,
    },
    /// A null value: Kafka's tombstone after a delete, for log compaction.
    Tombstone,
    /// A well-formed event that is not a row change (`op = "m"`).
    NotARowChange,
}

/// Decodes one record value. The error says what is wrong with it.
pub fn decode(value: Option<&[u8]>, placeholder: &str) -> Result<Decoded, String> {
    let Some(value) = value else {
        return Ok(Decoded::Tombstone);
    };
    let json: Value = serde_json::from_slice(value).map_err(|e| format!("not valid JSON: {e}"))?;
    let (payload, schema) = match json {
        Value::Null => return Ok(Decoded::Tombstone),
        Value::Object(mut object)
            if object.contains_key("payload") && !object.contains_key("op") =>
        {
            let schema = object.remove("schema");
            match object.remove("payload") {
                Some(Value::Null) => return Ok(Decoded::Tombstone),
                Some(Value::Object(payload)) => (payload, schema),
                Some(_) => return Err("not a Debezium envelope: `payload` is not an object".into()),
                None => unreachable!("checked above"),
            }
        }
        Value::Object(object) => (object, None),
        _ => return Err("not a Debezium envelope: the value is not a JSON object".into()),
    };
    Envelope {
        payload,
        schema: schema.as_ref(),
        placeholder,
    }
    .decode()
}

struct Envelope<'a> {
    payload: Map<String, Value>,
    schema: Option<&'a Value>,
    placeholder: &'a str,
}

impl Envelope<'_> {
    fn decode(mut self) -> Result<Decoded, String> {
        let op = match self.payload.get("op") {
            Some(Value::String(op)) => op.clone(),
            Some(_) => return Err("not a Debezium envelope: `op` is not a string".into()),
            None => return Err("not a Debezium envelope: no `op` field".into()),
        };
        let op = match op.as_str() {
            "c" | "r" => Op::Insert,
            "u" => Op::Update,
            "d" => Op::Delete,
            "t" => Op::Truncate,
            "m" => return Ok(Decoded::NotARowChange),
            other => return Err(format!("unknown Debezium op `{other}`")),
        };
        let source = match self.payload.remove("source") {
            Some(Value::Object(source)) => source,
            _ => return Err("not a Debezium envelope: no `source` object".into()),
        };
        let table = table_of(&source)?;
        let commit_time = source
            .get("ts_ms")
            .and_then(Value::as_u64)
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        let old = self.row("before")?;
        let new = self.row("after")?;
        let missing = |side: &str| format!("a `{}` event without `{side}`", op_letter(op));
        match op {
            Op::Insert if new.is_none() => return Err(missing("after")),
            Op::Update if new.is_none() => return Err(missing("after")),
            Op::Delete if old.is_none() => return Err(missing("before")),
            _ => {}
        }
        let change = RowChange {
            table: Arc::new(table),
            op,
            old: if op == Op::Insert { None } else { old },
            new: if matches!(op, Op::Insert | Op::Update) {
                new
            } else {
                None
            },
        };
        Ok(Decoded::Change {
            change,
            commit_time,
        })
    }

    /// The row in `before` or `after`, typed by the schema when there is one.
    fn row(&self, side: &str) -> Result<Option<Row>, String> {
        let fields = match self.payload.get(side) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(fields)) => fields,
            Some(_) => return Err(format!("`{side}` is not an object")),
        };
        let types = self.schema.and_then(|schema| field_schemas(schema, side));
        let mut names = Vec::with_capacity(fields.len());
        let mut values = Vec::with_capacity(fields.len());
        for (name, value) in fields {
            let schema = types.and_then(|types| {
                types
                    .iter()
                    .find(|field| field.get("field").and_then(Value::as_str) == Some(name))
            });
            let datum = datum(value, schema, self.placeholder)
                .map_err(|e| format!("`{side}.{name}`: {e}"))?;
            names.push(Arc::from(name.as_str()));
            values.push(datum);
        }
        Ok(Some(Row::new(names.into(), values)))
    }
}

fn op_letter(op: Op) -> &'static str {
    match op {
        Op::Insert => "c",
        Op::Update => "u",
        Op::Delete => "d",
        Op::Truncate => "t",
    }
}

/// `source.schema` + `source.table`, or `source.db` + `source.table` for
/// sources without schemas (MySQL).
fn table_of(source: &Map<String, Value>) -> Result<TableName, String> {
    let text = |key: &str| {
        source
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let table = text("table").ok_or("not a Debezium envelope: no `source.table`")?;
    let schema = text("schema")
        .or_else(|| text("db"))
        .ok_or("not a Debezium envelope: no `source.schema` or `source.db`")?;
    Ok(TableName::new(schema, table))
}

/// The field schemas of the `before`/`after` struct in an envelope schema.
fn field_schemas<'s>(schema: &'s Value, side: &str) -> Option<&'s Vec<Value>> {
    let fields = schema.get("fields")?.as_array()?;
    let side = fields
        .iter()
        .find(|field| field.get("field").and_then(Value::as_str) == Some(side))?;
    side.get("fields")?.as_array()
}

/// One value in canonical text, typed by its field schema when known.
fn datum(value: &Value, schema: Option<&Value>, placeholder: &str) -> Result<Datum, String> {
    if value.is_null() {
        return Ok(Datum::Null);
    }
    let kind = schema.and_then(|s| s.get("type")).and_then(Value::as_str);
    let name = schema.and_then(|s| s.get("name")).and_then(Value::as_str);
    if let Value::String(text) = value {
        if text == placeholder {
            return Ok(Datum::UnchangedToast);
        }
        if kind == Some("bytes")
            && values::base64_decode(text).is_some_and(|bytes| bytes == placeholder.as_bytes())
        {
            return Ok(Datum::UnchangedToast);
        }
    }
    let bad = |what: &str| format!("{what} expected for {}", name.or(kind).unwrap_or("?"));
    let integer = || value.as_i64().ok_or_else(|| bad("an integer"));
    let string = || value.as_str().ok_or_else(|| bad("a string"));
    Ok(match name {
        Some("org.apache.kafka.connect.data.Decimal") => match value {
            Value::String(text) => {
                let bytes = values::base64_decode(text).ok_or_else(|| bad("base64"))?;
                let scale = schema
                    .and_then(|s| s.pointer("/parameters/scale"))
                    .and_then(|scale| match scale {
                        Value::String(text) => text.parse().ok(),
                        other => other.as_u64().and_then(|n| u32::try_from(n).ok()),
                    })
                    .ok_or("a Decimal schema without `parameters.scale`")?;
                Datum::Number(values::decimal_from_bytes(&bytes, scale).into())
            }
            Value::Number(number) => Datum::Number(number.to_string().into()),
            _ => return Err(bad("base64 or a number")),
        },
        Some("io.debezium.data.VariableScaleDecimal") => {
            let scale = value
                .get("scale")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad("an object with `scale`"))?;
            let bytes = value
                .get("value")
                .and_then(Value::as_str)
                .and_then(values::base64_decode)
                .ok_or_else(|| bad("an object with base64 `value`"))?;
            Datum::Number(values::decimal_from_bytes(&bytes, scale).into())
        }
        Some("io.debezium.time.Date" | "org.apache.kafka.connect.data.Date") => {
            Datum::Text(values::date_from_days(integer()?).into())
        }
        Some("io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp") => {
            let micros = integer()?
                .checked_mul(1000)
                .ok_or_else(|| bad("a timestamp"))?;
            Datum::Text(values::timestamp_from_micros(micros).into())
        }
        Some("io.debezium.time.MicroTimestamp") => {
            Datum::Text(values::timestamp_from_micros(integer()?).into())
        }
        Some("io.debezium.time.NanoTimestamp") => {
            Datum::Text(values::timestamp_from_micros(integer()?.div_euclid(1000)).into())
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
        _ => match (kind, value) {
            (_, Value::Bool(flag)) => Datum::Bool(*flag),
            (_, Value::Number(number)) => Datum::Number(number.to_string().into()),
            (Some("bytes"), Value::String(text)) => Datum::Text(
                values::bytea_hex(&values::base64_decode(text).ok_or_else(|| bad("base64"))?)
                    .into(),
            ),
            (_, Value::String(text)) => Datum::Text(text.as_str().into()),
            (_, other) => Datum::Json(other.to_string().into()),
        },
    })
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
                Some(br#"{"op":"m","source":{"schema":"public","table":""}}"#),
                placeholder
            )
            .unwrap(),
            Decoded::NotARowChange
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
