//! How well the choice learns, in a simulated world on loopback (issue 15):
//! 240 farm proxies behind 120 exits (80 alone, 40 groups of 4), and three
//! target sites that judge each request's TCP peer:
//! - A refuses a hidden 60% of the exits;
//! - B refuses a different 60% and is flaky (success 0.6) on a quarter of
//!   the rest;
//! - C answers 429 when an exit made more than 4 of its last 100 requests.
//!
//! One source per site, 4 client threads each: get-proxy, a real request
//! through the proxy to the site, feedback with success = 200. At A's
//! request 2,000, A switches to refusing a different 60%, including the
//! exits A and B had come to favour. The same world is driven by the
//! service's choice (in process, through `State`), by a uniformly random
//! choice, and by an oracle that knows the sites' rules, in the same run.
//! Three runs; the table shows medians.
//!
//! `cargo bench --bench learning` (or `scripts/bench.sh learning`).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use chrono::Utc;
use parking_lot::Mutex;

use proxy_farm::targets::{RateLimit, SiteRules, TargetSite};
use proxy_farm::{Behaviour, Farm, FarmSpec, ProxyGroup};
use proxy_pool::config::ScoringConfig;
use proxy_pool::proxy::{ActiveProxy, Anonymity, Protocol, ProxyKey};
use proxy_pool::state::{PickQuery, State};

const ALONE: usize = 80;
const GROUPS: usize = 40;
const GROUP_SIZE: usize = 4;
const THREADS: usize = 4;
/// Requests per source; A switches at `SWITCH`.
const REQUESTS: usize = 3500;
const SWITCH: usize = 2000;
/// "After warm-up": requests 1,001 to 2,000 of each source.
const MEASURED: std::ops::Range<usize> = 1000..2000;
/// Success "back at 90%" is measured over this many consecutive requests.
const WINDOW: usize = 50;
const RUNS: usize = 3;
/// Favourites of A and B (by successes over their last 1,000 requests)
/// that A refuses after the switch.
const FAVOURITES: usize = 20;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chooser {
    Service,
    Random,
    Oracle,
}

impl Chooser {
    fn name(self) -> &'static str {
        match self {
            Chooser::Service => "service",
            Chooser::Random => "random",
            Chooser::Oracle => "oracle",
        }
    }
}

#[derive(Clone, Debug)]
struct FarmProxy {
    url: String,
    addr: SocketAddr,
    exit: IpAddr,
}

/// The hidden facts of one run's world.
#[derive(Clone, Debug)]
struct World {
    proxies: Vec<FarmProxy>,
    exits: Vec<IpAddr>,
    /// Proxy indexes by exit.
    by_exit: HashMap<IpAddr, Vec<usize>>,
    a_refused: HashSet<IpAddr>,
    b_refused: HashSet<IpAddr>,
    b_flaky: HashSet<IpAddr>,
    seed: u64,
}

impl World {
    fn new(farm: &Farm, seed: u64) -> World {
        let proxies: Vec<FarmProxy> = farm
            .manifest()
            .iter()
            .map(|entry| FarmProxy {
                url: format!("http://{}:{}", entry.ip, entry.port),
                addr: SocketAddr::new(entry.ip, entry.port),
                exit: entry
                    .exit_ip
                    .expect("every farm proxy of the world is alive"),
            })
            .collect();
        let mut by_exit: HashMap<IpAddr, Vec<usize>> = HashMap::new();
        let mut exits = Vec::new();
        for (index, proxy) in proxies.iter().enumerate() {
            let slot = by_exit.entry(proxy.exit).or_default();
            if slot.is_empty() {
                exits.push(proxy.exit);
            }
            slot.push(index);
        }
        let mut rng = fastrand::Rng::with_seed(seed);
        let refused = exits.len() * 6 / 10;
        let mut shuffled = exits.clone();
        rng.shuffle(&mut shuffled);
        let a_refused: HashSet<IpAddr> = shuffled[..refused].iter().copied().collect();
        rng.shuffle(&mut shuffled);
        let b_refused: HashSet<IpAddr> = shuffled[..refused].iter().copied().collect();
        let b_flaky: HashSet<IpAddr> = shuffled[refused..]
            .iter()
            .copied()
            .take((exits.len() - refused) / 4)
            .collect();
        World {
            proxies,
            exits,
            by_exit,
            a_refused,
            b_refused,
            b_flaky,
            seed,
        }
    }

