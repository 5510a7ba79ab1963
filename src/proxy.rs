//! The domain vocabulary shared by every component: what a proxy is, how it is
//! named in URLs, and how its credentials are kept out of logs.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Utc};

/// The protocol a proxy speaks to its clients; `Http` by default, as for a
/// bare `host:port` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    #[default]
    Http,
    /// An http proxy that is expected to tunnel CONNECT.
    Https,
    Socks4,
    Socks5,
}

impl Protocol {
    pub const ALL: [Protocol; 4] = [
        Protocol::Http,
        Protocol::Https,
        Protocol::Socks4,
        Protocol::Socks5,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Socks4 => "socks4",
            Protocol::Socks5 => "socks5",
        }
    }

    /// Parses a scheme name, case-insensitively. `socks4a` and `socks5h` name
    /// the same proxies as `socks4` and `socks5` (only who resolves host names
    /// differs, and our targets are IP literals or resolved by us).
    pub fn from_scheme(scheme: &str) -> Option<Protocol> {
        let lower = scheme.to_ascii_lowercase();
        match lower.as_str() {
            "http" => Some(Protocol::Http),
            "https" => Some(Protocol::Https),
            "socks4" | "socks4a" => Some(Protocol::Socks4),
            "socks5" | "socks5h" | "socks" => Some(Protocol::Socks5),
            _ => None,
        }
    }

    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much a proxy reveals of its client, as judged by the validator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Anonymity {
    Transparent,
    Anonymous,
    Elite,
}

impl Anonymity {
    pub fn as_str(self) -> &'static str {
        match self {
            Anonymity::Elite => "elite",
            Anonymity::Anonymous => "anonymous",
            Anonymity::Transparent => "transparent",
        }
    }

    pub fn parse(text: &str) -> Option<Anonymity> {
        match text {
            "elite" => Some(Anonymity::Elite),
            "anonymous" => Some(Anonymity::Anonymous),
            "transparent" => Some(Anonymity::Transparent),
            _ => None,
        }
    }
}

impl fmt::Display for Anonymity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A proxy as a list names it. Identity is (protocol, ip, port, username);
/// the password rides along but never reaches a log (see [`ProxyKey::redacted`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProxyKey {
    pub protocol: Protocol,
    pub ip: IpAddr,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl ProxyKey {
    pub fn new(protocol: Protocol, ip: IpAddr, port: u16) -> ProxyKey {
        ProxyKey {
            protocol,
            ip,
            port,
            username: None,
            password: None,
        }
    }

    /// The URL a client hands to its HTTP library, credentials included
    /// (`socks5://user:pass@1.2.3.4:1080`, `http://[2001:db8::1]:8080`).
    pub fn url(&self) -> String {
        self.format_url(false)
    }

    /// The same URL with the password replaced, for logs and diagnostics.
    pub fn redacted(&self) -> String {
        self.format_url(true)
    }

    /// `ip:port`, with IPv6 addresses in brackets.
    pub fn host_port(&self) -> String {
        match self.ip {
            IpAddr::V4(v4) => format!("{v4}:{}", self.port),
            IpAddr::V6(v6) => format!("[{v6}]:{}", self.port),
        }
    }

    fn format_url(&self, redact: bool) -> String {
        let mut url = String::with_capacity(48);
        url.push_str(self.protocol.as_str());
        url.push_str("://");
        if let Some(user) = &self.username {
            url.push_str(&percent_encode_userinfo(user));
            if let Some(password) = &self.password {
                url.push(':');
                if redact {
                    url.push_str("***");
                } else {
                    url.push_str(&percent_encode_userinfo(password));
                }
            }
            url.push('@');
        }
        url.push_str(&self.host_port());
        url
    }
}

/// What stays as written in the userinfo part of a URL: RFC 3986's
/// unreserved and sub-delims characters.
const USERINFO_KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=');

/// Percent-encodes the characters that would break the userinfo part of a URL.
pub fn percent_encode_userinfo(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, USERINFO_KEEP).to_string()
}

/// An active proxy as the state manager serves it: identity plus the findings
/// of its last successful check.
#[derive(Clone, Debug, PartialEq)]
pub struct ActiveProxy {
    pub id: i64,
    pub key: ProxyKey,
    pub latency_ms: Option<u32>,
    pub anonymity: Option<Anonymity>,
    /// ISO 3166 alpha-2, upper case.
    pub country: Option<String>,
    pub supports_https: Option<bool>,
    pub last_validated_at: Option<DateTime<Utc>>,
    /// What gave the proxy away at its last successful check, e.g.
    /// `"Via: 1.1 squid"`; None for an elite proxy. Shared, so that a pick
    /// copies a pointer, not the text.
    pub anonymity_evidence: Option<Arc<str>>,
    /// The address the judge saw its last successful check come from; None
    /// when not known. Sites ban addresses: proxies that share one are
    /// banned together (see the state manager).
    pub exit_ip: Option<IpAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_includes_credentials_and_redacted_hides_password() {
        let mut key = ProxyKey::new(Protocol::Socks5, "1.2.3.4".parse().unwrap(), 1080);
        key.username = Some("us er".into());
        key.password = Some("p@ss".into());
        assert_eq!(key.url(), "socks5://us%20er:p%40ss@1.2.3.4:1080");
        assert_eq!(key.redacted(), "socks5://us%20er:***@1.2.3.4:1080");
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let key = ProxyKey::new(Protocol::Http, "2001:db8::1".parse().unwrap(), 8080);
        assert_eq!(key.url(), "http://[2001:db8::1]:8080");
    }

    #[test]
    fn scheme_aliases_map_to_their_family() {
        assert_eq!(Protocol::from_scheme("SOCKS5H"), Some(Protocol::Socks5));
        assert_eq!(Protocol::from_scheme("socks4a"), Some(Protocol::Socks4));
        assert_eq!(Protocol::from_scheme("ftp"), None);
    }
}
