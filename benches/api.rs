//! Whole-service API figures at the target scale (100,000 active proxies,
//! 100 sources, 1,000,000 stats entries): get-proxy and feedback requests/s
//! and p50/p99 latency over loopback HTTP with keep-alive, measured with wrk
//! at concurrency 1, 16 and 64 against the real binary and against a bare
//! rouille server answering the same bytes with the same worker count (the
//! ceiling of the HTTP stack), plus in-process call times, snapshot write
//! time and size, start-up time, RSS, and what the access log costs; and the
//! front end as a user runs it (the default config, so `RUST_LOG=info` and
//! its access log) beside nginx answering the same body with `return 200`
//! (Debian's nginx-light, its own config, pid and log files in a temporary
//! directory, never the system service), at c=16 and c=64, with the
//! targets: get-proxy at c=64 at least 75% of nginx's req/s, p99 no higher.
//!
//! Run with `scripts/with-postgres.sh -- cargo bench --bench api`; skips
//! without DATABASE_URL or wrk. BENCH_SECONDS (default 3) sets each wrk run,
//! BENCH_ROUNDS (default 3) the interleaved rounds whose medians are shown,
//! BENCH_WORKERS (default 8, the config's default) both servers' workers,
//! PROXY_POOL_BIN the service binary (default: the one cargo built),
//! BENCH_DIR where the service's directory and snapshot go (default: the
//! system's temporary directory), BENCH_ONLY=sync runs only the get-proxy
//! comparison with and without a memory sync every second, BENCH_ONLY=nginx
//! only the comparison with nginx (skipped when nginx is not installed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use chrono::Utc;
use proxy_pool::config::ScoringConfig;
use proxy_pool::proxy::{ActiveProxy, Anonymity, Protocol, ProxyKey};
use proxy_pool::snapshot::{self, EntrySnapshot, SnapshotData, SourceSnapshot};
use proxy_pool::state::{PickQuery, State};

const PROXIES: usize = 100_000;
const SOURCES: usize = 100;
const ENTRIES_PER_SOURCE: usize = 10_000;
const CONCURRENCY: [usize; 3] = [1, 16, 64];
const COUNTRIES: [&str; 10] = ["US", "DE", "FR", "JP", "GB", "NL", "BR", "IN", "SG", "CA"];
const ANONYMITY: [Anonymity; 3] = [
    Anonymity::Elite,
    Anonymity::Anonymous,
    Anonymity::Transparent,
];

