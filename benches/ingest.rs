//! Ingest benchmark: parse and upsert a 1,000,000-line list (750,000 distinct
//! proxies each written once, 200,000 duplicates of lines written earlier,
//! 50,000 junk lines, shuffled with a fixed seed) into an empty table, then
//! again into the full table as a real re-listing an hour later would: every
//! row's last_seen_at is backdated and the table vacuumed first, so that the
//! second run updates every row. Needs DATABASE_URL (`scripts/with-postgres.sh
//! -- cargo bench --bench ingest` provides it). Each figure is the median of
//! three runs, beside a baseline measured in the same run: COPY of the same
//! rows into an unindexed table, the floor of what PostgreSQL can ingest.
//!
//! `INGEST_PARSE_ONLY=1` measures the parse alone, without a database:
//! the median of more runs, for a figure that holds on a busy machine, and
//! the same proxies as a JSON array of strings and as JSON objects.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use proxy_pool::config::DatabaseConfig;
use proxy_pool::fetcher::parse::{is_public, parse_list, ParseOptions};
use proxy_pool::proxy::Protocol;
use proxy_pool::store::Store;

const LINES: usize = 1_000_000;
const DISTINCT: usize = 750_000;
const DUPLICATES: usize = 200_000;
const JUNK: usize = 50_000;
const RUNS: usize = 3;
const PARSE_ONLY_RUNS: usize = 11;

#[derive(Clone, Copy)]
enum Slot {
    Distinct,
    Duplicate,
    Junk,
}

