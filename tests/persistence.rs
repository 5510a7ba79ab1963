//! The state's persistence, against the real binary: scores survive a
//! graceful restart and a kill -9 (up to the last snapshot interval), a
//! corrupt snapshot is moved aside, the file is private; and serving goes on
//! from memory while PostgreSQL is down, the service recovering by itself
//! when it returns.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use proxy_pool::snapshot::{self, EntrySnapshot, SnapshotData, SourceSnapshot};

use serde_json::Value;
use support::{get, insert_active, migrate, post, wait_for, Row, Service, TestConfig, TestDb};

fn rows() -> Vec<Row> {
    vec![
        Row::http("127.0.0.80", 8000),
        Row {
            protocol: "socks5",
            username: Some("u"),
            password: Some("p"),
            ..Row::http("127.0.0.81", 1080)
        },
        Row::http("127.0.0.82", 8000),
    ]
}

fn feedback(service: &Service, source: &str, proxy: &str, success: bool) {
    let body = format!(r#"{{"source":"{source}","proxy":"{proxy}","success":{success}}}"#);
    let answer = post(&service.url("/feedback"), &body);
    assert_eq!(answer.status, 200, "{}", answer.body);
}

/// Gives two sources distinct, recognisable stats.
fn give_feedback(service: &Service, rows: &[Row]) {
    for _ in 0..3 {
        feedback(service, "app", &rows[0].url(), true);
    }
    feedback(service, "app", &rows[1].url(), false);
    feedback(service, "app", &rows[1].url(), true);
    for _ in 0..4 {
        feedback(service, "crawler", &rows[2].url(), false);
    }
}

/// What /sources/NAME shows, minus nothing: scores, counts, bans, last use.
fn view(service: &Service, source: &str) -> Value {
    let answer = get(&service.url(&format!("/sources/{source}")));
    assert_eq!(answer.status, 200, "{source}: {}", answer.body);
    answer.json()["proxies"].clone()
}

fn check_expected_stats(service: &Service, rows: &[Row]) {
    let app = view(service, "app");
    assert_eq!(app[0]["proxy"], rows[0].url().as_str());
    assert_eq!(app[0]["score"], 3);
    assert_eq!(app[0]["success_count"], 3);
    assert_eq!(app[1]["proxy"], "socks5://u:***@127.0.0.81:1080");
    assert_eq!(app[1]["score"], -4);
    let crawler = view(service, "crawler");
    assert_eq!(crawler[0]["score"], -20);
    assert_eq!(crawler[0]["is_banned"], true);
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("snapshot file")
        .permissions()
        .mode()
        & 0o777
}

fn start(db: &TestDb, configure: impl FnOnce(&mut TestConfig)) -> (TestConfig, Service) {
    migrate(&db.url);
    insert_active(&db.url, &rows());
    let mut config = TestConfig::new(&db.url);
    configure(&mut config);
    let service = Service::start_loaded(&config.text());
    (config, service)
}

#[test]
fn stats_survive_a_graceful_restart_through_the_snapshot() {
    let db = TestDb::new();
    let rows = rows();
    let (config, mut service) = start(&db, |_| {});
    give_feedback(&service, &rows);
    let before = (view(&service, "app"), view(&service, "crawler"));
    let path = service.dir.path().join("stats.bin");
    assert!(!path.exists(), "no snapshot before the first interval");

    assert_eq!(
        service.terminate(),
        0,
        "SIGTERM exits 0:\n{}",
        service.log_text()
    );
    assert!(path.exists(), "the shutdown writes the snapshot");
    assert_eq!(mode(&path), 0o600, "the snapshot is private");

    let dir = service.take_dir();
    let service = Service::start_loaded_in(dir, &config.text());
    assert!(
        service.log_contains("2 sources, 3 stats entries"),
        "{}",
        service.log_text()
    );
    assert_eq!((view(&service, "app"), view(&service, "crawler")), before);
    check_expected_stats(&service, &rows);
    // The restored ban still holds.
    let answer = get(&service.url("/get-proxy?source=crawler&count=3"));
    let json = answer.json();
    let served: Vec<&str> = json["proxies"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p["proxy"].as_str()).collect())
        .unwrap_or_default();
    assert!(!served.contains(&rows[2].url().as_str()), "{}", answer.body);
    assert_eq!(
        served.len(),
        2,
        "the banned proxy stays out: {}",
        answer.body
    );
}