fn main() {
    let Ok(admin_url) = std::env::var("DATABASE_URL") else {
        println!(
            "api bench skipped: DATABASE_URL is not set (run it under scripts/with-postgres.sh)"
        );
        return;
    };
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("api bench skipped: wrk is not installed (apt-get install -y wrk)");
        return;
    }
    let seconds: u64 = env_number("BENCH_SECONDS", 3);
    let workers: usize = env_number("BENCH_WORKERS", 8);
    let rounds: usize = env_number("BENCH_ROUNDS", 3).max(1);
    let mut report = Report::default();

    // The data: rows in a database of our own, stats in a snapshot file.
    let db = BenchDb::create(&admin_url);
    let proxies = make_proxies();
    let started = Instant::now();
    db.load(&proxies);
    report.line(format!(
        "setup: {PROXIES} active rows copied in {} ms",
        started.elapsed().as_millis()
    ));
    let data = make_stats(&proxies);
    // BENCH_DIR: where the services' directories (and snapshots) live.
    let dir = match std::env::var_os("BENCH_DIR") {
        Some(base) => tempfile::tempdir_in(base),
        None => tempfile::tempdir(),
    }
    .expect("tempdir");
    let snapshot_path = dir.path().join("stats.bin");
    let info = snapshot::write_atomic(&snapshot_path, &data).expect("write the snapshot");
    report.line(format!(
        "snapshot::write_atomic of {} entries: {} ms, {:.1} MB",
        info.entries,
        info.duration.as_millis(),
        info.bytes as f64 / 1e6
    ));

    in_process(&proxies, data, &mut report);

    // The service.
    let config = service_config(&db.url, workers, 86400);
    let mut service = RunningService::start(dir.path(), &config, "warn");
    report.line(format!(
        "start-up (spawn to \"active proxies loaded\", snapshot restored): {} ms",
        service.startup.as_millis()
    ));
    report.line(format!(
        "RSS after start-up: {} MB",
        rss_mb(service.pid(), "VmRSS")
    ));
    let source = "src_7";
    let sample = http_get(&service.addr, &format!("/get-proxy?source={source}"));
    let pick: serde_json::Value = serde_json::from_str(&sample).expect("a get-proxy answer");
    assert!(pick["proxy"].is_string(), "get-proxy answered {sample}");
    let feedback_sample = feedback_bodies(&proxies, 1).remove(0);

    // The baseline: bare rouille, same workers, the same bytes.
    let baseline = Baseline::start(workers, sample.clone(), feedback_answer(&feedback_sample));
    let lua = dir.path().join("feedback.lua");
    write_feedback_script(&lua, &feedback_bodies(&proxies, 1000));

    let get_path = format!("/get-proxy?source={source}");
    let sync_phase = SyncPhase {
        db_url: &db.url,
        snapshot_path: &snapshot_path,
        workers,
        get_path: &get_path,
        seconds,
        rounds,
    };
    if std::env::var("BENCH_ONLY").as_deref() == Ok("sync") {
        sync_phase.run(&service, &baseline, &mut report);
        service.stop();
        report.print(workers, seconds, rounds);
        return;
    }
    let nginx_phase = NginxPhase {
        snapshot_path: &snapshot_path,
        config: service_config(&db.url, workers, 86400),
        get_path: &get_path,
        body: &sample,
        seconds,
        rounds,
    };
    if std::env::var("BENCH_ONLY").as_deref() == Ok("nginx") {
        service.stop();
        nginx_phase.run(&mut report);
        report.print(workers, seconds, rounds);
        return;
    }
    let mut table = Vec::new();
    let targets: [(&str, &str, Option<&PathBuf>); 2] = [
        ("get-proxy", &get_path, None),
        ("feedback", "/feedback", Some(&lua)),
    ];
    for (name, path, script) in targets {
        for &c in &CONCURRENCY {
            // Interleaved rounds, medians: the machine is shared, and a
            // neighbour's burst must not land on one side only.
            let mut ours = Vec::new();
            let mut base = Vec::new();
            for _ in 0..rounds {
                ours.push(wrk(&service.addr, path, script, c, seconds));
                base.push(wrk(&baseline.addr, path, script, c, seconds));
            }
            table.push((name, c, WrkResult::median(ours), WrkResult::median(base)));
        }
    }
    report.line(String::new());
    report.line(format!(
        "{:<10} {:>3} | {:>9} {:>8} {:>8} | {:>9} {:>8} {:>8} | {:>6}",
        "endpoint", "c", "svc req/s", "p50 ms", "p99 ms", "bare req/s", "p50 ms", "p99 ms", "ratio"
    ));
    for (name, c, ours, base) in &table {
        report.line(format!(
            "{:<10} {:>3} | {:>9.0} {:>8.3} {:>8.3} | {:>9.0} {:>8.3} {:>8.3} | {:>5.0}%{}",
            name,
            c,
            ours.rps,
            ours.p50_ms,
            ours.p99_ms,
            base.rps,
            base.p50_ms,
            base.p99_ms,
            100.0 * ours.rps / base.rps.max(1.0),
            if ours.errors > 0 {
                format!("  ({} non-2xx)", ours.errors)
            } else {
                String::new()
            }
        ));
    }

    report.line(format!(
        "RSS after the wrk runs: {} MB",
        rss_mb(service.pid(), "VmRSS")
    ));

    // get-proxy while snapshots are written back to back, interleaved with
    // runs without.
    let mut times = Vec::new();
    let (mut during, mut quiet) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        quiet.push(wrk(&service.addr, &get_path, None, 64, seconds));
        let (run, writes) = with_snapshots(&service.addr, || {
            wrk(&service.addr, &get_path, None, 64, seconds)
        });
        during.push(run);
        times.extend(writes);
    }
    let (during, quiet) = (WrkResult::median(during), WrkResult::median(quiet));
    times.sort();
    let size = std::fs::metadata(&snapshot_path)
        .map(|m| m.len())
        .unwrap_or(0);
    report.line(String::new());
    report.line(format!(
        "POST /admin/snapshot (copy + encode + write, {:.1} MB) under load: median {} ms, max {} ms over {} writes",
        size as f64 / 1e6,
        times.get(times.len() / 2).map_or(0, |t| t.as_millis()),
        times.last().map_or(0, |t| t.as_millis()),
        times.len()
    ));
    report.line(format!(
        "get-proxy c=64 during back-to-back snapshots: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms (without: {:.0} req/s, p99 {:.3} ms)",
        during.rps, during.p50_ms, during.p99_ms, quiet.rps, quiet.p99_ms
    ));
    report.line(format!(
        "RSS after the snapshots: {} MB (peak {} MB)",
        rss_mb(service.pid(), "VmRSS"),
        rss_mb(service.pid(), "VmHWM")
    ));

    // The access log's cost: a second service at RUST_LOG=info, in its own
    // directory, runs interleaved with the first.
    let info_dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&snapshot_path, info_dir.path().join("stats.bin")).expect("copy the snapshot");
    let mut logged = RunningService::start(info_dir.path(), &config, "info");
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        off.push(wrk(&service.addr, &get_path, None, 64, seconds));
        on.push(wrk(&logged.addr, &get_path, None, 64, seconds));
    }
    let (on, off) = (WrkResult::median(on), WrkResult::median(off));
    let lines = logged.lines();
    logged.stop();
    report.line(format!(
        "get-proxy c=64 at RUST_LOG=info (access log on, {lines} lines drained): {:.0} req/s, p99 {:.3} ms; at warn: {:.0} req/s, p99 {:.3} ms ({:.0}%)",
        on.rps,
        on.p99_ms,
        off.rps,
        off.p99_ms,
        100.0 * on.rps / off.rps.max(1.0)
    ));

    sync_phase.run(&service, &baseline, &mut report);
    service.stop();
    nginx_phase.run(&mut report);
    report.print(workers, seconds, rounds);
}

