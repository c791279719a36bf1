//! A Postgres replication connection, on `postgres-protocol` and tokio.
//!
//! Upstream tokio-postgres has no replication support, so this speaks the
//! wire protocol itself: startup with `replication=database`, cleartext, MD5
//! and SCRAM-SHA-256 authentication, simple queries (IDENTIFY_SYSTEM,
//! CREATE_REPLICATION_SLOT, START_REPLICATION), then the CopyBoth stream of
//! XLogData and keepalives, and standby status updates back.
//!
//! Reading is cancellation-safe: bytes are appended to a buffer owned by the
//! connection and whole frames are taken from it, so dropping a `recv`
//! future (a `select!` branch losing) loses nothing.

use std::str::FromStr as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::tls::{server_name, TlsSettings};
use crate::error::{postgres_kind, Error, ErrorKind};

/// Microseconds from the Unix epoch to Postgres' epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// What the replication stream delivers.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// WAL data: one pgoutput message starting at `wal_start`.
    XLogData {
        wal_start: u64,
        wal_end: u64,
        /// When the server sent it (its clock).
        send_time: SystemTime,
        data: Bytes,
    },
    /// The server's position; `reply` asks for a status update now.
    Keepalive { wal_end: u64, reply: bool },
}

/// Rows of a simple query, as text.
pub type Rows = Vec<Vec<Option<String>>>;

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// How much the read buffer asks for at a time.
const READ_CHUNK: usize = 64 * 1024;
/// A frame above this size leaves the read buffer reallocated small.
const RELEASE_AFTER_FRAME: usize = 1 << 20;

/// An open replication connection.
pub struct ReplicationConnection {
    reader: Reader,
    writer: Writer,
    buf: BytesMut,
    server_version: u32,
}

/// One backend frame.
struct Frame {
    tag: u8,
    body: Bytes,
}

