//! Reading the judge's answer: whether a check's response proves the proxy
//! alive, and what the judge's echo reveals about the proxy's anonymity.
//! Pure functions over bytes, so every header case is tested without sockets.

use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

use crate::proxy::Anonymity;

/// Why a check found a proxy dead. A dead proxy is data, not an error: the
/// reason feeds statistics through [`DeadReason::as_str`]. Each names the
/// step that failed: the TCP connect, the tunnel's handshake, the answer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeadReason {
    /// The proxy's port refused the connection.
    Refused,
    /// No TCP connection within `connect_timeout`.
    ConnectTimeout,
    /// Connected, but the SOCKS reply did not come within the request's
    /// deadline (a SOCKS check against a port that speaks something else).
    HandshakeTimeout,
    /// Connected, but the whole answer did not arrive within the check's deadline.
    Timeout,
    /// The connection was reset or closed before a complete answer.
    Reset,
    /// The proxy's address cannot be reached at all (no route, network down).
    Unreachable,
    /// 407: the proxy wants credentials we do not have or that it rejected.
    ProxyAuthRequired,
    /// Any status but 200 (and 407).
    BadStatus(u16),
    /// A 200 whose body is not the judge's echo: a hijacking or caching proxy.
    NotJudge,
    /// The answer is not HTTP at all, or its framing is broken.
    Garbage,
    /// The head or the body is over its byte cap.
    TooLarge,
    /// A SOCKS handshake failed; the text says how.
    Socks(String),
    /// A CONNECT tunnel was refused or failed; the text says how.
    Tunnel(String),
    /// Any other I/O failure; the text names it.
    Io(String),
}

impl DeadReason {
    /// A stable short name, for counters and the `stats` endpoint.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeadReason::Refused => "refused",
            DeadReason::ConnectTimeout => "connect_timeout",
            DeadReason::HandshakeTimeout => "handshake_timeout",
            DeadReason::Timeout => "timeout",
            DeadReason::Reset => "reset",
            DeadReason::Unreachable => "unreachable",
            DeadReason::ProxyAuthRequired => "proxy_auth_required",
            DeadReason::BadStatus(_) => "bad_status",
            DeadReason::NotJudge => "not_judge",
            DeadReason::Garbage => "garbage",
            DeadReason::TooLarge => "too_large",
            DeadReason::Socks(_) => "socks",
            DeadReason::Tunnel(_) => "tunnel",
            DeadReason::Io(_) => "io",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadReason::BadStatus(status) => write!(f, "bad_status {status}"),
            DeadReason::Socks(detail) | DeadReason::Tunnel(detail) | DeadReason::Io(detail) => {
                write!(f, "{}: {detail}", self.as_str())
            }
            _ => f.write_str(self.as_str()),
        }
    }
}

/// What the judge must echo for an answer to count as its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JudgeExpectations {
    /// A per-check query argument `(name, value)` the judge must echo in
    /// `args`. A proxy replaying a cached or canned judge page cannot know it.
    pub nonce: Option<(String, String)>,
}

/// The judge's view of one request, as its echo reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JudgeView {
    /// The `origin` field as sent, possibly a list (`"a, b"`).
    pub origin: String,
    /// Every entry of `origin`, in order, `None` where an entry is not an
    /// address (squid's `unknown`, `_hidden`); never empty.
    pub origin_entries: Vec<Option<IpAddr>>,
    /// The request headers the judge received, names as it spelled them.
    pub headers: Vec<(String, String)>,
    pub url: String,
}

impl JudgeView {
    /// The addresses of `origin`, in order.
    pub fn origin_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.origin_entries.iter().flatten().copied()
    }

    /// The judge's TCP peer, where the request left the proxy: origin's
    /// last entry (httpbin puts a forwarded value first and, behind a load
    /// balancer, the peer last). `None` when that entry is our own address
    /// or not an address: a transparent proxy forwarding ours to a bare
    /// httpbin shows no peer at all. Never a forwarded value.
    pub fn exit_ip(&self, own_ip: IpAddr) -> Option<IpAddr> {
        let last = (*self.origin_entries.last()?)?;
        (last != own_ip).then_some(last)
    }

    /// The address the judge saw a direct request come from: origin's
    /// first address (`None` when it shows none).
    pub fn first_ip(&self) -> Option<IpAddr> {
        self.origin_ips().next()
    }
}

