//! config.ini in two stages: INI text into raw located entries, then a
//! validated typed [`Config`]. Every problem is reported at once, each naming
//! the file, line, section and key, what was found and what is allowed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proxy::Protocol;
pub use crate::secret::redact_url;
use crate::secret::{Secret, SecretUrl};

/// `[server] max_body_bytes` when unset: room for a full feedback batch of
/// the largest items, and some.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1 << 20;

/// The validated configuration of one proxy-pool instance.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub database: DatabaseConfig,
    pub server: ServerConfig,
    pub fetcher: FetcherConfig,
    /// Every list to fetch: `[fetcher] source_urls` first, then `[source.NAME]`.
    pub lists: Vec<ListConfig>,
    pub validator: ValidatorConfig,
    pub scheduler: SchedulerConfig,
    pub scoring: ScoringConfig,
    pub state: StateConfig,
    pub geoip: GeoipConfig,
    pub gateway: GatewayConfig,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DatabaseConfig {
    pub url: SecretUrl,
    pub pool_size: u32,
    /// How long a thread waits for a pooled connection before giving up.
    pub checkout_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub workers: usize,
    pub api_token: Option<Secret>,
    pub max_body_bytes: usize,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Connections one client address may hold at once (at most `max_connections`).
    pub max_connections_per_ip: usize,
    /// A request head, and then its body, must each arrive within this.
    pub read_timeout: Duration,
}

/// Blank, as every `Default` of this file: [`Config`]'s values come from
/// the key table, never from here.
impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            workers: 0,
            api_token: None,
            max_body_bytes: 0,
            max_connections: 0,
            max_connections_per_ip: 0,
            read_timeout: Duration::ZERO,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct FetcherConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub max_bytes: u64,
    pub default_protocol: Protocol,
    pub allow_private_addresses: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListConfig {
    /// `[source.NAME]`'s NAME, or the URL itself for `source_urls` entries.
    pub name: String,
    pub url: String,
    pub interval: Duration,
    /// The protocol of bare `host:port` lines.
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ValidatorConfig {
    pub target: String,
    /// The https check's judge; `None` (empty): no https check.
    pub https_target: Option<String>,
    /// Extra PEM roots for `https_target`, beside the system's.
    pub https_ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub workers: usize,
    pub revalidate_after: Duration,
    /// `None` when `retry_inactive_after_seconds = 0`: inactive proxies are never retried.
    pub retry_inactive_after: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedulerConfig {
    pub interval: Duration,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoringConfig {
    pub initial_score: i32,
    pub success_delta: i32,
    pub failure_delta: i32,
    pub max_score: i32,
    pub ban_threshold: i32,
    pub ban_cooldown: Duration,
    pub ban_cooldown_max: Duration,
    /// On a long candidate list (over 256), the best estimates of the
    /// source that take part in the draw.
    pub top_k: usize,
    /// On a long candidate list, the share of the draw's candidates taken
    /// at random from the whole list (untried proxies included).
    pub explore_ratio: f64,
    /// Each report first multiplies a proxy's discounted counts by this:
    /// the estimate weighs about the last `1 / (1 - discount)` reports.
    pub discount: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateConfig {
    pub snapshot_path: PathBuf,
    pub snapshot_interval: Duration,
    pub sync_interval: Duration,
    /// Sources kept in memory at once; get-proxy for a new one past this is refused.
    pub max_sources: usize,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GeoipConfig {
    pub database: Option<PathBuf>,
}

/// The rotating gateway: the pool as one proxy endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GatewayConfig {
    /// `None`: no gateway (the default).
    pub bind: Option<SocketAddr>,
    /// Client connections at once; beyond that 503 (http) or refused (socks).
    pub max_connections: usize,
    /// Pool proxies tried for one request or tunnel before giving up.
    pub attempts: usize,
    /// One attempt: the connect to the pool proxy, its handshake, and for
    /// plain http the answer's head.
    pub connect_timeout: Duration,
    /// A tunnel or kept-alive connection with no byte either way is closed.
    pub idle_timeout: Duration,
    /// A sticky session is forgotten this long after its last use.
    pub session_ttl: Duration,
    /// Targets in loopback, private, link-local and reserved ranges are
    /// refused unless this is set.
    pub allow_private_targets: bool,
}

/// One thing wrong with a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<u32>,
    pub section: String,
    pub key: Option<String>,
    pub message: String,
}

/// Everything wrong with a configuration file, reported at once.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        write!(
            f,
            "{} has {count} problem{}",
            self.file,
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  {}", self.file)?;
            if let Some(line) = problem.line {
                write!(f, ":{line}")?;
            }
            write!(f, ": [{}]", problem.section)?;
            if let Some(key) = &problem.key {
                write!(f, " {key}")?;
            }
            write!(f, ": {}", problem.message)?;
        }
        Ok(())
    }
}

/// How a key's text is read, with its default and bounds.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A whole number in `min..=max`.
    Whole {
        default: u64,
        min: u64,
        max: u64,
    },
    /// A whole number from -1,000,000 to 1,000,000.
    Signed {
        default: i32,
    },
    /// Seconds, 1 to a year.
    Seconds {
        default: u64,
    },
    /// Seconds, 0 to u32::MAX; 0 means never.
    SecondsOrNever {
        default: u64,
    },
    /// A whole number in `min..=max` that defaults to, and may not exceed,
    /// the value of the key `of` of the same section (read before it).
    WholeAtMost {
        of: &'static str,
        min: u64,
        max: u64,
    },
    /// Milliseconds, 1 to an hour.
    Millis {
        default: u64,
    },
    /// A number from 0 to 1.
    Ratio {
        default: f64,
    },
    Flag {
        default: bool,
    },
    /// A file path that must not be empty.
    FilePath {
        default: &'static str,
    },
    /// A credential: empty means none; shown as `(set)`.
    Secret,
    /// An absolute https URL, or nothing (empty).
    MaybeHttpsUrl {
        default: &'static str,
    },
    /// An absolute http(s) URL, required.
    Url {
        default: &'static str,
    },
    /// An IP address and port.
    Addr {
        default: &'static str,
    },
    /// An IP address and port, or empty for none.
    MaybeAddr,
    Protocol {
        default: Protocol,
    },
    /// A file path; empty is allowed and means none.
    Path {
        default: &'static str,
    },
    /// `[database] url`: a postgres URL, `DATABASE_URL` overrides it.
    DatabaseUrl,
    /// `[fetcher] source_urls`: read into [`Config::lists`] with the
    /// `[source.NAME]` sections.
    ListUrls,
}

