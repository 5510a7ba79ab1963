//! Writing messages: a status line or request line, headers and body into
//! one buffer (one write), with the framing headers computed here, never
//! taken from the caller, and no header that could split the message.

use crate::http::head::Version;

/// How an answer ends its connection and whether it carries its body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnswerOptions {
    /// Adds `Connection: close`.
    pub close: bool,
    /// An answer to HEAD: the length of `body` is announced, the body is not
    /// sent.
    pub head_only: bool,
}

/// Headers whose value here follows from the message, not from the caller.
const FRAMING_HEADERS: [&str; 4] = [
    "content-length",
    "connection",
    "transfer-encoding",
    "upgrade",
];

/// Appends an answer to `out`: status line, the caller's headers (framing
/// headers and any with CR or LF dropped), `Content-Length`, and the body.
pub fn encode_response<N: AsRef<str>, V: AsRef<str>>(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(N, V)],
    body: &[u8],
    options: AnswerOptions,
) {
    out.reserve(body.len() + 128);
    push_status_line(out, Version::Http11, status);
    push_headers(out, headers, Keep::NotFraming);
    out.extend_from_slice(b"Content-Length: ");
    push_number(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if options.close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !options.head_only {
        out.extend_from_slice(body);
    }
}

/// Appends a response head as a relay passes it on: status line and the
/// given headers as they are (framing ones included; only a header with CR,
/// LF or NUL is dropped), then the blank line. The caller answers for the
/// framing.
pub fn encode_response_head<N: AsRef<str>, V: AsRef<str>>(
    out: &mut Vec<u8>,
    version: Version,
    status: u16,
    headers: &[(N, V)],
) {
    push_status_line(out, version, status);
    push_headers(out, headers, Keep::All);
    out.extend_from_slice(b"\r\n");
}

/// Appends a request head as a relay passes it on, like
/// [`encode_response_head`].
pub fn encode_request_head<N: AsRef<str>, V: AsRef<str>>(
    out: &mut Vec<u8>,
    method: &str,
    target: &str,
    version: Version,
    headers: &[(N, V)],
) {
    push_request_line(out, method, target, version);
    push_headers(out, headers, Keep::All);
    out.extend_from_slice(b"\r\n");
}

fn push_status_line(out: &mut Vec<u8>, version: Version, status: u16) {
    out.extend_from_slice(version.as_str().as_bytes());
    out.push(b' ');
    push_number(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_request_line(out: &mut Vec<u8>, method: &str, target: &str, version: Version) {
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.push(b' ');
    out.extend_from_slice(version.as_str().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends a request to `out`: request line, the caller's headers (framing
/// headers and any with CR or LF dropped), `Content-Length` when there is a
/// body or the method expects one, and the body.
pub fn encode_request<N: AsRef<str>, V: AsRef<str>>(
    out: &mut Vec<u8>,
    method: &str,
    target: &str,
    version: Version,
    headers: &[(N, V)],
    body: &[u8],
) {
    out.reserve(body.len() + 128);
    push_request_line(out, method, target, version);
    push_headers(out, headers, Keep::NotFraming);
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        out.extend_from_slice(b"Content-Length: ");
        push_number(out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Which of the caller's headers are written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    All,
    /// All but the framing headers, which the encoder writes itself.
    NotFraming,
}

fn push_headers<N: AsRef<str>, V: AsRef<str>>(out: &mut Vec<u8>, headers: &[(N, V)], keep: Keep) {
    for (name, value) in headers {
        let (name, value) = (name.as_ref(), value.as_ref());
        let framing = keep == Keep::NotFraming
            && FRAMING_HEADERS.iter().any(|h| name.eq_ignore_ascii_case(h));
        if framing || !is_safe(name) || name.is_empty() || !is_safe(value) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// A header name or value that cannot end its line early.
fn is_safe(text: &str) -> bool {
    !text.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

fn push_number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The reason phrase of `status` (RFC 9110), "Status" for one not listed.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::{parse_response, HeadLimits};

    #[test]
    fn answers_carry_their_length_and_never_split() {
        let headers = [
            ("Content-Type", "application/json"),
            ("X-Evil", "a\r\nSet-Cookie: x"),
            ("Content-Length", "999"),
        ];
        let mut out = Vec::new();
        let options = AnswerOptions {
            close: true,
            head_only: false,
        };
        encode_response(&mut out, 404, &headers, b"{}", options);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
             Connection: close\r\n\r\n{}"
        );
        let mut head_only = Vec::new();
        let options = AnswerOptions {
            close: false,
            head_only: true,
        };
        encode_response(&mut head_only, 200, &[] as &[(&str, &str)], b"abc", options);
        assert!(String::from_utf8(head_only)
            .unwrap()
            .ends_with("Content-Length: 3\r\n\r\n"));
    }

    #[test]
    fn relayed_heads_keep_their_framing_but_never_split() {
        let mut out = Vec::new();
        let headers = [
            ("Content-Length", "5"),
            ("Connection", "close"),
            ("X-Evil", "a\nb"),
        ];
        encode_response_head(&mut out, Version::Http10, 200, &headers);
        assert_eq!(
            out,
            b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
        );
        out.clear();
        encode_request_head(&mut out, "POST", "/x", Version::Http11, &headers);
        assert_eq!(
            out,
            b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn what_is_encoded_parses_back() {
        let mut out = Vec::new();
        encode_response(
            &mut out,
            503,
            &[("Retry-After", "3600".to_string())],
            b"",
            AnswerOptions::default(),
        );
        let (head, length) = parse_response(&out, HeadLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!(length, out.len());
        assert_eq!(head.status, 503);
        assert_eq!(head.reason, "Service Unavailable");
        assert_eq!(head.headers.content_length(), Ok(Some(0)));
        assert_eq!(head.header("retry-after"), Some("3600"));

        let mut request = Vec::new();
        encode_request(
            &mut request,
            "GET",
            "http://127.0.0.1:9/get",
            Version::Http11,
            &[("Host", "127.0.0.1:9")],
            b"",
        );
        assert_eq!(
            request,
            b"GET http://127.0.0.1:9/get HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"
        );
    }
}
