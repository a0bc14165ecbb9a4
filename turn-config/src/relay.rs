//! The sans-IO TURN relay core (RFC 8656, with RFC 5766's semantics).
//!
//! [`Relay`] owns every allocation, permission and channel of one relay. It
//! never touches a socket or a clock; the driver passes `now` in and moves
//! bytes:
//!
//! - `handle_client_packet(now, client, bytes)`: a datagram (or a framed TCP
//!   message) from a client. STUN requests are answered through
//!   [`Relay::poll_transmit`]; ChannelData and Send indications come back as
//!   [`ClientOutcome::Forward`]: "send `bytes[payload]` from the relay socket
//!   on port `relay_port` to `peer`", a range of the input, not a copy.
//! - `handle_peer_packet(now, relay_port, peer, buf, payload)`: a datagram that
//!   arrived on a relay socket, read by the driver into `buf[payload]` with
//!   [`PEER_HEADROOM`] bytes free in front and 4 behind. The core writes the
//!   ChannelData or Data-indication header in front of it, in place, and
//!   returns which client gets which range.
//! - `poll_command()`: the driver binds a relay socket ([`Command::BindRelay`],
//!   answered with `handle_relay_bound`) or closes one ([`Command::ReleaseRelay`]).
//! - `poll_timeout()` / `handle_timeout(now)`: lifetimes of allocations,
//!   permissions and channels.
//!
//! Relaying a packet allocates nothing: lookups are by client address (a hash
//! map) and by relay port, permissions and channels are short vectors.
//! Authentication is the long-term credential mechanism (RFC 8489 §9.2) with
//! TURN REST usernames ([`crate::rest`]); nonces are stateless (an expiry and
//! an HMAC of it under a key of this process), so a stale one earns 438.
//! Nothing a peer sends can panic the core: malformed input is a counted
//! [`DropReason`] or a STUN error ([`Refusal`]).

use crate::policy::{PeerPolicy, canonical};
use crate::rest::{SharedSecret, long_term_key};
use crate::stun::{
    self, Class, Kind, Message, MessageWriter, ParseError, TransactionId, attr, method, write_channel_data_header,
    write_data_indication_header,
};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

/// Maps on the per-packet path: a fast hash, randomly seeded per process
/// (peers choose the keys).
type HashMap<K, V> = foldhash::HashMap<K, V>;

/// Bytes the driver leaves free in front of a peer's payload: room for the
/// longest header the core writes there (a Data indication to an IPv6 peer).
pub const PEER_HEADROOM: usize = stun::MAX_DATA_INDICATION_HEADER_LEN;
/// Bytes the driver leaves free after a peer's payload (padding).
pub const PEER_TAILROOM: usize = 4;
/// RFC 8656 §3: a permission lasts 300 s unless refreshed.
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// RFC 8656 §3: a channel binding lasts 600 s unless refreshed.
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// How often lifetimes are checked.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Permissions one allocation may hold.
const MAX_PERMISSIONS: usize = 64;
/// Channels one allocation may bind.
const MAX_CHANNELS: usize = 64;
/// RFC 8656 §7.2: how long a reserved port waits for its RESERVATION-TOKEN.
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// RFC 8656 §18.8: REQUESTED-TRANSPORT value for UDP.
const PROTOCOL_UDP: u8 = 17;

/// The transport between a client and the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// A client's end of the 5-tuple: the transport and its address. Over TCP
/// each connection has its own address, so it names the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr {
    pub transport: Transport,
    pub addr: SocketAddr,
}

/// An allocation's id, unique for the life of a [`Relay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationId(pub u64);

/// The address family of a relay socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// What the driver must do with sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Bind a UDP relay socket (an even port when asked), then call
    /// [`Relay::handle_relay_bound`] with its address or `None`. With
    /// `reserve_next`, also bind the next port and report it first with
    /// [`Relay::handle_relay_reserved`] (EVEN-PORT's R bit, RFC 8656 §7.2).
    BindRelay {
        allocation: AllocationId,
        family: Family,
        even_port: bool,
        reserve_next: bool,
    },
    /// Close the relay socket on this port.
    ReleaseRelay { allocation: AllocationId, relay_port: u16 },
}

/// A control message for a client (responses; never relayed data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: ClientAddr,
    pub contents: Vec<u8>,
}

/// What became of a client's packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOutcome {
    /// Consumed (answered through `poll_transmit`, or dropped and counted).
    Handled,
    /// Send `input[payload]` from the relay socket on `relay_port` to `peer`.
    Forward {
        relay_port: u16,
        peer: SocketAddr,
        payload: Range<usize>,
    },
}

/// A STUN error the relay answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    Unauthorized,
    Forbidden,
    UnknownAttribute,
    AllocationMismatch,
    StaleNonce,
    AddressFamilyNotSupported,
    WrongCredentials,
    UnsupportedTransport,
    PeerAddressFamilyMismatch,
    AllocationQuotaReached,
    InsufficientCapacity,
}

impl Refusal {
    pub const ALL: [Refusal; 12] = [
        Refusal::BadRequest,
        Refusal::Unauthorized,
        Refusal::Forbidden,
        Refusal::UnknownAttribute,
        Refusal::AllocationMismatch,
        Refusal::StaleNonce,
        Refusal::AddressFamilyNotSupported,
        Refusal::WrongCredentials,
        Refusal::UnsupportedTransport,
        Refusal::PeerAddressFamilyMismatch,
        Refusal::AllocationQuotaReached,
        Refusal::InsufficientCapacity,
    ];

