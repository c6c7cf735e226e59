//! `hearth-bench`: Hearth's benchmarks, outside the product binary. Each subcommand measures
//! one layer in one run and prints a Markdown table (or JSON with `--json`); the recorded
//! figures and how they were taken are in docs/BENCHMARKS.md.

mod api;
mod api_files;
mod api_load;
mod api_snap;
mod build;
mod daemon;
mod engine;
mod report;
mod snapshots;
mod soak;

use clap::{Parser, Subcommand};
use hearth_cli::vmargs;

/// Hearth's benchmarks: the engine, snapshots, image builds and the API, measured.
///
/// State lives in $HEARTH_HOME like `hearth`'s; run `hearth setup` first.
#[derive(Parser)]
#[command(name = "hearth-bench", version, propagate_version = true)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    /// Log lines as JSON objects (for log collectors), one per line on stderr.
    #[arg(long, global = true, env = "HEARTH_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure boot, exec round trip and memory; prints a Markdown table (or JSON).
    Engine(engine::BenchArgs),
    /// Measure snapshots: launch (pooled and unpooled) against a cold boot, suspend and
    /// resume, idle density, sustained launch rate.
    Snapshots(snapshots::BenchSnapArgs),
    /// Measure an image build from scratch against a rebuild after a code change.
    Build(build::BenchBuildArgs),
    /// Measure the API: RunMicrovm → RUNNING and → first exec against a cold boot;
    /// ListMicrovms latency with 1,000 microvms in the store.
    Api(api::BenchApiArgs),
    /// Soak the daemon: suspend/resume cycles (a process and a file kept), run → exec →
    /// terminate cycles (descriptors, RSS, disk watched; --check fails on growth), N
    /// concurrent RunMicrovm with GetMicrovm latency meanwhile.
    Soak(soak::SoakArgs),
}

fn main() {
    let cli = Cli::parse();
    hearth_cli::logging(&cli.log, cli.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Engine(a) => engine::run(a).await,
            Cmd::Snapshots(a) => snapshots::run(a).await,
            Cmd::Build(a) => build::run(a).await,
            Cmd::Api(a) => api::run(a).await,
            Cmd::Soak(a) => soak::run(a).await,
        }
    });
    // Dropping the runtime lets VM guards kill anything still running before we exit.
    drop(rt);
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
