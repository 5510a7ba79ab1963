//! Turning a downloaded proxy list into proxy keys. Shared by the fetcher and
//! `proxy-pool import`, pure, and hardened: lists are written by strangers,
//! in every format, and some are hostile (aimed at internal addresses).
//!
//! The format is told from the body ([`ListFormat`]): a page (`<`), a JSON
//! document (`[` or `{`), JSON lines (an object a line), CSV or TSV (a first
//! line that names columns), else text. Each format has its own module; all
//! read a proxy written as text by the line rules of [`text`], a proxy given
//! in parts by the rules of [`fields`], and count through one [`Collector`],
//! so that every format reports the same counts.

mod delimited;
mod fields;
mod html;
mod json;
mod text;

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr};

use crate::proxy::{Protocol, ProxyKey};

use self::fields::Fields;
pub use self::text::{parse_line, MAX_LINE_BYTES};

/// How many rejected lines are kept as examples.
const MAX_REJECT_EXAMPLES: usize = 5;
/// How much of a rejected line an example keeps.
const MAX_REJECT_TEXT_CHARS: usize = 100;
/// How far into a body a NUL byte makes it binary.
const BINARY_SNIFF_BYTES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseOptions {
    /// The protocol of lines that name none (`1.2.3.4:8080`).
    pub default_protocol: Protocol,
    /// Accept loopback, private, link-local, reserved and multicast addresses.
    /// Off in production: a hostile list must not aim the validator at
    /// internal hosts.
    pub allow_private_addresses: bool,
}

/// The shape a list was written in, as told from its body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ListFormat {
    /// One proxy a line.
    #[default]
    Text,
    /// One JSON document: an array of entries, or an object holding arrays.
    Json,
    /// One JSON value a line.
    JsonLines,
    /// Rows of cells under a header row that names the columns.
    Csv,
    /// A web page: table rows and `host:port` text.
    Html,
}

impl ListFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ListFormat::Text => "text",
            ListFormat::Json => "json",
            ListFormat::JsonLines => "json lines",
            ListFormat::Csv => "csv",
            ListFormat::Html => "html",
        }
    }

    /// What [`ParsedList::lines`] counts: a JSON document's entries, or lines.
    pub fn unit(self) -> &'static str {
        match self {
            ListFormat::Json => "entries",
            _ => "lines",
        }
    }
}

impl fmt::Display for ListFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a list held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedList {
    pub format: ListFormat,
    /// Distinct proxies, in order of first appearance.
    pub proxies: Vec<ProxyKey>,
    /// Every line of the input, blank and comment lines included; for a
    /// JSON document, every entry.
    pub lines: usize,
    /// Lines, entries, cells or table rows that named a proxy but were
    /// refused (one JSON object with two protocols may count twice).
    pub rejected: usize,
    /// Proxies named again after their first appearance (same protocol,
    /// address, port and username).
    pub duplicates: usize,
    /// The first few rejected ones, for a diagnostic message.
    pub first_rejects: Vec<Reject>,
    /// A NUL byte near the start: the body is no text.
    pub binary: bool,
}

impl ParsedList {
    /// Why the body is not a proxy list, if it is not: no proxy could be
    /// read from it, and it is binary, a page or JSON. A text list with no
    /// proxy (`# empty today`) is an empty list.
    pub fn not_a_list(&self) -> Option<&'static str> {
        if !self.proxies.is_empty() {
            return None;
        }
        if self.binary {
            return Some("not a proxy list: the body is binary");
        }
        match self.format {
            ListFormat::Html => Some("not a proxy list: the body is an HTML page"),
            ListFormat::Json | ListFormat::JsonLines => Some("not a proxy list: the body is JSON"),
            ListFormat::Text | ListFormat::Csv => None,
        }
    }
}

/// Where in a list something is: lines, or a JSON document's entries (1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    Line(usize),
    Entry(usize),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Line(n) => write!(f, "line {n}"),
            Position::Entry(n) => write!(f, "entry {n}"),
        }
    }
}

/// One rejected line or entry, safe to log: credentials are masked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    pub at: Position,
    pub text: String,
    pub reason: RejectReason,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rejected ({}): {}", self.at, self.reason, self.text)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not an IP address (`999.1.1.1`, `1.2.3`).
    InvalidIp,
    /// Missing, not a number, or outside 1..65535.
    InvalidPort,
    /// A scheme or protocol that is none of http, https, socks4, socks5.
    UnknownScheme,
    /// A host name: we only take IP literals, so that a list cannot make the
    /// validator resolve names of its choosing.
    Hostname,
    /// Loopback, private, link-local, reserved, multicast, documentation
    /// and the like, while `allow_private_addresses` is off.
    NotPublic,
    /// Empty user name, or credentials that do not decode to UTF-8.
    BadCredentials,
    /// Longer than [`MAX_LINE_BYTES`] (a line) or than a JSON entry may be.
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
    parse_body(bytes, false, options)
}

