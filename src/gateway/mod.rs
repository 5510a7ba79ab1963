//! The rotating gateway: the pool as one proxy endpoint, for clients that
//! take one proxy setting (browsers, curl, crawler frameworks). One port
//! speaks HTTP proxy (absolute-URI requests and CONNECT) and SOCKS5, told
//! apart by the first byte. Each request or tunnel leaves through a pool
//! proxy that the state chooses exactly as for get-proxy, and its outcome
//! is fed back exactly as POST /feedback would.
//!
//! Threads: one accept thread, one per client connection (up to
//! `max_connections`), and one more per open tunnel for its second
//! direction. Every read and write has a deadline.

pub mod options;
mod relay;
mod session;
mod socks;
mod target;
mod upstream;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;

use crate::config::GatewayConfig;
use crate::metrics::GatewayMetrics;
use crate::proxy::ProxyKey;
use crate::state::{proxy_key_of_url, NoProxy, Pick, PickQuery, State};

use crate::http::io::{read_request_head, Bound, ReadError};
use crate::http::{encode_response, AnswerOptions, Framing, HeadLimits, RequestHead, ResponseHead};
use options::{check_password, parse_username, ClientOptions};
use session::Sessions;
use target::Target;
use upstream::{Failure, FailureReason, PlainRequest};

pub use upstream::FailureReason as GatewayFailureReason;

/// The first request head must arrive whole within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// An answer of the gateway's own must be written within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A plain request's body is buffered (to be sent again on a retry) up to this.
const MAX_REQUEST_BODY: u64 = 8 << 20;
/// Connection threads mostly copy bytes.
const CONNECTION_STACK: usize = 256 * 1024;
/// Expired sessions are dropped this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// The outcomes of plain http requests, as counted.
pub const REQUEST_OUTCOMES: &[&str] =
    &["ok", "target_refused", "all_failed", "no_proxy", "refused"];
/// The outcomes of tunnels, as counted: `ok` when the target sent a byte
/// back, `silent` when it never did.
pub const TUNNEL_OUTCOMES: &[&str] = &["ok", "silent", "all_failed", "no_proxy", "refused"];

/// Why the gateway cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("[gateway] bind = {bind} is not a loopback address and [server] api_token is empty: the gateway would be an open proxy into the internet for anyone who can reach it; set api_token or bind to 127.0.0.1")]
    OpenProxy { bind: SocketAddr },
    #[error("cannot listen on {bind}: {source}")]
    Listen { bind: SocketAddr, source: io::Error },
}

/// What every connection thread shares.
struct Shared {
    config: GatewayConfig,
    token: Option<String>,
    state: Arc<State>,
    metrics: GatewayMetrics,
    sessions: Sessions,
    stopping: AtomicBool,
    open: AtomicUsize,
}

