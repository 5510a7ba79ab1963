//! Shared test support: a fresh PostgreSQL database per test, the service
//! binary running on a free port, and a small HTTP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A database of its own for one test, created empty and dropped afterwards.
pub struct TestDb {
    pub url: String,
    admin_url: String,
    name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run the tests with scripts/test.sh, which provisions PostgreSQL",
    )
}

/// Replaces the database name in a postgres:// URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[after_scheme..]
        .find('/')
        .map(|i| after_scheme + i)
        .unwrap_or(base.len());
    format!("{}/{}{}", &base[..host_end], name, query)
}

impl TestDb {
    pub fn new() -> TestDb {
        let admin_url = admin_url();
        let name = format!(
            "pp_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let mut client = postgres::Client::connect(&admin_url, postgres::NoTls)
            .expect("connect to DATABASE_URL");
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create test database");
        TestDb {
            url: with_database(&admin_url, &name),
            admin_url,
            name,
        }
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.admin_url, postgres::NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_proxy-pool"))
}

/// A judge on a closed loopback port: a service under test whose config names
/// no `validation_target` of its own must not reach the default, httpbin.org
/// (nor the https check's default).
pub const OFFLINE_JUDGE: &str = "validation_target = http://127.0.0.1:9/get\nhttps_target =";

/// A minimal valid configuration for tests with `sections` after [database]
/// (each section may appear once). Without a `validation_target` in them,
/// the judge is [`OFFLINE_JUDGE`].
pub fn config_text(database_url: &str, sections: &str) -> String {
    let sections = if sections.contains("validation_target") {
        if sections.contains("https_target") {
            sections.to_string()
        } else {
            sections.replacen("[validator]\n", "[validator]\nhttps_target =\n", 1)
        }
    } else if sections.contains("[validator]\n") {
        sections.replacen(
            "[validator]\n",
            &format!("[validator]\n{OFFLINE_JUDGE}\n"),
            1,
        )
    } else {
        format!("{sections}\n[validator]\n{OFFLINE_JUDGE}\n")
    };
    format!("[database]\nurl = {database_url}\n{sections}\n")
}

/// The service binary running with a config file in its own directory.
pub struct Service {
    pub child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Starts `proxy-pool serve` with `config` (its `[server] bind` should use port 0).
    pub fn start(config: &str) -> Service {
        let dir = tempfile::tempdir().expect("tempdir");
        Service::start_in(dir, config)
    }

    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Service {
        let path = dir.path().join("config.ini");
        std::fs::write(&path, config).expect("write config");
        let mut child = Command::new(binary())
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn proxy-pool");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_writer = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("PROXY_POOL_TEST_LOG").is_some() {
                    eprintln!("service: {line}");
                }
                log_writer.lock().unwrap().push(line);
            }
        });
        let mut addr = String::new();
        wait_for("the service to listen", Duration::from_secs(30), || {
            let lines = log.lock().unwrap();
            if let Some(line) = lines.iter().find(|l| l.contains("listening on http://")) {
                addr = line.rsplit("http://").next().unwrap().trim().to_string();
                return true;
            }
            false
        });
        Service {
            child,
            addr,
            dir,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(&mut self) -> i32 {
        signal(self.child.id(), "TERM");
        let status = self.child.wait().expect("wait");
        status.code().unwrap_or(-1)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(pid: u32, name: &str) {
    Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
}

/// An HTTP answer: status and body text.
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn answer(response: ureq::http::Response<ureq::Body>) -> Answer {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = response.into_body().read_to_string().unwrap_or_default();
    Answer {
        status,
        body,
        headers,
    }
}

pub fn get(url: &str) -> Answer {
    answer(agent().get(url).call().expect("GET"))
}

pub fn get_with(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = agent().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(request.call().expect("GET"))
}

pub fn post(url: &str, body: &str) -> Answer {
    answer(
        agent()
            .post(url)
            .header("Content-Type", "application/json")
            .send(body)
            .expect("POST"),
    )
}

pub fn post_with(url: &str, body: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = agent().post(url).header("Content-Type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(request.send(body).expect("POST"))
}

/// A running service whose pool the farm has filled: the farm's `schemes`
/// list is its one list and the farm's judge its validation target. Fields
/// drop in order, so the service stops before the farm and the database go.
pub struct PopulatedService {
    pub service: Service,
    pub farm: proxy_farm::Farm,
    pub db: TestDb,
    /// How many farm proxies a correct validator finds alive.
    pub alive: usize,
}

/// The farm's https judge for every test of a binary, started once, and
/// the file with the CA that verifies it.
pub struct HttpsJudge {
    pub judge: proxy_farm::TlsJudge,
    pub ca_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

pub fn https_judge() -> &'static HttpsJudge {
    static JUDGE: std::sync::OnceLock<HttpsJudge> = std::sync::OnceLock::new();
    JUDGE.get_or_init(|| {
        let ca = proxy_farm::TestCa::new("proxy-pool validator tests").expect("test CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("ca.pem");
        ca.write_pem(&ca_file).expect("write the CA");
        // Port 443 where the tests may bind it, on an address of its own
        // (another test run may hold one).
        let start = fastrand::u8(1..=64);
        for offset in 0..64u8 {
            let last = (start + offset - 1) % 64 + 1;
            let ip = std::net::IpAddr::from([127, 44, 0, last]);
            let cert = ca.server_cert(&[ip]).expect("judge certificate");
            if let Ok(judge) =
                proxy_farm::TlsJudge::start(std::net::SocketAddr::new(ip, 443), &cert)
            {
                return HttpsJudge {
                    judge,
                    ca_file,
                    _dir: dir,
                };
            }
        }
        eprintln!("cannot bind port 443 (not root?): the https judge takes any port");
        let ip = std::net::IpAddr::from([127, 44, 0, 1]);
        let cert = ca.server_cert(&[ip]).expect("judge certificate");
        let judge = proxy_farm::TlsJudge::start(std::net::SocketAddr::new(ip, 0), &cert)
            .expect("start the https judge");
        HttpsJudge {
            judge,
            ca_file,
            _dir: dir,
        }
    })
}

impl HttpsJudge {
    /// The `[validator]` lines that make the https check ask this judge.
    pub fn config_lines(&self) -> String {
        format!(
            "https_target = {}?show_env=1\nhttps_ca_file = {}\n",
            self.judge.url(),
            self.ca_file.display()
        )
    }
}

/// The farm behind [`populated_service`]: working proxies of every protocol
/// and anonymity, plus dead ones the validator must leave out.
pub fn small_farm_spec() -> proxy_farm::FarmSpec {
    use proxy_farm::{Behaviour, FarmSpec, ProxyGroup};
    use proxy_pool::proxy::Protocol;
    FarmSpec::new()
        .group(ProxyGroup::new(Behaviour::Elite, 3))
        .group(ProxyGroup::new(Behaviour::Elite, 2).protocol(Protocol::Https))
        .group(ProxyGroup::new(Behaviour::Anonymous, 2))
        .group(ProxyGroup::new(Behaviour::Transparent, 1))
        .group(ProxyGroup::new(Behaviour::Socks5, 2))
        .group(ProxyGroup::new(Behaviour::Dead, 2))
}

/// Starts the farm and the service, and waits until every alive farm proxy
/// is active. `server_lines` go into the `[server]` section (e.g. an
/// `api_token`).
pub fn populated_service(server_lines: &str) -> PopulatedService {
    let https = https_judge();
    let spec = small_farm_spec().https_judge_port(https.judge.address().port());
    let farm = proxy_farm::Farm::start(spec).expect("start the farm");
    let alive = farm.manifest().iter().filter(|e| e.alive).count();
    let db = TestDb::new();
    let sections = format!(
        "[server]\nbind = 127.0.0.1:0\nworkers = 4\n{server_lines}\n\
         [fetcher]\nsource_urls = {list}\nallow_private_addresses = true\ntimeout_ms = 2000\n\
         [validator]\nvalidation_target = {judge}\n{https}validation_timeout_ms = 1000\n\
         connect_timeout_ms = 500\nvalidation_workers = 8\n\
         [scheduler]\ninterval_seconds = 2\n",
        list = farm.list_url("schemes"),
        judge = farm.judge_url(),
        https = https.config_lines(),
    );
    let service = Service::start(&config_text(&db.url, &sections));
    // /health is public, so this works with an api_token too.
    let health_url = service.url("/health");
    wait_for(
        &format!("{alive} active proxies"),
        Duration::from_secs(60),
        || {
            let answer = get(&health_url);
            answer.status == 200 && answer.json()["active_proxies"].as_u64() == Some(alive as u64)
        },
    );
    PopulatedService {
        service,
        farm,
        db,
        alive,
    }
}

// ---- API and persistence tests: configs, rows, raw HTTP ----

/// The schema, applied by tests that insert rows before the service starts.
pub const SCHEMA: &str = include_str!("../../schema.sql");

/// A test configuration built section by section; later `set`s of the same
/// key replace earlier ones, so a test states only what it changes.
#[derive(Clone, Debug)]
pub struct TestConfig {
    sections: Vec<(String, Vec<(String, String)>)>,
}

impl TestConfig {
    /// Quiet defaults: loopback port 0, nothing to fetch or validate that
    /// answers (port 9 on loopback refuses), long intervals, short timeouts.
    pub fn new(database_url: &str) -> TestConfig {
        let mut config = TestConfig {
            sections: Vec::new(),
        };
        config
            .set("database", "url", database_url)
            .set("database", "checkout_timeout_ms", "1000")
            .set("server", "bind", "127.0.0.1:0")
            .set("server", "workers", "4")
            .set("fetcher", "source_urls", "http://127.0.0.1:9/list.txt")
            .set("fetcher", "interval_seconds", "3600")
            .set("fetcher", "timeout_ms", "500")
            .set("fetcher", "allow_private_addresses", "true")
            .set("validator", "validation_target", "http://127.0.0.1:9/get")
            .set("validator", "https_target", "")
            .set("validator", "validation_timeout_ms", "1000")
            .set("validator", "connect_timeout_ms", "500")
            .set("scheduler", "interval_seconds", "3600")
            .set("state", "snapshot_path", "stats.bin")
            .set("state", "snapshot_interval_seconds", "3600")
            .set("state", "sync_interval_seconds", "1");
        config
    }

    pub fn set(&mut self, section: &str, key: &str, value: &str) -> &mut TestConfig {
        let index = match self.sections.iter().position(|(name, _)| name == section) {
            Some(index) => index,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let entries = &mut self.sections[index].1;
        match entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => entries.push((key.to_string(), value.to_string())),
        }
        self
    }

    pub fn text(&self) -> String {
        let mut text = String::new();
        for (section, entries) in &self.sections {
            text.push_str(&format!("[{section}]\n"));
            for (key, value) in entries {
                text.push_str(&format!("{key} = {value}\n"));
            }
        }
        text
    }
}

/// An active proxy row, as the validator would have left it.
#[derive(Clone, Debug)]
pub struct Row {
    pub protocol: &'static str,
    pub ip: &'static str,
    pub port: i32,
    pub username: Option<&'static str>,
    pub password: Option<&'static str>,
    pub latency_ms: Option<i32>,
    pub anonymity: Option<&'static str>,
    pub country: Option<&'static str>,
    pub supports_https: Option<bool>,
}

impl Row {
    pub fn http(ip: &'static str, port: i32) -> Row {
        Row {
            protocol: "http",
            ip,
            port,
            username: None,
            password: None,
            latency_ms: Some(100),
            anonymity: Some("elite"),
            country: Some("US"),
            supports_https: Some(false),
        }
    }

    /// The URL get-proxy hands out for this row.
    pub fn url(&self) -> String {
        match (self.username, self.password) {
            (Some(user), Some(password)) => {
                format!(
                    "{}://{user}:{password}@{}:{}",
                    self.protocol, self.ip, self.port
                )
            }
            (Some(user), None) => format!("{}://{user}@{}:{}", self.protocol, self.ip, self.port),
            _ => format!("{}://{}:{}", self.protocol, self.ip, self.port),
        }
    }
}

/// Applies the schema (idempotent) to the database at `url`.
pub fn migrate(url: &str) {
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    client.batch_execute(SCHEMA).expect("apply schema.sql");
}

/// Inserts `rows` as active, validated just now.
pub fn insert_active(url: &str, rows: &[Row]) {
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    for row in rows {
        client
            .execute(
                "INSERT INTO proxies (protocol, ip, port, username, password, is_active,
                    latency_ms, anonymity, country, supports_https, last_validated_at)
                 VALUES ($1, $2::text::inet, $3, $4, $5, true, $6, $7, $8, $9, now())",
                &[
                    &row.protocol,
                    &row.ip,
                    &row.port,
                    &row.username,
                    &row.password,
                    &row.latency_ms,
                    &row.anonymity,
                    &row.country,
                    &row.supports_https,
                ],
            )
            .expect("insert an active proxy");
    }
}

impl Service {
    /// Starts the service and waits until it has loaded the active proxies.
    pub fn start_loaded(config: &str) -> Service {
        let dir = tempfile::tempdir().expect("tempdir");
        Service::start_loaded_in(dir, config)
    }

    pub fn start_loaded_in(dir: tempfile::TempDir, config: &str) -> Service {
        let service = Service::start_in(dir, config);
        service.wait_log("active proxies loaded", Duration::from_secs(30));
        service
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(&format!("log line {needle:?}"), timeout, || {
            self.log_contains(needle)
        });
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Kills the process (SIGKILL) and hands back its directory for a restart.
    pub fn kill_keep_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.take_dir()
    }

    /// Takes the directory out (after the process ended) for a restart in it.
    pub fn take_dir(&mut self) -> tempfile::TempDir {
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }
}

/// Sends `request` as it is over a fresh connection and reads the answer
/// until the server closes (ask for `Connection: close`).
pub fn raw_http(addr: &str, request: &[u8]) -> Answer {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The server may answer and close before taking everything: a failed
    // write is then expected, the answer is what counts.
    let _ = stream.write_all(request);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut slots);
        if let Ok(httparse::Status::Complete(head)) = response.parse(&buf) {
            let length = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                });
            if length.is_some_and(|n| buf.len() >= head + n) {
                break;
            }
        }
    }
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut slots);
    let head = match response.parse(&buf) {
        Ok(httparse::Status::Complete(head)) => head,
        _ => panic!(
            "no complete HTTP answer: {:?}",
            String::from_utf8_lossy(&buf)
        ),
    };
    Answer {
        status: response.code.unwrap_or(0),
        headers: response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&buf[head..]).into_owned(),
    }
}

