//! The fetcher end to end: the farm's list server on loopback, a real
//! PostgreSQL database per test, and the library's `Fetcher` (and, where the
//! outside matters, the `proxy-pool fetch` and `import` commands). Guards what
//! arrives in the table from every list format, how hostile lists fail, that
//! schedules are independent and back off, that re-listing never deletes or
//! forgets, conditional requests, the one-fetch-per-interval claim between
//! instances, and that no password reaches a log line.

mod support;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_farm::{Farm, FarmSpec};
use proxy_pool::config::{Config, DatabaseConfig};
use proxy_pool::fetcher::{FetchKind, Fetcher, ListStatus};
use proxy_pool::health::Health;
use proxy_pool::proxy::{Protocol, ProxyKey};
use proxy_pool::shutdown::Shutdown;
use proxy_pool::store::{CheckRecord, ListYield, Store};

use support::{wait_for, TestDb};

/// A test's world: its database, its farm, and a store on the database.
struct World {
    db: TestDb,
    farm: Farm,
    store: Store,
}

impl World {
    fn new(spec: FarmSpec) -> World {
        World::on(TestDb::new(), spec)
    }

    /// A world on `db` as it is, migrated.
    fn on(db: TestDb, spec: FarmSpec) -> World {
        let farm = Farm::start(spec).expect("farm");
        let store = Store::connect(&DatabaseConfig {
            url: proxy_pool::secret::SecretUrl::new(db.url.clone()),
            pool_size: 4,
            checkout_timeout: Duration::from_secs(10),
        })
        .expect("store");
        store.migrate().expect("migrate");
        World { db, farm, store }
    }

    /// A config with `fetcher` keys (besides the test defaults) and any
    /// `[source.NAME]` sections; `{farm}` in either stands for the list
    /// server's address.
    fn config(&self, fetcher: &str, sources: &str) -> Config {
        self.config_allowing(true, fetcher, sources)
    }

    /// [`World::config`] with `allow_private_addresses` as given.
    fn config_allowing(&self, allow_private: bool, fetcher: &str, sources: &str) -> Config {
        let farm = self.farm.server_addr().to_string();
        let text = format!(
            "[database]\nurl = {}\npool_size = 4\n\
             [server]\nbind = 127.0.0.1:0\n\
             [fetcher]\nallow_private_addresses = {allow_private}\n{}\n{}\n",
            self.db.url,
            fetcher.replace("{farm}", &farm),
            sources.replace("{farm}", &farm)
        );
        Config::parse(&text, "test.ini", None).unwrap_or_else(|err| panic!("{err}\n{text}"))
    }

    fn fetcher(&self, config: &Config, instance: &str) -> Arc<Fetcher> {
        Arc::new(Fetcher::new(
            config,
            self.store.clone(),
            Arc::new(Health::new()),
            instance.to_string(),
        ))
    }

    /// A fetcher of one list, `[source.NAME]` on the farm's `/lists/LIST`.
    fn one_list(&self, name: &str, list: &str, fetcher_keys: &str, protocol: &str) -> Arc<Fetcher> {
        let config = self.config(
            fetcher_keys,
            &format!(
                "[source.{name}]\nurl = http://{{farm}}/lists/{list}\ninterval_seconds = 60\nprotocol = {protocol}\n"
            ),
        );
        self.fetcher(&config, "test")
    }

    fn rows(&self) -> HashSet<ProxyKey> {
        self.db
            .client()
            .query(
                "SELECT protocol, ip, port, username, password FROM proxies",
                &[],
            )
            .expect("select proxies")
            .iter()
            .map(|row| ProxyKey {
                protocol: Protocol::from_scheme(row.get(0)).expect("protocol"),
                ip: row.get(1),
                port: u16::try_from(row.get::<_, i32>(2)).expect("port"),
                username: row.get(3),
                password: row.get(4),
            })
            .collect()
    }

    /// The rows whose address is in `network` (`127.40.1.0/24`).
    fn rows_in(&self, network: &str) -> HashSet<ProxyKey> {
        self.rows()
            .into_iter()
            .filter(|key| in_network(key.ip, network))
            .collect()
    }

    fn count(&self, sql: &str) -> i64 {
        self.db.client().query_one(sql, &[]).expect("count").get(0)
    }
}

fn key(
    protocol: Protocol,
    ip: &str,
    port: u16,
    credentials: Option<(&str, Option<&str>)>,
) -> ProxyKey {
    let mut key = ProxyKey::new(protocol, ip.parse().expect("ip"), port);
    if let Some((user, password)) = credentials {
        key.username = Some(user.to_string());
        key.password = password.map(str::to_string);
    }
    key
}

/// Whether `ip` is in the IPv4 `/24` `network`.
fn in_network(ip: IpAddr, network: &str) -> bool {
    let prefix = network.trim_end_matches("0/24");
    ip.to_string().starts_with(prefix)
}

fn fetch(fetcher: &Arc<Fetcher>) -> ListStatus {
    fetcher.fetch_list(0, FetchKind::Manual).0
}

fn assert_ok(status: &ListStatus) {
    assert_eq!(status.last_error, None, "{}", status.summary_line());
}

fn every_behaviour(first: [u8; 4]) -> FarmSpec {
    FarmSpec::every_behaviour().first_proxy_ip(Ipv4Addr::from(first))
}

// ---------------------------------------------------------------------------
// 1. Formats and hostile lists

#[test]
fn bare_lines_take_the_protocol_of_their_source() {
    let world = World::new(every_behaviour([127, 21, 0, 1]));
    let fetcher = world.one_list("plain", "plain", "", "socks4");
    let status = fetch(&fetcher);
    assert_ok(&status);
    let expected: HashSet<ProxyKey> = world
        .farm
        .manifest()
        .iter()
        .map(|entry| ProxyKey::new(Protocol::Socks4, entry.ip, entry.port))
        .collect();
    assert_eq!(world.rows(), expected);
    assert_eq!(status.counts.parsed, expected.len() as u64);
    assert_eq!(status.counts.new, expected.len() as u64);
    assert_eq!((status.counts.rejected, status.counts.duplicates), (0, 0));
    assert!(!status.counts.truncated);
}

#[test]
fn scheme_urls_keep_their_protocol_and_percent_decoded_credentials() {
    let world = World::new(every_behaviour([127, 22, 0, 1]));
    let fetcher = world.one_list("schemes", "schemes", "", "socks5");
    let status = fetch(&fetcher);
    assert_ok(&status);
    let expected: HashSet<ProxyKey> = world.farm.manifest().iter().map(|e| e.key()).collect();
    // The farm's credentials include a space, an `@` and a `:` in passwords.
    assert!(expected
        .iter()
        .any(|k| k.password.as_deref() == Some("s3cret:pass")));
    assert_eq!(world.rows(), expected);
    assert_eq!(status.counts.rejected, 0);
}

#[test]
fn a_hostile_but_parseable_list_stores_exactly_its_proxies_and_counts_its_junk() {
    let world = World::new(every_behaviour([127, 23, 0, 1]));
    let fetcher = world.one_list("junk", "junk", "", "http");
    let status = fetch(&fetcher);
    assert_ok(&status);
    let expected: HashSet<ProxyKey> = world.farm.manifest().iter().map(|e| e.key()).collect();
    assert_eq!(world.rows(), expected);
    assert_eq!(status.counts.parsed, expected.len() as u64);
    // Every junk line that is not blank or a comment is rejected, whether it
    // sits between proxies or in the block at the end.
    let junk_lines_between = expected.len();
    let blank_or_comment = |i: usize| matches!(i % 16, 0..=2);
    let rejected_between = (0..junk_lines_between)
        .filter(|i| !blank_or_comment(*i))
        .count();
    assert_eq!(
        status.counts.rejected,
        (rejected_between + 13) as u64,
        "{}",
        status.summary_line()
    );
}

