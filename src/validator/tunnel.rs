//! Tunnels through a proxy for the requests ureq makes: the TCP connect to
//! the proxy within `connect_timeout`, then the proxy's handshake (CONNECT for
//! http and https proxies, SOCKS4 or SOCKS5) within what is left of the
//! request's own budget, then TLS when the target is `https://`.
//!
//! ureq's own proxy connectors count the proxy's handshake (and TLS) against
//! its connect timeout, and a slow but working SOCKS proxy would look dead;
//! they also give no step-by-step reasons. So the handshake is done here, as
//! a [`Connector`] in ureq's chain, and ureq does the HTTP and the TLS (with
//! its certificate verification) over the tunnel.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::time::Duration as UreqDuration;
use ureq::unversioned::transport::{
    ConnectionDetails, Connector, NextTimeout, RustlsConnector, TcpConnector, Transport,
    TransportAdapter,
};
use ureq::Timeout;

use crate::proxy::{Protocol, ProxyKey};

/// Cap on a CONNECT answer's head.
const MAX_CONNECT_HEAD: usize = 8 * 1024;

/// Where the tunnel leads: the judge's host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelTarget {
    Ip(SocketAddr),
    /// A host name, resolved by the proxy (SOCKS4 cannot: see [`open`]).
    Name(String, u16),
}

impl TunnelTarget {
    /// `host:port` for a CONNECT line, IPv6 in brackets.
    fn authority(&self) -> String {
        match self {
            TunnelTarget::Ip(address) => address.to_string(),
            TunnelTarget::Name(host, port) => format!("{host}:{port}"),
        }
    }
}

/// Why a tunnel could not be opened, by step. Carried through ureq as
/// `ureq::Error::Other` and read back with [`TunnelFailure::from_ureq`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelFailure {
    /// The proxy answered CONNECT with this status (407: credentials).
    ConnectRefused(u16),
    /// The proxy's CONNECT answer is not HTTP.
    ConnectGarbage,
    /// The SOCKS proxy refused, or does not speak SOCKS; the text says how.
    Socks(String),
    /// The proxy's reply did not come within the request's budget.
    HandshakeTimeout,
    /// The proxy closed or reset the connection during the handshake.
    Reset,
    /// The tunnel cannot be asked for (a SOCKS4 target without IPv4).
    Unsupported(&'static str),
}

impl fmt::Display for TunnelFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelFailure::ConnectRefused(status) => write!(f, "CONNECT answered {status}"),
            TunnelFailure::ConnectGarbage => f.write_str("CONNECT answer is not http"),
            TunnelFailure::Socks(detail) => write!(f, "socks: {detail}"),
            TunnelFailure::HandshakeTimeout => f.write_str("no handshake reply in time"),
            TunnelFailure::Reset => f.write_str("closed during the handshake"),
            TunnelFailure::Unsupported(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for TunnelFailure {}

impl TunnelFailure {
    /// The failure behind a ureq error, when the tunnel was what failed.
    pub fn from_ureq(error: &ureq::Error) -> Option<&TunnelFailure> {
        match error {
            ureq::Error::Other(inner) => inner.downcast_ref::<TunnelFailure>(),
            _ => None,
        }
    }

    fn from_io(error: io::Error, socks: bool) -> TunnelFailure {
        // ureq's transport reports its timeouts as a ureq error inside.
        let inner = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<ureq::Error>());
        if let Some(ureq::Error::Timeout(_)) = inner {
            return TunnelFailure::HandshakeTimeout;
        }
        match error.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => TunnelFailure::HandshakeTimeout,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => TunnelFailure::Reset,
            _ if socks => TunnelFailure::Socks(error.kind().to_string()),
            _ => TunnelFailure::ConnectGarbage,
        }
    }
}

