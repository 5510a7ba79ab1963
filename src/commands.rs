//! The one-shot commands: each builds what it needs, does its work once,
//! prints its result on standard output and returns. `serve` is the wiring
//! of [`crate::app`].

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::app::{build_validator, instance_name};
use crate::cli::UsageError;
use crate::config::Config;
use crate::fetcher::parse::ParseOptions;
use crate::fetcher::{FetchKind, Fetcher};
use crate::health::Health;
use crate::proxy::Protocol;
use crate::shutdown::ShutdownSignal;
use crate::state::State;
use crate::store::Store;
use crate::validator::cycle::SkipReason;

pub fn check_config(config: &Config) -> anyhow::Result<()> {
    out(&config.to_string())?;
    if config.server.max_body_bytes < crate::api::FULL_FEEDBACK_BATCH_BYTES {
        log::warn!(
            "[server] max_body_bytes = {} is too small for a full /feedback batch: \
             {} items of the largest size need {} bytes",
            config.server.max_body_bytes,
            crate::api::MAX_FEEDBACK_ITEMS,
            crate::api::FULL_FEEDBACK_BATCH_BYTES
        );
    }
    Ok(())
}

pub fn migrate(config: &Config) -> anyhow::Result<()> {
    let store = Store::connect(&config.database)?;
    store.migrate().context("migration failed")?;
    out("schema applied\n")
}

pub fn stats(config: &Config, url: Option<String>) -> anyhow::Result<()> {
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
        request = request.header("Authorization", format!("Bearer {}", token.expose()));
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

pub fn import(config: &Config, file: &str, protocol: Option<&str>) -> anyhow::Result<()> {
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
    let crate::fetcher::ReadList { parsed, mut counts } =
        crate::fetcher::read_list(&bytes, false, &options);
    for reject in &parsed.first_rejects {
        eprintln!("{file}: {reject}");
    }
    if let Some(reason) = parsed.not_a_list() {
        out(&format!(
            "{file}: {}, error: {reason}\n",
            counts.describe(true, false)
        ))?;
        anyhow::bail!("{file}: {reason}");
    }
    let store = Store::connect(&config.database)?;
    store.migrate().context("migration failed")?;
    let source = if file == "-" {
        "import:stdin".to_string()
    } else {
        format!("import:{file}")
    };
    counts.new = store
        .upsert_listed(&source, &parsed.proxies)
        .context("cannot store the proxies")?
        .new;
    out(&format!(
        "{file}: {} in {} ms\n",
        counts.describe(true, true),
        started.elapsed().as_millis()
    ))?;
    Ok(())
}

pub fn fetch(config: &Config) -> anyhow::Result<()> {
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

pub fn validate(config: &Config) -> anyhow::Result<()> {
    let store = Store::connect(&config.database)?;
    store.migrate().context("migration failed")?;
    let health = Arc::new(Health::new());
    let state = Arc::new(State::new(&config.scoring));
    let validator = build_validator(config, store, state, health)?;
    let summary = validator.run_cycle(&ShutdownSignal::never());
    out(&format!("{}\n", summary.summary_line()))?;
    if let Some(reason @ SkipReason::JudgeUnreachable(_)) = summary.skipped {
        if summary.checked == 0 {
            anyhow::bail!("{reason}");
        }
    }
    Ok(())
}
