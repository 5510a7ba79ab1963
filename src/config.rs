//! config.ini in two stages: INI text into raw located entries, then a
//! validated typed [`Config`]. Every problem is reported at once, each naming
//! the file, line, section and key, what was found and what is allowed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proxy::Protocol;

/// The validated configuration of one proxy-pool instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub database: DatabaseConfig,
    pub server: ServerConfig,
    pub fetcher: FetcherConfig,
    /// Every list to fetch: `[fetcher] source_urls` first, then `[source.NAME]`.
    pub sources: Vec<SourceConfig>,
    pub validator: ValidatorConfig,
    pub scheduler: SchedulerConfig,
    pub scoring: ScoringConfig,
    pub state: StateConfig,
    pub geoip: GeoipConfig,
    pub gateway: GatewayConfig,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DatabaseConfig {
    pub url: String,
    pub pool_size: u32,
    /// How long a thread waits for a pooled connection before giving up.
    pub checkout_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub workers: usize,
    pub api_token: Option<String>,
    pub max_body_bytes: usize,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Connections one client address may hold at once (at most `max_connections`).
    pub max_connections_per_ip: usize,
    /// A request head, and then its body, must each arrive within this.
    pub read_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FetcherConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub max_bytes: u64,
    pub default_protocol: Protocol,
    pub allow_private_addresses: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SourceConfig {
    /// `[source.NAME]`'s NAME, or the URL itself for `source_urls` entries.
    pub name: String,
    pub url: String,
    pub interval: Duration,
    /// The protocol of bare `host:port` lines.
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ValidatorConfig {
    pub target: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub workers: usize,
    pub revalidate_after: Duration,
    /// `None` when `retry_inactive_after_seconds = 0`: inactive proxies are never retried.
    pub retry_inactive_after: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub interval: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScoringConfig {
    pub initial_score: i32,
    pub success_delta: i32,
    pub failure_delta: i32,
    pub max_score: i32,
    pub ban_threshold: i32,
    pub ban_cooldown: Duration,
    pub ban_cooldown_max: Duration,
    pub top_k: usize,
    pub explore_ratio: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StateConfig {
    pub snapshot_path: PathBuf,
    pub snapshot_interval: Duration,
    pub sync_interval: Duration,
    /// Sources kept in memory at once; get-proxy for a new one past this is refused.
    pub max_sources: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GeoipConfig {
    pub database: Option<PathBuf>,
}

/// The rotating gateway: the pool as one proxy endpoint.
#[derive(Clone, Debug, PartialEq)]
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

/// The keys each fixed section accepts. `[source.NAME]` sections accept SOURCE_KEYS.
const KNOWN: &[(&str, &[&str])] = &[
    ("database", &["url", "pool_size", "checkout_timeout_ms"]),
    (
        "server",
        &[
            "bind",
            "workers",
            "api_token",
            "max_body_bytes",
            "max_connections",
            "max_connections_per_ip",
            "read_timeout_ms",
        ],
    ),
    (
        "fetcher",
        &[
            "source_urls",
            "interval_seconds",
            "timeout_ms",
            "max_bytes",
            "default_protocol",
            "allow_private_addresses",
        ],
    ),
    (
        "validator",
        &[
            "validation_target",
            "validation_timeout_ms",
            "connect_timeout_ms",
            "validation_workers",
            "revalidate_after_seconds",
            "retry_inactive_after_seconds",
        ],
    ),
    ("scheduler", &["interval_seconds"]),
    (
        "scoring",
        &[
            "initial_score",
            "success_delta",
            "failure_delta",
            "max_score",
            "ban_threshold",
            "ban_cooldown_seconds",
            "ban_cooldown_max_seconds",
            "top_k",
            "explore_ratio",
        ],
    ),
    (
        "state",
        &[
            "snapshot_path",
            "snapshot_interval_seconds",
            "sync_interval_seconds",
            "max_sources",
        ],
    ),
    ("geoip", &["database"]),
    (
        "gateway",
        &[
            "bind",
            "max_connections",
            "attempts",
            "connect_timeout_ms",
            "idle_timeout_ms",
            "session_ttl_seconds",
            "allow_private_targets",
        ],
    ),
];
const SOURCE_KEYS: &[&str] = &["url", "interval_seconds", "protocol"];

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
    source_order: Vec<String>,
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
                        raw.source_order.push(name.clone());
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
        let database_url = match database_url_env.filter(|url| !url.trim().is_empty()) {
            Some(url) => url,
            None => {
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
        };
        let database = DatabaseConfig {
            url: database_url,
            pool_size: self.number("database", "pool_size", 8, 1, 1000) as u32,
            checkout_timeout: Duration::from_millis(self.number(
                "database",
                "checkout_timeout_ms",
                5000,
                1,
                3_600_000,
            )),
        };
        let max_connections = self.number("server", "max_connections", 1024, 1, 65536);
        // Unset: no cap per address beyond the total one (clients of a local
        // service all come from 127.0.0.1).
        let max_connections_per_ip = self.number(
            "server",
            "max_connections_per_ip",
            max_connections,
            1,
            65536,
        );
        if max_connections_per_ip > max_connections {
            self.problem(
                "server",
                Some("max_connections_per_ip"),
                format!(
                    "must not exceed max_connections ({max_connections}), found {max_connections_per_ip}"
                ),
            );
        }
        let server = ServerConfig {
            bind: self.socket_addr("server", "bind", "127.0.0.1:8080"),
            workers: self.number("server", "workers", 8, 1, 4096) as usize,
            api_token: Some(self.string("server", "api_token", "")).filter(|t| !t.is_empty()),
            max_body_bytes: self.number("server", "max_body_bytes", 65536, 64, 1 << 30) as usize,
            max_connections: max_connections as usize,
            max_connections_per_ip: max_connections_per_ip as usize,
            read_timeout: self.millis("server", "read_timeout_ms", 10_000),
        };
        let default_protocol = self.protocol("fetcher", "default_protocol", Protocol::Http);
        let fetcher = FetcherConfig {
            interval: self.seconds("fetcher", "interval_seconds", 300),
            timeout: self.millis("fetcher", "timeout_ms", 15000),
            max_bytes: self.number("fetcher", "max_bytes", 10_485_760, 1, 1 << 40),
            default_protocol,
            allow_private_addresses: self.boolean("fetcher", "allow_private_addresses", false),
        };
        let sources = self.sources(&fetcher);
        let validator = ValidatorConfig {
            target: self.url("validator", "validation_target", "http://httpbin.org/get"),
            timeout: self.millis("validator", "validation_timeout_ms", 5000),
            connect_timeout: self.millis("validator", "connect_timeout_ms", 3000),
            workers: self.number("validator", "validation_workers", 100, 1, 10_000) as usize,
            revalidate_after: self.seconds("validator", "revalidate_after_seconds", 1800),
            retry_inactive_after: {
                let seconds = self.number(
                    "validator",
                    "retry_inactive_after_seconds",
                    21600,
                    0,
                    u32::MAX as u64,
                );
                (seconds > 0).then(|| Duration::from_secs(seconds))
            },
        };
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
        let scheduler = SchedulerConfig {
            interval: self.seconds("scheduler", "interval_seconds", 60),
        };
        let scoring = self.scoring();
        let state = StateConfig {
            snapshot_path: PathBuf::from(self.string("state", "snapshot_path", "source_stats.bin")),
            snapshot_interval: self.seconds("state", "snapshot_interval_seconds", 60),
            sync_interval: self.seconds("state", "sync_interval_seconds", 30),
            max_sources: self.number("state", "max_sources", 10_000, 1, 10_000_000) as usize,
        };
        if state.snapshot_path.as_os_str().is_empty() {
            self.problem(
                "state",
                Some("snapshot_path"),
                "expected a file path, found nothing".into(),
            );
        }
        let geoip = GeoipConfig {
            database: Some(self.string("geoip", "database", ""))
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        };
        let gateway = self.gateway();
        Config {
            database,
            server,
            fetcher,
            sources,
            validator,
            scheduler,
            scoring,
            state,
            geoip,
            gateway,
        }
    }

    fn gateway(&mut self) -> GatewayConfig {
        let s = "gateway";
        let bind = match self.string(s, "bind", "").trim() {
            "" => None,
            _ => Some(self.socket_addr(s, "bind", "127.0.0.1:8899")),
        };
        GatewayConfig {
            bind,
            max_connections: self.number(s, "max_connections", 4096, 1, 1_000_000) as usize,
            attempts: self.number(s, "attempts", 3, 1, 20) as usize,
            connect_timeout: self.millis(s, "connect_timeout_ms", 5000),
            idle_timeout: self.millis(s, "idle_timeout_ms", 120_000),
            session_ttl: self.seconds(s, "session_ttl_seconds", 600),
            allow_private_targets: self.boolean(s, "allow_private_targets", false),
        }
    }

    fn scoring(&mut self) -> ScoringConfig {
        let s = "scoring";
        let scoring = ScoringConfig {
            initial_score: self.integer(s, "initial_score", 0),
            success_delta: self.integer(s, "success_delta", 1),
            failure_delta: self.integer(s, "failure_delta", -5),
            max_score: self.integer(s, "max_score", 100),
            ban_threshold: self.integer(s, "ban_threshold", -15),
            ban_cooldown: self.seconds(s, "ban_cooldown_seconds", 1800),
            ban_cooldown_max: self.seconds(s, "ban_cooldown_max_seconds", 21600),
            top_k: self.number(s, "top_k", 10, 1, 100_000) as usize,
            explore_ratio: self.ratio(s, "explore_ratio", 0.1),
        };
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
        scoring
    }

    fn sources(&mut self, fetcher: &FetcherConfig) -> Vec<SourceConfig> {
        let mut sources = Vec::new();
        let urls = self.string("fetcher", "source_urls", "");
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            if let Err(message) = check_http_url(url) {
                self.problem("fetcher", Some("source_urls"), message);
                continue;
            }
            if sources.iter().any(|s: &SourceConfig| s.url == url) {
                self.problem(
                    "fetcher",
                    Some("source_urls"),
                    format!("{url:?} is listed twice"),
                );
                continue;
            }
            sources.push(SourceConfig {
                name: url.to_string(),
                url: url.to_string(),
                interval: fetcher.interval,
                protocol: fetcher.default_protocol,
            });
        }
        for section in self.raw.source_order.clone() {
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
            let source = SourceConfig {
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
        let mut found = Vec::new();
        for (section, (section_line, entries)) in &self.raw.sections {
            let allowed: &[&str] = if section.starts_with("source.") {
                SOURCE_KEYS
            } else if let Some((_, keys)) = KNOWN.iter().find(|(name, _)| name == section) {
                keys
            } else {
                let names: Vec<&str> = KNOWN.iter().map(|(name, _)| *name).collect();
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
                let hint = suggestion(key, allowed)
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

impl fmt::Display for Config {
    /// The effective configuration as INI, secrets hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |d: Duration| d.as_secs();
        let ms = |d: Duration| d.as_millis();
        writeln!(f, "[database]")?;
        writeln!(f, "url = {}", redact_url(&self.database.url))?;
        writeln!(f, "pool_size = {}", self.database.pool_size)?;
        writeln!(
            f,
            "checkout_timeout_ms = {}",
            ms(self.database.checkout_timeout)
        )?;
        writeln!(f, "\n[server]")?;
        writeln!(f, "bind = {}", self.server.bind)?;
        writeln!(f, "workers = {}", self.server.workers)?;
        let token = if self.server.api_token.is_some() {
            "(set)"
        } else {
            ""
        };
        writeln!(f, "api_token = {token}")?;
        writeln!(f, "max_body_bytes = {}", self.server.max_body_bytes)?;
        writeln!(f, "max_connections = {}", self.server.max_connections)?;
        writeln!(
            f,
            "max_connections_per_ip = {}",
            self.server.max_connections_per_ip
        )?;
        writeln!(f, "read_timeout_ms = {}", ms(self.server.read_timeout))?;
        writeln!(f, "\n[fetcher]")?;
        let urls: Vec<&str> = self
            .sources
            .iter()
            .filter(|s| s.name == s.url)
            .map(|s| s.url.as_str())
            .collect();
        let urls: Vec<String> = urls.iter().map(|url| redact_url(url)).collect();
        writeln!(f, "source_urls = {}", urls.join(","))?;
        writeln!(f, "interval_seconds = {}", secs(self.fetcher.interval))?;
        writeln!(f, "timeout_ms = {}", ms(self.fetcher.timeout))?;
        writeln!(f, "max_bytes = {}", self.fetcher.max_bytes)?;
        writeln!(f, "default_protocol = {}", self.fetcher.default_protocol)?;
        writeln!(
            f,
            "allow_private_addresses = {}",
            self.fetcher.allow_private_addresses
        )?;
        for source in self.sources.iter().filter(|s| s.name != s.url) {
            writeln!(f, "\n[source.{}]", source.name)?;
            writeln!(f, "url = {}", redact_url(&source.url))?;
            writeln!(f, "interval_seconds = {}", secs(source.interval))?;
            writeln!(f, "protocol = {}", source.protocol)?;
        }
        let v = &self.validator;
        writeln!(f, "\n[validator]")?;
        writeln!(f, "validation_target = {}", v.target)?;
        writeln!(f, "validation_timeout_ms = {}", ms(v.timeout))?;
        writeln!(f, "connect_timeout_ms = {}", ms(v.connect_timeout))?;
        writeln!(f, "validation_workers = {}", v.workers)?;
        writeln!(f, "revalidate_after_seconds = {}", secs(v.revalidate_after))?;
        let retry = v.retry_inactive_after.map(secs).unwrap_or(0);
        writeln!(f, "retry_inactive_after_seconds = {retry}")?;
        writeln!(f, "\n[scheduler]")?;
        writeln!(f, "interval_seconds = {}", secs(self.scheduler.interval))?;
        let s = &self.scoring;
        writeln!(f, "\n[scoring]")?;
        writeln!(f, "initial_score = {}", s.initial_score)?;
        writeln!(f, "success_delta = {}", s.success_delta)?;
        writeln!(f, "failure_delta = {}", s.failure_delta)?;
        writeln!(f, "max_score = {}", s.max_score)?;
        writeln!(f, "ban_threshold = {}", s.ban_threshold)?;
        writeln!(f, "ban_cooldown_seconds = {}", secs(s.ban_cooldown))?;
        writeln!(f, "ban_cooldown_max_seconds = {}", secs(s.ban_cooldown_max))?;
        writeln!(f, "top_k = {}", s.top_k)?;
        writeln!(f, "explore_ratio = {}", s.explore_ratio)?;
        writeln!(f, "\n[state]")?;
        writeln!(f, "snapshot_path = {}", self.state.snapshot_path.display())?;
        writeln!(
            f,
            "snapshot_interval_seconds = {}",
            secs(self.state.snapshot_interval)
        )?;
        writeln!(
            f,
            "sync_interval_seconds = {}",
            secs(self.state.sync_interval)
        )?;
        writeln!(f, "max_sources = {}", self.state.max_sources)?;
        writeln!(f, "\n[geoip]")?;
        let geoip = self
            .geoip
            .database
            .as_ref()
            .map(|p| p.display().to_string());
        writeln!(f, "database = {}", geoip.unwrap_or_default())?;
        let g = &self.gateway;
        writeln!(f, "\n[gateway]")?;
        let bind = g.bind.map(|b| b.to_string()).unwrap_or_default();
        writeln!(f, "bind = {bind}")?;
        writeln!(f, "max_connections = {}", g.max_connections)?;
        writeln!(f, "attempts = {}", g.attempts)?;
        writeln!(f, "connect_timeout_ms = {}", ms(g.connect_timeout))?;
        writeln!(f, "idle_timeout_ms = {}", ms(g.idle_timeout))?;
        writeln!(f, "session_ttl_seconds = {}", secs(g.session_ttl))?;
        writeln!(f, "allow_private_targets = {}", g.allow_private_targets)
    }
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
        assert_eq!(config.server.max_body_bytes, 65536);
        assert_eq!(config.server.max_connections, 1024);
        assert_eq!(config.server.max_connections_per_ip, 1024);
        assert_eq!(config.server.read_timeout, Duration::from_secs(10));
        assert_eq!(config.state.max_sources, 10_000);
        assert_eq!(config.fetcher.interval, Duration::from_secs(300));
        assert_eq!(config.fetcher.timeout, Duration::from_millis(15000));
        assert_eq!(config.fetcher.max_bytes, 10_485_760);
        assert!(!config.fetcher.allow_private_addresses);
        assert_eq!(config.validator.target, "http://httpbin.org/get");
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
        assert_eq!(
            config.state.snapshot_path,
            PathBuf::from("source_stats.bin")
        );
        assert_eq!(config.state.sync_interval, Duration::from_secs(30));
        assert_eq!(config.geoip.database, None);
        assert_eq!(config.sources.len(), 1);
        assert_eq!(config.sources[0].protocol, Protocol::Http);
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
        assert_eq!(config.database.url, "");
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
        assert_eq!(config.database.url, "postgres://env/db");
    }

    #[test]
    fn source_sections_have_their_own_schedule_and_protocol() {
        let text = format!(
            "{MINIMAL}[source.socks_list]\nurl = http://127.0.0.1:9/socks.txt ; a comment\ninterval_seconds = 900\nprotocol = socks5\n"
        );
        let config = parse(&text).unwrap();
        let source = &config.sources[1];
        assert_eq!(source.name, "socks_list");
        assert_eq!(source.url, "http://127.0.0.1:9/socks.txt");
        assert_eq!(source.interval, Duration::from_secs(900));
        assert_eq!(source.protocol, Protocol::Socks5);
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
        // What check-config prints parses back to the same configuration.
        let again = Config::parse(&shown.replace("***", "secret"), "t", None).unwrap();
        assert_eq!(again, parse(MINIMAL).unwrap());
    }
}
