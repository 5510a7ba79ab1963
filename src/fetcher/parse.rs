//! Turning a downloaded proxy list into proxy keys. Shared by the fetcher and
//! `proxy-pool import`, pure, and hardened: lists are written by strangers,
//! in every format, and some are hostile (aimed at internal addresses).
//!
//! Accepted, one proxy a line: `ip:port`, `scheme://ip:port`,
//! `scheme://user:pass@ip:port`, `user:pass@ip:port`, `ip:port:user:pass`,
//! IPv6 as `[addr]:port`. Blank lines and `#` or `//` comments are skipped;
//! anything after the proxy, separated by whitespace, `,`, `;` or `|`, is
//! ignored (`1.2.3.4:8080 US elite`). Credentials in URL forms are
//! percent-decoded; in the `ip:port:user:pass` form they are taken as written.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::proxy::{Protocol, ProxyKey};

/// A line longer than this is rejected unread: no proxy line is that long.
pub const MAX_LINE_BYTES: usize = 4096;
/// How many rejected lines are kept as examples.
const MAX_REJECT_EXAMPLES: usize = 5;
/// How much of a rejected line an example keeps.
const MAX_REJECT_TEXT_CHARS: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseOptions {
    /// The protocol of lines that name none (`1.2.3.4:8080`).
    pub default_protocol: Protocol,
    /// Accept loopback, private, link-local, reserved and multicast addresses.
    /// Off in production: a hostile list must not aim the validator at
    /// internal hosts.
    pub allow_private_addresses: bool,
}

/// What a list held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedList {
    /// Distinct proxies, in order of first appearance.
    pub proxies: Vec<ProxyKey>,
    /// Every line of the input, blank and comment lines included.
    pub lines: usize,
    /// Lines that looked like a proxy but were refused.
    pub rejected: usize,
    /// Valid lines naming a proxy seen earlier in the list (same protocol,
    /// address, port and username).
    pub duplicates: usize,
    /// The first few rejected lines, for a diagnostic message.
    pub first_rejects: Vec<Reject>,
}

/// One rejected line, safe to log: credentials are masked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// 1-based.
    pub line: usize,
    pub text: String,
    pub reason: RejectReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not an IP address (`999.1.1.1`, `1.2.3`).
    InvalidIp,
    /// Missing, not a number, or outside 1..65535.
    InvalidPort,
    UnknownScheme,
    /// A host name: we only take IP literals, so that a list cannot make the
    /// validator resolve names of its choosing.
    Hostname,
    /// Loopback, private, link-local, reserved, multicast, documentation
    /// and the like, while `allow_private_addresses` is off.
    NotPublic,
    /// Empty user name, or credentials that do not decode to UTF-8.
    BadCredentials,
    /// Longer than [`MAX_LINE_BYTES`].
    TooLong,
    /// Not shaped like any accepted format.
    Malformed,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidIp => "invalid_ip",
            RejectReason::InvalidPort => "invalid_port",
            RejectReason::UnknownScheme => "unknown_scheme",
            RejectReason::Hostname => "hostname",
            RejectReason::NotPublic => "not_public",
            RejectReason::BadCredentials => "bad_credentials",
            RejectReason::TooLong => "too_long",
            RejectReason::Malformed => "malformed",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a downloaded list given as bytes; invalid UTF-8 is replaced, not fatal.
pub fn parse_bytes(bytes: &[u8], options: &ParseOptions) -> ParsedList {
    parse_list(&String::from_utf8_lossy(bytes), options)
}

/// Parses a whole list. Never fails: what cannot be read is counted.
pub fn parse_list(text: &str, options: &ParseOptions) -> ParsedList {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parsed = ParsedList::default();
    let mut seen = SeenSet::new(text.len() / 24);
    for (index, line) in text.lines().enumerate() {
        parsed.lines += 1;
        let outcome = if line.len() > MAX_LINE_BYTES {
            Err(RejectReason::TooLong)
        } else {
            parse_line(line, options)
        };
        match outcome {
            Ok(None) => {}
            Ok(Some(key)) => {
                if seen.is_new(&key, &parsed.proxies) {
                    parsed.proxies.push(key);
                } else {
                    parsed.duplicates += 1;
                }
            }
            Err(reason) => {
                parsed.rejected += 1;
                if parsed.first_rejects.len() < MAX_REJECT_EXAMPLES {
                    parsed.first_rejects.push(Reject {
                        line: index + 1,
                        text: masked_excerpt(line),
                        reason,
                    });
                }
            }
        }
    }
    parsed
}

