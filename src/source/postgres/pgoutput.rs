//! The pgoutput logical replication message decoder (protocol versions 1-4).
//!
//! Pure and total: any byte string decodes to a [`Message`] or a
//! [`DecodeError`] naming what was wrong and where; it never panics. Tuple
//! values borrow from the input buffer, so decoding allocates only for the
//! column lists of Relation messages.
//!
//! Inside a streamed transaction block (between Stream Start and Stream
//! Stop) data messages carry the xid of the (sub)transaction that made them;
//! the caller says whether it is inside such a block.

use std::fmt;

/// One pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Begin {
        final_lsn: u64,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    Origin {
        commit_lsn: u64,
        name: &'a str,
    },
    Relation(Relation<'a>),
    Type {
        xid: Option<u32>,
        oid: u32,
        namespace: &'a str,
        name: &'a str,
    },
    Insert {
        xid: Option<u32>,
        relation: u32,
        new: Tuple<'a>,
    },
    Update {
        xid: Option<u32>,
        relation: u32,
        /// `'K'` (key columns) or `'O'` (the whole old row), when sent.
        old: Option<(OldKind, Tuple<'a>)>,
        new: Tuple<'a>,
    },
    Delete {
        xid: Option<u32>,
        relation: u32,
        old: (OldKind, Tuple<'a>),
    },
    Truncate {
        xid: Option<u32>,
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    Message {
        xid: Option<u32>,
        transactional: bool,
        lsn: u64,
        prefix: &'a str,
        content: &'a [u8],
    },
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
}

/// Which old row an Update or Delete carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldKind {
    /// Only the replica identity columns (others are sent as NULL).
    Key,
    /// The whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// A Relation message: the table's identity and column layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation<'a> {
    pub xid: Option<u32>,
    pub id: u32,
    pub namespace: &'a str,
    pub name: &'a str,
    pub replica_identity: u8,
    pub columns: Vec<Column<'a>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column<'a> {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: &'a str,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The raw column values of one row, decoded lazily by [`Tuple::values`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuple<'a> {
    count: u16,
    data: &'a [u8],
}

/// One column value of a tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    UnchangedToast,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

impl<'a> Tuple<'a> {
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The column values in order. The tuple was validated when decoded, so
    /// this yields exactly [`Tuple::len`] values.
    pub fn values(&self) -> impl Iterator<Item = Value<'a>> + 'a {
        let mut reader = Reader::new(self.data);
        (0..self.count).map_while(move |_| read_value(&mut reader).ok())
    }
}

/// Why a message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct DecodeError {
    /// The message tag, as a character.
    pub tag: char,
    pub offset: usize,
    pub reason: &'static str,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed pgoutput message '{}' at byte {}: {}",
            self.tag.escape_default(),
            self.offset,
            self.reason
        )
    }
}

/// Decodes one message. `in_stream` says whether it arrived between Stream
/// Start and Stream Stop, where data messages carry an xid.
pub fn decode(buf: &[u8], in_stream: bool) -> Result<Message<'_>, DecodeError> {
    let Some((&tag, body)) = buf.split_first() else {
        return Err(DecodeError {
            tag: '?',
            offset: 0,
            reason: "empty message",
        });
    };
    let mut reader = Reader::new(body);
    let message = decode_body(tag, &mut reader, in_stream);
    let at = |reason| DecodeError {
        tag: char::from(tag),
        offset: reader.offset + 1,
        reason,
    };
    match message {
        Ok(message) if reader.remaining() == 0 => Ok(message),
        Ok(_) => Err(at("trailing bytes after the message")),
        Err(reason) => Err(at(reason)),
    }
}