/// What the connector opens: a tunnel through `proxy` to `target`.
pub struct Tunnel {
    pub proxy: ProxyKey,
    pub target: TunnelTarget,
    pub connect_timeout: std::time::Duration,
    /// The request's deadline: the handshake and TLS must end before it.
    pub deadline: Instant,
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password.
        f.debug_struct("Tunnel")
            .field("proxy", &self.proxy.redacted())
            .field("target", &self.target)
            .finish()
    }
}

/// A ureq agent whose every request goes through `tunnel`; `tls` verifies
/// `https://` targets (none needed for plain http).
pub fn agent(tunnel: Tunnel, config: ureq::config::Config) -> ureq::Agent {
    let proxy = SocketAddr::new(tunnel.proxy.ip, tunnel.proxy.port);
    let connector = TunnelConnector {
        tunnel,
        tls: RustlsConnector::default(),
    };
    ureq::Agent::with_parts(config, connector, ProxyAddress(proxy))
}

/// Resolves every host to the proxy: the target is the proxy's to reach
/// (and a host name is never looked up here).
#[derive(Debug)]
struct ProxyAddress(SocketAddr);

impl Resolver for ProxyAddress {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let mut addresses = self.empty();
        addresses.truncate(0);
        addresses.push(self.0);
        Ok(addresses)
    }
}

#[derive(Debug)]
struct TunnelConnector {
    tunnel: Tunnel,
    tls: RustlsConnector,
}

impl Connector<()> for TunnelConnector {
    type Out = Box<dyn Transport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let tunnel = &self.tunnel;
        let left = tunnel.deadline.saturating_duration_since(Instant::now());
        let connect_details =
            with_timeout(details, tunnel.connect_timeout.min(left), Timeout::Connect);
        let Some(tcp) = Connector::<()>::connect(&TcpConnector::default(), &connect_details, None)?
        else {
            return Err(ureq::Error::ConnectionFailed);
        };
        let mut stream = TransportAdapter::new(tcp, details.current_time.clone());
        stream.set_timeout(budget(tunnel.deadline, Timeout::Global));
        handshake(&mut stream, tunnel).map_err(|failure| ureq::Error::Other(Box::new(failure)))?;
        let tcp = stream.into_inner();
        // TLS gets the rest of the request's budget too, not the connect's.
        let tls_details = with_timeout(
            details,
            tunnel.deadline.saturating_duration_since(Instant::now()),
            Timeout::Global,
        );
        let transport = self.tls.connect(&tls_details, Some(tcp))?;
        Ok(transport.map(|transport| Box::new(transport) as Box<dyn Transport>))
    }
}

fn budget(deadline: Instant, reason: Timeout) -> NextTimeout {
    NextTimeout {
        after: UreqDuration::Exact(deadline.saturating_duration_since(Instant::now())),
        reason,
        per_read: None,
        per_write: None,
    }
}

/// `details` with another timeout for the next step.
fn with_timeout<'a>(
    details: &ConnectionDetails<'a>,
    timeout: std::time::Duration,
    reason: Timeout,
) -> ConnectionDetails<'a> {
    ConnectionDetails {
        uri: details.uri,
        addrs: details.addrs.clone(),
        config: details.config,
        request_level: details.request_level,
        resolver: details.resolver,
        // The next step's budget runs from now (ureq measures a
        // connector's timeout from `now`).
        now: (details.current_time)(),
        timeout: NextTimeout {
            after: UreqDuration::Exact(timeout),
            reason,
            per_read: None,
            per_write: None,
        },
        current_time: details.current_time.clone(),
        run_connector: details.run_connector.clone(),
        register_shutdown: details.register_shutdown.clone(),
    }
}

/// The proxy's handshake on an open connection, by its protocol.
fn handshake<S: Read + Write>(stream: &mut S, tunnel: &Tunnel) -> Result<(), TunnelFailure> {
    let proxy = &tunnel.proxy;
    match proxy.protocol {
        Protocol::Http | Protocol::Https => connect_handshake(stream, proxy, &tunnel.target),
        Protocol::Socks4 => socks4_handshake(stream, proxy, &tunnel.target),
        Protocol::Socks5 => socks5_handshake(stream, proxy, &tunnel.target),
    }
}