#[test]
fn every_accepted_line_format_arrives_in_the_table() {
    let world = World::new(FarmSpec::new());
    let body = "\u{feff}# a proxy list\r\n\
        // generated for the test\r\n\
        \r\n\
        127.30.0.1:8080\r\n\
        http://127.30.0.2:3128\n\
        HTTPS://127.30.0.3:443/\n\
        socks4://127.30.0.4:1080\n\
        socks5h://127.30.0.5:1080\n\
        socks5://us%20er:p%40ss@127.30.0.6:1080\n\
        user:pass@127.30.0.7:3128\n\
        127.30.0.8:3128:user8:pa:ss\n\
        127.30.0.9:3128:token\n\
        [::1]:8080\n\
        socks5://[::1]:1081\n\
        [::ffff:127.30.0.10]:80\n\
        \t 127.30.0.11:8080\t US elite 120ms\n\
        127.30.0.12:8080,US,elite\n\
        127.30.0.13:8080;US\n\
        127.30.0.14:8080|US|1.2s\n\
        http://u:a,b;c@127.30.0.15:80,US\n\
        127.30.0.1:8080\n\
        http://127.30.0.1:8080   # the first line again\n\
        not a proxy\n\
        999.1.1.1:80\n\
        127.30.0.16:0\n\
        ftp://127.30.0.17:21\n\
        proxy.example.com:8080\n\
        :secret@127.30.0.18:80\n\
        <tr><td>127.30.0.19</td><td>80</td></tr>\n\
        127.30.0.20:80"; // no final newline
    world.farm.set_list("formats", body.to_string());
    let fetcher = world.one_list("formats", "formats", "", "socks5");
    let status = fetch(&fetcher);
    assert_ok(&status);
    use Protocol::*;
    let expected: HashSet<ProxyKey> = [
        key(Socks5, "127.30.0.1", 8080, None),
        key(Http, "127.30.0.2", 3128, None),
        key(Https, "127.30.0.3", 443, None),
        key(Socks4, "127.30.0.4", 1080, None),
        key(Socks5, "127.30.0.5", 1080, None),
        key(Socks5, "127.30.0.6", 1080, Some(("us er", Some("p@ss")))),
        key(Socks5, "127.30.0.7", 3128, Some(("user", Some("pass")))),
        key(Socks5, "127.30.0.8", 3128, Some(("user8", Some("pa:ss")))),
        // Three fields are a proxy and a trailing field, never a user name.
        key(Socks5, "127.30.0.9", 3128, None),
        key(Socks5, "::1", 8080, None),
        key(Socks5, "::1", 1081, None),
        key(Socks5, "127.30.0.10", 80, None),
        key(Socks5, "127.30.0.11", 8080, None),
        key(Socks5, "127.30.0.12", 8080, None),
        key(Socks5, "127.30.0.13", 8080, None),
        key(Socks5, "127.30.0.14", 8080, None),
        key(Http, "127.30.0.15", 80, Some(("u", Some("a,b;c")))),
        key(Http, "127.30.0.1", 8080, None),
        key(Socks5, "127.30.0.20", 80, None),
    ]
    .into_iter()
    .collect();
    assert_eq!(world.rows(), expected);
    assert_eq!(status.counts.lines, 30, "{}", status.summary_line());
    assert_eq!(status.counts.parsed, expected.len() as u64);
    assert_eq!(status.counts.duplicates, 1);
    assert_eq!(status.counts.rejected, 7);
    assert_eq!(status.counts.new, expected.len() as u64);
}

/// One list of each format in tests/fixtures/lists, in the shapes public lists
/// use, fetched from the farm into the database: the rows are exactly those
/// the list gives, and the counts say what was dropped.
#[test]
fn every_list_format_stores_exactly_its_proxies() {
    use Protocol::*;
    struct Case {
        file: &'static str,
        protocol: &'static str,
        network: &'static str,
        /// The summary's counts, between "bytes, " and ", not truncated".
        counts: &'static str,
        expected: Vec<ProxyKey>,
    }
    let cases = [
        Case {
            file: "array-of-strings.json",
            protocol: "http",
            network: "127.40.1.0/24",
            counts: "7 entries (json), 4 parsed, 4 new, 2 rejected, 1 duplicates",
            expected: vec![
                key(Http, "127.40.1.1", 8080, None),
                key(Socks5, "127.40.1.2", 1080, None),
                key(Http, "127.40.1.3", 3128, None),
                key(Http, "127.40.1.4", 80, Some(("user", Some("pa@ss")))),
            ],
        },
        Case {
            file: "array-of-objects.json",
            protocol: "http",
            network: "127.40.2.0/24",
            counts: "5 entries (json), 5 parsed, 5 new, 1 rejected, 0 duplicates",
            expected: vec![
                key(Socks4, "127.40.2.1", 7890, None),
                key(Http, "127.40.2.2", 3128, Some(("alice", Some("s3cret")))),
                key(Socks4, "127.40.2.3", 1080, None),
                key(Socks5, "127.40.2.3", 1080, None),
                key(Https, "127.40.2.4", 443, None),
            ],
        },
        Case {
            file: "object-under-data.json",
            protocol: "socks4",
            network: "127.40.3.0/24",
            counts: "3 entries (json), 2 parsed, 2 new, 1 rejected, 0 duplicates",
            expected: vec![
                key(Http, "127.40.3.1", 8080, None),
                key(Socks5, "127.40.3.2", 1080, None),
            ],
        },
        Case {
            file: "json-lines.jsonl",
            protocol: "http",
            network: "127.40.4.0/24",
            counts: "4 lines (json lines), 3 parsed, 3 new, 1 rejected, 0 duplicates",
            expected: vec![
                key(Http, "127.40.4.1", 80, None),
                key(Https, "127.40.4.2", 8080, None),
                key(Socks5, "127.40.4.3", 3128, None),
            ],
        },
        Case {
            file: "header.csv",
            protocol: "socks4",
            network: "127.40.5.0/24",
            counts: "5 lines (csv), 3 parsed, 3 new, 1 rejected, 0 duplicates",
            expected: vec![
                key(Http, "127.40.5.1", 8080, None),
                key(Socks5, "127.40.5.2", 1080, None),
                key(Socks4, "127.40.5.3", 80, None),
            ],
        },
        Case {
            file: "four-columns.csv",
            protocol: "socks5",
            network: "127.40.6.0/24",
            counts: "4 lines (csv), 9 parsed, 9 new, 0 rejected, 0 duplicates",
            expected: vec![
                key(Http, "127.40.6.1", 80, None),
                key(Https, "127.40.6.2", 443, None),
                key(Socks4, "127.40.6.3", 1080, None),
                key(Socks5, "127.40.6.4", 1080, None),
                key(Http, "127.40.6.5", 8080, None),
                key(Socks4, "127.40.6.6", 4145, None),
                key(Socks5, "127.40.6.7", 9050, Some(("user", Some("pw")))),
                key(Http, "127.40.6.8", 3128, None),
                key(Https, "127.40.6.1", 80, None),
            ],
        },
        Case {
            file: "table.html",
            protocol: "http",
            network: "127.40.7.0/24",
            counts: "18 lines (html), 5 parsed, 5 new, 1 rejected, 0 duplicates",
            expected: vec![
                key(Http, "127.40.7.1", 8080, None),
                key(Http, "127.40.7.2", 3128, None),
                key(Socks5, "127.40.7.3", 1080, None),
                key(Http, "127.40.7.5", 8000, None),
                key(Socks4, "127.40.7.6", 4145, None),
            ],
        },
        Case {
            file: "ip-port-country.txt",
            protocol: "http",
            network: "127.40.8.0/24",
            counts: "5 lines, 4 parsed, 4 new, 0 rejected, 1 duplicates",
            expected: vec![
                key(Http, "127.40.8.1", 3128, None),
                key(Http, "127.40.8.2", 8080, None),
                key(Http, "127.40.8.3", 3128, None),
                key(Http, "127.40.8.4", 999, None),
            ],
        },
    ];
    let world = World::new(FarmSpec::new());
    for case in cases {
        let body = std::fs::read_to_string(fixture(case.file)).expect("fixture");
        let list = case.file.replace('.', "-");
        world.farm.set_list(&list, body.clone());
        let status = fetch(&world.one_list(&list, &list, "", case.protocol));
        assert_ok(&status);
        let expected: HashSet<ProxyKey> = case.expected.into_iter().collect();
        assert_eq!(world.rows_in(case.network), expected, "{}", case.file);
        let line = status.summary_line();
        let counts = format!("{} bytes, {}, not truncated", body.len(), case.counts);
        assert!(
            line.contains(&counts),
            "{}:\n{line}\ndoes not contain\n{counts}",
            case.file
        );
    }
    assert_eq!(world.count("SELECT count(*) FROM proxies"), 35);
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lists")
        .join(name)
}

