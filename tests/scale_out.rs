//! Several instances on one database: validation leases split each cycle's
//! due proxies so none is checked twice, a killed instance's leases are taken
//! over, and each list is fetched once per interval by the whole fleet.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use proxy_farm::{Farm, FarmSpec, ManifestEntry, Mix};
use support::*;

fn instance_config(db: &TestDb, farm: &Farm, fetch_interval: u64) -> String {
    config_text(
        &db.url,
        &format!(
            "[server]\nbind = 127.0.0.1:0\n\
             [fetcher]\nsource_urls = {list}\ninterval_seconds = {fetch_interval}\nallow_private_addresses = true\n\
             [validator]\nvalidation_target = {judge}\nhttps_target =\nvalidation_timeout_ms = 1000\nconnect_timeout_ms = 500\nvalidation_workers = 20\n\
             [scheduler]\ninterval_seconds = 1\n\
             [state]\nsync_interval_seconds = 1\n",
            list = farm.list_url("schemes"),
            judge = farm.judge_url(),
        ),
    )
}

/// One row of the table, by the farm address it was listed with.
struct Checked {
    host_port: String,
    check_count: i32,
    last_validated_at: Option<DateTime<Utc>>,
}

fn checked_rows(db: &TestDb) -> BTreeMap<String, Checked> {
    db.client()
        .query(
            "SELECT host(ip) || ':' || port, check_count, last_validated_at FROM proxies",
            &[],
        )
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let checked = Checked {
                host_port: r.get(0),
                check_count: r.get(1),
                last_validated_at: r.get(2),
            };
            (checked.host_port.clone(), checked)
        })
        .collect()
}

fn all_validated(db: &TestDb, total: usize) -> bool {
    let rows = checked_rows(db);
    rows.len() == total && rows.values().all(|row| row.last_validated_at.is_some())
}

/// The connections one check of `entry` opens at the farm: an alive http
/// proxy is asked twice (the absolute-URI request, then the CONNECT check),
/// a black hole once (it accepts, then says nothing), a dead one never (it
/// refuses).
fn one_check_hits(entry: &ManifestEntry) -> u64 {
    match (entry.alive, entry.behaviour.name()) {
        (true, _) => 2,
        (false, "black_hole") => 1,
        (false, _) => 0,
    }
}

/// Proxies an instance's cycles checked, from its cycle summary lines.
fn checked_by(service: &Service) -> u64 {
    let pattern = regex::Regex::new(r"validation cycle: \d+ due, (\d+) checked").unwrap();
    service
        .log_text()
        .lines()
        .filter_map(|line| pattern.captures(line))
        .map(|found| found[1].parse::<u64>().unwrap())
        .sum()
}

/// Starts `n` instances with the judge down, so that no cycle can start
/// (a cycle first asks the judge for our own address) until every instance
/// is up and the list is in the table; then brings the judge back, and the
/// instances' next ticks (1 s apart at most) start their cycles together.
fn start_fleet(farm: &Farm, db: &TestDb, config: &str, n: usize) -> Vec<Service> {
    farm.set_judge_down(true);
    let services: Vec<Service> = (0..n).map(|_| Service::start(config)).collect();
    wait_for("the list in the table", Duration::from_secs(30), || {
        checked_rows(db).len() == farm.manifest().len()
    });
    farm.set_judge_down(false);
    services
}

#[test]
fn three_instances_check_every_due_proxy_exactly_once() {
    let farm = Farm::start(FarmSpec::mix(600, &Mix::default())).unwrap();
    let db = TestDb::new();
    let config = instance_config(&db, &farm, 300);
    let services = start_fleet(&farm, &db, &config, 3);
    let total = farm.manifest().len() as u64;
    wait_for("every check logged", Duration::from_secs(120), || {
        services.iter().map(checked_by).sum::<u64>() >= total
    });
    // Each instance's share, from its own cycle summaries: together one
    // check per proxy, and each of the three took part.
    let shares: Vec<u64> = services.iter().map(checked_by).collect();
    assert_eq!(shares.iter().sum::<u64>(), total, "shares {shares:?}");
    assert!(shares.iter().all(|&n| n > 0), "shares {shares:?}");
    // One result written per proxy.
    let rows = checked_rows(&db);
    assert_eq!(rows.len() as u64, total);
    for row in rows.values() {
        assert_eq!(
            row.check_count, 1,
            "{} checked {} times",
            row.host_port, row.check_count
        );
    }
    // And the farm saw one check of each proxy: no instance checked a proxy
    // another one had (its result unwritten yet or not).
    for entry in farm.manifest() {
        assert_eq!(
            farm.hits(entry.index),
            one_check_hits(entry),
            "{} ({})",
            entry.host_port(),
            entry.behaviour.name()
        );
    }
    // One instance fetched the list; the others found it fetched this interval.
    assert_eq!(farm.list_hits("schemes"), 1);
}

