//! The command line as an operator meets it: check-config, migrate, the
//! serve lifecycle (health, SIGTERM), the README's offline demo and
//! scripts/run.sh.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn run(args: &[&str], config: &str, database_url: Option<&str>) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.ini");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new(binary());
    command
        .arg("--config")
        .arg(&path)
        .args(args)
        .env_remove("DATABASE_URL");
    if let Some(url) = database_url {
        command.env("DATABASE_URL", url);
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const SOURCES: &str = "[fetcher]\nsource_urls = http://127.0.0.1:9/list.txt\n";

#[test]
fn check_config_names_a_misspelled_key_and_its_line_with_exit_2() {
    let config = format!("[database]\nurl = postgres://x@127.0.0.1/db\n{SOURCES}[validator]\nvalidation_timeout = 5000\n");
    let (code, _, stderr) = run(&["check-config"], &config, None);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("config.ini:6: [validator] validation_timeout"),
        "{stderr}"
    );
    assert!(
        stderr.contains("did you mean validation_timeout_ms"),
        "{stderr}"
    );
}

#[test]
fn check_config_prints_effective_values_with_env_override() {
    let config = format!("[database]\nurl = postgres://x@127.0.0.1/db\n{SOURCES}");
    let (code, stdout, stderr) = run(
        &["check-config"],
        &config,
        Some("postgres://env:pw@127.0.0.1:5/envdb"),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("url = postgres://env:***@127.0.0.1:5/envdb"),
        "{stdout}"
    );
    assert!(stdout.contains("validation_workers = 100"), "{stdout}");
    assert!(!stdout.contains("pw@"));
}

#[test]
fn missing_config_file_is_a_configuration_error() {
    let output = Command::new(binary())
        .args(["--config", "/nonexistent/proxy-pool.ini", "check-config"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/proxy-pool.ini"), "{stderr}");
}

#[test]
fn unknown_command_is_a_usage_error() {
    let output = Command::new(binary()).arg("frobnicate").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn the_shipped_config_ini_is_valid() {
    let text = include_str!("../config.ini");
    let (code, stdout, stderr) = run(&["check-config"], text, None);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("validation_target = http://httpbin.org/get"));
}

fn table_shape(db: &TestDb) -> Vec<String> {
    let mut client = db.client();
    let mut shape: Vec<String> = client
        .query(
            "SELECT table_name || '.' || column_name || ':' || data_type
             FROM information_schema.columns WHERE table_schema = 'public'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    shape.extend(
        client
            .query(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0)),
    );
    shape.sort();
    shape
}

#[test]
fn migrate_twice_and_concurrently_leaves_one_correct_schema() {
    let db = TestDb::new();
    let config = config_text(&db.url, SOURCES);
    let (code, _, stderr) = run(&["migrate"], &config, None);
    assert_eq!(code, 0, "{stderr}");
    let first = table_shape(&db);
    assert!(first.contains(&"proxies.ip:inet".to_string()), "{first:?}");
    assert!(first.contains(&"proxies.is_active:boolean".to_string()));
    assert!(first.contains(&"proxies_identity".to_string()));
    let (code, _, stderr) = run(&["migrate"], &config, None);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(table_shape(&db), first);

    // Four at once on a fresh database.
    let db2 = TestDb::new();
    let config2 = config_text(&db2.url, SOURCES);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let config = config2.clone();
            std::thread::spawn(move || run(&["migrate"], &config, None))
        })
        .collect();
    for handle in handles {
        let (code, _, stderr) = handle.join().unwrap();
        assert_eq!(code, 0, "{stderr}");
    }
    assert_eq!(table_shape(&db2), first);
}

/// A migration behind a long query gives up after its lock timeout instead
/// of queueing every other session behind its wait for the table's lock.
#[test]
fn migrate_behind_a_long_query_gives_up_at_its_lock_timeout() {
    let db = TestDb::new();
    let config = config_text(&db.url, SOURCES);
    let (code, _, stderr) = run(&["migrate"], &config, None);
    assert_eq!(code, 0, "{stderr}");
    let mut reader = db.client();
    let mut long_query = reader.transaction().unwrap();
    long_query
        .query("SELECT count(*) FROM proxies", &[])
        .unwrap();
    let started = Instant::now();
    let (code, _, stderr) = run(&["migrate"], &config, None);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("lock timeout"), "{stderr}");
    assert!(started.elapsed() >= Duration::from_secs(10), "{stderr}");
    long_query.rollback().unwrap();
    let (code, _, stderr) = run(&["migrate"], &config, None);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn migrate_against_an_unreachable_database_fails_with_exit_1() {
    let config = format!(
        "[database]\nurl = postgres://x@127.0.0.1:1/db\ncheckout_timeout_ms = 2000\n{SOURCES}"
    );
    let (code, _, stderr) = run(&["migrate"], &config, None);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("migration failed"), "{stderr}");
}