/// `import` reads every format as a fetch does, prints the same counts and
/// says "not a list" as a fetch does.
#[test]
fn import_reads_every_format_and_says_when_a_body_is_no_list() {
    let world = World::new(FarmSpec::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.ini");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {}\n[fetcher]\nallow_private_addresses = true\n\
             source_urls = http://127.0.0.1:9/unused\n",
            world.db.url
        ),
    )
    .expect("config");
    let import = |path: &std::path::Path| {
        let output = Command::new(support::binary())
            .arg("--config")
            .arg(&config)
            .arg("import")
            .arg(path)
            .env_remove("DATABASE_URL")
            .output()
            .expect("run proxy-pool import");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let (code, stdout, stderr) = import(&fixture("array-of-objects.json"));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let body_len = std::fs::metadata(fixture("array-of-objects.json"))
        .unwrap()
        .len();
    assert!(
        stdout.contains(&format!(
            "{body_len} bytes, 5 entries (json), 5 parsed, 5 new, 1 rejected, 0 duplicates in "
        )),
        "{stdout}"
    );
    assert!(stdout.ends_with(" ms\n"), "{stdout:?}");
    assert!(
        stderr.contains("entry 5 rejected (malformed): no address"),
        "{stderr}"
    );
    assert!(!stdout.contains("s3cret") && !stderr.contains("s3cret"));
    assert_eq!(world.rows_in("127.40.2.0/24").len(), 5);

    let page = dir.path().join("page.html");
    std::fs::write(
        &page,
        "<html><body><p>maintenance until 12:30</p></body></html>\n",
    )
    .expect("page");
    let (code, stdout, stderr) = import(&page);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.ends_with(
            "bytes, 1 lines (html), 0 parsed, - new, 0 rejected, 0 duplicates, \
             error: not a proxy list: the body is an HTML page\n"
        ),
        "{stdout:?}"
    );
    assert!(
        stderr.contains("not a proxy list: the body is an HTML page"),
        "{stderr}"
    );
    assert_eq!(world.count("SELECT count(*) FROM proxies"), 5);
}

/// Regression: a fetch's summary printed "yield 0 active now" for a list
/// whose proxies were active, until the next refresh of yields. The list's
/// yield is now read right after its fetch, stored or unchanged.
#[test]
fn a_fetch_summary_shows_the_lists_yield_at_once() {
    captured_log::install();
    let world = World::new(FarmSpec::new());
    world.farm.set_list(
        "yielding",
        "127.41.0.1:80\n127.41.0.2:80\n127.41.0.3:80\n".to_string(),
    );
    let fetcher = world.one_list("yield-now", "yielding", "", "http");
    let figures = |status: &ListStatus| {
        status
            .yields
            .as_ref()
            .map(|y| (y.listed, y.active_now, y.ever_active))
    };
    let first = fetch(&fetcher);
    assert_ok(&first);
    assert_eq!(figures(&first), Some((3, 0, 0)), "{}", first.summary_line());

    world
        .db
        .client()
        .batch_execute(
            "UPDATE proxies SET is_active = true, alive_count = 2
                 WHERE ip IN ('127.41.0.1', '127.41.0.2');
             UPDATE proxies SET alive_count = 1 WHERE ip = '127.41.0.3';",
        )
        .expect("mark");
    let unchanged = fetch(&fetcher);
    assert!(unchanged.not_modified(), "{}", unchanged.summary_line());
    assert_eq!(figures(&unchanged), Some((3, 2, 3)));

    world.farm.set_list(
        "yielding",
        "127.41.0.1:80\n127.41.0.2:80\n127.41.0.3:80\n127.41.0.4:80\n".to_string(),
    );
    let stored = fetch(&fetcher);
    assert_ok(&stored);
    assert_eq!(figures(&stored), Some((4, 2, 3)));
    let logged = captured_log::lines("fetch yield-now:");
    let last = &logged.last().expect("a summary line").1;
    assert!(
        last.ends_with("yield 2 active now / 3 ever active"),
        "{last}"
    );
}

#[test]
fn a_huge_list_is_stored_whole_and_cut_at_max_bytes_when_small() {
    let world = World::new(FarmSpec::new().huge_lines(20_000));
    let whole = fetch(&world.one_list("huge", "huge", "", "http"));
    assert_ok(&whole);
    assert!(!whole.counts.truncated);
    assert!(whole.summary_line().contains("not truncated"));
    assert_eq!((whole.counts.parsed, whole.counts.new), (20_000, 20_000));
    assert_eq!(world.count("SELECT count(*) FROM proxies"), 20_000);

    let world = World::new(FarmSpec::new().huge_lines(20_000));
    let cut = fetch(&world.one_list("huge", "huge", "max_bytes = 50000", "http"));
    assert_ok(&cut);
    assert!(cut.counts.truncated, "{}", cut.summary_line());
    assert!(
        cut.counts.bytes <= 50_000 && cut.counts.bytes > 45_000,
        "{}",
        cut.counts.bytes
    );
    assert!(cut.summary_line().contains("truncated at max_bytes"));
    // Only whole lines are kept: every one of them is a stored proxy.
    assert_eq!(cut.counts.rejected, 0);
    assert_eq!(cut.counts.parsed, cut.counts.lines);
    assert_eq!(
        world.count("SELECT count(*) FROM proxies"),
        cut.counts.parsed as i64
    );
    assert!(cut.counts.parsed > 2000);
}

#[test]
fn an_endless_list_is_cut_at_max_bytes() {
    let world = World::new(FarmSpec::new());
    let started = Instant::now();
    let status = fetch(&world.one_list(
        "endless",
        "endless",
        "max_bytes = 200000\ntimeout_ms = 10000",
        "http",
    ));
    assert_ok(&status);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(status.counts.truncated);
    assert!(status.counts.bytes <= 200_000 && status.counts.bytes > 190_000);
    assert_eq!(status.counts.rejected, 0);
    assert_eq!(
        world.count("SELECT count(*) FROM proxies"),
        status.counts.parsed as i64
    );
}

#[test]
fn a_slow_list_completes_within_the_timeout() {
    let world = World::new(FarmSpec::new().slow_list(4, Duration::from_millis(200)));
    let status = fetch(&world.one_list("slow", "slow", "timeout_ms = 3000", "http"));
    assert_ok(&status);
    assert_eq!(status.counts.parsed, 12);
    assert!(status.last_duration.expect("duration") >= Duration::from_millis(600));
    assert_eq!(world.count("SELECT count(*) FROM proxies"), 12);
}

#[test]
fn a_hanging_list_fails_with_a_timeout_within_timeout_ms() {
    let world = World::new(FarmSpec::new());
    let fetcher = world.one_list("hang", "hang", "timeout_ms = 800", "http");
    let started = Instant::now();
    let status = fetch(&fetcher);
    let elapsed = started.elapsed();
    let error = status.last_error.clone().expect("an error");
    assert!(error.contains("timed out"), "{error}");
    assert!(elapsed >= Duration::from_millis(750), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(800 + 700), "{elapsed:?}");
    assert_eq!(status.consecutive_failures, 1);
    let line = status.summary_line();
    assert!(line.starts_with("hang: started "), "{line}");
    assert!(
        line.contains("- bytes, - lines, - parsed, - new, - rejected, - duplicates, - truncated, error: timed out"),
        "{line}"
    );
    assert_eq!(world.count("SELECT count(*) FROM proxies"), 0);
}

