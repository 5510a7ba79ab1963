//! The operator's view of a running service: the dashboard page as a real
//! browser (headless Chromium) renders it against a populated pool, and the
//! `proxy-pool stats` command's tables.
//!
//! Chromium is found at `$CHROMIUM`, `/usr/bin/chromium` or
//! `chromium-browser`; when it is missing and the tests run as root on
//! Debian, it is installed once with apt-get (under a file lock, so parallel
//! test runs do not race). Elsewhere the browser test says why it skips,
//! except under CI (the `CI` variable set), where a missing browser fails it.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// Where the screenshot is kept for a person to look at.
fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("test-output")
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| on_path("chromium"))
        .or_else(|| on_path("chromium-browser"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Installs Debian's chromium package. flock(1) serialises concurrent test
/// processes (the lock dies with its holder, so a crash leaves none behind),
/// and apt waits for dpkg's own lock rather than failing on it.
fn install_chromium() -> Result<(), String> {
    eprintln!("dashboard: chromium not found; installing it with apt-get (once)");
    let script = "command -v chromium >/dev/null 2>&1 && exit 0; \
        export DEBIAN_FRONTEND=noninteractive; \
        apt-get -o DPkg::Lock::Timeout=600 update -q && \
        apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends chromium";
    let output = Command::new("flock")
        .args([
            "-w",
            "900",
            "/tmp/proxy-pool-chromium-install.lock",
            "sh",
            "-c",
        ])
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run flock/apt-get: {err}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "apt-get install chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// The browser to use, installing it when allowed; `Err` says why there is
/// none (the test then skips); a failed install, or no browser under CI,
/// panics.
fn chromium() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(path) = find_chromium() {
                return Ok(path);
            }
            if !(is_root() && Path::new("/etc/debian_version").exists()) {
                let why = "chromium is not installed and this is not root on Debian: \
                     install chromium or set CHROMIUM=/path/to/chrome";
                if std::env::var_os("CI").is_some_and(|value| !value.is_empty()) {
                    panic!("{why} (CI is set: no skipping)");
                }
                return Err(why.into());
            }
            if let Err(err) = install_chromium() {
                panic!("{err}");
            }
            find_chromium().ok_or_else(|| "chromium still missing after apt-get".into())
        })
        .clone()
}

/// Runs a command, killing it if it outlives `limit`.
fn run_with_deadline(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chromium");
    // Drain both pipes on threads so a chatty browser never blocks on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Headless Chromium on `url` with one action (`--dump-dom` or
/// `--screenshot=...`); returns stdout and stderr.
fn headless(browser: &Path, url: &str, action: &[String]) -> (String, String) {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut command = Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
            "--window-size=1280,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(action)
        .arg(url);
    let output = run_with_deadline(command, Duration::from_secs(90));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "chromium failed ({}): {stderr}",
        output.status
    );
    (stdout, stderr)
}

/// The text of the element with `id` (its first text node; enough for the
/// leaf elements checked here).
fn text_of(dom: &str, id: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let open_end = at + dom[at..].find('>')? + 1;
    let close = open_end + dom[open_end..].find('<')?;
    Some(dom[open_end..close].trim().to_string())
}

/// The markup of the element with `id` up to `end_tag`.
fn element<'a>(dom: &'a str, id: &str, end_tag: &str) -> &'a str {
    let Some(at) = dom.find(&format!("id=\"{id}\"")) else {
        panic!("no element #{id} in the page:\n{dom}");
    };
    let end = dom[at..].find(end_tag).map_or(dom.len(), |i| at + i);
    &dom[at..end]
}

/// `data-key` → `data-count` of a bar chart's bars.
fn bars(dom: &str, id: &str) -> Vec<(String, u64)> {
    let chart = element(dom, id, "</section>");
    chart
        .split("data-key=\"")
        .skip(1)
        .filter_map(|rest| {
            let key = rest.split('"').next()?;
            let count = rest.split("data-count=\"").nth(1)?.split('"').next()?;
            Some((key.to_string(), count.parse().ok()?))
        })
        .collect()
}

fn sorted(mut pairs: Vec<(String, u64)>) -> Vec<(String, u64)> {
    pairs.sort();
    pairs
}