/// A running gateway; [`Gateway::stop`] stops accepting.
pub struct Gateway {
    pub local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

/// Refuses an open proxy: a bind address other than loopback without a token.
pub fn check_not_open(config: &GatewayConfig, token: Option<&str>) -> Result<(), StartError> {
    match config.bind {
        Some(bind) if !bind.ip().is_loopback() && token.is_none() => {
            Err(StartError::OpenProxy { bind })
        }
        _ => Ok(()),
    }
}

impl Gateway {
    /// Binds `config.bind` (which must be set) and starts accepting.
    pub fn start(
        config: &GatewayConfig,
        token: Option<String>,
        state: Arc<State>,
        metrics: GatewayMetrics,
    ) -> Result<Gateway, StartError> {
        check_not_open(config, token.as_deref())?;
        let bind = config.bind.unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
        let listener =
            TcpListener::bind(bind).map_err(|source| StartError::Listen { bind, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartError::Listen { bind, source })?;
        let shared = Arc::new(Shared {
            sessions: Sessions::new(config.session_ttl),
            config: config.clone(),
            token,
            state,
            metrics,
            stopping: AtomicBool::new(false),
            open: AtomicUsize::new(0),
        });
        let accept = thread::Builder::new()
            .name("gateway-accept".into())
            .spawn({
                let shared = shared.clone();
                move || accept_loop(listener, shared)
            })
            .map_err(|source| StartError::Listen { bind, source })?;
        Ok(Gateway {
            local_addr,
            shared,
            accept: Some(accept),
        })
    }

    /// Stops accepting. Connections in progress run to their end.
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let Some(accept) = self.accept.take() else {
            return;
        };
        crate::http::io::wake_accept(self.local_addr);
        if accept.join().is_err() {
            log::error!("gateway: the accept thread panicked");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut last_error: Option<(String, Instant)> = None;
    let mut last_sweep = Instant::now();
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        if last_sweep.elapsed() >= SWEEP_INTERVAL {
            last_sweep = Instant::now();
            let left = shared.sessions.sweep(last_sweep);
            shared.metrics.sessions.set(left as i64);
        }
        let (stream, _peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                let message = err.to_string();
                let repeat = last_error
                    .as_ref()
                    .is_some_and(|(m, at)| *m == message && at.elapsed() < Duration::from_secs(60));
                if !repeat {
                    log::warn!("gateway: accept failed: {message}; retrying");
                    last_error = Some((message, Instant::now()));
                }
                if err.kind() != io::ErrorKind::ConnectionAborted {
                    thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        let Some(guard) = OpenGuard::take(&shared) else {
            shared.metrics.connections_refused.inc();
            refuse_over_cap(stream);
            continue;
        };
        shared.metrics.connections_total.inc();
        let spawned = thread::Builder::new()
            .name("gateway-conn".into())
            .stack_size(CONNECTION_STACK)
            .spawn({
                let shared = shared.clone();
                move || {
                    let _open = guard;
                    serve_connection(stream, &shared);
                }
            });
        if let Err(err) = spawned {
            log::warn!("gateway: cannot start a connection thread: {err}");
        }
    }
}

/// Counts a connection as open while alive.
struct OpenGuard {
    shared: Arc<Shared>,
}

impl OpenGuard {
    fn take(shared: &Arc<Shared>) -> Option<OpenGuard> {
        let taken = shared
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < shared.config.max_connections).then_some(open + 1)
            });
        taken.ok()?;
        shared.metrics.connections_open.inc();
        Some(OpenGuard {
            shared: Arc::clone(shared),
        })
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
        self.shared.metrics.connections_open.dec();
    }
}

/// Beyond `max_connections`: a 503 to an http client, a closed connection
/// to a socks one, without waiting (the accept thread must not block).
fn refuse_over_cap(stream: TcpStream) {
    let _ = stream.set_nonblocking(true);
    let mut first = [0u8; 1];
    let is_socks = matches!(stream.peek(&mut first), Ok(1) if first[0] == 4 || first[0] == 5);
    if !is_socks {
        let answer = error_answer(
            503,
            &[],
            &json!({"error": "too many connections: try again later"}),
        );
        let _ = (&stream).write_all(&answer);
    }
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(HEAD_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut first = [0u8; 1];
    match stream.peek(&mut first) {
        Ok(1) => {}
        _ => return,
    }
    match first[0] {
        5 => serve_socks5(stream, shared),
        4 => {
            // A socks4 request is refused with its own reply.
            let _ = (&stream).write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]);
        }
        _ => serve_http(stream, shared),
    }
}

// ---- choosing and retrying ----

/// Every attempt failed, or no proxy could be chosen.
struct NoTunnel {
    attempts: Vec<(String, Failure)>,
    no_proxy: Option<NoProxy>,
}

