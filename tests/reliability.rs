//! The service under faults: PostgreSQL stopped and restarted during a
//! fetch, during a validation cycle and at start-up (each test runs a
//! cluster of its own so that it may stop it); the process killed with
//! SIGKILL at random moments, snapshot writes included, and stopped with
//! SIGTERM under full load; and the validator and fetcher against hostile
//! proxies and lists (no thread left behind, every wait bounded).
//!
//! The kill loop runs `PROXY_POOL_KILL_LOOPS` iterations (default 50). The
//! outage during a validation cycle lasts a minute: the other tests run
//! meanwhile, so it adds about that much to the suite, not more.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use proxy_farm::{Behaviour, Farm, FarmSpec, ProxyGroup};
use proxy_pool::config::Config;
use proxy_pool::fetcher::{FetchKind, Fetcher};
use proxy_pool::health::Health;
use proxy_pool::shutdown::ShutdownSignal;
use proxy_pool::snapshot::{self, Loaded};
use proxy_pool::state::State;
use proxy_pool::store::{DuePolicy, Store};
use proxy_pool::validator::check::{CheckConfig, Checker};
use proxy_pool::validator::cycle::{Validator, ValidatorSettings};

use support::*;

/// Tests that count this process's threads take it for writing; every other
/// test takes it for reading, so that none of them starts threads meanwhile.
static THREADS: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    THREADS.read().unwrap_or_else(|e| e.into_inner())
}

/// A config for the service with short intervals; `extra` is appended.
fn service_config(database_url: &str, farm: &Farm, lists: &str, extra: &str) -> String {
    format!(
        "[database]\nurl = {database_url}\npool_size = 6\ncheckout_timeout_ms = 1000\n\
         [server]\nbind = 127.0.0.1:0\n\
         [fetcher]\nallow_private_addresses = true\ninterval_seconds = 2\ntimeout_ms = 5000\n\
         source_urls = {lists}\n\
         [validator]\nvalidation_target = {judge}\nhttps_target =\nvalidation_timeout_ms = 1000\n\
         connect_timeout_ms = 500\nvalidation_workers = 8\nrevalidate_after_seconds = 1\n\
         retry_inactive_after_seconds = 1\n\
         [scheduler]\ninterval_seconds = 2\n\
         [state]\nsync_interval_seconds = 1\nsnapshot_interval_seconds = 1\n\
         {extra}\n",
        judge = farm.judge_url()
    )
}

fn health(service: &Service) -> serde_json::Value {
    get(&service.url("/health")).json()
}

/// Counts every non-200 get-proxy answer while it runs (serving from memory
/// must not stop whatever the database does).
struct Prober {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    answers: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<Vec<String>>>,
}

impl Prober {
    fn start(url: String) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let answers = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, failures, answers) = (stop.clone(), failures.clone(), answers.clone());
            thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into();
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let outcome = agent.get(&url).call();
                    answers.fetch_add(1, Ordering::Relaxed);
                    let problem = match outcome {
                        Ok(answer) if answer.status() == 200 => None,
                        Ok(answer) => Some(format!("status {}", answer.status())),
                        Err(err) => Some(err.to_string()),
                    };
                    if let Some(problem) = problem {
                        failures.fetch_add(1, Ordering::Relaxed);
                        if seen.len() < 5 {
                            seen.push(problem);
                        }
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                seen
            })
        };
        Prober {
            stop,
            failures,
            answers,
            handle: Some(handle),
        }
    }

    /// Stops and asserts that every answer was a 200.
    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self
            .handle
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        let answers = self.answers.load(Ordering::Relaxed);
        assert!(answers > 20, "only {answers} probes");
        assert_eq!(
            self.failures.load(Ordering::Relaxed),
            0,
            "get-proxy failed while serving from memory: {seen:?}"
        );
    }
}

