//! A validation cycle: claim due proxies from the database in leased batches,
//! check them on the validator's own rayon pool with a bounded number in
//! flight, and write results back in batches (one statement each) while the
//! state manager's active set learns every change at once.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use crate::health::Health;
use crate::proxy::ActiveProxy;
use crate::shutdown::ShutdownSignal;
use crate::state::State;
use crate::store::{CheckRecord, DuePolicy, DueProxy, Store};

use super::check::{Checker, Verdict};
use super::geoip::Geoip;
use super::judge_answer::DeadReason;

/// Results written per statement.
const WRITE_BATCH: usize = 500;
/// A partial batch is written after this long, so progress shows in the table.
const WRITE_EVERY: Duration = Duration::from_secs(1);
/// Cycles remembered for /stats.
const HISTORY: usize = 20;

/// Why a cycle did not run, or stopped before its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The judge did not answer our direct request: nobody is marked dead.
    JudgeUnreachable(String),
    /// The judge stopped answering in mid-cycle; the batch in hand was dropped.
    JudgeLost,
    DatabaseUnavailable(String),
    ShuttingDown,
    /// Every due proxy was leased by other instances, which check them.
    LeasedByOthers {
        due: u64,
    },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::JudgeUnreachable(error) => write!(f, "judge unreachable: {error}"),
            SkipReason::JudgeLost => f.write_str("judge became unreachable during the cycle"),
            SkipReason::DatabaseUnavailable(error) => write!(f, "database unavailable: {error}"),
            SkipReason::ShuttingDown => f.write_str("shutting down"),
            SkipReason::LeasedByOthers { due } => write!(
                f,
                "all {due} due proxies are leased by other instances, which check them"
            ),
        }
    }
}

/// What one cycle did, for the log, /stats and `proxy-pool validate`.
#[derive(Clone, Debug, Default)]
pub struct CycleSummary {
    pub started_at: Option<DateTime<Utc>>,
    pub duration: Duration,
    pub due: u64,
    pub checked: u64,
    pub alive: u64,
    pub dead_by_reason: BTreeMap<DeadReason, u64>,
    /// Due proxies this cycle did not claim: other instances held them.
    pub leased_by_others: u64,
    /// Time spent in result writes.
    pub write_time: Duration,
    /// Set when the cycle did not run (or stopped early) and why.
    pub skipped: Option<SkipReason>,
}

impl CycleSummary {
    pub fn dead(&self) -> u64 {
        self.dead_by_reason.values().sum()
    }

    /// The dead counts by reason name (`bad_status` for every status).
    pub fn dead_counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = BTreeMap::new();
        for (reason, n) in &self.dead_by_reason {
            *counts.entry(reason.as_str()).or_default() += n;
        }
        counts
    }

    pub fn summary_line(&self) -> String {
        if let Some(reason) = &self.skipped {
            if self.checked == 0 {
                return format!("validation cycle skipped: {reason}");
            }
        }
        let reasons: Vec<String> = self
            .dead_counts()
            .iter()
            .map(|(reason, n)| format!("{reason}={n}"))
            .collect();
        let leased = if self.leased_by_others > 0 {
            format!(", {} leased by other instances", self.leased_by_others)
        } else {
            String::new()
        };
        format!(
            "validation cycle: {} due{leased}, {} checked, {} alive, {} dead ({}) in {} ms (writes {} ms){}",
            self.due,
            self.checked,
            self.alive,
            self.dead(),
            reasons.join(" "),
            self.duration.as_millis(),
            self.write_time.as_millis(),
            self.skipped
                .as_ref()
                .map(|r| format!("; stopped early: {r}"))
                .unwrap_or_default()
        )
    }
}

pub struct ValidatorSettings {
    pub workers: usize,
    pub timeout: Duration,
    pub policy: DuePolicy,
}

pub struct Validator {
    store: Store,
    checker: Arc<Checker>,
    geoip: Option<Arc<Geoip>>,
    pool: rayon::ThreadPool,
    settings: ValidatorSettings,
    state: Arc<State>,
    health: Arc<Health>,
    history: Mutex<VecDeque<CycleSummary>>,
    running: Mutex<Option<Arc<Progress>>>,
}

/// Counters of the cycle in progress.
#[derive(Debug, Default)]
pub struct Progress {
    pub due: AtomicU64,
    pub checked: AtomicU64,
    pub alive: AtomicU64,
}

