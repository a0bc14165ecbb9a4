//! The TURN relay driver: one thread, one `mio` poll loop, one [`Relay`].
//!
//! The thread owns every socket of the relay: the UDP listener, the TCP (and,
//! with a certificate, TLS) listener and their connections, and one UDP relay
//! socket per allocation. It waits for readiness or the core's next timeout,
//! stamps `now` once per wake, reads every ready socket until it would block,
//! and moves bytes as the core says:
//! - client → peer: the core answers a datagram (or a framed TCP message)
//!   with "send this range of it from relay port P to peer X";
//! - peer → client: datagrams are read with [`PEER_HEADROOM`] bytes free in
//!   front, the core writes the ChannelData or Data-indication header there,
//!   and the range goes to the client's UDP address or TCP connection;
//! - control: responses from `poll_transmit`, socket work from `poll_command`.
//!
//! Nothing is allocated per relayed packet; a UDP send that would block is a
//! counted drop (UDP semantics), a TCP client too slow to take its data loses
//! whole frames once its queue holds [`MAX_TCP_QUEUE`] bytes. Counters reach
//! `/metrics` through [`TurnHandle::stats`], copied from the core four times a
//! second (no lock on the packet path).

use anyhow::{Context, Result};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use std::collections::HashMap;
use std::io::{ErrorKind, IoSlice, IoSliceMut, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use turn_config::relay::{
    ClientAddr, ClientOutcome, Command, PEER_HEADROOM, PEER_TAILROOM, Relay, RelayConfig, RelayStats, Transport,
};
use turn_config::stun;

const UDP_LISTENER: Token = Token(0);
const TCP_LISTENER: Token = Token(1);
const TLS_LISTENER: Token = Token(2);
const WAKER: Token = Token(3);
/// Relay sockets: `RELAY_BASE + port`.
const RELAY_BASE: usize = 1 << 20;
/// TCP/TLS connections: `CONN_BASE + slot`.
const CONN_BASE: usize = 1 << 24;
/// Largest UDP datagram.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams per `recvmmsg` / `sendmmsg`.
const BATCH: usize = 32;
/// One datagram's room in the arena: head room, the datagram, tail room.
const SLOT: usize = PEER_HEADROOM + MAX_DATAGRAM + PEER_TAILROOM;
/// Slots in the arena (4 MiB): datagrams waiting for the end-of-wake `sendmmsg`.
const ARENA_SLOTS: usize = 64;
/// A TCP frame is at most a STUN header plus a 64 KiB body.
const STREAM_BUFFER: usize = 20 + 65_535 + 4;
/// Bytes queued for a slow TCP client before its frames are dropped.
pub const MAX_TCP_QUEUE: usize = 1 << 20;
/// How often the counters are copied out for `/metrics`.
const STATS_INTERVAL: Duration = Duration::from_millis(250);
/// How many ports are tried for a relay socket before answering 508.
const BIND_ATTEMPTS: usize = 256;

/// What the driver needs besides the core's settings.
#[derive(Debug)]
pub struct TurnSettings {
    /// UDP and TCP listen here (port 0: a free port, the same for both).
    pub listen: SocketAddr,
    /// TLS (`turns:`) listens here when a certificate is configured.
    pub tls: Option<(SocketAddr, Arc<rustls::ServerConfig>)>,
    /// Relay sockets bind to this IP.
    pub relay_ip: IpAddr,
    /// The IP put in XOR-RELAYED-ADDRESS (public IP behind NAT); default the relay IP.
    pub external_ip: Option<IpAddr>,
    /// Relay ports: `min-port`..=`max-port`.
    pub ports: (u16, u16),
    /// Other service addresses of this process peers may not reach (the HTTP API).
    pub services: Vec<SocketAddr>,
    pub relay: RelayConfig,
}

/// Counters of the relay and its driver.
#[derive(Debug, Clone, Default)]
pub struct TurnStats {
    pub relay: RelayStats,
    /// Datagrams the kernel would not take (send buffer full or an error).
    pub send_failures: u64,
    /// Frames dropped for TCP clients too slow to take them.
    pub tcp_queue_drops: u64,
    /// Open TCP/TLS connections.
    pub connections: u64,
    /// Packets from one of our allocations to another, handed over without the kernel.
    pub local_relays: u64,
    /// Datagrams or frames dropped because the relay core panicked on them
    /// (a bug; see [`contained`]).
    pub panics: u64,
}

/// The running relay: its addresses and counters; dropping it stops the thread.
#[derive(Debug)]
pub struct TurnHandle {
    pub udp_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    stats: Arc<Mutex<TurnStats>>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TurnHandle {
    /// The counters as of at most [`STATS_INTERVAL`] ago.
    pub fn stats(&self) -> TurnStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for TurnHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds the UDP and TCP listeners on one port.
fn bind_listeners(listen: SocketAddr) -> Result<(std::net::UdpSocket, std::net::TcpListener)> {
    // Port 0: the UDP socket picks, TCP follows; retry if that port is taken for TCP.
    for _ in 0..16 {
        let udp =
            std::net::UdpSocket::bind(listen).with_context(|| format!("binding the TURN UDP listener to {listen}"))?;
        let port = udp.local_addr()?.port();
        match std::net::TcpListener::bind(SocketAddr::new(listen.ip(), port)) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if listen.port() == 0 && e.kind() == ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e).with_context(|| format!("binding the TURN TCP listener to {listen}")),
        }
    }
    anyhow::bail!("no port free for both UDP and TCP on {}", listen.ip())
}

/// Binds the sockets and starts the relay thread.
pub fn spawn(mut settings: TurnSettings) -> Result<TurnHandle> {
    let (udp, tcp) = bind_listeners(settings.listen)?;
    let tls = match &settings.tls {
        Some((addr, config)) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the TURN TLS listener to {addr}"))?;
            Some((listener, config.clone()))
        }
        None => None,
    };
    let udp_addr = udp.local_addr()?;
    let tcp_addr = tcp.local_addr()?;
    let tls_addr = tls.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
    anyhow::ensure!(
        settings.ports.0 <= settings.ports.1,
        "turn.min_port is above turn.max_port"
    );
    let policy = &mut settings.relay.policy;
    policy.add_service(udp_addr);
    policy.add_service(tcp_addr);
    if let Some(addr) = tls_addr {
        policy.add_service(addr);
    }
    for service in &settings.services {
        policy.add_service(*service);
    }
    policy.add_own_ip(settings.relay_ip);
    if let Some(ip) = settings.external_ip {
        policy.add_own_ip(ip);
    }
    super::bigger_buffers(&udp);
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let mut udp = UdpSocket::from_std(udp);
    let mut tcp = TcpListener::from_std(tcp);
    poll.registry().register(&mut udp, UDP_LISTENER, Interest::READABLE)?;
    poll.registry().register(&mut tcp, TCP_LISTENER, Interest::READABLE)?;
    let tls = match tls {
        Some((listener, config)) => {
            listener.set_nonblocking(true)?;
            let mut listener = TcpListener::from_std(listener);
            poll.registry()
                .register(&mut listener, TLS_LISTENER, Interest::READABLE)?;
            Some((listener, config))
        }
        None => None,
    };
    let stats = Arc::new(Mutex::new(TurnStats::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let now = Instant::now();
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let relay = Relay::new(settings.relay, now, unix);
    let (relay_ip, external_ip, ports) = (
        settings.relay_ip,
        settings.external_ip.unwrap_or(settings.relay_ip),
        settings.ports,
    );
    let (shared_stats, stop_flag) = (stats.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name(format!("turn-{}", udp_addr.port()))
        .spawn(move || {
            // Built here: the arena's syscall headers stay on this thread.
            let mut driver = Driver {
                relay,
                poll,
                udp,
                tcp,
                tls,
                relays: (0..=u16::MAX).map(|_| None).collect(),
                conns: Vec::new(),
                free_slots: Vec::new(),
                conn_by_addr: HashMap::new(),
                relay_ip,
                external_ip,
                ports,
                port_cursor: (unix as u16).wrapping_mul(7919),
                arena: Arena::new(),
                dirty_conns: Vec::with_capacity(64),
                stream_deliveries: Vec::with_capacity(ARENA_SLOTS),
                stats: TurnStats::default(),
                shared_stats,
                stop: stop_flag,
            };
            if let Err(e) = driver.run() {
                tracing::error!(error = %e, "the TURN relay stopped");
            }
        })?;
    Ok(TurnHandle {
        udp_addr,
        tcp_addr,
        tls_addr,
        stats,
        stop,
        waker,
        thread: Some(thread),
    })
}

/// A TCP or TLS client connection.
struct Conn {
    stream: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    client: ClientAddr,
    /// Received bytes not yet framed: `inbuf[..filled]`.
    inbuf: Vec<u8>,
    filled: usize,
    /// Bytes waiting for the socket (plain TCP).
    outbuf: Vec<u8>,
    /// Plaintext handed to rustls since its output last drained (TLS).
    tls_pending: usize,
    /// Queued output waits for the end-of-wake flush.
    dirty: bool,
    closed: bool,
}

impl Conn {
    /// Queues a frame for the client; the driver writes every queue once per
    /// wake ([`Driver::flush_conns`]). Returns whether the connection just
    /// became dirty (the caller notes it for that flush).
    fn send(&mut self, frame: &[u8], queue_drops: &mut u64) -> bool {
        if self.closed {
            return false;
        }
        match &mut self.tls {
            Some(tls) => {
                if self.tls_pending + frame.len() > MAX_TCP_QUEUE {
                    *queue_drops += 1;
                    return false;
                }
                if tls.writer().write_all(frame).is_err() {
                    self.closed = true;
                    return false;
                }
                self.tls_pending += frame.len();
            }
            None => {
                if self.outbuf.len() + frame.len() > MAX_TCP_QUEUE {
                    *queue_drops += 1;
                    return false;
                }
                self.outbuf.extend_from_slice(frame);
            }
        }
        !std::mem::replace(&mut self.dirty, true)
    }

    /// Writes queued bytes until the socket would block.
    fn flush(&mut self) {
        match &mut self.tls {
            Some(tls) => {
                while tls.wants_write() {
                    match tls.write_tls(&mut self.stream) {
                        Ok(0) => {
                            self.closed = true;
                            return;
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                        Err(_) => {
                            self.closed = true;
                            return;
                        }
                    }
                }
                self.tls_pending = 0;
            }
            None => {
                while !self.outbuf.is_empty() {
                    match self.stream.write(&self.outbuf) {
                        Ok(0) => {
                            self.closed = true;
                            return;
                        }
                        Ok(n) => {
                            self.outbuf.drain(..n);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                        Err(_) => {
                            self.closed = true;
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Reads what the socket has into `inbuf` (decrypting TLS).
    fn fill(&mut self) {
        loop {
            if self.filled == self.inbuf.len() {
                // A frame longer than any valid one: the stream is not TURN.
                self.closed = true;
                return;
            }
            let read = match &mut self.tls {
                None => self.stream.read(&mut self.inbuf[self.filled..]),
                Some(tls) => {
                    // Plaintext already decrypted comes first.
                    match tls.reader().read(&mut self.inbuf[self.filled..]) {
                        Ok(0) => {
                            self.closed = true;
                            return;
                        }
                        Ok(n) => Ok(n),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => match tls.read_tls(&mut self.stream) {
                            Ok(0) => Ok(0),
                            Ok(_) => {
                                if tls.process_new_packets().is_err() {
                                    // Send the alert, then close.
                                    let _ = tls.write_tls(&mut self.stream);
                                    self.closed = true;
                                    return;
                                }
                                continue;
                            }
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    }
                }
            };
            match read {
                Ok(0) => {
                    self.closed = true;
                    return;
                }
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }
}

struct Driver {
    relay: Relay,
    poll: Poll,
    udp: UdpSocket,
    tcp: TcpListener,
    tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    /// Relay sockets by port.
    relays: Vec<Option<UdpSocket>>,
    conns: Vec<Option<Conn>>,
    free_slots: Vec<usize>,
    conn_by_addr: HashMap<SocketAddr, usize>,
    relay_ip: IpAddr,
    external_ip: IpAddr,
    ports: (u16, u16),
    port_cursor: u16,
    /// Datagram slots, with head and tail room for relayed data.
    arena: Arena,
    /// Connections with output queued since the last flush.
    dirty_conns: Vec<usize>,
    /// Frames from stream clients for other stream clients, relayed in-process:
    /// `(arena slot, range, client)`, delivered once the stream buffer is released.
    stream_deliveries: Vec<(usize, Range<usize>, SocketAddr)>,
    stats: TurnStats,
    shared_stats: Arc<Mutex<TurnStats>>,
    stop: Arc<AtomicBool>,
}

impl Driver {
    fn run(&mut self) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_stats = Instant::now();
        loop {
            let now = Instant::now();
            let wake = self.relay.poll_timeout().map_or(next_stats, |t| t.min(next_stats));
            let timeout = wake.saturating_duration_since(now);
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("polling the TURN sockets"),
            }
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let now = Instant::now();
            for event in &events {
                match event.token() {
                    UDP_LISTENER => self.read_clients_udp(now),
                    TCP_LISTENER => self.accept(now, false),
                    TLS_LISTENER => self.accept(now, true),
                    WAKER => {}
                    Token(t) if (RELAY_BASE..CONN_BASE).contains(&t) => {
                        self.read_peers(now, (t - RELAY_BASE) as u16);
                    }
                    Token(t) if t >= CONN_BASE => self.conn_ready(now, t - CONN_BASE),
                    Token(_) => {}
                }
            }
            self.relay.handle_timeout(now);
            self.run_control(now);
            self.flush_to_clients();
            self.flush_conns();
            if now >= next_stats {
                next_stats = now + STATS_INTERVAL;
                self.stats.relay = self.relay.stats().clone();
                self.stats.connections = self.conn_by_addr.len() as u64;
                if let Ok(mut shared) = self.shared_stats.lock() {
                    *shared = self.stats.clone();
                }
            }
        }
    }

    /// Datagrams from clients on the UDP listener, a batch per `recvmmsg`.
    fn read_clients_udp(&mut self, now: Instant) {
        loop {
            if ARENA_SLOTS - self.arena.used < BATCH {
                self.flush_to_clients();
            }
            let first = self.arena.used;
            let received = match self.arena.receive(&self.udp, first) {
                Ok(received) => received,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // ICMP errors surface here on Linux; they concern one client only.
                Err(_) => continue,
            };
            for i in 0..received {
                let (len, from) = self.arena.meta[i];
                let Some(from) = from else { continue };
                let client = ClientAddr {
                    transport: Transport::Udp,
                    addr: from,
                };
                let slot = first + i;
                let packet = self.arena.payload(slot, len);
                let relay = &mut self.relay;
                if let Some(ClientOutcome::Forward {
                    relay_port,
                    peer,
                    payload,
                }) = contained(&mut self.stats.panics, || {
                    Some(relay.handle_client_packet(now, client, packet))
                }) {
                    match self.relay.local_relay(peer) {
                        None => send_datagram(&self.relays, relay_port, &packet[payload], peer, &mut self.stats),
                        Some(local_port) => {
                            let payload = PEER_HEADROOM + payload.start..PEER_HEADROOM + payload.end;
                            self.relay_locally(now, relay_port, local_port, slot, payload);
                        }
                    }
                }
                self.run_control(now);
            }
            if received < BATCH {
                // A short batch: the socket was empty; a later datagram is a new edge.
                return;
            }
        }
    }

    /// Datagrams from peers on one relay socket. What goes to UDP clients is
    /// left in the arena and sent in one `sendmmsg` per wake (or when full).
    fn read_peers(&mut self, now: Instant, port: u16) {
        loop {
            if ARENA_SLOTS - self.arena.used < BATCH {
                self.flush_to_clients();
            }
            let Some(socket) = &self.relays[usize::from(port)] else {
                return;
            };
            let first = self.arena.used;
            let received = match self.arena.receive(socket, first) {
                Ok(received) => received,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => continue,
            };
            for i in 0..received {
                let (len, from) = self.arena.meta[i];
                let Some(from) = from else { continue };
                let slot = first + i;
                let payload = PEER_HEADROOM..PEER_HEADROOM + len;
                let (relay, datagram) = (&mut self.relay, self.arena.slot_mut(slot));
                let Some((client, range)) = contained(&mut self.stats.panics, || {
                    relay.handle_peer_packet(now, port, from, datagram, payload)
                }) else {
                    continue;
                };
                self.deliver(client, slot, range);
            }
            if received < BATCH {
                return;
            }
        }
    }

    /// A packet from one of our allocations to another: the second
    /// allocation receives it as if from the first one's relayed address.
    fn relay_locally(&mut self, now: Instant, from_port: u16, to_port: u16, slot: usize, payload: Range<usize>) {
        let Some(from) = self.relay.relayed_address(from_port) else {
            return;
        };
        self.stats.local_relays += 1;
        if let Some((client, range)) =
            self.relay
                .handle_peer_packet(now, to_port, from, self.arena.slot_mut(slot), payload)
        {
            self.deliver(client, slot, range);
        }
    }

    /// Sends `range` of arena slot `slot` to a client: UDP ones at the flush,
    /// TCP/TLS ones now.
    fn deliver(&mut self, client: ClientAddr, slot: usize, range: Range<usize>) {
        match client.transport {
            Transport::Udp => {
                // Keep the slot until the flush.
                self.arena.pending.push((slot, range, client.addr));
                self.arena.used = self.arena.used.max(slot + 1);
            }
            Transport::Tcp | Transport::Tls => {
                self.send_to_stream(client.addr, slot, range);
            }
        }
    }

    /// Sends what is pending for UDP clients, in `sendmmsg` batches.
    fn flush_to_clients(&mut self) {
        let failed = self.arena.flush(&self.udp);
        self.stats.send_failures += failed;
    }

    fn accept(&mut self, now: Instant, tls: bool) {
        loop {
            let listener = match (&self.tls, tls) {
                (Some((listener, _)), true) => listener,
                (_, false) => &self.tcp,
                (None, true) => return,
            };
            let (mut stream, addr) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!(error = %e, "TURN accept failed");
                    return;
                }
            };
            let session = match (&self.tls, tls) {
                (Some((_, config)), true) => match rustls::ServerConnection::new(config.clone()) {
                    Ok(session) => Some(Box::new(session)),
                    Err(_) => continue,
                },
                _ => None,
            };
            let _ = stream.set_nodelay(true);
            let slot = self.free_slots.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            if self
                .poll
                .registry()
                .register(
                    &mut stream,
                    Token(CONN_BASE + slot),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                self.free_slots.push(slot);
                continue;
            }
            let client = ClientAddr {
                transport: if tls { Transport::Tls } else { Transport::Tcp },
                addr,
            };
            self.conns[slot] = Some(Conn {
                stream,
                tls: session,
                client,
                inbuf: vec![0u8; STREAM_BUFFER],
                filled: 0,
                outbuf: Vec::new(),
                tls_pending: 0,
                dirty: false,
                closed: false,
            });
            self.conn_by_addr.insert(addr, slot);
            // Data may have arrived with the connection.
            self.conn_ready(now, slot);
        }
    }

    fn conn_ready(&mut self, now: Instant, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        conn.flush();
        conn.fill();
        let client = conn.client;
        let mut at = 0;
        while at < conn.filled {
            if stun::kind(&conn.inbuf[at..conn.filled]) == stun::Kind::Other {
                // Not TURN framing: the stream cannot be resynchronised.
                conn.closed = true;
                break;
            }
            let Some(len) = stun::stream_frame_len(&conn.inbuf[at..conn.filled]) else {
                break;
            };
            if at + len > conn.filled {
                break;
            }
            let frame = &conn.inbuf[at..at + len];
            let relay = &mut self.relay;
            if let Some(ClientOutcome::Forward {
                relay_port,
                peer,
                payload,
            }) = contained(&mut self.stats.panics, || {
                Some(relay.handle_client_packet(now, client, frame))
            }) {
                let local = self.relay.local_relay(peer);
                let from = self.relay.relayed_address(relay_port);
                match (local, from) {
                    // To another of our allocations, in-process (while the arena
                    // has a free slot). The stream buffer has no head room: copy.
                    (Some(local_port), Some(from)) if self.arena.used < ARENA_SLOTS => {
                        let arena_slot = self.arena.used;
                        let body = &frame[payload];
                        let room = PEER_HEADROOM..PEER_HEADROOM + body.len();
                        self.arena.slot_mut(arena_slot)[room.clone()].copy_from_slice(body);
                        self.stats.local_relays += 1;
                        if let Some((to, range)) =
                            self.relay
                                .handle_peer_packet(now, local_port, from, self.arena.slot_mut(arena_slot), room)
                        {
                            self.arena.used = arena_slot + 1;
                            match to.transport {
                                Transport::Udp => self.arena.pending.push((arena_slot, range, to.addr)),
                                Transport::Tcp | Transport::Tls => {
                                    self.stream_deliveries.push((arena_slot, range, to.addr));
                                }
                            }
                        }
                    }
                    _ => send_datagram(&self.relays, relay_port, &frame[payload], peer, &mut self.stats),
                }
            }
            at += len;
        }
        conn.inbuf.copy_within(at..conn.filled, 0);
        conn.filled -= at;
        // TLS: the handshake may want the socket now.
        conn.flush();
        let closed = conn.closed;
        let mut deliveries = std::mem::take(&mut self.stream_deliveries);
        for (arena_slot, range, addr) in deliveries.drain(..) {
            self.send_to_stream(addr, arena_slot, range);
        }
        self.stream_deliveries = deliveries;
        self.run_control(now);
        if closed {
            self.close_conn(slot);
        }
    }

    /// Queues `range` of arena slot `slot` for the stream client at `addr`.
    fn send_to_stream(&mut self, addr: SocketAddr, slot: usize, range: Range<usize>) {
        if let Some(index) = self.conn_by_addr.get(&addr).copied()
            && let Some(conn) = self.conns[index].as_mut()
            && conn.send(&self.arena.slot_mut(slot)[range], &mut self.stats.tcp_queue_drops)
        {
            self.dirty_conns.push(index);
        }
    }

    /// Writes what each dirty connection has queued: one write (or a few TLS
    /// records) per connection per wake instead of one per frame.
    fn flush_conns(&mut self) {
        while let Some(index) = self.dirty_conns.pop() {
            let Some(conn) = self.conns.get_mut(index).and_then(Option::as_mut) else {
                continue;
            };
            conn.dirty = false;
            conn.flush();
            if conn.closed {
                self.close_conn(index);
            }
        }
    }

    fn close_conn(&mut self, slot: usize) {
        let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.conn_by_addr.remove(&conn.client.addr);
        self.free_slots.push(slot);
        self.relay.handle_client_closed(conn.client);
        // The release commands run on the next control pass.
    }

    /// Socket work and responses the core asked for.
    fn run_control(&mut self, now: Instant) {
        loop {
            let mut idle = true;
            while let Some(command) = self.relay.poll_command() {
                idle = false;
                match command {
                    Command::BindRelay {
                        allocation,
                        even_port,
                        reserve_next,
                        ..
                    } => {
                        let relayed = self.bind_relay(even_port, reserve_next);
                        if let Some((_, Some(reserved))) = relayed {
                            self.relay.handle_relay_reserved(allocation, reserved);
                        }
                        self.relay
                            .handle_relay_bound(now, allocation, relayed.map(|(addr, _)| addr));
                    }
                    Command::ReleaseRelay { relay_port, .. } => self.release_port(relay_port),
                }
            }
            while let Some(transmit) = self.relay.poll_transmit() {
                idle = false;
                match transmit.to.transport {
                    Transport::Udp => {
                        if self.udp.send_to(&transmit.contents, transmit.to.addr).is_err() {
                            self.stats.send_failures += 1;
                        }
                    }
                    Transport::Tcp | Transport::Tls => {
                        if let Some(slot) = self.conn_by_addr.get(&transmit.to.addr).copied()
                            && let Some(conn) = self.conns[slot].as_mut()
                            && conn.send(&transmit.contents, &mut self.stats.tcp_queue_drops)
                        {
                            self.dirty_conns.push(slot);
                        }
                    }
                }
            }
            if idle {
                return;
            }
        }
    }

    /// Binds a relay socket on a free port of the range (even when asked;
    /// with `reserve_next` also the port after it); returns the addresses
    /// to advertise.
    fn bind_relay(&mut self, even_port: bool, reserve_next: bool) -> Option<(SocketAddr, Option<SocketAddr>)> {
        let (min, max) = self.ports;
        let span = u32::from(max - min) + 1;
        let even_port = even_port || reserve_next;
        for _ in 0..BIND_ATTEMPTS.min(span as usize) {
            self.port_cursor = self.port_cursor.wrapping_add(1);
            let mut port = min + (u32::from(self.port_cursor) % span) as u16;
            if even_port && port % 2 == 1 {
                if port == max {
                    continue;
                }
                port += 1;
            }
            if reserve_next && port == max {
                continue;
            }
            let Some(socket) = self.bind_port(port) else {
                continue;
            };
            let next = if reserve_next {
                match self.bind_port(port + 1) {
                    Some(next) => Some(next),
                    None => continue, // `socket` is dropped: the pair was not free.
                }
            } else {
                None
            };
            let mut register = |socket: UdpSocket, port: u16| -> bool {
                let mut socket = socket;
                let ok = self
                    .poll
                    .registry()
                    .register(&mut socket, Token(RELAY_BASE + usize::from(port)), Interest::READABLE)
                    .is_ok();
                if ok {
                    self.relays[usize::from(port)] = Some(socket);
                }
                ok
            };
            if !register(socket, port) {
                continue;
            }
            let reserved = match next {
                Some(next) => {
                    if !register(next, port + 1) {
                        self.release_port(port);
                        continue;
                    }
                    Some(SocketAddr::new(self.external_ip, port + 1))
                }
                None => None,
            };
            return Some((SocketAddr::new(self.external_ip, port), reserved));
        }
        tracing::warn!("no free relay port in turn.min_port..=turn.max_port");
        None
    }

    /// A nonblocking UDP socket on `port` of the relay IP, if that port is free.
    fn bind_port(&self, port: u16) -> Option<UdpSocket> {
        if self.relays[usize::from(port)].is_some() {
            return None;
        }
        let socket = std::net::UdpSocket::bind(SocketAddr::new(self.relay_ip, port)).ok()?;
        super::bigger_buffers(&socket);
        socket.set_nonblocking(true).ok()?;
        Some(UdpSocket::from_std(socket))
    }

    fn release_port(&mut self, port: u16) {
        if let Some(mut socket) = self.relays[usize::from(port)].take() {
            let _ = self.poll.registry().deregister(&mut socket);
        }
    }
}

/// Receive slots and the datagrams waiting in them for UDP clients.
struct Arena {
    bytes: Vec<u8>,
    /// Slots `..used` hold pending datagrams.
    used: usize,
    /// `(slot, range in the slot, client)`, sent by `flush`.
    pending: Vec<(usize, Range<usize>, SocketAddr)>,
    /// Length and source of each datagram of the last `receive`.
    meta: [(usize, Option<SocketAddr>); BATCH],
    recv_headers: MultiHeaders<SockaddrStorage>,
    send_headers: MultiHeaders<SockaddrStorage>,
}

impl Arena {
    fn new() -> Self {
        Self {
            bytes: vec![0u8; SLOT * ARENA_SLOTS],
            used: 0,
            pending: Vec::with_capacity(ARENA_SLOTS),
            meta: [(0, None); BATCH],
            recv_headers: MultiHeaders::preallocate(BATCH, None),
            send_headers: MultiHeaders::preallocate(BATCH, None),
        }
    }

    fn slot_mut(&mut self, slot: usize) -> &mut [u8] {
        &mut self.bytes[slot * SLOT..(slot + 1) * SLOT]
    }

    fn payload(&self, slot: usize, len: usize) -> &[u8] {
        &self.bytes[slot * SLOT + PEER_HEADROOM..slot * SLOT + PEER_HEADROOM + len]
    }

    /// One `recvmmsg` into slots `first..first + BATCH` (after their head
    /// room); fills `meta` and returns how many datagrams came.
    fn receive(&mut self, socket: &UdpSocket, first: usize) -> std::io::Result<usize> {
        let region = &mut self.bytes[first * SLOT..(first + BATCH) * SLOT];
        let mut chunks = region.chunks_mut(SLOT);
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] = std::array::from_fn(|_| {
            let chunk = chunks
                .next()
                .map_or(&mut [][..], |c| &mut c[PEER_HEADROOM..PEER_HEADROOM + MAX_DATAGRAM]);
            [IoSliceMut::new(chunk)]
        });
        let results = recvmmsg(
            socket.as_raw_fd(),
            &mut self.recv_headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(std::io::Error::from)?;
        let mut count = 0;
        for (i, message) in results.enumerate() {
            self.meta[i] = (message.bytes, message.address.and_then(super::udp::to_socket_addr));
            count = i + 1;
        }
        Ok(count)
    }

    /// Sends the pending datagrams through `socket`; returns how many failed.
    fn flush(&mut self, socket: &UdpSocket) -> u64 {
        let mut failed = 0;
        let mut at = 0;
        while at < self.pending.len() {
            let batch = &self.pending[at..self.pending.len().min(at + BATCH)];
            let bytes = &self.bytes;
            // On the stack: nothing is allocated per flush.
            let iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|i| {
                [IoSlice::new(batch.get(i).map_or(&[][..], |(slot, range, _)| {
                    &bytes[slot * SLOT..(slot + 1) * SLOT][range.clone()]
                }))]
            });
            let addrs: [Option<SockaddrStorage>; BATCH] =
                std::array::from_fn(|i| batch.get(i).map(|(_, _, addr)| SockaddrStorage::from(*addr)));
            let no_control: [ControlMessage<'_>; 0] = [];
            match sendmmsg(
                socket.as_raw_fd(),
                &mut self.send_headers,
                iovs[..batch.len()].iter(),
                &addrs[..batch.len()],
                no_control,
                MsgFlags::MSG_DONTWAIT,
            ) {
                // The first `n` went; retry from the next (it may be the one that failed).
                Ok(results) => {
                    let sent = results.count();
                    if sent == 0 {
                        failed += 1;
                        at += 1;
                    } else {
                        at += sent;
                    }
                }
                Err(_) => {
                    // The first datagram of the batch failed: skip it.
                    failed += 1;
                    at += 1;
                }
            }
        }
        self.pending.clear();
        self.used = 0;
        failed
    }
}

/// Runs the relay core on what a client or a peer sent. A panic in there is a
/// bug that this input reached: it costs that datagram or frame (counted and
/// logged), not the relay thread with every allocation on it. The core is
/// fuzzed (`fuzz/fuzz_targets/turn_relay.rs`); this is the second line.
fn contained<T>(panics: &mut u64, f: impl FnOnce() -> Option<T>) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(outcome) => outcome,
        Err(_) => {
            *panics += 1;
            tracing::error!("the TURN relay core panicked on a client's or peer's input; dropped it");
            None
        }
    }
}

fn send_datagram(relays: &[Option<UdpSocket>], relay_port: u16, bytes: &[u8], peer: SocketAddr, stats: &mut TurnStats) {
    match relays.get(usize::from(relay_port)).and_then(Option::as_ref) {
        Some(socket) => {
            if socket.send_to(bytes, peer).is_err() {
                stats.send_failures += 1;
            }
        }
        None => stats.send_failures += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::contained;

    #[test]
    fn a_panic_in_the_core_costs_the_input_alone() {
        let mut panics = 0;
        assert_eq!(contained(&mut panics, || Some(7)), Some(7));
        assert_eq!(contained::<()>(&mut panics, || panic!("a bug in the core")), None);
        assert_eq!(contained(&mut panics, || Some(8)), Some(8), "and it goes on");
        assert_eq!(panics, 1);
    }
}
