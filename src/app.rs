//! All the wiring: builds the pools and channels, starts the named threads in
//! order, and on shutdown stops and joins them in reverse. Each command of the
//! CLI is one function here.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

use crate::api::{ApiContext, ApiServer};
use crate::config::{Config, ConfigError};
use crate::fetcher::parse::{parse_list, ParseOptions};
use crate::fetcher::{FetchKind, Fetcher};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::persist::Snapshotter;
use crate::proxy::Protocol;
use crate::scheduler::{next_tick, start_metronome};
use crate::shutdown::{Shutdown, ShutdownSignal};
use crate::state::{active_snapshot_max_age, RestoreReport, State};
use crate::store::{DuePolicy, Store};
use crate::validator::check::{CheckConfig, Checker};
use crate::validator::cycle::{Validator, ValidatorSettings};
use crate::validator::geoip::Geoip;

#[derive(Debug, Parser)]
#[command(
    name = "proxy-pool",
    version,
    about = "Keeps a pool of public proxies validated and hands each client the best one"
)]
pub struct Cli {
    /// Path of the configuration file.
    #[arg(long, global = true, default_value = "config.ini")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: API server, fetcher, scheduler, validator, state manager (default).
    Serve,
    /// Apply schema.sql to the database (idempotent), then exit.
    Migrate,
    /// Parse a proxy list (FILE, or - for standard input), upsert it, print counts.
    Import {
        file: String,
        /// Protocol of bare host:port lines (default: [fetcher] default_protocol).
        #[arg(long)]
        protocol: Option<String>,
    },
    /// Fetch every configured source once, print a line per source, exit.
    Fetch,
    /// Run one validation cycle now, print its summary, exit.
    Validate,
    /// Parse and validate the config, print the effective values, exit.
    CheckConfig,
    /// Print the running service's pool figures (from its /stats) as tables.
    Stats {
        /// Base URL of the service (default: http:// + [server] bind).
        #[arg(long)]
        url: Option<String>,
    },
}

/// A usage mistake found after argument parsing (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// 2 for bad configuration or usage, 1 for anything else.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let is_usage = err
        .chain()
        .any(|cause| cause.is::<ConfigError>() || cause.is::<UsageError>());
    if is_usage {
        2
    } else {
        1
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Serve);
    let config = if matches!(command, Command::Stats { .. }) {
        // `stats` only talks to the service over HTTP: a config without
        // [database] url (the farm's, in a terminal without DATABASE_URL)
        // must do.
        Config::load_without_database(&cli.config)?
    } else {
        Config::load(&cli.config, std::env::var("DATABASE_URL").ok())?
    };
    match command {
        Command::CheckConfig => {
            out(&config.to_string())?;
            Ok(())
        }
        Command::Migrate => {
            let store = Store::connect(&config.database)?;
            store.migrate().context("migration failed")?;
            out("schema applied\n")?;
            Ok(())
        }
        Command::Import { file, protocol } => import(&config, &file, protocol.as_deref()),
        Command::Fetch => fetch_once(&config),
        Command::Validate => validate_once(&config),
        Command::Stats { url } => print_stats(&config, url),
        Command::Serve => {
            warn_if_world_writable(&cli.config);
            serve(config)
        }
    }
}

/// Anyone who may rewrite the config file may aim the service elsewhere or
/// replace its token: say so at start (the service still runs).
fn warn_if_world_writable(path: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = std::fs::metadata(path) {
            if metadata.permissions().mode() & 0o002 != 0 {
                log::warn!(
                    "config file {} is world-writable: anyone on this host can change what the service does (chmod o-w it)",
                    path.display()
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn print_stats(config: &Config, url: Option<String>) -> anyhow::Result<()> {
    let base = url.unwrap_or_else(|| {
        let mut bind = config.server.bind;
        if bind.ip().is_unspecified() {
            bind.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{bind}")
    });
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut request = agent.get(format!("{}/stats", base.trim_end_matches('/')));
    if let Some(token) = &config.server.api_token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let body = request
        .call()
        .with_context(|| format!("cannot reach the service at {base}"))?
        .body_mut()
        .read_to_string()
        .context("cannot read the answer of /stats")?;
    let stats: serde_json::Value = serde_json::from_str(&body)
        .context("the service answered something that is not its /stats JSON")?;
    out(&crate::stats_table::render(&stats))?;
    Ok(())
}

/// Writes to standard output; a reader that went away (`| head`) is not an
/// error of ours.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(err).context("cannot write to standard output"))
        }
        _ => Ok(()),
    }
}

/// A name for this process in the database's coordination rows.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

fn import(config: &Config, file: &str, protocol: Option<&str>) -> anyhow::Result<()> {
    let default_protocol = match protocol {
        None => config.fetcher.default_protocol,
        Some(name) => Protocol::from_scheme(name).ok_or_else(|| {
            UsageError(format!(
                "--protocol: expected http, https, socks4 or socks5, found {name:?}"
            ))
        })?,
    };
    let mut bytes = Vec::new();
    if file == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read standard input")?;
    } else {
        bytes = std::fs::read(file).with_context(|| format!("cannot read {file}"))?;
    }
    let options = ParseOptions {
        default_protocol,
        allow_private_addresses: config.fetcher.allow_private_addresses,
    };
    let started = Instant::now();
    let parsed = parse_list(&String::from_utf8_lossy(&bytes), &options);
    for reject in parsed.first_rejects.iter() {
        eprintln!(
            "{file}:{}: rejected ({}): {}",
            reject.line, reject.reason, reject.text
        );
    }
    let store = Store::connect(&config.database)?;
    store.migrate().context("migration failed")?;
    let source = if file == "-" {
        "import:stdin".to_string()
    } else {
        format!("import:{file}")
    };
    let counts = store
        .upsert_listed(&source, &parsed.proxies)
        .context("cannot store the proxies")?;
    out(&format!(
        "{file}: {} lines, {} parsed, {} new, {} rejected, {} duplicates in {} ms",
        parsed.lines,
        parsed.proxies.len(),
        counts.new,
        parsed.rejected,
        parsed.duplicates,
        started.elapsed().as_millis()
    ))?;
    Ok(())
}

fn fetch_once(config: &Config) -> anyhow::Result<()> {
    let store = Store::connect(&config.database)?;
    store.migrate().context("migration failed")?;
    let health = Arc::new(Health::new());
    let fetcher = Arc::new(Fetcher::new(config, store, health, instance_name()));
    let statuses = fetcher.fetch_all_once(FetchKind::Manual);
    for status in &statuses {
        out(&format!("{}\n", status.summary_line()))?;
    }
    if !statuses.is_empty() && statuses.iter().all(|s| s.last_error.is_some()) {
        anyhow::bail!("every list failed");
    }
    Ok(())
}

fn build_validator(
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
        lease: config.validator.timeout * 4 + Duration::from_secs(5),
    }
}

