//! The fetcher: every configured list on its own fixed-rate schedule, in its
//! own thread, so that a list that hangs or fails never delays another. Each
//! fetch downloads (bounded), parses (forgiving, strict) and upserts (bulk,
//! never deleting), and leaves a status per list for /stats.

pub mod download;
pub mod parse;

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};

use crate::config::{redact_url, Config, ListConfig};
use crate::health::Health;
use crate::scheduler::next_tick;
use crate::shutdown::ShutdownSignal;
use crate::store::{ListYield, Store};
use crate::supervisor::Supervisor;

use self::download::{CacheValidators, DownloadError, Downloaded};
use self::parse::{parse_body, ListFormat, ParseOptions, ParsedList};

/// How far the last fetch of a list got, which says which of its counts apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FetchStage {
    /// Not fetched since start.
    #[default]
    NotFetched,
    /// Fetched by another instance this interval (several instances share a database).
    Skipped,
    /// Failed before a body was read: connection, timeout, HTTP status, or
    /// the database (for the fetch claim). No count applies.
    NoBody,
    /// A body was read and parsed, but it is clearly not a proxy list:
    /// bytes, lines, parsed (0), rejected and duplicates apply.
    NotAList,
    /// Parsed but not stored (the database failed): every count but `new`.
    NotStored,
    /// Parsed and stored: every count applies.
    Stored,
    /// 304: unchanged since the last list stored, whose counts are shown
    /// (with `new` at 0).
    NotModified,
}

impl FetchStage {
    fn has_body(self) -> bool {
        matches!(
            self,
            FetchStage::NotAList
                | FetchStage::NotStored
                | FetchStage::Stored
                | FetchStage::NotModified
        )
    }

    fn stored(self) -> bool {
        matches!(self, FetchStage::Stored | FetchStage::NotModified)
    }
}

/// What one stored list held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListCounts {
    pub format: ListFormat,
    pub bytes: u64,
    /// Lines, or a JSON document's entries.
    pub lines: u64,
    pub parsed: u64,
    pub new: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub truncated: bool,
}

impl ListCounts {
    /// `B bytes, N lines, P parsed, K new, R rejected, D duplicates`, the
    /// format named when it is not text (`N entries (json)`), and `-` for
    /// what a fetch did not get to: every count without a `body`, `new`
    /// while not `stored`. The fetch summary and `import` print this.
    pub fn describe(&self, body: bool, stored: bool) -> String {
        let count = |applies: bool, n: u64, what: &str| {
            if applies {
                format!("{n} {what}")
            } else {
                format!("- {what}")
            }
        };
        let lines = match (body, self.format) {
            (false, _) => "- lines".to_string(),
            (true, ListFormat::Text) => format!("{} lines", self.lines),
            (true, format) => format!("{} {} ({format})", self.lines, format.unit()),
        };
        format!(
            "{}, {lines}, {}, {}, {}, {}",
            count(body, self.bytes, "bytes"),
            count(body, self.parsed, "parsed"),
            count(body && stored, self.new, "new"),
            count(body, self.rejected, "rejected"),
            count(body, self.duplicates, "duplicates"),
        )
    }
}

/// A list body read: what it held and its counts (`new` is 0: the store
/// says how many were new). Shared by fetches and `import`.
pub struct ReadList {
    pub parsed: ParsedList,
    pub counts: ListCounts,
}

/// Parses a body (`truncated` when the download was cut at `max_bytes`) and counts it.
pub fn read_list(bytes: &[u8], truncated: bool, options: &ParseOptions) -> ReadList {
    let parsed = parse_body(bytes, truncated, options);
    let counts = ListCounts {
        format: parsed.format,
        bytes: bytes.len() as u64,
        lines: parsed.lines as u64,
        parsed: parsed.proxies.len() as u64,
        new: 0,
        rejected: parsed.rejected as u64,
        duplicates: parsed.duplicates as u64,
        truncated,
    };
    ReadList { parsed, counts }
}

/// What the last fetch of one list found; shown by /stats and `proxy-pool fetch`.
///
/// The `counts` are those of the last fetch, the one
/// started at `last_started_at`, whether it succeeded or not: each fetch
/// starts them at 0, and `stage` says which of them it got to count (a
/// timeout counts nothing, an HTML page counts its bytes and lines). A 304
/// shows the counts of the unchanged list. `last_stored` keeps the counts of
/// the last list stored, from the fetch that ended at `last_success_at`.
#[derive(Clone, Debug, Default)]
pub struct ListStatus {
    pub name: String,
    pub url: String,
    pub interval: Duration,
    pub fetches: u64,
    pub last_started_at: Option<DateTime<Utc>>,
    pub last_duration: Option<Duration>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub stage: FetchStage,
    /// The last fetch's counts (shown flat in /stats).
    pub counts: ListCounts,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub last_stored: Option<ListCounts>,
    pub yields: Option<ListYield>,
}

