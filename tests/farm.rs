//! Self-test of the proxy farm: every simulated proxy is checked with clients
//! independent of the farm (a raw absolute-URI request for http, ureq for
//! CONNECT and socks, a raw socks4 client for user ids) and must behave as its
//! manifest entry says; the list server must serve what each list promises.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use proxy_farm::{Behaviour, Farm, FarmSpec, Listing, ManifestEntry, ProxyGroup, INJECTED_ORIGIN};
use proxy_pool::proxy::{Anonymity, Protocol};
use serde_json::Value;
use ureq::{Proxy, ProxyProtocol};

/// The contract's example budget: the farm's slowest working proxies
/// (1.5 s) fit in it.
const CHECK_TIMEOUT: Duration = Duration::from_millis(3000);
/// The most a raw check reads: a judge answer is well under this.
const MAX_ANSWER: usize = 256 * 1024;

/// A response read by the raw client: status, headers, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Sends `request` to `addr` and reads the answer until the peer closes, the
/// size cap, or the deadline. None when the answer is not a complete HTTP
/// response in time.
fn raw_exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> Option<Answer> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream.write_all(request).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        stream.set_read_timeout(Some(left)).ok()?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return None,
        }
        if buf.len() > MAX_ANSWER {
            return None;
        }
    }
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut slots);
    let httparse::Status::Complete(head_len) = response.parse(&buf).ok()? else {
        return None;
    };
    Some(Answer {
        status: response.code?,
        headers: response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        body: buf[head_len..].to_vec(),
    })
}

fn basic(username: &str, password: &str) -> String {
    // Test-side encoder, independent of the farm's.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let data = format!("{username}:{password}").into_bytes();
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let mut n = 0u32;
        for (i, byte) in chunk.iter().enumerate() {
            n |= u32::from(*byte) << (16 - 8 * i);
        }
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// What a check through a proxy found.
#[derive(Debug, PartialEq)]
struct Finding {
    alive: bool,
    anonymity: Option<Anonymity>,
    exit_ip: Option<IpAddr>,
}

const DEAD: Finding = Finding {
    alive: false,
    anonymity: None,
    exit_ip: None,
};

/// Judges a judge answer: alive only if it is the judge's JSON echoing our
/// nonce; anonymity from the headers the proxy added.
fn judge_finding(status: u16, body: &[u8], nonce: &str) -> Finding {
    if status != 200 {
        return DEAD;
    }
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return DEAD;
    };
    if json["args"]["nonce"] != nonce {
        return DEAD;
    }
    let headers = &json["headers"];
    let anonymity = match headers["X-Forwarded-For"].as_str() {
        Some(forwarded) if forwarded.contains("127.0.0.1") => Anonymity::Transparent,
        _ if headers.get("Via").is_some() || headers.get("X-Forwarded-For").is_some() => {
            Anonymity::Anonymous
        }
        _ => Anonymity::Elite,
    };
    Finding {
        alive: true,
        anonymity: Some(anonymity),
        exit_ip: json["origin"].as_str().and_then(|o| o.parse().ok()),
    }
}

/// The validator's http check: one absolute-URI request through the proxy.
fn check_http(entry: &ManifestEntry, judge: &str, nonce: &str) -> Finding {
    let mut request = format!(
        "GET {judge}?nonce={nonce} HTTP/1.1\r\nHost: {}\r\nProxy-Connection: keep-alive\r\nConnection: close\r\n",
        judge.trim_start_matches("http://").trim_end_matches("/get")
    );
    if let Some(username) = &entry.username {
        let password = entry.password.as_deref().unwrap_or("");
        request.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            basic(username, password)
        ));
    }
    request.push_str("\r\n");
    let addr = SocketAddr::new(entry.ip, entry.port);
    match raw_exchange(addr, request.as_bytes(), CHECK_TIMEOUT) {
        Some(answer) => judge_finding(answer.status, &answer.body, nonce),
        None => DEAD,
    }
}

