//! The bodies of the farm's proxy lists, built as plain values so that their
//! content is testable without a server. Streamed lists (`huge`, `endless`,
//! `slow`) are described by a line generator rather than a body.

use std::fmt::Write as _;

use crate::manifest::ManifestEntry;

/// Every built-in list name, in the order the binary prints them.
pub const BUILT_IN: [&str; 15] = [
    "plain",
    "schemes",
    "junk",
    "huge",
    "slow",
    "hang",
    "error500",
    "html",
    "json-error",
    "ratelimit",
    "unavailable",
    "redirect-loop",
    "endless",
    "longline",
    "binary",
];

/// Size of the `longline` list's single line.
pub const LONGLINE_BYTES: usize = 10 * 1024 * 1024;
/// Size of the `binary` list.
pub const BINARY_BYTES: usize = 256 * 1024;

/// `ip:port` of every farm proxy, one a line.
pub fn plain(entries: &[ManifestEntry]) -> String {
    let mut body = String::with_capacity(entries.len() * 20);
    for entry in entries {
        body.push_str(&entry.host_port());
        body.push('\n');
    }
    body
}

/// `scheme://[user:pass@]ip:port` of every farm proxy, one a line.
pub fn schemes(entries: &[ManifestEntry]) -> String {
    let mut body = String::with_capacity(entries.len() * 32);
    for entry in entries {
        body.push_str(&entry.url());
        body.push('\n');
    }
    body
}

/// A hostile but parseable list: a BOM, CRLF line ends, comments, blank
/// lines, and junk between the farm's proxies. The valid lines are exactly
/// the farm's proxies (as URLs, or bare `ip:port` for plain http ones, some
/// with surrounding spaces); every other line must be rejected.
pub fn junk(entries: &[ManifestEntry]) -> String {
    const JUNK: [&str; 16] = [
        "# a comment line",
        "",
        "   ",
        "not a proxy",
        "999.1.1.1:8080",
        "127.1.2:8080",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:",
        ":8080",
        "ftp://127.0.0.1:21",
        "http://127.0.0.1:80abc",
        "<html><body>",
        // Not `ip:port:user:pass` with a colon in the password: the user is empty.
        "127.0.0.1:8080::fields:here",
        "\u{0}\u{1}binary\u{7f}",
    ];
    let mut body = String::from("\u{feff}");
    for (i, entry) in entries.iter().enumerate() {
        let _ = write!(body, "{}\r\n", JUNK[i % JUNK.len()]);
        let line =
            if entry.protocol == proxy_pool::proxy::Protocol::Http && entry.username.is_none() {
                entry.host_port()
            } else {
                entry.url()
            };
        match i % 3 {
            0 => body.push_str(&line),
            1 => {
                let _ = write!(body, "  {line}\t");
            }
            _ => {
                let _ = write!(body, "{line}   # trailing comment");
            }
        }
        body.push_str(if i % 2 == 0 { "\r\n" } else { "\n" });
    }
    for junk in JUNK {
        let _ = write!(body, "{junk}\r\n");
    }
    body
}

/// The `n`th generated line of the streamed lists: an `ip:port` in
/// 127.200.0.0-127.255.255.255, far from the farm's own proxies, so that a
/// validator checking them only meets refused loopback connections.
pub fn generated_line(n: u64) -> String {
    let address = n % (56 * 65536);
    let second = 200 + address / 65536;
    let third = (address / 256) % 256;
    let fourth = address % 256;
    let port = 1024 + (n % 60_000);
    format!("127.{second}.{third}.{fourth}:{port}\n")
}

/// The `html` list: a 200 page that is not a list (its table has no
/// proxy: a page with one is a list).
pub fn html_page() -> &'static str {
    "<!DOCTYPE html>\n<html><head><title>Free Proxy List</title></head>\n\
     <body><h1>Free proxies</h1><p>Please enable JavaScript to see the list.</p>\n\
     <table><tr><th>IP Address</th><th>Port</th></tr><tr><td>-</td><td>-</td></tr></table>\n\
     <p>Updated 12:30</p></body></html>\n"
}

/// The `json-error` list: a 200 answer that is an API's JSON error, not a list.
pub fn json_error_page() -> &'static str {
    "{\"error\": \"rate limit exceeded\", \"code\": 429, \"proxies\": []}\n"
}

/// How long the `unavailable` list (503) asks clients to wait, as an
/// HTTP-date this far ahead (whole seconds, so the wait a client computes is
/// between this less one second and this).
pub const UNAVAILABLE_RETRY_AFTER_SECONDS: u64 = 3;

/// The `binary` list: reproducible random bytes.
pub fn binary(seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..BINARY_BYTES).map(|_| rng.u8(..)).collect()
}

/// A weak ETag for a body (FNV-1a, which is stable across runs and builds).
pub fn etag(body: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in body {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("\"{hash:016x}-{}\"", body.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Behaviour, Credentials};
    use proxy_pool::proxy::Protocol;

    fn entries() -> Vec<ManifestEntry> {
        let creds = Credentials::new("u", "p");
        vec![
            ManifestEntry::new(
                0,
                Protocol::Http,
                "127.1.0.1".parse().unwrap(),
                1000,
                Behaviour::Elite,
                false,
                None,
            ),
            ManifestEntry::new(
                1,
                Protocol::Socks5,
                "127.1.0.2".parse().unwrap(),
                1001,
                Behaviour::Socks5,
                false,
                Some(&creds),
            ),
        ]
    }

    #[test]
    fn plain_and_schemes_list_every_proxy() {
        assert_eq!(plain(&entries()), "127.1.0.1:1000\n127.1.0.2:1001\n");
        assert_eq!(
            schemes(&entries()),
            "http://127.1.0.1:1000\nsocks5://u:p@127.1.0.2:1001\n"
        );
    }

    #[test]
    fn junk_starts_with_a_bom_and_contains_every_proxy() {
        let body = junk(&entries());
        assert!(body.starts_with('\u{feff}'));
        assert!(body.contains("\r\n"));
        assert!(body.contains("127.1.0.1:1000"));
        assert!(body.contains("socks5://u:p@127.1.0.2:1001"));
        assert!(body.contains("999.1.1.1:8080"));
    }

    #[test]
    fn generated_lines_stay_in_the_high_loopback_range() {
        for n in [0, 1, 255, 65_535, 65_536, 3_670_015, 3_670_016, u64::MAX] {
            let line = generated_line(n);
            let (host, port) = line.trim_end().rsplit_once(':').unwrap();
            let ip: std::net::Ipv4Addr = host.parse().unwrap();
            assert_eq!(ip.octets()[0], 127, "{line}");
            assert!(ip.octets()[1] >= 200, "{line}");
            assert!(port.parse::<u16>().unwrap() >= 1024);
        }
    }

    #[test]
    fn etag_changes_with_the_body() {
        assert_eq!(etag(b"a"), etag(b"a"));
        assert_ne!(etag(b"a"), etag(b"b"));
        assert!(etag(b"").starts_with('"'));
    }
}