impl ListStatus {
    /// The last fetch was answered 304: the list is the one stored last.
    pub fn not_modified(&self) -> bool {
        self.stage == FetchStage::NotModified
    }

    /// Fetched by another instance this interval (several instances share a database).
    pub fn skipped(&self) -> bool {
        self.stage == FetchStage::Skipped
    }

    /// One line for `proxy-pool fetch` and the log: when the last fetch
    /// started, how long it took, its counts (`-` for those it did not get
    /// to), whether it was cut at max_bytes, its error, and the list's yield
    /// (read right after a fetch that got a body, else as last refreshed).
    pub fn summary_line(&self) -> String {
        match self.stage {
            FetchStage::NotFetched => return format!("{}: not fetched yet", self.name),
            FetchStage::Skipped => {
                return format!(
                    "{}: skipped (fetched by another instance this interval)",
                    self.name
                )
            }
            _ => {}
        }
        let started = self
            .last_started_at
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|| "-".into());
        let duration = self
            .last_duration
            .map(|d| format!("{} ms", d.as_millis()))
            .unwrap_or_else(|| "- ms".into());
        let body = self.stage.has_body();
        let truncated = match (body, self.counts.truncated) {
            (false, _) => "- truncated",
            (true, true) => "truncated at max_bytes",
            (true, false) => "not truncated",
        };
        let error = match &self.last_error {
            Some(error) => format!("error: {error}"),
            None => "no error".to_string(),
        };
        let yields = match &self.yields {
            Some(y) => format!(
                "yield {} active now / {} ever active",
                y.active_now, y.ever_active
            ),
            None => "yield - active now / - ever active".to_string(),
        };
        format!(
            "{}: started {started}, {duration}{}, {}, {truncated}, {error}, {yields}",
            self.name,
            if self.stage == FetchStage::NotModified {
                ", not modified"
            } else {
                ""
            },
            self.counts.describe(body, self.stage.stored()),
        )
    }

    /// Records a finished fetch's start, duration, stage and counts (all
    /// of them: those it did not get to are 0).
    fn record(
        &mut self,
        started_at: DateTime<Utc>,
        started: Instant,
        stage: FetchStage,
        counts: ListCounts,
    ) {
        self.fetches += 1;
        self.last_started_at = Some(started_at);
        self.last_duration = Some(started.elapsed());
        self.stage = stage;
        self.counts = counts;
    }
}

struct ListRuntime {
    config: ListConfig,
    /// The list's name with any password in it hidden. A `source_urls`
    /// entry is named by its URL, which may carry credentials: this is the
    /// name logs, statuses and the database see.
    name: String,
    status: Mutex<ListStatus>,
    /// The last stored answer's validators, with the database outages seen
    /// when it was stored: after another outage they are not sent, and the
    /// list is downloaded and stored whole again.
    validators: Mutex<(CacheValidators, u64)>,
    /// Asks the list's thread to fetch now (POST /admin/fetch); holds at most one.
    trigger: (Sender<()>, Receiver<()>),
}

/// A failed fetch: when it started, how far it got and what it counted.
struct Failure {
    started: Instant,
    started_at: DateTime<Utc>,
    stage: FetchStage,
    counts: ListCounts,
}

/// Whether a fetch is the regular one of its interval (coordinated between
/// instances) or asked for by an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchKind {
    Scheduled,
    Manual,
}

/// The lists' yields as last read: all of them at each refresh, one list
/// right after its fetch.
#[derive(Default)]
struct Yields {
    by_source: HashMap<String, ListYield>,
    /// Every list was read once: a list missing from `by_source` gave nothing.
    refreshed: bool,
}

