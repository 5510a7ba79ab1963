//! One source's view of the proxies it reported on: scores, counts and bans,
//! and the rules that move them. Pure: every function takes `now` (unix
//! milliseconds) and touches no clock, lock or file.

use std::collections::BTreeSet;

use crate::config::ScoringConfig;

use super::estimate::Posterior;
use super::registry::{ExitId, IntMap, Slot};

/// The scoring configuration in the units the hot path uses.
#[derive(Clone, Debug)]
pub(crate) struct Rules {
    pub initial_score: i32,
    pub success_delta: i32,
    pub failure_delta: i32,
    pub max_score: i32,
    /// Scores never sink below this, so that a long-failing proxy that is
    /// unbanned and then works again is not buried for ever. It lies below
    /// `ban_threshold`, so a ban stays reachable.
    pub min_score: i32,
    pub ban_threshold: i32,
    pub ban_cooldown_ms: i64,
    pub ban_cooldown_max_ms: i64,
    /// On a long candidate list, the best estimates that take part in the
    /// draw, and the random candidates beside them.
    pub top_k: usize,
    pub random_draws: usize,
    /// Each report first multiplies a proxy's counts by this.
    pub discount: f32,
}

impl Rules {
    pub fn new(config: &ScoringConfig) -> Rules {
        let min_score = config
            .ban_threshold
            .saturating_add(config.failure_delta)
            .min(config.ban_threshold.saturating_sub(1));
        Rules {
            initial_score: config.initial_score,
            success_delta: config.success_delta,
            failure_delta: config.failure_delta,
            max_score: config.max_score,
            min_score,
            ban_threshold: config.ban_threshold,
            ban_cooldown_ms: duration_ms(config.ban_cooldown),
            ban_cooldown_max_ms: duration_ms(config.ban_cooldown_max),
            top_k: config.top_k.max(1),
            random_draws: random_draws(config.top_k.max(1), config.explore_ratio),
            discount: (config.discount as f32).clamp(0.01, 1.0),
        }
    }

    /// The cooldown of a ban preceded by `previous_bans` bans of the same
    /// proxy for the same source: doubled each time, capped.
    pub fn cooldown_ms(&self, previous_bans: u32) -> i64 {
        let factor = 1i64.checked_shl(previous_bans).unwrap_or(i64::MAX);
        let factor = if factor <= 0 { i64::MAX } else { factor };
        self.ban_cooldown_ms
            .saturating_mul(factor)
            .min(self.ban_cooldown_max_ms)
    }
}

/// The random candidates beside `top_k` best ones that make `explore_ratio`
/// of a long list's draw (a ratio above 0.9 counts as 0.9).
fn random_draws(top_k: usize, explore_ratio: f64) -> usize {
    let ratio = explore_ratio.clamp(0.0, 0.9);
    (top_k as f64 * ratio / (1.0 - ratio)).round() as usize
}

fn duration_ms(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// What a source knows about one proxy. Exists only once the source reported
/// on it, so memory follows feedback, not sources × proxies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Stats {
    pub score: i32,
    /// What the choice draws from (see [`Posterior`]).
    pub posterior: Posterior,
    pub success_count: u64,
    pub failure_count: u64,
    /// Set while banned; a ban is lifted lazily once this has passed.
    pub banned_until: Option<i64>,
    pub ban_count: u32,
    /// The last get-proxy answer or feedback that involved it.
    pub last_used: i64,
}

impl Stats {
    pub fn is_banned_at(&self, now: i64) -> bool {
        self.banned_until.is_some_and(|until| until > now)
    }
}

/// Per-source state. Invariants: every entry is in exactly one of
/// `ranked` (not banned) and `bans` (banned), under its current values;
/// every exit ban is in both `exit_bans` and `exit_ban_ends`.
#[derive(Debug, Default)]
pub(crate) struct SourceState {
    pub entries: IntMap<Slot, Stats>,
    /// Unbanned entries by their estimate, walked best-first by get-proxy.
    pub ranked: BTreeSet<(u32, Slot)>,
    /// Banned entries by the end of their ban.
    pub bans: BTreeSet<(i64, Slot)>,
    /// Exits banned for this source (a ban of one of their proxies), until
    /// when; and the same by the end of the ban.
    pub exit_bans: IntMap<ExitId, i64>,
    pub exit_ban_ends: BTreeSet<(i64, ExitId)>,
    pub requests: u64,
    pub feedbacks: u64,
    /// Feedbacks that reported a success, and a failure (restored sources
    /// start from the sums of their restored entries).
    pub successes: u64,
    pub failures: u64,
    /// The last get-proxy or feedback for this source, unix milliseconds.
    pub last_request: i64,
}

