//! SFU benchmark and load generator.
//!
//! For each scenario it runs, one after the other and on the same machine:
//! 1. **the SFU** (`switchboard-bench sfu-server`, its own process: the media
//!    shards of the all-in-one binary behind a JSON-lines control connection)
//!    with real WebRTC clients built on str0m — ICE, DTLS, SRTP — that open
//!    sessions through the signalling-side API, renegotiate when told to, and
//!    send synthetic opus-sized and video-sized RTP;
//! 2. **the baseline** (`switchboard-bench udp-forwarder`): a plain UDP fan-out
//!    forwarder with the same I/O loop and no crypto, fed the same packet
//!    stream (sizes, rates, rooms) by plain UDP clients.
//!
//! It prints egress packets per CPU-second of the server process (CPU from
//! `/proc/<pid>/stat`), the ratio SFU/baseline, loss (gaps in the sequence
//! numbers each receiver saw), latency percentiles (send time is stamped into
//! each payload; sender and receivers share this process's clock) and the
//! SFU's resident memory per subscribed track.

use crate::proc_stat;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sfu::DelayHistogram;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Input, Output, RtcConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UdpSocket;
use tokio::sync::{Mutex, mpsc, oneshot};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Scenarios to run (comma-separated): fanout-audio, fanout-video, mesh-audio, mesh-av, calls-audio.
    #[arg(long, default_value = "fanout-audio,fanout-video,mesh-audio,mesh-av,calls-audio")]
    scenarios: String,
    /// Measurement window per run, seconds (after warm-up).
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Media shards of the SFU under test.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Scale every scenario's participant count by this factor.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Pin the server under test (SFU or baseline) to the last CPU and the load
    /// generator to the others (`taskset`), so the server's forwarding delay is
    /// its own work and queueing, not time the load generator held its CPU.
    #[arg(long)]
    pin: bool,
    /// Runs of each scenario, the SFU's and the baseline's alternated (the
    /// baseline first every other round): the ratio is then over their sums (one run's baseline figure moves by
    /// ±10 % or more at low load), with the spread of the runs' ratios.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Media {
    Audio,
    Video,
    AudioVideo,
}

#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    rooms: usize,
    publishers: usize,
    subscribers: usize,
    media: Media,
    video_pps: u32,
}

fn scenarios(args: &Args) -> Result<Vec<Scenario>> {
    let scale = |n: usize| ((n as f64 * args.scale).round() as usize).max(1);
    let mut out = Vec::new();
    for name in args.scenarios.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        out.push(match name {
            // 1 → N fan-out, audio-sized packets (opus: ~100 B, 50 pps).
            "fanout-audio" => Scenario {
                name: "fanout-audio",
                rooms: scale(8),
                publishers: 1,
                subscribers: 50,
                media: Media::Audio,
                video_pps: 0,
            },
            // 1 → N fan-out, video-sized packets (1,100 B, 300 pps in 30 frames).
            "fanout-video" => Scenario {
                name: "fanout-video",
                rooms: scale(2),
                publishers: 1,
                subscribers: 20,
                media: Media::Video,
                video_pps: 300,
            },
            // N × N voice conferences: everyone publishes audio and receives everyone else.
            "mesh-audio" => Scenario {
                name: "mesh-audio",
                rooms: scale(10),
                publishers: 8,
                subscribers: 0,
                media: Media::Audio,
                video_pps: 0,
            },
            // N × N rooms: everyone publishes audio and video and receives everyone else.
            "mesh-av" => Scenario {
                name: "mesh-av",
                rooms: scale(4),
                publishers: 4,
                subscribers: 0,
                media: Media::AudioVideo,
                video_pps: 150,
            },
            // Many small audio calls (participants = rooms × 2).
            "calls-audio" => Scenario {
                name: "calls-audio",
                rooms: scale(150),
                publishers: 2,
                subscribers: 0,
                media: Media::Audio,
                video_pps: 0,
            },
            other => bail!("unknown scenario '{other}'"),
        });
    }
    Ok(out)
}

/// Names a program to run the SFU under test, e.g. `heaptrack` for a heap
/// profile of its sessions. CPU time and RSS are then the wrapper's.
const SFU_WRAPPER: &str = "SWITCHBOARD_BENCH_SFU_WRAPPER";

