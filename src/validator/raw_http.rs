//! A small HTTP/1.1 client for the one request ureq cannot make: an
//! absolute-URI `GET http://judge/get HTTP/1.1` sent straight to an http
//! proxy. Only outside a CONNECT tunnel does a proxy rewrite headers, so only
//! this request shows its anonymity. Every read is bounded by the check's
//! deadline, every byte count by a cap: a proxy is hostile input.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use crate::http::io::{self as http_io, Bound, ReadError};
use crate::http::{BodyDecoder, BodyError, Framing, HeadError, HeadLimits};
use crate::validator::judge_answer::DeadReason;

/// Caps on what a proxy may send back.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_head_bytes: usize,
    pub max_body_bytes: usize,
}

/// At most this many header lines in an answer head.
const MAX_HEADERS: usize = 64;

/// A complete answer: status and decoded body.
#[derive(Debug, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Connects to `proxy`, writes `request`, and reads one complete answer, all
/// before `deadline`. `Err` says why the proxy counts as dead.
pub fn exchange(
    proxy: SocketAddr,
    request: &[u8],
    connect_timeout: Duration,
    deadline: Instant,
    limits: Limits,
) -> Result<RawResponse, DeadReason> {
    let mut stream = connect(proxy, connect_timeout, deadline)?;
    write_all(&mut stream, request, deadline)?;
    read_response(&mut stream, deadline, limits)
}

/// Like [`exchange`], through a SOCKS4 tunnel to `target` opened with
/// `user_id`. ureq always sends an empty SOCKS4 user id, and a proxy listed
/// with one requires it.
pub fn exchange_socks4(
    proxy: SocketAddr,
    user_id: &str,
    target: SocketAddrV4,
    request: &[u8],
    connect_timeout: Duration,
    deadline: Instant,
    limits: Limits,
) -> Result<RawResponse, DeadReason> {
    if user_id.contains('\0') {
        return Err(DeadReason::Io("socks4 user id with a NUL byte".into()));
    }
    let mut stream = connect(proxy, connect_timeout, deadline)?;
    // VN CD DSTPORT DSTIP USERID NUL.
    let mut handshake = Vec::with_capacity(9 + user_id.len());
    handshake.extend_from_slice(&[4, 1]);
    handshake.extend_from_slice(&target.port().to_be_bytes());
    handshake.extend_from_slice(&target.ip().octets());
    handshake.extend_from_slice(user_id.as_bytes());
    handshake.push(0);
    write_all(&mut stream, &handshake, deadline)?;
    // VN CD and six unused bytes. Nothing follows before our request, so a
    // read cannot take bytes of the answer.
    let mut reply = [0u8; 8];
    match http_io::read_exact(&mut stream, &mut reply, Bound::until(deadline)) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(DeadReason::Socks("closed during the handshake".into()))
        }
        Err(err) => return Err(io_error(err)),
    }
    match (reply[0], reply[1]) {
        (0, 90) => {}
        (0, code) => return Err(DeadReason::Socks(format!("request rejected ({code})"))),
        _ => return Err(DeadReason::Socks("not a socks4 reply".into())),
    }
    write_all(&mut stream, request, deadline)?;
    read_response(&mut stream, deadline, limits)
}

fn connect(
    proxy: SocketAddr,
    connect_timeout: Duration,
    deadline: Instant,
) -> Result<TcpStream, DeadReason> {
    let connect_budget =
        connect_timeout.min(http_io::remaining(deadline).ok_or(DeadReason::ConnectTimeout)?);
    let stream = TcpStream::connect_timeout(&proxy, connect_budget).map_err(connect_error)?;
    // Ignored: latency matters more than packet count, but it is not needed
    // for correctness.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn write_all(stream: &mut TcpStream, bytes: &[u8], deadline: Instant) -> Result<(), DeadReason> {
    http_io::write_all(stream, bytes, Bound::until(deadline)).map_err(io_error)
}

