//! All the wiring of `serve`: builds the pools and channels, starts the
//! named threads in order, and on shutdown stops and joins them in reverse.
//! The command line is in [`crate::cli`], the one-shot commands in
//! [`crate::commands`]; the builders they share are here.

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};

use crate::api::{ApiContext, ApiServer};
use crate::config::{Config, ConfigError};
use crate::fetcher::Fetcher;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::persist::Snapshotter;
use crate::scheduler::{next_tick, run_metronome};
use crate::shutdown::{Shutdown, ShutdownSignal};
use crate::state::{
    active_snapshot_max_age, run_memory_sync, sync_from_store, RestoreReport, State,
};
use crate::store::{DuePolicy, Store};
use crate::supervisor::{panic_message, Supervisor};
use crate::validator::check::{CheckConfig, Checker};
use crate::validator::cycle::{Validator, ValidatorSettings};
use crate::validator::geoip::Geoip;

/// A name for this process in the database's coordination rows.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

pub fn build_validator(
    config: &Config,
    store: Store,
    state: Arc<State>,
    health: Arc<Health>,
) -> anyhow::Result<Validator> {
    let geoip = match &config.geoip.database {
        Some(path) => Some(Geoip::open(path).map_err(|err| ConfigError {
            file: "config".into(),
            problems: vec![crate::config::Problem {
                line: None,
                section: "geoip".into(),
                key: Some("database".into()),
                message: format!("cannot use {}: {err}", path.display()),
            }],
        })?),
        None => None,
    };
    let checker = Checker::new(CheckConfig::from_validator(&config.validator))
        .context("cannot use [validator] validation_target")?;
    let settings = ValidatorSettings {
        workers: config.validator.workers,
        timeout: config.validator.timeout,
        policy: due_policy(config),
    };
    Validator::new(store, checker, geoip, settings, state, health)
        .context("cannot start the validator pool")
}

pub fn due_policy(config: &Config) -> DuePolicy {
    DuePolicy {
        revalidate_after: config.validator.revalidate_after,
        retry_inactive_after: config.validator.retry_inactive_after,
        // A claimed proxy waits behind at most two rounds of checks in
        // flight, each within the timeout; after the lease, another
        // instance may take it over (its claimer died).
        lease: crate::validator::check::max_check_duration(&config.validator) * 4
            + Duration::from_secs(5),
    }
}

/// What the service serves while it waits for the database at start-up, for
/// the log: the snapshot's active set, with its age, or nothing but memory.
fn serving_while_waiting(restored: Option<&RestoreReport>, now: DateTime<Utc>) -> String {
    match restored {
        Some(report) if report.active > 0 => format!(
            "serving the {} active proxies of the snapshot taken {} s ago until it answers",
            report.active,
            (now - report.taken_at).num_seconds().max(0)
        ),
        _ => "serving from memory".into(),
    }
}