    fn active(&self) -> Vec<ActiveProxy> {
        self.proxies
            .iter()
            .enumerate()
            .map(|(index, proxy)| ActiveProxy {
                id: index as i64,
                key: ProxyKey::new(Protocol::Http, proxy.addr.ip(), proxy.addr.port()),
                latency_ms: Some(10),
                anonymity: Some(Anonymity::Elite),
                country: None,
                supports_https: Some(false),
                last_validated_at: Some(Utc::now()),
                anonymity_evidence: None,
                exit_ip: Some(proxy.exit),
            })
            .collect()
    }
}

/// One source's run: the outcome of each request by its index.
struct SourceRun {
    outcomes: Vec<Option<bool>>,
}

#[derive(Default, Clone, Debug)]
struct Figures {
    success: [f64; 3],
    b_after_switch: f64,
    switch_waste: usize,
    switch_recovered: bool,
    warmup_waste: usize,
    warmup_recovered: bool,
    sibling_picks: usize,
    exit_bans: usize,
    distinct_min: usize,
    distinct_mean: f64,
}

fn main() {
    let _ = env_logger::builder().is_test(true).try_init();
    let farm = Farm::start(
        FarmSpec::new()
            .first_proxy_ip(Ipv4Addr::new(127, 40, 0, 1))
            .group(ProxyGroup::new(Behaviour::Elite, ALONE))
            .group(ProxyGroup::new(Behaviour::Elite, GROUPS * GROUP_SIZE).exit_group(GROUP_SIZE)),
    )
    .expect("the farm starts");
    let started = Instant::now();
    let mut all: HashMap<&'static str, Vec<Figures>> = HashMap::new();
    for run in 0..RUNS {
        let world = World::new(&farm, 1000 + run as u64);
        for chooser in [Chooser::Service, Chooser::Random, Chooser::Oracle] {
            let t = Instant::now();
            let figures = run_world(&world, chooser);
            eprintln!(
                "run {} {:<7} {:.1}s: {:?}",
                run + 1,
                chooser.name(),
                t.elapsed().as_secs_f64(),
                figures
            );
            all.entry(chooser.name()).or_default().push(figures);
        }
    }
    print_table(&all);
    eprintln!("total {:.0}s", started.elapsed().as_secs_f64());
}

/// `[scoring]` as the defaults set it.
fn scoring() -> ScoringConfig {
    ScoringConfig::defaults()
}

