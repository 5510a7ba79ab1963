//! The HTTP/1.1 transport under the API: accepts connections, reads each
//! request within deadlines and byte caps, runs the rouille handler on a
//! bounded number of workers, and writes the answer.
//!
//! Why not `rouille::Server` (tiny_http): its accept thread ends for good on
//! the first failed `accept` (a burst of connections that exhausts file
//! descriptors stops the API until restart); its sockets have no timeouts, so
//! a client that sends half a body holds one of the `workers` threads
//! forever (eight such clients stall every other client); a request head is
//! buffered without limit; malformed requests get answers without a JSON
//! body; and its stoppable loop only looks at the stop signal when no
//! request came for a second, so a service under steady load never stops.
//!
//! Here each connection has its own thread (up to `max_connections`, and
//! `max_connections_per_ip` from one client address),
//! which reads the head and body under deadlines; a worker permit (one of
//! `workers`) is held only while the handler runs, never while waiting for a
//! slow client, so slow clients cost a thread each but cannot stall others.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rouille::{Request, Response};

/// The request line and headers together.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
const MAX_HEADERS: usize = 64;
/// A kept-alive connection may wait this long for its next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// A whole answer must be written within this (a client that does not read
/// would otherwise hold its thread as long as it keeps taking a few bytes).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After an answer that ends a connection with the request unread, the rest
/// is read and dropped for this long, so that the client sees the answer
/// instead of a reset.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 4 << 20;
/// Request handlers are ordinary code (serde_json nests up to 128 levels).
const CONNECTION_STACK: usize = 1 << 20;

pub type Handler = dyn Fn(&Request) -> Response + Send + Sync;
/// The body limit of a request, from its path (without the query).
pub type BodyLimit = dyn Fn(&str) -> usize + Send + Sync;

/// The transport's bounds.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Handlers run at once.
    pub workers: usize,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Connections one client address may hold at once; more get a 503.
    pub max_connections_per_ip: usize,
    /// A head must arrive whole within this from its first byte, and then
    /// its body within this from the end of the head.
    pub read_timeout: Duration,
}

/// What every connection thread shares.
struct Shared {
    handler: Box<Handler>,
    body_limit: Box<BodyLimit>,
    limits: Limits,
    stopping: AtomicBool,
    open: AtomicUsize,
    /// Open connections per client address (entries removed at zero).
    open_by_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Worker permits: one is taken to run the handler and given back.
    permits: Permits,
}

/// A running server; [`HttpServer::stop`] stops accepting.
pub struct HttpServer {
    pub local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `bind` and starts accepting within `limits`.
    pub fn start(
        bind: SocketAddr,
        limits: Limits,
        body_limit: Box<BodyLimit>,
        handler: Box<Handler>,
    ) -> io::Result<HttpServer> {
        let listener = TcpListener::bind(bind)?;
        let local_addr = listener.local_addr()?;
        let workers = limits.workers.max(1);
        let permits = Permits::new(workers);
        let shared = Arc::new(Shared {
            handler,
            body_limit,
            limits,
            stopping: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            open_by_ip: Mutex::new(HashMap::new()),
            permits,
        });
        let accept = thread::Builder::new().name("http-accept".into()).spawn({
            let shared = shared.clone();
            move || accept_loop(listener, shared)
        })?;
        Ok(HttpServer {
            local_addr,
            shared,
            accept: Some(accept),
        })
    }

    /// Stops accepting and waits for the accept thread. Requests in progress
    /// finish; their connections close after their answer.
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let Some(accept) = self.accept.take() else {
            return;
        };
        // The accept thread blocks in accept(): a connection wakes it.
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        let _ = accept.join();
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut last_error: Option<(String, Instant)> = None;
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors or memory, or a client that left before
                // being accepted: none of it ends the server. Logged once
                // per distinct error a minute; a short pause instead of a spin.
                let message = err.to_string();
                let repeat = last_error
                    .as_ref()
                    .is_some_and(|(m, at)| *m == message && at.elapsed() < Duration::from_secs(60));
                if !repeat {
                    log::warn!("http: accept failed: {message}; retrying");
                    last_error = Some((message, Instant::now()));
                }
                if err.kind() != io::ErrorKind::ConnectionAborted {
                    thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        let Some(guard) = OpenGuard::take(&shared, peer.ip()) else {
            refuse_over_cap(stream, &shared, peer.ip());
            continue;
        };
        let spawned = thread::Builder::new()
            .name("http-conn".into())
            .stack_size(CONNECTION_STACK)
            .spawn({
                let shared = shared.clone();
                move || {
                    let _open = guard;
                    serve_connection(stream, peer, &shared);
                }
            });
        if let Err(err) = spawned {
            log::warn!("http: cannot start a connection thread: {err}");
        }
    }
}

