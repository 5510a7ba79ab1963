//! The line rules: one proxy a line, as text lists write it. They are also
//! the rules of every piece of another format that holds a proxy as text (a
//! JSON string, a CSV proxy cell, `host:port` in a page), and this file holds
//! the checks every format shares: address, port, credentials, public ranges.
//!
//! Accepted: `ip:port`, `scheme://ip:port`, `scheme://user:pass@ip:port`,
//! `user:pass@ip:port`, `ip:port:user:pass`, IPv6 as `[addr]:port`. Blank
//! lines and `#` or `//` comments are skipped. Anything after the proxy,
//! separated by whitespace, `,`, `;`, `|`, `=` or `:`, is a trailing field
//! and ignored (`1.2.3.4:8080 US elite`, `1.2.3.4:8080:US`): a line of exactly
//! three colon-separated fields is a proxy and a trailing field, never a
//! user name; four or more are `host:port:user:pass`, the password holding
//! any further colons. Credentials in URL forms are percent-decoded; in the
//! `ip:port:user:pass` form they are taken as written.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{is_public, Collector, ListFormat, ParseOptions, ParsedList, Position, RejectReason};
use crate::proxy::{Protocol, ProxyKey};

/// A line longer than this is rejected unread: no proxy line is that long.
pub const MAX_LINE_BYTES: usize = 4096;

/// A text list, line by line.
pub(super) fn parse(text: &str, options: &ParseOptions) -> ParsedList {
    let mut collector = Collector::new(ListFormat::Text, text.len() / 24);
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        let outcome = if line.len() > MAX_LINE_BYTES {
            Err(RejectReason::TooLong)
        } else {
            parse_line(line, options)
        };
        collector.outcome(Position::Line(lines), line, outcome);
    }
    collector.finish(lines)
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
    // while the whole is `host:port:...` with an `@` in a later field
    // (`1.2.3.4:80:u:p@ss`); then the `@` is part of that field.
    let url_form =
        at_sign
            .map(|at| (&rest[..at], &rest[at + 1..]))
            .and_then(|(userinfo, host_port)| match split_host_port(host_port) {
                // Whatever follows the port is a trailing field.
                Ok((ip, port, _)) => Some((userinfo, Ok((ip, port)))),
                Err(reason) => match split_host_port(rest) {
                    Ok(_) => None,
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
            let (ip, port, tail) = split_host_port(rest)?;
            let credentials = match tail {
                Tail::Credentials(user, password) => {
                    Some((user.to_string(), Some(password.to_string())))
                }
                Tail::Nothing | Tail::Field => None,
            };
            (ip, port, credentials)
        }
    };
    build_key(protocol, ip, port, credentials, options).map(Some)
}

/// The key of a proxy read in parts, with the checks every format applies:
/// IPv4-mapped addresses as IPv4, public ranges only (unless allowed), a
/// user name that is not empty.
pub(super) fn build_key(
    protocol: Protocol,
    ip: IpAddr,
    port: u16,
    credentials: Option<(String, Option<String>)>,
    options: &ParseOptions,
) -> Result<ProxyKey, RejectReason> {
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
    Ok(key)
}

/// The proxy part of a trimmed line, without trailing fields. `,` and `;`
/// may appear unencoded in URL credentials, so before the last `@` they do
/// not end the proxy.
pub(super) fn proxy_token(line: &str) -> &str {
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
pub(super) fn find_scheme_end(token: &str) -> Option<usize> {
    let bytes = token.as_bytes();
    // Schemes are short; a `://` further in is not a scheme separator we take.
    let search = &bytes[..bytes.len().min(16)];
    search.windows(3).position(|window| window == b"://")
}

/// What follows `host:port` in the colon form.
#[derive(Debug, PartialEq, Eq)]
enum Tail<'a> {
    /// Nothing, or a trailing field after `=`.
    Nothing,
    /// One more field (`1.2.3.4:8080:US`): a trailing field.
    Field,
    /// Two or more (`host:port:user:pass`, the password keeping any colons).
    Credentials(&'a str, &'a str),
}