/// A key's value once read: what the table's setters store and its getters show.
#[derive(Clone, Debug)]
enum Value {
    Whole(u64),
    Signed(i32),
    Duration(Duration),
    MaybeDuration(Option<Duration>),
    Ratio(f64),
    Flag(bool),
    Text(String),
    MaybeText(Option<String>),
    Secret(Option<Secret>),
    Url(SecretUrl),
    Addr(SocketAddr),
    MaybeAddr(Option<SocketAddr>),
    Protocol(Protocol),
    Path(Option<PathBuf>),
    /// Shown only; never stored (the list URLs are kept in `lists`).
    Shown(String),
    /// Read elsewhere (the list URLs, with the `[source.NAME]` sections).
    Elsewhere,
}

/// One key of config.ini, written once: where it lives, how it reads, and
/// where its value goes in [`Config`]. The table drives parsing, the
/// unknown-key check and `check-config`'s output.
struct Key {
    section: &'static str,
    name: &'static str,
    kind: Kind,
    set: fn(&mut Config, Value),
    get: fn(&Config) -> Value,
}

macro_rules! key {
    ($section:literal, $name:literal, $kind:expr, $($field:ident).+) => {
        Key {
            section: $section,
            name: $name,
            kind: $kind,
            set: |config, value| config.$($field).+ = FromValue::from_value(value),
            get: |config| IntoValue::into_value(config.$($field).+.clone()),
        }
    };
}

/// Every key of the fixed sections, in the order `check-config` shows them.
/// `[source.NAME]` sections take [`LIST_KEYS`].
const KEYS: &[Key] = &[
    Key {
        section: "database",
        name: "url",
        kind: Kind::DatabaseUrl,
        set: |config, value| config.database.url = FromValue::from_value(value),
        get: |config| Value::Url(config.database.url.clone()),
    },
    key!(
        "database",
        "pool_size",
        Kind::Whole {
            default: 8,
            min: 1,
            max: 1000
        },
        database.pool_size
    ),
    key!(
        "database",
        "checkout_timeout_ms",
        Kind::Millis { default: 5000 },
        database.checkout_timeout
    ),
    key!(
        "server",
        "bind",
        Kind::Addr {
            default: "127.0.0.1:8080"
        },
        server.bind
    ),
    key!(
        "server",
        "workers",
        Kind::Whole {
            default: 8,
            min: 1,
            max: 4096
        },
        server.workers
    ),
    key!("server", "api_token", Kind::Secret, server.api_token),
    key!(
        "server",
        "max_body_bytes",
        Kind::Whole {
            default: DEFAULT_MAX_BODY_BYTES,
            min: 64,
            max: 1 << 30
        },
        server.max_body_bytes
    ),
    key!(
        "server",
        "max_connections",
        Kind::Whole {
            default: 1024,
            min: 1,
            max: 65536
        },
        server.max_connections
    ),
    // Unset: no cap per address beyond the total one (clients of a local
    // service all come from 127.0.0.1).
    key!(
        "server",
        "max_connections_per_ip",
        Kind::WholeAtMost {
            of: "max_connections",
            min: 1,
            max: 65536
        },
        server.max_connections_per_ip
    ),
    key!(
        "server",
        "read_timeout_ms",
        Kind::Millis { default: 10_000 },
        server.read_timeout
    ),
    Key {
        section: "fetcher",
        name: "source_urls",
        kind: Kind::ListUrls,
        set: |_, _| {},
        get: |config| {
            let urls: Vec<String> = config
                .lists
                .iter()
                .filter(|list| list.name == list.url)
                .map(|list| redact_url(&list.url))
                .collect();
            Value::Shown(urls.join(","))
        },
    },
    key!(
        "fetcher",
        "interval_seconds",
        Kind::Seconds { default: 300 },
        fetcher.interval
    ),
    key!(
        "fetcher",
        "timeout_ms",
        Kind::Millis { default: 15000 },
        fetcher.timeout
    ),
    key!(
        "fetcher",
        "max_bytes",
        Kind::Whole {
            default: 10_485_760,
            min: 1,
            max: 1 << 40
        },
        fetcher.max_bytes
    ),
    key!(
        "fetcher",
        "default_protocol",
        Kind::Protocol {
            default: Protocol::Http
        },
        fetcher.default_protocol
    ),
    key!(
        "fetcher",
        "allow_private_addresses",
        Kind::Flag { default: false },
        fetcher.allow_private_addresses
    ),
    key!(
        "validator",
        "validation_target",
        Kind::Url {
            default: "http://httpbin.org/get?show_env=1"
        },
        validator.target
    ),
    key!(
        "validator",
        "https_target",
        Kind::MaybeHttpsUrl {
            default: "https://httpbin.org/get?show_env=1"
        },
        validator.https_target
    ),
    key!(
        "validator",
        "https_ca_file",
        Kind::Path { default: "" },
        validator.https_ca_file
    ),
    key!(
        "validator",
        "validation_timeout_ms",
        Kind::Millis { default: 5000 },
        validator.timeout
    ),
    key!(
        "validator",
        "connect_timeout_ms",
        Kind::Millis { default: 3000 },
        validator.connect_timeout
    ),
    key!(
        "validator",
        "validation_workers",
        Kind::Whole {
            default: 100,
            min: 1,
            max: 10_000
        },
        validator.workers
    ),
    key!(
        "validator",
        "revalidate_after_seconds",
        Kind::Seconds { default: 1800 },
        validator.revalidate_after
    ),
    key!(
        "validator",
        "retry_inactive_after_seconds",
        Kind::SecondsOrNever { default: 21600 },
        validator.retry_inactive_after
    ),
    key!(
        "scheduler",
        "interval_seconds",
        Kind::Seconds { default: 60 },
        scheduler.interval
    ),
    key!(
        "scoring",
        "initial_score",
        Kind::Signed { default: 0 },
        scoring.initial_score
    ),
    key!(
        "scoring",
        "success_delta",
        Kind::Signed { default: 1 },
        scoring.success_delta
    ),
    key!(
        "scoring",
        "failure_delta",
        Kind::Signed { default: -5 },
        scoring.failure_delta
    ),
    key!(
        "scoring",
        "max_score",
        Kind::Signed { default: 100 },
        scoring.max_score
    ),
    key!(
        "scoring",
        "ban_threshold",
        Kind::Signed { default: -15 },
        scoring.ban_threshold
    ),
    key!(
        "scoring",
        "ban_cooldown_seconds",
        Kind::Seconds { default: 1800 },
        scoring.ban_cooldown
    ),
    key!(
        "scoring",
        "ban_cooldown_max_seconds",
        Kind::Seconds { default: 21600 },
        scoring.ban_cooldown_max
    ),
    key!(
        "scoring",
        "top_k",
        Kind::Whole {
            default: 10,
            min: 1,
            max: 100_000
        },
        scoring.top_k
    ),
    key!(
        "scoring",
        "explore_ratio",
        Kind::Ratio { default: 0.1 },
        scoring.explore_ratio
    ),
    key!(
        "scoring",
        "discount",
        Kind::Ratio { default: 0.9 },
        scoring.discount
    ),
    key!(
        "state",
        "snapshot_path",
        Kind::FilePath {
            default: "source_stats.bin"
        },
        state.snapshot_path
    ),
    key!(
        "state",
        "snapshot_interval_seconds",
        Kind::Seconds { default: 60 },
        state.snapshot_interval
    ),
    key!(
        "state",
        "sync_interval_seconds",
        Kind::Seconds { default: 30 },
        state.sync_interval
    ),
    key!(
        "state",
        "max_sources",
        Kind::Whole {
            default: 10_000,
            min: 1,
            max: 10_000_000
        },
        state.max_sources
    ),
    key!(
        "geoip",
        "database",
        Kind::Path { default: "" },
        geoip.database
    ),
    key!("gateway", "bind", Kind::MaybeAddr, gateway.bind),
    key!(
        "gateway",
        "max_connections",
        Kind::Whole {
            default: 4096,
            min: 1,
            max: 1_000_000
        },
        gateway.max_connections
    ),
    key!(
        "gateway",
        "attempts",
        Kind::Whole {
            default: 3,
            min: 1,
            max: 20
        },
        gateway.attempts
    ),
    key!(
        "gateway",
        "connect_timeout_ms",
        Kind::Millis { default: 5000 },
        gateway.connect_timeout
    ),
    key!(
        "gateway",
        "idle_timeout_ms",
        Kind::Millis { default: 120_000 },
        gateway.idle_timeout
    ),
    key!(
        "gateway",
        "session_ttl_seconds",
        Kind::Seconds { default: 600 },
        gateway.session_ttl
    ),
    key!(
        "gateway",
        "allow_private_targets",
        Kind::Flag { default: false },
        gateway.allow_private_targets
    ),
];

