//! Homeserver benchmark: send -> `/sync` delivery latency and throughput.
//!
//! Starts the release `switchboard` binary as a child process (so its CPU time
//! is measured apart from the load), registers senders and long-polling
//! receivers in one room, and runs two phases:
//! - **paced**: each sender sends at a fixed rate; every receiver records when
//!   each event reached it; latency = that moment minus when the send began;
//! - **flat out**: senders send back to back; events/s and server CPU per event.
//!
//! Baseline in the same run: the round trip of an empty request
//! (`/_matrix/client/versions`) on the same server and connection pool.

use crate::proc_stat;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Concurrent senders.
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Long-polling receivers (each gets every event).
    #[arg(long, default_value_t = 8)]
    receivers: usize,
    /// Events per second per sender in the paced phase.
    #[arg(long, default_value_t = 25)]
    rate: u32,
    /// Length of the paced phase, seconds.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Events per sender in the flat-out phase.
    #[arg(long, default_value_t = 500)]
    burst: usize,
}

pub(crate) struct Server {
    pub(crate) child: tokio::process::Child,
    pub(crate) base: String,
    _dir: tempfile::TempDir,
}

/// Starts the release `switchboard` all-in-one with `extra` arguments and waits for its URL.
pub(crate) async fn start_server(extra: &[&str]) -> Result<Server> {
    let exe = std::env::current_exe()?.with_file_name("switchboard");
    if !exe.exists() {
        bail!(
            "{} not found: build it with `cargo build --release` (scripts/bench.sh does)",
            exe.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(&exe)
        .args([
            "--data-dir",
            dir.path().to_str().context("utf-8 path")?,
            "--bind",
            "127.0.0.1:0",
        ])
        .args(["--set", "rate_limit.login_burst=100000", "--set", "log.level=warn"])
        .args(["--set", "turn.listening_port=0"])
        .args(extra)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let base = loop {
        let line = lines.next_line().await?.context("switchboard exited early")?;
        if let Some(url) = line.trim().strip_prefix("Homeserver (Matrix Client-Server API): ") {
            break url.replace("localhost", "127.0.0.1");
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Server { child, base, _dir: dir })
}

/// A registered user of the server under test.
#[derive(Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    pub(crate) device_id: String,
}

impl Client {
    pub(crate) async fn register(http: &reqwest::Client, base: &str, name: &str) -> Result<Self> {
        let body = json!({"username": name, "password": "bench-password", "auth": {"type": "m.login.dummy"}});
        let resp: Value = http
            .post(format!("{base}/_matrix/client/v3/register"))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        let token = resp["access_token"]
            .as_str()
            .with_context(|| format!("register {name}: {resp}"))?
            .to_string();
        Ok(Self {
            http: http.clone(),
            base: base.to_string(),
            token,
            device_id: resp["device_id"].as_str().unwrap_or_default().to_string(),
        })
    }

    pub(crate) async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}/_matrix/client/v3{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let value: Value = resp.json().await?;
        if !status.is_success() {
            bail!("{path}: {status} {value}");
        }
        Ok(value)
    }
}

/// Percent-encodes a path segment.
pub(crate) fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sends are keyed by (sender, seq); receivers report (key, arrival).
type Arrivals = Arc<Mutex<Vec<((usize, usize), Instant)>>>;

async fn receiver(
    client: Client,
    mut since: String,
    arrivals: Arrivals,
    until: Arc<tokio::sync::Notify>,
) -> Result<()> {
    let filter = enc(r#"{"room":{"timeline":{"limit":200,"types":["org.switchboard.bench"]}}}"#);
    loop {
        let path = format!("/sync?since={since}&timeout=10000&filter={filter}");
        let sync = tokio::select! {
            sync = client.call(reqwest::Method::GET, &path, None) => sync?,
            () = until.notified() => return Ok(()),
        };
        let now = Instant::now();
        since = sync["next_batch"].as_str().context("next_batch")?.to_string();
        let mut got = Vec::new();
        if let Some(rooms) = sync["rooms"]["join"].as_object() {
            for room in rooms.values() {
                for event in room["timeline"]["events"].as_array().into_iter().flatten() {
                    let (s, q) = (event["content"]["s"].as_u64(), event["content"]["q"].as_u64());
                    if let (Some(s), Some(q)) = (s, q) {
                        got.push(((s as usize, q as usize), now));
                    }
                }
            }
        }
        arrivals.lock().await.extend(got);
    }
}

pub async fn run(args: Args) -> Result<()> {
    let mut server = start_server(&["--set", "bot.enabled=false"]).await?;
    let pid = server.child.id().context("server pid")?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let base = server.base.clone();

    let owner = Client::register(&http, &base, "owner").await?;
    let room = owner
        .call(
            reqwest::Method::POST,
            "/createRoom",
            Some(json!({"preset": "public_chat"})),
        )
        .await?;
    let room = room["room_id"].as_str().context("room_id")?.to_string();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..args.senders.max(1) {
        senders.push(Client::register(&http, &base, &format!("sender{i}")).await?);
    }
    for i in 0..args.receivers.max(1) {
        receivers.push(Client::register(&http, &base, &format!("receiver{i}")).await?);
    }
    for client in senders.iter().chain(&receivers) {
        client
            .call(
                reqwest::Method::POST,
                &format!("/rooms/{}/join", enc(&room)),
                Some(json!({})),
            )
            .await?;
    }

    for (phase, paced) in [("paced", true), ("flat-out", false)] {
        let arrivals: Arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(tokio::sync::Notify::new());
        let mut receiving = Vec::new();
        for client in &receivers {
            let since = client.call(reqwest::Method::GET, "/sync?timeout=0", None).await?["next_batch"]
                .as_str()
                .context("next_batch")?
                .to_string();
            receiving.push(tokio::spawn(receiver(
                client.clone(),
                since,
                arrivals.clone(),
                stop.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Baseline: empty round trips, measured alongside the load.
        let baseline = {
            let http = http.clone();
            let url = format!("{base}/_matrix/client/versions");
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(2) {
                    let t = Instant::now();
                    if http.get(&url).send().await.is_ok() {
                        samples.push(t.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                samples
            })
        };

        let cpu_before = proc_stat::cpu_time(pid).unwrap_or_default();
        let started = Instant::now();
        let sends: Arc<Mutex<HashMap<(usize, usize), Instant>>> = Arc::new(Mutex::new(HashMap::new()));
        let mut sending = Vec::new();
        let per_sender = if paced {
            (args.rate as u64 * args.seconds) as usize
        } else {
            args.burst
        };
        for (s, client) in senders.iter().enumerate() {
            let (client, room, sends) = (client.clone(), room.clone(), sends.clone());
            let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
            // Independent users: senders are spread evenly over the interval.
            let offset = interval.mul_f64(s as f64 / args.senders.max(1) as f64);
            sending.push(tokio::spawn(async move {
                let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
                for q in 0..per_sender {
                    if paced {
                        ticker.tick().await;
                    }
                    let t = Instant::now();
                    sends.lock().await.insert((s, q), t);
                    let path = format!(
                        "/rooms/{}/send/org.switchboard.bench/{s}-{q}-{}",
                        enc(&room),
                        if paced { "p" } else { "f" }
                    );
                    client
                        .call(reqwest::Method::PUT, &path, Some(json!({"s": s, "q": q})))
                        .await?;
                }
                anyhow::Ok(())
            }));
        }
        for task in sending {
            task.await??;
        }
        let send_wall = started.elapsed();
        let expected = per_sender * senders.len() * receivers.len();
        for _ in 0..500 {
            if arrivals.lock().await.len() >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let wall = started.elapsed();
        let cpu = proc_stat::cpu_time(pid).unwrap_or_default().saturating_sub(cpu_before);
        stop.notify_waiters();
        for task in receiving {
            task.abort();
        }
        let mut baseline = baseline.await?;
        baseline.sort();

        let sends = sends.lock().await;
        let arrivals = arrivals.lock().await;
        let mut latencies: Vec<Duration> = arrivals
            .iter()
            .filter_map(|(key, at)| sends.get(key).map(|t| at.saturating_duration_since(*t)))
            .collect();
        latencies.sort();
        let events = per_sender * senders.len();
        let lost = expected.saturating_sub(latencies.len());
        println!(
            "homeserver {phase}: senders={} receivers={} events={events} deliveries={} lost={lost}",
            senders.len(),
            receivers.len(),
            latencies.len()
        );
        println!(
            "homeserver {phase}: delivery latency p50={:.2}ms p99={:.2}ms max={:.2}ms (goal p99 < 5 ms)",
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default())
        );
        println!(
            "homeserver {phase}: baseline empty round trip p50={:.2}ms p99={:.2}ms; ratio p99 delivery/baseline = {:.1}",
            ms(percentile(&baseline, 0.5)),
            ms(percentile(&baseline, 0.99)),
            ms(percentile(&latencies, 0.99)) / ms(percentile(&baseline, 0.99)).max(1e-6)
        );
        println!(
            "homeserver {phase}: {:.0} events/s sent, {:.0} deliveries/s, server CPU {:.2}s = {:.0} us per event",
            events as f64 / send_wall.as_secs_f64(),
            latencies.len() as f64 / wall.as_secs_f64(),
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / events.max(1) as f64
        );
    }
    println!("homeserver: server RSS {} KiB", proc_stat::rss_kib(pid).unwrap_or(0));
    server.child.kill().await.ok();
    Ok(())
}
