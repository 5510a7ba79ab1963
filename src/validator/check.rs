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
//! - socks4 and socks5: one request through the SOCKS tunnel (ureq). A SOCKS
//!   tunnel carries any TCP stream, so a live one has `supports_https = true`.
//!
//! ureq agents are built per check (a proxy is part of an agent's config).
//! That costs a few small allocations, nothing next to a network round trip,
//! and no idle connections are kept.

use std::net::{IpAddr, SocketAddr};
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
/// The CONNECT check gets at least this share of `timeout`, even when the
/// first request used nearly all of it; a whole check therefore lasts at most
/// `timeout * (1 + 1/CONNECT_MIN_SHARE)`, see [`Checker::max_check_duration`].
const CONNECT_MIN_SHARE: u32 = 5;

/// What a check needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckConfig {
    /// An httpbin-compatible `/get` echo, `http://` only.
    pub judge_url: String,
    /// The whole check's budget (see [`Checker::max_check_duration`] for the
    /// CONNECT follow-up).
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
        let scheme_end = url.find("://").ok_or_else(|| bad("expected http://host/path"))?;
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
        if authority.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(bad("expected a host without spaces"));
        }
        let path = path.split('#').next().unwrap_or("/");
        let path_and_query = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if path_and_query.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
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
        let separator = if self.path_and_query.contains('?') { '&' } else { '?' };
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

    /// The longest one [`Checker::check`] can take: the whole-check budget
    /// plus the minimum share kept for the CONNECT follow-up.
    pub fn max_check_duration(&self) -> Duration {
        self.config.timeout + self.config.timeout / CONNECT_MIN_SHARE
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
        let answer = if proxy.protocol.is_http() {
            self.absolute_uri_get(proxy, &url, deadline)
        } else {
            self.socks_get(proxy, &url)
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
    /// left of the deadline but at least a share of the timeout.
    fn tunnels_connect(&self, proxy: &ProxyKey, deadline: Instant) -> bool {
        let floor = self.config.timeout / CONNECT_MIN_SHARE;
        let budget = deadline.saturating_duration_since(Instant::now()).max(floor);
        let (url, expect) = self.judge.fresh_url();
        let answer = ureq_proxy(ProxyProtocol::Http, proxy).and_then(|ureq_proxy| {
            let agent = self.agent(Some(ureq_proxy), budget);
            self.get(&agent, &url).map_err(|error| ureq_reason(error, false))
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
    let mut request = format!(
        "GET {url} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {USER_AGENT}\r\nAccept: application/json, */*;q=0.8\r\n"
    );
    if let Some(user) = &proxy.username {
        let credentials = format!("{user}:{}", proxy.password.as_deref().unwrap_or(""));
        request.push_str("Proxy-Authorization: Basic ");
        request.push_str(&base64(credentials.as_bytes()));
        request.push_str("\r\n");
    }
    request.push_str("Connection: close\r\n\r\n");
    request.into_bytes()
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
    const ALPHABET: &[u8; 64] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for group in input.chunks(3) {
        let bytes = [group[0], *group.get(1).unwrap_or(&0), *group.get(2).unwrap_or(&0)];
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
