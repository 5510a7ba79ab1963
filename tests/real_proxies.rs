//! The validator against real proxy software and a real judge: Debian's
//! squid, tinyproxy, dante and microsocks, each run as a process of its own
//! with a config written here (its own loopback address, outgoing
//! connections from that address, its own pid and log files), a small
//! TLS-intercepting proxy, and httpbin itself under gunicorn. The judges are
//! the product's judge echo on plain http (the farm's `/get`) and over https
//! on port 443 with a throwaway CA (`https_ca_file`): stock squid and
//! tinyproxy tunnel CONNECT to 443 only.
//!
//! Each test lists its proxies, runs `proxy-pool import` and `proxy-pool
//! validate` as a user would, and checks every row as CONTRACT.md's
//! "Validation semantics" grade it: is_active, anonymity, supports_https,
//! https_failure and exit_ip (the judge's TCP peer: the proxy's own
//! address). Every test prints its table of expected and found values.
//!
//! Needs root (port 443; squid and danted drop privileges from root). The
//! packages are installed by scripts/install-test-deps.sh (test.sh runs it;
//! a test run as root on Debian runs it itself when a binary is missing);
//! where one cannot be installed the tests that need it print why and skip,
//! except under `CI`, where they fail.
//!
//! Addresses: test NET uses 127.77.NET.0/24: .1 the https judge, .3 the
//! plain judge, .2 and up the proxies. The validator connects from
//! 127.0.0.1, which is therefore "our own address".

mod support;

use std::net::IpAddr;
use std::path::PathBuf;

use support::real::{self, address, Graded, Judges, Process};
use support::TestDb;

/// The paths of the tools, or print why they are missing and return.
macro_rules! require_or_skip {
    ($test:literal $(, $tool:expr)*) => {
        match real::require(&[$(&$tool),*]) {
            Ok(paths) => paths,
            Err(why) => {
                eprintln!(concat!("SKIPPED ", $test, ": {}"), why);
                return;
            }
        }
    };
}

/// What the contract says a proxy's row must hold after one cycle. For an
/// inactive proxy supports_https and https_failure are not looked at (the
/// contract leaves open whether a dead proxy gets an https check).
struct Expect {
    variant: &'static str,
    line: String,
    is_active: bool,
    anonymity: Option<&'static str>,
    supports_https: Option<bool>,
    /// Compared as a prefix (`connect_refused` may carry the status).
    https_failure: Option<&'static str>,
    exit_ip: Option<IpAddr>,
}

impl Expect {
    /// An alive proxy, its exit address `exit`, tunnelling to the https judge.
    fn alive(variant: &'static str, line: String, anonymity: &'static str, exit: IpAddr) -> Self {
        Expect {
            variant,
            line,
            is_active: true,
            anonymity: Some(anonymity),
            supports_https: Some(true),
            https_failure: None,
            exit_ip: Some(exit),
        }
    }

    /// A proxy that fails every check.
    fn dead(variant: &'static str, line: String) -> Self {
        Expect {
            variant,
            line,
            is_active: false,
            anonymity: None,
            supports_https: None,
            https_failure: None,
            exit_ip: None,
        }
    }

    fn https_fails(mut self, reason: &'static str) -> Self {
        self.supports_https = Some(false);
        self.https_failure = Some(reason);
        self
    }

    fn exit(mut self, exit: Option<IpAddr>) -> Self {
        self.exit_ip = exit;
        self
    }

    fn matches(&self, got: &Graded) -> bool {
        let https = !self.is_active
            || (got.supports_https == self.supports_https
                && match (self.https_failure, &got.https_failure) {
                    (None, None) => true,
                    (Some(want), Some(got)) => got.starts_with(want),
                    _ => false,
                });
        got.is_active == self.is_active
            && got.anonymity.as_deref() == self.anonymity
            && got.exit_ip == self.exit_ip
            && https
    }

