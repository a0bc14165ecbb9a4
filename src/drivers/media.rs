//! The media shard driver: one thread, one UDP socket, one [`Sfu`].
//!
//! The thread runs a single-threaded tokio runtime and loops: wait for
//! datagrams, a command or the core's next timeout; feed them to the core
//! (datagrams in `recvmmsg` batches, up to [`BATCHES_PER_TURN`] a turn); send every
//! transmit (`sendmmsg`); forward every event. Each datagram's delay, from its
//! kernel arrival time to the end of the turn's sends, goes into the shard's
//! [`ShardStats::forwarding_delay`]. The core is owned by this thread
//! alone; the rest of the process talks to it through [`ShardHandle`]:
//! - commands go through a bounded channel (capacity [`COMMAND_QUEUE`]); a full
//!   queue makes the caller wait (backpressure on signalling, never on media);
//! - events come back on an unbounded channel: they are per signalling action
//!   (a session connected, a renegotiation is due), never per packet.

use super::udp::{self, Datagrams};
use anyhow::{Context, Result};
use nix::sys::socket::{MultiHeaders, SockaddrStorage};
use sfu::{
    DelayHistogram, MixerConfig, Offer, OwnLines, Participant, RoomId, SessionId, SessionStats, Sfu, SfuConfig,
    SfuError, SfuEvent, ShardStats, Transmit,
};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};

/// Commands waiting for the shard before callers are made to wait.
pub const COMMAND_QUEUE: usize = 1024;
/// `recvmmsg` batches read per turn (then timers and commands get a turn).
const BATCHES_PER_TURN: usize = 4;
/// Reading stops to send what was produced once a slice of a turn took this
/// long: the first datagram of a burst is not held behind the whole burst.
const SLICE: Duration = Duration::from_micros(200);
/// How long the loop sleeps when the core has no timer at all.
const IDLE_WAKE: Duration = Duration::from_millis(200);

type Reply<T> = oneshot::Sender<Result<T, SfuError>>;

enum Command {
    Open {
        room: RoomId,
        participant: Participant,
        offer: String,
        own_lines: OwnLines,
        reply: Reply<(SessionId, String)>,
    },
    OpenOffer {
        room: RoomId,
        participant: Participant,
        reply: Reply<(SessionId, String)>,
    },
    CreateOffer {
        session: SessionId,
        reply: Reply<Option<Offer>>,
    },
    AcceptAnswer {
        session: SessionId,
        answer: String,
        reply: Reply<()>,
    },
    AcceptOffer {
        session: SessionId,
        offer: String,
        reply: Reply<String>,
    },
    Close {
        session: SessionId,
    },
    SingleStream {
        session: SessionId,
    },
    Record {
        room: RoomId,
        start: bool,
        reply: Reply<Option<Duration>>,
    },
    Stats {
        reply: oneshot::Sender<ShardStats>,
    },
    SessionStats {
        session: SessionId,
        reply: oneshot::Sender<Option<SessionStats>>,
    },
}

/// The rest of the process's handle on a shard.
#[derive(Debug, Clone)]
pub struct ShardHandle {
    /// Where the shard's socket is bound.
    pub local_addr: SocketAddr,
    /// The address its answers advertise.
    pub advertised_addr: SocketAddr,
    commands: mpsc::Sender<Command>,
}

/// What single-stream sessions get (from the `media.mix_*` and
/// `media.video_hold_off_ms` settings).
#[derive(Debug, Clone)]
pub struct MediaTuning {
    pub mixer: MixerConfig,
    pub video_hold_off: Duration,
}

impl Default for MediaTuning {
    fn default() -> Self {
        let defaults = SfuConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        Self {
            mixer: defaults.mixer,
            video_hold_off: defaults.video_hold_off,
        }
    }
}

/// Starts a shard bound to `bind`; answers advertise `advertised_ip` (default:
/// the bound IP) with the bound port.
pub fn spawn_shard(
    bind: SocketAddr,
    advertised_ip: Option<std::net::IpAddr>,
) -> Result<(ShardHandle, mpsc::UnboundedReceiver<SfuEvent>)> {
    spawn_shard_with(bind, advertised_ip, MediaTuning::default())
}

