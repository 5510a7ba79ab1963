//! What a farm is made of: the behaviours a simulated proxy can have, groups of
//! proxies sharing one, and the `FarmSpec` builder with the ready-made mixes
//! the tests and the benchmark use.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use proxy_pool::proxy::Protocol;

/// What a simulated proxy does with a connection. The wire protocol (http or
/// socks) comes from the group's [`Protocol`]; the behaviour decides what the
/// proxy does on top of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Behaviour {
    /// Forwards without adding headers; strips `Proxy-Connection` and
    /// `Proxy-Authorization`.
    Elite,
    /// Adds `Via: 1.1 farm-proxy`.
    Anonymous,
    /// Adds `X-Forwarded-For: <client ip>` and `Via`.
    Transparent,
    /// Adds `X-Forwarded-For: unknown`, as squid with `forwarded_for off`.
    /// (`Anonymous` is the Via-only proxy: squid's `forwarded_for delete`,
    /// tinyproxy's default.)
    XffUnknown,
    /// Reads its clients' TLS: accepts CONNECT to any port, then terminates
    /// the TLS itself with a certificate no root vouches for and answers as
    /// the judge. Plain http goes through like `Elite`.
    TlsIntercept,
    /// A working SOCKS4 proxy (the group's protocol is forced to socks4).
    Socks4,
    /// A working SOCKS5 proxy (the group's protocol is forced to socks5).
    Socks5,
    /// Nothing listens: the port is reserved but connections are refused.
    Dead,
    /// Accepts and never answers, holding the connection.
    BlackHole,
    /// Works like `Elite` (or its socks protocol) after this many
    /// milliseconds: for a socks proxy every reply of its handshake comes
    /// that late (a slow socks reply), for an http proxy that tunnels, its
    /// CONNECT answer too (a slow CONNECT).
    Slow(u64),
    /// Closes this fraction of connections (deterministically: with 0.5 every
    /// second one), works otherwise.
    Flaky(f64),
    /// Answers bytes that are not HTTP.
    Garbage,
    /// Answers 200 with someone else's HTML page.
    Hijack,
    /// An http proxy answering 407 unless given its credentials, then elite.
    AuthRequired,
    /// Answers a plausible response one byte a second.
    Trickle,
    /// Answers 200 with a body that never ends.
    EndlessBody,
    /// Answers a status line followed by headers that never end.
    EndlessHeaders,
    /// Answers a 200 with a 10 MB header line.
    HugeHeader,
    /// Answers a status line that does not parse.
    MalformedStatus,
    /// Answers a 200 whose body looks like the judge's JSON, with injected
    /// fields and a fake origin, without ever asking the judge.
    InjectedJudge,
}

impl Behaviour {
    /// A short stable name, used in the manifest.
    pub fn name(&self) -> &'static str {
        match self {
            Behaviour::Elite => "elite",
            Behaviour::Anonymous => "anonymous",
            Behaviour::Transparent => "transparent",
            Behaviour::XffUnknown => "xff_unknown",
            Behaviour::TlsIntercept => "tls_intercept",
            Behaviour::Socks4 => "socks4",
            Behaviour::Socks5 => "socks5",
            Behaviour::Dead => "dead",
            Behaviour::BlackHole => "black_hole",
            Behaviour::Slow(_) => "slow",
            Behaviour::Flaky(_) => "flaky",
            Behaviour::Garbage => "garbage",
            Behaviour::Hijack => "hijack",
            Behaviour::AuthRequired => "auth_required",
            Behaviour::Trickle => "trickle",
            Behaviour::EndlessBody => "endless_body",
            Behaviour::EndlessHeaders => "endless_headers",
            Behaviour::HugeHeader => "huge_header",
            Behaviour::MalformedStatus => "malformed_status",
            Behaviour::InjectedJudge => "injected_judge",
        }
    }

    /// The protocol a group with this behaviour gets unless told otherwise.
    pub fn default_protocol(&self) -> Protocol {
        match self {
            Behaviour::Socks4 => Protocol::Socks4,
            Behaviour::Socks5 => Protocol::Socks5,
            _ => Protocol::Http,
        }
    }
}

