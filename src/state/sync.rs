//! The memory sync: the active set follows the database's table. A diff
//! against the last load is computed without any registry lock and applied
//! in short write rounds, and what the validator changed after the read
//! stands. [`run_memory_sync`] is the sync thread's loop.

use std::time::{Duration, Instant};

use crate::health::Health;
use crate::proxy::ActiveProxy;
use crate::scheduler::next_tick;
use crate::shutdown::ShutdownSignal;
use crate::store::Store;

use super::registry::{IntMap, IntSet};
use super::{State, SYNC_ROUND};

/// The memory sync thread's loop: every `interval`, reload the active set
/// from the database, then call `after_each` (the list yields follow the
/// same table). Between syncs the database is pinged every few seconds
/// while it is down, so that an outage's end shows in /health quickly.
/// Returns when `signal` fires.
pub fn run_memory_sync(
    store: &Store,
    state: &State,
    health: &Health,
    signal: &ShutdownSignal,
    interval: Duration,
    mut after_each: impl FnMut(),
) {
    let t0 = Instant::now();
    loop {
        let due = next_tick(t0, interval, Instant::now());
        while Instant::now() < due {
            if signal.wait(PING_INTERVAL.min(due - Instant::now())) {
                return;
            }
            if !health.database_up() && store.ping().is_ok() {
                health.record_database(true, None);
            }
        }
        sync_from_store(store, state, health);
        health.record_pool_size(state.active_count());
        after_each();
    }
}

/// How often a database that is down is pinged between syncs.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Reloads the active set from the database; the database's health follows.
/// The mark is taken before the read, so that what the validator changes
/// while the table is read is not undone by the older read.
pub fn sync_from_store(store: &Store, state: &State, health: &Health) {
    let mark = state.sync_mark();
    match store.load_active() {
        Ok(active) => {
            health.record_database(true, None);
            let report = state.sync_active(active, mark);
            log::debug!(
                "memory sync: {} activated or updated, {} deactivated, {} newer changes kept",
                report.activated,
                report.deactivated,
                report.kept_newer
            );
        }
        Err(err) => health.record_database(false, Some(&err)),
    }
}

/// Where the validator's change sequence stood when a memory sync began
/// (see [`State::sync_mark`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncMark(u64);

/// What a memory sync changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Proxies made active or updated.
    pub activated: usize,
    pub deactivated: usize,
    /// Proxies left as the validator set them after the sync's read.
    pub kept_newer: usize,
}

impl State {
    /// Makes `proxies` the whole active set, overriding every change made
    /// so far (tests, benchmarks, a load with nothing in flight).
    pub fn replace_active(&self, proxies: Vec<ActiveProxy>) -> SyncReport {
        let mark = self.sync_mark();
        self.sync_active(proxies, mark)
    }

    /// Marks the start of a memory sync: take it before reading the table,
    /// and hand it to [`State::sync_active`] with what was read.
    pub fn sync_mark(&self) -> SyncMark {
        SyncMark(self.registry.read().change_seq())
    }

    /// Makes `proxies`, the active rows read from the table after `mark`,
    /// the active set, except for proxies the validator changed after
    /// `mark`: their change is newer than the read (the validator applies a
    /// change only after writing it), so it stands until the next sync.
    ///
    /// The change set is computed without any registry lock, against the
    /// previous sync's load and the validator changes since; the write lock
    /// is then taken in short rounds that apply only that diff, so a sync of
    /// a large pool never holds get-proxy back for long.
    pub fn sync_active(&self, proxies: Vec<ActiveProxy>, mark: SyncMark) -> SyncReport {
        let mut base = self.sync_base.lock();
        let touched: IntSet = self
            .registry
            .read()
            .changed_until(mark.0)
            .into_iter()
            .collect();
        let mut loaded: IntMap<i64, u64> = IntMap::default();
        loaded.reserve(proxies.len());
        let mut activate: Vec<(ActiveProxy, String)> = Vec::new();
        for proxy in proxies {
            let print = fingerprint(&proxy);
            let unchanged =
                base.prints.get(&proxy.id) == Some(&print) && !touched.contains(&proxy.id);
            loaded.insert(proxy.id, print);
            if !unchanged {
                let url = proxy.key.url();
                activate.push((proxy, url));
            }
        }
        let deactivate: Vec<i64> = base
            .prints
            .keys()
            .chain(touched.iter())
            .filter(|id| !loaded.contains_key(id))
            .copied()
            .collect::<IntSet>()
            .into_iter()
            .collect();
        let mut report = SyncReport::default();
        for chunk in deactivate.chunks(SYNC_ROUND) {
            let mut registry = self.registry.write();
            for &id in chunk {
                if registry.changed_after(id, mark.0) {
                    report.kept_newer += 1;
                    continue;
                }
                registry.deactivate_id(id);
                report.deactivated += 1;
            }
        }
        let mut activate = activate.into_iter().peekable();
        while activate.peek().is_some() {
            let mut registry = self.registry.write();
            for (proxy, url) in activate.by_ref().take(SYNC_ROUND) {
                if registry.changed_after(proxy.id, mark.0) {
                    report.kept_newer += 1;
                    continue;
                }
                registry.activate(proxy, &url);
                report.activated += 1;
            }
        }
        self.registry.write().forget_changes_until(mark.0);
        base.prints = loaded;
        base.from_database = true;
        report
    }
}

/// What the active set was last loaded from: each proxy of that load, by
/// id, as a [`fingerprint`], and whether that load was the database's.
#[derive(Debug, Default)]
pub(super) struct SyncBase {
    pub prints: IntMap<i64, u64>,
    /// A database load was applied: a snapshot's active set is ignored
    /// from then on.
    pub from_database: bool,
}

/// A 64-bit digest of everything the registry keeps about a proxy: two
/// loads of the same row have the same one, and a changed row a different
/// one (a collision, about 2^-64 per change, delays that change to the
/// proxy's next one).
pub(super) fn fingerprint(proxy: &ActiveProxy) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    proxy.id.hash(&mut hasher);
    proxy.key.hash(&mut hasher);
    proxy.latency_ms.hash(&mut hasher);
    proxy.anonymity.hash(&mut hasher);
    proxy.country.hash(&mut hasher);
    proxy.supports_https.hash(&mut hasher);
    proxy.last_validated_at.hash(&mut hasher);
    proxy.anonymity_evidence.hash(&mut hasher);
    hasher.finish()
}