fn connect_handshake<S: Read + Write>(
    stream: &mut S,
    proxy: &ProxyKey,
    target: &TunnelTarget,
) -> Result<(), TunnelFailure> {
    let authority = target.authority();
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(user) = &proxy.username {
        let credentials = format!("{user}:{}", proxy.password.as_deref().unwrap_or(""));
        request.push_str("Proxy-Authorization: Basic ");
        request.push_str(&base64(credentials.as_bytes()));
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let io = |error| TunnelFailure::from_io(error, false);
    stream.write_all(request.as_bytes()).map_err(io)?;
    // Byte by byte up to the blank line: whatever follows belongs to the
    // tunnel (TLS), not to this answer.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= MAX_CONNECT_HEAD {
            return Err(TunnelFailure::ConnectGarbage);
        }
        if stream.read(&mut byte).map_err(io)? == 0 {
            return Err(TunnelFailure::Reset);
        }
        head.push(byte[0]);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(TunnelFailure::ConnectGarbage),
    }
    match response.code {
        Some(200..=299) => Ok(()),
        Some(status) => Err(TunnelFailure::ConnectRefused(status)),
        None => Err(TunnelFailure::ConnectGarbage),
    }
}

fn socks4_handshake<S: Read + Write>(
    stream: &mut S,
    proxy: &ProxyKey,
    target: &TunnelTarget,
) -> Result<(), TunnelFailure> {
    let TunnelTarget::Ip(SocketAddr::V4(target)) = target else {
        return Err(TunnelFailure::Unsupported(
            "socks4 reaches IPv4 addresses only",
        ));
    };
    let user_id = proxy.username.as_deref().unwrap_or("");
    if user_id.contains('\0') {
        return Err(TunnelFailure::Unsupported("socks4 user id with a NUL byte"));
    }
    // VN CD DSTPORT DSTIP USERID NUL.
    let mut request = Vec::with_capacity(9 + user_id.len());
    request.extend_from_slice(&[4, 1]);
    request.extend_from_slice(&target.port().to_be_bytes());
    request.extend_from_slice(&target.ip().octets());
    request.extend_from_slice(user_id.as_bytes());
    request.push(0);
    let io = |error| TunnelFailure::from_io(error, true);
    stream.write_all(&request).map_err(io)?;
    // VN CD and six unused bytes.
    let mut reply = [0u8; 8];
    stream.read_exact(&mut reply).map_err(io)?;
    match (reply[0], reply[1]) {
        (0, 90) => Ok(()),
        (0, code) => Err(TunnelFailure::Socks(format!("request rejected ({code})"))),
        _ => Err(TunnelFailure::Socks("not a socks4 reply".into())),
    }
}

