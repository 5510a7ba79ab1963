//! Behaviour of the state manager as the API sees it: picking, filters,
//! bans, unknown proxies, the snapshot roundtrip. Time is passed in, so
//! nothing sleeps; randomness is seeded per test thread.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use super::*;
use crate::proxy::{Anonymity, Protocol, ProxyKey};
use crate::snapshot::{self, EntrySnapshot, Loaded, SnapshotData, SourceSnapshot};

fn scoring() -> ScoringConfig {
    ScoringConfig::defaults()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap()
}

fn proxy(id: i64) -> ActiveProxy {
    ActiveProxy {
        exit_ip: None,
        id,
        key: ProxyKey::new(
            Protocol::Http,
            format!("10.{}.{}.{}", id / 65536, (id / 256) % 256, id % 256)
                .parse()
                .unwrap(),
            8080,
        ),
        latency_ms: Some(100),
        anonymity: Some(Anonymity::Elite),
        country: Some("US".into()),
        supports_https: Some(false),
        last_validated_at: Some(t0()),
        anonymity_evidence: None,
    }
}

fn state_with(config: ScoringConfig, n: i64) -> State {
    let state = State::new(&config);
    state.replace_active((0..n).map(proxy).collect());
    state
}

fn url(id: i64) -> String {
    proxy(id).key.url()
}

fn pick_one(state: &State, source: &str, query: &PickQuery) -> Pick {
    let mut picks = state.get_proxy(source, query, t0()).unwrap();
    assert_eq!(picks.len(), 1);
    picks.remove(0)
}

/// Gives proxy `id` score `score` (> 0) for `source`.
fn raise(state: &State, source: &str, id: i64, score: i32) {
    for _ in 0..score {
        state.feedback(source, &url(id), true, t0()).unwrap();
    }
}

fn fail_until_banned(state: &State, source: &str, id: i64, now: DateTime<Utc>) -> FeedbackOutcome {
    loop {
        let outcome = state.feedback(source, &url(id), false, now).unwrap();
        if outcome.is_banned {
            return outcome;
        }
    }
}

/// Gives proxy `id` `n` failures for `source` (fewer than a ban needs).
fn lower(state: &State, source: &str, id: i64, n: usize) {
    for _ in 0..n {
        state.feedback(source, &url(id), false, t0()).unwrap();
    }
}

/// How often each proxy id is picked in `rounds` picks, with no feedback.
fn pick_counts(state: &State, source: &str, rounds: usize) -> HashMap<i64, usize> {
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for _ in 0..rounds {
        let pick = pick_one(state, source, &PickQuery::default());
        *seen.entry(pick.id).or_default() += 1;
    }
    seen
}

#[test]
fn the_choice_favours_what_works_and_spreads_load_over_it() {
    fastrand::seed(1);
    let state = state_with(scoring(), 40);
    for id in 0..20 {
        raise(&state, "app", id, 10);
    }
    for id in 20..40 {
        lower(&state, "app", id, 3);
    }
    let seen = pick_counts(&state, "app", 4000);
    let good: usize = (0..20).map(|id| seen.get(&id).copied().unwrap_or(0)).sum();
    assert!(good >= 3900, "good proxies got {good} of 4000: {seen:?}");
    // Thompson sampling spreads: a fair share is 200 each.
    for id in 0..20 {
        let hits = seen.get(&id).copied().unwrap_or(0);
        assert!(hits >= 80, "proxy {id} got {hits}: {seen:?}");
    }
}

#[test]
fn on_a_long_list_the_choice_still_favours_what_works_and_explores() {
    fastrand::seed(2);
    let state = state_with(scoring(), 5000);
    for id in 0..20 {
        raise(&state, "app", id, 10);
    }
    for id in 20..40 {
        lower(&state, "app", id, 3);
    }
    let seen = pick_counts(&state, "app", 4000);
    let count = |ids: std::ops::Range<i64>| -> usize {
        ids.map(|id| seen.get(&id).copied().unwrap_or(0)).sum()
    };
    let (good, bad) = (count(0..20), count(20..40));
    let untried = 4000 - good - bad;
    assert!(good >= 3000, "good {good}, bad {bad}, untried {untried}");
    assert!(bad <= 40, "good {good}, bad {bad}, untried {untried}");
    assert!(untried >= 20, "untried proxies are explored: {untried}");
    let distinct_untried = seen.keys().filter(|&&id| id >= 40).count();
    assert!(distinct_untried > 15, "explored widely: {distinct_untried}");
}

#[test]
fn untried_proxies_are_explored_before_failing_ones() {
    fastrand::seed(3);
    let state = state_with(scoring(), 30);
    for id in 0..10 {
        lower(&state, "app", id, 3);
    }
    let seen = pick_counts(&state, "app", 2000);
    let failing: usize = (0..10).map(|id| seen.get(&id).copied().unwrap_or(0)).sum();
    assert!(failing < 300, "failing proxies got {failing} of 2000");
    assert!(seen.keys().filter(|&&id| id >= 10).count() == 20);
}

