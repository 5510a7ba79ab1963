//! Moves the state manager's scores to and from the snapshot file: the
//! restore at start, and writes (periodic, on request, on shutdown) one at a
//! time, each from a copy taken quickly so that requests never wait for the
//! encoding or the disk.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::Utc;
use parking_lot::Mutex;

use crate::health::Health;
use crate::snapshot::{self, Loaded, SnapshotError, SnapshotInfo};
use crate::state::State;

pub struct Snapshotter {
    path: PathBuf,
    state: Arc<State>,
    health: Arc<Health>,
    /// Two writers would race on the temporary file; one waits instead.
    writing: Mutex<()>,
}

impl Snapshotter {
    pub fn new(path: PathBuf, state: Arc<State>, health: Arc<Health>) -> Snapshotter {
        Snapshotter {
            path,
            state,
            health,
            writing: Mutex::new(()),
        }
    }

    /// Copies the stats, then encodes and writes them atomically.
    pub fn write(&self) -> Result<SnapshotInfo, SnapshotError> {
        let _writing = self.writing.lock();
        let dropped = self.state.drop_idle(Utc::now());
        if dropped > 0 {
            log::info!("{dropped} stats entries idle for over a week dropped");
        }
        let data = self.state.snapshot_data(Utc::now());
        let info = snapshot::write_atomic(&self.path, &data)?;
        self.health.record_snapshot_now();
        Ok(info)
    }

    /// Writes and logs the outcome (for the periodic and shutdown writes).
    pub fn write_logged(&self) {
        match self.write() {
            Ok(info) => log::info!(
                "snapshot written: {} entries, {} bytes in {} ms",
                info.entries,
                info.bytes,
                info.duration.as_millis()
            ),
            Err(err) => log::error!("{err}"),
        }
    }

    /// Loads the snapshot into the state at start. A missing file means empty
    /// stats; an unreadable one has been moved aside by `snapshot::load`.
    pub fn restore(&self) {
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
                    "snapshot {path} loaded: {} sources, {} stats entries ({} aged out, {} invalid)",
                    report.sources,
                    report.entries,
                    report.aged_out,
                    report.invalid
                );
            }
            Ok(Loaded::Missing) => log::info!("no snapshot at {path}: starting with empty stats"),
            Ok(Loaded::Corrupt { moved_to, reason }) => log::error!(
                "snapshot {path} is unreadable ({reason}); moved aside to {}, starting with empty stats",
                moved_to.display()
            ),
            Err(err) => log::error!("{err}; starting with empty stats"),
        }
    }
}
