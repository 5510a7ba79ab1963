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

use crate::http::io::{self as http_io, Bound, ReadError};
use crate::http::{
    encode_response, AnswerOptions, BodyDecoder, BodyError, Framing, HeadError, HeadLimits,
    RequestHead,
};
use crate::logging::Escaped;

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
        crate::http::io::wake_accept(self.local_addr);
        if accept.join().is_err() {
            log::error!("api: the accept thread panicked");
        }
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

const HEAD_LIMITS: HeadLimits = HeadLimits {
    max_head_bytes: MAX_HEAD_BYTES,
    max_headers: MAX_HEADERS,
};

fn serve_connection(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    // Bytes read beyond the current request (a pipelined next one).
    let mut pending: Vec<u8> = Vec::with_capacity(4096);
    // The answer's bytes, kept for the next answer on this connection.
    let mut answer = Vec::with_capacity(4096);
    loop {
        let read_timeout = shared.limits.read_timeout;
        let head = match read_head(&mut stream, &mut pending, read_timeout) {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(err) => return fail(&mut stream, err),
        };
        let limit = (shared.body_limit)(head.path());
        let body = match read_body(&mut stream, &mut pending, &head, limit, read_timeout) {
            Ok(body) => body,
            Err(err) => return fail(&mut stream, err),
        };
        let close = !head.keep_alive() || shared.stopping.load(Ordering::SeqCst);
        let head_only = head.method == "HEAD";
        let request = Request::fake_http_from(peer, head.method, head.target, head.headers.0, body);
        let (status, headers, data) = {
            let _permit = shared.permits.take();
            run_handler(&shared.handler, &request)
        };
        answer.clear();
        encode_response(
            &mut answer,
            status,
            &headers,
            &data,
            AnswerOptions { close, head_only },
        );
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
                Escaped(request.method()),
                Escaped(&request.url())
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
    let bound = Bound::within(LINGER);
    let mut drained = 0;
    let mut chunk = [0u8; 16 * 1024];
    while drained < LINGER_BYTES {
        match http_io::read_some(stream, &mut chunk, bound) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// Writes `answer` whole within [`WRITE_TIMEOUT`].
fn write_answer(stream: &mut TcpStream, answer: &[u8]) -> io::Result<()> {
    http_io::write_all(stream, answer, Bound::within(WRITE_TIMEOUT))
}

fn error_answer(status: u16, message: &str, close: bool) -> Vec<u8> {
    let mut answer = Vec::new();
    let options = AnswerOptions {
        close,
        head_only: false,
    };
    encode_response(
        &mut answer,
        status,
        &json_type(),
        &error_body(message),
        options,
    );
    answer
}

/// Reads one request head: the client has [`IDLE_TIMEOUT`] to start it,
/// then `timeout` to finish it. `Ok(None)`: the client closed or stayed idle
/// between requests, nothing to answer.
fn read_head(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Option<RequestHead>, HttpError> {
    if pending.is_empty() {
        match http_io::read_more(stream, pending, Bound::within(IDLE_TIMEOUT)) {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
    let head =
        match http_io::read_request_head(stream, pending, Bound::within(timeout), HEAD_LIMITS) {
            Ok(head) => head,
            Err(ReadError::Head(err)) => return Err(head_error(&err)),
            Err(ReadError::Closed { mid_message: true }) => {
                return Err(HttpError::new(400, "connection closed in the request head"))
            }
            Err(ReadError::Timeout) => {
                return Err(HttpError::new(408, "request head not received in time"))
            }
            Err(_) => return Ok(None),
        };
    origin_form(head).map(Some)
}

/// The API serves paths only: no absolute URIs, authorities or `*`.
fn origin_form(head: RequestHead) -> Result<RequestHead, HttpError> {
    if !head.target.starts_with('/') {
        return Err(HttpError::new(
            400,
            "request target: expected a path starting with /",
        ));
    }
    Ok(head)
}

fn head_error(err: &HeadError) -> HttpError {
    let message = match err {
        HeadError::TooLarge { max_head_bytes } => {
            format!("request head too large: at most {max_head_bytes} bytes")
        }
        HeadError::TooManyHeaders { max_headers } => {
            format!("too many headers: at most {max_headers}")
        }
        HeadError::Malformed(reason) => format!("malformed request: {reason}"),
    };
    HttpError::new(err.status(), message)
}

/// Reads the body the head announces, within `timeout` and `limit`.
fn read_body(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    head: &RequestHead,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, HttpError> {
    let framing =
        Framing::of_request(&head.headers).map_err(|err| HttpError::new(400, err.to_string()))?;
    let too_large = || {
        HttpError::new(
            413,
            format!("request body too large: at most {limit} bytes"),
        )
    };
    let mut decoder = BodyDecoder::new(framing, limit as u64).map_err(|_| too_large())?;
    if decoder.is_done() {
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
    http_io::read_body(stream, pending, &mut decoder, Bound::within(timeout)).map_err(|err| {
        match err {
            ReadError::Body(BodyError::TooLarge { .. }) => too_large(),
            ReadError::Body(err) => HttpError::new(err.status(), err.to_string()),
            ReadError::Timeout => HttpError::new(408, "request body not received in time"),
            ReadError::Closed { .. } => {
                HttpError::new(400, "connection closed in the request body")
            }
            ReadError::Head(_) | ReadError::Io(_) => {
                HttpError::new(400, "connection failed in the request body")
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<RequestHead>, HttpError> {
        match crate::http::parse_request(text.as_bytes(), HEAD_LIMITS) {
            Ok(Some((head, _))) => origin_form(head).map(Some),
            Ok(None) => Ok(None),
            Err(err) => Err(head_error(&err)),
        }
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
        assert!(head("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
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
}
