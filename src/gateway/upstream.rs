//! One attempt through one pool proxy: connect to it, open a tunnel to the
//! target (CONNECT for http proxies, the socks handshake for socks ones) or
//! send a plain http request and read its answer's head, all within the
//! attempt's deadline. A failure names its reason.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine;

use super::socks::{self, SocksClientError};
use super::target::Target;
use crate::http::io::{is_timeout, read_response_head, Bound, ReadError};
use crate::http::{encode_request, HeadLimits, ResponseHead, Version};
use crate::proxy::{Protocol, ProxyKey};

/// Why an attempt failed, as /stats and /metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// The pool proxy refused the TCP connection (or it failed at once).
    ConnectRefused,
    /// No TCP connection within the attempt's time.
    ConnectTimeout,
    /// CONNECT answered other than 200, or the socks proxy refused.
    HandshakeRefused,
    /// The CONNECT answer or socks reply did not come in time.
    HandshakeTimeout,
    /// A plain request's answer head did not come in time.
    NoAnswer,
    /// The proxy answered garbage or closed mid-handshake.
    BadAnswer,
    /// The proxy itself answered 407, 502, 503 or 504.
    ProxyError,
    /// The target answered 403 or 429 to this proxy's address.
    TargetRefused,
}

impl FailureReason {
    pub const ALL: [FailureReason; 8] = [
        FailureReason::ConnectRefused,
        FailureReason::ConnectTimeout,
        FailureReason::HandshakeRefused,
        FailureReason::HandshakeTimeout,
        FailureReason::NoAnswer,
        FailureReason::BadAnswer,
        FailureReason::ProxyError,
        FailureReason::TargetRefused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::ConnectRefused => "connect_refused",
            FailureReason::ConnectTimeout => "connect_timeout",
            FailureReason::HandshakeRefused => "handshake_refused",
            FailureReason::HandshakeTimeout => "handshake_timeout",
            FailureReason::NoAnswer => "no_answer",
            FailureReason::BadAnswer => "bad_answer",
            FailureReason::ProxyError => "proxy_error",
            FailureReason::TargetRefused => "target_refused",
        }
    }
}

/// A failed attempt: its reason and what was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailureReason,
    pub detail: String,
}

impl Failure {
    fn new(reason: FailureReason, detail: impl Into<String>) -> Failure {
        Failure {
            reason,
            detail: detail.into(),
        }
    }
}

/// A connection through a pool proxy, ready for the client's bytes.
pub struct Upstream {
    pub stream: TcpStream,
    /// Bytes the proxy sent past its handshake or answer head.
    pub pending: Vec<u8>,
}

/// Connects to the pool proxy within `deadline`.
fn connect(key: &ProxyKey, deadline: Instant) -> Result<TcpStream, Failure> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Failure::new(FailureReason::ConnectTimeout, "no time left"));
    }
    let addr = SocketAddr::new(key.ip, key.port);
    let stream = TcpStream::connect_timeout(&addr, left).map_err(|err| {
        if is_timeout(&err) {
            Failure::new(FailureReason::ConnectTimeout, "connect timed out")
        } else {
            Failure::new(FailureReason::ConnectRefused, err.to_string())
        }
    })?;
    let _ = stream.set_nodelay(true);
    set_deadline(&stream, deadline)?;
    Ok(stream)
}

fn set_deadline(stream: &TcpStream, deadline: Instant) -> Result<(), Failure> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(left))
        .and_then(|()| stream.set_write_timeout(Some(left)))
        .map_err(|err| Failure::new(FailureReason::ConnectRefused, err.to_string()))
}

/// `Proxy-Authorization` for an http pool proxy with credentials.
pub fn proxy_authorization(key: &ProxyKey) -> Option<String> {
    let user = key.username.as_deref()?;
    let pass = key.password.as_deref().unwrap_or("");
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    Some(format!("Basic {encoded}"))
}