fn ureq_proxy(entry: &ManifestEntry) -> Proxy {
    let protocol = match entry.protocol {
        Protocol::Http | Protocol::Https => ProxyProtocol::Http,
        Protocol::Socks4 => ProxyProtocol::Socks4,
        Protocol::Socks5 => ProxyProtocol::Socks5,
    };
    let mut builder = Proxy::builder(protocol)
        .host(&entry.ip.to_string())
        .port(entry.port);
    if let Some(username) = &entry.username {
        builder = builder.username(username);
    }
    if let Some(password) = &entry.password {
        builder = builder.password(password);
    }
    builder.build().expect("a valid proxy")
}

fn agent(proxy: Option<Proxy>, timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(proxy)
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(5)
        .build()
        .into()
}

/// A check through ureq: CONNECT for http proxies, the socks handshake for
/// socks ones.
fn check_ureq(entry: &ManifestEntry, judge: &str, nonce: &str) -> Finding {
    let agent = agent(Some(ureq_proxy(entry)), CHECK_TIMEOUT);
    match agent.get(&format!("{judge}?nonce={nonce}")).call() {
        Ok(mut response) => {
            let status = response.status().as_u16();
            let body = response.body_mut().read_to_vec().unwrap_or_default();
            judge_finding(status, &body, nonce)
        }
        Err(_) => DEAD,
    }
}

/// SOCKS4 with a user id, which ureq does not send: the proxy's reply code
/// and, when it let us through, the judge's answer to a request for `nonce`.
fn socks4_with_user(
    entry: &ManifestEntry,
    user_id: &str,
    judge_addr: SocketAddr,
    nonce: &str,
) -> Option<(u8, Finding)> {
    let proxy = SocketAddr::new(entry.ip, entry.port);
    let mut stream = TcpStream::connect_timeout(&proxy, CHECK_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(CHECK_TIMEOUT)).ok()?;
    let IpAddr::V4(ip) = judge_addr.ip() else {
        return None;
    };
    let mut request = vec![4, 1];
    request.extend_from_slice(&judge_addr.port().to_be_bytes());
    request.extend_from_slice(&ip.octets());
    request.extend_from_slice(user_id.as_bytes());
    request.push(0);
    stream.write_all(&request).ok()?;
    let mut reply = [0u8; 8];
    stream.read_exact(&mut reply).ok()?;
    if reply[1] != 90 {
        return Some((reply[1], DEAD));
    }
    let get =
        format!("GET /get?nonce={nonce} HTTP/1.1\r\nHost: judge\r\nConnection: close\r\n\r\n");
    stream.write_all(get.as_bytes()).ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut slots);
    let httparse::Status::Complete(head_len) = response.parse(&answer).ok()? else {
        return None;
    };
    Some((
        90,
        judge_finding(response.code?, &answer[head_len..], nonce),
    ))
}

fn every_behaviour_farm() -> Farm {
    Farm::start(FarmSpec::every_behaviour().first_proxy_ip(Ipv4Addr::new(127, 2, 0, 1)))
        .expect("farm starts")
}

