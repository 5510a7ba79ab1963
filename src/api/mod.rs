//! The HTTP API (rouille): the only module that knows HTTP and JSON. Every
//! request is answered from memory; get-proxy and feedback never touch the
//! database. Errors map to statuses in one place ([`ApiError`]).

mod error;
mod params;
mod render;
pub mod server;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use crossbeam_channel::Sender;
use rouille::{Request, Response};
use serde_json::{json, Value};

use crate::config::{is_valid_source_name, Config};
use crate::fetcher::Fetcher;
use crate::health::Health;
use crate::logging::{self, Escaped};
use crate::metrics::Metrics;
use crate::persist::Snapshotter;
use crate::state::{NoProxyReason, State};
use crate::validator::cycle::Validator;

use self::error::accepted;
pub use self::error::{ApiError, ErrorKind};
use self::params::Query;

/// The operator dashboard: one self-contained page that reads the JSON API.
const DASHBOARD: &str = include_str!("dashboard.html");
/// The OpenAPI 3 description of this API (checked against real answers in tests).
const OPENAPI: &str = include_str!("openapi.json");

/// Feedback items accepted in one request.
pub const MAX_FEEDBACK_ITEMS: usize = 1000;
/// The longest proxy URL a feedback item may name.
const MAX_FEEDBACK_URL_BYTES: usize = 512;
/// Room for the largest legal feedback item (a 64-character source, a
/// [`MAX_FEEDBACK_URL_BYTES`] URL, `false`) as a pretty-printing serializer
/// writes it inside an array, separator included.
const MAX_FEEDBACK_ITEM_BYTES: usize = 700;
/// The body of a full feedback batch of the largest items: `max_body_bytes`
/// below this refuses some legal batches (`check-config` says so).
pub const FULL_FEEDBACK_BATCH_BYTES: usize = MAX_FEEDBACK_ITEMS * MAX_FEEDBACK_ITEM_BYTES;

/// Everything a request handler may read.
pub struct ApiContext {
    pub config: Arc<Config>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub state: Arc<State>,
    pub snapshotter: Arc<Snapshotter>,
    pub fetcher: Arc<Fetcher>,
    pub validator: Arc<Validator>,
    /// Enqueues a validation cycle (holds at most one).
    pub validate_now: Sender<()>,
}

/// A running API server; stops when dropped or on [`ApiServer::stop`].
pub struct ApiServer {
    pub local_addr: SocketAddr,
    server: server::HttpServer,
}

impl ApiServer {
    pub fn start(context: Arc<ApiContext>) -> Result<ApiServer, String> {
        let config = &context.config.server;
        let bind = config.bind;
        let limits = server::Limits {
            workers: config.workers,
            max_connections: config.max_connections,
            max_connections_per_ip: config.max_connections_per_ip,
            read_timeout: config.read_timeout,
        };
        let max_body_bytes = config.max_body_bytes;
        let server = server::HttpServer::start(
            bind,
            limits,
            // One limit for every endpoint, /feedback included.
            Box::new(move |_path| max_body_bytes),
            Box::new(move |request| handle(&context, request)),
        )
        .map_err(|err| format!("cannot listen on {bind}: {err}"))?;
        Ok(ApiServer {
            local_addr: server.local_addr,
            server,
        })
    }

    /// Stops accepting; requests in progress finish.
    pub fn stop(&mut self) {
        self.server.stop();
    }
}

fn handle(context: &ApiContext, request: &Request) -> Response {
    let started = Instant::now();
    let path = request.url();
    let endpoint = Metrics::endpoint_label(&path);
    let response = route(context, request, &path).unwrap_or_else(ApiError::into_response);
    let elapsed = started.elapsed();
    context
        .metrics
        .observe(endpoint, response.status_code, elapsed.as_secs_f64());
    log::info!(
        target: logging::ACCESS_TARGET,
        "{} {} {} {}us",
        Escaped(request.method()),
        Escaped(&path),
        response.status_code,
        elapsed.as_micros()
    );
    response
}