#[test]
fn serve_answers_health_and_exits_0_on_sigterm() {
    let db = TestDb::new();
    let config = config_text(&db.url, &format!("[server]\nbind = 127.0.0.1:0\n{SOURCES}"));
    let mut service = Service::start(&config);
    wait_for("health ok", Duration::from_secs(20), || {
        get(&service.url("/health")).json()["status"] == "ok"
    });
    let health = get(&service.url("/health")).json();
    assert_eq!(health["database"], "up");
    assert_eq!(service.terminate(), 0, "{}", service.log_text());
}

/// A child started in a process group of its own, killed with everything it
/// started (if still running) when the test ends, pass or fail.
struct Reaped(Child);

impl Reaped {
    fn spawn(command: &mut Command) -> Reaped {
        use std::os::unix::process::CommandExt;
        Reaped(command.process_group(0).spawn().expect("spawn"))
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.wait();
    }
}

/// A port nothing listens on now, for a config that must name its port
/// (`stats` reads [server] bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// Waits for `child` to exit within `timeout`; its exit code, or a panic.
fn wait_exit(child: &mut Child, timeout: Duration, what: &str) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "{what} still running after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `proxy-farm --write-config farm.ini`, waiting until the file is whole.
fn start_farm(dir: &Path) -> (Reaped, PathBuf) {
    let farm_ini = dir.join("farm.ini");
    let farm = Reaped::spawn(
        Command::new(proxy_farm::binary())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--proxies",
                "20",
                "--huge-lines",
                "10",
            ])
            .arg("--write-config")
            .arg(&farm_ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    // The scheduler section comes last in the written config.
    wait_for("farm.ini", Duration::from_secs(20), || {
        log_of(&farm_ini).contains("[scheduler]\ninterval_seconds = 15\n")
    });
    (farm, farm_ini)
}

/// Regression: the README's offline demo ends with `proxy-pool --config
/// farm.ini stats` in a terminal without DATABASE_URL, and farm.ini has no
/// [database] url; `stats` needs neither, so it must not exit 2 for them.
#[test]
fn the_readme_offline_demo_ends_with_stats_without_a_database_url() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let (_farm, farm_ini) = start_farm(dir.path());
    let farm_config = log_of(&farm_ini);
    assert!(!farm_config.contains("[database]"), "{farm_config}");
    let port = free_port();
    let mut config = farm_config;
    config.push_str(&format!("\n[server]\nbind = 127.0.0.1:{port}\n"));
    std::fs::write(&farm_ini, config).unwrap();

    let service_log = dir.path().join("serve.log");
    let mut serve = Reaped::spawn(
        Command::new(binary())
            .arg("--config")
            .arg(&farm_ini)
            .arg("serve")
            .current_dir(dir.path())
            .env("DATABASE_URL", &db.url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&service_log).unwrap()),
    );
    let addr = format!("127.0.0.1:{port}");
    wait_for(
        "get-proxy to serve a farm proxy",
        Duration::from_secs(90),
        || {
            assert!(
                serve.0.try_wait().unwrap().is_none(),
                "serve exited: {}",
                log_of(&service_log)
            );
            quick_get(&addr, "/get-proxy?source=demo", Duration::from_secs(5))
                .is_ok_and(|answer| answer.status == 200)
        },
    );

    let stats = Command::new(binary())
        .arg("--config")
        .arg(&farm_ini)
        .arg("stats")
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&stats.stdout);
    let stderr = String::from_utf8_lossy(&stats.stderr);
    assert_eq!(stats.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("active proxies: "), "{stdout}");
    assert!(stdout.contains("by protocol"), "{stdout}");

    signal(serve.0.id(), "TERM");
    let code = wait_exit(&mut serve.0, Duration::from_secs(20), "serve");
    assert_eq!(code, 0, "{}", log_of(&service_log));
}

/// Regression: with-postgres.sh used to handle SIGTERM only after its
/// command had ended, so supervisord's SIGTERM (or Ctrl-C's SIGINT) to
/// run.sh never reached the service. Now run.sh passes it on, the service
/// stops gracefully, and run.sh exits with its status. `--config` is run.sh's
/// own argument (it used to be refused as given twice).
#[test]
fn run_sh_passes_sigterm_to_the_service_and_exits_with_its_status() {
    stop_run_sh_with("TERM");
}