/// Headers only a proxy adds to a request (lower case). Their presence without
/// our own address makes a proxy `anonymous` rather than `elite`.
const PROXY_HEADERS: &[&str] = &[
    "via",
    "x-forwarded-for",
    "forwarded",
    "forwarded-for",
    "x-forwarded",
    "x-forwarded-host",
    "x-forwarded-server",
    "x-real-ip",
    "client-ip",
    "x-client-ip",
    "true-client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "x-proxy-id",
    "x-proxy-connection",
    "proxy-connection",
    "x-bluecoat-via",
    "x-cluster-client-ip",
];

/// Decides whether a check's answer is the judge's echo. `Err` is the reason
/// the proxy counts as dead. Only the status and the body matter: a proxy may
/// rewrite response headers freely, the judge's JSON is what it cannot fake
/// (the nonce sees to that).
pub fn classify(
    status: u16,
    body: &[u8],
    expect: &JudgeExpectations,
) -> Result<JudgeView, DeadReason> {
    match status {
        200 => {}
        407 => return Err(DeadReason::ProxyAuthRequired),
        other => return Err(DeadReason::BadStatus(other)),
    }
    let Ok(Value::Object(echo)) = serde_json::from_slice::<Value>(body) else {
        return Err(DeadReason::NotJudge);
    };
    let (Some(Value::Object(header_map)), Some(Value::String(origin)), Some(Value::String(url))) =
        (echo.get("headers"), echo.get("origin"), echo.get("url"))
    else {
        return Err(DeadReason::NotJudge);
    };
    if let Some((name, value)) = &expect.nonce {
        let echoed = echo
            .get("args")
            .and_then(|args| args.get(name.as_str()))
            .and_then(Value::as_str);
        if echoed != Some(value.as_str()) {
            return Err(DeadReason::NotJudge);
        }
    }
    // An entry that is not an address is what a proxy put in a forwarded
    // header (`X-Forwarded-For: unknown`), which httpbin copies: evidence
    // about the proxy, not a sign that someone else answered (the nonce
    // decides that). An origin without any entry is no judge's.
    if origin.trim().is_empty() {
        return Err(DeadReason::NotJudge);
    }
    let origin_entries: Vec<Option<IpAddr>> = origin
        .split(',')
        .map(|part| parse_ip_token(part.trim()))
        .collect();
    let mut headers = Vec::with_capacity(header_map.len());
    for (name, value) in header_map {
        match value {
            Value::String(text) => headers.push((name.clone(), text.clone())),
            // Some echoes list a repeated header's values.
            Value::Array(items) => {
                for item in items {
                    let Value::String(text) = item else {
                        return Err(DeadReason::NotJudge);
                    };
                    headers.push((name.clone(), text.clone()));
                }
            }
            _ => return Err(DeadReason::NotJudge),
        }
    }
    Ok(JudgeView {
        origin: origin.clone(),
        origin_entries,
        headers,
        url: url.clone(),
    })
}

/// Grades a live proxy's anonymity from the judge's view and our own public
/// address. The evidence lists what gave the proxy away (`"Via: 1.1 squid"`),
/// empty for an elite proxy.
pub fn anonymity(view: &JudgeView, own_ip: IpAddr) -> (Anonymity, Vec<String>) {
    let mut leaks = Vec::new();
    if view.origin_ips().any(|ip| ip == own_ip) {
        leaks.push(format!("origin: {}", view.origin));
    }
    // Any header carrying our address betrays us, whatever its name: some
    // proxies invent their own (`X-ProxyUser-Ip`). `Host` is the exception:
    // it names the judge, which is our own address when the service is its
    // own judge (or both sit on one loopback address).
    for (name, value) in &view.headers {
        if !name.eq_ignore_ascii_case("host") && mentions_ip(value, own_ip) {
            leaks.push(format!("{name}: {value}"));
        }
    }
    if !leaks.is_empty() {
        return (Anonymity::Transparent, leaks);
    }
    let mut hints = Vec::new();
    // httpbin folds X-Forwarded-For into origin, so a list there means a
    // proxy announced a client even when the header itself is not echoed,
    // and so does an entry that is no address (`unknown`).
    if view.origin_entries.len() > 1 || view.origin_entries.iter().any(Option::is_none) {
        hints.push(format!("origin: {}", view.origin));
    }
    for (name, value) in &view.headers {
        let lower = name.to_ascii_lowercase();
        if PROXY_HEADERS.contains(&lower.as_str()) {
            hints.push(format!("{name}: {value}"));
        }
    }
    if hints.is_empty() {
        (Anonymity::Elite, hints)
    } else {
        (Anonymity::Anonymous, hints)
    }
}