/// get-proxy under the default config (RUST_LOG=info, access log on) beside
/// nginx's `return 200` of the same body, interleaved, at c=16 and c=64.
struct NginxPhase<'a> {
    snapshot_path: &'a Path,
    config: String,
    get_path: &'a str,
    body: &'a str,
    seconds: u64,
    rounds: usize,
}

impl NginxPhase<'_> {
    fn run(&self, report: &mut Report) {
        report.line(String::new());
        let dir = tempfile::tempdir().expect("tempdir");
        let nginx = match Nginx::start(dir.path(), self.body) {
            Ok(nginx) => nginx,
            Err(reason) => {
                report.line(format!("nginx comparison skipped: {reason}"));
                return;
            }
        };
        let service_dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(self.snapshot_path, service_dir.path().join("stats.bin"))
            .expect("copy the snapshot");
        let mut service = RunningService::start(service_dir.path(), &self.config, "info");
        let check = http_get(&nginx.addr, self.get_path);
        assert_eq!(check, self.body, "nginx answers the same body");
        let mut rows = Vec::new();
        for c in [16, 64] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for _ in 0..self.rounds {
                ours.push(wrk(&service.addr, self.get_path, None, c, self.seconds));
                theirs.push(wrk(&nginx.addr, self.get_path, None, c, self.seconds));
            }
            rows.push((c, WrkResult::median(ours), WrkResult::median(theirs)));
        }
        let lines = service.lines();
        service.stop();
        report.line(format!(
            "get-proxy with the default config (RUST_LOG=info, {lines} log lines drained) beside {} (`return 200` of the same {} bytes, access log on):",
            nginx.version,
            self.body.len()
        ));
        report.line(format!(
            "{:>3} | {:>9} {:>8} {:>8} | {:>9} {:>8} {:>8} | {:>9} {:>9}",
            "c",
            "svc req/s",
            "p50 ms",
            "p99 ms",
            "nginx r/s",
            "p50 ms",
            "p99 ms",
            "req/s %",
            "p99 x"
        ));
        for (c, ours, theirs) in &rows {
            report.line(format!(
                "{:>3} | {:>9.0} {:>8.3} {:>8.3} | {:>9.0} {:>8.3} {:>8.3} | {:>8.0}% {:>8.2}x{}",
                c,
                ours.rps,
                ours.p50_ms,
                ours.p99_ms,
                theirs.rps,
                theirs.p50_ms,
                theirs.p99_ms,
                100.0 * ours.rps / theirs.rps.max(1.0),
                ours.p99_ms / theirs.p99_ms.max(1e-3),
                if ours.errors > 0 {
                    format!("  ({} non-2xx)", ours.errors)
                } else {
                    String::new()
                }
            ));
        }
        if let Some((_, ours, theirs)) = rows.iter().find(|(c, _, _)| *c == 64) {
            let rps_ok = ours.rps >= 0.75 * theirs.rps;
            let p99_ok = ours.p99_ms <= theirs.p99_ms;
            report.line(format!(
                "targets at c=64: req/s >= 75% of nginx: {}; p99 <= nginx's: {}",
                if rps_ok { "met" } else { "NOT met" },
                if p99_ok { "met" } else { "NOT met" }
            ));
        }
        if let Some(c16) = rows.iter().find(|(c, _, _)| *c == 16) {
            if let Some(c64) = rows.iter().find(|(c, _, _)| *c == 64) {
                report.line(format!(
                    "c=64 / c=16 req/s: {:.0}%",
                    100.0 * c64.1.rps / c16.1.rps.max(1.0)
                ));
            }
        }
    }
}