/// A proxy's identity as the database sees it: the password is not part of it.
type Identity = (Protocol, IpAddr, u16, Option<String>);

/// Remembers which identities a list has named, compactly: a million-line
/// list would otherwise hold a second copy of every key. Each identity is
/// stored as a keyed 64-bit hash pointing at its first proxy; the rare true
/// hash collision falls back to an exact set, so no proxy is ever lost.
struct SeenSet {
    hasher: RandomState,
    /// Keyed hashes already: FxHash only folds them into buckets.
    first_by_hash: HashMap<u64, usize, rustc_hash::FxBuildHasher>,
    collided: HashSet<Identity>,
}

impl SeenSet {
    fn new(capacity_hint: usize) -> SeenSet {
        let capacity = capacity_hint.min(1 << 20);
        SeenSet {
            hasher: RandomState::new(),
            first_by_hash: HashMap::with_capacity_and_hasher(capacity, Default::default()),
            collided: HashSet::new(),
        }
    }

    /// Whether `key` is new; if so, it is recorded as `proxies[proxies.len()]`
    /// (the caller pushes it next).
    fn is_new(&mut self, key: &ProxyKey, proxies: &[ProxyKey]) -> bool {
        let hash = self
            .hasher
            .hash_one((key.protocol, key.ip, key.port, key.username.as_deref()));
        let index = proxies.len();
        let first = *self.first_by_hash.entry(hash).or_insert(index);
        if first == index {
            return true;
        }
        let earlier = &proxies[first];
        let same = earlier.protocol == key.protocol
            && earlier.ip == key.ip
            && earlier.port == key.port
            && earlier.username == key.username;
        if same {
            return false;
        }
        self.collided
            .insert((key.protocol, key.ip, key.port, key.username.clone()))
    }
}

/// One line: `Ok(None)` for blank and comment lines.
pub fn parse_line(line: &str, options: &ParseOptions) -> Result<Option<ProxyKey>, RejectReason> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') || line.starts_with("//") {
        return Ok(None);
    }
    let token = proxy_token(line);
    let (protocol, rest) = match find_scheme_end(token) {
        Some(at) => {
            let protocol =
                Protocol::from_scheme(&token[..at]).ok_or(RejectReason::UnknownScheme)?;
            let rest = &token[at + 3..];
            (protocol, rest.strip_suffix('/').unwrap_or(rest))
        }
        None => (options.default_protocol, token),
    };
    let at_sign = rest.bytes().rposition(|b| b == b'@');
    // `user:pass@host:port`, unless what follows the `@` is no host:port
    // while the whole is `host:port:user:pass` with an `@` in the password
    // (`1.2.3.4:80:u:p@ss`); then the `@` is part of the credentials.
    let url_form =
        at_sign
            .map(|at| (&rest[..at], &rest[at + 1..]))
            .and_then(|(userinfo, host_port)| match split_host_port(host_port) {
                Ok((_, _, Some(_))) => Some((userinfo, Err(RejectReason::Malformed))),
                Ok((ip, port, None)) => Some((userinfo, Ok((ip, port)))),
                Err(reason) => match split_host_port(rest) {
                    Ok((_, _, Some(_))) => None,
                    // `1.2.3.4:0:u:p@ss` is a bad port, not a bad host after `@`.
                    Err(colon_reason) if starts_with_ip(rest) => {
                        Some((userinfo, Err(colon_reason)))
                    }
                    _ => Some((userinfo, Err(reason))),
                },
            });
    let (ip, port, credentials) = match url_form {
        Some((userinfo, host_port)) => {
            let (ip, port) = host_port?;
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            let user = percent_decode(user)?;
            let password = password.map(percent_decode).transpose()?;
            (ip, port, Some((user, password)))
        }
        None => {
            let (ip, port, extra) = split_host_port(rest)?;
            let credentials = extra.map(|extra| match extra.split_once(':') {
                Some((user, password)) => (user.to_string(), Some(password.to_string())),
                None => (extra.to_string(), None),
            });
            (ip, port, credentials)
        }
    };
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    if !options.allow_private_addresses && !is_public(ip) {
        return Err(RejectReason::NotPublic);
    }
    let mut key = ProxyKey::new(protocol, ip, port);
    if let Some((user, password)) = credentials {
        if user.is_empty() {
            return Err(RejectReason::BadCredentials);
        }
        key.username = Some(user);
        key.password = password;
    }
    Ok(Some(key))
}

