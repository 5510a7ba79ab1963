//! TLS for tests: a throwaway certificate authority, certificates for
//! loopback addresses signed by it, and the judge served over https with one
//! of them, the `https_target` that tests name with the CA's PEM as
//! `https_ca_file`. An interceptor's certificate, for loopback too but signed
//! by an authority nobody trusts, is what a TLS-intercepting proxy shows its
//! clients.
//!
//! Threads, no async: one listener thread and one thread per connection, as
//! in the rest of the farm. Every connection ends when its client leaves,
//! after [`CONNECTION_LIMIT`] of silence, or when the judge is dropped.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::wire;
use proxy_pool::judge;

/// How long a TLS connection may stay silent (handshake or request) before
/// it is dropped.
pub const CONNECTION_LIMIT: Duration = Duration::from_secs(10);

/// A certificate authority made for one test run. Its PEM is what a client
/// adds to its roots (`https_ca_file`); nothing outside the test trusts it.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A fresh CA with a new key, named `name` (its common name).
    pub fn new(name: &str) -> io::Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_error)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(tls_error)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(tls_error)?;
        Ok(TestCa { issuer })
    }

    /// The CA certificate, PEM-encoded.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate, DER-encoded (for a client's root store).
    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Writes [`TestCa::pem`] to `path`.
    pub fn write_pem(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.pem())
    }

    /// A server certificate signed by this CA, valid for `localhost`,
    /// 127.0.0.1, ::1 and every address of `ips` (a certificate names
    /// addresses one by one: a judge on 127.3.0.1 passes it here).
    pub fn server_cert(&self, ips: &[IpAddr]) -> io::Result<ServerCert> {
        let key = KeyPair::generate().map_err(tls_error)?;
        let params = leaf_params(ips)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(tls_error)?;
        Ok(ServerCert {
            chain: vec![cert.der().clone(), self.der()],
            key: key.serialize_der(),
        })
    }
}

/// A server's certificate chain and private key.
pub struct ServerCert {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

impl ServerCert {
    /// What a TLS-intercepting proxy shows: a certificate for the same
    /// loopback names as [`TestCa::server_cert`], signed by an authority of
    /// its own that no client trusts.
    pub fn interceptor(ips: &[IpAddr]) -> io::Result<ServerCert> {
        TestCa::new("proxy-farm intercepting proxy CA")?.server_cert(ips)
    }

    /// The certificate chain, leaf first, DER-encoded.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// A rustls server configuration presenting this certificate (ring
    /// provider, TLS 1.2 and 1.3, no client certificates).
    pub fn server_config(&self) -> io::Result<Arc<ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)
            .map_err(tls_error)?;
        Ok(Arc::new(config))
    }
}

fn leaf_params(ips: &[IpAddr]) -> io::Result<CertificateParams> {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).map_err(tls_error)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "proxy-farm judge");
    let mut addresses = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    for ip in ips {
        if !addresses.contains(ip) {
            addresses.push(*ip);
        }
    }
    params
        .subject_alt_names
        .extend(addresses.into_iter().map(SanType::IpAddress));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