/// nginx on a free loopback port, its config, pid and logs in `dir`.
struct Nginx {
    child: Child,
    addr: String,
    version: String,
}

impl Nginx {
    fn start(dir: &Path, body: &str) -> Result<Nginx, String> {
        let binary = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|b| Command::new(b).arg("-v").output().is_ok())
            .ok_or("nginx is not installed (apt-get install -y nginx-light)")?;
        let version = Command::new(binary)
            .arg("-v")
            .output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stderr);
                text.trim()
                    .trim_start_matches("nginx version: ")
                    .to_string()
            })
            .unwrap_or_default();
        if body.contains('$') {
            return Err("the body holds a '$', which nginx would take for a variable".into());
        }
        let literal = body.replace('\\', "\\\\").replace('\'', "\\'");
        // A free port: bound here, released, then taken by nginx.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let d = dir.display();
        // Debian's defaults where they matter (worker_processes auto, an
        // access log), every path inside `dir`.
        let config = format!(
            "worker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             keepalive_timeout 65;\n\
             server {{\n    listen 127.0.0.1:{port};\n\
             location / {{\n      default_type application/json;\n      return 200 '{literal}';\n    }}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nginx: {e}"))?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&addr).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                return Err(format!("nginx did not listen on {addr}: {log}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Nginx {
            child,
            addr,
            version,
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: the master stops its workers and exits.
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// get-proxy at c=64 against a second service whose memory sync reloads the
/// 100,000 active rows every second, interleaved with the service whose
/// sync never runs and with the bare baseline.
struct SyncPhase<'a> {
    db_url: &'a str,
    snapshot_path: &'a Path,
    workers: usize,
    get_path: &'a str,
    seconds: u64,
    rounds: usize,
}

impl SyncPhase<'_> {
    fn run(&self, quiet: &RunningService, baseline: &Baseline, report: &mut Report) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(self.snapshot_path, dir.path().join("stats.bin")).expect("copy the snapshot");
        let config = service_config(self.db_url, self.workers, 1);
        let mut synced = RunningService::start(dir.path(), &config, "warn");
        let (mut with, mut without, mut bare) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.rounds {
            without.push(wrk(&quiet.addr, self.get_path, None, 64, self.seconds));
            with.push(wrk(&synced.addr, self.get_path, None, 64, self.seconds));
            bare.push(wrk(&baseline.addr, self.get_path, None, 64, self.seconds));
        }
        synced.stop();
        let (with, without, bare) = (
            WrkResult::median(with),
            WrkResult::median(without),
            WrkResult::median(bare),
        );
        report.line(String::new());
        for (name, run) in [
            ("sync every 1 s", &with),
            ("no sync", &without),
            ("bare rouille", &bare),
        ] {
            report.line(format!(
                "get-proxy c=64, {PROXIES} active, {name:<14}: {:>7.0} req/s ({:>3.0}% of bare), p50 {:.3} ms, p99 {:.3} ms ({:.1}x bare)",
                run.rps,
                100.0 * run.rps / bare.rps.max(1.0),
                run.p50_ms,
                run.p99_ms,
                run.p99_ms / bare.p99_ms.max(1e-3)
            ));
        }
    }
}

