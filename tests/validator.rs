//! The validator end to end: the proxy farm's simulated proxies, a real
//! PostgreSQL, and `Validator::run_cycle` as `proxy-pool validate` and `serve`
//! wire it. Each test states what it guards: classification of every farm
//! behaviour, the due selection (inactive proxies wait for a re-listing and
//! the retry delay, active ones for the revalidation delay), judge outages
//! before and during a cycle, the `validate` command, and the leases that let
//! several instances share one database.
//!
//! Moving time: instead of sleeping through `retry_inactive_after` or
//! `revalidate_after`, tests shift the rows' timestamps back in SQL.
//!
//! Counting checks: the farm counts the TCP connections each proxy accepted.
//! A check costs an alive proxy two (the liveness request, then the separate
//! https check through a tunnel to the farm's https judge), every other
//! proxy one, and a `Dead` proxy none (its connections are refused).
//!
//! The https judge: the farm's, on port 443 of a 127.44.0.x address when the
//! tests may bind it (as root), so that a proxy tunnelling to 443 only
//! supports https as stock squid does; else on any port, and the manifest
//! expects such a proxy to refuse the tunnel.
//!
//! Flaky proxies: the farm's `Flaky(0.5)` is not random. It fails every second
//! connection it accepts, starting with the second (`nth` odd), and hit counts
//! start at zero with the farm. A check of an http proxy uses two connections,
//! so each check's absolute-URI request lands on an even connection (works)
//! and its CONNECT check on an odd one (fails): the proxy is alive without
//! https support in every cycle, exactly as its manifest entry says.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use proxy_farm::{Behaviour, Farm, FarmSpec, ManifestEntry, ProxyGroup};
use proxy_pool::config::Config;
use proxy_pool::health::Health;
use proxy_pool::proxy::{Anonymity, Protocol, ProxyKey};
use proxy_pool::shutdown::ShutdownSignal;
use proxy_pool::state::State;
use proxy_pool::store::{DuePolicy, Store};
use proxy_pool::validator::check::{CheckConfig, Checker};
use proxy_pool::validator::cycle::{CycleSummary, SkipReason, Validator, ValidatorSettings};
use proxy_pool::validator::geoip::Geoip;

use support::{https_judge, wait_for, Service, TestConfig, TestDb};

/// The validator's timeouts in these tests, the contract's example: a 3 s
/// request budget and a 1 s connect, with farm proxies up to 2 s slow (a
/// slow socks reply, a slow CONNECT) that must all be graded alive.
const TIMEOUT_MS: u64 = 3000;
const CONNECT_TIMEOUT_MS: u64 = 1000;

/// A database, a farm, and the pieces a validator is built from.
struct Rig {
    db: TestDb,
    farm: Farm,
    config: Config,
    store: Store,
    state: Arc<State>,
}

impl Rig {
    fn new(spec: FarmSpec) -> Rig {
        let db = TestDb::new();
        let spec = spec.https_judge_port(https_judge().judge.address().port());
        let farm = Farm::start(spec).expect("start the farm");
        let config = config(&db.url, &farm, 16);
        let store = Store::connect(&config.database).expect("store");
        store.migrate().expect("migrate");
        let state = Arc::new(State::new(&config.scoring));
        Rig {
            db,
            farm,
            config,
            store,
            state,
        }
    }

    /// A validator on this rig's database and state, as `app` builds it.
    fn validator(&self, workers: usize, policy: DuePolicy) -> Validator {
        self.validator_with_geoip(workers, policy, None)
    }

    fn validator_with_geoip(
        &self,
        workers: usize,
        policy: DuePolicy,
        geoip: Option<Geoip>,
    ) -> Validator {
        let checker = Checker::new(CheckConfig::from_validator(&self.config.validator))
            .expect("checker for the farm judge");
        let settings = ValidatorSettings {
            workers,
            timeout: self.config.validator.timeout,
            policy,
        };
        Validator::new(
            self.store.clone(),
            checker,
            geoip,
            settings,
            self.state.clone(),
            Arc::new(Health::new()),
        )
        .expect("validator pool")
    }

    /// Lists every farm proxy, as a fetch of a list naming them all would.
    fn list_all(&self) {
        let keys: Vec<ProxyKey> = self.farm.manifest().iter().map(|e| e.key()).collect();
        let counts = self.store.upsert_listed("farm", &keys).expect("upsert");
        assert_eq!(counts.upserted, keys.len() as u64);
    }

    fn sql(&self, statement: &str) -> u64 {
        self.db
            .client()
            .execute(statement, &[])
            .unwrap_or_else(|err| panic!("{statement}: {err}"))
    }

    fn count(&self, query: &str) -> i64 {
        self.db
            .client()
            .query_one(query, &[])
            .unwrap_or_else(|err| panic!("{query}: {err}"))
            .get(0)
    }

