//! The simulated proxies: what each [`Behaviour`] does with a connection.
//! Every upstream connection leaves from the proxy's own loopback address, so
//! the judge sees the proxy as the origin, and goes only to loopback.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::spec::{Behaviour, Credentials};
use crate::wire::{self, Bound, Head};
use crate::Shared;
use proxy_pool::http::{self, Version};
use proxy_pool::proxy::Protocol;

/// How long a proxy waits for its upstream connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The `Via` value the anonymous and transparent proxies add.
pub const VIA: &str = "1.1 farm-proxy";

/// One simulated proxy's fixed settings.
pub(crate) struct ProxyConfig {
    pub index: usize,
    /// The address its outgoing connections leave from (its own unless it
    /// is in an exit group).
    pub exit_ip: IpAddr,
    pub behaviour: Behaviour,
    pub protocol: Protocol,
    pub connect: bool,
    pub connect_443_only: bool,
    pub credentials: Option<Credentials>,
}

/// Serves one accepted connection; `nth` is how many connections this proxy
/// accepted before this one.
pub(crate) fn serve_connection(
    mut client: TcpStream,
    peer: SocketAddr,
    nth: u64,
    config: Arc<ProxyConfig>,
    shared: Arc<Shared>,
) {
    let deadline = Instant::now() + shared.spec.connection_limit;
    let bound = Bound {
        deadline,
        stop: &shared.stop,
    };
    let _ = client.set_nodelay(true);
    let result = match config.behaviour {
        Behaviour::BlackHole => {
            wire::drain_until_closed(&mut client, bound);
            Ok(())
        }
        Behaviour::Slow(ms) => {
            if !bound.sleep(Duration::from_millis(ms)) {
                return;
            }
            serve_working(client, peer, &config, &shared, deadline)
        }
        Behaviour::Flaky(fraction) if flaky_fails(nth, fraction) => {
            // Take the request, then hang up on it.
            let mut buf = [0u8; 1024];
            let _ = wire::read_some(&mut client, &mut buf, bound);
            Ok(())
        }
        Behaviour::Garbage => {
            let _ = wire::read_head(&mut client, bound);
            wire::write_all(
                &mut client,
                b"\x00\xff\xfeSSH-2.0-garbage \x1b[31m\x07\r\n\x00",
                bound,
            )
        }
        Behaviour::Hijack => {
            let _ = wire::read_head(&mut client, bound);
            let body = b"<!DOCTYPE html><html><head><title>Welcome</title></head>\
                <body><h1>Hotel WiFi</h1><p>Please log in to continue.</p></body></html>\n";
            let headers = [("Content-Type", "text/html".to_owned())];
            wire::write_response(&mut client, 200, &headers, body, bound)
        }
        Behaviour::Trickle => {
            let _ = wire::read_head(&mut client, bound);
            let answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"origin\":\"x\"}\n\n";
            for byte in answer.chunks(1) {
                if wire::write_all(&mut client, byte, bound).is_err()
                    || !bound.sleep(Duration::from_secs(1))
                {
                    break;
                }
            }
            Ok(())
        }
        Behaviour::EndlessBody => {
            let _ = wire::read_head(&mut client, bound);
            endless(
                &mut client,
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"origin\":\"",
                b"          ",
                bound,
            )
        }
        Behaviour::EndlessHeaders => {
            let _ = wire::read_head(&mut client, bound);
            endless(
                &mut client,
                b"HTTP/1.1 200 OK\r\n",
                b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
                bound,
            )
        }
        Behaviour::HugeHeader => {
            let _ = wire::read_head(&mut client, bound);
            huge_header(&mut client, bound)
        }
        Behaviour::MalformedStatus => {
            let _ = wire::read_head(&mut client, bound);
            wire::write_all(
                &mut client,
                b"HTTP/1.1 2OO Fine-ish\r\nContent-Length: 2\r\n\r\n{}",
                bound,
            )
        }
        Behaviour::InjectedJudge => {
            let head = wire::read_head(&mut client, bound).ok().flatten();
            injected_judge(&mut client, head.as_ref(), bound)
        }
        _ => serve_working(client, peer, &config, &shared, deadline),
    };
    if let Err(error) = result {
        log::debug!(
            "farm proxy {}: connection from {peer} ended: {error}",
            config.index
        );
    }
}