/// The shutdown bound holds with a large stats table: the last snapshot of
/// 200,000 entries is written inside it, not after it.
#[test]
fn sigterm_with_200k_stats_entries_writes_them_and_exits_0_within_the_bound() {
    const PROXIES: u32 = 100_000;
    let db = TestDb::new();
    migrate(&db.url);
    insert_active(&db.url, &rows());
    let now_ms = chrono::Utc::now().timestamp_millis();
    let entries = |score: i32| -> Vec<EntrySnapshot> {
        (0..PROXIES)
            .map(|url| EntrySnapshot {
                url,
                score,
                success_count: 1,
                failure_count: 0,
                banned_until_ms: None,
                ban_count: 0,
                last_used_ms: now_ms,
                discounted: None,
            })
            .collect()
    };
    let data = SnapshotData {
        taken_at_ms: now_ms,
        urls: (0..PROXIES)
            .map(|i| format!("http://127.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255))
            .collect(),
        sources: ["app", "crawler"]
            .iter()
            .map(|name| SourceSnapshot {
                name: name.to_string(),
                requests: 1,
                feedbacks: 1,
                entries: entries(1),
            })
            .collect(),
        active: Vec::new(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stats.bin");
    snapshot::write_atomic(&path, &data).expect("write the snapshot");
    let mut config = TestConfig::new(&db.url);
    // Periodic writes back to back: one is often in progress at SIGTERM.
    config.set("state", "snapshot_interval_seconds", "1");
    let mut service = Service::start_loaded_in(dir, &config.text());
    assert!(
        service.log_contains("2 sources, 200000 stats entries"),
        "{}",
        service.log_text()
    );

    let bound = Duration::from_millis(1000) + Duration::from_secs(5);
    let asked = Instant::now();
    let asked_at_ms = chrono::Utc::now().timestamp_millis();
    let code = service.terminate();
    let took = asked.elapsed();
    assert_eq!(code, 0, "SIGTERM exits 0:\n{}", service.log_text());
    assert!(
        took < bound,
        "exited {} ms after SIGTERM, past validation_timeout_ms + 5 s",
        took.as_millis()
    );
    assert!(
        service.log_contains("snapshot written: 200000 entries"),
        "{}",
        service.log_text()
    );
    match snapshot::load(&path).expect("read the snapshot") {
        snapshot::Loaded::Loaded(written) => {
            assert_eq!(written.entry_count(), 200_000);
            // Written by the shutdown, not a periodic write before it.
            assert!(
                written.taken_at_ms >= asked_at_ms,
                "the file was taken {} ms before SIGTERM",
                asked_at_ms - written.taken_at_ms
            );
        }
        _ => panic!("the shutdown snapshot is not readable"),
    }
}

#[test]
fn admin_snapshot_writes_a_private_file_now() {
    let db = TestDb::new();
    let rows = rows();
    let (_config, service) = start(&db, |_| {});
    give_feedback(&service, &rows);
    let path = service.dir.path().join("stats.bin");
    assert!(!path.exists());
    let answer = post(&service.url("/admin/snapshot"), "");
    assert_eq!(answer.status, 202, "{}", answer.body);
    let json = answer.json();
    assert_eq!(json["entries"], 3);
    let bytes = std::fs::metadata(&path).expect("written").len();
    assert_eq!(json["bytes"], bytes);
    assert_eq!(mode(&path), 0o600);
    // Exactly one file: the temporary one was renamed over it.
    let names: Vec<String> = std::fs::read_dir(service.dir.path())
        .expect("dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("stats.bin"))
        .collect();
    assert_eq!(names, ["stats.bin"]);
    // The active set is in it as get-proxy serves it, credentials included.
    let snapshot::Loaded::Loaded(written) = snapshot::load(&path).expect("read") else {
        panic!("the snapshot is not readable");
    };
    let mut active: Vec<_> = written
        .active
        .iter()
        .map(|proxy| {
            (
                written.urls[proxy.url as usize].clone(),
                proxy.latency_ms,
                proxy.anonymity.clone(),
                proxy.country.clone(),
            )
        })
        .collect();
    active.sort();
    let elite_us = |url: String| (url, Some(100), Some("elite".into()), Some("US".into()));
    let mut expected: Vec<_> = rows.iter().map(|row| elite_us(row.url())).collect();
    expected.sort();
    assert_eq!(active, expected);
    assert!(written
        .active
        .iter()
        .all(|proxy| proxy.last_validated_ms.is_some()));
}

#[test]
fn kill_9_loses_at_most_the_last_snapshot_interval() {
    let db = TestDb::new();
    let rows = rows();
    let (config, service) = start(&db, |c| {
        c.set("state", "snapshot_interval_seconds", "1");
    });
    give_feedback(&service, &rows);
    // Two more periodic writes: at least one began after the feedback.
    let written = service.log_count("snapshot written");
    wait_for("two periodic snapshots", Duration::from_secs(10), || {
        service.log_count("snapshot written") >= written + 2
    });
    let dir = service.kill_keep_dir();

    let service = Service::start_loaded_in(dir, &config.text());
    check_expected_stats(&service, &rows);
}

#[test]
fn a_corrupt_snapshot_is_moved_aside_and_stats_start_empty() {
    let db = TestDb::new();
    migrate(&db.url);
    insert_active(&db.url, &rows());
    let config = TestConfig::new(&db.url);
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = b"PPSNAP\0\x01 this is not a snapshot".to_vec();
    std::fs::write(dir.path().join("stats.bin"), &garbage).expect("write garbage");

    let service = Service::start_loaded_in(dir, &config.text());
    assert!(service.log_contains("moved"), "{}", service.log_text());
    let moved: Vec<PathBuf> = std::fs::read_dir(service.dir.path())
        .expect("dir")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("stats.bin.corrupt-"))
        })
        .collect();
    assert_eq!(moved.len(), 1, "one .corrupt-<timestamp> file");
    let suffix = moved[0]
        .to_string_lossy()
        .rsplit('-')
        .next()
        .map(String::from);
    assert!(
        suffix.is_some_and(|s| s.parse::<u64>().is_ok()),
        "a timestamp suffix: {}",
        moved[0].display()
    );
    assert_eq!(
        std::fs::read(&moved[0]).expect("kept"),
        garbage,
        "kept as it was"
    );
    assert!(!service.dir.path().join("stats.bin").exists());

    // Empty stats, and serving works.
    assert_eq!(get(&service.url("/sources/app")).status, 404);
    assert_eq!(get(&service.url("/health")).json()["status"], "ok");
    assert_eq!(get(&service.url("/get-proxy?source=app")).status, 200);
}

/// A PostgreSQL cluster of the test's own, which it may stop and start.
struct OwnCluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// `runuser -u postgres --` when running as root (initdb refuses root).
    run_as: Vec<String>,
    _dir: tempfile::TempDir,
}

impl OwnCluster {
    fn find_bin() -> Option<PathBuf> {
        if let Some(bin) = std::env::var_os("PROXY_POOL_PG_BIN") {
            return Some(PathBuf::from(bin));
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
            .collect();
        found.sort();
        found.pop()
    }

    fn new() -> Option<OwnCluster> {
        let bin = OwnCluster::find_bin()?;
        let dir = tempfile::tempdir().expect("tempdir");
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let run_as: Vec<String> = if is_root {
            ["runuser", "-u", "postgres", "--"]
                .map(String::from)
                .to_vec()
        } else {
            Vec::new()
        };
        if is_root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("chmod the cluster's directory");
        }
        let data = dir.path().join("data");
        let cluster = OwnCluster {
            bin,
            data,
            port: free_port(),
            run_as,
            _dir: dir,
        };
        let data = cluster.data.to_string_lossy().into_owned();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        cluster.start();
        Some(cluster)
    }

    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let (first, rest): (String, Vec<String>) = match self.run_as.split_first() {
            Some((first, rest)) => {
                let mut rest = rest.to_vec();
                rest.push(program.to_string_lossy().into_owned());
                (first.clone(), rest)
            }
            None => (program.to_string_lossy().into_owned(), Vec::new()),
        };
        let output = Command::new(&first)
            .args(&rest)
            .args(args)
            .output()
            .expect("run a PostgreSQL program");
        assert!(
            output.status.success(),
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn start(&self) {
        let data = self.data.to_string_lossy().into_owned();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories='{data}' -c fsync=off",
            self.port
        );
        let log = self.data.join("server.log").to_string_lossy().into_owned();
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-w", "-t", "60", "-o", &options, "start",
            ],
        );
    }

    fn stop(&self) {
        let data = self.data.to_string_lossy().into_owned();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let program = self.bin.join("pg_ctl").to_string_lossy().into_owned();
        let mut command = match self.run_as.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(&program);
                command
            }
            None => Command::new(&program),
        };
        let _ = command
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[test]
fn serving_goes_on_while_the_database_is_down_and_health_recovers() {
    let Some(cluster) = OwnCluster::new() else {
        eprintln!("skipped: no PostgreSQL binaries (set PROXY_POOL_PG_BIN)");
        return;
    };
    let url = cluster.url();
    migrate(&url);
    let rows = rows();
    insert_active(&url, &rows);
    let mut config = TestConfig::new(&url);
    config.set("database", "pool_size", "4");
    let service = Service::start_loaded(&config.text());
    assert_eq!(get(&service.url("/health")).json()["status"], "ok");

    cluster.stop();
    // The sync (every second) notices the outage.
    wait_for("/health to say degraded", Duration::from_secs(15), || {
        let json = get(&service.url("/health")).json();
        json["status"] == "degraded" && json["database"] == "down"
    });
    assert_eq!(get(&service.url("/health")).status, 200);
    for _ in 0..20 {
        let answer = get(&service.url("/get-proxy?source=app"));
        assert_eq!(answer.status, 200, "served from memory: {}", answer.body);
    }
    feedback(&service, "app", &rows[0].url(), true);
    assert_eq!(get(&service.url("/health")).json()["active_proxies"], 3);
    assert_eq!(get(&service.url("/stats")).status, 200);
    assert_eq!(get(&service.url("/metrics")).status, 200);

    cluster.start();
    wait_for("/health to return to ok", Duration::from_secs(20), || {
        let json = get(&service.url("/health")).json();
        json["status"] == "ok" && json["database"] == "up"
    });
    let newcomer = Row {
        country: Some("NZ"),
        ..Row::http("127.0.0.83", 8000)
    };
    insert_active(&url, std::slice::from_ref(&newcomer));
    wait_for(
        "the memory sync to load the newcomer",
        Duration::from_secs(15),
        || {
            let answer = get(&service.url("/get-proxy?source=app&country=NZ"));
            answer.status == 200 && answer.json()["proxy"] == newcomer.url().as_str()
        },
    );
    assert_eq!(get(&service.url("/health")).json()["active_proxies"], 4);
    // The score given during the outage is still there.
    assert_eq!(view(&service, "app")[0]["score"], 1);
}