impl SourceState {
    /// Unbans every proxy whose cooldown has passed, its score reset. An
    /// expired ban of an inactive proxy is lifted too: the proxy is not
    /// served while inactive anyway, and if it comes back it starts from
    /// the reset score, as documented. Lifting them here keeps
    /// this O(expired bans) instead of rechecking them on every request.
    pub fn lift_expired_bans(&mut self, now: i64, rules: &Rules) {
        while let Some(&(until, slot)) = self.bans.first() {
            if until > now {
                break;
            }
            self.bans.pop_first();
            if let Some(stats) = self.entries.get_mut(&slot) {
                stats.banned_until = None;
                stats.score = rules.initial_score;
                stats.posterior = Posterior::default();
                self.ranked.insert((stats.posterior.key(), slot));
            }
        }
        while let Some(&(until, exit)) = self.exit_ban_ends.first() {
            if until > now {
                break;
            }
            self.exit_ban_ends.pop_first();
            if self.exit_bans.get(&exit) == Some(&until) {
                self.exit_bans.remove(&exit);
            }
        }
    }

    /// Bans `exit` for this source until `until` (a later end wins).
    pub fn ban_exit(&mut self, exit: ExitId, until: i64) {
        if let Some(&old) = self.exit_bans.get(&exit) {
            if old >= until {
                return;
            }
            self.exit_ban_ends.remove(&(old, exit));
        }
        self.exit_bans.insert(exit, until);
        self.exit_ban_ends.insert((until, exit));
    }

    /// Applies one feedback and returns the entry's new values.
    pub fn record(&mut self, slot: Slot, success: bool, now: i64, rules: &Rules) -> Stats {
        let stats = self.entries.entry(slot).or_insert(Stats {
            score: rules.initial_score,
            posterior: Posterior::default(),
            success_count: 0,
            failure_count: 0,
            banned_until: None,
            ban_count: 0,
            last_used: now,
        });
        self.feedbacks += 1;
        if success {
            self.successes += 1;
        } else {
            self.failures += 1;
        }
        // Take the entry out of its index, update it, put it back.
        match stats.banned_until {
            Some(until) if until <= now => {
                self.bans.remove(&(until, slot));
                stats.banned_until = None;
                stats.score = rules.initial_score;
                stats.posterior = Posterior::default();
            }
            Some(until) => {
                self.bans.remove(&(until, slot));
            }
            None => {
                // A no-op for a fresh entry, not yet indexed.
                self.ranked.remove(&(stats.posterior.key(), slot));
            }
        }
        let delta = if success {
            stats.success_count += 1;
            rules.success_delta
        } else {
            stats.failure_count += 1;
            rules.failure_delta
        };
        stats.score = stats
            .score
            .saturating_add(delta)
            .clamp(rules.min_score, rules.max_score);
        stats.posterior = stats.posterior.update(success, rules.discount);
        stats.last_used = now;
        if stats.banned_until.is_none() && stats.score < rules.ban_threshold {
            let until = now.saturating_add(rules.cooldown_ms(stats.ban_count));
            stats.banned_until = Some(until);
            stats.ban_count = stats.ban_count.saturating_add(1);
        }
        // A proxy already banned stays banned until its cooldown ends, even if
        // late successes lift its score: the ban is a time-out, not a score.
        match stats.banned_until {
            Some(until) => self.bans.insert((until, slot)),
            None => self.ranked.insert((stats.posterior.key(), slot)),
        };
        *stats
    }

    /// Puts restored stats in place of whatever `slot` had.
    pub fn insert(&mut self, slot: Slot, stats: Stats) {
        if let Some(old) = self.entries.remove(&slot) {
            match old.banned_until {
                Some(until) => self.bans.remove(&(until, slot)),
                None => self.ranked.remove(&(old.posterior.key(), slot)),
            };
        }
        match stats.banned_until {
            Some(until) => self.bans.insert((until, slot)),
            None => self.ranked.insert((stats.posterior.key(), slot)),
        };
        self.entries.insert(slot, stats);
    }