#[test]
fn failing_lists_record_why() {
    let world = World::new(FarmSpec::new());
    let cases = [
        ("error500", "http status 500"),
        ("html", "not a proxy list: the body is an HTML page"),
        ("json-error", "not a proxy list: the body is JSON"),
        ("ratelimit", "http status 429"),
        ("unavailable", "http status 503"),
        ("redirect-loop", "redirect"),
        ("binary", "not a proxy list"),
        ("no-such-list", "http status 404"),
    ];
    for (list, expected) in cases {
        let fetcher = world.one_list("bad", list, "timeout_ms = 3000", "http");
        let (status, retry_after) = fetcher.fetch_list(0, FetchKind::Manual);
        let error = status.last_error.clone().unwrap_or_default();
        assert!(error.contains(expected), "{list}: {error:?}");
        assert!(status.last_success_at.is_none(), "{list}");
        match list {
            "ratelimit" => assert_eq!(retry_after, Some(Duration::from_secs(2))),
            // Retry-After as an HTTP-date 3 s ahead, in whole seconds.
            "unavailable" => assert!(
                retry_after.is_some_and(
                    |wait| wait >= Duration::from_secs(1) && wait <= Duration::from_secs(3)
                ),
                "{retry_after:?}"
            ),
            _ => assert_eq!(retry_after, None, "{list}"),
        }
    }
    assert_eq!(world.count("SELECT count(*) FROM proxies"), 0);
}

#[test]
fn a_long_line_is_rejected_not_buffered_as_a_proxy() {
    let world = World::new(FarmSpec::new());
    let status = fetch(&world.one_list(
        "longline",
        "longline",
        "max_bytes = 20000000\ntimeout_ms = 10000",
        "http",
    ));
    assert_ok(&status);
    assert_eq!(
        (
            status.counts.lines,
            status.counts.rejected,
            status.counts.parsed
        ),
        (1, 1, 0)
    );
    assert!(!status.counts.truncated);

    // Cut at a small cap, the partial line is dropped.
    let cut = fetch(&world.one_list("longline", "longline", "max_bytes = 100000", "http"));
    assert_ok(&cut);
    assert!(cut.counts.truncated);
    assert_eq!(
        (cut.counts.lines, cut.counts.rejected, cut.counts.parsed),
        (0, 0, 0)
    );
    assert_eq!(world.count("SELECT count(*) FROM proxies"), 0);
}

// ---------------------------------------------------------------------------
// 2. Independent schedules, backoff and Retry-After

#[test]
fn a_hanging_list_does_not_delay_another_lists_schedule() {
    let world = World::new(every_behaviour([127, 24, 0, 1]));
    let config = world.config(
        "timeout_ms = 2500",
        "[source.hang]\nurl = http://{farm}/lists/hang\ninterval_seconds = 1\n\
         [source.plain]\nurl = http://{farm}/lists/plain\ninterval_seconds = 1\n",
    );
    let fetcher = world.fetcher(&config, "test");
    let shutdown = Shutdown::new();
    let started = Instant::now();
    let supervisor = proxy_pool::supervisor::Supervisor::new(shutdown.clone());
    let handles = fetcher
        .start(&supervisor, shutdown.signal())
        .expect("start");
    // Fixed rate: fetches at 0, 1, 2, 3, 4 s, while `hang` holds its thread
    // for 2.5 s at a time.
    wait_for("five fetches of plain", Duration::from_millis(5500), || {
        world.farm.list_hits("plain") >= 5
    });
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(3900),
        "too fast: {elapsed:?}"
    );
    assert!(world.farm.list_hits("hang") <= 3);
    shutdown.trigger();
    for handle in handles {
        handle.join().expect("fetch thread");
    }
    assert!(world.farm.list_hits("plain") <= 6);
    let statuses = fetcher.statuses();
    assert_eq!(statuses[1].last_error, None);
    assert!(statuses[0]
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("timed out")));
}

#[test]
fn a_failing_list_backs_off_and_recovers() {
    let world = World::new(FarmSpec::new());
    world.farm.set_list(
        "flaky",
        "<html><body>try again later</body></html>\n".to_string(),
    );
    world.farm.set_list("steady", "127.31.0.1:80\n".to_string());
    let config = world.config(
        "timeout_ms = 1000",
        "[source.flaky]\nurl = http://{farm}/lists/flaky\ninterval_seconds = 60\n\
         [source.steady]\nurl = http://{farm}/lists/steady\ninterval_seconds = 1\n",
    );
    let fetcher = world.fetcher(&config, "test");
    let shutdown = Shutdown::new();
    let supervisor = proxy_pool::supervisor::Supervisor::new(shutdown.clone());
    let handles = fetcher
        .start(&supervisor, shutdown.signal())
        .expect("start");
    wait_for("the first failure", Duration::from_secs(3), || {
        fetcher.statuses()[0].consecutive_failures == 1
    });
    world.farm.set_list("flaky", "127.31.0.2:80\n".to_string());
    // While the steady list is fetched every second, the failing one waits
    // for its first backoff (5 s) before it tries again.
    wait_for("four fetches of steady", Duration::from_secs(5), || {
        world.farm.list_hits("steady") >= 4
    });
    assert_eq!(world.farm.list_hits("flaky"), 1);
    wait_for(
        "the failing list to recover",
        Duration::from_secs(8),
        || fetcher.statuses()[0].last_success_at.is_some(),
    );
    // Recovered after its first backoff (5 s), long before its 60 s interval.
    assert_eq!(world.farm.list_hits("flaky"), 2);
    shutdown.trigger();
    for handle in handles {
        handle.join().expect("fetch thread");
    }
    let status = &fetcher.statuses()[0];
    assert_eq!(
        (status.last_error.as_deref(), status.consecutive_failures),
        (None, 0)
    );
    assert_eq!(
        world.count("SELECT count(*) FROM proxies WHERE ip = '127.31.0.2'"),
        1
    );
}

#[test]
fn retry_after_is_honoured_by_the_schedule() {
    let world = World::new(FarmSpec::new());
    let config = world.config(
        "",
        "[source.ratelimit]\nurl = http://{farm}/lists/ratelimit\ninterval_seconds = 1\n",
    );
    let fetcher = world.fetcher(&config, "test");
    let shutdown = Shutdown::new();
    let supervisor = proxy_pool::supervisor::Supervisor::new(shutdown.clone());
    let handles = fetcher
        .start(&supervisor, shutdown.signal())
        .expect("start");
    wait_for("the first attempt", Duration::from_secs(3), || {
        world.farm.list_hits("ratelimit") >= 1
    });
    let first = Instant::now();
    wait_for("the second attempt", Duration::from_secs(8), || {
        world.farm.list_hits("ratelimit") >= 2
    });
    let gap = first.elapsed();
    shutdown.trigger();
    for handle in handles {
        handle.join().expect("fetch thread");
    }
    // The farm asks for 2 s: not before, whatever the one-second interval says.
    assert!(gap >= Duration::from_millis(1950), "{gap:?}");
}

// ---------------------------------------------------------------------------
// 3. Re-listing: never delete, never forget

