//! Moving bytes: a tunnel as two copy loops (one per direction, the second
//! on its own thread) under an idle timeout, and an http answer's body
//! copied as its head frames it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::http::io::is_timeout;
use crate::http::{BodyDecoder, BodyError, Framing};

const BUFFER: usize = 16 * 1024;
/// The copy thread of a tunnel's second direction only copies.
const COPY_STACK: usize = 64 * 1024;

/// Byte counts of a finished tunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelBytes {
    pub to_target: u64,
    pub to_client: u64,
}

/// Copies both ways between `client` and `upstream` until both sides are
/// done or no byte moved either way for `idle`. `first_byte_back` runs once,
/// when the target's first byte reaches the client. `client_pending` and
/// `upstream_pending` are bytes read already, sent first.
pub fn tunnel(
    client: TcpStream,
    upstream: TcpStream,
    client_pending: &[u8],
    upstream_pending: &[u8],
    idle: Duration,
    first_byte_back: impl FnOnce(),
) -> TunnelBytes {
    let start = Instant::now();
    let clock = Arc::new(Activity {
        start,
        last_ms: AtomicU64::new(0),
        closed: AtomicBool::new(false),
    });
    let mut first_byte_back = Some(first_byte_back);
    let mut bytes = TunnelBytes::default();
    let (Ok(client_reader), Ok(upstream_writer)) = (client.try_clone(), upstream.try_clone())
    else {
        return bytes;
    };
    if !client_pending.is_empty() {
        if (&upstream).write_all(client_pending).is_err() {
            return bytes;
        }
        bytes.to_target += client_pending.len() as u64;
    }
    if !upstream_pending.is_empty() {
        if (&client).write_all(upstream_pending).is_err() {
            return bytes;
        }
        bytes.to_client += upstream_pending.len() as u64;
        if let Some(callback) = first_byte_back.take() {
            callback();
        }
    }
    let forward = thread::Builder::new()
        .name("gateway-copy".into())
        .stack_size(COPY_STACK)
        .spawn({
            let clock = clock.clone();
            move || copy_loop(client_reader, upstream_writer, idle, &clock, |_| {})
        });
    let Ok(forward) = forward else {
        return bytes;
    };
    bytes.to_client += copy_loop(upstream, client, idle, &clock, |_| {
        if let Some(callback) = first_byte_back.take() {
            callback();
        }
    });
    bytes.to_target += forward.join().unwrap_or(0);
    bytes
}

/// When a tunnel last moved a byte, shared by its two directions.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// Set when one side failed or idled out: both stop.
    closed: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// One direction: returns the bytes copied. On the reader's end it
/// half-closes the writer; on an error or when idle it closes both.
fn copy_loop(
    mut from: TcpStream,
    mut to: TcpStream,
    idle: Duration,
    clock: &Activity,
    mut on_bytes: impl FnMut(usize),
) -> u64 {
    // Short reads let a direction notice that its peer closed the tunnel.
    let tick = idle.min(Duration::from_secs(1));
    let _ = from.set_read_timeout(Some(tick));
    let _ = to.set_write_timeout(Some(idle));
    let mut buffer = vec![0u8; BUFFER];
    let mut copied = 0u64;
    loop {
        if clock.closed.load(Ordering::Relaxed) {
            break;
        }
        match from.read(&mut buffer) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return copied;
            }
            Ok(n) => {
                clock.touch();
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
                copied += n as u64;
                on_bytes(n);
            }
            Err(err) if is_timeout(&err) => {
                if clock.idle_for() >= idle {
                    break;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    clock.closed.store(true, Ordering::Relaxed);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    copied
}

/// Copies a body framed as `framing` from `from` (after the bytes already
/// in `pending`) to `to` as it is: chunked stays chunked, the shared
/// decoder only says where the body ends. Returns the bytes copied; an
/// error when the body ended early (the connection cannot be reused).
pub fn copy_body(
    from: &mut TcpStream,
    pending: &mut Vec<u8>,
    to: &mut impl Write,
    framing: Framing,
) -> io::Result<u64> {
    let invalid = |err: BodyError| io::Error::new(io::ErrorKind::InvalidData, err.to_string());
    let mut decoder = BodyDecoder::new(framing, u64::MAX).map_err(invalid)?;
    let mut decoded = Vec::new();
    let mut buffer = vec![0u8; BUFFER];
    let mut copied = 0u64;
    loop {
        if decoder.is_done() {
            return Ok(copied);
        }
        if !pending.is_empty() {
            decoded.clear();
            let progress = decoder.feed(pending, &mut decoded).map_err(invalid)?;
            to.write_all(&pending[..progress.consumed])?;
            copied += progress.consumed as u64;
            pending.drain(..progress.consumed);
            if progress.done {
                return Ok(copied);
            }
        }
        let n = match from.read(&mut buffer) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if n == 0 {
            decoder.finish().map_err(invalid)?;
            return Ok(copied);
        }
        pending.extend_from_slice(&buffer[..n]);
    }
}