fn decode_body<'a>(
    tag: u8,
    r: &mut Reader<'a>,
    in_stream: bool,
) -> Result<Message<'a>, &'static str> {
    let xid = |r: &mut Reader<'a>| -> Result<Option<u32>, &'static str> {
        if in_stream {
            r.u32().map(Some)
        } else {
            Ok(None)
        }
    };
    Ok(match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_time: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit {
                commit_lsn: r.u64()?,
                end_lsn: r.u64()?,
                commit_time: r.i64()?,
            }
        }
        b'O' => Message::Origin {
            commit_lsn: r.u64()?,
            name: r.cstr()?,
        },
        b'R' => {
            let xid = xid(r)?;
            Message::Relation(relation(r, xid)?)
        }
        b'Y' => Message::Type {
            xid: xid(r)?,
            oid: r.u32()?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        },
        b'I' => {
            let xid = xid(r)?;
            let relation = r.u32()?;
            expect(r, b'N', "expected 'N' before the new tuple")?;
            Message::Insert {
                xid,
                relation,
                new: tuple(r)?,
            }
        }
        b'U' => {
            let xid = xid(r)?;
            let relation = r.u32()?;
            let old = match r.u8()? {
                b'K' => Some((OldKind::Key, tuple(r)?)),
                b'O' => Some((OldKind::Full, tuple(r)?)),
                b'N' => None,
                _ => return Err("expected 'K', 'O' or 'N' in an update"),
            };
            if old.is_some() {
                expect(r, b'N', "expected 'N' before the new tuple")?;
            }
            Message::Update {
                xid,
                relation,
                old,
                new: tuple(r)?,
            }
        }
        b'D' => {
            let xid = xid(r)?;
            let relation = r.u32()?;
            let kind = match r.u8()? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Full,
                _ => return Err("expected 'K' or 'O' in a delete"),
            };
            Message::Delete {
                xid,
                relation,
                old: (kind, tuple(r)?),
            }
        }
        b'T' => {
            let xid = xid(r)?;
            let count = r.u32()?;
            let options = r.u8()?;
            if usize::try_from(count).map_or(true, |count| count > r.remaining() / 4) {
                return Err("truncate lists more relations than the message holds");
            }
            let relations = (0..count).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
            Message::Truncate {
                xid,
                relations,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        b'M' => {
            let xid = xid(r)?;
            let flags = r.u8()?;
            let lsn = r.u64()?;
            let prefix = r.cstr()?;
            let length = r.u32()?;
            let content = r.bytes(usize::try_from(length).map_err(|_| "message too long")?)?;
            Message::Message {
                xid,
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content,
            }
        }
        b'S' => Message::StreamStart {
            xid: r.u32()?,
            first_segment: r.u8()? == 1,
        },
        b'E' => Message::StreamStop,
        b'c' => {
            let xid = r.u32()?;
            let _flags = r.u8()?;
            Message::StreamCommit {
                xid,
                commit_lsn: r.u64()?,
                end_lsn: r.u64()?,
                commit_time: r.i64()?,
            }
        }
        b'A' => {
            let message = Message::StreamAbort {
                xid: r.u32()?,
                subxid: r.u32()?,
            };
            // Protocol v4 (parallel apply) adds the abort LSN and time.
            if r.remaining() == 16 {
                r.bytes(16)?;
            }
            message
        }
        _ => return Err("unknown message tag"),
    })
}

fn relation<'a>(r: &mut Reader<'a>, xid: Option<u32>) -> Result<Relation<'a>, &'static str> {
    let id = r.u32()?;
    let namespace = r.cstr()?;
    let name = r.cstr()?;
    let replica_identity = r.u8()?;
    let count = r.u16()?;
    // Each column takes at least 10 bytes: do not trust the count further.
    let mut columns = Vec::with_capacity(usize::from(count).min(r.remaining() / 10));
    for _ in 0..count {
        columns.push(Column {
            key: r.u8()? & 1 != 0,
            name: r.cstr()?,
            type_oid: r.u32()?,
            type_modifier: r.i32()?,
        });
    }
    Ok(Relation {
        xid,
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn expect(r: &mut Reader<'_>, byte: u8, reason: &'static str) -> Result<(), &'static str> {
    if r.u8()? == byte {
        Ok(())
    } else {
        Err(reason)
    }
}

/// Validates a TupleData and returns it without decoding the values.
fn tuple<'a>(r: &mut Reader<'a>) -> Result<Tuple<'a>, &'static str> {
    let count = r.u16()?;
    let start = r.offset;
    for _ in 0..count {
        read_value(r)?;
    }
    Ok(Tuple {
        count,
        data: &r.buf[start..r.offset],
    })
}

fn read_value<'a>(r: &mut Reader<'a>) -> Result<Value<'a>, &'static str> {
    Ok(match r.u8()? {
        b'n' => Value::Null,
        b'u' => Value::UnchangedToast,
        kind @ (b't' | b'b') => {
            let length = usize::try_from(r.u32()?).map_err(|_| "value too long")?;
            let bytes = r.bytes(length)?;
            if kind == b't' {
                Value::Text(bytes)
            } else {
                Value::Binary(bytes)
            }
        }
        _ => return Err("unknown column value kind"),
    })
}