    /// The STUN error code (RFC 8489 §14.8, RFC 8656 §19).
    pub fn code(self) -> u16 {
        match self {
            Refusal::BadRequest => 400,
            Refusal::Unauthorized => 401,
            Refusal::Forbidden => 403,
            Refusal::UnknownAttribute => 420,
            Refusal::AllocationMismatch => 437,
            Refusal::StaleNonce => 438,
            Refusal::AddressFamilyNotSupported => 440,
            Refusal::WrongCredentials => 441,
            Refusal::UnsupportedTransport => 442,
            Refusal::PeerAddressFamilyMismatch => 443,
            Refusal::AllocationQuotaReached => 486,
            Refusal::InsufficientCapacity => 508,
        }
    }

    /// The reason phrase, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Forbidden => "forbidden",
            Refusal::UnknownAttribute => "unknown_attribute",
            Refusal::AllocationMismatch => "allocation_mismatch",
            Refusal::StaleNonce => "stale_nonce",
            Refusal::AddressFamilyNotSupported => "address_family_not_supported",
            Refusal::WrongCredentials => "wrong_credentials",
            Refusal::UnsupportedTransport => "unsupported_transport",
            Refusal::PeerAddressFamilyMismatch => "peer_address_family_mismatch",
            Refusal::AllocationQuotaReached => "allocation_quota_reached",
            Refusal::InsufficientCapacity => "insufficient_capacity",
        }
    }
}

/// Why a packet was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not STUN or ChannelData, or a malformed/truncated one.
    Malformed,
    /// From a client without an allocation, or to a relay port without one.
    NoAllocation,
    /// ChannelData on a channel that is not bound.
    UnboundChannel,
    /// To or from a peer without a permission.
    NoPermission,
    /// Over the allocation's bandwidth cap.
    BandwidthExceeded,
    /// A STUN response or indication the relay has no use for.
    Unexpected,
    /// The driver's buffer had no room for the header.
    NoRoom,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::NoAllocation,
        DropReason::UnboundChannel,
        DropReason::NoPermission,
        DropReason::BandwidthExceeded,
        DropReason::Unexpected,
        DropReason::NoRoom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NoAllocation => "no_allocation",
            DropReason::UnboundChannel => "unbound_channel",
            DropReason::NoPermission => "no_permission",
            DropReason::BandwidthExceeded => "bandwidth_exceeded",
            DropReason::Unexpected => "unexpected",
            DropReason::NoRoom => "no_room",
        }
    }
}

/// Counters of one relay, read by the driver for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Allocations now (gauge).
    pub allocations: u64,
    /// Allocations ever created.
    pub allocations_total: u64,
    /// Channels bound now (gauge).
    pub channels: u64,
    pub packets_to_peers: u64,
    pub bytes_to_peers: u64,
    pub packets_to_clients: u64,
    pub bytes_to_clients: u64,
    /// STUN Binding requests answered.
    pub binding_requests: u64,
    refusals: [u64; Refusal::ALL.len()],
    drops: [u64; DropReason::ALL.len()],
}

impl RelayStats {
    pub fn refusals(&self, refusal: Refusal) -> u64 {
        self.refusals[refusal as usize]
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }
}

/// Settings of a relay (coturn's option names in brackets).
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// `realm`.
    pub realm: String,
    /// `static-auth-secret`: the TURN REST shared secret.
    pub secret: SharedSecret,
    /// `denied-peer-ip`, `allowed-peer-ip`, `allow-loopback-peers`.
    pub policy: PeerPolicy,
    /// `user-quota`: allocations per user at once (0: no limit).
    pub user_quota: u32,
    /// `total-quota`: allocations at once (0: no limit).
    pub total_quota: u32,
    /// `max-bps`: bytes per second per allocation, both directions (0: no limit).
    pub max_bps: u64,
    /// Allocation lifetime when the client asks for less or nothing (600 s).
    pub default_lifetime: Duration,
    /// `max-allocate-lifetime`.
    pub max_lifetime: Duration,
    /// `stale-nonce`: how long a nonce is good for.
    pub nonce_lifetime: Duration,
    /// Whether the driver can bind IPv6 relay sockets.
    pub ipv6_relay: bool,
    /// Keys the nonces; random per process.
    pub nonce_key: [u8; 32],
}

impl RelayConfig {
    /// coturn's defaults, with this realm and secret.
    pub fn new(realm: impl Into<String>, secret: SharedSecret, nonce_key: [u8; 32]) -> Self {
        Self {
            realm: realm.into(),
            secret,
            policy: PeerPolicy::default(),
            user_quota: 10,
            total_quota: 0,
            max_bps: 0,
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            nonce_lifetime: Duration::from_secs(600),
            ipv6_relay: false,
            nonce_key,
        }
    }
}

#[derive(Debug)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
}

#[derive(Debug)]
struct Bucket {
    tokens: u64,
    last: Instant,
}

