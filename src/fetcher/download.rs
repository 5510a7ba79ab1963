//! One bounded, polite download of a proxy list: the whole download within a
//! timeout, the body streamed and cut at a byte cap, conditional requests from
//! the last answer's ETag and Last-Modified, and Retry-After honoured.

use std::io::Read;
use std::time::Duration;

use ureq::http::header::{ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RETRY_AFTER};

/// Validators from the last answer, sent back to ask "changed since?".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheValidators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// A successful download.
#[derive(Debug)]
pub enum Downloaded {
    /// 304: the list did not change since the last answer.
    NotModified,
    Body {
        bytes: Vec<u8>,
        /// The body went on beyond the cap and was cut there.
        truncated: bool,
        validators: CacheValidators,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("http status {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
}

impl DownloadError {
    /// How long the server asked us to wait (429 and 503 with Retry-After).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DownloadError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// An agent for list downloads: every call bounded by `timeout` as a whole.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(5)
        .user_agent(concat!("proxy-pool/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// Downloads `url`, reading at most `max_bytes` of its body.
pub fn download(
    agent: &ureq::Agent,
    url: &str,
    timeout: Duration,
    max_bytes: u64,
    validators: &CacheValidators,
) -> Result<Downloaded, DownloadError> {
    let mut request = agent.get(url);
    if let Some(etag) = &validators.etag {
        request = request.header(IF_NONE_MATCH, etag);
    }
    if let Some(modified) = &validators.last_modified {
        request = request.header(IF_MODIFIED_SINCE, modified);
    }
    let response = request
        .call()
        .map_err(|err| transport_error(err, timeout))?;
    let status = response.status().as_u16();
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v: &ureq::http::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    if status == 304 {
        return Ok(Downloaded::NotModified);
    }
    if status != 200 {
        let retry_after = if status == 429 || status == 503 {
            header(RETRY_AFTER).and_then(|v| parse_retry_after(&v))
        } else {
            None
        };
        return Err(DownloadError::Status {
            status,
            retry_after,
        });
    }
    let validators = CacheValidators {
        etag: header(ETAG),
        last_modified: header(LAST_MODIFIED),
    };
    let reader = response.into_body().into_reader();
    let mut bytes = Vec::with_capacity(64 * 1024);
    // One byte beyond the cap tells a cut body from one that fits exactly.
    reader
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|err| io_error(err, timeout))?;
    let truncated = bytes.len() as u64 > max_bytes;
    if truncated {
        bytes.truncate(max_bytes as usize);
        // The last line is probably cut in two: drop the part after the last newline.
        let keep = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map(|i| i + 1)
            .unwrap_or(0);
        bytes.truncate(keep);
    }
    Ok(Downloaded::Body {
        bytes,
        truncated,
        validators,
    })
}

/// Retry-After as seconds (the HTTP-date form is rare for lists; ignored).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(86_400)))
}

fn transport_error(err: ureq::Error, timeout: Duration) -> DownloadError {
    match err {
        ureq::Error::Timeout(_) => DownloadError::Timeout(timeout),
        ureq::Error::Io(io) => io_error(io, timeout),
        other => DownloadError::Transport(other.to_string()),
    }
}

fn io_error(err: std::io::Error, timeout: Duration) -> DownloadError {
    let text = err.to_string();
    if err.kind() == std::io::ErrorKind::TimedOut || text.contains("timeout") {
        DownloadError::Timeout(timeout)
    } else {
        DownloadError::Transport(text)
    }
}

/// Why a 200 body is clearly not a proxy list, if it is not.
pub fn not_a_list(bytes: &[u8], parsed: usize) -> Option<&'static str> {
    if parsed > 0 {
        return None;
    }
    let start: Vec<u8> = bytes
        .iter()
        .skip_while(|b| b.is_ascii_whitespace() || **b == 0xEF || **b == 0xBB || **b == 0xBF)
        .take(64)
        .map(|b| b.to_ascii_lowercase())
        .collect();
    if start.starts_with(b"<!doctype") || start.starts_with(b"<html") || start.starts_with(b"<") {
        return Some("not a proxy list: the body is an HTML page");
    }
    if start.starts_with(b"{") || start.starts_with(b"[") {
        return Some("not a proxy list: the body is JSON");
    }
    if bytes.iter().take(4096).any(|&b| b == 0) {
        return Some("not a proxy list: the body is binary");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_and_json_bodies_are_not_lists() {
        assert!(not_a_list(b"  <!DOCTYPE html><html>", 0).is_some());
        assert!(not_a_list(b"{\"error\":\"rate limited\"}", 0).is_some());
        assert!(not_a_list(b"\x00\x01\x02", 0).is_some());
        assert_eq!(not_a_list(b"<html> 1.2.3.4:80", 3), None);
        assert_eq!(not_a_list(b"# empty list\n", 0), None);
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
