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

/// A minimal valid configuration for tests; `extra` is appended (sections may repeat keys only once).
pub fn config_text(database_url: &str, sections: &str) -> String {
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
    pub farm: proxy_pool::farm::Farm,
    pub db: TestDb,
    /// How many farm proxies a correct validator finds alive.
    pub alive: usize,
}

/// The farm behind [`populated_service`]: working proxies of every protocol
/// and anonymity, plus dead ones the validator must leave out.
pub fn small_farm_spec() -> proxy_pool::farm::FarmSpec {
    use proxy_pool::farm::{Behaviour, FarmSpec, ProxyGroup};
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
    let farm = proxy_pool::farm::Farm::start(small_farm_spec()).expect("start the farm");
    let alive = farm.manifest().iter().filter(|e| e.alive).count();
    let db = TestDb::new();
    let sections = format!(
        "[server]\nbind = 127.0.0.1:0\nworkers = 4\n{server_lines}\n\
         [fetcher]\nsource_urls = {list}\nallow_private_addresses = true\ntimeout_ms = 2000\n\
         [validator]\nvalidation_target = {judge}\nvalidation_timeout_ms = 1000\n\
         connect_timeout_ms = 500\nvalidation_workers = 8\n\
         [scheduler]\ninterval_seconds = 2\n",
        list = farm.list_url("schemes"),
        judge = farm.judge_url(),
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