/// A username and password a proxy requires (socks4 uses only the username,
/// as its user id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    pub fn new(username: &str, password: &str) -> Credentials {
        Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        }
    }
}

/// How a proxy that requires credentials is listed. A proxy that requires
/// none is listed without any, whatever this says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Listing {
    /// With the credentials it requires.
    #[default]
    AsRequired,
    /// Without credentials: the proxy refuses every check.
    WithoutCredentials,
    /// With its username and another password (socks4, which has no
    /// password, with another user id): the proxy refuses every check.
    WithWrongCredentials,
}

/// `count` proxies with the same behaviour, protocol and credentials.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyGroup {
    pub behaviour: Behaviour,
    /// How the proxy is listed, and the wire protocol it speaks.
    pub protocol: Protocol,
    pub count: usize,
    /// Required by the proxy and listed with it. `AuthRequired` without
    /// credentials gets generated ones.
    pub credentials: Option<Credentials>,
    /// Whether an http proxy tunnels CONNECT (true by default for `https`).
    pub connect: bool,
    /// Whether its CONNECT reaches port 443 only (stock squid's
    /// `http_access deny CONNECT !SSL_ports`, tinyproxy's `ConnectPort 443`);
    /// any other port gets 403.
    pub connect_443_only: bool,
    /// How the credentials appear in the lists and the manifest.
    pub listing: Listing,
    /// Proxies per exit: every `exit_group` consecutive proxies of this
    /// group open their outgoing connections from one address, the first
    /// one's (one exit behind many entry points). 1: each its own exit.
    pub exit_group: usize,
}

impl ProxyGroup {
    pub fn new(behaviour: Behaviour, count: usize) -> ProxyGroup {
        ProxyGroup {
            behaviour,
            protocol: behaviour.default_protocol(),
            count,
            credentials: None,
            connect: behaviour == Behaviour::TlsIntercept,
            connect_443_only: false,
            listing: Listing::AsRequired,
            exit_group: 1,
        }
    }

    /// Tunnels CONNECT to port 443 only.
    pub fn connect_443_only(mut self) -> ProxyGroup {
        self.connect = true;
        self.connect_443_only = true;
        self
    }

    /// Sets the protocol; `https` also turns CONNECT support on.
    pub fn protocol(mut self, protocol: Protocol) -> ProxyGroup {
        self.protocol = protocol;
        if protocol == Protocol::Https {
            self.connect = true;
        }
        self
    }

    pub fn credentials(mut self, username: &str, password: &str) -> ProxyGroup {
        self.credentials = Some(Credentials::new(username, password));
        self
    }

    pub fn connect(mut self, connect: bool) -> ProxyGroup {
        self.connect = connect;
        self
    }

    pub fn listed(mut self, listing: Listing) -> ProxyGroup {
        self.listing = listing;
        self
    }

    /// Makes every `size` consecutive proxies of the group share one exit
    /// address (at least 1).
    pub fn exit_group(mut self, size: usize) -> ProxyGroup {
        self.exit_group = size.max(1);
        self
    }
}

/// The benchmark's population: fractions of alive (slow elite http proxies
/// with a latency drawn from `latency_ms`), dead and black-hole proxies.
#[derive(Clone, Debug, PartialEq)]
pub struct Mix {
    pub alive: f64,
    pub dead: f64,
    pub black_hole: f64,
    pub latency_ms: RangeInclusive<u64>,
}

impl Default for Mix {
    /// 50% alive with 50-500 ms latency, 30% dead, 20% black holes.
    fn default() -> Mix {
        Mix {
            alive: 0.5,
            dead: 0.3,
            black_hole: 0.2,
            latency_ms: 50..=500,
        }
    }
}

