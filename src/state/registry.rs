//! Every proxy this process has known, and the active ones indexed for picking.
//!
//! A proxy gets a dense `slot` (u32) the first time it is seen, keyed by its
//! URL; per-source stats refer to slots, so they stay small and survive the
//! proxy's deactivation. The active set keeps, per filter value, a list of the
//! active slots that match it ("buckets"), maintained with swap-removal so
//! that activating or deactivating a proxy costs O(1) per bucket and a pick
//! can start from the smallest bucket its filters allow.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::proxy::{ActiveProxy, Anonymity, Protocol, ProxyKey};

/// A dense index into [`Registry::slots`].
pub(crate) type Slot = u32;

/// A dense number for an exit address, assigned when first seen.
pub(crate) type ExitId = u32;

/// Maps keyed by the small integers we assign ourselves (slots, database
/// ids). They never come from outside, so FxHash (one multiply) is safe and
/// much cheaper than SipHash on the hot path.
pub(crate) type IntMap<K, V> = rustc_hash::FxHashMap<K, V>;
pub(crate) type IntSet = rustc_hash::FxHashSet<i64>;

/// Packs an ISO 3166 alpha-2 code into two upper-case bytes; `None` for
/// anything else.
pub(crate) fn country_code(text: &str) -> Option<u16> {
    let bytes = text.as_bytes();
    if bytes.len() != 2 || !bytes.iter().all(u8::is_ascii_alphabetic) {
        return None;
    }
    Some(u16::from(bytes[0].to_ascii_uppercase()) << 8 | u16::from(bytes[1].to_ascii_uppercase()))
}

/// The facts about an active proxy that filters look at, packed so that a
/// filter check is a few integer comparisons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub protocol: Protocol,
    pub https: bool,
    pub anonymity: Option<Anonymity>,
    pub country: Option<u16>,
    pub latency_ms: Option<u32>,
    /// Where its connections leave from, when known (set by the registry).
    pub exit: Option<ExitId>,
}

impl Meta {
    pub fn of(proxy: &ActiveProxy) -> Meta {
        Meta {
            protocol: proxy.key.protocol,
            https: proxy.supports_https == Some(true),
            anonymity: proxy.anonymity,
            country: proxy.country.as_deref().and_then(country_code),
            latency_ms: proxy.latency_ms,
            exit: None,
        }
    }

    /// The buckets this proxy belongs to, at fixed positions so that
    /// [`ActiveRecord::positions`] can name its place in each.
    fn memberships(&self) -> [Option<BucketKey>; MEMBERSHIPS] {
        [
            Some(BucketKey::All),
            Some(BucketKey::Protocol(self.protocol)),
            self.https.then_some(BucketKey::Https),
            self.country.map(BucketKey::Country),
            self.anonymity.map(BucketKey::Anonymity),
            matches!(
                self.anonymity,
                Some(Anonymity::Anonymous | Anonymity::Elite)
            )
            .then_some(BucketKey::AnonymousOrElite),
        ]
    }
}

const MEMBERSHIPS: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum BucketKey {
    All,
    Protocol(Protocol),
    Https,
    Country(u16),
    /// Exactly this level.
    Anonymity(Anonymity),
    /// What an `anonymity=anonymous` filter accepts.
    AnonymousOrElite,
}

/// A get-proxy query's filters, compiled against [`Meta`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    pub protocol: Option<Protocol>,
    pub https_only: bool,
    pub country: Option<u16>,
    pub anonymity: Option<Anonymity>,
    pub max_latency_ms: Option<u32>,
    /// The query names something no proxy can have (a malformed country).
    pub impossible: bool,
}

impl Filter {
    pub fn matches(&self, meta: &Meta) -> bool {
        if self.impossible {
            return false;
        }
        if self.protocol.is_some_and(|p| p != meta.protocol) {
            return false;
        }
        if self.https_only && !meta.https {
            return false;
        }
        if self.country.is_some() && self.country != meta.country {
            return false;
        }
        let anonymity_ok = match self.anonymity {
            None => true,
            Some(Anonymity::Anonymous) => {
                matches!(
                    meta.anonymity,
                    Some(Anonymity::Anonymous | Anonymity::Elite)
                )
            }
            Some(level) => meta.anonymity == Some(level),
        };
        if !anonymity_ok {
            return false;
        }
        match self.max_latency_ms {
            None => true,
            Some(max) => meta.latency_ms.is_some_and(|latency| latency <= max),
        }
    }