#[test]
fn a_proxy_that_stops_working_loses_its_share_within_three_failures() {
    fastrand::seed(4);
    for n in [40, 5000] {
        let state = state_with(scoring(), n);
        for id in 0..20 {
            raise(&state, "app", id, 30);
        }
        lower(&state, "app", 7, 3);
        let outcome = state.feedback("app", &url(7), true, t0()).unwrap();
        assert!(
            !outcome.is_banned,
            "three failures do not ban a score of 30"
        );
        lower(&state, "app", 7, 3);
        let seen = pick_counts(&state, "app", 2000);
        let hits = seen.get(&7).copied().unwrap_or(0);
        // A fair share would be 100 (less on the long list, which explores).
        assert!(hits < 20, "n={n}: the failing proxy still got {hits}");
    }
}

fn proxy_behind(id: i64, exit: &str) -> ActiveProxy {
    ActiveProxy {
        exit_ip: Some(exit.parse().unwrap()),
        ..proxy(id)
    }
}

/// Proxies 0-3 share exit 192.0.2.1; 4-7 each have their own.
fn state_with_exits() -> State {
    let state = State::new(&scoring());
    let mut proxies: Vec<ActiveProxy> = (0..4).map(|id| proxy_behind(id, "192.0.2.1")).collect();
    proxies.extend((4..8).map(|id| proxy_behind(id, &format!("192.0.2.{}", id + 10))));
    state.replace_active(proxies);
    state
}

#[test]
fn a_ban_covers_the_exits_other_proxies_for_that_source_only() {
    fastrand::seed(6);
    let state = state_with_exits();
    let banned = fail_until_banned(&state, "a", 0, t0());
    let until = banned.banned_until.unwrap();
    for _ in 0..300 {
        let pick = pick_one(&state, "a", &PickQuery::default());
        assert!(
            pick.id >= 4,
            "a sibling of a banned proxy was served: {}",
            pick.id
        );
    }
    let for_b: HashSet<i64> = pick_counts(&state, "b", 300).into_keys().collect();
    assert!(for_b.contains(&1) && for_b.contains(&0), "{for_b:?}");
    // The same cooldown: the siblings are back when it ends.
    let mut after: HashSet<i64> = HashSet::new();
    for _ in 0..300 {
        let picks = state.get_proxy("a", &PickQuery::default(), until).unwrap();
        after.insert(picks[0].id);
    }
    assert!(after.contains(&1) && after.contains(&2), "{after:?}");
}

#[test]
fn an_exit_ban_can_leave_nothing_and_says_until_when() {
    let state = State::new(&scoring());
    state.replace_active((0..3).map(|id| proxy_behind(id, "192.0.2.1")).collect());
    let banned = fail_until_banned(&state, "a", 0, t0());
    let err = state
        .get_proxy("a", &PickQuery::default(), t0())
        .unwrap_err();
    assert_eq!(err.reason, NoProxyReason::AllBanned);
    let until = banned.banned_until.unwrap();
    assert_eq!(
        err.retry_after,
        Some((until - t0()).to_std().unwrap()),
        "until the exit's ban ends"
    );
}

#[test]
fn count_answers_distinct_exits_while_there_are_enough() {
    fastrand::seed(7);
    let state = state_with_exits();
    let exits = |picks: &[Pick]| -> usize {
        picks
            .iter()
            .map(|pick| if pick.id < 4 { 0 } else { pick.id })
            .collect::<HashSet<i64>>()
            .len()
    };
    for _ in 0..200 {
        let query = PickQuery {
            count: 5,
            ..PickQuery::default()
        };
        let picks = state.get_proxy("app", &query, t0()).unwrap();
        assert_eq!(picks.len(), 5);
        assert_eq!(exits(&picks), 5, "{picks:?}");
        let query = PickQuery {
            count: 7,
            ..PickQuery::default()
        };
        let picks = state.get_proxy("app", &query, t0()).unwrap();
        let ids: HashSet<i64> = picks.iter().map(|pick| pick.id).collect();
        assert_eq!(ids.len(), 7, "distinct proxies");
        assert_eq!(exits(&picks), 5, "every exit, then siblings");
    }
}

#[test]
fn the_source_view_shows_the_estimate_the_choice_uses() {
    let state = state_with(scoring(), 10);
    raise(&state, "app", 1, 5);
    lower(&state, "app", 2, 2);
    let view = state.source_view("app", 10, t0()).unwrap();
    let first = &view.entries[0];
    assert_eq!(first.key, proxy(1).key, "best estimate first");
    assert!(first.estimate > 0.8, "{}", first.estimate);
    assert!((first.discounted_successes - 4.0951).abs() < 1e-3);
    let last = &view.entries[1];
    assert!(last.estimate < 0.3, "{}", last.estimate);
    assert!((last.discounted_failures - 1.9).abs() < 1e-3);
}

fn varied_state() -> State {
    let state = State::new(&scoring());
    state.replace_active((0..400).map(varied_proxy).collect());
    state
}

fn varied_proxy(id: i64) -> ActiveProxy {
    let mut p = proxy(id);
    p.key.protocol = Protocol::ALL[(id % 4) as usize];
    p.supports_https = Some(id % 5 == 0);
    p.country = Some(["US", "DE", "FR", "JP"][(id % 7 % 4) as usize].into());
    p.anonymity = [
        Some(Anonymity::Elite),
        Some(Anonymity::Anonymous),
        Some(Anonymity::Transparent),
        None,
    ][(id % 3 + id % 2) as usize];
    p.latency_ms = Some((id * 10) as u32);
    p
}

