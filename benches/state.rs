//! Hot-path figures of the state manager at the target scale: 100,000 active
//! proxies, 100 sources, 1,000,000 per-source stats entries.

use std::hint::black_box;

use chrono::{DateTime, TimeZone, Utc};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

use proxy_pool::config::ScoringConfig;
use proxy_pool::proxy::{ActiveProxy, Anonymity, Protocol, ProxyKey};
use proxy_pool::snapshot::{self, EntrySnapshot, Loaded, SnapshotData, SourceSnapshot};
use proxy_pool::state::{PickQuery, State};

const PROXIES: usize = 100_000;
const SOURCES: usize = 100;
const ENTRIES_PER_SOURCE: usize = 10_000;
const COUNTRIES: [&str; 50] = [
    "US", "DE", "FR", "JP", "GB", "NL", "RU", "CN", "BR", "IN", "ID", "VN", "TH", "KR", "SG", "CA",
    "MX", "AR", "CO", "CL", "PE", "ES", "IT", "PL", "UA", "TR", "IR", "EG", "ZA", "NG", "KE", "BD",
    "PK", "PH", "MY", "AU", "NZ", "SE", "NO", "FI", "DK", "CZ", "RO", "HU", "BG", "GR", "PT", "AT",
    "CH", "BE",
];

fn scoring() -> ScoringConfig {
    ScoringConfig::defaults()
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap()
}

fn proxies(rng: &mut fastrand::Rng) -> Vec<ActiveProxy> {
    (0..PROXIES)
        .map(|i| {
            let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
            let protocol = Protocol::ALL[rng.usize(..4)];
            ActiveProxy {
                exit_ip: None,
                id: i as i64,
                key: ProxyKey::new(protocol, ip.parse().unwrap(), 1000 + (i % 50_000) as u16),
                latency_ms: Some(rng.u32(50..5000)),
                anonymity: Some(
                    [
                        Anonymity::Elite,
                        Anonymity::Anonymous,
                        Anonymity::Transparent,
                    ][rng.usize(..3)],
                ),
                country: Some(COUNTRIES[rng.usize(..COUNTRIES.len())].into()),
                supports_https: Some(rng.bool()),
                last_validated_at: Some(now()),
                anonymity_evidence: None,
            }
        })
        .collect()
}

/// 10,000 entries per source, scores spread over the whole range, about 2%
/// banned.
fn stats(active: &[ActiveProxy], rng: &mut fastrand::Rng) -> SnapshotData {
    let now_ms = now().timestamp_millis();
    let sources = (0..SOURCES)
        .map(|s| {
            let mut slots: Vec<u32> = (0..PROXIES as u32).collect();
            rng.shuffle(&mut slots);
            let entries = slots[..ENTRIES_PER_SOURCE]
                .iter()
                .map(|&url| {
                    let banned = rng.u8(..100) < 2;
                    EntrySnapshot {
                        url,
                        score: if banned { -20 } else { rng.i32(-15..=60) },
                        success_count: rng.u64(..100),
                        failure_count: rng.u64(..20),
                        banned_until_ms: banned.then(|| now_ms + rng.i64(1..3_600_000)),
                        ban_count: u32::from(banned),
                        last_used_ms: now_ms - rng.i64(0..86_400_000),
                        discounted: None,
                    }
                })
                .collect();
            SourceSnapshot {
                name: format!("source_{s}"),
                requests: 0,
                feedbacks: 0,
                entries,
            }
        })
        .collect();
    SnapshotData {
        taken_at_ms: now_ms,
        urls: active.iter().map(|proxy| proxy.key.url()).collect(),
        sources,
        active: Vec::new(),
    }
}

fn bench(c: &mut Criterion) {
    let mut rng = fastrand::Rng::with_seed(42);
    let active = proxies(&mut rng);
    let data = stats(&active, &mut rng);
    let urls = data.urls.clone();
    let before = resident_kib();
    let state = State::new(&scoring());
    state.replace_active(active);
    state.restore(data.clone(), now());
    if let (Some(before), Some(after)) = (before, resident_kib()) {
        eprintln!(
            "resident memory of the state: about {} MiB ({} KiB before, {} KiB after)",
            after.saturating_sub(before) / 1024,
            before,
            after
        );
    }
    let names: Vec<String> = (0..SOURCES).map(|s| format!("source_{s}")).collect();

    let plain = PickQuery::default();
    c.bench_function("get_proxy/no_filter", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            black_box(state.get_proxy(&names[i % SOURCES], &plain, now()).unwrap())
        })
    });
    let by_country: Vec<PickQuery> = COUNTRIES
        .iter()
        .map(|country| PickQuery {
            country: Some((*country).into()),
            ..PickQuery::default()
        })
        .collect();
    c.bench_function("get_proxy/country", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            let query = &by_country[i % by_country.len()];
            black_box(state.get_proxy(&names[i % SOURCES], query, now()).unwrap())
        })
    });
    // The same from one busy source, whose index stays in cache.
    c.bench_function("get_proxy/country_one_source", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            let query = &by_country[i % by_country.len()];
            black_box(state.get_proxy(&names[0], query, now()).unwrap())
        })
    });
    let https_elite = PickQuery {
        https_only: true,
        anonymity: Some(Anonymity::Elite),
        max_latency_ms: Some(1000),
        count: 10,
        ..PickQuery::default()
    };
    c.bench_function("get_proxy/https_elite_fast_count10", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            black_box(
                state
                    .get_proxy(&names[i % SOURCES], &https_elite, now())
                    .unwrap(),
            )
        })
    });
    c.bench_function("feedback", |b| {
        let mut rng = fastrand::Rng::with_seed(7);
        b.iter(|| {
            let url = &urls[rng.usize(..urls.len())];
            let source = &names[rng.usize(..SOURCES)];
            black_box(
                state
                    .feedback(source, url, rng.u8(..10) < 8, now())
                    .unwrap(),
            )
        })
    });

    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    group.bench_function("snapshot_data", |b| {
        b.iter(|| black_box(state.snapshot_data(now())))
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stats.bin");
    // The stats and the whole active set.
    let copy = state.snapshot_data(now());
    group.bench_function("encode_write", |b| {
        b.iter(|| black_box(snapshot::write_atomic(&path, &copy).unwrap()))
    });
    // The same without the active set (what a version 1 file held), to
    // show what the active set costs under the same conditions.
    let stats_only = SnapshotData {
        active: Vec::new(),
        ..copy.clone()
    };
    group.bench_function("encode_write_stats_only", |b| {
        b.iter(|| black_box(snapshot::write_atomic(&path, &stats_only).unwrap()))
    });
    drop(stats_only);
    let info = snapshot::write_atomic(&path, &copy).unwrap();
    eprintln!(
        "snapshot file: {} bytes, {} entries, {} active proxies",
        info.bytes, info.entries, info.active
    );
    // A start-up: a fresh state takes the stats and the active set.
    group.bench_function("load_restore", |b| {
        b.iter_batched(
            || State::new(&scoring()),
            |fresh| {
                let Loaded::Loaded(data) = snapshot::load(&path).unwrap() else {
                    panic!("the snapshot was just written");
                };
                black_box(fresh.restore(data, now()));
                fresh
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// VmRSS from /proc (Linux), to show what the state itself costs.
fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

criterion_group!(benches, bench);
criterion_main!(benches);
