//! The farm's one HTTP server: the judge at `/get` and the proxy lists under
//! `/lists/NAME`, one small thread per connection, one request per connection
//! (every answer says `Connection: close`, which keeps the proxies' relaying
//! simple: a response ends when the judge closes).

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::lists;
use crate::wire::{self, Bound, Head};
use crate::Shared;
use proxy_pool::judge;

const HTTP_DATE: &str = "%a, %d %b %Y %H:%M:%S GMT";

/// Serves one connection to the judge and list server.
pub(crate) fn serve_connection(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let bound = Bound {
        deadline: Instant::now() + shared.spec.connection_limit,
        stop: &shared.stop,
    };
    let head = match wire::read_head(&mut stream, bound) {
        Ok(Some(head)) => head,
        _ => return,
    };
    let target = origin_form(&head.target);
    let route = target.split(['?', '#']).next().unwrap_or("");
    let result = if route == "/get" {
        serve_judge(&mut stream, &head, &target, peer, &shared, bound)
    } else if let Some(name) = route.strip_prefix("/lists/") {
        serve_list(&mut stream, &head, name, &shared, bound)
    } else {
        let body = b"not found: the farm serves /get and /lists/NAME\n";
        wire::write_response(&mut stream, 404, &[], body, bound)
    };
    if let Err(error) = result {
        log::debug!("farm server: answer to {peer} cut short: {error}");
    }
}

/// A request sent to the judge directly in absolute form still reaches it.
fn origin_form(target: &str) -> String {
    match wire::parse_absolute_uri(target) {
        Some((_, path)) => path,
        None => target.to_owned(),
    }
}

fn serve_judge(
    stream: &mut TcpStream,
    head: &Head,
    target: &str,
    peer: SocketAddr,
    shared: &Shared,
    bound: Bound,
) -> std::io::Result<()> {
    if head.method != "GET" && head.method != "HEAD" {
        return wire::write_response(stream, 405, &[], b"", bound);
    }
    if shared.judge_down.load(Ordering::Relaxed) {
        let body = b"<html><body>503 Service Unavailable</body></html>\n";
        return wire::write_response(stream, 503, &[], body, bound);
    }
    shared.judge_hits.fetch_add(1, Ordering::Relaxed);
    let server = shared.server_addr.to_string();
    let host = head.header("host").unwrap_or(&server);
    let echo = judge::echo(&head.method, target, host, &head.headers, peer.ip());
    let mut body = serde_json::to_string_pretty(&echo).unwrap_or_default();
    body.push('\n');
    let headers = [("Content-Type", "application/json".to_owned())];
    let body = if head.method == "HEAD" {
        ""
    } else {
        body.as_str()
    };
    wire::write_response(stream, 200, &headers, body.as_bytes(), bound)
}

