//! Message bodies: how a message's body ends (its framing, from the head) and
//! an incremental decoder fed whatever bytes have arrived, which says how
//! many it used and when the message is complete, so that a connection can
//! carry the next message (keep-alive, pipelining, relaying).

use std::fmt;

use crate::http::head::{FramingError, Headers, ResponseHead};

/// A chunk-size or trailer line longer than this is not HTTP.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Trailer fields after the last chunk, all together.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// How a message's body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the peer closes (a response without length).
    UntilClose,
}

impl Framing {
    /// A request's framing. Strict, as a server must be: a transfer coding
    /// other than chunked, or chunked with a length, is refused.
    pub fn of_request(headers: &Headers) -> Result<Framing, FramingError> {
        let length = headers.content_length()?;
        if headers.has_transfer_encoding() {
            let mut codings = headers
                .all("Transfer-Encoding")
                .flat_map(|value| value.split(','))
                .map(str::trim)
                .filter(|coding| !coding.is_empty());
            let only_chunked = match (codings.next(), codings.next()) {
                (Some(coding), None) => coding.eq_ignore_ascii_case("chunked"),
                _ => false,
            };
            if !only_chunked {
                return Err(FramingError::UnsupportedCoding);
            }
            if length.is_some() {
                return Err(FramingError::LengthAndChunked);
            }
            return Ok(Framing::Chunked);
        }
        Ok(match length {
            None | Some(0) => Framing::Empty,
            Some(length) => Framing::Length(length),
        })
    }

    /// A response's framing (RFC 9112 section 6.3). `head_request`: the
    /// answer is to a HEAD, which never has a body.
    pub fn of_response(head: &ResponseHead, head_request: bool) -> Result<Framing, FramingError> {
        if head_request || (100..200).contains(&head.status) || matches!(head.status, 204 | 304) {
            return Ok(Framing::Empty);
        }
        if head.headers.has_transfer_encoding() {
            return Ok(if head.headers.is_chunked() {
                Framing::Chunked
            } else {
                Framing::UntilClose
            });
        }
        Ok(match head.headers.content_length()? {
            Some(0) => Framing::Empty,
            Some(length) => Framing::Length(length),
            None => Framing::UntilClose,
        })
    }
}

/// Why a body cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// The decoded body (or its trailers) exceed the cap.
    TooLarge { max_body_bytes: u64 },
    /// Broken chunked framing.
    Malformed(&'static str),
    /// The peer closed before the body's end.
    Incomplete,
}

impl BodyError {
    /// The status a server answers this with.
    pub fn status(&self) -> u16 {
        match self {
            BodyError::TooLarge { .. } => 413,
            BodyError::Malformed(_) | BodyError::Incomplete => 400,
        }
    }
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::TooLarge { max_body_bytes } => {
                write!(f, "body too large: at most {max_body_bytes} bytes")
            }
            BodyError::Malformed(what) => write!(f, "chunked body: {what}"),
            BodyError::Incomplete => f.write_str("connection closed in the body"),
        }
    }
}

impl std::error::Error for BodyError {}

/// What one [`BodyDecoder::feed`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the input that belong to this body (the caller drops them;
    /// the rest, if any, is the next message).
    pub consumed: usize,
    /// The body is complete.
    pub done: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Bytes left of a length-framed body.
    Length(u64),
    UntilClose,
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailer,
    Done,
}

/// Decodes one body incrementally.
#[derive(Clone, Debug)]
pub struct BodyDecoder {
    state: State,
    max_body_bytes: u64,
    decoded: u64,
    trailer_bytes: usize,
}

impl BodyDecoder {
    /// A decoder for a body framed as `framing`, of at most `max_body_bytes`
    /// decoded bytes (a length over it fails at once).
    pub fn new(framing: Framing, max_body_bytes: u64) -> Result<BodyDecoder, BodyError> {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(length) if length > max_body_bytes => {
                return Err(BodyError::TooLarge { max_body_bytes })
            }
            Framing::Length(length) => State::Length(length),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        Ok(BodyDecoder {
            state,
            max_body_bytes,
            decoded: 0,
            trailer_bytes: 0,
        })
    }

    /// Whether the body is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the body ends only when the peer closes.
    pub fn until_close(&self) -> bool {
        self.state == State::UntilClose
    }