/// The keys of a `[source.NAME]` section (a proxy list of its own).
const LIST_KEYS: &[&str] = &["url", "interval_seconds", "protocol"];

/// The fixed sections, in table order.
fn sections() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for key in KEYS {
        if !names.contains(&key.section) {
            names.push(key.section);
        }
    }
    names
}

/// Converts a read [`Value`] into a field's type. The table pairs each
/// kind with fields of the matching type; a mismatch is a bug in the table,
/// caught by `every_key_reads_its_default`.
trait FromValue {
    fn from_value(value: Value) -> Self;
}

/// Converts a field back into a [`Value`] for `check-config`.
trait IntoValue {
    fn into_value(self) -> Value;
}

macro_rules! whole_field {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(value: Value) -> $t {
                match value {
                    Value::Whole(n) => n as $t,
                    other => unreachable!("a whole number for a {} field, found {other:?}", stringify!($t)),
                }
            }
        }
        impl IntoValue for $t {
            fn into_value(self) -> Value {
                Value::Whole(self as u64)
            }
        }
    )*};
}
whole_field!(u32, u64, usize);

macro_rules! plain_field {
    ($t:ty, $variant:ident) => {
        impl FromValue for $t {
            fn from_value(value: Value) -> $t {
                match value {
                    Value::$variant(v) => v,
                    other => unreachable!(
                        "{} for a {} field, found {other:?}",
                        stringify!($variant),
                        stringify!($t)
                    ),
                }
            }
        }
        impl IntoValue for $t {
            fn into_value(self) -> Value {
                Value::$variant(self)
            }
        }
    };
}
plain_field!(i32, Signed);
plain_field!(f64, Ratio);
plain_field!(bool, Flag);
plain_field!(SocketAddr, Addr);
plain_field!(Option<SocketAddr>, MaybeAddr);
plain_field!(Protocol, Protocol);
plain_field!(Option<Secret>, Secret);
plain_field!(SecretUrl, Url);
plain_field!(Option<Duration>, MaybeDuration);
plain_field!(Option<PathBuf>, Path);
plain_field!(Option<String>, MaybeText);

plain_field!(Duration, Duration);

impl FromValue for String {
    fn from_value(value: Value) -> String {
        match value {
            Value::Text(text) => text,
            Value::Url(url) => url.expose().to_string(),
            other => unreachable!("text, found {other:?}"),
        }
    }
}

impl IntoValue for String {
    fn into_value(self) -> Value {
        Value::Text(self)
    }
}

impl FromValue for PathBuf {
    fn from_value(value: Value) -> PathBuf {
        PathBuf::from(String::from_value(value))
    }
}

impl IntoValue for PathBuf {
    fn into_value(self) -> Value {
        Value::Text(self.display().to_string())
    }
}

