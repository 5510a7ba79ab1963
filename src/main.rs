//! The `proxy-pool` command: parse the command line, initialise logging, run
//! one command, and map its outcome to an exit code (0 ok, 2 bad configuration
//! or usage, 1 anything else).

use std::process::ExitCode;

use clap::Parser;

use proxy_pool::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let usage_error = err.use_stderr();
            let _ = err.print();
            return if usage_error {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The database driver logs statement parameters (proxy passwords among
    // them) at debug level: it stays at info unless RUST_LOG names it.
    let mut logger = env_logger::Builder::new();
    logger
        .filter_level(log::LevelFilter::Info)
        .filter_module("tokio_postgres", log::LevelFilter::Info)
        .filter_module("postgres", log::LevelFilter::Info)
        .parse_env(env_logger::Env::default())
        .format_timestamp_millis();
    proxy_pool::logging::init(logger);
    let outcome = cli::run(cli);
    // Lines still queued for the log writer go out before the process ends.
    log::logger().flush();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(cli::exit_code(&err))
        }
    }
}