    fn row(&self) -> String {
        let https = if self.is_active {
            format!(
                "{} {}",
                show(&self.supports_https),
                self.https_failure.unwrap_or("-")
            )
        } else {
            "(any)".to_owned()
        };
        format!(
            "active={} anonymity={} https={} exit={}",
            self.is_active,
            self.anonymity.unwrap_or("NULL"),
            https,
            show(&self.exit_ip)
        )
    }
}

fn show<T: ToString>(value: &Option<T>) -> String {
    value.as_ref().map_or("NULL".to_owned(), T::to_string)
}

fn found(got: &Graded) -> String {
    format!(
        "active={} anonymity={} https={} {} exit={} dead_reason={}",
        got.is_active,
        got.anonymity.as_deref().unwrap_or("NULL"),
        show(&got.supports_https),
        got.https_failure.as_deref().unwrap_or("-"),
        show(&got.exit_ip),
        got.last_dead_reason.as_deref().unwrap_or("-")
    )
}

/// Validates every proxy of `expected` once (`validation_target` as the
/// judge) and checks each row; prints the table either way, and on a
/// mismatch fails with it and the proxies' logs.
fn grade_with(
    judges: &Judges,
    validation_target: &str,
    expected: &[Expect],
    processes: &[&Process],
) {
    let db = TestDb::new();
    let list: Vec<String> = expected.iter().map(|e| e.line.clone()).collect();
    let rows = real::validate(
        &db,
        validation_target,
        &judges.https_target(),
        &judges.ca_file,
        &list,
    );
    let mut table = String::new();
    let mut wrong = 0;
    for (want, (_, got)) in expected.iter().zip(&rows) {
        let ok = want.matches(got);
        wrong += usize::from(!ok);
        table.push_str(&format!(
            "{} {}  {}\n    expected {}\n    found    {}\n",
            if ok { "PASS" } else { "FAIL" },
            want.variant,
            want.line,
            want.row(),
            found(got)
        ));
    }
    eprintln!("real proxies, judge {validation_target}:\n{table}");
    if wrong > 0 {
        let logs: Vec<String> = processes.iter().map(|p| p.logs()).collect();
        panic!(
            "{wrong} of {} proxies graded against the contract:\n{table}\n{}",
            expected.len(),
            logs.join("\n")
        );
    }
}

fn grade(judges: &Judges, expected: &[Expect], processes: &[&Process]) {
    grade_with(judges, &judges.validation_target(), expected, processes);
}

fn http(ip: IpAddr, port: u16) -> String {
    format!("http://{ip}:{port}")
}

fn first(paths: Vec<PathBuf>) -> PathBuf {
    paths.into_iter().next().expect("one tool")
}

/// Stock squid: `forwarded_for on` sends our address in X-Forwarded-For
/// (transparent), and it tunnels CONNECT to 443 only, where the https judge
/// is (supports_https, which a CONNECT to the plain judge's port would deny).
#[test]
fn stock_squid_is_transparent_and_tunnels_to_443() {
    let squid = first(require_or_skip!("stock_squid", real::SQUID));
    let judges = Judges::start(1);
    let ip = address(1, 2);
    let proxy = real::squid(&squid, ip, "forwarded_for on\nvia on");
    let line = http(ip, real::SQUID_PORT);
    grade(
        &judges,
        &[Expect::alive(
            "transparent (squid stock, 443-only)",
            line,
            "transparent",
            ip,
        )],
        &[&proxy],
    );
}

/// squid `forwarded_for off` sends `X-Forwarded-For: unknown`: a proxy
/// header without our address (anonymous), never "not the judge".
#[test]
fn squid_forwarded_for_off_is_anonymous() {
    let squid = first(require_or_skip!("squid_forwarded_for_off", real::SQUID));
    let judges = Judges::start(2);
    let ip = address(2, 2);
    let proxy = real::squid(&squid, ip, "forwarded_for off\nvia off");
    let line = http(ip, real::SQUID_PORT);
    grade(
        &judges,
        &[Expect::alive(
            "XFF-unknown (squid forwarded_for off)",
            line,
            "anonymous",
            ip,
        )],
        &[&proxy],
    );
}