/// Parses a download that may have been cut at `max_bytes` (`truncated`):
/// then the cut line of a line format is dropped, and a JSON document is
/// read up to the cut.
pub fn parse_body(bytes: &[u8], truncated: bool, options: &ParseOptions) -> ParsedList {
    parse(&String::from_utf8_lossy(bytes), truncated, options)
}

/// Parses a whole list. Never fails: what cannot be read is counted.
pub fn parse_list(text: &str, options: &ParseOptions) -> ParsedList {
    parse(text, false, options)
}

fn parse(text: &str, truncated: bool, options: &ParseOptions) -> ParsedList {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let sniffed = &text.as_bytes()[..text.len().min(BINARY_SNIFF_BYTES)];
    let binary = sniffed.contains(&0);
    let format = if binary {
        ListFormat::Text
    } else {
        detect(text)
    };
    let text = match format {
        ListFormat::Json => text,
        _ if truncated => &text[..text.rfind('\n').map_or(0, |at| at + 1)],
        _ => text,
    };
    let mut parsed = match format {
        ListFormat::Text => text::parse(text, options),
        ListFormat::Json => json::parse_document(text, truncated, options),
        ListFormat::JsonLines => json::parse_lines(text, options),
        ListFormat::Csv => delimited::parse(text, options),
        ListFormat::Html => html::parse(text, options),
    };
    parsed.binary = binary;
    parsed
}

/// Tells a body's format from its start (and, for CSV, its first line).
fn detect(text: &str) -> ListFormat {
    // A byte order mark is not the body's first character (parse drops it too).
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let bytes = text.as_bytes();
    let Some(start) = bytes.iter().position(|b| !b.is_ascii_whitespace()) else {
        return ListFormat::Text;
    };
    match bytes[start] {
        b'<' => ListFormat::Html,
        b'{' if json::is_json_lines(&text[start..]) => ListFormat::JsonLines,
        b'{' => ListFormat::Json,
        // `[` alone is no sign: an IPv6 list starts with `[2001:db8::1]:80`.
        b'[' => match bytes[start + 1..].iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{' | b'"' | b'[' | b']') | None => ListFormat::Json,
            Some(_) => ListFormat::Text,
        },
        _ if delimited::find_header(text).is_some() => ListFormat::Csv,
        _ => ListFormat::Text,
    }
}

/// Counts what a list gives, whatever its format: distinct proxies, duplicates,
/// rejects with the first few kept (masked, short).
struct Collector {
    parsed: ParsedList,
    seen: SeenSet,
}

impl Collector {
    fn new(format: ListFormat, capacity_hint: usize) -> Collector {
        Collector {
            parsed: ParsedList {
                format,
                ..ParsedList::default()
            },
            seen: SeenSet::new(capacity_hint),
        }
    }

    fn add(&mut self, key: ProxyKey) {
        if self.seen.is_new(&key, &self.parsed.proxies) {
            self.parsed.proxies.push(key);
        } else {
            self.parsed.duplicates += 1;
        }
    }

    /// Counts a reject; `text` (masked by the caller) is built only for the
    /// examples kept.
    fn reject(&mut self, at: Position, reason: RejectReason, text: impl FnOnce() -> String) {
        self.parsed.rejected += 1;
        if self.parsed.first_rejects.len() < MAX_REJECT_EXAMPLES {
            let text = text();
            let cut = text
                .char_indices()
                .nth(MAX_REJECT_TEXT_CHARS)
                .map_or(text.len(), |(at, _)| at);
            self.parsed.first_rejects.push(Reject {
                at,
                text: text[..cut].to_string(),
                reason,
            });
        }
    }

    /// A text line's outcome; `line` is shown masked when rejected.
    fn outcome(
        &mut self,
        at: Position,
        line: &str,
        outcome: Result<Option<ProxyKey>, RejectReason>,
    ) {
        match outcome {
            Ok(None) => {}
            Ok(Some(key)) => self.add(key),
            Err(reason) => self.reject(at, reason, || text::masked_excerpt(line)),
        }
    }

    /// The proxies that fields give (one per protocol), or their reject.
    fn fields(&mut self, at: Position, fields: &Fields<'_>, options: &ParseOptions) {
        match fields.keys(options) {
            Ok(keys) => keys.into_iter().for_each(|key| self.add(key)),
            Err(reason) => self.reject(at, reason, || fields.excerpt()),
        }
    }

