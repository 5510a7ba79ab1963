//! The rotating gateway's figures, as ratios measured in one run: one
//! tunnel's throughput through gateway + farm proxy against the farm proxy
//! alone; small plain-http requests at c=64 through the gateway beside squid
//! as a rotating parent gateway over the same 20 farm proxies; 2,000 tunnels
//! open at once; and the latency the gateway adds to a request.
//!
//! The gateway runs in this process on a state filled with the farm's
//! proxies (no database is involved in a gateway request). Targets are small
//! servers of this benchmark on loopback.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use chrono::Utc;
use proxy_farm::{Behaviour, Farm, FarmSpec, ProxyGroup};
use proxy_pool::config::{GatewayConfig, ScoringConfig};
use proxy_pool::gateway::Gateway;
use proxy_pool::metrics::Metrics;
use proxy_pool::proxy::{ActiveProxy, Anonymity, ProxyKey};
use proxy_pool::state::State;

const FARM_PROXIES: usize = 20;
const TUNNEL_BYTES: u64 = 256 << 20;
const CONCURRENCY: usize = 64;
const LOAD_TIME: Duration = Duration::from_secs(8);
const TUNNELS_AT_ONCE: usize = 2000;
const LATENCY_SAMPLES: usize = 300;

fn scoring() -> ScoringConfig {
    ScoringConfig::defaults()
}

/// Answers every request on a kept-alive connection with a 2-byte body.
fn small_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut stream = stream;
                let _ = stream.set_nodelay(true);
                let mut pending = Vec::new();
                let mut buffer = [0u8; 8192];
                loop {
                    while let Some(end) = find(&pending, b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if stream.write_all(answer).is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buffer[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// Sends `TUNNEL_BYTES` to every connection, then closes it.
fn bulk_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut stream = stream;
                let chunk = vec![b'x'; 64 * 1024];
                let mut left = TUNNEL_BYTES;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if stream.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    addr
}

/// Echoes every byte, holding the connection until the peer closes.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = thread::Builder::new().stack_size(64 * 1024).spawn(move || {
                let mut stream = stream;
                let mut buffer = [0u8; 256];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one answer head and its Content-Length body.
fn read_answer(stream: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<u16> {
    let mut buffer = [0u8; 8192];
    loop {
        if let Some(end) = find(pending, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while pending.len() < end + 4 + length {
                let n = stream.read(&mut buffer)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                pending.extend_from_slice(&buffer[..n]);
            }
            pending.drain(..end + 4 + length);
            return Ok(status);
        }
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        pending.extend_from_slice(&buffer[..n]);
    }
}

/// Opens a CONNECT tunnel to `target` through the http proxy at `proxy`.
fn connect_through(proxy: SocketAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(proxy)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        return Err(io::Error::other(
            String::from_utf8_lossy(&head).into_owned(),
        ));
    }
    Ok(stream)
}

/// MB/s of one tunnel carrying `TUNNEL_BYTES` from the bulk server.
fn tunnel_throughput(proxy: SocketAddr, target: SocketAddr) -> f64 {
    let mut stream = connect_through(proxy, target).expect("a tunnel");
    let started = Instant::now();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(err) => panic!("tunnel read: {err}"),
        }
    }
    assert_eq!(total, TUNNEL_BYTES, "the whole transfer");
    total as f64 / started.elapsed().as_secs_f64() / 1e6
}

