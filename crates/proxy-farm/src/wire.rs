//! The farm's side of the socket plumbing that its judge, list server and
//! simulated proxies share: bounds that notice the farm stopping, request
//! heads and answers through the product's HTTP module
//! (`proxy_pool::http`), connecting out from a chosen loopback address, and
//! relaying bytes between two sockets.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use proxy_pool::http::io::{self as http_io, ReadError};
use proxy_pool::http::{self, AnswerOptions, HeadLimits, Target, Version};
use socket2::{Domain, Protocol as SocketProtocol, Socket, Type};

use crate::Shared;

/// The most a request head may take before the connection is dropped.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Header lines a request head may have.
const MAX_HEADERS: usize = 96;
/// How long a sleep waits before looking at the stop flag again.
const POLL_SLICE: Duration = Duration::from_millis(200);
/// Stack size of listener threads: they only accept.
pub(crate) const LISTENER_STACK: usize = 64 * 1024;
/// Stack size of connection threads.
pub(crate) const CONNECTION_STACK: usize = 256 * 1024;

/// When a connection must give up: at its deadline or when the farm stops.
#[derive(Clone, Copy)]
pub(crate) struct Bound<'a> {
    pub deadline: Instant,
    pub stop: &'a AtomicBool,
}

impl<'a> Bound<'a> {
    /// The same bound as the HTTP module's I/O takes it.
    fn io(&self) -> http_io::Bound<'a> {
        http_io::Bound::until(self.deadline).or_stop(self.stop)
    }

    pub fn expired(&self) -> bool {
        self.io().expired()
    }

    /// Sleeps `duration`, cut short by the bound. Returns false when cut short.
    pub fn sleep(&self, duration: Duration) -> bool {
        let until = Instant::now() + duration;
        loop {
            if self.expired() {
                return false;
            }
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                return true;
            };
            thread::sleep(left.min(POLL_SLICE));
        }
    }
}

/// One `read`, retried across timeouts until data, end of stream or the bound.
pub(crate) fn read_some(stream: &mut TcpStream, buf: &mut [u8], bound: Bound) -> io::Result<usize> {
    http_io::read_some(stream, buf, bound.io())
}

/// `read_exact` within the bound.
pub(crate) fn read_exact(stream: &mut TcpStream, buf: &mut [u8], bound: Bound) -> io::Result<()> {
    http_io::read_exact(stream, buf, bound.io())
}

/// `write_all` within the bound; a reader that stops reading cannot hold the
/// thread past it.
pub(crate) fn write_all(stream: &mut TcpStream, data: &[u8], bound: Bound) -> io::Result<()> {
    http_io::write_all(stream, data, bound.io())
}

/// Reads until the peer closes or the bound ends, throwing the bytes away.
pub(crate) fn drain_until_closed(stream: &mut TcpStream, bound: Bound) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = read_some(stream, &mut buf, bound) {
        if n == 0 {
            return;
        }
    }
}

/// A parsed request head plus whatever bytes arrived after it.
pub(crate) struct Head {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, String)>,
    pub rest: Vec<u8>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Reads and parses one request head. `Ok(None)` when the peer closed or sent
/// something that is not HTTP or is too large.
pub(crate) fn read_head(stream: &mut TcpStream, bound: Bound) -> io::Result<Option<Head>> {
    let limits = HeadLimits {
        max_head_bytes: MAX_HEAD_BYTES,
        max_headers: MAX_HEADERS,
    };
    let mut pending = Vec::with_capacity(1024);
    match http_io::read_request_head(stream, &mut pending, bound.io(), limits) {
        Ok(head) => Ok(Some(Head {
            method: head.method,
            target: head.target,
            version: match head.version {
                Version::Http10 => 0,
                Version::Http11 => 1,
            },
            headers: head.headers.0,
            rest: pending,
        })),
        Err(ReadError::Head(_) | ReadError::Closed { .. }) => Ok(None),
        Err(ReadError::Timeout) => Err(io::ErrorKind::TimedOut.into()),
        Err(ReadError::Io(error)) => Err(error),
        Err(ReadError::Body(error)) => Err(io::Error::other(error)),
    }
}

/// Writes a complete response with `Content-Length` and `Connection: close`.
pub(crate) fn write_response(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
    bound: Bound,
) -> io::Result<()> {
    let mut answer = Vec::new();
    let options = AnswerOptions {
        close: true,
        head_only: false,
    };
    http::encode_response(&mut answer, status, headers, body, options);
    write_all(stream, &answer, bound)?;
    stream.flush()
}