#[test]
fn relisting_moves_last_seen_and_keeps_everything_else() {
    let world = World::new(FarmSpec::new());
    let body = "127.32.0.1:80\n127.32.0.2:80\nsocks5://u:p1@127.32.0.3:1080\n";
    world.farm.set_list("a", body.to_string());
    let fetcher = world.one_list("a", "a", "", "http");
    let first = fetch(&fetcher);
    assert_ok(&first);
    assert_eq!(first.counts.new, 3);
    let mut client = world.db.client();
    let before: Vec<(
        i64,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = client
        .query(
            "SELECT id, first_seen_at, last_seen_at FROM proxies ORDER BY id",
            &[],
        )
        .expect("select")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let ids: Vec<i64> = before.iter().map(|r| r.0).collect();
    world
        .store
        .write_results(&[CheckRecord {
            id: ids[0],
            alive: true,
            latency_ms: Some(120),
            anonymity: Some(proxy_pool::proxy::Anonymity::Elite),
            supports_https: Some(true),
            https_checked: true,
            https_failure: None,
            country: Some("DE".into()),
            exit_ip: Some(IpAddr::from([127, 32, 0, 1])),
            dead_reason: None,
            evidence: None,
        }])
        .expect("write results");

    // The list again, with the password changed and one proxy more.
    let body = "127.32.0.1:80\n127.32.0.2:80\nsocks5://u:p2@127.32.0.3:1080\n127.32.0.4:80\n";
    world.farm.set_list("a", body.to_string());
    let second = fetch(&fetcher);
    assert_ok(&second);
    assert_eq!(second.counts.new, 1);
    assert_eq!(world.count("SELECT count(*) FROM proxies"), 4);
    for (id, first_seen, last_seen) in &before {
        let row = client
            .query_one(
                "SELECT first_seen_at, last_seen_at FROM proxies WHERE id = $1",
                &[id],
            )
            .expect("row");
        assert_eq!(row.get::<_, chrono::DateTime<chrono::Utc>>(0), *first_seen);
        assert!(row.get::<_, chrono::DateTime<chrono::Utc>>(1) > *last_seen);
    }
    let row = client
        .query_one(
            "SELECT is_active, latency_ms, anonymity, country, supports_https,
                    last_validated_at IS NOT NULL, check_count
             FROM proxies WHERE id = $1",
            &[&ids[0]],
        )
        .expect("row");
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Option<i32>>(1), Some(120));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("elite"));
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("DE"));
    assert_eq!(row.get::<_, Option<bool>>(4), Some(true));
    assert!(row.get::<_, bool>(5));
    assert_eq!(row.get::<_, i32>(6), 1);
    let password: Option<String> = client
        .query_one("SELECT password FROM proxies WHERE ip = '127.32.0.3'", &[])
        .expect("row")
        .get(0);
    assert_eq!(password.as_deref(), Some("p2"));

    // Nothing was ever deleted: close every connection that wrote, so that
    // its statistics are flushed, then read them.
    drop(fetcher);
    let World {
        db,
        farm: _farm,
        store,
    } = world;
    drop(store);
    let mut client = db.client();
    let mut stats = (0i64, 0i64);
    wait_for("the table statistics", Duration::from_secs(15), || {
        client
            .batch_execute("SELECT pg_stat_clear_snapshot()")
            .expect("clear snapshot");
        let row = client
            .query_one(
                "SELECT n_tup_ins, n_tup_del FROM pg_stat_user_tables WHERE relname = 'proxies'",
                &[],
            )
            .expect("stats");
        stats = (row.get(0), row.get(1));
        stats.0 >= 4
    });
    assert_eq!(stats, (4, 0));
}

#[test]
fn proxy_lists_and_yields_record_which_list_gave_what() {
    let world = World::new(FarmSpec::new());
    world.farm.set_list(
        "a",
        "127.33.0.1:80\n127.33.0.2:80\n127.33.0.3:80\n".to_string(),
    );
    world
        .farm
        .set_list("b", "127.33.0.3:80\n127.33.0.4:80\n".to_string());
    let config = world.config(
        "",
        "[source.a]\nurl = http://{farm}/lists/a\n[source.b]\nurl = http://{farm}/lists/b\n",
    );
    let fetcher = world.fetcher(&config, "test");
    for status in fetcher.fetch_all_once(FetchKind::Manual) {
        assert_ok(&status);
    }
    let pairs = |world: &World| -> Vec<(String, String)> {
        world
            .db
            .client()
            .query(
                "SELECT l.source, host(p.ip) FROM proxy_lists l JOIN proxies p ON p.id = l.proxy_id
                 ORDER BY 1, 2",
                &[],
            )
            .expect("select")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let expected: Vec<(String, String)> = [
        ("a", "127.33.0.1"),
        ("a", "127.33.0.2"),
        ("a", "127.33.0.3"),
        ("b", "127.33.0.3"),
        ("b", "127.33.0.4"),
    ]
    .iter()
    .map(|(s, ip)| (s.to_string(), ip.to_string()))
    .collect();
    assert_eq!(pairs(&world), expected);
    // A proxy's first list is in its own row: only b's listing of .3 needs
    // a link row.
    assert_eq!(world.count("SELECT count(*) FROM proxy_sources"), 1);
    // Fetched again, nothing is recorded twice.
    for status in fetcher.fetch_all_once(FetchKind::Manual) {
        assert_ok(&status);
    }
    assert_eq!(pairs(&world), expected);
    assert_eq!(world.count("SELECT count(*) FROM proxy_sources"), 1);

    // .3 works now, .1 worked once; .4 never did.
    world
        .db
        .client()
        .batch_execute(
            "UPDATE proxies SET is_active = true, alive_count = 2 WHERE ip = '127.33.0.3';
             UPDATE proxies SET is_active = false, alive_count = 1 WHERE ip = '127.33.0.1';",
        )
        .expect("mark");
    let yields = world.store.list_yields().expect("yields");
    let row = |source: &str, listed, active_now, ever_active| ListYield {
        list: source.to_string(),
        listed,
        active_now,
        ever_active,
    };
    assert_eq!(yields, vec![row("a", 3, 1, 2), row("b", 2, 1, 1)]);
    fetcher.refresh_yields();
    let statuses = fetcher.statuses();
    assert_eq!(statuses[0].yields, Some(row("a", 3, 1, 2)));
    assert_eq!(statuses[1].yields, Some(row("b", 2, 1, 1)));
}

/// A table written by a binary older than `lists`: every link is a row of
/// proxy_sources and no proxy has a first list. Re-listings add nothing, a
/// new proxy gets its first list, and the yields count each pair once (also
/// a link row naming a proxy's first list, as an older binary would add).
#[test]
fn links_stored_before_first_lists_count_once() {
    let world = World::new(FarmSpec::new());
    world
        .db
        .client()
        .batch_execute(
            "INSERT INTO proxies (protocol, ip, port) VALUES
                 ('http', '127.36.0.1', 80), ('http', '127.36.0.2', 80);
             INSERT INTO proxy_sources (source, proxy_id) SELECT 'old', id FROM proxies;",
        )
        .expect("old rows");
    world.farm.set_list(
        "old",
        "127.36.0.1:80\n127.36.0.2:80\n127.36.0.3:80\n".to_string(),
    );
    let fetcher = world.one_list("old", "old", "", "http");
    assert_ok(&fetch(&fetcher));
    assert_eq!(world.count("SELECT count(*) FROM proxy_sources"), 2);
    assert_eq!(
        world.count("SELECT count(*) FROM proxies WHERE first_list_id IS NOT NULL"),
        1
    );
    // An older binary re-listing the new proxy adds the link it knows.
    world
        .db
        .client()
        .batch_execute(
            "INSERT INTO proxy_sources (source, proxy_id)
             SELECT 'old', id FROM proxies WHERE ip = '127.36.0.3'",
        )
        .expect("old link");
    assert_eq!(world.count("SELECT count(*) FROM proxy_lists"), 3);
    let yields = world.store.list_yields().expect("yields");
    assert_eq!(
        yields,
        vec![ListYield {
            list: "old".to_string(),
            listed: 3,
            active_now: 0,
            ever_active: 0,
        }]
    );
}

/// A database made by the first schema, with its rows, is migrated
/// in place (twice: the migration is idempotent): every value already there
/// stays, the indexes and constraints dropped since are gone, and fetches
/// and yields work on it as on a new one.
#[test]
fn a_database_of_the_first_schema_is_upgraded_in_place() {
    let db = TestDb::new();
    db.client()
        .batch_execute(include_str!("fixtures/schema-first.sql"))
        .expect("first schema");
    db.client()
        .batch_execute(
            "INSERT INTO proxies (protocol, ip, port, is_active, latency_ms, anonymity, country,
                                  last_validated_at, supports_https, exit_ip, check_count,
                                  alive_count)
             VALUES ('http', '127.37.0.1', 80, true, 120, 'elite', 'DE', now(), true,
                     '127.37.0.1', 3, 3);
             INSERT INTO proxies (protocol, ip, port) VALUES ('http', '127.37.0.2', 80);
             INSERT INTO proxy_sources (source, proxy_id) SELECT 'old', id FROM proxies;",
        )
        .expect("rows of the first schema");
    let dump = |db: &TestDb| -> Vec<String> {
        let columns = "id, protocol, ip, port, username, password, is_active, latency_ms,
                       anonymity, country, first_seen_at, last_seen_at, last_validated_at,
                       supports_https, exit_ip, check_count, alive_count";
        let mut rows: Vec<String> = db
            .client()
            .query(
                &format!("SELECT row_to_json(p)::text FROM (SELECT {columns} FROM proxies ORDER BY id) p"),
                &[],
            )
            .expect("dump")
            .iter()
            .map(|r| r.get(0))
            .collect();
        rows.extend(
            db.client()
                .query(
                    "SELECT row_to_json(s)::text FROM proxy_sources s ORDER BY source, proxy_id",
                    &[],
                )
                .expect("dump links")
                .iter()
                .map(|r| r.get::<_, String>(0)),
        );
        rows
    };
    let before = dump(&db);
    let world = World::on(db, FarmSpec::new());
    world.store.migrate().expect("migrate again");
    assert_eq!(dump(&world.db), before);
    assert_eq!(
        world.count(
            "SELECT count(*) FROM pg_indexes WHERE indexname IN
                 ('proxies_never_validated', 'proxies_relisted_inactive', 'proxy_sources_proxy')"
        ),
        0
    );
    assert_eq!(
        world.count(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'proxy_sources_proxy_id_fkey'"
        ),
        0
    );
    world.farm.set_list(
        "old",
        "127.37.0.1:80\n127.37.0.2:80\n127.37.0.3:80\n".to_string(),
    );
    let fetcher = world.one_list("old", "old", "", "http");
    let status = fetch(&fetcher);
    assert_ok(&status);
    assert_eq!((status.counts.parsed, status.counts.new), (3, 1));
    // The validated proxy keeps its results.
    assert_eq!(
        world.count(
            "SELECT count(*) FROM proxies WHERE ip = '127.37.0.1' AND is_active
             AND latency_ms = 120 AND anonymity = 'elite' AND check_count = 3"
        ),
        1
    );
    let yields = world.store.list_yields().expect("yields");
    assert_eq!(
        yields,
        vec![ListYield {
            list: "old".to_string(),
            listed: 3,
            active_now: 1,
            ever_active: 1,
        }]
    );
}

