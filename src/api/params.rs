//! Query-string parameters, checked: unknown names are refused (a typo must not
//! silently widen a filter) and every bad value names its parameter and what
//! is allowed.

use rouille::Request;

use crate::config::is_valid_source_name;
use crate::proxy::{Anonymity, Protocol};
use crate::state::{PickQuery, MAX_COUNT};

use super::ApiError;

pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Decodes the query string, refusing names outside `allowed` and repeats.
    pub fn parse(request: &Request, allowed: &[&str]) -> Result<Query, ApiError> {
        let raw = request.raw_query_string();
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
            if !allowed.contains(&name.as_ref()) {
                let accepted = if allowed.is_empty() {
                    "this endpoint takes no parameters".to_string()
                } else {
                    format!("accepted: {}", allowed.join(", "))
                };
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {:?}; {accepted}",
                    truncate(&name)
                )));
            }
            if pairs.iter().any(|(n, _)| n == name.as_ref()) {
                return Err(ApiError::bad_request(format!(
                    "parameter {name} given twice"
                )));
            }
            pairs.push((name.into_owned(), value.into_owned()));
        }
        Ok(Query { pairs })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn source(&self) -> Result<&str, ApiError> {
        match self.get("source") {
            None => Err(ApiError::bad_request(
                "parameter source is required: the name of your application (1-64 of A-Za-z0-9_.-)",
            )),
            Some(name) if is_valid_source_name(name) => Ok(name),
            Some(name) => Err(ApiError::bad_request(format!(
                "parameter source: expected 1-64 characters of A-Za-z0-9_.-, found {:?}",
                truncate(name)
            ))),
        }
    }

    /// A whole number in `min..=max`, if given.
    pub fn number(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let Some(text) = self.get(name) else {
            return Ok(None);
        };
        match text.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::bad_request(format!(
                "parameter {name}: expected a whole number from {min} to {max}, found {:?}",
                truncate(text)
            ))),
        }
    }

    pub fn pick_query(&self) -> Result<PickQuery, ApiError> {
        let protocol = match self.get("protocol") {
            None => None,
            Some(text) => Some(
                ["http", "https", "socks4", "socks5"]
                    .contains(&text)
                    .then(|| Protocol::from_scheme(text))
                    .flatten()
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "parameter protocol: expected http, https, socks4 or socks5, found {:?}",
                            truncate(text)
                        ))
                    })?,
            ),
        };
        let https_only = match self.get("https") {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") => true,
            Some(text) => {
                return Err(ApiError::bad_request(format!(
                    "parameter https: expected true or false, found {:?}",
                    truncate(text)
                )))
            }
        };
        let country = match self.get("country") {
            None => None,
            Some(text) if text.len() == 2 && text.bytes().all(|b| b.is_ascii_alphabetic()) => {
                Some(text.to_ascii_uppercase())
            }
            Some(text) => {
                return Err(ApiError::bad_request(format!(
                    "parameter country: expected an ISO 3166 alpha-2 code such as US, found {:?}",
                    truncate(text)
                )))
            }
        };
        let anonymity = match self.get("anonymity") {
            None => None,
            Some(text) => Some(Anonymity::parse(text).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "parameter anonymity: expected elite, anonymous or transparent, found {:?}",
                    truncate(text)
                ))
            })?),
        };
        let max_latency_ms = self
            .number("max_latency_ms", 1, u32::MAX as u64)?
            .map(|n| n as u32);
        let count = self.number("count", 1, MAX_COUNT as u64)?.unwrap_or(1) as usize;
        Ok(PickQuery {
            protocol,
            https_only,
            country,
            anonymity,
            max_latency_ms,
            count,
        })
    }

    pub fn format_is_text(&self) -> Result<bool, ApiError> {
        match self.get("format") {
            None | Some("json") => Ok(false),
            Some("text") => Ok(true),
            Some(text) => Err(ApiError::bad_request(format!(
                "parameter format: expected json or text, found {:?}",
                truncate(text)
            ))),
        }
    }
}

/// Echoes at most 64 characters of what the client sent.
fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}
