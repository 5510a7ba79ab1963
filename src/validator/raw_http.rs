//! A small HTTP/1.1 client for the one request ureq cannot make: an
//! absolute-URI `GET http://judge/get HTTP/1.1` sent straight to an http
//! proxy. Only outside a CONNECT tunnel does a proxy rewrite headers, so only
//! this request shows its anonymity. Every read is bounded by the check's
//! deadline, every byte count by a cap: a proxy is hostile input.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use crate::validator::judge_answer::DeadReason;

/// Caps on what a proxy may send back.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_head_bytes: usize,
    pub max_body_bytes: usize,
}

/// At most this many header lines in an answer head.
const MAX_HEADERS: usize = 64;
/// A chunk-size or trailer line longer than this is not HTTP.
const MAX_CHUNK_LINE: usize = 1024;

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
    let mut reply = Vec::with_capacity(8);
    let mut scratch = [0u8; 8];
    while reply.len() < 8 {
        let wanted = 8 - reply.len();
        if read_some(&mut stream, &mut scratch[..wanted], deadline, &mut reply)? == 0 {
            return Err(DeadReason::Socks("closed during the handshake".into()));
        }
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
        connect_timeout.min(remaining(deadline).ok_or(DeadReason::ConnectTimeout)?);
    let stream = TcpStream::connect_timeout(&proxy, connect_budget).map_err(connect_error)?;
    // Ignored: latency matters more than packet count, but it is not needed
    // for correctness.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn write_all(stream: &mut TcpStream, bytes: &[u8], deadline: Instant) -> Result<(), DeadReason> {
    stream
        .set_write_timeout(Some(remaining(deadline).ok_or(DeadReason::Timeout)?))
        .map_err(io_error)?;
    stream.write_all(bytes).map_err(io_error)
}

/// Reads one answer from `stream`, re-arming the read timeout before every
/// read so that a proxy trickling a byte at a time still ends at `deadline`.
fn read_response(
    stream: &mut TcpStream,
    deadline: Instant,
    limits: Limits,
) -> Result<RawResponse, DeadReason> {
    let mut input = Vec::with_capacity(4096);
    let mut scratch = [0u8; 8192];
    // The head, skipping interim 1xx answers. A head can only become
    // complete when a line ends, so a proxy sending a byte per packet does
    // not make us re-parse the head on every byte.
    let mut line_arrived = false;
    let (status, framing, head_len) = loop {
        let head = if line_arrived || input.len() <= 64 {
            parse_head(&input, limits)?
        } else {
            None
        };
        match head {
            Some((status, _, head_len)) if (100..200).contains(&status) && status != 101 => {
                input.drain(..head_len);
                line_arrived = true;
            }
            Some(head) => break head,
            None => {
                if input.len() >= limits.max_head_bytes {
                    return Err(DeadReason::TooLarge);
                }
                let before = input.len();
                if read_some(stream, &mut scratch, deadline, &mut input)? == 0 {
                    return Err(if input.is_empty() {
                        DeadReason::Reset
                    } else {
                        DeadReason::Garbage
                    });
                }
                line_arrived = input[before..].contains(&b'\n');
            }
        }
    };
    input.drain(..head_len);
    let mut decoder = BodyDecoder::new(framing, limits.max_body_bytes)?;
    loop {
        if decoder.feed(&input)? {
            return Ok(RawResponse {
                status,
                body: decoder.into_body(),
            });
        }
        let n_read = read_some(stream, &mut scratch, deadline, &mut input)?;
        if n_read == 0 {
            return match decoder.framing {
                Framing::UntilClose => Ok(RawResponse {
                    status,
                    body: std::mem::take(&mut input),
                }),
                _ => Err(DeadReason::Reset),
            };
        }
        if let Framing::UntilClose = decoder.framing {
            if input.len() > limits.max_body_bytes {
                return Err(DeadReason::TooLarge);
            }
        }
    }
}

/// One read into `input`, with the timeout set to what is left of the deadline.
fn read_some(
    stream: &mut TcpStream,
    scratch: &mut [u8],
    deadline: Instant,
    input: &mut Vec<u8>,
) -> Result<usize, DeadReason> {
    let left = remaining(deadline).ok_or(DeadReason::Timeout)?;
    stream.set_read_timeout(Some(left)).map_err(io_error)?;
    loop {
        match stream.read(scratch) {
            Ok(n_read) => {
                input.extend_from_slice(&scratch[..n_read]);
                return Ok(n_read);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(e)),
        }
    }
}