#[test]
fn every_behaviour_matches_its_manifest_entry() {
    let farm = every_behaviour_farm();
    let judge = farm.judge_url();
    let server = farm.server_addr();
    let manifest = farm.manifest().to_vec();

    let findings: Vec<(Finding, Option<bool>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = manifest
            .iter()
            .map(|entry| {
                let judge = judge.as_str();
                scope.spawn(move || {
                    let nonce = format!("n{}", entry.index);
                    if entry.protocol.is_http() {
                        let main = check_http(entry, judge, &nonce);
                        let tunnel = main.alive.then(|| check_ureq(entry, judge, &nonce).alive);
                        (main, tunnel)
                    } else if let (Protocol::Socks4, Some(user)) = (entry.protocol, &entry.username)
                    {
                        let main =
                            socks4_with_user(entry, user, server, &nonce).map_or(DEAD, |(_, f)| f);
                        let alive = main.alive;
                        (main, alive.then_some(true))
                    } else {
                        let main = check_ureq(entry, judge, &nonce);
                        let alive = main.alive;
                        (main, alive.then_some(true))
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("check thread"))
            .collect()
    });

    for (entry, (finding, tunnel)) in manifest.iter().zip(findings) {
        let what = format!(
            "{} ({:?} over {})",
            entry.url(),
            entry.behaviour,
            entry.protocol
        );
        let expected = Finding {
            alive: entry.alive,
            anonymity: entry.anonymity,
            exit_ip: entry.exit_ip,
        };
        assert_eq!(finding, expected, "{what}");
        // This probe tunnels to the farm's judge, not to port 443.
        let expected_tunnel = if entry.connect_443_only && entry.alive {
            Some(false)
        } else {
            entry.supports_https
        };
        assert_eq!(tunnel, expected_tunnel, "CONNECT support of {what}");
        assert_eq!(
            entry.dead_reasons.is_empty(),
            entry.alive,
            "dead reasons of {what}"
        );
        if entry.behaviour == Behaviour::Dead {
            assert_eq!(farm.hits(entry.index), 0, "{what} accepted a connection");
        } else {
            assert!(farm.hits(entry.index) >= 1, "{what} counted no hit");
        }
    }
    let alive = manifest.iter().filter(|e| e.alive).count() as u64;
    let tunnels = manifest
        .iter()
        .filter(|e| e.supports_https == Some(true) && e.protocol.is_http() && !e.connect_443_only)
        .count() as u64;
    // One judge answer per alive proxy's main check, plus one per tunnel.
    assert_eq!(farm.judge_hits(), alive + tunnels);
}

#[test]
fn http_proxies_demand_their_credentials() {
    let farm = every_behaviour_farm();
    let judge = farm.judge_url();
    for entry in farm
        .manifest()
        .iter()
        .filter(|e| e.behaviour == Behaviour::AuthRequired)
    {
        let request = format!("GET {judge} HTTP/1.1\r\nHost: judge\r\n\r\n");
        let answer = raw_exchange(
            SocketAddr::new(entry.ip, entry.port),
            request.as_bytes(),
            CHECK_TIMEOUT,
        )
        .expect("an answer");
        assert_eq!(answer.status, 407);
        assert!(answer
            .header("proxy-authenticate")
            .is_some_and(|v| v.starts_with("Basic")));

        let wrong = format!(
            "GET {judge} HTTP/1.1\r\nHost: judge\r\nProxy-Authorization: Basic {}\r\n\r\n",
            basic("x", "y")
        );
        let answer = raw_exchange(
            SocketAddr::new(entry.ip, entry.port),
            wrong.as_bytes(),
            CHECK_TIMEOUT,
        )
        .expect("an answer");
        assert_eq!(answer.status, 407);
    }
}

/// Guards the manifest's reasons for proxies listed without the credentials
/// they require, or with wrong ones: given the listed credentials, an http
/// one answers 407 with a Basic challenge, and a socks5 one offers no method
/// when none are sent and fails the RFC 1929 exchange for wrong ones. Given
/// the credentials their group requires, the same proxies work.
#[test]
fn proxies_listed_without_or_with_wrong_credentials_refuse_them() {
    let farm = every_behaviour_farm();
    let judge = farm.judge_url();
    let groups: Vec<ProxyGroup> = FarmSpec::every_behaviour()
        .groups
        .into_iter()
        .flat_map(|group| std::iter::repeat_n(group.clone(), group.count))
        .collect();
    let mut refused = (0, 0);
    for entry in farm.manifest() {
        let group = &groups[entry.index];
        if group.listing == Listing::AsRequired {
            continue;
        }
        let what = format!("{} ({:?})", entry.url(), group.listing);
        assert!(!entry.alive, "{what}");
        let required = group.credentials.clone().expect("required credentials");
        let mut as_required = entry.clone();
        as_required.username = Some(required.username.clone());
        as_required.password = Some(required.password.clone());
        let addr = SocketAddr::new(entry.ip, entry.port);
        match entry.dead_reasons {
            ["proxy_auth_required"] => {
                refused.0 += 1;
                let mut request = format!("GET {judge} HTTP/1.1\r\nHost: judge\r\n");
                if let Some(username) = &entry.username {
                    let password = entry.password.as_deref().unwrap_or("");
                    let token = basic(username, password);
                    request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
                }
                request.push_str("\r\n");
                let answer = raw_exchange(addr, request.as_bytes(), CHECK_TIMEOUT)
                    .unwrap_or_else(|| panic!("{what}: no answer"));
                assert_eq!(answer.status, 407, "{what}");
                let challenge = answer.header("proxy-authenticate").unwrap_or("");
                assert!(challenge.starts_with("Basic"), "{what}: {challenge:?}");
                assert!(check_http(&as_required, &judge, "right").alive, "{what}");
            }
            ["socks"] => {
                refused.1 += 1;
                assert_eq!(entry.protocol, Protocol::Socks5, "{what}");
                let mut stream =
                    TcpStream::connect_timeout(&addr, CHECK_TIMEOUT).expect("connects");
                stream
                    .set_read_timeout(Some(CHECK_TIMEOUT))
                    .expect("timeout");
                let mut reply = [0u8; 2];
                match (&entry.username, &entry.password) {
                    (Some(username), Some(password)) => {
                        stream.write_all(&[5, 1, 2]).expect("greeting");
                        stream.read_exact(&mut reply).expect("method");
                        assert_eq!(reply, [5, 2], "{what}: username/password method");
                        let mut auth = vec![1, username.len() as u8];
                        auth.extend_from_slice(username.as_bytes());
                        auth.push(password.len() as u8);
                        auth.extend_from_slice(password.as_bytes());
                        stream.write_all(&auth).expect("authentication");
                        stream
                            .read_exact(&mut reply)
                            .expect("authentication status");
                        assert_eq!(reply[0], 1, "{what}");
                        assert_ne!(reply[1], 0, "{what}: wrong credentials accepted");
                    }
                    _ => {
                        stream.write_all(&[5, 1, 0]).expect("greeting");
                        stream.read_exact(&mut reply).expect("method");
                        assert_eq!(reply, [5, 0xff], "{what}: no acceptable method");
                    }
                }
                assert!(check_ureq(&as_required, &judge, "right").alive, "{what}");
            }
            other => panic!("{what}: unexpected reasons {other:?}"),
        }
    }
    assert_eq!(
        refused,
        (2, 2),
        "http and socks5, without and with wrong ones"
    );
}

#[test]
fn socks4_user_ids_are_checked() {
    let farm = every_behaviour_farm();
    let with_id = farm
        .manifest()
        .iter()
        .find(|e| e.protocol == Protocol::Socks4 && e.username.is_some())
        .expect("a socks4 proxy with a user id");
    let user_id = with_id.username.clone().unwrap_or_default();
    let server = farm.server_addr();
    let (code, finding) = socks4_with_user(with_id, &user_id, server, "s4").expect("an answer");
    assert_eq!(code, 90);
    assert!(finding.alive);
    let (code, finding) =
        socks4_with_user(with_id, "someone-else", server, "s4").expect("an answer");
    assert_eq!((code, finding), (93, DEAD));
}

#[test]
fn flaky_proxies_fail_every_second_connection() {
    let farm = every_behaviour_farm();
    let judge = farm.judge_url();
    let flaky = farm
        .manifest()
        .iter()
        .find(|e| matches!(e.behaviour, Behaviour::Flaky(_)))
        .expect("a flaky proxy")
        .clone();
    let results: Vec<bool> = (0..4)
        .map(|i| check_http(&flaky, &judge, &format!("f{i}")).alive)
        .collect();
    assert_eq!(results, [true, false, true, false]);
    assert_eq!(farm.hits(flaky.index), 4);
    farm.reset_hits();
    assert_eq!(farm.hits(flaky.index), 0);
    assert_eq!(farm.judge_hits(), 0);
    assert!(
        check_http(&flaky, &judge, "again").alive,
        "the pattern restarts after a reset"
    );
}

#[test]
fn hostile_proxies_answer_as_described() {
    let farm = every_behaviour_farm();
    let judge = farm.judge_url();
    let find = |behaviour: Behaviour| {
        farm.manifest()
            .iter()
            .find(|e| e.behaviour == behaviour)
            .expect("present")
            .clone()
    };
    let request =
        format!("GET {judge}?nonce=h HTTP/1.1\r\nHost: judge\r\nConnection: close\r\n\r\n");
    let ask = |entry: &ManifestEntry| {
        raw_exchange(
            SocketAddr::new(entry.ip, entry.port),
            request.as_bytes(),
            CHECK_TIMEOUT,
        )
    };

    let hijack = ask(&find(Behaviour::Hijack)).expect("hijack answers");
    assert_eq!(hijack.status, 200);
    assert!(String::from_utf8_lossy(&hijack.body).contains("<html>"));

    let injected = ask(&find(Behaviour::InjectedJudge)).expect("injected answers");
    let json: Value = serde_json::from_slice(&injected.body).expect("judge-looking json");
    assert_eq!(json["origin"], INJECTED_ORIGIN);
    assert!(json.get("injected").is_some());

    assert!(
        ask(&find(Behaviour::Garbage)).is_none(),
        "garbage is not http"
    );
    assert!(ask(&find(Behaviour::MalformedStatus)).is_none());
    assert!(
        ask(&find(Behaviour::HugeHeader)).is_none(),
        "10 MB header exceeds the cap"
    );
    assert!(ask(&find(Behaviour::EndlessBody)).is_none());
    assert!(ask(&find(Behaviour::EndlessHeaders)).is_none());

    let black_hole = find(Behaviour::BlackHole);
    let started = Instant::now();
    assert!(raw_exchange(
        SocketAddr::new(black_hole.ip, black_hole.port),
        request.as_bytes(),
        Duration::from_millis(300)
    )
    .is_none());
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "a black hole accepts and stays silent"
    );

    let dead = find(Behaviour::Dead);
    let refused = TcpStream::connect_timeout(&SocketAddr::new(dead.ip, dead.port), CHECK_TIMEOUT)
        .unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(farm.judge_hits(), 0, "no hostile proxy asked the judge");
}

#[test]
fn proxies_refuse_targets_outside_loopback() {
    let farm = every_behaviour_farm();
    let find = |behaviour: Behaviour, protocol: Protocol| {
        farm.manifest()
            .iter()
            .find(|e| e.behaviour == behaviour && e.protocol == protocol)
            .expect("present")
            .clone()
    };
    let https = find(Behaviour::Elite, Protocol::Https);
    let addr = SocketAddr::new(https.ip, https.port);
    // Documentation addresses (RFC 5737): the farm must not even try them.
    for request in [
        "GET http://192.0.2.1/get HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n",
        "CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n",
        "GET http://example.com/get HTTP/1.1\r\nHost: example.com\r\n\r\n",
    ] {
        let answer = raw_exchange(addr, request.as_bytes(), CHECK_TIMEOUT).expect("an answer");
        assert_ne!(answer.status, 200, "{request}");
    }
    let socks5 = find(Behaviour::Socks5, Protocol::Socks5);
    let mut stream = TcpStream::connect(SocketAddr::new(socks5.ip, socks5.port)).expect("connects");
    stream
        .set_read_timeout(Some(CHECK_TIMEOUT))
        .expect("timeout");
    stream.write_all(&[5, 1, 0]).expect("greeting");
    let mut reply = [0u8; 2];
    stream.read_exact(&mut reply).expect("method");
    assert_eq!(reply, [5, 0]);
    stream
        .write_all(&[5, 1, 0, 1, 192, 0, 2, 1, 0, 80])
        .expect("request");
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).expect("reply");
    assert_eq!(reply[1], 2, "not allowed by ruleset");
}

fn list_agent() -> ureq::Agent {
    agent(None, Duration::from_secs(5))
}

fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut request = list_agent().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = request.call().expect("the list server answers");
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_vec()
        .unwrap_or_default();
    (status, headers, body)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map_or("", |(_, v)| v.as_str())
}