fn validate_once(config: &Config) -> anyhow::Result<()> {
    let store = Store::connect(&config.database)?;
    store.migrate().context("migration failed")?;
    let health = Arc::new(Health::new());
    let state = Arc::new(State::new(&config.scoring));
    let validator = build_validator(config, store, state, health)?;
    let summary = validator.run_cycle(&ShutdownSignal::never());
    out(&format!("{}\n", summary.summary_line()))?;
    if let Some(reason) = summary.skipped {
        if summary.checked == 0 && reason.starts_with("judge") {
            anyhow::bail!("{reason}");
        }
    }
    Ok(())
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

/// Reloads the active set from the database; the database's health follows.
/// The mark is taken before the read, so that what the validator changes
/// while the table is read is not undone by the older read.
fn sync_active(store: &Store, state: &State, health: &Health) {
    let mark = state.sync_mark();
    match store.load_active() {
        Ok(active) => {
            health.record_database(true, None);
            let report = state.sync_active(active, mark);
            log::debug!(
                "memory sync: {} activated or updated, {} deactivated, {} newer changes kept",
                report.activated,
                report.deactivated,
                report.kept_newer
            );
        }
        Err(err) => health.record_database(false, Some(&err)),
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> anyhow::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .with_context(|| format!("cannot start thread {name}"))
}

/// Joins threads until `deadline`; threads still busy then are left to end with the process.
fn join_until(handles: Vec<JoinHandle<()>>, deadline: Instant) {
    for handle in handles {
        while !handle.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            log::warn!(
                "thread {} still busy at the shutdown deadline",
                handle.thread().name().unwrap_or("?")
            );
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    crate::gateway::check_not_open(&config.gateway, config.server.api_token.as_deref())
        .map_err(|err| UsageError(err.to_string()))?;
    let shutdown = Shutdown::new();
    shutdown
        .on_signals()
        .context("cannot install signal handlers")?;
    let signal = shutdown.signal();
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
        fetcher: Some(fetcher.clone()),
        validator: Some(validator.clone()),
        validate_now: validate_tx.clone(),
        snapshotter: snapshotter.clone(),
    });
    let mut api = ApiServer::start(context).map_err(anyhow::Error::msg)?;
    log::info!("listening on http://{}", api.local_addr);
    let mut gateway = match config.gateway.bind {
        Some(_) => {
            let gateway = crate::gateway::Gateway::start(
                &config.gateway,
                config.server.api_token.clone(),
                state.clone(),
                metrics.gateway.clone(),
            )?;
            log::info!(
                "gateway listening on {} (http proxy, CONNECT, socks5)",
                gateway.local_addr
            );
            Some(gateway)
        }
        None => None,
    };

    let mut handles = Vec::new();
    // Periodic snapshots, encoded outside every lock. Started before the
    // wait for the database: feedback taken during an outage at start-up
    // is saved all the same.
    handles.push(spawn("snapshot", {
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
        sync_active(&store, &state, &health);
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
        handles.push(spawn("sync", {
            let (store, state, health, fetcher, signal) = (
                store.clone(),
                state.clone(),
                health.clone(),
                fetcher.clone(),
                signal.clone(),
            );
            let interval = config.state.sync_interval;
            move || {
                let t0 = Instant::now();
                loop {
                    // A short ping interval notices an outage (and its end) quickly.
                    let due = next_tick(t0, interval, Instant::now());
                    while Instant::now() < due {
                        if signal.wait(Duration::from_secs(5).min(due - Instant::now())) {
                            return;
                        }
                        if !health.database_up() && store.ping().is_ok() {
                            health.record_database(true, None);
                        }
                    }
                    sync_active(&store, &state, &health);
                    health.record_pool_size(state.active_count());
                    fetcher.refresh_yields();
                }
            }
        })?);

        // Validation: the metronome enqueues, one worker runs cycles.
        handles.push(start_metronome(
            "metronome",
            config.scheduler.interval,
            validate_tx.clone(),
            signal.clone(),
            || (),
        )?);
        let _ = validate_tx.try_send(());
        handles.push(spawn("validate", {
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

        handles.extend(fetcher.start(signal.clone())?);
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
    if let Some(gateway) = gateway.as_mut() {
        gateway.stop();
    }
    api.stop();
    join_until(handles, deadline);
    snapshotter.write_logged();
    log::info!("stopped");
    Ok(())
}