impl NoTunnel {
    fn json(&self, source: &str) -> serde_json::Value {
        let attempts: Vec<_> = self
            .attempts
            .iter()
            .map(|(proxy, failure)| {
                json!({
                    "proxy": proxy,
                    "reason": failure.reason.as_str(),
                    "detail": failure.detail,
                })
            })
            .collect();
        match (&self.no_proxy, attempts.is_empty()) {
            (Some(no_proxy), true) => json!({
                "error": "no proxy available",
                "source": source,
                "reason": no_proxy.reason.as_str(),
            }),
            _ => json!({
                "error": format!("every attempt failed ({} pool proxies tried)", attempts.len()),
                "source": source,
                "attempts": attempts,
            }),
        }
    }

    /// 503 when nothing could be tried, else 502.
    fn status(&self) -> u16 {
        if self.attempts.is_empty() {
            503
        } else {
            502
        }
    }
}

impl Shared {
    /// Tries pool proxies for `client` until `attempt` succeeds, at most
    /// `attempts` of them: the session's proxy first while it is eligible,
    /// then get-proxy's choice. Each failure is a failure feedback.
    fn with_attempts<T>(
        &self,
        client: &ClientOptions,
        mut attempt: impl FnMut(&ProxyKey) -> Result<T, Failure>,
    ) -> Result<(T, Pick), NoTunnel> {
        let mut tried: Vec<(String, Failure)> = Vec::new();
        let mut tried_urls: Vec<String> = Vec::new();
        let mut session_pick = None;
        if let Some(id) = &client.session {
            let pin = self
                .sessions
                .get(&client.source, id, Instant::now())
                .unwrap_or_default();
            if let Some(url) = pin.url {
                session_pick =
                    self.state
                        .pick_if_eligible(&client.source, &url, &client.query, Utc::now());
                if session_pick.is_none() {
                    self.sessions.fail(&client.source, id, &url, Instant::now());
                    tried_urls.push(url);
                }
            }
            // The proxy that failed the session last is not chosen again.
            tried_urls.extend(pin.failed);
        }
        let mut no_proxy = None;
        let mut may_reuse_failed = true;
        while tried.len() < self.config.attempts {
            let pick = match session_pick.take() {
                Some(pick) => pick,
                None => match self.choose(client, &tried_urls) {
                    Ok(Some(pick)) => pick,
                    // The session's failed proxy is the only one left: it
                    // is better than none.
                    Ok(None) if tried.is_empty() && !tried_urls.is_empty() && may_reuse_failed => {
                        may_reuse_failed = false;
                        tried_urls.clear();
                        continue;
                    }
                    Ok(None) => break,
                    Err(err) => {
                        no_proxy = Some(err);
                        break;
                    }
                },
            };
            let key = proxy_key_of_url(&pick.url)
                .unwrap_or_else(|| ProxyKey::new(pick.protocol, pick.ip, pick.port));
            self.metrics.attempts.inc();
            match attempt(&key) {
                Ok(value) => {
                    if let Some(id) = &client.session {
                        self.sessions
                            .pin(&client.source, id, &pick.url, Instant::now());
                        self.metrics.sessions.set(self.sessions.len() as i64);
                    }
                    return Ok((value, pick));
                }
                Err(failure) => {
                    log::debug!(
                        "gateway: {} via {} failed: {} ({})",
                        client.source,
                        key.redacted(),
                        failure.reason.as_str(),
                        failure.detail
                    );
                    self.count_failure(client, &pick, failure.reason);
                    if let Some(id) = &client.session {
                        self.sessions
                            .fail(&client.source, id, &pick.url, Instant::now());
                    }
                    tried_urls.push(pick.url.clone());
                    tried.push((key.redacted(), failure));
                }
            }
        }
        Err(NoTunnel {
            attempts: tried,
            no_proxy,
        })
    }