/// The judge (`proxy_pool::judge::echo`, the same JSON as the farm's plain
/// `/get` and the service's `/judge`) served over https on one address.
/// Dropping it closes the listener; open connections end within
/// [`CONNECTION_LIMIT`].
pub struct TlsJudge {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl TlsJudge {
    /// Listens on `address` (loopback only; port 0 picks a free one, 443
    /// needs root or `CAP_NET_BIND_SERVICE`) with `cert`.
    pub fn start(address: SocketAddr, cert: &ServerCert) -> io::Result<TlsJudge> {
        if !wire::is_loopback(address.ip()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the https judge listens on loopback only, not {address}"),
            ));
        }
        let config = cert.server_config()?;
        let listener = crate::listen(address, 1024)?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let thread = spawn_tls_listener(listener, config, Arc::clone(&stop), Arc::clone(&hits))?;
        Ok(TlsJudge {
            address,
            stop,
            hits,
            thread: Some(thread),
        })
    }

    /// The judge's URL, `https://ADDRESS/get`.
    pub fn url(&self) -> String {
        format!("https://{}/get", self.address)
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Requests answered with the judge's JSON (after a completed handshake).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for TlsJudge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn spawn_tls_listener(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("farm-tls-judge".to_owned())
        .stack_size(wire::LISTENER_STACK)
        .spawn(move || loop {
            let accepted = listener.accept();
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match accepted {
                Ok((stream, peer)) => {
                    let config = Arc::clone(&config);
                    let hits = Arc::clone(&hits);
                    let spawned = thread::Builder::new()
                        .name("farm-tls-conn".to_owned())
                        .stack_size(wire::CONNECTION_STACK)
                        .spawn(move || match serve_judge_tls(stream, peer, config) {
                            Ok(true) => {
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(false) => {}
                            Err(error) => {
                                log::debug!("https judge: connection from {peer}: {error}")
                            }
                        });
                    if let Err(error) = spawned {
                        log::warn!("https judge: cannot start a connection thread: {error}");
                    }
                }
                Err(error) => {
                    log::warn!("https judge: accept failed: {error}");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        })
}

/// Serves one connection as the https judge: the TLS handshake with
/// `config`, one request, the judge's JSON for `GET /get` (or `/judge`),
/// 404 for any other path, then `Connection: close`. `peer` is the TCP peer
/// the echo reports as `origin`. A TLS-intercepting proxy in a test calls
/// this on its client's connection after answering the CONNECT, with
/// [`ServerCert::interceptor`]'s configuration. Returns whether the judge's
/// JSON was sent.
pub fn serve_judge_tls(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
) -> io::Result<bool> {
    stream.set_read_timeout(Some(CONNECTION_LIMIT))?;
    stream.set_write_timeout(Some(CONNECTION_LIMIT))?;
    let connection = ServerConnection::new(config).map_err(tls_error)?;
    let mut tls = StreamOwned::new(connection, stream);
    let Some(head) = read_request_head(&mut tls)? else {
        return Ok(false);
    };
    let route = head.target.split(['?', '#']).next().unwrap_or("");
    let (status, body, judged) = if route == "/get" || route == "/judge" {
        let host = head
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("host"))
            .map_or_else(
                || tls.sock.local_addr().map(|a| a.to_string()),
                |(_, v)| Ok(v.clone()),
            )?;
        let echo = judge::echo(&head.method, &head.target, &host, &head.headers, peer.ip());
        let mut body = serde_json::to_string_pretty(&echo).unwrap_or_default();
        body.push('\n');
        ("200 OK", body, true)
    } else {
        (
            "404 Not Found",
            "not found: the https judge serves /get\n".to_owned(),
            false,
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(response.as_bytes())?;
    tls.flush()?;
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
    Ok(judged)
}

/// A request head as read by [`read_request_head`].
pub struct RequestHead {
    pub method: String,
    /// The request target as sent: origin form (`/get?a=1`), absolute form
    /// (`http://host/get`) or an authority (`host:443`, for CONNECT).
    pub target: String,
    /// Every header in arrival order.
    pub headers: Vec<(String, String)>,
}

/// Reads one request head (at most 64 KiB, 64 headers) from a stream whose
/// client waits for the answer before sending more (a GET without a body, a
/// CONNECT): bytes after the head are dropped. `None` when the client left
/// before sending one.
pub fn read_request_head(stream: &mut impl Read) -> io::Result<Option<RequestHead>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let read = match stream.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(error) => return Err(error),
        };
        buf.extend_from_slice(&chunk[..read]);
        let limits = proxy_pool::http::HeadLimits {
            max_head_bytes: wire::MAX_HEAD_BYTES,
            max_headers: 64,
        };
        match proxy_pool::http::parse_request(&buf, limits) {
            Ok(Some((head, _))) => {
                return Ok(Some(RequestHead {
                    method: head.method,
                    target: head.target,
                    headers: head.headers.0,
                }))
            }
            Ok(None) => {}
            Err(error) => return Err(io::Error::new(io::ErrorKind::InvalidData, error)),
        }
    }
}

fn tls_error(error: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    fn client(roots: RootCertStore) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// One GET over TLS to `address` as `server_name`; the whole response.
    fn get(config: Arc<ClientConfig>, address: SocketAddr, name: &str) -> io::Result<String> {
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let connection = ClientConnection::new(config, server_name).map_err(tls_error)?;
        let stream = TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut tls = StreamOwned::new(connection, stream);
        let request = format!(
            "GET /get?show_env=1&check=abc HTTP/1.1\r\nHost: {name}\r\nX-Forwarded-For: unknown\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(request.as_bytes())?;
        let mut response = String::new();
        tls.read_to_string(&mut response)?;
        Ok(response)
    }

    fn body_json(response: &str) -> serde_json::Value {
        let (_, body) = response.split_once("\r\n\r\n").expect("a head and a body");
        serde_json::from_str(body).expect("the judge's JSON")
    }

    #[test]
    fn a_client_trusting_the_ca_gets_the_judge_json() {
        let ca = TestCa::new("test CA").unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let judge = TlsJudge::start(SocketAddr::new(ip, 0), &ca.server_cert(&[]).unwrap()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.der()).unwrap();
        let roots_config = client(roots);
        for name in ["127.0.0.1", "localhost"] {
            let response = get(Arc::clone(&roots_config), judge.address(), name).unwrap();
            assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
            let json = body_json(&response);
            assert_eq!(json["origin"], "127.0.0.1");
            assert_eq!(json["args"]["check"], "abc");
            assert_eq!(json["headers"]["X-Forwarded-For"], "unknown");
            assert_eq!(
                json["url"],
                format!("http://{name}/get?show_env=1&check=abc")
            );
        }
        // The judge counts a request once its answer is written, which the
        // client may read first: wait for the count itself.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while judge.hits() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(judge.hits(), 2);
        assert!(judge.url().starts_with("https://127.0.0.1:"));
    }

    #[test]
    fn a_client_not_trusting_the_ca_or_facing_an_interceptor_fails() {
        let ca = TestCa::new("test CA").unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.der()).unwrap();
        let trusting = client(roots);

        let judge = TlsJudge::start(SocketAddr::new(ip, 0), &ca.server_cert(&[]).unwrap()).unwrap();
        let stranger = client(RootCertStore::empty());
        let error = get(stranger, judge.address(), "127.0.0.1").unwrap_err();
        assert!(error.to_string().contains("UnknownIssuer"), "{error}");

        let interceptor = TlsJudge::start(
            SocketAddr::new(ip, 0),
            &ServerCert::interceptor(&[]).unwrap(),
        )
        .unwrap();
        let error = get(trusting, interceptor.address(), "127.0.0.1").unwrap_err();
        assert!(error.to_string().contains("UnknownIssuer"), "{error}");
        assert_eq!(judge.hits() + interceptor.hits(), 0);
    }

    #[test]
    fn certificates_name_the_addresses_asked_for_and_the_pem_is_written() {
        let ca = TestCa::new("test CA").unwrap();
        let ip: IpAddr = "127.9.0.7".parse().unwrap();
        let judge =
            TlsJudge::start(SocketAddr::new(ip, 0), &ca.server_cert(&[ip]).unwrap()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.der()).unwrap();
        let config = client(roots);
        let response = get(Arc::clone(&config), judge.address(), "127.9.0.7").unwrap();
        assert_eq!(body_json(&response)["origin"], "127.0.0.1");
        let error = get(config, judge.address(), "127.9.0.8").unwrap_err();
        assert!(error.to_string().contains("not valid for name"), "{error}");

        let dir = tempfile_dir();
        let path = dir.join("ca.pem");
        ca.write_pem(&path).unwrap();
        let pem = std::fs::read_to_string(&path).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_judge_listens_on_loopback_only() {
        let ca = TestCa::new("test CA").unwrap();
        let cert = ca.server_cert(&[]).unwrap();
        let address: SocketAddr = "10.1.2.3:443".parse().unwrap();
        let error = TlsJudge::start(address, &cert).err().expect("refused");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "proxy-farm-tls-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
