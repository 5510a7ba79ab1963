//! Request and response heads: parsed with httparse under caps, owned, with
//! the header lookups that framing and persistence depend on.

use std::fmt;

/// The most header lines any head may have, whatever its limits say (the
/// parser's slots live on the stack).
pub const MAX_HEADER_SLOTS: usize = 128;

/// Caps on a head. A peer that exceeds one gets [`HeadError`], never an
/// unbounded buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadLimits {
    /// The request or status line and every header line together.
    pub max_head_bytes: usize,
    /// Header lines in one head.
    pub max_headers: usize,
}

impl Default for HeadLimits {
    fn default() -> HeadLimits {
        HeadLimits {
            max_head_bytes: 32 * 1024,
            max_headers: 64,
        }
    }
}

/// Why a head cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// The head has not ended within `max_head_bytes`.
    TooLarge { max_head_bytes: usize },
    /// More than `max_headers` header lines.
    TooManyHeaders { max_headers: usize },
    /// Not an HTTP/1.x head (httparse's reason).
    Malformed(String),
}

impl HeadError {
    /// The status a server answers this with.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge { .. } | HeadError::TooManyHeaders { .. } => 431,
            HeadError::Malformed(_) => 400,
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TooLarge { max_head_bytes } => {
                write!(f, "head too large: at most {max_head_bytes} bytes")
            }
            HeadError::TooManyHeaders { max_headers } => {
                write!(f, "too many headers: at most {max_headers}")
            }
            HeadError::Malformed(reason) => write!(f, "malformed head: {reason}"),
        }
    }
}

impl std::error::Error for HeadError {}

/// HTTP/1.0 or HTTP/1.1 (httparse accepts nothing else).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    fn from_minor(minor: Option<u8>) -> Version {
        match minor {
            Some(0) => Version::Http10,
            _ => Version::Http11,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// Header lines in the order received. Values that are not UTF-8 are kept
/// lossily (U+FFFD): every speaker here only reads ASCII headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// Headers from name-value pairs, in order.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Headers {
        Headers(
            pairs
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        )
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.all(name).next()
    }

    /// Every value of `name`, in order.
    pub fn all<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header (`Connection`, `Transfer-Encoding`)
    /// names `token`, in any of its lines.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.all(name)
            .flat_map(|value| value.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether the connection stays open after this message: HTTP/1.1 unless
    /// `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`.
    pub fn keep_alive(&self, version: Version) -> bool {
        match version {
            Version::Http11 => !self.has_token("Connection", "close"),
            Version::Http10 => self.has_token("Connection", "keep-alive"),
        }
    }

    /// `Content-Length`: `Ok(None)` when absent; an error when it is not a
    /// whole number or its lines disagree (a smuggling attempt).
    pub fn content_length(&self) -> Result<Option<u64>, FramingError> {
        let mut length = None;
        for value in self.all("Content-Length") {
            // A list ("5, 5") is what some proxies send for a repeated header.
            for part in value.split(',') {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(FramingError::BadLength);
                }
                let parsed: u64 = part.parse().map_err(|_| FramingError::BadLength)?;
                if length.is_some_and(|seen| seen != parsed) {
                    return Err(FramingError::ConflictingLengths);
                }
                length = Some(parsed);
            }
        }
        Ok(length)
    }

    /// Whether `Transfer-Encoding` is present at all.
    pub fn has_transfer_encoding(&self) -> bool {
        self.get("Transfer-Encoding").is_some()
    }

    /// Whether the last transfer coding is `chunked` (the only one that
    /// frames a message).
    pub fn is_chunked(&self) -> bool {
        self.all("Transfer-Encoding")
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .last()
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    }

    /// `Host`, trimmed.
    pub fn host(&self) -> Option<&str> {
        self.get("Host").map(str::trim)
    }
}

/// Why a message's framing cannot be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FramingError {
    BadLength,
    ConflictingLengths,
    /// Both `Transfer-Encoding` and `Content-Length` (on a request).
    LengthAndChunked,
    /// A transfer coding other than `chunked` on a request.
    UnsupportedCoding,
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FramingError::BadLength => "Content-Length: expected a whole number of bytes",
            FramingError::ConflictingLengths => "conflicting Content-Length headers",
            FramingError::LengthAndChunked => "both Transfer-Encoding and Content-Length given",
            FramingError::UnsupportedCoding => "Transfer-Encoding: only chunked is accepted",
        })
    }
}

impl std::error::Error for FramingError {}

