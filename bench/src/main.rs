//! `switchboard-bench`: benchmarks that print each figure beside a baseline
//! measured in the same run (see `PERFORMANCE.md`). Run them through
//! `scripts/bench.sh`, which builds the release binaries first.

#![allow(clippy::print_stdout)] // a benchmark reports on stdout

// The SFU's simulation harness (sfu/tests/common) names the SFU crate so.
extern crate sfu as switchboard_sfu;

mod bot;
mod homeserver;
mod mixer;
mod proc_stat;
mod sfu;
mod sfu_server;
mod turn;
mod udp_baseline;

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
    /// SFU: egress packets per CPU-second, loss, latency and memory with real
    /// WebRTC clients; baseline: a plain UDP fan-out forwarder on the same stream.
    Sfu(sfu::Args),
    /// Conference bot: invite -> answer and invite -> connected times; baseline:
    /// a plain message's round trip through the same homeserver.
    Bot(bot::Args),
    /// TURN relay: relayed packets per CPU-second and loss under coturn's
    /// turnutils_uclient load; baseline: Debian's coturn turnserver, same load.
    Turn(turn::Args),
    /// Mixer: single-stream listeners per core with 3 active speakers and the
    /// added mouth-to-ear delay; baseline: forwarding the 3 speakers to as many
    /// multi-stream listeners, in the same run.
    Mixer(mixer::Args),
    /// (internal) The SFU under test, driven over a control connection.
    #[command(hide = true)]
    SfuServer {
        #[arg(long, default_value_t = 1)]
        shards: usize,
    },
    /// (internal) The baseline UDP forwarder.
    #[command(hide = true)]
    UdpForwarder,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bench = match cli.bench {
        // Child processes and blocking waits only: no async runtime.
        Bench::Turn(args) => return turn::run(args),
        bench => bench,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match bench {
        Bench::Homeserver(args) => runtime.block_on(homeserver::run(args)),
        Bench::Sfu(args) => runtime.block_on(sfu::run(args)),
        Bench::Bot(args) => runtime.block_on(bot::run(args)),
        Bench::Turn(args) => turn::run(args),
        Bench::Mixer(args) => mixer::run(args),
        Bench::SfuServer { shards } => runtime.block_on(sfu_server::serve(shards)),
        Bench::UdpForwarder => {
            // The baseline runs on one thread, like a media shard.
            let single = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            single.block_on(udp_baseline::serve())
        }
    }
}