fn route(context: &ApiContext, request: &Request, path: &str) -> Result<Response, ApiError> {
    // The dashboard page itself holds no data: it asks for the token and
    // sends it with its API calls.
    let public = matches!(path, "/health" | "/judge" | "/");
    if !public {
        authorize(context, request)?;
    }
    match path {
        "/get-proxy" => {
            allow(request, "GET")?;
            get_proxy(context, request)
        }
        "/feedback" => {
            allow(request, "POST")?;
            feedback(context, request)
        }
        "/health" => {
            allow(request, "GET")?;
            Ok(Response::json(&render::health(context)))
        }
        "/stats" => {
            allow(request, "GET")?;
            Query::parse(request, &[])?;
            Ok(Response::json(&render::stats(context, Utc::now())))
        }
        "/metrics" => {
            allow(request, "GET")?;
            Ok(Response::from_data(
                "text/plain; version=0.0.4; charset=utf-8",
                render::metrics(context),
            ))
        }
        "/judge" => {
            allow(request, "GET")?;
            Ok(judge(request))
        }
        "/" => {
            allow(request, "GET")?;
            Ok(Response::html(DASHBOARD))
        }
        "/openapi.json" => {
            allow(request, "GET")?;
            Ok(Response::from_data("application/json", OPENAPI))
        }
        "/admin/snapshot" => {
            allow(request, "POST")?;
            let info = context
                .snapshotter
                .write()
                .map_err(|err| ApiError::unavailable(format!("snapshot not written: {err}")))?;
            Ok(accepted(&json!({
                "status": "written",
                "entries": info.entries,
                "bytes": info.bytes,
                "duration_ms": info.duration.as_millis() as u64,
            })))
        }
        "/admin/fetch" => {
            allow(request, "POST")?;
            context.fetcher.trigger_all();
            Ok(accepted(&json!({"status": "enqueued"})))
        }
        "/admin/validate" => {
            allow(request, "POST")?;
            let status = match context.validate_now.try_send(()) {
                Ok(()) => "enqueued",
                Err(crossbeam_channel::TrySendError::Full(_)) => "already_enqueued",
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                    return Err(ApiError::unavailable("the validator is not running"))
                }
            };
            Ok(accepted(&json!({ "status": status })))
        }
        _ => {
            if let Some(name) = path.strip_prefix("/sources/") {
                allow(request, "GET")?;
                return source(context, request, name);
            }
            Err(ApiError::not_found(format!("no such endpoint: {path}")))
        }
    }
}

/// Compares in constant time, so the token cannot be guessed byte by byte
/// from response times.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (i, byte) in expected.iter().enumerate() {
        difference |= usize::from(byte ^ given.get(i).copied().unwrap_or(!byte));
    }
    difference == 0
}