/// A bounds-checked big-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, offset: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.offset
    }

    fn bytes(&mut self, count: usize) -> Result<&'a [u8], &'static str> {
        if count > self.remaining() {
            return Err("message ends early");
        }
        let bytes = &self.buf[self.offset..self.offset + count];
        self.offset += count;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let bytes = self.bytes(N)?;
        let mut array = [0; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, &'static str> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, &'static str> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn cstr(&mut self) -> Result<&'a str, &'static str> {
        let rest = &self.buf[self.offset..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or("unterminated string")?;
        let text = std::str::from_utf8(&rest[..end]).map_err(|_| "string is not UTF-8")?;
        self.offset += end + 1;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple_bytes(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = (values.len() as u16).to_be_bytes().to_vec();
        for value in values {
            match value {
                None => out.push(b'n'),
                Some("\u{0}toast") => out.push(b'u'),
                Some(text) => {
                    out.push(b't');
                    out.extend((text.len() as u32).to_be_bytes());
                    out.extend(text.as_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn decodes_an_update_with_full_old_row() {
        let mut buf = vec![b'U'];
        buf.extend(16384_u32.to_be_bytes());
        buf.push(b'O');
        buf.extend(tuple_bytes(&[Some("7"), Some("1")]));
        buf.push(b'N');
        buf.extend(tuple_bytes(&[Some("7"), Some("\u{0}toast")]));
        let Message::Update {
            relation,
            old,
            new,
            xid,
        } = decode(&buf, false).unwrap()
        else {
            panic!("not an update");
        };
        assert_eq!((relation, xid), (16384, None));
        let (kind, old) = old.unwrap();
        assert_eq!(kind, OldKind::Full);
        assert_eq!(
            old.values().collect::<Vec<_>>(),
            [Value::Text(b"7"), Value::Text(b"1")]
        );
        assert_eq!(
            new.values().collect::<Vec<_>>(),
            [Value::Text(b"7"), Value::UnchangedToast]
        );
    }

    #[test]
    fn streamed_messages_carry_an_xid() {
        let mut buf = vec![b'I'];
        buf.extend(900_u32.to_be_bytes());
        buf.extend(1_u32.to_be_bytes());
        buf.push(b'N');
        buf.extend(tuple_bytes(&[None]));
        assert!(matches!(
            decode(&buf, true),
            Ok(Message::Insert {
                xid: Some(900),
                relation: 1,
                ..
            })
        ));
        assert!(
            decode(&buf, false).is_err(),
            "without the stream flag the bytes do not line up"
        );
    }

    #[test]
    fn every_truncation_of_a_valid_message_is_an_error_not_a_panic() {
        let mut buf = vec![b'R'];
        buf.extend(1_u32.to_be_bytes());
        buf.extend(b"public\0orders\0");
        buf.push(b'f');
        buf.extend(1_u16.to_be_bytes());
        buf.push(1);
        buf.extend(b"id\0");
        buf.extend(20_u32.to_be_bytes());
        buf.extend((-1_i32).to_be_bytes());
        assert!(matches!(decode(&buf, false), Ok(Message::Relation(_))));
        for end in 0..buf.len() {
            assert!(decode(&buf[..end], false).is_err(), "prefix of {end} bytes");
        }
        let error = decode(&buf[..5], false).unwrap_err();
        assert_eq!(
            error.to_string(),
            "malformed pgoutput message 'R' at byte 5: unterminated string"
        );
    }

    #[test]
    fn absurd_counts_do_not_allocate() {
        let mut buf = vec![b'T'];
        buf.extend(u32::MAX.to_be_bytes());
        buf.push(0);
        assert!(decode(&buf, false).is_err());
    }
}
