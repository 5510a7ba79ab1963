//! Target sites on loopback that judge the TCP peer of each request, as real
//! sites judge the exit address of a proxy: a site may refuse a set of exits
//! (403), be flaky on another set (503 with some probability), and rate-limit
//! an exit that made too many of its recent requests (429). Each request's
//! peer and answer are recorded, so a test or benchmark can see which exit a
//! request left from and what the site made of it. The refused set can be
//! switched at runtime: a site that changes its mind.
//!
//! One small thread per connection, one request per connection (every
//! answer says `Connection: close`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::wire::{self, Bound};

/// How long one connection to a site may take.
const CONNECTION_LIMIT: Duration = Duration::from_secs(10);

/// 429 for an exit that made more than `max` of the site's last `window`
/// requests (the request being judged included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub max: usize,
    pub window: usize,
}

/// How a site judges each request's TCP peer. The first rule that applies
/// decides: refused (403), then rate-limited (429), then flaky (503 with
/// probability `1 - flaky_success`); any other request gets 200.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SiteRules {
    pub refused: HashSet<IpAddr>,
    pub flaky: HashSet<IpAddr>,
    /// Probability that a flaky exit's request succeeds.
    pub flaky_success: f64,
    pub rate_limit: Option<RateLimit>,
}

impl SiteRules {
    /// The status the site answers `peer` with, given the exits of its
    /// recent requests (this one already in `recent`'s counts).
    fn judge(&self, peer: IpAddr, recent_from_peer: usize, rng: &mut fastrand::Rng) -> u16 {
        if self.refused.contains(&peer) {
            return 403;
        }
        if self
            .rate_limit
            .is_some_and(|limit| recent_from_peer > limit.max)
        {
            return 429;
        }
        if self.flaky.contains(&peer) && rng.f64() >= self.flaky_success {
            return 503;
        }
        200
    }
}

/// One request as the site saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteRequest {
    /// The TCP peer: the exit the request left from.
    pub peer: IpAddr,
    pub status: u16,
}

struct SiteState {
    rules: SiteRules,
    rng: fastrand::Rng,
    /// The peers of the last `rate_limit.window` requests, oldest first,
    /// and how often each appears there.
    window: VecDeque<IpAddr>,
    in_window: HashMap<IpAddr, usize>,
    log: Vec<SiteRequest>,
}

impl SiteState {
    fn answer(&mut self, peer: IpAddr) -> u16 {
        let mut recent = 0;
        if let Some(limit) = self.rules.rate_limit {
            self.window.push_back(peer);
            *self.in_window.entry(peer).or_default() += 1;
            while self.window.len() > limit.window.max(1) {
                if let Some(old) = self.window.pop_front() {
                    if let Some(count) = self.in_window.get_mut(&old) {
                        *count -= 1;
                        if *count == 0 {
                            self.in_window.remove(&old);
                        }
                    }
                }
            }
            recent = self.in_window.get(&peer).copied().unwrap_or(0);
        }
        let status = self.rules.judge(peer, recent, &mut self.rng);
        self.log.push(SiteRequest { peer, status });
        status
    }
}

struct SiteShared {
    stop: AtomicBool,
    state: Mutex<SiteState>,
}

