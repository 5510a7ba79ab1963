//! Test tooling: a proxy farm in one process, on loopback only. It runs a judge
//! (an httpbin-compatible `/get` echo), a server of proxy lists, and any number
//! of simulated proxies, each on its own 127.x.y.z address and each behaving as
//! told (elite, anonymous, transparent, socks, dead, black hole, slow, hostile,
//! ...), plus a manifest of what a correct validator must find. Every test and
//! benchmark of the service runs against it, and the `proxy-farm` binary runs
//! it standalone for an offline demo.
//!
//! Threads: one per listener and one per connection, with small stacks. Every
//! connection ends when its client leaves, after `connection_limit`, or
//! within a fraction of a second of the farm being dropped.
//!
//! Hit counters: a proxy counts the TCP connections it accepted (a refused
//! connection to a `Dead` proxy counts nothing), the judge counts the requests
//! it answered (not those refused in outage mode), a list counts the requests
//! for its name (known or not).

mod lists;
mod manifest;
mod proxies;
mod server;
mod spec;
pub mod targets;
pub mod tls;
mod wire;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use chrono::Utc;
use parking_lot::Mutex;
use socket2::{Domain, Socket, Type};

pub use lists::BUILT_IN as BUILT_IN_LISTS;
pub use manifest::ManifestEntry;
pub use proxies::{start_tls_judge, tls_judge_ca_file, INJECTED_ORIGIN, VIA};
pub use spec::{Behaviour, Credentials, FarmSpec, Listing, Mix, ProxyGroup};
pub use tls::{ServerCert, TestCa, TlsJudge};

use proxies::ProxyConfig;

/// The `proxy-farm` binary of the same build as the running test or
/// benchmark: cargo puts a package's binaries beside the `deps` folder that
/// holds the test executables of every package of the workspace. It panics
/// with what to run when the binary was not built (`cargo build -p
/// proxy-farm`; `scripts/test.sh` and `scripts/bench.sh` build it).
pub fn binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the path of the running executable");
    let mut dir = exe
        .parent()
        .expect("an executable has a folder")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("proxy-farm{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p proxy-farm` (add --release for benchmarks)",
        path.display()
    );
    path
}

use server::StaticList;

/// The judge's accept queue. Every check through a farm proxy ends in a
/// connection to the judge, so a validator with hundreds of workers sends
/// bursts of them; with std's 128 a busy machine overflows the queue, the
/// kernel drops SYNs, and the 1 s retransmission makes live proxies time out.
const SERVER_BACKLOG: i32 = 4096;

/// State shared by the farm handle and its threads.
pub(crate) struct Shared {
    pub stop: AtomicBool,
    pub judge_down: AtomicBool,
    pub judge_hits: AtomicU64,
    pub proxy_hits: Vec<AtomicU64>,
    pub lists: Mutex<HashMap<String, StaticList>>,
    pub list_hits: Mutex<HashMap<String, u64>>,
    pub server_addr: SocketAddr,
    pub spec: FarmSpec,
}

/// A running farm. Dropping it stops everything: listeners close, and
/// connection threads notice within a fraction of a second.
pub struct Farm {
    shared: Arc<Shared>,
    manifest: Vec<ManifestEntry>,
    /// Listening addresses to poke awake on drop.
    listening: Vec<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
    /// The sockets that keep `Dead` proxies' ports reserved, not listening.
    _reserved: Vec<Socket>,
}