/// Whether connection `nth` of a proxy failing `fraction` of them fails:
/// spreads the failures evenly, the first connection always working.
pub(crate) fn flaky_fails(nth: u64, fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    let fraction = fraction.max(0.0);
    ((nth + 1) as f64 * fraction).floor() > (nth as f64 * fraction).floor()
}

/// A proxy doing its job in its protocol.
fn serve_working(
    client: TcpStream,
    peer: SocketAddr,
    config: &ProxyConfig,
    shared: &Arc<Shared>,
    deadline: Instant,
) -> std::io::Result<()> {
    match config.protocol {
        Protocol::Http | Protocol::Https => serve_http(client, peer, config, shared, deadline),
        Protocol::Socks4 => serve_socks4(client, config, shared, deadline),
        Protocol::Socks5 => serve_socks5(client, config, shared, deadline),
    }
}

fn serve_http(
    mut client: TcpStream,
    peer: SocketAddr,
    config: &ProxyConfig,
    shared: &Arc<Shared>,
    deadline: Instant,
) -> std::io::Result<()> {
    let bound = Bound {
        deadline,
        stop: &shared.stop,
    };
    let Some(head) = wire::read_head(&mut client, bound)? else {
        return Ok(());
    };
    let needs_auth = config.behaviour == Behaviour::AuthRequired || config.credentials.is_some();
    if needs_auth && !authorized(&head, config.credentials.as_ref()) {
        let headers = [("Proxy-Authenticate", "Basic realm=\"farm\"".to_owned())];
        let body = b"proxy authentication required\n";
        return wire::write_response(&mut client, 407, &headers, body, bound);
    }
    if head.method.eq_ignore_ascii_case("CONNECT") {
        if !config.connect {
            let body = b"CONNECT is not allowed here\n";
            return wire::write_response(&mut client, 405, &[], body, bound);
        }
        let Some(target) = wire::parse_authority(&head.target, 443) else {
            return wire::write_response(&mut client, 400, &[], b"bad CONNECT target\n", bound);
        };
        if config.connect_443_only && target.port() != 443 {
            let body = b"CONNECT to port 443 only\n";
            return wire::write_response(&mut client, 403, &[], body, bound);
        }
        if config.behaviour == Behaviour::TlsIntercept {
            wire::write_all(
                &mut client,
                b"HTTP/1.1 200 Connection established\r\n\r\n",
                bound,
            )?;
            serve_tls_echo(client, intercepting_tls(), config.exit_ip);
            return Ok(());
        }
        let upstream = match wire::connect_from(config.exit_ip, target, UPSTREAM_CONNECT_TIMEOUT) {
            Ok(upstream) => upstream,
            Err(_) => return wire::write_response(&mut client, 502, &[], b"", bound),
        };
        wire::write_all(
            &mut client,
            b"HTTP/1.1 200 Connection established\r\n\r\n",
            bound,
        )?;
        let mut upstream_writer = upstream.try_clone()?;
        if !head.rest.is_empty() {
            wire::write_all(&mut upstream_writer, &head.rest, bound)?;
        }
        wire::relay(client, upstream, Arc::clone(shared), deadline);
        return Ok(());
    }
    let Some((target, path)) = wire::parse_absolute_uri(&head.target) else {
        let body = b"this is a proxy: send an absolute URI\n";
        return wire::write_response(&mut client, 400, &[], body, bound);
    };
    let mut upstream = match wire::connect_from(config.exit_ip, target, UPSTREAM_CONNECT_TIMEOUT) {
        Ok(upstream) => upstream,
        Err(_) => return wire::write_response(&mut client, 502, &[], b"", bound),
    };
    let forwarded = forwarded_head(&head, &path, config.behaviour, peer.ip());
    wire::write_all(&mut upstream, forwarded.as_bytes(), bound)?;
    wire::write_all(&mut upstream, &head.rest, bound)?;
    wire::relay(client, upstream, Arc::clone(shared), deadline);
    Ok(())
}

/// The request as the proxy passes it on: origin-form target, its own
/// `Proxy-*` headers removed, and the headers its anonymity level adds.
pub(crate) fn forwarded_head(
    head: &Head,
    path: &str,
    behaviour: Behaviour,
    client_ip: IpAddr,
) -> String {
    let version = if head.version == 0 {
        Version::Http10
    } else {
        Version::Http11
    };
    let mut headers: Vec<(&str, String)> = head
        .headers
        .iter()
        .filter(|(name, _)| {
            !name.eq_ignore_ascii_case("proxy-connection")
                && !name.eq_ignore_ascii_case("proxy-authorization")
        })
        .map(|(name, value)| (name.as_str(), value.clone()))
        .collect();
    match behaviour {
        Behaviour::Anonymous => headers.push(("Via", VIA.to_owned())),
        Behaviour::Transparent => {
            headers.push(("Via", VIA.to_owned()));
            headers.push(("X-Forwarded-For", client_ip.to_string()));
        }
        Behaviour::XffUnknown => headers.push(("X-Forwarded-For", "unknown".to_owned())),
        _ => {}
    }
    let mut out = Vec::new();
    http::encode_request_head(&mut out, &head.method, path, version, &headers);
    String::from_utf8_lossy(&out).into_owned()
}

