//! Validation cycle benchmark: one cycle over a farm of 5,000 proxies (50%
//! alive with 50-500 ms latency, 30% dead, 20% black holes), 500 workers, a
//! 2 s validation timeout. Needs DATABASE_URL (scripts/with-postgres.sh
//! provides it). Prints the median of three cycles beside its lower bound
//! measured from the farm's manifest in the same run: the sum of the
//! individual check times divided by the workers, or the slowest single
//! check if larger. Also the database write time and the peak RSS.
//!
//! The farm runs as the `proxy-farm` binary in a child process, so that the
//! peak RSS printed for the validator is the validator's alone; the farm's
//! own peak is printed beside it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_pool::config::Config;
use proxy_pool::health::Health;
use proxy_pool::proxy::{Protocol, ProxyKey};
use proxy_pool::shutdown::ShutdownSignal;
use proxy_pool::state::State;
use proxy_pool::store::{DuePolicy, Store};
use proxy_pool::validator::check::{CheckConfig, Checker};
use proxy_pool::validator::cycle::{CycleSummary, Validator, ValidatorSettings};

const PROXIES: usize = 5000;
const WORKERS: usize = 500;
const TIMEOUT: Duration = Duration::from_secs(2);
const RUNS: usize = 3;

/// The farm in its own process; killed on drop.
struct FarmProcess {
    child: Child,
    judge_url: String,
    list_url: String,
    manifest: Vec<Entry>,
    _dir: tempfile::TempDir,
}

impl Drop for FarmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the bench needs of a manifest entry.
struct Entry {
    key: ProxyKey,
    behaviour: String,
    /// `Slow`'s delay in milliseconds.
    delay_ms: u64,
    connect: bool,
    alive: bool,
}

impl Entry {
    /// The least a correct check of this proxy can take: an alive one waits
    /// its delay on each of its two connections (the absolute-URI request and
    /// the CONNECT check), a dead one is refused at once, a black hole costs
    /// the whole timeout, or for an http proxy the 4/5 of it its first
    /// answer may take (the rest is kept for the CONNECT check).
    fn least_check_time(&self) -> Duration {
        match self.behaviour.as_str() {
            "black_hole" if self.key.protocol.is_http() => TIMEOUT * 4 / 5,
            "black_hole" => TIMEOUT,
            "dead" => Duration::ZERO,
            _ => {
                let connections = if self.key.protocol.is_http() && self.alive {
                    2
                } else {
                    1
                };
                Duration::from_millis(self.delay_ms * connections)
            }
        }
    }
}

fn start_farm() -> FarmProcess {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest_path = dir.path().join("manifest.json");
    let mut child = Command::new(proxy_farm::binary())
        .args(["--listen", "127.0.0.1:0", "--proxies", &PROXIES.to_string()])
        .args(["--mix", "0.5,0.3,0.2", "--latency-ms", "50-500"])
        .arg("--manifest")
        .arg(&manifest_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start proxy-farm");
    let stdout = child.stdout.take().expect("farm stdout");
    let mut judge_url = String::new();
    let mut list_url = String::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(url) = line.strip_prefix("judge: ") {
            judge_url = url.trim().to_string();
        }
        if let Some(url) = line.trim().strip_prefix("plain") {
            list_url = url.trim().to_string();
        }
        if line.starts_with("stop with") {
            break;
        }
    }
    assert!(!judge_url.is_empty(), "proxy-farm printed no judge url");
    let text = std::fs::read_to_string(&manifest_path).expect("read the manifest");
    let json: serde_json::Value = serde_json::from_str(&text).expect("manifest json");
    let manifest = json
        .as_array()
        .expect("manifest array")
        .iter()
        .map(|e| {
            let text = |name: &str| e[name].as_str().map(str::to_string);
            Entry {
                key: ProxyKey {
                    protocol: Protocol::from_scheme(e["protocol"].as_str().unwrap_or(""))
                        .expect("protocol"),
                    ip: e["ip"]
                        .as_str()
                        .and_then(|ip| ip.parse::<IpAddr>().ok())
                        .expect("ip"),
                    port: e["port"]
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .expect("port"),
                    username: text("username"),
                    password: text("password"),
                },
                behaviour: text("behaviour").unwrap_or_default(),
                delay_ms: e["parameter"].as_u64().unwrap_or(0),
                connect: e["connect"].as_bool().unwrap_or(false),
                alive: e["alive"].as_bool().unwrap_or(false),
            }
        })
        .collect();
    FarmProcess {
        child,
        judge_url,
        list_url,
        manifest,
        _dir: dir,
    }
}

