//! What the service knows of its own health without asking anyone on the hot
//! path: whether the database answered last time, and when the snapshot was
//! last written. Background threads update it; /health only reads it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;

/// Pool-size samples kept for the dashboard: 12 hours at one every 30 s.
const POOL_HISTORY_LEN: usize = 1440;
const POOL_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Health {
    database_up: AtomicBool,
    /// Database outages seen since start (transitions from up to down).
    outages: AtomicU64,
    /// Unix seconds of the last snapshot written or loaded; 0 = none.
    snapshot_at: AtomicI64,
    /// (when, active proxies), oldest first.
    pool_history: Mutex<VecDeque<(DateTime<Utc>, usize)>>,
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    pub fn database_up(&self) -> bool {
        self.database_up.load(Ordering::Relaxed)
    }

    /// How many times the database went down since start: what was written
    /// before an outage may not be there after it (a crash can lose the last
    /// commits of a server without synchronous commits, and a database can
    /// come back restored from a backup).
    pub fn database_outages(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }

    /// Records the outcome of a database operation; logs transitions only, so
    /// an outage is reported once, not once per attempt.
    pub fn record_database(&self, up: bool, error: Option<&dyn std::fmt::Display>) {
        let was_up = self.database_up.swap(up, Ordering::Relaxed);
        match (was_up, up) {
            (true, false) => {
                self.outages.fetch_add(1, Ordering::Relaxed);
                match error {
                    Some(err) => {
                        log::warn!("database down: {err}; serving from memory, retrying")
                    }
                    None => log::warn!("database down; serving from memory, retrying"),
                }
            }
            (false, true) => log::info!("database up"),
            _ => {}
        }
    }

    pub fn record_snapshot_now(&self) {
        self.snapshot_at
            .store(Utc::now().timestamp(), Ordering::Relaxed);
    }

    /// Seconds since the last snapshot, or None when there was none.
    pub fn snapshot_age_seconds(&self) -> Option<i64> {
        let at = self.snapshot_at.load(Ordering::Relaxed);
        (at > 0).then(|| (Utc::now().timestamp() - at).max(0))
    }

    /// Records the pool size now (after each sync and validation cycle). The
    /// newest sample stands for the period under way: it is replaced until
    /// it is [`POOL_SAMPLE_EVERY`] after the one before it, so the ring keeps
    /// one sample per period and its newest is always current.
    pub fn record_pool_size(&self, active: usize) {
        self.record_pool_size_at(Utc::now(), active);
    }

    fn record_pool_size_at(&self, now: DateTime<Utc>, active: usize) {
        let mut history = self.pool_history.lock();
        let period = chrono::Duration::from_std(POOL_SAMPLE_EVERY).unwrap_or_default();
        let len = history.len();
        if len >= 2 && history[len - 1].0 - history[len - 2].0 < period {
            history[len - 1] = (now, active);
            return;
        }
        if history.len() == POOL_HISTORY_LEN {
            history.pop_front();
        }
        history.push_back((now, active));
    }

    pub fn pool_history(&self) -> Vec<(DateTime<Utc>, usize)> {
        self.pool_history.lock().iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_samples_are_a_period_apart_and_the_newest_is_current() {
        let health = Health::new();
        let t0 = Utc::now();
        for (i, active) in [0, 3, 5, 8, 9, 10, 12, 14, 15].into_iter().enumerate() {
            let at = t0 + chrono::Duration::seconds(10 * i as i64);
            health.record_pool_size_at(at, active);
        }
        let seconds: Vec<(i64, usize)> = health
            .pool_history()
            .into_iter()
            .map(|(at, active)| ((at - t0).num_seconds(), active))
            .collect();
        // Kept: one per 30 s, then the newest call.
        assert_eq!(seconds, vec![(0, 0), (30, 8), (60, 12), (80, 15)]);
    }
}
