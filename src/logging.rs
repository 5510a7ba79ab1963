//! Logging off the request path. Records are formatted by `env_logger` on
//! the thread that logs them (filters and format as `RUST_LOG` says) and
//! handed, one line at a time, to the `log-writer` thread through a bounded
//! channel; that thread writes whatever has queued up to stderr in one
//! write. A request thread never waits for stderr: when the queue is full an
//! access line is dropped and counted (the writer says how many), while
//! other lines wait up to [`SEND_WAIT`] for room.
//!
//! [`Escaped`] makes text a client sent safe to put in a line: a request
//! path with a newline cannot forge a second line.

use std::cell::Cell;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};

/// Lines queued for the writer at most.
pub const QUEUE_LINES: usize = 16 * 1024;
/// How long a line that must not be dropped waits for room in the queue.
pub const SEND_WAIT: Duration = Duration::from_secs(1);
/// The writer hands stderr this much at most per write.
const BATCH_BYTES: usize = 256 * 1024;
/// The target of the per-request access log.
pub const ACCESS_TARGET: &str = "access";

thread_local! {
    /// Whether the record being written may be dropped when the queue is full.
    static DROPPABLE: Cell<bool> = const { Cell::new(false) };
}

enum Message {
    Line(Vec<u8>),
    /// Write everything queued before this, then answer.
    Flush(Sender<()>),
}

/// Installs the process's logger: `env_logger` as configured by `builder`,
/// writing through the queue. Call once, before any thread logs.
pub fn init(mut builder: env_logger::Builder) {
    let (sender, receiver) = crossbeam_channel::bounded(QUEUE_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let writer = QueueWriter {
        sender: sender.clone(),
        dropped: Arc::clone(&dropped),
    };
    let spawned = thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_loop(receiver, dropped));
    if spawned.is_ok() {
        builder.target(env_logger::Target::Pipe(Box::new(writer)));
    }
    let inner = builder.build();
    let max_level = inner.filter();
    if log::set_boxed_logger(Box::new(QueuedLogger { inner, sender })).is_ok() {
        log::set_max_level(max_level);
    }
}

/// `env_logger` with the droppable flag set around access lines.
struct QueuedLogger {
    inner: env_logger::Logger,
    sender: Sender<Message>,
}

impl log::Log for QueuedLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if !self.inner.matches(record) {
            return;
        }
        let droppable = record.target() == ACCESS_TARGET;
        DROPPABLE.with(|flag| flag.set(droppable));
        self.inner.log(record);
        DROPPABLE.with(|flag| flag.set(false));
    }

    /// Waits (up to [`SEND_WAIT`] twice) until every line queued so far is
    /// written.
    fn flush(&self) {
        let (done, wait) = crossbeam_channel::bounded(1);
        if self
            .sender
            .send_timeout(Message::Flush(done), SEND_WAIT)
            .is_ok()
        {
            let _ = wait.recv_timeout(SEND_WAIT);
        }
    }
}

/// Where `env_logger` writes: each `write` is one formatted record.
struct QueueWriter {
    sender: Sender<Message>,
    dropped: Arc<AtomicU64>,
}

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let line = Message::Line(buf.to_vec());
        if DROPPABLE.with(Cell::get) {
            match self.sender.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(Message::Line(line))) => {
                    io::stderr().write_all(&line)?;
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        } else {
            match self.sender.send_timeout(line, SEND_WAIT) {
                Ok(()) => {}
                Err(SendTimeoutError::Timeout(Message::Line(line)))
                | Err(SendTimeoutError::Disconnected(Message::Line(line))) => {
                    // The writer is stuck or gone: this line goes straight out.
                    io::stderr().write_all(&line)?;
                }
                Err(_) => {}
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn write_loop(receiver: Receiver<Message>, dropped: Arc<AtomicU64>) {
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
    let mut acks = Vec::new();
    loop {
        let first = match receiver.recv_timeout(Duration::from_secs(1)) {
            Ok(message) => Some(message),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut next = first;
        while let Some(message) = next {
            match message {
                Message::Line(line) => batch.extend_from_slice(&line),
                Message::Flush(done) => acks.push(done),
            }
            if batch.len() >= BATCH_BYTES {
                break;
            }
            next = receiver.try_recv().ok();
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            batch.extend_from_slice(dropped_line(lost).as_bytes());
        }
        if !batch.is_empty() {
            // Nowhere to report a failed write to stderr.
            let _ = io::stderr().lock().write_all(&batch);
            batch.clear();
        }
        for done in acks.drain(..) {
            let _ = done.send(());
        }
    }
}

/// The line that says access lines were lost, in `env_logger`'s layout.
fn dropped_line(lost: u64) -> String {
    format!(
        "[{} WARN  {}] {lost} access log lines dropped: the log writer fell behind (queue of {QUEUE_LINES} lines)\n",
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        module_path!()
    )
}

/// Text from outside (a path, a method, a header) fit for a log line:
/// control characters and Unicode line separators are written as escapes
/// (`\n`, `\u{1b}`), so nothing a client sends can end the line or forge
/// another.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unsafe_char = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
        if !self.0.chars().any(unsafe_char) {
            return f.write_str(self.0);
        }
        for c in self.0.chars() {
            if unsafe_char(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_cannot_end_a_log_line() {
        let escaped = |text: &str| Escaped(text).to_string();
        assert_eq!(escaped("/get-proxy?source=a"), "/get-proxy?source=a");
        assert_eq!(escaped("/nope\nforged"), "/nope\\nforged");
        assert_eq!(escaped("a\r\n\u{1b}[31m"), "a\\r\\n\\u{1b}[31m");
        assert_eq!(escaped("x\u{2028}y\u{85}"), "x\\u{2028}y\\u{85}");
        assert_eq!(escaped("ünïcödé"), "ünïcödé");
        for text in ["/a\nb", "\r", "\u{0}", "\u{7f}", "\u{2029}"] {
            assert!(!escaped(text).chars().any(|c| c.is_control()), "{text:?}");
        }
    }

    #[test]
    fn the_dropped_line_is_one_line() {
        let line = dropped_line(7);
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.contains("7 access log lines dropped"), "{line}");
    }
}
