//! Checking one proxy against the judge: the validator's core. A [`Checker`]
//! is built once and shared by every validation thread; each call of
//! [`Checker::check`] is one proxy's [`Verdict`], and a dead proxy is a
//! verdict, never an error.
//!
//! A check is up to two requests, each with a whole `validation_timeout_ms`
//! of its own, and `connect_timeout_ms` bounds only each TCP connect:
//! - liveness, latency and anonymity: for http and https proxies an
//!   absolute-URI request written by [`raw_http`](super::raw_http), because a
//!   proxy rewrites headers only outside a tunnel; for socks proxies a
//!   request through the SOCKS tunnel ([`tunnel`](super::tunnel), then ureq);
//! - for a live proxy, the https check: a tunnel (CONNECT, or the SOCKS
//!   handshake) to `https_target`'s host and port, TLS verified against the
//!   system roots plus `https_ca_file`, and the judge's JSON with this
//!   check's own nonce. Only that makes `supports_https` true; a certificate
//!   that does not verify means the proxy reads its clients' TLS
//!   ([`HttpsFailure::TlsIntercepted`]).
//!
//! ureq agents are built per request (the tunnel is part of an agent). That
//! costs a few small allocations and, for https, the TLS configuration,
//! little next to a network round trip; no idle connections are kept.

use std::fmt;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
use ureq::Agent;

use crate::config::ValidatorConfig;
use crate::proxy::{Anonymity, Protocol, ProxyKey};
use crate::validator::judge_answer::{anonymity, classify, DeadReason, JudgeExpectations};
use crate::validator::raw_http::{self, Limits};
use crate::validator::tunnel::{self, base64, Tunnel, TunnelFailure, TunnelTarget};

/// A browser-like User-Agent: some proxies drop requests from obvious bots.
const USER_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
/// Cap on an answer's head, status line and headers together.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The query argument carrying each check's nonce, which the judge echoes.
const NONCE_ARG: &str = "pp_nonce";
/// Where the system's trusted roots are, in the order Linux distributions
/// put them (`SSL_CERT_FILE` first, as OpenSSL reads it).
const SYSTEM_ROOTS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// What a check needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckConfig {
    /// An httpbin-compatible `/get` echo, `http://` only.
    pub judge_url: String,
    /// The judge of the https check, `https://` only; `None`: no https check.
    pub https_url: Option<String>,
    /// Extra PEM roots for `https_url`, beside the system's.
    pub https_ca_file: Option<PathBuf>,
    /// Each request's budget (see [`Checker::max_check_duration`]).
    pub timeout: Duration,
    /// The TCP connect's budget; most listed proxies are dead.
    pub connect_timeout: Duration,
    /// Cap on the judge's body; a longer answer is dead `TooLarge`.
    pub max_body_bytes: usize,
}

impl CheckConfig {
    pub fn from_validator(validator: &ValidatorConfig) -> CheckConfig {
        CheckConfig {
            judge_url: validator.target.clone(),
            https_url: validator.https_target.clone(),
            https_ca_file: validator.https_ca_file.clone(),
            timeout: validator.timeout,
            connect_timeout: validator.connect_timeout,
            max_body_bytes: 64 * 1024,
        }
    }
}

/// The longest one check can take with `validator`'s settings: a whole
/// timeout for each of its requests.
pub fn max_check_duration(validator: &ValidatorConfig) -> Duration {
    let requests = if validator.https_target.is_some() {
        2
    } else {
        1
    };
    validator.timeout * requests
}

/// One proxy's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Alive(Alive),
    Dead(DeadReason),
}

impl Verdict {
    pub fn is_alive(&self) -> bool {
        matches!(self, Verdict::Alive(_))
    }

    pub fn alive(&self) -> Option<&Alive> {
        match self {
            Verdict::Alive(alive) => Some(alive),
            Verdict::Dead(_) => None,
        }
    }

    pub fn dead_reason(&self) -> Option<&DeadReason> {
        match self {
            Verdict::Alive(_) => None,
            Verdict::Dead(reason) => Some(reason),
        }
    }
}

/// What a live proxy's check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alive {
    /// Time from the start of the check to the judge's full answer.
    pub latency_ms: u32,
    pub anonymity: Anonymity,
    /// What gave the proxy away, e.g. `"Via: 1.1 squid"`; empty when elite.
    pub evidence: Vec<String>,
    /// The judge's TCP peer; `None` when the judge did not show it.
    pub exit_ip: Option<IpAddr>,
    pub https: HttpsOutcome,
}

/// The https check's finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpsOutcome {
    /// No https check ran: none is configured, or the https judge does not
    /// answer us (then nobody's `supports_https` changes).
    NotChecked,
    /// The judge's JSON came back through a verified TLS tunnel.
    Supported,
    Failed(HttpsFailure),
}

impl HttpsOutcome {
    /// The `supports_https` column: `None` when not checked.
    pub fn supports_https(&self) -> Option<bool> {
        match self {
            HttpsOutcome::NotChecked => None,
            HttpsOutcome::Supported => Some(true),
            HttpsOutcome::Failed(_) => Some(false),
        }
    }

    pub fn failure(&self) -> Option<&HttpsFailure> {
        match self {
            HttpsOutcome::Failed(failure) => Some(failure),
            _ => None,
        }
    }
}

/// Why a proxy's https check failed (`https_failure`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HttpsFailure {
    /// The certificate did not verify: the proxy terminates its clients'
    /// TLS with its own. Such a proxy must never be handed out as https.
    TlsIntercepted,
    /// The proxy answered CONNECT with this status.
    ConnectRefused(u16),
    /// The TLS handshake failed otherwise; the text says how.
    Tls(String),
    /// Anything a request can fail with (timeout, reset, socks, not_judge...).
    Request(DeadReason),
}

impl HttpsFailure {
    /// A stable short name, for counters.
    pub fn as_str(&self) -> &'static str {
        match self {
            HttpsFailure::TlsIntercepted => "tls_intercepted",
            HttpsFailure::ConnectRefused(_) => "connect_refused",
            HttpsFailure::Tls(_) => "tls_failed",
            HttpsFailure::Request(reason) => reason.as_str(),
        }
    }
}

impl fmt::Display for HttpsFailure {
    /// The `https_failure` column: the name, and the status of a refused
    /// CONNECT (`connect_refused 403`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpsFailure::ConnectRefused(status) => write!(f, "connect_refused {status}"),
            HttpsFailure::Request(reason) => f.write_str(reason.as_str()),
            _ => f.write_str(self.as_str()),
        }
    }
}

/// Why the judge itself cannot be used. Unlike a proxy's failure, this stops
/// a validation cycle: without our own address no anonymity can be graded.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("judge url {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("https_ca_file {path}: {reason}")]
    BadCaFile { path: PathBuf, reason: String },
    #[error("direct request to the judge failed: {0}")]
    Unreachable(String),
    #[error("the judge's direct answer is not an httpbin-compatible echo: {0}")]
    NotJudge(DeadReason),
    #[error("the judge's direct answer shows no address in origin")]
    NoOwnAddress,
}