/// Cross-column invariants every row keeps if each result batch is written
/// by one statement; returns the offending rows.
fn inconsistent_rows(client: &mut postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT row_to_json(p)::text FROM proxies p
             WHERE (last_validated_at IS NULL) <> (check_count = 0)
                OR alive_count > check_count
                OR (is_active AND (latency_ms IS NULL OR last_validated_at IS NULL))
                OR (is_active AND alive_count = 0)
                OR last_seen_at < first_seen_at
             LIMIT 5",
            &[],
        )
        .expect("consistency query")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn count(client: &mut postgres::Client, query: &str) -> i64 {
    client
        .query_one(query, &[])
        .unwrap_or_else(|err| panic!("{query}: {err}"))
        .get(0)
}

// ---------------------------------------------------------------------------
// 1. PostgreSQL outages

/// Every proxy get-proxy hands `source` (the whole pool, when under 100).
fn served(service: &Service, source: &str) -> BTreeSet<String> {
    let answer = get(&service.url(&format!("/get-proxy?source={source}&count=100")));
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()["proxies"]
        .as_array()
        .expect("a proxies array")
        .iter()
        .map(|proxy| proxy["proxy"].as_str().expect("a proxy URL").to_string())
        .collect()
}

/// The URLs of the active rows, as get-proxy writes them.
fn active_in_database(client: &mut postgres::Client) -> BTreeSet<String> {
    client
        .query(
            "SELECT protocol || '://' || host(ip) || ':' || port FROM proxies WHERE is_active",
            &[],
        )
        .expect("active rows")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Guards start-up without a database: the service listens at once, serves
/// the active set of its last snapshot (get-proxy 200) while /health says
/// "degraded", logs the wait once, retries with backoff without spinning
/// (little CPU), and once PostgreSQL is up migrates, goes "ok" and serves
/// the database's active set in place of the snapshot's.
#[test]
fn a_database_down_at_start_up_is_waited_for_serving_the_snapshot() {
    let _guard = shared();
    let cluster = PgCluster::start();
    let farm = Farm::start(
        FarmSpec::new()
            .first_proxy_ip("127.11.0.1".parse().unwrap())
            .group(ProxyGroup::new(Behaviour::Elite, 4)),
    )
    .expect("farm");
    let list = farm.list_url("plain");

    // A first run validates the farm's proxies and snapshots them.
    let mut first = Service::start(&service_config(&cluster.url(), &farm, &list, ""));
    wait_for(
        "the farm's proxies fetched and validated",
        Duration::from_secs(60),
        || health(&first)["active_proxies"] == 4,
    );
    let snapshotted = served(&first, "first");
    assert_eq!(snapshotted.len(), 4, "{snapshotted:?}");
    assert_eq!(first.terminate(), 0, "{}", first.log_text());
    assert!(
        first.log_contains("entries, 4 active proxies"),
        "the shutdown snapshot holds the active set:\n{}",
        first.log_text()
    );
    let dir = first.take_dir();

    // While the service is stopped, the database changes: one proxy is
    // deactivated, another appears. Then it goes down.
    let gone = snapshotted.first().unwrap().clone();
    let added = "http://127.11.0.250:8080".to_string();
    {
        let mut client = cluster.client();
        // The cluster stops as a crash would: these changes must be in the
        // WAL before it stops (PgCluster commits synchronously; said here too
        // so that the test does not depend on it).
        client.batch_execute("SET synchronous_commit = on").unwrap();
        let (ip, port) = gone.trim_start_matches("http://").rsplit_once(':').unwrap();
        let updated = client
            .execute(
                "UPDATE proxies SET is_active = false
                 WHERE protocol = 'http' AND host(ip) = $1 AND port = $2",
                &[&ip, &port.parse::<i32>().unwrap()],
            )
            .unwrap();
        assert_eq!(updated, 1);
        client
            .execute(
                "INSERT INTO proxies (protocol, ip, port, is_active, latency_ms, anonymity,
                    last_validated_at, check_count, alive_count)
                 VALUES ('http', '127.11.0.250', 8080, true, 100, 'elite', now(), 1, 1)",
                &[],
            )
            .unwrap();
        assert_ne!(active_in_database(&mut client), snapshotted);
    }
    cluster.stop();

    // Nothing is due again soon, so what is active once the database is back
    // is what the table said, not a new finding of the validator.
    let config = service_config(&cluster.url(), &farm, &list, "")
        .replace(
            "revalidate_after_seconds = 1\n",
            "revalidate_after_seconds = 3600\n",
        )
        .replace(
            "retry_inactive_after_seconds = 1\n",
            "retry_inactive_after_seconds = 0\n",
        );
    let mut service = Service::start_in(dir, &config);
    let pid = service.child.id();
    let cpu_before = procfs::cpu_ticks(pid);
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(6) {
        let health = health(&service);
        assert_eq!(health["status"], "degraded", "{health}");
        assert_eq!(health["database"], "down", "{health}");
        assert_eq!(health["active_proxies"], 4, "{health}");
        let answer = get(&service.url("/get-proxy?source=outage"));
        assert_eq!(answer.status, 200, "{}", answer.body);
        let proxy = answer.json()["proxy"].as_str().unwrap().to_string();
        assert!(
            snapshotted.contains(&proxy),
            "{proxy} is not a snapshotted proxy"
        );
        thread::sleep(Duration::from_millis(250));
    }
    let cpu_ticks = procfs::cpu_ticks(pid) - cpu_before;
    // A retry loop without backoff would burn a core: 600 ticks in 6 s.
    assert!(
        cpu_ticks < 60,
        "{cpu_ticks} CPU ticks while waiting 6 s for the database"
    );
    assert!(
        service.child.try_wait().unwrap().is_none(),
        "the service exited"
    );
    assert_eq!(served(&service, "outage"), snapshotted);
    assert_eq!(
        service.log_count("database not ready"),
        1,
        "{}",
        service.log_text()
    );
    assert!(
        service.log_contains("serving the 4 active proxies of the snapshot taken"),
        "{}",
        service.log_text()
    );

    cluster.restart();
    wait_for(
        "/health ok after the database came up",
        Duration::from_secs(30),
        || health(&service)["status"] == "ok",
    );
    let expected = active_in_database(&mut cluster.client());
    assert!(
        expected.contains(&added) && !expected.contains(&gone),
        "{expected:?}"
    );
    wait_for(
        "the database's active set served",
        Duration::from_secs(30),
        || served(&service, "after") == expected,
    );
    assert_eq!(health(&service)["active_proxies"], 4);
    assert!(service.log_contains("replacing the snapshot's 4"));
    assert!(inconsistent_rows(&mut cluster.client()).is_empty());
}

