//! The fetcher: every configured list on its own fixed-rate schedule, in its
//! own thread, so that a list that hangs or fails never delays another. Each
//! fetch downloads (bounded), parses (forgiving, strict) and upserts (bulk,
//! never deleting), and leaves a status per source for /stats.

pub mod download;
pub mod parse;

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};

use crate::config::{redact_url, Config, SourceConfig};
use crate::health::Health;
use crate::scheduler::next_tick;
use crate::shutdown::ShutdownSignal;
use crate::store::{SourceYield, Store};

use self::download::{CacheValidators, DownloadError, Downloaded};
use self::parse::{parse_list, ParseOptions};

/// What the last fetch of one list found; shown by /stats and `proxy-pool fetch`.
#[derive(Clone, Debug, Default)]
pub struct SourceStatus {
    pub name: String,
    pub url: String,
    pub interval: Duration,
    pub fetches: u64,
    pub last_started_at: Option<DateTime<Utc>>,
    pub last_duration: Option<Duration>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub bytes: u64,
    pub lines: u64,
    pub parsed: u64,
    pub new: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub truncated: bool,
    pub not_modified: bool,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// Fetched by another instance this interval (several instances share a database).
    pub skipped: bool,
    pub yields: Option<SourceYield>,
}

impl SourceStatus {
    /// One line for `proxy-pool fetch` and the log.
    pub fn summary_line(&self) -> String {
        let duration = self
            .last_duration
            .map(|d| format!("{} ms", d.as_millis()))
            .unwrap_or_else(|| "-".into());
        // Before the error: a skip leaves the last fetch's error in place.
        if self.skipped {
            return format!(
                "{}: skipped (fetched by another instance this interval)",
                self.name
            );
        }
        if let Some(error) = &self.last_error {
            return format!("{}: error after {duration}: {error}", self.name);
        }
        if self.not_modified {
            return format!("{}: not modified ({duration})", self.name);
        }
        format!(
            "{}: {} bytes{}, {} lines, {} parsed, {} new, {} rejected, {} duplicates in {duration}",
            self.name,
            self.bytes,
            if self.truncated {
                " (truncated at max_bytes)"
            } else {
                ""
            },
            self.lines,
            self.parsed,
            self.new,
            self.rejected,
            self.duplicates
        )
    }
}

struct SourceRuntime {
    config: SourceConfig,
    /// The source's name with any password in it hidden. A `source_urls`
    /// entry is named by its URL, which may carry credentials: this is the
    /// name logs, statuses and the database see.
    name: String,
    status: Mutex<SourceStatus>,
    validators: Mutex<CacheValidators>,
    /// Asks the source's thread to fetch now (POST /admin/fetch); holds at most one.
    trigger: (Sender<()>, Receiver<()>),
}

/// Whether a fetch is the regular one of its interval (coordinated between
/// instances) or asked for by an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchKind {
    Scheduled,
    Manual,
}

pub struct Fetcher {
    sources: Vec<Arc<SourceRuntime>>,
    store: Store,
    health: Arc<Health>,
    agent: ureq::Agent,
    timeout: Duration,
    max_bytes: u64,
    allow_private_addresses: bool,
    instance: String,
    yields: RwLock<HashMap<String, SourceYield>>,
    /// Asks for a validation cycle when a fetch brought proxies never seen.
    validate_now: Option<Sender<()>>,
}

/// The first retry of a failing list: soon, as most failures are blips.
const FIRST_RETRY: Duration = Duration::from_secs(5);

/// Delay before retrying a failing list: 5 s doubling per consecutive
/// failure, up to the list's interval (a failing list is never tried more
/// often than its schedule says), and never sooner than the server's
/// Retry-After.
pub fn failure_delay(interval: Duration, failures: u32, retry_after: Option<Duration>) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let backoff = (FIRST_RETRY * (1u32 << exponent)).min(interval);
    match retry_after {
        Some(wait) => backoff.max(wait),
        None => backoff,
    }
}

impl Fetcher {
    pub fn new(config: &Config, store: Store, health: Arc<Health>, instance: String) -> Fetcher {
        let sources = config
            .sources
            .iter()
            .map(|source| {
                let name = redact_url(&source.name);
                Arc::new(SourceRuntime {
                    config: source.clone(),
                    name: name.clone(),
                    status: Mutex::new(SourceStatus {
                        name,
                        url: redact_url(&source.url),
                        interval: source.interval,
                        ..SourceStatus::default()
                    }),
                    validators: Mutex::new(CacheValidators::default()),
                    trigger: crossbeam_channel::bounded(1),
                })
            })
            .collect();
        Fetcher {
            sources,
            store,
            health,
            agent: download::agent(config.fetcher.timeout),
            timeout: config.fetcher.timeout,
            max_bytes: config.fetcher.max_bytes,
            allow_private_addresses: config.fetcher.allow_private_addresses,
            instance,
            yields: RwLock::new(HashMap::new()),
            validate_now: None,
        }
    }

