//! A proxy given in parts rather than as one line: a JSON object, a CSV row,
//! a page's table row. One set of rules for all of them: which names mean
//! which part ([`column`]), and how the parts make proxies ([`Fields::keys`]),
//! checked as the line rules check a line.

use super::text::{build_key, find_scheme_end, masked_excerpt, parse_address, parse_line};
use super::text::{parse_port, parse_protocols};
use super::{ParseOptions, RejectReason};
use crate::proxy::{Protocol, ProxyKey};

/// What a JSON key or a CSV header names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Column {
    /// The address alone (`ip`, `host`, `address`), or `host:port`.
    Address,
    Port,
    /// A proxy as a URL or `host:port` (`proxy`, `url`, `ip:port`).
    Proxy,
    /// The protocol or protocols (`protocol`, `type`, `protocols`).
    Protocol,
    /// A column or key named after a protocol (`socks5`): its proxies have it.
    Named(Protocol),
    Username,
    Password,
}

/// What `name` names, case and punctuation aside (`IP Address`, `ip_address`
/// and `ipAddress` are one name); None for anything else (country, speed...).
pub(super) fn column(name: &str) -> Option<Column> {
    let mut normal = [0u8; 16];
    let mut length = 0;
    for byte in name.bytes().filter(u8::is_ascii_alphanumeric) {
        *normal.get_mut(length)? = byte.to_ascii_lowercase();
        length += 1;
    }
    let column = match &normal[..length] {
        b"ip" | b"host" | b"address" | b"ipaddress" | b"ipaddr" | b"server" => Column::Address,
        b"port" => Column::Port,
        b"proxy" | b"url" | b"ipport" | b"hostport" | b"proxyurl" | b"proxyaddress" => {
            Column::Proxy
        }
        b"protocol" | b"protocols" | b"type" | b"types" | b"scheme" | b"proxytype" => {
            Column::Protocol
        }
        b"username" | b"user" | b"login" => Column::Username,
        b"password" | b"pass" | b"pwd" => Column::Password,
        b"http" => Column::Named(Protocol::Http),
        b"https" => Column::Named(Protocol::Https),
        b"socks4" => Column::Named(Protocol::Socks4),
        b"socks5" => Column::Named(Protocol::Socks5),
        _ => return None,
    };
    Some(column)
}

/// A port as a list gives it: text (CSV, pages, JSON strings) or a JSON number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Port<'a> {
    Text(&'a str),
    Number(u64),
    /// A JSON value that is no port at all (`true`, `8080.5`).
    Invalid,
}

impl Port<'_> {
    fn value(self) -> Result<u16, RejectReason> {
        match self {
            Port::Text(text) => parse_port(text.trim()),
            Port::Number(number @ 1..=65535) => Ok(number as u16),
            Port::Number(_) | Port::Invalid => Err(RejectReason::InvalidPort),
        }
    }
}

impl std::fmt::Display for Port<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Port::Text(text) => f.write_str(text),
            Port::Number(number) => write!(f, "{number}"),
            Port::Invalid => f.write_str("?"),
        }
    }
}

/// The parts of one proxy; empty strings count as absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Fields<'a> {
    pub address: Option<&'a str>,
    pub port: Option<Port<'a>>,
    pub proxy: Option<&'a str>,
    /// Each one a protocol or a list of them (`HTTP, HTTPS`).
    pub protocols: Vec<&'a str>,
    /// The protocol when `protocols` names none, before the list's default:
    /// that of a column or key named after a protocol.
    pub protocol_hint: Option<Protocol>,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
}

impl<'a> Fields<'a> {
    /// Sets a part by its name; other names are ignored. A part given twice
    /// keeps its first value (`ip` and `host` both present).
    pub fn set(&mut self, column: Column, value: &'a str) {
        let value = value.trim();
        if value.is_empty() {
            return;
        }
        let slot = match column {
            Column::Address => &mut self.address,
            Column::Proxy => &mut self.proxy,
            Column::Username => &mut self.username,
            Column::Password => &mut self.password,
            Column::Port => {
                self.port.get_or_insert(Port::Text(value));
                return;
            }
            Column::Protocol => {
                self.protocols.push(value);
                return;
            }
            Column::Named(_) => return,
        };
        slot.get_or_insert(value);
    }

    /// Whether the parts name a proxy at all: an address or a proxy URL.
    pub fn names_a_proxy(&self) -> bool {
        self.address.is_some() || self.proxy.is_some()
    }

    /// The proxies the parts give: one per protocol named (a URL's own
    /// scheme wins), with the parts' credentials unless the URL has its own.
    pub fn keys(&self, options: &ParseOptions) -> Result<Vec<ProxyKey>, RejectReason> {
        let mut protocols = Vec::new();
        for text in &self.protocols {
            parse_protocols(text, &mut protocols)?;
        }
        let default_protocol = protocols
            .first()
            .copied()
            .or(self.protocol_hint)
            .unwrap_or(options.default_protocol);
        let credentials = match (self.username, self.password) {
            (Some(user), password) => Some((user.to_string(), password.map(str::to_string))),
            (None, Some(_)) => return Err(RejectReason::BadCredentials),
            (None, None) => None,
        };
        let (key, has_scheme) = match (self.address, self.port, self.proxy) {
            (Some(address), Some(port), _) => {
                let ip = parse_address(address)?;
                let key = build_key(default_protocol, ip, port.value()?, credentials, options)?;
                (key, false)
            }
            (_, _, Some(text)) | (Some(text), None, None) => {
                let options = ParseOptions {
                    default_protocol,
                    ..*options
                };
                let mut key = parse_line(text, &options)?.ok_or(RejectReason::Malformed)?;
                if let (None, Some((user, password))) = (&key.username, credentials) {
                    key.username = Some(user);
                    key.password = password;
                }
                (key, find_scheme_end(text.trim()).is_some())
            }
            (None, _, None) => return Err(RejectReason::Malformed),
        };
        if has_scheme || protocols.len() <= 1 {
            return Ok(vec![key]);
        }
        Ok(protocols
            .into_iter()
            .map(|protocol| ProxyKey {
                protocol,
                ..key.clone()
            })
            .collect())
    }

    /// The parts for a diagnostic, credentials masked.
    pub fn excerpt(&self) -> String {
        let credentials = if self.username.is_some() || self.password.is_some() {
            "***@"
        } else {
            ""
        };
        let scheme = self
            .protocols
            .first()
            .map(|protocol| format!("{protocol}://"))
            .unwrap_or_default();
        match (self.address, self.port, self.proxy) {
            (Some(address), Some(port), _) => format!("{scheme}{credentials}{address}:{port}"),
            (_, _, Some(text)) | (Some(text), None, None) => masked_excerpt(text),
            (None, Some(port), None) => format!("no address, port {port}"),
            (None, None, None) => "no address".to_string(),
        }
    }
}
