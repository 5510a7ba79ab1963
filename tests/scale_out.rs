//! Several instances on one database: validation leases split each cycle's
//! due proxies so none is checked twice, a killed instance's leases are taken
//! over, and each list is fetched once per interval by the whole fleet.

mod support;

use std::time::{Duration, Instant};

use proxy_pool::farm::{Farm, FarmSpec, Mix};
use support::*;

fn instance_config(db: &TestDb, farm: &Farm, fetch_interval: u64) -> String {
    config_text(
        &db.url,
        &format!(
            "[server]\nbind = 127.0.0.1:0\n\
             [fetcher]\nsource_urls = {list}\ninterval_seconds = {fetch_interval}\nallow_private_addresses = true\n\
             [validator]\nvalidation_target = {judge}\nvalidation_timeout_ms = 1000\nconnect_timeout_ms = 500\nvalidation_workers = 20\n\
             [scheduler]\ninterval_seconds = 1\n\
             [state]\nsync_interval_seconds = 1\n",
            list = farm.list_url("schemes"),
            judge = farm.judge_url(),
        ),
    )
}

fn checked_counts(db: &TestDb) -> Vec<(String, i32, Option<chrono::DateTime<chrono::Utc>>)> {
    db.client()
        .query(
            "SELECT host(ip) || ':' || port, check_count, last_validated_at FROM proxies ORDER BY id",
            &[],
        )
        .unwrap_or_default()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn all_validated(db: &TestDb, total: usize) -> bool {
    let rows = checked_counts(db);
    rows.len() == total && rows.iter().all(|(_, _, at)| at.is_some())
}

#[test]
fn three_instances_check_every_due_proxy_exactly_once() {
    let farm = Farm::start(FarmSpec::mix(120, &Mix::default())).unwrap();
    let db = TestDb::new();
    let config = instance_config(&db, &farm, 300);
    let services: Vec<Service> = (0..3).map(|_| Service::start(&config)).collect();
    wait_for("every proxy validated", Duration::from_secs(60), || {
        all_validated(&db, farm.manifest().len())
    });
    // Give the fleet a few more ticks: nothing is due again for 30 minutes.
    std::thread::sleep(Duration::from_secs(2));
    for (proxy, check_count, _) in checked_counts(&db) {
        assert_eq!(check_count, 1, "{proxy} checked {check_count} times");
    }
    // The farm saw each proxy once: alive ones twice (the absolute-URI check,
    // then the CONNECT check), black holes once, dead ones never.
    for entry in farm.manifest() {
        let expected = match (entry.alive, entry.behaviour.name()) {
            (true, _) => 2,
            (false, "black_hole") => 1,
            (false, _) => 0,
        };
        assert_eq!(
            farm.hits(entry.index),
            expected,
            "{} ({}) hit {} times",
            entry.host_port(),
            entry.behaviour.name(),
            farm.hits(entry.index)
        );
    }
    // One instance fetched the list; the others found it fetched this interval.
    assert_eq!(farm.list_hits("schemes"), 1);
    drop(services);
}

#[test]
fn a_killed_instance_loses_no_proxy_its_leases_are_taken_over() {
    let farm = Farm::start(FarmSpec::mix(200, &Mix::default())).unwrap();
    let db = TestDb::new();
    let config = instance_config(&db, &farm, 300);
    let mut doomed = Service::start(&config);
    // Wait until the doomed instance holds leases mid-cycle, then kill it.
    wait_for("a cycle in progress", Duration::from_secs(30), || {
        // The table appears when the instance has migrated.
        let leased = db
            .client()
            .query_one(
                "SELECT count(*) FROM proxies WHERE lease_until > now()",
                &[],
            )
            .map(|row| row.get::<_, i64>(0))
            .unwrap_or(0);
        leased > 0
    });
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();
    let orphaned: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM proxies WHERE lease_until > now() AND last_validated_at IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        orphaned > 0,
        "the instance died holding no lease: the test proves nothing"
    );
    let started = Instant::now();
    let survivors: Vec<Service> = (0..2).map(|_| Service::start(&config)).collect();
    // Lease = 4 × timeout + 5 s = 9 s; then the survivors take the rest.
    wait_for(
        "every proxy validated by the survivors",
        Duration::from_secs(60),
        || all_validated(&db, farm.manifest().len()),
    );
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "leases were not respected"
    );
    for (proxy, check_count, _) in checked_counts(&db) {
        assert!(check_count >= 1, "{proxy} never checked");
    }
    drop(survivors);
}

#[test]
fn the_fleet_fetches_each_list_once_per_interval() {
    let farm = Farm::start(FarmSpec::mix(10, &Mix::default())).unwrap();
    let db = TestDb::new();
    let config = instance_config(&db, &farm, 3);
    let started = Instant::now();
    let services: Vec<Service> = (0..3).map(|_| Service::start(&config)).collect();
    wait_for("several intervals", Duration::from_secs(60), || {
        started.elapsed() >= Duration::from_secs(10)
    });
    let hits = farm.list_hits("schemes");
    drop(services);
    let elapsed = started.elapsed().as_secs_f64();
    // Every instance fetches at start and each interval; together once per
    // interval (with at most one extra for the start-up round).
    let most = (elapsed / 3.0).ceil() as u64 + 1;
    assert!(
        hits >= 2,
        "the list was fetched {hits} times in {elapsed:.1} s"
    );
    assert!(
        hits <= most,
        "the list was fetched {hits} times in {elapsed:.1} s by 3 instances: at most {most} expected"
    );
}