fn status_kb(path: &str, field: &str) -> f64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// CPU time (user + system) a process has used, from /proc/PID/stat
/// (assumes the usual 100 clock ticks a second).
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields are counted after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Connections the kernel dropped because an accept queue was full, machine
/// wide (TcpExt ListenOverflows): a farm or judge falling behind shows here.
fn listen_overflows() -> u64 {
    let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

fn mb(kb: f64) -> String {
    format!("{:.0} MB", kb / 1024.0)
}

fn median<T: Copy + Ord>(values: &[T]) -> T {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn main() {
    if std::env::var_os("DATABASE_URL").is_none() {
        eprintln!("validate benchmark skipped: DATABASE_URL is not set (run it under scripts/with-postgres.sh)");
        return;
    }
    let _ = rlimit::increase_nofile_limit(16_384);
    let farm = start_farm();
    let db = support::TestDb::new();
    let text = format!(
        "[database]\nurl = {}\npool_size = 8\n[fetcher]\nsource_urls = {}\nallow_private_addresses = true\n\
         [validator]\nvalidation_target = {}\nhttps_target =\nvalidation_timeout_ms = {}\nconnect_timeout_ms = {}\n\
         validation_workers = {WORKERS}\n",
        db.url,
        farm.list_url,
        farm.judge_url,
        TIMEOUT.as_millis(),
        TIMEOUT.as_millis()
    );
    let config = Config::parse(&text, "bench.ini", None).expect("bench config");
    let store = Store::connect(&config.database).expect("store");
    store.migrate().expect("migrate");
    let keys: Vec<ProxyKey> = farm.manifest.iter().map(|e| e.key.clone()).collect();
    store.upsert_listed("farm", &keys).expect("upsert the farm");

    let state = Arc::new(State::new(&config.scoring));
    let checker = Checker::new(CheckConfig::from_validator(&config.validator)).expect("checker");
    let settings = ValidatorSettings {
        workers: WORKERS,
        timeout: TIMEOUT,
        policy: DuePolicy {
            revalidate_after: config.validator.revalidate_after,
            retry_inactive_after: config.validator.retry_inactive_after,
            lease: Duration::from_secs(60),
        },
    };
    let validator = Validator::new(
        store.clone(),
        checker,
        None,
        settings,
        state,
        Arc::new(Health::new()),
    )
    .expect("validator");

    let sum: Duration = farm.manifest.iter().map(Entry::least_check_time).sum();
    let slowest = farm
        .manifest
        .iter()
        .map(Entry::least_check_time)
        .max()
        .unwrap_or_default();
    let spread = sum / WORKERS as u32;
    let bound = spread.max(slowest);
    let expected_alive = farm.manifest.iter().filter(|e| e.alive).count() as u64;
    let with_connect = farm.manifest.iter().filter(|e| e.connect).count();

    println!(
        "validation cycle: {PROXIES} farm proxies (alive {expected_alive} of which {with_connect} tunnel CONNECT), \
         {WORKERS} workers, timeout {}, {} cores",
        secs(TIMEOUT),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>4} {:>9} {:>8} {:>6} {:>6} {:>9} {:>10} {:>10} {:>10}",
        "run", "cycle", "checked", "alive", "dead", "writes", "cpu self", "cpu farm", "overflows"
    );
    let farm_pid = farm.child.id().to_string();
    let mut cycles = Vec::new();
    let mut writes = Vec::new();
    let mut client = db.client();
    for run in 1..=RUNS {
        client
            .execute(
                "UPDATE proxies SET last_validated_at = NULL, lease_until = NULL",
                &[],
            )
            .expect("reset the table");
        let (self_cpu, farm_cpu) = (cpu_time("self"), cpu_time(&farm_pid));
        let overflows = listen_overflows();
        let started = Instant::now();
        let summary: CycleSummary = validator.run_cycle(&ShutdownSignal::never());
        let took = started.elapsed();
        println!(
            "{run:>4} {:>9} {:>8} {:>6} {:>6} {:>9} {:>10} {:>10} {:>10}",
            secs(took),
            summary.checked,
            summary.alive,
            summary.dead(),
            format!("{} ms", summary.write_time.as_millis()),
            secs(cpu_time("self") - self_cpu),
            secs(cpu_time(&farm_pid) - farm_cpu),
            listen_overflows().saturating_sub(overflows)
        );
        if summary.checked != PROXIES as u64 || summary.alive != expected_alive {
            println!(
                "     (expected {PROXIES} checked, {expected_alive} alive: {})",
                summary.summary_line()
            );
        }
        cycles.push(took);
        writes.push(summary.write_time);
    }
    let cycle = median(&cycles);
    println!();
    println!("median cycle          {}", secs(cycle));
    println!(
        "lower bound           {} (sum of check times {} / {WORKERS} workers = {}; slowest check {})",
        secs(bound),
        secs(sum),
        secs(spread),
        secs(slowest)
    );
    println!(
        "ratio                 {:.2} (target <= 1.25)",
        cycle.as_secs_f64() / bound.as_secs_f64()
    );
    println!(
        "database writes       {} ms (median per cycle)",
        median(&writes).as_millis()
    );
    println!(
        "peak RSS              validator process {}, farm process {} (separate)",
        mb(status_kb("/proc/self/status", "VmHWM:")),
        mb(status_kb(
            &format!("/proc/{}/status", farm.child.id()),
            "VmHWM:"
        ))
    );
}