/// Answers a connection over one of the caps.
fn refuse_over_cap(stream: TcpStream, shared: &Shared, ip: IpAddr) {
    if shared.open.load(Ordering::SeqCst) >= shared.limits.max_connections {
        refuse(stream, "too many connections: try again later");
    } else {
        log::debug!("http: {ip} holds max_connections_per_ip connections");
        refuse(
            stream,
            "too many connections from this address: try again later",
        );
    }
}

/// Counts a connection as open, in all and for its client address, while
/// alive.
struct OpenGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl OpenGuard {
    /// `None` when the connection would exceed a cap.
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<OpenGuard> {
        if shared.open.load(Ordering::SeqCst) >= shared.limits.max_connections {
            return None;
        }
        let mut by_ip = shared.open_by_ip.lock();
        let count = by_ip.entry(ip).or_insert(0);
        if *count >= shared.limits.max_connections_per_ip {
            return None;
        }
        *count += 1;
        shared.open.fetch_add(1, Ordering::SeqCst);
        Some(OpenGuard {
            shared: Arc::clone(shared),
            ip,
        })
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut by_ip = self.shared.open_by_ip.lock();
        if let Some(count) = by_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                by_ip.remove(&self.ip);
            }
        }
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A 503 without waiting for the client (the accept thread must not block).
fn refuse(stream: TcpStream, message: &str) {
    let _ = stream.set_nonblocking(true);
    let answer = error_answer(503, message, true);
    let _ = (&stream).write_all(&answer);
}

/// A request that cannot be answered by the handler, and whether the
/// connection must close after the error answer.
#[derive(Debug)]
struct HttpError {
    status: u16,
    message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

/// A parsed request head.
struct Head {
    method: String,
    target: String,
    /// HTTP/1.1 (true) or 1.0.
    http11: bool,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn wants_close(&self) -> bool {
        let connection = self.header("Connection").unwrap_or("").to_ascii_lowercase();
        let has = |token: &str| connection.split(',').any(|t| t.trim() == token);
        if self.http11 {
            has("close")
        } else {
            !has("keep-alive")
        }
    }
}

fn serve_connection(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    // Bytes read beyond the current request (a pipelined next one).
    let mut pending: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let read_timeout = shared.limits.read_timeout;
        let head = match read_head(&mut stream, &mut pending, read_timeout) {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(err) => return fail(&mut stream, err),
        };
        let path = head.target.split('?').next().unwrap_or("");
        let limit = (shared.body_limit)(path);
        let body = match read_body(&mut stream, &mut pending, &head, limit, read_timeout) {
            Ok(body) => body,
            Err(err) => return fail(&mut stream, err),
        };
        let close = head.wants_close() || shared.stopping.load(Ordering::SeqCst);
        let is_head = head.method == "HEAD";
        let request = Request::fake_http_from(peer, head.method, head.target, head.headers, body);
        let (status, headers, data) = {
            let _permit = shared.permits.take();
            run_handler(&shared.handler, &request)
        };
        let answer = encode_answer(status, &headers, &data, close, is_head);
        if write_answer(&mut stream, &answer).is_err() || close {
            let _ = stream.shutdown(Shutdown::Write);
            return;
        }
    }
}

/// The `workers` permits, handed out first come, first served.
///
/// A channel of tokens (or a plain counting semaphore) lets a thread that
/// arrives just as a permit is released take it ahead of the thread that was
/// woken for it, which then queues again at the back: under saturation a few
/// requests wait for many others and the latency's tail grows to tens of
/// milliseconds. Here a released permit goes straight to the longest waiter.
struct Permits {
    state: Mutex<PermitState>,
}

struct PermitState {
    free: usize,
    waiting: VecDeque<Arc<Waiter>>,
}

struct Waiter {
    thread: Thread,
    granted: AtomicBool,
}

impl Permits {
    fn new(count: usize) -> Permits {
        Permits {
            state: Mutex::new(PermitState {
                free: count,
                waiting: VecDeque::new(),
            }),
        }
    }

