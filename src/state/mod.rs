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

mod gateway;
mod registry;
mod source;
mod url;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use parking_lot::{Mutex, RwLock};

use crate::config::ScoringConfig;
use crate::proxy::{ActiveProxy, Anonymity, Protocol, ProxyKey};
use crate::snapshot::{ActiveSnapshot, EntrySnapshot, SnapshotData, SourceSnapshot};

pub use gateway::proxy_key_of_url;
use registry::{country_code, BucketKey, Filter, IntMap, IntSet, Registry, Slot};
use source::{Rules, SourceState, Stats};

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

/// Candidate lists this short are scanned whole: exact and cheap.
const EXACT_SCAN_LEN: usize = 256;
/// How far the sampler for unscored proxies scans before giving up.
const UNSCORED_SCAN_LIMIT: usize = 2048;
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

/// What a get-proxy asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickQuery {
    pub protocol: Option<Protocol>,
    /// Only proxies that tunnel CONNECT (`supports_https`, or listed as https).
    pub https_only: bool,
    /// ISO 3166 alpha-2, any case.
    pub country: Option<String>,
    /// `Anonymous` also accepts elite proxies.
    pub anonymity: Option<Anonymity>,
    pub max_latency_ms: Option<u32>,
    /// Distinct proxies wanted, 1 to [`MAX_COUNT`] (clamped).
    pub count: usize,
}

impl Default for PickQuery {
    fn default() -> PickQuery {
        PickQuery {
            protocol: None,
            https_only: false,
            country: None,
            anonymity: None,
            max_latency_ms: None,
            count: 1,
        }
    }
}

/// One proxy handed to a client, with what the get-proxy JSON shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    pub id: i64,
    /// The URL the client uses, credentials included.
    pub url: String,
    pub protocol: Protocol,
    pub ip: IpAddr,
    pub port: u16,
    pub latency_ms: Option<u32>,
    pub anonymity: Option<Anonymity>,
    pub country: Option<String>,
    /// This source's score for the proxy.
    pub score: i32,
    pub last_validated_at: Option<DateTime<Utc>>,
    /// What gave the proxy away (see [`ActiveProxy::anonymity_evidence`]).
    pub anonymity_evidence: Option<Arc<str>>,
    /// An http proxy that also tunnels CONNECT; `None` when not checked.
    pub supports_https: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoProxyReason {
    /// No proxy is active at all.
    NoActive,
    /// Active proxies exist, but none matches the filters.
    NoMatch,
    /// Every matching proxy is banned for this source.
    AllBanned,
    /// The source is new and `max_sources` exist already.
    TooManySources(TooManySources),
}

impl NoProxyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            NoProxyReason::NoActive => "no_active",
            NoProxyReason::NoMatch => "no_match",
            NoProxyReason::AllBanned => "all_banned",
            NoProxyReason::TooManySources(_) => "too_many_sources",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no proxy available ({})", reason.as_str())]
pub struct NoProxy {
    pub reason: NoProxyReason,
    /// For `AllBanned`: until the earliest ban among the matching proxies ends.
    pub retry_after: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    /// The message leaves the URL out: it may hold credentials.
    #[error("unknown proxy: expected a proxy URL as get-proxy returned it")]
    UnknownProxy,
    #[error(transparent)]
    TooManySources(#[from] TooManySources),
}

/// A new source was refused: `max_sources` exist already.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many sources: at most {max_sources} are kept (one idle for a week with no stats is dropped); reuse a source name")]
pub struct TooManySources {
    pub max_sources: usize,
}

/// A source's stats for one proxy after a feedback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedbackOutcome {
    pub score: i32,
    pub success_count: u64,
    pub failure_count: u64,
    pub is_banned: bool,
    pub banned_until: Option<DateTime<Utc>>,
}

/// Pool figures for /stats and /metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub active: usize,
    /// Every proxy known to this process (active or not).
    pub known: usize,
    pub by_protocol: Vec<(Protocol, usize)>,
    /// `None`: anonymity not determined.
    pub by_anonymity: Vec<(Option<Anonymity>, usize)>,
    /// Largest first; proxies of unknown country are left out.
    pub by_country: Vec<(String, usize)>,
    /// By name.
    pub sources: Vec<SourceSummary>,
    pub requests: u64,
    pub feedbacks: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSummary {
    pub name: String,
    /// Active proxies this source may be given, ignoring filters.
    pub pool_size: usize,
    /// Proxies banned for this source now (active or not).
    pub banned: usize,
    /// Proxies this source has stats for.
    pub entries: usize,
    pub requests: u64,
    pub feedbacks: u64,
    /// Feedbacks that reported a success, and a failure.
    pub successes: u64,
    pub failures: u64,
}