    /// Decoded bytes so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// Looks at `input` (the bytes received and not yet consumed) and
    /// appends the body's bytes among them to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Progress, BodyError> {
        let mut at = 0;
        loop {
            let rest = &input[at..];
            match self.state {
                State::Done => break,
                State::Length(left) => {
                    let take = (rest.len() as u64).min(left) as usize;
                    out.extend_from_slice(&rest[..take]);
                    at += take;
                    self.decoded += take as u64;
                    self.state = match left - take as u64 {
                        0 => State::Done,
                        left => State::Length(left),
                    };
                    break;
                }
                State::UntilClose => {
                    self.count(rest.len() as u64)?;
                    out.extend_from_slice(rest);
                    at += rest.len();
                    break;
                }
                State::ChunkSize => {
                    let Some(line) = take_line(rest)? else {
                        break;
                    };
                    at += line.len() + 1;
                    let size = chunk_size(trim_cr(line))?;
                    if size == 0 {
                        self.state = State::Trailer;
                    } else {
                        if size > self.max_body_bytes.saturating_sub(self.decoded) {
                            return Err(self.too_large());
                        }
                        self.state = State::ChunkData(size);
                    }
                }
                State::ChunkData(left) => {
                    if rest.is_empty() {
                        break;
                    }
                    let take = (rest.len() as u64).min(left) as usize;
                    self.count(take as u64)?;
                    out.extend_from_slice(&rest[..take]);
                    at += take;
                    self.state = match left - take as u64 {
                        0 => State::ChunkDataEnd,
                        left => State::ChunkData(left),
                    };
                }
                State::ChunkDataEnd => {
                    if rest.starts_with(b"\r\n") {
                        at += 2;
                    } else if rest.starts_with(b"\n") {
                        at += 1;
                    } else if rest.is_empty() || rest == b"\r" {
                        break;
                    } else {
                        return Err(BodyError::Malformed("chunk data not followed by CRLF"));
                    }
                    self.state = State::ChunkSize;
                }
                State::Trailer => {
                    let Some(line) = take_line(rest)? else {
                        break;
                    };
                    at += line.len() + 1;
                    if trim_cr(line).is_empty() {
                        self.state = State::Done;
                        continue;
                    }
                    // Trailer fields are allowed and ignored, within a cap.
                    self.trailer_bytes += line.len() + 1;
                    if self.trailer_bytes > MAX_TRAILER_BYTES {
                        return Err(self.too_large());
                    }
                }
            }
        }
        Ok(Progress {
            consumed: at,
            done: self.is_done(),
        })
    }

    /// The peer closed: fine for a body that ends so, else incomplete.
    pub fn finish(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::Done => Ok(()),
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(BodyError::Incomplete),
        }
    }

    fn count(&mut self, bytes: u64) -> Result<(), BodyError> {
        self.decoded += bytes;
        if self.decoded > self.max_body_bytes {
            return Err(self.too_large());
        }
        Ok(())
    }

    fn too_large(&self) -> BodyError {
        BodyError::TooLarge {
            max_body_bytes: self.max_body_bytes,
        }
    }
}

