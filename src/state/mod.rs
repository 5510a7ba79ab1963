//! The in-memory state manager: the active proxies and every source's scores
//! and bans. It answers get-proxy and feedback from memory alone, thousands of
//! times a second, so it is the only place that knows scores and bans, it
//! never does I/O, and every decision takes `now` as a parameter.
//!
//! Locks, and the order in which they may be taken (never the other way
//! round, which could deadlock behind a queued writer):
//! 0. `sync_base` (Mutex): the last sync's load, taken by the sync and by
//!    the restore of a snapshot's active set.
//! 1. `registry` (RwLock): known proxies and the active set. Readers are
//!    get-proxy, feedback (URL lookup only) and introspection; writers are
//!    the database sync (in short rounds that apply a diff computed
//!    outside the lock) and the validator's changes.
//! 2. `sources` (RwLock): name to source, written only when a source is new.
//! 3. one source's Mutex: its stats. One source's traffic never waits for
//!    another's; no registry lock is ever requested while holding one.

mod estimate;
mod gateway;
mod pick;
mod registry;
mod restore;
mod source;
mod sync;
mod types;
mod url;
mod views;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use parking_lot::{Mutex, RwLock};

use crate::config::ScoringConfig;
use crate::proxy::ActiveProxy;

pub use gateway::proxy_key_of_url;
use pick::{compile_filter, Picker};
use registry::Registry;
use source::{Rules, SourceState};
use sync::SyncBase;

pub use sync::{run_memory_sync, sync_from_store, SyncMark, SyncReport};
pub use types::*;

/// The most distinct proxies one get-proxy may ask for.
pub const MAX_COUNT: usize = 100;

/// Restored stats idle for longer than this are dropped. Public proxies
/// churn fast: most that stop being listed are gone for good within days,
/// and keeping their history would grow the snapshot without end. A week
/// still spans a long weekend's outage and far exceeds the longest ban
/// (`ban_cooldown_max`, hours), so a proxy that returns keeps its record and
/// its ban count when it plausibly matters.
pub const STATS_MAX_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long after its last check a proxy of a snapshot's active set may
/// still be served, unless configured otherwise (see
/// [`active_snapshot_max_age`]).
pub const ACTIVE_SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Sources kept at once unless configured otherwise (`[state] max_sources`).
pub const DEFAULT_MAX_SOURCES: usize = 10_000;

/// Candidate lists this short take part in the draw whole.
const EXACT_SCAN_LEN: usize = 256;
/// Activations or deactivations a sync applies per write lock: short enough
/// that get-proxy waits well under a millisecond behind one round.
const SYNC_ROUND: usize = 1024;
/// Slots a snapshot copies the active records of per read lock.
const SNAPSHOT_ROUND: usize = 4096;

/// The bound on a snapshot's active set, for a service that revalidates
/// active proxies every `revalidate_after`: a proxy is served from a
/// snapshot only if its last check is more recent than this.
///
/// The snapshot's active set is served only when the service starts while
/// the database is down, and nothing can be checked until it is back. A day
/// covers a night's outage and a restart in it; public proxies churn within
/// hours to days, so past a day most of such a set is dead, and 503
/// `no_active` tells clients the truth better than a list of corpses. The
/// bound is on each proxy's last check, not on the file's age: a snapshot
/// rewritten during an outage keeps the old checks, so restarts cannot
/// stretch it. It is at least twice `revalidate_after`, because a running
/// service itself serves proxies up to that long after their check.
pub fn active_snapshot_max_age(revalidate_after: Duration) -> Duration {
    ACTIVE_SNAPSHOT_MAX_AGE.max(revalidate_after.saturating_mul(2))
}

/// The state manager. Shared in an `Arc` by the API, the sync and the
/// snapshot threads.
#[derive(Debug)]
pub struct State {
    rules: Rules,
    registry: RwLock<Registry>,
    /// What the active set was last loaded from; the next sync diffs
    /// against it without any registry lock.
    sync_base: Mutex<SyncBase>,
    /// A snapshot's active proxies checked longer ago are not restored.
    active_snapshot_max_age: Duration,
    sources: RwLock<HashMap<String, Arc<Mutex<SourceState>>>>,
    /// New sources are refused once this many exist.
    max_sources: usize,
    requests: AtomicU64,
    feedbacks: AtomicU64,
}

