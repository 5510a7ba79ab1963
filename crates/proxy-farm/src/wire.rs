//! The small pieces of socket and HTTP/1.1 plumbing that the farm's judge,
//! list server and simulated proxies share: reading a request head with a size
//! cap, bounded reads and writes that notice the farm stopping, connecting out
//! from a chosen loopback address, and relaying bytes between two sockets.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol as SocketProtocol, Socket, Type};

use crate::Shared;

/// The most a request head may take before the connection is dropped.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How long a blocking call waits before looking at the stop flag again.
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

impl Bound<'_> {
    pub fn expired(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }

    fn slice(&self) -> Option<Duration> {
        let left = self.deadline.checked_duration_since(Instant::now())?;
        Some(left.min(POLL_SLICE).max(Duration::from_millis(1)))
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

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn expired_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection bound reached")
}

/// One `read`, retried across timeouts until data, end of stream or the bound.
pub(crate) fn read_some(stream: &mut TcpStream, buf: &mut [u8], bound: Bound) -> io::Result<usize> {
    loop {
        let Some(slice) = bound.slice() else {
            return Err(expired_error());
        };
        if bound.stop.load(Ordering::Relaxed) {
            return Err(expired_error());
        }
        stream.set_read_timeout(Some(slice))?;
        match stream.read(buf) {
            Ok(n) => return Ok(n),
            Err(error) if is_timeout(&error) => continue,
            Err(error) => return Err(error),
        }
    }
}

/// `read_exact` within the bound.
pub(crate) fn read_exact(stream: &mut TcpStream, buf: &mut [u8], bound: Bound) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = read_some(stream, &mut buf[filled..], bound)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(())
}

/// `write_all` within the bound; a reader that stops reading cannot hold the
/// thread past it.
pub(crate) fn write_all(stream: &mut TcpStream, mut data: &[u8], bound: Bound) -> io::Result<()> {
    while !data.is_empty() {
        let Some(slice) = bound.slice() else {
            return Err(expired_error());
        };
        if bound.stop.load(Ordering::Relaxed) {
            return Err(expired_error());
        }
        stream.set_write_timeout(Some(slice))?;
        match stream.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(error) if is_timeout(&error) => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(())
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
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = read_some(stream, &mut chunk, bound)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut header_slots = [httparse::EMPTY_HEADER; 96];
        let mut request = httparse::Request::new(&mut header_slots);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let head = Head {
                    method: request.method.unwrap_or("").to_owned(),
                    target: request.path.unwrap_or("").to_owned(),
                    version: request.version.unwrap_or(1),
                    headers: request
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                    rest: buf[head_len..].to_vec(),
                };
                return Ok(Some(head));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => continue,
            _ => return Ok(None),
        }
    }
}

/// Writes a complete response with `Content-Length` and `Connection: close`.
pub(crate) fn write_response(
    stream: &mut TcpStream,
    status: u16,
    reason: &str,
    headers: &[(&str, String)],
    body: &[u8],
    bound: Bound,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    write_all(stream, head.as_bytes(), bound)?;
    write_all(stream, body, bound)?;
    stream.flush()
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
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => {
            (host, port.parse().ok()?)
        }
        _ => (authority, default_port),
    };
    Some(SocketAddr::new(parse_host(host)?, port))
}

/// Splits an absolute URI `http://host[:port]/path?q` into the target address
/// and the origin-form `/path?q`.
pub(crate) fn parse_absolute_uri(uri: &str) -> Option<(SocketAddr, String)> {
    let lower = uri.get(..7)?.to_ascii_lowercase();
    if lower != "http://" {
        return None;
    }
    let rest = &uri[7..];
    let (authority, path) = match rest.find(['/', '?']) {
        Some(at) => (&rest[..at], rest[at..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path
    };
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    Some((parse_authority(authority, 80)?, path))
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
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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