/// A request's target as written on the request line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// `/path?query`.
    Origin(&'a str),
    /// `http://authority/path?query` (a request to a proxy); `path` is the
    /// origin form, `/` when the URI has none.
    Absolute {
        scheme: &'a str,
        authority: &'a str,
        path: String,
    },
    /// `host:port` (CONNECT).
    Authority(&'a str),
    /// `*` (OPTIONS).
    Asterisk,
}

impl<'a> Target<'a> {
    /// Classifies `target`; `None` for anything that is none of the four.
    pub fn parse(target: &'a str) -> Option<Target<'a>> {
        if target.starts_with('/') {
            return Some(Target::Origin(target));
        }
        if target == "*" {
            return Some(Target::Asterisk);
        }
        if let Some((scheme, rest)) = target.split_once("://") {
            let scheme_ok = !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
            if !scheme_ok {
                return None;
            }
            let (authority, path) = match rest.find(['/', '?', '#']) {
                Some(at) => (&rest[..at], &rest[at..]),
                None => (rest, ""),
            };
            // Credentials in the URI are not part of where to connect.
            let authority = authority.rsplit('@').next().unwrap_or(authority);
            if authority.is_empty() {
                return None;
            }
            let path = match path.as_bytes().first() {
                None | Some(b'#') => "/".to_string(),
                Some(b'?') => format!("/{path}"),
                _ => path.to_string(),
            };
            return Some(Target::Absolute {
                scheme,
                authority,
                path,
            });
        }
        split_authority(target, 0)
            .filter(|(_, port)| *port != 0)
            .map(|_| Target::Authority(target))
    }
}

/// Splits `host[:port]` (`[v6]:port` allowed) into the host (brackets
/// removed) and the port, `default_port` when absent. `None` for a port that
/// is not a number in range.
pub fn split_authority(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, default_port),
            _ => (host, after.strip_prefix(':')?.parse().ok()?),
        }
    } else {
        match authority.rsplit_once(':') {
            // A bare IPv6 address without brackets has several colons.
            Some((host, _)) if host.contains(':') => (authority, default_port),
            Some((host, port)) => (host, port.parse().ok()?),
            None => (authority, default_port),
        }
    };
    (!host.is_empty()).then_some((host, port))
}

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    pub version: Version,
    pub headers: Headers,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// Whether the client keeps the connection open after the answer.
    pub fn keep_alive(&self) -> bool {
        self.headers.keep_alive(self.version)
    }

    /// The target, classified.
    pub fn parsed_target(&self) -> Option<Target<'_>> {
        Target::parse(&self.target)
    }

    /// The target's path without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// A parsed response head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub version: Version,
    pub headers: Headers,
}

impl ResponseHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// 1xx other than 101: another head follows.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }

    /// Whether the server keeps the connection open after this answer.
    pub fn keep_alive(&self) -> bool {
        self.headers.keep_alive(self.version)
    }
}

/// What a head parser returns: `Ok(None)` while incomplete, else the head
/// and its length in bytes.
pub type Parsed<H> = Result<Option<(H, usize)>, HeadError>;

/// Parses a complete request head from the front of `input`: `Ok(None)` when
/// more bytes are needed, else the head and its length in bytes.
pub fn parse_request(input: &[u8], limits: HeadLimits) -> Parsed<RequestHead> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADER_SLOTS];
    let mut request =
        httparse::Request::new(&mut slots[..limits.max_headers.min(MAX_HEADER_SLOTS)]);
    let Some(length) = head_length(request.parse(input), input, limits)? else {
        return Ok(None);
    };
    let head = RequestHead {
        method: request.method.unwrap_or("").to_string(),
        target: request.path.unwrap_or("").to_string(),
        version: Version::from_minor(request.version),
        headers: owned_headers(request.headers),
    };
    Ok(Some((head, length)))
}

/// Parses a complete response head from the front of `input`, like
/// [`parse_request`].
pub fn parse_response(input: &[u8], limits: HeadLimits) -> Parsed<ResponseHead> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADER_SLOTS];
    let mut response =
        httparse::Response::new(&mut slots[..limits.max_headers.min(MAX_HEADER_SLOTS)]);
    let Some(length) = head_length(response.parse(input), input, limits)? else {
        return Ok(None);
    };
    let head = ResponseHead {
        status: response.code.unwrap_or(0),
        reason: response.reason.unwrap_or("").to_string(),
        version: Version::from_minor(response.version),
        headers: owned_headers(response.headers),
    };
    Ok(Some((head, length)))
}

/// The head's length from httparse's verdict, within the caps: `Ok(None)`
/// while incomplete and still under `max_head_bytes`.
fn head_length(
    parsed: httparse::Result<usize>,
    input: &[u8],
    limits: HeadLimits,
) -> Result<Option<usize>, HeadError> {
    let too_large = HeadError::TooLarge {
        max_head_bytes: limits.max_head_bytes,
    };
    match parsed {
        Ok(httparse::Status::Complete(length)) if length > limits.max_head_bytes => Err(too_large),
        Ok(httparse::Status::Complete(length)) => Ok(Some(length)),
        Ok(httparse::Status::Partial) if input.len() >= limits.max_head_bytes => Err(too_large),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(err) => Err(parse_error(err, limits)),
    }
}