/// Everything a farm is started from. Build with [`FarmSpec::new`] and the
/// chained setters, or take a ready-made one.
#[derive(Clone, Debug, PartialEq)]
pub struct FarmSpec {
    pub groups: Vec<ProxyGroup>,
    /// The judge and list server (loopback only; port 0 picks a free one).
    pub listen: SocketAddr,
    /// The first proxy address; the next ones count up from it, skipping
    /// addresses ending in .0 and .255. Must be in 127.0.0.0/8 but not in
    /// 127.0.0.0/16.
    pub first_proxy_ip: Ipv4Addr,
    /// The port every proxy binds; 0 (the default) lets the kernel pick, so
    /// several farms can share addresses.
    pub proxy_port: u16,
    /// Lines in the `huge` list.
    pub huge_lines: usize,
    /// Chunks the `slow` list sends, and the pause between two of them.
    pub slow_chunks: usize,
    pub slow_chunk_delay: Duration,
    /// The longest any single connection is served before it is closed.
    pub connection_limit: Duration,
    /// Seeds the random choices (latencies, binary list bytes).
    pub seed: u64,
    /// The port of the https judge the validator under test tunnels to (its
    /// `https_target`), for the manifest: a proxy that tunnels to 443 only
    /// supports https exactly when it is 443.
    pub https_judge_port: u16,
}

impl Default for FarmSpec {
    fn default() -> FarmSpec {
        FarmSpec {
            groups: Vec::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            first_proxy_ip: Ipv4Addr::new(127, 1, 0, 1),
            proxy_port: 0,
            huge_lines: 100_000,
            slow_chunks: 5,
            slow_chunk_delay: Duration::from_secs(1),
            connection_limit: Duration::from_secs(60),
            seed: 42,
            https_judge_port: 443,
        }
    }
}

impl FarmSpec {
    /// An empty farm: a judge and list server, no proxies yet.
    pub fn new() -> FarmSpec {
        FarmSpec::default()
    }

    pub fn group(mut self, group: ProxyGroup) -> FarmSpec {
        self.groups.push(group);
        self
    }

    pub fn listen(mut self, listen: SocketAddr) -> FarmSpec {
        self.listen = listen;
        self
    }

    pub fn first_proxy_ip(mut self, ip: Ipv4Addr) -> FarmSpec {
        self.first_proxy_ip = ip;
        self
    }

    pub fn proxy_port(mut self, port: u16) -> FarmSpec {
        self.proxy_port = port;
        self
    }

    pub fn huge_lines(mut self, lines: usize) -> FarmSpec {
        self.huge_lines = lines;
        self
    }

    pub fn slow_list(mut self, chunks: usize, delay: Duration) -> FarmSpec {
        self.slow_chunks = chunks;
        self.slow_chunk_delay = delay;
        self
    }

    pub fn connection_limit(mut self, limit: Duration) -> FarmSpec {
        self.connection_limit = limit;
        self
    }

    pub fn seed(mut self, seed: u64) -> FarmSpec {
        self.seed = seed;
        self
    }

    pub fn https_judge_port(mut self, port: u16) -> FarmSpec {
        self.https_judge_port = port;
        self
    }

    /// The number of proxies the spec describes.
    pub fn total(&self) -> usize {
        self.groups.iter().map(|group| group.count).sum()
    }