#[test]
fn static_lists_serve_the_farm_and_honour_conditional_requests() {
    let farm = Farm::start(FarmSpec::every_behaviour().first_proxy_ip(Ipv4Addr::new(127, 3, 0, 1)))
        .expect("farm");
    let (status, headers, body) = get(&farm.list_url("plain"), &[]);
    assert_eq!(status, 200);
    let lines: Vec<String> = String::from_utf8(body)
        .expect("text")
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = farm
        .manifest()
        .iter()
        .map(ManifestEntry::host_port)
        .collect();
    assert_eq!(lines, expected);

    let etag = header(&headers, "etag").to_owned();
    let modified = header(&headers, "last-modified").to_owned();
    assert!(etag.starts_with('"'));
    assert_eq!(
        get(&farm.list_url("plain"), &[("If-None-Match", &etag)]).0,
        304
    );
    assert_eq!(
        get(&farm.list_url("plain"), &[("If-None-Match", "\"other\"")]).0,
        200
    );
    assert_eq!(
        get(&farm.list_url("plain"), &[("If-Modified-Since", &modified)]).0,
        304
    );
    assert_eq!(
        get(
            &farm.list_url("plain"),
            &[("If-Modified-Since", "Thu, 01 Jan 1970 00:00:00 GMT")]
        )
        .0,
        200
    );
    assert_eq!(farm.list_hits("plain"), 5);

    let (_, _, body) = get(&farm.list_url("schemes"), &[]);
    let text = String::from_utf8(body).expect("text");
    for entry in farm.manifest() {
        assert!(
            text.lines().any(|line| line == entry.url()),
            "{}",
            entry.url()
        );
    }
    assert!(text.contains("socks5://farmuser5:s3cret%3Apass@"));

    let (status, _, body) = get(&farm.list_url("junk"), &[]);
    assert_eq!(status, 200);
    assert!(body.starts_with("\u{feff}".as_bytes()));
    let text = String::from_utf8(body).expect("utf-8");
    assert!(
        text.contains("\r\n") && text.contains("999.1.1.1:8080") && text.contains("# a comment")
    );

    farm.set_list("custom", "127.9.0.1:8080\n".to_owned());
    let (status, headers, body) = get(&farm.list_url("custom"), &[]);
    assert_eq!(
        (status, body.as_slice()),
        (200, b"127.9.0.1:8080\n".as_slice())
    );
    let first_etag = header(&headers, "etag").to_owned();
    farm.set_list("custom", "127.9.0.2:8080\n".to_owned());
    let (status, headers, body) = get(&farm.list_url("custom"), &[("If-None-Match", &first_etag)]);
    assert_eq!(
        (status, body.as_slice()),
        (200, b"127.9.0.2:8080\n".as_slice())
    );
    assert_ne!(header(&headers, "etag"), first_etag);
    let (status, _, _) = get(
        &farm.list_url("custom"),
        &[("If-Modified-Since", header(&headers, "last-modified"))],
    );
    assert_eq!(status, 304);
}

