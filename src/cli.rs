//! The command line: arguments (clap), the dispatch of each command, and
//! the exit code of an error (2 for configuration and usage, 1 else).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::app;
use crate::commands;
use crate::config::{Config, ConfigError};

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
        Command::CheckConfig => commands::check_config(&config),
        Command::Migrate => commands::migrate(&config),
        Command::Import { file, protocol } => commands::import(&config, &file, protocol.as_deref()),
        Command::Fetch => commands::fetch(&config),
        Command::Validate => commands::validate(&config),
        Command::Stats { url } => commands::stats(&config, url),
        Command::Serve => {
            warn_if_world_writable(&cli.config);
            app::serve(config)
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