/// 100,000 distinct `ip:port` lines (two upsert batches), on addresses no
/// farm proxy uses; [`BIG_LIST_LAST`] sorts last.
fn big_list() -> String {
    assert_eq!(
        proxy_pool::store::UPSERT_BATCH,
        50_000,
        "big_list's batches"
    );
    let mut list = String::with_capacity(100_000 * 20);
    for n in 0..100_000u32 {
        let block = n / 250;
        list.push_str(&format!(
            "127.{}.{}.{}:3128\n",
            210 + block / 250,
            block % 250,
            n % 250 + 1
        ));
    }
    list
}

/// The big list's proxy that sorts last, so its upsert batch is the last one.
const BIG_LIST_LAST: &str = "127.211.149.250";

/// Guards a fetch cut by a database crash: each batch of the upsert is one
/// statement (the table only ever holds whole batches), the rows validated
/// before keep their results, get-proxy keeps answering from memory, /health
/// turns degraded then ok, and the fetcher finishes the list by itself.
#[test]
fn a_database_crash_during_a_fetch_loses_no_batch_halfway() {
    let _guard = shared();
    let cluster = PgCluster::start();
    let farm = Farm::start(
        FarmSpec::new()
            .first_proxy_ip("127.12.0.1".parse().unwrap())
            .group(ProxyGroup::new(Behaviour::Elite, 4)),
    )
    .expect("farm");
    farm.set_list("big", "# filled later\n".into());
    let lists = format!("{},{}", farm.list_url("plain"), farm.list_url("big"));
    let service = Service::start(&service_config(&cluster.url(), &farm, &lists, ""));
    wait_for(
        "the farm's proxies validated",
        Duration::from_secs(30),
        || health(&service)["active_proxies"] == 4,
    );
    let mut client = cluster.client();
    let validated_before: Vec<String> = client
        .query(
            "SELECT row_to_json(p)::text FROM (SELECT id, is_active, latency_ms, anonymity, exit_ip
             FROM proxies WHERE is_active ORDER BY id) p",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(validated_before.len(), 4);

    // No validation of the 100,000 newcomers: the judge is away.
    farm.set_judge_down(true);
    // The crash comes while the list's last batch is under way: the test
    // inserts that batch's last proxy in a transaction it keeps open, so the
    // batch waits on it (the first batch commits) until the crash ends both.
    let mut holder = cluster.client();
    let mut held = holder.transaction().unwrap();
    held.execute(
        &format!(
            "INSERT INTO proxies (protocol, ip, port) VALUES ('http', '{BIG_LIST_LAST}', 3128)"
        ),
        &[],
    )
    .unwrap();
    let prober = Prober::start(service.url("/get-proxy?source=during-fetch"));
    farm.set_list("big", big_list());
    let big = "SELECT count(*) FROM proxies WHERE ip << '127.208.0.0/12'";
    let mut seen_counts = BTreeSet::new();
    let batch = proxy_pool::store::UPSERT_BATCH as i64;
    let waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted";
    wait_for(
        "the first upsert batch of the big list, the last one waiting",
        Duration::from_secs(60),
        || {
            let n = count(&mut client, big);
            seen_counts.insert(n);
            n == batch && count(&mut client, waiting) > 0
        },
    );
    drop(client);
    cluster.stop();
    drop(held);
    drop(holder);
    wait_for("/health degraded", Duration::from_secs(10), || {
        health(&service)["status"] == "degraded"
    });
    thread::sleep(Duration::from_secs(4));
    cluster.restart();

    let mut client = cluster.client();
    wait_for("the big list stored whole", Duration::from_secs(60), || {
        let n = count(&mut client, big);
        seen_counts.insert(n);
        n == 100_000
    });
    wait_for("/health ok", Duration::from_secs(20), || {
        health(&service)["status"] == "ok"
    });
    prober.finish();
    // Only whole batches were ever visible.
    assert!(
        seen_counts.iter().all(|n| n % batch == 0),
        "partial batches seen: {seen_counts:?}"
    );
    // Every stored proxy is linked to its list by the same statement.
    assert_eq!(
        count(&mut client, "SELECT count(*) FROM proxy_lists l JOIN proxies p ON p.id = l.proxy_id WHERE p.ip << '127.208.0.0/12'"),
        100_000
    );
    let validated_after: Vec<String> = client
        .query(
            "SELECT row_to_json(p)::text FROM (SELECT id, is_active, latency_ms, anonymity, exit_ip
             FROM proxies WHERE is_active ORDER BY id) p",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(validated_before, validated_after);
    assert!(
        inconsistent_rows(&mut client).is_empty(),
        "{:?}",
        inconsistent_rows(&mut client)
    );
    assert_eq!(
        count(
            &mut client,
            "SELECT coalesce(sum(n_tup_del), 0)::int8 FROM pg_stat_user_tables"
        ),
        0
    );
}

