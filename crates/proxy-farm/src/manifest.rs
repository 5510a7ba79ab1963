//! The farm's ground truth: for every simulated proxy, how it is listed and
//! what a correct validator must conclude about it. Tests compare a
//! validator's findings with these entries.

use std::net::IpAddr;

use serde_json::{json, Value};

use crate::spec::{Behaviour, Credentials, Listing};
use proxy_pool::proxy::{Anonymity, Protocol, ProxyKey};

/// One simulated proxy and the findings a correct validator reaches for it.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestEntry {
    /// Its position in the farm, for [`crate::Farm::hits`].
    pub index: usize,
    /// As listed (`https` is an http proxy expected to tunnel CONNECT).
    pub protocol: Protocol,
    pub ip: IpAddr,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub behaviour: Behaviour,
    /// Whether an http proxy tunnels CONNECT (always false for socks).
    pub connect: bool,
    /// Whether that CONNECT reaches port 443 only.
    pub connect_443_only: bool,
    /// Whether a check through it reaches the judge and returns its answer.
    pub alive: bool,
    /// None when not alive; socks proxies are elite.
    pub anonymity: Option<Anonymity>,
    /// None when not alive. Whether the https check (a tunnel to the https
    /// judge, verified TLS, the judge's answer) succeeds: for http proxies
    /// whether CONNECT reaches the judge and TLS is not intercepted; socks
    /// proxies tunnel any TCP stream, so `Some(true)`. A validator without
    /// an https check leaves it unknown.
    pub supports_https: Option<bool>,
    /// When `supports_https` is `Some(false)`, the `https_failure` a correct
    /// validator writes (`connect_refused 405`, `tls_intercepted`, ...).
    pub https_failure: Option<&'static str>,
    /// The address the judge sees a check come from (the proxy's own);
    /// None when not alive.
    pub exit_ip: Option<IpAddr>,
    /// When not alive, the reasons a correct validator may give, as
    /// `DeadReason::as_str` names them (more than one where clients differ).
    /// Empty when alive, and for an http-only hostile behaviour listed as
    /// socks, where what a client sees depends on the client.
    pub dead_reasons: &'static [&'static str],
}

impl ManifestEntry {
    pub(crate) fn new(
        index: usize,
        protocol: Protocol,
        ip: IpAddr,
        port: u16,
        behaviour: Behaviour,
        connect: bool,
        credentials: Option<&Credentials>,
    ) -> ManifestEntry {
        let expected = expect(behaviour, protocol, connect);
        let username = credentials.map(|c| c.username.clone());
        // A socks4 user id has no password.
        let password = credentials
            .filter(|_| protocol != Protocol::Socks4)
            .map(|c| c.password.clone());
        ManifestEntry {
            index,
            protocol,
            ip,
            port,
            username,
            password,
            behaviour,
            connect,
            connect_443_only: false,
            alive: expected.alive,
            anonymity: expected.anonymity,
            supports_https: expected.supports_https,
            https_failure: expected.https_failure,
            exit_ip: expected.alive.then_some(ip),
            dead_reasons: expected.dead_reasons,
        }
    }

    /// The entry as `listing` lists it: a proxy listed without the
    /// credentials it requires, or with wrong ones, refuses every check.
    pub(crate) fn listed(mut self, listing: Listing) -> ManifestEntry {
        let Some(username) = self.username.take() else {
            return self;
        };
        let (username, password) = match (listing, self.protocol) {
            (Listing::AsRequired, _) => (Some(username), self.password.take()),
            (Listing::WithoutCredentials, _) => (None, None),
            (Listing::WithWrongCredentials, Protocol::Socks4) => {
                (Some(format!("not-{username}")), None)
            }
            (Listing::WithWrongCredentials, _) => {
                let password = self.password.take().unwrap_or_default();
                (Some(username), Some(format!("not-{password}")))
            }
        };
        self.username = username;
        self.password = password;
        if listing != Listing::AsRequired {
            self.alive = false;
            self.anonymity = None;
            self.supports_https = None;
            self.https_failure = None;
            self.exit_ip = None;
            self.dead_reasons = if self.protocol.is_http() {
                &["proxy_auth_required"]
            } else {
                &["socks"]
            };
        }
        self
    }

    /// The entry of a proxy whose CONNECT reaches port 443 only, for a
    /// validator whose https judge listens on `https_judge_port`.
    pub(crate) fn connect_443_only(mut self, only: bool, https_judge_port: u16) -> ManifestEntry {
        self.connect_443_only = only;
        if only && self.supports_https == Some(true) && https_judge_port != 443 {
            self.supports_https = Some(false);
            self.https_failure = Some("connect_refused 403");
        }
        self
    }

    /// The proxy as a list names it, credentials included.
    pub fn key(&self) -> ProxyKey {
        ProxyKey {
            protocol: self.protocol,
            ip: self.ip,
            port: self.port,
            username: self.username.clone(),
            password: self.password.clone(),
        }
    }

    /// `scheme://[user:pass@]ip:port`.
    pub fn url(&self) -> String {
        self.key().url()
    }