/// One source's stats, best first, for /sources/NAME.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceView {
    pub name: String,
    pub requests: u64,
    pub feedbacks: u64,
    /// How many entries exist in all (the list may be cut at `limit`).
    pub total_entries: usize,
    pub entries: Vec<SourceEntry>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SourceEntry {
    /// Redact with [`ProxyKey::redacted`] where credentials must not show.
    pub key: ProxyKey,
    pub active: bool,
    pub score: i32,
    pub success_count: u64,
    pub failure_count: u64,
    pub is_banned: bool,
    pub banned_until: Option<DateTime<Utc>>,
    pub last_used: DateTime<Utc>,
    /// What gave the proxy away, while it is active.
    pub anonymity_evidence: Option<Arc<str>>,
}

/// What [`State::restore`] kept and dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// When the snapshot was taken.
    pub taken_at: DateTime<Utc>,
    pub sources: usize,
    pub entries: usize,
    /// Idle for longer than [`STATS_MAX_IDLE`].
    pub aged_out: usize,
    /// Naming a URL that is not a proxy URL, or no URL at all.
    pub invalid: usize,
    /// Proxies of the snapshot's active set made active.
    pub active: usize,
    /// Active proxies left out: checked longer ago than the bound (see
    /// [`active_snapshot_max_age`]), or with a URL that is not a proxy URL.
    pub active_stale: usize,
    /// Active proxies left out because the database's active set was
    /// loaded already: a snapshot never overrides it.
    pub active_superseded: usize,
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
            return Err(picker.explain(now_ms));
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
                let proxy = &record.proxy;
                Some(Pick {
                    id: proxy.id,
                    url: entry.url.to_string(),
                    protocol: proxy.key.protocol,
                    ip: proxy.key.ip,
                    port: proxy.key.port,
                    latency_ms: proxy.latency_ms,
                    anonymity: proxy.anonymity,
                    country: proxy.country.clone(),
                    score,
                    last_validated_at: proxy.last_validated_at,
                    anonymity_evidence: proxy.anonymity_evidence.clone(),
                    supports_https: proxy.supports_https,
                })
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
        let slot = self
            .registry
            .read()
            .slot_of_url(proxy_url)
            .ok_or(FeedbackError::UnknownProxy)?;
        let handle = self.source_handle_bounded(source)?;
        self.feedbacks.fetch_add(1, Ordering::Relaxed);
        let mut source_state = handle.lock();
        source_state.last_request = source_state.last_request.max(millis(now));
        let stats = source_state.record(slot, success, millis(now), &self.rules);
        Ok(FeedbackOutcome {
            score: stats.score,
            success_count: stats.success_count,
            failure_count: stats.failure_count,
            is_banned: stats.banned_until.is_some(),
            banned_until: stats.banned_until.map(from_millis),
        })
    }

    /// Active proxies per latency bucket (see `Registry::latency_histogram`).
    pub fn latency_histogram(&self, bounds_ms: &[u32]) -> Vec<usize> {
        self.registry.read().latency_histogram(bounds_ms)
    }

    /// Pool figures. Locks each source briefly, one at a time.
    pub fn summary(&self, now: DateTime<Utc>) -> Summary {
        let now_ms = millis(now);
        let registry = self.registry.read();
        let active = registry.active_count();
        let mut by_protocol: Vec<(Protocol, usize)> = Protocol::ALL
            .iter()
            .map(|&protocol| (protocol, 0))
            .collect();
        let mut by_anonymity: Vec<(Option<Anonymity>, usize)> = vec![
            (Some(Anonymity::Elite), 0),
            (Some(Anonymity::Anonymous), 0),
            (Some(Anonymity::Transparent), 0),
            (None, 0),
        ];
        let mut by_country = Vec::new();
        for (key, size) in registry.bucket_sizes() {
            match key {
                BucketKey::Protocol(protocol) => {
                    if let Some(row) = by_protocol.iter_mut().find(|row| row.0 == protocol) {
                        row.1 = size;
                    }
                }
                BucketKey::Anonymity(level) => {
                    if let Some(row) = by_anonymity.iter_mut().find(|row| row.0 == Some(level)) {
                        row.1 = size;
                    }
                }
                BucketKey::Country(code) => {
                    let letters = [(code >> 8) as u8, code as u8];
                    by_country.push((String::from_utf8_lossy(&letters).into_owned(), size));
                }
                BucketKey::All | BucketKey::Https | BucketKey::AnonymousOrElite => {}
            }
        }
        let known_anonymity: usize = by_anonymity.iter().map(|row| row.1).sum();
        if let Some(row) = by_anonymity.last_mut() {
            row.1 = active.saturating_sub(known_anonymity);
        }
        by_country.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

        let mut handles: Vec<(String, Arc<Mutex<SourceState>>)> = self
            .sources
            .read()
            .iter()
            .map(|(name, handle)| (name.clone(), Arc::clone(handle)))
            .collect();
        handles.sort_by(|a, b| a.0.cmp(&b.0));
        let sources = handles
            .into_iter()
            .map(|(name, handle)| {
                let source = handle.lock();
                let mut banned = 0;
                let mut banned_active = 0;
                for &(until, slot) in source.bans.range((now_ms.saturating_add(1), 0)..) {
                    debug_assert!(until > now_ms);
                    banned += 1;
                    if registry.meta(slot).is_some() {
                        banned_active += 1;
                    }
                }
                SourceSummary {
                    name,
                    pool_size: active.saturating_sub(banned_active),
                    banned,
                    entries: source.entries.len(),
                    requests: source.requests,
                    feedbacks: source.feedbacks,
                    successes: source.successes,
                    failures: source.failures,
                }
            })
            .collect();
        Summary {
            active,
            known: registry.known_count(),
            by_protocol,
            by_anonymity,
            by_country,
            sources,
            requests: self.requests.load(Ordering::Relaxed),
            feedbacks: self.feedbacks.load(Ordering::Relaxed),
        }
    }

    /// `name`'s per-proxy stats, best first (unbanned by score, then banned
    /// by score), at most `limit`; `None` for a source never seen.
    pub fn source_view(&self, name: &str, limit: usize, now: DateTime<Utc>) -> Option<SourceView> {
        let now_ms = millis(now);
        let handle = Arc::clone(self.sources.read().get(name)?);
        let (rows, requests, feedbacks, total_entries) = {
            let source = handle.lock();
            let mut rows: Vec<(Slot, Stats)> = Vec::with_capacity(limit.min(source.entries.len()));
            for &(_, slot) in source.by_score.iter().rev().take(limit) {
                if let Some(stats) = source.entries.get(&slot) {
                    rows.push((slot, *stats));
                }
            }
            if rows.len() < limit {
                let mut banned: Vec<(Slot, Stats)> = source
                    .bans
                    .iter()
                    .filter_map(|&(_, slot)| source.entries.get(&slot).map(|stats| (slot, *stats)))
                    .collect();
                banned.sort_by(|a, b| b.1.score.cmp(&a.1.score).then(a.0.cmp(&b.0)));
                banned.truncate(limit - rows.len());
                rows.extend(banned);
            }
            (
                rows,
                source.requests,
                source.feedbacks,
                source.entries.len(),
            )
        };
        let registry = self.registry.read();
        let entries = rows
            .into_iter()
            .filter_map(|(slot, stats)| {
                let entry = registry.entry(slot)?;
                Some(SourceEntry {
                    key: entry.key.clone(),
                    active: entry.active.is_some(),
                    score: stats.score,
                    success_count: stats.success_count,
                    failure_count: stats.failure_count,
                    is_banned: stats.is_banned_at(now_ms),
                    banned_until: stats.banned_until.map(from_millis),
                    last_used: from_millis(stats.last_used),
                    anonymity_evidence: entry
                        .active
                        .as_ref()
                        .and_then(|record| record.proxy.anonymity_evidence.clone()),
                })
            })
            .collect();
        Some(SourceView {
            name: name.to_string(),
            requests,
            feedbacks,
            total_entries,
            entries,
        })
    }

    /// Copies every source's stats and the active set for the snapshot.
    /// Each source is locked only while its entries are copied, the registry
    /// only for a round of slots at a time; the URLs are looked up after,
    /// and encoding and writing are the caller's, without any lock.
    pub fn snapshot_data(&self, now: DateTime<Utc>) -> SnapshotData {
        let handles: Vec<(String, Arc<Mutex<SourceState>>)> = self
            .sources
            .read()
            .iter()
            .map(|(name, handle)| (name.clone(), Arc::clone(handle)))
            .collect();
        let copies: Vec<SourceCopy> = handles
            .into_iter()
            .map(|(name, handle)| {
                let source = handle.lock();
                let entries = source
                    .entries
                    .iter()
                    .map(|(slot, stats)| (*slot, *stats))
                    .collect();
                SourceCopy {
                    name,
                    requests: source.requests,
                    feedbacks: source.feedbacks,
                    entries,
                }
            })
            .collect();
        // After the sources: every slot their entries name exists by now.
        let registry = self.copy_registry();
        let mut urls = UrlTable::new(&registry.urls);
        let sources = copies
            .into_iter()
            .map(|copy| SourceSnapshot {
                name: copy.name,
                requests: copy.requests,
                feedbacks: copy.feedbacks,
                entries: copy
                    .entries
                    .into_iter()
                    .filter_map(|(slot, stats)| {
                        Some(EntrySnapshot {
                            url: urls.index(slot)?,
                            score: stats.score,
                            success_count: stats.success_count,
                            failure_count: stats.failure_count,
                            banned_until_ms: stats.banned_until,
                            ban_count: stats.ban_count,
                            last_used_ms: stats.last_used,
                        })
                    })
                    .collect(),
            })
            .collect();
        let active = registry
            .active
            .into_iter()
            .filter_map(|(slot, proxy)| {
                Some(ActiveSnapshot {
                    id: proxy.id,
                    url: urls.index(slot)?,
                    latency_ms: proxy.latency_ms,
                    anonymity: proxy.anonymity.map(|level| level.as_str().to_string()),
                    country: proxy.country,
                    supports_https: proxy.supports_https,
                    last_validated_ms: proxy.last_validated_at.map(millis),
                    anonymity_evidence: proxy.anonymity_evidence.as_deref().map(str::to_string),
                })
            })
            .collect();
        SnapshotData {
            taken_at_ms: millis(now),
            urls: urls.into_urls(),
            sources,
            active,
        }
    }

    /// Every slot's URL and every active record, copied a round of slots
    /// per read lock, so that a writer (the sync, the validator) and the
    /// get-proxy calls queued behind it never wait for the whole copy. A
    /// proxy that moves to another slot meanwhile (its password changed)
    /// may be copied twice under its id; the restore keeps the last.
    fn copy_registry(&self) -> RegistryCopy {
        let mut copy = RegistryCopy::default();
        loop {
            let registry = self.registry.read();
            let start = copy.urls.len();
            for (i, entry) in registry
                .entries_from(start, SNAPSHOT_ROUND)
                .iter()
                .enumerate()
            {
                copy.urls.push(Arc::clone(&entry.url));
                if let Some(record) = &entry.active {
                    copy.active
                        .push(((start + i) as Slot, record.proxy.clone()));
                }
            }
            if copy.urls.len() >= registry.known_count() {
                return copy;
            }
        }
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

    /// Loads a snapshot's stats and active set (normally at start-up, before
    /// serving). Its proxies become known, active or not, so their feedback
    /// is accepted; entries idle for longer than [`STATS_MAX_IDLE`] are
    /// dropped. Its active set becomes the active set, but only until the
    /// database's is loaded, which replaces it whole; once that happened it
    /// is ignored. Active proxies checked longer ago than the bound set with
    /// [`State::with_active_snapshot_max_age`] are left out.
    pub fn restore(&self, data: SnapshotData, now: DateTime<Utc>) -> RestoreReport {
        let cutoff = millis(now).saturating_sub(duration_ms(STATS_MAX_IDLE));
        let mut report = RestoreReport {
            taken_at: from_millis(data.taken_at_ms),
            ..RestoreReport::default()
        };
        let parsed: Vec<Option<ProxyKey>> = data
            .urls
            .iter()
            .map(|url| url::parse_proxy_url(url))
            .collect();
        // Only URLs some fresh entry uses become known.
        let mut used = vec![false; data.urls.len()];
        for source in &data.sources {
            for entry in &source.entries {
                if entry.last_used_ms >= cutoff {
                    if let Some(flag) = used.get_mut(entry.url as usize) {
                        *flag = true;
                    }
                }
            }
        }
        let slots: Vec<Option<Slot>> = {
            let mut registry = self.registry.write();
            data.urls
                .iter()
                .zip(&parsed)
                .zip(&used)
                .map(|((url, key), used)| match key {
                    Some(key) if *used => Some(registry.intern(url, key)),
                    _ => None,
                })
                .collect()
        };
        for snapshot in data.sources {
            let handle = self.source_handle(&snapshot.name);
            let mut source = handle.lock();
            // The snapshot keeps no request clock: a restored source has a
            // full idle period from now.
            source.last_request = source.last_request.max(millis(now));
            source.requests = source.requests.saturating_add(snapshot.requests);
            source.feedbacks = source.feedbacks.saturating_add(snapshot.feedbacks);
            for entry in snapshot.entries {
                if entry.last_used_ms < cutoff {
                    report.aged_out += 1;
                    continue;
                }
                let Some(slot) = slots.get(entry.url as usize).copied().flatten() else {
                    report.invalid += 1;
                    continue;
                };
                source.successes = source.successes.saturating_add(entry.success_count);
                source.failures = source.failures.saturating_add(entry.failure_count);
                source.insert(
                    slot,
                    Stats {
                        score: entry
                            .score
                            .clamp(self.rules.min_score, self.rules.max_score),
                        success_count: entry.success_count,
                        failure_count: entry.failure_count,
                        banned_until: entry.banned_until_ms,
                        ban_count: entry.ban_count,
                        last_used: entry.last_used_ms,
                    },
                );
                report.entries += 1;
            }
            report.sources += 1;
        }
        self.restore_active(data.active, &data.urls, &parsed, now, &mut report);
        report
    }

    /// Makes a snapshot's active proxies active, and records them as the
    /// last load, so that the first database load deactivates those it does
    /// not hold. Under the sync's lock: a database load is either applied
    /// before (and this does nothing) or after (and replaces this).
    fn restore_active(
        &self,
        active: Vec<ActiveSnapshot>,
        urls: &[String],
        keys: &[Option<ProxyKey>],
        now: DateTime<Utc>,
        report: &mut RestoreReport,
    ) {
        if active.is_empty() {
            return;
        }
        let mut base = self.sync_base.lock();
        if base.from_database {
            report.active_superseded = active.len();
            return;
        }
        let cutoff = millis(now).saturating_sub(duration_ms(self.active_snapshot_max_age));
        let mut fresh: Vec<(ActiveProxy, &str)> = Vec::with_capacity(active.len());
        for snapshot in active {
            let index = snapshot.url as usize;
            let key = keys.get(index).cloned().flatten();
            let (Some(key), Some(checked)) = (key, snapshot.last_validated_ms) else {
                report.active_stale += 1;
                continue;
            };
            if checked < cutoff {
                report.active_stale += 1;
                continue;
            }
            let proxy = ActiveProxy {
                id: snapshot.id,
                key,
                latency_ms: snapshot.latency_ms,
                anonymity: snapshot.anonymity.as_deref().and_then(Anonymity::parse),
                country: snapshot.country,
                supports_https: snapshot.supports_https,
                last_validated_at: Some(from_millis(checked)),
                anonymity_evidence: snapshot.anonymity_evidence.map(Arc::from),
            };
            fresh.push((proxy, &urls[index]));
        }
        let mut fresh = fresh.into_iter().peekable();
        while fresh.peek().is_some() {
            let mut registry = self.registry.write();
            for (proxy, url) in fresh.by_ref().take(SYNC_ROUND) {
                base.prints.insert(proxy.id, fingerprint(&proxy));
                registry.activate(proxy, url);
                report.active += 1;
            }
        }
    }
}