/// A judge's URL, split for writing requests and opening tunnels.
#[derive(Clone, Debug, PartialEq, Eq)]
struct JudgeTarget {
    /// `http` or `https`.
    scheme: &'static str,
    /// `host[:port]` as the URL spells it, for the request line and `Host`.
    authority: String,
    /// Starts with `/`; may carry a query.
    path_and_query: String,
    /// The host and port a tunnel leads to.
    tunnel: TunnelTarget,
}

impl JudgeTarget {
    fn parse(url: &str, scheme: &'static str) -> Result<JudgeTarget, JudgeError> {
        let bad = |reason| JudgeError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let scheme_end = url
            .find("://")
            .ok_or_else(|| bad("expected scheme://host/path"))?;
        if !url[..scheme_end].eq_ignore_ascii_case(scheme) {
            return Err(bad(if scheme == "http" {
                "expected an http:// url (checks are plain http)"
            } else {
                "expected an https:// url"
            }));
        }
        let rest = &url[scheme_end + 3..];
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(at) => rest.split_at(at),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("expected a host without credentials"));
        }
        if authority
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(bad("expected a host without spaces"));
        }
        let path = path.split('#').next().unwrap_or("/");
        let path_and_query = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if path_and_query
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(bad("expected a path without spaces"));
        }
        let default_port = if scheme == "https" { 443 } else { 80 };
        let tunnel = tunnel_target(authority, default_port).ok_or_else(|| bad("bad port"))?;
        Ok(JudgeTarget {
            scheme,
            authority: authority.to_string(),
            path_and_query,
            tunnel,
        })
    }

    /// The judge's URL with a fresh nonce argument, and what to expect back.
    fn fresh_url(&self) -> (String, JudgeExpectations) {
        let nonce = format!("{:016x}", fastrand::u64(..));
        let separator = if self.path_and_query.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!(
            "{}://{}{}{separator}{NONCE_ARG}={nonce}",
            self.scheme, self.authority, self.path_and_query
        );
        let expect = JudgeExpectations {
            nonce: Some((NONCE_ARG.to_string(), nonce)),
        };
        (url, expect)
    }

    /// Where a tunnel through `protocol` leads: SOCKS4 can name only an
    /// IPv4 address, so a host name is resolved here for it.
    fn tunnel_for(&self, protocol: Protocol) -> Result<TunnelTarget, DeadReason> {
        match (&self.tunnel, protocol) {
            (TunnelTarget::Name(host, port), Protocol::Socks4) => {
                let address = ipv4_of(host, *port)?;
                Ok(TunnelTarget::Ip(SocketAddr::V4(address)))
            }
            (target, _) => Ok(target.clone()),
        }
    }
}

/// `host[:port]` (IPv6 in brackets) as a tunnel's target.
fn tunnel_target(authority: &str, default_port: u16) -> Option<TunnelTarget> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok()?),
            None => (authority, default_port),
        }
    };
    Some(match host.parse::<IpAddr>() {
        Ok(ip) => TunnelTarget::Ip(SocketAddr::new(ip, port)),
        Err(_) => TunnelTarget::Name(host.to_string(), port),
    })
}

/// The IPv4 address of `host`, for SOCKS4.
fn ipv4_of(host: &str, port: u16) -> Result<SocketAddrV4, DeadReason> {
    let addresses = (host, port)
        .to_socket_addrs()
        .map_err(|error| DeadReason::Io(format!("judge address: {error}")))?;
    addresses
        .filter_map(|address| match address {
            SocketAddr::V4(v4) => Some(v4),
            SocketAddr::V6(_) => None,
        })
        .next()
        .ok_or_else(|| DeadReason::Io("the judge has no IPv4 address for socks4".into()))
}

/// The https judge and how its certificate is verified.
#[derive(Debug)]
struct HttpsJudge {
    target: JudgeTarget,
    tls: TlsConfig,
}

/// Checks proxies against one judge. `Send + Sync`: build once, share by
/// reference across the validator's threads.
#[derive(Debug)]
pub struct Checker {
    config: CheckConfig,
    judge: JudgeTarget,
    https: Option<HttpsJudge>,
    /// Whether the https judge answered our last direct request: while it
    /// does not, no https check runs (its outage is not the proxies' fault).
    https_judge_up: AtomicBool,
}

impl Checker {
    pub fn new(config: CheckConfig) -> Result<Checker, JudgeError> {
        let judge = JudgeTarget::parse(&config.judge_url, "http")?;
        let https = match &config.https_url {
            Some(url) => Some(HttpsJudge {
                target: JudgeTarget::parse(url, "https")?,
                tls: tls_config(config.https_ca_file.as_deref())?,
            }),
            None => None,
        };
        Ok(Checker {
            config,
            judge,
            https,
            https_judge_up: AtomicBool::new(true),
        })
    }

    /// The longest one [`Checker::check`] can take: a whole timeout for
    /// each of its requests.
    pub fn max_check_duration(&self) -> Duration {
        let requests = if self.https.is_some() { 2 } else { 1 };
        self.config.timeout * requests
    }

    /// Our own public address, from one direct request to the judge. Also
    /// asks the https judge directly, and while it does not answer, checks
    /// skip their https part.
    pub fn learn_own_ip(&self) -> Result<IpAddr, JudgeError> {
        let (url, expect) = self.judge.fresh_url();
        let agent = self.direct_agent(None);
        let (status, body) = self
            .get(&agent, &url)
            .map_err(|error| JudgeError::Unreachable(error.to_string()))?;
        let view = classify(status, &body, &expect).map_err(JudgeError::NotJudge)?;
        let own_ip = view.first_ip().ok_or(JudgeError::NoOwnAddress)?;
        if let Some(https) = &self.https {
            let (url, expect) = https.target.fresh_url();
            let agent = self.direct_agent(Some(https.tls.clone()));
            let answer = self
                .get(&agent, &url)
                .map_err(|error| error.to_string())
                .and_then(|(status, body)| {
                    classify(status, &body, &expect).map_err(|reason| reason.to_string())
                });
            if let Err(reason) = &answer {
                log::warn!("https judge {url:?} does not answer directly ({reason}): no https checks until it does");
            }
            self.https_judge_up.store(answer.is_ok(), Ordering::Relaxed);
        }
        Ok(own_ip)
    }

