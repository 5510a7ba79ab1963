//! Conversion between the live state and the snapshot file's
//! [`SnapshotData`]: the copy taken for a snapshot (without holding any lock
//! for long) and the restore at start-up.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use crate::proxy::{ActiveProxy, Anonymity, ProxyKey};
use crate::snapshot::{ActiveSnapshot, EntrySnapshot, SnapshotData, SourceSnapshot};

use super::estimate::Posterior;
use super::registry::Slot;
use super::source::{SourceState, Stats};
use super::sync::fingerprint;
use super::{
    duration_ms, from_millis, millis, url, RestoreReport, State, SNAPSHOT_ROUND, STATS_MAX_IDLE,
    SYNC_ROUND,
};

impl State {
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
                            discounted: Some((stats.posterior.successes, stats.posterior.failures)),
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
                    exit_ip: proxy.exit_ip,
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
                        posterior: match entry.discounted {
                            Some((successes, failures)) => Posterior {
                                successes: successes.max(0.0),
                                failures: failures.max(0.0),
                            },
                            None => Posterior::from_counts(
                                entry.success_count,
                                entry.failure_count,
                                self.rules.discount,
                            ),
                        },
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
                exit_ip: snapshot.exit_ip,
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

/// One source's stats as copied under its lock for a snapshot.
struct SourceCopy {
    name: String,
    requests: u64,
    feedbacks: u64,
    entries: Vec<(Slot, Stats)>,
}
