//! Checking one proxy against the judge: the validator's core. A [`Checker`]
//! is built once and shared by every validation thread; each call of
//! [`Checker::check`] is one proxy's verdict, and a dead proxy is a verdict,
//! never an error.
//!
//! How each protocol is judged:
//! - http and https: liveness, latency and anonymity come from an
//!   absolute-URI request written by [`raw_http`](super::raw_http), because a
//!   proxy rewrites headers only outside a tunnel. A live one then gets a
//!   second, separate request through a CONNECT tunnel (ureq), whose success
//!   is `supports_https`. A proxy listed as `https` that refuses CONNECT still
//!   counts as alive (it does serve http) with `supports_https = false`, so
//!   that clients asking `https=true` never get it.
//! - socks4 and socks5: one request through the SOCKS tunnel (ureq for
//!   socks5; socks4 by hand, because ureq sends no SOCKS4 user id). A SOCKS
//!   tunnel carries any TCP stream, so a live one has `supports_https = true`.
//!
//! ureq agents are built per check (a proxy is part of an agent's config).
//! That costs a few small allocations, nothing next to a network round trip,
//! and no idle connections are kept.

use std::net::{IpAddr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::time::{Duration, Instant};

use ureq::{Agent, Proxy, ProxyProtocol};

use crate::config::ValidatorConfig;
use crate::proxy::{Anonymity, Protocol, ProxyKey};
use crate::validator::judge_answer::{anonymity, classify, DeadReason, JudgeExpectations};
use crate::validator::raw_http::{self, Limits};

/// A browser-like User-Agent: some proxies drop requests from obvious bots.
const USER_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
/// Cap on an answer's head, status line and headers together.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The query argument carrying each check's nonce, which the judge echoes.
const NONCE_ARG: &str = "pp_nonce";
/// The share of `timeout` kept back for an http proxy's CONNECT check: its
/// absolute-URI request must answer within the rest (4/5 of the timeout), so
/// that the CONNECT check still has at least this share and the whole check
/// ends within `timeout`.
const CONNECT_SHARE: u32 = 5;

/// What a check needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckConfig {
    /// An httpbin-compatible `/get` echo, `http://` only.
    pub judge_url: String,
    /// The whole check's budget, CONNECT follow-up included (see
    /// [`Checker::max_check_duration`]).
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
            timeout: validator.timeout,
            connect_timeout: validator.connect_timeout,
            max_body_bytes: 64 * 1024,
        }
    }
}

/// One proxy's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOutcome {
    pub alive: bool,
    /// Set exactly when `alive` is false.
    pub dead_reason: Option<DeadReason>,
    /// Time from the start of the check to the judge's full answer.
    pub latency_ms: Option<u32>,
    pub anonymity: Option<Anonymity>,
    /// What gave the proxy away, e.g. `"Via: 1.1 squid"`; empty when elite.
    pub evidence: Vec<String>,
    /// Whether the proxy tunnels CONNECT; `None` when dead.
    pub supports_https: Option<bool>,
    /// The address the judge saw the request come from.
    pub exit_ip: Option<IpAddr>,
}

impl CheckOutcome {
    fn dead(reason: DeadReason) -> CheckOutcome {
        CheckOutcome {
            alive: false,
            dead_reason: Some(reason),
            latency_ms: None,
            anonymity: None,
            evidence: Vec::new(),
            supports_https: None,
            exit_ip: None,
        }
    }
}

/// Why the judge itself cannot be used. Unlike a proxy's failure, this stops
/// a validation cycle: without our own address no anonymity can be graded.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("judge url {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("direct request to the judge failed: {0}")]
    Unreachable(String),
    #[error("the judge's direct answer is not an httpbin-compatible echo: {0}")]
    NotJudge(DeadReason),
}

/// The judge's URL, split for writing absolute-URI requests.
#[derive(Clone, Debug, PartialEq, Eq)]
struct JudgeTarget {
    /// `host[:port]` as the URL spells it, for the request line and `Host`.
    authority: String,
    /// Starts with `/`; may carry a query.
    path_and_query: String,
}