/// Any method, with optional headers and body.
pub fn request(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Answer {
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let agent = agent();
    let response = match body {
        Some(body) => agent.run(builder.body(body.to_string()).expect("request")),
        None => agent.run(builder.body(()).expect("request")),
    };
    answer(response.expect("HTTP request"))
}

// ---------------------------------------------------------------------------
// Fault injection: a PostgreSQL cluster of a test's own (to stop and start),
// raw TCP requests (for what an HTTP client library refuses to send), and
// figures of a running process read from /proc.

/// A throwaway PostgreSQL cluster on a port of its own, which a test may stop
/// and start again (same port, same data) to simulate an outage. Its commits
/// are synchronous (a crash loses no committed transaction, as on a server
/// run as PostgreSQL ships); without fsync, which only a machine crash needs.
pub struct PgCluster {
    bin: PathBuf,
    _dir: tempfile::TempDir,
    data: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

/// The directory of initdb and pg_ctl: PROXY_POOL_PG_BIN (set by
/// `scripts/with-postgres.sh --need-binaries`, which scripts/test.sh uses),
/// else the newest Debian install under /usr/lib/postgresql.
fn pg_bin() -> PathBuf {
    const INSTALL: &str = "these tests start PostgreSQL clusters of their own and need the \
        server binaries (initdb, pg_ctl): install them (Debian: apt-get install postgresql) \
        or run the tests with scripts/test.sh, which does";
    let has_binaries = |bin: &PathBuf| bin.join("initdb").exists() && bin.join("pg_ctl").exists();
    if let Some(bin) = std::env::var_os("PROXY_POOL_PG_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            has_binaries(&bin),
            "PROXY_POOL_PG_BIN={} has no initdb and pg_ctl: {INSTALL}",
            bin.display()
        );
        return bin;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(has_binaries)
                .collect()
        })
        .unwrap_or_default();
    // Newest version last (numerically: 9 before 16).
    found.sort_by_key(|bin| {
        let version = bin.parent().and_then(|dir| dir.file_name());
        version.and_then(|v| v.to_str()?.parse::<u32>().ok())
    });
    found.pop().unwrap_or_else(|| {
        panic!(
            "no PostgreSQL binaries in PROXY_POOL_PG_BIN or /usr/lib/postgresql/*/bin: {INSTALL}"
        )
    })
}