#[test]
fn run_sh_passes_sigint_to_the_service_and_exits_with_its_status() {
    stop_run_sh_with("INT");
}

fn stop_run_sh_with(signal_name: &str) {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config_path = dir.path().join("other.ini");
    let snapshot = dir.path().join("source_stats.bin");
    std::fs::write(
        &config_path,
        format!(
            "[server]\nbind = 127.0.0.1:{port}\n{SOURCES}[validator]\n{OFFLINE_JUDGE}\n\
             [state]\nsnapshot_path = {}\n",
            snapshot.display()
        ),
    )
    .unwrap();
    let run_log = dir.path().join("run.log");
    let mut run_sh = Reaped::spawn(
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/run.sh"))
            .arg("--config")
            .arg(&config_path)
            .env("DATABASE_URL", &db.url)
            .env("PROXY_POOL_BIN", binary())
            .env_remove("PROXY_POOL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&run_log).unwrap()),
    );
    let addr = format!("127.0.0.1:{port}");
    wait_for("the service's /health", Duration::from_secs(30), || {
        assert!(
            run_sh.0.try_wait().unwrap().is_none(),
            "run.sh exited: {}",
            log_of(&run_log)
        );
        quick_get(&addr, "/health", Duration::from_secs(5)).is_ok_and(|answer| {
            answer.status == 200 && String::from_utf8_lossy(&answer.body).contains("\"up\"")
        })
    });

    signal(run_sh.0.id(), signal_name);
    let code = wait_exit(&mut run_sh.0, Duration::from_secs(20), "run.sh");
    let log = log_of(&run_log);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("stopped"), "no graceful stop: {log}");
    assert!(
        snapshot.exists(),
        "no snapshot written on the way out: {log}"
    );
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the service still listens after run.sh exited: {log}"
    );
}

/// The (section, key) pairs the parser accepts, read from what
/// `check-config` prints: its output and the parser are driven by one key
/// table, so every key appears there. `[source.NAME]` keys come under the
/// section `source.NAME`.
fn parser_keys() -> std::collections::BTreeSet<(String, String)> {
    let config = format!(
        "[database]\nurl = postgres://u@127.0.0.1/db\n{SOURCES}[source.example]\nurl = http://127.0.0.1:9/socks.txt\n"
    );
    let (code, shown, stderr) = run(&["check-config"], &config, None);
    assert_eq!(code, 0, "{stderr}");
    let mut keys = std::collections::BTreeSet::new();
    let mut section = String::new();
    for line in shown.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = match name.strip_prefix("source.") {
                Some(_) => "source.NAME".to_string(),
                None => name.to_string(),
            };
            continue;
        }
        let (key, _) = line.split_once(" = ").unwrap_or_else(|| {
            line.strip_suffix(" =")
                .map(|key| (key, ""))
                .unwrap_or_else(|| panic!("not a key line: {line:?}"))
        });
        keys.insert((section.clone(), key.to_string()));
    }
    assert!(
        keys.len() > 30,
        "too few keys in check-config's output: {keys:?}"
    );
    keys
}

/// The rows of README's configuration table, a cell of several keys
/// ("initial_score, success_delta") counting for each.
fn readme_keys() -> std::collections::BTreeSet<(String, String)> {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n## ")
        .find(|part| part.starts_with("Configuration\n"))
        .expect("a Configuration section in README.md");
    let mut keys = std::collections::BTreeSet::new();
    for line in section.lines().filter(|line| line.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || cells[1] == "section" || cells[1].starts_with('-') {
            continue;
        }
        for key in cells[2].split(',') {
            keys.insert((cells[1].to_string(), key.trim().to_string()));
        }
    }
    keys
}

/// The keys config.ini sets, or shows commented out (`; key = value`), each
/// with its line number and whether a prose comment precedes it in its block
/// of lines. Every `[source.X]` section counts as `source.NAME`.
fn config_ini_keys() -> Vec<(String, String, usize, bool)> {
    let text = include_str!("../config.ini");
    let mut keys = Vec::new();
    let mut section = String::new();
    let mut commented = false;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            commented = false;
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = match name.strip_prefix("source.") {
                Some(_) => "source.NAME".to_string(),
                None => name.to_string(),
            };
            commented = false;
            continue;
        }
        let body = line.trim_start_matches([';', '#']).trim();
        let is_key = body
            .split_once('=')
            .is_some_and(|(key, _)| !key.trim().is_empty() && !key.trim().contains(' '));
        if is_key && !section.is_empty() {
            let key = body.split_once('=').unwrap().0.trim().to_string();
            keys.push((section.clone(), key, index + 1, commented));
        } else if line.starts_with(';') || line.starts_with('#') {
            commented = true;
        }
    }
    keys
}