/// What the active set was last loaded from: each proxy of that load, by
/// id, as a [`fingerprint`], and whether that load was the database's.
#[derive(Debug, Default)]
struct SyncBase {
    prints: IntMap<i64, u64>,
    /// A database load was applied: a snapshot's active set is ignored
    /// from then on.
    from_database: bool,
}

/// What [`State::copy_registry`] copies: `urls[slot]` is the slot's URL.
#[derive(Default)]
struct RegistryCopy {
    urls: Vec<Arc<str>>,
    active: Vec<(Slot, ActiveProxy)>,
}

/// The snapshot's URL table, built as entries name their slots: each URL
/// once, in the order first named.
struct UrlTable<'a> {
    slot_urls: &'a [Arc<str>],
    index_of_slot: Vec<u32>,
    urls: Vec<String>,
}

impl UrlTable<'_> {
    fn new(slot_urls: &[Arc<str>]) -> UrlTable<'_> {
        UrlTable {
            slot_urls,
            index_of_slot: vec![u32::MAX; slot_urls.len()],
            urls: Vec::new(),
        }
    }

    fn index(&mut self, slot: Slot) -> Option<u32> {
        let index = self.index_of_slot.get_mut(slot as usize)?;
        if *index == u32::MAX {
            *index = self.urls.len() as u32;
            self.urls.push(self.slot_urls[slot as usize].to_string());
        }
        Some(*index)
    }

    fn into_urls(self) -> Vec<String> {
        self.urls
    }
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// One source's stats as copied under its lock for a snapshot.
struct SourceCopy {
    name: String,
    requests: u64,
    feedbacks: u64,
    entries: Vec<(Slot, Stats)>,
}