/// Time left before `deadline`, `None` when it has passed (a zero read
/// timeout would mean "block forever" to the socket).
fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.checked_duration_since(Instant::now())?;
    (left >= Duration::from_millis(1)).then_some(left)
}

/// How the body of an answer ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
    Empty,
}

/// Parses a complete head from the front of `input`: `Ok(None)` when more
/// bytes are needed.
fn parse_head(input: &[u8], limits: Limits) -> Result<Option<(u16, Framing, usize)>, DeadReason> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(input) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(DeadReason::TooLarge),
        Err(_) => return Err(DeadReason::Garbage),
    };
    if head_len > limits.max_head_bytes {
        return Err(DeadReason::TooLarge);
    }
    let status = response.code.ok_or(DeadReason::Garbage)?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let value = std::str::from_utf8(header.value).map_err(|_| DeadReason::Garbage)?;
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value).map_err(|_| DeadReason::Garbage)?;
            let parsed: usize = value.trim().parse().map_err(|_| DeadReason::Garbage)?;
            // Differing lengths are a smuggling attempt or a broken proxy.
            if length.is_some_and(|seen| seen != parsed) {
                return Err(DeadReason::Garbage);
            }
            length = Some(parsed);
        }
    }
    let framing = if status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        Framing::UntilClose
    };
    Ok(Some((status, framing, head_len)))
}

/// Where a chunked decoder stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(usize),
    DataEnd,
    Trailer,
}

/// Decodes a body incrementally from a growing input buffer, remembering how
/// far it got so that each byte is looked at about once.
struct BodyDecoder {
    framing: Framing,
    max_body: usize,
    body: Vec<u8>,
    position: usize,
    chunk: ChunkState,
}

impl BodyDecoder {
    fn new(framing: Framing, max_body: usize) -> Result<BodyDecoder, DeadReason> {
        if let Framing::Length(length) = framing {
            if length > max_body {
                return Err(DeadReason::TooLarge);
            }
        }
        Ok(BodyDecoder {
            framing,
            max_body,
            body: Vec::new(),
            position: 0,
            chunk: ChunkState::Size,
        })
    }