fn authorized(head: &Head, credentials: Option<&Credentials>) -> bool {
    let Some(credentials) = credentials else {
        return false;
    };
    let expected =
        wire::base64(format!("{}:{}", credentials.username, credentials.password).as_bytes());
    head.header("proxy-authorization")
        .and_then(|value| value.trim().split_once(' '))
        .is_some_and(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("basic") && token.trim() == expected
        })
}

/// SOCKS4 and 4a CONNECT. With credentials the user id must be the username.
fn serve_socks4(
    mut client: TcpStream,
    config: &ProxyConfig,
    shared: &Arc<Shared>,
    deadline: Instant,
) -> std::io::Result<()> {
    let bound = Bound {
        deadline,
        stop: &shared.stop,
    };
    let mut request = [0u8; 8];
    wire::read_exact(&mut client, &mut request, bound)?;
    let user_id = read_nul_terminated(&mut client, bound)?;
    let port = u16::from_be_bytes([request[2], request[3]]);
    let ip = IpAddr::from([request[4], request[5], request[6], request[7]]);
    // 0.0.0.x with x != 0 announces a SOCKS4a host name after the user id.
    let ip = if request[4..7] == [0, 0, 0] && request[7] != 0 {
        let host = read_nul_terminated(&mut client, bound)?;
        wire::parse_host(&String::from_utf8_lossy(&host))
    } else {
        Some(ip)
    };
    let reply = |status: u8| [0u8, status, 0, 0, 0, 0, 0, 0];
    if request[0] != 4 || request[1] != 1 {
        return wire::write_all(&mut client, &reply(91), bound);
    }
    if let Some(credentials) = &config.credentials {
        if user_id != credentials.username.as_bytes() {
            return wire::write_all(&mut client, &reply(93), bound);
        }
    }
    let Some(ip) = ip else {
        return wire::write_all(&mut client, &reply(91), bound);
    };
    let upstream = match wire::connect_from(
        config.exit_ip,
        SocketAddr::new(ip, port),
        UPSTREAM_CONNECT_TIMEOUT,
    ) {
        Ok(upstream) => upstream,
        Err(_) => return wire::write_all(&mut client, &reply(91), bound),
    };
    wire::write_all(&mut client, &reply(90), bound)?;
    wire::relay(client, upstream, Arc::clone(shared), deadline);
    Ok(())
}

fn read_nul_terminated(stream: &mut TcpStream, bound: Bound) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        wire::read_exact(stream, &mut byte, bound)?;
        if byte[0] == 0 {
            return Ok(out);
        }
        if out.len() >= 255 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "socks4 field too long",
            ));
        }
        out.push(byte[0]);
    }
}