    /// New proxies from a list then get checked at once instead of at the
    /// next tick, so a fresh pool fills within seconds.
    pub fn with_validation_trigger(mut self, validate_now: Sender<()>) -> Fetcher {
        self.validate_now = Some(validate_now);
        self
    }

    pub fn statuses(&self) -> Vec<SourceStatus> {
        let yields = self.yields.read();
        self.sources
            .iter()
            .map(|source| {
                let mut status = source.status.lock().clone();
                status.yields = yields.get(&status.name).cloned();
                status
            })
            .collect()
    }

    /// Refreshes each list's yield from the database (called periodically).
    pub fn refresh_yields(&self) {
        match self.store.source_yields() {
            Ok(rows) => {
                let map = rows.into_iter().map(|y| (y.source.clone(), y)).collect();
                *self.yields.write() = map;
            }
            Err(err) => log::debug!("cannot refresh list yields: {err}"),
        }
    }

    /// Asks every source's thread to fetch now; does not wait.
    pub fn trigger_all(&self) {
        for source in &self.sources {
            let _ = source.trigger.0.try_send(());
        }
    }

    /// Fetches every source once, in parallel, and returns their statuses.
    pub fn fetch_all_once(self: &Arc<Self>, kind: FetchKind) -> Vec<SourceStatus> {
        let handles: Vec<_> = (0..self.sources.len())
            .map(|index| {
                let fetcher = self.clone();
                thread::spawn(move || fetcher.fetch_source(index, kind))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .map(|(status, _)| status)
            .collect()
    }

    /// Starts one thread per source: a fetch at once, then on the source's
    /// fixed-rate grid, with exponential backoff after failures.
    pub fn start(
        self: &Arc<Self>,
        shutdown: ShutdownSignal,
    ) -> std::io::Result<Vec<JoinHandle<()>>> {
        let mut handles = Vec::new();
        for index in 0..self.sources.len() {
            let fetcher = self.clone();
            let shutdown = shutdown.clone();
            let handle = thread::Builder::new()
                .name(format!("fetch-{index}"))
                .spawn(move || fetcher.source_loop(index, shutdown))?;
            handles.push(handle);
        }
        Ok(handles)
    }

    fn source_loop(&self, index: usize, shutdown: ShutdownSignal) {
        let source = self.sources[index].clone();
        let interval = source.config.interval;
        let t0 = Instant::now();
        let mut due = t0;
        let mut kind = FetchKind::Scheduled;
        loop {
            let (status, retry_after) = self.fetch_source(index, kind);
            let now = Instant::now();
            // A skip is not a failure: another instance fetched the list.
            due = if status.last_error.is_some() && !status.skipped {
                now + failure_delay(interval, status.consecutive_failures, retry_after)
            } else if kind == FetchKind::Manual && now < due {
                // A manual fetch does not move the regular schedule.
                due
            } else {
                next_tick(t0, interval, now)
            };
            crossbeam_channel::select! {
                recv(shutdown.receiver()) -> _ => return,
                recv(source.trigger.1) -> _ => kind = FetchKind::Manual,
                default(due.saturating_duration_since(Instant::now())) => kind = FetchKind::Scheduled,
            }
        }
    }

    /// One fetch of one source; returns its status and any Retry-After.
    pub fn fetch_source(&self, index: usize, kind: FetchKind) -> (SourceStatus, Option<Duration>) {
        let source = &self.sources[index];
        let config = &source.config;
        if kind == FetchKind::Scheduled {
            match self
                .store
                .claim_fetch(&source.name, config.interval, &self.instance)
            {
                Ok(true) => self.health.record_database(true, None),
                Ok(false) => {
                    let mut status = source.status.lock();
                    status.skipped = true;
                    log::debug!("{}: fetched by another instance this interval", source.name);
                    return (status.clone(), None);
                }
                Err(err) => {
                    // Without the database the list could not be stored anyway.
                    self.health.record_database(false, Some(&err));
                    return self.record_failure(
                        source,
                        Instant::now(),
                        Utc::now(),
                        err.to_string(),
                        None,
                    );
                }
            }
        }
        let (status, retry_after) = self.download_and_store(source);
        if kind == FetchKind::Scheduled && status.last_error.is_some() {
            // A failed fetch does not count as this interval's fetch: the
            // retries after backoff (here or on another instance) may run.
            if let Err(err) = self.store.release_fetch(&source.name, &self.instance) {
                log::debug!("{}: cannot release the fetch claim: {err}", source.name);
            }
        }
        (status, retry_after)
    }

    fn download_and_store(&self, source: &SourceRuntime) -> (SourceStatus, Option<Duration>) {
        let config = &source.config;
        let started = Instant::now();
        let started_at = Utc::now();
        let validators = source.validators.lock().clone();
        let downloaded = download::download(
            &self.agent,
            &config.url,
            self.timeout,
            self.max_bytes,
            &validators,
        );
        let (bytes, truncated, new_validators) = match downloaded {
            Ok(Downloaded::NotModified) => {
                let mut status = source.status.lock();
                status.fetches += 1;
                status.last_started_at = Some(started_at);
                status.last_duration = Some(started.elapsed());
                status.last_success_at = Some(Utc::now());
                status.not_modified = true;
                status.skipped = false;
                status.last_error = None;
                status.consecutive_failures = 0;
                log::info!("{}", status.summary_line());
                return (status.clone(), None);
            }
            Ok(Downloaded::Body {
                bytes,
                truncated,
                validators,
            }) => (bytes, truncated, validators),
            Err(err) => {
                let retry_after = err.retry_after();
                let message = match &err {
                    DownloadError::Status { .. } | DownloadError::Timeout(_) => err.to_string(),
                    DownloadError::Transport(text) => format!("download failed: {text}"),
                };
                return self.record_failure(source, started, started_at, message, retry_after);
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        let options = ParseOptions {
            default_protocol: config.protocol,
            allow_private_addresses: self.allow_private_addresses,
        };
        let parsed = parse_list(&text, &options);
        if let Some(reason) = download::not_a_list(&bytes, parsed.proxies.len()) {
            return self.record_failure(source, started, started_at, reason.to_string(), None);
        }
        for reject in parsed.first_rejects.iter().take(3) {
            log::info!(
                "{}: line {} rejected ({}): {}",
                source.name,
                reject.line,
                reject.reason,
                reject.text
            );
        }
        let counts = match self.store.upsert_listed(&source.name, &parsed.proxies) {
            Ok(counts) => {
                self.health.record_database(true, None);
                counts
            }
            Err(err) => {
                self.health.record_database(false, Some(&err));
                return self.record_failure(
                    source,
                    started,
                    started_at,
                    format!("cannot store the list: {err}"),
                    None,
                );
            }
        };
        // Only a stored list may be answered with 304 next time.
        *source.validators.lock() = new_validators;
        let mut status = source.status.lock();
        status.fetches += 1;
        status.last_started_at = Some(started_at);
        status.last_duration = Some(started.elapsed());
        status.last_success_at = Some(Utc::now());
        status.bytes = bytes.len() as u64;
        status.lines = parsed.lines as u64;
        status.parsed = parsed.proxies.len() as u64;
        status.new = counts.new;
        status.rejected = parsed.rejected as u64;
        status.duplicates = parsed.duplicates as u64;
        status.truncated = truncated;
        status.not_modified = false;
        status.skipped = false;
        status.last_error = None;
        status.consecutive_failures = 0;
        log::info!("fetch {}", status.summary_line());
        if counts.new > 0 {
            if let Some(validate_now) = &self.validate_now {
                // At most one job waits; a full channel means one is coming.
                let _ = validate_now.try_send(());
            }
        }
        (status.clone(), None)
    }

    fn record_failure(
        &self,
        source: &SourceRuntime,
        started: Instant,
        started_at: DateTime<Utc>,
        message: String,
        retry_after: Option<Duration>,
    ) -> (SourceStatus, Option<Duration>) {
        let mut status = source.status.lock();
        // Logged once per distinct error, not at every retry.
        if status.last_error.as_deref() != Some(message.as_str()) {
            log::warn!("fetch {}: {message}", source.name);
        }
        status.fetches += 1;
        status.last_started_at = Some(started_at);
        status.last_duration = Some(started.elapsed());
        status.last_error = Some(message);
        status.skipped = false;
        status.consecutive_failures += 1;
        (status.clone(), retry_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_exponentially_up_to_the_interval() {
        let interval = Duration::from_secs(300);
        assert_eq!(failure_delay(interval, 1, None), Duration::from_secs(5));
        assert_eq!(failure_delay(interval, 2, None), Duration::from_secs(10));
        assert_eq!(failure_delay(interval, 4, None), Duration::from_secs(40));
        assert_eq!(failure_delay(interval, 10, None), interval);
        assert_eq!(failure_delay(interval, 100, None), interval);
        // A list fetched every second is retried at its own rate, no faster.
        let busy = Duration::from_secs(1);
        assert_eq!(failure_delay(busy, 1, None), busy);
    }

    #[test]
    fn retry_after_is_honoured() {
        let interval = Duration::from_secs(300);
        assert_eq!(
            failure_delay(interval, 1, Some(Duration::from_secs(120))),
            Duration::from_secs(120)
        );
    }
}
