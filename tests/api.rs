//! The HTTP API over real sockets, against the real binary and a real
//! database: every endpoint and every documented error, bans and their
//! recovery, the API token, and that no credentials leak into the figures.
//! Proxies are inserted as active rows before the service starts (it loads
//! them at start), so no validation cycle is needed.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use support::{
    get, get_with, insert_active, migrate, post, raw_http, request, Row, Service, TestConfig,
    TestDb,
};

/// A full POST /feedback batch of the largest items.
const FEEDBACK_BODY_LIMIT: usize = 700_000;
/// The max_body_bytes of the body-limit test.
const SMALL_MAX_BODY: usize = 4096;

/// A small varied pool: each filter of get-proxy selects a known subset.
fn varied_rows() -> Vec<Row> {
    vec![
        Row {
            supports_https: Some(true),
            ..Row::http("127.0.0.10", 8080)
        },
        Row {
            protocol: "socks5",
            username: Some("alice"),
            password: Some("pa55word"),
            latency_ms: Some(300),
            anonymity: Some("anonymous"),
            country: Some("DE"),
            supports_https: None,
            ..Row::http("127.0.0.11", 1080)
        },
        Row {
            latency_ms: Some(900),
            anonymity: Some("transparent"),
            ..Row::http("127.0.0.12", 3128)
        },
        Row {
            protocol: "https",
            latency_ms: Some(50),
            country: Some("FR"),
            supports_https: None,
            ..Row::http("127.0.0.13", 443)
        },
    ]
}

/// A database with `rows` active, and the service started on it.
fn start_with(rows: &[Row], configure: impl FnOnce(&mut TestConfig)) -> (TestDb, Service) {
    let db = TestDb::new();
    migrate(&db.url);
    insert_active(&db.url, rows);
    let mut config = TestConfig::new(&db.url);
    configure(&mut config);
    let service = Service::start_loaded(&config.text());
    (db, service)
}

/// The proxy URLs get-proxy gives over `tries` calls of `query`.
fn served(service: &Service, query: &str, tries: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..tries {
        let answer = get(&service.url(&format!("/get-proxy?{query}")));
        assert_eq!(answer.status, 200, "{query}: {}", answer.body);
        seen.insert(answer.json()["proxy"].as_str().expect("proxy").to_string());
    }
    seen
}

fn urls(rows: &[Row], indexes: &[usize]) -> HashSet<String> {
    indexes.iter().map(|&i| rows[i].url()).collect()
}

