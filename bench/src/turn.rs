//! TURN benchmark: the same `turnutils_uclient` load against our relay
//! (`switchboard turn`) and against Debian's coturn `turnserver`, alternated
//! round by round in one run.
//!
//! Each round starts the server as a child process, waits until it answers a
//! STUN Binding request, reads its CPU time, runs `--parallel` copies of
//! coturn's client at once (`-c`, REST credentials from the shared secret,
//! ChannelData to a fresh echo peer `turnutils_peer`), reads the CPU time again
//! and stops the server. Every
//! message is relayed twice (client → peer and back), so relayed packets =
//! messages sent + messages received, for both servers alike. Printed: relayed
//! packets per second of wall time, loss, the server's CPU time and relayed
//! packets per CPU-second, and the ratio of ours to coturn's.

use crate::proc_stat;
use anyhow::{Context, Result, bail};
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "bench-secret";
const REALM: &str = "bench.example";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Messages each client sends (`-n`).
    #[arg(long, default_value_t = 800)]
    messages: u32,
    /// Concurrent clients per process, one allocation each (`-m`).
    #[arg(long, default_value_t = 50)]
    clients: u32,
    /// Message length in bytes (`-l`).
    #[arg(long, default_value_t = 160)]
    length: u32,
    /// Milliseconds between a client's messages (`-z`).
    #[arg(long, default_value_t = 1)]
    interval: u32,
    /// Rounds; each runs both servers, alternating which goes first. One
    /// round's ratio moves by ±10 % on a shared 2-core machine: several
    /// rounds' sums are the figure.
    #[arg(long, default_value_t = 4)]
    rounds: u32,
    /// Client transport: udp or tcp.
    #[arg(long, default_value = "udp")]
    transport: String,
    /// turnutils_uclient processes run at once (one is single-threaded and
    /// slow: several make a busier relay).
    #[arg(long, default_value_t = 4)]
    parallel: u32,
    /// Loads to run: `echo` (each client relays to an echo peer,
    /// `turnutils_peer`) and/or `pairs` (clients relay to each other's
    /// relayed address, `-y`: both callers relay-only).
    #[arg(long, value_delimiter = ',', default_value = "echo,pairs")]
    loads: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Switchboard,
    Coturn,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Switchboard => "switchboard",
            Server::Coturn => "coturn",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    relayed: u64,
    sent: u64,
    lost: u64,
    wall: Duration,
    cpu: Duration,
}

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    for _ in 0..32 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port for UDP and TCP")
}

fn require(tool: &str) -> Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        bail!("{tool} not found: install Debian's coturn package (scripts/bench.sh does)");
    }
    Ok(())
}

/// Waits until a STUN Binding request to `port` is answered.
fn wait_ready(port: u16) -> Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    request.extend_from_slice(&[7; 12]);
    let mut buf = [0u8; 512];
    for _ in 0..100 {
        socket.send_to(&request, ("127.0.0.1", port))?;
        if socket.recv_from(&mut buf).is_ok() {
            return Ok(());
        }
    }
    bail!("the TURN server on port {port} did not answer a Binding request")
}