/// Splits `ip:port`, `[v6]:port`, and what follows the port.
fn split_host_port(text: &str) -> Result<(IpAddr, u16, Tail<'_>), RejectReason> {
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
    let port_and_rest = after_host
        .strip_prefix(':')
        .ok_or(RejectReason::InvalidPort)?;
    let port_end = port_and_rest
        .bytes()
        .position(|b| b == b':' || b == b'=')
        .unwrap_or(port_and_rest.len());
    let port = parse_port(&port_and_rest[..port_end])?;
    let tail = match port_and_rest.as_bytes().get(port_end) {
        Some(b':') => match port_and_rest[port_end + 1..].split_once(':') {
            Some((user, password)) => Tail::Credentials(user, password),
            None => Tail::Field,
        },
        _ => Tail::Nothing,
    };
    Ok((host, port, tail))
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
    Err(not_an_address(host))
}

/// An address given alone (a JSON `ip`, a CSV or table cell): IPv4, IPv6
/// bare or bracketed. A separate port makes a bare IPv6 address unambiguous.
pub(super) fn parse_address(text: &str) -> Result<IpAddr, RejectReason> {
    let text = text.trim();
    let unbracketed = text
        .strip_prefix('[')
        .and_then(|inside| inside.strip_suffix(']'));
    if let Some(inside) = unbracketed {
        return inside
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| RejectReason::InvalidIp);
    }
    text.parse::<IpAddr>().map_err(|_| not_an_address(text))
}

/// Why `host` is not an address: a host name, or junk.
fn not_an_address(host: &str) -> RejectReason {
    let looks_like_name = !host.is_empty()
        && host.bytes().any(|b| b.is_ascii_alphabetic())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if looks_like_name {
        RejectReason::Hostname
    } else {
        RejectReason::InvalidIp
    }
}

pub(super) fn parse_port(text: &str) -> Result<u16, RejectReason> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RejectReason::InvalidPort);
    }
    match text.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        _ => Err(RejectReason::InvalidPort),
    }
}

/// The protocols a field names, added to `into` once each: `socks5`,
/// `HTTP, HTTPS`, `socks4/socks5`.
pub(super) fn parse_protocols(text: &str, into: &mut Vec<Protocol>) -> Result<(), RejectReason> {
    let names = text
        .split(|c: char| matches!(c, ',' | '/' | '|' | ';') || c.is_whitespace())
        .filter(|name| !name.is_empty());
    for name in names {
        let protocol = Protocol::from_scheme(name).ok_or(RejectReason::UnknownScheme)?;
        if !into.contains(&protocol) {
            into.push(protocol);
        }
    }
    Ok(())
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits is kept as
/// written (lists are sloppy), but the result must be UTF-8.
fn percent_decode(text: &str) -> Result<String, RejectReason> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| RejectReason::BadCredentials)
}

/// A rejected line for a diagnostic, credentials masked (the collector cuts
/// it to length).
pub(super) fn masked_excerpt(line: &str) -> String {
    let prefix_end = line
        .char_indices()
        .nth(super::MAX_REJECT_TEXT_CHARS)
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
            Some(at)
                if starts_with_ip(rest)
                    || rest.starts_with('[')
                    || rest.matches(':').count() <= 4 =>
            {
                format!("{scheme}{}:***", &rest[..at])
            }
            _ => token.to_string(),
        }
    };
    format!("{masked}{trailing}")
}

#[cfg(test)]
mod tests {
    use super::super::testing::{key as bare, with_credentials, PUBLIC};
    use super::*;