/// The proxy part of a trimmed line, without trailing fields. `,` and `;`
/// may appear unencoded in URL credentials, so before the last `@` they do
/// not end the proxy.
fn proxy_token(line: &str) -> &str {
    // Byte searches: every delimiter is ASCII, and this runs on every line.
    let bytes = line.as_bytes();
    let mut end = bytes
        .iter()
        .position(|&b| matches!(b, b' ' | b'\t' | b'|' | b'\r' | b'\n' | b'\x0b' | b'\x0c'))
        .unwrap_or(bytes.len());
    // Unicode spaces are rare but must end the token too.
    if !bytes[..end].is_ascii() {
        end = line[..end].find(char::is_whitespace).unwrap_or(end);
    }
    let token = &bytes[..end];
    let host_start = token
        .iter()
        .rposition(|&b| b == b'@')
        .map_or(0, |at| at + 1);
    match token[host_start..]
        .iter()
        .position(|&b| b == b',' || b == b';')
    {
        Some(at) => &line[..host_start + at],
        None => &line[..end],
    }
}

/// Whether `text` starts with an IP address and a `:` (`1.2.3.4:`, `[v6]:`).
fn starts_with_ip(text: &str) -> bool {
    match text.strip_prefix('[') {
        Some(bracketed) => bracketed
            .split_once("]:")
            .is_some_and(|(inside, _)| inside.parse::<Ipv6Addr>().is_ok()),
        None => text
            .split_once(':')
            .is_some_and(|(host, _)| host.parse::<Ipv4Addr>().is_ok()),
    }
}

/// Where `://` is in a token: the scheme is before it.
fn find_scheme_end(token: &str) -> Option<usize> {
    let bytes = token.as_bytes();
    // Schemes are short; a `://` further in is not a scheme separator we take.
    let search = &bytes[..bytes.len().min(16)];
    search.windows(3).position(|window| window == b"://")
}

/// Splits `ip:port`, `[v6]:port`, and the `ip:port:user:pass` tail (returned
/// as the third element, `user:pass` or `user`).
fn split_host_port(text: &str) -> Result<(IpAddr, u16, Option<&str>), RejectReason> {
    let (host, after_host) = if let Some(bracketed) = text.strip_prefix('[') {
        let (inside, after) = bracketed.split_once(']').ok_or(RejectReason::Malformed)?;
        let v6 = inside
            .parse::<Ipv6Addr>()
            .map_err(|_| RejectReason::InvalidIp)?;
        (IpAddr::V6(v6), after)
    } else {
        let (host, after) = match text.find(':') {
            Some(at) => (&text[..at], &text[at..]),
            // A lone address lacks its port; a lone word is not a proxy line.
            None if text.parse::<Ipv4Addr>().is_ok() => (text, ""),
            None => return Err(RejectReason::Malformed),
        };
        (parse_host(host, text)?, after)
    };
    let port_and_extra = after_host
        .strip_prefix(':')
        .ok_or(RejectReason::InvalidPort)?;
    let (port_text, extra) = match port_and_extra.split_once(':') {
        Some((port, extra)) => (port, Some(extra)),
        None => (port_and_extra, None),
    };
    let port = parse_port(port_text)?;
    Ok((host, port, extra))
}

/// An unbracketed host: IPv4, or else a reason that names what it is.
fn parse_host(host: &str, whole: &str) -> Result<IpAddr, RejectReason> {
    if let Ok(v4) = host.parse::<Ipv4Addr>() {
        return Ok(IpAddr::V4(v4));
    }
    // A bare IPv6 address with the port glued on (`2001:db8::1:80`) is
    // ambiguous; only the bracketed form is taken.
    if whole.parse::<Ipv6Addr>().is_ok() || whole.matches(':').count() > 3 {
        return Err(RejectReason::Malformed);
    }
    let looks_like_name = !host.is_empty()
        && host.bytes().any(|b| b.is_ascii_alphabetic())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if looks_like_name {
        Err(RejectReason::Hostname)
    } else {
        Err(RejectReason::InvalidIp)
    }
}

fn parse_port(text: &str) -> Result<u16, RejectReason> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RejectReason::InvalidPort);
    }
    match text.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        _ => Err(RejectReason::InvalidPort),
    }
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits is kept as
/// written (lists are sloppy), but the result must be UTF-8.
fn percent_decode(text: &str) -> Result<String, RejectReason> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| RejectReason::BadCredentials)
}

