//! All the wiring: builds the pools and channels, starts the named threads in
//! order, and on shutdown stops and joins them in reverse. Each command of the
//! CLI is one function here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::api::{ApiContext, ApiServer};
use crate::config::{Config, ConfigError};
use crate::health::Health;
use crate::shutdown::{Shutdown, ShutdownSignal};
use crate::store::Store;

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
    let config = Config::load(&cli.config, std::env::var("DATABASE_URL").ok())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            print!("{config}");
            Ok(())
        }
        Command::Migrate => {
            let store = Store::connect(&config.database)?;
            store.migrate().context("migration failed")?;
            println!("schema applied");
            Ok(())
        }
        Command::Serve => serve(config),
        Command::Import { .. } | Command::Fetch | Command::Validate => {
            anyhow::bail!("not available in this build")
        }
    }
}

/// Waits for the database and migrates it, retrying with capped exponential
/// backoff. Returns false when shutdown came first.
fn wait_for_database(store: &Store, health: &Health, shutdown: &ShutdownSignal) -> bool {
    let mut backoff = Duration::from_millis(500);
    loop {
        match store.migrate() {
            Ok(()) => {
                health.record_database(true, None);
                return true;
            }
            Err(err) => {
                // Logged once per outage by Health; the first failure at start
                // is worth a line of its own.
                if backoff == Duration::from_millis(500) {
                    log::warn!("database not ready ({err}); retrying with backoff");
                }
                health.record_database(false, Some(&err));
            }
        }
        if shutdown.wait(backoff) {
            return false;
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown
        .on_signals()
        .context("cannot install signal handlers")?;
    let signal = shutdown.signal();
    let health = Arc::new(Health::new());
    let store = Store::connect(&config.database)?;

    let context = Arc::new(ApiContext {
        server: config.server.clone(),
        health: health.clone(),
    });
    let mut api = ApiServer::start(context).map_err(anyhow::Error::msg)?;
    log::info!("listening on http://{}", api.local_addr);

    if wait_for_database(&store, &health, &signal) {
        log::info!("database ready, schema applied");
        signal.receiver().recv().ok();
    }
    log::info!("stopping");
    api.stop();
    log::info!("stopped");
    Ok(())
}
