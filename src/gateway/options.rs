//! Who is asking, and for what: the gateway's proxy credentials. The
//! username is a source followed by options (`my_app-country-DE-session-s1`),
//! the password is `[server] api_token`. One pure function reads them.

use crate::proxy::{Anonymity, Protocol};
use crate::state::PickQuery;

/// The source of a client that gave no credentials to a gateway without a
/// token.
pub const ANONYMOUS_SOURCE: &str = "gateway";
/// The longest session ID kept.
const MAX_SESSION_CHARS: usize = 64;
/// The longest source name, as get-proxy allows.
const MAX_SOURCE_CHARS: usize = 64;

/// The options a username carries.
const KEYS: &[&str] = &[
    "country",
    "protocol",
    "anonymity",
    "https",
    "maxlatency",
    "session",
];

/// What a client's username asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    pub source: String,
    /// The get-proxy filters (`count` is 1).
    pub query: PickQuery,
    /// A sticky session's ID.
    pub session: Option<String>,
}

/// A username that cannot be read, named so the client can fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("bad source {found:?} in the proxy username: expected 1-64 of A-Za-z0-9_. before the first -KEY-VALUE option")]
    BadSource { found: String },
    #[error("unknown option {found:?} in the proxy username: expected one of {}", KEYS.join(", "))]
    UnknownKey { found: String },
    #[error("option {key} has no value in the proxy username: expected -{key}-VALUE")]
    MissingValue { key: &'static str },
    #[error("bad value {found:?} for option {key} in the proxy username: expected {expected}")]
    BadValue {
        key: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("option {key} appears twice in the proxy username")]
    Repeated { key: &'static str },
}

/// Why a client may not use the gateway.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("proxy credentials required: the password is the service's api_token")]
    Missing,
    #[error("wrong proxy password: expected the service's api_token")]
    WrongToken,
}

/// Checks the password against `token` (anything goes without a token).
pub fn check_password(password: Option<&str>, token: Option<&str>) -> Result<(), AuthError> {
    let Some(token) = token else {
        return Ok(());
    };
    match password {
        None => Err(AuthError::Missing),
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(AuthError::WrongToken),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a username: the source is everything before the first `-KEY-`
/// with a known KEY, then `-KEY-VALUE` pairs. No username (or an empty one)
/// is the source [`ANONYMOUS_SOURCE`].
pub fn parse_username(username: Option<&str>) -> Result<ClientOptions, OptionError> {
    let username = username.unwrap_or("");
    if username.is_empty() {
        return Ok(ClientOptions {
            source: ANONYMOUS_SOURCE.to_string(),
            query: PickQuery::default(),
            session: None,
        });
    }
    let parts: Vec<&str> = username.split('-').collect();
    // The source ends before the first part that is a known key and has a
    // part after it: `my-app-country-DE` is source `my-app`.
    let split = (1..parts.len())
        .find(|&i| KEYS.contains(&parts[i]) && i + 1 < parts.len())
        .unwrap_or(parts.len());
    let source = parts[..split].join("-");
    if !is_source_name(&source) {
        return Err(OptionError::BadSource { found: source });
    }
    let mut options = ClientOptions {
        source,
        query: PickQuery::default(),
        session: None,
    };
    let mut seen: Vec<&'static str> = Vec::new();
    let mut rest = &parts[split..];
    while let Some((&key_text, after)) = rest.split_first() {
        let key = KEYS
            .iter()
            .copied()
            .find(|k| *k == key_text)
            .ok_or_else(|| OptionError::UnknownKey {
                found: key_text.to_string(),
            })?;
        let (&value, after) = after
            .split_first()
            .ok_or(OptionError::MissingValue { key })?;
        if seen.contains(&key) {
            return Err(OptionError::Repeated { key });
        }
        seen.push(key);
        apply(&mut options, key, value)?;
        rest = after;
    }
    Ok(options)
}

fn apply(options: &mut ClientOptions, key: &'static str, value: &str) -> Result<(), OptionError> {
    let bad = |expected: &'static str| OptionError::BadValue {
        key,
        found: value.to_string(),
        expected,
    };
    let query = &mut options.query;
    match key {
        "country" => {
            if value.len() != 2 || !value.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(bad("a two-letter ISO 3166 country code"));
            }
            query.country = Some(value.to_ascii_uppercase());
        }
        "protocol" => {
            query.protocol = Some(
                Protocol::from_scheme(&value.to_ascii_lowercase())
                    .ok_or_else(|| bad("http, https, socks4 or socks5"))?,
            );
        }
        "anonymity" => {
            query.anonymity = Some(
                Anonymity::parse(&value.to_ascii_lowercase())
                    .ok_or_else(|| bad("elite, anonymous or transparent"))?,
            );
        }
        "https" => {
            query.https_only = match value.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => return Err(bad("true or false")),
            };
        }
        "maxlatency" => {
            let ms = value
                .parse::<u32>()
                .ok()
                .filter(|ms| *ms > 0)
                .ok_or_else(|| bad("a latency in milliseconds, 1 or more"))?;
            query.max_latency_ms = Some(ms);
        }
        "session" => {
            let fits = !value.is_empty()
                && value.len() <= MAX_SESSION_CHARS
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
            if !fits {
                return Err(bad("1-64 of A-Za-z0-9_."));
            }
            options.session = Some(value.to_string());
        }
        _ => unreachable!("every key of KEYS is applied"),
    }
    Ok(())
}