/// Whether a header value names `ip`, in any of the shapes proxies use:
/// `a, b`, `for=1.2.3.4;proto=http`, `for="[2001:db8::1]:4711"`, `1.1 1.2.3.4:3128 (squid)`.
fn mentions_ip(value: &str, ip: IpAddr) -> bool {
    value
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '=' | '"' | '(' | ')'))
        .filter(|token| !token.is_empty())
        .any(|token| parse_ip_token(token) == Some(ip))
}

/// Parses an address possibly with a port or brackets: `1.2.3.4`,
/// `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`. IPv4-mapped IPv6
/// addresses are unwrapped so that `::ffff:1.2.3.4` matches `1.2.3.4`.
fn parse_ip_token(token: &str) -> Option<IpAddr> {
    let ip = if let Ok(ip) = token.parse::<IpAddr>() {
        ip
    } else if let Some(rest) = token.strip_prefix('[') {
        let end = rest.find(']')?;
        rest[..end].parse::<IpAddr>().ok()?
    } else {
        let (host, port) = token.rsplit_once(':')?;
        port.parse::<u16>().ok()?;
        host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)?
    };
    Some(match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "203.0.113.7";

    fn own() -> IpAddr {
        OWN.parse().unwrap()
    }

    fn echo(origin: &str, headers: &[(&str, &str)]) -> Vec<u8> {
        let map: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), Value::String(v.to_string())))
            .collect();
        serde_json::json!({
            "args": {"pp": "n1"},
            "headers": map,
            "origin": origin,
            "url": "http://judge/get?pp=n1",
        })
        .to_string()
        .into_bytes()
    }

    fn expect() -> JudgeExpectations {
        JudgeExpectations {
            nonce: Some(("pp".into(), "n1".into())),
        }
    }

    fn grade(origin: &str, headers: &[(&str, &str)]) -> (Anonymity, Vec<String>) {
        let view = classify(200, &echo(origin, headers), &expect()).expect("judge answer");
        anonymity(&view, own())
    }

    #[test]
    fn clean_echo_from_another_address_is_elite() {
        let (grade, evidence) = grade("198.51.100.9", &[("Host", "judge"), ("User-Agent", "x")]);
        assert_eq!(grade, Anonymity::Elite);
        assert!(evidence.is_empty());
    }

    #[test]
    fn host_naming_our_own_address_is_not_a_leak() {
        // The service judging itself (or judge and validator on one
        // loopback address): the Host header names the judge, not a client.
        let host = format!("{OWN}:8080");
        let (grade, evidence) = grade("198.51.100.9", &[("Host", &host)]);
        assert_eq!(grade, Anonymity::Elite, "{evidence:?}");
    }

    #[test]
    fn own_ip_in_origin_is_transparent() {
        assert_eq!(grade(OWN, &[]).0, Anonymity::Transparent);
        assert_eq!(
            grade(&format!("{OWN}, 198.51.100.9"), &[]).0,
            Anonymity::Transparent
        );
    }

    #[test]
    fn own_ip_in_any_forwarding_header_is_transparent() {
        let cases = [
            ("X-Forwarded-For", OWN.to_string()),
            ("X-Forwarded-For", format!("10.0.0.1, {OWN}")),
            ("Forwarded", format!("for={OWN};proto=http")),
            ("Forwarded", format!("for=\"{OWN}:4711\"")),
            ("X-Real-Ip", OWN.to_string()),
            ("Client-Ip", OWN.to_string()),
            ("X-Client-Ip", OWN.to_string()),
            ("Via", format!("1.1 {OWN}:3128 (squid)")),
            ("X-Proxyuser-Ip", OWN.to_string()),
            ("X-Forwarded-For", format!("::ffff:{OWN}")),
        ];
        for (name, value) in cases {
            let (grade, evidence) = grade("198.51.100.9", &[(name, &value)]);
            assert_eq!(grade, Anonymity::Transparent, "{name}: {value}");
            assert_eq!(evidence, vec![format!("{name}: {value}")]);
        }
    }

    #[test]
    fn own_ipv6_is_found_in_brackets() {
        let view = classify(
            200,
            &echo(
                "198.51.100.9",
                &[("Forwarded", "for=\"[2001:db8::7]:4711\"")],
            ),
            &expect(),
        )
        .unwrap();
        let (grade, _) = anonymity(&view, "2001:db8::7".parse().unwrap());
        assert_eq!(grade, Anonymity::Transparent);
    }

    #[test]
    fn proxy_headers_without_own_ip_are_anonymous() {
        for name in [
            "Via",
            "X-Forwarded-For",
            "Forwarded",
            "X-Real-Ip",
            "Proxy-Connection",
            "X-Proxy-Id",
            "X-Forwarded-Host",
            "X-Bluecoat-Via",
            "Client-Ip",
        ] {
            let (grade, evidence) = grade("198.51.100.9", &[(name, "1.1 10.1.2.3")]);
            assert_eq!(grade, Anonymity::Anonymous, "{name}");
            assert_eq!(evidence, vec![format!("{name}: 1.1 10.1.2.3")]);
        }
    }

    #[test]
    fn origin_list_without_own_ip_is_anonymous() {
        let (grade, evidence) = grade("10.9.9.9, 198.51.100.9", &[]);
        assert_eq!(grade, Anonymity::Anonymous);
        assert_eq!(evidence, vec!["origin: 10.9.9.9, 198.51.100.9".to_string()]);
    }

    #[test]
    fn ordinary_headers_do_not_count_as_proxy_headers() {
        let (grade, _) = grade(
            "198.51.100.9",
            &[("Cache-Control", "max-age=0"), ("Accept", "*/*")],
        );
        assert_eq!(grade, Anonymity::Elite);
    }

    /// Guards the contract's exit address: the judge's TCP peer, which is
    /// origin's last entry (it used to be the first: a forwarded value).
    #[test]
    fn exit_ip_is_origins_last_entry_unless_ours_or_no_address() {
        let exit = |origin: &str| {
            classify(200, &echo(origin, &[]), &expect())
                .unwrap()
                .exit_ip(own())
        };
        let peer: IpAddr = "198.51.100.9".parse().unwrap();
        assert_eq!(exit("198.51.100.9"), Some(peer));
        // httpbin.org: the forwarded value, then its load balancer's peer.
        assert_eq!(exit("10.0.0.1, 198.51.100.9"), Some(peer));
        assert_eq!(exit(&format!("{OWN}, 198.51.100.9")), Some(peer));
        // A bare httpbin behind a transparent proxy shows only ours.
        assert_eq!(exit(OWN), None);
        assert_eq!(exit(&format!("198.51.100.9, {OWN}")), None);
        // squid's `forwarded_for off` and friends.
        assert_eq!(exit("unknown"), None);
        assert_eq!(exit("198.51.100.9, unknown"), None);
        assert_eq!(exit("unknown, 198.51.100.9"), Some(peer));
    }

    /// Guards the squid `X-Forwarded-For: unknown` case: a non-address in
    /// origin or in a forwarding header is a proxy header, never "not the
    /// judge".
    #[test]
    fn non_address_entries_are_proxy_evidence() {
        for origin in ["unknown", "unknown, 198.51.100.9", "for=_hidden"] {
            let (graded, evidence) = grade(origin, &[]);
            assert_eq!(graded, Anonymity::Anonymous, "{origin}");
            assert_eq!(evidence, vec![format!("origin: {origin}")]);
        }
        let (graded, evidence) = grade("198.51.100.9", &[("X-Forwarded-For", "unknown")]);
        assert_eq!(graded, Anonymity::Anonymous);
        assert_eq!(evidence, vec!["X-Forwarded-For: unknown".to_string()]);
        let (graded, _) = grade(&format!("unknown, {OWN}"), &[]);
        assert_eq!(graded, Anonymity::Transparent);
    }

    #[test]
    fn statuses_other_than_200_are_dead() {
        let body = echo("198.51.100.9", &[]);
        assert_eq!(
            classify(407, &body, &expect()),
            Err(DeadReason::ProxyAuthRequired)
        );
        assert_eq!(
            classify(403, &body, &expect()),
            Err(DeadReason::BadStatus(403))
        );
        assert_eq!(
            classify(302, &body, &expect()),
            Err(DeadReason::BadStatus(302))
        );
    }

    #[test]
    fn someone_elses_page_is_a_hijack() {
        let pages: [&[u8]; 6] = [
            b"<html><body>Welcome to our hotspot</body></html>",
            b"",
            b"{}",
            b"[1,2,3]",
            br#"{"headers": {}, "origin": "1.2.3.4"}"#,
            br#"{"headers": [], "origin": "1.2.3.4", "url": "x", "args": {"pp": "n1"}}"#,
        ];
        for page in pages {
            assert_eq!(
                classify(200, page, &expect()),
                Err(DeadReason::NotJudge),
                "{}",
                String::from_utf8_lossy(page)
            );
        }
    }

    /// An origin without any entry is no judge's. Entries that are not
    /// addresses used to make the answer "not the judge" too; the contract
    /// makes them evidence instead (the nonce tells the judge's answer).
    #[test]
    fn judge_shaped_body_with_empty_origin_is_a_hijack() {
        for origin in ["", "  "] {
            assert_eq!(
                classify(200, &echo(origin, &[]), &expect()),
                Err(DeadReason::NotJudge),
                "{origin:?}"
            );
        }
        for origin in ["localhost", "1.2.3.4, evil", "999.1.1.1"] {
            let view = classify(200, &echo(origin, &[]), &expect()).unwrap();
            assert_eq!(view.exit_ip(own()), None, "{origin}");
        }
    }

    #[test]
    fn replayed_answer_without_our_nonce_is_a_hijack() {
        let stale = br#"{"args": {"pp": "old"}, "headers": {}, "origin": "1.2.3.4", "url": "u"}"#;
        assert_eq!(classify(200, stale, &expect()), Err(DeadReason::NotJudge));
        let no_args = br#"{"headers": {}, "origin": "1.2.3.4", "url": "u"}"#;
        assert_eq!(classify(200, no_args, &expect()), Err(DeadReason::NotJudge));
        assert!(classify(200, no_args, &JudgeExpectations::default()).is_ok());
    }

    #[test]
    fn injected_fields_cannot_smuggle_non_strings() {
        let injected = [
            br#"{"args": {"pp": "n1"}, "headers": {"Via": 1}, "origin": "1.2.3.4", "url": "u"}"#
                .as_slice(),
            br#"{"args": {"pp": "n1"}, "headers": {"Via": {"a": "b"}}, "origin": "1.2.3.4", "url": "u"}"#,
            br#"{"args": {"pp": "n1"}, "headers": {}, "origin": ["1.2.3.4"], "url": "u"}"#,
            br#"{"args": {"pp": ["n1"]}, "headers": {}, "origin": "1.2.3.4", "url": "u"}"#,
        ];
        for body in injected {
            assert_eq!(
                classify(200, body, &expect()),
                Err(DeadReason::NotJudge),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn repeated_headers_as_arrays_are_all_read() {
        let body = format!(
            r#"{{"args": {{"pp": "n1"}}, "headers": {{"Via": ["1.1 a", "1.1 {OWN}"]}}, "origin": "1.2.3.4", "url": "u"}}"#
        );
        let view = classify(200, body.as_bytes(), &expect()).unwrap();
        assert_eq!(anonymity(&view, own()).0, Anonymity::Transparent);
    }

    #[test]
    fn reason_names_are_stable() {
        assert_eq!(DeadReason::BadStatus(502).as_str(), "bad_status");
        assert_eq!(DeadReason::BadStatus(502).to_string(), "bad_status 502");
        assert_eq!(DeadReason::Socks("x".into()).to_string(), "socks: x");
    }
}
