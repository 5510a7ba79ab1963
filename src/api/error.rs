//! The one map from what went wrong to an HTTP status. Handlers return
//! [`ApiError`]s built from the state's errors through `From`, or from the
//! named constructors below; no handler writes a status number.

use std::time::Duration;

use rouille::Response;
use serde_json::Value;

use crate::state::{FeedbackError, NoProxy, NoProxyReason, TooManySources};

/// What kind of refusal an error is; each kind is one status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client's parameters or body are wrong.
    BadRequest,
    /// The token is missing or wrong.
    Unauthorized,
    /// The endpoint, source or proxy is unknown.
    NotFound,
    /// The endpoint exists under another method.
    MethodNotAllowed,
    /// The service cannot serve now (no proxy, full, a part not running).
    Unavailable,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Unavailable => 503,
        }
    }
}

/// A client's mistake or a refusal, rendered as `{"error": ...}`.
#[derive(Debug)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub extra: Vec<(&'static str, Value)>,
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
            extra: Vec::new(),
            headers: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::NotFound, message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Unavailable, message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            ErrorKind::Unauthorized,
            "missing or wrong token: send Authorization: Bearer <api_token>",
        )
        .with_header("WWW-Authenticate", "Bearer".into())
    }

    pub fn method_not_allowed(used: &str, allowed: &'static str) -> ApiError {
        ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!("method {used} not allowed here: use {allowed}"),
        )
        .with_header("Allow", allowed.into())
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    pub fn with(mut self, key: &'static str, value: Value) -> ApiError {
        self.extra.push((key, value));
        self
    }

    /// Names the client source the error is about (`"source": ...`).
    pub fn for_source(self, source: &str) -> ApiError {
        self.with("source", Value::String(source.to_string()))
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> ApiError {
        self.headers.push((name, value));
        self
    }

    /// A `Retry-After` of whole seconds, at least one.
    pub fn retry_after(self, wait: Duration) -> ApiError {
        self.with_header("Retry-After", wait.as_secs().max(1).to_string())
    }

    /// The one place where errors become responses.
    pub fn into_response(self) -> Response {
        let status = self.status();
        let mut body = serde_json::Map::new();
        body.insert("error".into(), Value::String(self.message));
        for (key, value) in self.extra {
            body.insert(key.into(), value);
        }
        let mut response = Response::json(&Value::Object(body)).with_status_code(status);
        for (name, value) in self.headers {
            response = response.with_additional_header(name, value);
        }
        response
    }
}

/// A new source refused at `[state] max_sources`: a 503 like any other
/// capacity limit, not a 4xx (the name is valid; the service is full).
impl From<TooManySources> for ApiError {
    fn from(err: TooManySources) -> ApiError {
        ApiError::unavailable(err.to_string())
            .with("reason", Value::String("too_many_sources".into()))
            .retry_after(Duration::from_secs(3600))
    }
}

/// "No proxy available", with why; `Retry-After` comes from the state when
/// it knows (the earliest ban's end), else from the caller's default.
impl From<NoProxy> for ApiError {
    fn from(none: NoProxy) -> ApiError {
        if let NoProxyReason::TooManySources(err) = none.reason {
            return err.into();
        }
        let error = ApiError::unavailable("no proxy available")
            .with("reason", Value::String(none.reason.as_str().into()));
        match none.retry_after {
            Some(wait) => error.retry_after(wait),
            None => error,
        }
    }
}

impl From<FeedbackError> for ApiError {
    fn from(err: FeedbackError) -> ApiError {
        match err {
            FeedbackError::UnknownProxy => {
                ApiError::not_found("unknown proxy: expected a proxy URL as get-proxy returned it")
            }
            FeedbackError::TooManySources(err) => err.into(),
        }
    }
}

/// A `202 Accepted` JSON answer, for work enqueued or done on request.
pub fn accepted(body: &Value) -> Response {
    Response::json(body).with_status_code(202)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
        response
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }

    #[test]
    fn each_kind_is_one_status() {
        let statuses: Vec<u16> = [
            ErrorKind::BadRequest,
            ErrorKind::Unauthorized,
            ErrorKind::NotFound,
            ErrorKind::MethodNotAllowed,
            ErrorKind::Unavailable,
        ]
        .iter()
        .map(|kind| kind.status())
        .collect();
        assert_eq!(statuses, [400, 401, 404, 405, 503]);
    }

    #[test]
    fn too_many_sources_is_a_503_with_its_reason_and_an_hour_to_wait() {
        let response = ApiError::from(TooManySources { max_sources: 3 })
            .for_source("app")
            .into_response();
        assert_eq!(response.status_code, 503);
        assert_eq!(header(&response, "Retry-After"), Some("3600"));
        let error = ApiError::from(FeedbackError::TooManySources(TooManySources {
            max_sources: 3,
        }));
        assert_eq!(error.status(), 503);
        assert!(error
            .extra
            .iter()
            .any(|(k, v)| *k == "reason" && v == "too_many_sources"));
    }

    #[test]
    fn an_unknown_proxy_is_a_404() {
        assert_eq!(ApiError::from(FeedbackError::UnknownProxy).status(), 404);
    }

    #[test]
    fn refusals_carry_their_headers() {
        let response = ApiError::method_not_allowed("PUT", "GET").into_response();
        assert_eq!(response.status_code, 405);
        assert_eq!(header(&response, "Allow"), Some("GET"));
        let response = ApiError::unauthorized().into_response();
        assert_eq!(response.status_code, 401);
        assert_eq!(header(&response, "WWW-Authenticate"), Some("Bearer"));
    }
}