fn socks5_handshake<S: Read + Write>(
    stream: &mut S,
    proxy: &ProxyKey,
    target: &TunnelTarget,
) -> Result<(), TunnelFailure> {
    let io = |error| TunnelFailure::from_io(error, true);
    let greeting: &[u8] = if proxy.username.is_some() {
        &[5, 2, 0, 2]
    } else {
        &[5, 1, 0]
    };
    stream.write_all(greeting).map_err(io)?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).map_err(io)?;
    if choice[0] != 5 {
        return Err(TunnelFailure::Socks("not a socks5 reply".into()));
    }
    match (choice[1], &proxy.username) {
        (0, _) => {}
        (2, Some(user)) => {
            let password = proxy.password.as_deref().unwrap_or("");
            let (Ok(user_len), Ok(password_len)) =
                (u8::try_from(user.len()), u8::try_from(password.len()))
            else {
                return Err(TunnelFailure::Unsupported(
                    "socks5 credentials over 255 bytes",
                ));
            };
            // RFC 1929: VER ULEN UNAME PLEN PASSWD.
            let mut auth = Vec::with_capacity(3 + user.len() + password.len());
            auth.extend_from_slice(&[1, user_len]);
            auth.extend_from_slice(user.as_bytes());
            auth.push(password_len);
            auth.extend_from_slice(password.as_bytes());
            stream.write_all(&auth).map_err(io)?;
            let mut status = [0u8; 2];
            stream.read_exact(&mut status).map_err(io)?;
            if status[1] != 0 {
                return Err(TunnelFailure::Socks("credentials refused".into()));
            }
        }
        (0xff, _) => return Err(TunnelFailure::Socks("no acceptable auth method".into())),
        (method, _) => {
            return Err(TunnelFailure::Socks(format!(
                "unexpected auth method {method}"
            )))
        }
    }
    // VER CMD RSV ATYP DST.ADDR DST.PORT.
    let mut request = vec![5, 1, 0];
    let port = match target {
        TunnelTarget::Ip(address) => {
            match address.ip() {
                IpAddr::V4(v4) => {
                    request.push(1);
                    request.extend_from_slice(&v4.octets());
                }
                IpAddr::V6(v6) => {
                    request.push(4);
                    request.extend_from_slice(&v6.octets());
                }
            }
            address.port()
        }
        TunnelTarget::Name(host, port) => {
            let Ok(length) = u8::try_from(host.len()) else {
                return Err(TunnelFailure::Unsupported("host name over 255 bytes"));
            };
            request.extend_from_slice(&[3, length]);
            request.extend_from_slice(host.as_bytes());
            *port
        }
    };
    request.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&request).map_err(io)?;
    // VER REP RSV ATYP, then the bound address, whose length ATYP gives.
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).map_err(io)?;
    if reply[0] != 5 {
        return Err(TunnelFailure::Socks("not a socks5 reply".into()));
    }
    if reply[1] != 0 {
        return Err(TunnelFailure::Socks(format!(
            "connect refused ({})",
            reply[1]
        )));
    }
    let address_len = match reply[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut length = [0u8; 1];
            stream.read_exact(&mut length).map_err(io)?;
            usize::from(length[0])
        }
        _ => return Err(TunnelFailure::Socks("bad address type in reply".into())),
    };
    let mut bound = vec![0u8; address_len + 2];
    stream.read_exact(&mut bound).map_err(io)?;
    Ok(())
}