fn serve_list(
    stream: &mut TcpStream,
    head: &Head,
    name: &str,
    shared: &Shared,
    bound: Bound,
) -> std::io::Result<()> {
    *shared.list_hits.lock().entry(name.to_owned()).or_insert(0) += 1;
    let fixed = shared.lists.lock().get(name).cloned();
    if let Some(list) = fixed {
        let validators = [
            ("ETag", list.etag.clone()),
            ("Last-Modified", list.modified.format(HTTP_DATE).to_string()),
        ];
        if not_modified(head, &list.etag, list.modified) {
            return wire::write_head(stream, 304, &validators, bound);
        }
        let headers = [
            ("Content-Type", "text/plain; charset=utf-8".to_owned()),
            validators[0].clone(),
            validators[1].clone(),
        ];
        return wire::write_response(stream, 200, &headers, &list.body, bound);
    }
    let spec = &shared.spec;
    match name {
        "huge" => {
            write_stream_head(stream, "text/plain", bound)?;
            let mut chunk = String::with_capacity(64 * 1024);
            for n in 0..spec.huge_lines as u64 {
                chunk.push_str(&lists::generated_line(n));
                if chunk.len() >= 60 * 1024 {
                    wire::write_all(stream, chunk.as_bytes(), bound)?;
                    chunk.clear();
                }
            }
            wire::write_all(stream, chunk.as_bytes(), bound)
        }
        "endless" => {
            write_stream_head(stream, "text/plain", bound)?;
            let mut n = 0u64;
            loop {
                let mut chunk = String::with_capacity(16 * 1024);
                while chunk.len() < 16 * 1024 {
                    chunk.push_str(&lists::generated_line(n));
                    n += 1;
                }
                wire::write_all(stream, chunk.as_bytes(), bound)?;
            }
        }
        "slow" => {
            write_stream_head(stream, "text/plain", bound)?;
            for chunk in 0..spec.slow_chunks as u64 {
                if chunk > 0 && !bound.sleep(spec.slow_chunk_delay) {
                    return Ok(());
                }
                let lines: String = (0..3)
                    .map(|i| lists::generated_line(chunk * 3 + i))
                    .collect();
                wire::write_all(stream, lines.as_bytes(), bound)?;
            }
            Ok(())
        }
        "hang" => {
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n";
            wire::write_all(stream, head.as_bytes(), bound)?;
            wire::drain_until_closed(stream, bound);
            Ok(())
        }
        "error500" => {
            let body = b"internal server error\n";
            wire::write_response(stream, 500, &[], body, bound)
        }
        "html" => {
            let headers = [("Content-Type", "text/html; charset=utf-8".to_owned())];
            let body = lists::html_page().as_bytes();
            wire::write_response(stream, 200, &headers, body, bound)
        }
        "json-error" => {
            let headers = [("Content-Type", "application/json".to_owned())];
            let body = lists::json_error_page().as_bytes();
            wire::write_response(stream, 200, &headers, body, bound)
        }
        "unavailable" => {
            let wait = Duration::from_secs(lists::UNAVAILABLE_RETRY_AFTER_SECONDS);
            let headers = [(
                "Retry-After",
                (Utc::now() + wait).format(HTTP_DATE).to_string(),
            )];
            let body = b"down for maintenance\n";
            wire::write_response(stream, 503, &headers, body, bound)
        }
        "ratelimit" => {
            let headers = [("Retry-After", "2".to_owned())];
            wire::write_response(stream, 429, &headers, b"slow down\n", bound)
        }
        "redirect-loop" => {
            let location = format!("http://{}/lists/redirect-loop", shared.server_addr);
            let headers = [("Location", location)];
            wire::write_response(stream, 302, &headers, b"", bound)
        }
        "longline" => {
            write_stream_head(stream, "text/plain", bound)?;
            let chunk = vec![b'7'; 64 * 1024];
            let mut left = lists::LONGLINE_BYTES;
            while left > 0 {
                let n = left.min(chunk.len());
                wire::write_all(stream, &chunk[..n], bound)?;
                left -= n;
            }
            wire::write_all(stream, b"\n", bound)
        }
        "binary" => {
            let headers = [("Content-Type", "application/octet-stream".to_owned())];
            let body = lists::binary(spec.seed);
            wire::write_response(stream, 200, &headers, &body, bound)
        }
        _ => {
            let body = format!("no list named {name:?}\n");
            wire::write_response(stream, 404, &[], body.as_bytes(), bound)
        }
    }
}

/// If-None-Match wins over If-Modified-Since, as RFC 9110 says.
fn not_modified(head: &Head, etag: &str, modified: DateTime<Utc>) -> bool {
    if let Some(tags) = head.header("if-none-match") {
        return tags
            .split(',')
            .map(|tag| tag.trim().trim_start_matches("W/"))
            .any(|tag| tag == "*" || tag == etag);
    }
    let Some(since) = head.header("if-modified-since") else {
        return false;
    };
    match NaiveDateTime::parse_from_str(since.trim(), HTTP_DATE) {
        Ok(since) => modified.timestamp() <= since.and_utc().timestamp(),
        Err(_) => false,
    }
}

/// The head of a body that ends when the connection closes.
fn write_stream_head(
    stream: &mut TcpStream,
    content_type: &str,
    bound: Bound,
) -> std::io::Result<()> {
    wire::write_head(
        stream,
        200,
        &[("Content-Type", content_type.to_owned())],
        bound,
    )
}

/// A list served as a whole, with the validators for conditional requests.
#[derive(Clone)]
pub(crate) struct StaticList {
    pub body: Arc<Vec<u8>>,
    pub etag: String,
    pub modified: DateTime<Utc>,
}

impl StaticList {
    /// A new version of a list. Last-Modified has one-second resolution, so a
    /// changed body set within the same second as the old one is dated a
    /// second later, keeping If-Modified-Since honest.
    pub fn new(body: Vec<u8>, previous: Option<&StaticList>, now: DateTime<Utc>) -> StaticList {
        let etag = lists::etag(&body);
        let now = now.with_timezone(&Utc);
        let modified = match previous {
            Some(old) if old.etag == etag => old.modified,
            Some(old) if old.modified.timestamp() >= now.timestamp() => {
                old.modified + Duration::from_secs(1)
            }
            _ => now,
        };
        StaticList {
            body: Arc::new(body),
            etag,
            modified,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_list_in_the_same_second_is_dated_later() {
        let now = Utc::now();
        let first = StaticList::new(b"a".to_vec(), None, now);
        let same = StaticList::new(b"a".to_vec(), Some(&first), now);
        assert_eq!(same.modified, first.modified);
        let changed = StaticList::new(b"b".to_vec(), Some(&first), now);
        assert!(changed.modified.timestamp() > first.modified.timestamp());
    }

    #[test]
    fn http_dates_round_trip() {
        let now = Utc::now();
        let text = now.format(HTTP_DATE).to_string();
        let parsed = NaiveDateTime::parse_from_str(&text, HTTP_DATE).unwrap();
        assert_eq!(parsed.and_utc().timestamp(), now.timestamp());
    }
}