    /// Checks one proxy; never fails, a dead proxy is a verdict.
    pub fn check(&self, proxy: &ProxyKey, own_ip: IpAddr) -> Verdict {
        let started = Instant::now();
        let deadline = started + self.config.timeout;
        let (url, expect) = self.judge.fresh_url();
        let answer = match proxy.protocol {
            Protocol::Http | Protocol::Https => self.absolute_uri_get(proxy, &url, deadline),
            Protocol::Socks4 | Protocol::Socks5 => self.socks_get(proxy, &url, deadline),
        };
        let view = match answer.and_then(|(status, body)| classify(status, &body, &expect)) {
            Ok(view) => view,
            Err(reason) => {
                log::debug!("check {}: dead, {reason}", proxy.redacted());
                return Verdict::Dead(reason);
            }
        };
        let latency_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        let (grade, evidence) = anonymity(&view, own_ip);
        let https = self.https_check(proxy);
        log::debug!(
            "check {}: alive, {latency_ms} ms, {grade}, https {https:?}",
            proxy.redacted()
        );
        Verdict::Alive(Alive {
            latency_ms,
            anonymity: grade,
            evidence,
            exit_ip: view.exit_ip(own_ip),
            https,
        })
    }

    /// The one request a proxy may rewrite: `GET http://judge/... HTTP/1.1`.
    fn absolute_uri_get(
        &self,
        proxy: &ProxyKey,
        url: &str,
        deadline: Instant,
    ) -> Result<(u16, Vec<u8>), DeadReason> {
        let request = judge_request(url, &self.judge.authority, Some(proxy));
        let limits = Limits {
            max_head_bytes: MAX_HEAD_BYTES,
            max_body_bytes: self.config.max_body_bytes,
        };
        let address = SocketAddr::new(proxy.ip, proxy.port);
        let response = raw_http::exchange(
            address,
            &request,
            self.config.connect_timeout,
            deadline,
            limits,
        )?;
        Ok((response.status, response.body))
    }

    /// The judge's plain http through the SOCKS tunnel.
    fn socks_get(
        &self,
        proxy: &ProxyKey,
        url: &str,
        deadline: Instant,
    ) -> Result<(u16, Vec<u8>), DeadReason> {
        let tunnel = Tunnel {
            proxy: proxy.clone(),
            target: self.judge.tunnel_for(proxy.protocol)?,
            connect_timeout: self.config.connect_timeout,
            deadline,
        };
        let agent = tunnel::agent(tunnel, self.agent_config(self.config.timeout, None));
        self.get(&agent, url).map_err(dead_reason)
    }

    /// The https check: the judge's JSON through a tunnel and verified TLS,
    /// within a whole timeout of its own.
    fn https_check(&self, proxy: &ProxyKey) -> HttpsOutcome {
        let Some(https) = &self.https else {
            return HttpsOutcome::NotChecked;
        };
        if !self.https_judge_up.load(Ordering::Relaxed) {
            return HttpsOutcome::NotChecked;
        }
        let target = match https.target.tunnel_for(proxy.protocol) {
            Ok(target) => target,
            Err(reason) => return HttpsOutcome::Failed(HttpsFailure::Request(reason)),
        };
        let tunnel = Tunnel {
            proxy: proxy.clone(),
            target,
            connect_timeout: self.config.connect_timeout,
            deadline: Instant::now() + self.config.timeout,
        };
        let config = self.agent_config(self.config.timeout, Some(https.tls.clone()));
        let agent = tunnel::agent(tunnel, config);
        let (url, expect) = https.target.fresh_url();
        let failure = match self.get(&agent, &url) {
            Ok((status, body)) => match classify(status, &body, &expect) {
                Ok(_) => return HttpsOutcome::Supported,
                Err(reason) => HttpsFailure::Request(reason),
            },
            Err(error) => https_failure(error),
        };
        log::debug!("check {}: no https, {failure}", proxy.redacted());
        HttpsOutcome::Failed(failure)
    }

    fn agent_config(&self, budget: Duration, tls: Option<TlsConfig>) -> ureq::config::Config {
        let mut builder = Agent::config_builder()
            // Set even when `None`: the default would read proxies from
            // the environment and skew every check.
            .proxy(None)
            .timeout_global(Some(budget))
            .timeout_connect(Some(self.config.connect_timeout.min(budget)))
            .http_status_as_error(false)
            .max_redirects(0)
            .max_response_header_size(MAX_HEAD_BYTES)
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .user_agent(USER_AGENT);
        if let Some(tls) = tls {
            builder = builder.tls_config(tls);
        }
        builder.build()
    }

    /// An agent for direct requests to a judge.
    fn direct_agent(&self, tls: Option<TlsConfig>) -> Agent {
        Agent::new_with_config(self.agent_config(self.config.timeout, tls))
    }

    /// One GET; the body is read (up to the cap) only for a 200.
    fn get(&self, agent: &Agent, url: &str) -> Result<(u16, Vec<u8>), ureq::Error> {
        let mut response = agent.get(url).call()?;
        let status = response.status().as_u16();
        if status != 200 {
            return Ok((status, Vec::new()));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(self.config.max_body_bytes as u64)
            .read_to_vec()?;
        Ok((status, body))
    }
}

/// The roots an https judge's certificate is verified against: the system's
/// (Mozilla's, bundled, when the system has none) plus `ca_file`'s.
fn tls_config(ca_file: Option<&Path>) -> Result<TlsConfig, JudgeError> {
    let mut roots = system_roots();
    if let Some(path) = ca_file {
        let bad = |reason: String| JudgeError::BadCaFile {
            path: path.to_path_buf(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|error| bad(error.to_string()))?;
        let before = roots.len();
        roots.extend(pem_certificates(&pem));
        if roots.len() == before {
            return Err(bad("expected PEM certificates, found none".into()));
        }
    }
    let roots = if roots.is_empty() {
        RootCerts::WebPki
    } else {
        RootCerts::Specific(Arc::new(roots))
    };
    Ok(TlsConfig::builder().root_certs(roots).build())
}

fn system_roots() -> Vec<Certificate<'static>> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let candidates = from_env
        .into_iter()
        .chain(SYSTEM_ROOTS.iter().map(PathBuf::from));
    for path in candidates {
        if let Ok(pem) = std::fs::read(&path) {
            let roots = pem_certificates(&pem);
            if !roots.is_empty() {
                return roots;
            }
        }
    }
    Vec::new()
}

fn pem_certificates(pem: &[u8]) -> Vec<Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(certificate)) => Some(certificate),
            _ => None,
        })
        .collect()
}

/// A GET of `target` (an absolute URI for an http proxy), with
/// `Proxy-Authorization` when `proxy` has credentials.
fn judge_request(target: &str, authority: &str, proxy: Option<&ProxyKey>) -> Vec<u8> {
    let mut request = format!(
        "GET {target} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {USER_AGENT}\r\nAccept: application/json, */*;q=0.8\r\n"
    );
    if let Some(proxy) = proxy {
        if let Some(user) = &proxy.username {
            let credentials = format!("{user}:{}", proxy.password.as_deref().unwrap_or(""));
            request.push_str("Proxy-Authorization: Basic ");
            request.push_str(&base64(credentials.as_bytes()));
            request.push_str("\r\n");
        }
    }
    request.push_str("Connection: close\r\n\r\n");
    request.into_bytes()
}