/// Regression guard: the configuration reference cannot drift from the
/// parser. Every key the parser knows is in README's table and documented
/// (with a comment) in config.ini, and neither names a key it does not know.
#[test]
fn readme_and_config_ini_document_exactly_the_keys_the_parser_knows() {
    let parser = parser_keys();
    let readme = readme_keys();
    let missing: Vec<_> = parser.difference(&readme).collect();
    assert!(
        missing.is_empty(),
        "keys missing from README's table: {missing:?}"
    );
    let unknown: Vec<_> = readme.difference(&parser).collect();
    assert!(
        unknown.is_empty(),
        "README's table names unknown keys: {unknown:?}"
    );

    let ini = config_ini_keys();
    let in_ini: std::collections::BTreeSet<(String, String)> = ini
        .iter()
        .map(|(section, key, _, _)| (section.clone(), key.clone()))
        .collect();
    let missing: Vec<_> = parser.difference(&in_ini).collect();
    assert!(
        missing.is_empty(),
        "keys missing from config.ini: {missing:?}"
    );
    let unknown: Vec<_> = in_ini.difference(&parser).collect();
    assert!(
        unknown.is_empty(),
        "config.ini names unknown keys: {unknown:?}"
    );
    // Each key's first appearance (later [source.X] sections may go bare).
    let mut seen = std::collections::BTreeSet::new();
    for (section, key, line, commented) in &ini {
        if seen.insert((section.clone(), key.clone())) {
            assert!(
                commented,
                "config.ini:{line}: [{section}] {key} has no comment before it"
            );
        }
    }
}

/// A second SIGTERM exits at once, with 128 + 15, while the first one's
/// graceful shutdown still waits for a check in flight: here the cycle's
/// direct request to a judge that accepts and never answers, within a
/// 60 s timeout (a graceful exit would take that long and exit 0).
#[test]
fn a_second_sigterm_exits_at_once_with_143() {
    let db = TestDb::new();
    let silent_judge = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let judge = silent_judge.local_addr().unwrap();
    let config = config_text(
        &db.url,
        &format!(
            "[server]\nbind = 127.0.0.1:0\n{SOURCES}\n[validator]\n\
             validation_target = http://{judge}/get\nvalidation_timeout_ms = 60000\n"
        ),
    );
    let mut service = Service::start(&config);
    wait_for("the first cycle to start", Duration::from_secs(30), || {
        service.log_contains("active proxies loaded")
    });
    signal(service.child.id(), "TERM");
    wait_for(
        "the graceful shutdown to begin",
        Duration::from_secs(10),
        || service.log_contains("shutting down"),
    );
    assert!(
        service.child.try_wait().unwrap().is_none(),
        "the graceful shutdown waits for the check in flight:\n{}",
        service.log_text()
    );
    signal(service.child.id(), "TERM");
    let code = wait_exit(&mut service.child, Duration::from_secs(20), "the service");
    assert_eq!(code, 143, "{}", service.log_text());
    wait_for("the exit to be logged", Duration::from_secs(5), || {
        service.log_contains("second SIGTERM received: exiting now")
    });
}

/// max_body_bytes holds for /feedback too, so a value below a full batch of
/// the largest items refuses legal batches: check-config says so, and stays
/// quiet at the default.
#[test]
fn check_config_warns_when_max_body_bytes_is_below_a_full_feedback_batch() {
    let small = format!(
        "[database]\nurl = postgres://x@127.0.0.1/db\n{SOURCES}[server]\nmax_body_bytes = 65536\n"
    );
    let (code, stdout, stderr) = run(&["check-config"], &small, None);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("max_body_bytes = 65536"), "{stdout}");
    assert!(
        stderr.contains("max_body_bytes = 65536 is too small for a full /feedback batch"),
        "{stderr}"
    );
    let default = format!("[database]\nurl = postgres://x@127.0.0.1/db\n{SOURCES}");
    let (code, stdout, stderr) = run(&["check-config"], &default, None);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("max_body_bytes = 1048576"), "{stdout}");
    assert!(!stderr.contains("too small"), "{stderr}");
}