    #[test]
    fn three_colon_fields_are_a_proxy_and_a_trailing_field_never_a_user() {
        use Protocol::*;
        let user = |key, password| with_credentials(key, "user", Some(password));
        let cases = [
            ("1.2.3.4:8080:US", Ok(bare(Http, "1.2.3.4", 8080))),
            (
                "1.2.3.4:8080:United States",
                Ok(bare(Http, "1.2.3.4", 8080)),
            ),
            ("1.2.3.4:3128:3128", Ok(bare(Http, "1.2.3.4", 3128))),
            ("1.2.3.4:3128:", Ok(bare(Http, "1.2.3.4", 3128))),
            (
                "socks5://1.2.3.4:1080:DE",
                Ok(bare(Socks5, "1.2.3.4", 1080)),
            ),
            ("[2a00:1450::1]:80:NL", Ok(bare(Http, "2a00:1450::1", 80))),
            ("1.2.3.4:8080:us@er", Ok(bare(Http, "1.2.3.4", 8080))),
            // Four fields or more are credentials, as they always were.
            (
                "1.2.3.4:8080:user:pass",
                Ok(user(bare(Http, "1.2.3.4", 8080), "pass")),
            ),
            ("1.2.3.4:8080::pass", Err(RejectReason::BadCredentials)),
            // `=` ends the proxy, but not a password (base64 ends with it).
            ("1.2.3.4:8080=US", Ok(bare(Http, "1.2.3.4", 8080))),
            (
                "socks5://1.2.3.4:1080=fast",
                Ok(bare(Socks5, "1.2.3.4", 1080)),
            ),
            (
                "http://user:dG9r=@1.2.3.4:80=x",
                Ok(user(bare(Http, "1.2.3.4", 80), "dG9r=")),
            ),
            (
                "1.2.3.4:80:user:dG9r=",
                Ok(user(bare(Http, "1.2.3.4", 80), "dG9r=")),
            ),
            ("1.2.3.4:=80", Err(RejectReason::InvalidPort)),
        ];
        for (line, expected) in cases {
            assert_eq!(parse_line(line, &PUBLIC), expected.map(Some), "{line}");
        }
    }

    #[test]
    fn header_lines_are_rejected_not_errors() {
        for header in ["IP:PORT", "ip port country", "Proxy list updated daily"] {
            assert!(parse_line(header, &PUBLIC).is_err(), "{header}");
        }
        let parsed = super::super::parse_list("IP:PORT\n1.2.3.4:80\n", &PUBLIC);
        assert_eq!((parsed.proxies.len(), parsed.rejected), (1, 1));
    }

    #[test]
    fn addresses_given_alone_take_bare_ipv6_and_name_what_else_they_are() {
        assert_eq!(parse_address(" 1.2.3.4 "), Ok("1.2.3.4".parse().unwrap()));
        assert_eq!(
            parse_address("2a00:1450::1"),
            Ok("2a00:1450::1".parse().unwrap())
        );
        assert_eq!(
            parse_address("[2a00:1450::1]"),
            Ok("2a00:1450::1".parse().unwrap())
        );
        assert_eq!(parse_address("proxy.example"), Err(RejectReason::Hostname));
        assert_eq!(parse_address("999.1.1.1"), Err(RejectReason::InvalidIp));
        assert_eq!(parse_address("[zz]"), Err(RejectReason::InvalidIp));
        assert_eq!(parse_address(""), Err(RejectReason::InvalidIp));
    }

    #[test]
    fn protocol_fields_may_name_several() {
        let mut protocols = Vec::new();
        parse_protocols("HTTP, HTTPS", &mut protocols).unwrap();
        parse_protocols("socks4/socks5 http", &mut protocols).unwrap();
        assert_eq!(
            protocols,
            vec![
                Protocol::Http,
                Protocol::Https,
                Protocol::Socks4,
                Protocol::Socks5
            ]
        );
        assert_eq!(
            parse_protocols("ftp", &mut protocols),
            Err(RejectReason::UnknownScheme)
        );
    }

    #[test]
    fn passwords_of_many_colons_are_masked_in_examples() {
        assert_eq!(masked_excerpt("10.0.0.1:80:u:p:q:r"), "10.0.0.1:80:***");
    }
}