impl Bucket {
    /// Takes `bytes` at `rate` bytes/s with one second of burst.
    fn take(&mut self, now: Instant, rate: u64, bytes: u64) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        if !elapsed.is_zero() {
            let refill = (elapsed.as_nanos().saturating_mul(u128::from(rate)) / 1_000_000_000) as u64;
            self.tokens = self.tokens.saturating_add(refill).min(rate);
            self.last = now;
        }
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct Allocation {
    client: ClientAddr,
    /// The full REST username (`expiry:user`); later requests must use it.
    username: String,
    /// The user part, which the quota counts.
    user: String,
    key: [u8; 16],
    /// The Allocate request's transaction id (a retransmission gets the same answer).
    created_by: TransactionId,
    /// The request carried a FINGERPRINT, so the answer does too.
    fingerprint: bool,
    lifetime: Duration,
    expires: Instant,
    /// `None` while the driver binds the relay socket.
    relayed: Option<SocketAddr>,
    /// The next port, bound for a later Allocate with the token (R bit).
    reserved: Option<SocketAddr>,
    family: Family,
    permissions: Vec<(IpAddr, Instant)>,
    channels: Vec<Channel>,
    bucket: Bucket,
}

impl Allocation {
    fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.iter().any(|(p, expires)| *p == ip && *expires > now)
    }

    fn permit(&mut self, ip: IpAddr, now: Instant) -> bool {
        let expires = now + PERMISSION_LIFETIME;
        if let Some(entry) = self.permissions.iter_mut().find(|(p, _)| *p == ip) {
            entry.1 = expires;
            return true;
        }
        if self.permissions.len() >= MAX_PERMISSIONS {
            return false;
        }
        self.permissions.push((ip, expires));
        true
    }
}

/// Who asked, after authentication.
struct Authenticated {
    username: String,
    key: [u8; 16],
}

/// The relay core. See the module docs for the driver contract.
#[derive(Debug)]
pub struct Relay {
    config: RelayConfig,
    /// An `Instant` and the Unix time it corresponds to (REST usernames and
    /// nonces carry Unix times).
    epoch: (Instant, u64),
    allocations: HashMap<AllocationId, Allocation>,
    by_client: HashMap<ClientAddr, AllocationId>,
    by_port: HashMap<u16, AllocationId>,
    per_user: HashMap<String, u32>,
    next_id: u64,
    next_sweep: Option<Instant>,
    /// Transaction ids of Data indications: a per-relay prefix and a counter.
    indication_counter: u64,
    transmits: VecDeque<Transmit>,
    commands: VecDeque<Command>,
    /// Reserved relay addresses by RESERVATION-TOKEN, with their expiry.
    reservations: HashMap<[u8; 8], (SocketAddr, Instant)>,
    /// Tokens of allocations whose success response is pending.
    pending_tokens: HashMap<AllocationId, [u8; 8]>,
    stats: RelayStats,
}