impl JudgeTarget {
    fn parse(url: &str) -> Result<JudgeTarget, JudgeError> {
        let bad = |reason| JudgeError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let scheme_end = url
            .find("://")
            .ok_or_else(|| bad("expected http://host/path"))?;
        if !url[..scheme_end].eq_ignore_ascii_case("http") {
            return Err(bad("expected an http:// url (checks are plain http)"));
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
        Ok(JudgeTarget {
            authority: authority.to_string(),
            path_and_query,
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
            "http://{}{}{separator}{NONCE_ARG}={nonce}",
            self.authority, self.path_and_query
        );
        let expect = JudgeExpectations {
            nonce: Some((NONCE_ARG.to_string(), nonce)),
        };
        (url, expect)
    }
}

/// Checks proxies against one judge. `Send + Sync`: build once, share by
/// reference across the validator's threads.
#[derive(Debug)]
pub struct Checker {
    config: CheckConfig,
    judge: JudgeTarget,
}

impl Checker {
    pub fn new(config: CheckConfig) -> Result<Checker, JudgeError> {
        let judge = JudgeTarget::parse(&config.judge_url)?;
        Ok(Checker { config, judge })
    }

    /// The longest one [`Checker::check`] can take: the whole-check budget,
    /// which the CONNECT follow-up shares.
    pub fn max_check_duration(&self) -> Duration {
        self.config.timeout
    }

    /// Our own public address, from one direct request to the judge.
    pub fn learn_own_ip(&self) -> Result<IpAddr, JudgeError> {
        let (url, expect) = self.judge.fresh_url();
        let agent = self.agent(None, self.config.timeout);
        let (status, body) = self
            .get(&agent, &url)
            .map_err(|error| JudgeError::Unreachable(error.to_string()))?;
        let view = classify(status, &body, &expect).map_err(JudgeError::NotJudge)?;
        Ok(view.exit_ip())
    }

    /// Checks one proxy; never fails, a dead proxy is an outcome.
    pub fn check(&self, proxy: &ProxyKey, own_ip: IpAddr) -> CheckOutcome {
        let started = Instant::now();
        let deadline = started + self.config.timeout;
        let (url, expect) = self.judge.fresh_url();
        let answer = match proxy.protocol {
            Protocol::Http | Protocol::Https => {
                let answer_deadline = deadline - self.config.timeout / CONNECT_SHARE;
                self.absolute_uri_get(proxy, &url, answer_deadline)
            }
            Protocol::Socks4 => self.socks4_get(proxy, &url, deadline),
            Protocol::Socks5 => self.socks_get(proxy, &url),
        };
        let view = match answer.and_then(|(status, body)| classify(status, &body, &expect)) {
            Ok(view) => view,
            Err(reason) => {
                log::debug!("check {}: dead, {reason}", proxy.redacted());
                return CheckOutcome::dead(reason);
            }
        };
        let latency_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        let (grade, evidence) = anonymity(&view, own_ip);
        let supports_https = if proxy.protocol.is_http() {
            self.tunnels_connect(proxy, deadline)
        } else {
            true
        };
        log::debug!(
            "check {}: alive, {latency_ms} ms, {grade}, connect {supports_https}",
            proxy.redacted()
        );
        CheckOutcome {
            alive: true,
            dead_reason: None,
            latency_ms: Some(latency_ms),
            anonymity: Some(grade),
            evidence,
            supports_https: Some(supports_https),
            exit_ip: Some(view.exit_ip()),
        }
    }

    /// The one request a proxy may rewrite: `GET http://judge/... HTTP/1.1`.
    fn absolute_uri_get(
        &self,
        proxy: &ProxyKey,
        url: &str,
        deadline: Instant,
    ) -> Result<(u16, Vec<u8>), DeadReason> {
        let request = absolute_uri_request(url, &self.judge.authority, proxy);
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

    /// SOCKS4 by hand: ureq sends an empty user id, so a proxy listed with
    /// one (and requiring it) would look dead.
    fn socks4_get(
        &self,
        proxy: &ProxyKey,
        url: &str,
        deadline: Instant,
    ) -> Result<(u16, Vec<u8>), DeadReason> {
        let target = judge_ipv4(&self.judge.authority)?;
        let path = url
            .strip_prefix("http://")
            .and_then(|rest| rest.strip_prefix(self.judge.authority.as_str()))
            .unwrap_or("/");
        let request = judge_request(path, &self.judge.authority, None);
        let limits = Limits {
            max_head_bytes: MAX_HEAD_BYTES,
            max_body_bytes: self.config.max_body_bytes,
        };
        let response = raw_http::exchange_socks4(
            SocketAddr::new(proxy.ip, proxy.port),
            proxy.username.as_deref().unwrap_or(""),
            target,
            &request,
            self.config.connect_timeout,
            deadline,
            limits,
        )?;
        Ok((response.status, response.body))
    }

    fn socks_get(&self, proxy: &ProxyKey, url: &str) -> Result<(u16, Vec<u8>), DeadReason> {
        let protocol = match proxy.protocol {
            Protocol::Socks4 => ProxyProtocol::Socks4,
            _ => ProxyProtocol::Socks5,
        };
        let ureq_proxy = ureq_proxy(protocol, proxy)?;
        let agent = self.agent(Some(ureq_proxy), self.config.timeout);
        self.get(&agent, url)
            .map_err(|error| ureq_reason(error, true))
    }

    /// Whether the proxy also tunnels CONNECT to the judge, within what is
    /// left of the check's deadline (at least the share kept back for it).
    fn tunnels_connect(&self, proxy: &ProxyKey, deadline: Instant) -> bool {
        let budget = deadline.saturating_duration_since(Instant::now());
        if budget.is_zero() {
            return false;
        }
        let (url, expect) = self.judge.fresh_url();
        let answer = ureq_proxy(ProxyProtocol::Http, proxy).and_then(|ureq_proxy| {
            let agent = self.agent(Some(ureq_proxy), budget);
            self.get(&agent, &url)
                .map_err(|error| ureq_reason(error, false))
        });
        match answer.and_then(|(status, body)| classify(status, &body, &expect)) {
            Ok(_) => true,
            Err(reason) => {
                log::debug!("check {}: no CONNECT, {reason}", proxy.redacted());
                false
            }
        }
    }

    fn agent(&self, proxy: Option<Proxy>, budget: Duration) -> Agent {
        let config = Agent::config_builder()
            // Set even when `None`: the default would read proxies from
            // the environment and skew every check.
            .proxy(proxy)
            .timeout_global(Some(budget))
            .timeout_connect(Some(self.config.connect_timeout.min(budget)))
            .http_status_as_error(false)
            .max_redirects(0)
            .max_response_header_size(MAX_HEAD_BYTES)
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .user_agent(USER_AGENT)
            .build();
        Agent::new_with_config(config)
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

/// The absolute-URI request, with `Proxy-Authorization` when the proxy has
/// credentials.
fn absolute_uri_request(url: &str, authority: &str, proxy: &ProxyKey) -> Vec<u8> {
    judge_request(url, authority, Some(proxy))
}

/// A GET of `target` (an absolute URI for an http proxy, a path inside a
/// tunnel), with `Proxy-Authorization` when `proxy` has credentials.
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

/// The judge's IPv4 address: SOCKS4 cannot name a host or an IPv6 address.
fn judge_ipv4(authority: &str) -> Result<SocketAddrV4, DeadReason> {
    let has_port = !authority.ends_with(']')
        && authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    let with_port = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addresses = with_port
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

fn ureq_proxy(protocol: ProxyProtocol, proxy: &ProxyKey) -> Result<Proxy, DeadReason> {
    let host = match proxy.ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let mut builder = Proxy::builder(protocol).host(&host).port(proxy.port);
    if let Some(user) = &proxy.username {
        builder = builder.username(user);
        if let Some(password) = &proxy.password {
            builder = builder.password(password);
        }
    }
    // A key that ureq cannot express (odd credentials) is not checkable.
    builder
        .build()
        .map_err(|error| DeadReason::Io(format!("proxy not expressible: {error}")))
}

/// Maps a ureq failure to the reason statistics want.
fn ureq_reason(error: ureq::Error, socks: bool) -> DeadReason {
    use std::io::ErrorKind;
    match error {
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => {
            DeadReason::ConnectTimeout
        }
        ureq::Error::Timeout(_) => DeadReason::Timeout,
        ureq::Error::Io(io_error) => {
            let handshake_failure = matches!(
                io_error.kind(),
                ErrorKind::Other
                    | ErrorKind::InvalidData
                    | ErrorKind::InvalidInput
                    | ErrorKind::PermissionDenied
            );
            if socks && handshake_failure {
                DeadReason::Socks(io_error.to_string())
            } else {
                raw_http::connect_error(io_error)
            }
        }
        ureq::Error::BodyExceedsLimit(_) | ureq::Error::LargeResponseHeader(..) => {
            DeadReason::TooLarge
        }
        ureq::Error::Protocol(_) => DeadReason::Garbage,
        ureq::Error::ConnectProxyFailed(detail) => DeadReason::Tunnel(detail),
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => DeadReason::Unreachable,
        other => DeadReason::Io(other.to_string()),
    }
}

/// Standard base64 with padding, for `Proxy-Authorization`.
fn base64(input: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(input)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::thread;

    use super::*;

    const EXIT: &str = "198.51.100.9";

    fn own() -> IpAddr {
        "203.0.113.7".parse().unwrap()
    }

    fn checker(judge_port: u16, timeout_ms: u64) -> Checker {
        Checker::new(CheckConfig {
            judge_url: format!("http://127.0.0.1:{judge_port}/get"),
            timeout: Duration::from_millis(timeout_ms),
            connect_timeout: Duration::from_millis(timeout_ms.min(1000)),
            max_body_bytes: 64 * 1024,
        })
        .unwrap()
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
    fn read_head(stream: &mut TcpStream) -> String {
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

    fn respond(stream: &mut TcpStream, status: &str, body: &str) {
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
        let head = if head.starts_with("CONNECT 127.0.0.1:") {
            let _ = stream.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
            read_head(&mut stream)
        } else {
            head
        };
        respond(&mut stream, "200 OK", &echo_body(&head, EXIT, &[]));
    }

    #[test]
    fn anonymous_proxy_is_alive_and_refused_connect_is_recorded() {
        let port = fake(via_proxy_without_connect);
        for protocol in [Protocol::Http, Protocol::Https] {
            let outcome = checker(9, 3000).check(&key(protocol, port), own());
            assert!(outcome.alive, "{outcome:?}");
            assert_eq!(outcome.dead_reason, None);
            assert_eq!(outcome.anonymity, Some(Anonymity::Anonymous));
            assert_eq!(outcome.evidence, vec!["Via: 1.1 fake".to_string()]);
            assert_eq!(outcome.supports_https, Some(false));
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
        let outcome = checker(9, 3000).check(&with_auth, own());
        assert!(outcome.alive, "{outcome:?}");
        assert_eq!(outcome.anonymity, Some(Anonymity::Elite));
        assert!(outcome.evidence.is_empty());
        assert_eq!(outcome.supports_https, Some(true));
    }

    #[test]
    fn missing_credentials_are_dead_proxy_auth_required() {
        let port = fake(elite_proxy_with_auth_and_connect);
        let outcome = checker(9, 3000).check(&key(Protocol::Http, port), own());
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
        let outcome = checker(9, 3000).check(&key(Protocol::Http, fake(serve)), own());
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
        let outcome = checker(9, 3000).check(&key(Protocol::Http, fake(serve)), own());
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

    /// Guards the whole-check bound: the CONNECT follow-up shares the
    /// validation timeout instead of getting a share on top of it.
    #[test]
    fn a_check_with_a_hanging_tunnel_ends_within_the_timeout() {
        let timeout = Duration::from_millis(1000);
        // Answered quickly: alive, the tunnel's silence costs the rest.
        let port = fake(|stream| slow_answer_hanging_tunnel(stream, 0));
        let started = Instant::now();
        let outcome = checker(9, 1000).check(&key(Protocol::Http, port), own());
        let elapsed = started.elapsed();
        assert!(outcome.alive, "{outcome:?}");
        assert_eq!(outcome.supports_https, Some(false));
        assert!(elapsed < timeout + timeout / 10, "{elapsed:?}");
        // Answered after 9/10 of the timeout: no room is left for the
        // CONNECT share, so the proxy is too slow, and the check still ends
        // before the timeout (it used to last 1.1 times it).
        let port = fake(|stream| slow_answer_hanging_tunnel(stream, 900));
        let started = Instant::now();
        let outcome = checker(9, 1000).check(&key(Protocol::Http, port), own());
        let elapsed = started.elapsed();
        assert_eq!(
            outcome.dead_reason,
            Some(DeadReason::Timeout),
            "{outcome:?}"
        );
        assert!(elapsed < timeout, "{elapsed:?}");
    }

    fn dead_reason_from(serve: fn(TcpStream), timeout_ms: u64) -> (DeadReason, Duration) {
        let port = fake(serve);
        let started = Instant::now();
        let outcome = checker(9, timeout_ms).check(&key(Protocol::Http, port), own());
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
        let outcome = checker(9, 3000).check(&key(Protocol::Http, port), own());
        assert_eq!(outcome.dead_reason, Some(DeadReason::Refused));
        let outcome = checker(9, 3000).check(&key(Protocol::Socks5, port), own());
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
            judge_url: "http://127.0.0.1:9/get".into(),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(300),
            max_body_bytes: 64 * 1024,
        };
        let checker = Checker::new(config.clone()).unwrap();
        for protocol in [Protocol::Http, Protocol::Socks4, Protocol::Socks5] {
            let started = Instant::now();
            let outcome = checker.check(&key(protocol, address.port()), own());
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
        let head = read_head(&mut stream);
        respond(&mut stream, "200 OK", &echo_body(&head, EXIT, &[]));
    }

    #[test]
    fn socks5_proxy_is_alive_and_tunnels_anything() {
        let port = fake(|stream| socks5(stream, false));
        let outcome = checker(9, 3000).check(&key(Protocol::Socks5, port), own());
        assert!(outcome.alive, "{outcome:?}");
        assert_eq!(outcome.anonymity, Some(Anonymity::Elite));
        assert_eq!(outcome.supports_https, Some(true));
        assert_eq!(outcome.exit_ip, Some(EXIT.parse().unwrap()));
    }

    #[test]
    fn socks5_refusal_is_a_socks_reason() {
        let port = fake(|stream| socks5(stream, true));
        let outcome = checker(9, 3000).check(&key(Protocol::Socks5, port), own());
        assert!(
            matches!(outcome.dead_reason, Some(DeadReason::Socks(_))),
            "{outcome:?}"
        );
    }

    /// A SOCKS4 proxy that plays the judge inside the tunnel.
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
        let outcome = checker(9, 3000).check(&listed, own());
        assert!(outcome.alive, "{outcome:?}");
        let mut wrong = key(Protocol::Socks4, fake(socks4_with_user_id));
        wrong.username = Some("someone".into());
        let outcome = checker(9, 3000).check(&wrong, own());
        assert!(
            matches!(outcome.dead_reason, Some(DeadReason::Socks(_))),
            "{outcome:?}"
        );
    }

    #[test]
    fn socks4_proxy_is_alive() {
        let outcome = checker(9, 3000).check(&key(Protocol::Socks4, fake(socks4)), own());
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
        let target = JudgeTarget::parse("http://127.0.0.1:8080/judge?x=1#frag").unwrap();
        assert_eq!(target.authority, "127.0.0.1:8080");
        assert_eq!(target.path_and_query, "/judge?x=1");
        let (url, expect) = target.fresh_url();
        let (_, nonce) = expect.nonce.unwrap();
        assert_eq!(
            url,
            format!("http://127.0.0.1:8080/judge?x=1&pp_nonce={nonce}")
        );
        assert_eq!(
            JudgeTarget::parse("http://judge").unwrap().path_and_query,
            "/"
        );
        for bad in [
            "https://judge/get",
            "judge/get",
            "http:///get",
            "http://u:p@j/get",
            "http://a b/",
        ] {
            assert!(JudgeTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    }

    #[test]
    fn checker_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Checker>();
    }
}