// ---------------------------------------------------------------------------
// 4. Conditional requests

#[test]
fn an_unchanged_list_is_not_fetched_again_and_a_changed_one_is() {
    let world = World::new(FarmSpec::new());
    world
        .farm
        .set_list("etag", "127.34.0.1:80\n127.34.0.2:80\n".to_string());
    let fetcher = world.one_list("etag", "etag", "", "http");
    let first = fetch(&fetcher);
    assert_ok(&first);
    assert_eq!(first.counts.parsed, 2);
    let seen = |world: &World| -> chrono::DateTime<chrono::Utc> {
        world
            .db
            .client()
            .query_one("SELECT max(last_seen_at) FROM proxies", &[])
            .expect("max")
            .get(0)
    };
    let seen_first = seen(&world);

    let second = fetch(&fetcher);
    assert_ok(&second);
    assert!(second.not_modified(), "{}", second.summary_line());
    // The counts are the unchanged list's, with nothing new.
    assert!(
        second
            .summary_line()
            .contains(" ms, not modified, 28 bytes, 2 lines, 2 parsed, 0 new, 0 rejected"),
        "{}",
        second.summary_line()
    );
    assert_eq!(world.farm.list_hits("etag"), 2);
    // Nothing was parsed or written.
    assert_eq!(seen(&world), seen_first);

    world
        .farm
        .set_list("etag", "127.34.0.1:80\n127.34.0.3:80\n".to_string());
    let third = fetch(&fetcher);
    assert_ok(&third);
    assert!(!third.not_modified());
    assert_eq!((third.counts.parsed, third.counts.new), (2, 1));
    assert!(seen(&world) > seen_first);
    assert_eq!(world.count("SELECT count(*) FROM proxies"), 3);
}

/// A 304 stands for "the list you stored": after a database outage the
/// database may have lost it (a crash without synchronous commits, a restore
/// from a backup), so the next fetch asks unconditionally and stores it whole.
#[test]
fn after_a_database_outage_an_unchanged_list_is_stored_whole_again() {
    let world = World::new(FarmSpec::new());
    world
        .farm
        .set_list("restored", "127.35.0.1:80\n127.35.0.2:80\n".to_string());
    let config = world.config(
        "",
        "[source.restored]\nurl = http://{farm}/lists/restored\ninterval_seconds = 60\n",
    );
    let health = Arc::new(Health::new());
    health.record_database(true, None);
    let fetcher = Arc::new(Fetcher::new(
        &config,
        world.store.clone(),
        health.clone(),
        "test".to_string(),
    ));
    assert_ok(&fetch(&fetcher));
    assert!(fetch(&fetcher).not_modified());

    // The database comes back from a backup taken before the list was stored.
    world
        .db
        .client()
        .batch_execute("TRUNCATE proxy_sources, proxies")
        .expect("truncate");
    health.record_database(false, Some(&"connection refused"));
    health.record_database(true, None);

    let after = fetch(&fetcher);
    assert_ok(&after);
    assert!(!after.not_modified(), "{}", after.summary_line());
    assert_eq!((after.counts.parsed, after.counts.new), (2, 2));
    assert_eq!(world.count("SELECT count(*) FROM proxies"), 2);
    assert_eq!(world.farm.list_hits("restored"), 3);
    // Stored again, the list may be answered with 304 again.
    assert!(fetch(&fetcher).not_modified());
}

// ---------------------------------------------------------------------------
// 5. One scheduled fetch per interval among instances

#[test]
fn instances_share_a_scheduled_fetch_but_not_a_manual_one() {
    let world = World::new(FarmSpec::new());
    world.farm.set_list("shared", "127.35.0.1:80\n".to_string());
    let config = world.config(
        "",
        "[source.shared]\nurl = http://{farm}/lists/shared\ninterval_seconds = 60\n",
    );
    let a = world.fetcher(&config, "instance-a");
    let b = world.fetcher(&config, "instance-b");

    let (status, _) = a.fetch_list(0, FetchKind::Scheduled);
    assert!(!status.skipped());
    assert_ok(&status);
    assert_eq!(world.farm.list_hits("shared"), 1);

    let (status, _) = b.fetch_list(0, FetchKind::Scheduled);
    assert!(status.skipped(), "{}", status.summary_line());
    assert!(status.summary_line().contains("skipped"));
    let (status, _) = a.fetch_list(0, FetchKind::Scheduled);
    assert!(status.skipped());
    assert_eq!(world.farm.list_hits("shared"), 1);

    let (status, _) = b.fetch_list(0, FetchKind::Manual);
    assert!(!status.skipped());
    assert_ok(&status);
    assert_eq!(world.farm.list_hits("shared"), 2);
    let (status, _) = a.fetch_list(0, FetchKind::Manual);
    assert!(!status.skipped());
    assert_eq!(world.farm.list_hits("shared"), 3);

    let fetched_by: String = world
        .db
        .client()
        .query_one(
            "SELECT fetched_by FROM fetch_leases WHERE source = 'shared'",
            &[],
        )
        .expect("lease")
        .get(0);
    assert_eq!(fetched_by, "instance-a");
}

#[test]
fn the_claim_opens_again_after_the_interval() {
    let world = World::new(FarmSpec::new());
    world.farm.set_list("shared", "127.35.0.2:80\n".to_string());
    let config = world.config(
        "",
        "[source.shared]\nurl = http://{farm}/lists/shared\ninterval_seconds = 1\n",
    );
    let a = world.fetcher(&config, "instance-a");
    let b = world.fetcher(&config, "instance-b");
    let started = Instant::now();
    assert!(!a.fetch_list(0, FetchKind::Scheduled).0.skipped());
    assert!(b.fetch_list(0, FetchKind::Scheduled).0.skipped());
    wait_for("b's claim", Duration::from_secs(3), || {
        !b.fetch_list(0, FetchKind::Scheduled).0.skipped()
    });
    // Within the interval less its 10% slack for clock jitter.
    assert!(started.elapsed() >= Duration::from_millis(850));
    assert_eq!(world.farm.list_hits("shared"), 2);
}

// ---------------------------------------------------------------------------
// 6. Passwords never reach the logs