    fn take(&self) -> Permit<'_> {
        let waiter = {
            let mut state = self.state.lock();
            if state.free > 0 && state.waiting.is_empty() {
                state.free -= 1;
                return Permit(self);
            }
            let waiter = Arc::new(Waiter {
                thread: thread::current(),
                granted: AtomicBool::new(false),
            });
            state.waiting.push_back(Arc::clone(&waiter));
            waiter
        };
        // park() may return spuriously; the flag says when it is ours.
        while !waiter.granted.load(Ordering::Acquire) {
            thread::park();
        }
        Permit(self)
    }

    fn release(&self) {
        let next = {
            let mut state = self.state.lock();
            let next = state.waiting.pop_front();
            if next.is_none() {
                state.free += 1;
            }
            next
        };
        if let Some(waiter) = next {
            waiter.granted.store(true, Ordering::Release);
            waiter.thread.unpark();
        }
    }
}

/// One of the `workers` permits, given back when dropped.
struct Permit<'a>(&'a Permits);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Runs the handler and reads its whole answer (under the permit, so that
/// writing to a slow client never holds one).
fn run_handler(handler: &Handler, request: &Request) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| handler(request)));
    let response = match outcome {
        Ok(response) => response,
        Err(_) => {
            log::error!(
                "request handler panicked: {} {}",
                request.method(),
                request.url()
            );
            return (500, json_type(), error_body("internal error"));
        }
    };
    let status = response.status_code;
    let headers = response
        .headers
        .into_iter()
        .map(|(n, v)| (n.into_owned(), v.into_owned()))
        .collect();
    let (mut reader, size) = response.data.into_reader_and_size();
    let mut data = Vec::with_capacity(size.unwrap_or(0));
    if let Err(err) = reader.read_to_end(&mut data) {
        log::error!("cannot read the answer's body: {err}");
        return (500, json_type(), error_body("internal error"));
    }
    (status, headers, data)
}

fn json_type() -> Vec<(String, String)> {
    vec![("Content-Type".into(), "application/json".into())]
}

fn error_body(message: &str) -> Vec<u8> {
    serde_json::json!({ "error": message })
        .to_string()
        .into_bytes()
}

/// Answers a transport-level error and closes, reading what the client
/// still sends for a moment so that it sees the answer.
fn fail(stream: &mut TcpStream, err: HttpError) {
    log::debug!("http: {} {}", err.status, err.message);
    let _ = write_answer(stream, &error_answer(err.status, &err.message, true));
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut chunk = [0u8; 16 * 1024];
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// Writes `answer` whole within [`WRITE_TIMEOUT`].
fn write_answer(stream: &mut TcpStream, mut answer: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + WRITE_TIMEOUT;
    while !answer.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(answer) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => answer = &answer[n..],
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn error_answer(status: u16, message: &str, close: bool) -> Vec<u8> {
    encode_answer(status, &json_type(), &error_body(message), close, false)
}

fn encode_answer(
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
    is_head: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 256);
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    for (name, value) in headers {
        let framing = [
            "content-length",
            "connection",
            "transfer-encoding",
            "upgrade",
        ]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h));
        // A header that would split the answer is dropped, not sent.
        let unsafe_bytes = |s: &str| s.bytes().any(|b| b == b'\r' || b == b'\n');
        if framing || unsafe_bytes(name) || unsafe_bytes(value) {
            continue;
        }
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !is_head {
        out.extend_from_slice(body);
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads one request head. `Ok(None)`: the client closed or stayed idle
/// between requests, nothing to answer.
fn read_head(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Option<Head>, HttpError> {
    let mut deadline = (!pending.is_empty()).then(|| Instant::now() + timeout);
    let mut chunk = [0u8; 8 * 1024];
    loop {
        if !pending.is_empty() {
            if let Some(head) = parse_head(pending)? {
                return Ok(Some(head));
            }
            if pending.len() > MAX_HEAD_BYTES {
                return Err(HttpError::new(
                    431,
                    format!("request head too large: at most {MAX_HEAD_BYTES} bytes"),
                ));
            }
        }
        let wait = match deadline {
            None => IDLE_TIMEOUT,
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
        };
        if wait.is_zero() {
            return Err(HttpError::new(408, "request head not received in time"));
        }
        if stream.set_read_timeout(Some(wait)).is_err() {
            return Ok(None);
        }
        match stream.read(&mut chunk) {
            Ok(0) if pending.is_empty() => return Ok(None),
            Ok(0) => return Err(HttpError::new(400, "connection closed in the request head")),
            Ok(n) => {
                pending.extend_from_slice(&chunk[..n]);
                deadline.get_or_insert_with(|| Instant::now() + timeout);
            }
            Err(err) if is_timeout(&err) && pending.is_empty() => return Ok(None),
            Err(err) if is_timeout(&err) => {
                return Err(HttpError::new(408, "request head not received in time"))
            }
            Err(_) => return Ok(None),
        }
    }
}

/// Parses a complete head at the start of `pending` and removes it.
fn parse_head(pending: &mut Vec<u8>) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let length = match request.parse(pending) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::new(
                431,
                format!("too many headers: at most {MAX_HEADERS}"),
            ))
        }
        Err(err) => return Err(HttpError::new(400, format!("malformed request: {err}"))),
    };
    let method = request.method.unwrap_or("").to_string();
    let target = request.path.unwrap_or("").to_string();
    if !target.starts_with('/') {
        return Err(HttpError::new(
            400,
            "request target: expected a path starting with /",
        ));
    }
    let headers = request
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let head = Head {
        method,
        target,
        http11: request.version == Some(1),
        headers,
    };
    pending.drain(..length);
    Ok(Some(head))
}

