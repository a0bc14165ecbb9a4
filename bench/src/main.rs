//! `switchboard-bench`: benchmarks that print each figure beside a baseline
//! measured in the same run (see `PERFORMANCE.md`). Run them through
//! `scripts/bench.sh`, which builds the release binaries first.

#![allow(clippy::print_stdout)] // a benchmark reports on stdout

mod homeserver;
mod proc_stat;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "switchboard-bench", about = "Switchboard benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Homeserver: send -> /sync delivery latency and events/s with concurrent
    /// senders and long-polling receivers; baseline: an empty HTTP round trip.
    Homeserver(homeserver::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.bench {
        Bench::Homeserver(args) => runtime.block_on(homeserver::run(args)),
    }
}