#[test]
fn get_proxy_answers_the_documented_shape_and_honours_every_filter() {
    let rows = varied_rows();
    let (_db, service) = start_with(&rows, |_| {});

    let answer = get(&service.url("/get-proxy?source=my_app&protocol=socks5"));
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer
        .header("Content-Type")
        .is_some_and(|t| t.starts_with("application/json")));
    let json = answer.json();
    assert_eq!(json["source"], "my_app");
    // The URL carries the credentials: the client needs them to use it.
    assert_eq!(json["proxy"], "socks5://alice:pa55word@127.0.0.11:1080");
    assert_eq!(json["protocol"], "socks5");
    assert_eq!(json["ip"], "127.0.0.11");
    assert_eq!(json["port"], 1080);
    assert_eq!(json["latency_ms"], 300);
    assert_eq!(json["anonymity"], "anonymous");
    assert_eq!(json["country"], "DE");
    assert_eq!(json["score"], 0);
    // The row leaves it undetermined; an https=true pick below shows true.
    assert_eq!(json["supports_https"], serde_json::Value::Null);
    let validated = json["last_validated_at"].as_str().expect("a time");
    assert!(
        chrono::DateTime::parse_from_rfc3339(validated).is_ok() && validated.ends_with('Z'),
        "RFC 3339 UTC: {validated}"
    );

    let tunnel = get(&service.url("/get-proxy?source=my_app&protocol=http&https=true")).json();
    assert_eq!(tunnel["supports_https"], true, "{tunnel}");

    let cases: &[(&str, &[usize])] = &[
        ("source=a", &[0, 1, 2, 3]),
        ("source=a&protocol=http", &[0, 2]),
        ("source=a&protocol=https", &[3]),
        // Tunnels CONNECT: supports_https, or listed as https.
        ("source=a&https=true", &[0, 3]),
        ("source=a&https=false", &[0, 1, 2, 3]),
        ("source=a&country=US", &[0, 2]),
        ("source=a&country=de", &[1]),
        ("source=a&anonymity=elite", &[0, 3]),
        // anonymous also accepts elite.
        ("source=a&anonymity=anonymous", &[0, 1, 3]),
        ("source=a&anonymity=transparent", &[2]),
        ("source=a&max_latency_ms=100", &[0, 3]),
        ("source=a&max_latency_ms=300&country=US", &[0]),
        ("source=a&protocol=http&https=true&anonymity=elite", &[0]),
    ];
    for (query, expected) in cases {
        let seen = served(&service, query, 40);
        let allowed = urls(&rows, expected);
        assert!(
            seen.is_subset(&allowed),
            "{query}: served {seen:?}, allowed {allowed:?}"
        );
        if expected.len() == 1 {
            assert_eq!(seen, allowed, "{query}");
        }
    }

    // count: distinct proxies, fewer when fewer are eligible.
    let answer = get(&service.url("/get-proxy?source=b&count=3"));
    assert_eq!(answer.status, 200, "{}", answer.body);
    let json = answer.json();
    assert_eq!(json["source"], "b");
    let proxies = json["proxies"].as_array().expect("proxies");
    assert_eq!(proxies.len(), 3);
    let distinct: HashSet<&str> = proxies.iter().filter_map(|p| p["proxy"].as_str()).collect();
    assert_eq!(distinct.len(), 3);
    for proxy in proxies {
        for field in [
            "proxy",
            "protocol",
            "ip",
            "port",
            "latency_ms",
            "anonymity",
            "country",
            "score",
        ] {
            assert!(proxy.get(field).is_some(), "{field} missing in {proxy}");
        }
    }
    let answer = get(&service.url("/get-proxy?source=b&count=100"));
    let all: HashSet<String> = answer.json()["proxies"]
        .as_array()
        .expect("proxies")
        .iter()
        .filter_map(|p| p["proxy"].as_str().map(String::from))
        .collect();
    assert_eq!(all, urls(&rows, &[0, 1, 2, 3]));

    // format=text: one URL a line.
    let answer = get(&service.url("/get-proxy?source=b&count=4&format=text"));
    assert_eq!(answer.status, 200);
    assert!(answer
        .header("Content-Type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let lines: HashSet<String> = answer.body.lines().map(String::from).collect();
    assert_eq!(lines, urls(&rows, &[0, 1, 2, 3]));
    let answer = get(&service.url("/get-proxy?source=b&protocol=socks5&format=text"));
    assert_eq!(answer.body, "socks5://alice:pa55word@127.0.0.11:1080\n");
    let answer = get(&service.url("/get-proxy?source=b&format=json"));
    assert_eq!(answer.status, 200);
    assert!(answer.json()["proxy"].is_string());
}

#[test]
fn get_proxy_refuses_every_bad_parameter_with_400() {
    let (_db, service) = start_with(&varied_rows(), |_| {});
    let long = "a".repeat(65);
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "source"),
        ("source=".into(), "source"),
        ("source=my%20app".into(), "source"),
        ("source=caf%C3%A9".into(), "source"),
        (format!("source={long}"), "source"),
        ("source=a&source=b".into(), "source"),
        ("source=a&protcol=http".into(), "protcol"),
        ("source=a&limit=3".into(), "limit"),
        ("source=a&protocol=ftp".into(), "protocol"),
        ("source=a&protocol=HTTP".into(), "protocol"),
        ("source=a&https=yes".into(), "https"),
        ("source=a&country=USA".into(), "country"),
        ("source=a&country=1A".into(), "country"),
        ("source=a&anonymity=high".into(), "anonymity"),
        ("source=a&max_latency_ms=0".into(), "max_latency_ms"),
        ("source=a&max_latency_ms=-5".into(), "max_latency_ms"),
        ("source=a&max_latency_ms=fast".into(), "max_latency_ms"),
        (
            "source=a&max_latency_ms=99999999999".into(),
            "max_latency_ms",
        ),
        ("source=a&count=0".into(), "count"),
        ("source=a&count=101".into(), "count"),
        ("source=a&count=two".into(), "count"),
        ("source=a&format=xml".into(), "format"),
    ];
    for (query, names) in &cases {
        let answer = get(&service.url(&format!("/get-proxy?{query}")));
        assert_eq!(answer.status, 400, "{query}: {}", answer.body);
        let error = answer.json()["error"].as_str().expect("error").to_string();
        assert!(
            error.contains(names),
            "{query}: the error names {names}: {error}"
        );
    }
    // 64 characters is still a valid name.
    let answer = get(&service.url(&format!("/get-proxy?source={}", "a".repeat(64))));
    assert_eq!(answer.status, 200, "{}", answer.body);
}