impl Validator {
    pub fn new(
        store: Store,
        checker: Checker,
        geoip: Option<Geoip>,
        settings: ValidatorSettings,
        state: Arc<State>,
        health: Arc<Health>,
    ) -> std::io::Result<Validator> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.workers)
            .thread_name(|i| format!("check-{i}"))
            .stack_size(256 * 1024)
            // A check that panics loses its proxy's result for this cycle
            // (its lease expires, it is due again) and says so; the pool
            // and the cycle go on.
            .panic_handler(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|text| text.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                log::error!("a check panicked on the validator pool: {what}");
            })
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Validator {
            store,
            checker: Arc::new(checker),
            geoip: geoip.map(Arc::new),
            pool,
            settings,
            state,
            health,
            history: Mutex::new(VecDeque::new()),
            running: Mutex::new(None),
        })
    }

    /// The last cycles, newest last.
    pub fn history(&self) -> Vec<CycleSummary> {
        self.history.lock().iter().cloned().collect()
    }

    /// The cycle in progress, if any.
    pub fn progress(&self) -> Option<Arc<Progress>> {
        self.running.lock().clone()
    }

    /// Runs one cycle to the end (or until shutdown) and records its summary.
    pub fn run_cycle(&self, shutdown: &ShutdownSignal) -> CycleSummary {
        let started = Instant::now();
        let mut summary = CycleSummary {
            started_at: Some(Utc::now()),
            ..CycleSummary::default()
        };
        match self.checker.learn_own_ip() {
            Ok(own_ip) => self.check_due(own_ip, shutdown, &mut summary),
            Err(err) => {
                // A judge outage is not a pool outage: nobody is marked dead.
                summary.skipped = Some(SkipReason::JudgeUnreachable(err.to_string()));
            }
        }
        summary.duration = started.elapsed();
        log::info!("{}", summary.summary_line());
        let mut history = self.history.lock();
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(summary.clone());
        summary
    }

    fn check_due(&self, own_ip: IpAddr, shutdown: &ShutdownSignal, summary: &mut CycleSummary) {
        let progress = Arc::new(Progress::default());
        *self.running.lock() = Some(progress.clone());
        let cycle_start = match self.store.count_due(&self.settings.policy) {
            Ok(count) => {
                progress
                    .due
                    .store(count.due.max(0) as u64, Ordering::Relaxed);
                self.health.record_database(true, None);
                count.at
            }
            Err(err) => {
                self.health.record_database(false, Some(&err));
                summary.skipped = Some(SkipReason::DatabaseUnavailable(err.to_string()));
                *self.running.lock() = None;
                return;
            }
        };
        let workers = self.settings.workers;
        // In flight: every worker busy plus one batch queued behind them.
        let in_flight = workers * 2;
        let (token_tx, token_rx) = crossbeam_channel::bounded::<()>(in_flight);
        for _ in 0..in_flight {
            let _ = token_tx.send(());
        }
        let (result_tx, result_rx) = crossbeam_channel::bounded::<(DueProxy, Verdict)>(in_flight);
        let writer = {
            let store = self.store.clone();
            let state = self.state.clone();
            let health = self.health.clone();
            let checker = self.checker.clone();
            let geoip = self.geoip.clone();
            let progress = progress.clone();
            thread::Builder::new()
                .name("validate-write".into())
                .spawn(move || {
                    write_results(result_rx, store, state, health, checker, geoip, progress)
                })
                .expect("spawn the result writer")
        };
        let mut stop_reason = None;
        let mut claimed = 0u64;
        let mut cursor = Cursor::default();
        let mut last_progress_log = Instant::now();
        'claiming: loop {
            if shutdown.is_triggered() {
                stop_reason = Some(SkipReason::ShuttingDown);
                break;
            }
            if writer.is_finished() {
                stop_reason = Some(SkipReason::JudgeLost);
                break;
            }
            let batch = match self.store.claim_due(
                &self.settings.policy,
                cycle_start,
                cursor.after,
                workers.max(100) as i64,
            ) {
                Ok(batch) => batch,
                Err(err) => {
                    self.health.record_database(false, Some(&err));
                    stop_reason = Some(SkipReason::DatabaseUnavailable(err.to_string()));
                    break;
                }
            };
            if !cursor.advance(batch.last().map(|due| due.id)) {
                break;
            }
            if batch.is_empty() {
                continue;
            }
            // Proxies that became due after the count (a fetch just listed
            // them) are due all the same.
            claimed += batch.len() as u64;
            progress.due.fetch_max(claimed, Ordering::Relaxed);
            for due in batch {
                // Wait for a free slot; shutdown interrupts the wait.
                crossbeam_channel::select! {
                    recv(token_rx) -> _ => {}
                    recv(shutdown.receiver()) -> _ => {
                        stop_reason = Some(SkipReason::ShuttingDown);
                        break 'claiming;
                    }
                }
                let checker = self.checker.clone();
                let result_tx = result_tx.clone();
                let token_tx = token_tx.clone();
                self.pool.spawn(move || {
                    let verdict = checker.check(&due.key, own_ip);
                    let _ = result_tx.send((due, verdict));
                    let _ = token_tx.send(());
                });
            }
            if last_progress_log.elapsed() >= Duration::from_secs(10) {
                last_progress_log = Instant::now();
                log::info!(
                    "validation progress: {} / {} checked, {} alive",
                    progress.checked.load(Ordering::Relaxed),
                    progress.due.load(Ordering::Relaxed),
                    progress.alive.load(Ordering::Relaxed)
                );
            }
        }
        drop(result_tx);
        let written = writer.join().unwrap_or_default();
        if written.judge_down && stop_reason.is_none() {
            stop_reason = Some(SkipReason::JudgeLost);
        }
        summary.due = progress.due.load(Ordering::Relaxed);
        if stop_reason.is_none() {
            // What was due at the start and not claimed by the end was held
            // by other instances (a row that stopped being due, because
            // another instance checked it, counts here too).
            summary.leased_by_others = summary.due.saturating_sub(claimed);
            if claimed == 0 && summary.due > 0 {
                stop_reason = Some(SkipReason::LeasedByOthers { due: summary.due });
            }
        }
        summary.checked = written.checked;
        summary.alive = written.alive;
        summary.dead_by_reason = written.dead_by_reason;
        summary.write_time = written.write_time;
        summary.skipped = stop_reason;
        *self.running.lock() = None;
    }
}