/// Runs `run` while another thread asks for snapshots back to back;
/// returns its result and each snapshot's time.
fn with_snapshots(addr: &str, run: impl FnOnce() -> WrkResult) -> (WrkResult, Vec<Duration>) {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (addr, stop) = (addr.to_string(), stop.clone());
        thread::spawn(move || {
            let mut times = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let answer = http_post(&addr, "/admin/snapshot", "");
                if answer.contains("written") {
                    times.push(started.elapsed());
                }
            }
            times
        })
    };
    let result = run();
    stop.store(true, Ordering::Relaxed);
    (result, writer.join().expect("snapshot thread"))
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Report {
    lines: Vec<String>,
}

impl Report {
    fn line(&mut self, line: String) {
        eprintln!("{line}");
        self.lines.push(line);
    }

    fn print(&self, workers: usize, seconds: u64, rounds: usize) {
        let commit = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let cpus = thread::available_parallelism().map_or(0, |n| n.get());
        println!();
        println!(
            "api bench: commit {commit}, {cpus} CPUs, {workers} workers, wrk {seconds} s per run, medians of {rounds} interleaved rounds, keep-alive, loopback"
        );
        for line in &self.lines {
            println!("{line}");
        }
    }
}

fn scoring() -> ScoringConfig {
    ScoringConfig::defaults()
}

fn make_proxies() -> Vec<ActiveProxy> {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..PROXIES)
        .map(|i| {
            let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
            ActiveProxy {
                exit_ip: None,
                id: i as i64 + 1,
                key: ProxyKey::new(
                    Protocol::ALL[rng.usize(..4)],
                    ip.parse().expect("ip"),
                    1000 + (i % 50_000) as u16,
                ),
                latency_ms: Some(rng.u32(50..5000)),
                anonymity: Some(ANONYMITY[rng.usize(..3)]),
                country: Some(COUNTRIES[rng.usize(..COUNTRIES.len())].into()),
                supports_https: Some(rng.bool()),
                last_validated_at: Some(Utc::now()),
                anonymity_evidence: None,
            }
        })
        .collect()
}