/// Writes a response head as given, with `Connection: close` added: the
/// caller frames the body (or sends none).
pub(crate) fn write_head(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    bound: Bound,
) -> io::Result<()> {
    let mut head = Vec::new();
    let mut headers = headers.to_vec();
    headers.push(("Connection", "close".to_owned()));
    http::encode_response_head(&mut head, Version::Http11, status, &headers);
    write_all(stream, &head, bound)
}

/// True for the only addresses the farm ever connects to.
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Resolves a host as a proxy request names it: an IP literal (IPv6 in
/// brackets or not) or `localhost`. Other names are refused: the farm never
/// resolves DNS.
pub(crate) fn parse_host(host: &str) -> Option<IpAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

/// Splits `host:port` (`[v6]:port` allowed) into an address.
pub(crate) fn parse_authority(authority: &str, default_port: u16) -> Option<SocketAddr> {
    let (host, port) = http::split_authority(authority, default_port)?;
    Some(SocketAddr::new(parse_host(host)?, port))
}

/// Splits an absolute URI `http://host[:port]/path?q` into the target address
/// and the origin-form `/path?q`.
pub(crate) fn parse_absolute_uri(uri: &str) -> Option<(SocketAddr, String)> {
    match Target::parse(uri)? {
        Target::Absolute {
            scheme,
            authority,
            path,
        } if scheme.eq_ignore_ascii_case("http") => Some((parse_authority(authority, 80)?, path)),
        _ => None,
    }
}

/// Connects to `target` from `source` (port chosen by the kernel), so that the
/// other end sees `source` as the peer. Refuses any target outside loopback.
pub(crate) fn connect_from(
    source: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    if !is_loopback(target.ip()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the farm only connects to loopback, not {target}"),
        ));
    }
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(SocketProtocol::TCP),
    )?;
    if source.is_ipv4() == target.is_ipv4() {
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    socket.connect_timeout(&target.into(), timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Copies bytes both ways until either side closes or the bound ends. One
/// extra thread carries the client-to-upstream direction.
pub(crate) fn relay(
    client: TcpStream,
    upstream: TcpStream,
    shared: Arc<Shared>,
    deadline: Instant,
) {
    let (Ok(client_reader), Ok(upstream_writer)) = (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let forward_shared = shared.clone();
    let spawned = thread::Builder::new()
        .name("farm-relay".to_owned())
        .stack_size(CONNECTION_STACK)
        .spawn(move || {
            let bound = Bound {
                deadline,
                stop: &forward_shared.stop,
            };
            copy(client_reader, upstream_writer, bound);
        });
    let bound = Bound {
        deadline,
        stop: &shared.stop,
    };
    if spawned.is_ok() {
        copy(upstream, client, bound);
    }
}

/// Copies one direction, then shuts both sockets so the other direction ends.
fn copy(mut from: TcpStream, mut to: TcpStream, bound: Bound) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = read_some(&mut from, &mut buf, bound) {
        if n == 0 || write_all(&mut to, &buf[..n], bound).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Standard base64 with padding, for `Proxy-Authorization: Basic`.
pub(crate) fn base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in cases {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn absolute_uris_split_into_target_and_path() {
        let (addr, path) = parse_absolute_uri("http://127.0.0.1:9900/get?a=1").unwrap();
        assert_eq!(addr, "127.0.0.1:9900".parse().unwrap());
        assert_eq!(path, "/get?a=1");
        let (addr, path) = parse_absolute_uri("HTTP://[::1]").unwrap();
        assert_eq!(addr, "[::1]:80".parse().unwrap());
        assert_eq!(path, "/");
        let (addr, path) = parse_absolute_uri("http://localhost:81?x").unwrap();
        assert_eq!(addr, "127.0.0.1:81".parse().unwrap());
        assert_eq!(path, "/?x");
        assert!(parse_absolute_uri("/get").is_none());
        assert!(parse_absolute_uri("http://example.com/get").is_none());
        assert!(parse_absolute_uri("http://127.0.0.1:99999/").is_none());
    }

    #[test]
    fn only_loopback_counts_as_loopback() {
        assert!(is_loopback("127.200.3.4".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1".parse().unwrap()));
        assert!(!is_loopback("0.0.0.0".parse().unwrap()));
    }

    #[test]
    fn connect_from_refuses_non_loopback_targets() {
        let error = connect_from(
            "127.0.0.1".parse().unwrap(),
            "192.0.2.1:80".parse().unwrap(),
            Duration::from_millis(10),
        )
        .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied);
    }
}