/// A source name as get-proxy accepts it.
fn is_source_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SOURCE_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(username: &str) -> Result<ClientOptions, OptionError> {
        parse_username(Some(username))
    }

    #[test]
    fn no_username_is_the_gateway_source() {
        for username in [None, Some("")] {
            let options = parse_username(username).unwrap();
            assert_eq!(options.source, "gateway");
            assert_eq!(options.query, PickQuery::default());
            assert_eq!(options.session, None);
        }
    }

    #[test]
    fn a_bare_source_has_no_filters() {
        let options = parse("my_app").unwrap();
        assert_eq!(options.source, "my_app");
        assert_eq!(options.query, PickQuery::default());
        assert_eq!(options.session, None);
    }

    #[test]
    fn every_option_sets_its_filter() {
        let options = parse("my_app-country-de").unwrap();
        assert_eq!(options.query.country.as_deref(), Some("DE"));
        let options = parse("my_app-protocol-socks5").unwrap();
        assert_eq!(options.query.protocol, Some(Protocol::Socks5));
        let options = parse("my_app-anonymity-elite").unwrap();
        assert_eq!(options.query.anonymity, Some(Anonymity::Elite));
        let options = parse("my_app-https-true").unwrap();
        assert!(options.query.https_only);
        let options = parse("my_app-https-false").unwrap();
        assert!(!options.query.https_only);
        let options = parse("my_app-maxlatency-800").unwrap();
        assert_eq!(options.query.max_latency_ms, Some(800));
        let options = parse("my_app-session-abc123").unwrap();
        assert_eq!(options.session.as_deref(), Some("abc123"));
        assert_eq!(options.query, PickQuery::default());
    }

    #[test]
    fn options_combine_in_any_order() {
        let options = parse("my_app-session-s1-anonymity-elite-https-true-country-US").unwrap();
        assert_eq!(options.source, "my_app");
        assert_eq!(options.session.as_deref(), Some("s1"));
        assert_eq!(options.query.anonymity, Some(Anonymity::Elite));
        assert!(options.query.https_only);
        assert_eq!(options.query.country.as_deref(), Some("US"));
    }

    #[test]
    fn the_source_runs_to_the_first_known_key() {
        let options = parse("my-app-v2-country-DE").unwrap();
        assert_eq!(options.source, "my-app-v2");
        assert_eq!(options.query.country.as_deref(), Some("DE"));
        // A key as the last part has no value: it belongs to the source.
        assert_eq!(parse("my-session").unwrap().source, "my-session");
        assert_eq!(parse("app.prod_1").unwrap().source, "app.prod_1");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("my_app-country-DE-colour-red").unwrap_err();
        assert_eq!(
            err,
            OptionError::UnknownKey {
                found: "colour".into()
            }
        );
        assert!(err.to_string().contains("\"colour\""), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("my_app-country-DEU", "country"),
            ("my_app-country-1A", "country"),
            ("my_app-protocol-ftp", "protocol"),
            ("my_app-anonymity-secret", "anonymity"),
            ("my_app-https-maybe", "https"),
            ("my_app-maxlatency-fast", "maxlatency"),
            ("my_app-maxlatency-0", "maxlatency"),
            ("my_app-maxlatency--5", "maxlatency"),
            ("my_app-session-a%20b", "session"),
        ];
        for (username, key) in cases {
            match parse(username) {
                Err(OptionError::BadValue { key: found, .. }) => {
                    assert_eq!(found, key, "{username}")
                }
                // `-5` splits into an empty value and a stray part.
                Err(OptionError::UnknownKey { .. }) if username.contains("--") => {}
                other => panic!("{username}: {other:?}"),
            }
        }
        let long = format!("my_app-session-{}", "s".repeat(65));
        assert!(matches!(
            parse(&long),
            Err(OptionError::BadValue { key: "session", .. })
        ));
    }

    #[test]
    fn missing_and_repeated_values_are_errors() {
        assert_eq!(
            parse("my_app-country-DE-session"),
            Err(OptionError::MissingValue { key: "session" })
        );
        assert_eq!(
            parse("my_app-country-DE-country-US"),
            Err(OptionError::Repeated { key: "country" })
        );
    }

    #[test]
    fn bad_sources_are_refused() {
        for username in [
            "-country-DE",
            "my app",
            "my/app",
            "é",
            &"a".repeat(65),
            "app:x",
        ] {
            assert!(
                matches!(parse(username), Err(OptionError::BadSource { .. })),
                "{username}"
            );
        }
    }

    #[test]
    fn the_password_is_the_token() {
        assert_eq!(check_password(None, None), Ok(()));
        assert_eq!(check_password(Some("anything"), None), Ok(()));
        assert_eq!(check_password(Some("t0k"), Some("t0k")), Ok(()));
        assert_eq!(check_password(None, Some("t0k")), Err(AuthError::Missing));
        assert_eq!(
            check_password(Some("t0"), Some("t0k")),
            Err(AuthError::WrongToken)
        );
        assert_eq!(
            check_password(Some(""), Some("t0k")),
            Err(AuthError::WrongToken)
        );
    }
}