const AUDIO_PAYLOAD: usize = 100;
const VIDEO_PAYLOAD: usize = 1100;
const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
/// Video is sent as frames: `video_pps / VIDEO_FPS` packets back to back per frame.
const VIDEO_FPS: u32 = 30;

/// What a receiver saw: (arrival, stream key, sequence number, latency in µs).
type Sample = (Instant, u64, u64, u32);

struct Shared {
    base: Instant,
    /// Receiving streams that have seen their first packet.
    streams_started: AtomicUsize,
    /// Packets sent by the load's publishers.
    sent: AtomicU64,
    /// Hands out sender ids to the baseline's clients.
    next_sender: std::sync::atomic::AtomicU32,
}

impl Shared {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            streams_started: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            next_sender: Default::default(),
        }
    }
}

fn stamp(shared: &Shared, payload: &mut [u8]) {
    let micros = shared.base.elapsed().as_micros() as u64;
    payload[2..10].copy_from_slice(&micros.to_le_bytes());
}

fn latency_us(shared: &Shared, payload: &[u8]) -> u32 {
    let Some(bytes) = payload.get(2..10) else { return 0 };
    let sent = u64::from_le_bytes(bytes.try_into().unwrap_or_default());
    (shared.base.elapsed().as_micros() as u64).saturating_sub(sent) as u32
}

// ---- the SFU side -----------------------------------------------------------

struct Control {
    writer: Mutex<tokio::net::tcp::OwnedWriteHalf>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    next_id: AtomicU64,
}

impl Control {
    async fn call(&self, mut request: Value) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        request["id"] = id.into();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().await.insert(id, tx);
        let mut line = request.to_string();
        line.push('\n');
        self.writer.lock().await.write_all(line.as_bytes()).await?;
        let answer = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .context("control timeout")??;
        if let Some(error) = answer["error"].as_str() {
            bail!("{error}");
        }
        Ok(answer)
    }
}

struct Server {
    child: tokio::process::Child,
    pid: u32,
}

/// Puts `server` on the last CPU and this process (the load) on the others.
async fn pin(server: u32) -> Result<()> {
    // Counted once, before the first pinning narrows what this process sees.
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from));
    anyhow::ensure!(cpus >= 2, "--pin needs two CPUs");
    let last = (cpus - 1).to_string();
    let rest = format!("0-{}", cpus - 2);
    for (cpu, pid) in [(last.as_str(), server), (rest.as_str(), std::process::id())] {
        let status = tokio::process::Command::new("taskset")
            .args(["-a", "-p", "-c", cpu, &pid.to_string()])
            .stdout(Stdio::null())
            .status()
            .await
            .context("running taskset")?;
        anyhow::ensure!(status.success(), "taskset failed for {pid}");
    }
    Ok(())
}

/// Starts `switchboard-bench <args>` and reads the address from its ready line.
/// `wrapper` (a program such as `heaptrack`) runs it instead, with the
/// command line as its arguments; lines the wrapper prints first are skipped.
async fn spawn_server(args: &[&str], ready_prefix: &str, wrapper: Option<&str>) -> Result<(Server, String)> {
    let exe = std::env::current_exe()?;
    let mut command = match wrapper {
        Some(wrapper) => {
            let mut command = tokio::process::Command::new(wrapper);
            command.arg(exe);
            command
        }
        None => tokio::process::Command::new(exe),
    };
    let mut child = command
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the server under test")?;
    let pid = child.id().context("pid")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut line = String::new();
    for _ in 0..20 {
        line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await??
            .context("server exited")?;
        if line.starts_with(ready_prefix) {
            break;
        }
    }
    let addr = line
        .strip_prefix(ready_prefix)
        .context("no ready line")?
        .trim()
        .to_string();
    Ok((Server { child, pid }, addr))
}

type OfferRoutes = Arc<Mutex<HashMap<(u64, u64), mpsc::Sender<(String, oneshot::Sender<String>)>>>>;

struct ClientTask {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<Vec<Sample>>,
}