fn millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl State {
    pub fn new(config: &ScoringConfig) -> State {
        State {
            rules: Rules::new(config),
            registry: RwLock::new(Registry::default()),
            sync_base: Mutex::new(SyncBase::default()),
            active_snapshot_max_age: ACTIVE_SNAPSHOT_MAX_AGE,
            sources: RwLock::new(HashMap::new()),
            max_sources: DEFAULT_MAX_SOURCES,
            requests: AtomicU64::new(0),
            feedbacks: AtomicU64::new(0),
        }
    }

    /// Bounds the number of sources (the default is [`DEFAULT_MAX_SOURCES`]).
    pub fn with_max_sources(mut self, max_sources: usize) -> State {
        self.max_sources = max_sources.max(1);
        self
    }

    /// Bounds how long after its last check a snapshot's active proxy is
    /// still restored (the default is [`ACTIVE_SNAPSHOT_MAX_AGE`]).
    pub fn with_active_snapshot_max_age(mut self, max_age: Duration) -> State {
        self.active_snapshot_max_age = max_age;
        self
    }

    /// Applies the validator's findings at once. Call it only after they
    /// were written to the table, or the next sync reverts them.
    pub fn apply_changes(&self, activated: Vec<ActiveProxy>, deactivated: Vec<i64>) {
        let with_urls: Vec<(ActiveProxy, String)> = activated
            .into_iter()
            .map(|proxy| {
                let url = proxy.key.url();
                (proxy, url)
            })
            .collect();
        let mut registry = self.registry.write();
        let seq = registry.next_change();
        for id in deactivated {
            registry.deactivate_id(id);
            registry.stamp_change(id, seq);
        }
        for (proxy, url) in with_urls {
            registry.stamp_change(proxy.id, seq);
            registry.activate(proxy, &url);
        }
    }

    pub fn active_count(&self) -> usize {
        self.registry.read().active_count()
    }

    fn source_handle(&self, name: &str) -> Arc<Mutex<SourceState>> {
        if let Some(handle) = self.sources.read().get(name) {
            return Arc::clone(handle);
        }
        let mut sources = self.sources.write();
        Arc::clone(sources.entry(name.to_string()).or_default())
    }

    /// The source named `name`, created if new and there is room for it.
    fn source_handle_bounded(&self, name: &str) -> Result<Arc<Mutex<SourceState>>, TooManySources> {
        if let Some(handle) = self.sources.read().get(name) {
            return Ok(Arc::clone(handle));
        }
        let mut sources = self.sources.write();
        if !sources.contains_key(name) && sources.len() >= self.max_sources {
            return Err(TooManySources {
                max_sources: self.max_sources,
            });
        }
        Ok(Arc::clone(sources.entry(name.to_string()).or_default()))
    }

    /// Chooses proxies for `source`. Returns up to `query.count` distinct
    /// proxies; fewer when fewer are eligible. A new source is created only
    /// when it is given a proxy, and only while fewer than `max_sources`
    /// exist: a refused or failed request leaves nothing behind.
    pub fn get_proxy(
        &self,
        source: &str,
        query: &PickQuery,
        now: DateTime<Utc>,
    ) -> Result<Vec<Pick>, NoProxy> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let now_ms = millis(now);
        let count = query.count.clamp(1, MAX_COUNT);
        let filter = compile_filter(query);
        let registry = self.registry.read();
        let (existing, full) = {
            let sources = self.sources.read();
            (
                sources.get(source).cloned(),
                sources.len() >= self.max_sources,
            )
        };
        let is_new = existing.is_none();
        if is_new && full {
            return Err(NoProxy {
                reason: NoProxyReason::TooManySources(TooManySources {
                    max_sources: self.max_sources,
                }),
                retry_after: None,
            });
        }
        let handle = existing.unwrap_or_default();
        let mut source_state = handle.lock();
        source_state.requests += 1;
        source_state.last_request = now_ms;
        if registry.active_count() == 0 {
            return Err(NoProxy {
                reason: NoProxyReason::NoActive,
                retry_after: None,
            });
        }
        source_state.lift_expired_bans(now_ms, &self.rules);
        let candidates = registry.candidates(&filter);
        let picker = Picker {
            registry: &registry,
            source: &source_state,
            filter: &filter,
            candidates,
            rules: &self.rules,
            now: now_ms,
        };
        let mut rng = fastrand::Rng::with_seed(fastrand::u64(..));
        let mut chosen = if candidates.len() <= EXACT_SCAN_LEN {
            picker.pick_exact(count, &mut rng)
        } else {
            picker.pick_fast(count, &mut rng)
        };
        if chosen.is_empty() && candidates.len() > EXACT_SCAN_LEN {
            // The fast path samples; before answering "none", look at all.
            chosen = picker.pick_exact(count, &mut rng);
        }
        if chosen.is_empty() {
            return Err(picker.explain());
        }
        for (slot, _) in &chosen {
            if let Some(stats) = source_state.entries.get_mut(slot) {
                stats.last_used = now_ms;
            }
        }
        if is_new {
            // Picked on a fresh state with no entries: only its counter and
            // clock carry over (a racing request may have created it).
            let fresh = (source_state.requests, source_state.last_request);
            drop(source_state);
            let handle = self.source_handle_bounded(source).map_err(|err| NoProxy {
                reason: NoProxyReason::TooManySources(err),
                retry_after: None,
            })?;
            let mut created = handle.lock();
            created.requests += fresh.0;
            created.last_request = created.last_request.max(fresh.1);
        } else {
            drop(source_state);
        }
        let picks = chosen
            .into_iter()
            .filter_map(|(slot, score)| {
                let entry = registry.entry(slot)?;
                let record = entry.active.as_ref()?;
                Some(Pick::of(&entry.url, &record.proxy, score))
            })
            .collect();
        Ok(picks)
    }

    /// Records a client's report on a proxy it was given.
    pub fn feedback(
        &self,
        source: &str,
        proxy_url: &str,
        success: bool,
        now: DateTime<Utc>,
    ) -> Result<FeedbackOutcome, FeedbackError> {
        let (slot, exit) = {
            let registry = self.registry.read();
            let slot = registry
                .slot_of_url(proxy_url)
                .ok_or(FeedbackError::UnknownProxy)?;
            (slot, registry.exit_of(slot))
        };
        let handle = self.source_handle_bounded(source)?;
        self.feedbacks.fetch_add(1, Ordering::Relaxed);
        let mut source_state = handle.lock();
        source_state.last_request = source_state.last_request.max(millis(now));
        let bans_before = source_state.entries.get(&slot).map_or(0, |s| s.ban_count);
        let stats = source_state.record(slot, success, millis(now), &self.rules);
        // Sites ban addresses: this ban covers every proxy of the exit.
        if let (Some(exit), Some(until)) = (exit, stats.banned_until) {
            if stats.ban_count > bans_before {
                source_state.ban_exit(exit, until);
            }
        }
        Ok(FeedbackOutcome {
            score: stats.score,
            success_count: stats.success_count,
            failure_count: stats.failure_count,
            is_banned: stats.banned_until.is_some(),
            banned_until: stats.banned_until.map(from_millis),
        })
    }

    /// Drops stats idle for longer than [`STATS_MAX_IDLE`], so that a long
    /// uptime does not keep the history of every proxy that ever died (call
    /// it now and then, e.g. with the snapshot). Returns how many went.
    pub fn drop_idle(&self, now: DateTime<Utc>) -> usize {
        let cutoff = millis(now).saturating_sub(duration_ms(STATS_MAX_IDLE));
        let handles: Vec<Arc<Mutex<SourceState>>> = self.sources.read().values().cloned().collect();
        let dropped = handles
            .iter()
            .map(|handle| handle.lock().drop_idle(cutoff))
            .sum();
        // Sources left without stats and without a request for as long go
        // too, so that names used once do not pile up (each is a label of
        // /metrics).
        let idle = |handle: &Arc<Mutex<SourceState>>| {
            let source = handle.lock();
            source.entries.is_empty() && source.last_request < cutoff
        };
        let has_idle = handles.iter().any(idle);
        if has_idle {
            self.sources.write().retain(|_, handle| !idle(handle));
        }
        dropped
    }
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