#[test]
fn passwords_never_appear_in_fetch_output_or_logs() {
    let world = World::new(FarmSpec::new());
    let body = "http://alice:hunter2-a@127.36.0.1:80\n\
        socks5://bob:hunter2%2Db@127.36.0.2:1080\n\
        127.36.0.3:8080:carol:hunter2-c\n\
        dave:hunter2-d@127.36.0.4:3128\n\
        http://eve:hunter2-e@999.36.0.5:80\n\
        127.36.0.6:0:frank:hunter2-f\n\
        ftp://grace:hunter2-g@127.36.0.7:21\n";
    world.farm.set_list("secret", body.to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let farm = world.farm.server_addr();
    let config = format!(
        "[database]\nurl = {}\n\
         [fetcher]\nallow_private_addresses = true\ntimeout_ms = 1000\n\
         source_urls = http://lister:hunter2-url@{farm}/lists/secret,http://lister:hunter2-url2@{farm}/lists/error500,http://lister:hunter2-url3@{farm}/lists/hang\n\
         [source.named]\nurl = http://lister:hunter2-url4@{farm}/lists/redirect-loop\n",
        world.db.url
    );
    let path = dir.path().join("config.ini");
    std::fs::write(&path, config).expect("config");
    let output = Command::new(support::binary())
        .arg("--config")
        .arg(&path)
        .arg("fetch")
        .env_remove("DATABASE_URL")
        // Everything at debug but the database driver's, which logs statement
        // parameters (the stored proxies) verbatim.
        .env("RUST_LOG", "debug,tokio_postgres=info")
        .stdin(Stdio::null())
        .output()
        .expect("run proxy-pool fetch");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // A line per source, the stored list first.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[0].contains("4 parsed, 4 new, 3 rejected"), "{stdout}");
    assert!(
        lines[1].contains("error") && lines[1].contains("500"),
        "{stdout}"
    );
    assert!(lines[2].contains("timed out"), "{stdout}");
    assert!(
        lines[3].starts_with("named: started ") && lines[3].contains("error: "),
        "{stdout}"
    );
    // Rejected lines are logged with their numbers (5: 999.36.0.5, 6: port 0, 7: ftp).
    for needle in [
        "line 5 rejected (invalid_ip)",
        "line 6 rejected (invalid_port)",
        "line 7 rejected (unknown_scheme)",
    ] {
        assert!(stderr.contains(needle), "{needle}:\n{stderr}");
    }
    for text in [&stdout, &stderr] {
        assert!(!text.contains("hunter2"), "a password leaked:\n{text}");
    }
    assert_eq!(
        world.count("SELECT count(*) FROM proxies WHERE password LIKE 'hunter2-%'"),
        4
    );
}

#[test]
fn import_prints_counts_and_hides_passwords() {
    let world = World::new(FarmSpec::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let list = dir.path().join("list.txt");
    std::fs::write(
        &list,
        "127.37.0.1:80\n127.37.0.1:80\nhttp://u:hunter2@127.37.0.2:80\nu:hunter2@999.1.1.1:80\n",
    )
    .expect("list");
    let config = dir.path().join("config.ini");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = {}\n[fetcher]\nallow_private_addresses = true\nsource_urls = http://127.0.0.1:9/unused\n",
            world.db.url
        ),
    )
    .expect("config");
    let output = Command::new(support::binary())
        .arg("--config")
        .arg(&config)
        .args(["import", "--protocol", "socks4"])
        .arg(&list)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run proxy-pool import");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("4 lines, 2 parsed, 2 new, 1 rejected, 1 duplicates"),
        "{stdout}"
    );
    assert!(stdout.ends_with(" ms\n"), "{stdout:?}");
    assert!(
        !stdout.contains("hunter2") && !stderr.contains("hunter2"),
        "{stdout}\n{stderr}"
    );
    assert_eq!(
        world.rows(),
        [
            key(Protocol::Socks4, "127.37.0.1", 80, None),
            key(
                Protocol::Http,
                "127.37.0.2",
                80,
                Some(("u", Some("hunter2")))
            ),
        ]
        .into_iter()
        .collect()
    );
}

// ---------------------------------------------------------------------------
// 7. Private addresses, counts per fetch, the fetch command's lines, logs

/// The library's log records (targets `proxy_pool::*`, down to debug),
/// captured in memory for every test of this binary; each test looks only
/// at lines naming its own sources.
mod captured_log {
    use std::sync::{Mutex, Once};

    static LINES: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.target().starts_with("proxy_pool")
        }

        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                let line = record.args().to_string();
                LINES.lock().unwrap().push((record.level(), line));
            }
        }

        fn flush(&self) {}
    }

    pub fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            log::set_logger(&Capture).expect("no other logger");
            log::set_max_level(log::LevelFilter::Debug);
        });
    }

    /// Captured lines containing `needle`, in order.
    pub fn lines(needle: &str) -> Vec<(log::Level, String)> {
        LINES
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, line)| line.contains(needle))
            .cloned()
            .collect()
    }
}

#[test]
fn private_addresses_are_rejected_end_to_end_unless_allowed() {
    let world = World::new(every_behaviour([127, 25, 0, 1]));
    let farm_lines: String = world
        .farm
        .manifest()
        .iter()
        .map(|entry| format!("{}\n", entry.host_port()))
        .collect();
    world.farm.set_list(
        "mixed",
        format!("{farm_lines}8.8.8.8:3128\n10.1.2.3:8080\n[2a00:1450::1]:8080\n[::1]:8080\n"),
    );
    let config = world.config_allowing(
        false,
        "",
        "[source.mixed]\nurl = http://{farm}/lists/mixed\n",
    );
    let status = fetch(&world.fetcher(&config, "test"));
    assert_ok(&status);
    let private = world.farm.manifest().len() + 2;
    assert_eq!(
        (
            status.counts.parsed,
            status.counts.new,
            status.counts.rejected
        ),
        (2, 2, private as u64),
        "{}",
        status.summary_line()
    );
    let expected: HashSet<ProxyKey> = [
        key(Protocol::Http, "8.8.8.8", 3128, None),
        key(Protocol::Http, "2a00:1450::1", 8080, None),
    ]
    .into_iter()
    .collect();
    assert_eq!(world.rows(), expected);
    assert_eq!(
        world.count("SELECT count(*) FROM proxies WHERE ip << '127.0.0.0/8' OR ip = '::1'"),
        0
    );

    // An IPv6 list whose every line is refused is a list that gave nothing,
    // not a JSON body.
    world
        .farm
        .set_list("v6", "[2001:db8::1]:80\n[2001:db8::2]:8080\n".to_string());
    let config = world.config_allowing(false, "", "[source.v6]\nurl = http://{farm}/lists/v6\n");
    let status = fetch(&world.fetcher(&config, "test"));
    assert_ok(&status);
    assert_eq!((status.counts.parsed, status.counts.rejected), (0, 2));
}

#[test]
fn the_counts_are_those_of_the_last_fetch_and_say_which_apply() {
    let world = World::new(FarmSpec::new());
    let fetcher = world.one_list("counted", "counted", "", "http");
    use proxy_pool::fetcher::parse::ListFormat;
    use proxy_pool::fetcher::{FetchStage, ListCounts};

    // No list yet: nothing counted.
    let missing = fetch(&fetcher);
    assert_eq!(missing.stage, FetchStage::NoBody);
    assert_eq!(
        (
            missing.counts.bytes,
            missing.counts.lines,
            missing.counts.parsed
        ),
        (0, 0, 0)
    );
    assert_eq!(missing.last_stored, None);
    assert!(missing
        .summary_line()
        .contains("- bytes, - lines, - parsed, - new"));

    let body = "127.39.0.1:80\n127.39.0.2:80\nnot a proxy\n";
    world.farm.set_list("counted", body.to_string());
    let stored = fetch(&fetcher);
    assert_ok(&stored);
    let counts = ListCounts {
        format: ListFormat::Text,
        bytes: body.len() as u64,
        lines: 3,
        parsed: 2,
        new: 2,
        rejected: 1,
        duplicates: 0,
        truncated: false,
    };
    assert_eq!(stored.stage, FetchStage::Stored);
    assert_eq!(stored.last_stored, Some(counts));

    // A failure after a success: its own counts, not the success's. A page's
    // text is no rejected line: only what tries to be a proxy is.
    let page = "<html><body>maintenance</body></html>\n";
    world.farm.set_list("counted", page.to_string());
    let failed = fetch(&fetcher);
    assert_eq!(failed.stage, FetchStage::NotAList);
    assert_eq!(
        (
            failed.counts.bytes,
            failed.counts.lines,
            failed.counts.parsed,
            failed.counts.new,
            failed.counts.rejected
        ),
        (page.len() as u64, 1, 0, 0, 0)
    );
    assert_eq!(failed.counts.format, ListFormat::Html);
    assert_eq!(failed.last_stored, Some(counts));
    assert!(failed.last_success_at.is_some());
    let line = failed.summary_line();
    assert!(
        line.contains(&format!(
            "{} bytes, 1 lines (html), 0 parsed, - new, 0 rejected, 0 duplicates, not truncated, \
             error: not a proxy list: the body is an HTML page",
            page.len()
        )),
        "{line}"
    );

    // The stored list again: 304, with the stored list's counts.
    world.farm.set_list("counted", body.to_string());
    let unchanged = fetch(&fetcher);
    assert_ok(&unchanged);
    assert_eq!(unchanged.stage, FetchStage::NotModified);
    assert_eq!(
        (
            unchanged.counts.bytes,
            unchanged.counts.parsed,
            unchanged.counts.new
        ),
        (body.len() as u64, 2, 0)
    );
    assert_eq!(unchanged.fetches, 4);
}