fn assert_all_picks(state: &State, query: PickQuery, check: impl Fn(&ActiveProxy) -> bool) {
    let query = PickQuery {
        count: 100,
        ..query
    };
    let mut n = 0;
    for _ in 0..5 {
        for pick in state.get_proxy("app", &query, t0()).unwrap() {
            let registry = state.registry.read();
            let slot = registry.slot_of_url(&pick.url).unwrap();
            let proxy = &registry.entry(slot).unwrap().active.as_ref().unwrap().proxy;
            assert!(check(proxy), "{query:?} gave {proxy:?}");
            n += 1;
        }
    }
    assert!(n > 0);
}

#[test]
fn each_filter_is_applied() {
    fastrand::seed(6);
    let state = varied_state();
    assert_all_picks(
        &state,
        PickQuery {
            protocol: Some(Protocol::Socks5),
            ..PickQuery::default()
        },
        |p| p.key.protocol == Protocol::Socks5,
    );
    assert_all_picks(
        &state,
        PickQuery {
            https_only: true,
            ..PickQuery::default()
        },
        |p| p.supports_https == Some(true),
    );
    assert_all_picks(
        &state,
        PickQuery {
            country: Some("jp".into()),
            ..PickQuery::default()
        },
        |p| p.country.as_deref() == Some("JP"),
    );
    assert_all_picks(
        &state,
        PickQuery {
            anonymity: Some(Anonymity::Anonymous),
            ..PickQuery::default()
        },
        |p| matches!(p.anonymity, Some(Anonymity::Anonymous | Anonymity::Elite)),
    );
    assert_all_picks(
        &state,
        PickQuery {
            anonymity: Some(Anonymity::Elite),
            ..PickQuery::default()
        },
        |p| p.anonymity == Some(Anonymity::Elite),
    );
    assert_all_picks(
        &state,
        PickQuery {
            anonymity: Some(Anonymity::Transparent),
            ..PickQuery::default()
        },
        |p| p.anonymity == Some(Anonymity::Transparent),
    );
    assert_all_picks(
        &state,
        PickQuery {
            max_latency_ms: Some(500),
            ..PickQuery::default()
        },
        |p| p.latency_ms.is_some_and(|latency| latency <= 500),
    );
    assert_all_picks(
        &state,
        PickQuery {
            protocol: Some(Protocol::Http),
            country: Some("DE".into()),
            max_latency_ms: Some(2000),
            ..PickQuery::default()
        },
        |p| {
            p.key.protocol == Protocol::Http
                && p.country.as_deref() == Some("DE")
                && p.latency_ms.is_some_and(|latency| latency <= 2000)
        },
    );
}

#[test]
fn anonymous_filter_serves_elite_too() {
    fastrand::seed(7);
    let state = varied_state();
    let query = PickQuery {
        anonymity: Some(Anonymity::Anonymous),
        count: 100,
        ..PickQuery::default()
    };
    let levels: HashSet<Option<Anonymity>> = (0..10)
        .flat_map(|_| state.get_proxy("app", &query, t0()).unwrap())
        .map(|pick| pick.anonymity)
        .collect();
    assert!(levels.contains(&Some(Anonymity::Elite)));
    assert!(levels.contains(&Some(Anonymity::Anonymous)));
}

#[test]
fn count_gives_distinct_proxies() {
    fastrand::seed(8);
    for (n, count, expected) in [(60, 50, 50), (30, 100, 30), (5000, 100, 100), (5000, 0, 1)] {
        let state = state_with(scoring(), n);
        for id in 0..15 {
            raise(&state, "app", id, 2);
        }
        let query = PickQuery {
            count,
            ..PickQuery::default()
        };
        let picks = state.get_proxy("app", &query, t0()).unwrap();
        let distinct: HashSet<&str> = picks.iter().map(|pick| pick.url.as_str()).collect();
        assert_eq!(picks.len(), expected, "n={n} count={count}");
        assert_eq!(distinct.len(), expected, "n={n} count={count}");
    }
}

#[test]
fn fourth_failure_bans_and_banned_proxy_is_not_served() {
    fastrand::seed(9);
    let state = state_with(scoring(), 2);
    let scores: Vec<(i32, bool)> = (0..4)
        .map(|_| {
            let outcome = state.feedback("app", &url(0), false, t0()).unwrap();
            (outcome.score, outcome.is_banned)
        })
        .collect();
    assert_eq!(
        scores,
        [(-5, false), (-10, false), (-15, false), (-20, true)]
    );
    let outcome = state.feedback("app", &url(0), true, t0()).unwrap();
    assert_eq!(outcome.success_count, 1);
    assert_eq!(outcome.failure_count, 4);
    assert!(outcome.is_banned);
    assert_eq!(
        outcome.banned_until,
        Some(t0() + chrono::Duration::seconds(1800))
    );
    for _ in 0..200 {
        assert_eq!(pick_one(&state, "app", &PickQuery::default()).id, 1);
    }
    // Bans are per source: another source still gets it.
    let ids: HashSet<i64> = (0..200)
        .map(|_| pick_one(&state, "other", &PickQuery::default()).id)
        .collect();
    assert!(ids.contains(&0));
}

#[test]
fn ban_cooldown_doubles_and_is_capped() {
    let state = state_with(scoring(), 1);
    let mut now = t0();
    let mut minutes = Vec::new();
    for _ in 0..6 {
        let outcome = fail_until_banned(&state, "app", 0, now);
        let until = outcome.banned_until.unwrap();
        minutes.push((until - now).num_minutes());
        now = until;
    }
    assert_eq!(minutes, [30, 60, 120, 240, 360, 360]);
}

