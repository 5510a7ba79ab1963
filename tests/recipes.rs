//! The README's "Client recipes" and `examples/recipes/` run for real against
//! a service whose pool the proxy farm filled: the shell blocks are taken from
//! the README itself (so the README cannot rot), the requests client and the
//! Scrapy middleware go through farm proxies to the farm's judge, and every
//! recipe's feedback must show up in the source's stats.
//!
//! Needs python3: without it the tests say so and skip, except under CI
//! (the `CI` variable set), where they fail. `requests` and `pysocks`, and
//! Scrapy for the real crawl, are installed when missing: with pip, else
//! (as root on Debian) with apt-get, else with pip's
//! `--break-system-packages`; when none works the test fails and says what
//! was tried.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

use support::*;

const README_POOL: &str = "http://127.0.0.1:8080";
const README_TARGET: &str = "http://example.com/";

fn recipes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/recipes")
}

fn python() -> Option<&'static str> {
    static FOUND: OnceLock<bool> = OnceLock::new();
    let found = *FOUND.get_or_init(|| {
        Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    found.then_some("python3")
}

macro_rules! python_or_skip {
    ($test:literal) => {
        match python() {
            Some(python) => python,
            None if under_ci() => panic!("python3 is not installed (CI is set: no skipping)"),
            None => {
                eprintln!(concat!("SKIPPED ", $test, ": python3 is not installed"));
                return;
            }
        }
    };
}

fn has_modules(modules: &[&str]) -> bool {
    let script = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    Command::new("python3")
        .args(["-c", &script])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Python packages a recipe test needs: what to import, what pip calls them,
/// what Debian calls them.
struct Needs {
    modules: &'static [&'static str],
    pip: &'static [&'static str],
    apt: &'static [&'static str],
}

const REQUESTS: Needs = Needs {
    modules: &["requests", "socks"],
    pip: &["requests", "pysocks"],
    apt: &["python3-requests", "python3-socks"],
};

const SCRAPY: Needs = Needs {
    modules: &["scrapy"],
    pip: &["scrapy"],
    apt: &["python3-scrapy"],
};