impl Farm {
    /// Binds every socket, then starts every thread. Fails if an address is
    /// outside what the farm may use or a socket cannot be bound.
    pub fn start(spec: FarmSpec) -> io::Result<Farm> {
        if !wire::is_loopback(spec.listen.ip()) {
            return Err(invalid_input(format!(
                "the farm listens on loopback only, not {}",
                spec.listen
            )));
        }
        let addresses = proxy_addresses(spec.first_proxy_ip, spec.total())?;
        raise_open_file_limit(spec.total());

        let server = listen(spec.listen, SERVER_BACKLOG)?;
        let server_addr = server.local_addr()?;

        let mut manifest = Vec::with_capacity(addresses.len());
        let mut configs = Vec::with_capacity(addresses.len());
        let mut listeners = Vec::with_capacity(addresses.len());
        let mut reserved = Vec::new();
        let mut groups = spec
            .groups
            .iter()
            .flat_map(|g| (0..g.count).map(move |position| (g, position)));
        let mut exit_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for (index, ip) in addresses.into_iter().enumerate() {
            let Some((group, position)) = groups.next() else {
                break;
            };
            let ip = IpAddr::V4(ip);
            if position % group.exit_group.max(1) == 0 {
                exit_ip = ip;
            }
            let mut credentials = group.credentials.clone();
            if group.behaviour == Behaviour::AuthRequired && credentials.is_none() {
                credentials = Some(Credentials::new(
                    &format!("user{index}"),
                    &format!("pass{index}"),
                ));
            }
            let protocol = match group.behaviour {
                Behaviour::Socks4 | Behaviour::Socks5 => group.behaviour.default_protocol(),
                _ => group.protocol,
            };
            let connect = protocol.is_http() && group.connect;
            let address = SocketAddr::new(ip, spec.proxy_port);
            let port = if group.behaviour == Behaviour::Dead {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                socket.bind(&address.into())?;
                let port = socket.local_addr()?.as_socket().map_or(0, |a| a.port());
                reserved.push(socket);
                port
            } else {
                let listener = TcpListener::bind(address)?;
                let port = listener.local_addr()?.port();
                listeners.push((index, listener));
                port
            };
            let mut entry = ManifestEntry::new(
                index,
                protocol,
                ip,
                port,
                group.behaviour,
                connect,
                credentials.as_ref(),
            )
            .connect_443_only(group.connect_443_only, spec.https_judge_port)
            .listed(group.listing);
            if entry.exit_ip.is_some() {
                entry.exit_ip = Some(exit_ip);
            }
            manifest.push(entry);
            configs.push(Arc::new(ProxyConfig {
                index,
                exit_ip,
                behaviour: group.behaviour,
                protocol,
                connect,
                connect_443_only: group.connect_443_only,
                credentials,
            }));
        }

        let now = Utc::now();
        let mut static_lists = HashMap::new();
        for (name, body) in [
            ("plain", lists::plain(&manifest)),
            ("schemes", lists::schemes(&manifest)),
            ("junk", lists::junk(&manifest)),
        ] {
            static_lists.insert(
                name.to_owned(),
                StaticList::new(body.into_bytes(), None, now),
            );
        }
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            judge_down: AtomicBool::new(false),
            judge_hits: AtomicU64::new(0),
            proxy_hits: (0..manifest.len()).map(|_| AtomicU64::new(0)).collect(),
            lists: Mutex::new(static_lists),
            list_hits: Mutex::new(HashMap::new()),
            server_addr,
            spec,
        });
        let mut farm = Farm {
            shared: Arc::clone(&shared),
            manifest,
            listening: Vec::with_capacity(listeners.len() + 1),
            threads: Vec::with_capacity(listeners.len() + 1),
            _reserved: reserved,
        };

        farm.listening.push(server_addr);
        let server_shared = Arc::clone(&shared);
        farm.threads.push(spawn_listener(
            "farm-server".to_owned(),
            server,
            server_shared,
            |stream, peer, shared| {
                spawn_connection(move || server::serve_connection(stream, peer, shared));
            },
        )?);
        for (index, listener) in listeners {
            farm.listening.push(listener.local_addr()?);
            let config = Arc::clone(&configs[index]);
            let handle = spawn_listener(
                format!("farm-proxy-{index}"),
                listener,
                Arc::clone(&shared),
                move |stream, peer, shared| {
                    let nth = shared.proxy_hits[index].fetch_add(1, Ordering::Relaxed);
                    let config = Arc::clone(&config);
                    spawn_connection(move || {
                        proxies::serve_connection(stream, peer, nth, config, shared)
                    });
                },
            )?;
            farm.threads.push(handle);
        }
        log::info!(
            "proxy farm started: judge {}, {} proxies",
            farm.judge_url(),
            farm.manifest.len()
        );
        Ok(farm)
    }

    /// The judge's URL, ending in `/get`.
    pub fn judge_url(&self) -> String {
        format!("http://{}/get", self.shared.server_addr)
    }

    /// The URL of a list, built-in or set with [`Farm::set_list`].
    pub fn list_url(&self, name: &str) -> String {
        format!("http://{}/lists/{name}", self.shared.server_addr)
    }

    /// The judge and list server's address.
    pub fn server_addr(&self) -> SocketAddr {
        self.shared.server_addr
    }

    /// Serves `body` under `/lists/NAME` (replacing a built-in of that name),
    /// with a fresh ETag and Last-Modified when the body changed.
    pub fn set_list(&self, name: &str, body: String) {
        let mut lists = self.shared.lists.lock();
        let list = StaticList::new(body.into_bytes(), lists.get(name), Utc::now());
        lists.insert(name.to_owned(), list);
    }

    /// Outage mode: while down, the judge answers 503 to everything.
    pub fn set_judge_down(&self, down: bool) {
        self.shared.judge_down.store(down, Ordering::Relaxed);
    }

    /// Every proxy, in farm order, with what a validator must find.
    pub fn manifest(&self) -> &[ManifestEntry] {
        &self.manifest
    }

    /// The manifest as a JSON array.
    pub fn manifest_json(&self) -> serde_json::Value {
        serde_json::Value::Array(self.manifest.iter().map(ManifestEntry::to_json).collect())
    }

    /// Writes [`Farm::manifest_json`] to `path`, pretty-printed.
    pub fn write_manifest(&self, path: &Path) -> io::Result<()> {
        let text = serde_json::to_string_pretty(&self.manifest_json()).map_err(io::Error::other)?;
        std::fs::write(path, text + "\n")
    }

    /// Connections proxy `index` accepted (0 for an unknown index).
    pub fn hits(&self, index: usize) -> u64 {
        self.shared
            .proxy_hits
            .get(index)
            .map_or(0, |hits| hits.load(Ordering::Relaxed))
    }

    /// Connections accepted by all proxies together.
    pub fn total_proxy_hits(&self) -> u64 {
        self.shared
            .proxy_hits
            .iter()
            .map(|hits| hits.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests the judge answered (outage-mode refusals excluded).
    pub fn judge_hits(&self) -> u64 {
        self.shared.judge_hits.load(Ordering::Relaxed)
    }

    /// Requests for `/lists/NAME`.
    pub fn list_hits(&self, name: &str) -> u64 {
        self.shared.list_hits.lock().get(name).copied().unwrap_or(0)
    }

    /// Sets every counter back to zero. `Flaky` proxies start their pattern
    /// over.
    pub fn reset_hits(&self) {
        for hits in &self.shared.proxy_hits {
            hits.store(0, Ordering::Relaxed);
        }
        self.shared.judge_hits.store(0, Ordering::Relaxed);
        self.shared.list_hits.lock().clear();
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // A listener thread blocks in accept; a connection wakes it to see
        // the stop flag.
        for address in &self.listening {
            let _ = TcpStream::connect_timeout(address, Duration::from_millis(200));
        }
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Accepts until the farm stops, handing each connection to `on_accept`.
fn spawn_listener<F>(
    name: String,
    listener: TcpListener,
    shared: Arc<Shared>,
    on_accept: F,
) -> io::Result<JoinHandle<()>>
where
    F: Fn(TcpStream, SocketAddr, Arc<Shared>) + Send + 'static,
{
    thread::Builder::new()
        .name(name)
        .stack_size(wire::LISTENER_STACK)
        .spawn(move || loop {
            let accepted = listener.accept();
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            match accepted {
                Ok((stream, peer)) => on_accept(stream, peer, Arc::clone(&shared)),
                Err(error) => {
                    // Out of descriptors or similar: wait instead of spinning.
                    log::warn!("proxy farm: accept failed: {error}");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        })
}

fn spawn_connection<F>(serve: F)
where
    F: FnOnce() + Send + 'static,
{
    let spawned = thread::Builder::new()
        .name("farm-conn".to_owned())
        .stack_size(wire::CONNECTION_STACK)
        .spawn(serve);
    if let Err(error) = spawned {
        log::warn!("proxy farm: cannot start a connection thread: {error}");
    }
}

/// `count` consecutive addresses from `first`, skipping .0 and .255, all in
/// 127.0.0.0/8 and none in 127.0.0.0/16 (kept for the tests' own use).
pub(crate) fn proxy_addresses(first: Ipv4Addr, count: usize) -> io::Result<Vec<Ipv4Addr>> {
    let octets = first.octets();
    if octets[0] != 127 || octets[1] == 0 {
        return Err(invalid_input(format!(
            "proxy addresses must be in 127.0.0.0/8 outside 127.0.0.0/16, not {first}"
        )));
    }
    let mut addresses = Vec::with_capacity(count);
    let mut next = u32::from(first);
    while addresses.len() < count {
        let ip = Ipv4Addr::from(next);
        if ip.octets()[0] != 127 {
            return Err(invalid_input(format!(
                "{count} proxies from {first} run past 127.255.255.254"
            )));
        }
        if !matches!(ip.octets()[3], 0 | 255) {
            addresses.push(ip);
        }
        next += 1;
    }
    Ok(addresses)
}

fn raise_open_file_limit(proxies: usize) {
    // Each proxy holds a listener, and each open connection through it three
    // descriptors; the soft limit is often 1024.
    let wanted = (proxies as u64).saturating_mul(4).saturating_add(4096);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => {
            log::warn!("proxy farm: open file limit is {limit}, wanted {wanted}")
        }
        Ok(_) => {}
        Err(error) => log::warn!("proxy farm: cannot raise the open file limit: {error}"),
    }
}

/// A listener with an explicit accept queue (the kernel caps it at
/// `net.core.somaxconn`).
fn listen(address: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    // As std does: a restarted farm can bind its port again at once.
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_skip_network_and_broadcast_endings() {
        let addresses = proxy_addresses(Ipv4Addr::new(127, 1, 0, 253), 4).unwrap();
        let expected: Vec<Ipv4Addr> = ["127.1.0.253", "127.1.0.254", "127.1.1.1", "127.1.1.2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(addresses, expected);
    }

    #[test]
    fn addresses_stay_out_of_127_0_and_inside_127() {
        assert!(proxy_addresses(Ipv4Addr::new(127, 0, 0, 5), 1).is_err());
        assert!(proxy_addresses(Ipv4Addr::new(10, 1, 0, 1), 1).is_err());
        assert!(proxy_addresses(Ipv4Addr::new(127, 255, 255, 253), 3).is_err());
        assert!(proxy_addresses(Ipv4Addr::new(127, 9, 0, 1), 0)
            .unwrap()
            .is_empty());
    }
}
