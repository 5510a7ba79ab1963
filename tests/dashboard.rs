//! The operator's view of a running service: the dashboard page as a real
//! browser (headless Chromium) renders it against a populated pool, and the
//! `proxy-pool stats` command's tables.
//!
//! Chromium is found at `$CHROMIUM`, `/usr/bin/chromium` or
//! `chromium-browser`; when it is missing and the tests run as root on
//! Debian, it is installed once with apt-get (under a file lock, so parallel
//! test runs do not race). Elsewhere the browser test says why it skips,
//! except under CI (the `CI` variable set), where a missing browser fails it.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::str::FromStr;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use support::*;

/// Where the screenshot is kept for a person to look at.
fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("test-output")
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| on_path("chromium"))
        .or_else(|| on_path("chromium-browser"))
}

/// Installs Debian's chromium package. flock(1) serialises concurrent test
/// processes (the lock dies with its holder, so a crash leaves none behind),
/// and apt waits for dpkg's own lock rather than failing on it.
fn install_chromium() -> Result<(), String> {
    eprintln!("dashboard: chromium not found; installing it with apt-get (once)");
    let script = "command -v chromium >/dev/null 2>&1 && exit 0; \
        export DEBIAN_FRONTEND=noninteractive; \
        apt-get -o DPkg::Lock::Timeout=600 update -q && \
        apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends chromium";
    let output = Command::new("flock")
        .args([
            "-w",
            "900",
            "/tmp/proxy-pool-chromium-install.lock",
            "sh",
            "-c",
        ])
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run flock/apt-get: {err}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "apt-get install chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// The browser to use, installing it when allowed; `Err` says why there is
/// none (the test then skips); a failed install, or no browser under CI,
/// panics.
fn chromium() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(path) = find_chromium() {
                return Ok(path);
            }
            if !is_root_on_debian() {
                let why = "chromium is not installed and this is not root on Debian: \
                     install chromium or set CHROMIUM=/path/to/chrome";
                if under_ci() {
                    panic!("{why} (CI is set: no skipping)");
                }
                return Err(why.into());
            }
            if let Err(err) = install_chromium() {
                panic!("{err}");
            }
            find_chromium().ok_or_else(|| "chromium still missing after apt-get".into())
        })
        .clone()
}

/// Runs a command, killing it if it outlives `limit`.
fn run_with_deadline(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chromium");
    // Drain both pipes on threads so a chatty browser never blocks on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Headless Chromium on `url` with one action (`--dump-dom` or
/// `--screenshot=...`); returns stdout and stderr.
fn headless(browser: &Path, url: &str, action: &[String]) -> (String, String) {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut command = Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
            "--window-size=1280,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(action)
        .arg(url);
    let output = run_with_deadline(command, Duration::from_secs(90));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "chromium failed ({}): {stderr}",
        output.status
    );
    (stdout, stderr)
}

/// The text of the element with `id` (its first text node; enough for the
/// leaf elements checked here).
fn text_of(dom: &str, id: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let open_end = at + dom[at..].find('>')? + 1;
    let close = open_end + dom[open_end..].find('<')?;
    Some(dom[open_end..close].trim().to_string())
}

/// The markup of the element with `id` up to `end_tag`.
fn element<'a>(dom: &'a str, id: &str, end_tag: &str) -> &'a str {
    let Some(at) = dom.find(&format!("id=\"{id}\"")) else {
        panic!("no element #{id} in the page:\n{dom}");
    };
    let end = dom[at..].find(end_tag).map_or(dom.len(), |i| at + i);
    &dom[at..end]
}

/// An element's attributes by name.
type Attrs = BTreeMap<String, String>;