pub struct Fetcher {
    lists: Vec<Arc<ListRuntime>>,
    store: Store,
    health: Arc<Health>,
    agent: ureq::Agent,
    timeout: Duration,
    max_bytes: u64,
    allow_private_addresses: bool,
    instance: String,
    /// Each list's yield as last read.
    yields: RwLock<Yields>,
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

/// When a list that failed at `now` is tried again: after its backoff, but
/// never past the next tick of its fixed-rate grid (`t0` + k·interval), so
/// that a failure does not shift the list off its schedule; and never sooner
/// than the server's Retry-After, which wins over the grid.
pub fn retry_at(
    t0: Instant,
    interval: Duration,
    now: Instant,
    failures: u32,
    retry_after: Option<Duration>,
) -> Instant {
    let backoff = now + failure_delay(interval, failures, None);
    let at = backoff.min(next_tick(t0, interval, now));
    match retry_after {
        Some(wait) => at.max(now + wait),
        None => at,
    }
}

impl Fetcher {
    pub fn new(config: &Config, store: Store, health: Arc<Health>, instance: String) -> Fetcher {
        let lists = config
            .lists
            .iter()
            .map(|list| {
                let name = redact_url(&list.name);
                Arc::new(ListRuntime {
                    config: list.clone(),
                    name: name.clone(),
                    status: Mutex::new(ListStatus {
                        name,
                        url: redact_url(&list.url),
                        interval: list.interval,
                        ..ListStatus::default()
                    }),
                    validators: Mutex::new((CacheValidators::default(), 0)),
                    trigger: crossbeam_channel::bounded(1),
                })
            })
            .collect();
        Fetcher {
            lists,
            store,
            health,
            agent: download::agent(config.fetcher.timeout),
            timeout: config.fetcher.timeout,
            max_bytes: config.fetcher.max_bytes,
            allow_private_addresses: config.fetcher.allow_private_addresses,
            instance,
            yields: RwLock::new(Yields::default()),
            validate_now: None,
        }
    }

    /// New proxies from a list then get checked at once instead of at the
    /// next tick, so a fresh pool fills within seconds.
    pub fn with_validation_trigger(mut self, validate_now: Sender<()>) -> Fetcher {
        self.validate_now = Some(validate_now);
        self
    }

    pub fn statuses(&self) -> Vec<ListStatus> {
        self.lists
            .iter()
            .map(|list| self.with_yields(&list.status.lock()))
            .collect()
    }

    /// Refreshes each list's yield from the database (called periodically).
    pub fn refresh_yields(&self) {
        match self.store.list_yields() {
            Ok(rows) => {
                let by_source = rows.into_iter().map(|y| (y.list.clone(), y)).collect();
                *self.yields.write() = Yields {
                    by_source,
                    refreshed: true,
                };
            }
            Err(err) => log::debug!("cannot refresh list yields: {err}"),
        }
    }

    /// Reads one list's yield now, so that its fetch's summary is true at
    /// once and not only after the next refresh.
    fn refresh_yield(&self, list: &str) {
        match self.store.list_yield(list) {
            Ok(found) => {
                self.yields
                    .write()
                    .by_source
                    .insert(list.to_string(), found);
            }
            Err(err) => log::debug!("{list}: cannot read the list's yield: {err}"),
        }
    }

    /// Asks every list's thread to fetch now; does not wait.
    pub fn trigger_all(&self) {
        for list in &self.lists {
            let _ = list.trigger.0.try_send(());
        }
    }

    /// Fetches every list once, in parallel, refreshes the yields, and
    /// returns the statuses (in list order).
    pub fn fetch_all_once(self: &Arc<Self>, kind: FetchKind) -> Vec<ListStatus> {
        let handles: Vec<_> = (0..self.lists.len())
            .map(|index| {
                let fetcher = self.clone();
                thread::spawn(move || fetcher.fetch_list(index, kind))
            })
            .collect();
        for (index, handle) in handles.into_iter().enumerate() {
            // A fetch thread that panicked leaves the status it had.
            if handle.join().is_err() {
                log::error!("{}: the fetch thread panicked", self.lists[index].name);
            }
        }
        self.refresh_yields();
        self.statuses()
    }

    /// Starts one thread per list: a fetch at once, then on the list's
    /// fixed-rate grid, with exponential backoff after failures.
    pub fn start(
        self: &Arc<Self>,
        supervisor: &Supervisor,
        shutdown: ShutdownSignal,
    ) -> std::io::Result<Vec<JoinHandle<()>>> {
        let mut handles = Vec::new();
        for index in 0..self.lists.len() {
            let fetcher = self.clone();
            let shutdown = shutdown.clone();
            let handle = supervisor.spawn(format!("fetch-{index}"), move || {
                fetcher.list_loop(index, shutdown)
            })?;
            handles.push(handle);
        }
        Ok(handles)
    }