impl ReplicationConnection {
    /// Connects and authenticates with `url` (a `postgres://` URL or
    /// key=value connection string) in logical replication mode.
    pub async fn connect(url: &str) -> Result<ReplicationConnection, Error> {
        let (tls, url) = TlsSettings::from_url(url)?;
        let config = tokio_postgres::Config::from_str(&url)
            .map_err(|e| Error::with_source(ErrorKind::Config, "invalid postgres.url", e))?;
        // As libpq: each host in turn, the first that takes the connection
        // (and with target_session_attrs=read-write, is not read-only: a
        // URL listing a primary and its standbys follows a failover).
        let read_write = matches!(
            config.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        let mut last_error = None;
        for index in 0..config.get_hosts().len() {
            match ReplicationConnection::connect_host(&config, &tls, index).await {
                Ok(mut conn) => {
                    if !read_write || !conn.read_only().await? {
                        return Ok(conn);
                    }
                    last_error = Some(Error::new(
                        ErrorKind::PostgresConnection,
                        format!(
                            "{} is read-only (a standby), and postgres.url asks for target_session_attrs=read-write",
                            host_words(&config, index)
                        ),
                    ));
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error
            .unwrap_or_else(|| Error::new(ErrorKind::Config, "postgres.url names no host")))
    }

    /// A session with the `index`th host of `config`.
    async fn connect_host(
        config: &tokio_postgres::Config,
        tls: &TlsSettings,
        index: usize,
    ) -> Result<ReplicationConnection, Error> {
        let (reader, writer) = open(config, tls, index).await?;
        let mut conn = ReplicationConnection {
            reader,
            writer,
            buf: BytesMut::with_capacity(READ_CHUNK),
            server_version: 0,
        };
        conn.startup(config).await?;
        Ok(conn)
    }

    /// `SHOW transaction_read_only`: on for a standby.
    async fn read_only(&mut self) -> Result<bool, Error> {
        let rows = self.simple_query("SHOW transaction_read_only").await?;
        Ok(matches!(
            rows.first().and_then(|row| row.first()),
            Some(Some(value)) if value == "on"
        ))
    }

    /// The server's version as `server_version_num` (e.g. 150004).
    pub fn server_version(&self) -> u32 {
        self.server_version
    }

    async fn startup(&mut self, config: &tokio_postgres::Config) -> Result<(), Error> {
        let user = config.get_user().unwrap_or("postgres");
        let database = config.get_dbname().unwrap_or(user);
        let application = config.get_application_name().unwrap_or("evictd");
        let mut out = BytesMut::new();
        let params = [
            ("user", user),
            ("database", database),
            ("replication", "database"),
            ("application_name", application),
            ("client_encoding", "UTF8"),
            // pgoutput prints values with the walsender's settings: fix
            // every one that changes a value's text (dates, timestamps,
            // intervals, bytea, floats, money), so keys do not depend on the
            // server's or the database's defaults (and match what the
            // Kafka source renders from Debezium's encodings).
            ("TimeZone", "UTC"),
            ("DateStyle", "ISO, MDY"),
            ("IntervalStyle", "postgres"),
            ("bytea_output", "hex"),
            ("extra_float_digits", "1"),
            ("lc_monetary", "C"),
        ];
        frontend::startup_message(params.iter().copied(), &mut out).map_err(protocol_io)?;
        self.send(&out).await?;
        let password = config.get_password();
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.frame().await?;
            match frame.tag {
                b'R' => {
                    self.authenticate(frame.body, user, password, &mut scram)
                        .await?
                }
                b'S' => self.parameter(&frame.body),
                b'K' | b'N' => {}
                b'Z' => return Ok(()),
                b'E' => return Err(server_error(&frame.body)),
                tag => return Err(unexpected(tag, "startup")),
            }
        }
    }

    async fn authenticate(
        &mut self,
        mut body: Bytes,
        user: &str,
        password: Option<&[u8]>,
        scram: &mut Option<ScramSha256>,
    ) -> Result<(), Error> {
        if body.len() < 4 {
            return Err(unexpected(b'R', "authentication"));
        }
        let code = body.get_u32();
        let need_password = || {
            password.ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    "the server asks for a password; put it in postgres.url",
                )
            })
        };
        let mut out = BytesMut::new();
        match code {
            0 => return Ok(()),
            3 => frontend::password_message(need_password()?, &mut out).map_err(protocol_io)?,
            5 if body.len() >= 4 => {
                let salt = [body[0], body[1], body[2], body[3]];
                let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), need_password()?, salt);
                frontend::password_message(hash.as_bytes(), &mut out).map_err(protocol_io)?;
            }
            10 => {
                let offers_scram = body.split(|&b| b == 0).any(|mechanism| mechanism == SCRAM_SHA_256.as_bytes());
                if !offers_scram {
                    return Err(Error::new(ErrorKind::Protocol, "the server offers no SASL mechanism evictd supports"));
                }
                let client = ScramSha256::new(need_password()?, ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, client.message(), &mut out).map_err(protocol_io)?;
                *scram = Some(client);
            }
            11 | 12 => {
                let client = scram.as_mut().ok_or_else(|| unexpected(b'R', "SASL without a start"))?;
                if code == 11 {
                    client.update(&body).map_err(|e| Error::with_source(ErrorKind::Config, "SCRAM authentication failed", e))?;
                    frontend::sasl_response(client.message(), &mut out).map_err(protocol_io)?;
                } else {
                    client.finish(&body).map_err(|e| Error::with_source(ErrorKind::Config, "SCRAM server signature invalid", e))?;
                    return Ok(());
                }
            }
            other => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("the server asks for authentication method {other}, which evictd does not support"),
                ))
            }
        }
        self.send(&out).await
    }

    fn parameter(&mut self, body: &[u8]) {
        let mut parts = body.split(|&b| b == 0);
        if parts.next() == Some(b"server_version".as_slice()) {
            let version = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
            self.server_version = parse_server_version(&version);
        }
    }

    /// Runs one simple query and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, Error> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(protocol_io)?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.frame().await?;
            match frame.tag {
                b'D' => rows.push(data_row(&frame.body)?),
                b'T' | b'C' | b'I' | b'N' | b'S' => {}
                b'E' => error = Some(server_error(&frame.body)),
                b'Z' => return error.map_or(Ok(rows), Err),
                tag => return Err(unexpected(tag, "a simple query")),
            }
        }
    }

    /// Sends START_REPLICATION and waits for the CopyBoth response.
    pub async fn start_replication(&mut self, command: &str) -> Result<(), Error> {
        let mut out = BytesMut::new();
        frontend::query(command, &mut out).map_err(protocol_io)?;
        self.send(&out).await?;
        loop {
            let frame = self.frame().await?;
            match frame.tag {
                // CopyBothResponse: postgres-protocol's parser does not
                // know this tag, which is why frames are read here.
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                b'E' => {
                    let error = server_error(&frame.body);
                    // Drain to ReadyForQuery so the connection stays usable.
                    while self.frame().await?.tag != b'Z' {}
                    return Err(error);
                }
                tag => return Err(unexpected(tag, "START_REPLICATION")),
            }
        }
    }

    /// The next XLogData or keepalive. Cancellation-safe.
    pub async fn recv(&mut self) -> Result<ReplicationMessage, Error> {
        loop {
            let frame = self.frame().await?;
            if let Some(message) = stream_message(frame)? {
                return Ok(message);
            }
        }
    }

    /// The next XLogData or keepalive if a whole one is already buffered:
    /// works through a burst without waiting on the network.
    pub fn try_recv(&mut self) -> Result<Option<ReplicationMessage>, Error> {
        while let Some(frame) = self.buffered_frame()? {
            if let Some(message) = stream_message(frame)? {
                return Ok(Some(message));
            }
        }
        Ok(None)
    }

    /// Whether a whole message is already buffered, so `recv` would not
    /// wait for the network.
    pub fn has_buffered_message(&self) -> bool {
        self.buffered_length()
            .is_some_and(|length| self.buf.len() > length)
    }

    /// Sends a standby status update: received up to `write`, applied (and
    /// safe to forget) up to `flush`.
    pub async fn send_status(&mut self, write: u64, flush: u64, reply: bool) -> Result<(), Error> {
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(write);
        payload.put_u64(flush);
        payload.put_u64(flush);
        payload.put_i64(pg_now_micros());
        payload.put_u8(u8::from(reply));
        let mut out = BytesMut::with_capacity(40);
        frontend::CopyData::new(&payload[..])
            .map_err(protocol_io)?
            .write(&mut out);
        self.send(&out).await
    }

    /// Ends the stream cleanly: CopyDone, then wait (briefly) for the server
    /// to finish.
    pub async fn finish(&mut self) -> Result<(), Error> {
        let mut out = BytesMut::new();
        frontend::copy_done(&mut out);
        self.send(&out).await?;
        let drain = async {
            loop {
                match self.frame().await?.tag {
                    b'Z' => return Ok::<_, Error>(()),
                    b'E' => return Ok(()),
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = self.send(&out).await;
        Ok(())
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.writer
            .write_all(bytes)
            .await
            .map_err(connection_lost)?;
        self.writer.flush().await.map_err(connection_lost)
    }

    /// The next whole frame; reads more only when the buffer lacks one.
    async fn frame(&mut self) -> Result<Frame, Error> {
        loop {
            if let Some(frame) = self.buffered_frame()? {
                return Ok(frame);
            }
            match self.buffered_length() {
                Some(length) => self.buf.reserve(length + 1 - self.buf.len()),
                None => self.buf.reserve(READ_CHUNK),
            }
            let read = self
                .reader
                .read_buf(&mut self.buf)
                .await
                .map_err(connection_lost)?;
            if read == 0 {
                return Err(Error::new(
                    ErrorKind::PostgresConnection,
                    "the server closed the connection",
                ));
            }
        }
    }

    /// The length of the frame at the head of the buffer, once its header
    /// is there.
    fn buffered_length(&self) -> Option<usize> {
        (self.buf.len() >= 5).then(|| {
            u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize
        })
    }

    /// The frame at the head of the buffer, if it is whole.
    fn buffered_frame(&mut self) -> Result<Option<Frame>, Error> {
        let Some(length) = self.buffered_length() else {
            return Ok(None);
        };
        if length < 4 {
            return Err(Error::new(
                ErrorKind::Protocol,
                "a frame with a length below 4",
            ));
        }
        if self.buf.len() <= length {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(length + 1);
        if frame.len() > RELEASE_AFTER_FRAME {
            // The buffer grew for one huge message and still shares its
            // allocation: start a small one, so that the memory goes back
            // once the frame is dropped instead of being held for good.
            let mut fresh = BytesMut::with_capacity(READ_CHUNK.max(self.buf.len()));
            fresh.extend_from_slice(&self.buf);
            self.buf = fresh;
        }
        let tag = frame[0];
        frame.advance(5);
        Ok(Some(Frame {
            tag,
            body: frame.freeze(),
        }))
    }
}

/// What a frame of the replication stream means: a message, nothing (a
/// notice or parameter status), or the stream's end.
fn stream_message(frame: Frame) -> Result<Option<ReplicationMessage>, Error> {
    match frame.tag {
        b'd' => copy_data(frame.body).map(Some),
        b'N' | b'S' => Ok(None),
        b'E' => Err(server_error(&frame.body)),
        b'c' => Err(Error::new(
            ErrorKind::PostgresConnection,
            "the server ended the replication stream",
        )),
        tag => Err(unexpected(tag, "the replication stream")),
    }
}

/// `host:port` of the `index`th host of `config`, for messages.
fn host_words(config: &tokio_postgres::Config, index: usize) -> String {
    let ports = config.get_ports();
    let port = ports.get(index).or(ports.first()).copied().unwrap_or(5432);
    match config.get_hosts().get(index) {
        Some(tokio_postgres::config::Host::Tcp(name)) => format!("{name}:{port}"),
        Some(tokio_postgres::config::Host::Unix(dir)) => {
            format!("{}/.s.PGSQL.{port}", dir.display())
        }
        None => format!("host {index}"),
    }
}

/// A stream to the `index`th host of `config` (TLS negotiated).
async fn open(
    config: &tokio_postgres::Config,
    tls: &TlsSettings,
    index: usize,
) -> Result<(Reader, Writer), Error> {
    let ports = config.get_ports();
    let port = ports.get(index).or(ports.first()).copied().unwrap_or(5432);
    let failed = |error| {
        Error::with_source(
            ErrorKind::PostgresConnection,
            format!(
                "cannot connect to Postgres at {}",
                host_words(config, index)
            ),
            error,
        )
    };
    match &config.get_hosts()[index] {
        tokio_postgres::config::Host::Tcp(name) => {
            let stream = tokio::net::TcpStream::connect((name.as_str(), port))
                .await
                .map_err(failed)?;
            let _ = stream.set_nodelay(true);
            negotiate_tls(stream, tls, name).await
        }
        // As libpq: no TLS over a Unix socket.
        tokio_postgres::config::Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(failed)?;
            let (reader, writer) = stream.into_split();
            Ok((Box::new(reader) as Reader, Box::new(writer) as Writer))
        }
    }
}

/// SSLRequest, then the TLS handshake when the server agrees.
async fn negotiate_tls(
    mut stream: tokio::net::TcpStream,
    tls: &TlsSettings,
    host: &str,
) -> Result<(Reader, Writer), Error> {
    let plain = |stream: tokio::net::TcpStream| {
        let (reader, writer) = stream.into_split();
        Ok((Box::new(reader) as Reader, Box::new(writer) as Writer))
    };
    let Some(config) = tls.client_config()? else {
        return plain(stream);
    };
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    stream.write_all(&out).await.map_err(connection_lost)?;
    let answer = stream.read_u8().await.map_err(connection_lost)?;
    match answer {
        b'S' => {
            let connector = tokio_rustls::TlsConnector::from(config);
            let stream = connector
                .connect(server_name(host)?, stream)
                .await
                .map_err(|e| {
                    Error::with_source(
                        ErrorKind::Config,
                        format!("TLS handshake with Postgres at {host} failed"),
                        e,
                    )
                })?;
            let (reader, writer) = tokio::io::split(stream);
            Ok((Box::new(reader) as Reader, Box::new(writer) as Writer))
        }
        b'N' if tls.required() => Err(Error::new(
            ErrorKind::Config,
            format!("Postgres at {host} does not accept TLS, and sslmode requires it"),
        )),
        b'N' => plain(stream),
        other => Err(unexpected(other, "TLS negotiation")),
    }
}

fn copy_data(mut body: Bytes) -> Result<ReplicationMessage, Error> {
    let short = || Error::new(ErrorKind::Protocol, "a short CopyData message");
    match body.first() {
        Some(b'w') if body.len() >= 25 => {
            body.advance(1);
            let wal_start = body.get_u64();
            let wal_end = body.get_u64();
            let send_time = pg_time(body.get_i64());
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data: body,
            })
        }
        Some(b'k') if body.len() >= 18 => {
            body.advance(1);
            let wal_end = body.get_u64();
            let _send_time = body.get_i64();
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                reply: body.get_u8() == 1,
            })
        }
        Some(b'w' | b'k') => Err(short()),
        _ => Err(Error::new(
            ErrorKind::Protocol,
            "unknown CopyData message in the replication stream",
        )),
    }
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, Error> {
    let bad = || Error::new(ErrorKind::Protocol, "a malformed DataRow");
    let mut rest = body;
    let count = rest.get(..2).ok_or_else(bad)?;
    let count = u16::from_be_bytes([count[0], count[1]]);
    rest = &rest[2..];
    let mut row = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let length = rest.get(..4).ok_or_else(bad)?;
        let length = i32::from_be_bytes([length[0], length[1], length[2], length[3]]);
        rest = &rest[4..];
        if length < 0 {
            row.push(None);
            continue;
        }
        let length = usize::try_from(length).map_err(|_| bad())?;
        let value = rest.get(..length).ok_or_else(bad)?;
        row.push(Some(String::from_utf8_lossy(value).into_owned()));
        rest = &rest[length..];
    }
    Ok(row)
}