fn run_world(world: &World, chooser: Chooser) -> Figures {
    let sites = [
        TargetSite::start(
            SiteRules {
                refused: world.a_refused.clone(),
                ..SiteRules::default()
            },
            world.seed,
        ),
        TargetSite::start(
            SiteRules {
                refused: world.b_refused.clone(),
                flaky: world.b_flaky.clone(),
                flaky_success: 0.6,
                ..SiteRules::default()
            },
            world.seed + 1,
        ),
        TargetSite::start(
            SiteRules {
                rate_limit: Some(RateLimit {
                    max: 4,
                    window: 100,
                }),
                ..SiteRules::default()
            },
            world.seed + 2,
        ),
    ]
    .map(|site| Arc::new(site.expect("a target site starts")));
    let state = Arc::new(State::new(&scoring()));
    state.replace_active(world.active());
    let url_index: Arc<HashMap<String, usize>> = Arc::new(
        world
            .proxies
            .iter()
            .enumerate()
            .map(|(index, proxy)| (proxy.url.clone(), index))
            .collect(),
    );
    let world = Arc::new(world.clone());
    let sibling_picks = Arc::new(AtomicUsize::new(0));
    let exit_bans = Arc::new(AtomicUsize::new(0));
    let oracle_next = Arc::new(AtomicUsize::new(0));

    let runs: Vec<Arc<Mutex<SourceRun>>> = (0..3)
        .map(|_| {
            Arc::new(Mutex::new(SourceRun {
                outcomes: vec![None; REQUESTS],
            }))
        })
        .collect();
    let counters: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let a_refused_now = Arc::new(Mutex::new(world.a_refused.clone()));
    let mut handles = Vec::new();
    for site_index in 0..3 {
        // Per source: the exits banned for it (by which proxy, until when).
        let bans: Arc<Mutex<HashMap<IpAddr, (usize, i64)>>> = Arc::default();
        for thread_index in 0..THREADS {
            let (state, sites, world, url_index, runs, counters, a_refused_now) = (
                Arc::clone(&state),
                sites.clone(),
                Arc::clone(&world),
                Arc::clone(&url_index),
                runs.clone(),
                counters.clone(),
                Arc::clone(&a_refused_now),
            );
            let (bans, sibling_picks, exit_bans, oracle_next) = (
                Arc::clone(&bans),
                Arc::clone(&sibling_picks),
                Arc::clone(&exit_bans),
                Arc::clone(&oracle_next),
            );
            handles.push(thread::spawn(move || {
                let source = ["site_a", "site_b", "site_c"][site_index];
                let mut rng = fastrand::Rng::with_seed(
                    world.seed * 100 + (site_index * 10 + thread_index) as u64,
                );
                loop {
                    let index = counters[site_index].fetch_add(1, Ordering::Relaxed);
                    if index >= REQUESTS {
                        return;
                    }
                    if site_index == 0 && index == SWITCH {
                        let refused = switched_refused(&world, &sites, &mut rng);
                        *a_refused_now.lock() = refused.clone();
                        sites[0].set_refused(refused);
                    }
                    let proxy_index = match chooser {
                        Chooser::Random => rng.usize(..world.proxies.len()),
                        Chooser::Oracle => oracle_pick(
                            &world,
                            site_index,
                            &a_refused_now.lock(),
                            &oracle_next,
                            &mut rng,
                        ),
                        Chooser::Service => {
                            let picks = state
                                .get_proxy(source, &PickQuery::default(), Utc::now())
                                .expect("a proxy is available");
                            url_index[&picks[0].url]
                        }
                    };
                    let exit = world.proxies[proxy_index].exit;
                    if chooser == Chooser::Service {
                        let now_ms = Utc::now().timestamp_millis();
                        if let Some(&(banned, until)) = bans.lock().get(&exit) {
                            if banned != proxy_index && until > now_ms {
                                sibling_picks.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    let status = request(&world.proxies[proxy_index], &sites[site_index]);
                    let success = status == 200;
                    runs[site_index].lock().outcomes[index] = Some(success);
                    if chooser == Chooser::Service {
                        let outcome = state
                            .feedback(source, &world.proxies[proxy_index].url, success, Utc::now())
                            .expect("feedback is accepted");
                        if let Some(until) = outcome.banned_until.filter(|_| outcome.is_banned) {
                            let mut bans = bans.lock();
                            let until = until.timestamp_millis();
                            let fresh = bans.get(&exit).is_none_or(|&(_, old)| old < until);
                            if fresh && world.by_exit[&exit].len() > 1 {
                                if bans.get(&exit).is_none_or(|&(_, old)| old <= now_ms()) {
                                    exit_bans.fetch_add(1, Ordering::Relaxed);
                                }
                                bans.insert(exit, (proxy_index, until));
                            }
                        }
                    }
                }
            }));
        }
    }
    for handle in handles {
        handle.join().expect("a client thread");
    }
    let outcomes: Vec<Vec<bool>> = runs
        .iter()
        .map(|run| {
            run.lock()
                .outcomes
                .iter()
                .map(|outcome| outcome.unwrap_or(false))
                .collect()
        })
        .collect();
    let success = |site: usize, range: std::ops::Range<usize>| {
        let slice = &outcomes[site][range];
        slice.iter().filter(|&&ok| ok).count() as f64 / slice.len() as f64
    };
    let (warmup_waste, warmup_recovered) = waste_until_recovered(&outcomes[0][..SWITCH]);
    let (switch_waste, switch_recovered) = waste_until_recovered(&outcomes[0][SWITCH..]);
    let mut figures = Figures {
        success: [0, 1, 2].map(|site| success(site, MEASURED)),
        b_after_switch: success(1, SWITCH..REQUESTS),
        switch_waste,
        switch_recovered,
        warmup_waste,
        warmup_recovered,
        sibling_picks: sibling_picks.load(Ordering::Relaxed),
        exit_bans: exit_bans.load(Ordering::Relaxed),
        distinct_min: 5,
        distinct_mean: 5.0,
    };
    if chooser == Chooser::Service {
        let query = PickQuery {
            count: 5,
            ..PickQuery::default()
        };
        let mut distinct = Vec::new();
        for source in ["site_a", "site_b", "site_c"] {
            for _ in 0..20 {
                let picks = state
                    .get_proxy(source, &query, Utc::now())
                    .expect("proxies");
                let exits: HashSet<IpAddr> = picks
                    .iter()
                    .map(|pick| world.proxies[url_index[&pick.url]].exit)
                    .collect();
                distinct.push(exits.len());
            }
        }
        figures.distinct_min = distinct.iter().copied().min().unwrap_or(0);
        figures.distinct_mean = distinct.iter().sum::<usize>() as f64 / distinct.len() as f64;
    }
    figures
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// A's new refused set: the exits A and B succeeded with most over their
/// last 1,000 requests, then random others up to 60% of the exits.
fn switched_refused(
    world: &World,
    sites: &[Arc<TargetSite>; 3],
    rng: &mut fastrand::Rng,
) -> HashSet<IpAddr> {
    let target = world.exits.len() * 6 / 10;
    let mut refused: HashSet<IpAddr> = HashSet::new();
    for site in &sites[..2] {
        let log = site.requests();
        let recent = &log[log.len().saturating_sub(1000)..];
        let mut successes: HashMap<IpAddr, usize> = HashMap::new();
        for request in recent.iter().filter(|request| request.status == 200) {
            *successes.entry(request.peer).or_default() += 1;
        }
        let mut ranked: Vec<(usize, IpAddr)> =
            successes.into_iter().map(|(ip, n)| (n, ip)).collect();
        ranked.sort_by(|a, b| b.cmp(a));
        refused.extend(ranked.into_iter().take(FAVOURITES).map(|(_, ip)| ip));
    }
    let mut others: Vec<IpAddr> = world
        .exits
        .iter()
        .copied()
        .filter(|exit| !refused.contains(exit))
        .collect();
    rng.shuffle(&mut others);
    for exit in others {
        if refused.len() >= target {
            break;
        }
        refused.insert(exit);
    }
    refused
}

/// The oracle knows each site's rules: A and B get a random proxy of an exit
/// that works for them; C goes round the exits, so that no exit comes near
/// the rate limit.
fn oracle_pick(
    world: &World,
    site_index: usize,
    a_refused: &HashSet<IpAddr>,
    next: &AtomicUsize,
    rng: &mut fastrand::Rng,
) -> usize {
    let exit = match site_index {
        2 => world.exits[next.fetch_add(1, Ordering::Relaxed) % world.exits.len()],
        _ => {
            let good: Vec<IpAddr> = world
                .exits
                .iter()
                .copied()
                .filter(|exit| match site_index {
                    0 => !a_refused.contains(exit),
                    _ => !world.b_refused.contains(exit) && !world.b_flaky.contains(exit),
                })
                .collect();
            good[rng.usize(..good.len())]
        }
    };
    let siblings = &world.by_exit[&exit];
    siblings[rng.usize(..siblings.len())]
}

/// One request through `proxy` to `site`: its status, 0 when it failed.
fn request(proxy: &FarmProxy, site: &TargetSite) -> u16 {
    let attempt = || -> std::io::Result<u16> {
        let mut stream = TcpStream::connect_timeout(&proxy.addr, REQUEST_TIMEOUT)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let head = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            site.url(),
            site.addr()
        );
        stream.write_all(head.as_bytes())?;
        let mut answer = Vec::with_capacity(256);
        stream.read_to_end(&mut answer)?;
        let status = answer
            .get(9..12)
            .and_then(|code| std::str::from_utf8(code).ok())
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        Ok(status)
    };
    attempt().unwrap_or(0)
}

/// Failures before the success over `WINDOW` consecutive requests first
/// reaches 90%, and whether it did.
fn waste_until_recovered(outcomes: &[bool]) -> (usize, bool) {
    let mut failures = 0;
    for end in 0..outcomes.len() {
        if !outcomes[end] {
            failures += 1;
        }
        if end + 1 >= WINDOW {
            let window = &outcomes[end + 1 - WINDOW..=end];
            if window.iter().filter(|&&ok| ok).count() * 10 >= WINDOW * 9 {
                return (failures, true);
            }
        }
    }
    (failures, false)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn print_table(all: &HashMap<&'static str, Vec<Figures>>) {
    let column =
        |name: &str, value: &dyn Fn(&Figures) -> f64| median(all[name].iter().map(value).collect());
    let percent =
        |name: &str, site: usize| format!("{:.1}%", 100.0 * column(name, &|f| f.success[site]));
    println!();
    println!(
        "learning: {} proxies behind {} exits, {THREADS} threads per source, {REQUESTS} requests per source, switch at A's {SWITCH}; median of {RUNS} runs",
        ALONE + GROUPS * GROUP_SIZE,
        ALONE + GROUPS
    );
    println!("| figure | service | random | oracle |");
    println!("|---|---|---|---|");
    for (label, site) in [
        ("A, success after warm-up (requests 1,001-2,000)", 0),
        ("B, same", 1),
        ("C (rate limits), same", 2),
    ] {
        println!(
            "| {label} | {} | {} | {} |",
            percent("service", site),
            percent("random", site),
            percent("oracle", site)
        );
    }
    let waste = |name: &str, pick: &dyn Fn(&Figures) -> (usize, bool)| {
        let value = column(name, &|f| pick(f).0 as f64);
        let recovered = all[name].iter().filter(|f| pick(f).1).count();
        if recovered == RUNS {
            format!("{value:.0}")
        } else {
            format!(
                "{value:.0} ({} of {RUNS} runs never back at 90%)",
                RUNS - recovered
            )
        }
    };
    let switch = |f: &Figures| (f.switch_waste, f.switch_recovered);
    let warmup = |f: &Figures| (f.warmup_waste, f.warmup_recovered);
    println!(
        "| A, failures wasted after the switch before its success is back at 90% | {} | {} | {} |",
        waste("service", &switch),
        waste("random", &switch),
        waste("oracle", &switch)
    );
    println!(
        "| A, failures wasted in its initial warm-up | {} | {} | {} |",
        waste("service", &warmup),
        waste("random", &warmup),
        waste("oracle", &warmup)
    );
    println!(
        "| B, success after the switch (requests 2,001-{REQUESTS}) | {:.1}% | {:.1}% | {:.1}% |",
        100.0 * column("service", &|f| f.b_after_switch),
        100.0 * column("random", &|f| f.b_after_switch),
        100.0 * column("oracle", &|f| f.b_after_switch)
    );
    println!(
        "| picks of a banned proxy's exit siblings for the same source | {:.0} (over {:.0} bans of a shared exit) | - | 0 |",
        column("service", &|f| f.sibling_picks as f64),
        column("service", &|f| f.exit_bans as f64)
    );
    println!(
        "| count=5, distinct exits in the answer (min, mean) | {:.0}, {:.2} | - | 5 |",
        column("service", &|f| f.distinct_min as f64),
        column("service", &|f| f.distinct_mean)
    );
}
