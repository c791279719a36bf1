//! The little of HTTP/1.1 the admin endpoint speaks: a request head
//! parsed, a whole response written.

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// A request head: method, path, query and the one header read.
#[derive(Debug, Default)]
pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query as sent (percent-encoded).
    pub query: String,
    /// The `Authorization` header's value.
    pub authorization: Option<String>,
}

impl Request {
    /// Parses a request head (CRLF or bare LF lines).
    pub fn parse(head: &[u8]) -> Request {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.lines();
        let mut words = lines.next().unwrap_or("").split_whitespace();
        let method = words.next().unwrap_or("").to_owned();
        let target = words.next().unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let authorization = lines
            .take_while(|line| !line.trim().is_empty())
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
            .map(|(_, value)| value.trim().to_owned());
        Request {
            method,
            path: path.to_owned(),
            query: query.to_owned(),
            authorization,
        }
    }

    /// The first value of query parameter `name`, decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .filter_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(key) == name).then(|| decode(value))
            })
            .next()
    }
}

/// `application/x-www-form-urlencoded` decoding: `%XX` and `+`; a broken
/// escape is kept as written.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}

/// Writes a whole response and closes.
pub async fn send(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\nx-frame-options: DENY\r\ncontent-security-policy: default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let whole = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(super::WRITE_TIMEOUT, whole).await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

/// Writes `value` as a JSON response.
pub async fn send_json(
    stream: &mut TcpStream,
    status: &str,
    value: &impl serde::Serialize,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    send(stream, status, "application/json", &body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_gives_its_path_query_and_token() {
        let request = Request::parse(
            b"GET /ui/api/trace?key=order%3A1&x=a+b HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n",
        );
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/ui/api/trace");
        assert_eq!(request.query("key").as_deref(), Some("order:1"));
        assert_eq!(request.query("x").as_deref(), Some("a b"));
        assert_eq!(request.query("y"), None);
        assert_eq!(request.authorization.as_deref(), Some("Bearer s3cret"));
        let bare = Request::parse(b"GET /metrics HTTP/1.0\n\n");
        assert_eq!((bare.path.as_str(), bare.authorization), ("/metrics", None));
    }

    #[test]
    fn broken_escapes_are_kept() {
        assert_eq!(decode("%"), "%");
        assert_eq!(decode("a%2"), "a%2");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("%7B%22id%22%3A1%7D"), "{\"id\":1}");
        assert_eq!(decode("%C3%A9"), "é");
    }
}