fn authorize(context: &ApiContext, request: &Request) -> Result<(), ApiError> {
    let Some(token) = &context.config.server.api_token else {
        return Ok(());
    };
    // The scheme name is case-insensitive (RFC 9110).
    let given = request
        .header("Authorization")
        .and_then(|h| h.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
        .unwrap_or("");
    if same_secret(given.trim().as_bytes(), token.expose().as_bytes()) {
        return Ok(());
    }
    Err(ApiError::unauthorized())
}

fn allow(request: &Request, method: &'static str) -> Result<(), ApiError> {
    if request.method() == method {
        return Ok(());
    }
    Err(ApiError::method_not_allowed(request.method(), method))
}

fn get_proxy(context: &ApiContext, request: &Request) -> Result<Response, ApiError> {
    let query = Query::parse(
        request,
        &[
            "source",
            "protocol",
            "https",
            "country",
            "anonymity",
            "max_latency_ms",
            "count",
            "format",
        ],
    )?;
    let source = query.source()?;
    let pick_query = query.pick_query()?;
    let text = query.format_is_text()?;
    let picks = match context.state.get_proxy(source, &pick_query, Utc::now()) {
        Ok(picks) => picks,
        Err(mut none) => {
            // Without a ban's end to wait for, a new cycle may bring proxies.
            let wait = match none.reason {
                NoProxyReason::AllBanned => Duration::from_secs(60),
                _ => context.config.scheduler.interval,
            };
            none.retry_after = none.retry_after.or(Some(wait));
            return Err(ApiError::from(none).for_source(source));
        }
    };
    if text {
        let mut body = String::with_capacity(picks.len() * 32);
        for pick in &picks {
            body.push_str(&pick.url);
            body.push('\n');
        }
        return Ok(Response::text(body));
    }
    if pick_query.count > 1 {
        let proxies: Vec<Value> = picks.iter().map(|p| render::pick(p, None)).collect();
        return Ok(Response::json(
            &json!({ "source": source, "proxies": proxies }),
        ));
    }
    // get_proxy returns at least one pick when it succeeds.
    let first = picks
        .first()
        .ok_or_else(|| ApiError::unavailable("no proxy available"))?;
    Ok(Response::json(&render::pick(first, Some(source))))
}

/// Reads the body, which the transport has read whole already, within
/// `max_body_bytes` (a larger one was answered 413 there).
fn read_body(request: &Request) -> Result<Vec<u8>, ApiError> {
    let Some(mut data) = request.data() else {
        return Err(ApiError::bad_request("request body already read"));
    };
    let mut body = Vec::new();
    data.read_to_end(&mut body)
        .map_err(|err| ApiError::bad_request(format!("cannot read the request body: {err}")))?;
    Ok(body)
}

/// One feedback item, checked.
struct FeedbackItem {
    source: String,
    proxy: String,
    success: bool,
}

fn feedback_item(value: &Value, position: Option<usize>) -> Result<FeedbackItem, ApiError> {
    let at = position.map(|i| format!("item {i}: ")).unwrap_or_default();
    let Some(object) = value.as_object() else {
        return Err(ApiError::bad_request(format!(
            "{at}expected an object {{\"source\", \"proxy\", \"success\"}}"
        )));
    };
    let source = match object.get("source") {
        Some(Value::String(s)) if is_valid_source_name(s) => s.clone(),
        Some(Value::String(_)) => {
            return Err(ApiError::bad_request(format!(
                "{at}field source: expected 1-64 characters of A-Za-z0-9_.-"
            )))
        }
        _ => {
            return Err(ApiError::bad_request(format!(
                "{at}field source: expected a string"
            )))
        }
    };
    let proxy = match object.get("proxy") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_FEEDBACK_URL_BYTES => s.clone(),
        _ => {
            return Err(ApiError::bad_request(format!(
                "{at}field proxy: expected the proxy URL as get-proxy returned it"
            )))
        }
    };
    let success = match object.get("success") {
        Some(Value::Bool(b)) => *b,
        _ => {
            return Err(ApiError::bad_request(format!(
                "{at}field success: expected true or false"
            )))
        }
    };
    Ok(FeedbackItem {
        source,
        proxy,
        success,
    })
}