    /// Every row of `proxies`, `lists` and `proxy_sources`, in full, as JSON text.
    fn dump(&self) -> Vec<String> {
        let mut client = self.db.client();
        let mut rows = Vec::new();
        for query in [
            "SELECT row_to_json(p)::text FROM proxies p ORDER BY id",
            "SELECT row_to_json(l)::text FROM lists l ORDER BY id",
            "SELECT row_to_json(s)::text FROM proxy_sources s ORDER BY source, proxy_id",
        ] {
            for row in client.query(query, &[]).expect("dump") {
                rows.push(row.get(0));
            }
        }
        rows
    }

    /// The `proxies` rows by `ip:port` (every farm proxy has its own address).
    fn rows(&self) -> HashMap<String, Row> {
        let rows = self
            .db
            .client()
            .query(
                "SELECT protocol, ip, port, username, password, is_active, anonymity,
                        supports_https, exit_ip, latency_ms, last_dead_reason, check_count,
                        alive_count, last_validated_at IS NOT NULL, lease_until IS NULL,
                        https_failure, https_checked_at IS NOT NULL
                 FROM proxies",
                &[],
            )
            .expect("read proxies");
        rows.iter()
            .map(|row| {
                let ip: IpAddr = row.get(1);
                let port: i32 = row.get(2);
                let parsed = Row {
                    protocol: row.get(0),
                    username: row.get(3),
                    password: row.get(4),
                    is_active: row.get(5),
                    anonymity: row.get(6),
                    supports_https: row.get(7),
                    exit_ip: row.get(8),
                    latency_ms: row.get(9),
                    last_dead_reason: row.get(10),
                    check_count: row.get(11),
                    alive_count: row.get(12),
                    validated: row.get(13),
                    unleased: row.get(14),
                    https_failure: row.get(15),
                    https_checked: row.get(16),
                };
                (format!("{ip}:{port}"), parsed)
            })
            .collect()
    }

    fn hits(&self) -> Vec<u64> {
        (0..self.farm.manifest().len())
            .map(|i| self.farm.hits(i))
            .collect()
    }
}

/// One row of `proxies`, the columns the validator writes.
#[derive(Clone, Debug, PartialEq)]
struct Row {
    protocol: String,
    username: Option<String>,
    password: Option<String>,
    is_active: bool,
    anonymity: Option<String>,
    supports_https: Option<bool>,
    exit_ip: Option<IpAddr>,
    latency_ms: Option<i32>,
    last_dead_reason: Option<String>,
    check_count: i32,
    alive_count: i32,
    validated: bool,
    unleased: bool,
    https_failure: Option<String>,
    https_checked: bool,
}

fn config(database_url: &str, farm: &Farm, workers: usize) -> Config {
    Config::parse(&config_ini(database_url, farm, workers), "test.ini", None).expect("test config")
}

fn config_ini(database_url: &str, farm: &Farm, workers: usize) -> String {
    let judge_url = farm.judge_url();
    let list_url = farm.list_url("plain");
    let https_url = format!("{}?show_env=1", https_judge().judge.url());
    let ca_file = https_judge().ca_file.display();
    format!(
        "[database]\nurl = {database_url}\npool_size = 8\n\
         [server]\nbind = 127.0.0.1:0\n\
         [fetcher]\nallow_private_addresses = true\nsource_urls = {list_url}\n\
         [validator]\nvalidation_target = {judge_url}\nhttps_target = {https_url}\n\
         https_ca_file = {ca_file}\n\
         validation_timeout_ms = {TIMEOUT_MS}\nconnect_timeout_ms = {CONNECT_TIMEOUT_MS}\n\
         validation_workers = {workers}\nrevalidate_after_seconds = 60\n\
         retry_inactive_after_seconds = 2\n"
    )
}

/// Revalidation after 60 s, retry after 2 s, leases long enough for a cycle.
fn policy() -> DuePolicy {
    DuePolicy {
        revalidate_after: Duration::from_secs(60),
        retry_inactive_after: Some(Duration::from_secs(2)),
        lease: Duration::from_secs(30),
    }
}

fn cycle(validator: &Validator) -> CycleSummary {
    validator.run_cycle(&ShutdownSignal::never())
}

/// TCP connections one check costs this proxy (see the module comment).
fn connections_per_check(entry: &ManifestEntry) -> u64 {
    if entry.behaviour == Behaviour::Dead {
        0
    } else if entry.alive {
        2
    } else {
        1
    }
}