/// A 64-bit digest of everything the registry keeps about a proxy: two
/// loads of the same row have the same one, and a changed row a different
/// one (a collision, about 2^-64 per change, delays that change to the
/// proxy's next one).
fn fingerprint(proxy: &ActiveProxy) -> u64 {
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

fn compile_filter(query: &PickQuery) -> Filter {
    let country = query.country.as_deref().map(country_code);
    Filter {
        protocol: query.protocol,
        https_only: query.https_only,
        country: country.flatten(),
        anonymity: query.anonymity,
        max_latency_ms: query.max_latency_ms,
        // A country that is not two letters matches no proxy.
        impossible: matches!(country, Some(None)),
    }
}

/// One get-proxy's choice, made under the registry read lock and the
/// source's lock. Slots come with the score they were chosen at.
struct Picker<'a> {
    registry: &'a Registry,
    source: &'a SourceState,
    filter: &'a Filter,
    /// Active slots, a superset of those matching the filter.
    candidates: &'a [Slot],
    rules: &'a Rules,
}

impl Picker<'_> {
    fn matches(&self, slot: Slot) -> bool {
        self.registry
            .meta(slot)
            .is_some_and(|meta| self.filter.matches(meta))
    }

    fn explore_draws(&self, count: usize, rng: &mut fastrand::Rng) -> usize {
        (0..count)
            .filter(|_| rng.f64() < self.rules.explore_ratio)
            .count()
    }

    /// Exact choice over every candidate, for short lists and as the last
    /// word before answering "none".
    fn pick_exact(&self, count: usize, rng: &mut fastrand::Rng) -> Vec<(Slot, i32)> {
        let mut scored = Vec::new();
        let mut unscored = Vec::new();
        for &slot in self.candidates {
            if !self.matches(slot) {
                continue;
            }
            match self.source.entries.get(&slot) {
                // Expired bans were lifted before the pick.
                Some(stats) if stats.banned_until.is_some() => {}
                Some(stats) => scored.push((slot, stats.score)),
                None => unscored.push((slot, self.rules.initial_score)),
            }
        }
        let mut chosen = Vec::with_capacity(count);
        let explore = self.explore_draws(count, rng).min(unscored.len());
        choose_random(&mut unscored, explore, rng, &mut chosen);
        let need = count - chosen.len();
        let mut pool = scored;
        pool.extend(unscored.into_iter().skip(explore));
        let pool_size = self.rules.top_k.max(need);
        if pool.len() > pool_size {
            // The best `pool_size`, ties broken at random.
            let mut keyed: Vec<(i32, u32, Slot)> = pool
                .iter()
                .map(|&(slot, score)| (score, rng.u32(..), slot))
                .collect();
            keyed.select_nth_unstable_by(pool_size - 1, |a, b| b.cmp(a));
            keyed.truncate(pool_size);
            pool = keyed
                .into_iter()
                .map(|(score, _, slot)| (slot, score))
                .collect();
        }
        choose_random(&mut pool, need, rng, &mut chosen);
        chosen
    }

    /// Choice without looking at every candidate: the explore share from a
    /// random sample of unscored proxies, the rest at random among the
    /// `top_k` found by walking the source's scores best-first.
    fn pick_fast(&self, count: usize, rng: &mut fastrand::Rng) -> Vec<(Slot, i32)> {
        let mut chosen = Vec::with_capacity(count);
        let explore = self.explore_draws(count, rng);
        chosen.extend(self.sample_unscored(explore, &[], rng));
        let need = count - chosen.len();
        if need == 0 {
            return chosen;
        }
        let mut pool = self.top(self.rules.top_k.max(need), &chosen, rng);
        choose_random(&mut pool, need, rng, &mut chosen);
        chosen
    }

    /// The `k` best eligible proxies not in `exclude`; unscored ones count
    /// as `initial_score`.
    fn top(&self, k: usize, exclude: &[(Slot, i32)], rng: &mut fastrand::Rng) -> Vec<(Slot, i32)> {
        let initial = self.rules.initial_score;
        let excluded = |slot: Slot, more: &[(Slot, i32)]| {
            exclude.iter().chain(more).any(|&(other, _)| other == slot)
        };
        let mut pool: Vec<(Slot, i32)> = Vec::with_capacity(k);
        let mut walk = self.source.by_score.iter().rev().peekable();
        while let Some(&&(score, slot)) = walk.peek() {
            if score <= initial {
                break;
            }
            walk.next();
            if self.matches(slot) && !excluded(slot, &[]) {
                pool.push((slot, score));
                if pool.len() == k {
                    return pool;
                }
            }
        }
        // At the initial score, scored and unscored proxies tie: gather
        // enough of both and keep a random share.
        let room = k - pool.len();
        let mut level: Vec<(Slot, i32)> = Vec::new();
        while let Some(&&(score, slot)) = walk.peek() {
            if score < initial || level.len() == room {
                break;
            }
            walk.next();
            if self.matches(slot) && !excluded(slot, &[]) {
                level.push((slot, score));
            }
        }
        let mut exclude_more = pool.clone();
        exclude_more.extend_from_slice(exclude);
        level.extend(self.sample_unscored(room, &exclude_more, rng));
        choose_random(&mut level, room, rng, &mut pool);
        if pool.len() == k {
            return pool;
        }
        for &(score, slot) in walk {
            if score >= initial {
                // Already considered in the tie above.
                continue;
            }
            if self.matches(slot) && !excluded(slot, &pool) {
                pool.push((slot, score));
                if pool.len() == k {
                    break;
                }
            }
        }
        pool
    }

    /// Up to `n` distinct eligible proxies this source has no stats on, not
    /// in `exclude`: random probes, then a bounded scan.
    fn sample_unscored(
        &self,
        n: usize,
        exclude: &[(Slot, i32)],
        rng: &mut fastrand::Rng,
    ) -> Vec<(Slot, i32)> {
        let mut found: Vec<(Slot, i32)> = Vec::with_capacity(n);
        let len = self.candidates.len();
        if n == 0 || len == 0 {
            return found;
        }
        let fits = |slot: Slot, found: &[(Slot, i32)]| {
            !self.source.entries.contains_key(&slot)
                && self.matches(slot)
                && !exclude.iter().chain(found).any(|&(other, _)| other == slot)
        };
        for _ in 0..(4 * n + 16) {
            let slot = self.candidates[rng.usize(..len)];
            if fits(slot, &found) {
                found.push((slot, self.rules.initial_score));
                if found.len() == n {
                    return found;
                }
            }
        }
        let start = rng.usize(..len);
        for i in 0..len.min(UNSCORED_SCAN_LIMIT) {
            let slot = self.candidates[(start + i) % len];
            if fits(slot, &found) {
                found.push((slot, self.rules.initial_score));
                if found.len() == n {
                    break;
                }
            }
        }
        found
    }

    /// Why nothing is eligible. Called only after an exact pick found none.
    fn explain(&self, now: i64) -> NoProxy {
        if !self.candidates.iter().any(|&slot| self.matches(slot)) {
            return NoProxy {
                reason: NoProxyReason::NoMatch,
                retry_after: None,
            };
        }
        // Bans are ordered by their end: the first matching one ends first.
        let retry_after = self
            .source
            .bans
            .iter()
            .find(|&&(_, slot)| self.matches(slot))
            .map(|&(until, _)| Duration::from_millis(until.saturating_sub(now).max(0) as u64));
        NoProxy {
            reason: NoProxyReason::AllBanned,
            retry_after,
        }
    }
}

/// Moves `n` random items of `from` (at most all) to `into`.
fn choose_random<T: Copy>(from: &mut [T], n: usize, rng: &mut fastrand::Rng, into: &mut Vec<T>) {
    let n = n.min(from.len());
    for i in 0..n {
        let j = rng.usize(i..from.len());
        from.swap(i, j);
        into.push(from[i]);
    }
}

#[cfg(test)]
mod tests;