/// Whether `ip` is a globally routable unicast address a public proxy can
/// have. IPv4-mapped and 6to4 IPv6 addresses are judged by their IPv4 part.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let segments = v6.segments();
            // Only 2000::/3 is allocated global unicast; everything else is
            // loopback, unspecified, unique local, link-local, multicast,
            // NAT64, discard or not allocated.
            if segments[0] & 0xe000 != 0x2000 {
                return false;
            }
            if segments[0] == 0x2002 {
                let [a, b] = segments[1].to_be_bytes();
                let [c, d] = segments[2].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            let documentation = segments[0] == 0x2001 && segments[1] == 0x0db8;
            let documentation_new = segments[0] & 0xfff0 == 0x3ff0;
            let benchmarking = segments[0] == 0x2001 && segments[1] == 0x0002 && segments[2] == 0;
            let orchid = segments[0] == 0x2001 && segments[1] & 0xfff0 == 0x0010;
            let orchid_v2 = segments[0] == 0x2001 && segments[1] & 0xfff0 == 0x0020;
            !(documentation || documentation_new || benchmarking || orchid || orchid_v2)
        }
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    let this_network = a == 0;
    let shared = a == 100 && (64..128).contains(&b);
    let ietf = a == 192 && b == 0 && c == 0;
    let documentation = (a == 192 && b == 0 && c == 2)
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113);
    let benchmarking = a == 198 && (b == 18 || b == 19);
    let reserved = a >= 240;
    !(this_network
        || v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_multicast()
        || shared
        || ietf
        || documentation
        || benchmarking
        || reserved)
}