/// Whether `CI` is set (and not empty): tests that would skip for a missing
/// tool fail instead.
pub fn under_ci() -> bool {
    std::env::var_os("CI").is_some_and(|value| !value.is_empty())
}

/// Root on a Debian machine: missing packages can be installed with apt-get.
pub fn is_root_on_debian() -> bool {
    std::path::Path::new("/etc/debian_version").exists() && running_as_root()
}

pub fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A port below Linux's ephemeral range that nothing listens on now, so that
/// a restarted cluster finds it free again.
fn free_low_port() -> u16 {
    for _ in 0..200 {
        let port = 15_000 + fastrand::u16(..17_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found");
}

impl PgCluster {
    /// initdb and start; panics with PostgreSQL's own words when it cannot.
    pub fn start() -> PgCluster {
        let bin = pg_bin();
        let as_postgres = running_as_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        if as_postgres {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            let status = Command::new("chown")
                .arg("postgres:")
                .arg(&data)
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres: {}", data.display());
        }
        let mut cluster = PgCluster {
            bin,
            _dir: dir,
            data,
            port: 0,
            as_postgres,
        };
        let out = cluster
            .command("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&cluster.data)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for attempt in 0..5 {
            cluster.port = free_low_port();
            if cluster.try_start() {
                return cluster;
            }
            eprintln!("PgCluster: start attempt {attempt} failed, trying another port");
        }
        panic!("PostgreSQL did not start: {}", cluster.server_log());
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn try_start(&self) -> bool {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories='{}' \
             -c max_connections=200 -c fsync=off -c full_page_writes=off \
             -c shared_buffers=16MB",
            self.port,
            self.data.display()
        );
        self.command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// The server's URL (database `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).expect("connect to PgCluster")
    }

    /// Stops at once, as a crash would: open transactions are lost.
    pub fn stop(&self) {
        let status = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("pg_ctl stop");
        assert!(status.success(), "pg_ctl stop failed");
    }

    /// Starts again on the same port, with the same data (after crash recovery).
    pub fn restart(&self) {
        assert!(self.try_start(), "restart failed: {}", self.server_log());
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// An answer read off a raw socket.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one HTTP/1.1 answer (Content-Length or until EOF) within `timeout`.
pub fn read_answer(
    stream: &mut std::net::TcpStream,
    timeout: Duration,
) -> Result<RawAnswer, String> {
    use std::io::Read;
    let deadline = Instant::now() + timeout;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    // (head length, status, headers) once the head is complete.
    type Parsed = (usize, u16, Vec<(String, String)>);
    let mut head: Option<Parsed> = None;
    loop {
        if head.is_none() {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&buffer) {
                Ok(httparse::Status::Complete(len)) => {
                    let headers = response
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    let status = response.code.unwrap_or(0);
                    if (100..200).contains(&status) {
                        // An interim answer (100 Continue): the final one follows.
                        buffer.drain(..len);
                        continue;
                    }
                    head = Some((len, status, headers));
                }
                Ok(httparse::Status::Partial) => {}
                Err(err) => {
                    return Err(format!(
                        "unparsable answer ({err}): {:?}",
                        String::from_utf8_lossy(&buffer[..buffer.len().min(200)])
                    ))
                }
            }
        }
        if let Some((len, status, headers)) = &head {
            let length = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok());
            if let Some(length) = length {
                if buffer.len() >= len + length {
                    return Ok(RawAnswer {
                        status: *status,
                        headers: headers.clone(),
                        body: buffer[*len..len + length].to_vec(),
                    });
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete answer within {timeout:?} ({} bytes read)",
                buffer.len()
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return match head {
                    Some((len, status, headers)) => Ok(RawAnswer {
                        status,
                        headers,
                        body: buffer[len..].to_vec(),
                    }),
                    None if buffer.is_empty() => Err("connection closed without an answer".into()),
                    None => Err(format!(
                        "connection closed in the head: {:?}",
                        String::from_utf8_lossy(&buffer[..buffer.len().min(200)])
                    )),
                };
            }
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "no complete answer within {timeout:?} ({} bytes read)",
                    buffer.len()
                ));
            }
            Err(err) => return Err(format!("read failed: {err}")),
        }
    }
}

/// Sends `request` as raw bytes, half-closes, and reads one answer.
pub fn raw_exchange(addr: &str, request: &[u8], timeout: Duration) -> Result<RawAnswer, String> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // The server may answer (and close) before reading everything: a failed
    // write is not a failure as long as an answer comes.
    let _ = stream.write_all(request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    read_answer(&mut stream, timeout)
}

/// A GET of `path` on a fresh connection, answered within `timeout`.
pub fn quick_get(addr: &str, path: &str, timeout: Duration) -> Result<RawAnswer, String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr.parse().map_err(|e| format!("{e}"))?, timeout)
            .map_err(|e| format!("connect: {e}"))?;
    use std::io::Write;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    read_answer(&mut stream, timeout)
}

/// Figures of a live process from /proc.
pub mod procfs {
    /// User + system CPU time, in clock ticks (1/100 s on Linux).
    pub fn cpu_ticks(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let rest = stat.rsplit(')').next().unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        tick(11) + tick(12)
    }

    pub fn threads(pid: u32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn open_fds(pid: u32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident memory in KiB.
    pub fn rss_kib(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}
pub mod real;