#[test]
fn ban_is_lifted_after_cooldown_with_score_reset() {
    fastrand::seed(10);
    let state = state_with(scoring(), 1);
    raise(&state, "app", 0, 3);
    let outcome = fail_until_banned(&state, "app", 0, t0());
    let until = outcome.banned_until.unwrap();
    let just_before = until - chrono::Duration::milliseconds(1);
    let err = state
        .get_proxy("app", &PickQuery::default(), just_before)
        .unwrap_err();
    assert_eq!(err.reason, NoProxyReason::AllBanned);
    assert_eq!(err.retry_after, Some(Duration::from_millis(1)));
    let picks = state
        .get_proxy("app", &PickQuery::default(), until)
        .unwrap();
    assert_eq!(picks[0].id, 0);
    assert_eq!(picks[0].score, 0, "score reset to initial_score");
    let view = state.source_view("app", 10, until).unwrap();
    assert!(!view.entries[0].is_banned);
    assert_eq!(view.entries[0].banned_until, None);
    // The ban count survives the lift: the next ban lasts twice as long.
    let next = fail_until_banned(&state, "app", 0, until);
    assert_eq!((next.banned_until.unwrap() - until).num_minutes(), 60);
}

#[test]
fn deactivated_proxy_is_never_served_but_its_feedback_counts() {
    fastrand::seed(11);
    let state = state_with(scoring(), 300);
    raise(&state, "app", 7, 50);
    state.apply_changes(Vec::new(), vec![7]);
    assert_eq!(state.active_count(), 299);
    let query = PickQuery {
        count: 100,
        ..PickQuery::default()
    };
    for _ in 0..20 {
        assert!(state
            .get_proxy("app", &query, t0())
            .unwrap()
            .iter()
            .all(|pick| pick.id != 7));
    }
    let outcome = state.feedback("app", &url(7), true, t0()).unwrap();
    assert_eq!(outcome.score, 51);
    // It comes back with its score when reactivated.
    state.apply_changes(vec![proxy(7)], Vec::new());
    let explore_off = State::new(&ScoringConfig {
        explore_ratio: 0.0,
        top_k: 1,
        ..scoring()
    });
    explore_off.replace_active((0..300).map(proxy).collect());
    raise(&explore_off, "app", 7, 1);
    explore_off.replace_active((0..300).filter(|&id| id != 7).map(proxy).collect());
    assert!(explore_off.feedback("app", &url(7), true, t0()).is_ok());
    explore_off.replace_active((0..300).map(proxy).collect());
    assert_eq!(pick_one(&explore_off, "app", &PickQuery::default()).id, 7);
    explore_off.registry.read().assert_consistent();
}

#[test]
fn feedback_for_an_unknown_proxy_is_an_error() {
    let state = state_with(scoring(), 3);
    assert_eq!(
        state.feedback("app", "http://10.9.9.9:8080", true, t0()),
        Err(FeedbackError::UnknownProxy)
    );
    assert_eq!(
        state.feedback("app", "not a url", false, t0()),
        Err(FeedbackError::UnknownProxy)
    );
    // Feedback creates an unknown source, get-proxy too.
    assert!(state.feedback("brand_new", &url(1), true, t0()).is_ok());
    assert!(state.source_view("brand_new", 10, t0()).is_some());
    assert!(state.source_view("never", 10, t0()).is_none());
}

#[test]
fn credentials_are_part_of_the_identity() {
    let state = State::new(&scoring());
    let mut with_password = proxy(1);
    with_password.key.username = Some("user".into());
    with_password.key.password = Some("secret".into());
    let full = with_password.key.url();
    state.replace_active(vec![with_password.clone()]);
    let pick = pick_one(&state, "app", &PickQuery::default());
    assert_eq!(pick.url, "http://user:secret@10.0.0.1:8080");
    assert!(state.feedback("app", &full, true, t0()).is_ok());
    assert_eq!(
        state.feedback("app", &with_password.key.redacted(), true, t0()),
        Err(FeedbackError::UnknownProxy)
    );
}

#[test]
fn no_proxy_reasons() {
    let empty = State::new(&scoring());
    let err = empty
        .get_proxy("app", &PickQuery::default(), t0())
        .unwrap_err();
    assert_eq!(
        err,
        NoProxy {
            reason: NoProxyReason::NoActive,
            retry_after: None
        }
    );

    for n in [2, 400] {
        let state = state_with(scoring(), n);
        for (country, reason) in [
            ("FR", NoProxyReason::NoMatch),
            ("USA", NoProxyReason::NoMatch),
        ] {
            let query = PickQuery {
                country: Some(country.into()),
                ..PickQuery::default()
            };
            assert_eq!(
                state.get_proxy("app", &query, t0()).unwrap_err().reason,
                reason
            );
        }
        // Ban everything, the latest ban last: retry after the earliest end.
        for id in 0..n {
            let now = t0() + chrono::Duration::seconds(id);
            fail_until_banned(&state, "app", id, now);
        }
        let err = state
            .get_proxy(
                "app",
                &PickQuery::default(),
                t0() + chrono::Duration::seconds(n),
            )
            .unwrap_err();
        assert_eq!(err.reason, NoProxyReason::AllBanned);
        assert_eq!(err.retry_after, Some(Duration::from_secs(1800 - n as u64)));
    }
}