#[allow(clippy::too_many_arguments)]
async fn start_webrtc_client(
    control: &Arc<Control>,
    routes: &OfferRoutes,
    shared: &Arc<Shared>,
    room: &str,
    user: &str,
    publish: Option<Media>,
    video_pps: u32,
) -> Result<ClientTask> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let local = socket.local_addr()?;
    let mut rtc = RtcConfig::new()
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false)
        .enable_vp8(true)
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").map_err(|e| anyhow::anyhow!("{e}"))?);
    let mut api = rtc.sdp_api();
    let stream = Some(format!("{user}-cam"));
    let (audio, video) = match publish {
        Some(Media::Audio) => (
            Some(api.add_media(MediaKind::Audio, Direction::SendOnly, stream, None, None)),
            None,
        ),
        Some(Media::Video) => (
            None,
            Some(api.add_media(MediaKind::Video, Direction::SendOnly, stream, None, None)),
        ),
        Some(Media::AudioVideo) => (
            Some(api.add_media(MediaKind::Audio, Direction::SendOnly, stream.clone(), None, None)),
            Some(api.add_media(MediaKind::Video, Direction::SendOnly, stream, None, None)),
        ),
        None => {
            // As a browser that joins to listen (and, in a room with video, to
            // watch) offers: so a video subscriber's session estimates its
            // bandwidth, as a browser's does.
            api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
            if video_pps > 0 {
                api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
            }
            (None, None)
        }
    };
    let (offer, pending) = api.apply().context("client offer")?;
    let opened = control
        .call(json!({"op": "open", "room": room, "user": user, "offer": offer.to_sdp_string()}))
        .await?;
    let answer = opened["answer"].as_str().context("answer")?;
    rtc.sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(answer)?)?;
    let key = (
        opened["shard"].as_u64().context("shard")?,
        opened["session"].as_u64().context("session")?,
    );
    let (offer_tx, mut offer_rx) = mpsc::channel::<(String, oneshot::Sender<String>)>(4);
    routes.lock().await.insert(key, offer_tx);
    let (stop, mut stop_rx) = oneshot::channel::<()>();
    let shared = Arc::clone(shared);
    let done = tokio::spawn(async move {
        let mut samples: Vec<Sample> = Vec::new();
        let mut started: HashSet<Mid> = HashSet::new();
        let mut buf = vec![0u8; 2048];
        let (mut audio_seq, mut video_seq, mut frame) = (0u64, 0u64, 0u64);
        let video_interval = Duration::from_secs_f64(1.0 / f64::from(VIDEO_FPS));
        let packets_per_frame = u64::from((video_pps / VIDEO_FPS).max(1));
        let (mut next_audio, mut next_video) = (Instant::now(), Instant::now());
        let mut keyframe_due = true;
        loop {
            let timeout = loop {
                match rtc.poll_output() {
                    Ok(Output::Timeout(t)) => break t,
                    Ok(Output::Transmit(t)) => {
                        let _ = socket.send_to(&t.contents, t.destination).await;
                    }
                    Ok(Output::Event(Event::RtpPacket(packet))) => {
                        let mid = rtc.direct_api().stream_rx(&packet.header.ssrc).map(|rx| rx.mid());
                        if let Some(mid) = mid {
                            if started.insert(mid) {
                                shared.streams_started.fetch_add(1, Ordering::Relaxed);
                            }
                            let key = mid.to_string().bytes().fold(0u64, |h, b| h * 131 + u64::from(b));
                            samples.push((
                                Instant::now(),
                                key,
                                *packet.seq_no,
                                latency_us(&shared, &packet.payload),
                            ));
                        }
                    }
                    Ok(Output::Event(Event::KeyframeRequest(_))) => keyframe_due = true,
                    Ok(Output::Event(_)) => {}
                    Err(_) => return samples,
                }
            };
            let mut wake = timeout;
            if audio.is_some() {
                wake = wake.min(next_audio);
            }
            if video.is_some() {
                wake = wake.min(next_video);
            }
            tokio::select! {
                _ = &mut stop_rx => return samples,
                received = socket.recv_from(&mut buf) => {
                    let Ok((len, source)) = received else { continue };
                    if let Ok(receive) = Receive::new(Protocol::Udp, source, local, &buf[..len]) {
                        let _ = rtc.handle_input(Input::Receive(Instant::now(), receive));
                    }
                }
                Some((offer, reply)) = offer_rx.recv() => {
                    if let Ok(offer) = SdpOffer::from_sdp_string(&offer)
                        && let Ok(answer) = rtc.sdp_api().accept_offer(offer)
                    {
                        let _ = reply.send(answer.to_sdp_string());
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    let _ = rtc.handle_input(Input::Timeout(now));
                    if !rtc.is_connected() {
                        next_audio = now + AUDIO_INTERVAL;
                        next_video = now + video_interval;
                        continue;
                    }
                    if let Some(mid) = audio && now >= next_audio {
                        next_audio += AUDIO_INTERVAL;
                        let pt = rtc.codec_config().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt());
                        let mut payload = vec![0xfc; AUDIO_PAYLOAD];
                        stamp(&shared, &mut payload);
                        if let (Some(pt), Some(tx)) = (pt, rtc.direct_api().stream_tx_by_mid(mid, None)) {
                            tx.write_rtp(RtpWrite::new(pt, audio_seq.into(), (audio_seq * 960) as u32, now, payload));
                            audio_seq += 1;
                            shared.sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if let Some(mid) = video && now >= next_video {
                        // One frame: its packets back to back, as an encoder emits them.
                        next_video += video_interval;
                        let pt = rtc.codec_config().find(|p| p.spec().codec == Codec::Vp8).map(|p| p.pt());
                        let keyframe = keyframe_due || frame.is_multiple_of(150);
                        keyframe_due = false;
                        let ts = (frame * 90_000 / u64::from(VIDEO_FPS)) as u32;
                        frame += 1;
                        for part in 0..packets_per_frame {
                            let mut payload = vec![0x55; VIDEO_PAYLOAD];
                            payload[0] = if part == 0 { 0x10 } else { 0x00 };
                            payload[1] = if keyframe { 0x00 } else { 0x01 };
                            stamp(&shared, &mut payload);
                            let last = part + 1 == packets_per_frame;
                            if let (Some(pt), Some(tx)) = (pt, rtc.direct_api().stream_tx_by_mid(mid, None)) {
                                tx.write_rtp(RtpWrite::new(pt, video_seq.into(), ts, now, payload).marker(last).nackable(true));
                                video_seq += 1;
                                shared.sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        }
    });
    Ok(ClientTask { stop, done })
}

// ---- the baseline side ------------------------------------------------------

async fn start_udp_client(
    forwarder: SocketAddr,
    shared: &Arc<Shared>,
    room: &str,
    publish: Option<Media>,
    video_pps: u32,
) -> Result<ClientTask> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.send_to(format!("JOIN {room}").as_bytes(), forwarder).await?;
    let (stop, mut stop_rx) = oneshot::channel::<()>();
    let shared = Arc::clone(shared);
    let done = tokio::spawn(async move {
        let mut samples: Vec<Sample> = Vec::new();
        // Streams are told apart by the sender id in the packet (all come from the forwarder's port).
        let mut started: HashSet<(u32, u8)> = HashSet::new();
        let me = shared.next_sender.fetch_add(1, Ordering::Relaxed);
        let mut buf = vec![0u8; 2048];
        let (audio, video) = match publish {
            Some(Media::Audio) => (true, false),
            Some(Media::Video) => (false, true),
            Some(Media::AudioVideo) => (true, true),
            None => (false, false),
        };
        let video_interval = Duration::from_secs_f64(1.0 / f64::from(VIDEO_FPS));
        let packets_per_frame = (video_pps / VIDEO_FPS).max(1);
        let start = Instant::now() + Duration::from_millis(200);
        let (mut next_audio, mut next_video) = (start, start);
        let (mut audio_seq, mut video_seq) = (0u64, 0u64);
        loop {
            let mut wake = Instant::now() + Duration::from_secs(1);
            if audio {
                wake = wake.min(next_audio);
            }
            if video {
                wake = wake.min(next_video);
            }
            tokio::select! {
                _ = &mut stop_rx => return samples,
                received = socket.recv_from(&mut buf) => {
                    let Ok((len, _)) = received else { continue };
                    // [kind][pad][stamp 8][seq 8][sender 4]…: the stamp where the RTP payloads have it.
                    if len >= 22 {
                        let kind = buf[0];
                        let sender = u32::from_le_bytes(buf[18..22].try_into().unwrap_or_default());
                        if started.insert((sender, kind)) {
                            shared.streams_started.fetch_add(1, Ordering::Relaxed);
                        }
                        let seq = u64::from_le_bytes(buf[10..18].try_into().unwrap_or_default());
                        let key = (u64::from(sender) << 8) | u64::from(kind);
                        samples.push((Instant::now(), key, seq, latency_us(&shared, &buf[..len])));
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    // Packet sizes match the SRTP ones: RTP header + payload + auth tag.
                    if audio && now >= next_audio {
                        next_audio += AUDIO_INTERVAL;
                        let mut packet = vec![0u8; 12 + AUDIO_PAYLOAD + 16];
                        packet[0] = b'a';
                        stamp(&shared, &mut packet);
                        packet[10..18].copy_from_slice(&audio_seq.to_le_bytes());
                        packet[18..22].copy_from_slice(&me.to_le_bytes());
                        audio_seq += 1;
                        let _ = socket.send_to(&packet, forwarder).await;
                        shared.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    if video && now >= next_video {
                        next_video += video_interval;
                        for _ in 0..packets_per_frame {
                            let mut packet = vec![0u8; 12 + VIDEO_PAYLOAD + 16];
                            packet[0] = b'v';
                            stamp(&shared, &mut packet);
                            packet[10..18].copy_from_slice(&video_seq.to_le_bytes());
                            packet[18..22].copy_from_slice(&me.to_le_bytes());
                            video_seq += 1;
                            let _ = socket.send_to(&packet, forwarder).await;
                            shared.sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    });
    Ok(ClientTask { stop, done })
}

// ---- measuring --------------------------------------------------------------

struct Measured {
    egress: u64,
    cpu: Duration,
    wall: Duration,
    loss: f64,
    p50_us: u32,
    p99_us: u32,
    /// Forwarding delay inside the server (kernel arrival to the end of the
    /// sends it caused), p50 and p99, over the window.
    server_delay: Option<(Duration, Duration)>,
    rss_per_track_kib: Option<f64>,
    participants: usize,
    /// Packets the load's publishers sent and its receivers got during the window.
    sent: u64,
    received: u64,
}

fn summarize(samples: &[Sample], from: Instant, to: Instant) -> (f64, u32, u32, u64) {
    let mut by_stream: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut latencies = Vec::new();
    for &(at, key, seq, latency) in samples {
        if at >= from && at <= to {
            by_stream.entry(key).or_default().push(seq);
            latencies.push(latency);
        }
    }
    let (mut expected, mut got) = (0u64, 0u64);
    for seqs in by_stream.values_mut() {
        seqs.sort_unstable();
        seqs.dedup();
        if let (Some(first), Some(last)) = (seqs.first(), seqs.last()) {
            expected += last - first + 1;
            got += seqs.len() as u64;
        }
    }
    latencies.sort_unstable();
    let pick = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let loss = if expected == 0 {
        0.0
    } else {
        (expected - got) as f64 / expected as f64
    };
    (loss, pick(0.5), pick(0.99), latencies.len() as u64)
}

/// Streams every participant should end up receiving.
fn expected_streams(s: &Scenario) -> usize {
    let per_publisher = match s.media {
        Media::AudioVideo => 2,
        _ => 1,
    };
    let receivers_per_publisher = s.publishers - 1 + s.subscribers;
    s.rooms * s.publishers * per_publisher * receivers_per_publisher
}

async fn warm_up(shared: &Shared, expected: usize) -> Result<()> {
    for _ in 0..600 {
        if shared.streams_started.load(Ordering::Relaxed) >= expected {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "only {} of {expected} streams started within 60 s",
        shared.streams_started.load(Ordering::Relaxed)
    )
}

async fn run_sfu(s: &Scenario, args: &Args) -> Result<Measured> {
    let shards = args.shards.to_string();
    let (mut server, addr) = spawn_server(
        &["sfu-server", "--shards", &shards],
        "control ",
        std::env::var(SFU_WRAPPER).ok().as_deref(),
    )
    .await?;
    if args.pin {
        pin(server.pid).await?;
    }
    let stream = tokio::net::TcpStream::connect(&addr).await?;
    let (read, write) = stream.into_split();
    let control = Arc::new(Control {
        writer: Mutex::new(write),
        pending: Mutex::default(),
        next_id: AtomicU64::new(1),
    });
    let routes: OfferRoutes = Arc::default();
    // Reader: answers to their callers, renegotiation events to the clients.
    {
        let (control, routes) = (Arc::clone(&control), Arc::clone(&routes));
        let mut lines = BufReader::new(read).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(message) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(id) = message["id"].as_u64() {
                    if let Some(reply) = control.pending.lock().await.remove(&id) {
                        let _ = reply.send(message);
                    }
                    continue;
                }
                let (Some(shard), Some(session)) = (message["shard"].as_u64(), message["session"].as_u64()) else {
                    continue;
                };
                let (control, routes) = (Arc::clone(&control), Arc::clone(&routes));
                tokio::spawn(async move {
                    let Ok(offer) = control
                        .call(json!({"op": "create_offer", "shard": shard, "session": session}))
                        .await
                    else {
                        return;
                    };
                    let Some(sdp) = offer["offer"].as_str() else { return };
                    let Some(route) = routes.lock().await.get(&(shard, session)).cloned() else {
                        return;
                    };
                    let (reply, answer) = oneshot::channel();
                    if route.send((sdp.to_string(), reply)).await.is_ok()
                        && let Ok(answer) = answer.await
                    {
                        let _ = control
                            .call(json!({"op": "accept_answer", "shard": shard, "session": session, "answer": answer}))
                            .await;
                    }
                });
            }
        });
    }
    // Memory per subscribed track is the growth from the first room's being
    // up to all rooms': what the first sessions page in once (the binary's
    // code they run, the allocator's first arenas) is not per track.
    let mut baseline_rss = (proc_stat::rss_kib(server.pid).unwrap_or(0), 0);
    let shared = Arc::new(Shared::new());
    let mut clients = Vec::new();
    for room in 0..s.rooms {
        let room_id = format!("!bench{room}:load");
        for p in 0..s.publishers {
            let user = format!("@p{p}r{room}:load");
            clients.push(
                start_webrtc_client(&control, &routes, &shared, &room_id, &user, Some(s.media), s.video_pps).await?,
            );
        }
        for n in 0..s.subscribers {
            let user = format!("@s{n}r{room}:load");
            clients.push(start_webrtc_client(&control, &routes, &shared, &room_id, &user, None, s.video_pps).await?);
        }
        if room == 0 && s.rooms > 1 {
            warm_up(&shared, expected_streams(s) / s.rooms).await?;
            let stats = control.call(json!({"op": "stats"})).await?;
            let subscriptions = stats["subscriptions"].as_u64().unwrap_or(0);
            baseline_rss = (proc_stat::rss_kib(server.pid).unwrap_or(0), subscriptions);
        }
    }
    warm_up(&shared, expected_streams(s)).await?;
    let stats = control.call(json!({"op": "stats"})).await?;
    let subscriptions = stats["subscriptions"].as_u64().unwrap_or(0);
    let rss_after = proc_stat::rss_kib(server.pid).unwrap_or(0);
    let forwarded_before = stats["packets_forwarded"].as_u64().unwrap_or(0);
    let timeouts_before = stats["session_timeouts"].as_u64().unwrap_or(0);
    let ingress_before = stats["datagrams_in"].as_u64().unwrap_or(0);
    let egress_datagrams_before = stats["datagrams_out"].as_u64().unwrap_or(0);
    let delay_before = delay_histogram(&stats["forwarding_delay"]);
    let cpu_before = proc_stat::cpu_time(server.pid).unwrap_or_default();
    let sent_before = shared.sent.load(Ordering::Relaxed);
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let to = Instant::now();
    let sent_after = shared.sent.load(Ordering::Relaxed);
    let cpu = proc_stat::cpu_time(server.pid)
        .unwrap_or_default()
        .saturating_sub(cpu_before);
    let stats = control.call(json!({"op": "stats"})).await?;
    let egress = stats["packets_forwarded"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(forwarded_before);
    let timeouts = stats["session_timeouts"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(timeouts_before);
    let ingress = stats["datagrams_in"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(ingress_before);
    let egress_datagrams = stats["datagrams_out"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(egress_datagrams_before);
    let server_delay = delay_quantiles(&delay_histogram(&stats["forwarding_delay"]).since(&delay_before));
    eprintln!(
        "  (SFU: {:.0} datagrams in/s, {:.0} out/s, {:.0} session timers/s)",
        ingress as f64 / (to - from).as_secs_f64(),
        egress_datagrams as f64 / (to - from).as_secs_f64(),
        timeouts as f64 / (to - from).as_secs_f64()
    );
    let mut samples = Vec::new();
    let participants = clients.len();
    for client in clients {
        let _ = client.stop.send(());
        samples.extend(client.done.await.unwrap_or_default());
    }
    let (loss, p50_us, p99_us, received) = summarize(&samples, from, to);
    let sent = sent_after.saturating_sub(sent_before);
    server.child.kill().await.ok();
    let (rss_before, subscriptions_before) = baseline_rss;
    let tracks = subscriptions.saturating_sub(subscriptions_before);
    let rss_per_track_kib = (tracks > 0).then(|| rss_after.saturating_sub(rss_before) as f64 / tracks as f64);
    Ok(Measured {
        egress,
        cpu,
        wall: to - from,
        loss,
        p50_us,
        p99_us,
        server_delay,
        rss_per_track_kib,
        participants,
        sent,
        received,
    })
}

async fn run_baseline(s: &Scenario, args: &Args) -> Result<Measured> {
    let (mut server, addr) = spawn_server(&["udp-forwarder"], "forwarder ", None).await?;
    if args.pin {
        pin(server.pid).await?;
    }
    let forwarder: SocketAddr = addr.parse()?;
    let shared = Arc::new(Shared::new());
    let mut clients = Vec::new();
    for room in 0..s.rooms {
        let room_id = format!("bench{room}");
        for _ in 0..s.publishers {
            clients.push(start_udp_client(forwarder, &shared, &room_id, Some(s.media), s.video_pps).await?);
        }
        for _ in 0..s.subscribers {
            clients.push(start_udp_client(forwarder, &shared, &room_id, None, s.video_pps).await?);
        }
    }
    warm_up(&shared, expected_streams(s)).await?;
    let stats_socket = UdpSocket::bind("127.0.0.1:0").await?;
    let (before, delay_before) = forwarder_stats(&stats_socket, forwarder).await?;
    let cpu_before = proc_stat::cpu_time(server.pid).unwrap_or_default();
    let sent_before = shared.sent.load(Ordering::Relaxed);
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let to = Instant::now();
    let sent_after = shared.sent.load(Ordering::Relaxed);
    let cpu = proc_stat::cpu_time(server.pid)
        .unwrap_or_default()
        .saturating_sub(cpu_before);
    let (after, delay_after) = forwarder_stats(&stats_socket, forwarder).await?;
    let egress = after.saturating_sub(before);
    let server_delay = delay_quantiles(&delay_after.since(&delay_before));
    let mut samples = Vec::new();
    let participants = clients.len();
    for client in clients {
        let _ = client.stop.send(());
        samples.extend(client.done.await.unwrap_or_default());
    }
    let (loss, p50_us, p99_us, received) = summarize(&samples, from, to);
    let sent = sent_after.saturating_sub(sent_before);
    server.child.kill().await.ok();
    Ok(Measured {
        egress,
        cpu,
        wall: to - from,
        loss,
        p50_us,
        p99_us,
        server_delay,
        rss_per_track_kib: None,
        participants,
        sent,
        received,
    })
}

/// Asks the baseline forwarder how many datagrams it forwarded so far, and
/// its forwarding-delay histogram.
async fn forwarder_stats(socket: &UdpSocket, forwarder: SocketAddr) -> Result<(u64, DelayHistogram)> {
    socket.send_to(b"STATS", forwarder).await?;
    let mut buf = [0u8; 4096];
    let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf)).await??;
    let stats: Value = serde_json::from_slice(&buf[..len]).context("the forwarder's STATS")?;
    Ok((
        stats["forwarded"].as_u64().unwrap_or(0),
        delay_histogram(&stats["delay"]),
    ))
}

/// A delay histogram from its counts in JSON (empty if absent; quantiles only, no sum).
fn delay_histogram(counts: &Value) -> DelayHistogram {
    let counts: Vec<u64> = counts
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    DelayHistogram::from_parts(&counts, Duration::ZERO).unwrap_or_default()
}

fn delay_quantiles(window: &DelayHistogram) -> Option<(Duration, Duration)> {
    Some((window.quantile(0.5)?, window.quantile(0.99)?))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn per_cpu_second(m: &Measured) -> f64 {
    m.egress as f64 / m.cpu.as_secs_f64().max(1e-3)
}

#[allow(clippy::print_stdout)]
fn report(s: &Scenario, who: &str, m: &Measured) {
    println!(
        "{who} {}: {} participants in {} rooms; sent {} received {}; egress {:.0} pkt/s; server CPU {:.0} %; {:.0} egress pkt per CPU-second; loss {:.3} %; latency p50 {:.2} ms p99 {:.2} ms; in the server p50 {} p99 {}{}",
        s.name,
        m.participants,
        s.rooms,
        m.sent,
        m.received,
        m.egress as f64 / m.wall.as_secs_f64(),
        100.0 * m.cpu.as_secs_f64() / m.wall.as_secs_f64(),
        per_cpu_second(m),
        100.0 * m.loss,
        f64::from(m.p50_us) / 1000.0,
        f64::from(m.p99_us) / 1000.0,
        m.server_delay
            .map_or("-".into(), |(p50, _)| format!("{:.3} ms", ms(p50))),
        m.server_delay
            .map_or("-".into(), |(_, p99)| format!("{:.3} ms", ms(p99))),
        m.rss_per_track_kib
            .map(|k| format!("; RSS {k:.1} KiB per subscribed track"))
            .unwrap_or_default()
    );
}

#[allow(clippy::print_stdout)]
pub async fn run(args: Args) -> Result<()> {
    for scenario in scenarios(&args)? {
        let mut runs = Vec::new();
        for round in 0..args.rounds.max(1) {
            // Every other round the baseline first: a drift of the machine
            // over the rounds favours neither.
            let baseline_first = round % 2 == 1;
            let mut baseline = None;
            if baseline_first {
                baseline = Some(
                    run_baseline(&scenario, &args)
                        .await
                        .with_context(|| format!("baseline run of {}", scenario.name))?,
                );
            }
            let sfu = run_sfu(&scenario, &args)
                .await
                .with_context(|| format!("SFU run of {}", scenario.name))?;
            let baseline = match baseline {
                Some(baseline) => baseline,
                None => run_baseline(&scenario, &args)
                    .await
                    .with_context(|| format!("baseline run of {}", scenario.name))?,
            };
            report(&scenario, "sfu", &sfu);
            report(&scenario, "baseline", &baseline);
            runs.push((sfu, baseline));
        }
        let summed = |pick: fn(&(Measured, Measured)) -> &Measured| {
            let egress: u64 = runs.iter().map(|r| pick(r).egress).sum();
            let cpu: Duration = runs.iter().map(|r| pick(r).cpu).sum();
            egress as f64 / cpu.as_secs_f64().max(1e-3)
        };
        let ratios: Vec<f64> = runs
            .iter()
            .map(|(sfu, base)| 100.0 * per_cpu_second(sfu) / per_cpu_second(base).max(1.0))
            .collect();
        let spread = if runs.len() > 1 {
            let (low, high) = ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));
            format!(" over {} runs (runs {low:.0}-{high:.0} %)", runs.len())
        } else {
            String::new()
        };
        let mean = |f: &dyn Fn(&(Measured, Measured)) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
        let added_p99 = mean(&|(sfu, base)| (f64::from(sfu.p99_us) - f64::from(base.p99_us)) / 1000.0);
        let in_server = runs
            .iter()
            .all(|(sfu, base)| sfu.server_delay.is_some() && base.server_delay.is_some())
            .then(|| {
                mean(&|(sfu, base)| match (sfu.server_delay, base.server_delay) {
                    (Some((_, ours)), Some((_, theirs))) => ms(ours) - ms(theirs),
                    _ => 0.0,
                })
            });
        println!(
            "ratio {}: SFU/baseline egress per CPU-second = {:.0} %{spread} (goals: >= 50 %, >= 300k pkt per CPU-second); added latency p99 end to end {added_p99:.2} ms, in the server {} (goal < 1 ms at half of max load)",
            scenario.name,
            100.0 * summed(|r| &r.0) / summed(|r| &r.1).max(1.0),
            in_server.map_or("-".into(), |d| format!("{d:.3} ms")),
        );
    }
    Ok(())
}