    fn buckets(&self) -> impl Iterator<Item = BucketKey> {
        let anonymity = self.anonymity.map(|level| match level {
            Anonymity::Anonymous => BucketKey::AnonymousOrElite,
            other => BucketKey::Anonymity(other),
        });
        [
            self.protocol.map(BucketKey::Protocol),
            self.https_only.then_some(BucketKey::Https),
            self.country.map(BucketKey::Country),
            anonymity,
        ]
        .into_iter()
        .flatten()
    }
}

/// What the registry holds about an active proxy.
#[derive(Debug)]
pub(crate) struct ActiveRecord {
    pub proxy: ActiveProxy,
    pub meta: Meta,
    /// This slot's index in each bucket of `meta.memberships()`.
    positions: [u32; MEMBERSHIPS],
}

#[derive(Debug)]
pub(crate) struct SlotEntry {
    pub url: Arc<str>,
    pub key: ProxyKey,
    pub active: Option<ActiveRecord>,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    slot_by_url: HashMap<Arc<str>, Slot>,
    slots: Vec<SlotEntry>,
    /// `metas[slot]` is the filter facts of an active slot, `None` when
    /// inactive. Kept apart from `slots` and dense, because the best-first
    /// walk of a get-proxy checks hundreds of them at random places: this
    /// array stays in cache, the records would not.
    metas: Vec<Option<Meta>>,
    slot_by_id: IntMap<i64, Slot>,
    buckets: HashMap<BucketKey, Vec<Slot>>,
    /// Every exit address seen, numbered. Never shrinks: exits are few
    /// beside proxies, and a number must keep its meaning for the sources'
    /// exit bans.
    exit_ids: HashMap<IpAddr, ExitId>,
    /// Bumped by every validator change, so that a memory sync can tell
    /// which changes are newer than its read of the table.
    change_seq: u64,
    /// Proxy id to the `change_seq` of its last validator change, kept
    /// until a sync that started after it has run.
    changed_at: IntMap<i64, u64>,
}

impl Registry {
    pub fn active_count(&self) -> usize {
        self.bucket(BucketKey::All).len()
    }

    pub fn known_count(&self) -> usize {
        self.slots.len()
    }

    pub fn slot_of_url(&self, url: &str) -> Option<Slot> {
        self.slot_by_url.get(url).copied()
    }

    pub fn entry(&self, slot: Slot) -> Option<&SlotEntry> {
        self.slots.get(slot as usize)
    }

    /// Up to `n` slots' entries from slot `start` on.
    pub fn entries_from(&self, start: usize, n: usize) -> &[SlotEntry] {
        let start = start.min(self.slots.len());
        let end = start.saturating_add(n).min(self.slots.len());
        &self.slots[start..end]
    }

    /// The exit of `slot` when it is active and its exit is known.
    #[inline]
    pub fn exit_of(&self, slot: Slot) -> Option<ExitId> {
        self.meta(slot).and_then(|meta| meta.exit)
    }

    fn exit_id(&mut self, ip: IpAddr) -> ExitId {
        let next = self.exit_ids.len() as ExitId;
        *self.exit_ids.entry(ip).or_insert(next)
    }

    /// The filter facts of `slot` when it is active.
    #[inline]
    pub fn meta(&self, slot: Slot) -> Option<&Meta> {
        self.metas.get(slot as usize).and_then(Option::as_ref)
    }

    pub fn bucket(&self, key: BucketKey) -> &[Slot] {
        self.buckets.get(&key).map_or(&[], Vec::as_slice)
    }

    /// The smallest list of active slots that holds every proxy `filter`
    /// can match (it may hold others: check each with [`Filter::matches`]).
    pub fn candidates(&self, filter: &Filter) -> &[Slot] {
        if filter.impossible {
            return &[];
        }
        let mut best = self.bucket(BucketKey::All);
        for key in filter.buckets() {
            let bucket = self.bucket(key);
            if bucket.len() < best.len() {
                best = bucket;
            }
        }
        best
    }