#[test]
fn hostile_lists_misbehave_as_named() {
    let spec = FarmSpec::new()
        .group(ProxyGroup::new(Behaviour::Elite, 2))
        .first_proxy_ip(Ipv4Addr::new(127, 4, 0, 1))
        .huge_lines(1000)
        .slow_list(3, Duration::from_millis(150));
    let farm = Farm::start(spec).expect("farm");

    let (status, _, _) = get(&farm.list_url("error500"), &[]);
    assert_eq!(status, 500);
    let (status, headers, body) = get(&farm.list_url("html"), &[]);
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").starts_with("text/html"));
    assert!(String::from_utf8_lossy(&body).contains("<html>"));
    let (status, headers, _) = get(&farm.list_url("ratelimit"), &[]);
    assert_eq!((status, header(&headers, "retry-after")), (429, "2"));
    assert!(
        list_agent()
            .get(&farm.list_url("redirect-loop"))
            .call()
            .is_err(),
        "redirects never end"
    );
    assert!(farm.list_hits("redirect-loop") >= 5);
    let (status, _, _) = get(&farm.list_url("no-such-list"), &[]);
    assert_eq!(status, 404);

    let (_, _, body) = get(&farm.list_url("huge"), &[]);
    assert_eq!(String::from_utf8(body).expect("text").lines().count(), 1000);

    let started = Instant::now();
    let (_, _, body) = get(&farm.list_url("slow"), &[]);
    assert_eq!(String::from_utf8(body).expect("text").lines().count(), 9);
    assert!(started.elapsed() >= Duration::from_millis(300));

    let (_, _, body) = get(&farm.list_url("longline"), &[]);
    assert_eq!(body.len(), 10 * 1024 * 1024 + 1);
    assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 1);

    let (_, headers, body) = get(&farm.list_url("binary"), &[]);
    assert_eq!(header(&headers, "content-type"), "application/octet-stream");
    assert_eq!(body.len(), 256 * 1024);
    assert!(std::str::from_utf8(&body).is_err());

    let quick = agent(None, Duration::from_millis(300));
    let started = Instant::now();
    assert!(quick
        .get(&farm.list_url("hang"))
        .call()
        .and_then(|mut r| r.body_mut().read_to_vec())
        .is_err());
    assert!(started.elapsed() < Duration::from_secs(3));

    let mut response = list_agent()
        .get(&farm.list_url("endless"))
        .call()
        .expect("endless starts");
    let mut reader = response.body_mut().as_reader();
    let mut buf = vec![0u8; 1024 * 1024];
    reader.read_exact(&mut buf).expect("a megabyte of lines");
    assert!(String::from_utf8_lossy(&buf).starts_with("127.200.0.0:1024\n"));
}