/// Runs an installer's shell script under a file lock (flock(1): parallel
/// tests take turns, and the lock dies with its holder); `Err` holds the end
/// of its output.
fn install_with(what: &str, script: &str) -> Result<(), String> {
    eprintln!("recipes: {what}: {script}");
    let output = Command::new("flock")
        .args(["-w", "900", "/tmp/proxy-pool-recipes-install.lock"])
        .args(["timeout", "600", "sh", "-c", script])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("{what}: cannot run flock: {err}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    Err(format!(
        "{what} failed ({}): {}",
        output.status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

/// Makes `needs.modules` importable, trying pip, then apt-get (as root on
/// Debian; only useful when python3 is Debian's), then pip past Debian's
/// EXTERNALLY-MANAGED refusal. `Err` lists every attempt and its failure.
fn ensure_modules(needs: &Needs) -> Result<(), String> {
    if has_modules(needs.modules) {
        return Ok(());
    }
    let pip = |extra: &str| {
        format!(
            "python3 -m pip install --quiet {extra} {}",
            needs.pip.join(" ")
        )
    };
    let mut attempts = vec![("pip", pip(""))];
    if is_root_on_debian() {
        let apt = "apt-get -o DPkg::Lock::Timeout=600";
        let packages = needs.apt.join(" ");
        attempts.push((
            "apt-get",
            format!("{apt} update -q && {apt} install -y -q {packages}"),
        ));
    }
    attempts.push((
        "pip past EXTERNALLY-MANAGED",
        pip("--break-system-packages"),
    ));
    let mut failures = Vec::new();
    for (what, script) in attempts {
        match install_with(what, &script) {
            Ok(()) if has_modules(needs.modules) => return Ok(()),
            Ok(()) => failures.push(format!("{what}: installed, yet python3 cannot import them")),
            Err(err) => failures.push(err),
        }
    }
    Err(format!(
        "python3 cannot import {:?} and installing them failed; install them by hand \
         (pip install {} or apt-get install {}). Tried:\n  {}",
        needs.modules,
        needs.pip.join(" "),
        needs.apt.join(" "),
        failures.join("\n  ")
    ))
}

fn run(command: &mut Command) -> (Output, String, String) {
    let output = command.stdin(Stdio::null()).output().expect("run a recipe");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

/// The fenced blocks of `language` in the README's "Client recipes" section.
fn readme_blocks(language: &str) -> Vec<String> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("\n## Client recipes\n")
        .expect("README has a Client recipes section");
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let section = &section[..end];
    let fence = format!("```{language}\n");
    section
        .split(&fence)
        .skip(1)
        .filter_map(|rest| rest.split("\n```").next())
        .map(str::to_string)
        .collect()
}

/// A README block aimed at this test's service, judge and source.
fn aim(block: &str, pool: &PopulatedService, source: &str) -> String {
    block
        .replace(README_POOL, &format!("http://{}", pool.service.addr))
        .replace(README_TARGET, &pool.farm.judge_url())
        .replace("my_app", source)
}

/// (successes, failures) the source reported, summed over its proxies.
fn reported(pool: &PopulatedService, source: &str) -> (u64, u64) {
    let view = get(&pool.service.url(&format!("/sources/{source}?limit=1000")));
    assert_eq!(view.status, 200, "{}", view.body);
    let view = view.json();
    let sum = |field: &str| {
        view["proxies"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p[field].as_u64().unwrap_or(0))
            .sum()
    };
    (sum("success_count"), sum("failure_count"))
}

/// The farm's proxy addresses: a judge answer whose origin is one of them
/// really went through a proxy.
fn farm_ips(pool: &PopulatedService) -> BTreeSet<String> {
    pool.farm
        .manifest()
        .iter()
        .map(|e| e.ip.to_string())
        .collect()
}

/// Every JSON object the judge answered, from concatenated output.
fn judge_answers(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map(|v| v.unwrap_or_else(|err| panic!("not judge JSON ({err}): {text}")))
        .collect()
}

#[test]
fn readme_curl_recipe_uses_a_proxy_and_reports_the_outcome() {
    let pool = populated_service("");
    let blocks = readme_blocks("sh");
    let recipe = blocks
        .iter()
        .find(|b| b.contains("/feedback"))
        .expect("a curl block that sends feedback");
    let hits = pool.farm.judge_hits();
    for round in 1..=3 {
        let script = aim(recipe, &pool, "curl-recipe");
        let (output, stdout, stderr) =
            run(Command::new("bash").args(["-euo", "pipefail", "-c", &script]));
        assert!(output.status.success(), "{script}\n{stdout}\n{stderr}");
        let answer: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|err| panic!("feedback answer is not JSON ({err}): {stdout}"));
        assert_eq!(answer["source"], "curl-recipe", "{answer}");
        assert_eq!(reported(&pool, "curl-recipe"), (round, 0));
    }
    assert!(
        pool.farm.judge_hits() >= hits + 3,
        "the target was not reached"
    );
}

#[test]
fn readme_xargs_one_liner_goes_through_five_distinct_proxies() {
    let pool = populated_service("");
    let blocks = readme_blocks("sh");
    let one_liner = blocks
        .iter()
        .find(|b| b.contains("xargs"))
        .expect("an xargs block");
    let script = aim(one_liner, &pool, "xargs-recipe");
    let (output, stdout, stderr) =
        run(Command::new("bash").args(["-euo", "pipefail", "-c", &script]));
    assert!(output.status.success(), "{script}\n{stderr}");
    let answers = judge_answers(&stdout);
    assert_eq!(answers.len(), 5, "{stdout}");
    let farm = farm_ips(&pool);
    let origins: BTreeSet<String> = answers
        .iter()
        .map(|a| a["origin"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(origins.len(), 5, "not five distinct exits: {origins:?}");
    assert!(origins.is_subset(&farm), "{origins:?} not all farm proxies");
}

#[test]
fn requests_client_fetches_through_a_proxy_and_reports_success() {
    let python = python_or_skip!("requests_client_fetches_through_a_proxy_and_reports_success");
    ensure_modules(&REQUESTS).unwrap_or_else(|err| panic!("{err}"));
    let pool = populated_service("");
    let script = recipes_dir().join("requests_client.py");
    for round in 1..=4 {
        let (output, stdout, stderr) = run(Command::new(python).arg(&script).args([
            "--pool",
            &format!("http://{}", pool.service.addr),
            "--source",
            "requests-recipe",
            "--timeout",
            "5",
            &format!("{}?round={round}", pool.farm.judge_url()),
        ]));
        assert!(output.status.success(), "{stdout}\n{stderr}");
        let answer: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|err| panic!("not the judge's answer ({err}): {stdout}\n{stderr}"));
        let origin = answer["origin"].as_str().unwrap_or_default().to_string();
        assert!(
            farm_ips(&pool).contains(&origin),
            "not through a farm proxy: {answer}"
        );
        assert_eq!(answer["args"]["round"], round.to_string());
        assert_eq!(reported(&pool, "requests-recipe"), (round, 0), "{stderr}");
    }

    // The README's library use of the same module.
    let block = readme_blocks("python")
        .into_iter()
        .find(|b| b.contains("from requests_client"))
        .expect("a python block using requests_client");
    let code = format!(
        "{}\nprint(response.json()['origin'])",
        aim(&block, &pool, "requests-recipe")
    );
    let (output, stdout, stderr) = run(Command::new(python)
        .args(["-c", &code])
        .env("PYTHONPATH", recipes_dir()));
    assert!(output.status.success(), "{code}\n{stderr}");
    assert!(farm_ips(&pool).contains(stdout.trim()), "{stdout}");
    assert_eq!(reported(&pool, "requests-recipe"), (5, 0));
}

#[test]
fn requests_client_reports_each_failure_and_retries_with_another_proxy() {
    let python =
        python_or_skip!("requests_client_reports_each_failure_and_retries_with_another_proxy");
    ensure_modules(&REQUESTS).unwrap_or_else(|err| panic!("{err}"));
    let pool = populated_service("");
    // A target nobody listens on: every proxy fails to reach it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (output, stdout, stderr) = run(Command::new(python)
        .arg(recipes_dir().join("requests_client.py"))
        .args([
            "--pool",
            &format!("http://{}", pool.service.addr),
            "--source",
            "requests-failing",
            "--attempts",
            "3",
            "--timeout",
            "3",
            &format!("http://{closed}/"),
        ]));
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("giving up"), "{stderr}");
    assert_eq!(stderr.matches("failed").count(), 3, "{stderr}");
    assert_eq!(reported(&pool, "requests-failing"), (0, 3));
}