/// Undoes the escaping Chromium's serialiser applies to attribute values.
fn unescape(value: &str) -> String {
    value
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// The attributes of every `<tag ...>` in `markup`, in document order.
/// Chromium writes every value in double quotes, which is all this reads.
fn tags(markup: &str, tag: &str) -> Vec<Attrs> {
    let open = format!("<{tag}");
    let mut found = Vec::new();
    let mut rest = markup;
    while let Some(at) = rest.find(&open) {
        rest = &rest[at + open.len()..];
        if !rest.starts_with([' ', '>']) {
            continue; // a longer tag name (`<tbody` when looking for `<tb`)
        }
        let mut attrs = Attrs::new();
        loop {
            rest = rest.trim_start();
            let name_end = rest
                .find(|c: char| c == '=' || c == '>' || c.is_whitespace())
                .unwrap_or(rest.len());
            if name_end == 0 {
                break;
            }
            let name = rest[..name_end].to_string();
            rest = &rest[name_end..];
            let mut value = String::new();
            if let Some(quoted) = rest.strip_prefix("=\"") {
                let end = quoted.find('"').expect("a closing quote");
                value = unescape(&quoted[..end]);
                rest = &quoted[end + 1..];
            }
            attrs.insert(name, value);
        }
        found.push(attrs);
    }
    found
}

/// The attributes of the element with `id`.
fn attrs_of(dom: &str, id: &str) -> Attrs {
    let Some(at) = dom.find(&format!(" id=\"{id}\"")) else {
        panic!("no element #{id} in the page:\n{dom}");
    };
    let start = dom[..at].rfind('<').expect("an opening tag");
    let name = &dom[start + 1..at];
    let name = name.split_whitespace().next().unwrap_or(name);
    tags(&dom[start..], name).swap_remove(0)
}

/// The attributes of each row in the body of the table with `id`.
fn body_rows(dom: &str, id: &str) -> Vec<Attrs> {
    let table = element(dom, id, "</table>");
    tags(
        table.split_once("<tbody").map_or("", |(_, body)| body),
        "tr",
    )
}

fn attr<'a>(attrs: &'a Attrs, name: &str) -> &'a str {
    attrs
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {attrs:?}"))
}

fn number<T: FromStr>(attrs: &Attrs, name: &str) -> T {
    let value = attr(attrs, name);
    value
        .parse()
        .unwrap_or_else(|_| panic!("{name}={value:?} is not a number in {attrs:?}"))
}

/// Asserts that the page shows what the API gave: `expected` of the answer
/// taken before the browser ran or of the one taken after it. The page read
/// the API in between, so a figure that moved meanwhile matches one of them.
fn assert_shown<T: PartialEq + Debug>(
    what: &str,
    shown: &T,
    answers: &[Value; 2],
    expected: impl Fn(&Value) -> T,
) {
    let before = expected(&answers[0]);
    let after = expected(&answers[1]);
    assert!(
        *shown == before || *shown == after,
        "{what}: the page shows {shown:?}, the API gave {before:?} before and {after:?} after"
    );
}

fn u64_of(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("expected a count, found {value}"))
}

fn str_of(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

fn items(value: &Value) -> &[Value] {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, found {value}"))
}

/// `data-key` → `data-count` of a bar chart's bars.
fn bars(dom: &str, id: &str) -> Vec<(String, u64)> {
    tags(element(dom, id, "</section>"), "div")
        .iter()
        .filter(|bar| bar.contains_key("data-key"))
        .map(|bar| (attr(bar, "data-key").to_string(), number(bar, "data-count")))
        .collect()
}

fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items
}