/// [`spawn_shard`] with settings for single-stream sessions.
pub fn spawn_shard_with(
    bind: SocketAddr,
    advertised_ip: Option<std::net::IpAddr>,
    tuning: MediaTuning,
) -> Result<(ShardHandle, mpsc::UnboundedReceiver<SfuEvent>)> {
    let socket = std::net::UdpSocket::bind(bind).with_context(|| format!("binding the media socket to {bind}"))?;
    socket.set_nonblocking(true)?;
    // Bursts (a busy or descheduled shard thread) wait in the kernel, not dropped.
    super::bigger_buffers(&socket);
    let local_addr = socket.local_addr()?;
    let ip = advertised_ip.unwrap_or(local_addr.ip());
    anyhow::ensure!(
        !ip.is_unspecified(),
        "the media socket is bound to {bind}: set an advertised IP for the SFU (media.advertised_ip)"
    );
    let advertised_addr = SocketAddr::new(ip, local_addr.port());
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (event_tx, events) = mpsc::unbounded_channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new()
        .name(format!("media-{}", local_addr.port()))
        .spawn(move || {
            runtime.block_on(async move {
                let mut config = SfuConfig::new(advertised_addr);
                config.mixer = tuning.mixer;
                config.video_hold_off = tuning.video_hold_off;
                let sfu = Sfu::new(config);
                if let Err(e) = run(socket, advertised_addr, sfu, command_rx, event_tx).await {
                    tracing::error!(error = %e, "media shard stopped");
                }
            });
        })?;
    Ok((
        ShardHandle {
            local_addr,
            advertised_addr,
            commands,
        },
        events,
    ))
}