/// Guards a validation cycle cut by a database crash of a minute: the cycle stops,
/// results that could not be written are checked again later (their leases
/// expire), nothing is half-written, get-proxy keeps answering, and cycles
/// resume by themselves once PostgreSQL is back until every proxy has been
/// checked after the restart.
#[test]
fn a_database_crash_during_a_validation_cycle_is_caught_up() {
    let _guard = shared();
    let cluster = PgCluster::start();
    let farm = Farm::start(
        FarmSpec::new()
            .first_proxy_ip("127.13.0.1".parse().unwrap())
            .group(ProxyGroup::new(Behaviour::Elite, 4))
            .group(ProxyGroup::new(Behaviour::Slow(300), 20)),
    )
    .expect("farm");
    // Four workers over 24 proxies due every second, 20 of them taking over
    // half a second a check: a cycle is always running, for seconds.
    let service = Service::start(
        &service_config(&cluster.url(), &farm, &farm.list_url("plain"), "")
            .replace("validation_workers = 8", "validation_workers = 4"),
    );
    wait_for("the proxies validated", Duration::from_secs(30), || {
        health(&service)["active_proxies"] == 24
    });
    let prober = Prober::start(service.url("/get-proxy?source=during-cycle"));
    wait_for("a cycle half done", Duration::from_secs(30), || {
        let progress = get(&service.url("/stats")).json()["validation"]["in_progress"].clone();
        let checked = progress["checked"].as_u64().unwrap_or(0);
        checked >= 4 && checked + 8 <= progress["due"].as_u64().unwrap_or(0)
    });
    cluster.stop();
    wait_for("/health degraded", Duration::from_secs(10), || {
        health(&service)["status"] == "degraded"
    });
    // A minute's outage (not a wait for something: the outage itself).
    thread::sleep(Duration::from_secs(60));
    assert_eq!(
        get(&service.url("/get-proxy?source=outage")).status,
        200,
        "served from memory after a minute without the database"
    );
    cluster.restart();
    let mut client = cluster.client();
    let restarted: chrono::DateTime<chrono::Utc> =
        client.query_one("SELECT now()", &[]).unwrap().get(0);
    wait_for("/health ok", Duration::from_secs(20), || {
        health(&service)["status"] == "ok"
    });
    wait_for(
        "every proxy checked after the restart",
        Duration::from_secs(40),
        || {
            client
                .query_one(
                    "SELECT count(*) FROM proxies WHERE last_validated_at > $1",
                    &[&restarted],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 24
        },
    );
    prober.finish();
    // The cycle in progress either retried its writes past the outage or
    // gave its results up (they were checked again above); either way the
    // outage was noticed.
    assert!(
        service.log_contains("database down"),
        "{}",
        service.log_text()
    );
    assert_eq!(
        count(&mut client, "SELECT count(*) FROM proxies WHERE is_active"),
        24
    );
    assert_eq!(health(&service)["active_proxies"], 24);
    assert!(
        inconsistent_rows(&mut client).is_empty(),
        "{:?}",
        inconsistent_rows(&mut client)
    );
}

// ---------------------------------------------------------------------------
// 2. Process faults

/// Creates the schema and `n` active rows on 127.7.x.y.
fn seed_active(db: &TestDb, n: u32) -> Vec<String> {
    let text = format!(
        "[database]\nurl = {}\n[fetcher]\nsource_urls = http://127.0.0.1:9/x\n",
        db.url
    );
    let config = Config::parse(&text, "seed.ini", None).expect("config");
    let store = Store::connect(&config.database).expect("store");
    store.migrate().expect("migrate");
    db.client()
        .execute(
            "INSERT INTO proxies (protocol, ip, port, is_active, latency_ms, anonymity,
                                  last_validated_at, check_count, alive_count)
             SELECT 'http', ('127.7.' || (i / 250) || '.' || (i % 250 + 1))::inet, 8080,
                    true, 100, 'elite', now(), 1, 1
             FROM generate_series(0, $1::int4 - 1) AS i",
            &[&(n as i32)],
        )
        .expect("seed");
    (0..n)
        .map(|i| format!("http://127.7.{}.{}:8080", i / 250, i % 250 + 1))
        .collect()
}