/// The list: every distinct proxy written once, duplicates drawn from the
/// lines already written, junk in between, in a fixed pseudo-random order.
fn make_list(rng: &mut fastrand::Rng) -> String {
    const { assert!(DISTINCT + DUPLICATES + JUNK == LINES) };
    // Distinct identities (protocol, address, port): a bare line and one with
    // trailing fields name the same http proxy.
    let mut identities: HashSet<(bool, u32, u16)> = HashSet::with_capacity(DISTINCT);
    let mut proxies: Vec<String> = Vec::with_capacity(DISTINCT);
    while proxies.len() < DISTINCT {
        let ip = Ipv4Addr::from(rng.u32(..));
        if !is_public(IpAddr::V4(ip)) {
            continue;
        }
        let port = rng.u16(1..);
        let kind = rng.u8(..4);
        if !identities.insert((kind == 0, u32::from(ip), port)) {
            continue;
        }
        proxies.push(match kind {
            0 => format!("socks5://{ip}:{port}"),
            1 => format!("{ip}:{port}\tUS elite"),
            _ => format!("{ip}:{port}"),
        });
    }
    drop(identities);
    let mut slots: Vec<Slot> = std::iter::repeat_n(Slot::Distinct, DISTINCT)
        .chain(std::iter::repeat_n(Slot::Duplicate, DUPLICATES))
        .chain(std::iter::repeat_n(Slot::Junk, JUNK))
        .collect();
    rng.shuffle(&mut slots);
    // A duplicate needs a line before it.
    if let Some(first) = slots.iter().position(|s| matches!(s, Slot::Distinct)) {
        slots.swap(0, first);
    }
    let mut text = String::with_capacity(LINES * 24);
    let mut written = 0;
    for (i, slot) in slots.iter().enumerate() {
        match slot {
            Slot::Distinct => {
                let _ = writeln!(text, "{}", proxies[written]);
                written += 1;
            }
            Slot::Duplicate => {
                let _ = writeln!(text, "{}", proxies[rng.usize(..written)]);
            }
            Slot::Junk => {
                let _ = match i % 4 {
                    0 => writeln!(text, "not a proxy <td>"),
                    1 => writeln!(text, "999.{}.1.1:8080", i % 200),
                    2 => writeln!(text, "10.{}.{}.1:3128", i % 250, i % 199),
                    _ => writeln!(text, "proxy{i}.example.com:8080"),
                };
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Time this thread spent on a CPU (Linux schedstat): on a busy machine it
/// is what the wall time would be on an idle one. Zero where unknown.
fn thread_cpu_time() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// The parse alone, `PARSE_ONLY_RUNS` times, for each format of the list.
fn parse_only(text: &str, options: &ParseOptions) {
    let lines: Vec<&str> = text.lines().collect();
    let strings = serde_json::to_string(&lines).expect("json");
    let mut objects = String::from("[");
    for (index, line) in lines.iter().enumerate() {
        let (scheme, rest) = line.split_once("://").unwrap_or(("http", line));
        let host_port = rest.split(['\t', ' ']).next().unwrap_or(rest);
        let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, "0"));
        if index > 0 {
            objects.push(',');
        }
        let _ = write!(
            objects,
            r#"{{"protocol":{scheme:?},"host":{host:?},"port":{port:?},"country":"US"}}"#
        );
    }
    objects.push(']');
    println!(
        "parse only, {LINES} lines or entries, median of {PARSE_ONLY_RUNS}: wall (min), cpu time"
    );
    for (what, body) in [
        ("text", text),
        ("json array of strings", &strings),
        ("json array of objects", &objects),
    ] {
        let (mut times, mut cpu_times) = (Vec::new(), Vec::new());
        for _ in 0..PARSE_ONLY_RUNS {
            let (started, cpu_started) = (Instant::now(), thread_cpu_time());
            let parsed = parse_list(body, options);
            times.push(started.elapsed());
            cpu_times.push(thread_cpu_time().saturating_sub(cpu_started));
            assert_eq!(parsed.proxies.len(), DISTINCT, "{what}: distinct proxies");
            drop(parsed);
        }
        let min = *times.iter().min().expect("runs");
        println!(
            "  {what:<24} {:>8.0} ms ({:.0} ms), cpu {:.0} ms",
            ms(median(times)),
            ms(min),
            ms(median(cpu_times))
        );
    }
}

fn main() {
    let parse_only_asked = std::env::var_os("INGEST_PARSE_ONLY").is_some();
    if !parse_only_asked && std::env::var_os("DATABASE_URL").is_none() {
        eprintln!("ingest benchmark skipped: DATABASE_URL is not set (run it under scripts/with-postgres.sh)");
        return;
    }
    let mut rng = fastrand::Rng::with_seed(7);
    let text = make_list(&mut rng);
    let options = ParseOptions {
        default_protocol: Protocol::Http,
        allow_private_addresses: false,
    };
    {
        let check = parse_list(&text, &options);
        assert_eq!(check.lines, LINES);
        assert_eq!(check.proxies.len(), DISTINCT, "distinct proxies");
        assert_eq!(check.duplicates, DUPLICATES, "duplicates");
        assert_eq!(check.rejected, JUNK, "junk lines");
    }
    if parse_only_asked {
        parse_only(&text, &options);
        return;
    }
    let (mut parse_times, mut empty_times, mut full_times, mut copy_times) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let db = support::TestDb::new();
        let store = Store::connect(&DatabaseConfig {
            url: proxy_pool::secret::SecretUrl::new(db.url.clone()),
            pool_size: 2,
            checkout_timeout: Duration::from_secs(30),
        })
        .expect("store");
        store.migrate().expect("migrate");
        let mut client = db.client();

        let started = Instant::now();
        let parsed = parse_list(&text, &options);
        let parse = started.elapsed();
        let first = store
            .upsert_listed("bench", &parsed.proxies)
            .expect("upsert");
        let empty = started.elapsed();
        assert_eq!(
            (first.new, first.upserted),
            (DISTINCT as u64, DISTINCT as u64)
        );
        drop(parsed);

        // An hour later: every row is due for a new last_seen_at.
        for sql in [
            "UPDATE proxies SET last_seen_at = now() - interval '1 hour'",
            "VACUUM ANALYZE proxies",
            "VACUUM ANALYZE proxy_sources",
        ] {
            client.batch_execute(sql).expect(sql);
        }
        let started = Instant::now();
        let parsed = parse_list(&text, &options);
        let second = store
            .upsert_listed("bench", &parsed.proxies)
            .expect("upsert");
        let full = started.elapsed();
        assert_eq!((second.new, second.upserted), (0, DISTINCT as u64));
        let stale: i64 = client
            .query_one(
                "SELECT count(*) FROM proxies WHERE last_seen_at < now() - interval '30 minutes'",
                &[],
            )
            .expect("count")
            .get(0);
        assert_eq!(stale, 0, "every re-listed row has a new last_seen_at");

        // Baseline: COPY the same rows into a table without indexes.
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
        let copy = started.elapsed();
        drop(parsed);
        eprintln!(
            "run {}: parse {:.0} ms, empty {:.0} ms, full {:.0} ms, COPY {:.0} ms",
            run + 1,
            ms(parse),
            ms(empty),
            ms(full),
            ms(copy)
        );
        parse_times.push(parse);
        empty_times.push(empty);
        full_times.push(full);
        copy_times.push(copy);
    }
    let (parse, empty, full, copy) = (
        median(parse_times),
        median(empty_times),
        median(full_times),
        median(copy_times),
    );
    println!("ingest of {LINES} lines ({DISTINCT} distinct proxies, {DUPLICATES} duplicates, {JUNK} junk), median of {RUNS}:");
    println!("  parse only                 {:>8.0} ms", ms(parse));
    println!(
        "  parse + upsert, empty table {:>7.0} ms  ({:.2}x the COPY baseline)",
        ms(empty),
        empty.as_secs_f64() / copy.as_secs_f64()
    );
    println!(
        "  parse + upsert, full table  {:>7.0} ms  ({:.2}x the COPY baseline)",
        ms(full),
        full.as_secs_f64() / copy.as_secs_f64()
    );
    println!(
        "  baseline: COPY into an unindexed table {:>6.0} ms",
        ms(copy)
    );
    println!("  peak RSS {:.0} MB", peak_rss_mb());
}
