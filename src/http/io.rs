//! The thin I/O driver around the sans-IO parts: reads and writes on a
//! `TcpStream` that end at a deadline (and, for the test farm, when a stop
//! flag is set), and whole heads and bodies read through them.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::http::body::{BodyDecoder, BodyError};
use crate::http::head::{
    parse_request, parse_response, HeadError, HeadLimits, Parsed, RequestHead, ResponseHead,
};

/// How long a blocking call waits before looking at a stop flag again.
const STOP_POLL: Duration = Duration::from_millis(200);
/// A head this short is parsed after every read, line end or not.
const EAGER_PARSE_BYTES: usize = 64;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// When an I/O call gives up: at `deadline`, or as soon as `stop` is set.
#[derive(Clone, Copy, Debug)]
pub struct Bound<'a> {
    pub deadline: Instant,
    pub stop: Option<&'a AtomicBool>,
}

impl<'a> Bound<'a> {
    pub fn until(deadline: Instant) -> Bound<'static> {
        Bound {
            deadline,
            stop: None,
        }
    }

    pub fn within(timeout: Duration) -> Bound<'static> {
        Bound::until(Instant::now() + timeout)
    }

    /// The same bound, also ended by `stop`.
    pub fn or_stop(self, stop: &'a AtomicBool) -> Bound<'a> {
        Bound {
            deadline: self.deadline,
            stop: Some(stop),
        }
    }

    pub fn stopped(&self) -> bool {
        self.stop.is_some_and(|stop| stop.load(Ordering::Relaxed))
    }

    pub fn expired(&self) -> bool {
        self.stopped() || remaining(self.deadline).is_none()
    }

    /// The timeout of the next blocking call: what is left, in slices when a
    /// stop flag must be watched. `None` once the bound is over.
    fn slice(&self) -> Option<Duration> {
        if self.stopped() {
            return None;
        }
        let left = remaining(self.deadline)?;
        Some(match self.stop {
            Some(_) => left.min(STOP_POLL),
            None => left,
        })
    }
}

/// Time left before `deadline`, `None` when it has passed (a zero socket
/// timeout would mean "block forever").
pub fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.checked_duration_since(Instant::now())?;
    (left >= Duration::from_millis(1)).then_some(left)
}

/// Whether a socket error is a timeout (the kind depends on the platform).
pub fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn bound_over() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "deadline reached")
}

/// One `read`: data, `Ok(0)` at end of stream, or `TimedOut` at the bound.
pub fn read_some(stream: &mut TcpStream, buf: &mut [u8], bound: Bound) -> io::Result<usize> {
    loop {
        let slice = bound.slice().ok_or_else(bound_over)?;
        stream.set_read_timeout(Some(slice))?;
        match stream.read(buf) {
            Ok(n) => return Ok(n),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) if is_timeout(&error) => {}
            Err(error) => return Err(error),
        }
    }
}

/// One read appended to `pending`; returns the bytes read (0: end of stream).
pub fn read_more(stream: &mut TcpStream, pending: &mut Vec<u8>, bound: Bound) -> io::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    let n = read_some(stream, &mut chunk, bound)?;
    pending.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// `read_exact` within the bound.
pub fn read_exact(stream: &mut TcpStream, buf: &mut [u8], bound: Bound) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match read_some(stream, &mut buf[filled..], bound)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
    }
    Ok(())
}