/// 10,000 entries per source, scores over the whole range, about 2% banned.
fn make_stats(proxies: &[ActiveProxy]) -> SnapshotData {
    let mut rng = fastrand::Rng::with_seed(11);
    let now_ms = Utc::now().timestamp_millis();
    let sources = (0..SOURCES)
        .map(|s| {
            let mut slots: Vec<u32> = (0..PROXIES as u32).collect();
            rng.shuffle(&mut slots);
            let entries = slots[..ENTRIES_PER_SOURCE]
                .iter()
                .map(|&url| {
                    let banned = rng.u8(..100) < 2;
                    EntrySnapshot {
                        url,
                        score: if banned { -20 } else { rng.i32(-15..=100) },
                        success_count: rng.u64(0..1000),
                        failure_count: rng.u64(0..100),
                        banned_until_ms: banned.then_some(now_ms + 1_800_000),
                        ban_count: u32::from(banned),
                        last_used_ms: now_ms - rng.i64(0..3_600_000),
                        discounted: None,
                    }
                })
                .collect();
            SourceSnapshot {
                name: format!("src_{s}"),
                requests: rng.u64(0..1_000_000),
                feedbacks: rng.u64(0..1_000_000),
                entries,
            }
        })
        .collect();
    SnapshotData {
        taken_at_ms: now_ms,
        urls: proxies.iter().map(|p| p.key.url()).collect(),
        sources,
        active: Vec::new(),
    }
}