/// Reads one answer from `stream` (interim 1xx answers skipped), every read
/// bounded by `deadline` so that a proxy trickling a byte at a time still
/// ends there.
fn read_response(
    stream: &mut TcpStream,
    deadline: Instant,
    limits: Limits,
) -> Result<RawResponse, DeadReason> {
    let bound = Bound::until(deadline);
    let head_limits = HeadLimits {
        max_head_bytes: limits.max_head_bytes,
        max_headers: MAX_HEADERS,
    };
    let mut input = Vec::with_capacity(4096);
    let head = http_io::read_response_head(stream, &mut input, bound, head_limits)
        .map_err(|err| read_error(err, false))?;
    let framing = Framing::of_response(&head, false).map_err(|_| DeadReason::Garbage)?;
    let mut decoder =
        BodyDecoder::new(framing, limits.max_body_bytes as u64).map_err(body_error)?;
    let body = http_io::read_body(stream, &mut input, &mut decoder, bound)
        .map_err(|err| read_error(err, true))?;
    Ok(RawResponse {
        status: head.status,
        body,
    })
}

/// Why reading an answer failed, as a dead reason. `in_body`: a close after
/// the head is a reset, not garbage.
fn read_error(err: ReadError, in_body: bool) -> DeadReason {
    match err {
        ReadError::Head(HeadError::Malformed(_)) => DeadReason::Garbage,
        ReadError::Head(HeadError::TooLarge { .. } | HeadError::TooManyHeaders { .. }) => {
            DeadReason::TooLarge
        }
        ReadError::Body(err) => body_error(err),
        ReadError::Closed { mid_message } if mid_message && !in_body => DeadReason::Garbage,
        ReadError::Closed { .. } => DeadReason::Reset,
        ReadError::Timeout => DeadReason::Timeout,
        ReadError::Io(err) => io_error(err),
    }
}

fn body_error(err: BodyError) -> DeadReason {
    match err {
        BodyError::TooLarge { .. } => DeadReason::TooLarge,
        BodyError::Malformed(_) => DeadReason::Garbage,
        BodyError::Incomplete => DeadReason::Reset,
    }
}

/// Maps a failed connect to the reason statistics want.
pub(crate) fn connect_error(error: io::Error) -> DeadReason {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => DeadReason::Refused,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => DeadReason::ConnectTimeout,
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::AddrNotAvailable => DeadReason::Unreachable,
        _ => io_error(error),
    }
}

/// Maps a failed read or write after connecting.
pub(crate) fn io_error(error: io::Error) -> DeadReason {
    match error.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => DeadReason::Timeout,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => DeadReason::Reset,
        io::ErrorKind::ConnectionRefused => DeadReason::Refused,
        _ => DeadReason::Io(error.kind().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_failures_map_to_dead_reasons() {
        let malformed = ReadError::Head(HeadError::Malformed("x".into()));
        assert_eq!(read_error(malformed, false), DeadReason::Garbage);
        let too_many = ReadError::Head(HeadError::TooManyHeaders { max_headers: 64 });
        assert_eq!(read_error(too_many, false), DeadReason::TooLarge);
        let closed = |mid_message| ReadError::Closed { mid_message };
        assert_eq!(read_error(closed(false), false), DeadReason::Reset);
        assert_eq!(read_error(closed(true), false), DeadReason::Garbage);
        assert_eq!(read_error(closed(true), true), DeadReason::Reset);
        assert_eq!(read_error(ReadError::Timeout, true), DeadReason::Timeout);
        let bad_chunk = ReadError::Body(BodyError::Malformed("malformed chunk size"));
        assert_eq!(read_error(bad_chunk, true), DeadReason::Garbage);
        let too_large = ReadError::Body(BodyError::TooLarge { max_body_bytes: 1 });
        assert_eq!(read_error(too_large, true), DeadReason::TooLarge);
    }
}
