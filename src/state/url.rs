//! Reads back the proxy URLs that [`ProxyKey::url`] writes, so that stats
//! restored from a snapshot (keyed by URL) name a full [`ProxyKey`] even for
//! proxies this process has not seen active yet.

use crate::proxy::{Protocol, ProxyKey};

/// Parses `scheme://[user[:password]@]host:port`. Only the canonical form is
/// accepted (the result's `url()` gives back exactly `url`), so a slot's URL
/// and key can never disagree.
pub(crate) fn parse_proxy_url(url: &str) -> Option<ProxyKey> {
    let (scheme, rest) = url.split_once("://")?;
    let protocol = Protocol::from_scheme(scheme)?;
    let (userinfo, host_port) = match rest.rsplit_once('@') {
        Some((userinfo, host_port)) => (Some(userinfo), host_port),
        None => (None, rest),
    };
    let (host, port) = host_port.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host);
    let mut key = ProxyKey::new(protocol, host.parse().ok()?, port.parse().ok()?);
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        key.username = Some(percent_decode(user)?);
        key.password = match password {
            Some(password) => Some(percent_decode(password)?),
            None => None,
        };
    }
    (key.url() == url).then_some(key)
}

/// Decodes `%XX` escapes. An invalid escape is kept as written, and then
/// the URL is not the one [`ProxyKey::url`] writes, so it is refused.
fn percent_decode(text: &str) -> Option<String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrips_what_proxy_key_writes() {
        let mut key = ProxyKey::new(Protocol::Socks5, "1.2.3.4".parse().unwrap(), 1080);
        key.username = Some("us er:@".into());
        key.password = Some("p@ss:wörd".into());
        assert_eq!(parse_proxy_url(&key.url()), Some(key));
        let v6 = ProxyKey::new(Protocol::Http, "2001:db8::1".parse().unwrap(), 8080);
        assert_eq!(parse_proxy_url(&v6.url()), Some(v6));
    }

    #[test]
    fn rejects_non_canonical_and_malformed_urls() {
        for bad in [
            "SOCKS5://1.2.3.4:1080",
            "http://example.com:80",
            "http://1.2.3.4",
            "http://1.2.3.4:99999",
            "ftp://1.2.3.4:21",
            "http://u:%zz@1.2.3.4:80",
            "",
        ] {
            assert_eq!(parse_proxy_url(bad), None, "{bad}");
        }
    }
}