#[test]
fn judge_echoes_and_can_be_taken_down() {
    let farm = Farm::start(FarmSpec::new()).expect("farm");
    let (status, _, body) = get(
        &format!("{}?a=1&a=2&b=x%20y", farm.judge_url()),
        &[("X-Test", "yes")],
    );
    assert_eq!(status, 200);
    let json: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        json["args"],
        serde_json::json!({"a": ["1", "2"], "b": "x y"})
    );
    assert_eq!(json["headers"]["X-Test"], "yes");
    assert_eq!(json["origin"], "127.0.0.1");
    assert!(json["url"]
        .as_str()
        .is_some_and(|u| u.ends_with("/get?a=1&a=2&b=x%20y")));
    assert_eq!(farm.judge_hits(), 1);

    farm.set_judge_down(true);
    assert_eq!(get(&farm.judge_url(), &[]).0, 503);
    assert_eq!(farm.judge_hits(), 1, "outage answers are not counted");
    farm.set_judge_down(false);
    assert_eq!(get(&farm.judge_url(), &[]).0, 200);
    assert_eq!(farm.judge_hits(), 2);
}

#[test]
fn a_stopped_farm_refuses_connections() {
    let farm = Farm::start(
        FarmSpec::new()
            .group(ProxyGroup::new(Behaviour::BlackHole, 1))
            .first_proxy_ip(Ipv4Addr::new(127, 5, 0, 1)),
    )
    .expect("farm");
    let entry = farm.manifest()[0].clone();
    let server = farm.server_addr();
    // Hold a black-hole connection open across the stop.
    let _held = TcpStream::connect(SocketAddr::new(entry.ip, entry.port)).expect("connects");
    drop(farm);
    assert!(
        TcpStream::connect_timeout(&SocketAddr::new(entry.ip, entry.port), CHECK_TIMEOUT).is_err()
    );
    assert!(TcpStream::connect_timeout(&server, CHECK_TIMEOUT).is_err());
}