fn parse_error(err: httparse::Error, limits: HeadLimits) -> HeadError {
    match err {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders {
            max_headers: limits.max_headers,
        },
        other => HeadError::Malformed(other.to_string()),
    }
}

fn owned_headers(headers: &[httparse::Header<'_>]) -> Headers {
    Headers(
        headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_head_bytes: 1024,
        max_headers: 8,
    };

    fn request(text: &str) -> Parsed<RequestHead> {
        parse_request(text.as_bytes(), LIMITS)
    }

    #[test]
    fn request_heads_parse_and_say_where_they_end() {
        let text = "GET /health?x=1 HTTP/1.1\r\nHost: a\r\n\r\nGET /next";
        let (head, length) = request(text).unwrap().unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.target, "/health?x=1");
        assert_eq!(head.path(), "/health");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.headers.host(), Some("a"));
        assert_eq!(&text[length..], "GET /next");
    }

    #[test]
    fn a_head_fed_byte_by_byte_completes_exactly_at_its_end() {
        let text = b"POST /feedback HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let head_len = text.len() - 2;
        for end in 0..text.len() {
            let parsed = parse_request(&text[..end], LIMITS).unwrap();
            assert_eq!(parsed.is_some(), end >= head_len, "at {end}");
        }
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        for end in 0..text.len() {
            assert!(parse_response(&text[..end], LIMITS).unwrap().is_none());
        }
        assert!(parse_response(text, LIMITS).unwrap().is_some());
    }

    #[test]
    fn caps_and_bad_input_are_typed_errors() {
        let bad = |text: &str| request(text).unwrap_err().status();
        assert_eq!(bad("GET / HTTP/2.0\r\n\r\n"), 400);
        assert_eq!(bad("GET / HTTP/1.1\r\nBad Header\r\n\r\n"), 400);
        let many: String = (0..9).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(bad(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(2000));
        assert_eq!(
            request(&long).unwrap_err(),
            HeadError::TooLarge {
                max_head_bytes: 1024
            }
        );
        let complete_but_long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(1100));
        assert_eq!(bad(&complete_but_long), 431);
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n", LIMITS).is_err());
    }

    #[test]
    fn persistence_follows_the_version() {
        let keep = |text: &str| request(text).unwrap().unwrap().0.keep_alive();
        assert!(keep("GET / HTTP/1.1\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!keep(
            "GET / HTTP/1.1\r\nConnection: Upgrade, Close\r\n\r\n"
        ));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn framing_headers_are_read_strictly() {
        let headers = Headers::from_pairs;
        assert_eq!(
            headers(&[("content-length", "12")]).content_length(),
            Ok(Some(12))
        );
        assert_eq!(
            headers(&[("Content-Length", "5"), ("Content-Length", "5")]).content_length(),
            Ok(Some(5))
        );
        assert_eq!(
            headers(&[("Content-Length", "1"), ("Content-Length", "2")]).content_length(),
            Err(FramingError::ConflictingLengths)
        );
        assert_eq!(
            headers(&[("Content-Length", "+3")]).content_length(),
            Err(FramingError::BadLength)
        );
        assert!(headers(&[("Transfer-Encoding", "gzip, chunked")]).is_chunked());
        assert!(!headers(&[("Transfer-Encoding", "chunked, gzip")]).is_chunked());
        assert!(!headers(&[]).is_chunked());
    }

    #[test]
    fn targets_are_classified() {
        assert_eq!(Target::parse("/a?b"), Some(Target::Origin("/a?b")));
        assert_eq!(Target::parse("*"), Some(Target::Asterisk));
        assert_eq!(
            Target::parse("example.com:443"),
            Some(Target::Authority("example.com:443"))
        );
        assert_eq!(
            Target::parse("[::1]:8080"),
            Some(Target::Authority("[::1]:8080"))
        );
        assert_eq!(
            Target::parse("http://u:p@127.0.0.1:9900/get?a=1"),
            Some(Target::Absolute {
                scheme: "http",
                authority: "127.0.0.1:9900",
                path: "/get?a=1".into()
            })
        );
        assert_eq!(
            Target::parse("HTTP://[::1]?x"),
            Some(Target::Absolute {
                scheme: "HTTP",
                authority: "[::1]",
                path: "/?x".into()
            })
        );
        assert_eq!(Target::parse("example.com"), None);
        assert_eq!(Target::parse("http:///x"), None);
        assert_eq!(split_authority("[::1]:81", 80), Some(("::1", 81)));
        assert_eq!(split_authority("[::1]", 80), Some(("::1", 80)));
        assert_eq!(split_authority("::1", 80), Some(("::1", 80)));
        assert_eq!(split_authority("a:99999", 80), None);
        assert_eq!(split_authority("a", 80), Some(("a", 80)));
    }
}