    /// One proxy of every behaviour, over http, https (CONNECT), socks4 and
    /// socks5, with and without credentials, and http and socks5 proxies
    /// listed without the credentials they require or with wrong ones.
    /// `Slow` waits 200 ms, and 1.5 s (http, CONNECT) and 1.2 s (socks5)
    /// for a validator with a 3 s timeout and a 1 s connect timeout; `Flaky(0.5)`
    /// fails every second connection, starting with the second. A
    /// TLS-intercepting proxy, an XFF-`unknown` one and one tunnelling to
    /// 443 only show the tricks of real proxies.
    pub fn every_behaviour() -> FarmSpec {
        use Behaviour::*;
        use Listing::*;
        let one = |behaviour| ProxyGroup::new(behaviour, 1);
        FarmSpec::new()
            .group(one(Elite))
            .group(one(Elite).protocol(Protocol::Https))
            .group(one(Anonymous))
            .group(one(Anonymous).protocol(Protocol::Https))
            .group(one(Transparent))
            .group(one(Transparent).protocol(Protocol::Https))
            .group(one(XffUnknown))
            .group(one(TlsIntercept).protocol(Protocol::Https))
            .group(one(Elite).protocol(Protocol::Https).connect_443_only())
            .group(one(Slow(2000)).connect(true))
            .group(one(Slow(1200)).protocol(Protocol::Socks5))
            .group(one(Socks4))
            .group(one(Socks4).credentials("farmuser4", ""))
            .group(one(Socks5))
            .group(one(Socks5).credentials("farmuser5", "s3cret:pass"))
            .group(one(AuthRequired).credentials("farmuser", "farm pass"))
            .group(
                one(AuthRequired)
                    .protocol(Protocol::Https)
                    .credentials("farmuser", "p@ss"),
            )
            .group(
                one(AuthRequired)
                    .credentials("farmuser", "farm pass")
                    .listed(WithoutCredentials),
            )
            .group(
                one(AuthRequired)
                    .credentials("farmuser", "farm pass")
                    .listed(WithWrongCredentials),
            )
            .group(
                one(Socks5)
                    .credentials("farmuser5", "s3cret:pass")
                    .listed(WithoutCredentials),
            )
            .group(
                one(Socks5)
                    .credentials("farmuser5", "s3cret:pass")
                    .listed(WithWrongCredentials),
            )
            .group(one(Dead))
            .group(one(Dead).protocol(Protocol::Socks5))
            .group(one(BlackHole))
            .group(one(BlackHole).protocol(Protocol::Socks5))
            .group(one(Slow(200)))
            .group(one(Slow(200)).protocol(Protocol::Socks5))
            .group(one(Flaky(0.5)))
            .group(one(Garbage))
            .group(one(Hijack))
            .group(one(Trickle))
            .group(one(EndlessBody))
            .group(one(EndlessHeaders))
            .group(one(HugeHeader))
            .group(one(MalformedStatus))
            .group(one(InjectedJudge))
    }