#[test]
fn the_fetch_command_prints_every_count_error_and_yield_per_list() {
    let world = World::new(FarmSpec::new());
    world.farm.set_list(
        "good",
        "127.39.1.1:80\n127.39.1.2:80\n127.39.1.3:80\nnot a proxy\n".to_string(),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let farm = world.farm.server_addr();
    let path = dir.path().join("config.ini");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = {}\n[fetcher]\nallow_private_addresses = true\ntimeout_ms = 2000\n\
             [source.good]\nurl = http://{farm}/lists/good\n\
             [source.page]\nurl = http://{farm}/lists/html\n\
             [source.down]\nurl = http://{farm}/lists/error500\n",
            world.db.url
        ),
    )
    .expect("config");
    let run = || {
        let output = Command::new(support::binary())
            .arg("--config")
            .arg(&path)
            .arg("fetch")
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run proxy-pool fetch");
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(output.status.success(), "{stdout}");
        stdout
    };
    let started = r"started \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, \d+ ms";
    let html = r"\d+ bytes, \d+ lines \(html\), 0 parsed, - new, \d+ rejected, 0 duplicates, not truncated";
    let expect = |stdout: &str, good: &str| {
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 3, "{stdout}");
        let patterns = [
            format!("^good: {started}, 54 bytes, 4 lines, 3 parsed, {good}$"),
            format!(
                "^page: {started}, {html}, error: not a proxy list: the body is an HTML page, \
                 yield 0 active now / 0 ever active$"
            ),
            format!(
                "^down: {started}, - bytes, - lines, - parsed, - new, - rejected, - duplicates, \
                 - truncated, error: http status 500, yield 0 active now / 0 ever active$"
            ),
        ];
        for (line, pattern) in lines.iter().zip(&patterns) {
            let regex = regex::Regex::new(pattern).expect("regex");
            assert!(regex.is_match(line), "{line}\ndoes not match\n{pattern}");
        }
    };
    expect(
        &run(),
        "3 new, 1 rejected, 0 duplicates, not truncated, no error, yield 0 active now / 0 ever active",
    );
    // One works now and two did once: the yield is read after the fetch.
    world
        .db
        .client()
        .batch_execute(
            "UPDATE proxies SET is_active = true, alive_count = 3 WHERE ip = '127.39.1.1';
             UPDATE proxies SET alive_count = 1 WHERE ip = '127.39.1.2';",
        )
        .expect("mark");
    expect(
        &run(),
        "0 new, 1 rejected, 0 duplicates, not truncated, no error, yield 1 active now / 2 ever active",
    );
}

#[test]
fn rejected_lines_are_logged_with_their_numbers() {
    captured_log::install();
    let world = World::new(FarmSpec::new());
    world.farm.set_list(
        "numbered",
        "# header\n127.39.2.1:80\n999.1.1.1:80\n127.39.2.2:80\nftp://127.39.2.3:21\n".to_string(),
    );
    let status = fetch(&world.one_list("numbered-list", "numbered", "", "http"));
    assert_ok(&status);
    let lines = captured_log::lines("numbered-list: line ");
    let texts: Vec<&str> = lines.iter().map(|(_, line)| line.as_str()).collect();
    assert_eq!(
        texts,
        vec![
            "numbered-list: line 3 rejected (invalid_ip): 999.1.1.1:80",
            "numbered-list: line 5 rejected (unknown_scheme): ftp://127.39.2.3:21",
        ]
    );
}

#[test]
fn a_failing_list_warns_once_and_every_fetch_logs_a_summary() {
    captured_log::install();
    let world = World::new(FarmSpec::new());
    let config = world.config(
        "",
        "[source.failing-once]\nurl = http://{farm}/lists/error500\ninterval_seconds = 1\n",
    );
    let fetcher = world.fetcher(&config, "test");
    let shutdown = Shutdown::new();
    let supervisor = proxy_pool::supervisor::Supervisor::new(shutdown.clone());
    let handles = fetcher
        .start(&supervisor, shutdown.signal())
        .expect("start");
    // The backoff is capped at the one-second grid: a retry every second.
    wait_for("four attempts", Duration::from_secs(8), || {
        world.farm.list_hits("error500") >= 4
    });
    shutdown.trigger();
    for handle in handles {
        handle.join().expect("fetch thread");
    }
    let fetches = fetcher.statuses()[0].fetches as usize;
    let summaries = captured_log::lines("fetch failing-once: started ");
    assert_eq!(summaries.len(), fetches, "{summaries:#?}");
    assert!(fetches >= 4);
    for (_, line) in &summaries {
        assert!(line.contains("error: http status 500"), "{line}");
    }
    let warnings: Vec<_> = summaries
        .iter()
        .filter(|(level, _)| *level <= log::Level::Warn)
        .collect();
    assert_eq!(warnings.len(), 1, "{summaries:#?}");
    assert_eq!(summaries[0].0, log::Level::Warn);
    assert!(summaries[1..]
        .iter()
        .all(|(level, line)| *level == log::Level::Debug && line.contains("in a row")));
}

#[test]
fn a_start_up_fetch_skipped_for_the_fleet_is_logged_at_info() {
    captured_log::install();
    let world = World::new(FarmSpec::new());
    world.farm.set_list("fleet", "127.39.3.1:80\n".to_string());
    let config = world.config(
        "",
        "[source.fleet-list]\nurl = http://{farm}/lists/fleet\ninterval_seconds = 60\n",
    );
    let first = world.fetcher(&config, "instance-a");
    assert_ok(&first.fetch_list(0, FetchKind::Scheduled).0);
    // Instance b starts (or a restarts) within the interval.
    let second = world.fetcher(&config, "instance-b");
    let shutdown = Shutdown::new();
    let supervisor = proxy_pool::supervisor::Supervisor::new(shutdown.clone());
    let handles = second.start(&supervisor, shutdown.signal()).expect("start");
    wait_for("the skip to be logged", Duration::from_secs(5), || {
        !captured_log::lines("fleet-list: fetched by instance-a at ").is_empty()
    });
    shutdown.trigger();
    for handle in handles {
        handle.join().expect("fetch thread");
    }
    let (level, line) = captured_log::lines("fleet-list: fetched by instance-a at ")[0].clone();
    assert_eq!(level, log::Level::Info);
    assert!(
        line.contains("next fetch is at the next tick, in 60 s"),
        "{line}"
    );
    assert_eq!(world.farm.list_hits("fleet"), 1);
    assert!(second.statuses()[0].skipped());
}

#[test]
fn post_admin_fetch_fetches_the_lists_now() {
    let world = World::new(FarmSpec::new());
    world.farm.set_list("admin", "127.39.4.1:80\n".to_string());
    let mut config = support::TestConfig::new(&world.db.url);
    config
        .set("fetcher", "source_urls", &world.farm.list_url("admin"))
        .set("fetcher", "interval_seconds", "3600");
    let service = support::Service::start(&config.text());
    wait_for("the start-up fetch", Duration::from_secs(20), || {
        world.farm.list_hits("admin") >= 1
    });
    // Its next scheduled fetch is an hour away: a second fetch is the one asked for.
    assert_eq!(world.farm.list_hits("admin"), 1);
    let answer = support::post(&service.url("/admin/fetch"), "");
    assert_eq!(answer.status, 202, "{}", answer.body);
    wait_for("the fetch asked for", Duration::from_secs(10), || {
        world.farm.list_hits("admin") >= 2
    });
}