/// The bytes before the next `\n`, `Ok(None)` while the line is incomplete.
fn take_line(rest: &[u8]) -> Result<Option<&[u8]>, BodyError> {
    let too_long = BodyError::Malformed("line too long");
    match rest
        .iter()
        .take(MAX_CHUNK_LINE + 1)
        .position(|&b| b == b'\n')
    {
        Some(end) => Ok(Some(&rest[..end])),
        None if rest.len() > MAX_CHUNK_LINE => Err(too_long),
        None => Ok(None),
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A chunk-size line: hex digits, then optional `;extensions`.
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let bad = BodyError::Malformed("malformed chunk size");
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or(line)
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad);
    }
    let mut value = 0u64;
    for &byte in digits {
        let digit = (byte as char).to_digit(16).ok_or(bad.clone())?;
        value = value * 16 + u64::from(digit);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::Version;

    /// A decoded body and the bytes after it.
    type BodyAndRest = (Vec<u8>, Vec<u8>);

    /// Decodes `raw` fed whole, then byte by byte (the caller keeping what
    /// was not consumed), and checks both agree; returns the body when
    /// complete and the bytes that were not part of it.
    fn decode(framing: Framing, max: u64, raw: &[u8]) -> Result<Option<BodyAndRest>, BodyError> {
        let mut whole = BodyDecoder::new(framing, max)?;
        let mut whole_body = Vec::new();
        let progress = whole.feed(raw, &mut whole_body)?;
        let mut piecewise = BodyDecoder::new(framing, max)?;
        let mut piece_body = Vec::new();
        let mut pending = Vec::new();
        let mut used = 0;
        for &byte in raw {
            if piecewise.is_done() {
                break;
            }
            pending.push(byte);
            let step = piecewise.feed(&pending, &mut piece_body)?;
            pending.drain(..step.consumed);
            used += step.consumed;
        }
        assert_eq!(progress.done, piecewise.is_done());
        assert_eq!(whole_body, piece_body);
        if progress.done {
            assert_eq!(progress.consumed, used);
        }
        Ok(progress
            .done
            .then(|| (whole_body, raw[progress.consumed..].to_vec())))
    }

    #[test]
    fn chunked_bodies_decode_whole_and_byte_by_byte_and_end_exactly() {
        assert_eq!(
            decode(
                Framing::Chunked,
                100,
                b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nGET /next"
            ),
            Ok(Some((b"hello world".to_vec(), b"GET /next".to_vec())))
        );
        assert_eq!(
            decode(Framing::Chunked, 100, b"3\nabc\n0\n\n"),
            Ok(Some((b"abc".to_vec(), Vec::new())))
        );
        assert_eq!(decode(Framing::Chunked, 100, b"5\r\nhel"), Ok(None));
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        assert_eq!(
            decode(Framing::Length(3), 100, b"abcdef"),
            Ok(Some((b"abc".to_vec(), b"def".to_vec())))
        );
        assert_eq!(decode(Framing::Length(3), 100, b"ab"), Ok(None));
        assert_eq!(
            decode(Framing::Empty, 100, b"next"),
            Ok(Some((Vec::new(), b"next".to_vec())))
        );
    }

    #[test]
    fn broken_chunking_is_malformed_and_big_bodies_too_large() {
        let malformed = |raw: &[u8]| {
            matches!(
                decode(Framing::Chunked, 100, raw),
                Err(BodyError::Malformed(_))
            )
        };
        assert!(malformed(b"zz\r\n"));
        assert!(malformed(b"3\r\nabcX"));
        assert!(malformed(b"ffffffffffffffffff\r\n"));
        assert!(malformed(&[b'1'; MAX_CHUNK_LINE + 2]));
        let too_large = Err(BodyError::TooLarge {
            max_body_bytes: 100,
        });
        assert_eq!(decode(Framing::Chunked, 100, b"65\r\n"), too_large);
        assert_eq!(decode(Framing::Length(101), 100, b""), too_large);
        assert_eq!(decode(Framing::UntilClose, 100, &[b'a'; 101]), too_large);
        let mut endless = b"0\r\n".to_vec();
        while endless.len() < MAX_TRAILER_BYTES + 100 {
            endless.extend_from_slice(b"X-Trailer: 1\r\n");
        }
        assert_eq!(decode(Framing::Chunked, 100, &endless), too_large);
    }

    #[test]
    fn a_body_until_close_ends_at_close_and_others_are_incomplete() {
        let mut until_close = BodyDecoder::new(Framing::UntilClose, 100).unwrap();
        let mut body = Vec::new();
        let progress = until_close.feed(b"abc", &mut body).unwrap();
        assert_eq!((progress.consumed, progress.done), (3, false));
        assert_eq!(until_close.finish(), Ok(()));
        assert_eq!(body, b"abc");
        let mut chunked = BodyDecoder::new(Framing::Chunked, 100).unwrap();
        chunked.feed(b"3\r\nab", &mut body).unwrap();
        assert_eq!(chunked.finish(), Err(BodyError::Incomplete));
    }

    #[test]
    fn framing_follows_the_head() {
        let headers = |pairs: &[(&str, &str)]| {
            Headers(
                pairs
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let response = |status: u16, pairs: &[(&str, &str)]| ResponseHead {
            status,
            reason: String::new(),
            version: Version::Http11,
            headers: headers(pairs),
        };
        assert_eq!(
            Framing::of_request(&headers(&[("Content-Length", "12")])),
            Ok(Framing::Length(12))
        );
        assert_eq!(Framing::of_request(&headers(&[])), Ok(Framing::Empty));
        assert_eq!(
            Framing::of_request(&headers(&[
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "3")
            ])),
            Err(FramingError::LengthAndChunked)
        );
        for coding in ["gzip", "gzip, chunked", "chunked, chunked"] {
            assert_eq!(
                Framing::of_request(&headers(&[("Transfer-Encoding", coding)])),
                Err(FramingError::UnsupportedCoding)
            );
        }
        assert_eq!(
            Framing::of_request(&headers(&[("Transfer-Encoding", " Chunked ")])),
            Ok(Framing::Chunked)
        );
        let chunked = response(
            200,
            &[
                ("Transfer-Encoding", "gzip, chunked"),
                ("Content-Length", "3"),
            ],
        );
        assert_eq!(Framing::of_response(&chunked, false), Ok(Framing::Chunked));
        assert_eq!(
            Framing::of_response(&response(200, &[("Content-Length", "12")]), false),
            Ok(Framing::Length(12))
        );
        assert_eq!(Framing::of_response(&chunked, true), Ok(Framing::Empty));
        assert_eq!(
            Framing::of_response(&response(200, &[]), false),
            Ok(Framing::UntilClose)
        );
        assert_eq!(
            Framing::of_response(&response(304, &[("Content-Length", "9")]), false),
            Ok(Framing::Empty)
        );
        assert_eq!(
            Framing::of_response(
                &response(200, &[("Content-Length", "1"), ("Content-Length", "2")]),
                false
            ),
            Err(FramingError::ConflictingLengths)
        );
    }
}
