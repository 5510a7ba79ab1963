//! The choice of a get-proxy: which eligible proxies a source is given.
//! Made under the registry's read lock and the source's lock, so it is pure
//! and bounded: no allocation proportional to the pool, no I/O.
//!
//! Thompson sampling (see [`super::estimate`]): every proxy taking part
//! draws a value from the source's posterior for it, and the highest draws
//! win. On a short candidate list every eligible proxy takes part; on a
//! long one, the `top_k` best estimates of the source and a random sample
//! of the whole list (untried proxies included), so that the cost does not
//! grow with the pool. Proxies banned for the source, or behind an exit
//! banned for it, never take part; `count > 1` answers distinct exits while
//! the draw holds enough of them.

use std::time::Duration;

use super::estimate::Posterior;
use super::registry::{country_code, ExitId, Filter, Registry, Slot};
use super::source::{Rules, SourceState};
use super::{NoProxy, NoProxyReason, PickQuery};

/// How far the walk of the best estimates goes past proxies the filter
/// refuses, per proxy it needs.
const WALK_PER_WANTED: usize = 8;

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
    /// Unix milliseconds.
    pub now: i64,
}

/// One proxy's draw: the value, the slot, its score.
type Draw = (f32, Slot, i32);

impl Picker<'_> {
    fn matches(&self, slot: Slot) -> bool {
        self.registry
            .meta(slot)
            .is_some_and(|meta| self.filter.matches(meta))
    }

    fn exit_banned(&self, slot: Slot) -> bool {
        if self.source.exit_bans.is_empty() {
            return false;
        }
        self.registry
            .exit_of(slot)
            .and_then(|exit| self.source.exit_bans.get(&exit))
            .is_some_and(|&until| until > self.now)
    }

    /// The draw of `slot` when it may take part: matching, not banned, not
    /// behind a banned exit.
    fn draw(&self, slot: Slot, rng: &mut fastrand::Rng) -> Option<Draw> {
        if !self.matches(slot) {
            return None;
        }
        let (posterior, score) = match self.source.entries.get(&slot) {
            // Expired bans were lifted before the pick.
            Some(stats) if stats.banned_until.is_some() => return None,
            Some(stats) => (stats.posterior, stats.score),
            None => (Posterior::default(), self.rules.initial_score),
        };
        if self.exit_banned(slot) {
            return None;
        }
        Some((posterior.draw(rng), slot, score))
    }

    /// Every eligible candidate draws: for short lists, and as the last
    /// word before answering "none".
    pub fn pick_exact(&self, count: usize, rng: &mut fastrand::Rng) -> Vec<(Slot, i32)> {
        let drawn: Vec<Draw> = self
            .candidates
            .iter()
            .filter_map(|&slot| self.draw(slot, rng))
            .collect();
        self.best_distinct(drawn, count)
    }

    /// The source's `top_k` best estimates and a random sample of the
    /// candidates draw, without looking at every candidate.
    pub fn pick_fast(&self, count: usize, rng: &mut fastrand::Rng) -> Vec<(Slot, i32)> {
        let best = self.rules.top_k.max(count);
        let random = self.rules.random_draws.max(count);
        let mut drawn: Vec<Draw> = Vec::with_capacity(best + random);
        let walk_limit = best.saturating_mul(WALK_PER_WANTED).saturating_add(64);
        for &(_, slot) in self.source.ranked.iter().rev().take(walk_limit) {
            if let Some(draw) = self.draw(slot, rng) {
                drawn.push(draw);
                if drawn.len() == best {
                    break;
                }
            }
        }
        let len = self.candidates.len();
        let mut found = 0;
        for _ in 0..(4 * random + 16) {
            let slot = self.candidates[rng.usize(..len)];
            if let Some(draw) = self.draw(slot, rng) {
                drawn.push(draw);
                found += 1;
                if found == random {
                    break;
                }
            }
        }
        self.best_distinct(drawn, count)
    }

    /// The `count` highest draws, one slot once, distinct exits first: a
    /// proxy whose exit is taken already comes only when the draw holds no
    /// more exits (proxies of unknown exit count as their own).
    fn best_distinct(&self, mut drawn: Vec<Draw>, count: usize) -> Vec<(Slot, i32)> {
        if count == 1 {
            let best = drawn.iter().max_by(|a, b| a.0.total_cmp(&b.0));
            return best
                .map(|&(_, slot, score)| (slot, score))
                .into_iter()
                .collect();
        }
        drawn.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let mut chosen: Vec<(Slot, i32)> = Vec::with_capacity(count);
        let mut exits: Vec<ExitId> = Vec::with_capacity(count);
        let mut same_exit: Vec<(Slot, i32)> = Vec::new();
        for (_, slot, score) in drawn {
            if chosen.len() == count {
                break;
            }
            if chosen
                .iter()
                .chain(&same_exit)
                .any(|&(other, _)| other == slot)
            {
                continue;
            }
            match self.registry.exit_of(slot) {
                Some(exit) if exits.contains(&exit) => same_exit.push((slot, score)),
                Some(exit) => {
                    exits.push(exit);
                    chosen.push((slot, score));
                }
                None => chosen.push((slot, score)),
            }
        }
        let room = count - chosen.len();
        chosen.extend(same_exit.into_iter().take(room));
        chosen
    }

    /// Why nothing is eligible. Called only after an exact pick found none.
    pub fn explain(&self) -> NoProxy {
        if !self.candidates.iter().any(|&slot| self.matches(slot)) {
            return NoProxy {
                reason: NoProxyReason::NoMatch,
                retry_after: None,
            };
        }
        // Bans are ordered by their end: the first matching one ends first.
        let proxy_ban = self
            .source
            .bans
            .iter()
            .find(|&&(_, slot)| self.matches(slot))
            .map(|&(until, _)| until);
        let exit_ban = self.source.exit_ban_ends.first().map(|&(until, _)| until);
        let until = match (proxy_ban, exit_ban) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        NoProxy {
            reason: NoProxyReason::AllBanned,
            retry_after: until
                .map(|until| Duration::from_millis(until.saturating_sub(self.now).max(0) as u64)),
        }
    }
}