/// The rustls error behind a ureq error, if TLS is what failed.
fn rustls_error(error: &ureq::Error) -> Option<&rustls::Error> {
    match error {
        ureq::Error::Rustls(inner) => Some(inner),
        ureq::Error::Io(io_error) => io_error.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
    }
}

/// Maps a failed https check.
fn https_failure(error: ureq::Error) -> HttpsFailure {
    if let Some(failure) = TunnelFailure::from_ureq(&error) {
        return match failure {
            TunnelFailure::ConnectRefused(status) => HttpsFailure::ConnectRefused(*status),
            TunnelFailure::HandshakeTimeout => HttpsFailure::Request(DeadReason::Timeout),
            TunnelFailure::Reset => HttpsFailure::Request(DeadReason::Reset),
            _ => HttpsFailure::Request(tunnel_reason(failure)),
        };
    }
    match rustls_error(&error) {
        Some(rustls::Error::InvalidCertificate(_)) => HttpsFailure::TlsIntercepted,
        Some(other) => HttpsFailure::Tls(other.to_string()),
        None => HttpsFailure::Request(dead_reason(error)),
    }
}

/// A tunnel's failure as a dead proxy's reason (SOCKS liveness).
fn tunnel_reason(failure: &TunnelFailure) -> DeadReason {
    match failure {
        TunnelFailure::ConnectRefused(status) => DeadReason::Tunnel(format!("status {status}")),
        TunnelFailure::ConnectGarbage => DeadReason::Tunnel("answer is not http".into()),
        TunnelFailure::Socks(detail) => DeadReason::Socks(detail.clone()),
        TunnelFailure::HandshakeTimeout => DeadReason::HandshakeTimeout,
        TunnelFailure::Reset => DeadReason::Socks("closed during the handshake".into()),
        TunnelFailure::Unsupported(what) => DeadReason::Io((*what).into()),
    }
}