    /// Every bucket with its size, for the introspection counts.
    pub fn bucket_sizes(&self) -> impl Iterator<Item = (BucketKey, usize)> + '_ {
        self.buckets.iter().map(|(key, slots)| (*key, slots.len()))
    }

    /// Returns the slot of `url`, creating it (inactive) when new.
    pub fn intern(&mut self, url: &str, key: &ProxyKey) -> Slot {
        if let Some(&slot) = self.slot_by_url.get(url) {
            return slot;
        }
        let slot = self.slots.len() as Slot;
        let url: Arc<str> = Arc::from(url);
        self.slots.push(SlotEntry {
            url: Arc::clone(&url),
            key: key.clone(),
            active: None,
        });
        self.metas.push(None);
        self.slot_by_url.insert(url, slot);
        slot
    }

    /// Makes `proxy` (whose URL is `url`) active, replacing what was known
    /// under its id or its URL.
    pub fn activate(&mut self, proxy: ActiveProxy, url: &str) {
        let slot = self.intern(url, &proxy.key);
        if let Some(&previous) = self.slot_by_id.get(&proxy.id) {
            // The same row under a new URL (its password changed).
            if previous != slot {
                self.deactivate_slot(previous);
            }
        }
        let mut meta = Meta::of(&proxy);
        meta.exit = proxy.exit_ip.map(|ip| self.exit_id(ip));
        let entry = &mut self.slots[slot as usize];
        entry.key = proxy.key.clone();
        if let Some(record) = &mut entry.active {
            if record.proxy.id == proxy.id && record.meta == meta {
                // Same buckets: only the served fields change.
                record.proxy = proxy;
                return;
            }
        }
        self.deactivate_slot(slot);
        let mut positions = [u32::MAX; MEMBERSHIPS];
        for (i, key) in meta.memberships().into_iter().enumerate() {
            if let Some(key) = key {
                let bucket = self.buckets.entry(key).or_default();
                positions[i] = bucket.len() as u32;
                bucket.push(slot);
            }
        }
        self.slot_by_id.insert(proxy.id, slot);
        self.metas[slot as usize] = Some(meta);
        self.slots[slot as usize].active = Some(ActiveRecord {
            proxy,
            meta,
            positions,
        });
    }

    pub fn deactivate_id(&mut self, id: i64) {
        if let Some(&slot) = self.slot_by_id.get(&id) {
            self.deactivate_slot(slot);
        }
    }

    /// Active proxies per latency bucket: `counts[i]` holds those with
    /// latency ≤ `bounds[i]` (and above the previous bound); the last slot
    /// holds the rest, unknown latencies included.
    pub fn latency_histogram(&self, bounds: &[u32]) -> Vec<usize> {
        let mut counts = vec![0; bounds.len() + 1];
        for meta in self.metas.iter().flatten() {
            let bucket = match meta.latency_ms {
                Some(latency) => bounds.partition_point(|&bound| bound < latency),
                None => bounds.len(),
            };
            counts[bucket] += 1;
        }
        counts
    }

    /// The sequence number the next validator change will be above.
    pub fn change_seq(&self) -> u64 {
        self.change_seq
    }

    /// Starts a validator change and returns its sequence number.
    pub fn next_change(&mut self) -> u64 {
        self.change_seq += 1;
        self.change_seq
    }

    pub fn stamp_change(&mut self, id: i64, seq: u64) {
        self.changed_at.insert(id, seq);
    }

    /// Whether `id` was changed by the validator after sequence `mark`.
    pub fn changed_after(&self, id: i64, mark: u64) -> bool {
        self.changed_at.get(&id).is_some_and(|&seq| seq > mark)
    }

    /// The ids changed by the validator up to `mark`.
    pub fn changed_until(&self, mark: u64) -> Vec<i64> {
        self.changed_at
            .iter()
            .filter(|(_, &seq)| seq <= mark)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Forgets the changes up to `mark` (a sync that started after them ran).
    pub fn forget_changes_until(&mut self, mark: u64) {
        self.changed_at.retain(|_, seq| *seq > mark);
    }

    fn deactivate_slot(&mut self, slot: Slot) {
        let Some(record) = self
            .slots
            .get_mut(slot as usize)
            .and_then(|entry| entry.active.take())
        else {
            return;
        };
        self.metas[slot as usize] = None;
        if self.slot_by_id.get(&record.proxy.id) == Some(&slot) {
            self.slot_by_id.remove(&record.proxy.id);
        }
        for (i, key) in record.meta.memberships().into_iter().enumerate() {
            let Some(key) = key else { continue };
            let Some(bucket) = self.buckets.get_mut(&key) else {
                continue;
            };
            let position = record.positions[i] as usize;
            if position >= bucket.len() {
                continue;
            }
            bucket.swap_remove(position);
            if let Some(&moved) = bucket.get(position) {
                if let Some(moved_record) = self
                    .slots
                    .get_mut(moved as usize)
                    .and_then(|entry| entry.active.as_mut())
                {
                    moved_record.positions[i] = position as u32;
                }
            }
            if bucket.is_empty() && key != BucketKey::All {
                self.buckets.remove(&key);
            }
        }
    }

    /// Every active proxy, by id.
    #[cfg(test)]
    pub fn active_proxies(&self) -> Vec<ActiveProxy> {
        let mut active: Vec<ActiveProxy> = self
            .slots
            .iter()
            .filter_map(|entry| entry.active.as_ref().map(|record| record.proxy.clone()))
            .collect();
        active.sort_by_key(|proxy| proxy.id);
        active
    }

    /// Checks that every bucket and position agrees with the records.
    #[cfg(test)]
    pub fn assert_consistent(&self) {
        let mut expected: HashMap<BucketKey, usize> = HashMap::new();
        assert_eq!(self.metas.len(), self.slots.len());
        for (slot, entry) in self.slots.iter().enumerate() {
            let Some(record) = &entry.active else {
                assert!(self.metas[slot].is_none());
                continue;
            };
            for (i, key) in record.meta.memberships().into_iter().enumerate() {
                let Some(key) = key else { continue };
                *expected.entry(key).or_default() += 1;
                let bucket = self.bucket(key);
                assert_eq!(bucket[record.positions[i] as usize], slot as Slot);
            }
            assert_eq!(self.slot_by_id.get(&record.proxy.id), Some(&(slot as Slot)));
            assert_eq!(self.metas[slot].as_ref(), Some(&record.meta));
        }
        for (key, size) in self.bucket_sizes() {
            assert_eq!(expected.get(&key).copied().unwrap_or(0), size, "{key:?}");
        }
        assert_eq!(self.slot_by_id.len(), self.active_count());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(id: i64, country: &str, anonymity: Anonymity) -> ActiveProxy {
        ActiveProxy {
            exit_ip: None,
            id,
            key: ProxyKey::new(
                Protocol::Http,
                format!("10.0.{}.{}", id / 256, id % 256).parse().unwrap(),
                8080,
            ),
            latency_ms: Some(100),
            anonymity: Some(anonymity),
            country: Some(country.into()),
            supports_https: None,
            last_validated_at: None,
            anonymity_evidence: None,
        }
    }

    #[test]
    fn swap_removal_keeps_buckets_consistent() {
        let mut registry = Registry::default();
        for id in 0..50 {
            let p = proxy(id, if id % 3 == 0 { "DE" } else { "US" }, Anonymity::Elite);
            let url = p.key.url();
            registry.activate(p, &url);
        }
        registry.assert_consistent();
        for id in (0..50).step_by(4) {
            registry.deactivate_id(id);
            registry.assert_consistent();
        }
        // An update that moves a proxy to another country re-files it.
        let moved = proxy(1, "FR", Anonymity::Transparent);
        let url = moved.key.url();
        registry.activate(moved, &url);
        registry.assert_consistent();
        assert_eq!(
            registry
                .bucket(BucketKey::Country(country_code("fr").unwrap()))
                .len(),
            1
        );
        assert_eq!(registry.active_count(), 50 - 13);
        assert_eq!(registry.known_count(), 50);
    }

    #[test]
    fn candidates_are_the_smallest_matching_bucket() {
        let mut registry = Registry::default();
        for id in 0..20 {
            let p = proxy(id, if id == 7 { "JP" } else { "US" }, Anonymity::Anonymous);
            let url = p.key.url();
            registry.activate(p, &url);
        }
        let filter = Filter {
            country: country_code("jp"),
            anonymity: Some(Anonymity::Anonymous),
            ..Filter::default()
        };
        assert_eq!(registry.candidates(&filter).len(), 1);
        let nowhere = Filter {
            country: country_code("zz"),
            ..Filter::default()
        };
        assert!(registry.candidates(&nowhere).is_empty());
    }

    #[test]
    fn country_codes_are_two_letters() {
        assert_eq!(country_code("us"), country_code("US"));
        assert_eq!(country_code("USA"), None);
        assert_eq!(country_code("1A"), None);
    }
}