fn feedback(context: &ApiContext, request: &Request) -> Result<Response, ApiError> {
    // `?source=` is optional: it lets a load balancer route feedback to the
    // instance that serves that source; every item must then name it.
    let query = Query::parse(request, &["source"])?;
    let routed_source = match query.get("source") {
        Some(_) => Some(query.source()?.to_string()),
        None => None,
    };
    let body = read_body(request)?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|err| ApiError::bad_request(format!("body is not valid JSON: {err}")))?;
    let now = Utc::now();
    let check_routing = |item: &FeedbackItem, position: Option<usize>| match &routed_source {
        Some(source) if *source != item.source => {
            let at = position.map(|i| format!("item {i}: ")).unwrap_or_default();
            Err(ApiError::bad_request(format!(
                "{at}field source {:?} differs from the query's source {source:?}",
                item.source
            )))
        }
        _ => Ok(()),
    };
    let apply = |item: &FeedbackItem| -> Result<Value, ApiError> {
        match context
            .state
            .feedback(&item.source, &item.proxy, item.success, now)
        {
            Ok(outcome) => Ok(render::feedback(&item.source, &item.proxy, &outcome)),
            Err(err) => Err(ApiError::from(err).for_source(&item.source)),
        }
    };
    match &value {
        Value::Array(values) => {
            if values.is_empty() || values.len() > MAX_FEEDBACK_ITEMS {
                return Err(ApiError::bad_request(format!(
                    "expected 1 to {MAX_FEEDBACK_ITEMS} feedback objects, found {}",
                    values.len()
                )));
            }
            // Every item is checked before any is applied: a bad batch changes nothing.
            let items = values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let item = feedback_item(v, Some(i))?;
                    check_routing(&item, Some(i))?;
                    Ok(item)
                })
                .collect::<Result<Vec<_>, ApiError>>()?;
            let mut known = 0;
            let answers: Vec<Value> = items
                .iter()
                .map(|item| match apply(item) {
                    Ok(answer) => {
                        known += 1;
                        answer
                    }
                    Err(err) => json!({ "error": err.message, "source": item.source }),
                })
                .collect();
            if known == 0 {
                return Err(ApiError::not_found(
                    "unknown proxy: no item names a proxy this service knows",
                ));
            }
            Ok(Response::json(&Value::Array(answers)))
        }
        _ => {
            let item = feedback_item(&value, None)?;
            check_routing(&item, None)?;
            Ok(Response::json(&apply(&item)?))
        }
    }
}

fn source(context: &ApiContext, request: &Request, name: &str) -> Result<Response, ApiError> {
    if !is_valid_source_name(name) {
        return Err(ApiError::bad_request(
            "source name: expected 1-64 characters of A-Za-z0-9_.-",
        ));
    }
    let query = Query::parse(request, &["limit"])?;
    let limit = query.number("limit", 1, 10_000)?.unwrap_or(100) as usize;
    match context.state.source_view(name, limit, Utc::now()) {
        Some(view) => Ok(Response::json(&render::source_view(&view))),
        None => Err(ApiError::not_found(format!("unknown source: {name}")).for_source(name)),
    }
}

fn judge(request: &Request) -> Response {
    let headers: Vec<(String, String)> = request
        .headers()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let host = request.header("Host").unwrap_or("localhost");
    let path_and_query = match request.raw_query_string() {
        "" => request
            .raw_url()
            .split('?')
            .next()
            .unwrap_or("/judge")
            .to_string(),
        query => format!("{}?{query}", request.url()),
    };
    let body = crate::judge::echo(
        request.method(),
        &path_and_query,
        host,
        &headers,
        request.remote_addr().ip(),
    );
    Response::json(&body)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3cretx", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
        assert!(!same_secret(b"S3cret", b"s3cret"));
    }

    #[test]
    fn a_full_batch_of_the_largest_feedback_items_fits_the_default_limit() {
        let item = json!({
            "source": "s".repeat(64),
            "proxy": format!("socks5://{}@1.2.3.4:1080", "u".repeat(MAX_FEEDBACK_URL_BYTES - 22)),
            "success": false,
        });
        assert_eq!(
            item["proxy"].as_str().unwrap().len(),
            MAX_FEEDBACK_URL_BYTES
        );
        assert!(feedback_item(&item, None).is_ok());
        let batch = Value::Array(vec![item; MAX_FEEDBACK_ITEMS]);
        let limit = FULL_FEEDBACK_BATCH_BYTES;
        assert!(serde_json::to_string_pretty(&batch).unwrap().len() <= limit);
        assert!(serde_json::to_string(&batch).unwrap().len() <= limit);
        let default = crate::config::DEFAULT_MAX_BODY_BYTES as usize;
        assert!(
            default >= limit,
            "the default max_body_bytes takes a full batch"
        );
    }
}