async fn run(
    socket: std::net::UdpSocket,
    advertised_addr: SocketAddr,
    mut sfu: Sfu,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::UnboundedSender<SfuEvent>,
) -> Result<()> {
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    let mut input = Datagrams::new(&socket).context("asking for kernel receive timestamps")?;
    let mut egress = Egress::new();
    loop {
        let wake = sfu.poll_timeout().unwrap_or_else(|| Instant::now() + IDLE_WAKE);
        tokio::select! {
            ready = socket.readable() => {
                ready?;
                let mut slice = Instant::now();
                for _ in 0..BATCHES_PER_TURN {
                    match socket.try_io(Interest::READABLE, || input.receive(&socket)) {
                        Ok(_) => {
                            // Kernel time stamps (wall clock) as instants: how long ago each came.
                            let (wall, mono) = (SystemTime::now(), Instant::now());
                            for (bytes, source, arrival) in input.iter() {
                                if slice.elapsed() >= SLICE || sfu.transmits_ready() >= udp::SEND_BATCH {
                                    // Send what the slice produced before reading on
                                    // (at once if a batch is full: a fan-out).
                                    egress.send(&mut sfu, &socket).await;
                                    slice = Instant::now();
                                }
                                let ago = wall.duration_since(arrival).unwrap_or_default();
                                let arrived = mono.checked_sub(ago).unwrap_or(mono);
                                sfu.handle_receive_at(Instant::now(), arrived, source, advertised_addr, bytes);
                                egress.arrivals.push(arrival);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        // ICMP errors (port unreachable) surface here on Linux; they concern one peer only.
                        Err(e) => tracing::debug!(error = %e, "media socket receive error"),
                    }
                }
            },
            command = commands.recv() => match command {
                Some(command) => execute(&mut sfu, command, &egress.delay),
                None => return Ok(()),
            },
            () = tokio::time::sleep_until(wake.into()) => sfu.handle_timeout(Instant::now()),
        }
        egress.send(&mut sfu, &socket).await;
        while let Some(event) = sfu.poll_event() {
            if events.send(event).is_err() {
                tracing::debug!("nobody listens to media events");
            }
        }
    }
}

/// What leaves a shard: the core's transmits, in `sendmmsg` batches, and the
/// delay of each datagram handled since the last send.
struct Egress {
    outgoing: Vec<Transmit>,
    headers: MultiHeaders<SockaddrStorage>,
    /// Kernel arrival times of the datagrams handled since the last send.
    arrivals: Vec<SystemTime>,
    delay: DelayHistogram,
}

impl Egress {
    fn new() -> Self {
        Self {
            outgoing: Vec::with_capacity(udp::SEND_BATCH),
            headers: udp::send_headers(),
            arrivals: Vec::with_capacity(BATCHES_PER_TURN * udp::RECV_BATCH),
            delay: DelayHistogram::default(),
        }
    }

    /// Sends everything the core produced, then records the delays.
    async fn send(&mut self, sfu: &mut Sfu, socket: &tokio::net::UdpSocket) {
        loop {
            self.outgoing.clear();
            self.outgoing
                .extend(std::iter::from_fn(|| sfu.poll_transmit()).take(udp::SEND_BATCH));
            if self.outgoing.is_empty() {
                break;
            }
            udp::send_all(socket, &mut self.headers, &self.outgoing, |t| {
                (&t.contents[..], t.destination)
            })
            .await;
            for transmit in self.outgoing.drain(..) {
                sfu.recycle(transmit);
            }
        }
        let sent = SystemTime::now();
        for arrival in self.arrivals.drain(..) {
            self.delay.record(sent.duration_since(arrival).unwrap_or_default());
        }
    }
}

fn execute(sfu: &mut Sfu, command: Command, delay: &DelayHistogram) {
    let now = Instant::now();
    match command {
        Command::Open {
            room,
            participant,
            offer,
            own_lines,
            reply,
        } => {
            let _ = reply.send(sfu.open_session(now, room, participant, &offer, own_lines));
        }
        Command::OpenOffer {
            room,
            participant,
            reply,
        } => {
            let _ = reply.send(sfu.open_offer(now, room, participant));
        }
        Command::CreateOffer { session, reply } => {
            let _ = reply.send(sfu.create_offer(now, session));
        }
        Command::AcceptAnswer { session, answer, reply } => {
            let _ = reply.send(sfu.accept_answer(now, session, &answer));
        }
        Command::AcceptOffer { session, offer, reply } => {
            let _ = reply.send(sfu.accept_offer(now, session, &offer));
        }
        Command::Close { session } => sfu.close_session(now, session),
        Command::SingleStream { session } => sfu.set_single_stream(now, session),
        Command::Record { room, start, reply } => {
            let result = if start {
                sfu.start_recording(now, &room).map(|()| None)
            } else {
                Ok(sfu.stop_recording(now, &room))
            };
            let _ = reply.send(result);
        }
        Command::Stats { reply } => {
            let mut stats = sfu.stats();
            stats.forwarding_delay = delay.clone();
            let _ = reply.send(stats);
        }
        Command::SessionStats { session, reply } => {
            let _ = reply.send(sfu.session_stats(session));
        }
    }
}

impl ShardHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, response) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| anyhow::anyhow!("the media shard has stopped"))?;
        Ok(response
            .await
            .map_err(|_| anyhow::anyhow!("the media shard has stopped"))??)
    }

    /// Opens a session from an SDP offer; returns its id and our answer
    /// (`own_lines`: whether we send on the offer's own m-lines).
    pub async fn open_session(
        &self,
        room: RoomId,
        participant: Participant,
        offer: String,
        own_lines: OwnLines,
    ) -> Result<(SessionId, String)> {
        self.call(|reply| Command::Open {
            room,
            participant,
            offer,
            own_lines,
            reply,
        })
        .await
    }

    /// Opens a session with our own offer (we call the participant); returns
    /// its id and the offer. The answer goes to [`ShardHandle::accept_answer`].
    pub async fn open_offer(&self, room: RoomId, participant: Participant) -> Result<(SessionId, String)> {
        self.call(|reply| Command::OpenOffer {
            room,
            participant,
            reply,
        })
        .await
    }

    pub async fn create_offer(&self, session: SessionId) -> Result<Option<Offer>> {
        self.call(|reply| Command::CreateOffer { session, reply }).await
    }

    pub async fn accept_answer(&self, session: SessionId, answer: String) -> Result<()> {
        self.call(|reply| Command::AcceptAnswer { session, answer, reply })
            .await
    }

    pub async fn accept_offer(&self, session: SessionId, offer: String) -> Result<String> {
        self.call(|reply| Command::AcceptOffer { session, offer, reply }).await
    }

    pub async fn close_session(&self, session: SessionId) -> Result<()> {
        self.commands
            .send(Command::Close { session })
            .await
            .map_err(|_| anyhow::anyhow!("the media shard has stopped"))
    }

    /// The session receives one stream per kind on its own m-lines (no
    /// renegotiation): the room's mix without its own voice, the active speaker's video.
    pub async fn set_single_stream(&self, session: SessionId) -> Result<()> {
        self.commands
            .send(Command::SingleStream { session })
            .await
            .map_err(|_| anyhow::anyhow!("the media shard has stopped"))
    }

    /// Starts recording the room's audio; the bytes come as `SfuEvent::Recording`.
    pub async fn start_recording(&self, room: RoomId) -> Result<()> {
        self.call(|reply| Command::Record {
            room,
            start: true,
            reply,
        })
        .await
        .map(|_| ())
    }

    /// Stops recording the room's audio; the recorded duration, if it was recording.
    pub async fn stop_recording(&self, room: RoomId) -> Result<Option<Duration>> {
        self.call(|reply| Command::Record {
            room,
            start: false,
            reply,
        })
        .await
    }

    pub async fn stats(&self) -> Result<ShardStats> {
        let (reply, response) = oneshot::channel();
        self.commands
            .send(Command::Stats { reply })
            .await
            .map_err(|_| anyhow::anyhow!("the media shard has stopped"))?;
        Ok(response.await?)
    }

    pub async fn session_stats(&self, session: SessionId) -> Result<Option<SessionStats>> {
        let (reply, response) = oneshot::channel();
        self.commands
            .send(Command::SessionStats { session, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the media shard has stopped"))?;
        Ok(response.await?)
    }
}

/// The shards of this process; a room lives on one shard.
#[derive(Debug, Clone)]
pub struct ShardSet {
    shards: Vec<ShardHandle>,
}

impl ShardSet {
    /// Starts `count` shards (0 = one per CPU core). Shard `i` binds `bind`'s
    /// port + i, or a free port when that is 0.
    pub fn spawn(
        bind: SocketAddr,
        advertised_ip: Option<std::net::IpAddr>,
        count: usize,
    ) -> Result<(Self, mpsc::UnboundedReceiver<(usize, SfuEvent)>)> {
        Self::spawn_with(bind, advertised_ip, count, MediaTuning::default())
    }

    /// [`ShardSet::spawn`] with settings for single-stream sessions.
    pub fn spawn_with(
        bind: SocketAddr,
        advertised_ip: Option<std::net::IpAddr>,
        count: usize,
        tuning: MediaTuning,
    ) -> Result<(Self, mpsc::UnboundedReceiver<(usize, SfuEvent)>)> {
        let count = if count == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            count
        };
        let (merged_tx, merged) = mpsc::unbounded_channel();
        let mut shards = Vec::with_capacity(count);
        for index in 0..count {
            let port = if bind.port() == 0 {
                0
            } else {
                bind.port().checked_add(index as u16).context("media port range")?
            };
            let (shard, mut events) =
                spawn_shard_with(SocketAddr::new(bind.ip(), port), advertised_ip, tuning.clone())?;
            let tx = merged_tx.clone();
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    if tx.send((index, event)).is_err() {
                        return;
                    }
                }
            });
            shards.push(shard);
        }
        Ok((Self { shards }, merged))
    }

    /// The shard that hosts `room`: placement is a stable hash of the room id,
    /// the one seam where multi-node placement will plug in.
    pub fn shard_for(&self, room: &RoomId) -> (usize, &ShardHandle) {
        // FNV-1a: stable across runs and platforms (unlike the std hasher).
        let hash = room.0.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let index = (hash % self.shards.len() as u64) as usize;
        (index, &self.shards[index])
    }

    pub fn shard(&self, index: usize) -> Option<&ShardHandle> {
        self.shards.get(index)
    }

    pub fn shards(&self) -> &[ShardHandle] {
        &self.shards
    }

    /// The counters of all shards.
    pub async fn stats(&self) -> Vec<ShardStats> {
        let mut all = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            all.push(shard.stats().await.unwrap_or_default());
        }
        all
    }
}
