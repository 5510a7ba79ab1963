//! The HTTP/1 heads the gateway reads: a client's request head and a pool
//! proxy's answer head, parsed with httparse under a byte cap, and how the
//! body after each is framed. Kept to this file so that it moves onto the
//! project's shared HTTP/1 layer in one step.

use std::io::{self, Read};
use std::time::Instant;

/// A request or answer head: the start line and headers together.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
const MAX_HEADERS: usize = 100;

/// A parsed head. For a request `method` and `target` are set; for an
/// answer `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub target: String,
    pub status: u16,
    pub reason: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a `Connection` header (or the version) ends the connection
    /// after this message.
    pub fn wants_close(&self) -> bool {
        let connection = self.header("connection").map(str::to_ascii_lowercase);
        match connection.as_deref() {
            Some(value) if value.split(',').any(|t| t.trim() == "close") => true,
            Some(value) if value.split(',').any(|t| t.trim() == "keep-alive") => false,
            _ => self.minor_version == 0,
        }
    }

    /// How the body after this head ends. `request_method` is the method an
    /// answer answers (a HEAD's answer has no body).
    pub fn body(&self, request_method: Option<&str>) -> Result<Body, HeadError> {
        if let Some(method) = request_method {
            let no_body = method.eq_ignore_ascii_case("HEAD")
                || (100..200).contains(&self.status)
                || self.status == 204
                || self.status == 304;
            if no_body {
                return Ok(Body::Length(0));
            }
        }
        if let Some(encoding) = self.header("transfer-encoding") {
            if encoding.to_ascii_lowercase().trim().ends_with("chunked") {
                return Ok(Body::Chunked);
            }
            return Err(HeadError::Malformed("unsupported transfer-encoding"));
        }
        if let Some(length) = self.header("content-length") {
            return length
                .trim()
                .parse::<u64>()
                .map(Body::Length)
                .map_err(|_| HeadError::Malformed("bad content-length"));
        }
        Ok(if request_method.is_some() {
            Body::UntilClose
        } else {
            Body::Length(0)
        })
    }
}

/// How a body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    Length(u64),
    Chunked,
    /// An answer without length: it ends when the sender closes.
    UntilClose,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("malformed head: {0}")]
    Malformed(&'static str),
    #[error("head longer than {MAX_HEAD_BYTES} bytes")]
    TooLong,
    #[error("connection closed before a whole head")]
    Closed,
    #[error("no whole head in time")]
    Timeout,
    #[error("{0}")]
    Io(io::Error),
}

/// Parses a head at the start of `bytes`: `Ok(None)` while incomplete,
/// else the head and its length in bytes.
pub fn parse_head(bytes: &[u8], is_request: bool) -> Result<Option<(Head, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let to_head = |raw: &[httparse::Header]| {
        raw.iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect()
    };
    if is_request {
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(bytes) {
            Ok(httparse::Status::Complete(len)) => Ok(Some((
                Head {
                    method: request.method.unwrap_or_default().to_string(),
                    target: request.path.unwrap_or_default().to_string(),
                    minor_version: request.version.unwrap_or(1),
                    headers: to_head(request.headers),
                    ..Head::default()
                },
                len,
            ))),
            Ok(httparse::Status::Partial) if bytes.len() >= MAX_HEAD_BYTES => {
                Err(HeadError::TooLong)
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(_) => Err(HeadError::Malformed("not an HTTP/1 request head")),
        }
    } else {
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(bytes) {
            Ok(httparse::Status::Complete(len)) => Ok(Some((
                Head {
                    status: response.code.unwrap_or_default(),
                    reason: response.reason.unwrap_or_default().to_string(),
                    minor_version: response.version.unwrap_or(1),
                    headers: to_head(response.headers),
                    ..Head::default()
                },
                len,
            ))),
            Ok(httparse::Status::Partial) if bytes.len() >= MAX_HEAD_BYTES => {
                Err(HeadError::TooLong)
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(_) => Err(HeadError::Malformed("not an HTTP/1 answer head")),
        }
    }
}

/// Reads from `stream` into `pending` until a whole head is there, before
/// `deadline` (the stream's read timeout is set to what is left). Returns the
/// head; `pending` keeps the bytes after it.
pub fn read_head<S: Read + TimeoutSet>(
    stream: &mut S,
    pending: &mut Vec<u8>,
    is_request: bool,
    deadline: Instant,
) -> Result<Head, HeadError> {
    let mut buffer = [0u8; 8192];
    loop {
        if !pending.is_empty() {
            if let Some((head, len)) = parse_head(pending, is_request)? {
                pending.drain(..len);
                return Ok(head);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::Timeout);
        }
        stream.set_timeout(left).map_err(HeadError::Io)?;
        let room = (MAX_HEAD_BYTES + 1 - pending.len().min(MAX_HEAD_BYTES)).min(buffer.len());
        match stream.read(&mut buffer[..room]) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => pending.extend_from_slice(&buffer[..n]),
            Err(err) if is_timeout(&err) => return Err(HeadError::Timeout),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(HeadError::Io(err)),
        }
    }
}

/// A stream whose read timeout can be set.
pub trait TimeoutSet {
    fn set_timeout(&mut self, timeout: std::time::Duration) -> io::Result<()>;
}

impl TimeoutSet for std::net::TcpStream {
    fn set_timeout(&mut self, timeout: std::time::Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

pub fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes a head: the start line, then `headers` in order.
pub fn encode_head(start_line: &str, headers: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(start_line.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Hop-by-hop headers a proxy never forwards.
pub fn is_hop_by_hop(name: &str) -> bool {
    const HOP: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse_and_say_their_length() {
        let text = b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\nrest";
        let (head, len) = parse_head(text, true).unwrap().unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.target, "http://a.test/x");
        assert_eq!(head.header("host"), Some("a.test"));
        assert_eq!(&text[len..], b"rest");
        assert!(parse_head(b"GET / HTTP/1.1\r\n", true).unwrap().is_none());
        assert!(parse_head(b"\x16\x03\x01garbage\r\n\r\n", true).is_err());
        let long = vec![b'a'; MAX_HEAD_BYTES + 10];
        assert!(parse_head(&long, true).is_err());
    }

    #[test]
    fn answer_bodies_are_framed() {
        let answer = |text: &[u8]| parse_head(text, false).unwrap().unwrap().0;
        let head = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(head.body(Some("GET")).unwrap(), Body::Length(5));
        assert_eq!(head.body(Some("HEAD")).unwrap(), Body::Length(0));
        let head = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(head.body(Some("GET")).unwrap(), Body::Chunked);
        let head = answer(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(head.body(Some("GET")).unwrap(), Body::UntilClose);
        let head = answer(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(head.body(Some("GET")).unwrap(), Body::Length(0));
        let head = answer(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n");
        assert!(head.body(Some("GET")).is_err());
        assert!(!head.wants_close());
        let head = answer(b"HTTP/1.0 200 OK\r\n\r\n");
        assert!(head.wants_close());
    }
}