/// Tiny stand-ins for Scrapy's Request and Response, enough for the
/// middleware's hooks (process_request, process_response,
/// process_exception); the real crawl below checks the same with Scrapy.
const SCRAPY_STAND_IN: &str = r#"
import json, sys
from scrapy_middleware import ProxyPoolMiddleware

class Request:
    def __init__(self, url, meta=None, dont_filter=False):
        self.url, self.meta, self.dont_filter = url, dict(meta or {}), dont_filter
    def replace(self, **changes):
        return Request(changes.get("url", self.url), changes.get("meta", self.meta),
                       changes.get("dont_filter", self.dont_filter))

class Response:
    def __init__(self, status):
        self.status = status

pool, judge = sys.argv[1], sys.argv[2]
mw = ProxyPoolMiddleware(pool, "scrapy-standin", max_retries=2)

ok = Request(judge)
assert mw.process_request(ok) is None
assert ok.meta["proxy"].startswith("http://"), ok.meta
response = Response(200)
assert mw.process_response(ok, response) is response

blocked = Request(judge)
mw.process_request(blocked)
retry = mw.process_response(blocked, Response(503))
assert isinstance(retry, Request) and retry.dont_filter, retry
assert retry.meta["proxy_pool_retries"] == 1 and "proxy" not in retry.meta, retry.meta