struct Load {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

/// `CONCURRENCY` clients, each on a kept-alive connection to `proxy`,
/// sending absolute-URI GETs to `target` for `LOAD_TIME`.
fn load(proxy: SocketAddr, target: SocketAddr, credentials: Option<&str>) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let auth = credentials
        .map(|c| {
            use base64::Engine;
            format!(
                "Proxy-Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        })
        .unwrap_or_default();
    let request = format!("GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (stop, request) = (stop.clone(), request.clone());
            thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut connection: Option<(TcpStream, Vec<u8>)> = None;
                while !stop.load(Ordering::Relaxed) {
                    if connection.is_none() {
                        match TcpStream::connect(proxy) {
                            Ok(stream) => {
                                let _ = stream.set_nodelay(true);
                                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                                connection = Some((stream, Vec::new()));
                            }
                            Err(_) => {
                                errors += 1;
                                continue;
                            }
                        }
                    }
                    let (stream, pending) = connection.as_mut().unwrap();
                    let started = Instant::now();
                    let answer = stream
                        .write_all(request.as_bytes())
                        .and_then(|()| read_answer(stream, pending));
                    match answer {
                        Ok(200) => latencies.push(started.elapsed()),
                        _ => {
                            errors += 1;
                            connection = None;
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    thread::sleep(LOAD_TIME);
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (l, e) = worker.join().unwrap();
        latencies.extend(l);
        errors += e;
    }
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    Load {
        requests_per_second: latencies.len() as f64 / LOAD_TIME.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        errors,
    }
}

/// Median latency of one request on a fresh connection to `proxy`.
fn latency_p50(proxy: SocketAddr, target: SocketAddr) -> f64 {
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    let request = format!("GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n");
    for _ in 0..LATENCY_SAMPLES {
        let started = Instant::now();
        let mut stream = TcpStream::connect(proxy).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut pending = Vec::new();
        assert_eq!(read_answer(&mut stream, &mut pending).unwrap(), 200);
        samples.push(started.elapsed());
    }
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

/// squid 5 as a rotating parent gateway over the farm proxies, or why not.
struct Squid {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_squid(parents: &[SocketAddr]) -> Result<Squid, String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
        .map_err(|e| e.to_string())?;
    let d = dir.path().display();
    let mut conf = format!(
        "http_port 127.0.0.1:{port}\npid_filename {d}/squid.pid\ncache_log {d}/cache.log\n\
         access_log none\ncache deny all\ncache_mem 8 MB\ncoredump_dir {d}\n\
         http_access allow all\nnever_direct allow all\nshutdown_lifetime 1 seconds\n\
         workers 1\nvia off\nforwarded_for delete\n"
    );
    for (i, parent) in parents.iter().enumerate() {
        conf.push_str(&format!(
            "cache_peer {} parent {} 0 no-query no-digest round-robin name=p{i}\n",
            parent.ip(),
            parent.port()
        ));
    }
    let path = dir.path().join("squid.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let child = Command::new("squid")
        .args(["-N", "-f"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run squid: {e}"))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut squid = Squid {
        child,
        addr,
        _dir: dir,
    };
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline || squid.child.try_wait().ok().flatten().is_some() {
            let log =
                std::fs::read_to_string(squid._dir.path().join("cache.log")).unwrap_or_default();
            return Err(format!(
                "squid did not start: {}",
                log.lines().last().unwrap_or("")
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(squid)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn main() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let farm = Farm::start(
        FarmSpec::new().group(ProxyGroup::new(Behaviour::Elite, FARM_PROXIES).connect(true)),
    )
    .expect("start the farm");
    let parents: Vec<SocketAddr> = farm
        .manifest()
        .iter()
        .map(|e| SocketAddr::new(e.ip, e.port))
        .collect();
    let state = Arc::new(State::new(&scoring()));
    let active: Vec<ActiveProxy> = farm
        .manifest()
        .iter()
        .enumerate()
        .map(|(i, e)| ActiveProxy {
            id: i as i64 + 1,
            key: ProxyKey::new(e.protocol, e.ip, e.port),
            latency_ms: Some(10),
            anonymity: Some(Anonymity::Elite),
            country: Some("US".into()),
            supports_https: Some(true),
            last_validated_at: Some(Utc::now()),
            anonymity_evidence: None,
            exit_ip: Some(e.ip),
        })
        .collect();
    state.replace_active(active);
    let metrics = Metrics::new();
    let config = GatewayConfig {
        bind: Some(([127, 0, 0, 1], 0).into()),
        max_connections: 8192,
        attempts: 3,
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(120),
        session_ttl: Duration::from_secs(600),
        allow_private_targets: true,
    };
    let gateway = Gateway::start(&config, None, state, metrics.gateway.clone()).expect("gateway");
    let gw = gateway.local_addr;
    let (small, bulk, echo) = (small_server(), bulk_server(), echo_server());

    println!("gateway benchmark: {FARM_PROXIES} farm proxies (elite, no added latency), targets on loopback");

    // 1. One tunnel's throughput.
    let mut direct = Vec::new();
    let mut through = Vec::new();
    for _ in 0..3 {
        direct.push(tunnel_throughput(parents[0], bulk));
        through.push(tunnel_throughput(gw, bulk));
    }
    direct.sort_by(f64::total_cmp);
    through.sort_by(f64::total_cmp);
    let (direct, through) = (direct[1], through[1]);
    println!(
        "tunnel throughput ({} MiB, median of 3): farm proxy alone {direct:.0} MB/s, gateway + farm proxy {through:.0} MB/s, ratio {:.2} (target >= 0.8)",
        TUNNEL_BYTES >> 20,
        through / direct
    );

    // 2. Small plain-http requests at c=64, beside squid.
    let ours = load(gw, small, Some("bench:x"));
    println!(
        "plain http c={CONCURRENCY}, {}s: gateway {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
        LOAD_TIME.as_secs(),
        ours.requests_per_second,
        ours.p50_ms,
        ours.p99_ms,
        ours.errors
    );
    let one_proxy = load(parents[0], small, None);
    println!(
        "plain http c={CONCURRENCY}: one farm proxy used directly {:.0} req/s, p99 {:.2} ms",
        one_proxy.requests_per_second, one_proxy.p99_ms
    );
    match start_squid(&parents) {
        Ok(squid) => {
            let theirs = load(squid.addr, small, None);
            println!(
                "plain http c={CONCURRENCY}: squid (1 worker, round-robin parents) {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                theirs.requests_per_second, theirs.p50_ms, theirs.p99_ms, theirs.errors
            );
            println!(
                "gateway / squid: {:.2}x requests/s (target >= 2), p99 {:.2} vs {:.2} ms (target: no higher)",
                ours.requests_per_second / theirs.requests_per_second,
                ours.p99_ms,
                theirs.p99_ms
            );
        }
        Err(why) => println!("squid: skipped ({why})"),
    }

    // 3. Added latency, one request per fresh connection.
    let direct_p50 = latency_p50(parents[0], small);
    let gateway_p50 = latency_p50(gw, small);
    println!(
        "latency p50 ({LATENCY_SAMPLES} requests, fresh connections): direct through a farm proxy {direct_p50:.3} ms, through the gateway {gateway_p50:.3} ms, added {:.3} ms",
        gateway_p50 - direct_p50
    );

    // 4. 2,000 tunnels open at once.
    let (rss_before, threads_before) = (rss_kib(), threads());
    let started = Instant::now();
    let mut open = Vec::with_capacity(TUNNELS_AT_ONCE);
    let mut refused = 0;
    for _ in 0..TUNNELS_AT_ONCE {
        match connect_through(gw, echo).and_then(|mut s| {
            s.write_all(b"p")?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte)?;
            Ok(s)
        }) {
            Ok(stream) => open.push(stream),
            Err(_) => refused += 1,
        }
    }
    let opened_in = started.elapsed();
    let (rss_after, threads_after) = (rss_kib(), threads());
    println!(
        "{TUNNELS_AT_ONCE} tunnels at once: {} open, {refused} refused, opened in {:.1} s; process RSS {} -> {} MiB (+{} KiB per tunnel, farm and targets included), threads {threads_before} -> {threads_after}",
        open.len(),
        opened_in.as_secs_f64(),
        rss_before / 1024,
        rss_after / 1024,
        (rss_after.saturating_sub(rss_before)) / TUNNELS_AT_ONCE as u64,
    );
    drop(open);
    drop(gateway);
}