/// SOCKS5 CONNECT (RFC 1928) with username/password authentication (RFC 1929)
/// when the proxy has credentials.
fn serve_socks5(
    mut client: TcpStream,
    config: &ProxyConfig,
    shared: &Arc<Shared>,
    deadline: Instant,
) -> std::io::Result<()> {
    let bound = Bound {
        deadline,
        stop: &shared.stop,
    };
    let mut greeting = [0u8; 2];
    wire::read_exact(&mut client, &mut greeting, bound)?;
    if greeting[0] != 5 {
        return Ok(());
    }
    let mut methods = vec![0u8; usize::from(greeting[1])];
    wire::read_exact(&mut client, &mut methods, bound)?;
    let wanted = if config.credentials.is_some() { 2 } else { 0 };
    if !methods.contains(&wanted) {
        return wire::write_all(&mut client, &[5, 0xff], bound);
    }
    wire::write_all(&mut client, &[5, wanted], bound)?;
    if let Some(credentials) = &config.credentials {
        let mut version_and_length = [0u8; 2];
        wire::read_exact(&mut client, &mut version_and_length, bound)?;
        let mut username = vec![0u8; usize::from(version_and_length[1])];
        wire::read_exact(&mut client, &mut username, bound)?;
        let mut length = [0u8; 1];
        wire::read_exact(&mut client, &mut length, bound)?;
        let mut password = vec![0u8; usize::from(length[0])];
        wire::read_exact(&mut client, &mut password, bound)?;
        let ok = version_and_length[0] == 1
            && username == credentials.username.as_bytes()
            && password == credentials.password.as_bytes();
        wire::write_all(&mut client, &[1, if ok { 0 } else { 1 }], bound)?;
        if !ok {
            return Ok(());
        }
    }
    let mut request = [0u8; 4];
    wire::read_exact(&mut client, &mut request, bound)?;
    let ip = match request[3] {
        1 => {
            let mut octets = [0u8; 4];
            wire::read_exact(&mut client, &mut octets, bound)?;
            Some(IpAddr::from(octets))
        }
        4 => {
            let mut octets = [0u8; 16];
            wire::read_exact(&mut client, &mut octets, bound)?;
            Some(IpAddr::from(octets))
        }
        3 => {
            let mut length = [0u8; 1];
            wire::read_exact(&mut client, &mut length, bound)?;
            let mut host = vec![0u8; usize::from(length[0])];
            wire::read_exact(&mut client, &mut host, bound)?;
            wire::parse_host(&String::from_utf8_lossy(&host))
        }
        _ => return wire::write_all(&mut client, &socks5_reply(8), bound),
    };
    let mut port = [0u8; 2];
    wire::read_exact(&mut client, &mut port, bound)?;
    if request[0] != 5 || request[1] != 1 {
        return wire::write_all(&mut client, &socks5_reply(7), bound);
    }
    let Some(ip) = ip.filter(|ip| wire::is_loopback(*ip)) else {
        // "Connection not allowed by ruleset": the farm only reaches loopback.
        return wire::write_all(&mut client, &socks5_reply(2), bound);
    };
    let target = SocketAddr::new(ip, u16::from_be_bytes(port));
    let upstream = match wire::connect_from(config.exit_ip, target, UPSTREAM_CONNECT_TIMEOUT) {
        Ok(upstream) => upstream,
        Err(_) => return wire::write_all(&mut client, &socks5_reply(5), bound),
    };
    wire::write_all(&mut client, &socks5_reply(0), bound)?;
    wire::relay(client, upstream, Arc::clone(shared), deadline);
    Ok(())
}

fn socks5_reply(status: u8) -> [u8; 10] {
    [5, status, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Writes `start`, then `filler` forever (until the client leaves or the
/// connection's bound).
fn endless(
    client: &mut TcpStream,
    start: &[u8],
    filler: &[u8],
    bound: Bound,
) -> std::io::Result<()> {
    wire::write_all(client, start, bound)?;
    let chunk = filler.repeat((16 * 1024 / filler.len().max(1)).max(1));
    loop {
        wire::write_all(client, &chunk, bound)?;
    }
}

fn huge_header(client: &mut TcpStream, bound: Bound) -> std::io::Result<()> {
    wire::write_all(client, b"HTTP/1.1 200 OK\r\nX-Huge: ", bound)?;
    let chunk = vec![b'h'; 64 * 1024];
    let mut left: usize = 10 * 1024 * 1024;
    while left > 0 {
        let n = left.min(chunk.len());
        wire::write_all(client, &chunk[..n], bound)?;
        left -= n;
    }
    wire::write_all(
        client,
        b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        bound,
    )
}

/// The test https judge's certificate, key and CA (throwaway, for loopback
/// tests only): valid for 127.0.0.1, `localhost` and 127.44.0.1-64.
const JUDGE_CERT: &[u8] = include_bytes!("../../../src/validator/testdata/judge.pem");
const JUDGE_KEY: &[u8] = include_bytes!("../../../src/validator/testdata/judge.key");
/// A certificate for 127.0.0.1 that no root vouches for: what a proxy reading
/// its clients' TLS presents.
const INTERCEPT_CERT: &[u8] = include_bytes!("../../../src/validator/testdata/intercept.pem");
const INTERCEPT_KEY: &[u8] = include_bytes!("../../../src/validator/testdata/intercept.key");

/// The CA file a validator needs (`https_ca_file`) to trust [`start_tls_judge`].
pub fn tls_judge_ca_file() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../src/validator/testdata/ca.pem")
}

fn server_tls(cert_pem: &[u8], key_pem: &[u8]) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .expect("the farm's test certificate");
    let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem).expect("the farm's test key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(certs, PrivateKeyDer::Pkcs8(key))
        })
        .expect("the farm's TLS configuration");
    Arc::new(config)
}