/// Opens a tunnel to `target` through the pool proxy `key`.
pub fn open_tunnel(
    key: &ProxyKey,
    target: &Target,
    deadline: Instant,
) -> Result<Upstream, Failure> {
    let mut stream = connect(key, deadline)?;
    match key.protocol {
        Protocol::Http | Protocol::Https => {
            let authority = target.authority();
            let mut headers = vec![("Host".to_string(), authority.clone())];
            if let Some(auth) = proxy_authorization(key) {
                headers.push(("Proxy-Authorization".to_string(), auth));
            }
            let mut request = Vec::new();
            encode_request(
                &mut request,
                "CONNECT",
                &authority,
                Version::Http11,
                &headers,
                &[],
            );
            stream
                .write_all(&request)
                .map_err(|err| handshake_io(&err))?;
            let mut pending = Vec::new();
            let answer =
                read_response_head(&mut stream, &mut pending, Bound::until(deadline), LIMITS)
                    .map_err(|err| head_failure(err, FailureReason::HandshakeTimeout))?;
            if answer.status != 200 {
                return Err(Failure::new(
                    FailureReason::HandshakeRefused,
                    format!("CONNECT answered {}", answer.status),
                ));
            }
            Ok(Upstream { stream, pending })
        }
        Protocol::Socks5 => {
            let credentials = key
                .username
                .as_deref()
                .map(|user| (user, key.password.as_deref().unwrap_or("")));
            socks::socks5_connect(&mut stream, target, credentials).map_err(socks_failure)?;
            Ok(Upstream {
                stream,
                pending: Vec::new(),
            })
        }
        Protocol::Socks4 => {
            socks::socks4_connect(&mut stream, target, key.username.as_deref())
                .map_err(socks_failure)?;
            Ok(Upstream {
                stream,
                pending: Vec::new(),
            })
        }
    }
}

/// The caps on a pool proxy's answer head.
const LIMITS: HeadLimits = HeadLimits {
    max_head_bytes: 32 * 1024,
    max_headers: 100,
};

/// A plain http request to send through a pool proxy: to an http proxy
/// with the absolute URI, through a socks proxy's tunnel with the origin
/// form. `headers` hold no `Proxy-Authorization`.
pub struct PlainRequest<'a> {
    pub target: &'a Target,
    pub method: &'a str,
    pub absolute_uri: &'a str,
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// Sends `request` through the pool proxy and reads the answer's head.
pub fn send_plain(
    key: &ProxyKey,
    request: &PlainRequest,
    deadline: Instant,
) -> Result<(Upstream, ResponseHead), Failure> {
    let (mut upstream, request_target, auth) = match key.protocol {
        Protocol::Http | Protocol::Https => (
            Upstream {
                stream: connect(key, deadline)?,
                pending: Vec::new(),
            },
            request.absolute_uri,
            proxy_authorization(key),
        ),
        Protocol::Socks4 | Protocol::Socks5 => (
            open_tunnel(key, request.target, deadline)?,
            request.path,
            None,
        ),
    };
    let mut headers = request.headers.to_vec();
    if let Some(auth) = auth {
        headers.push(("Proxy-Authorization".to_string(), auth));
    }
    let mut bytes = Vec::new();
    encode_request(
        &mut bytes,
        request.method,
        request_target,
        Version::Http11,
        &headers,
        request.body,
    );
    upstream
        .stream
        .write_all(&bytes)
        .map_err(|err| Failure::new(FailureReason::BadAnswer, format!("write: {err}")))?;
    let answer = read_response_head(
        &mut upstream.stream,
        &mut upstream.pending,
        Bound::until(deadline),
        LIMITS,
    )
    .map_err(|err| head_failure(err, FailureReason::NoAnswer))?;
    if matches!(answer.status, 407 | 502 | 503 | 504) {
        return Err(Failure::new(
            FailureReason::ProxyError,
            format!("proxy answered {}", answer.status),
        ));
    }
    Ok((upstream, answer))
}

fn handshake_io(err: &std::io::Error) -> Failure {
    if is_timeout(err) {
        Failure::new(FailureReason::HandshakeTimeout, "handshake timed out")
    } else {
        Failure::new(FailureReason::BadAnswer, err.to_string())
    }
}

fn head_failure(err: ReadError, timeout_reason: FailureReason) -> Failure {
    match err {
        ReadError::Timeout => Failure::new(timeout_reason, "no answer in time"),
        ReadError::Io(err) => handshake_io(&err),
        other => Failure::new(FailureReason::BadAnswer, other.to_string()),
    }
}

fn socks_failure(err: SocksClientError) -> Failure {
    match err {
        SocksClientError::Refused(why) => Failure::new(FailureReason::HandshakeRefused, why),
        SocksClientError::Protocol(why) => Failure::new(FailureReason::BadAnswer, why),
        SocksClientError::Io(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            Failure::new(
                FailureReason::BadAnswer,
                "closed during the socks handshake",
            )
        }
        SocksClientError::Io(err) => handshake_io(&err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_proxy_credentials_are_basic() {
        let mut key = ProxyKey::new(Protocol::Http, "1.2.3.4".parse().unwrap(), 80);
        assert_eq!(proxy_authorization(&key), None);
        key.username = Some("user".into());
        key.password = Some("pass".into());
        assert_eq!(
            proxy_authorization(&key).as_deref(),
            Some("Basic dXNlcjpwYXNz")
        );
    }

    #[test]
    fn reasons_have_distinct_names() {
        let mut names: Vec<&str> = FailureReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), FailureReason::ALL.len());
    }
}
