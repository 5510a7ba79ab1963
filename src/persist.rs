//! Moves the state manager's scores and active set to and from the snapshot
//! file: the restore at start, and writes (periodic, on request, on
//! shutdown) one at a time, each from a copy taken quickly so that requests
//! never wait for the encoding or the disk.
//!
//! Every write runs on one dedicated thread, whoever asks for it. A write
//! allocates about 100 MB for a million entries (the copy and its
//! encoding); done on whichever HTTP worker served `POST /admin/snapshot`,
//! each worker's malloc arena kept its own such peak, and the resident size
//! grew by that much per worker.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use chrono::Utc;
use crossbeam_channel::{Receiver, Sender};

use crate::health::Health;
use crate::snapshot::{self, Loaded, SnapshotError, SnapshotInfo};
use crate::state::{RestoreReport, State};

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("the snapshot writer has stopped")]
    WriterStopped,
}

/// Where a write's outcome goes back to the one who asked for it.
type Reply = Sender<Result<SnapshotInfo, SnapshotError>>;

pub struct Snapshotter {
    path: PathBuf,
    state: Arc<State>,
    health: Arc<Health>,
    /// Write requests for the writer thread, which ends when this is dropped.
    jobs: Sender<Reply>,
    /// How long the last write took, copy included, in milliseconds.
    last_write_ms: Arc<AtomicU64>,
}

/// What the writer thread needs.
struct Writer {
    path: PathBuf,
    state: Arc<State>,
    health: Arc<Health>,
    last_write_ms: Arc<AtomicU64>,
}

impl Writer {
    fn run(self, jobs: Receiver<Reply>) {
        for reply in jobs {
            let started = std::time::Instant::now();
            let dropped = self.state.drop_idle(Utc::now());
            if dropped > 0 {
                log::info!("{dropped} stats entries idle for over a week dropped");
            }
            let data = self.state.snapshot_data(Utc::now());
            let outcome = snapshot::write_atomic(&self.path, &data);
            drop(data);
            if outcome.is_ok() {
                self.health.record_snapshot_now();
            }
            let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last_write_ms.store(took, Ordering::Relaxed);
            // The asker may have given up waiting; the file is written anyway.
            let _ = reply.send(outcome);
        }
    }
}

impl Snapshotter {
    /// Starts the writer thread.
    pub fn new(path: PathBuf, state: Arc<State>, health: Arc<Health>) -> io::Result<Snapshotter> {
        // Requests queue up; the writer takes them one at a time.
        let (jobs, receiver) = crossbeam_channel::bounded::<Reply>(64);
        let last_write_ms = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            path: path.clone(),
            state: state.clone(),
            health: health.clone(),
            last_write_ms: last_write_ms.clone(),
        };
        thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(move || writer.run(receiver))?;
        Ok(Snapshotter {
            path,
            state,
            health,
            jobs,
            last_write_ms,
        })
    }

    /// How long the last write took (zero before the first): what the
    /// shutdown sets aside for its own write.
    pub fn last_write_time(&self) -> Duration {
        Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed))
    }

    /// Copies the stats, then encodes and writes them atomically; returns
    /// when the file is written.
    pub fn write(&self) -> Result<SnapshotInfo, PersistError> {
        let (reply, outcome) = crossbeam_channel::bounded(1);
        self.jobs
            .send(reply)
            .map_err(|_| PersistError::WriterStopped)?;
        let outcome = outcome.recv().map_err(|_| PersistError::WriterStopped)?;
        Ok(outcome?)
    }

    /// Writes and logs the outcome (for the periodic and shutdown writes).
    pub fn write_logged(&self) {
        match self.write() {
            Ok(info) => log::info!(
                "snapshot written: {} entries, {} active proxies, {} bytes in {} ms",
                info.entries,
                info.active,
                info.bytes,
                info.duration.as_millis()
            ),
            Err(err) => log::error!("{err}"),
        }
    }

    /// Loads the snapshot into the state at start and says what it kept
    /// (`None` when nothing was loaded). A missing file means empty stats
    /// and no active set; an unreadable one has been moved aside by
    /// `snapshot::load`.
    pub fn restore(&self) -> Option<RestoreReport> {
        let path = self.path.display();
        let stale = snapshot::remove_stale_temps(&self.path);
        if stale > 0 {
            log::info!("removed {stale} temporary snapshot files left by an interrupted write");
        }
        match snapshot::load(&self.path) {
            Ok(Loaded::Loaded(data)) => {
                let report = self.state.restore(data, Utc::now());
                self.health.record_snapshot_now();
                log::info!(
                    "snapshot {path} loaded: {} sources, {} stats entries ({} aged out, {} invalid), \
                     {} active proxies ({} checked too long ago or invalid), taken at {}",
                    report.sources,
                    report.entries,
                    report.aged_out,
                    report.invalid,
                    report.active,
                    report.active_stale,
                    report.taken_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
                Some(report)
            }
            Ok(Loaded::Missing) => {
                log::info!("no snapshot at {path}: starting with empty stats");
                None
            }
            Ok(Loaded::Corrupt { moved_to, reason }) => {
                log::error!(
                    "snapshot {path} is unreadable ({reason}); moved aside to {}, starting with empty stats",
                    moved_to.display()
                );
                None
            }
            Err(err) => {
                log::error!("{err}; starting with empty stats");
                None
            }
        }
    }
}