impl Kind {
    /// How `check-config` writes a value of this kind.
    fn show(self, value: &Value) -> String {
        match (self, value) {
            (Kind::Millis { .. }, Value::Duration(d)) => d.as_millis().to_string(),
            (_, Value::Duration(d)) => d.as_secs().to_string(),
            (_, Value::Whole(n)) => n.to_string(),
            (_, Value::MaybeDuration(d)) => d.map(|d| d.as_secs()).unwrap_or(0).to_string(),
            (_, Value::Signed(n)) => n.to_string(),
            (_, Value::Ratio(x)) => x.to_string(),
            (_, Value::Flag(b)) => b.to_string(),
            (_, Value::Text(text)) => text.clone(),
            (_, Value::MaybeText(text)) => text.clone().unwrap_or_default(),
            (_, Value::Secret(secret)) => if secret.is_some() { "(set)" } else { "" }.to_string(),
            (_, Value::Url(url)) => url.to_string(),
            (_, Value::Addr(addr)) => addr.to_string(),
            (_, Value::MaybeAddr(addr)) => addr.map(|a| a.to_string()).unwrap_or_default(),
            (_, Value::Protocol(protocol)) => protocol.to_string(),
            (_, Value::Path(path)) => path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            (_, Value::Shown(text)) => text.clone(),
            (_, Value::Elsewhere) => String::new(),
        }
    }
}

/// A value as written, with the line it came from.
#[derive(Clone, Debug)]
struct Entry {
    line: u32,
    value: String,
}

/// Stage one: sections of located key/value entries, in file order.
#[derive(Debug, Default)]
struct RawIni {
    sections: BTreeMap<String, (u32, BTreeMap<String, Entry>)>,
    list_order: Vec<String>,
}

impl Config {
    /// Reads and validates `path`. `database_url_env` (the `DATABASE_URL`
    /// variable) overrides `[database] url`.
    pub fn load(path: &Path, database_url_env: Option<String>) -> Result<Config, ConfigError> {
        Config::load_as(path, database_url_env, UsesDatabase::Yes)
    }

    /// [`Config::load`] for a command that never opens the database (`stats`
    /// talks to the service over HTTP): `[database] url` may be missing, and
    /// is then empty; one that is given is still checked.
    pub fn load_without_database(path: &Path) -> Result<Config, ConfigError> {
        Config::load_as(path, None, UsesDatabase::No)
    }

    fn load_as(
        path: &Path,
        database_url_env: Option<String>,
        uses: UsesDatabase,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse_as(&text, &file, database_url_env, uses),
            Err(err) => Err(ConfigError {
                file,
                problems: vec![Problem {
                    line: None,
                    section: "-".into(),
                    key: None,
                    message: format!("cannot read the file: {err}"),
                }],
            }),
        }
    }

    /// Parses configuration text; `file` only names it in messages.
    pub fn parse(
        text: &str,
        file: &str,
        database_url_env: Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::parse_as(text, file, database_url_env, UsesDatabase::Yes)
    }

    fn parse_as(
        text: &str,
        file: &str,
        database_url_env: Option<String>,
        uses: UsesDatabase,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let raw = read_raw(text, &mut problems);
        let mut reader = Reader {
            raw: &raw,
            problems,
            uses,
        };
        let config = reader.build(database_url_env);
        if reader.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file: file.to_string(),
                problems: reader.problems,
            })
        }
    }
}

fn read_raw(text: &str, problems: &mut Vec<Problem>) -> RawIni {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut raw = RawIni::default();
    let mut section: Option<String> = None;
    let mut parser = ini_core::Parser::new(text).auto_trim(true);
    loop {
        // The parser counts lines it has consumed; the item it returns next
        // starts on the following line.
        let line = parser.line() + 1;
        let Some(item) = parser.next() else { break };
        match item {
            ini_core::Item::Section(name) => {
                let name = name.trim().to_string();
                if raw.sections.contains_key(&name) {
                    problems.push(Problem {
                        line: Some(line),
                        section: name.clone(),
                        key: None,
                        message: "section appears twice".into(),
                    });
                } else {
                    if name.starts_with("source.") {
                        raw.list_order.push(name.clone());
                    }
                    raw.sections.insert(name.clone(), (line, BTreeMap::new()));
                }
                section = Some(name);
            }
            ini_core::Item::Error(text) => problems.push(Problem {
                line: Some(line),
                section: section.clone().unwrap_or_else(|| "-".into()),
                key: None,
                message: format!("malformed section header {text:?}: expected [name]"),
            }),
            ini_core::Item::Property(key, value) => {
                if key.starts_with('#') || key.starts_with(';') {
                    continue;
                }
                let Some(section_name) = &section else {
                    problems.push(Problem {
                        line: Some(line),
                        section: "-".into(),
                        key: Some(key.to_string()),
                        message: "key outside any section: put it under a [section]".into(),
                    });
                    continue;
                };
                let Some(value) = value else {
                    problems.push(Problem {
                        line: Some(line),
                        section: section_name.clone(),
                        key: Some(key.to_string()),
                        message: "expected key = value, found no '='".into(),
                    });
                    continue;
                };
                let entries = &mut raw.sections.get_mut(section_name).expect("section").1;
                if entries.contains_key(key) {
                    problems.push(Problem {
                        line: Some(line),
                        section: section_name.clone(),
                        key: Some(key.to_string()),
                        message: "key appears twice in this section".into(),
                    });
                    continue;
                }
                entries.insert(
                    key.to_string(),
                    Entry {
                        line,
                        value: strip_inline_comment(value).to_string(),
                    },
                );
            }
            ini_core::Item::Comment(_) | ini_core::Item::Blank | ini_core::Item::SectionEnd => {}
        }
    }
    raw
}

/// Drops a trailing `; comment` or `# comment` (preceded by whitespace).
fn strip_inline_comment(value: &str) -> &str {
    let bytes = value.as_bytes();
    for (i, &byte) in bytes.iter().enumerate() {
        if (byte == b';' || byte == b'#') && (i == 0 || bytes[i - 1].is_ascii_whitespace()) {
            return value[..i].trim_end();
        }
    }
    value
}

