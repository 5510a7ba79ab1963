//! The handlers in memory: requests built with `Request::fake_http` go
//! through the router and the error map, with no socket and no database (the
//! store's pool connects lazily and is never used by these endpoints).

use std::sync::Arc;

use chrono::Utc;
use rouille::Request;
use serde_json::Value;

use super::*;
use crate::proxy::{ActiveProxy, Anonymity, Protocol, ProxyKey};
use crate::store::Store;
use crate::validator::check::{CheckConfig, Checker};
use crate::validator::cycle::ValidatorSettings;

struct Fixture {
    context: ApiContext,
    /// The validate worker's end of `validate_now`; dropping it stands for
    /// a validator that stopped.
    validate_jobs: Option<crossbeam_channel::Receiver<()>>,
    _dir: tempfile::TempDir,
}

fn fixture(extra: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[database]\nurl = postgres://nobody@127.0.0.1:1/none\n\
         [fetcher]\nsource_urls = http://127.0.0.1:9/list.txt\n\
         [validator]\nvalidation_target = http://127.0.0.1:9/judge\nvalidation_workers = 1\n\
         [state]\nsnapshot_path = {}\n{extra}",
        dir.path().join("stats.bin").display()
    );
    let config = Arc::new(Config::parse(&text, "test.ini", None).expect("config"));
    let store = Store::connect(&config.database).expect("a lazy pool");
    let health = Arc::new(Health::new());
    let state = Arc::new(State::new(&config.scoring).with_max_sources(config.state.max_sources));
    let fetcher = Arc::new(Fetcher::new(
        &config,
        store.clone(),
        health.clone(),
        "test".into(),
    ));
    let checker = Checker::new(CheckConfig::from_validator(&config.validator)).expect("checker");
    let settings = ValidatorSettings {
        workers: 1,
        timeout: config.validator.timeout,
        policy: crate::app::due_policy(&config),
    };
    let validator = Arc::new(
        Validator::new(
            store,
            checker,
            None,
            settings,
            state.clone(),
            health.clone(),
        )
        .expect("validator"),
    );
    let snapshotter = Arc::new(
        Snapshotter::new(
            config.state.snapshot_path.clone(),
            state.clone(),
            health.clone(),
        )
        .expect("snapshotter"),
    );
    let (validate_now, validate_jobs) = crossbeam_channel::bounded(1);
    Fixture {
        context: ApiContext {
            config,
            health,
            metrics: Arc::new(Metrics::new()),
            state,
            snapshotter,
            fetcher,
            validator,
            validate_now,
        },
        validate_jobs: Some(validate_jobs),
        _dir: dir,
    }
}

fn proxy(id: i64) -> ActiveProxy {
    ActiveProxy {
        id,
        key: ProxyKey::new(
            Protocol::Http,
            format!("127.0.9.{id}").parse().unwrap(),
            8080,
        ),
        latency_ms: Some(100),
        anonymity: Some(Anonymity::Elite),
        country: Some("US".into()),
        supports_https: Some(false),
        last_validated_at: Some(Utc::now()),
        anonymity_evidence: None,
        exit_ip: None,
    }
}

type Headers = Vec<(
    std::borrow::Cow<'static, str>,
    std::borrow::Cow<'static, str>,
)>;

fn call(context: &ApiContext, method: &str, url: &str, body: &str) -> (u16, Value, Headers) {
    let headers = vec![("Content-Type".to_string(), "application/json".to_string())];
    let request = Request::fake_http(method, url, headers, body.as_bytes().to_vec());
    let response = handle(context, &request);
    let (mut reader, _) = response.data.into_reader_and_size();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut reader, &mut text).expect("body");
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (response.status_code, json, response.headers)
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref())
}

#[test]
fn a_missing_source_is_a_400_that_says_so() {
    let fixture = fixture("");
    let (status, body, _) = call(&fixture.context, "GET", "/get-proxy", "");
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("source"), "{body}");
}

#[test]
fn an_empty_pool_is_a_503_no_active_with_retry_after() {
    let fixture = fixture("");
    let (status, body, response) = call(&fixture.context, "GET", "/get-proxy?source=app", "");
    assert_eq!(status, 503);
    assert_eq!(body["reason"], "no_active");
    assert_eq!(body["source"], "app");
    assert_eq!(header(&response, "Retry-After"), Some("60"));
}

#[test]
fn a_pick_and_its_feedback_round_trip() {
    let fixture = fixture("");
    fixture.context.state.replace_active(vec![proxy(1)]);
    let (status, body, _) = call(&fixture.context, "GET", "/get-proxy?source=app", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["proxy"], "http://127.0.9.1:8080");
    let feedback = r#"{"source":"app","proxy":"http://127.0.9.1:8080","success":true}"#;
    let (status, body, _) = call(&fixture.context, "POST", "/feedback", feedback);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success_count"], 1);
    let unknown = r#"{"source":"app","proxy":"http://127.0.9.2:8080","success":true}"#;
    let (status, body, _) = call(&fixture.context, "POST", "/feedback", unknown);
    assert_eq!(status, 404);
    assert_eq!(body["source"], "app");
}

#[test]
fn a_source_past_max_sources_is_a_503_too_many_sources() {
    let fixture = fixture("max_sources = 1\n");
    fixture.context.state.replace_active(vec![proxy(1)]);
    assert_eq!(
        call(&fixture.context, "GET", "/get-proxy?source=a", "").0,
        200
    );
    let (status, body, response) = call(&fixture.context, "GET", "/get-proxy?source=b", "");
    assert_eq!(status, 503);
    assert_eq!(body["reason"], "too_many_sources");
    assert!(
        body["error"].as_str().unwrap().contains("at most 1"),
        "{body}"
    );
    assert_eq!(header(&response, "Retry-After"), Some("3600"));
}

#[test]
fn wrong_methods_tokens_and_paths_are_4xx() {
    let fixture = fixture("[server]\napi_token = s3cret\n");
    let (status, _, response) = call(&fixture.context, "GET", "/stats", "");
    assert_eq!(status, 401);
    assert_eq!(header(&response, "WWW-Authenticate"), Some("Bearer"));
    // /health needs no token; a wrong method there is a 405 naming the right one.
    let (status, _, response) = call(&fixture.context, "POST", "/health", "");
    assert_eq!(status, 405);
    assert_eq!(header(&response, "Allow"), Some("GET"));
    let (status, _, _) = call(&fixture.context, "GET", "/health", "");
    assert_eq!(status, 200);
}

#[test]
fn admin_requests_are_accepted() {
    let mut fixture = fixture("");
    let (status, body, _) = call(&fixture.context, "POST", "/admin/validate", "");
    assert_eq!(status, 202);
    assert_eq!(body["status"], "enqueued");
    let (status, body, _) = call(&fixture.context, "POST", "/admin/validate", "");
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("already_enqueued"))
    );
    fixture.validate_jobs = None;
    let (status, body, _) = call(&fixture.context, "POST", "/admin/validate", "");
    assert_eq!(status, 503, "{body}");
    let (status, body, _) = call(&fixture.context, "GET", "/nope", "");
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("/nope"));
}
