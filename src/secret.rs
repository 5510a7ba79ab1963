//! Values that must never reach a log line whole: a credential and a URL
//! that may hold a password. Their `Debug` (and, for URLs, `Display`) are
//! written by hand to hide the secret, so that `{:?}` of a config struct or
//! an error that carries one is safe; the real value is read only through
//! `expose()`, which names each place that needs it.

use std::fmt;

/// A credential (the API token): shown as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A URL whose password, if it has one, is shown as `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", redact_url(&self.0))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// Hides the password of a `scheme://user:password@host` URL.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_secret() {
        let token = Secret::new("s3cret");
        assert_eq!(format!("{token:?}"), "Secret(***)");
        assert_eq!(token.expose(), "s3cret");
        let url = SecretUrl::new("postgres://app:pa55@127.0.0.1/db");
        assert_eq!(url.to_string(), "postgres://app:***@127.0.0.1/db");
        assert!(!format!("{url:?}").contains("pa55"));
        assert_eq!(url.expose(), "postgres://app:pa55@127.0.0.1/db");
    }

    #[test]
    fn urls_without_a_password_are_shown_whole() {
        assert_eq!(redact_url("postgres://app@h/db"), "postgres://app@h/db");
        assert_eq!(redact_url("http://h/a@b"), "http://h/a@b");
        assert_eq!(redact_url("no url"), "no url");
    }
}