/// Feedback from `sources` sources on every proxy: that many stats entries each.
fn build_state(service: &Service, urls: &[String], sources: usize) {
    let agent_url = service.url("/feedback");
    for s in 0..sources {
        for chunk in urls.chunks(500) {
            let items: Vec<serde_json::Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, url)| serde_json::json!({"source": format!("src{s}"), "proxy": url, "success": i % 4 != 0}))
                .collect();
            let answer = post(&agent_url, &serde_json::Value::Array(items).to_string());
            assert_eq!(answer.status, 200, "{}", answer.body);
        }
    }
}

/// The `.corrupt-` files and the temporary snapshot files in `dir`.
fn leftovers(dir: &Path) -> (Vec<String>, BTreeSet<String>) {
    let mut corrupt = Vec::new();
    let mut temps = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".corrupt-") {
            corrupt.push(name);
        } else if name.contains(".tmp-") {
            temps.insert(name);
        }
    }
    (corrupt, temps)
}

/// Guards crash safety: SIGKILL at random moments (many during a snapshot
/// write, with a snapshot every second of 100,000 entries) never leaves an
/// unreadable snapshot (no `.corrupt-` file, every start loads it whole),
/// nor an inconsistent table, and leftover temporary files do not pile up.
#[test]
fn sigkill_at_random_moments_never_corrupts_the_snapshot_or_the_table() {
    let _guard = shared();
    let loops: usize = std::env::var("PROXY_POOL_KILL_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let db = TestDb::new();
    let urls = seed_active(&db, 2000);
    let farm = Farm::start(
        FarmSpec::new()
            .first_proxy_ip("127.14.0.1".parse().unwrap())
            .group(ProxyGroup::new(Behaviour::Elite, 10))
            .group(ProxyGroup::new(Behaviour::BlackHole, 10)),
    )
    .expect("farm");
    let config = service_config(&db.url, &farm, &farm.list_url("plain"), "");
    let mut service = Service::start(&config);
    wait_for(
        "the seeded proxies in memory",
        Duration::from_secs(20),
        || health(&service)["active_proxies"].as_u64() >= Some(2000),
    );
    build_state(&service, &urls, 50);
    let written = post(&service.url("/admin/snapshot"), "");
    assert_eq!(written.status, 202, "{}", written.body);
    let entries = written.json()["entries"].as_u64().unwrap();
    assert!(entries >= 100_000, "{}", written.body);

    let mut kills_during_write = 0;
    let mut temps_seen = BTreeSet::new();
    let mut write_ms = Vec::new();
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..loops {
        // Keep the directory (and its snapshot) across the kill.
        let dir = std::mem::replace(&mut service.dir, tempfile::tempdir().unwrap());
        signal(service.child.id(), "KILL");
        let _ = service.child.wait();
        drop(service);
        let snapshot_path = dir.path().join("source_stats.bin");
        let (corrupt, temps) = leftovers(dir.path());
        assert!(corrupt.is_empty(), "round {round}: {corrupt:?}");
        kills_during_write += temps.difference(&temps_seen).count();
        temps_seen.extend(temps);
        match snapshot::load(&snapshot_path) {
            Ok(Loaded::Loaded(data)) => {
                assert!(data.entry_count() as u64 >= entries, "round {round}")
            }
            Ok(Loaded::Missing) => panic!("round {round}: the snapshot is gone"),
            Ok(Loaded::Corrupt { reason, .. }) => {
                panic!("round {round}: corrupt snapshot: {reason}")
            }
            Err(err) => panic!("round {round}: {err}"),
        }
        let mut client = db.client();
        assert!(
            inconsistent_rows(&mut client).is_empty(),
            "round {round}: {:?}",
            inconsistent_rows(&mut client)
        );

        service = Service::start_in(dir, &config);
        assert!(
            service.log_contains("50 sources"),
            "round {round}: {}",
            service.log_text()
        );
        let pid = service.child.id();
        if round % 2 == 0 {
            // Anywhere in the next two snapshot periods.
            thread::sleep(Duration::from_millis(rng.u64(300..2300)));
        } else {
            // In the middle of a snapshot write: its temporary file exists.
            let deadline = Instant::now() + Duration::from_secs(10);
            while leftovers(service.dir.path()).1.is_subset(&temps_seen) {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: no snapshot write"
                );
                thread::sleep(Duration::from_millis(2));
            }
            thread::sleep(Duration::from_millis(rng.u64(0..60)));
        }
        for line in service.log.lock().unwrap().iter() {
            if let Some(ms) = line
                .split(" bytes in ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
            {
                write_ms.extend(ms.parse::<u64>().ok());
            }
        }
        assert!(
            service.child.try_wait().unwrap().is_none(),
            "round {round}: pid {pid} exited"
        );
    }
    let (corrupt, temps) = leftovers(service.dir.path());
    assert!(corrupt.is_empty(), "{corrupt:?}");
    assert!(
        temps.len() <= 1,
        "temporary snapshot files left behind: {temps:?}"
    );
    eprintln!(
        "{loops} kills, {kills_during_write} during a snapshot write; writes took {:?} ms",
        write_ms
    );
}

/// Guards the graceful stop under full load: SIGTERM while clients hammer
/// get-proxy and feedback and checks are in flight ends in exit code 0
/// within validation_timeout_ms + 5 s, with the snapshot written.
#[test]
fn sigterm_under_full_load_exits_0_in_time_with_the_snapshot_written() {
    let _guard = shared();
    let db = TestDb::new();
    seed_active(&db, 200);
    let farm = Farm::start(
        FarmSpec::new()
            .first_proxy_ip("127.15.0.1".parse().unwrap())
            .group(ProxyGroup::new(Behaviour::BlackHole, 40)),
    )
    .expect("farm");
    let config = service_config(&db.url, &farm, &farm.list_url("plain"), "").replace(
        "validation_timeout_ms = 1000",
        "validation_timeout_ms = 2000",
    );
    let mut service = Service::start(&config);
    wait_for(
        "the seeded proxies in memory",
        Duration::from_secs(20),
        || health(&service)["active_proxies"] == 200,
    );
    wait_for("checks in flight", Duration::from_secs(20), || {
        farm.total_proxy_hits() > 0
    });
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|n| {
            let (stop, served, base) = (stop.clone(), served.clone(), service.url(""));
            thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into();
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut answer) = agent.get(format!("{base}/get-proxy?source=load{n}")).call() else {
                        continue;
                    };
                    let Ok(body) = answer.body_mut().read_to_string() else { continue };
                    let Ok(value) = serde_json::from_str::<serde_json::Value>(&body) else { continue };
                    let Some(proxy) = value["proxy"].as_str() else { continue };
                    let feedback = serde_json::json!({"source": format!("load{n}"), "proxy": proxy, "success": true});
                    if agent.post(format!("{base}/feedback")).send(feedback.to_string()).is_ok() {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    wait_for("load to run", Duration::from_secs(10), || {
        served.load(Ordering::Relaxed) > 200
    });
    let started = Instant::now();
    signal(service.child.id(), "TERM");
    let code = loop {
        if let Some(status) = service.child.try_wait().unwrap() {
            break status.code().unwrap_or(-1);
        }
        assert!(
            started.elapsed() < Duration::from_secs(2 + 5),
            "still running {:?} after SIGTERM under load:\n{}",
            started.elapsed(),
            service.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    assert_eq!(code, 0, "{}", service.log_text());
    wait_for("the last log lines", Duration::from_secs(5), || {
        service.log_contains("stopped")
    });
    let log = service.log_text();
    let stopping = log.find("stopping").expect("stopping logged");
    assert!(log[stopping..].contains("snapshot written"), "{log}");
    match snapshot::load(&service.dir.path().join("source_stats.bin")) {
        Ok(Loaded::Loaded(data)) => {
            let names: BTreeSet<&str> = data.sources.iter().map(|s| s.name.as_str()).collect();
            assert!(names.contains("load0"), "{names:?}");
        }
        other => panic!("snapshot after SIGTERM: {other:?}"),
    }
    eprintln!(
        "SIGTERM under load: exited 0 after {took:?}, {} get-proxy+feedback pairs served",
        served.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------------------
// 3. Hostile proxies and lists

/// Guards the validator against every hostile proxy at once (trickle,
/// endless body and headers, a 10 MB header, a malformed status, an
/// injected judge, black holes...): the cycle ends within its bound and
/// leaves no thread behind (only the fixed check pool remains).
#[test]
fn a_cycle_over_hostile_proxies_is_bounded_and_leaks_no_thread() {
    let _guard = THREADS.write().unwrap_or_else(|e| e.into_inner());
    let db = TestDb::new();
    let farm =
        Farm::start(FarmSpec::every_behaviour().first_proxy_ip("127.16.0.1".parse().unwrap()))
            .expect("farm");
    let text = format!(
        "[database]\nurl = {}\n[fetcher]\nallow_private_addresses = true\nsource_urls = {}\n\
         [validator]\nvalidation_target = {}\nhttps_target =\nvalidation_timeout_ms = 1000\nconnect_timeout_ms = 500\n\
         validation_workers = 32\n",
        db.url,
        farm.list_url("schemes"),
        farm.judge_url()
    );
    let config = Config::parse(&text, "test.ini", None).expect("config");
    let store = Store::connect(&config.database).expect("store");
    store.migrate().expect("migrate");
    let keys: Vec<_> = farm.manifest().iter().map(|e| e.key()).collect();
    store.upsert_listed("farm", &keys).expect("upsert");
    let validator = Validator::new(
        store,
        Checker::new(CheckConfig::from_validator(&config.validator)).expect("checker"),
        None,
        ValidatorSettings {
            workers: 32,
            timeout: config.validator.timeout,
            policy: DuePolicy {
                revalidate_after: Duration::from_secs(60),
                retry_inactive_after: None,
                lease: Duration::from_secs(30),
            },
        },
        Arc::new(State::new(&config.scoring)),
        Arc::new(Health::new()),
    )
    .expect("validator");
    // The check pool's threads start lazily: a first run starts them all.
    let summary = validator.run_cycle(&ShutdownSignal::never());
    assert_eq!(
        summary.checked,
        keys.len() as u64,
        "{}",
        summary.summary_line()
    );
    let threads_before = procfs::threads(std::process::id());

    store_reset(&db);
    let started = Instant::now();
    let summary = validator.run_cycle(&ShutdownSignal::never());
    let took = started.elapsed();
    assert_eq!(
        summary.checked,
        keys.len() as u64,
        "{}",
        summary.summary_line()
    );
    // 27 proxies on 32 workers: one round of checks, each within the
    // timeout (an http proxy's CONNECT check is a second one), plus writes.
    assert!(
        took < Duration::from_millis(2 * 1000 + 1500),
        "cycle took {took:?}"
    );
    wait_for(
        "threads back to the pool's",
        Duration::from_secs(10),
        || procfs::threads(std::process::id()) <= threads_before,
    );
    drop(farm);
}

/// Makes every row due again.
fn store_reset(db: &TestDb) {
    db.client()
        .execute(
            "UPDATE proxies SET last_validated_at = NULL, lease_until = NULL",
            &[],
        )
        .expect("reset");
}

/// Guards the fetcher's bounds against an endless list: with a cap far
/// beyond what the timeout allows, the download still ends at timeout_ms.
#[test]
fn an_endless_list_ends_at_the_timeout_when_the_cap_is_far() {
    let _guard = shared();
    let db = TestDb::new();
    let farm = Farm::start(FarmSpec::new()).expect("farm");
    let text = format!(
        "[database]\nurl = {}\n[fetcher]\nallow_private_addresses = true\ntimeout_ms = 1500\n\
         max_bytes = 1099511627776\nsource_urls = {}\n",
        db.url,
        farm.list_url("endless")
    );
    let config = Config::parse(&text, "test.ini", None).expect("config");
    let store = Store::connect(&config.database).expect("store");
    store.migrate().expect("migrate");
    let fetcher = Arc::new(Fetcher::new(
        &config,
        store,
        Arc::new(Health::new()),
        "t".into(),
    ));
    let started = Instant::now();
    let (status, _) = fetcher.fetch_list(0, FetchKind::Manual);
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1500 + 1000), "took {took:?}");
    let error = status.last_error.unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
}