fn counts(value: &serde_json::Value) -> Vec<(String, u64)> {
    sorted(
        value
            .as_object()
            .map(|map| {
                map.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// Lines Chromium logged for console messages or uncaught exceptions of the
/// page at `origin`.
fn page_errors<'a>(stderr: &'a str, origin: &str) -> Vec<&'a str> {
    stderr
        .lines()
        .filter(|line| {
            let console = line.contains("CONSOLE") || line.contains("Uncaught");
            console && line.contains(origin)
        })
        .collect()
}

#[test]
fn dashboard_renders_the_live_pool_without_script_errors() {
    let browser = match chromium() {
        Ok(browser) => browser,
        Err(why) => {
            eprintln!("SKIPPED dashboard_renders_the_live_pool_without_script_errors: {why}");
            return;
        }
    };
    let pool = populated_service("");
    let service = &pool.service;
    // A source with traffic, so the sources table has a row to show.
    let pick = get(&service.url("/get-proxy?source=dash-test"));
    assert_eq!(pick.status, 200, "{}", pick.body);
    let proxy = pick.json()["proxy"].as_str().unwrap().to_string();
    let body = format!(r#"{{"source":"dash-test","proxy":"{proxy}","success":true}}"#);
    assert_eq!(post(&service.url("/feedback"), &body).status, 200);

    let origin = format!("http://{}", service.addr);
    let page = format!("{origin}/");
    let (dom, stderr) = headless(&browser, &page, &["--dump-dom".to_string()]);

    assert!(
        dom.contains("<body data-state=\"ok\""),
        "the page did not reach data-state=ok:\n{dom}\n{stderr}"
    );
    assert_eq!(
        page_errors(&stderr, &origin),
        Vec::<&str>::new(),
        "the page logged errors"
    );
    assert_eq!(text_of(&dom, "status").as_deref(), Some("ok"));
    assert_eq!(text_of(&dom, "db-status").as_deref(), Some("up"));

    // The pool is settled (every alive farm proxy active), but read /stats
    // again if it moved while the browser ran.
    let shown: u64 = text_of(&dom, "active-proxies")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("#active-proxies is not a number:\n{dom}"));
    let stats = get(&service.url("/stats")).json();
    let active = stats["active_proxies"].as_u64().unwrap();
    if shown != active {
        let again = get(&service.url("/stats")).json()["active_proxies"]
            .as_u64()
            .unwrap();
        assert_eq!(shown, again, "#active-proxies disagrees with /stats");
    }
    assert_eq!(shown as usize, pool.alive);

    assert_eq!(
        sorted(bars(&dom, "by-protocol")),
        counts(&stats["by_protocol"])
    );
    assert_eq!(
        sorted(bars(&dom, "by-anonymity")),
        counts(&stats["by_anonymity"])
    );
    assert!(
        element(&dom, "by-country", "</section>").contains("no country known"),
        "without a geoip database no country is known"
    );

    let lists = element(&dom, "lists-table", "</table>");
    for list in stats["lists"].as_array().unwrap() {
        let name = list["name"].as_str().unwrap();
        assert!(
            lists.contains(&format!("data-name=\"{name}\"")),
            "no row for list {name}:\n{lists}"
        );
    }
    assert!(!stats["lists"].as_array().unwrap().is_empty());
    let sources = element(&dom, "sources-table", "</table>");
    assert!(
        sources.contains("data-name=\"dash-test\""),
        "no row for the source:\n{sources}"
    );
    let cycles = element(&dom, "cycles-table", "</table>");
    assert!(
        cycles.matches("<tr").count() >= 2,
        "no validation cycle row:\n{cycles}"
    );

    // A picture for people; its size shows the page rendered something.
    let dir = output_dir();
    std::fs::create_dir_all(&dir).expect("create target/test-output");
    let png = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    let (_, stderr) = headless(
        &browser,
        &page,
        &[format!("--screenshot={}", png.display())],
    );
    let size = std::fs::metadata(&png)
        .unwrap_or_else(|err| panic!("no screenshot at {} ({err}): {stderr}", png.display()))
        .len();
    assert!(size > 20_000, "screenshot suspiciously small: {size} bytes");
    eprintln!("dashboard screenshot: {}", png.display());
}

#[test]
fn dashboard_asks_for_the_token_when_the_api_needs_one() {
    let browser = match chromium() {
        Ok(browser) => browser,
        Err(why) => {
            eprintln!("SKIPPED dashboard_asks_for_the_token_when_the_api_needs_one: {why}");
            return;
        }
    };
    let db = TestDb::new();
    let service = Service::start(&config_text(
        &db.url,
        "[server]\nbind = 127.0.0.1:0\napi_token = t0ken\n\
         [fetcher]\nsource_urls = http://127.0.0.1:9/list.txt\nallow_private_addresses = true\n",
    ));
    let origin = format!("http://{}", service.addr);
    let (dom, stderr) = headless(&browser, &format!("{origin}/"), &["--dump-dom".to_string()]);
    assert!(
        dom.contains("<body data-state=\"unauthorized\""),
        "expected the unauthorized state:\n{dom}\n{stderr}"
    );
    // The form is shown; health (public) still fills the header.
    assert!(
        dom.contains("id=\"auth\" style=\"display: block;\""),
        "{dom}"
    );
    assert_eq!(text_of(&dom, "status").as_deref(), Some("ok"));
}

#[test]
fn stats_command_prints_the_running_services_tables() {
    let pool = populated_service("");
    let service = &pool.service;
    assert_eq!(get(&service.url("/get-proxy?source=cli-test")).status, 200);
    let config = service.dir.path().join("config.ini");
    let output = Command::new(binary())
        .arg("--config")
        .arg(&config)
        .args(["stats", "--url", &service.url("")])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run proxy-pool stats");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let first = stdout.lines().next().unwrap_or("");
    assert!(
        first.starts_with(&format!("active proxies: {}   ", pool.alive)),
        "{stdout}"
    );
    assert!(first.contains("database: up"), "{stdout}");
    for heading in [
        "by protocol",
        "by anonymity",
        "lists",
        "validation cycles (newest first)",
        "sources",
    ] {
        assert!(
            stdout.lines().any(|l| l == heading),
            "no {heading:?} table:\n{stdout}"
        );
    }
    // Every protocol row shows the count /stats gives.
    let stats = get(&service.url("/stats")).json();
    for (protocol, count) in counts(&stats["by_protocol"]) {
        let row = format!("  {protocol}");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&row) && l.split_whitespace().next() == Some(&protocol))
            .unwrap_or_else(|| panic!("no row for {protocol}:\n{stdout}"));
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(count.to_string().as_str()),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains(&pool.farm.list_url("schemes")),
        "the list is missing:\n{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("cli-test ")),
        "the source is missing:\n{stdout}"
    );
}

#[test]
fn stats_command_names_the_url_it_cannot_reach_with_exit_1() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.ini");
    std::fs::write(
        &config,
        "[database]\nurl = postgres://x@127.0.0.1/db\n[fetcher]\nsource_urls = http://127.0.0.1:9/l\n",
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let output = Command::new(binary())
        .arg("--config")
        .arg(&config)
        .args(["stats", "--url", &url])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&url), "{stderr}");
}
