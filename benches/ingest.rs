//! Ingest benchmark: parse and upsert a 1,000,000-line list (20% duplicates,
//! 5% junk) into an empty table, then again into the full table. Needs
//! DATABASE_URL (`scripts/with-postgres.sh -- cargo bench --bench ingest`
//! provides it). Each figure is the median of
//! three runs, beside a baseline measured in the same run: COPY of the same
//! rows into an unindexed table, the floor of what PostgreSQL can ingest.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use proxy_pool::config::DatabaseConfig;
use proxy_pool::fetcher::parse::{is_public, parse_list, ParseOptions};
use proxy_pool::proxy::Protocol;
use proxy_pool::store::Store;

const LINES: usize = 1_000_000;
const RUNS: usize = 3;

fn make_list(rng: &mut fastrand::Rng) -> String {
    let unique = LINES * 75 / 100;
    let mut proxies: Vec<String> = Vec::with_capacity(unique);
    while proxies.len() < unique {
        let ip = Ipv4Addr::from(rng.u32(..));
        if !is_public(IpAddr::V4(ip)) {
            continue;
        }
        let port = rng.u16(1..);
        proxies.push(match rng.u8(..4) {
            0 => format!("socks5://{ip}:{port}"),
            1 => format!("{ip}:{port}\tUS elite"),
            _ => format!("{ip}:{port}"),
        });
    }
    let mut text = String::with_capacity(LINES * 24);
    for i in 0..LINES {
        match i % 20 {
            // 5% junk.
            0 => text.push_str("not a proxy <td>\n"),
            // 20% duplicates of earlier lines.
            1..=4 if i > 100 => {
                let j = rng.usize(..proxies.len().min(i));
                let _ = writeln!(text, "{}", proxies[j]);
            }
            _ => {
                let _ = writeln!(text, "{}", proxies[i % proxies.len()]);
            }
        }
    }
    text
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn main() {
    if std::env::var_os("DATABASE_URL").is_none() {
        eprintln!("ingest benchmark skipped: DATABASE_URL is not set (run it under scripts/with-postgres.sh)");
        return;
    }
    let mut rng = fastrand::Rng::with_seed(7);
    let text = make_list(&mut rng);
    let options = ParseOptions {
        default_protocol: Protocol::Http,
        allow_private_addresses: false,
    };
    let (mut parse_times, mut empty_times, mut full_times, mut copy_times) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut counts = (0, 0, 0);
    for _ in 0..RUNS {
        let db = support::TestDb::new();
        let store = Store::connect(&DatabaseConfig {
            url: db.url.clone(),
            pool_size: 2,
            checkout_timeout: Duration::from_secs(30),
        })
        .expect("store");
        store.migrate().expect("migrate");

        let started = Instant::now();
        let parsed = parse_list(&text, &options);
        parse_times.push(started.elapsed());

        let started = Instant::now();
        let first = store
            .upsert_listed("bench", &parsed.proxies)
            .expect("upsert");
        empty_times.push(started.elapsed() + parse_times[parse_times.len() - 1]);

        let started = Instant::now();
        let parsed_again = parse_list(&text, &options);
        let second = store
            .upsert_listed("bench", &parsed_again.proxies)
            .expect("upsert");
        full_times.push(started.elapsed());
        counts = (parsed.proxies.len(), first.new, second.new);

        // Baseline: COPY the same rows into a table without indexes.
        let mut client = db.client();
        client
            .batch_execute("CREATE TABLE copy_baseline (protocol text, ip inet, port int, username text, password text)")
            .unwrap();
        let started = Instant::now();
        let mut writer = client.copy_in("COPY copy_baseline FROM STDIN").unwrap();
        let mut buffer = String::with_capacity(64 * 1024);
        for key in &parsed.proxies {
            let _ = writeln!(
                buffer,
                "{}\t{}\t{}\t\\N\t\\N",
                key.protocol, key.ip, key.port
            );
            if buffer.len() > 60_000 {
                writer.write_all(buffer.as_bytes()).unwrap();
                buffer.clear();
            }
        }
        writer.write_all(buffer.as_bytes()).unwrap();
        writer.finish().unwrap();
        copy_times.push(started.elapsed());
    }
    let (parse, empty, full, copy) = (
        median(parse_times),
        median(empty_times),
        median(full_times),
        median(copy_times),
    );
    println!("ingest of {LINES} lines ({} distinct proxies; first run {} new, second run {} new), median of {RUNS}:", counts.0, counts.1, counts.2);
    println!(
        "  parse only                 {:>8.0} ms",
        parse.as_secs_f64() * 1000.0
    );
    println!(
        "  parse + upsert, empty table {:>7.0} ms  ({:.2}x the COPY baseline)",
        empty.as_secs_f64() * 1000.0,
        empty.as_secs_f64() / copy.as_secs_f64()
    );
    println!(
        "  parse + upsert, full table  {:>7.0} ms  ({:.2}x the COPY baseline)",
        full.as_secs_f64() * 1000.0,
        full.as_secs_f64() / copy.as_secs_f64()
    );
    println!(
        "  baseline: COPY into an unindexed table {:>6.0} ms",
        copy.as_secs_f64() * 1000.0
    );
    println!("  peak RSS {:.0} MB", peak_rss_mb());
}