#[test]
fn retry_after_considers_only_matching_proxies() {
    let state = State::new(&scoring());
    let mut german = proxy(1);
    german.country = Some("DE".into());
    state.replace_active(vec![proxy(0), german]);
    fail_until_banned(&state, "app", 0, t0());
    fail_until_banned(&state, "app", 1, t0() + chrono::Duration::seconds(100));
    let query = PickQuery {
        country: Some("de".into()),
        ..PickQuery::default()
    };
    let err = state
        .get_proxy("app", &query, t0() + chrono::Duration::seconds(100))
        .unwrap_err();
    assert_eq!(err.retry_after, Some(Duration::from_secs(1800)));
}

#[test]
fn replace_active_drops_what_is_gone_and_keeps_it_known() {
    let state = state_with(scoring(), 10);
    state.replace_active((5..15).map(proxy).collect());
    assert_eq!(state.active_count(), 10);
    assert!(state.feedback("app", &url(0), true, t0()).is_ok());
    let summary = state.summary(t0());
    assert_eq!(summary.known, 15);
    state.registry.read().assert_consistent();
}

#[test]
fn summary_counts_the_pool() {
    let state = varied_state();
    for id in [0, 1] {
        for _ in 0..4 {
            let url = varied_proxy(id).key.url();
            state.feedback("app", &url, false, t0()).unwrap();
        }
    }
    state.apply_changes(Vec::new(), vec![1]);
    state.get_proxy("app", &PickQuery::default(), t0()).unwrap();
    let summary = state.summary(t0());
    assert_eq!(summary.active, 399);
    assert_eq!(
        summary.by_protocol.iter().map(|row| row.1).sum::<usize>(),
        399
    );
    assert_eq!(
        summary.by_anonymity.iter().map(|row| row.1).sum::<usize>(),
        399
    );
    assert_eq!(
        summary.by_country.iter().map(|row| row.1).sum::<usize>(),
        399
    );
    let app = &summary.sources[0];
    assert_eq!(app.name, "app");
    assert_eq!(app.banned, 2);
    assert_eq!(app.pool_size, 398, "one banned proxy is still active");
    assert_eq!(app.requests, 1);
    assert_eq!(app.feedbacks, 8);
    assert_eq!((summary.requests, summary.feedbacks), (1, 8));
}

#[test]
fn source_view_lists_best_first() {
    let state = state_with(scoring(), 10);
    raise(&state, "app", 3, 5);
    raise(&state, "app", 4, 9);
    state.feedback("app", &url(5), false, t0()).unwrap();
    fail_until_banned(&state, "app", 6, t0());
    let view = state.source_view("app", 10, t0()).unwrap();
    let order: Vec<(String, i32, bool)> = view
        .entries
        .iter()
        .map(|entry| (entry.key.url(), entry.score, entry.is_banned))
        .collect();
    assert_eq!(
        order,
        [
            (url(4), 9, false),
            (url(3), 5, false),
            (url(5), -5, false),
            (url(6), -20, true)
        ]
    );
    assert_eq!(state.source_view("app", 2, t0()).unwrap().entries.len(), 2);
    assert_eq!(view.total_entries, 4);
}