    fn list_loop(&self, index: usize, shutdown: ShutdownSignal) {
        let list = self.lists[index].clone();
        let interval = list.config.interval;
        let t0 = Instant::now();
        let mut due = t0;
        let mut kind = FetchKind::Scheduled;
        let mut startup = true;
        loop {
            let (status, retry_after) = self.fetch(index, kind, startup);
            startup = false;
            let now = Instant::now();
            // A skip is not a failure: another instance fetched the list.
            due = if status.last_error.is_some() && !status.skipped() {
                retry_at(t0, interval, now, status.consecutive_failures, retry_after)
            } else if kind == FetchKind::Manual && now < due {
                // A manual fetch does not move the regular schedule.
                due
            } else {
                next_tick(t0, interval, now)
            };
            crossbeam_channel::select! {
                recv(shutdown.receiver()) -> _ => return,
                recv(list.trigger.1) -> _ => kind = FetchKind::Manual,
                default(due.saturating_duration_since(Instant::now())) => kind = FetchKind::Scheduled,
            }
        }
    }

    /// One fetch of one list; returns its status and any Retry-After.
    pub fn fetch_list(&self, index: usize, kind: FetchKind) -> (ListStatus, Option<Duration>) {
        self.fetch(index, kind, false)
    }

    fn fetch(
        &self,
        index: usize,
        kind: FetchKind,
        startup: bool,
    ) -> (ListStatus, Option<Duration>) {
        let list = &self.lists[index];
        let config = &list.config;
        if kind == FetchKind::Scheduled {
            match self
                .store
                .claim_fetch(&list.name, config.interval, &self.instance)
            {
                Ok(true) => self.health.record_database(true, None),
                Ok(false) => {
                    if startup {
                        self.log_startup_skip(list);
                    } else {
                        log::debug!("{}: fetched by another instance this interval", list.name);
                    }
                    let mut status = list.status.lock();
                    status.stage = FetchStage::Skipped;
                    return (status.clone(), None);
                }
                Err(err) => {
                    // Without the database the list could not be stored anyway.
                    self.health.record_database(false, Some(&err));
                    let failure = Failure {
                        started: Instant::now(),
                        started_at: Utc::now(),
                        stage: FetchStage::NoBody,
                        counts: ListCounts::default(),
                    };
                    return self.record_failure(list, failure, err.to_string(), None);
                }
            }
        }
        let (status, retry_after) = self.download_and_store(list);
        if kind == FetchKind::Scheduled && status.last_error.is_some() {
            // A failed fetch does not count as this interval's fetch: the
            // retries after backoff (here or on another instance) may run.
            if let Err(err) = self.store.release_fetch(&list.name, &self.instance) {
                log::debug!("{}: cannot release the fetch claim: {err}", list.name);
            }
        }
        (status, retry_after)
    }

    /// At start-up, a list another instance (or this one before a restart)
    /// fetched within its interval is not fetched again: say so once, at info.
    fn log_startup_skip(&self, list: &ListRuntime) {
        let interval = list.config.interval.as_secs();
        match self.store.fetch_lease(&list.name) {
            Ok(Some((by, at))) => log::info!(
                "{}: fetched by {by} at {}, within its interval: not fetched at start-up; \
                 its next fetch is at the next tick, in {interval} s",
                list.name,
                at.format("%Y-%m-%dT%H:%M:%SZ")
            ),
            _ => log::info!(
                "{}: fetched by another instance within its interval: not fetched at start-up; \
                 its next fetch is at the next tick, in {interval} s",
                list.name
            ),
        }
    }