/// Reads the body the head announces, within `timeout` and `limit`.
fn read_body(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    head: &Head,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, HttpError> {
    let too_large = || {
        HttpError::new(
            413,
            format!("request body too large: at most {limit} bytes"),
        )
    };
    let lengths: Vec<&str> = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Content-Length"))
        .map(|(_, v)| v.trim())
        .collect();
    let chunked = match head.header("Transfer-Encoding") {
        None => false,
        Some(coding) if coding.trim().eq_ignore_ascii_case("chunked") => true,
        Some(_) => {
            return Err(HttpError::new(
                400,
                "Transfer-Encoding: only chunked is accepted",
            ))
        }
    };
    if chunked && !lengths.is_empty() {
        return Err(HttpError::new(
            400,
            "both Transfer-Encoding and Content-Length given",
        ));
    }
    let length = match lengths.as_slice() {
        [] => None,
        [first, rest @ ..] if rest.iter().all(|l| l == first) => match first.parse::<u64>() {
            Ok(n) if n > limit as u64 => return Err(too_large()),
            Ok(n) => Some(n as usize),
            Err(_) => {
                return Err(HttpError::new(
                    400,
                    "Content-Length: expected a whole number of bytes",
                ))
            }
        },
        _ => return Err(HttpError::new(400, "conflicting Content-Length headers")),
    };
    if !chunked && length.unwrap_or(0) == 0 {
        return Ok(Vec::new());
    }
    if let Some(expect) = head.header("Expect") {
        if !expect.trim().eq_ignore_ascii_case("100-continue") {
            return Err(HttpError::new(
                417,
                "Expect: only 100-continue is understood",
            ));
        }
        // The client waits for this before sending its body, unless it
        // sent it already.
        if pending.is_empty() {
            let _ = write_answer(stream, b"HTTP/1.1 100 Continue\r\n\r\n");
        }
    }
    let mut reader = BodyReader {
        stream,
        pending,
        deadline: Instant::now() + timeout,
    };
    match length {
        Some(length) => {
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body)?;
            Ok(body)
        }
        None => read_chunked(&mut reader, limit).map_err(|err| match err {
            ChunkError::Http(err) => err,
            ChunkError::TooLarge => too_large(),
        }),
    }
}

/// Reads from the pending bytes first, then the socket, within a deadline.
struct BodyReader<'a> {
    stream: &'a mut TcpStream,
    pending: &'a mut Vec<u8>,
    deadline: Instant,
}

impl BodyReader<'_> {
    fn fill(&mut self) -> Result<(), HttpError> {
        let wait = self.deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || self.stream.set_read_timeout(Some(wait)).is_err() {
            return Err(HttpError::new(408, "request body not received in time"));
        }
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(HttpError::new(400, "connection closed in the request body")),
            Ok(n) => {
                self.pending.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(err) if is_timeout(&err) => {
                Err(HttpError::new(408, "request body not received in time"))
            }
            Err(_) => Err(HttpError::new(400, "connection failed in the request body")),
        }
    }

    fn read_exact(&mut self, out: &mut [u8]) -> Result<(), HttpError> {
        let mut filled = 0;
        while filled < out.len() {
            if self.pending.is_empty() {
                self.fill()?;
            }
            let n = self.pending.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            filled += n;
        }
        Ok(())
    }

    /// One CRLF-terminated line of at most 4 KiB, without its end.
    fn line(&mut self) -> Result<Vec<u8>, HttpError> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.pending.len() > 4096 {
                return Err(HttpError::new(400, "chunked body: line too long"));
            }
            self.fill()?;
        }
    }
}