#[test]
fn snapshot_roundtrip_restores_stats_and_known_proxies() {
    let state = state_with(scoring(), 20);
    raise(&state, "app", 3, 4);
    let banned = fail_until_banned(&state, "app", 5, t0());
    raise(&state, "other", 3, 1);
    let data = state.snapshot_data(t0());
    assert_eq!(data.entry_count(), 3);
    assert_eq!(data.active.len(), 20);
    assert_eq!(
        data.urls.len(),
        20,
        "each URL stored once, shared by the stats and the active set"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stats.bin");
    snapshot::write_atomic(&path, &data).unwrap();
    let Loaded::Loaded(loaded) = snapshot::load(&path).unwrap() else {
        panic!("expected a snapshot");
    };

    // A fresh process, before the database answers.
    let restored = State::new(&scoring());
    let report = restored.restore(loaded, t0());
    assert_eq!(report.entries, 3);
    assert_eq!(report.sources, 2);
    assert_eq!((report.active, report.active_stale), (20, 0));
    let view = restored.source_view("app", 10, t0()).unwrap();
    assert!(view.entries.iter().all(|entry| entry.active));
    restored.replace_active((0..20).map(proxy).collect());
    assert_eq!(
        restored.source_view("app", 10, t0()),
        state.source_view("app", 10, t0())
    );
    assert_eq!(
        restored.source_view("other", 10, t0()),
        state.source_view("other", 10, t0())
    );
    let next = restored.feedback("app", &url(3), true, t0()).unwrap();
    assert_eq!(next.score, 5);
    let still = restored.feedback("app", &url(5), true, t0()).unwrap();
    assert!(still.is_banned);
    assert_eq!(still.banned_until, banned.banned_until);
    // The ban count survived: the next ban doubles.
    restored.replace_active(vec![proxy(5)]);
    let after = banned.banned_until.unwrap();
    let next_ban = fail_until_banned(&restored, "app", 5, after);
    assert_eq!((next_ban.banned_until.unwrap() - after).num_minutes(), 60);
}

#[test]
fn restore_ages_out_idle_entries() {
    let state = state_with(scoring(), 5);
    let old = t0() - chrono::Duration::days(8);
    state.feedback("app", &url(1), true, old).unwrap();
    state
        .feedback("app", &url(2), true, t0() - chrono::Duration::days(6))
        .unwrap();
    let mut data = state.snapshot_data(t0());
    // The stats alone: the active set would make its proxies known anyway.
    data.active.clear();
    let restored = State::new(&scoring());
    let report = restored.restore(data, t0());
    assert_eq!((report.entries, report.aged_out), (1, 1));
    assert_eq!(
        restored.feedback("app", &url(1), true, t0()),
        Err(FeedbackError::UnknownProxy),
        "a proxy known only through aged-out stats is forgotten"
    );
    assert!(restored.feedback("app", &url(2), true, t0()).is_ok());
}

#[test]
fn restore_skips_entries_with_bad_urls() {
    let mut data = State::new(&scoring()).snapshot_data(t0());
    data.urls = vec!["garbage".into()];
    data.sources = vec![SourceSnapshot {
        name: "app".into(),
        requests: 0,
        feedbacks: 0,
        entries: vec![
            EntrySnapshot {
                url: 0,
                score: 1,
                success_count: 1,
                failure_count: 0,
                banned_until_ms: None,
                ban_count: 0,
                last_used_ms: millis(t0()),
                discounted: None,
            },
            EntrySnapshot {
                url: 99,
                score: 1,
                success_count: 1,
                failure_count: 0,
                banned_until_ms: None,
                ban_count: 0,
                last_used_ms: millis(t0()),
                discounted: None,
            },
        ],
    }];
    let state = State::new(&scoring());
    let report = state.restore(data, t0());
    assert_eq!((report.entries, report.invalid), (0, 2));
}

#[test]
fn sources_do_not_block_each_other_and_stay_consistent() {
    let state = Arc::new(state_with(scoring(), 2000));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                let source = format!("s{t}");
                for i in 0..2000 {
                    let pick = pick_one(&state, &source, &PickQuery::default());
                    state
                        .feedback(&source, &pick.url, i % 3 != 0, t0())
                        .unwrap();
                    if t == 0 && i % 500 == 0 {
                        state.apply_changes(vec![proxy(5000 + i)], vec![i]);
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    state.registry.read().assert_consistent();
    for handle in state.sources.read().values() {
        handle.lock().assert_consistent();
    }
    assert_eq!(state.summary(t0()).feedbacks, 8000);
}

#[test]
fn latency_histogram_counts_each_active_proxy_once_by_its_bucket() {
    let state = State::new(&scoring());
    let latencies = [Some(50), Some(100), Some(101), Some(900), None];
    let proxies = latencies
        .iter()
        .enumerate()
        .map(|(i, latency)| ActiveProxy {
            exit_ip: None,
            latency_ms: *latency,
            ..proxy(i as i64 + 1)
        })
        .collect();
    state.replace_active(proxies);
    assert_eq!(state.latency_histogram(&[100, 500]), vec![2, 1, 2]);
    state.apply_changes(Vec::new(), vec![1]);
    assert_eq!(state.latency_histogram(&[100, 500]), vec![1, 1, 2]);
}

fn active_ids(state: &State) -> Vec<i64> {
    let registry = state.registry.read();
    registry.assert_consistent();
    registry.active_proxies().iter().map(|p| p.id).collect()
}

/// Regression: the memory sync read the table, the validator then
/// deactivated one proxy and activated another, and the sync's older read
/// undid both for a whole sync interval.
#[test]
fn a_sync_never_reverts_a_validator_change_newer_than_its_read() {
    let state = state_with(scoring(), 10);
    let revalidated = |id| ActiveProxy {
        exit_ip: None,
        latency_ms: Some(50),
        ..proxy(id)
    };
    let mark = state.sync_mark();
    // The read: every row revalidated elsewhere, 5 found dead.
    let read_before_the_changes: Vec<ActiveProxy> =
        (0..10).filter(|&id| id != 5).map(revalidated).collect();
    // Then the validator wrote and applied: 3 dead, 5 alive again.
    state.apply_changes(Vec::new(), vec![3]);
    state.apply_changes(vec![proxy(5)], Vec::new());
    let report = state.sync_active(read_before_the_changes, mark);
    assert_eq!(report.kept_newer, 2);
    assert_eq!(active_ids(&state), [0, 1, 2, 4, 5, 6, 7, 8, 9]);

    // The next sync's read shows the changes.
    let mark = state.sync_mark();
    let table: Vec<ActiveProxy> = (0..10).filter(|&id| id != 3).map(revalidated).collect();
    let report = state.sync_active(table.clone(), mark);
    assert_eq!(report.kept_newer, 0);
    assert_eq!(active_ids(&state), [0, 1, 2, 4, 5, 6, 7, 8, 9]);
    assert_eq!(state.registry.read().active_proxies(), table);

    // A read taken after a change is the newer word: another instance
    // reactivated 3, and the table says so.
    state.apply_changes(Vec::new(), vec![4]);
    let mark = state.sync_mark();
    let table: Vec<ActiveProxy> = (0..10).map(revalidated).collect();
    let report = state.sync_active(table, mark);
    assert_eq!((report.activated, report.kept_newer), (2, 0));
    assert_eq!(active_ids(&state), (0..10).collect::<Vec<_>>());
}

#[test]
fn a_sync_applies_only_what_changed_in_the_table() {
    let state = state_with(scoring(), 5000);
    let report = state.replace_active((0..5000).map(proxy).collect());
    assert_eq!(report, SyncReport::default());
    let faster = ActiveProxy {
        exit_ip: None,
        latency_ms: Some(7),
        ..proxy(42)
    };
    let table: Vec<ActiveProxy> = (0..5000)
        .filter(|&id| id != 9)
        .map(|id| if id == 42 { faster.clone() } else { proxy(id) })
        .collect();
    let report = state.replace_active(table);
    assert_eq!((report.activated, report.deactivated), (1, 1));
    let registry = state.registry.read();
    let active = registry.active_proxies();
    assert_eq!(active.len(), 4999);
    assert!(active.contains(&faster));
}

/// Whatever the validator did before a sync's mark, the sync leaves exactly
/// the table's rows active.
#[test]
fn after_a_sync_the_active_set_is_the_table_read() {
    let mut rng = fastrand::Rng::with_seed(5);
    let state = State::new(&scoring());
    for round in 0..60 {
        for _ in 0..rng.usize(0..4) {
            let up: Vec<ActiveProxy> = (0..rng.usize(0..30))
                .map(|_| proxy(rng.i64(0..3000)))
                .collect();
            let down: Vec<i64> = (0..rng.usize(0..30)).map(|_| rng.i64(0..3000)).collect();
            state.apply_changes(up, down);
        }
        let mut table = Vec::new();
        for id in 0..3000 {
            if rng.bool() {
                table.push(ActiveProxy {
                    exit_ip: None,
                    latency_ms: Some(rng.u32(1..5)),
                    ..proxy(id)
                });
            }
        }
        state.replace_active(table.clone());
        assert_eq!(
            state.registry.read().active_proxies(),
            table,
            "round {round}"
        );
    }
    state.registry.read().assert_consistent();
}

fn source_names(state: &State) -> Vec<String> {
    let mut names: Vec<String> = state.sources.read().keys().cloned().collect();
    names.sort();
    names
}

#[test]
fn a_refused_get_proxy_creates_no_source() {
    let empty = State::new(&scoring());
    let err = empty
        .get_proxy("never", &PickQuery::default(), t0())
        .unwrap_err();
    assert_eq!(err.reason, NoProxyReason::NoActive);
    let state = state_with(scoring(), 10);
    let nowhere = PickQuery {
        country: Some("JP".into()),
        ..PickQuery::default()
    };
    let err = state.get_proxy("nowhere", &nowhere, t0()).unwrap_err();
    assert_eq!(err.reason, NoProxyReason::NoMatch);
    assert!(source_names(&empty).is_empty());
    assert!(source_names(&state).is_empty());
    pick_one(&state, "served", &PickQuery::default());
    assert_eq!(source_names(&state), ["served"]);
    assert_eq!(state.source_view("served", 1, t0()).unwrap().requests, 1);
}

#[test]
fn past_max_sources_new_names_are_refused_and_known_ones_served() {
    let state = State::new(&scoring()).with_max_sources(3);
    state.replace_active((0..10).map(proxy).collect());
    for name in ["a", "b", "c"] {
        pick_one(&state, name, &PickQuery::default());
    }
    let err = state
        .get_proxy("d", &PickQuery::default(), t0())
        .unwrap_err();
    assert_eq!(
        err.reason,
        NoProxyReason::TooManySources(TooManySources { max_sources: 3 })
    );
    assert_eq!(
        state.feedback("d", &url(1), true, t0()),
        Err(FeedbackError::TooManySources(TooManySources {
            max_sources: 3
        }))
    );
    pick_one(&state, "a", &PickQuery::default());
    assert!(state.feedback("b", &url(1), true, t0()).is_ok());
    assert_eq!(source_names(&state), ["a", "b", "c"]);
}

#[test]
fn sources_without_stats_go_after_a_week_without_requests() {
    let state = state_with(scoring(), 10);
    pick_one(&state, "once", &PickQuery::default());
    pick_one(&state, "with-stats", &PickQuery::default());
    let later = t0() + chrono::Duration::days(6);
    state.feedback("with-stats", &url(1), true, later).unwrap();
    state
        .get_proxy("recent", &PickQuery::default(), later)
        .unwrap();
    state.drop_idle(later);
    assert_eq!(source_names(&state), ["once", "recent", "with-stats"]);
    let week = chrono::Duration::from_std(STATS_MAX_IDLE).unwrap();
    state.drop_idle(t0() + week + chrono::Duration::seconds(1));
    assert_eq!(source_names(&state), ["recent", "with-stats"]);
    // Its stats aged out too: then it goes as well.
    state.drop_idle(later + week + chrono::Duration::days(1));
    assert!(source_names(&state).is_empty());
}

/// A proxy with everything get-proxy shows set, credentials included.
fn detailed_proxy(id: i64) -> ActiveProxy {
    let mut key = ProxyKey::new(Protocol::Socks5, "192.0.2.7".parse().unwrap(), 1080);
    key.username = Some("us er".into());
    key.password = Some("p@ss".into());
    ActiveProxy {
        exit_ip: None,
        id,
        key,
        latency_ms: Some(321),
        anonymity: Some(Anonymity::Anonymous),
        country: Some("DE".into()),
        supports_https: Some(true),
        last_validated_at: Some(t0() - chrono::Duration::minutes(10)),
        anonymity_evidence: Some("Via: 1.1 squid".into()),
    }
}

fn through_the_file(data: &SnapshotData) -> SnapshotData {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stats.bin");
    snapshot::write_atomic(&path, data).unwrap();
    match snapshot::load(&path).unwrap() {
        Loaded::Loaded(loaded) => loaded,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

#[test]
fn a_snapshots_active_set_is_served_as_it_was() {
    let state = state_with(scoring(), 3);
    state.apply_changes(vec![detailed_proxy(7)], vec![0]);
    let query = PickQuery {
        protocol: Some(Protocol::Socks5),
        https_only: true,
        country: Some("de".into()),
        anonymity: Some(Anonymity::Anonymous),
        max_latency_ms: Some(400),
        ..PickQuery::default()
    };
    let before = pick_one(&state, "app", &query);
    let data = through_the_file(&state.snapshot_data(t0()));

    let restored = State::new(&scoring());
    let report = restored.restore(data, t0() + chrono::Duration::minutes(5));
    assert_eq!(report.active, 3);
    assert_eq!(report.taken_at, t0());
    assert_eq!(restored.active_count(), 3);
    assert_eq!(
        restored.registry.read().active_proxies(),
        state.registry.read().active_proxies()
    );
    restored.registry.read().assert_consistent();
    assert_eq!(pick_one(&restored, "app", &query), before);
    assert_eq!(before.url, "socks5://us%20er:p%40ss@192.0.2.7:1080");
    // Served proxies take feedback.
    assert!(restored.feedback("app", &before.url, true, t0()).is_ok());
}

#[test]
fn a_snapshots_active_proxies_checked_too_long_ago_are_left_out() {
    let state = State::new(&scoring());
    let checked = |id: i64, ago: chrono::Duration| ActiveProxy {
        exit_ip: None,
        last_validated_at: Some(t0() - ago),
        ..proxy(id)
    };
    state.replace_active(vec![
        checked(1, chrono::Duration::hours(23)),
        checked(2, chrono::Duration::hours(25)),
        ActiveProxy {
            exit_ip: None,
            last_validated_at: None,
            ..proxy(3)
        },
    ]);
    let data = state.snapshot_data(t0());

    let restored = State::new(&scoring());
    let report = restored.restore(data.clone(), t0());
    assert_eq!((report.active, report.active_stale), (1, 2));
    assert_eq!(pick_one(&restored, "app", &PickQuery::default()).id, 1);

    let longer =
        State::new(&scoring()).with_active_snapshot_max_age(Duration::from_secs(26 * 3600));
    assert_eq!(longer.restore(data, t0()).active, 2);
}

#[test]
fn the_bound_on_a_snapshots_active_set_is_a_day_or_two_revalidations() {
    let day = Duration::from_secs(24 * 3600);
    assert_eq!(active_snapshot_max_age(Duration::from_secs(1800)), day);
    assert_eq!(active_snapshot_max_age(day), 2 * day);
    assert_eq!(active_snapshot_max_age(Duration::MAX), Duration::MAX);
}

#[test]
fn the_databases_first_load_replaces_a_snapshots_active_set() {
    let state = state_with(scoring(), 4);
    let data = state.snapshot_data(t0());
    let restored = State::new(&scoring());
    assert_eq!(restored.restore(data, t0()).active, 4);

    // The database holds 2 (changed) and 3 of them, and 9 the snapshot lacks.
    let moved = ActiveProxy {
        exit_ip: None,
        country: Some("JP".into()),
        ..proxy(2)
    };
    let mark = restored.sync_mark();
    let report = restored.sync_active(vec![moved.clone(), proxy(3), proxy(9)], mark);
    assert_eq!(report.deactivated, 2);
    assert_eq!(
        restored.registry.read().active_proxies(),
        vec![moved, proxy(3), proxy(9)]
    );
    restored.registry.read().assert_consistent();
}

#[test]
fn a_snapshots_active_set_never_overrides_a_database_load() {
    let data = state_with(scoring(), 4).snapshot_data(t0());
    let state = State::new(&scoring());
    let mark = state.sync_mark();
    state.sync_active(vec![proxy(9)], mark);
    let report = state.restore(data, t0());
    assert_eq!((report.active, report.active_superseded), (0, 4));
    assert_eq!(state.registry.read().active_proxies(), vec![proxy(9)]);
}

#[test]
fn a_database_load_of_nothing_empties_a_snapshots_active_set() {
    let data = state_with(scoring(), 4).snapshot_data(t0());
    let state = State::new(&scoring());
    state.restore(data, t0());
    let mark = state.sync_mark();
    state.sync_active(Vec::new(), mark);
    assert_eq!(state.active_count(), 0);
    assert_eq!(
        state.get_proxy("app", &PickQuery::default(), t0()),
        Err(NoProxy {
            reason: NoProxyReason::NoActive,
            retry_after: None
        })
    );
}

#[test]
fn a_stats_only_snapshot_restores_no_active_proxy() {
    let state = state_with(scoring(), 4);
    raise(&state, "app", 1, 2);
    let mut data = state.snapshot_data(t0());
    data.active.clear();
    let restored = State::new(&scoring());
    let report = restored.restore(through_the_file(&data), t0());
    assert_eq!((report.entries, report.active), (1, 0));
    assert_eq!(restored.active_count(), 0);
    let view = restored.source_view("app", 10, t0()).unwrap();
    assert!(!view.entries[0].active);
}
