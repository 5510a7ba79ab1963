//! The choice of a get-proxy: which eligible proxies a source is given.
//! Made under the registry's read lock and the source's lock, so it is pure
//! and bounded: no allocation proportional to the pool, no I/O.

use std::time::Duration;

use super::registry::{country_code, Filter, Registry, Slot};
use super::source::{Rules, SourceState};
use super::{NoProxy, NoProxyReason, PickQuery, UNSCORED_SCAN_LIMIT};

pub(super) fn compile_filter(query: &PickQuery) -> Filter {
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
pub(super) struct Picker<'a> {
    pub registry: &'a Registry,
    pub source: &'a SourceState,
    pub filter: &'a Filter,
    /// Active slots, a superset of those matching the filter.
    pub candidates: &'a [Slot],
    pub rules: &'a Rules,
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
    pub fn pick_exact(&self, count: usize, rng: &mut fastrand::Rng) -> Vec<(Slot, i32)> {
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
    pub fn pick_fast(&self, count: usize, rng: &mut fastrand::Rng) -> Vec<(Slot, i32)> {
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
    pub fn explain(&self, now: i64) -> NoProxy {
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