/// Guards the heart of the validator: one cycle over one proxy of every
/// behaviour (http, https, socks4, socks5, with and without credentials,
/// elite, anonymous, transparent, dead, black hole, slow, flaky, garbage,
/// hijack, auth-required, http and socks5 proxies listed without their
/// credentials or with wrong ones, and every hostile one) writes exactly the
/// manifest's findings into each row, a dead one with one of the manifest's
/// reasons, and the state's active set learns the alive ones.
#[test]
fn one_cycle_classifies_every_behaviour_as_the_manifest_says() {
    let rig = Rig::new(FarmSpec::every_behaviour());
    rig.list_all();
    let validator = rig.validator(32, policy());
    let summary = cycle(&validator);

    let manifest = rig.farm.manifest();
    let alive = manifest.iter().filter(|e| e.alive).count() as u64;
    assert_eq!(summary.skipped, None, "{}", summary.summary_line());

    let rows = rig.rows();
    let mut problems = Vec::new();
    for entry in manifest {
        let Some(row) = rows.get(&entry.host_port()) else {
            problems.push(format!("{}: no row", entry.url()));
            continue;
        };
        let name = format!("{} ({})", entry.url(), entry.behaviour.name());
        let expected = Row {
            protocol: entry.protocol.as_str().to_string(),
            username: entry.username.clone(),
            password: entry.password.clone(),
            is_active: entry.alive,
            anonymity: entry.anonymity.map(|a| a.as_str().to_string()),
            supports_https: entry.supports_https,
            exit_ip: entry.exit_ip,
            // Compared below: set exactly for alive proxies.
            latency_ms: row.latency_ms,
            last_dead_reason: row.last_dead_reason.clone(),
            check_count: 1,
            alive_count: i32::from(entry.alive),
            validated: true,
            unleased: true,
            https_failure: entry.https_failure.map(str::to_string),
            https_checked: entry.alive,
        };
        if *row != expected {
            problems.push(format!(
                "{name}:\n  found    {row:?}\n  expected {expected:?}"
            ));
        }
        if entry.alive {
            if row.latency_ms.is_none() || row.last_dead_reason.is_some() {
                problems.push(format!(
                    "{name}: alive without latency or with a dead reason"
                ));
            }
            if let Behaviour::Slow(ms) = entry.behaviour {
                if row.latency_ms.unwrap_or(0) < ms as i32 {
                    problems.push(format!("{name}: latency {:?} under {ms}", row.latency_ms));
                }
            }
        } else {
            let reason = row.last_dead_reason.as_deref().unwrap_or("<none>");
            if !entry.dead_reasons.contains(&reason) {
                let expected = entry.dead_reasons;
                problems.push(format!(
                    "{name}: dead for {reason:?}, expected one of {expected:?}"
                ));
            }
            if row.latency_ms.is_some() {
                problems.push(format!("{name}: dead but has a latency"));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    assert_evidence(&rig);
    assert_eq!(summary.due, manifest.len() as u64);
    assert_eq!(summary.checked, manifest.len() as u64);
    assert_eq!(summary.alive, alive, "{}", summary.summary_line());
    assert_eq!(summary.dead(), manifest.len() as u64 - alive);
    assert_eq!(rig.state.active_count() as u64, alive);
}

/// The anonymity evidence, in the table and in what get-proxy hands out:
/// the headers that gave each anonymous or transparent farm proxy away
/// (both add `Via`; a transparent one also `X-Forwarded-For` naming us; the
/// squid-like one only `X-Forwarded-For: unknown`), and none for an elite one.
fn assert_evidence(rig: &Rig) {
    let evidence: HashMap<String, Option<String>> = rig
        .db
        .client()
        .query(
            "SELECT host(ip) || ':' || port, anonymity_evidence FROM proxies",
            &[],
        )
        .expect("read evidence")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let mut served: HashMap<String, Option<String>> = HashMap::new();
    let query = proxy_pool::state::PickQuery {
        count: proxy_pool::state::MAX_COUNT,
        ..Default::default()
    };
    for round in 0..20 {
        let source = format!("evidence{round}");
        for pick in rig
            .state
            .get_proxy(&source, &query, chrono::Utc::now())
            .expect("picks")
        {
            served.insert(
                format!("{}:{}", pick.ip, pick.port),
                pick.anonymity_evidence.as_deref().map(str::to_string),
            );
        }
    }
    let mut checked = [0usize; 3];
    for entry in rig.farm.manifest().iter().filter(|e| e.alive) {
        let found = evidence[&entry.host_port()].as_deref();
        let name = format!("{} ({})", entry.url(), entry.behaviour.name());
        match entry.anonymity {
            Some(Anonymity::Elite) => {
                checked[0] += 1;
                assert_eq!(found, None, "{name}");
            }
            Some(Anonymity::Anonymous) if entry.behaviour == Behaviour::XffUnknown => {
                let found = found.unwrap_or_else(|| panic!("{name}: no evidence"));
                assert_eq!(found, "X-Forwarded-For: unknown", "{name}");
            }
            Some(Anonymity::Anonymous) => {
                checked[1] += 1;
                let found = found.unwrap_or_else(|| panic!("{name}: no evidence"));
                assert!(found.contains("Via: 1.1 farm-proxy"), "{name}: {found}");
                assert!(!found.contains("X-Forwarded-For"), "{name}: {found}");
            }
            Some(Anonymity::Transparent) => {
                checked[2] += 1;
                let found = found.unwrap_or_else(|| panic!("{name}: no evidence"));
                assert!(
                    found.contains("X-Forwarded-For: 127.0.0.1"),
                    "{name}: {found}"
                );
            }
            None => {}
        }
        let shown = served
            .get(&entry.host_port())
            .unwrap_or_else(|| panic!("{name}: alive but never handed out"));
        assert_eq!(
            shown.as_deref(),
            found,
            "{name}: get-proxy shows other evidence"
        );
    }
    assert!(checked.iter().all(|&n| n > 0), "grades covered {checked:?}");
    let alive = rig.farm.manifest().iter().filter(|e| e.alive).count();
    assert_eq!(served.len(), alive, "get-proxy hands out the alive proxies");
}

/// Guards the country column: with `[geoip] database` naming a Tor geoip
/// file, a cycle writes each proxy's country as `get-proxy` then hands it out
/// and filters on it. The validator looks up where the traffic leaves, the
/// exit address the judge saw; a farm proxy's exit is its own address, and a
/// dead proxy, having no exit, gets no country (it used to be looked up by
/// its listed address: the contract takes the exit only).
#[test]
fn a_cycle_writes_the_country_that_get_proxy_serves() {
    use Behaviour::*;
    let spec = FarmSpec::new()
        .group(ProxyGroup::new(Elite, 1))
        .group(ProxyGroup::new(Socks5, 1))
        .group(ProxyGroup::new(Anonymous, 1))
        .group(ProxyGroup::new(Hijack, 1));
    let rig = Rig::new(spec);
    rig.list_all();
    let manifest = rig.farm.manifest();
    // Each proxy's address alone is a range; the anonymous one is in none.
    let countries = [Some("DE"), Some("DE"), None, Some("FR")];
    let mut lines = String::from("# INTFROM,INTTO,CC\n");
    for (entry, country) in manifest.iter().zip(countries) {
        let (IpAddr::V4(ip), Some(country)) = (entry.ip, country) else {
            continue;
        };
        let ip = u32::from(ip);
        lines.push_str(&format!("{ip},{ip},{}\n", country.to_lowercase()));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let geoip_path = dir.path().join("geoip");
    std::fs::write(&geoip_path, lines).expect("write geoip");
    let geoip_line = format!("[geoip]\ndatabase = {}\n", geoip_path.display());
    let config = Config::parse(
        &format!("{}{geoip_line}", config_ini(&rig.db.url, &rig.farm, 4)),
        "test.ini",
        None,
    )
    .expect("config with geoip");
    let geoip_path = config.geoip.database.as_ref().expect("[geoip] database");
    let geoip = Geoip::open(geoip_path).expect("open the geoip file");
    let validator = rig.validator_with_geoip(4, policy(), Some(geoip));
    let summary = cycle(&validator);
    assert_eq!(
        (summary.checked, summary.alive),
        (4, 3),
        "{}",
        summary.summary_line()
    );

    let found: HashMap<String, Option<String>> = rig
        .db
        .client()
        .query("SELECT host(ip) || ':' || port, country FROM proxies", &[])
        .expect("read countries")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for (entry, country) in manifest.iter().zip(countries) {
        let name = format!("{} ({})", entry.url(), entry.behaviour.name());
        let country = country.filter(|_| entry.alive);
        assert_eq!(found[&entry.host_port()].as_deref(), country, "{name}");
    }

    // The service, started on this database with the same geoip file, loads
    // the active set with the countries and serves them.
    let mut service_config = TestConfig::new(&rig.db.url);
    service_config.set("geoip", "database", &geoip_path.display().to_string());
    let service = Service::start(&service_config.text());
    // It loads the active set once the database answers, after it listens.
    wait_for(
        "the service to load 3 active proxies",
        Duration::from_secs(30),
        || support::get(&service.url("/health")).json()["active_proxies"] == 3,
    );
    let ask = |query: &str| support::get(&service.url(&format!("/get-proxy?source=geo&{query}")));
    let answer = ask("count=100");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let served: HashMap<String, serde_json::Value> = answer.json()["proxies"]
        .as_array()
        .expect("proxies")
        .iter()
        .map(|p| {
            (
                format!("{}:{}", p["ip"].as_str().unwrap_or(""), p["port"]),
                p["country"].clone(),
            )
        })
        .collect();
    assert_eq!(served.len(), 3, "{}", answer.body);
    for (entry, country) in manifest.iter().zip(countries).filter(|(e, _)| e.alive) {
        assert_eq!(
            served[&entry.host_port()],
            serde_json::json!(country),
            "{}",
            entry.url()
        );
    }
    let answer = ask("country=de&count=100");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let german: Vec<String> = answer.json()["proxies"]
        .as_array()
        .expect("proxies")
        .iter()
        .map(|p| format!("{}", p["country"]))
        .collect();
    assert_eq!(german, ["\"DE\"", "\"DE\""], "{}", answer.body);
    // The only FR proxy is dead, so no active proxy matches.
    let answer = ask("country=FR");
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.json()["reason"], "no_match");
}

/// Guards the due selection: after a cycle, nothing is checked again until
/// due; an inactive proxy is due only once re-listed AND past
/// `retry_inactive_after` (either alone is not enough); an active proxy is
/// due after `revalidate_after`; and each due proxy is checked exactly once.
#[test]
fn inactive_proxies_wait_for_a_relisting_and_the_retry_delay() {
    use Behaviour::*;
    let spec = FarmSpec::new()
        .group(ProxyGroup::new(Elite, 1))
        .group(ProxyGroup::new(Elite, 1).protocol(Protocol::Https))
        .group(ProxyGroup::new(Socks5, 1))
        .group(ProxyGroup::new(Hijack, 1))
        .group(ProxyGroup::new(Garbage, 1))
        .group(ProxyGroup::new(MalformedStatus, 1).protocol(Protocol::Socks5));
    let rig = Rig::new(spec);
    rig.list_all();
    let validator = rig.validator(8, policy());
    let manifest = rig.farm.manifest();
    let per_check: Vec<u64> = manifest.iter().map(connections_per_check).collect();
    let only = |alive: bool| -> Vec<u64> {
        manifest
            .iter()
            .zip(&per_check)
            .map(|(e, n)| if e.alive == alive { *n } else { 0 })
            .collect()
    };

    let first = cycle(&validator);
    assert_eq!(
        (first.checked, first.alive),
        (6, 3),
        "{}",
        first.summary_line()
    );
    assert_eq!(rig.hits(), per_check, "first cycle: one check each");

    let nothing_checked = |what: &str| {
        rig.farm.reset_hits();
        let summary = cycle(&validator);
        assert_eq!(summary.due, 0, "{what}: {}", summary.summary_line());
        assert_eq!(summary.checked, 0, "{what}");
        assert_eq!(rig.farm.total_proxy_hits(), 0, "{what}");
    };
    nothing_checked("right after a cycle");

    // An hour passes for the inactive rows, but no list names them again.
    rig.sql(
        "UPDATE proxies SET first_seen_at = first_seen_at - interval '1 hour',
             last_seen_at = last_seen_at - interval '1 hour',
             last_validated_at = last_validated_at - interval '1 hour'
         WHERE NOT is_active",
    );
    nothing_checked("past the retry delay but not re-listed");

    // Checked just now, then listed again: within the 2 s retry delay.
    rig.sql("UPDATE proxies SET last_validated_at = now() WHERE NOT is_active");
    rig.list_all();
    nothing_checked("re-listed within the retry delay");

    // Both conditions: re-listed and 3 s past the last check.
    rig.sql(
        "UPDATE proxies SET last_validated_at = last_validated_at - interval '3 seconds'
         WHERE NOT is_active",
    );
    rig.farm.reset_hits();
    let retried = cycle(&validator);
    assert_eq!((retried.checked, retried.alive), (3, 0));
    assert_eq!(rig.hits(), only(false), "retry checks each inactive once");
    nothing_checked("after the retry");

    // Active proxies: not due at 50 s, due past the 60 s revalidation delay.
    rig.sql("UPDATE proxies SET last_validated_at = now() - interval '50 seconds' WHERE is_active");
    nothing_checked("active, within revalidate_after");
    rig.sql("UPDATE proxies SET last_validated_at = now() - interval '61 seconds' WHERE is_active");
    rig.farm.reset_hits();
    let revalidated = cycle(&validator);
    assert_eq!((revalidated.checked, revalidated.alive), (3, 3));
    assert_eq!(
        rig.hits(),
        only(true),
        "revalidation checks each active once"
    );
    for row in rig.rows().values() {
        assert_eq!(row.check_count, 2, "{row:?}");
        assert_eq!(row.alive_count, if row.is_active { 2 } else { 0 });
    }
}

/// Guards against a judge outage passing for a pool outage: when the judge
/// is down before a cycle, the cycle is skipped and not one byte of the
/// tables changes, no proxy is contacted, and the active set stays.
#[test]
fn a_judge_down_before_the_cycle_changes_nothing() {
    use Behaviour::*;
    let spec = FarmSpec::new()
        .group(ProxyGroup::new(Elite, 1))
        .group(ProxyGroup::new(Socks5, 1))
        .group(ProxyGroup::new(Hijack, 1))
        .group(ProxyGroup::new(Dead, 1));
    let rig = Rig::new(spec);
    rig.list_all();
    let validator = rig.validator(4, policy());
    assert_eq!(cycle(&validator).alive, 2);
    // Make every proxy due: old checks, and listed again since.
    rig.sql(
        "UPDATE proxies SET last_validated_at = last_validated_at - interval '2 hours',
             first_seen_at = first_seen_at - interval '3 hours',
             last_seen_at = last_seen_at - interval '3 hours'",
    );
    rig.list_all();
    let before = rig.dump();
    rig.farm.set_judge_down(true);
    rig.farm.reset_hits();

    let summary = cycle(&validator);
    assert!(
        matches!(summary.skipped, Some(SkipReason::JudgeUnreachable(_))),
        "{}",
        summary.summary_line()
    );
    assert_eq!(summary.checked, 0);
    assert_eq!(rig.dump(), before, "a skipped cycle must not write");
    assert_eq!(rig.farm.total_proxy_hits(), 0, "no proxy may be checked");
    assert_eq!(rig.state.active_count(), 2);

    // The proxies were due: with the judge back, the same cycle checks them.
    rig.farm.set_judge_down(false);
    let summary = cycle(&validator);
    assert_eq!(
        (summary.checked, summary.alive),
        (4, 2),
        "{}",
        summary.summary_line()
    );
}

/// Guards the mid-cycle outage: proxies checked while the judge is down come
/// back dead (the judge answers them 503), and none of them may be recorded
/// dead. Many slow proxies on few workers make a cycle of several seconds;
/// the judge goes down once the first results are written.
#[test]
fn a_judge_down_during_the_cycle_marks_no_proxy_dead() {
    let spec = FarmSpec::new().group(ProxyGroup::new(Behaviour::Slow(250), 24));
    let rig = Rig::new(spec);
    rig.list_all();
    let validator = Arc::new(rig.validator(3, policy()));
    let running = {
        let validator = validator.clone();
        thread::spawn(move || cycle(&validator))
    };
    wait_for("the first results written", Duration::from_secs(20), || {
        validator
            .progress()
            .is_some_and(|p| p.checked.load(std::sync::atomic::Ordering::Relaxed) > 0)
    });
    rig.farm.set_judge_down(true);
    let summary = running.join().expect("cycle thread");

    assert_eq!(
        summary.skipped,
        Some(SkipReason::JudgeLost),
        "{}",
        summary.summary_line()
    );
    let dead = rig.count(
        "SELECT count(*) FROM proxies WHERE last_validated_at IS NOT NULL AND NOT is_active",
    );
    assert_eq!(
        dead, 0,
        "no proxy may be marked dead for the judge's outage"
    );
    let alive = rig.count("SELECT count(*) FROM proxies WHERE is_active");
    let unchecked = rig.count("SELECT count(*) FROM proxies WHERE last_validated_at IS NULL");
    assert!(
        alive > 0,
        "the outage came before any result: the test saw nothing"
    );
    assert!(
        unchecked > 0,
        "the outage came after the cycle: the test saw nothing"
    );
    assert_eq!(alive + unchecked, 24);
    assert_eq!(rig.state.active_count() as i64, alive);
    assert_eq!(summary.dead(), 0, "{}", summary.summary_line());
}

/// Guards the `validate` command: with the farm's judge in its config file, it
/// runs one cycle, prints the summary line with the right counts, exits 0,
/// and the table holds the findings.
#[test]
fn the_validate_command_prints_its_summary_and_exits_0() {
    use Behaviour::*;
    let spec = FarmSpec::new()
        .group(ProxyGroup::new(Elite, 1))
        .group(ProxyGroup::new(Socks5, 1))
        .group(ProxyGroup::new(Hijack, 1))
        .group(ProxyGroup::new(Dead, 1));
    let rig = Rig::new(spec);
    rig.list_all();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.ini");
    let text = format!(
        "[database]\nurl = {}\n[server]\nbind = 127.0.0.1:0\n\
         [fetcher]\nallow_private_addresses = true\nsource_urls = {}\n\
         [validator]\nvalidation_target = {}\nhttps_target =\nvalidation_timeout_ms = {TIMEOUT_MS}\n\
         connect_timeout_ms = {CONNECT_TIMEOUT_MS}\nvalidation_workers = 4\n",
        rig.db.url,
        rig.farm.list_url("plain"),
        rig.farm.judge_url()
    );
    std::fs::write(&path, text).expect("write config");
    let run = || {
        Command::new(support::binary())
            .arg("--config")
            .arg(&path)
            .arg("validate")
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .output()
            .expect("run proxy-pool validate")
    };

    let output = run();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains("validation cycle: 4 due, 4 checked, 2 alive, 2 dead"),
        "{stdout}"
    );
    assert!(
        stdout.contains("not_judge=1") && stdout.contains("refused=1"),
        "{stdout}"
    );
    assert_eq!(rig.count("SELECT count(*) FROM proxies WHERE is_active"), 2);
    assert_eq!(
        rig.count("SELECT count(*) FROM proxies WHERE check_count = 1"),
        4
    );

    // With the judge down the command says so and fails, writing nothing.
    rig.sql("UPDATE proxies SET last_validated_at = NULL");
    let before = rig.dump();
    rig.farm.set_judge_down(true);
    let output = run();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("skipped: judge"));
    assert_eq!(rig.dump(), before);
}

/// Guards leasing between instances: two validators on one database running
/// a cycle at the same time check every due proxy exactly once between them
/// (each proxy's connection count is one check's), and both take part.
#[test]
fn two_validators_at_once_check_each_proxy_exactly_once() {
    // Claims are 100 proxies; 300 proxies of 150 ms each keep the first
    // claimer busy long enough for the second to claim too.
    let spec = FarmSpec::new().group(ProxyGroup::new(Behaviour::Slow(150), 300));
    let rig = Rig::new(spec);
    rig.list_all();
    let validators = [rig.validator(10, policy()), rig.validator(10, policy())];
    let barrier = Barrier::new(2);
    let summaries: Vec<CycleSummary> = thread::scope(|scope| {
        let handles: Vec<_> = validators
            .iter()
            .map(|validator| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    cycle(validator)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("cycle thread"))
            .collect()
    });

    let checked: Vec<u64> = summaries.iter().map(|s| s.checked).collect();
    assert_eq!(checked.iter().sum::<u64>(), 300, "{checked:?}");
    assert!(
        checked.iter().all(|&n| n > 0),
        "both must take part: {checked:?}"
    );
    let twice: Vec<(usize, u64)> = rig
        .hits()
        .into_iter()
        .enumerate()
        .filter(|&(_, hits)| hits != 2)
        .collect();
    assert!(
        twice.is_empty(),
        "proxies not checked exactly once (index, connections): {twice:?}"
    );
    assert_eq!(
        rig.count("SELECT count(*) FROM proxies WHERE check_count = 1 AND is_active"),
        300
    );
}

/// Guards lease expiry: a batch claimed by an instance that never writes
/// (it died) is left alone by the others while leased, and checked by the
/// next one once the lease has expired.
#[test]
fn a_claimed_batch_never_written_is_checked_after_its_lease() {
    let spec = FarmSpec::new().group(ProxyGroup::new(Behaviour::Elite, 10));
    let rig = Rig::new(spec);
    rig.list_all();
    let short = DuePolicy {
        lease: Duration::from_secs(1),
        ..policy()
    };
    let lost = rig
        .store
        .claim_due(&short, chrono::Utc::now(), 0, 4)
        .expect("claim");
    assert_eq!(lost.len(), 4);
    let lost_ids: Vec<i64> = lost.iter().map(|d| d.id).collect();
    drop(lost);
    // The keyset cursor: a claim takes only ids above the one it is given.
    let above = rig
        .store
        .claim_due(&short, chrono::Utc::now(), lost_ids[3] + 2, 100)
        .expect("claim");
    assert!(!above.is_empty());
    assert!(above.iter().all(|d| d.id > lost_ids[3] + 2));
    let above_ids: Vec<i64> = above.iter().map(|d| d.id).collect();
    rig.db
        .client()
        .execute(
            "UPDATE proxies SET lease_until = NULL WHERE id = ANY($1)",
            &[&above_ids],
        )
        .expect("release");

    let first = rig.validator(4, short);
    let summary = cycle(&first);
    assert_eq!(summary.checked, 6, "{}", summary.summary_line());
    let leased = |rig: &Rig| -> BTreeMap<i64, bool> {
        rig.db
            .client()
            .query("SELECT id, last_validated_at IS NOT NULL FROM proxies", &[])
            .expect("query")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    };
    for (id, validated) in leased(&rig) {
        assert_eq!(validated, !lost_ids.contains(&id), "proxy {id}");
    }
    let manifest_hits = rig.hits();
    assert_eq!(manifest_hits.iter().filter(|&&h| h == 0).count(), 4);

    wait_for("the lease to expire", Duration::from_secs(10), || {
        rig.count("SELECT count(*) FROM proxies WHERE lease_until > now()") == 0
    });
    rig.farm.reset_hits();
    let second = rig.validator(4, short);
    let summary = cycle(&second);
    assert_eq!(
        (summary.checked, summary.alive),
        (4, 4),
        "{}",
        summary.summary_line()
    );
    let expected: Vec<u64> = manifest_hits
        .iter()
        .map(|&h| if h == 0 { 2 } else { 0 })
        .collect();
    assert_eq!(
        rig.hits(),
        expected,
        "only the lost batch is checked, once each"
    );
    assert!(leased(&rig).values().all(|&validated| validated));
}

/// Guards "no proxy is checked twice in a cycle": with `revalidate_after`
/// of 1 s, far shorter than a cycle over 300 slow proxies, the rows checked
/// first become due again while the cycle runs, and the cycle's claims must
/// not take them again (one cycle of 5,000 proxies used to make 7,472 checks).
#[test]
fn a_cycle_longer_than_revalidate_after_checks_each_proxy_once() {
    let spec = FarmSpec::new().group(ProxyGroup::new(Behaviour::Slow(100), 300));
    let rig = Rig::new(spec);
    rig.list_all();
    let fast = DuePolicy {
        revalidate_after: Duration::from_secs(1),
        ..policy()
    };
    let validator = rig.validator(10, fast);
    let started = std::time::Instant::now();
    let summary = cycle(&validator);
    let took = started.elapsed();
    assert!(
        took > Duration::from_secs(2),
        "the cycle took {took:?}: too short to see rows due again"
    );
    assert_eq!(summary.checked, 300, "{}", summary.summary_line());
    assert_eq!(
        rig.count("SELECT count(*) FROM proxies WHERE check_count = 1"),
        300
    );
    let not_once: Vec<(usize, u64)> = rig
        .hits()
        .into_iter()
        .enumerate()
        .filter(|&(_, hits)| hits != 2)
        .collect();
    assert!(not_once.is_empty(), "(index, connections): {not_once:?}");
}

/// Guards the summary of a cycle whose due proxies are all held by other
/// instances: it says so, instead of "10 due, 0 checked".
#[test]
fn a_cycle_whose_due_proxies_are_all_leased_says_so() {
    let spec = FarmSpec::new().group(ProxyGroup::new(Behaviour::Elite, 10));
    let rig = Rig::new(spec);
    rig.list_all();
    let held = rig
        .store
        .claim_due(&policy(), chrono::Utc::now(), 0, 100)
        .expect("claim every row");
    assert_eq!(held.len(), 10);
    rig.farm.reset_hits();
    let summary = cycle(&rig.validator(4, policy()));
    assert_eq!(summary.checked, 0);
    assert_eq!(
        summary.skipped,
        Some(SkipReason::LeasedByOthers { due: 10 }),
        "{}",
        summary.summary_line()
    );
    assert!(
        summary
            .summary_line()
            .contains("all 10 due proxies are leased by other instances"),
        "{}",
        summary.summary_line()
    );
    assert_eq!(rig.farm.total_proxy_hits(), 0);
}

/// Guards `get-proxy?https=true`: only proxies whose https check succeeded,
/// whatever their list called them (a proxy listed as https that refuses
/// the tunnel, or reads its clients' TLS, is never one).
#[test]
fn https_true_serves_only_proxies_whose_https_check_succeeded() {
    use Behaviour::*;
    let spec = FarmSpec::new()
        .group(ProxyGroup::new(Elite, 1).protocol(Protocol::Https))
        .group(
            ProxyGroup::new(Elite, 1)
                .protocol(Protocol::Https)
                .connect(false),
        )
        .group(ProxyGroup::new(TlsIntercept, 1).protocol(Protocol::Https))
        .group(ProxyGroup::new(Socks5, 1));
    let rig = Rig::new(spec);
    rig.list_all();
    let summary = cycle(&rig.validator(4, policy()));
    assert_eq!(summary.alive, 4, "{}", summary.summary_line());
    let query = proxy_pool::state::PickQuery {
        https_only: true,
        count: proxy_pool::state::MAX_COUNT,
        ..Default::default()
    };
    let picks = rig
        .state
        .get_proxy("https", &query, chrono::Utc::now())
        .expect("picks");
    let mut served: Vec<String> = picks
        .iter()
        .map(|pick| format!("{}:{}", pick.ip, pick.port))
        .collect();
    served.sort();
    let mut expected: Vec<String> = rig
        .farm
        .manifest()
        .iter()
        .filter(|e| e.supports_https == Some(true))
        .map(|e| e.host_port())
        .collect();
    expected.sort();
    assert_eq!(expected.len(), 2, "the elite https and the socks5 proxy");
    assert_eq!(served, expected);
}