/// Median nanoseconds per call of `call`, over `rounds` rounds of `n` calls.
fn per_call(rounds: usize, n: usize, mut call: impl FnMut(usize)) -> f64 {
    let mut times: Vec<f64> = (0..rounds)
        .map(|round| {
            let started = Instant::now();
            for i in 0..n {
                call(round * n + i);
            }
            started.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[rounds / 2]
}

fn in_process(proxies: &[ActiveProxy], data: SnapshotData, report: &mut Report) {
    let state = State::new(&scoring());
    let started = Instant::now();
    state.replace_active(proxies.to_vec());
    let loaded = started.elapsed();
    let started = Instant::now();
    let restored = state.restore(data, Utc::now());
    report.line(format!(
        "in process: replace_active({PROXIES}) {} ms, restore({} entries) {} ms",
        loaded.as_millis(),
        restored.entries,
        started.elapsed().as_millis()
    ));
    let now = Utc::now();
    let query = PickQuery::default();
    let get = per_call(9, 20_000, |i| {
        let source = format!("src_{}", i % SOURCES);
        let _ = std::hint::black_box(state.get_proxy(&source, &query, now));
    });
    let filtered = PickQuery {
        protocol: Some(Protocol::Socks5),
        country: Some("DE".into()),
        ..PickQuery::default()
    };
    let get_filtered = per_call(9, 20_000, |i| {
        let source = format!("src_{}", i % SOURCES);
        let _ = std::hint::black_box(state.get_proxy(&source, &filtered, now));
    });
    let urls: Vec<String> = proxies.iter().map(|p| p.key.url()).collect();
    let feedback = per_call(9, 20_000, |i| {
        let source = format!("src_{}", i % SOURCES);
        let url = &urls[(i * 7919) % urls.len()];
        let _ = std::hint::black_box(state.feedback(&source, url, i % 5 != 0, now));
    });
    let started = Instant::now();
    let copy = state.snapshot_data(Utc::now());
    report.line(format!(
        "in process: get_proxy {:.2} us/call (socks5+DE filter {:.2} us), feedback {:.2} us/call, snapshot_data copy of {} entries {} ms",
        get / 1000.0,
        get_filtered / 1000.0,
        feedback / 1000.0,
        copy.entry_count(),
        started.elapsed().as_millis()
    ));
}

/// A database of the bench's own, dropped at the end.
struct BenchDb {
    admin_url: String,
    name: String,
    url: String,
}

impl BenchDb {
    fn create(admin_url: &str) -> BenchDb {
        let name = format!("pp_bench_api_{}", std::process::id());
        let mut client = postgres::Client::connect(admin_url, postgres::NoTls).expect("connect");
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .expect("drop a leftover bench database");
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create the bench database");
        let url = with_database(admin_url, &name);
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        client
            .batch_execute(include_str!("../schema.sql"))
            .expect("schema");
        BenchDb {
            admin_url: admin_url.to_string(),
            name,
            url,
        }
    }

    fn load(&self, proxies: &[ActiveProxy]) {
        let mut client = postgres::Client::connect(&self.url, postgres::NoTls).expect("connect");
        let mut writer = client
            .copy_in(
                "COPY proxies (protocol, ip, port, is_active, latency_ms, anonymity, country,
                    supports_https, last_validated_at) FROM STDIN",
            )
            .expect("copy");
        let mut text = String::with_capacity(proxies.len() * 80);
        for p in proxies {
            text.push_str(&format!(
                "{}\t{}\t{}\tt\t{}\t{}\t{}\t{}\t{}\n",
                p.key.protocol.as_str(),
                p.key.ip,
                p.key.port,
                p.latency_ms.unwrap_or(0),
                p.anonymity.map_or("elite", |a| a.as_str()),
                p.country.as_deref().unwrap_or("US"),
                if p.supports_https == Some(true) {
                    "t"
                } else {
                    "f"
                },
                Utc::now().to_rfc3339()
            ));
        }
        writer.write_all(text.as_bytes()).expect("copy rows");
        writer.finish().expect("finish copy");
    }
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.admin_url, postgres::NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_at(url.find('?').unwrap_or(url.len()));
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    format!("{}/{}{}", &base[..host_end], name, query)
}

fn service_config(database_url: &str, workers: usize, sync_seconds: u64) -> String {
    format!(
        "[database]\nurl = {database_url}\n\
         [server]\nbind = 127.0.0.1:0\nworkers = {workers}\nmax_body_bytes = 1048576\n\
         [fetcher]\nsource_urls = http://127.0.0.1:9/list.txt\ninterval_seconds = 86400\ntimeout_ms = 500\nallow_private_addresses = true\n\
         [validator]\nvalidation_target = http://127.0.0.1:9/get\nhttps_target =\nvalidation_timeout_ms = 1000\nconnect_timeout_ms = 500\n\
         [scheduler]\ninterval_seconds = 86400\n\
         [state]\nsnapshot_path = stats.bin\nsnapshot_interval_seconds = 86400\nsync_interval_seconds = {sync_seconds}\n"
    )
}

struct RunningService {
    child: Child,
    addr: String,
    startup: Duration,
    /// Every line read from stderr, access lines included.
    lines: Arc<AtomicUsize>,
}

impl RunningService {
    /// `level` is the service's RUST_LOG; start-up lines are kept visible.
    fn start(dir: &Path, config: &str, level: &str) -> RunningService {
        let path = dir.join("config.ini");
        std::fs::write(&path, config).expect("config");
        let filter = if level == "info" {
            "info".to_string()
        } else {
            format!("{level},proxy_pool::app=info,proxy_pool::persist=info")
        };
        let started = Instant::now();
        // PROXY_POOL_BIN: a copy of the binary, when the shared target
        // directory may be rebuilt from another checkout meanwhile.
        let binary = std::env::var_os("PROXY_POOL_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_proxy-pool")));
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .current_dir(dir)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn proxy-pool");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let lines = Arc::new(AtomicUsize::new(0));
        {
            let (log, lines) = (log.clone(), lines.clone());
            thread::spawn(move || {
                let mut ready = Some(ready_tx);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("active proxies loaded") {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(started.elapsed());
                        }
                    }
                    lines.fetch_add(1, Ordering::Relaxed);
                    // Access lines are only counted: they would fill memory.
                    if !line.contains(" access]") {
                        log.lock().expect("log").push(line);
                    }
                }
            });
        }
        let startup = ready_rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                panic!("the service did not start: {:?}", log.lock().expect("log"))
            });
        let addr = log
            .lock()
            .expect("log")
            .iter()
            .find_map(|l| {
                l.split("listening on http://")
                    .nth(1)
                    .map(|a| a.trim().to_string())
            })
            .expect("listening line");
        RunningService {
            child,
            addr,
            startup,
            lines,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn lines(&self) -> usize {
        self.lines.load(Ordering::Relaxed)
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_mb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// The ceiling: rouille answering constant bodies, nothing else.
struct Baseline {
    addr: String,
}

impl Baseline {
    fn start(workers: usize, get_body: String, feedback_body: String) -> Baseline {
        let server = rouille::Server::new("127.0.0.1:0", move |request| {
            if request.method() == "POST" {
                let mut body = Vec::new();
                if let Some(mut data) = request.data() {
                    let _ = data.read_to_end(&mut body);
                }
                rouille::Response::from_data("application/json", feedback_body.clone())
            } else {
                rouille::Response::from_data("application/json", get_body.clone())
            }
        })
        .expect("bind the baseline")
        .pool_size(workers);
        let addr = server.server_addr().to_string();
        thread::spawn(move || server.run());
        Baseline { addr }
    }
}

fn feedback_bodies(proxies: &[ActiveProxy], n: usize) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(3);
    (0..n)
        .map(|_| {
            format!(
                r#"{{"source":"src_{}","proxy":"{}","success":{}}}"#,
                rng.usize(..SOURCES),
                proxies[rng.usize(..proxies.len())].key.url(),
                rng.u8(..10) < 8
            )
        })
        .collect()
}

fn feedback_answer(body: &str) -> String {
    let item: serde_json::Value = serde_json::from_str(body).expect("json");
    serde_json::json!({
        "source": item["source"], "proxy": item["proxy"], "score": 1, "success_count": 20,
        "failure_count": 6, "is_banned": false, "banned_until": null,
    })
    .to_string()
}

fn write_feedback_script(path: &Path, bodies: &[String]) {
    let mut lua = String::from("local bodies = {\n");
    for body in bodies {
        lua.push_str(&format!("  [==[{body}]==],\n"));
    }
    lua.push_str(
        "}\nlocal i = 0\nlocal headers = { [\"Content-Type\"] = \"application/json\" }\n\
         request = function()\n  i = i + 1\n  return wrk.format(\"POST\", \"/feedback\", headers, bodies[(i % #bodies) + 1])\nend\n",
    );
    std::fs::write(path, lua).expect("lua script");
}

#[derive(Debug, Default)]
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

impl WrkResult {
    /// Each figure's median over the runs.
    fn median(runs: Vec<WrkResult>) -> WrkResult {
        let median = |f: &dyn Fn(&WrkResult) -> f64| {
            let mut values: Vec<f64> = runs.iter().map(f).collect();
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied().unwrap_or(0.0)
        };
        WrkResult {
            rps: median(&|r| r.rps),
            p50_ms: median(&|r| r.p50_ms),
            p99_ms: median(&|r| r.p99_ms),
            errors: runs.iter().map(|r| r.errors).sum(),
        }
    }
}

fn wrk(
    addr: &str,
    path: &str,
    script: Option<&PathBuf>,
    connections: usize,
    seconds: u64,
) -> WrkResult {
    let threads = connections.min(2);
    let mut command = Command::new("wrk");
    command.args([
        "-t",
        &threads.to_string(),
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{seconds}s"),
        "--latency",
    ]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let output = command
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut result = WrkResult::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", value] => result.p50_ms = millis(value),
            ["99%", value] => result.p99_ms = millis(value),
            ["Requests/sec:", value] => result.rps = value.parse().unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", n] => result.errors = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    result
}

/// wrk's "123.45us", "1.20ms", "2.00s" in milliseconds.
fn millis(value: &str) -> f64 {
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (value, 1.0)
    };
    number.parse::<f64>().unwrap_or(f64::NAN) * scale
}

fn http_exchange(addr: &str, request: String) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or(answer)
}

fn http_get(addr: &str, path: &str) -> String {
    http_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

fn http_post(addr: &str, path: &str, body: &str) -> String {
    http_exchange(
        addr,
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}