    /// get-proxy's choice of one proxy not tried yet: as many distinct
    /// proxies as tried + 1, the first new one. `Ok(None)` when every
    /// eligible proxy was tried.
    fn choose(&self, client: &ClientOptions, tried: &[String]) -> Result<Option<Pick>, NoProxy> {
        let query = PickQuery {
            count: tried.len() + 1,
            ..client.query.clone()
        };
        let picks = self.state.get_proxy(&client.source, &query, Utc::now())?;
        Ok(picks.into_iter().find(|pick| !tried.contains(&pick.url)))
    }

    fn count_failure(&self, client: &ClientOptions, pick: &Pick, reason: FailureReason) {
        self.metrics
            .failures
            .with_label_values(&[reason.as_str()])
            .inc();
        self.feedback(client, pick, false);
    }

    fn feedback(&self, client: &ClientOptions, pick: &Pick, success: bool) {
        if let Err(err) = self
            .state
            .feedback(&client.source, &pick.url, success, Utc::now())
        {
            log::debug!(
                "gateway: feedback for {} not recorded: {err}",
                client.source
            );
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.config.connect_timeout
    }

    fn count_bytes(&self, to_client: u64, to_target: u64) {
        self.metrics
            .bytes
            .with_label_values(&["to_client"])
            .inc_by(to_client);
        self.metrics
            .bytes
            .with_label_values(&["to_target"])
            .inc_by(to_target);
    }

    fn count_request(&self, outcome: &str) {
        self.metrics.requests.with_label_values(&[outcome]).inc();
    }

    fn count_tunnel(&self, outcome: &str) {
        self.metrics.tunnels.with_label_values(&[outcome]).inc();
    }
}

// ---- HTTP and CONNECT ----

/// An answer of the gateway's own, JSON, closing the connection.
fn error_answer(status: u16, extra: &[(&str, &str)], body: &serde_json::Value) -> Vec<u8> {
    let body = body.to_string();
    let mut headers: Vec<(String, String)> = extra
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    headers.push(("Content-Type".into(), "application/json".into()));
    let mut answer = Vec::new();
    let options = AnswerOptions {
        close: true,
        head_only: false,
    };
    encode_response(&mut answer, status, &headers, body.as_bytes(), options);
    answer
}

/// A pool proxy's answer head as relayed to the client: its status and
/// headers (its own framing included: the body is copied as it came), less
/// the hop-by-hop ones, plus `extra`. The shared encoder computes framing
/// from a body it holds, which a relay does not have.
fn relayed_head(answer: &ResponseHead, extra: &[(String, String)]) -> Vec<u8> {
    let reason = if answer.reason.is_empty() {
        crate::http::reason(answer.status)
    } else {
        &answer.reason
    };
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", answer.status).into_bytes();
    let kept = answer
        .headers
        .0
        .iter()
        .filter(|(name, _)| !is_hop_by_hop(name));
    for (name, value) in kept.chain(extra) {
        if [name, value]
            .iter()
            .any(|t| t.bytes().any(|b| b == b'\r' || b == b'\n'))
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Hop-by-hop headers a proxy never forwards.
fn is_hop_by_hop(name: &str) -> bool {
    const HOP: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// The caps on a client's request head.
const CLIENT_LIMITS: HeadLimits = HeadLimits {
    max_head_bytes: 32 * 1024,
    max_headers: 100,
};

fn send_error(stream: &mut TcpStream, status: u16, message: &str) {
    let _ = stream.write_all(&error_answer(status, &[], &json!({ "error": message })));
}

/// The username and password of `Proxy-Authorization: Basic`.
fn proxy_credentials(head: &RequestHead) -> Result<(Option<String>, Option<String>), String> {
    let Some(value) = head.header("proxy-authorization") else {
        return Ok((None, None));
    };
    let (scheme, encoded) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err("expected Proxy-Authorization: Basic".into());
    }
    let decoded =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or("Proxy-Authorization is not base64 of user:password")?;
    let (user, pass) = decoded.split_once(':').unwrap_or((&decoded, ""));
    Ok((Some(user.to_string()), Some(pass.to_string())))
}

fn serve_http(mut stream: TcpStream, shared: &Shared) {
    let mut pending = Vec::new();
    let mut wait = HEAD_TIMEOUT;
    loop {
        let bound = Bound::until(Instant::now() + wait);
        let head = match read_request_head(&mut stream, &mut pending, bound, CLIENT_LIMITS) {
            Ok(head) => head,
            Err(ReadError::Head(err)) => {
                let message = format!("{err}: expected an HTTP/1 proxy request");
                return send_error(&mut stream, err.status(), &message);
            }
            Err(_) => return,
        };
        let Some(client) = authorize(&mut stream, &head, shared) else {
            return;
        };
        if head.method.eq_ignore_ascii_case("CONNECT") {
            return serve_connect(stream, &head, pending, &client, shared);
        }
        match serve_plain(&mut stream, &head, &mut pending, &client, shared) {
            true => wait = shared.config.idle_timeout,
            false => return,
        }
    }
}

/// Checks the credentials and reads the options, answering 407 or 400.
fn authorize(stream: &mut TcpStream, head: &RequestHead, shared: &Shared) -> Option<ClientOptions> {
    let refuse_auth = |stream: &mut TcpStream, message: &str| {
        shared.count_request("refused");
        let answer = error_answer(
            407,
            &[("Proxy-Authenticate", "Basic realm=\"proxy-pool\"")],
            &json!({ "error": message }),
        );
        let _ = stream.write_all(&answer);
    };
    let (user, pass) = match proxy_credentials(head) {
        Ok(credentials) => credentials,
        Err(message) => {
            refuse_auth(stream, &message);
            return None;
        }
    };
    if let Err(err) = check_password(pass.as_deref(), shared.token.as_deref()) {
        refuse_auth(stream, &err.to_string());
        return None;
    }
    match parse_username(user.as_deref()) {
        Ok(client) => Some(client),
        Err(err) => {
            shared.count_request("refused");
            send_error(stream, 400, &err.to_string());
            None
        }
    }
}

fn serve_connect(
    mut stream: TcpStream,
    head: &RequestHead,
    pending: Vec<u8>,
    client: &ClientOptions,
    shared: &Shared,
) {
    let Some(target) = Target::from_authority(&head.target) else {
        shared.count_tunnel("refused");
        return send_error(&mut stream, 400, "bad CONNECT target: expected host:port");
    };
    if target.is_private() && !shared.config.allow_private_targets {
        shared.count_tunnel("refused");
        return send_error(&mut stream, 403, "target is a private address: refused");
    }
    let opened = shared.with_attempts(client, |key| {
        upstream::open_tunnel(key, &target, shared.deadline())
    });
    let (upstream, pick) = match opened {
        Ok(opened) => opened,
        Err(no_tunnel) => {
            shared.count_tunnel(if no_tunnel.attempts.is_empty() {
                "no_proxy"
            } else {
                "all_failed"
            });
            let answer = error_answer(no_tunnel.status(), &[], &no_tunnel.json(&client.source));
            let _ = stream.write_all(&answer);
            return;
        }
    };
    let established = format!(
        "HTTP/1.1 200 Connection established\r\nX-Proxy-Pool-Proxy: {}\r\n\r\n",
        pick.url
    );
    if stream.write_all(established.as_bytes()).is_err() {
        return;
    }
    run_tunnel(stream, upstream, &pending, client, &pick, &target, shared);
}

/// Relays a tunnel and records its outcome.
fn run_tunnel(
    client_stream: TcpStream,
    upstream: upstream::Upstream,
    client_pending: &[u8],
    client: &ClientOptions,
    pick: &Pick,
    target: &Target,
    shared: &Shared,
) {
    let started = Instant::now();
    let mut answered = false;
    let bytes = relay::tunnel(
        client_stream,
        upstream.stream,
        client_pending,
        &upstream.pending,
        shared.config.idle_timeout,
        || {
            answered = true;
            shared.feedback(client, pick, true);
        },
    );
    shared.count_bytes(bytes.to_client, bytes.to_target);
    shared.count_tunnel(if answered { "ok" } else { "silent" });
    log::debug!(
        "gateway: {} tunnel {} via {}: {} bytes out, {} back, {} ms",
        client.source,
        target.authority(),
        proxy_key_of_url(&pick.url)
            .map(|k| k.redacted())
            .unwrap_or_default(),
        bytes.to_target,
        bytes.to_client,
        started.elapsed().as_millis()
    );
}

/// Relays one plain http request; `true` when the connection may carry the
/// next one.
fn serve_plain(
    stream: &mut TcpStream,
    head: &RequestHead,
    pending: &mut Vec<u8>,
    client: &ClientOptions,
    shared: &Shared,
) -> bool {
    let Some((target, path)) = Target::from_absolute_uri(&head.target) else {
        shared.count_request("refused");
        send_error(
            stream,
            400,
            "expected an absolute-URI request (GET http://host/path) or CONNECT host:port",
        );
        return false;
    };
    if target.is_private() && !shared.config.allow_private_targets {
        shared.count_request("refused");
        send_error(stream, 403, "target is a private address: refused");
        return false;
    }
    let body = match read_request_body(stream, head, pending) {
        Ok(body) => body,
        Err((status, message)) => {
            shared.count_request("refused");
            send_error(stream, status, message);
            return false;
        }
    };
    let mut headers: Vec<(String, String)> = head
        .headers
        .0
        .iter()
        .filter(|(name, _)| !is_hop_by_hop(name))
        .cloned()
        .collect();
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        headers.insert(0, ("Host".into(), host_header(&target)));
    }
    let absolute_uri = format!("http://{}{}", host_header(&target), path);
    let request = PlainRequest {
        target: &target,
        method: &head.method,
        absolute_uri: &absolute_uri,
        path: &path,
        headers: &headers,
        body: &body,
    };
    let sent = shared.with_attempts(client, |key| {
        upstream::send_plain(key, &request, shared.deadline())
    });
    let ((mut upstream, answer), pick) = match sent {
        Ok(sent) => sent,
        Err(no_tunnel) => {
            shared.count_request(if no_tunnel.attempts.is_empty() {
                "no_proxy"
            } else {
                "all_failed"
            });
            let answer = error_answer(no_tunnel.status(), &[], &no_tunnel.json(&client.source));
            let _ = stream.write_all(&answer);
            return false;
        }
    };
    let refused = matches!(answer.status, 403 | 429);
    if refused {
        shared.count_request("target_refused");
        shared.count_failure(client, &pick, FailureReason::TargetRefused);
        if let Some(id) = &client.session {
            shared
                .sessions
                .fail(&client.source, id, &pick.url, Instant::now());
        }
    } else {
        shared.count_request("ok");
        shared.feedback(client, &pick, true);
    }
    let head_request = head.method.eq_ignore_ascii_case("HEAD");
    let body_framing = Framing::of_response(&answer, head_request).unwrap_or(Framing::UntilClose);
    let keep_alive = head.keep_alive() && body_framing != Framing::UntilClose;
    let extra = [
        ("X-Proxy-Pool-Proxy".to_string(), pick.url.clone()),
        (
            "Connection".to_string(),
            if keep_alive { "keep-alive" } else { "close" }.to_string(),
        ),
    ];
    let out_head = relayed_head(&answer, &extra);
    let _ = upstream
        .stream
        .set_read_timeout(Some(shared.config.idle_timeout));
    let _ = stream.set_write_timeout(Some(shared.config.idle_timeout));
    if stream.write_all(&out_head).is_err() {
        return false;
    }
    let copied = relay::copy_body(
        &mut upstream.stream,
        &mut upstream.pending,
        stream,
        body_framing,
    );
    shared.count_bytes(
        out_head.len() as u64 + copied.as_ref().copied().unwrap_or(0),
        body.len() as u64,
    );
    log::debug!(
        "gateway: {} {} {} -> {} via {}",
        client.source,
        head.method,
        target.authority(),
        answer.status,
        proxy_key_of_url(&pick.url)
            .map(|k| k.redacted())
            .unwrap_or_default(),
    );
    let _ = stream.set_read_timeout(Some(shared.config.idle_timeout));
    keep_alive && copied.is_ok()
}

/// The Host header for `target` (the port left out when it is 80).
fn host_header(target: &Target) -> String {
    if target.port == 80 {
        match target.ip() {
            Some(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => target.host.clone(),
        }
    } else {
        target.authority()
    }
}

/// A plain request's body, read whole (it is sent again on a retry).
fn read_request_body(
    stream: &mut TcpStream,
    head: &RequestHead,
    pending: &mut Vec<u8>,
) -> Result<Vec<u8>, (u16, &'static str)> {
    let length = match Framing::of_request(&head.headers) {
        Ok(Framing::Length(n)) => n,
        Ok(Framing::Empty | Framing::UntilClose) => 0,
        Ok(Framing::Chunked) => {
            return Err((
                411,
                "chunked request bodies are not relayed: send a Content-Length",
            ))
        }
        Err(_) => return Err((400, "bad Content-Length or Transfer-Encoding")),
    };
    if length > MAX_REQUEST_BODY {
        return Err((413, "request body larger than 8 MiB"));
    }
    let length = length as usize;
    let mut body = Vec::with_capacity(length);
    let from_pending = length.min(pending.len());
    body.extend(pending.drain(..from_pending));
    let _ = stream.set_read_timeout(Some(HEAD_TIMEOUT));
    let mut rest = vec![0u8; length - body.len()];
    stream
        .read_exact(&mut rest)
        .map_err(|_| (400, "request body shorter than its Content-Length"))?;
    body.extend_from_slice(&rest);
    Ok(body)
}

// ---- SOCKS5 ----

fn serve_socks5(mut stream: TcpStream, shared: &Shared) {
    let token = shared.token.as_deref();
    let request = match socks::server_handshake(&mut stream, token.is_some(), |password| {
        check_password(password, token).is_ok()
    }) {
        Ok(request) => request,
        Err(err) => {
            log::debug!("gateway: socks handshake ended: {err}");
            if matches!(err, socks::SocksServerError::Refused(_)) {
                shared.count_tunnel("refused");
            }
            return;
        }
    };
    let client = match parse_username(request.username.as_deref()) {
        Ok(client) => client,
        Err(err) => {
            log::debug!("gateway: socks username refused: {err}");
            shared.count_tunnel("refused");
            let _ = socks::reply(&mut stream, socks::REPLY_GENERAL_FAILURE);
            return;
        }
    };
    let target = request.target;
    if target.is_private() && !shared.config.allow_private_targets {
        shared.count_tunnel("refused");
        let _ = socks::reply(&mut stream, socks::REPLY_NOT_ALLOWED);
        return;
    }
    let opened = shared.with_attempts(&client, |key| {
        upstream::open_tunnel(key, &target, shared.deadline())
    });
    let (upstream, pick) = match opened {
        Ok(opened) => opened,
        Err(no_tunnel) => {
            let (outcome, code) = if no_tunnel.attempts.is_empty() {
                ("no_proxy", socks::REPLY_GENERAL_FAILURE)
            } else {
                ("all_failed", socks::REPLY_HOST_UNREACHABLE)
            };
            shared.count_tunnel(outcome);
            let _ = socks::reply(&mut stream, code);
            return;
        }
    };
    if socks::reply(&mut stream, socks::REPLY_OK).is_err() {
        return;
    }
    run_tunnel(stream, upstream, &[], &client, &pick, &target, shared);
}
