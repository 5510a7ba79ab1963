//! The HTTP API (rouille): the only module that knows HTTP and JSON. Every
//! request is answered from memory; get-proxy and feedback never touch the
//! database. Errors map to statuses in one place ([`ApiError`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rouille::{Request, Response};
use serde_json::json;

use crate::config::ServerConfig;
use crate::health::Health;

/// Everything a request handler may read.
pub struct ApiContext {
    pub server: ServerConfig,
    pub health: Arc<Health>,
}

/// A client's mistake or a refusal, rendered as `{"error": ...}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn into_response(self) -> Response {
        Response::json(&json!({ "error": self.message })).with_status_code(self.status)
    }
}

/// A running API server; stops when dropped or on [`ApiServer::stop`].
pub struct ApiServer {
    pub local_addr: SocketAddr,
    handle: Option<std::thread::JoinHandle<()>>,
    stop: Option<std::sync::mpsc::Sender<()>>,
}

impl ApiServer {
    pub fn start(context: Arc<ApiContext>) -> Result<ApiServer, String> {
        let bind = context.server.bind;
        let workers = context.server.workers;
        let server = rouille::Server::new(bind, move |request| handle(&context, request))
            .map_err(|err| format!("cannot listen on {bind}: {err}"))?
            .pool_size(workers);
        let local_addr = server.server_addr();
        let (handle, stop) = server.stoppable();
        Ok(ApiServer {
            local_addr,
            handle: Some(handle),
            stop: Some(stop),
        })
    }

    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn handle(context: &ApiContext, request: &Request) -> Response {
    let started = Instant::now();
    let response = route(context, request).unwrap_or_else(ApiError::into_response);
    log::info!(
        "{} {} {} {}us",
        request.method(),
        request.url(),
        response.status_code,
        started.elapsed().as_micros()
    );
    response
}

fn route(context: &ApiContext, request: &Request) -> Result<Response, ApiError> {
    match request.url().as_str() {
        "/health" => {
            only_get(request)?;
            Ok(health(context))
        }
        _ => Err(ApiError::new(
            404,
            format!("no such endpoint: {}", request.url()),
        )),
    }
}

fn only_get(request: &Request) -> Result<(), ApiError> {
    if request.method() == "GET" {
        return Ok(());
    }
    Err(ApiError::new(
        405,
        format!("method {} not allowed: use GET", request.method()),
    ))
}

fn health(context: &ApiContext) -> Response {
    let database_up = context.health.database_up();
    Response::json(&json!({
        "status": if database_up { "ok" } else { "degraded" },
        "database": if database_up { "up" } else { "down" },
        "active_proxies": 0,
        "snapshot_age_seconds": context.health.snapshot_age_seconds(),
    }))
}