    /// Looks at everything received after the head so far; `Ok(true)` once
    /// the body is complete.
    fn feed(&mut self, input: &[u8]) -> Result<bool, DeadReason> {
        match self.framing {
            Framing::Empty => Ok(true),
            Framing::UntilClose => Ok(false),
            Framing::Length(length) => {
                if input.len() >= length {
                    self.body = input[..length].to_vec();
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
            Framing::Chunked => self.feed_chunked(input),
        }
    }

    fn feed_chunked(&mut self, input: &[u8]) -> Result<bool, DeadReason> {
        loop {
            let rest = &input[self.position..];
            match self.chunk {
                ChunkState::Size => {
                    let Some(line) = take_line(rest)? else {
                        return Ok(false);
                    };
                    self.position += line.len() + 1;
                    let size_text = trim_cr(line);
                    let size_text = size_text.split(|&b| b == b';').next().unwrap_or(size_text);
                    let size = parse_hex(size_text.trim_ascii())?;
                    if size == 0 {
                        self.chunk = ChunkState::Trailer;
                    } else if size > self.max_body.saturating_sub(self.body.len()) {
                        return Err(DeadReason::TooLarge);
                    } else {
                        self.chunk = ChunkState::Data(size);
                    }
                }
                ChunkState::Data(left) => {
                    let take = left.min(rest.len());
                    self.body.extend_from_slice(&rest[..take]);
                    self.position += take;
                    if take < left {
                        self.chunk = ChunkState::Data(left - take);
                        return Ok(false);
                    }
                    self.chunk = ChunkState::DataEnd;
                }
                ChunkState::DataEnd => {
                    if rest.starts_with(b"\r\n") {
                        self.position += 2;
                    } else if rest.starts_with(b"\n") {
                        self.position += 1;
                    } else if rest.is_empty() || rest == b"\r" {
                        return Ok(false);
                    } else {
                        return Err(DeadReason::Garbage);
                    }
                    self.chunk = ChunkState::Size;
                }
                ChunkState::Trailer => {
                    let Some(line) = take_line(rest)? else {
                        return Ok(false);
                    };
                    self.position += line.len() + 1;
                    if trim_cr(line).is_empty() {
                        return Ok(true);
                    }
                    // A trailer field: allowed and ignored, but it counts
                    // against the body cap so that endless trailers end.
                    if self.position > self.max_body.saturating_mul(2) {
                        return Err(DeadReason::TooLarge);
                    }
                }
            }
        }
    }

    fn into_body(self) -> Vec<u8> {
        self.body
    }
}

/// The bytes before the next `\n`, `Ok(None)` while the line is incomplete.
fn take_line(rest: &[u8]) -> Result<Option<&[u8]>, DeadReason> {
    match rest.iter().position(|&b| b == b'\n') {
        Some(end) if end <= MAX_CHUNK_LINE => Ok(Some(&rest[..end])),
        Some(_) => Err(DeadReason::Garbage),
        None if rest.len() > MAX_CHUNK_LINE => Err(DeadReason::Garbage),
        None => Ok(None),
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn parse_hex(text: &[u8]) -> Result<usize, DeadReason> {
    if text.is_empty() || text.len() > 15 {
        return Err(DeadReason::Garbage);
    }
    let mut value = 0usize;
    for &byte in text {
        let digit = (byte as char).to_digit(16).ok_or(DeadReason::Garbage)?;
        value = value * 16 + digit as usize;
    }
    Ok(value)
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

    const LIMITS: Limits = Limits {
        max_head_bytes: 16 * 1024,
        max_body_bytes: 64 * 1024,
    };

    /// Decodes a whole chunked body given in one piece, then byte by byte,
    /// and checks both ways agree.
    fn decode_chunked(raw: &[u8]) -> Result<Option<Vec<u8>>, DeadReason> {
        let mut whole = BodyDecoder::new(Framing::Chunked, 100)?;
        let whole_done = whole.feed(raw)?;
        let mut piecewise = BodyDecoder::new(Framing::Chunked, 100)?;
        let mut piece_done = false;
        for end in 1..=raw.len() {
            piece_done = piecewise.feed(&raw[..end])?;
            if piece_done {
                break;
            }
        }
        assert_eq!(whole_done, piece_done);
        assert_eq!(whole.body, piecewise.body);
        Ok(whole_done.then_some(whole.body))
    }

    #[test]
    fn chunked_bodies_decode_whole_and_byte_by_byte() {
        assert_eq!(
            decode_chunked(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\n"),
            Ok(Some(b"hello world".to_vec()))
        );
        assert_eq!(decode_chunked(b"3\nabc\n0\n\n"), Ok(Some(b"abc".to_vec())));
        assert_eq!(decode_chunked(b"5\r\nhel"), Ok(None));
    }

    #[test]
    fn broken_chunking_is_garbage_and_big_chunks_too_large() {
        assert_eq!(decode_chunked(b"zz\r\n"), Err(DeadReason::Garbage));
        assert_eq!(decode_chunked(b"3\r\nabcX"), Err(DeadReason::Garbage));
        assert_eq!(
            decode_chunked(b"ffffffffffffffffff\r\n"),
            Err(DeadReason::Garbage)
        );
        assert_eq!(decode_chunked(b"65\r\n"), Err(DeadReason::TooLarge));
    }

    #[test]
    fn head_framing_is_read_from_headers() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(
            parse_head(head, LIMITS),
            Ok(Some((200, Framing::Length(12), head.len())))
        );
        let head =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(
            parse_head(head, LIMITS).unwrap().unwrap().1,
            Framing::Chunked
        );
        let head = b"HTTP/1.0 200 OK\r\n\r\n";
        assert_eq!(
            parse_head(head, LIMITS).unwrap().unwrap().1,
            Framing::UntilClose
        );
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(parse_head(head, LIMITS), Err(DeadReason::Garbage));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nConte", LIMITS), Ok(None));
        assert_eq!(
            parse_head(b"SSH-2.0-OpenSSH\r\n", LIMITS),
            Err(DeadReason::Garbage)
        );
    }
}