enum ChunkError {
    Http(HttpError),
    TooLarge,
}

impl From<HttpError> for ChunkError {
    fn from(err: HttpError) -> ChunkError {
        ChunkError::Http(err)
    }
}

fn read_chunked(reader: &mut BodyReader, limit: usize) -> Result<Vec<u8>, ChunkError> {
    let bad = || ChunkError::Http(HttpError::new(400, "chunked body: malformed chunk size"));
    let mut body = Vec::new();
    loop {
        let line = reader.line()?;
        let text = std::str::from_utf8(&line).map_err(|_| bad())?;
        let size_text = text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad())?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !reader.line()?.is_empty() {}
            return Ok(body);
        }
        if body.len().saturating_add(size) > limit {
            return Err(ChunkError::TooLarge);
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        if !reader.line()?.is_empty() {
            return Err(bad());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, HttpError> {
        parse_head(&mut text.as_bytes().to_vec())
    }

    /// Regression guard: a released permit goes to the longest waiter, not
    /// to whoever asks next (the token channel it replaced let newcomers
    /// barge in, which stretched the latency's tail under load).
    #[test]
    fn permits_go_to_waiters_in_arrival_order() {
        let permits = Arc::new(Permits::new(1));
        let held = permits.take();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for id in 0..4 {
            let (shared, order) = (Arc::clone(&permits), Arc::clone(&order));
            waiters.push(thread::spawn(move || {
                let _permit = shared.take();
                order.lock().push(id);
            }));
            // Each waiter queues before the next one starts.
            let deadline = Instant::now() + Duration::from_secs(10);
            while permits.state.lock().waiting.len() < id + 1 {
                assert!(Instant::now() < deadline, "waiter {id} never queued");
                thread::yield_now();
            }
        }
        // A newcomer while the queue is full waits behind it.
        assert_eq!(permits.state.lock().free, 0);
        drop(held);
        for waiter in waiters {
            waiter.join().unwrap();
        }
        assert_eq!(*order.lock(), vec![0, 1, 2, 3]);
        assert_eq!(permits.state.lock().free, 1);
        drop(permits.take());
        assert_eq!(permits.state.lock().free, 1);
    }

    #[test]
    fn heads_parse_and_keep_their_rest() {
        let mut pending = b"GET /health?x=1 HTTP/1.1\r\nHost: a\r\n\r\nGET /next".to_vec();
        let parsed = parse_head(&mut pending).unwrap().unwrap();
        assert_eq!(parsed.method, "GET");
        assert_eq!(parsed.target, "/health?x=1");
        assert!(parsed.http11);
        assert_eq!(parsed.header("host"), Some("a"));
        assert_eq!(pending, b"GET /next");
        assert!(head("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
    }

    #[test]
    fn bad_heads_are_4xx() {
        assert_eq!(head("GET / HTTP/2.0\r\n\r\n").err().unwrap().status, 400);
        assert_eq!(head("GET * HTTP/1.1\r\n\r\n").err().unwrap().status, 400);
        assert_eq!(
            head("GET / HTTP/1.1\r\nBad Header\r\n\r\n")
                .err()
                .unwrap()
                .status,
            400
        );
        let many: String = (0..100).map(|i| format!("X-{i}: v\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(head(&text).err().unwrap().status, 431);
    }

    #[test]
    fn connection_persistence_follows_the_version() {
        let close = |text: &str| head(text).unwrap().unwrap().wants_close();
        assert!(!close("GET / HTTP/1.1\r\n\r\n"));
        assert!(close("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(close("GET / HTTP/1.0\r\n\r\n"));
        assert!(!close("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn answers_carry_their_length_and_never_split() {
        let headers = vec![
            ("Content-Type".to_string(), "application/json".to_string()),
            ("X-Evil".to_string(), "a\r\nSet-Cookie: x".to_string()),
            ("Content-Length".to_string(), "999".to_string()),
        ];
        let answer = String::from_utf8(encode_answer(404, &headers, b"{}", true, false)).unwrap();
        assert_eq!(
            answer,
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
             Connection: close\r\n\r\n{}"
        );
        let head_only = encode_answer(200, &[], b"abc", false, true);
        assert!(String::from_utf8(head_only)
            .unwrap()
            .ends_with("Content-Length: 3\r\n\r\n"));
    }
}