#[test]
fn get_proxy_says_why_nothing_is_available_with_retry_after() {
    // Starts empty: no_active. A proxy activated in the database arrives by
    // the memory sync; then no_match, and all_banned after four failures.
    let db = TestDb::new();
    let mut config = TestConfig::new(&db.url);
    config.set("scoring", "ban_cooldown_seconds", "120");
    let service = Service::start_loaded(&config.text());

    let answer = get(&service.url("/get-proxy?source=app"));
    assert_eq!(answer.status, 503, "{}", answer.body);
    let json = answer.json();
    assert_eq!(json["error"], "no proxy available");
    assert_eq!(json["source"], "app");
    assert_eq!(json["reason"], "no_active");
    let retry: u64 = answer
        .header("Retry-After")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);

    let row = Row::http("127.0.0.20", 8000);
    insert_active(&db.url, std::slice::from_ref(&row));
    support::wait_for(
        "the memory sync to load the new proxy",
        Duration::from_secs(15),
        || get(&service.url("/get-proxy?source=app")).status == 200,
    );

    let answer = get(&service.url("/get-proxy?source=app&country=ZZ"));
    assert_eq!(answer.status, 503);
    assert_eq!(answer.json()["reason"], "no_match");
    assert!(answer.header("Retry-After").is_some());

    for _ in 0..4 {
        let body = format!(
            r#"{{"source":"app","proxy":"{}","success":false}}"#,
            row.url()
        );
        assert_eq!(post(&service.url("/feedback"), &body).status, 200);
    }
    let answer = get(&service.url("/get-proxy?source=app"));
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.json()["reason"], "all_banned");
    let retry: u64 = answer
        .header("Retry-After")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((100..=120).contains(&retry), "until the ban ends: {retry}");
    // The ban is this source's only.
    assert_eq!(get(&service.url("/get-proxy?source=other")).status, 200);
}

