//! The "judge": an httpbin-compatible `/get` echo. A validator sends a request
//! through a proxy to a judge and reads back what arrived (headers, origin) to
//! decide whether the proxy works and how much it reveals. The function here is
//! pure so that the service's own `GET /judge` and the test farm share it.

use std::net::IpAddr;

use serde_json::{Map, Value};

/// Builds the JSON body httpbin's `GET /get` answers for one request.
///
/// `path_and_query` is the request target as the server saw it (`/get?a=1`),
/// `host` the `Host` header (or the authority the server knows itself by),
/// `headers` every request header in arrival order, and `origin` the TCP peer.
/// Header names come out in canonical Title-Case (`x-forwarded-for` becomes
/// `X-Forwarded-For`); repeated headers are joined with `,` as httpbin does.
/// Query parameters are percent-decoded; a repeated parameter becomes an array
/// of strings, a single one a string. `method` is accepted for the endpoints
/// that echo other methods; `/get` does not include it in the body.
pub fn echo(
    method: &str,
    path_and_query: &str,
    host: &str,
    headers: &[(String, String)],
    origin: IpAddr,
) -> Value {
    let _ = method;
    let mut body = Map::new();
    body.insert("args".to_owned(), Value::Object(query_args(path_and_query)));
    body.insert("headers".to_owned(), Value::Object(echo_headers(headers)));
    body.insert("origin".to_owned(), Value::String(origin.to_string()));
    body.insert(
        "url".to_owned(),
        Value::String(format!("http://{host}{path_and_query}")),
    );
    Value::Object(body)
}

/// Turns `x-FORWARDED-for` into `X-Forwarded-For`, the way httpbin (through
/// werkzeug) presents header names.
pub fn canonical_header_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper_next = true;
    for c in name.chars() {
        if upper_next {
            out.extend(c.to_uppercase());
        } else {
            out.extend(c.to_lowercase());
        }
        upper_next = c == '-';
    }
    out
}

fn echo_headers(headers: &[(String, String)]) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, value) in headers {
        let name = canonical_header_name(name.trim());
        match out.get_mut(&name) {
            Some(Value::String(existing)) => {
                existing.push(',');
                existing.push_str(value.trim());
            }
            _ => {
                out.insert(name, Value::String(value.trim().to_owned()));
            }
        }
    }
    out
}

fn query_args(path_and_query: &str) -> Map<String, Value> {
    let mut args = Map::new();
    let Some((_, query)) = path_and_query.split_once('?') else {
        return args;
    };
    // A fragment is never sent by a client, but a hostile one might.
    let query = query.split('#').next().unwrap_or("");
    // Form decoding: `%XX` escapes and `+` for a space; invalid escapes are
    // kept as they are, invalid UTF-8 becomes U+FFFD.
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let key = key.into_owned();
        let value = Value::String(value.into_owned());
        match args.get_mut(&key) {
            Some(Value::Array(values)) => values.push(value),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, value]);
            }
            None => {
                args.insert(key, value);
            }
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn header(name: &str, value: &str) -> (String, String) {
        (name.to_owned(), value.to_owned())
    }

    #[test]
    fn echoes_like_httpbin() {
        let body = echo(
            "GET",
            "/get?a=1&b=two%20words",
            "127.0.0.1:9900",
            &[
                header("host", "127.0.0.1:9900"),
                header("VIA", "1.1 farm-proxy"),
            ],
            "127.3.0.7".parse().unwrap(),
        );
        assert_eq!(
            body,
            json!({
                "args": {"a": "1", "b": "two words"},
                "headers": {"Host": "127.0.0.1:9900", "Via": "1.1 farm-proxy"},
                "origin": "127.3.0.7",
                "url": "http://127.0.0.1:9900/get?a=1&b=two%20words",
            })
        );
    }

    #[test]
    fn header_names_are_title_case() {
        assert_eq!(canonical_header_name("x-forwarded-for"), "X-Forwarded-For");
        assert_eq!(
            canonical_header_name("PROXY-CONNECTION"),
            "Proxy-Connection"
        );
        assert_eq!(canonical_header_name("te"), "Te");
        assert_eq!(canonical_header_name(""), "");
    }

    #[test]
    fn repeated_headers_are_joined_with_commas() {
        let body = echo(
            "GET",
            "/get",
            "judge",
            &[
                header("X-Forwarded-For", "1.1.1.1"),
                header("x-forwarded-for", "2.2.2.2"),
            ],
            "127.0.0.1".parse().unwrap(),
        );
        assert_eq!(body["headers"]["X-Forwarded-For"], "1.1.1.1,2.2.2.2");
    }

    #[test]
    fn repeated_args_become_arrays_and_bare_keys_are_empty_strings() {
        let body = echo(
            "GET",
            "/get?k=1&k=2&k=3&flag&plus=a+b",
            "judge",
            &[],
            "127.0.0.1".parse().unwrap(),
        );
        assert_eq!(
            body["args"],
            json!({"k": ["1", "2", "3"], "flag": "", "plus": "a b"})
        );
    }

    #[test]
    fn no_query_gives_empty_args() {
        let body = echo("GET", "/get", "judge", &[], "::1".parse().unwrap());
        assert_eq!(body["args"], json!({}));
        assert_eq!(body["origin"], "::1");
        assert_eq!(body["url"], "http://judge/get");
    }

    #[test]
    fn broken_percent_escapes_do_not_panic() {
        for query in [
            "/get?a=%",
            "/get?a=%4",
            "/get?a=%zz",
            "/get?%ff=%fe",
            "/get?=&&=",
        ] {
            let body = echo("GET", query, "judge", &[], "127.0.0.1".parse().unwrap());
            assert!(body["args"].is_object(), "{query}");
        }
        let body = echo(
            "GET",
            "/get?a=%4",
            "judge",
            &[],
            "127.0.0.1".parse().unwrap(),
        );
        assert_eq!(body["args"]["a"], "%4");
    }
}