/// A rejected line for a diagnostic: credentials masked, at most
/// [`MAX_REJECT_TEXT_CHARS`] characters.
fn masked_excerpt(line: &str) -> String {
    let prefix_end = line
        .char_indices()
        .nth(MAX_REJECT_TEXT_CHARS)
        .map_or(line.len(), |(at, _)| at);
    let line = line[..prefix_end].trim();
    let token = proxy_token(line);
    let trailing = &line[token.len()..];
    let scheme_end = token.find("://").map_or(0, |at| at + 3);
    let (scheme, rest) = token.split_at(scheme_end);
    let masked = if let Some((_, host_port)) = rest.rsplit_once('@') {
        format!("{scheme}***@{host_port}")
    } else {
        // The `ip:port:user:pass` form: keep up to the port.
        let port_colon = if rest.starts_with('[') {
            rest.find("]:").map(|at| at + 1)
        } else {
            rest.find(':')
        };
        let tail_colon =
            port_colon.and_then(|at| rest[at + 1..].find(':').map(|next| at + 1 + next));
        match tail_colon {
            Some(at) if rest.matches(':').count() <= 4 || rest.starts_with('[') => {
                format!("{scheme}{}:***", &rest[..at])
            }
            _ => token.to_string(),
        }
    };
    format!("{masked}{trailing}")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const PUBLIC: ParseOptions = ParseOptions {
        default_protocol: Protocol::Http,
        allow_private_addresses: false,
    };

    fn one(line: &str) -> Result<Option<ProxyKey>, RejectReason> {
        parse_line(line, &PUBLIC)
    }

    fn key(protocol: Protocol, ip: &str, port: u16, creds: Option<(&str, &str)>) -> ProxyKey {
        let mut key = ProxyKey::new(protocol, ip.parse().unwrap(), port);
        if let Some((user, password)) = creds {
            key.username = Some(user.to_string());
            key.password = Some(password.to_string());
        }
        key
    }

    #[test]
    fn every_accepted_format_parses() {
        let cases: Vec<(&str, ProxyKey)> = vec![
            ("1.2.3.4:8080", key(Protocol::Http, "1.2.3.4", 8080, None)),
            (
                "socks5://1.2.3.4:1080",
                key(Protocol::Socks5, "1.2.3.4", 1080, None),
            ),
            (
                "HTTPS://1.2.3.4:443/",
                key(Protocol::Https, "1.2.3.4", 443, None),
            ),
            (
                "socks4a://1.2.3.4:1080",
                key(Protocol::Socks4, "1.2.3.4", 1080, None),
            ),
            (
                "socks5h://1.2.3.4:1080",
                key(Protocol::Socks5, "1.2.3.4", 1080, None),
            ),
            (
                "socks5://us%20er:p%40ss@1.2.3.4:1080",
                key(Protocol::Socks5, "1.2.3.4", 1080, Some(("us er", "p@ss"))),
            ),
            (
                "http://user:p@ss@1.2.3.4:80",
                key(Protocol::Http, "1.2.3.4", 80, Some(("user", "p@ss"))),
            ),
            (
                "user:pass@1.2.3.4:3128",
                key(Protocol::Http, "1.2.3.4", 3128, Some(("user", "pass"))),
            ),
            (
                "1.2.3.4:3128:user:pa:ss",
                key(Protocol::Http, "1.2.3.4", 3128, Some(("user", "pa:ss"))),
            ),
            (
                "1.2.3.4:80:u:p@ss",
                key(Protocol::Http, "1.2.3.4", 80, Some(("u", "p@ss"))),
            ),
            (
                "socks5://1.2.3.4:1080:u:p@ss@x US",
                key(Protocol::Socks5, "1.2.3.4", 1080, Some(("u", "p@ss@x"))),
            ),
            (
                "[2a00:1450::1]:80:u:@p",
                key(Protocol::Http, "2a00:1450::1", 80, Some(("u", "@p"))),
            ),
            (
                "[2a00:1450::1]:8080",
                key(Protocol::Http, "2a00:1450::1", 8080, None),
            ),
            (
                "socks5://[2a00:1450::1]:1080",
                key(Protocol::Socks5, "2a00:1450::1", 1080, None),
            ),
            (
                "[::ffff:1.2.3.4]:80",
                key(Protocol::Http, "1.2.3.4", 80, None),
            ),
            (
                "  \t1.2.3.4:8080\t US elite",
                key(Protocol::Http, "1.2.3.4", 8080, None),
            ),
            (
                "1.2.3.4:8080,US,elite",
                key(Protocol::Http, "1.2.3.4", 8080, None),
            ),
            (
                "1.2.3.4:8080;US",
                key(Protocol::Http, "1.2.3.4", 8080, None),
            ),
            (
                "1.2.3.4:8080|US|1.2s",
                key(Protocol::Http, "1.2.3.4", 8080, None),
            ),
            (
                "http://u:a,b;c@1.2.3.4:80,US",
                key(Protocol::Http, "1.2.3.4", 80, Some(("u", "a,b;c"))),
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(one(line), Ok(Some(expected)), "{line}");
        }
        let mut user_only = key(Protocol::Http, "1.2.3.4", 80, None);
        user_only.username = Some("token".into());
        assert_eq!(one("http://token@1.2.3.4:80"), Ok(Some(user_only)));
    }

    #[test]
    fn blank_and_comment_lines_are_skipped() {
        for line in [
            "",
            "   ",
            "\t",
            "# list of proxies",
            "// updated daily",
            "  # x",
        ] {
            assert_eq!(one(line), Ok(None), "{line:?}");
        }
    }

    #[test]
    fn every_reject_reason_is_given() {
        let cases = [
            ("999.1.1.1:80", RejectReason::InvalidIp),
            ("1.2.3:80", RejectReason::InvalidIp),
            ("[zz::1]:80", RejectReason::InvalidIp),
            ("1.2.3.4:0", RejectReason::InvalidPort),
            ("1.2.3.4:65536", RejectReason::InvalidPort),
            ("1.2.3.4:http", RejectReason::InvalidPort),
            ("1.2.3.4", RejectReason::InvalidPort),
            ("1.2.3.4:", RejectReason::InvalidPort),
            ("ftp://1.2.3.4:21", RejectReason::UnknownScheme),
            ("proxy.example.com:8080", RejectReason::Hostname),
            ("http://localhost:8080", RejectReason::Hostname),
            ("127.0.0.1:8080", RejectReason::NotPublic),
            ("10.1.2.3:8080", RejectReason::NotPublic),
            ("[::1]:8080", RejectReason::NotPublic),
            ("[::ffff:192.168.1.1]:80", RejectReason::NotPublic),
            (":pass@1.2.3.4:80", RejectReason::BadCredentials),
            ("http://u:%ff%fe@1.2.3.4:80", RejectReason::BadCredentials),
            ("2a00:1450::1:8080", RejectReason::Malformed),
            ("[2a00:1450::1:8080", RejectReason::Malformed),
            ("http://1.2.3.4:80/path", RejectReason::InvalidPort),
            ("u:p@1.2.3.4:80:x:y", RejectReason::Malformed),
            // After an `@` that is no host:port, the reason is the URL form's.
            ("user:pass@999.1.1.1:80", RejectReason::InvalidIp),
            ("user:pass@1.2.3.4", RejectReason::InvalidPort),
            ("user:pass@host.example:80", RejectReason::Hostname),
            ("1.2.3.4:0:u:p@ss", RejectReason::InvalidPort),
        ];
        for (line, reason) in cases {
            assert_eq!(one(line), Err(reason), "{line}");
        }
        let long = format!("1.2.3.4:80 {}", "x".repeat(MAX_LINE_BYTES));
        let parsed = parse_list(&long, &PUBLIC);
        assert_eq!(parsed.first_rejects[0].reason, RejectReason::TooLong);
    }

    #[test]
    fn non_public_addresses_are_refused_unless_allowed() {
        let private = [
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.1.1",
            "172.16.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "192.168.0.1",
            "198.18.0.1",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12::1",
            "ff02::1",
            "2001:db8::1",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
            "::ffff:10.0.0.1",
            "3fff::1",
            "100::1",
        ];
        for text in private {
            let ip: IpAddr = text.parse().unwrap();
            assert!(!is_public(ip), "{text}");
        }
        for text in [
            "1.2.3.4",
            "8.8.8.8",
            "2a00:1450::1",
            "2002:808:808::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(text.parse().unwrap()), "{text}");
        }
        let allow = ParseOptions {
            allow_private_addresses: true,
            ..PUBLIC
        };
        let loopback = key(Protocol::Socks5, "127.0.0.1", 1080, None);
        assert_eq!(
            parse_line("socks5://127.0.0.1:1080", &allow),
            Ok(Some(loopback))
        );
    }

    #[test]
    fn list_counts_duplicates_rejects_and_lines() {
        let text = "\u{feff}# header\r\n1.2.3.4:80\r\n\r\nhttp://1.2.3.4:80\r\n\
            socks5://1.2.3.4:80\r\n1.2.3.4:80:user:secret1\r\nuser:secret2@1.2.3.4:80\r\n\
            bad line\r\n127.0.0.1:80\r\nx.y:80\r\n1.1.1.1:0\r\n1.1.1.1:1:u:topsecret\r\n\
            ftp://a\r\n5.6.7.8:1";
        let options = ParseOptions {
            default_protocol: Protocol::Http,
            allow_private_addresses: false,
        };
        let parsed = parse_list(text, &options);
        assert_eq!(parsed.lines, 14);
        assert_eq!(
            parsed.proxies,
            vec![
                key(Protocol::Http, "1.2.3.4", 80, None),
                key(Protocol::Socks5, "1.2.3.4", 80, None),
                key(Protocol::Http, "1.2.3.4", 80, Some(("user", "secret1"))),
                key(Protocol::Http, "1.1.1.1", 1, Some(("u", "topsecret"))),
                key(Protocol::Http, "5.6.7.8", 1, None),
            ]
        );
        assert_eq!(parsed.duplicates, 2);
        assert_eq!(parsed.rejected, 5);
        let reasons: Vec<(usize, RejectReason)> = parsed
            .first_rejects
            .iter()
            .map(|reject| (reject.line, reject.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (8, RejectReason::Malformed),
                (9, RejectReason::NotPublic),
                (10, RejectReason::Hostname),
                (11, RejectReason::InvalidPort),
                (13, RejectReason::UnknownScheme),
            ]
        );
    }

    #[test]
    fn reject_examples_hide_credentials_and_are_short() {
        let options = ParseOptions {
            default_protocol: Protocol::Http,
            allow_private_addresses: false,
        };
        let text = "http://user:hunter2@10.0.0.1:80 US\n10.0.0.1:80:user:hunter2\n\
            [::1]:80:user:hunter2\n";
        let parsed = parse_list(text, &options);
        let shown: Vec<&str> = parsed
            .first_rejects
            .iter()
            .map(|r| r.text.as_str())
            .collect();
        assert_eq!(
            shown,
            vec![
                "http://***@10.0.0.1:80 US",
                "10.0.0.1:80:***",
                "[::1]:80:***"
            ]
        );
        let long = format!("u:hunter2@10.0.0.1:80 {}", "é".repeat(500));
        let reject = &parse_list(&long, &options).first_rejects[0];
        assert!(reject.text.chars().count() <= MAX_REJECT_TEXT_CHARS);
        assert!(!reject.text.contains("hunter2"));
    }

    #[test]
    fn hash_collisions_lose_no_proxy() {
        let first = key(Protocol::Http, "1.2.3.4", 80, None);
        let second = key(Protocol::Http, "5.6.7.8", 80, None);
        let mut seen = SeenSet::new(0);
        let mut proxies = Vec::new();
        assert!(seen.is_new(&first, &proxies));
        proxies.push(first);
        // Force the second key's hash to point at the first key.
        let hash = seen
            .hasher
            .hash_one((second.protocol, second.ip, second.port, None::<&str>));
        seen.first_by_hash.insert(hash, 0);
        assert!(seen.is_new(&second, &proxies));
        proxies.push(second.clone());
        assert!(!seen.is_new(&second, &proxies));
        assert!(!seen.is_new(&proxies[0].clone(), &proxies));
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let bytes = b"1.2.3.4:80\n\xff\xfe:80\n5.6.7.8:80\n";
        let parsed = parse_bytes(bytes, &PUBLIC);
        assert_eq!(parsed.proxies.len(), 2);
        assert_eq!(parsed.rejected, 1);
    }

    #[test]
    #[ignore = "timing: run with --release"]
    fn a_million_lines_parse_in_under_a_second() {
        let mut text = String::new();
        for index in 0..1_000_000u32 {
            let [a, b, c, d] = index.to_be_bytes();
            text.push_str(&format!("{}.{b}.{c}.{d}:{}\n", a + 1, 1 + index % 60000));
        }
        let started = std::time::Instant::now();
        let parsed = parse_list(&text, &PUBLIC);
        let elapsed = started.elapsed();
        assert_eq!(parsed.proxies.len() + parsed.rejected, 1_000_000);
        assert!(elapsed < std::time::Duration::from_secs(1), "{elapsed:?}");
    }

    fn public_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
            any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from((n >> 3) | (1u128 << 125)))),
        ]
        .prop_filter("public addresses only", |ip| is_public(*ip))
    }

    fn proxy_key() -> impl Strategy<Value = ProxyKey> {
        (
            prop::sample::select(Protocol::ALL.to_vec()),
            public_ip(),
            1u16..,
            prop::option::of(("\\PC{1,12}", prop::option::of("\\PC{0,12}"))),
        )
            .prop_map(|(protocol, ip, port, credentials)| {
                let mut key = ProxyKey::new(protocol, ip, port);
                if let Some((user, password)) = credentials {
                    key.username = Some(user);
                    key.password = password;
                }
                key
            })
    }

    proptest! {
        #[test]
        fn generated_proxies_round_trip_through_their_url(key in proxy_key()) {
            prop_assert_eq!(one(&key.url()), Ok(Some(key.clone())));
            let line = format!(" {}\tUS elite", key.url());
            prop_assert_eq!(one(&line), Ok(Some(key)));
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC*(\n\\PC*){0,5}") {
            let parsed = parse_list(&text, &PUBLIC);
            prop_assert!(parsed.first_rejects.len() <= MAX_REJECT_EXAMPLES);
            prop_assert_eq!(parsed.lines, text.lines().count());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let parsed = parse_bytes(&bytes, &PUBLIC);
            prop_assert!(parsed.proxies.len() + parsed.rejected + parsed.duplicates <= parsed.lines);
        }

        #[test]
        fn valid_lines_survive_arbitrary_neighbours(
            key in proxy_key(),
            before in "[^\n]{0,40}",
            after in "[^\n]{0,40}",
        ) {
            let text = format!("{before}\n{}\n{after}\n", key.url());
            let parsed = parse_list(&text, &PUBLIC);
            prop_assert!(parsed.proxies.contains(&key));
        }

        #[test]
        fn structured_junk_never_panics(
            scheme in "(http|HTTPS|socks5h|ftp|)(://)?",
            userinfo in "([a-z%:@]{0,8}@)?",
            host in "(\\[[0-9a-f:.]{0,20}\\]|[0-9.]{0,16}|[a-z.]{0,10})",
            port in "(:[0-9]{0,7})?(:[a-z:]{0,6})?",
            tail in "([ ,;|\t].{0,10})?",
        ) {
            let line = format!("{scheme}{userinfo}{host}{port}{tail}");
            let _ = one(&line);
            let _ = masked_excerpt(&line);
        }
    }
}