/// Whether the command opens the database, so that `[database] url` is required.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UsesDatabase {
    Yes,
    No,
}

struct Reader<'a> {
    raw: &'a RawIni,
    problems: Vec<Problem>,
    uses: UsesDatabase,
}

impl Reader<'_> {
    fn build(&mut self, database_url_env: Option<String>) -> Config {
        self.check_unknown();
        // Every field is set from the table below before the config is
        // returned: the blank values are never seen.
        let mut config = Config::default();
        for key in KEYS {
            let value = self.read(key, &config, database_url_env.as_deref());
            (key.set)(&mut config, value);
        }
        config.lists = self.lists(&config.fetcher);
        self.check_relations(&config);
        config
    }

    /// Reads one key of the table, reporting what is wrong with it.
    fn read(&mut self, key: &Key, config: &Config, database_url_env: Option<&str>) -> Value {
        let (section, name) = (key.section, key.name);
        match key.kind {
            Kind::Whole { default, min, max } => {
                Value::Whole(self.number(section, name, default, min, max))
            }
            Kind::WholeAtMost { of, min, max } => {
                let cap = match (find_key(section, of).get)(config) {
                    Value::Whole(cap) => cap,
                    other => unreachable!("{of} is a whole number, found {other:?}"),
                };
                let value = self.number(section, name, cap, min, max);
                if value > cap {
                    self.problem(
                        section,
                        Some(name),
                        format!("must not exceed {of} ({cap}), found {value}"),
                    );
                }
                Value::Whole(value)
            }
            Kind::Signed { default } => Value::Signed(self.integer(section, name, default)),
            Kind::Seconds { default } => Value::Duration(self.seconds(section, name, default)),
            Kind::SecondsOrNever { default } => {
                let seconds = self.number(section, name, default, 0, u32::MAX as u64);
                Value::MaybeDuration((seconds > 0).then(|| Duration::from_secs(seconds)))
            }
            Kind::Millis { default } => Value::Duration(self.millis(section, name, default)),
            Kind::Ratio { default } => Value::Ratio(self.ratio(section, name, default)),
            Kind::Flag { default } => Value::Flag(self.boolean(section, name, default)),
            Kind::FilePath { default } => {
                let path = self.string(section, name, default);
                if path.is_empty() {
                    self.problem(
                        section,
                        Some(name),
                        "expected a file path, found nothing".into(),
                    );
                }
                Value::Text(path)
            }
            Kind::Secret => {
                let text = self.string(section, name, "");
                Value::Secret(
                    Some(text)
                        .filter(|t| !t.is_empty())
                        .map(crate::secret::Secret::new),
                )
            }
            Kind::Url { default } => Value::Text(self.url(section, name, default)),
            Kind::MaybeHttpsUrl { default } => {
                let url = self.string(section, name, default);
                if url.is_empty() {
                    return Value::MaybeText(None);
                }
                let https = url
                    .get(..8)
                    .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
                if !https || check_http_url(&url).is_err() {
                    self.problem(
                        section,
                        Some(name),
                        format!("expected an https:// URL or nothing, found {url:?}"),
                    );
                }
                Value::MaybeText(Some(url))
            }
            Kind::Addr { default } => Value::Addr(self.socket_addr(section, name, default)),
            Kind::MaybeAddr => match self.string(section, name, "").trim() {
                "" => Value::MaybeAddr(None),
                _ => Value::MaybeAddr(Some(self.socket_addr(section, name, "127.0.0.1:0"))),
            },
            Kind::Protocol { default } => Value::Protocol(self.protocol(section, name, default)),
            Kind::Path { default } => {
                let path = self.string(section, name, default);
                Value::Path(Some(path).filter(|p| !p.is_empty()).map(PathBuf::from))
            }
            Kind::DatabaseUrl => Value::Url(SecretUrl::new(self.database_url(database_url_env))),
            Kind::ListUrls => Value::Elsewhere,
        }
    }

    /// `DATABASE_URL` when set, else `[database] url`, which a command that
    /// opens the database needs.
    fn database_url(&mut self, database_url_env: Option<&str>) -> String {
        if let Some(url) = database_url_env.filter(|url| !url.trim().is_empty()) {
            return url.to_string();
        }
        let url = self.string("database", "url", "");
        if url.is_empty() {
            // A command that never connects needs none.
            if self.uses == UsesDatabase::Yes {
                self.problem(
                    "database",
                    Some("url"),
                    "required: a postgres:// URL (or set DATABASE_URL)".into(),
                );
            }
        } else if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            self.problem(
                "database",
                Some("url"),
                format!(
                    "expected a postgres:// or postgresql:// URL, found {:?}",
                    redact_url(&url)
                ),
            );
        }
        url
    }

    /// What no single key can say: bounds between keys.
    fn check_relations(&mut self, config: &Config) {
        let validator = &config.validator;
        if validator.connect_timeout > validator.timeout {
            self.problem(
                "validator",
                Some("connect_timeout_ms"),
                format!(
                    "must not exceed validation_timeout_ms ({} ms), found {} ms",
                    validator.timeout.as_millis(),
                    validator.connect_timeout.as_millis()
                ),
            );
        }
        let s = "scoring";
        let scoring = &config.scoring;
        if scoring.discount <= 0.0 {
            self.problem(
                s,
                Some("discount"),
                format!(
                    "expected a number above 0 and at most 1, found {}",
                    scoring.discount
                ),
            );
        }
        if scoring.success_delta < 0 {
            self.problem(
                s,
                Some("success_delta"),
                format!("expected 0 or more, found {}", scoring.success_delta),
            );
        }
        if scoring.failure_delta > 0 {
            self.problem(
                s,
                Some("failure_delta"),
                format!("expected 0 or less, found {}", scoring.failure_delta),
            );
        }
        if scoring.initial_score > scoring.max_score {
            self.problem(
                s,
                Some("initial_score"),
                format!(
                    "must not exceed max_score ({}), found {}",
                    scoring.max_score, scoring.initial_score
                ),
            );
        }
        if scoring.ban_threshold > scoring.initial_score {
            self.problem(
                s,
                Some("ban_threshold"),
                format!(
                    "must not exceed initial_score ({}): every new proxy would start banned, found {}",
                    scoring.initial_score, scoring.ban_threshold
                ),
            );
        }
        if scoring.ban_cooldown_max < scoring.ban_cooldown {
            self.problem(
                s,
                Some("ban_cooldown_max_seconds"),
                format!(
                    "must be at least ban_cooldown_seconds ({}), found {}",
                    scoring.ban_cooldown.as_secs(),
                    scoring.ban_cooldown_max.as_secs()
                ),
            );
        }
    }

    /// Every list to fetch: `[fetcher] source_urls`, then each `[source.NAME]`.
    fn lists(&mut self, fetcher: &FetcherConfig) -> Vec<ListConfig> {
        let mut sources = Vec::new();
        let urls = self.string("fetcher", "source_urls", "");
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            if let Err(message) = check_http_url(url) {
                self.problem("fetcher", Some("source_urls"), message);
                continue;
            }
            if sources.iter().any(|s: &ListConfig| s.url == url) {
                self.problem(
                    "fetcher",
                    Some("source_urls"),
                    format!("{url:?} is listed twice"),
                );
                continue;
            }
            sources.push(ListConfig {
                name: url.to_string(),
                url: url.to_string(),
                interval: fetcher.interval,
                protocol: fetcher.default_protocol,
            });
        }
        for section in self.raw.list_order.clone() {
            let name = section["source.".len()..].to_string();
            if !is_valid_source_name(&name) {
                self.problem(
                    &section,
                    None,
                    format!("expected a name of 1-64 characters of A-Za-z0-9_.- after 'source.', found {name:?}"),
                );
            }
            let url = self.url(&section, "url", "");
            let interval_default = fetcher.interval.as_secs();
            let source = ListConfig {
                name,
                url,
                interval: self.seconds(&section, "interval_seconds", interval_default),
                protocol: self.protocol(&section, "protocol", fetcher.default_protocol),
            };
            if let Some(other) = sources.iter().find(|s| s.url == source.url) {
                let message = format!("this url is already listed as {:?}", other.name);
                self.problem(&section, Some("url"), message);
            }
            sources.push(source);
        }
        if sources.is_empty() {
            self.problem(
                "fetcher",
                Some("source_urls"),
                "no proxy list configured: give source_urls or at least one [source.NAME] section with a url".into(),
            );
        }
        sources
    }

    fn check_unknown(&mut self) {
        let names = sections();
        let mut found = Vec::new();
        for (section, (section_line, entries)) in &self.raw.sections {
            let allowed: Vec<&str> = if section.starts_with("source.") {
                LIST_KEYS.to_vec()
            } else if names.contains(&section.as_str()) {
                KEYS.iter()
                    .filter(|key| key.section == section)
                    .map(|key| key.name)
                    .collect()
            } else {
                let hint = suggestion(section, &names)
                    .map(|s| format!(" (did you mean [{s}]?)"))
                    .unwrap_or_default();
                found.push(Problem {
                    line: Some(*section_line),
                    section: section.clone(),
                    key: None,
                    message: format!(
                        "unknown section{hint}; known sections: {}, source.NAME",
                        names.join(", ")
                    ),
                });
                continue;
            };
            for (key, entry) in entries {
                if allowed.contains(&key.as_str()) {
                    continue;
                }
                let hint = suggestion(key, &allowed)
                    .map(|s| format!(" (did you mean {s}?)"))
                    .unwrap_or_default();
                found.push(Problem {
                    line: Some(entry.line),
                    section: section.clone(),
                    key: Some(key.clone()),
                    message: format!(
                        "unknown key{hint}; this section accepts: {}",
                        allowed.join(", ")
                    ),
                });
            }
        }
        self.problems.extend(found);
    }

    fn entry(&self, section: &str, key: &str) -> Option<&Entry> {
        self.raw.sections.get(section)?.1.get(key)
    }

    fn problem(&mut self, section: &str, key: Option<&str>, message: String) {
        let line = match key {
            Some(key) => self.entry(section, key).map(|e| e.line),
            None => self.raw.sections.get(section).map(|(line, _)| *line),
        };
        self.problems.push(Problem {
            line,
            section: section.to_string(),
            key: key.map(str::to_string),
            message,
        });
    }

    fn string(&self, section: &str, key: &str, default: &str) -> String {
        self.entry(section, key)
            .map(|e| e.value.clone())
            .unwrap_or_else(|| default.to_string())
    }

    /// A whole number in `min..=max`.
    fn number(&mut self, section: &str, key: &str, default: u64, min: u64, max: u64) -> u64 {
        let Some(entry) = self.entry(section, key) else {
            return default;
        };
        match entry.value.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => n,
            _ => {
                let message = format!(
                    "expected a whole number from {min} to {max}, found {:?}",
                    entry.value
                );
                self.problem(section, Some(key), message);
                default
            }
        }
    }

    fn integer(&mut self, section: &str, key: &str, default: i32) -> i32 {
        let Some(entry) = self.entry(section, key) else {
            return default;
        };
        match entry.value.parse::<i32>() {
            Ok(n) if n.unsigned_abs() <= 1_000_000 => n,
            _ => {
                let message = format!(
                    "expected a whole number from -1000000 to 1000000, found {:?}",
                    entry.value
                );
                self.problem(section, Some(key), message);
                default
            }
        }
    }

    fn seconds(&mut self, section: &str, key: &str, default: u64) -> Duration {
        Duration::from_secs(self.number(section, key, default, 1, 365 * 86400))
    }

    fn millis(&mut self, section: &str, key: &str, default: u64) -> Duration {
        Duration::from_millis(self.number(section, key, default, 1, 3_600_000))
    }

    fn ratio(&mut self, section: &str, key: &str, default: f64) -> f64 {
        let Some(entry) = self.entry(section, key) else {
            return default;
        };
        match entry.value.parse::<f64>() {
            Ok(x) if (0.0..=1.0).contains(&x) => x,
            _ => {
                let message = format!("expected a number from 0 to 1, found {:?}", entry.value);
                self.problem(section, Some(key), message);
                default
            }
        }
    }

    fn boolean(&mut self, section: &str, key: &str, default: bool) -> bool {
        let Some(entry) = self.entry(section, key) else {
            return default;
        };
        match entry.value.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => true,
            "false" | "no" | "off" | "0" => false,
            _ => {
                let message = format!("expected true or false, found {:?}", entry.value);
                self.problem(section, Some(key), message);
                default
            }
        }
    }

    fn protocol(&mut self, section: &str, key: &str, default: Protocol) -> Protocol {
        let Some(entry) = self.entry(section, key) else {
            return default;
        };
        match Protocol::from_scheme(&entry.value) {
            Some(protocol) => protocol,
            None => {
                let message = format!(
                    "expected http, https, socks4 or socks5, found {:?}",
                    entry.value
                );
                self.problem(section, Some(key), message);
                default
            }
        }
    }

    fn url(&mut self, section: &str, key: &str, default: &str) -> String {
        let value = self.string(section, key, default);
        if value.is_empty() {
            self.problem(
                section,
                Some(key),
                "required: an http:// or https:// URL".into(),
            );
            return value;
        }
        if let Err(message) = check_http_url(&value) {
            self.problem(section, Some(key), message);
        }
        value
    }

    fn socket_addr(&mut self, section: &str, key: &str, default: &str) -> SocketAddr {
        let value = self.string(section, key, default);
        match value.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                let message = format!(
                    "expected an IP address and port such as 127.0.0.1:8080, found {value:?}"
                );
                self.problem(section, Some(key), message);
                default.parse().expect("default address")
            }
        }
    }
}