impl Relay {
    /// A relay whose clock reads `unix_now` seconds at `now`.
    pub fn new(config: RelayConfig, now: Instant, unix_now: u64) -> Self {
        Self {
            config,
            epoch: (now, unix_now),
            allocations: HashMap::default(),
            by_client: HashMap::default(),
            by_port: HashMap::default(),
            per_user: HashMap::default(),
            next_id: 1,
            next_sweep: None,
            indication_counter: 0,
            transmits: VecDeque::new(),
            commands: VecDeque::new(),
            reservations: HashMap::default(),
            pending_tokens: HashMap::default(),
            stats: RelayStats::default(),
        }
    }

    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// A control message to send to a client.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// A socket operation for the driver.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When `handle_timeout` is next due (`None`: no allocation, no timer).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    fn unix(&self, now: Instant) -> u64 {
        self.epoch.1 + now.saturating_duration_since(self.epoch.0).as_secs()
    }

    fn drop_packet(&mut self, reason: DropReason) {
        self.stats.drops[reason as usize] += 1;
    }

    /// Expires allocations, permissions and channels.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(due) = self.next_sweep else {
            return;
        };
        if now < due {
            return;
        }
        let expired: Vec<AllocationId> = self
            .allocations
            .iter()
            .filter(|(_, a)| a.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.remove_allocation(id);
        }
        let mut channels = 0;
        for allocation in self.allocations.values_mut() {
            allocation.permissions.retain(|(_, expires)| *expires > now);
            allocation.channels.retain(|c| c.expires > now);
            channels += allocation.channels.len() as u64;
        }
        self.stats.channels = channels;
        let stale: Vec<[u8; 8]> = self
            .reservations
            .iter()
            .filter(|(_, (_, expires))| *expires <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in stale {
            if let Some((addr, _)) = self.reservations.remove(&token) {
                self.commands.push_back(Command::ReleaseRelay {
                    allocation: AllocationId(0),
                    relay_port: addr.port(),
                });
            }
        }
        self.next_sweep = if self.allocations.is_empty() && self.reservations.is_empty() {
            None
        } else {
            Some(now + SWEEP_INTERVAL)
        };
    }

    /// A stream client's connection closed: its allocation goes (RFC 8656 §7).
    pub fn handle_client_closed(&mut self, client: ClientAddr) {
        if let Some(id) = self.by_client.get(&client).copied() {
            self.remove_allocation(id);
        }
    }

    fn remove_allocation(&mut self, id: AllocationId) {
        let Some(allocation) = self.allocations.remove(&id) else {
            return;
        };
        self.by_client.remove(&allocation.client);
        if let Some(relayed) = allocation.relayed {
            self.by_port.remove(&relayed.port());
            self.commands.push_back(Command::ReleaseRelay {
                allocation: id,
                relay_port: relayed.port(),
            });
        }
        if let Some(count) = self.per_user.get_mut(&allocation.user) {
            *count -= 1;
            if *count == 0 {
                self.per_user.remove(&allocation.user);
            }
        }
        self.stats.allocations = self.allocations.len() as u64;
        self.stats.channels = self.stats.channels.saturating_sub(allocation.channels.len() as u64);
    }

    /// A datagram or framed stream message from a client.
    pub fn handle_client_packet(&mut self, now: Instant, client: ClientAddr, packet: &[u8]) -> ClientOutcome {
        match stun::kind(packet) {
            Kind::ChannelData => self.handle_channel_data(now, client, packet),
            Kind::Stun => match Message::parse(packet) {
                Ok(message) => self.handle_stun(now, client, &message),
                Err(_) => {
                    self.drop_packet(DropReason::Malformed);
                    ClientOutcome::Handled
                }
            },
            Kind::Other => {
                self.drop_packet(DropReason::Malformed);
                ClientOutcome::Handled
            }
        }
    }

    fn handle_channel_data(&mut self, now: Instant, client: ClientAddr, packet: &[u8]) -> ClientOutcome {
        let Ok((number, payload)) = stun::parse_channel_data(packet) else {
            self.drop_packet(DropReason::Malformed);
            return ClientOutcome::Handled;
        };
        let Some(allocation) = self.by_client.get(&client).and_then(|id| self.allocations.get_mut(id)) else {
            self.drop_packet(DropReason::NoAllocation);
            return ClientOutcome::Handled;
        };
        let Some(relayed) = allocation.relayed else {
            self.drop_packet(DropReason::NoAllocation);
            return ClientOutcome::Handled;
        };
        let Some(peer) = allocation
            .channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
            .map(|c| c.peer)
        else {
            self.drop_packet(DropReason::UnboundChannel);
            return ClientOutcome::Handled;
        };
        self.forward_to_peer(now, client, relayed.port(), peer, payload)
    }

    /// Checks permission and bandwidth and counts a packet towards a peer.
    fn forward_to_peer(
        &mut self,
        now: Instant,
        client: ClientAddr,
        relay_port: u16,
        peer: SocketAddr,
        payload: Range<usize>,
    ) -> ClientOutcome {
        let rate = self.config.max_bps;
        let Some(allocation) = self.by_client.get(&client).and_then(|id| self.allocations.get_mut(id)) else {
            self.drop_packet(DropReason::NoAllocation);
            return ClientOutcome::Handled;
        };
        if !allocation.has_permission(peer.ip(), now) {
            self.drop_packet(DropReason::NoPermission);
            return ClientOutcome::Handled;
        }
        if rate > 0 && !allocation.bucket.take(now, rate, payload.len() as u64) {
            self.drop_packet(DropReason::BandwidthExceeded);
            return ClientOutcome::Handled;
        }
        self.stats.packets_to_peers += 1;
        self.stats.bytes_to_peers += payload.len() as u64;
        ClientOutcome::Forward {
            relay_port,
            peer,
            payload,
        }
    }

    /// A datagram from `peer` on the relay socket bound to `relay_port`, sitting
    /// in `buf[payload]` with [`PEER_HEADROOM`] bytes before it and
    /// [`PEER_TAILROOM`] after. Returns the client and the range of `buf` to
    /// send it (header written in place), or `None` if dropped.
    pub fn handle_peer_packet(
        &mut self,
        now: Instant,
        relay_port: u16,
        peer: SocketAddr,
        buf: &mut [u8],
        payload: Range<usize>,
    ) -> Option<(ClientAddr, Range<usize>)> {
        let rate = self.config.max_bps;
        let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
        let Some(allocation) = self
            .by_port
            .get(&relay_port)
            .and_then(|id| self.allocations.get_mut(id))
        else {
            self.drop_packet(DropReason::NoAllocation);
            return None;
        };
        if !allocation.has_permission(peer.ip(), now) {
            self.drop_packet(DropReason::NoPermission);
            return None;
        }
        if rate > 0 && !allocation.bucket.take(now, rate, payload.len() as u64) {
            self.drop_packet(DropReason::BandwidthExceeded);
            return None;
        }
        let client = allocation.client;
        let channel = allocation
            .channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
            .map(|c| c.number);
        let len = payload.len();
        let framed = match channel {
            Some(number) => {
                write_channel_data_header(buf, payload.start, len, number, client.transport != Transport::Udp)
            }
            None => {
                self.indication_counter += 1;
                let mut tid = [0u8; 12];
                tid[..4].copy_from_slice(&self.config.nonce_key[..4]);
                tid[4..].copy_from_slice(&self.indication_counter.to_be_bytes());
                write_data_indication_header(buf, payload.start, len, peer, TransactionId(tid))
            }
        };
        let Some(framed) = framed else {
            self.drop_packet(DropReason::NoRoom);
            return None;
        };
        self.stats.packets_to_clients += 1;
        self.stats.bytes_to_clients += len as u64;
        Some((client, framed))
    }

    /// The relay port of this relay's allocation whose relayed address is
    /// `peer`, if any: a packet for it can go straight to that allocation
    /// through [`Relay::handle_peer_packet`] with our relayed address as the
    /// source, instead of a round trip through the kernel (both callers
    /// relay-only; also spares a NAT the hairpin when `external_ip` is public).
    pub fn local_relay(&self, peer: SocketAddr) -> Option<u16> {
        let id = self.by_port.get(&peer.port())?;
        let relayed = self.allocations.get(id)?.relayed?;
        (relayed == peer).then_some(relayed.port())
    }

    /// The relayed address of the allocation on `relay_port`.
    pub fn relayed_address(&self, relay_port: u16) -> Option<SocketAddr> {
        self.by_port
            .get(&relay_port)
            .and_then(|id| self.allocations.get(id))
            .and_then(|a| a.relayed)
    }

    /// The driver also bound the port after `allocation`'s (EVEN-PORT with
    /// the R bit); it is held for [`RESERVATION_LIFETIME`] for the Allocate
    /// that brings the token of the coming response.
    pub fn handle_relay_reserved(&mut self, allocation: AllocationId, reserved: SocketAddr) {
        match self.allocations.get_mut(&allocation) {
            Some(entry) => entry.reserved = Some(reserved),
            None => self.commands.push_back(Command::ReleaseRelay {
                allocation,
                relay_port: reserved.port(),
            }),
        }
    }

    /// The driver bound (or failed to bind) the relay socket of `allocation`.
    pub fn handle_relay_bound(&mut self, now: Instant, allocation: AllocationId, relayed: Option<SocketAddr>) {
        let Some(entry) = self.allocations.get_mut(&allocation) else {
            // Gone meanwhile (the client disconnected): give the socket back.
            if let Some(relayed) = relayed {
                self.commands.push_back(Command::ReleaseRelay {
                    allocation,
                    relay_port: relayed.port(),
                });
            }
            return;
        };
        let (client, tid, fingerprint, key) = (entry.client, entry.created_by, entry.fingerprint, entry.key);
        match relayed {
            Some(relayed) => {
                entry.relayed = Some(relayed);
                entry.expires = now + entry.lifetime;
                if let Some(reserved) = entry.reserved.take() {
                    self.indication_counter += 1;
                    let mut token = [0u8; 8];
                    token[..2].copy_from_slice(&self.config.nonce_key[4..6]);
                    token[2..].copy_from_slice(&self.indication_counter.to_be_bytes()[2..]);
                    self.reservations.insert(token, (reserved, now + RESERVATION_LIFETIME));
                    self.pending_tokens.insert(allocation, token);
                }
                self.by_port.insert(relayed.port(), allocation);
                self.stats.allocations_total += 1;
                self.send_allocate_success(allocation);
                if self.next_sweep.is_none() {
                    self.next_sweep = Some(now + SWEEP_INTERVAL);
                }
            }
            None => {
                self.remove_allocation(allocation);
                self.refuse(
                    client,
                    method::ALLOCATE,
                    tid,
                    Refusal::InsufficientCapacity,
                    Some(&key),
                    fingerprint,
                );
            }
        }
    }

    fn send_allocate_success(&mut self, id: AllocationId) {
        let Some(allocation) = self.allocations.get(&id) else {
            return;
        };
        let Some(relayed) = allocation.relayed else {
            return;
        };
        let mut writer = MessageWriter::new(method::ALLOCATE, Class::Success, allocation.created_by);
        writer
            .xor_address(attr::XOR_RELAYED_ADDRESS, relayed)
            .u32_attr(attr::LIFETIME, allocation.lifetime.as_secs() as u32)
            .xor_address(attr::XOR_MAPPED_ADDRESS, allocation.client.addr);
        if let Some(token) = self.pending_tokens.get(&id) {
            writer.attr(attr::RESERVATION_TOKEN, token);
        }
        writer.integrity(&allocation.key);
        if allocation.fingerprint {
            writer.fingerprint();
        }
        self.transmits.push_back(Transmit {
            to: allocation.client,
            contents: writer.finish(),
        });
    }

    fn handle_stun(&mut self, now: Instant, client: ClientAddr, message: &Message<'_>) -> ClientOutcome {
        match (message.class(), message.method()) {
            (Class::Indication, method::SEND) => return self.handle_send(now, client, message),
            (Class::Request, _) => {}
            _ => {
                self.drop_packet(DropReason::Unexpected);
                return ClientOutcome::Handled;
            }
        }
        let tid = message.transaction_id();
        let fingerprint = message.has_fingerprint();
        if let Some(unknown) = message.unknown_required() {
            let mut writer = MessageWriter::new(message.method(), Class::Error, tid);
            writer
                .error_code(420, "Unknown Attribute")
                .attr(attr::UNKNOWN_ATTRIBUTES, &unknown.to_be_bytes());
            self.count_refusal(Refusal::UnknownAttribute);
            self.send(client, writer, None, fingerprint);
            return ClientOutcome::Handled;
        }
        match message.method() {
            method::BINDING => {
                self.stats.binding_requests += 1;
                let mut writer = MessageWriter::new(method::BINDING, Class::Success, tid);
                writer.xor_address(attr::XOR_MAPPED_ADDRESS, client.addr);
                self.send(client, writer, None, fingerprint);
            }
            method::ALLOCATE | method::REFRESH | method::CREATE_PERMISSION | method::CHANNEL_BIND => {
                let Some(auth) = self.authenticate(now, client, message) else {
                    return ClientOutcome::Handled;
                };
                let result = match message.method() {
                    method::ALLOCATE => self.handle_allocate(now, client, message, auth),
                    method::REFRESH => self.handle_refresh(now, client, message, &auth),
                    method::CREATE_PERMISSION => self.handle_create_permission(now, client, message, &auth),
                    _ => self.handle_channel_bind(now, client, message, &auth),
                };
                if let Err((refusal, key)) = result {
                    self.refuse(client, message.method(), tid, refusal, Some(&key), fingerprint);
                }
            }
            other => self.refuse(client, other, tid, Refusal::BadRequest, None, fingerprint),
        }
        ClientOutcome::Handled
    }

    fn handle_send(&mut self, now: Instant, client: ClientAddr, message: &Message<'_>) -> ClientOutcome {
        let Some(relayed) = self
            .by_client
            .get(&client)
            .and_then(|id| self.allocations.get(id))
            .and_then(|a| a.relayed)
        else {
            self.drop_packet(DropReason::NoAllocation);
            return ClientOutcome::Handled;
        };
        let peer = message.xor_address(attr::XOR_PEER_ADDRESS);
        let data = message.attributes().find(|a| a.typ == attr::DATA);
        let (Some(Ok(peer)), Some(data)) = (peer, data) else {
            self.drop_packet(DropReason::Malformed);
            return ClientOutcome::Handled;
        };
        let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
        let payload = data.offset..data.offset + data.value.len();
        self.forward_to_peer(now, client, relayed.port(), peer, payload)
    }

    fn count_refusal(&mut self, refusal: Refusal) {
        self.stats.refusals[refusal as usize] += 1;
    }

    fn send(&mut self, to: ClientAddr, mut writer: MessageWriter, key: Option<&[u8; 16]>, fingerprint: bool) {
        if let Some(key) = key {
            writer.integrity(key);
        }
        if fingerprint {
            writer.fingerprint();
        }
        self.transmits.push_back(Transmit {
            to,
            contents: writer.finish(),
        });
    }

    fn refuse(
        &mut self,
        to: ClientAddr,
        method: u16,
        tid: TransactionId,
        refusal: Refusal,
        key: Option<&[u8; 16]>,
        fingerprint: bool,
    ) {
        self.count_refusal(refusal);
        let mut writer = MessageWriter::new(method, Class::Error, tid);
        writer.error_code(refusal.code(), refusal.as_str());
        self.send(to, writer, key, fingerprint);
    }

    /// A fresh nonce: its expiry (hex) and an HMAC of it.
    fn nonce(&self, now: Instant) -> String {
        let expiry = self.unix(now) + self.config.nonce_lifetime.as_secs();
        format!("{expiry:016x}{}", self.nonce_tag(expiry))
    }

    fn nonce_tag(&self, expiry: u64) -> String {
        let mut mac =
            <Hmac<Sha1> as Mac>::new_from_slice(&self.config.nonce_key).expect("HMAC takes keys of any length");
        mac.update(&expiry.to_be_bytes());
        mac.finalize().into_bytes()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// `Some(true)`: ours and fresh; `Some(false)`: ours but stale; `None`: not ours.
    fn nonce_fresh(&self, now: Instant, nonce: &str) -> Option<bool> {
        let expiry = nonce.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok())?;
        let tag = nonce.get(16..)?;
        if tag.len() != 16 || !constant_time_eq(tag.as_bytes(), self.nonce_tag(expiry).as_bytes()) {
            return None;
        }
        Some(expiry >= self.unix(now))
    }

    /// 401 with a realm and a fresh nonce (or 438 when `stale`).
    fn challenge(&mut self, now: Instant, client: ClientAddr, message: &Message<'_>, refusal: Refusal) {
        self.count_refusal(refusal);
        let mut writer = MessageWriter::new(message.method(), Class::Error, message.transaction_id());
        writer
            .error_code(refusal.code(), refusal.as_str())
            .attr(attr::REALM, self.config.realm.as_bytes())
            .attr(attr::NONCE, self.nonce(now).as_bytes());
        self.send(client, writer, None, message.has_fingerprint());
    }

    /// The long-term credential check (RFC 8489 §9.2.4) with REST usernames.
    fn authenticate(&mut self, now: Instant, client: ClientAddr, message: &Message<'_>) -> Option<Authenticated> {
        if !message.has_integrity() {
            self.challenge(now, client, message, Refusal::Unauthorized);
            return None;
        }
        let (username, realm, nonce) = match (
            message.text(attr::USERNAME),
            message.text(attr::REALM),
            message.text(attr::NONCE),
        ) {
            (Some(Ok(u)), Some(Ok(r)), Some(Ok(n))) => (u, r, n),
            _ => {
                self.refuse(
                    client,
                    message.method(),
                    message.transaction_id(),
                    Refusal::BadRequest,
                    None,
                    message.has_fingerprint(),
                );
                return None;
            }
        };
        match self.nonce_fresh(now, nonce) {
            Some(true) => {}
            Some(false) => {
                self.challenge(now, client, message, Refusal::StaleNonce);
                return None;
            }
            None => {
                self.challenge(now, client, message, Refusal::Unauthorized);
                return None;
            }
        }
        if realm != self.config.realm {
            self.challenge(now, client, message, Refusal::Unauthorized);
            return None;
        }
        let Ok(password) = self.config.secret.password_if_valid(username, self.unix(now)) else {
            // Expired or not a REST username.
            self.challenge(now, client, message, Refusal::Unauthorized);
            return None;
        };
        let key = long_term_key(username, &self.config.realm, &password);
        if !message.verify_integrity(&key) {
            self.challenge(now, client, message, Refusal::Unauthorized);
            return None;
        }
        Some(Authenticated {
            username: username.to_string(),
            key,
        })
    }

    /// The lifetime to grant for a requested one (RFC 8656 §7.2).
    fn lifetime(&self, message: &Message<'_>) -> Result<Duration, Refusal> {
        match message.u32_attr(attr::LIFETIME) {
            None => Ok(self.config.default_lifetime),
            Some(Err(_)) => Err(Refusal::BadRequest),
            Some(Ok(secs)) => Ok(Duration::from_secs(u64::from(secs))
                .min(self.config.max_lifetime)
                .max(self.config.default_lifetime)),
        }
    }

    fn handle_allocate(
        &mut self,
        now: Instant,
        client: ClientAddr,
        message: &Message<'_>,
        auth: Authenticated,
    ) -> Result<(), (Refusal, [u8; 16])> {
        let key = auth.key;
        if let Some(id) = self.by_client.get(&client).copied() {
            let same = self
                .allocations
                .get(&id)
                .is_some_and(|a| a.created_by == message.transaction_id() && a.relayed.is_some());
            if same {
                // A retransmission of the request that created it.
                self.send_allocate_success(id);
                return Ok(());
            }
            return Err((Refusal::AllocationMismatch, key));
        }
        match message.get(attr::REQUESTED_TRANSPORT) {
            Some([PROTOCOL_UDP, _, _, _]) => {}
            Some([_, _, _, _]) => return Err((Refusal::UnsupportedTransport, key)),
            _ => return Err((Refusal::BadRequest, key)),
        }
        let token = message.get(attr::RESERVATION_TOKEN);
        let even = message.get(attr::EVEN_PORT);
        if token.is_some() && (even.is_some() || message.get(attr::REQUESTED_ADDRESS_FAMILY).is_some()) {
            return Err((Refusal::BadRequest, key));
        }
        let reserved = match token {
            None => None,
            Some(token) => {
                let token: [u8; 8] = token.try_into().map_err(|_| (Refusal::BadRequest, key))?;
                match self.reservations.get(&token) {
                    Some((addr, expires)) if *expires > now => Some((token, *addr)),
                    _ => return Err((Refusal::InsufficientCapacity, key)),
                }
            }
        };
        let family = match message.get(attr::REQUESTED_ADDRESS_FAMILY) {
            None | Some([0x01, _, _, _]) => Family::V4,
            Some([0x02, _, _, _]) if self.config.ipv6_relay => Family::V6,
            Some([0x02, _, _, _]) => return Err((Refusal::AddressFamilyNotSupported, key)),
            Some(_) => return Err((Refusal::BadRequest, key)),
        };
        let even_port = even.is_some();
        let reserve_next = matches!(even, Some([flags, ..]) if flags & 0x80 != 0);
        let lifetime = self.lifetime(message).map_err(|r| (r, key))?;
        let user = auth
            .username
            .split_once(':')
            .map_or(auth.username.as_str(), |(_, user)| user)
            .to_string();
        let quota = self.config.user_quota;
        if quota > 0 && self.per_user.get(&user).copied().unwrap_or(0) >= quota {
            return Err((Refusal::AllocationQuotaReached, key));
        }
        let total = self.config.total_quota;
        if total > 0 && self.allocations.len() as u64 >= u64::from(total) {
            return Err((Refusal::AllocationQuotaReached, key));
        }
        let id = AllocationId(self.next_id);
        self.next_id += 1;
        *self.per_user.entry(user.clone()).or_insert(0) += 1;
        let burst = self.config.max_bps;
        self.allocations.insert(
            id,
            Allocation {
                client,
                username: auth.username,
                user,
                key,
                created_by: message.transaction_id(),
                fingerprint: message.has_fingerprint(),
                lifetime,
                // Set when the socket is bound.
                expires: now + lifetime,
                relayed: None,
                reserved: None,
                family,
                permissions: Vec::new(),
                channels: Vec::new(),
                bucket: Bucket {
                    tokens: burst,
                    last: now,
                },
            },
        );
        self.by_client.insert(client, id);
        self.stats.allocations = self.allocations.len() as u64;
        match reserved {
            // The socket is already bound: the allocation takes it over.
            Some((token, addr)) => {
                self.reservations.remove(&token);
                self.handle_relay_bound(now, id, Some(addr));
            }
            None => self.commands.push_back(Command::BindRelay {
                allocation: id,
                family,
                even_port,
                reserve_next,
            }),
        }
        Ok(())
    }

    /// The client's allocation, checked against the authenticated username.
    fn allocation_of(&self, client: ClientAddr, auth: &Authenticated) -> Result<AllocationId, (Refusal, [u8; 16])> {
        let key = auth.key;
        let id = self
            .by_client
            .get(&client)
            .copied()
            .ok_or((Refusal::AllocationMismatch, key))?;
        let allocation = self.allocations.get(&id).ok_or((Refusal::AllocationMismatch, key))?;
        if allocation.relayed.is_none() {
            return Err((Refusal::AllocationMismatch, key));
        }
        if allocation.username != auth.username {
            return Err((Refusal::WrongCredentials, key));
        }
        Ok(id)
    }

    fn handle_refresh(
        &mut self,
        now: Instant,
        client: ClientAddr,
        message: &Message<'_>,
        auth: &Authenticated,
    ) -> Result<(), (Refusal, [u8; 16])> {
        let key = auth.key;
        let id = self.allocation_of(client, auth)?;
        let requested = match message.u32_attr(attr::LIFETIME) {
            Some(Err(_)) => return Err((Refusal::BadRequest, key)),
            Some(Ok(secs)) => Some(secs),
            None => None,
        };
        let granted = if requested == Some(0) {
            self.remove_allocation(id);
            0
        } else {
            let lifetime = self.lifetime(message).map_err(|r| (r, key))?;
            if let Some(allocation) = self.allocations.get_mut(&id) {
                allocation.expires = now + lifetime;
            }
            lifetime.as_secs() as u32
        };
        let mut writer = MessageWriter::new(method::REFRESH, Class::Success, message.transaction_id());
        writer.u32_attr(attr::LIFETIME, granted);
        self.send(client, writer, Some(&key), message.has_fingerprint());
        Ok(())
    }

    /// A peer address from a request, canonical, checked against the policy
    /// and the allocation's family.
    fn checked_peer(
        &self,
        id: AllocationId,
        value: Result<SocketAddr, ParseError>,
        key: [u8; 16],
    ) -> Result<SocketAddr, (Refusal, [u8; 16])> {
        let peer = value.map_err(|_| (Refusal::BadRequest, key))?;
        let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
        let family = self.allocations.get(&id).map_or(Family::V4, |a| a.family);
        let peer_family = if peer.is_ipv4() { Family::V4 } else { Family::V6 };
        if family != peer_family {
            return Err((Refusal::PeerAddressFamilyMismatch, key));
        }
        // Another allocation of this relay is always a valid peer (two
        // relay-only callers), whatever range its address is in.
        let own_relay = self
            .by_port
            .get(&peer.port())
            .and_then(|other| self.allocations.get(other))
            .and_then(|a| a.relayed)
            .is_some_and(|relayed| canonical(relayed.ip()) == peer.ip());
        if !own_relay && self.config.policy.check(peer).is_err() {
            return Err((Refusal::Forbidden, key));
        }
        Ok(peer)
    }

    fn handle_create_permission(
        &mut self,
        now: Instant,
        client: ClientAddr,
        message: &Message<'_>,
        auth: &Authenticated,
    ) -> Result<(), (Refusal, [u8; 16])> {
        let key = auth.key;
        let id = self.allocation_of(client, auth)?;
        let tid = message.transaction_id();
        let mut peers = Vec::new();
        for attribute in message.attributes().filter(|a| a.typ == attr::XOR_PEER_ADDRESS) {
            let value = stun::decode_xor_address(attribute.value, &tid);
            peers.push(self.checked_peer(id, value, key)?);
        }
        if peers.is_empty() {
            return Err((Refusal::BadRequest, key));
        }
        let allocation = self
            .allocations
            .get_mut(&id)
            .ok_or((Refusal::AllocationMismatch, key))?;
        for peer in peers {
            if !allocation.permit(peer.ip(), now) {
                return Err((Refusal::InsufficientCapacity, key));
            }
        }
        let writer = MessageWriter::new(method::CREATE_PERMISSION, Class::Success, tid);
        self.send(client, writer, Some(&key), message.has_fingerprint());
        Ok(())
    }

    fn handle_channel_bind(
        &mut self,
        now: Instant,
        client: ClientAddr,
        message: &Message<'_>,
        auth: &Authenticated,
    ) -> Result<(), (Refusal, [u8; 16])> {
        let key = auth.key;
        let id = self.allocation_of(client, auth)?;
        let number = match message.get(attr::CHANNEL_NUMBER) {
            Some([hi, lo, _, _]) => u16::from_be_bytes([*hi, *lo]),
            _ => return Err((Refusal::BadRequest, key)),
        };
        // RFC 8656 narrowed the range to 0x4FFF; RFC 5766 clients use up to 0x7FFF.
        if !(0x4000..=0x7FFF).contains(&number) {
            return Err((Refusal::BadRequest, key));
        }
        let value = message
            .xor_address(attr::XOR_PEER_ADDRESS)
            .ok_or((Refusal::BadRequest, key))?;
        let peer = self.checked_peer(id, value, key)?;
        let allocation = self
            .allocations
            .get_mut(&id)
            .ok_or((Refusal::AllocationMismatch, key))?;
        let expires = now + CHANNEL_LIFETIME;
        let by_number = allocation.channels.iter().position(|c| c.number == number);
        let by_peer = allocation.channels.iter().position(|c| c.peer == peer);
        let mut added = false;
        match (by_number, by_peer) {
            (Some(a), Some(b)) if a == b => allocation.channels[a].expires = expires,
            (None, None) => {
                if allocation.channels.len() >= MAX_CHANNELS {
                    return Err((Refusal::InsufficientCapacity, key));
                }
                allocation.channels.push(Channel { number, peer, expires });
                added = true;
            }
            // The number is bound to another peer, or the peer to another number.
            _ => return Err((Refusal::BadRequest, key)),
        }
        if !allocation.permit(peer.ip(), now) {
            return Err((Refusal::InsufficientCapacity, key));
        }
        if added {
            self.stats.channels += 1;
        }
        let writer = MessageWriter::new(method::CHANNEL_BIND, Class::Success, message.transaction_id());
        self.send(client, writer, Some(&key), message.has_fingerprint());
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