    /// `ip:port`.
    pub fn host_port(&self) -> String {
        self.key().host_port()
    }

    pub fn to_json(&self) -> Value {
        let parameter = match self.behaviour {
            Behaviour::Slow(ms) => json!(ms),
            Behaviour::Flaky(fraction) => json!(fraction),
            _ => Value::Null,
        };
        json!({
            "index": self.index,
            "protocol": self.protocol.as_str(),
            "ip": self.ip.to_string(),
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "behaviour": self.behaviour.name(),
            "parameter": parameter,
            "connect": self.connect,
            "connect_443_only": self.connect_443_only,
            "url": self.url(),
            "alive": self.alive,
            "anonymity": self.anonymity.map(|a| a.as_str()),
            "supports_https": self.supports_https,
            "https_failure": self.https_failure,
            "exit_ip": self.exit_ip.map(|ip| ip.to_string()),
            "dead_reasons": self.dead_reasons,
        })
    }
}

/// What a correct validator concludes about a proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expected {
    pub alive: bool,
    pub anonymity: Option<Anonymity>,
    pub supports_https: Option<bool>,
    pub https_failure: Option<&'static str>,
    pub dead_reasons: &'static [&'static str],
}

/// The pure rule behind the manifest. `Slow` is alive for a validator whose
/// timeout exceeds its delay; `Flaky(f)` is alive for `f < 1` (its first
/// connection always works); `InjectedJudge` is dead because it never reaches
/// the judge (a validator notices by sending a random query parameter and
/// requiring it back in `args`). Credentials are assumed listed as required
/// (see [`ManifestEntry::listed`]).
pub(crate) fn expect(behaviour: Behaviour, protocol: Protocol, connect: bool) -> Expected {
    let dead = |dead_reasons| Expected {
        alive: false,
        anonymity: None,
        supports_https: None,
        https_failure: None,
        dead_reasons,
    };
    let http = protocol.is_http();
    let anonymity = match behaviour {
        Behaviour::Elite
        | Behaviour::Socks4
        | Behaviour::Socks5
        | Behaviour::Slow(_)
        | Behaviour::TlsIntercept
        | Behaviour::AuthRequired => Anonymity::Elite,
        Behaviour::XffUnknown => Anonymity::Anonymous,
        Behaviour::Flaky(fraction) if fraction < 1.0 => Anonymity::Elite,
        Behaviour::Anonymous => Anonymity::Anonymous,
        Behaviour::Transparent => Anonymity::Transparent,
        Behaviour::Dead => return dead(&["refused"]),
        Behaviour::BlackHole if http => return dead(&["timeout"]),
        // Connected, then silence: the handshake failed, not the connect.
        Behaviour::BlackHole => return dead(&["handshake_timeout"]),
        _ if !http => return dead(&[]),
        Behaviour::Flaky(_) => return dead(&["reset"]),
        Behaviour::Garbage | Behaviour::MalformedStatus => return dead(&["garbage"]),
        Behaviour::Hijack | Behaviour::InjectedJudge => return dead(&["not_judge"]),
        Behaviour::Trickle => return dead(&["timeout"]),
        Behaviour::EndlessBody | Behaviour::EndlessHeaders | Behaviour::HugeHeader => {
            return dead(&["too_large"])
        }
    };
    let anonymity = if http { anonymity } else { Anonymity::Elite };
    let https_failure = match behaviour {
        _ if !http => None,
        // Its second connection, the https check's, is hung up on.
        Behaviour::Flaky(_) => Some("reset"),
        Behaviour::TlsIntercept => Some("tls_intercepted"),
        _ if !connect => Some("connect_refused 405"),
        _ => None,
    };
    Expected {
        alive: true,
        anonymity: Some(anonymity),
        supports_https: Some(https_failure.is_none()),
        https_failure,
        dead_reasons: &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_changing_behaviours_map_to_their_anonymity() {
        let http = |b| expect(b, Protocol::Http, false).anonymity;
        assert_eq!(http(Behaviour::Elite), Some(Anonymity::Elite));
        assert_eq!(http(Behaviour::Anonymous), Some(Anonymity::Anonymous));
        assert_eq!(http(Behaviour::Transparent), Some(Anonymity::Transparent));
        assert_eq!(
            expect(Behaviour::Transparent, Protocol::Socks5, false).anonymity,
            Some(Anonymity::Elite)
        );
    }

    #[test]
    fn hostile_and_unreachable_behaviours_are_dead() {
        for behaviour in [
            Behaviour::Dead,
            Behaviour::BlackHole,
            Behaviour::Flaky(1.0),
            Behaviour::Garbage,
            Behaviour::Hijack,
            Behaviour::Trickle,
            Behaviour::EndlessBody,
            Behaviour::EndlessHeaders,
            Behaviour::HugeHeader,
            Behaviour::MalformedStatus,
            Behaviour::InjectedJudge,
        ] {
            let expected = expect(behaviour, Protocol::Http, true);
            assert!(!expected.alive, "{behaviour:?}");
            assert_eq!(expected.anonymity, None);
            assert_eq!(expected.supports_https, None);
            assert!(!expected.dead_reasons.is_empty(), "{behaviour:?}");
        }
        let alive = expect(Behaviour::Elite, Protocol::Http, false);
        assert!(alive.alive && alive.dead_reasons.is_empty());
    }

    fn entry(protocol: Protocol, behaviour: Behaviour, listing: Listing) -> ManifestEntry {
        let creds = Credentials::new("user", "pass");
        let ip = "127.1.0.1".parse().unwrap();
        ManifestEntry::new(0, protocol, ip, 1080, behaviour, false, Some(&creds)).listed(listing)
    }

    #[test]
    fn proxies_listed_without_or_with_wrong_credentials_are_dead() {
        use Listing::*;
        let right = entry(Protocol::Socks5, Behaviour::Socks5, AsRequired);
        assert!(right.alive);
        assert_eq!(right.url(), "socks5://user:pass@127.1.0.1:1080");

        let cases = [
            (
                Protocol::Http,
                Behaviour::AuthRequired,
                WithoutCredentials,
                "http://127.1.0.1:1080",
                "proxy_auth_required",
            ),
            (
                Protocol::Http,
                Behaviour::AuthRequired,
                WithWrongCredentials,
                "http://user:not-pass@127.1.0.1:1080",
                "proxy_auth_required",
            ),
            (
                Protocol::Socks5,
                Behaviour::Socks5,
                WithoutCredentials,
                "socks5://127.1.0.1:1080",
                "socks",
            ),
            (
                Protocol::Socks5,
                Behaviour::Socks5,
                WithWrongCredentials,
                "socks5://user:not-pass@127.1.0.1:1080",
                "socks",
            ),
            (
                Protocol::Socks4,
                Behaviour::Socks4,
                WithWrongCredentials,
                "socks4://not-user@127.1.0.1:1080",
                "socks",
            ),
        ];
        for (protocol, behaviour, listing, url, reason) in cases {
            let listed = entry(protocol, behaviour, listing);
            assert_eq!(listed.url(), url);
            assert!(!listed.alive, "{url}");
            assert_eq!(
                (listed.anonymity, listed.supports_https, listed.exit_ip),
                (None, None, None)
            );
            assert_eq!(listed.dead_reasons, [reason], "{url}");
            assert_eq!(listed.to_json()["dead_reasons"], json!([reason]));
        }

        // A proxy that requires nothing is listed without anything.
        let ip = "127.1.0.2".parse().unwrap();
        let open = ManifestEntry::new(1, Protocol::Http, ip, 80, Behaviour::Elite, false, None)
            .listed(WithWrongCredentials);
        assert!(open.alive && open.username.is_none());
    }

    #[test]
    fn https_support_follows_connect_for_http_and_is_true_for_socks() {
        assert_eq!(
            expect(Behaviour::Elite, Protocol::Http, false).supports_https,
            Some(false)
        );
        assert_eq!(
            expect(Behaviour::Elite, Protocol::Https, true).supports_https,
            Some(true)
        );
        assert_eq!(
            expect(Behaviour::Socks4, Protocol::Socks4, false).supports_https,
            Some(true)
        );
        let refused = expect(Behaviour::Elite, Protocol::Http, false);
        assert_eq!(refused.https_failure, Some("connect_refused 405"));
        let intercepted = expect(Behaviour::TlsIntercept, Protocol::Https, true);
        assert_eq!(intercepted.supports_https, Some(false));
        assert_eq!(intercepted.https_failure, Some("tls_intercepted"));
        assert_eq!(intercepted.anonymity, Some(Anonymity::Elite));
        assert_eq!(
            expect(Behaviour::XffUnknown, Protocol::Http, false).anonymity,
            Some(Anonymity::Anonymous)
        );
    }

    #[test]
    fn a_443_only_proxy_supports_https_only_with_a_judge_on_443() {
        let ip = "127.1.0.3".parse().unwrap();
        let entry =
            || ManifestEntry::new(2, Protocol::Https, ip, 3128, Behaviour::Elite, true, None);
        let on_443 = entry().connect_443_only(true, 443);
        assert_eq!(
            (on_443.supports_https, on_443.https_failure),
            (Some(true), None)
        );
        let elsewhere = entry().connect_443_only(true, 8443);
        assert_eq!(
            (elsewhere.supports_https, elsewhere.https_failure),
            (Some(false), Some("connect_refused 403"))
        );
        let any_port = entry().connect_443_only(false, 8443);
        assert_eq!(any_port.supports_https, Some(true));
    }

    #[test]
    fn socks4_entries_carry_no_password() {
        let creds = Credentials::new("id", "ignored");
        let entry = ManifestEntry::new(
            0,
            Protocol::Socks4,
            "127.1.0.1".parse().unwrap(),
            1080,
            Behaviour::Socks4,
            false,
            Some(&creds),
        );
        assert_eq!(entry.url(), "socks4://id@127.1.0.1:1080");
        assert_eq!(entry.exit_ip, Some("127.1.0.1".parse().unwrap()));
        assert_eq!(entry.to_json()["behaviour"], "socks4");
    }
}
