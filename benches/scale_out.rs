//! Scale-out benchmark: the time for a fleet of 1, 2 and 3 instances on one
//! database to validate 5,000 farm proxies (50% alive at 50-500 ms, 30% dead,
//! 20% black holes), each instance with 100 validation workers and a 2 s
//! timeout. Needs DATABASE_URL (scripts/bench.sh provides it). The farm runs
//! in this process; the instances are the release binary.
//!
//! The timer excludes process start-up: the instances start with the judge
//! down (their start-up cycles are skipped), and once all of them listen the
//! judge comes back and each is asked for a cycle (`POST /admin/validate`).
//! The figure is from that moment to the last result written, the latest
//! `last_validated_at` (the database runs on this machine, same clock).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use chrono::{DateTime, Utc};

use proxy_farm::{Farm, FarmSpec, Mix};
use proxy_pool::config::DatabaseConfig;
use proxy_pool::store::Store;

const PROXIES: usize = 5_000;
const WORKERS: usize = 100;

fn main() {
    if std::env::var_os("DATABASE_URL").is_none() {
        eprintln!("scale-out benchmark skipped: DATABASE_URL is not set (run scripts/bench.sh)");
        return;
    }
    let farm = Farm::start(FarmSpec::mix(PROXIES, &Mix::default())).expect("farm");
    let keys: Vec<_> = farm.manifest().iter().map(|e| e.key()).collect();
    println!("scale-out: {PROXIES} proxies, {WORKERS} workers per instance, timeout 2 s");
    let mut one_instance = None;
    for instances in 1..=3 {
        let db = support::TestDb::new();
        let store = Store::connect(&DatabaseConfig {
            url: proxy_pool::secret::SecretUrl::new(db.url.clone()),
            pool_size: 2,
            checkout_timeout: Duration::from_secs(30),
        })
        .expect("store");
        store.migrate().expect("migrate");
        store.upsert_listed("bench", &keys).expect("upsert");
        let config = support::config_text(
            &db.url,
            &format!(
                "[server]\nbind = 127.0.0.1:0\n\
                 [fetcher]\nsource_urls = {}\ninterval_seconds = 3600\nallow_private_addresses = true\n\
                 [validator]\nvalidation_target = {}\nhttps_target =\nvalidation_timeout_ms = 2000\nconnect_timeout_ms = 2000\nvalidation_workers = {WORKERS}\n\
                 [scheduler]\ninterval_seconds = 3600\n",
                farm.list_url("error500"),
                farm.judge_url()
            ),
        );
        farm.set_judge_down(true);
        let services: Vec<_> = (0..instances)
            .map(|_| support::Service::start(&config))
            .collect();
        farm.set_judge_down(false);
        let started = Utc::now();
        for service in &services {
            let answer = support::post(&service.url("/admin/validate"), "");
            assert_eq!(answer.status, 202, "{}", answer.body);
        }
        let mut client = db.client();
        support::wait_for(
            "the fleet to validate every proxy",
            Duration::from_secs(600),
            || {
                let left: i64 = client
                    .query_one(
                        "SELECT count(*) FROM proxies WHERE last_validated_at IS NULL",
                        &[],
                    )
                    .map(|r| r.get(0))
                    .unwrap_or(1);
                left == 0
            },
        );
        let last: DateTime<Utc> = client
            .query_one("SELECT max(last_validated_at) FROM proxies", &[])
            .expect("last result")
            .get(0);
        let elapsed = (last - started).to_std().unwrap_or_default();
        let checks: i64 = client
            .query_one("SELECT sum(check_count) FROM proxies", &[])
            .map(|r| r.get::<_, Option<i64>>(0).unwrap_or(0))
            .unwrap_or(0);
        drop(services);
        let baseline = *one_instance.get_or_insert(elapsed);
        println!(
            "  {instances} instance(s): {:>6.1} s  ({:.2}x the single instance, {checks} checks for {PROXIES} proxies)",
            elapsed.as_secs_f64(),
            elapsed.as_secs_f64() / baseline.as_secs_f64()
        );
    }
}