/// squid `forwarded_for delete` with Via on: only Via reveals the proxy.
#[test]
fn squid_via_only_is_anonymous() {
    let squid = first(require_or_skip!("squid_via_only", real::SQUID));
    let judges = Judges::start(3);
    let ip = address(3, 2);
    let proxy = real::squid(&squid, ip, "forwarded_for delete\nvia on");
    let line = http(ip, real::SQUID_PORT);
    grade(
        &judges,
        &[Expect::alive(
            "Via-only (squid forwarded_for delete)",
            line,
            "anonymous",
            ip,
        )],
        &[&proxy],
    );
}

/// squid `forwarded_for delete` and `via off`: nothing reveals it.
#[test]
fn squid_without_proxy_headers_is_elite() {
    let squid = first(require_or_skip!("squid_elite", real::SQUID));
    let judges = Judges::start(4);
    let ip = address(4, 2);
    let proxy = real::squid(&squid, ip, "forwarded_for delete\nvia off");
    let line = http(ip, real::SQUID_PORT);
    grade(
        &judges,
        &[Expect::alive(
            "elite (squid delete, via off)",
            line,
            "elite",
            ip,
        )],
        &[&proxy],
    );
}

/// squid `http_access deny CONNECT`: alive for plain http, no https, and
/// the reason is the refused CONNECT.
#[test]
fn squid_denying_connect_is_alive_without_https() {
    let squid = first(require_or_skip!("squid_connect_denied", real::SQUID));
    let judges = Judges::start(5);
    let ip = address(5, 2);
    let proxy = real::squid(
        &squid,
        ip,
        "forwarded_for delete\nvia off\nhttp_access deny CONNECT",
    );
    let line = http(ip, real::SQUID_PORT);
    grade(
        &judges,
        &[
            Expect::alive("CONNECT-denied (squid deny CONNECT)", line, "elite", ip)
                .https_fails("connect_refused"),
        ],
        &[&proxy],
    );
}

/// tinyproxy as Debian ships it: Via only (anonymous), CONNECT to 443 only.
#[test]
fn stock_tinyproxy_is_anonymous_and_tunnels_to_443() {
    let tinyproxy = first(require_or_skip!("stock_tinyproxy", real::TINYPROXY));
    let judges = Judges::start(6);
    let ip = address(6, 2);
    let proxy = real::tinyproxy(&tinyproxy, ip, "ConnectPort 443\nConnectPort 563");
    let line = http(ip, real::TINYPROXY_PORT);
    grade(
        &judges,
        &[Expect::alive(
            "Via-only, 443-only (tinyproxy stock)",
            line,
            "anonymous",
            ip,
        )],
        &[&proxy],
    );
}

/// tinyproxy with `DisableViaHeader`: elite.
#[test]
fn tinyproxy_without_via_is_elite() {
    let tinyproxy = first(require_or_skip!("tinyproxy_elite", real::TINYPROXY));
    let judges = Judges::start(7);
    let ip = address(7, 2);
    let proxy = real::tinyproxy(&tinyproxy, ip, "ConnectPort 443\nDisableViaHeader Yes");
    let line = http(ip, real::TINYPROXY_PORT);
    grade(
        &judges,
        &[Expect::alive(
            "elite (tinyproxy DisableViaHeader)",
            line,
            "elite",
            ip,
        )],
        &[&proxy],
    );
}