/// Waits for the database and migrates it, retrying with capped exponential
/// backoff; `serving` says what is served meanwhile, for the one log line.
/// Returns false when shutdown came first.
fn wait_for_database(
    store: &Store,
    health: &Health,
    shutdown: &ShutdownSignal,
    serving: &str,
) -> bool {
    let mut backoff = Duration::from_millis(500);
    let mut logged = false;
    loop {
        match store.migrate() {
            Ok(()) => {
                health.record_database(true, None);
                return true;
            }
            Err(err) => {
                if !logged {
                    log::warn!("database not ready ({err}); {serving}, retrying with backoff");
                    logged = true;
                }
            }
        }
        if shutdown.wait(backoff) {
            return false;
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn spawn(
    supervisor: &Supervisor,
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> anyhow::Result<JoinHandle<()>> {
    supervisor
        .spawn(name, body)
        .with_context(|| format!("cannot start thread {name}"))
}

/// Joins threads until `deadline`; threads still busy then are left to end
/// with the process. Supervised threads catch their own panics, so a join
/// error is a panic outside them (a panicking panic handler): it is logged.
fn join_until(handles: Vec<JoinHandle<()>>, deadline: Instant) {
    for handle in handles {
        while !handle.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if handle.is_finished() {
            let name = handle.thread().name().unwrap_or("?").to_string();
            if let Err(payload) = handle.join() {
                log::error!(
                    "thread {name} ended with a panic: {}",
                    panic_message(payload.as_ref())
                );
            }
        } else {
            log::warn!(
                "thread {} still busy at the shutdown deadline",
                handle.thread().name().unwrap_or("?")
            );
        }
    }
}

pub fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown
        .on_signals()
        .context("cannot install signal handlers")?;
    let signal = shutdown.signal();
    let supervisor = Supervisor::new(shutdown.clone());
    let config = Arc::new(config);
    let health = Arc::new(Health::new());
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(
        State::new(&config.scoring)
            .with_max_sources(config.state.max_sources)
            .with_active_snapshot_max_age(active_snapshot_max_age(
                config.validator.revalidate_after,
            )),
    );
    let snapshotter = Arc::new(
        Snapshotter::new(
            config.state.snapshot_path.clone(),
            state.clone(),
            health.clone(),
        )
        .context("cannot start the snapshot writer")?,
    );
    // The snapshot's active set is served until the database's replaces it,
    // so that a start during an outage still has proxies to hand out.
    let restored = snapshotter.restore();
    health.record_pool_size(state.active_count());

    let store = Store::connect(&config.database)?;
    let (validate_tx, validate_rx) = crossbeam_channel::bounded::<()>(1);
    let fetcher = Arc::new(
        Fetcher::new(&config, store.clone(), health.clone(), instance_name())
            .with_validation_trigger(validate_tx.clone()),
    );
    let validator = Arc::new(build_validator(
        &config,
        store.clone(),
        state.clone(),
        health.clone(),
    )?);

    if !config.server.bind.ip().is_loopback() && config.server.api_token.is_none() {
        log::warn!(
            "listening on {} without [server] api_token: anyone who can reach it can use and administer the pool",
            config.server.bind
        );
    }
    let context = Arc::new(ApiContext {
        config: config.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        state: state.clone(),
        fetcher: fetcher.clone(),
        validator: validator.clone(),
        validate_now: validate_tx.clone(),
        snapshotter: snapshotter.clone(),
    });
    let mut api = ApiServer::start(context).map_err(anyhow::Error::msg)?;
    log::info!("listening on http://{}", api.local_addr);

    let mut handles = Vec::new();
    // Periodic snapshots, encoded outside every lock. Started before the
    // wait for the database: feedback taken during an outage at start-up
    // is saved all the same.
    handles.push(spawn(&supervisor, "snapshot", {
        let (snapshotter, signal) = (snapshotter.clone(), signal.clone());
        let interval = config.state.snapshot_interval;
        move || {
            let t0 = Instant::now();
            loop {
                if signal.wait_until(next_tick(t0, interval, Instant::now())) {
                    return;
                }
                snapshotter.write_logged();
            }
        }
    })?);

    let serving = serving_while_waiting(restored.as_ref(), Utc::now());
    if wait_for_database(&store, &health, &signal, &serving) {
        log::info!("database ready, schema applied");
        let started = Instant::now();
        sync_from_store(&store, &state, &health);
        health.record_pool_size(state.active_count());
        let replaced = match &restored {
            Some(report) if report.active > 0 => {
                format!(", replacing the snapshot's {}", report.active)
            }
            _ => String::new(),
        };
        log::info!(
            "{} active proxies loaded in {} ms{replaced}",
            state.active_count(),
            started.elapsed().as_millis()
        );

        // Memory sync: active set and list yields from the shared table.
        handles.push(spawn(&supervisor, "sync", {
            let (store, state, health, fetcher, signal) = (
                store.clone(),
                state.clone(),
                health.clone(),
                fetcher.clone(),
                signal.clone(),
            );
            let interval = config.state.sync_interval;
            move || {
                run_memory_sync(&store, &state, &health, &signal, interval, || {
                    fetcher.refresh_yields()
                })
            }
        })?);

        // Validation: the metronome enqueues, one worker runs cycles.
        handles.push(spawn(&supervisor, "metronome", {
            let (interval, jobs, signal) = (
                config.scheduler.interval,
                validate_tx.clone(),
                signal.clone(),
            );
            move || run_metronome("metronome", interval, jobs, signal, || ())
        })?);
        let _ = validate_tx.try_send(());
        handles.push(spawn(&supervisor, "validate", {
            let (validator, signal) = (validator.clone(), signal.clone());
            let (state, health) = (state.clone(), health.clone());
            move || loop {
                crossbeam_channel::select! {
                    recv(signal.receiver()) -> _ => return,
                    recv(validate_rx) -> job => {
                        if job.is_err() {
                            return;
                        }
                        validator.run_cycle(&signal);
                        health.record_pool_size(state.active_count());
                    }
                }
            }
        })?);

        handles.extend(fetcher.start(&supervisor, signal.clone())?);
        fetcher.refresh_yields();
    }

    signal.receiver().recv().ok();
    // The whole shutdown, last snapshot included, fits in the bound: the
    // threads get what is left once the snapshot's share is set aside
    // (twice the last write, for a periodic one still in progress).
    let bound = Instant::now() + config.validator.timeout + Duration::from_secs(5);
    let reserve = (snapshotter.last_write_time() * 2).max(Duration::from_secs(1))
        + Duration::from_millis(250);
    let deadline = bound
        .checked_sub(reserve)
        .unwrap_or_else(Instant::now)
        .max(Instant::now());
    log::info!("stopping: no new requests, finishing checks in flight");
    api.stop();
    join_until(handles, deadline);
    snapshotter.write_logged();
    let panicked = supervisor.panicked();
    if !panicked.is_empty() {
        anyhow::bail!(
            "stopped because thread {} panicked (see the log above)",
            panicked.join(", ")
        );
    }
    log::info!("stopped");
    Ok(())
}