/// The keyset cursor of a cycle's claims. Claims go up the ids from the
/// highest id claimed so far; when they find nothing above it, one more pass
/// starts from the lowest id, for the rows that were leased when the cursor
/// went past them (an instance that died holding them, its lease now over)
/// and for rows that became due behind the cursor. The cycle ends when that
/// pass, too, finds nothing.
#[derive(Debug, Default)]
struct Cursor {
    after: i64,
    rewound: bool,
}

impl Cursor {
    /// Moves past a claim whose highest id was `last` (None: it found
    /// nothing). Returns false when the cycle is over.
    fn advance(&mut self, last: Option<i64>) -> bool {
        match last {
            Some(id) => {
                self.after = self.after.max(id);
                true
            }
            None if self.rewound || self.after == 0 => false,
            None => {
                self.rewound = true;
                self.after = 0;
                true
            }
        }
    }
}

#[derive(Default)]
struct Written {
    checked: u64,
    alive: u64,
    dead_by_reason: BTreeMap<DeadReason, u64>,
    write_time: Duration,
    judge_down: bool,
}

/// The writer thread: batches results into one UPDATE each, applies them to
/// the active set at once, and guards against a judge outage in mid-cycle
/// (a batch with dead proxies is written only while the judge answers us).
fn write_results(
    results: crossbeam_channel::Receiver<(DueProxy, Verdict)>,
    store: Store,
    state: Arc<State>,
    health: Arc<Health>,
    checker: Arc<Checker>,
    geoip: Option<Arc<Geoip>>,
    progress: Arc<Progress>,
) -> Written {
    let mut written = Written::default();
    let mut batch: Vec<(DueProxy, Verdict)> = Vec::with_capacity(WRITE_BATCH);
    let mut last_write = Instant::now();
    loop {
        let next = results.recv_timeout(WRITE_EVERY.saturating_sub(last_write.elapsed()));
        let closed = matches!(next, Err(crossbeam_channel::RecvTimeoutError::Disconnected));
        if let Ok(item) = next {
            batch.push(item);
        }
        let due = batch.len() >= WRITE_BATCH || last_write.elapsed() >= WRITE_EVERY || closed;
        if due && !batch.is_empty() {
            let has_dead = batch.iter().any(|(_, verdict)| !verdict.is_alive());
            if has_dead && checker.learn_own_ip().is_err() {
                // The proxies may be fine: the judge is not. Drop the batch
                // (their leases expire) and stop taking results.
                log::warn!(
                    "judge unreachable in mid-cycle: {} results discarded",
                    batch.len()
                );
                written.judge_down = true;
                return written;
            }
            let records: Vec<CheckRecord> = batch
                .iter()
                .map(|(due, verdict)| record(due, verdict, geoip.as_deref()))
                .collect();
            let started = Instant::now();
            match write_with_retry(&store, &records) {
                Ok(()) => health.record_database(true, None),
                Err(err) => {
                    health.record_database(false, Some(&err));
                    log::warn!("{} results not written: {err}", records.len());
                }
            }
            written.write_time += started.elapsed();
            let mut activated = Vec::new();
            let mut deactivated = Vec::new();
            for ((due, verdict), record) in batch.drain(..).zip(records) {
                written.checked += 1;
                progress.checked.fetch_add(1, Ordering::Relaxed);
                match verdict {
                    Verdict::Alive(alive) => {
                        written.alive += 1;
                        progress.alive.fetch_add(1, Ordering::Relaxed);
                        activated.push(ActiveProxy {
                            exit_ip: record.exit_ip,
                            id: due.id,
                            key: due.key,
                            latency_ms: Some(alive.latency_ms),
                            anonymity: Some(alive.anonymity),
                            country: record.country,
                            supports_https: record.supports_https,
                            last_validated_at: Some(Utc::now()),
                            anonymity_evidence: record.evidence.as_deref().map(Arc::from),
                        });
                    }
                    Verdict::Dead(reason) => {
                        *written.dead_by_reason.entry(reason).or_default() += 1;
                        deactivated.push(due.id);
                    }
                }
            }
            // Applied even when the write failed: while the database is
            // down, memory is the only place serving can learn that a proxy
            // died. The unwritten rows stay due (their leases expire), so
            // they are checked and written again once the database is back.
            state.apply_changes(activated, deactivated);
            last_write = Instant::now();
        }
        if closed {
            return written;
        }
    }
}

