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
            header(RETRY_AFTER).and_then(|v| parse_retry_after(&v, chrono::Utc::now()))
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
        // The parser knows the format, so what of the cut end it can use.
        bytes.truncate(max_bytes as usize);
    }
    Ok(Downloaded::Body {
        bytes,
        truncated,
        validators,
    })
}

/// The longest wait a Retry-After may ask for; beyond it the list's own
/// schedule (and backoff) applies again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// Retry-After as a wait from `now`: delay-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`, and the obsolete RFC 850 and asctime
/// forms RFC 9110 asks recipients to accept). A date in the past means no
/// wait; anything unreadable is ignored.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value)
        .map(|d| d.with_timezone(&chrono::Utc))
        .ok()
        .or_else(|| {
            ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
                .iter()
                .find_map(|format| chrono::NaiveDateTime::parse_from_str(value, format).ok())
                .map(|naive| naive.and_utc())
        })?;
    let wait = (date - now).to_std().unwrap_or(Duration::ZERO);
    Some(wait.min(MAX_RETRY_AFTER))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let s = Duration::from_secs;
        assert_eq!(parse_retry_after(" 120 ", now), Some(s(120)));
        assert_eq!(parse_retry_after("999999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now),
            Some(s(120))
        );
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:28:30 GMT", now),
            Some(s(30))
        );
        assert_eq!(
            parse_retry_after("Wed Oct 21 07:29:00 2015", now),
            Some(s(60))
        );
        // A date gone by: no wait. A date too far: capped.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Fri, 21 Oct 2016 07:28:00 GMT", now),
            Some(MAX_RETRY_AFTER)
        );
        for junk in ["", "soon", "-5", "1.5", "Wed, 99 Oct 2015 07:28:00 GMT"] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk}");
        }
    }
}