    /// Drops entries idle since before `cutoff`; returns how many.
    pub fn drop_idle(&mut self, cutoff: i64) -> usize {
        let idle: Vec<Slot> = self
            .entries
            .iter()
            .filter(|(_, stats)| stats.last_used < cutoff)
            .map(|(slot, _)| *slot)
            .collect();
        for slot in &idle {
            if let Some(old) = self.entries.remove(slot) {
                match old.banned_until {
                    Some(until) => self.bans.remove(&(until, *slot)),
                    None => self.ranked.remove(&(old.posterior.key(), *slot)),
                };
            }
        }
        idle.len()
    }

    #[cfg(test)]
    pub fn assert_consistent(&self) {
        assert_eq!(self.entries.len(), self.ranked.len() + self.bans.len());
        assert_eq!(self.exit_bans.len(), self.exit_ban_ends.len());
        for (slot, stats) in &self.entries {
            match stats.banned_until {
                Some(until) => assert!(self.bans.contains(&(until, *slot))),
                None => assert!(self.ranked.contains(&(stats.posterior.key(), *slot))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    pub(crate) fn default_scoring() -> ScoringConfig {
        ScoringConfig {
            initial_score: 0,
            success_delta: 1,
            failure_delta: -5,
            max_score: 100,
            ban_threshold: -15,
            ban_cooldown: Duration::from_secs(1800),
            ban_cooldown_max: Duration::from_secs(21600),
            top_k: 10,
            explore_ratio: 0.1,
            discount: 0.9,
        }
    }

    #[test]
    fn fourth_failure_bans_with_the_defaults() {
        let rules = Rules::new(&default_scoring());
        let mut source = SourceState::default();
        let scores: Vec<(i32, bool)> = (0..4)
            .map(|_| {
                let stats = source.record(3, false, 1000, &rules);
                (stats.score, stats.banned_until.is_some())
            })
            .collect();
        assert_eq!(
            scores,
            [(-5, false), (-10, false), (-15, false), (-20, true)]
        );
        let stats = source.entries[&3];
        assert_eq!(stats.banned_until, Some(1000 + 1_800_000));
        assert_eq!(stats.failure_count, 4);
        source.assert_consistent();
    }

    #[test]
    fn score_is_clamped_at_both_ends() {
        let rules = Rules::new(&default_scoring());
        let mut source = SourceState::default();
        for _ in 0..150 {
            source.record(1, true, 0, &rules);
        }
        assert_eq!(source.entries[&1].score, 100);
        for _ in 0..100 {
            source.record(2, false, 0, &rules);
        }
        assert_eq!(source.entries[&2].score, -20);
        source.assert_consistent();
    }

    #[test]
    fn cooldown_doubles_per_ban_and_is_capped() {
        let rules = Rules::new(&default_scoring());
        let minutes: Vec<i64> = (0..6).map(|n| rules.cooldown_ms(n) / 60_000).collect();
        assert_eq!(minutes, [30, 60, 120, 240, 360, 360]);
        assert_eq!(rules.cooldown_ms(200), 21_600_000);

        let mut source = SourceState::default();
        let mut now = 0;
        let mut cooldowns = Vec::new();
        for _ in 0..4 {
            let stats = (0..4)
                .map(|_| source.record(9, false, now, &rules))
                .last()
                .unwrap();
            let until = stats.banned_until.unwrap();
            cooldowns.push((until - now) / 60_000);
            now = until;
            source.lift_expired_bans(now, &rules);
            assert_eq!(source.entries[&9].score, 0, "score reset on lift");
        }
        assert_eq!(cooldowns, [30, 60, 120, 240]);
        source.assert_consistent();
    }

    #[test]
    fn late_success_does_not_end_a_ban_early() {
        let rules = Rules::new(&default_scoring());
        let mut source = SourceState::default();
        for _ in 0..4 {
            source.record(5, false, 0, &rules);
        }
        for _ in 0..30 {
            source.record(5, true, 10, &rules);
        }
        assert!(source.entries[&5].is_banned_at(10));
        assert!(source.ranked.is_empty());
        source.assert_consistent();
    }

    #[test]
    fn idle_entries_age_out() {
        let rules = Rules::new(&default_scoring());
        let mut source = SourceState::default();
        source.record(1, true, 100, &rules);
        for _ in 0..4 {
            source.record(2, false, 50, &rules);
        }
        source.record(3, true, 500, &rules);
        assert_eq!(source.drop_idle(200), 2);
        assert_eq!(source.entries.len(), 1);
        source.assert_consistent();
    }
}