/// An ErrorResponse as an [`Error`], classified by SQLSTATE.
fn server_error(body: &[u8]) -> Error {
    let mut code = String::new();
    let mut message = String::new();
    let mut severity = String::new();
    for field in body.split(|&b| b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = String::from_utf8_lossy(value);
        match kind {
            b'C' => code = value.into_owned(),
            b'M' => message = value.into_owned(),
            b'V' => severity = value.into_owned(),
            _ => {}
        }
    }
    Error::new(
        postgres_kind(Some(&code)),
        format!("postgres {severity} {code}: {message}"),
    )
}

fn unexpected(tag: u8, during: &str) -> Error {
    Error::new(
        ErrorKind::Protocol,
        format!(
            "unexpected message '{}' during {during}",
            char::from(tag).escape_default()
        ),
    )
}

fn protocol_io(error: std::io::Error) -> Error {
    Error::with_source(
        ErrorKind::Protocol,
        "cannot encode a protocol message",
        error,
    )
}

fn connection_lost(error: std::io::Error) -> Error {
    Error::with_source(
        ErrorKind::PostgresConnection,
        "the Postgres connection broke",
        error,
    )
}

fn parse_server_version(text: &str) -> u32 {
    let mut parts = text
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    major * 10_000 + minor
}

/// Now, in microseconds since the Postgres epoch.
pub fn pg_now_micros() -> i64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_unix.as_micros()).unwrap_or(i64::MAX) - PG_EPOCH_OFFSET_MICROS
}

/// A Postgres timestamp (microseconds since 2000-01-01) as a `SystemTime`.
pub fn pg_time(micros: i64) -> SystemTime {
    let unix = micros.saturating_add(PG_EPOCH_OFFSET_MICROS);
    match u64::try_from(unix) {
        Ok(unix) => UNIX_EPOCH + Duration::from_micros(unix),
        Err(_) => UNIX_EPOCH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_server_version("15.19 (Debian 15.19-0+deb12u1)"),
            150_019
        );
        assert_eq!(parse_server_version("13.2"), 130_002);
    }

    #[test]
    fn timestamps_round_trip() {
        let now = pg_now_micros();
        let back = pg_time(now);
        let diff = SystemTime::now().duration_since(back).unwrap_or_default();
        assert!(diff < Duration::from_secs(1));
    }
}