    fn download_and_store(&self, list: &ListRuntime) -> (ListStatus, Option<Duration>) {
        let config = &list.config;
        let started = Instant::now();
        let started_at = Utc::now();
        let validators = {
            let (validators, outages) = &*list.validators.lock();
            if *outages == self.health.database_outages() {
                validators.clone()
            } else {
                CacheValidators::default()
            }
        };
        let downloaded = download::download(
            &self.agent,
            &config.url,
            self.timeout,
            self.max_bytes,
            &validators,
        );
        let (bytes, truncated, new_validators) = match downloaded {
            Ok(Downloaded::NotModified) => {
                let mut status = list.status.lock();
                // The list is the one stored last: its counts, nothing new.
                let counts = status.last_stored.unwrap_or_default();
                let counts = ListCounts { new: 0, ..counts };
                status.record(started_at, started, FetchStage::NotModified, counts);
                status.last_success_at = Some(Utc::now());
                status.last_error = None;
                status.consecutive_failures = 0;
                drop(status);
                self.refresh_yield(&list.name);
                let status = self.with_yields(&list.status.lock());
                log::info!("fetch {}", status.summary_line());
                return (status, None);
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
                let failure = Failure {
                    started,
                    started_at,
                    stage: FetchStage::NoBody,
                    counts: ListCounts::default(),
                };
                return self.record_failure(list, failure, message, retry_after);
            }
        };
        let options = ParseOptions {
            default_protocol: config.protocol,
            allow_private_addresses: self.allow_private_addresses,
        };
        let ReadList { parsed, mut counts } = read_list(&bytes, truncated, &options);
        drop(bytes);
        if let Some(reason) = parsed.not_a_list() {
            let failure = Failure {
                started,
                started_at,
                stage: FetchStage::NotAList,
                counts,
            };
            self.refresh_yield(&list.name);
            return self.record_failure(list, failure, reason.to_string(), None);
        }
        for reject in parsed.first_rejects.iter().take(3) {
            log::info!("{}: {reject}", list.name);
        }
        let outages = self.health.database_outages();
        let upserted = match self.store.upsert_listed(&list.name, &parsed.proxies) {
            Ok(upserted) => {
                self.health.record_database(true, None);
                upserted
            }
            Err(err) => {
                self.health.record_database(false, Some(&err));
                let failure = Failure {
                    started,
                    started_at,
                    stage: FetchStage::NotStored,
                    counts,
                };
                return self.record_failure(
                    list,
                    failure,
                    format!("cannot store the list: {err}"),
                    None,
                );
            }
        };
        counts.new = upserted.new;
        // Only a stored list may be answered with 304 next time, and only
        // while the database keeps it: not after an outage.
        *list.validators.lock() = (new_validators, outages);
        let mut status = list.status.lock();
        status.record(started_at, started, FetchStage::Stored, counts);
        status.last_success_at = Some(Utc::now());
        status.last_stored = Some(counts);
        status.last_error = None;
        status.consecutive_failures = 0;
        drop(status);
        self.refresh_yield(&list.name);
        let status = self.with_yields(&list.status.lock());
        log::info!("fetch {}", status.summary_line());
        if counts.new > 0 {
            if let Some(validate_now) = &self.validate_now {
                // At most one job waits; a full channel means one is coming.
                let _ = validate_now.try_send(());
            }
        }
        (status, None)
    }

    /// A copy of `status` with the list's yield as last read (zero for a
    /// list that gave nothing yet; None while it was never read).
    fn with_yields(&self, status: &ListStatus) -> ListStatus {
        let mut status = status.clone();
        let yields = self.yields.read();
        status.yields = match yields.by_source.get(&status.name) {
            Some(found) => Some(found.clone()),
            None if yields.refreshed => Some(ListYield {
                list: status.name.clone(),
                listed: 0,
                active_now: 0,
                ever_active: 0,
            }),
            None => None,
        };
        status
    }

    /// Records a failed fetch with what it got to count. Every failed fetch
    /// logs its summary; one repeating the last fetch's error does so at
    /// debug, so that a list failing for hours warns once, not at every retry.
    fn record_failure(
        &self,
        list: &ListRuntime,
        failure: Failure,
        message: String,
        retry_after: Option<Duration>,
    ) -> (ListStatus, Option<Duration>) {
        let mut status = list.status.lock();
        let repeated = status.consecutive_failures > 0
            && status.last_error.as_deref() == Some(message.as_str());
        status.record(
            failure.started_at,
            failure.started,
            failure.stage,
            failure.counts,
        );
        status.last_error = Some(message);
        status.consecutive_failures += 1;
        let line = self.with_yields(&status).summary_line();
        if repeated {
            log::debug!(
                "fetch {line} (failure {} in a row)",
                status.consecutive_failures
            );
        } else {
            log::warn!("fetch {line}");
        }
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

    #[test]
    fn a_retry_never_goes_past_the_next_tick_of_the_grid() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(60);
        let s = Duration::from_secs;
        // Early in an interval the backoff applies as it is.
        assert_eq!(retry_at(t0, interval, t0 + s(1), 1, None), t0 + s(6));
        assert_eq!(retry_at(t0, interval, t0 + s(1), 3, None), t0 + s(21));
        // Late in an interval the next tick comes first: the retry is the
        // regular fetch, on the grid.
        assert_eq!(retry_at(t0, interval, t0 + s(58), 1, None), t0 + s(60));
        assert_eq!(retry_at(t0, interval, t0 + s(130), 4, None), t0 + s(170));
        assert_eq!(retry_at(t0, interval, t0 + s(130), 5, None), t0 + s(180));
        // A backoff as long as the interval lands on the next tick, not an
        // interval after the failure.
        assert_eq!(retry_at(t0, interval, t0 + s(70), 10, None), t0 + s(120));
        // Retry-After wins over the grid.
        assert_eq!(
            retry_at(t0, interval, t0 + s(58), 1, Some(s(30))),
            t0 + s(88)
        );
        assert_eq!(retry_at(t0, interval, t0 + s(1), 1, Some(s(2))), t0 + s(6));
    }
}