/// A list or judge URL must be absolute http(s) with a host.
pub fn check_http_url(url: &str) -> Result<(), String> {
    let parsed = url
        .parse::<ureq::http::Uri>()
        .map_err(|_| format!("expected an http:// or https:// URL, found {url:?}"))?;
    match parsed.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(format!(
                "expected an http:// or https:// URL, found {url:?}"
            ))
        }
    }
    match parsed.host() {
        Some(host) if !host.is_empty() => Ok(()),
        _ => Err(format!("expected a host in the URL, found {url:?}")),
    }
}

/// Source names (client applications and `[source.NAME]`): 1-64 of `A-Za-z0-9_.-`.
pub fn is_valid_source_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

fn suggestion<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(word, c), *c))
        .filter(|(distance, c)| *distance <= 3.max(c.len() / 4))
        .min()
        .map(|(_, c)| c)
}

impl fmt::Display for Config {
    /// The effective configuration as INI, secrets hidden: every key of the
    /// table, and each `[source.NAME]` list after `[fetcher]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, section) in sections().into_iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "[{section}]")?;
            for key in KEYS.iter().filter(|key| key.section == section) {
                writeln!(f, "{} = {}", key.name, key.kind.show(&(key.get)(self)))?;
            }
            if section == "fetcher" {
                for list in self.lists.iter().filter(|list| list.name != list.url) {
                    writeln!(f, "\n[source.{}]", list.name)?;
                    writeln!(f, "url = {}", redact_url(&list.url))?;
                    writeln!(f, "interval_seconds = {}", list.interval.as_secs())?;
                    writeln!(f, "protocol = {}", list.protocol)?;
                }
            }
        }
        Ok(())
    }
}

