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