/// Maps a ureq failure to the reason statistics want.
fn dead_reason(error: ureq::Error) -> DeadReason {
    if let Some(failure) = TunnelFailure::from_ureq(&error) {
        return tunnel_reason(failure);
    }
    match error {
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => {
            DeadReason::ConnectTimeout
        }
        ureq::Error::Timeout(_) => DeadReason::Timeout,
        ureq::Error::Io(io_error) => raw_http::connect_error(io_error),
        ureq::Error::BodyExceedsLimit(_) | ureq::Error::LargeResponseHeader(..) => {
            DeadReason::TooLarge
        }
        ureq::Error::Protocol(_) => DeadReason::Garbage,
        ureq::Error::ConnectProxyFailed(detail) => DeadReason::Tunnel(detail),
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => DeadReason::Unreachable,
        other => DeadReason::Io(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::OnceLock;
    use std::thread;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::*;

    /// The old flat view of a verdict, so that assertions read as before.
    #[derive(Debug)]
    struct Outcome {
        alive: bool,
        dead_reason: Option<DeadReason>,
        latency_ms: Option<u32>,
        anonymity: Option<Anonymity>,
        evidence: Vec<String>,
        supports_https: Option<bool>,
        https_failure: Option<HttpsFailure>,
        exit_ip: Option<IpAddr>,
    }

    trait CheckFlat {
        fn check_flat(&self, proxy: &ProxyKey, own_ip: IpAddr) -> Outcome;
    }

    impl CheckFlat for Checker {
        fn check_flat(&self, proxy: &ProxyKey, own_ip: IpAddr) -> Outcome {
            match self.check(proxy, own_ip) {
                Verdict::Alive(alive) => Outcome {
                    alive: true,
                    dead_reason: None,
                    latency_ms: Some(alive.latency_ms),
                    anonymity: Some(alive.anonymity),
                    evidence: alive.evidence,
                    supports_https: alive.https.supports_https(),
                    https_failure: alive.https.failure().cloned(),
                    exit_ip: alive.exit_ip,
                },
                Verdict::Dead(reason) => Outcome {
                    alive: false,
                    dead_reason: Some(reason),
                    latency_ms: None,
                    anonymity: None,
                    evidence: Vec::new(),
                    supports_https: None,
                    https_failure: None,
                    exit_ip: None,
                },
            }
        }
    }

    const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/validator/testdata");

    fn server_config(name: &str) -> Arc<rustls::ServerConfig> {
        let read = |file: String| std::fs::read(format!("{TESTDATA}/{file}")).unwrap();
        let certs: Vec<CertificateDer<'static>> = pem_certificates(&read(format!("{name}.pem")))
            .iter()
            .map(|cert| CertificateDer::from(cert.der().to_vec()))
            .collect();
        let key = ureq::tls::parse_pem(&read(format!("{name}.key")))
            .find_map(|item| match item {
                Ok(PemItem::PrivateKey(key)) => Some(key.der().to_vec()),
                _ => None,
            })
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Arc::new(config)
    }

    /// Serves the judge's echo over TLS on `stream` with `config`'s
    /// certificate; the origin is `EXIT`.
    fn serve_tls_judge(stream: TcpStream, config: Arc<rustls::ServerConfig>) {
        let Ok(connection) = rustls::ServerConnection::new(config) else {
            return;
        };
        let mut tls = rustls::StreamOwned::new(connection, stream);
        let head = read_head(&mut tls);
        if head.is_empty() {
            return;
        }
        respond(&mut tls, "200 OK", &echo_body(&head, EXIT, &[]));
        let _ = tls.flush();
    }

    /// The test https judge (certificate signed by testdata's CA), started
    /// once; its port.
    fn tls_judge_port() -> u16 {
        static PORT: OnceLock<u16> = OnceLock::new();
        *PORT.get_or_init(|| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let config = server_config("judge");
            thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let config = config.clone();
                    thread::spawn(move || serve_tls_judge(stream, config));
                }
            });
            port
        })
    }

    /// Like [`checker`], with the https check against the test https judge.
    fn https_checker(timeout_ms: u64) -> Checker {
        Checker::new(CheckConfig {
            https_url: Some(format!("https://127.0.0.1:{}/get", tls_judge_port())),
            https_ca_file: Some(format!("{TESTDATA}/ca.pem").into()),
            ..check_config(9, timeout_ms)
        })
        .unwrap()
    }

    /// Copies bytes both ways between `client` and a new connection to
    /// `target` until either side closes.
    fn relay(client: TcpStream, target: SocketAddr) {
        let Ok(upstream) = TcpStream::connect(target) else {
            return;
        };
        let (mut client_read, mut upstream_write) =
            (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        let (mut upstream_read, mut client_write) = (upstream, client);
        let up = thread::spawn(move || {
            let _ = std::io::copy(&mut client_read, &mut upstream_write);
            let _ = upstream_write.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut upstream_read, &mut client_write);
        let _ = client_write.shutdown(std::net::Shutdown::Write);
        let _ = up.join();
    }

    const EXIT: &str = "198.51.100.9";

    fn own() -> IpAddr {
        "203.0.113.7".parse().unwrap()
    }

    fn check_config(judge_port: u16, timeout_ms: u64) -> CheckConfig {
        CheckConfig {
            judge_url: format!("http://127.0.0.1:{judge_port}/get"),
            https_url: None,
            https_ca_file: None,
            timeout: Duration::from_millis(timeout_ms),
            connect_timeout: Duration::from_millis(timeout_ms.min(1000)),
            max_body_bytes: 64 * 1024,
        }
    }

    fn checker(judge_port: u16, timeout_ms: u64) -> Checker {
        Checker::new(check_config(judge_port, timeout_ms)).unwrap()
    }

    fn key(protocol: Protocol, port: u16) -> ProxyKey {
        ProxyKey::new(protocol, "127.0.0.1".parse().unwrap(), port)
    }

    /// A fake server on loopback running `serve` for every connection.
    fn fake(serve: fn(TcpStream)) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                thread::spawn(move || serve(stream));
            }
        });
        port
    }

    /// Reads a request head up to its blank line.
    fn read_head(stream: &mut impl Read) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    fn nonce_of(head: &str) -> String {
        let request_line = head.lines().next().unwrap_or("");
        request_line
            .split("pp_nonce=")
            .nth(1)
            .and_then(|rest| rest.split([' ', '&']).next())
            .unwrap_or("")
            .to_string()
    }

    fn echo_body(head: &str, origin: &str, headers: &[(&str, &str)]) -> String {
        let map: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string().into()))
            .collect();
        serde_json::json!({
            "args": {"pp_nonce": nonce_of(head)},
            "headers": map,
            "origin": origin,
            "url": "http://127.0.0.1/get",
        })
        .to_string()
    }

    fn respond(stream: &mut impl Write, status: &str, body: &str) {
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes());
    }

    /// An anonymous http proxy that refuses CONNECT.
    fn via_proxy_without_connect(mut stream: TcpStream) {
        let head = read_head(&mut stream);
        if head.starts_with("CONNECT") {
            respond(&mut stream, "405 Method Not Allowed", "");
            return;
        }
        let body = echo_body(&head, EXIT, &[("Host", "judge"), ("Via", "1.1 fake")]);
        respond(&mut stream, "200 OK", &body);
    }

    /// An elite proxy wanting `user:pass` that also tunnels CONNECT; inside
    /// the tunnel it plays the judge itself.
    fn elite_proxy_with_auth_and_connect(mut stream: TcpStream) {
        let head = read_head(&mut stream);
        if !head.contains("Proxy-Authorization: Basic dXNlcjpwYXNz\r\n") {
            respond(&mut stream, "407 Proxy Authentication Required", "");
            return;
        }
        if let Some(target) = head
            .strip_prefix("CONNECT ")
            .and_then(|rest| rest.split(' ').next())
        {
            let target: SocketAddr = target.parse().unwrap();
            let _ = stream.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
            relay(stream, target);
            return;
        }
        respond(&mut stream, "200 OK", &echo_body(&head, EXIT, &[]));
    }

    #[test]
    fn anonymous_proxy_is_alive_and_refused_connect_is_recorded() {
        let port = fake(via_proxy_without_connect);
        for protocol in [Protocol::Http, Protocol::Https] {
            let outcome = https_checker(3000).check_flat(&key(protocol, port), own());
            assert!(outcome.alive, "{outcome:?}");
            assert_eq!(outcome.dead_reason, None);
            assert_eq!(outcome.anonymity, Some(Anonymity::Anonymous));
            assert_eq!(outcome.evidence, vec!["Via: 1.1 fake".to_string()]);
            assert_eq!(outcome.supports_https, Some(false));
            assert_eq!(
                outcome.https_failure,
                Some(HttpsFailure::ConnectRefused(405))
            );
            assert_eq!(outcome.exit_ip, Some(EXIT.parse().unwrap()));
            assert!(outcome.latency_ms.is_some_and(|ms| ms < 3000));
        }
    }

    #[test]
    fn credentials_are_sent_and_connect_support_found() {
        let port = fake(elite_proxy_with_auth_and_connect);
        let mut with_auth = key(Protocol::Http, port);
        with_auth.username = Some("user".into());
        with_auth.password = Some("pass".into());
        let outcome = https_checker(3000).check_flat(&with_auth, own());
        assert!(outcome.alive, "{outcome:?}");
        assert_eq!(outcome.anonymity, Some(Anonymity::Elite));
        assert!(outcome.evidence.is_empty());
        assert_eq!(outcome.supports_https, Some(true));
        assert_eq!(outcome.https_failure, None);
    }

    #[test]
    fn missing_credentials_are_dead_proxy_auth_required() {
        let port = fake(elite_proxy_with_auth_and_connect);
        let outcome = checker(9, 3000).check_flat(&key(Protocol::Http, port), own());
        assert!(!outcome.alive);
        assert_eq!(outcome.dead_reason, Some(DeadReason::ProxyAuthRequired));
        assert_eq!(outcome.supports_https, None);
    }

    #[test]
    fn transparent_proxy_is_graded_with_evidence() {
        fn serve(mut stream: TcpStream) {
            let head = read_head(&mut stream);
            let body = echo_body(&head, EXIT, &[("X-Forwarded-For", "203.0.113.7")]);
            respond(&mut stream, "200 OK", &body);
        }
        let outcome = checker(9, 3000).check_flat(&key(Protocol::Http, fake(serve)), own());
        assert_eq!(outcome.anonymity, Some(Anonymity::Transparent));
        assert_eq!(
            outcome.evidence,
            vec!["X-Forwarded-For: 203.0.113.7".to_string()]
        );
    }

    #[test]
    fn chunked_judge_answer_is_decoded() {
        fn serve(mut stream: TcpStream) {
            let head = read_head(&mut stream);
            let body = echo_body(&head, EXIT, &[]);
            let (first, second) = body.split_at(body.len() / 2);
            let answer = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\n\r\n",
                first.len(),
                second.len()
            );
            let _ = stream.write_all(answer.as_bytes());
        }
        let outcome = checker(9, 3000).check_flat(&key(Protocol::Http, fake(serve)), own());
        assert!(outcome.alive, "{outcome:?}");
    }

    /// An anonymous http proxy that answers a GET after `delay_ms` and
    /// accepts CONNECT, then never says anything inside the tunnel.
    fn slow_answer_hanging_tunnel(mut stream: TcpStream, delay_ms: u64) {
        let head = read_head(&mut stream);
        if head.starts_with("CONNECT") {
            let _ = stream.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
            let _ = stream.read(&mut [0u8; 4096]);
            // The behaviour under test: a tunnel that never answers.
            thread::sleep(Duration::from_secs(30));
            return;
        }
        thread::sleep(Duration::from_millis(delay_ms));
        let body = echo_body(&head, EXIT, &[("Via", "1.1 slow")]);
        respond(&mut stream, "200 OK", &body);
    }

    /// Guards the per-request budgets: the liveness request and the https
    /// check each get a whole timeout (they used to share one, and a proxy
    /// answering after 9/10 of it was dead), and the check still ends within
    /// the two.
    #[test]
    fn each_request_gets_a_whole_timeout() {
        let timeout = Duration::from_millis(1000);
        for delay_ms in [0, 900] {
            let port = fake(match delay_ms {
                0 => |stream| slow_answer_hanging_tunnel(stream, 0),
                _ => |stream| slow_answer_hanging_tunnel(stream, 900),
            });
            let checker = https_checker(1000);
            let started = Instant::now();
            let outcome = checker.check_flat(&key(Protocol::Http, port), own());
            let elapsed = started.elapsed();
            assert!(outcome.alive, "{delay_ms} ms: {outcome:?}");
            assert_eq!(outcome.supports_https, Some(false));
            assert_eq!(
                outcome.https_failure,
                Some(HttpsFailure::Request(DeadReason::Timeout))
            );
            assert!(elapsed >= timeout, "{elapsed:?}");
            assert!(
                elapsed < checker.max_check_duration() + timeout / 5,
                "{elapsed:?}"
            );
        }
    }

    fn dead_reason_from(serve: fn(TcpStream), timeout_ms: u64) -> (DeadReason, Duration) {
        let port = fake(serve);
        let started = Instant::now();
        let outcome = checker(9, timeout_ms).check_flat(&key(Protocol::Http, port), own());
        assert!(!outcome.alive, "{outcome:?}");
        assert_eq!(outcome.latency_ms, None);
        (outcome.dead_reason.unwrap(), started.elapsed())
    }

    #[test]
    fn trickling_proxy_ends_at_the_deadline() {
        fn serve(mut stream: TcpStream) {
            read_head(&mut stream);
            // The behaviour under test: one byte a second, forever.
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
                .iter()
                .cycle()
            {
                if stream.write_all(&[*byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_secs(1));
            }
        }
        let (reason, elapsed) = dead_reason_from(serve, 1500);
        assert_eq!(reason, DeadReason::Timeout);
        assert!(elapsed < Duration::from_millis(2200), "{elapsed:?}");
    }

    #[test]
    fn endless_body_is_too_large() {
        fn serve(mut stream: TcpStream) {
            read_head(&mut stream);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
            let block = [b'x'; 4096];
            while stream.write_all(&block).is_ok() {}
        }
        assert_eq!(dead_reason_from(serve, 3000).0, DeadReason::TooLarge);
    }

    #[test]
    fn announced_huge_body_is_too_large() {
        fn serve(mut stream: TcpStream) {
            read_head(&mut stream);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n");
        }
        assert_eq!(dead_reason_from(serve, 3000).0, DeadReason::TooLarge);
    }

    #[test]
    fn huge_head_is_too_large() {
        fn serve(mut stream: TcpStream) {
            read_head(&mut stream);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nX-Big: ");
            let block = [b'a'; 4096];
            while stream.write_all(&block).is_ok() {}
        }
        assert_eq!(dead_reason_from(serve, 3000).0, DeadReason::TooLarge);
    }

    #[test]
    fn malformed_status_and_non_http_are_garbage() {
        fn bad_status(mut stream: TcpStream) {
            read_head(&mut stream);
            let _ = stream.write_all(b"HTTP/1.1 abc OK\r\n\r\n");
        }
        fn banner(mut stream: TcpStream) {
            read_head(&mut stream);
            // No newline and the connection stays open: detection must not
            // wait for the line to end.
            let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.6");
            read_head(&mut stream);
        }
        let (reason, _) = dead_reason_from(bad_status, 3000);
        assert_eq!(reason, DeadReason::Garbage);
        let (reason, elapsed) = dead_reason_from(banner, 3000);
        assert_eq!(reason, DeadReason::Garbage);
        assert!(elapsed < Duration::from_millis(2000), "{elapsed:?}");
    }

    #[test]
    fn other_statuses_and_hijacks_are_dead() {
        fn forbidden(mut stream: TcpStream) {
            read_head(&mut stream);
            respond(&mut stream, "403 Forbidden", "no");
        }
        fn hijack(mut stream: TcpStream) {
            read_head(&mut stream);
            respond(&mut stream, "200 OK", "<html>login to the hotspot</html>");
        }
        fn closes(mut stream: TcpStream) {
            read_head(&mut stream);
        }
        assert_eq!(
            dead_reason_from(forbidden, 3000).0,
            DeadReason::BadStatus(403)
        );
        assert_eq!(dead_reason_from(hijack, 3000).0, DeadReason::NotJudge);
        assert_eq!(dead_reason_from(closes, 3000).0, DeadReason::Reset);
    }

    #[test]
    fn closed_port_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let outcome = checker(9, 3000).check_flat(&key(Protocol::Http, port), own());
        assert_eq!(outcome.dead_reason, Some(DeadReason::Refused));
        let outcome = checker(9, 3000).check_flat(&key(Protocol::Socks5, port), own());
        assert_eq!(outcome.dead_reason, Some(DeadReason::Refused));
    }

    /// A loopback address whose connects are never answered, and what keeps
    /// it so. A black hole accepts the connection, so it cannot exercise the
    /// connect timeout; this listener never accepts instead. Linux queues at
    /// most backlog + 1 finished handshakes for a listener and drops the SYNs
    /// that come while that queue is full, so once filler connections fill
    /// it a new connect hangs (the client retransmits its SYN into the same
    /// full queue). The fillers are connected until one of them hangs.
    fn unanswered_address() -> (SocketAddr, socket2::Socket, Vec<TcpStream>) {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        listener.bind(&any_port.into()).unwrap();
        listener.listen(0).unwrap();
        let address = listener.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..64 {
            match TcpStream::connect_timeout(&address, Duration::from_millis(200)) {
                Ok(filler) => fillers.push(filler),
                Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {
                    return (address, listener, fillers);
                }
                Err(error) => panic!("filling the accept queue: {error}"),
            }
        }
        panic!("64 connects to a listener that never accepts all succeeded");
    }

    /// Guards `connect_timeout`: an unanswered connect fails as such, after
    /// the connect budget and well before the whole check's, for the raw
    /// http client, the socks4 one and ureq's socks5.
    #[test]
    fn an_unanswered_connect_ends_at_the_connect_timeout() {
        let (address, _listener, _fillers) = unanswered_address();
        let config = CheckConfig {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(300),
            ..check_config(9, 5000)
        };
        let checker = Checker::new(config.clone()).unwrap();
        for protocol in [Protocol::Http, Protocol::Socks4, Protocol::Socks5] {
            let started = Instant::now();
            let outcome = checker.check_flat(&key(protocol, address.port()), own());
            let elapsed = started.elapsed();
            assert_eq!(
                outcome.dead_reason,
                Some(DeadReason::ConnectTimeout),
                "{protocol}: {outcome:?}"
            );
            assert!(elapsed >= config.connect_timeout, "{protocol}: {elapsed:?}");
            assert!(elapsed < config.timeout, "{protocol}: {elapsed:?}");
        }
    }

    /// A SOCKS5 proxy without authentication that plays the judge inside the
    /// tunnel, or refuses the connect when `refuse` is set.
    fn socks5(mut stream: TcpStream, refuse: bool) {
        let mut greeting = [0u8; 2];
        if stream.read_exact(&mut greeting).is_err() {
            return;
        }
        let mut methods = vec![0u8; greeting[1] as usize];
        let _ = stream.read_exact(&mut methods);
        let _ = stream.write_all(&[5, 0]);
        // VER CMD RSV ATYP=1 + IPv4 + port.
        let mut request = [0u8; 10];
        if stream.read_exact(&mut request).is_err() {
            return;
        }
        let reply = if refuse { 5 } else { 0 };
        let _ = stream.write_all(&[5, reply, 0, 1, 127, 0, 0, 1, 0, 80]);
        if refuse {
            return;
        }
        let target = SocketAddr::from((
            [request[4], request[5], request[6], request[7]],
            u16::from_be_bytes([request[8], request[9]]),
        ));
        if target.port() != 9 {
            relay(stream, target);
            return;
        }
        let head = read_head(&mut stream);
        respond(&mut stream, "200 OK", &echo_body(&head, EXIT, &[]));
    }

    #[test]
    fn socks5_proxy_is_alive_and_tunnels_anything() {
        let port = fake(|stream| socks5(stream, false));
        let outcome = https_checker(3000).check_flat(&key(Protocol::Socks5, port), own());
        assert!(outcome.alive, "{outcome:?}");
        assert_eq!(outcome.anonymity, Some(Anonymity::Elite));
        assert_eq!(outcome.supports_https, Some(true));
        assert_eq!(outcome.exit_ip, Some(EXIT.parse().unwrap()));
    }

    #[test]
    fn socks5_refusal_is_a_socks_reason() {
        let port = fake(|stream| socks5(stream, true));
        let outcome = checker(9, 3000).check_flat(&key(Protocol::Socks5, port), own());
        assert!(
            matches!(outcome.dead_reason, Some(DeadReason::Socks(_))),
            "{outcome:?}"
        );
    }

    /// A SOCKS4 proxy that plays the judge inside the tunnel to port 9 and
    /// relays to any other.
    fn socks4(mut stream: TcpStream) {
        // VN CD DSTPORT DSTIP, then a NUL-terminated user id.
        let mut request = [0u8; 8];
        if stream.read_exact(&mut request).is_err() || request[..2] != [4, 1] {
            return;
        }
        let mut byte = [1u8; 1];
        while byte[0] != 0 {
            if stream.read_exact(&mut byte).is_err() {
                return;
            }
        }
        let _ = stream.write_all(&[0, 90, 0, 0, 0, 0, 0, 0]);
        let target = SocketAddr::from((
            [request[4], request[5], request[6], request[7]],
            u16::from_be_bytes([request[2], request[3]]),
        ));
        if target.port() != 9 {
            relay(stream, target);
            return;
        }
        let head = read_head(&mut stream);
        respond(&mut stream, "200 OK", &echo_body(&head, EXIT, &[]));
    }

    /// A SOCKS4 proxy that grants only the user id `farmer`.
    fn socks4_with_user_id(mut stream: TcpStream) {
        let mut request = [0u8; 8];
        if stream.read_exact(&mut request).is_err() || request[..2] != [4, 1] {
            return;
        }
        let mut user_id = Vec::new();
        let mut byte = [1u8; 1];
        loop {
            if stream.read_exact(&mut byte).is_err() {
                return;
            }
            if byte[0] == 0 {
                break;
            }
            user_id.push(byte[0]);
        }
        if user_id != b"farmer" {
            let _ = stream.write_all(&[0, 93, 0, 0, 0, 0, 0, 0]);
            return;
        }
        let _ = stream.write_all(&[0, 90, 0, 0, 0, 0, 0, 0]);
        let head = read_head(&mut stream);
        respond(&mut stream, "200 OK", &echo_body(&head, EXIT, &[]));
    }

    #[test]
    fn socks4_user_id_is_sent() {
        let mut listed = key(Protocol::Socks4, fake(socks4_with_user_id));
        listed.username = Some("farmer".into());
        let outcome = checker(9, 3000).check_flat(&listed, own());
        assert!(outcome.alive, "{outcome:?}");
        let mut wrong = key(Protocol::Socks4, fake(socks4_with_user_id));
        wrong.username = Some("someone".into());
        let outcome = checker(9, 3000).check_flat(&wrong, own());
        assert!(
            matches!(outcome.dead_reason, Some(DeadReason::Socks(_))),
            "{outcome:?}"
        );
    }

    #[test]
    fn socks4_proxy_is_alive() {
        let outcome = https_checker(3000).check_flat(&key(Protocol::Socks4, fake(socks4)), own());
        assert!(outcome.alive, "{outcome:?}");
        assert_eq!(outcome.supports_https, Some(true));
    }

    #[test]
    fn own_ip_is_origins_first_address() {
        fn judge(mut stream: TcpStream) {
            let head = read_head(&mut stream);
            respond(
                &mut stream,
                "200 OK",
                &echo_body(&head, "198.51.100.77, 10.0.0.1", &[]),
            );
        }
        let checker = checker(fake(judge), 3000);
        assert_eq!(
            checker.learn_own_ip().unwrap(),
            "198.51.100.77".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_judge_that_is_not_one_is_an_error() {
        fn not_judge(mut stream: TcpStream) {
            read_head(&mut stream);
            respond(&mut stream, "200 OK", "hello");
        }
        let error = checker(fake(not_judge), 3000).learn_own_ip().unwrap_err();
        assert!(
            matches!(error, JudgeError::NotJudge(DeadReason::NotJudge)),
            "{error}"
        );
    }

    #[test]
    fn judge_urls_are_split_or_rejected() {
        let target = JudgeTarget::parse("http://127.0.0.1:8080/judge?x=1#frag", "http").unwrap();
        assert_eq!(target.authority, "127.0.0.1:8080");
        assert_eq!(target.path_and_query, "/judge?x=1");
        let (url, expect) = target.fresh_url();
        let (_, nonce) = expect.nonce.unwrap();
        assert_eq!(
            url,
            format!("http://127.0.0.1:8080/judge?x=1&pp_nonce={nonce}")
        );
        assert_eq!(
            JudgeTarget::parse("http://judge", "http")
                .unwrap()
                .path_and_query,
            "/"
        );
        assert_eq!(
            target.tunnel,
            TunnelTarget::Ip("127.0.0.1:8080".parse().unwrap())
        );
        let https = JudgeTarget::parse("https://judge.example/get?show_env=1", "https").unwrap();
        assert_eq!(
            https.tunnel,
            TunnelTarget::Name("judge.example".into(), 443)
        );
        let v6 = JudgeTarget::parse("https://[::1]:8443/get", "https").unwrap();
        assert_eq!(v6.tunnel, TunnelTarget::Ip("[::1]:8443".parse().unwrap()));
        assert!(JudgeTarget::parse("http://judge/get", "https").is_err());
        for bad in [
            "https://judge/get",
            "judge/get",
            "http:///get",
            "http://u:p@j/get",
            "http://a b/",
        ] {
            assert!(JudgeTarget::parse(bad, "http").is_err(), "{bad}");
        }
    }

    /// An http proxy that terminates its clients' TLS with its own
    /// certificate (not signed by any root we trust) and plays the judge.
    fn intercepting_proxy(mut stream: TcpStream) {
        let head = read_head(&mut stream);
        if !head.starts_with("CONNECT") {
            respond(&mut stream, "200 OK", &echo_body(&head, EXIT, &[]));
            return;
        }
        let _ = stream.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
        serve_tls_judge(stream, server_config("intercept"));
    }

    /// Guards the contract's `tls_intercepted`: alive for plain http, never
    /// `supports_https`.
    #[test]
    fn a_proxy_reading_its_clients_tls_is_tls_intercepted() {
        let outcome =
            https_checker(3000).check_flat(&key(Protocol::Https, fake(intercepting_proxy)), own());
        assert!(outcome.alive, "{outcome:?}");
        assert_eq!(outcome.supports_https, Some(false));
        assert_eq!(outcome.https_failure, Some(HttpsFailure::TlsIntercepted));
        assert_eq!(
            outcome.https_failure.unwrap().to_string(),
            "tls_intercepted"
        );
    }

    /// A SOCKS5 proxy whose every reply comes after 1.2 s.
    fn slow_socks5(stream: TcpStream) {
        thread::sleep(Duration::from_millis(1200));
        socks5(stream, false);
    }

    /// Guards `connect_timeout` as the TCP connect's alone: a SOCKS reply
    /// slower than it but within the request's budget is alive (it used to
    /// be dead, connect_timeout).
    #[test]
    fn a_slow_socks_reply_counts_against_the_request_not_the_connect() {
        let mut config = check_config(9, 3000);
        config.connect_timeout = Duration::from_millis(1000);
        let checker = Checker::new(config).unwrap();
        let outcome = checker.check_flat(&key(Protocol::Socks5, fake(slow_socks5)), own());
        assert!(outcome.alive, "{outcome:?}");
    }

    /// Guards the reasons' steps: a SOCKS check against an http port
    /// connected, so its failure is the handshake's, never connect_timeout.
    #[test]
    fn a_socks_check_of_an_http_port_fails_in_the_handshake() {
        fn silent_http(mut stream: TcpStream) {
            // Waits for a request head that a SOCKS greeting never ends.
            read_head(&mut stream);
        }
        fn answering_http(mut stream: TcpStream) {
            let _ = stream.read(&mut [0u8; 64]);
            respond(&mut stream, "400 Bad Request", "");
        }
        let checker = checker(9, 1500);
        for protocol in [Protocol::Socks4, Protocol::Socks5] {
            let silent = checker.check_flat(&key(protocol, fake(silent_http)), own());
            assert_eq!(
                silent.dead_reason,
                Some(DeadReason::HandshakeTimeout),
                "{protocol}"
            );
            let answering = checker.check_flat(&key(protocol, fake(answering_http)), own());
            assert!(
                matches!(answering.dead_reason, Some(DeadReason::Socks(_))),
                "{protocol}: {answering:?}"
            );
        }
    }

    /// Guards the exit address: the judge's TCP peer, origin's last entry,
    /// and nothing when the judge shows only ours or no address.
    #[test]
    fn the_exit_is_origins_last_entry() {
        fn forwarding(mut stream: TcpStream) {
            let head = read_head(&mut stream);
            let origin = format!("203.0.113.7, {EXIT}");
            respond(&mut stream, "200 OK", &echo_body(&head, &origin, &[]));
        }
        fn bare_judge_behind_transparent(mut stream: TcpStream) {
            let head = read_head(&mut stream);
            respond(&mut stream, "200 OK", &echo_body(&head, "203.0.113.7", &[]));
        }
        fn squid_unknown(mut stream: TcpStream) {
            let head = read_head(&mut stream);
            respond(&mut stream, "200 OK", &echo_body(&head, "unknown", &[]));
        }
        let outcome = checker(9, 3000).check_flat(&key(Protocol::Http, fake(forwarding)), own());
        assert_eq!(outcome.anonymity, Some(Anonymity::Transparent));
        assert_eq!(outcome.exit_ip, Some(EXIT.parse().unwrap()));
        let outcome = checker(9, 3000).check_flat(
            &key(Protocol::Http, fake(bare_judge_behind_transparent)),
            own(),
        );
        assert_eq!(outcome.anonymity, Some(Anonymity::Transparent));
        assert_eq!(outcome.exit_ip, None);
        let outcome = checker(9, 3000).check_flat(&key(Protocol::Http, fake(squid_unknown)), own());
        assert!(outcome.alive, "{outcome:?}");
        assert_eq!(outcome.anonymity, Some(Anonymity::Anonymous));
        assert_eq!(outcome.exit_ip, None);
    }

    #[test]
    fn without_an_https_target_no_https_check_runs() {
        let port = fake(elite_proxy_with_auth_and_connect);
        let mut with_auth = key(Protocol::Http, port);
        with_auth.username = Some("user".into());
        with_auth.password = Some("pass".into());
        let outcome = checker(9, 3000).check_flat(&with_auth, own());
        assert!(outcome.alive, "{outcome:?}");
        assert_eq!(outcome.supports_https, None);
        assert_eq!(
            checker(9, 3000).max_check_duration(),
            Duration::from_secs(3)
        );
        assert_eq!(
            https_checker(3000).max_check_duration(),
            Duration::from_secs(6)
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let config = CheckConfig {
            https_url: Some("https://127.0.0.1:1/get".into()),
            https_ca_file: Some(format!("{TESTDATA}/judge.key").into()),
            ..check_config(9, 3000)
        };
        let error = Checker::new(config).unwrap_err();
        assert!(matches!(error, JudgeError::BadCaFile { .. }), "{error}");
    }

    #[test]
    fn checker_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Checker>();
    }
}