    fn finish(mut self, lines: usize) -> ParsedList {
        self.parsed.lines = lines;
        self.parsed
    }
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

/// What the formats' tests share.
#[cfg(test)]
mod testing {
    use super::{ListFormat, ParseOptions, ParsedList};
    use crate::proxy::{Protocol, ProxyKey};

    pub const PUBLIC: ParseOptions = ParseOptions {
        default_protocol: Protocol::Http,
        allow_private_addresses: false,
    };

    pub fn key(protocol: Protocol, ip: &str, port: u16) -> ProxyKey {
        ProxyKey::new(protocol, ip.parse().unwrap(), port)
    }

    pub fn with_credentials(mut key: ProxyKey, user: &str, password: Option<&str>) -> ProxyKey {
        key.username = Some(user.to_string());
        key.password = password.map(str::to_string);
        key
    }

    /// The first rejects as the log shows them.
    pub fn rejects(parsed: &ParsedList) -> Vec<String> {
        parsed.first_rejects.iter().map(|r| r.to_string()).collect()
    }

    /// Parses `text` and checks all it gives: its format, its proxies in
    /// order, its lines (or entries) and every reject as the log shows it.
    pub fn assert_parsed(
        text: &str,
        format: ListFormat,
        proxies: Vec<ProxyKey>,
        lines: usize,
        expected_rejects: &[&str],
    ) -> ParsedList {
        let parsed = super::parse_list(text, &PUBLIC);
        assert_eq!(parsed.format, format, "{text}");
        assert_eq!(parsed.proxies, proxies, "{text}");
        assert_eq!(parsed.lines, lines, "{text}");
        assert_eq!(rejects(&parsed), expected_rejects, "{text}");
        assert_eq!(parsed.rejected, expected_rejects.len(), "{text}");
        parsed
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use std::net::Ipv6Addr;

    use super::text::masked_excerpt;
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
            // After a URL form's port, `:` starts trailing fields too.
            (
                "u:p@1.2.3.4:80:x:y",
                key(Protocol::Http, "1.2.3.4", 80, Some(("u", "p"))),
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
        let reasons: Vec<(Position, RejectReason)> = parsed
            .first_rejects
            .iter()
            .map(|reject| (reject.at, reject.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (Position::Line(8), RejectReason::Malformed),
                (Position::Line(9), RejectReason::NotPublic),
                (Position::Line(10), RejectReason::Hostname),
                (Position::Line(11), RejectReason::InvalidPort),
                (Position::Line(13), RejectReason::UnknownScheme),
            ]
        );
        assert_eq!(
            parsed.first_rejects[0].to_string(),
            "line 8 rejected (malformed): bad line"
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

    #[test]
    fn the_format_is_told_from_the_body() {
        let cases = [
            ("1.2.3.4:80\n", ListFormat::Text),
            ("", ListFormat::Text),
            ("[2001:db8::1]:80\n[2001:db8::2]:8080\n", ListFormat::Text),
            ("[::1]:80", ListFormat::Text),
            ("[zz]:1", ListFormat::Text),
            ("# ip,port\n1.2.3.4:80,US\n", ListFormat::Text),
            ("IP:PORT\n1.2.3.4:80\n", ListFormat::Text),
            ("1.2.3.4:8080,US,elite\n", ListFormat::Text),
            ("[\"1.2.3.4:80\"]", ListFormat::Json),
            ("[ \n  {\"ip\": \"1.2.3.4\"}]", ListFormat::Json),
            ("[]", ListFormat::Json),
            ("[ ]", ListFormat::Json),
            ("\n{\"error\": \"forbidden\"}", ListFormat::Json),
            ("{\n  \"data\": []\n}\n", ListFormat::Json),
            ("{\"data\": []}\n", ListFormat::Json),
            (
                "{\"host\": \"1.2.3.4\"}\n{\"host\": \"5.6.7.8\"}\n",
                ListFormat::JsonLines,
            ),
            ("ip,port\n1.2.3.4,80\n", ListFormat::Csv),
            ("\"IP Address\";\"Port\"\n", ListFormat::Csv),
            ("# list\nhttp\tsocks5\n", ListFormat::Csv),
            ("<!DOCTYPE html><html>", ListFormat::Html),
            ("  <table>", ListFormat::Html),
            ("\u{feff}<p>", ListFormat::Html),
        ];
        for (body, format) in cases {
            assert_eq!(parse_list(body, &PUBLIC).format, format, "{body:?}");
        }
    }

    #[test]
    fn a_body_is_no_list_only_when_it_gives_no_proxy() {
        let not_a_list = |body: &[u8]| parse_bytes(body, &PUBLIC).not_a_list();
        assert_eq!(
            not_a_list(b"  <!DOCTYPE html><html><p>enable JavaScript</p>"),
            Some("not a proxy list: the body is an HTML page")
        );
        assert_eq!(
            not_a_list(b"{\"error\":\"rate limited\", \"proxies\": []}"),
            Some("not a proxy list: the body is JSON")
        );
        assert_eq!(
            not_a_list(b"[]"),
            Some("not a proxy list: the body is JSON")
        );
        assert_eq!(
            not_a_list(b"\x00\x01\x02"),
            Some("not a proxy list: the body is binary")
        );
        // A page or JSON that gives a proxy is a list.
        assert_eq!(not_a_list(b"<html> 1.2.3.4:80"), None);
        assert_eq!(not_a_list(b"[\"1.2.3.4:80\"]"), None);
        // An empty or all-junk text list is an empty list, not an error.
        assert_eq!(not_a_list(b"# empty list\n"), None);
        assert_eq!(not_a_list(b"[2001:db8::1]:80\n"), None);
        assert_eq!(not_a_list(b"ip,port\n"), None);
    }

    #[test]
    fn a_cut_download_drops_its_cut_line_and_keeps_a_cut_documents_entries() {
        let text = b"1.2.3.4:80\n5.6.7.8:80\n9.9.9.9:8";
        let cut = parse_body(text, true, &PUBLIC);
        assert_eq!((cut.lines, cut.proxies.len(), cut.rejected), (2, 2, 0));
        let whole = parse_body(text, false, &PUBLIC);
        assert_eq!((whole.lines, whole.proxies.len()), (3, 3));

        let json = br#"[{"ip": "1.2.3.4", "port": 80}, {"ip": "5.6.7.8", "port": 80}, {"ip": "9.9"#;
        let cut = parse_body(json, true, &PUBLIC);
        assert_eq!((cut.lines, cut.proxies.len(), cut.rejected), (2, 2, 0));
        // Not cut by the download: the list itself is broken there.
        let broken = parse_body(json, false, &PUBLIC);
        assert_eq!(
            (broken.lines, broken.proxies.len(), broken.rejected),
            (3, 2, 1)
        );
        assert_eq!(broken.first_rejects[0].at, Position::Entry(3));
        assert!(broken.first_rejects[0]
            .text
            .starts_with("invalid JSON: EOF"));
    }

    #[test]
    fn every_format_counts_duplicates_across_its_entries() {
        let json =
            r#"["1.2.3.4:80", {"ip": "1.2.3.4", "port": "80"}, {"proxy": "socks5://1.2.3.4:80"}]"#;
        let parsed = parse_list(json, &PUBLIC);
        assert_eq!((parsed.proxies.len(), parsed.duplicates), (2, 1));
        let csv = "ip,port\n1.2.3.4,80\n1.2.3.4,80\n";
        assert_eq!(parse_list(csv, &PUBLIC).duplicates, 1);
        let html = "<table><tr><td>1.2.3.4</td><td>80</td></tr></table><p>1.2.3.4:80</p>";
        assert_eq!(parse_list(html, &PUBLIC).duplicates, 1);
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
            if parsed.format != ListFormat::Json {
                prop_assert_eq!(parsed.lines, text.lines().count());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
            truncated in any::<bool>(),
        ) {
            let parsed = parse_body(&bytes, truncated, &PUBLIC);
            // A text line gives at most one proxy (a row or an object may give several).
            if parsed.format == ListFormat::Text {
                prop_assert!(parsed.proxies.len() + parsed.rejected + parsed.duplicates <= parsed.lines);
            }
        }

        #[test]
        fn formatted_junk_never_panics(
            start in "(\\[|\\{|<|ip,port\n|\\{\"a\":1\\}\n)",
            body in "[\\[\\]{}<>/\":,.0-9a-z \n&;#=]{0,200}",
            truncated in any::<bool>(),
        ) {
            let text = format!("{start}{body}");
            let parsed = parse_body(text.as_bytes(), truncated, &PUBLIC);
            prop_assert!(parsed.first_rejects.len() <= MAX_REJECT_EXAMPLES);
            // Whatever the format, the public-address rule holds.
            prop_assert!(parsed.proxies.iter().all(|key| is_public(key.ip)));
        }

        /// Regression: a first line of a byte order mark and `<` was told
        /// as text by `detect` and parsed as HTML.
        #[test]
        fn valid_lines_survive_arbitrary_neighbours(
            key in proxy_key(),
            before in "[^\n]{0,40}",
            after in "[^\n]{0,40}",
        ) {
            let text = format!("{before}\n{}\n{after}\n", key.url());
            // The property is a text list's: a first line may make it another format.
            prop_assume!(detect(&text) == ListFormat::Text);
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