/// A batch write, retried a few times so a short database hiccup loses nothing.
fn write_with_retry(
    store: &Store,
    records: &[CheckRecord],
) -> Result<(), crate::store::StoreError> {
    let mut delay = Duration::from_millis(250);
    let mut attempt = 0;
    loop {
        match store.write_results(records) {
            Ok(()) => return Ok(()),
            Err(err) if attempt >= 3 => return Err(err),
            Err(_) => {
                thread::sleep(delay);
                delay *= 2;
                attempt += 1;
            }
        }
    }
}

fn record(due: &DueProxy, verdict: &Verdict, geoip: Option<&Geoip>) -> CheckRecord {
    match verdict {
        Verdict::Alive(alive) => CheckRecord {
            id: due.id,
            alive: true,
            latency_ms: Some(alive.latency_ms),
            anonymity: Some(alive.anonymity),
            supports_https: alive.https.supports_https(),
            https_checked: alive.https.supports_https().is_some(),
            https_failure: alive.https.failure().cloned(),
            // The country is where the traffic leaves, and only the exit
            // address says where that is: unknown when the judge hid it.
            country: geoip.zip(alive.exit_ip).and_then(|(g, ip)| g.lookup(ip)),
            exit_ip: alive.exit_ip,
            dead_reason: None,
            evidence: (!alive.evidence.is_empty()).then(|| alive.evidence.join("; ")),
        },
        Verdict::Dead(reason) => CheckRecord {
            id: due.id,
            alive: false,
            latency_ms: None,
            anonymity: None,
            supports_https: None,
            https_checked: false,
            https_failure: None,
            country: None,
            exit_ip: None,
            dead_reason: Some(reason.clone()),
            evidence: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::proxy::{Anonymity, Protocol, ProxyKey};
    use crate::validator::check::{Alive, HttpsFailure, HttpsOutcome};

    fn due(ip: &str) -> DueProxy {
        DueProxy {
            id: 7,
            key: ProxyKey {
                protocol: Protocol::Http,
                ip: ip.parse().unwrap(),
                port: 8080,
                username: None,
                password: None,
            },
        }
    }

    /// Guards where the country comes from: a proxy whose traffic leaves
    /// from another address is placed where it leaves; one whose exit the
    /// judge did not show, and a dead one, are placed nowhere (the listed
    /// address used to stand in: the contract takes the exit only).
    #[test]
    fn the_country_is_where_the_traffic_leaves() {
        // 198.51.100.0/24 is NL, 203.0.113.0/24 is JP (Tor's INTFROM,INTTO,CC).
        let tor = "3325256704,3325256959,NL\n3405803776,3405804031,JP\n";
        let geoip = Geoip::from_bytes(Path::new("geoip"), tor.as_bytes().to_vec()).unwrap();
        let alive = Alive {
            latency_ms: 120,
            anonymity: Anonymity::Elite,
            evidence: Vec::new(),
            exit_ip: Some("203.0.113.9".parse().unwrap()),
            https: HttpsOutcome::Failed(HttpsFailure::ConnectRefused(403)),
        };
        let listed_in_nl = due("198.51.100.20");
        let found = record(&listed_in_nl, &Verdict::Alive(alive.clone()), Some(&geoip));
        assert_eq!(found.country.as_deref(), Some("JP"));
        assert_eq!(found.exit_ip, alive.exit_ip);
        assert_eq!(found.supports_https, Some(false));
        assert!(found.https_checked);
        assert_eq!(
            found.https_failure.map(|f| f.to_string()).as_deref(),
            Some("connect_refused 403")
        );

        let hidden = Alive {
            exit_ip: None,
            https: HttpsOutcome::NotChecked,
            ..alive.clone()
        };
        let found = record(&listed_in_nl, &Verdict::Alive(hidden), Some(&geoip));
        assert_eq!(found.country, None);
        assert_eq!(found.supports_https, None);
        assert!(!found.https_checked);

        let dead = Verdict::Dead(DeadReason::Refused);
        let found = record(&listed_in_nl, &dead, Some(&geoip));
        assert_eq!(found.country, None);
        assert_eq!(found.dead_reason, Some(DeadReason::Refused));
        assert_eq!(
            record(&listed_in_nl, &Verdict::Alive(alive), None).country,
            None
        );
    }

    #[test]
    fn summary_counts_reasons_by_name_and_says_who_held_the_rest() {
        let mut summary = CycleSummary {
            due: 200,
            checked: 3,
            alive: 0,
            leased_by_others: 197,
            ..CycleSummary::default()
        };
        summary.dead_by_reason.insert(DeadReason::BadStatus(403), 1);
        summary.dead_by_reason.insert(DeadReason::BadStatus(502), 1);
        summary.dead_by_reason.insert(DeadReason::Refused, 1);
        let counts = summary.dead_counts();
        assert_eq!(counts.get("bad_status"), Some(&2));
        assert_eq!(counts.get("refused"), Some(&1));
        let line = summary.summary_line();
        assert!(
            line.contains("200 due, 197 leased by other instances, 3 checked"),
            "{line}"
        );
        let all_leased = CycleSummary {
            due: 200,
            skipped: Some(SkipReason::LeasedByOthers { due: 200 }),
            ..CycleSummary::default()
        };
        assert_eq!(
            all_leased.summary_line(),
            "validation cycle skipped: all 200 due proxies are leased by other instances, which check them"
        );
    }

    #[test]
    fn the_cursor_climbs_then_rewinds_once_then_ends() {
        let mut cursor = Cursor::default();
        assert!(cursor.advance(Some(100)));
        assert_eq!(cursor.after, 100);
        assert!(cursor.advance(Some(250)));
        assert_eq!(cursor.after, 250);
        // Nothing above 250: one more pass from the start.
        assert!(cursor.advance(None));
        assert_eq!(cursor.after, 0);
        // The second pass finds a row left behind, then nothing: the end.
        assert!(cursor.advance(Some(7)));
        assert_eq!(cursor.after, 7);
        assert!(!cursor.advance(None));
    }

    #[test]
    fn a_cycle_that_finds_nothing_at_all_does_not_rewind() {
        let mut cursor = Cursor::default();
        assert!(!cursor.advance(None));
    }
}