/// tinyproxy with `BasicAuth`: the list's right credentials work for plain
/// http and CONNECT; wrong ones, and none, are dead.
#[test]
fn tinyproxy_basic_auth_right_works_and_wrong_is_dead() {
    let tinyproxy = first(require_or_skip!("tinyproxy_basic_auth", real::TINYPROXY));
    let judges = Judges::start(8);
    let ip = address(8, 2);
    let proxy = real::tinyproxy(
        &tinyproxy,
        ip,
        "ConnectPort 443\nDisableViaHeader Yes\nBasicAuth tester secret",
    );
    let port = real::TINYPROXY_PORT;
    grade(
        &judges,
        &[
            Expect::alive(
                "basic auth right (tinyproxy BasicAuth)",
                format!("http://tester:secret@{ip}:{port}"),
                "elite",
                ip,
            ),
            Expect::dead(
                "basic auth wrong (tinyproxy BasicAuth)",
                format!("http://intruder:guess@{ip}:{port}"),
            ),
            Expect::dead("basic auth missing (tinyproxy BasicAuth)", http(ip, port)),
        ],
        &[&proxy],
    );
}

/// squid with `basic_ncsa_auth` and an htpasswd file (tester's password
/// `secret`, an APR1 hash as `htpasswd -m` writes): the right credentials
/// work for plain http and CONNECT; wrong ones, and none, are dead.
#[test]
fn squid_basic_auth_right_works_and_wrong_is_dead() {
    let squid = first(require_or_skip!("squid_basic_auth", real::SQUID));
    let helper = "/usr/lib/squid/basic_ncsa_auth";
    if !std::path::Path::new(helper).is_file() {
        let why = format!("{helper} is missing (Debian's squid package has it)");
        if support::under_ci() {
            panic!("{why} (CI is set: no skipping)");
        }
        eprintln!("SKIPPED squid_basic_auth: {why}");
        return;
    }
    let judges = Judges::start(13);
    let ip = address(13, 2);
    let proxy = real::squid_with_files(
        &squid,
        ip,
        &format!(
            "auth_param basic program {helper} {{dir}}/htpasswd\n\
             auth_param basic realm proxy-pool test\n\
             acl authenticated proxy_auth REQUIRED\n\
             http_access deny !authenticated\n\
             forwarded_for delete\nvia off"
        ),
        &[("htpasswd", "tester:$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/\n")],
    );
    let port = real::SQUID_PORT;
    grade(
        &judges,
        &[
            Expect::alive(
                "basic auth right (squid basic_ncsa_auth)",
                format!("http://tester:secret@{ip}:{port}"),
                "elite",
                ip,
            ),
            Expect::dead(
                "basic auth wrong (squid basic_ncsa_auth)",
                format!("http://intruder:guess@{ip}:{port}"),
            ),
            Expect::dead("basic auth missing (squid basic_ncsa_auth)", http(ip, port)),
        ],
        &[&proxy],
    );
}

/// dante without authentication, as socks5 and socks4: elite, tunnelling to
/// the https judge through the socks handshake.
#[test]
fn dante_socks5_and_socks4_without_auth_are_elite_with_https() {
    let danted = first(require_or_skip!("dante_socks", real::DANTED));
    let judges = Judges::start(9);
    let ip = address(9, 2);
    let proxy = real::danted(&danted, ip);
    let port = real::SOCKS_PORT;
    grade(
        &judges,
        &[
            Expect::alive(
                "socks5 no auth (dante)",
                format!("socks5://{ip}:{port}"),
                "elite",
                ip,
            ),
            Expect::alive(
                "socks4 (dante)",
                format!("socks4://{ip}:{port}"),
                "elite",
                ip,
            ),
        ],
        &[&proxy],
    );
}

