//! `proxy-farm`: runs the test proxy farm standalone, so that a user can point
//! proxy-pool at it and watch the pool fill up with no internet at all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use proxy_farm::{Farm, FarmSpec, Mix, BUILT_IN_LISTS};

/// A judge, proxy lists and simulated proxies on loopback, for offline demos
/// and benchmarks of proxy-pool.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address of the judge and list server (loopback only).
    #[arg(long, default_value = "127.0.0.1:9900")]
    listen: SocketAddr,
    /// Number of simulated proxies (ignored with --every-behaviour).
    #[arg(long, default_value_t = 100)]
    proxies: usize,
    /// Shares of alive, dead and black-hole proxies, comma-separated.
    #[arg(long, default_value = "0.5,0.3,0.2")]
    mix: String,
    /// Latency range of the alive proxies, in milliseconds.
    #[arg(long, default_value = "50-500")]
    latency_ms: String,
    /// One proxy of every behaviour instead of the mix.
    #[arg(long)]
    every_behaviour: bool,
    /// Lines in the `huge` list.
    #[arg(long, default_value_t = 100_000)]
    huge_lines: usize,
    /// Write the ground-truth manifest (JSON) here.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Write a complete proxy-pool config.ini pointed at this farm here
    /// (use it with `PROXY_POOL_CONFIG=PATH scripts/run.sh`).
    #[arg(long)]
    write_config: Option<PathBuf>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("proxy-farm: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let spec = if args.every_behaviour {
        FarmSpec::every_behaviour()
    } else {
        FarmSpec::demo(args.proxies, &parse_mix(&args.mix, &args.latency_ms)?)
    };
    // The https judge of the demo: port 443 where it may bind (as root), so
    // that proxies tunnelling to 443 only support https, as stock squid does.
    let https_judge = proxy_farm::start_tls_judge(SocketAddr::from(([127, 44, 0, 1], 443)))
        .or_else(|_| proxy_farm::start_tls_judge(SocketAddr::from(([127, 44, 0, 1], 0))))
        .context("cannot start the farm's https judge")?;
    let spec = spec
        .listen(args.listen)
        .huge_lines(args.huge_lines)
        .https_judge_port(https_judge.port());
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("cannot install signal handlers")?;
    let farm =
        Farm::start(spec).with_context(|| format!("cannot start the farm on {}", args.listen))?;
    if let Some(path) = &args.manifest {
        farm.write_manifest(path)
            .with_context(|| format!("cannot write the manifest to {}", path.display()))?;
    }
    if let Some(path) = &args.write_config {
        std::fs::write(path, demo_config(&farm, https_judge))
            .with_context(|| format!("cannot write the config to {}", path.display()))?;
        println!("proxy-pool config written to {}", path.display());
    }
    print_summary(&farm, https_judge, args.manifest.as_deref());
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal} received, stopping the farm");
    }
    drop(farm);
    Ok(())
}

/// Debian's tor-geoipdb: a free country database in Tor's geoip format.
const TOR_GEOIP: &str = "/usr/share/tor/geoip";

fn parse_mix(shares: &str, latency: &str) -> anyhow::Result<Mix> {
    let parts: Vec<f64> = shares
        .split(',')
        .map(|part| part.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!("--mix expects three numbers like 0.5,0.3,0.2, found {shares:?}")
        })?;
    let [alive, dead, black_hole] = parts[..] else {
        bail!("--mix expects three numbers like 0.5,0.3,0.2, found {shares:?}");
    };
    if parts.iter().any(|share| !(0.0..=1.0).contains(share)) {
        bail!("--mix shares must be between 0 and 1, found {shares:?}");
    }
    let (low, high) = latency
        .split_once('-')
        .and_then(|(low, high)| {
            Some((
                low.trim().parse::<u64>().ok()?,
                high.trim().parse::<u64>().ok()?,
            ))
        })
        .filter(|(low, high)| low <= high)
        .with_context(|| format!("--latency-ms expects a range like 50-500, found {latency:?}"))?;
    Ok(Mix {
        alive,
        dead,
        black_hole,
        latency_ms: low..=high,
    })
}

fn print_summary(farm: &Farm, https_judge: SocketAddr, manifest: Option<&std::path::Path>) {
    let alive = farm.manifest().iter().filter(|entry| entry.alive).count();
    println!(
        "proxy farm: {} proxies ({alive} expected alive)",
        farm.manifest().len()
    );
    println!("judge: {}", farm.judge_url());
    println!("lists:");
    for name in BUILT_IN_LISTS {
        println!("  {name:<14} {}", farm.list_url(name));
    }
    if let Some(path) = manifest {
        println!("manifest: {}", path.display());
    }
    println!();
    println!("config.ini for proxy-pool (add a [database] url unless DATABASE_URL is set):");
    print!("{}", demo_config(farm, https_judge));
    println!();
    println!("stop with Ctrl-C");
}

/// A proxy-pool configuration that fetches this farm's lists and validates
/// against its judge, on a short schedule so the pool fills within seconds.
fn demo_config(farm: &Farm, https_judge: SocketAddr) -> String {
    // Debian's tor-geoipdb, when installed, gives the demo its countries.
    let geoip = if std::path::Path::new(TOR_GEOIP).is_file() {
        format!("\n[geoip]\ndatabase = {TOR_GEOIP}\n")
    } else {
        String::new()
    };
    format!(
        "; proxy-pool against a local proxy farm (offline demo)\n\
         [fetcher]\n\
         source_urls = {schemes}\n\
         interval_seconds = 60\n\
         allow_private_addresses = true\n\n\
         [source.farm_junk]\n\
         url = {junk}\n\
         interval_seconds = 120\n\n\
         [validator]\n\
         validation_target = {judge}\n\
         https_target = https://{https_judge}/get?show_env=1\n\
         https_ca_file = {ca_file}\n\
         validation_timeout_ms = 2000\n\
         connect_timeout_ms = 1000\n\
         revalidate_after_seconds = 60\n\n\
         [scheduler]\n\
         interval_seconds = 15\n{geoip}",
        ca_file = proxy_farm::tls_judge_ca_file().display(),
        schemes = farm.list_url("schemes"),
        junk = farm.list_url("junk"),
        judge = farm.judge_url(),
    )
}