fn start(server: Server, port: u16, ports: (u16, u16), data_dir: &std::path::Path) -> Result<Guard> {
    let child = match server {
        Server::Switchboard => {
            let exe = std::env::current_exe()?.with_file_name("switchboard");
            if !exe.exists() {
                bail!("{} not found: scripts/bench.sh builds it", exe.display());
            }
            let sets = [
                format!("turn.listening_port={port}"),
                format!("turn.static_auth_secret={SECRET}"),
                format!("turn.realm={REALM}"),
                "turn.allowed_peer_ip=127.0.0.1".into(),
                "turn.user_quota=0".into(),
                format!("turn.min_port={}", ports.0),
                format!("turn.max_port={}", ports.1),
                "log.level=warn".into(),
            ];
            let mut command = Command::new(exe);
            command
                .arg("turn")
                .arg("--data-dir")
                .arg(data_dir)
                .args(["--bind", "127.0.0.1:0"]);
            for set in &sets {
                command.args(["--set", set]);
            }
            command.stdout(Stdio::null()).stderr(Stdio::null()).spawn()
        }
        Server::Coturn => Command::new("turnserver")
            .args([
                "-n",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--listening-ip=127.0.0.1",
                "--relay-ip=127.0.0.1",
                &format!("--listening-port={port}"),
                &format!("--min-port={}", ports.0),
                &format!("--max-port={}", ports.1),
                "--use-auth-secret",
                &format!("--static-auth-secret={SECRET}"),
                &format!("--realm={REALM}"),
                "--allow-loopback-peers",
                "--log-file=stdout",
                "--simple-log",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn(),
    }
    .with_context(|| format!("starting {}", server.name()))?;
    let guard = Guard(child);
    wait_ready(port)?;
    Ok(guard)
}

/// `(sent, received, lost)` from turnutils_uclient's output.
fn parse_uclient(output: &str) -> Option<(u64, u64, u64)> {
    let number = |line: &str, key: &str| -> Option<u64> {
        let rest = line.split(key).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    let totals = output
        .lines()
        .rev()
        .find(|l| l.contains("start_mclient: tot_send_msgs="))?;
    let lost_line = output.lines().rev().find(|l| l.contains("Total lost packets "))?;
    Some((
        number(totals, "tot_send_msgs=")?,
        number(totals, "tot_recv_msgs=")?,
        number(lost_line, "Total lost packets ")?,
    ))
}

fn uclient_command(args: &Args, load: &str, index: u32, peer_port: u16, port: u16) -> Command {
    let mut command = Command::new("turnutils_uclient");
    if args.transport == "tcp" {
        command.arg("-t");
    }
    command.args([
        "-c",
        "-n",
        &args.messages.to_string(),
        "-m",
        &args.clients.to_string(),
        "-l",
        &args.length.to_string(),
        "-z",
        &args.interval.to_string(),
        "-u",
        &format!("bench{index}"),
        "-W",
        SECRET,
    ]);
    if load == "pairs" {
        command.arg("-y");
    } else {
        command.args(["-e", "127.0.0.1", "-r", &peer_port.to_string()]);
    }
    command.args(["-p", &port.to_string(), "127.0.0.1"]);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

fn start_peer() -> Result<(Guard, u16)> {
    let peer_port = free_port()?;
    let peer = Guard(
        Command::new("turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting turnutils_peer")?,
    );
    wait_echo(peer_port)?;
    Ok((peer, peer_port))
}

/// Waits until the echo peer echoes.
fn wait_echo(port: u16) -> Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = [0u8; 64];
    for _ in 0..100 {
        socket.send_to(b"ping", ("127.0.0.1", port))?;
        if socket.recv_from(&mut buf).is_ok() {
            return Ok(());
        }
    }
    bail!("turnutils_peer did not start")
}

fn run_round(server: Server, args: &Args, load: &str, ports: (u16, u16)) -> Result<Totals> {
    let data_dir = tempfile::tempdir()?;
    // A fresh echo peer per round: its socket's state never carries over.
    let (_peer, peer_port) = start_peer()?;
    let port = free_port()?;
    let guard = start(server, port, ports, data_dir.path())?;
    let pid = guard.0.id();
    let cpu_before = proc_stat::cpu_time(pid).context("reading the server's CPU time")?;
    let started = Instant::now();
    let children = (0..args.parallel)
        .map(|i| uclient_command(args, load, i, peer_port, port).spawn())
        .collect::<std::io::Result<Vec<_>>>()
        .context("running turnutils_uclient")?;
    let mut outputs = Vec::new();
    for child in children {
        outputs.push(child.wait_with_output().context("waiting for turnutils_uclient")?);
    }
    let wall = started.elapsed();
    let cpu_after = proc_stat::cpu_time(pid).context("reading the server's CPU time")?;
    drop(guard);
    let mut totals = Totals {
        wall,
        cpu: cpu_after.saturating_sub(cpu_before),
        ..Totals::default()
    };
    for output in outputs {
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        let Some((sent, received, lost)) = parse_uclient(&text) else {
            bail!(
                "turnutils_uclient against {} printed no totals:\n{}",
                server.name(),
                text.lines().rev().take(15).collect::<Vec<_>>().join("\n")
            );
        };
        totals.relayed += sent + received;
        totals.sent += sent;
        totals.lost += lost;
    }
    Ok(totals)
}

fn per_cpu_second(totals: &Totals) -> f64 {
    totals.relayed as f64 / totals.cpu.as_secs_f64().max(0.01)
}

fn loss(totals: &Totals) -> f64 {
    100.0 * totals.lost as f64 / (totals.sent.max(1)) as f64
}

pub fn run(args: Args) -> Result<()> {
    for tool in ["turnserver", "turnutils_uclient", "turnutils_peer"] {
        require(tool)?;
    }
    if !matches!(args.transport.as_str(), "udp" | "tcp") {
        bail!("--transport is udp or tcp");
    }
    for load in &args.loads {
        if !matches!(load.as_str(), "echo" | "pairs") {
            bail!("--loads takes echo and/or pairs, not {load}");
        }
        run_load(&args, load)?;
    }
    Ok(())
}

fn run_load(args: &Args, load: &str) -> Result<()> {
    let to = if load == "pairs" {
        "to each other (-y)"
    } else {
        "to an echo peer"
    };
    println!(
        "\nTURN relay, load '{load}': {} x turnutils_uclient -c -n {} -m {} -l {} -z {} over {} {to}, {} rounds alternated",
        args.parallel, args.messages, args.clients, args.length, args.interval, args.transport, args.rounds
    );
    println!(
        "{:<6}{:<13}{:>10}{:>9}{:>10}{:>9}{:>9}{:>12}",
        "round", "server", "relayed", "wall s", "pkt/s", "loss", "CPU s", "pkt/CPU-s"
    );
    let mut sums = [Totals::default(); 2];
    // Ours over coturn's relayed packets per CPU-second, round by round: the
    // spread says how far one round's ratio is to be trusted.
    let mut ratios = Vec::new();
    for round in 1..=args.rounds {
        let mut round_rates = [0.0; 2];
        let order = if round % 2 == 1 {
            [Server::Switchboard, Server::Coturn]
        } else {
            [Server::Coturn, Server::Switchboard]
        };
        for server in order {
            let ports = match server {
                Server::Switchboard => (40_000, 44_999),
                Server::Coturn => (45_000, 49_999),
            };
            let totals = run_round(server, args, load, ports)?;
            println!(
                "{:<6}{:<13}{:>10}{:>9.2}{:>10.0}{:>8.3}%{:>9.2}{:>12.0}",
                round,
                server.name(),
                totals.relayed,
                totals.wall.as_secs_f64(),
                totals.relayed as f64 / totals.wall.as_secs_f64(),
                loss(&totals),
                totals.cpu.as_secs_f64(),
                per_cpu_second(&totals)
            );
            round_rates[server as usize] = per_cpu_second(&totals);
            let sum = &mut sums[server as usize];
            sum.relayed += totals.relayed;
            sum.sent += totals.sent;
            sum.lost += totals.lost;
            sum.wall += totals.wall;
            sum.cpu += totals.cpu;
        }
        ratios.push(round_rates[Server::Switchboard as usize] / round_rates[Server::Coturn as usize]);
    }
    let [ours, coturn] = sums;
    let (low, high) = ratios
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(low, high), r| (low.min(*r), high.max(*r)));
    println!(
        "{load}: switchboard {:.0} relayed pkt/CPU-s, loss {:.3}% | coturn {:.0} relayed pkt/CPU-s, loss {:.3}% | ratio {:.2}x, rounds {low:.2}x-{high:.2}x (goal >= 1.5x at 0% loss)",
        per_cpu_second(&ours),
        loss(&ours),
        per_cpu_second(&coturn),
        loss(&coturn),
        per_cpu_second(&ours) / per_cpu_second(&coturn)
    );
    Ok(())
}
