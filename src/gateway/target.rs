//! Where a client wants to go: a host and port, read from a CONNECT
//! authority, an absolute URI or a socks request, and whether it is a
//! private address the gateway refuses.

use std::net::IpAddr;

use crate::fetcher::parse::is_public;
use crate::http;

/// The longest host name (RFC 1035, and what a socks request can carry).
const MAX_HOST_CHARS: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// A name, or an address without brackets.
    pub host: String,
    pub port: u16,
}

impl Target {
    /// `None` for an empty or over-long host, a port 0, or characters no
    /// host name has.
    pub fn new(host: &str, port: u16) -> Option<Target> {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let fits = !host.is_empty()
            && host.len() <= MAX_HOST_CHARS
            && port != 0
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
        fits.then(|| Target {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// `host:port` of a CONNECT request (`[v6]:port` for IPv6).
    pub fn from_authority(authority: &str) -> Option<Target> {
        match http::Target::parse(authority)? {
            http::Target::Authority(authority) => {
                let (host, port) = http::split_authority(authority, 0)?;
                Target::new(host, port)
            }
            _ => None,
        }
    }

    /// The target and origin-form path of an absolute `http://` URI.
    pub fn from_absolute_uri(uri: &str) -> Option<(Target, String)> {
        match http::Target::parse(uri)? {
            http::Target::Absolute {
                scheme,
                authority,
                path,
            } if scheme.eq_ignore_ascii_case("http") && !uri.contains('@') => {
                let (host, port) = http::split_authority(authority, 80)?;
                Some((Target::new(host, port)?, path))
            }
            _ => None,
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// `host:port`, with brackets for IPv6.
    pub fn authority(&self) -> String {
        match self.ip() {
            Some(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }

    /// Loopback, private, link-local, reserved and multicast addresses, and
    /// the names that always mean this host. Other names are resolved by the
    /// pool proxy, never here.
    pub fn is_private(&self) -> bool {
        if let Some(ip) = self.ip() {
            return !is_public(ip);
        }
        let host = self.host.trim_end_matches('.');
        host == "localhost" || host.ends_with(".localhost")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_and_uris_parse() {
        let t = Target::from_authority("Example.com:443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("example.com", 443));
        let t = Target::from_authority("[::1]:8080").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8080));
        assert_eq!(t.authority(), "[::1]:8080");
        assert!(Target::from_authority("example.com").is_none());
        assert!(Target::from_authority("example.com:0").is_none());
        assert!(Target::from_authority("exa mple.com:80").is_none());
        let (t, path) = Target::from_absolute_uri("http://a.test:8080/x?y=1").unwrap();
        assert_eq!(
            (t.authority(), path.as_str()),
            ("a.test:8080".into(), "/x?y=1")
        );
        let (t, path) = Target::from_absolute_uri("http://a.test").unwrap();
        assert_eq!((t.authority(), path.as_str()), ("a.test:80".into(), "/"));
        let (t, _) = Target::from_absolute_uri("http://[::1]:81/").unwrap();
        assert_eq!(t.authority(), "[::1]:81");
        assert!(Target::from_absolute_uri("/relative").is_none());
        assert!(Target::from_absolute_uri("https://a.test/").is_none());
        assert!(Target::from_absolute_uri("http://u:p@a.test/").is_none());
    }

    #[test]
    fn private_targets_are_recognised() {
        for host in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.1.1",
            "::1",
            "localhost",
            "a.localhost",
            "0.0.0.0",
            "fc00::1",
        ] {
            assert!(Target::new(host, 80).unwrap().is_private(), "{host}");
        }
        for host in ["93.184.216.34", "example.com", "2606:4700::1"] {
            assert!(!Target::new(host, 80).unwrap().is_private(), "{host}");
        }
    }
}