#[test]
fn a_proxy_is_banned_on_the_fourth_failure_and_comes_back_after_the_cooldown() {
    let rows = vec![Row::http("127.0.0.30", 8000), Row::http("127.0.0.31", 8000)];
    let (_db, service) = start_with(&rows, |c| {
        c.set("scoring", "ban_cooldown_seconds", "1");
    });
    let bad = rows[0].url();
    let feedback = |success: bool| {
        let body = format!(r#"{{"source":"app","proxy":"{bad}","success":{success}}}"#);
        let answer = post(&service.url("/feedback"), &body);
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.json()
    };
    for (i, score) in [-5, -10, -15].iter().enumerate() {
        let json = feedback(false);
        assert_eq!(json["score"], *score);
        assert_eq!(json["failure_count"], i as u64 + 1);
        assert_eq!(json["success_count"], 0);
        assert_eq!(json["is_banned"], false, "-15 is not below the threshold");
        assert_eq!(json["banned_until"], Value::Null);
    }
    let json = feedback(false);
    assert_eq!(json["source"], "app");
    assert_eq!(json["proxy"], bad.as_str());
    assert_eq!(json["score"], -20);
    assert_eq!(json["is_banned"], true);
    let until = json["banned_until"].as_str().expect("banned_until");
    let until = chrono::DateTime::parse_from_rfc3339(until).expect("RFC 3339");

    // While banned, only the other proxy is served to this source.
    let mut served_bad_after_ban = false;
    while chrono::Utc::now() < until - chrono::Duration::milliseconds(200) {
        let answer = get(&service.url("/get-proxy?source=app"));
        assert_eq!(answer.status, 200);
        if answer.json()["proxy"] == bad.as_str() && chrono::Utc::now() < until {
            served_bad_after_ban = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!served_bad_after_ban, "a banned proxy was served");

    // After the cooldown it is served again, its score reset.
    support::wait_for(
        "the banned proxy to come back",
        Duration::from_secs(10),
        || {
            let answer = get(&service.url("/get-proxy?source=app&count=2"));
            answer.json()["proxies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["proxy"] == bad.as_str()))
        },
    );
    let view = get(&service.url("/sources/app")).json();
    let entry = view["proxies"]
        .as_array()
        .expect("proxies")
        .iter()
        .find(|p| p["proxy"] == bad.as_str())
        .expect("the proxy's stats")
        .clone();
    assert_eq!(entry["score"], 0, "{entry}");
    assert_eq!(entry["is_banned"], false);
    assert_eq!(
        entry["failure_count"], 4,
        "counts are history, kept: {entry}"
    );
}

#[test]
fn feedback_accepts_objects_and_arrays_and_refuses_bad_bodies() {
    let rows = vec![Row::http("127.0.0.40", 8000), Row::http("127.0.0.41", 8000)];
    let (_db, service) = start_with(&rows, |c| {
        c.set("server", "max_body_bytes", &SMALL_MAX_BODY.to_string());
    });
    let url = service.url("/feedback");
    let (a, b) = (rows[0].url(), rows[1].url());

    let answer = post(
        &url,
        &format!(r#"{{"source":"app","proxy":"{a}","success":true}}"#),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let json = answer.json();
    assert_eq!(json["source"], "app");
    assert_eq!(json["proxy"], a.as_str());
    assert_eq!(json["score"], 1);
    assert_eq!(json["success_count"], 1);
    assert_eq!(json["failure_count"], 0);
    assert_eq!(json["is_banned"], false);
    assert_eq!(json["banned_until"], Value::Null);

    // An array in, an array out, in the same order; an unknown proxy inside
    // a batch is reported in its place.
    let body = format!(
        r#"[{{"source":"app","proxy":"{b}","success":false}},
            {{"source":"app","proxy":"{a}","success":true}},
            {{"source":"app","proxy":"http://127.0.0.99:1","success":true}}]"#
    );
    let answer = post(&url, &body);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let json = answer.json();
    let items = json.as_array().expect("an array");
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["proxy"], b.as_str());
    assert_eq!(items[0]["score"], -5);
    assert_eq!(items[1]["proxy"], a.as_str());
    assert_eq!(items[1]["score"], 2);
    assert!(items[2]["error"].is_string(), "{}", items[2]);

    let item = |i: usize| {
        format!(
            r#"{{"source":"app","proxy":"{a}","success":{}}}"#,
            i % 2 == 0
        )
    };
    let thousand = format!("[{}]", (0..1000).map(item).collect::<Vec<_>>().join(","));
    let deep = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "JSON"),
        (String::new(), "JSON"),
        (r#"{"source":"app","proxy":"#.into(), "JSON"),
        (deep, "JSON"),
        ("[]".into(), "1 to 1000"),
        ("42".into(), "object"),
        (r#""text""#.into(), "object"),
        (format!(r#"{{"proxy":"{a}","success":true}}"#), "source"),
        (r#"{"source":"app","success":true}"#.into(), "proxy"),
        (format!(r#"{{"source":"app","proxy":"{a}"}}"#), "success"),
        (
            format!(r#"{{"source":7,"proxy":"{a}","success":true}}"#),
            "source",
        ),
        (
            format!(r#"{{"source":"bad name","proxy":"{a}","success":true}}"#),
            "source",
        ),
        (
            r#"{"source":"app","proxy":42,"success":true}"#.into(),
            "proxy",
        ),
        (
            format!(r#"{{"source":"app","proxy":"{a}","success":"yes"}}"#),
            "success",
        ),
        (
            format!(r#"{{"source":"app","proxy":"{a}","success":1}}"#),
            "success",
        ),
        (
            format!(r#"[{{"source":"app","proxy":"{a}","success":true}}, 5]"#),
            "item 1",
        ),
    ];
    for (body, needle) in &cases {
        let answer = post(&url, body);
        assert_eq!(answer.status, 400, "{body:.80}: {}", answer.body);
        let error = answer.json()["error"].as_str().expect("error").to_string();
        assert!(
            error.contains(needle),
            "{body:.80}: {error} should name {needle}"
        );
    }
    // A bad batch changes nothing: a's score is still 2.
    let view = get(&service.url("/sources/app")).json();
    let a_entry = view["proxies"]
        .as_array()
        .expect("proxies")
        .iter()
        .find(|p| p["proxy"] == a.as_str())
        .cloned()
        .expect("a's stats");
    assert_eq!(a_entry["score"], 2);

    // max_body_bytes holds for /feedback too: a full batch past it is 413
    // (the default takes one, see feedback_arrays_hold_1_to_1000_items).
    assert!(thousand.len() > SMALL_MAX_BODY);
    let answer = post(&url, &thousand);
    assert_eq!(answer.status, 413, "{:.200}", answer.body);

    let answer = post(
        &url,
        r#"{"source":"app","proxy":"http://127.0.0.99:1","success":true}"#,
    );
    assert_eq!(answer.status, 404, "{}", answer.body);
    assert!(answer.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("unknown proxy")));
    let answer = post(
        &url,
        r#"[{"source":"app","proxy":"socks5://127.0.0.99:1","success":true}]"#,
    );
    assert_eq!(answer.status, 404, "{}", answer.body);
    assert_eq!(post(&service.url("/feedback?x=1"), &item(0)).status, 400);

    // Past max_body_bytes, 413 by Content-Length, before reading the body,
    // on /feedback as on every path.
    let big = format!(
        r#"{{"source":"app","proxy":"{a}","success":true,"pad":"{}"}}"#,
        "x".repeat(FEEDBACK_BODY_LIMIT)
    );
    let answer = post(&url, &big);
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert!(answer.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains(&format!("at most {SMALL_MAX_BODY} bytes"))));
    let answer = post(&service.url("/admin/validate"), &" ".repeat(5000));
    assert_eq!(answer.status, 413, "{}", answer.body);
    let head = format!(
        "POST /feedback HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n",
        service.addr
    );
    let answer = raw_http(&service.addr, head.as_bytes());
    assert_eq!(answer.status, 413, "{}", answer.body);

    // 413 for a chunked body without Content-Length, counted as it arrives.
    let mut chunked = format!(
        "POST /feedback HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        service.addr
    )
    .into_bytes();
    for _ in 0..=FEEDBACK_BODY_LIMIT / 1000 {
        chunked.extend_from_slice(format!("3e8\r\n{}\r\n", " ".repeat(1000)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_http(&service.addr, &chunked);
    assert_eq!(answer.status, 413, "{}", answer.body);

    // A small chunked body is read whole and accepted.
    let body = item(0);
    let small = format!(
        "POST /feedback HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        service.addr,
        body.len()
    );
    let answer = raw_http(&service.addr, small.as_bytes());
    assert_eq!(answer.status, 200, "{}", answer.body);
}

#[test]
fn feedback_arrays_hold_1_to_1000_items() {
    // The largest legal item: a 64-character source and a 512-byte URL with
    // credentials, at the default max_body_bytes.
    let credential = || -> &'static str { Box::leak("u".repeat(243).into_boxed_str()) };
    let mut row = Row::http("127.0.0.45", 8000);
    row.protocol = "socks5";
    row.username = Some(credential());
    row.password = Some(credential());
    let rows = vec![row];
    let (_db, service) = start_with(&rows, |_| {});
    let a = rows[0].url();
    assert_eq!(a.len(), 512, "{a}");
    let source = "b".repeat(64);
    let item = format!(r#"{{"source":"{source}","proxy":"{a}","success":false}}"#);
    let batch = |n: usize| format!("[{}]", vec![item.as_str(); n].join(","));
    let answer = post(&service.url("/feedback"), &batch(1000));
    assert_eq!(answer.status, 200, "{:.200}", answer.body);
    assert_eq!(answer.json().as_array().map(Vec::len), Some(1000));
    let answer = post(&service.url("/feedback"), &batch(1001));
    assert_eq!(answer.status, 400, "{:.200}", answer.body);
    assert!(answer.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("1000")));
    let view = get(&service.url(&format!("/sources/{source}"))).json();
    assert_eq!(
        view["proxies"][0]["failure_count"], 1000,
        "the refused batch changed nothing"
    );
    assert_eq!(view["proxies"][0]["is_banned"], true);
}

#[test]
fn health_stats_sources_metrics_judge_and_admin_answer() {
    let rows = varied_rows();
    let (_db, service) = start_with(&rows, |_| {});
    for _ in 0..3 {
        assert_eq!(get(&service.url("/get-proxy?source=app")).status, 200);
    }
    for row in &rows {
        let body = format!(
            r#"{{"source":"app","proxy":"{}","success":true}}"#,
            row.url()
        );
        assert_eq!(post(&service.url("/feedback"), &body).status, 200);
    }
    let body = format!(
        r#"{{"source":"app","proxy":"{}","success":true}}"#,
        rows[3].url()
    );
    assert_eq!(post(&service.url("/feedback"), &body).status, 200);

    let health = get(&service.url("/health"));
    assert_eq!(health.status, 200);
    let json = health.json();
    assert_eq!(json["status"], "ok");
    assert_eq!(json["database"], "up");
    assert_eq!(json["active_proxies"], 4);
    assert!(json.get("snapshot_age_seconds").is_some());

    let stats = get(&service.url("/stats"));
    assert_eq!(stats.status, 200, "{}", stats.body);
    let json = stats.json();
    assert_eq!(json["active_proxies"], 4);
    assert_eq!(json["by_protocol"]["http"], 2);
    assert_eq!(json["by_protocol"]["socks5"], 1);
    assert_eq!(json["by_protocol"]["https"], 1);
    assert_eq!(json["by_anonymity"]["elite"], 2);
    assert_eq!(json["by_anonymity"]["transparent"], 1);
    let sources = json["sources"].as_array().expect("sources");
    let app = sources
        .iter()
        .find(|s| s["name"] == "app")
        .expect("source app");
    assert_eq!(app["pool_size"], 4);
    assert_eq!(app["banned"], 0);
    assert_eq!(app["requests"], 3);
    assert_eq!(app["feedbacks"], 5);
    let lists = json["lists"].as_array().expect("lists");
    assert_eq!(lists.len(), 1);
    assert!(json["validation"].is_object());
    assert_eq!(get(&service.url("/stats?x=1")).status, 400);

    // /sources/NAME: best first, limit.
    let view = get(&service.url("/sources/app"));
    assert_eq!(view.status, 200);
    let json = view.json();
    assert_eq!(json["source"], "app");
    assert_eq!(json["total_entries"], 4);
    let proxies = json["proxies"].as_array().expect("proxies");
    assert_eq!(proxies.len(), 4);
    assert_eq!(proxies[0]["proxy"], rows[3].url().as_str());
    assert_eq!(proxies[0]["score"], 2);
    let scores: Vec<i64> = proxies.iter().filter_map(|p| p["score"].as_i64()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );
    let limited = get(&service.url("/sources/app?limit=1")).json();
    assert_eq!(limited["proxies"].as_array().map(Vec::len), Some(1));
    assert_eq!(limited["total_entries"], 4);
    for bad in ["limit=0", "limit=x", "limit=100000", "top=1"] {
        let answer = get(&service.url(&format!("/sources/app?{bad}")));
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
    }
    let unknown = get(&service.url("/sources/never_seen"));
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["source"], "never_seen");
    assert_eq!(get(&service.url("/sources/bad%20name")).status, 400);

    // /metrics: Prometheus text with per-endpoint counters and histograms.
    let metrics = get(&service.url("/metrics"));
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("Content-Type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let text = metrics.body;
    for needle in [
        "# TYPE proxy_pool_http_requests_total counter",
        r#"proxy_pool_http_requests_total{endpoint="/get-proxy",status="200"} 3"#,
        r#"proxy_pool_http_requests_total{endpoint="/feedback",status="200"} 5"#,
        r#"proxy_pool_http_requests_total{endpoint="/stats",status="400"} 1"#,
        "# TYPE proxy_pool_http_request_duration_seconds histogram",
        r#"proxy_pool_http_request_duration_seconds_bucket{endpoint="/get-proxy",le="+Inf"} 3"#,
        r#"proxy_pool_http_request_duration_seconds_count{endpoint="/feedback"} 5"#,
        "proxy_pool_active_proxies 4",
        r#"proxy_pool_source_requests{source="app"} 3"#,
        "proxy_pool_database_up 1",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }

    // /judge: httpbin's /get shape.
    let judge = get_with(&service.url("/judge?nonce=abc&x=1"), &[("X-Probe", "yes")]);
    assert_eq!(judge.status, 200);
    let json = judge.json();
    assert_eq!(json["args"]["nonce"], "abc");
    assert_eq!(json["args"]["x"], "1");
    assert_eq!(json["headers"]["X-Probe"], "yes");
    assert_eq!(json["origin"], "127.0.0.1");
    assert_eq!(
        json["url"],
        format!("http://{}/judge?nonce=abc&x=1", service.addr)
    );

    // /admin/*: 202, and a snapshot really written.
    for path in ["/admin/snapshot", "/admin/fetch", "/admin/validate"] {
        let answer = post(&service.url(path), "");
        assert_eq!(answer.status, 202, "{path}: {}", answer.body);
        assert!(answer.json()["status"].is_string());
    }
    assert!(service.dir.path().join("stats.bin").exists());
    let health = get(&service.url("/health")).json();
    assert!(health["snapshot_age_seconds"]
        .as_i64()
        .is_some_and(|age| age <= 5));
}

#[test]
fn wrong_methods_get_405_with_allow_and_unknown_paths_404() {
    let (_db, service) = start_with(&[Row::http("127.0.0.50", 8000)], |_| {});
    let cases: &[(&str, &str, &str)] = &[
        ("POST", "/get-proxy?source=a", "GET"),
        ("DELETE", "/get-proxy?source=a", "GET"),
        ("GET", "/feedback", "POST"),
        ("PUT", "/feedback", "POST"),
        ("POST", "/health", "GET"),
        ("POST", "/stats", "GET"),
        ("PUT", "/sources/app", "GET"),
        ("POST", "/metrics", "GET"),
        ("POST", "/judge", "GET"),
        ("GET", "/admin/snapshot", "POST"),
        ("GET", "/admin/fetch", "POST"),
        ("DELETE", "/admin/validate", "POST"),
    ];
    for (method, path, allowed) in cases {
        let body = (*method != "GET" && *method != "DELETE").then_some("{}");
        let answer = request(method, &service.url(path), &[], body);
        assert_eq!(answer.status, 405, "{method} {path}: {}", answer.body);
        assert_eq!(answer.header("Allow"), Some(*allowed), "{method} {path}");
        assert!(answer.json()["error"].is_string());
    }
    for path in [
        "/nope",
        "/get-proxy/extra",
        "/admin/unknown",
        "/sources",
        "/GET-PROXY",
    ] {
        let answer = get(&service.url(path));
        assert_eq!(answer.status, 404, "{path}: {}", answer.body);
        assert!(answer.json()["error"].is_string());
    }
}

#[test]
fn api_token_is_required_everywhere_but_health_and_judge() {
    let row = Row::http("127.0.0.60", 8000);
    let (_db, service) = start_with(std::slice::from_ref(&row), |c| {
        c.set("server", "api_token", "t0ken-xyz");
    });
    let feedback = format!(
        r#"{{"source":"app","proxy":"{}","success":true}}"#,
        row.url()
    );
    let endpoints: Vec<(&str, &str, Option<&str>, u16)> = vec![
        ("GET", "/get-proxy?source=app", None, 200),
        ("POST", "/feedback", Some(feedback.as_str()), 200),
        ("GET", "/stats", None, 200),
        ("GET", "/sources/app", None, 200),
        ("GET", "/metrics", None, 200),
        ("POST", "/admin/snapshot", Some(""), 202),
        ("POST", "/admin/fetch", Some(""), 202),
        ("POST", "/admin/validate", Some(""), 202),
        ("GET", "/nope", None, 404),
    ];
    let wrong: &[&[(&str, &str)]] = &[
        &[],
        &[("Authorization", "Bearer wrong")],
        &[("Authorization", "Bearer t0ken-xy")],
        &[("Authorization", "Bearer t0ken-xyzz")],
        &[("Authorization", "t0ken-xyz")],
        &[("Authorization", "Basic dDBrZW4teHl6")],
    ];
    for (method, path, body, ok) in &endpoints {
        for headers in wrong {
            let answer = request(method, &service.url(path), headers, *body);
            assert_eq!(
                answer.status, 401,
                "{method} {path} {headers:?}: {}",
                answer.body
            );
            assert!(answer.json()["error"].is_string());
            assert_eq!(answer.header("WWW-Authenticate"), Some("Bearer"));
        }
        let auth = [("Authorization", "Bearer t0ken-xyz")];
        let answer = request(method, &service.url(path), &auth, *body);
        assert_eq!(answer.status, *ok, "{method} {path}: {}", answer.body);
    }
    assert_eq!(get(&service.url("/health")).status, 200);
    assert_eq!(get(&service.url("/judge")).status, 200);
}

#[test]
fn figures_never_show_proxy_or_list_passwords() {
    let rows = vec![
        Row {
            username: Some("puser"),
            password: Some("Pr0xyS3cret"),
            ..Row::http("127.0.0.70", 8000)
        },
        Row {
            protocol: "socks5",
            username: Some("suser"),
            password: Some("S0cksS3cret"),
            ..Row::http("127.0.0.71", 1080)
        },
    ];
    let (_db, service) = start_with(&rows, |c| {
        c.set(
            "fetcher",
            "source_urls",
            "http://luser:L1stS3cret@127.0.0.1:9/list.txt",
        )
        .set(
            "source.private",
            "url",
            "http://puser2:L1stS3cret2@127.0.0.1:9/p.txt",
        );
    });
    // The picked URL carries the credentials: that is what the client uses.
    let answer = get(&service.url("/get-proxy?source=app&count=2"));
    assert!(answer.body.contains("Pr0xyS3cret"));
    for row in &rows {
        for success in [true, false] {
            let body = format!(
                r#"{{"source":"app","proxy":"{}","success":{success}}}"#,
                row.url()
            );
            assert_eq!(post(&service.url("/feedback"), &body).status, 200);
        }
    }
    // Let the fetcher fail on both lists, so their errors are in the figures.
    assert_eq!(post(&service.url("/admin/fetch"), "").status, 202);
    support::wait_for("both lists to be tried", Duration::from_secs(20), || {
        let stats = get(&service.url("/stats")).json();
        stats["lists"]
            .as_array()
            .is_some_and(|l| l.len() == 2 && l.iter().all(|l| l["fetches"].as_u64() >= Some(1)))
    });
    let secrets = ["Pr0xyS3cret", "S0cksS3cret", "L1stS3cret", "L1stS3cret2"];
    let stats = get(&service.url("/stats")).body;
    let metrics = get(&service.url("/metrics")).body;
    let view = get(&service.url("/sources/app")).body;
    for (name, text) in [
        ("/stats", &stats),
        ("/metrics", &metrics),
        ("/sources/app", &view),
    ] {
        for secret in secrets {
            assert!(!text.contains(secret), "{name} shows {secret}:\n{text}");
        }
    }
    assert!(stats.contains("luser:***@127.0.0.1:9"), "{stats}");
    let view: Value = serde_json::from_str(&view).expect("json");
    let shown: HashSet<&str> = view["proxies"]
        .as_array()
        .expect("proxies")
        .iter()
        .filter_map(|p| p["proxy"].as_str())
        .collect();
    assert_eq!(
        shown,
        HashSet::from([
            "http://puser:***@127.0.0.70:8000",
            "socks5://suser:***@127.0.0.71:1080"
        ])
    );
    // The README promises this for proxy passwords (list URLs are the
    // operator's own configuration).
    let log = service.log_text();
    for secret in ["Pr0xyS3cret", "S0cksS3cret"] {
        assert!(!log.contains(secret), "the log shows {secret}:\n{log}");
    }
}

#[test]
fn new_sources_past_max_sources_get_a_clear_503_and_refusals_create_none() {
    let rows = vec![Row::http("127.0.0.47", 8000)];
    let (_db, service) = start_with(&rows, |c| {
        c.set("state", "max_sources", "2");
    });
    assert_eq!(
        get(&service.url("/get-proxy?source=nowhere&country=JP")).status,
        503
    );
    for name in ["one", "two"] {
        assert_eq!(
            get(&service.url(&format!("/get-proxy?source={name}"))).status,
            200
        );
    }
    let answer = get(&service.url("/get-proxy?source=three"));
    assert_eq!(answer.status, 503, "{}", answer.body);
    let json = answer.json();
    assert_eq!(json["reason"], "too_many_sources", "{json}");
    assert!(json["error"]
        .as_str()
        .is_some_and(|e| e.contains("at most 2")));
    let body = format!(
        r#"{{"source":"three","proxy":"{}","success":true}}"#,
        rows[0].url()
    );
    assert_eq!(post(&service.url("/feedback"), &body).status, 503);
    assert_eq!(get(&service.url("/get-proxy?source=one")).status, 200);
    assert_eq!(get(&service.url("/sources/nowhere")).status, 404);
}