/// `write_all` within the bound: a peer that stops reading cannot hold the
/// thread past it.
pub fn write_all(stream: &mut TcpStream, mut data: &[u8], bound: Bound) -> io::Result<()> {
    while !data.is_empty() {
        let slice = bound.slice().ok_or_else(bound_over)?;
        stream.set_write_timeout(Some(slice))?;
        match stream.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) if is_timeout(&error) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Why a message could not be read.
#[derive(Debug)]
pub enum ReadError {
    Head(HeadError),
    Body(BodyError),
    /// The peer closed; `mid_message` when some of the message had arrived.
    Closed {
        mid_message: bool,
    },
    /// The bound ended first.
    Timeout,
    /// Any other socket error.
    Io(io::Error),
}

impl ReadError {
    fn from_io(error: io::Error) -> ReadError {
        if is_timeout(&error) {
            ReadError::Timeout
        } else {
            ReadError::Io(error)
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Head(error) => error.fmt(f),
            ReadError::Body(error) => error.fmt(f),
            ReadError::Closed { mid_message: true } => f.write_str("connection closed mid-message"),
            ReadError::Closed { mid_message: false } => f.write_str("connection closed"),
            ReadError::Timeout => f.write_str("not received in time"),
            ReadError::Io(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for ReadError {}

/// A head parser of [`super::head`]: the head and its length, or `None` for
/// more bytes.
type ParseHead<H> = fn(&[u8], HeadLimits) -> Parsed<H>;

/// Reads until `parse` finds a complete head at the front of `pending`, then
/// removes the head from it (what follows stays: a body, a next message). A
/// head can only become complete when a line ends, so past its first
/// [`EAGER_PARSE_BYTES`] `parse` runs only when a `\n` arrived: a peer sending
/// one byte per packet costs no quadratic re-parsing, and a banner that is
/// not HTTP (`SSH-2.0-...` without a line end) is still refused at once.
fn read_head<H>(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    bound: Bound,
    limits: HeadLimits,
    parse: ParseHead<H>,
) -> Result<H, ReadError> {
    let mut line_arrived = !pending.is_empty();
    loop {
        if line_arrived || pending.len() <= EAGER_PARSE_BYTES {
            if let Some((head, length)) = parse(pending, limits).map_err(ReadError::Head)? {
                pending.drain(..length);
                return Ok(head);
            }
        }
        if pending.len() >= limits.max_head_bytes {
            return Err(ReadError::Head(HeadError::TooLarge {
                max_head_bytes: limits.max_head_bytes,
            }));
        }
        let before = pending.len();
        match read_more(stream, pending, bound).map_err(ReadError::from_io)? {
            0 => {
                return Err(ReadError::Closed {
                    mid_message: before > 0,
                })
            }
            _ => line_arrived = pending[before..].contains(&b'\n'),
        }
    }
}

/// Reads one request head (see [`read_head`]).
pub fn read_request_head(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    bound: Bound,
    limits: HeadLimits,
) -> Result<RequestHead, ReadError> {
    read_head(stream, pending, bound, limits, parse_request)
}

/// Reads one response head, skipping interim 1xx answers.
pub fn read_response_head(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    bound: Bound,
    limits: HeadLimits,
) -> Result<ResponseHead, ReadError> {
    loop {
        let head = read_head(stream, pending, bound, limits, parse_response)?;
        if !head.is_interim() {
            return Ok(head);
        }
    }
}

/// Reads a whole body through `decoder`, starting with the bytes already in
/// `pending`; what follows the body stays in `pending`.
pub fn read_body(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    decoder: &mut BodyDecoder,
    bound: Bound,
) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let progress = decoder.feed(pending, &mut body).map_err(ReadError::Body)?;
        pending.drain(..progress.consumed);
        if progress.done {
            return Ok(body);
        }
        if read_more(stream, pending, bound).map_err(ReadError::from_io)? == 0 {
            return match decoder.finish() {
                Ok(()) => Ok(body),
                Err(_) => Err(ReadError::Closed { mid_message: true }),
            };
        }
    }
}

/// Wakes an accept loop blocked in `accept()` on `local_addr` (which stops
/// once it sees its stop flag): one connection to it, to loopback when it
/// listens on every address.
pub fn wake_accept(local_addr: std::net::SocketAddr) {
    let mut wake = local_addr;
    if wake.ip().is_unspecified() {
        wake.set_ip(match wake {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    // Refused or timed out: the listener is gone, and so is the loop.
    let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body::Framing;
    use std::net::TcpListener;
    use std::thread;

    /// A connected pair over loopback.
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn a_trickled_message_is_read_whole_and_its_successor_kept() {
        let (mut client, mut server) = pair();
        let writer = thread::spawn(move || {
            let bound = Bound::within(Duration::from_secs(10));
            for byte in
                b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nGET"
            {
                write_all(&mut client, &[*byte], bound).unwrap();
            }
            client
        });
        let bound = Bound::within(Duration::from_secs(10));
        let mut pending = Vec::new();
        let head =
            read_request_head(&mut server, &mut pending, bound, HeadLimits::default()).unwrap();
        assert_eq!(head.target, "/x");
        let framing = Framing::of_request(&head.headers).unwrap();
        let mut decoder = BodyDecoder::new(framing, 100).unwrap();
        let body = read_body(&mut server, &mut pending, &mut decoder, bound).unwrap();
        assert_eq!(body, b"ok");
        let _client = writer.join().unwrap();
        while pending.len() < 3 {
            read_more(&mut server, &mut pending, bound).unwrap();
        }
        assert_eq!(pending, b"GET");
    }

    #[test]
    fn reads_end_at_the_deadline_or_the_stop_flag() {
        let (_client, mut server) = pair();
        let mut buf = [0u8; 8];
        let error = read_some(
            &mut server,
            &mut buf,
            Bound::within(Duration::from_millis(20)),
        )
        .unwrap_err();
        assert!(is_timeout(&error));
        let stop = AtomicBool::new(true);
        let bound = Bound::within(Duration::from_secs(60)).or_stop(&stop);
        assert!(bound.expired());
        assert!(is_timeout(
            &read_some(&mut server, &mut buf, bound).unwrap_err()
        ));
        let mut pending = Vec::new();
        let error = read_response_head(
            &mut server,
            &mut pending,
            Bound::within(Duration::from_millis(20)),
            HeadLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(error, ReadError::Timeout), "{error:?}");
    }

    #[test]
    fn interim_answers_are_skipped_and_closes_reported() {
        let (mut client, mut server) = pair();
        let bound = Bound::within(Duration::from_secs(10));
        write_all(
            &mut client,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nbody",
            bound,
        )
        .unwrap();
        drop(client);
        let mut pending = Vec::new();
        let head =
            read_response_head(&mut server, &mut pending, bound, HeadLimits::default()).unwrap();
        assert_eq!(head.status, 200);
        let framing = Framing::of_response(&head, false).unwrap();
        let mut decoder = BodyDecoder::new(framing, 100).unwrap();
        let body = read_body(&mut server, &mut pending, &mut decoder, bound).unwrap();
        assert_eq!(body, b"body");
        let error = read_response_head(&mut server, &mut pending, bound, HeadLimits::default())
            .unwrap_err();
        assert!(matches!(error, ReadError::Closed { mid_message: false }));
    }
}