/// microsocks: without auth elite with https; with `-u/-P` the right
/// credentials work, wrong ones and none are dead.
#[test]
fn microsocks_socks5_with_and_without_auth() {
    let microsocks = first(require_or_skip!("microsocks", real::MICROSOCKS));
    let judges = Judges::start(10);
    let open_ip = address(10, 2);
    let auth_ip = address(10, 4);
    let open = real::microsocks(&microsocks, open_ip, None);
    let auth = real::microsocks(&microsocks, auth_ip, Some(("tester", "secret")));
    let port = real::SOCKS_PORT;
    grade(
        &judges,
        &[
            Expect::alive(
                "socks5 no auth (microsocks)",
                format!("socks5://{open_ip}:{port}"),
                "elite",
                open_ip,
            ),
            Expect::alive(
                "socks5 auth right (microsocks -u/-P)",
                format!("socks5://tester:secret@{auth_ip}:{port}"),
                "elite",
                auth_ip,
            ),
            Expect::dead(
                "socks5 auth wrong (microsocks -u/-P)",
                format!("socks5://intruder:guess@{auth_ip}:{port}"),
            ),
            Expect::dead(
                "socks5 auth missing (microsocks -u/-P)",
                format!("socks5://{auth_ip}:{port}"),
            ),
        ],
        &[&open, &auth],
    );
}

/// A proxy that reads its clients' TLS (its own certificate, from an
/// authority the validator does not trust): alive for plain http, never
/// `supports_https`, the reason `tls_intercepted`.
#[test]
fn a_tls_intercepting_proxy_never_supports_https() {
    // No package: it only needs root (port 443 for the judge).
    require_or_skip!("tls_interceptor");
    let judges = Judges::start(11);
    let ip = address(11, 2);
    let interceptor = real::Interceptor::start(ip, 8080);
    let line = http(ip, interceptor.address().port());
    grade(
        &judges,
        &[Expect::alive("TLS-intercepting proxy", line, "elite", ip)
            .https_fails("tls_intercepted")],
        &[],
    );
}

/// Real httpbin as `validation_target` (with `?show_env=1`, as the shipped
/// config names it): its `origin` is X-Forwarded-For when there is one,
/// else the peer. So behind a transparent proxy it shows our address (exit
/// unknown: NULL), behind squid's `unknown` no address (NULL, anonymous),
/// and behind proxies that forward nothing the proxy's address.
#[test]
fn httpbin_origin_is_read_as_the_contract_says() {
    let tools = require_or_skip!("httpbin", real::SQUID, real::TINYPROXY);
    let (squid, tinyproxy) = (&tools[0], &tools[1]);
    let net = 12;
    let judges = Judges::start(net);
    let httpbin = match real::httpbin(address(net, 3), 18_080) {
        Ok(process) => process,
        Err(why) if support::under_ci() => panic!("{why} (CI is set: no skipping)"),
        Err(why) => {
            eprintln!("SKIPPED httpbin: {why}");
            return;
        }
    };
    let target = format!("http://{}:18080/get?show_env=1", address(net, 3));
    let (transparent, unknown, elite, via) = (
        address(net, 2),
        address(net, 4),
        address(net, 5),
        address(net, 6),
    );
    let squid_transparent = real::squid(squid, transparent, "forwarded_for on\nvia on");
    let squid_unknown = real::squid(squid, unknown, "forwarded_for off\nvia off");
    let squid_elite = real::squid(squid, elite, "forwarded_for delete\nvia off");
    let tinyproxy_via = real::tinyproxy(tinyproxy, via, "ConnectPort 443");
    let squid_port = real::SQUID_PORT;
    grade_with(
        &judges,
        &target,
        &[
            Expect::alive(
                "httpbin: transparent (squid forwarded_for on)",
                http(transparent, squid_port),
                "transparent",
                transparent,
            )
            .exit(None),
            Expect::alive(
                "httpbin: XFF-unknown (squid forwarded_for off)",
                http(unknown, squid_port),
                "anonymous",
                unknown,
            )
            .exit(None),
            Expect::alive(
                "httpbin: elite (squid delete, via off)",
                http(elite, squid_port),
                "elite",
                elite,
            ),
            Expect::alive(
                "httpbin: Via-only (tinyproxy stock)",
                http(via, real::TINYPROXY_PORT),
                "anonymous",
                via,
            ),
        ],
        &[
            &httpbin,
            &squid_transparent,
            &squid_unknown,
            &squid_elite,
            &tinyproxy_via,
        ],
    );
}