/// Standard base64 with padding, for `Proxy-Authorization`.
pub(crate) fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for group in input.chunks(3) {
        let bytes = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let bits = u32::from(bytes[0]) << 16 | u32::from(bytes[1]) << 8 | u32::from(bytes[2]);
        for index in 0..4 {
            if index <= group.len() {
                out.push(ALPHABET[(bits >> (18 - 6 * index) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    /// A scripted peer: reads go to `reply`, writes are collected.
    struct Scripted {
        reply: Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Scripted {
        fn new(reply: &[u8]) -> Scripted {
            Scripted {
                reply: Cursor::new(reply.to_vec()),
                written: Vec::new(),
            }
        }
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reply.read(buf)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn proxy(protocol: Protocol, user: Option<(&str, &str)>) -> ProxyKey {
        let mut key = ProxyKey::new(protocol, "127.0.0.1".parse().unwrap(), 3128);
        if let Some((name, password)) = user {
            key.username = Some(name.into());
            key.password = Some(password.into());
        }
        key
    }

    fn target() -> TunnelTarget {
        TunnelTarget::Ip("127.0.0.9:443".parse().unwrap())
    }

    #[test]
    fn connect_sends_credentials_and_takes_2xx_only() {
        let mut peer = Scripted::new(b"HTTP/1.1 200 Connection established\r\n\r\nTLS");
        let key = proxy(Protocol::Http, Some(("user", "pass")));
        connect_handshake(&mut peer, &key, &target()).unwrap();
        let sent = String::from_utf8(peer.written).unwrap();
        assert!(
            sent.starts_with("CONNECT 127.0.0.9:443 HTTP/1.1\r\n"),
            "{sent}"
        );
        assert!(sent.contains("Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"));
        // What follows the head is left for TLS.
        let mut rest = String::new();
        peer.reply.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "TLS");
        for (answer, expected) in [
            (
                &b"HTTP/1.1 403 Forbidden\r\n\r\n"[..],
                TunnelFailure::ConnectRefused(403),
            ),
            (
                b"HTTP/1.0 407 Auth\r\n\r\n",
                TunnelFailure::ConnectRefused(407),
            ),
            (b"SSH-2.0-x\r\n\r\n", TunnelFailure::ConnectGarbage),
            (b"HTTP/1.1 200 OK\r\n", TunnelFailure::Reset),
        ] {
            let mut peer = Scripted::new(answer);
            let failure = connect_handshake(&mut peer, &proxy(Protocol::Http, None), &target());
            assert_eq!(failure, Err(expected));
        }
    }

    #[test]
    fn socks5_authenticates_and_reads_the_whole_reply() {
        // Method 2, auth ok, then a reply with a domain-name bound address.
        let mut reply = vec![5, 2, 1, 0, 5, 0, 0, 3, 4];
        reply.extend_from_slice(b"host");
        reply.extend_from_slice(&[0, 80]);
        reply.extend_from_slice(b"DATA");
        let mut peer = Scripted::new(&reply);
        let key = proxy(Protocol::Socks5, Some(("u", "pw")));
        let name = TunnelTarget::Name("judge.example".into(), 443);
        socks5_handshake(&mut peer, &key, &name).unwrap();
        let mut expected = vec![5, 2, 0, 2, 1, 1, b'u', 2, b'p', b'w', 5, 1, 0, 3, 13];
        expected.extend_from_slice(b"judge.example");
        expected.extend_from_slice(&[1, 187]);
        assert_eq!(peer.written, expected);
        let mut rest = Vec::new();
        peer.reply.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"DATA");
    }

    #[test]
    fn socks_failures_name_the_handshake() {
        let key = proxy(Protocol::Socks5, None);
        let refused = socks5_handshake(
            &mut Scripted::new(&[5, 0, 5, 5, 0, 1, 0, 0, 0, 0, 0, 0]),
            &key,
            &target(),
        );
        assert!(
            matches!(refused, Err(TunnelFailure::Socks(_))),
            "{refused:?}"
        );
        // An HTTP server answering the greeting.
        let http = socks5_handshake(&mut Scripted::new(b"HTTP/1.1 400"), &key, &target());
        assert!(matches!(http, Err(TunnelFailure::Socks(_))), "{http:?}");
        let closed = socks5_handshake(&mut Scripted::new(&[5]), &key, &target());
        assert_eq!(closed, Err(TunnelFailure::Reset));
        let socks4 = proxy(Protocol::Socks4, None);
        let rejected = socks4_handshake(
            &mut Scripted::new(&[0, 91, 0, 0, 0, 0, 0, 0]),
            &socks4,
            &target(),
        );
        assert!(matches!(rejected, Err(TunnelFailure::Socks(_))));
        let name = TunnelTarget::Name("judge.example".into(), 443);
        assert!(matches!(
            socks4_handshake(&mut Scripted::new(&[]), &socks4, &name),
            Err(TunnelFailure::Unsupported(_))
        ));
    }

    #[test]
    fn timeouts_in_the_handshake_are_handshake_timeouts() {
        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(
            TunnelFailure::from_io(timed_out, true),
            TunnelFailure::HandshakeTimeout
        );
        let from_ureq = ureq::Error::Timeout(Timeout::Global).into_io();
        assert_eq!(
            TunnelFailure::from_io(from_ureq, false),
            TunnelFailure::HandshakeTimeout
        );
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    }
}