/// A running target site. Dropping it stops it.
pub struct TargetSite {
    shared: Arc<SiteShared>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl TargetSite {
    /// Starts a site on a free port of 127.0.0.1 with `rules`; `seed` makes
    /// its flaky answers repeatable.
    pub fn start(rules: SiteRules, seed: u64) -> io::Result<TargetSite> {
        TargetSite::start_on(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            rules,
            seed,
        )
    }

    /// Starts a site on `listen` (loopback only).
    pub fn start_on(listen: SocketAddr, rules: SiteRules, seed: u64) -> io::Result<TargetSite> {
        if !wire::is_loopback(listen.ip()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a target site listens on loopback only, not {listen}"),
            ));
        }
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(SiteShared {
            stop: AtomicBool::new(false),
            state: Mutex::new(SiteState {
                rules,
                rng: fastrand::Rng::with_seed(seed),
                window: VecDeque::new(),
                in_window: HashMap::new(),
                log: Vec::new(),
            }),
        });
        let accept_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(format!("farm-site-{}", addr.port()))
            .stack_size(wire::LISTENER_STACK)
            .spawn(move || accept_loop(listener, accept_shared))?;
        Ok(TargetSite {
            shared,
            addr,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The site's URL, `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The switch: from now on the site refuses `refused` instead.
    pub fn set_refused(&self, refused: HashSet<IpAddr>) {
        self.shared.state.lock().rules.refused = refused;
    }

    /// The rules the site judges by now.
    pub fn rules(&self) -> SiteRules {
        self.shared.state.lock().rules.clone()
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<SiteRequest> {
        self.shared.state.lock().log.clone()
    }

    /// How many requests were answered so far.
    pub fn request_count(&self) -> usize {
        self.shared.state.lock().log.len()
    }
}

impl Drop for TargetSite {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<SiteShared>) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        match accepted {
            Ok((stream, peer)) => {
                let shared = Arc::clone(&shared);
                let spawned = thread::Builder::new()
                    .name("farm-site-conn".to_owned())
                    .stack_size(wire::CONNECTION_STACK)
                    .spawn(move || serve(stream, peer, &shared));
                if let Err(error) = spawned {
                    log::warn!("target site: cannot start a connection thread: {error}");
                }
            }
            Err(error) => {
                log::warn!("target site: accept failed: {error}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve(mut stream: TcpStream, peer: SocketAddr, shared: &SiteShared) {
    let bound = Bound {
        deadline: Instant::now() + CONNECTION_LIMIT,
        stop: &shared.stop,
    };
    match wire::read_head(&mut stream, bound) {
        Ok(Some(_)) => {}
        _ => return,
    }
    let status = shared.state.lock().answer(peer.ip());
    let body: &[u8] = match status {
        200 => b"ok\n",
        403 => b"your address is refused\n",
        429 => b"slow down\n",
        _ => b"try again\n",
    };
    if let Err(error) = wire::write_response(&mut stream, status, &[], body, bound) {
        log::debug!("target site: answer to {peer} cut short: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn get_from(source: IpAddr, site: &TargetSite) -> u16 {
        let mut stream =
            wire::connect_from(source, site.addr(), Duration::from_secs(2)).expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: site\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer[9..12].parse().unwrap()
    }

    #[test]
    fn rules_judge_refused_then_rate_then_flaky() {
        let rules = SiteRules {
            refused: [ip("127.3.0.1")].into(),
            flaky: [ip("127.3.0.2")].into(),
            flaky_success: 0.0,
            rate_limit: Some(RateLimit { max: 2, window: 4 }),
        };
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(rules.judge(ip("127.3.0.1"), 0, &mut rng), 403);
        assert_eq!(rules.judge(ip("127.3.0.3"), 3, &mut rng), 429);
        assert_eq!(rules.judge(ip("127.3.0.2"), 1, &mut rng), 503);
        assert_eq!(rules.judge(ip("127.3.0.3"), 2, &mut rng), 200);
    }

    #[test]
    fn rate_limit_counts_the_last_window_requests() {
        let mut state = SiteState {
            rules: SiteRules {
                rate_limit: Some(RateLimit { max: 2, window: 4 }),
                ..SiteRules::default()
            },
            rng: fastrand::Rng::with_seed(1),
            window: VecDeque::new(),
            in_window: HashMap::new(),
            log: Vec::new(),
        };
        let (a, b) = (ip("127.3.0.1"), ip("127.3.0.2"));
        let statuses: Vec<u16> = [a, a, a, b, b, b, a]
            .into_iter()
            .map(|peer| state.answer(peer))
            .collect();
        // The third `a` is its third of the last 4; the last `a` has only
        // one other `a` among the 3 before it.
        assert_eq!(statuses, [200, 200, 429, 200, 200, 429, 200]);
    }

    #[test]
    fn a_site_sees_the_peer_and_switches_its_refused_set() {
        let site = TargetSite::start(
            SiteRules {
                refused: [ip("127.3.1.1")].into(),
                ..SiteRules::default()
            },
            7,
        )
        .unwrap();
        assert_eq!(get_from(ip("127.3.1.1"), &site), 403);
        assert_eq!(get_from(ip("127.3.1.2"), &site), 200);
        site.set_refused([ip("127.3.1.2")].into());
        assert_eq!(get_from(ip("127.3.1.1"), &site), 200);
        assert_eq!(get_from(ip("127.3.1.2"), &site), 403);
        let seen: Vec<(IpAddr, u16)> = site
            .requests()
            .iter()
            .map(|request| (request.peer, request.status))
            .collect();
        assert_eq!(
            seen,
            [
                (ip("127.3.1.1"), 403),
                (ip("127.3.1.2"), 200),
                (ip("127.3.1.1"), 200),
                (ip("127.3.1.2"), 403),
            ]
        );
    }

    #[test]
    fn an_exit_group_leaves_from_its_first_proxys_address() {
        use crate::{Behaviour, Farm, FarmSpec, ProxyGroup};
        let farm = Farm::start(
            FarmSpec::new()
                .first_proxy_ip(Ipv4Addr::new(127, 3, 2, 1))
                .group(ProxyGroup::new(Behaviour::Elite, 4).exit_group(2))
                .group(ProxyGroup::new(Behaviour::Elite, 1)),
        )
        .unwrap();
        let site = TargetSite::start(SiteRules::default(), 1).unwrap();
        let exits: Vec<Option<IpAddr>> = farm.manifest().iter().map(|e| e.exit_ip).collect();
        let expected: Vec<Option<IpAddr>> = [
            "127.3.2.1",
            "127.3.2.1",
            "127.3.2.3",
            "127.3.2.3",
            "127.3.2.5",
        ]
        .iter()
        .map(|text| Some(ip(text)))
        .collect();
        assert_eq!(exits, expected);
        for entry in farm.manifest() {
            let mut stream = TcpStream::connect((entry.ip, entry.port)).unwrap();
            let request = format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                site.url(),
                site.addr()
            );
            stream.write_all(request.as_bytes()).unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        let peers: Vec<Option<IpAddr>> = site.requests().iter().map(|r| Some(r.peer)).collect();
        assert_eq!(peers, expected);
    }
}