fn judge_tls() -> Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| server_tls(JUDGE_CERT, JUDGE_KEY))
        .clone()
}

fn intercepting_tls() -> Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| server_tls(INTERCEPT_CERT, INTERCEPT_KEY))
        .clone()
}

/// Starts an https judge (the judge's echo over TLS, certificate signed by
/// [`tls_judge_ca_file`]) on `address` (port 443 on a 127.44.0.x address
/// as root: the port stock proxies tunnel to). Its threads live as long as
/// the process. Returns the address it listens on.
pub fn start_tls_judge(address: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    thread::Builder::new()
        .name("farm-tls-judge".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let Ok(peer) = stream.peer_addr() else {
                    continue;
                };
                let _ = thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || serve_tls_echo(stream, judge_tls(), peer.ip()));
            }
        })?;
    Ok(bound)
}

/// Answers one request on `stream` over TLS with `tls`'s certificate: the
/// judge's echo, with `origin` as the origin.
fn serve_tls_echo(stream: TcpStream, tls: Arc<rustls::ServerConfig>, origin: IpAddr) {
    if let Err(error) = crate::tls::serve_judge_tls(stream, SocketAddr::new(origin, 0), tls) {
        log::debug!("farm tls judge: {error}");
    }
}

/// A fake origin in a documentation range (RFC 5737): never a real host.
pub const INJECTED_ORIGIN: &str = "203.0.113.66";

fn injected_judge(
    client: &mut TcpStream,
    head: Option<&Head>,
    bound: Bound,
) -> std::io::Result<()> {
    let host = head.and_then(|h| h.header("host")).unwrap_or("127.0.0.1");
    let body = serde_json::json!({
        "args": {},
        "headers": {
            "Host": host,
            "X-Injected": "<script>alert(1)</script>",
        },
        "origin": INJECTED_ORIGIN,
        "url": format!("http://{host}/get"),
        "injected": {"admin": true, "score": 1_000_000},
    });
    let body = serde_json::to_string_pretty(&body).unwrap_or_default();
    let headers = [("Content-Type", "application/json".to_owned())];
    wire::write_response(client, 200, &headers, body.as_bytes(), bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flaky_fails_its_share_evenly_and_never_first() {
        let fails: Vec<bool> = (0..6).map(|n| flaky_fails(n, 0.5)).collect();
        assert_eq!(fails, [false, true, false, true, false, true]);
        assert!(!flaky_fails(0, 0.9));
        assert_eq!((0..100).filter(|n| flaky_fails(*n, 0.25)).count(), 25);
        assert!((0..10).all(|n| flaky_fails(n, 1.0)));
        assert!((0..10).all(|n| !flaky_fails(n, 0.0)));
    }

    fn head(headers: &[(&str, &str)]) -> Head {
        Head {
            method: "GET".into(),
            target: "http://127.0.0.1:1/get".into(),
            version: 1,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            rest: Vec::new(),
        }
    }

    #[test]
    fn forwarding_strips_proxy_headers_and_adds_by_anonymity() {
        let request = head(&[
            ("Host", "127.0.0.1:1"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic eA=="),
        ]);
        let client: IpAddr = "127.0.0.1".parse().unwrap();
        let elite = forwarded_head(&request, "/get", Behaviour::Elite, client);
        assert_eq!(elite, "GET /get HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n");
        let anonymous = forwarded_head(&request, "/get", Behaviour::Anonymous, client);
        assert!(anonymous.contains("Via: 1.1 farm-proxy\r\n"));
        assert!(!anonymous.contains("X-Forwarded-For"));
        let transparent = forwarded_head(&request, "/get", Behaviour::Transparent, client);
        assert!(transparent.contains("X-Forwarded-For: 127.0.0.1\r\n"));
    }

    #[test]
    fn basic_auth_must_match_exactly() {
        let creds = Credentials::new("user", "pass");
        let good = head(&[("Proxy-Authorization", "Basic dXNlcjpwYXNz")]);
        let bad = head(&[("Proxy-Authorization", "Basic dXNlcjpwYXN4")]);
        assert!(authorized(&good, Some(&creds)));
        assert!(!authorized(&bad, Some(&creds)));
        assert!(!authorized(&head(&[]), Some(&creds)));
        assert!(!authorized(&good, None));
    }
}