/// What is asserted, and why. Killed with SIGKILL mid-cycle, an instance
/// leaves rows it claimed without a result: the ones it was checking (the
/// farm saw those checks) and the ones waiting for a worker. Their leases
/// keep them from the survivors until they expire; then the survivors check
/// them. So:
/// - no proxy is lost: every row gets a result;
/// - every row gets exactly one result (`check_count` = 1): a killed
///   instance writes nothing after its death, and a lease is never taken
///   over while it runs;
/// - an orphaned row (leased at the kill, validated only once its lease had
///   expired) was seen by the farm once or twice: twice when the killed
///   instance's check of it was in flight;
/// - every other row was seen by the farm exactly once.
#[test]
fn a_killed_instance_loses_no_proxy_its_leases_are_taken_over() {
    let farm = Farm::start(FarmSpec::mix(600, &Mix::default())).unwrap();
    let db = TestDb::new();
    let config = instance_config(&db, &farm, 300);
    let mut services = start_fleet(&farm, &db, &config, 3);
    let mut doomed = services.remove(0);
    wait_for(
        "the doomed instance in mid-cycle",
        Duration::from_secs(60),
        || {
            db.client()
                .query_one(
                    "SELECT count(*) FROM proxies WHERE last_validated_at IS NOT NULL",
                    &[],
                )
                .map(|row| row.get::<_, i64>(0) >= 60)
                .unwrap_or(false)
        },
    );
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();
    // The leases held at the kill (the survivors' and the dead one's), with
    // their expiry.
    let leased: BTreeMap<String, DateTime<Utc>> = db
        .client()
        .query(
            "SELECT host(ip) || ':' || port, lease_until FROM proxies
             WHERE lease_until > now() AND last_validated_at IS NULL",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    wait_for(
        "every proxy validated by the survivors",
        Duration::from_secs(120),
        || all_validated(&db, farm.manifest().len()),
    );
    let rows = checked_rows(&db);
    let mut orphans = 0;
    for entry in farm.manifest() {
        let row = &rows[&entry.host_port()];
        assert_eq!(
            row.check_count, 1,
            "{} checked {} times",
            row.host_port, row.check_count
        );
        let validated = row.last_validated_at.unwrap();
        let orphaned = leased
            .get(&row.host_port)
            .is_some_and(|&until| validated >= until);
        let one = one_check_hits(entry);
        let hits = farm.hits(entry.index);
        if orphaned {
            orphans += 1;
            assert!(
                (one..=2 * one).contains(&hits),
                "orphan {} ({}) hit {hits} times, one check is {one}",
                entry.host_port(),
                entry.behaviour.name()
            );
        } else {
            assert_eq!(
                hits,
                one,
                "{} ({})",
                entry.host_port(),
                entry.behaviour.name()
            );
        }
    }
    assert!(
        orphans > 0,
        "no row was taken over after its lease: the kill proves nothing"
    );
    assert_eq!(
        checked_by(&doomed),
        0,
        "the doomed instance finished its cycle"
    );
}

#[test]
fn the_fleet_fetches_each_list_once_per_interval() {
    let farm = Farm::start(FarmSpec::mix(10, &Mix::default())).unwrap();
    let db = TestDb::new();
    let interval = 3.0;
    let config = instance_config(&db, &farm, interval as u64);
    let started = Instant::now();
    let services: Vec<Service> = (0..3).map(|_| Service::start(&config)).collect();
    wait_for("several intervals", Duration::from_secs(60), || {
        started.elapsed() >= Duration::from_secs(10)
    });
    // Read together, so that the bound below is for this very span.
    let hits = farm.list_hits("schemes");
    let elapsed = started.elapsed().as_secs_f64();
    drop(services);
    // A fetch is claimed only when the last one is at least the interval
    // minus its slack (10%, for clock jitter) old, so fetches of the whole
    // fleet are at least 2.7 s apart: at most one more than the span holds.
    let most = (elapsed / (interval * 0.9)).floor() as u64 + 1;
    // Each instance fetches at start and on every tick of its own interval:
    // the fleet fetches at least once per interval.
    let least = (elapsed / interval).floor() as u64;
    assert!(
        (least..=most).contains(&hits),
        "the list was fetched {hits} times in {elapsed:.1} s by 3 instances: {least} to {most} expected"
    );
}