    /// `total` proxies drawn as `mix` says (see [`Mix::default`] for the
    /// benchmark's). Alive ones are `Slow` elite http proxies that also
    /// tunnel CONNECT, each with its own latency.
    pub fn mix(total: usize, mix: &Mix) -> FarmSpec {
        let mut spec = FarmSpec::new();
        let share = |fraction: f64| ((total as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
        let dead = share(mix.dead).min(total);
        let black_hole = share(mix.black_hole).min(total - dead);
        let alive = total - dead - black_hole;
        let mut rng = fastrand::Rng::with_seed(spec.seed);
        for _ in 0..alive {
            let latency = rng.u64(mix.latency_ms.clone());
            spec = spec.group(ProxyGroup::new(Behaviour::Slow(latency), 1).connect(true));
        }
        spec.group(ProxyGroup::new(Behaviour::Dead, dead))
            .group(ProxyGroup::new(Behaviour::BlackHole, black_hole))
    }
}

impl FarmSpec {
    /// The offline demo's pool (`proxy-farm` without `--every-behaviour`):
    /// `mix`'s dead and black-hole shares, and its alive share spread the way
    /// a real pool looks: slow elite http proxies tunnelling CONNECT (some
    /// to 443 only), anonymous (Via-only), transparent, XFF-`unknown` and
    /// TLS-intercepting ones, socks4 and socks5, https-capable and not.
    pub fn demo(total: usize, mix: &Mix) -> FarmSpec {
        use Behaviour::*;
        let base = FarmSpec::mix(total, mix);
        let alive = base
            .groups
            .iter()
            .filter(|group| matches!(group.behaviour, Slow(_)))
            .count();
        // Shares of the alive proxies, in thousandths; the rest stay slow elite.
        let kinds: [(u32, ProxyGroup); 8] = [
            (150, ProxyGroup::new(Anonymous, 1)),
            (100, ProxyGroup::new(Transparent, 1).connect(true)),
            (50, ProxyGroup::new(XffUnknown, 1)),
            (120, ProxyGroup::new(Socks5, 1)),
            (80, ProxyGroup::new(Socks4, 1)),
            (
                60,
                ProxyGroup::new(Elite, 1)
                    .protocol(Protocol::Https)
                    .connect_443_only(),
            ),
            (
                40,
                ProxyGroup::new(TlsIntercept, 1).protocol(Protocol::Https),
            ),
            (50, ProxyGroup::new(Elite, 1).protocol(Protocol::Https)),
        ];
        let mut spec = FarmSpec {
            groups: Vec::new(),
            ..base.clone()
        };
        let mut slow = base
            .groups
            .iter()
            .filter(|g| matches!(g.behaviour, Slow(_)));
        for (thousandths, group) in kinds {
            let count = alive * thousandths as usize / 1000;
            // Each replaces one slow elite proxy, so the total stays.
            for _ in 0..count {
                slow.next();
            }
            spec = spec.group(ProxyGroup { count, ..group });
        }
        for group in slow {
            spec = spec.group(group.clone());
        }
        for group in base
            .groups
            .iter()
            .filter(|g| !matches!(g.behaviour, Slow(_)))
        {
            spec = spec.group(group.clone());
        }
        spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_pool_is_not_all_elite_http() {
        let spec = FarmSpec::demo(1000, &Mix::default());
        assert_eq!(spec.total(), 1000);
        let count = |name: &str| {
            spec.groups
                .iter()
                .filter(|g| g.behaviour.name() == name)
                .map(|g| g.count)
                .sum::<usize>()
        };
        assert_eq!(count("dead"), 300);
        assert_eq!(count("black_hole"), 200);
        assert_eq!(count("anonymous"), 75);
        assert_eq!(count("socks5"), 60);
        assert_eq!(count("tls_intercept"), 20);
        assert!(count("slow") > 100);
        assert!(spec.groups.iter().any(|g| g.connect_443_only));
    }

    #[test]
    fn mix_adds_up_to_total_in_the_default_shares() {
        let spec = FarmSpec::mix(1000, &Mix::default());
        assert_eq!(spec.total(), 1000);
        let count = |name: &str| {
            spec.groups
                .iter()
                .filter(|g| g.behaviour.name() == name)
                .map(|g| g.count)
                .sum::<usize>()
        };
        assert_eq!(count("slow"), 500);
        assert_eq!(count("dead"), 300);
        assert_eq!(count("black_hole"), 200);
        for group in &spec.groups {
            if let Behaviour::Slow(ms) = group.behaviour {
                assert!((50..=500).contains(&ms));
            }
        }
    }

    #[test]
    fn mix_never_exceeds_total_with_odd_fractions() {
        let mix = Mix {
            alive: 0.0,
            dead: 0.9,
            black_hole: 0.9,
            latency_ms: 1..=1,
        };
        assert_eq!(FarmSpec::mix(7, &mix).total(), 7);
    }

    #[test]
    fn https_groups_tunnel_connect() {
        let group = ProxyGroup::new(Behaviour::Elite, 1).protocol(Protocol::Https);
        assert!(group.connect);
        assert!(!ProxyGroup::new(Behaviour::Elite, 1).connect);
        assert_eq!(
            ProxyGroup::new(Behaviour::Socks4, 1).protocol,
            Protocol::Socks4
        );
    }
}