#[test]
fn five_thousand_proxies_run_in_one_process() {
    let started = Instant::now();
    let spec = FarmSpec::new()
        .group(ProxyGroup::new(Behaviour::Elite, 4000))
        .group(ProxyGroup::new(Behaviour::Dead, 500))
        .group(ProxyGroup::new(Behaviour::BlackHole, 500))
        .first_proxy_ip(Ipv4Addr::new(127, 6, 0, 1));
    let farm = Farm::start(spec).expect("5,000 proxies start");
    assert_eq!(farm.manifest().len(), 5000);
    let judge = farm.judge_url();
    for index in [0, 1, 1234, 3999, 4000, 4499, 4500, 4999] {
        let entry = &farm.manifest()[index];
        let timeout_ok = if entry.behaviour == Behaviour::BlackHole {
            1
        } else {
            0
        };
        let finding = if timeout_ok == 1 {
            let request = format!("GET {judge} HTTP/1.1\r\nHost: judge\r\n\r\n");
            match raw_exchange(
                SocketAddr::new(entry.ip, entry.port),
                request.as_bytes(),
                Duration::from_millis(200),
            ) {
                Some(answer) => judge_finding(answer.status, &answer.body, ""),
                None => DEAD,
            }
        } else {
            check_http(entry, &judge, "big")
        };
        assert_eq!(finding.alive, entry.alive, "{}", entry.url());
        assert_eq!(finding.exit_ip, entry.exit_ip, "{}", entry.url());
    }
    let last_alive = &farm.manifest()[3999];
    assert_eq!(last_alive.ip, IpAddr::V4(Ipv4Addr::new(127, 6, 15, 190)));
    drop(farm);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}