impl ScoringConfig {
    /// `[scoring]` as documented (the key table's defaults), for benchmarks
    /// and tests that build a state without a config file.
    pub fn defaults() -> ScoringConfig {
        let raw = RawIni::default();
        let mut reader = Reader {
            raw: &raw,
            problems: Vec::new(),
            uses: UsesDatabase::No,
        };
        let mut config = Config::default();
        for key in KEYS.iter().filter(|key| key.section == "scoring") {
            let value = reader.read(key, &config, None);
            (key.set)(&mut config, value);
        }
        config.scoring
    }
}

/// The table's entry for `section`'s `name`.
fn find_key(section: &str, name: &str) -> &'static Key {
    KEYS.iter()
        .find(|key| key.section == section && key.name == name)
        .unwrap_or_else(|| unreachable!("no key {name} in [{section}]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[database]\nurl = postgres://u:secret@127.0.0.1/db\n[fetcher]\nsource_urls = http://127.0.0.1:9/list.txt\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.ini", None)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.database.pool_size, 8);
        assert_eq!(config.server.bind, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.server.workers, 8);
        assert_eq!(config.server.api_token, None);
        assert_eq!(config.server.max_body_bytes, 1_048_576);
        assert_eq!(config.server.max_connections, 1024);
        assert_eq!(config.server.max_connections_per_ip, 1024);
        assert_eq!(config.server.read_timeout, Duration::from_secs(10));
        assert_eq!(config.state.max_sources, 10_000);
        assert_eq!(config.fetcher.interval, Duration::from_secs(300));
        assert_eq!(config.fetcher.timeout, Duration::from_millis(15000));
        assert_eq!(config.fetcher.max_bytes, 10_485_760);
        assert!(!config.fetcher.allow_private_addresses);
        assert_eq!(config.validator.target, "http://httpbin.org/get?show_env=1");
        assert_eq!(
            config.validator.https_target.as_deref(),
            Some("https://httpbin.org/get?show_env=1")
        );
        assert_eq!(config.validator.https_ca_file, None);
        assert_eq!(config.validator.timeout, Duration::from_millis(5000));
        assert_eq!(
            config.validator.connect_timeout,
            Duration::from_millis(3000)
        );
        assert_eq!(config.validator.workers, 100);
        assert_eq!(config.validator.revalidate_after, Duration::from_secs(1800));
        assert_eq!(
            config.validator.retry_inactive_after,
            Some(Duration::from_secs(21600))
        );
        assert_eq!(config.scheduler.interval, Duration::from_secs(60));
        assert_eq!(config.scoring.failure_delta, -5);
        assert_eq!(config.scoring.ban_threshold, -15);
        assert_eq!(config.scoring.top_k, 10);
        assert_eq!(config.scoring.explore_ratio, 0.1);
        assert_eq!(config.scoring.discount, 0.9);
        assert_eq!(
            config.state.snapshot_path,
            PathBuf::from("source_stats.bin")
        );
        assert_eq!(config.state.sync_interval, Duration::from_secs(30));
        assert_eq!(config.geoip.database, None);
        assert_eq!(config.lists.len(), 1);
        assert_eq!(config.lists[0].protocol, Protocol::Http);
    }

    #[test]
    fn misspelled_key_is_named_with_its_line_and_a_suggestion() {
        let text = format!("{MINIMAL}[scheduler]\nintervall_seconds = 5\n");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        let problem = &err.problems[0];
        assert_eq!(problem.line, Some(6));
        assert_eq!(problem.key.as_deref(), Some("intervall_seconds"));
        let shown = err.to_string();
        assert!(
            shown.contains("test.ini:6: [scheduler] intervall_seconds"),
            "{shown}"
        );
        assert!(shown.contains("did you mean interval_seconds"), "{shown}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[database]\nurl = mysql://x\n[fetcher]\ninterval_seconds = -5\nsource_urls = ftp://x\n[validator]\nvalidation_target = not a url\n[nonsense]\n";
        let err = parse(text).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains(":2: [database] url"), "{shown}");
        assert!(
            shown.contains(":4: [fetcher] interval_seconds: expected a whole number from 1"),
            "{shown}"
        );
        assert!(shown.contains(":5: [fetcher] source_urls"), "{shown}");
        assert!(
            shown.contains(":7: [validator] validation_target"),
            "{shown}"
        );
        assert!(shown.contains(":8: [nonsense]: unknown section"), "{shown}");
    }

    #[test]
    fn an_empty_source_list_is_an_error() {
        let err = parse("[database]\nurl = postgres://x/y\n").unwrap_err();
        assert!(
            err.to_string().contains("no proxy list configured"),
            "{err}"
        );
    }

    #[test]
    fn a_command_without_the_database_needs_no_url_but_checks_one_given() {
        let text = "[fetcher]\nsource_urls = http://127.0.0.1:9/a\n";
        let err = Config::parse(text, "t.ini", None).unwrap_err().to_string();
        assert!(err.contains("[database] url"), "{err}");
        let config = Config::parse_as(text, "t.ini", None, UsesDatabase::No).unwrap();
        assert!(config.database.url.is_empty());
        let bad = format!("[database]\nurl = mysql://x/y\n{text}");
        let err = Config::parse_as(&bad, "t.ini", None, UsesDatabase::No)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected a postgres://"), "{err}");
    }

    #[test]
    fn database_url_from_the_environment_wins() {
        let text = "[fetcher]\nsource_urls = http://127.0.0.1:9/a\n";
        let config = Config::parse(text, "t.ini", Some("postgres://env/db".into())).unwrap();
        assert_eq!(config.database.url.expose(), "postgres://env/db");
    }

    #[test]
    fn source_sections_have_their_own_schedule_and_protocol() {
        let text = format!(
            "{MINIMAL}[source.socks_list]\nurl = http://127.0.0.1:9/socks.txt ; a comment\ninterval_seconds = 900\nprotocol = socks5\n"
        );
        let config = parse(&text).unwrap();
        let source = &config.lists[1];
        assert_eq!(source.name, "socks_list");
        assert_eq!(source.url, "http://127.0.0.1:9/socks.txt");
        assert_eq!(source.interval, Duration::from_secs(900));
        assert_eq!(source.protocol, Protocol::Socks5);
    }

    #[test]
    fn every_key_reads_its_default_and_shows_it_back() {
        // The table pairs each kind with a field of the matching type: a
        // mismatch would panic here, not in a user's hands.
        let config = parse(MINIMAL).unwrap();
        let shown = config.to_string();
        for key in KEYS {
            assert!(
                shown.contains(&format!("\n{} = ", key.name))
                    || shown.starts_with(&format!("[{}]\n{} = ", key.section, key.name)),
                "{} missing from:\n{shown}",
                key.name
            );
        }
        let token = format!("{MINIMAL}[server]\napi_token = t0ken\n");
        let config = parse(&token).unwrap();
        assert_eq!(
            config.server.api_token.as_ref().map(|t| t.expose()),
            Some("t0ken")
        );
        assert!(config.to_string().contains("api_token = (set)"));
        assert!(!format!("{config:?}").contains("t0ken"));
    }

    #[test]
    fn a_per_address_cap_defaults_to_and_may_not_exceed_the_total() {
        let text = format!("{MINIMAL}[server]\nmax_connections = 50\n");
        assert_eq!(parse(&text).unwrap().server.max_connections_per_ip, 50);
        let text =
            format!("{MINIMAL}[server]\nmax_connections = 50\nmax_connections_per_ip = 60\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains(
                "[server] max_connections_per_ip: must not exceed max_connections (50), found 60"
            ),
            "{err}"
        );
    }

    #[test]
    fn scoring_defaults_are_the_parsed_ones() {
        assert_eq!(ScoringConfig::defaults(), parse(MINIMAL).unwrap().scoring);
    }

    #[test]
    fn zero_retry_means_never() {
        let text = format!("{MINIMAL}[validator]\nretry_inactive_after_seconds = 0\n");
        assert_eq!(parse(&text).unwrap().validator.retry_inactive_after, None);
    }

    #[test]
    fn effective_values_hide_the_database_password() {
        let shown = parse(MINIMAL).unwrap().to_string();
        assert!(
            shown.contains("url = postgres://u:***@127.0.0.1/db"),
            "{shown}"
        );
        assert!(!shown.contains("secret"));
        assert!(!format!("{:?}", parse(MINIMAL).unwrap()).contains("secret"));
        // What check-config prints parses back to the same configuration.
        let again = Config::parse(&shown.replace("***", "secret"), "t", None).unwrap();
        assert_eq!(again, parse(MINIMAL).unwrap());
    }
}