fn counts(value: &Value) -> Vec<(String, u64)> {
    sorted(
        value
            .as_object()
            .map(|map| {
                map.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// Lines Chromium logged for console messages or uncaught exceptions of the
/// page at `origin`.
fn page_errors<'a>(stderr: &'a str, origin: &str) -> Vec<&'a str> {
    stderr
        .lines()
        .filter(|line| {
            let console = line.contains("CONSOLE") || line.contains("Uncaught");
            console && line.contains(origin)
        })
        .collect()
}

/// A latency bucket as the page marks it: its bound in ms, or `above` for
/// the last, open-ended one.
fn latency_bucket(bucket: &Value) -> (String, u64) {
    let bound = match bucket["le_ms"].as_u64() {
        Some(le_ms) => le_ms.to_string(),
        None => "above".to_string(),
    };
    (bound, u64_of(&bucket["count"]))
}

/// Which data-* attribute of a row holds which field of the API's item.
type Fields = [(&'static str, &'static str)];

const LIST_FIELDS: &Fields = &[
    ("data-name", "name"),
    ("data-last-started-at", "last_started_at"),
    ("data-parsed", "parsed"),
    ("data-new", "new"),
    ("data-rejected", "rejected"),
    ("data-error", "last_error"),
];

const SOURCE_FIELDS: &Fields = &[
    ("data-name", "name"),
    ("data-pool-size", "pool_size"),
    ("data-banned", "banned"),
    ("data-entries", "entries"),
    ("data-requests", "requests"),
    ("data-feedbacks", "feedbacks"),
    ("data-successes", "successes"),
    ("data-failures", "failures"),
];

const PROXY_FIELDS: &Fields = &[
    ("data-proxy", "proxy"),
    ("data-active", "active"),
    ("data-score", "score"),
    ("data-success-count", "success_count"),
    ("data-failure-count", "failure_count"),
    ("data-banned", "is_banned"),
];

/// The `fields` of each row as the page wrote them.
fn shown_rows(rows: &[Attrs], fields: &Fields) -> Vec<Vec<String>> {
    rows.iter()
        .map(|row| {
            fields
                .iter()
                .map(|(name, _)| attr(row, name).to_string())
                .collect()
        })
        .collect()
}

/// The `fields` of each API item as the page writes them: numbers and
/// booleans as text, null as nothing.
fn api_rows(items: &[Value], fields: &Fields) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|item| {
            fields
                .iter()
                .map(|(_, key)| match &item[*key] {
                    Value::String(text) => text.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect()
}

#[test]
fn dashboard_shows_what_the_api_gives_in_every_panel() {
    let browser = match chromium() {
        Ok(browser) => browser,
        Err(why) => {
            eprintln!("SKIPPED dashboard_shows_what_the_api_gives_in_every_panel: {why}");
            return;
        }
    };
    let pool = populated_service("");
    let service = &pool.service;
    // A source with traffic: one proxy that worked and one banned after four
    // failures, so its row has a non-zero banned count and its drill-down a
    // success rate of 1 in 5.
    let pick = || {
        let answer = get(&service.url("/get-proxy?source=dash-test"));
        assert_eq!(answer.status, 200, "{}", answer.body);
        str_of(&answer.json()["proxy"])
    };
    let feedback = |proxy: &str, success: bool| {
        let body = format!(r#"{{"source":"dash-test","proxy":"{proxy}","success":{success}}}"#);
        let answer = post(&service.url("/feedback"), &body);
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.json()
    };
    let good = pick();
    feedback(&good, true);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut bad = pick();
    while bad == good {
        assert!(Instant::now() < deadline, "only {good} is ever picked");
        bad = pick();
    }
    for _ in 0..3 {
        feedback(&bad, false);
    }
    let last = feedback(&bad, false);
    assert_eq!(last["is_banned"], true, "four failures ban: {last}");

    // The sync thread samples the pool size at load and then every 30 s; a
    // second sample gives the pool-size chart a line.
    let stats_url = service.url("/stats");
    wait_for("two pool-size samples", Duration::from_secs(60), || {
        items(&get(&stats_url).json()["pool_history"]).len() >= 2
    });

    let origin = format!("http://{}", service.addr);
    // The address opens the drill-down of the source.
    let page = format!("{origin}/#source=dash-test");
    let view_url = service.url("/sources/dash-test?limit=20");
    let stats_before = get(&stats_url).json();
    let view_before = get(&view_url).json();
    let (dom, stderr) = headless(&browser, &page, &["--dump-dom".to_string()]);
    let stats = [stats_before, get(&stats_url).json()];
    let views = [view_before, get(&view_url).json()];

    assert!(
        dom.contains("<body data-state=\"ok\""),
        "the page did not reach data-state=ok:\n{dom}\n{stderr}"
    );
    assert_eq!(
        page_errors(&stderr, &origin),
        Vec::<&str>::new(),
        "the page logged errors"
    );
    assert_eq!(text_of(&dom, "status").as_deref(), Some("ok"));
    assert_eq!(text_of(&dom, "db-status").as_deref(), Some("up"));

    let shown: u64 = text_of(&dom, "active-proxies")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("#active-proxies is not a number:\n{dom}"));
    assert_shown("#active-proxies", &shown, &stats, |s| {
        u64_of(&s["active_proxies"])
    });
    assert_eq!(shown as usize, pool.alive);

    assert_shown(
        "by protocol",
        &sorted(bars(&dom, "by-protocol")),
        &stats,
        |s| counts(&s["by_protocol"]),
    );
    assert_shown(
        "by anonymity",
        &sorted(bars(&dom, "by-anonymity")),
        &stats,
        |s| counts(&s["by_anonymity"]),
    );
    assert!(
        element(&dom, "by-country", "</section>").contains("no country known"),
        "without a geoip database no country is known"
    );

    assert!(
        !attrs_of(&dom, "latency-card").contains_key("hidden"),
        "the latency histogram is hidden"
    );
    let latency: Vec<(String, u64)> = tags(element(&dom, "latency-histogram", "</section>"), "div")
        .iter()
        .filter(|bar| bar.contains_key("data-le-ms"))
        .map(|bar| {
            (
                attr(bar, "data-le-ms").to_string(),
                number(bar, "data-count"),
            )
        })
        .collect();
    assert_shown("latency histogram", &latency, &stats, |s| {
        items(&s["latency_histogram"])
            .iter()
            .map(latency_bucket)
            .collect()
    });
    let in_buckets: u64 = latency.iter().map(|(_, count)| count).sum();
    assert_eq!(in_buckets as usize, pool.alive, "{latency:?}");

    let history = attrs_of(&dom, "pool-history");
    let shown_history = (
        number::<usize>(&history, "data-samples"),
        attr(&history, "data-active").to_string(),
        attr(&history, "data-first-at").to_string(),
        attr(&history, "data-last-at").to_string(),
    );
    assert_shown("pool history", &shown_history, &stats, |s| {
        let samples = items(&s["pool_history"]);
        let active: Vec<String> = samples
            .iter()
            .map(|x| u64_of(&x["active"]).to_string())
            .collect();
        (
            samples.len(),
            active.join(","),
            samples
                .first()
                .map(|x| str_of(&x["at"]))
                .unwrap_or_default(),
            samples.last().map(|x| str_of(&x["at"])).unwrap_or_default(),
        )
    });
    let line = tags(element(&dom, "pool-history", "</section>"), "polyline");
    let vertices = line.first().map_or(0, |polyline| {
        attr(polyline, "points").split_whitespace().count()
    });
    assert_eq!(vertices, shown_history.0, "one vertex per sample");

    let lists = shown_rows(&body_rows(&dom, "lists-table"), LIST_FIELDS);
    assert!(!lists.is_empty(), "no list row");
    assert_shown("list rows", &lists, &stats, |s| {
        api_rows(items(&s["lists"]), LIST_FIELDS)
    });

    // A cycle ends every 2 s and the ring keeps the last 20, so rows may
    // come and go while the browser runs: each row must be a cycle of either
    // answer, with its figures, and every cycle in both answers was in the
    // ring when the page read it, so it must be on the page.
    let ring = |s: &Value| -> HashMap<(String, u64), (u64, u64)> {
        items(&s["validation"]["recent_cycles"])
            .iter()
            .map(|c| {
                let key = (str_of(&c["started_at"]), u64_of(&c["duration_ms"]));
                (key, (u64_of(&c["checked"]), u64_of(&c["alive"])))
            })
            .collect()
    };
    let (ring_before, ring_after) = (ring(&stats[0]), ring(&stats[1]));
    let mut shown_cycles = HashMap::new();
    for row in body_rows(&dom, "cycles-table") {
        let key = (
            attr(&row, "data-started-at").to_string(),
            number::<u64>(&row, "data-duration-ms"),
        );
        let shown = (number(&row, "data-checked"), number(&row, "data-alive"));
        let Some(api) = ring_before.get(&key).or_else(|| ring_after.get(&key)) else {
            panic!("the page shows a cycle {key:?} the API never gave: {ring_after:?}");
        };
        assert_eq!(shown, *api, "checked and alive of the cycle {key:?}");
        shown_cycles.insert(key, shown);
    }
    let in_both: Vec<_> = ring_before
        .keys()
        .filter(|key| ring_after.contains_key(*key))
        .collect();
    assert!(
        !in_both.is_empty(),
        "no cycle lasted across the browser run"
    );
    for key in in_both {
        assert!(
            shown_cycles.contains_key(key),
            "the cycle {key:?} is missing from the page: {shown_cycles:?}"
        );
    }

    let sources = shown_rows(&body_rows(&dom, "sources-table"), SOURCE_FIELDS);
    assert_shown("source rows", &sources, &stats, |s| {
        api_rows(items(&s["sources"]), SOURCE_FIELDS)
    });
    assert!(
        sources
            .iter()
            .any(|row| row[0] == "dash-test" && row[1] != "0" && row[2] == "1"),
        "dash-test should have a pool and one banned proxy: {sources:?}"
    );
    // The row's success rate, as the page computes it from those counts.
    let row_rate = element(&dom, "sources-table", "</table>")
        .split("<tr")
        .find(|row| row.contains("data-name=\"dash-test\""))
        .and_then(|row| row.split("data-success-rate=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .map(str::to_string);
    assert_eq!(
        row_rate.as_deref(),
        Some("20.0"),
        "one success, four failures"
    );
    let api_rate = items(&stats[1]["sources"])
        .iter()
        .find(|s| s["name"] == "dash-test")
        .map(|s| s["success_rate"].clone());
    assert_eq!(api_rate, Some(serde_json::json!(0.2)));

    assert!(
        !attrs_of(&dom, "source-detail").contains_key("hidden"),
        "#source=dash-test did not open the drill-down"
    );
    assert_eq!(text_of(&dom, "source-name").as_deref(), Some("dash-test"));
    let proxies = shown_rows(&body_rows(&dom, "source-proxies"), PROXY_FIELDS);
    assert_shown("drill-down rows", &proxies, &views, |view| {
        api_rows(items(&view["proxies"]), PROXY_FIELDS)
    });
    let summary = attrs_of(&dom, "source-summary");
    assert_eq!(attr(&summary, "data-source"), "dash-test");
    let shown_rate = (
        number::<u64>(&summary, "data-successes"),
        number::<u64>(&summary, "data-failures"),
        attr(&summary, "data-success-rate").to_string(),
    );
    assert_shown("drill-down success rate", &shown_rate, &views, |view| {
        let total = |key: &str| -> u64 {
            items(&view["proxies"])
                .iter()
                .map(|p| u64_of(&p[key]))
                .sum()
        };
        let (successes, failures) = (total("success_count"), total("failure_count"));
        let rate = 100.0 * successes as f64 / (successes + failures) as f64;
        (successes, failures, format!("{rate:.1}"))
    });
    assert_eq!(shown_rate.2, "20.0", "one success and four failures");

    // A picture for people; its size shows the page rendered something.
    let dir = output_dir();
    std::fs::create_dir_all(&dir).expect("create target/test-output");
    let png = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    let (_, stderr) = headless(
        &browser,
        &page,
        &[format!("--screenshot={}", png.display())],
    );
    assert_eq!(
        page_errors(&stderr, &origin),
        Vec::<&str>::new(),
        "the page logged errors while the screenshot was taken"
    );
    let size = std::fs::metadata(&png)
        .unwrap_or_else(|err| panic!("no screenshot at {} ({err}): {stderr}", png.display()))
        .len();
    assert!(size > 20_000, "screenshot suspiciously small: {size} bytes");
    eprintln!("dashboard screenshot: {}", png.display());
}

#[test]
fn dashboard_asks_for_the_token_when_the_api_needs_one() {
    let browser = match chromium() {
        Ok(browser) => browser,
        Err(why) => {
            eprintln!("SKIPPED dashboard_asks_for_the_token_when_the_api_needs_one: {why}");
            return;
        }
    };
    let db = TestDb::new();
    let service = Service::start(&config_text(
        &db.url,
        "[server]\nbind = 127.0.0.1:0\napi_token = t0ken\n\
         [fetcher]\nsource_urls = http://127.0.0.1:9/list.txt\nallow_private_addresses = true\n",
    ));
    let origin = format!("http://{}", service.addr);
    let (dom, stderr) = headless(&browser, &format!("{origin}/"), &["--dump-dom".to_string()]);
    assert!(
        dom.contains("<body data-state=\"unauthorized\""),
        "expected the unauthorized state:\n{dom}\n{stderr}"
    );
    // The form is shown; health (public) still fills the header.
    assert!(
        dom.contains("id=\"auth\" style=\"display: block;\""),
        "{dom}"
    );
    assert_eq!(text_of(&dom, "status").as_deref(), Some("ok"));
}

#[test]
fn stats_command_prints_the_running_services_tables() {
    let pool = populated_service("");
    let service = &pool.service;
    assert_eq!(get(&service.url("/get-proxy?source=cli-test")).status, 200);
    let config = service.dir.path().join("config.ini");
    let output = Command::new(binary())
        .arg("--config")
        .arg(&config)
        .args(["stats", "--url", &service.url("")])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run proxy-pool stats");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let first = stdout.lines().next().unwrap_or("");
    assert!(
        first.starts_with(&format!("active proxies: {}   ", pool.alive)),
        "{stdout}"
    );
    assert!(first.contains("database: up"), "{stdout}");
    for heading in [
        "by protocol",
        "by anonymity",
        "lists",
        "validation cycles (newest first)",
        "sources",
    ] {
        assert!(
            stdout.lines().any(|l| l == heading),
            "no {heading:?} table:\n{stdout}"
        );
    }
    // Every protocol row shows the count /stats gives.
    let stats = get(&service.url("/stats")).json();
    for (protocol, count) in counts(&stats["by_protocol"]) {
        let row = format!("  {protocol}");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&row) && l.split_whitespace().next() == Some(&protocol))
            .unwrap_or_else(|| panic!("no row for {protocol}:\n{stdout}"));
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(count.to_string().as_str()),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains(&pool.farm.list_url("schemes")),
        "the list is missing:\n{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("cli-test ")),
        "the source is missing:\n{stdout}"
    );
}

#[test]
fn stats_command_names_the_url_it_cannot_reach_with_exit_1() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.ini");
    std::fs::write(
        &config,
        "[database]\nurl = postgres://x@127.0.0.1/db\n[fetcher]\nsource_urls = http://127.0.0.1:9/l\n",
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let output = Command::new(binary())
        .arg("--config")
        .arg(&config)
        .args(["stats", "--url", &url])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&url), "{stderr}");
}
