//! Introspection: pool figures for /stats and /metrics, and one source's
//! per-proxy stats for /sources/NAME. Each source is locked briefly, one at
//! a time.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use crate::proxy::{Anonymity, Protocol};

use super::registry::{BucketKey, Slot};
use super::source::{SourceState, Stats};
use super::{from_millis, millis, SourceEntry, SourceSummary, SourceView, State, Summary};

impl State {
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
            for &(_, slot) in source.ranked.iter().rev().take(limit) {
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
                    estimate: f64::from(stats.posterior.mean()),
                    discounted_successes: f64::from(stats.posterior.successes),
                    discounted_failures: f64::from(stats.posterior.failures),
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
}