broken = Request(judge)
mw.process_request(broken)
again = mw.process_exception(broken, ConnectionRefusedError("refused"))
assert isinstance(again, Request), again

spent = Request(judge, meta={"proxy_pool_retries": 2})
mw.process_request(spent)
assert mw.process_exception(spent, TimeoutError("slow")) is None

not_found = Request(judge)
mw.process_request(not_found)
page = Response(404)
assert mw.process_response(not_found, page) is page

own = Request(judge, meta={"proxy": "http://127.0.0.1:9"})
mw.process_request(own)
assert own.meta["proxy"] == "http://127.0.0.1:9"
assert mw.process_response(own, Response(503)).status == 503

print("ok")
"#;

#[test]
fn scrapy_middleware_sets_proxies_and_reports_outcomes() {
    let python = python_or_skip!("scrapy_middleware_sets_proxies_and_reports_outcomes");
    let pool = populated_service("");
    let (output, stdout, stderr) = run(Command::new(python)
        .args(["-c", SCRAPY_STAND_IN])
        .arg(format!("http://{}", pool.service.addr))
        .arg(pool.farm.judge_url())
        .env("PYTHONPATH", recipes_dir()));
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "ok");
    // 200 and 404 are successes; 503, a refused connection and a timeout
    // are failures; the spider's own proxy is not reported.
    assert_eq!(reported(&pool, "scrapy-standin"), (2, 3));
}

const SCRAPY_CRAWL: &str = r#"
import sys
import scrapy
from scrapy.crawler import CrawlerProcess

pool, judge, out = sys.argv[1], sys.argv[2], sys.argv[3]

class JudgeSpider(scrapy.Spider):
    name = "judge"
    start_urls = [f"{judge}?n={n}" for n in range(4)]
    def parse(self, response):
        yield {"origin": response.json()["origin"], "proxy": response.meta.get("proxy_pool_proxy")}

process = CrawlerProcess(settings={
    "DOWNLOADER_MIDDLEWARES": {"scrapy_middleware.ProxyPoolMiddleware": 610},
    "PROXY_POOL_URL": pool,
    "PROXY_POOL_SOURCE": "scrapy-real",
    "FEEDS": {out: {"format": "json"}},
    "LOG_LEVEL": "WARNING",
    "ROBOTSTXT_OBEY": False,
    "TELNETCONSOLE_ENABLED": False,
    "DOWNLOAD_TIMEOUT": 5,
    "RETRY_ENABLED": False,
})
process.crawl(JudgeSpider)
process.start()
"#;

#[test]
fn scrapy_crawl_goes_through_pool_proxies() {
    let python = python_or_skip!("scrapy_crawl_goes_through_pool_proxies");
    ensure_modules(&SCRAPY).unwrap_or_else(|err| panic!("{err}"));
    let pool = populated_service("");
    let dir = tempfile::tempdir().unwrap();
    let items = dir.path().join("items.json");
    let (output, stdout, stderr) = run(Command::new(python)
        .args(["-c", SCRAPY_CRAWL])
        .arg(format!("http://{}", pool.service.addr))
        .arg(pool.farm.judge_url())
        .arg(&items)
        .current_dir(dir.path())
        .env("PYTHONPATH", recipes_dir()));
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let text =
        std::fs::read_to_string(&items).unwrap_or_else(|err| panic!("no items ({err}): {stderr}"));
    let items: Vec<Value> = serde_json::from_str(&text).expect("items JSON");
    assert_eq!(items.len(), 4, "{text}\n{stderr}");
    let farm = farm_ips(&pool);
    for item in &items {
        let origin = item["origin"].as_str().unwrap_or_default();
        let proxy = item["proxy"].as_str().unwrap_or_default();
        assert!(farm.contains(origin), "not through a farm proxy: {item}");
        // The judge saw the very proxy the pool handed out.
        assert!(proxy.contains(&format!("//{origin}:")), "{item}");
        assert!(proxy.starts_with("http"), "Scrapy was given {proxy}");
    }
    assert_eq!(reported(&pool, "scrapy-real"), (4, 0));
}
