//! Switchboard's selective forwarding unit: a sans-IO core on str0m.
//!
//! One [`Sfu`] owns the WebRTC sessions of one shard (one UDP port). The
//! driver feeds it datagrams and timeouts and drains what comes out:
//!
//! ```text
//! handle_receive(now, src, dst, bytes) ─┐            ┌─> poll_transmit() -> Transmit (send it)
//! handle_timeout(now) ──────────────────┼─> Sfu ─────┼─> poll_event()    -> SfuEvent (tell signalling)
//! open_session / accept_answer / …  ────┘            └─> poll_timeout()  -> when to call handle_timeout
//! ```
//!
//! The model:
//! - A **session** is one participant's peer connection (a str0m `Rtc`, ICE-lite,
//!   RTP mode). It belongs to one **room**.
//! - What a participant sends us is a **track** (one per m-line it sends on).
//!   Every other session in the room **subscribes** to it: the SFU adds a
//!   send-only m-line to that session (labelled with the track's stream id) and
//!   asks the signalling side to renegotiate ([`SfuEvent::NegotiationNeeded`],
//!   then [`Sfu::create_offer`] and [`Sfu::accept_answer`]).
//! - An RTP packet from a publisher is rewritten per subscriber by a
//!   [`forwarder::Forwarder`] (SSRC by str0m, sequence number and timestamp by
//!   us) and sealed by us for the subscriber (see [`srtp`]) or written to its
//!   `Rtc`; the payload is shared (`Arc`), never copied per subscriber.
//! - Incoming datagrams are matched to a session by source address (fast path)
//!   or, for STUN from a new address, by the ICE username fragment; anything
//!   else is a counted drop ([`DropReason`]).
//!
//! Nothing here reads the clock, touches a socket or spawns: time comes in as `now`.

mod codec;
pub mod forwarder;
mod ingress;
mod nack;
mod sdp;
pub mod simulcast;
mod single_stream;
pub mod speaker;
mod srtp;
mod stats;
mod twcc;

pub use mixer::{MixerConfig, MixerStats};
pub use stats::{DelayHistogram, DropReason, SessionStats, ShardStats};

use forwarder::{Forwarder, InPacket, Skip};
use sdp::{msid_token, offer_prefers_h264, own_msid, publish_only, relabel, session_stream};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::bwe::Bitrate;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::PayloadParams;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Pt, Rid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{Extension, ExtensionMap, ExtensionValues, RtpPacket, RtpWrite, Ssrc, VideoOrientation};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

pub use str0m::net::Transmit;

/// A session (one participant's peer connection) in this shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// A published track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(pub u64);

/// A room (conference); the signalling side chooses the key, e.g. the Matrix room id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(pub String);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// Who a session belongs to; used to label the streams others receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    pub user_id: String,
    pub device_id: String,
}

/// What a caller's own m-lines (those of its offer) carry from the SFU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnLines {
    /// Nothing: the session receives the others' streams on m-lines of the
    /// SFU's offers, so its own ones are answered `recvonly` and name no
    /// stream of ours (clients such as matrix-js-sdk make a feed of every
    /// stream they receive and need it labelled). Multi-stream callers.
    PublishOnly,
    /// Both ways, as offered: the mix and the speaker's video of a
    /// single-stream session go there ([`Sfu::set_single_stream`]).
    BothWays,
}

#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// The address put in answers as our ICE candidate (the shard's socket, or
    /// the public address of a host behind NAT).
    pub advertised_addr: SocketAddr,
    /// A session that has not connected within this time is closed.
    pub connect_timeout: Duration,
    /// Minimum interval between keyframe requests to one publisher's track.
    pub keyframe_request_interval: Duration,
    /// Largest SDP accepted from a peer, in bytes.
    pub max_sdp_bytes: usize,
    /// The mix single-stream sessions hear (speakers mixed, bitrate).
    pub mixer: MixerConfig,
    /// A single-stream session's video moves to a new active speaker only once
    /// that speaker has held the floor this long.
    pub video_hold_off: Duration,
}

impl SfuConfig {
    pub fn new(advertised_addr: SocketAddr) -> Self {
        Self {
            advertised_addr,
            connect_timeout: Duration::from_secs(20),
            keyframe_request_interval: Duration::from_millis(300),
            max_sdp_bytes: 64 * 1024,
            mixer: MixerConfig::default(),
            video_hold_off: Duration::from_millis(500),
        }
    }
}

/// What the SFU tells the signalling side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SfuEvent {
    /// ICE and DTLS are up; media can flow.
    Connected(SessionId),
    /// The session's subscriptions changed: call [`Sfu::create_offer`] and send
    /// the offer to the peer.
    NegotiationNeeded(SessionId),
    /// The session ended on its own (the peer went away or never connected).
    Closed(SessionId, CloseReason),
    /// The room's dominant speaker changed (from the audio levels publishers send).
    ActiveSpeaker { room: RoomId, session: SessionId },
    /// The next bytes of the room's recording (an Ogg/Opus file, see
    /// [`Sfu::start_recording`]); `finished` on the last.
    Recording {
        room: RoomId,
        bytes: Vec<u8>,
        finished: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// ICE connectivity was lost after the session had connected.
    Disconnected,
    /// ICE never completed within [`SfuConfig::connect_timeout`].
    ConnectTimeout,
    /// The peer closed DTLS.
    PeerClosed,
    /// The session's WebRTC stack failed.
    Failed,
}

/// A renegotiation offer and the streams the session will receive after it.
#[derive(Debug, Clone)]
pub struct Offer {
    pub sdp: String,
    pub streams: Vec<StreamInfo>,
}

/// One stream (an msid stream id) a session receives: whose it is and what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The msid stream id in our SDP (the key of `sdp_stream_metadata`).
    pub stream_id: String,
    pub publisher: Participant,
    /// The stream id the publisher used for it in its own SDP.
    pub publisher_stream_id: String,
    pub audio: bool,
    pub video: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    #[error("unknown session")]
    UnknownSession,
    #[error("unknown room")]
    UnknownRoom,
    #[error("the SDP is larger than {0} bytes")]
    SdpTooLarge(usize),
    #[error("invalid SDP: {0}")]
    InvalidSdp(String),
    #[error("no offer of ours is waiting for an answer")]
    NoPendingOffer,
    #[error("WebRTC: {0}")]
    Rtc(#[from] str0m::RtcError),
}

struct Session {
    room: RoomId,
    participant: Participant,
    rtc: Rtc,
    ufrag: String,
    next_timeout: Instant,
    /// The time of this session's live entry in the timer heap, if any.
    scheduled: Option<Instant>,
    /// Packets were written to it that str0m has not sent yet (see `Sfu::flush`).
    dirty: bool,
    /// Receives one stream on its own m-lines (the active speaker's), no renegotiation.
    single_stream: bool,
    own_lines: OwnLines,
    connect_deadline: Option<Instant>,
    addrs: Vec<SocketAddr>,
    /// Tracks this participant publishes, by the m-line they arrive on.
    published: FastMap<Mid, TrackId>,
    /// Incoming SSRC → track (filled on first sight).
    /// Incoming SSRC → (track, layer index), filled on first sight.
    ssrc_tracks: FastMap<Ssrc, (TrackId, usize)>,
    /// What this participant receives, by our send-only m-line.
    subscriptions: FastMap<Mid, Subscription>,
    /// Changes waiting for the next offer.
    wanted: Vec<Change>,
    pending: Option<PendingOffer>,
    stats: SessionStats,
    /// Forwarded media sealed by us (see [`srtp`]).
    sealer: srtp::Sealer,
    /// Its media opened by us (see [`ingress`]).
    ingress: ingress::Ingress,
    /// The time of its live entry in the RTCP heap, if any.
    rtcp_at: Option<Instant>,
    /// Every m-line it published on or we added (with its simulcast
    /// layers): where it may publish again without a new m-line.
    lines: FastMap<Mid, Vec<Option<Rid>>>,
    /// M-lines of ours whose forwarded track left: the next subscription of
    /// the same kind takes one over instead of adding an m-line, so joins
    /// and leaves do not grow the session's SDP.
    idle: Vec<IdleLine>,
    /// The msid of m-lines taken over (str0m keeps an m-line's first label).
    labels: FastMap<Mid, (String, String)>,
}

/// An m-line of ours with nothing on it, kept for the next track of its kind.
struct IdleLine {
    mid: Mid,
    kind: MediaKind,
    /// The last subscription's numbering: the next track on this m-line
    /// continues it (same SSRC, so the receiver and SRTP see one stream).
    forwarder: Forwarder,
    /// Its `inactive` was negotiated: the peer's receiver stopped, and a new
    /// label with `sendonly` starts a new track there (a `track` event).
    settled: bool,
}

impl Session {
    /// Single-stream mode: what we send on one of the caller's own m-lines
    /// comes from a subscription we re-point at whoever speaks.
    fn bind_own_mline(&mut self, mid: Mid, kind: MediaKind) {
        self.subscriptions.entry(mid).or_insert_with(|| Subscription {
            track: TrackId(0),
            layer: None,
            target: 0,
            max_quality: simulcast::Quality::High,
            forwarder: forwarder_for(kind),
            pt_map: Vec::new(),
            direct: None,
            our_mline: false,
        });
        if let Some(tx) = self.rtc.direct_api().stream_tx_by_mid(mid, None) {
            tx.set_unpaced(true);
        }
    }

    /// Puts the changes of an offer that did not take back into the queue.
    fn requeue(&mut self, added: &[(Mid, TrackId)], redirected: &[Change]) {
        self.wanted.extend(added.iter().map(|(_, t)| Change::Subscribe(*t)));
        self.wanted.extend_from_slice(redirected);
    }

    /// After an offer/answer exchange: idle m-lines now negotiated inactive
    /// may be taken over (before, the peer might still be receiving there).
    fn settle_idle(&mut self) {
        for line in &mut self.idle {
            if self
                .rtc
                .media(line.mid)
                .is_some_and(|m| m.direction() == Direction::Inactive)
            {
                line.settled = true;
            }
        }
    }

    /// The idle m-line of `kind` to take over for a new subscription.
    fn take_idle(&mut self, kind: MediaKind) -> Option<IdleLine> {
        let position = self.idle.iter().position(|line| {
            line.kind == kind
                && line.settled
                && !self.published.contains_key(&line.mid)
                && self
                    .rtc
                    .media(line.mid)
                    .is_some_and(|m| m.direction() == Direction::Inactive)
        })?;
        Some(self.idle.swap_remove(position))
    }
}

struct Subscription {
    track: TrackId,
    /// The simulcast layer being forwarded (None until the first packet goes out).
    layer: Option<usize>,
    /// The layer to move to on its next keyframe.
    target: usize,
    /// The highest layer (by bitrate rank) this subscriber asked for.
    max_quality: simulcast::Quality,
    forwarder: Forwarder,
    /// Publisher payload type → ours for this subscriber (cached from `match_params`).
    pt_map: Vec<(Pt, Pt)>,
    /// Media we seal ourselves (see [`srtp`]), once the keys are there.
    direct: Option<srtp::DirectStream>,
    /// Its m-line was added by our offer (not one of the caller's own).
    our_mline: bool,
}

impl Session {
    /// SDP of ours as str0m wrote it, with the labels browsers need: our own
    /// stream on two-way m-lines (see [`own_msid`]) and the labels of m-lines
    /// taken over for another track.
    fn our_sdp(&self, sdp: &str) -> String {
        let sdp = own_msid(sdp, &session_stream(&self.participant), |mid| self.forwards_on(mid));
        relabel(&sdp, |mid| {
            let mid = Mid::from(mid);
            // Only while it carries (or our offer gives it) the track the label names.
            if !self.offer_takes_over(mid) && !self.subscriptions.get(&mid).is_some_and(|s| s.our_mline) {
                return None;
            }
            self.labels
                .get(&mid)
                .map(|(stream, track)| (stream.as_str(), track.as_str()))
        })
    }

    /// Whether our pending offer takes `mid` over for another track (see [`Session::idle`]).
    fn offer_takes_over(&self, mid: Mid) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| p.reused.iter().any(|l| l.mid == mid))
    }

    /// Whether `mid` is an m-line of ours carrying someone else's stream (its
    /// label is that stream's, never the session's own).
    fn forwards_on(&self, mid: &str) -> bool {
        self.subscriptions.get(&Mid::from(mid)).is_some_and(|s| s.our_mline)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Subscribe(TrackId),
    /// Stop sending on one of our m-lines (`Inactive`: its track is gone).
    Direction(Mid, Direction),
    /// A new direction for an m-line of our first offer to a callee who
    /// turned out multi-stream: we stop sending there (matrix-js-sdk rings
    /// only for an offer that brings a stream, so it went out both ways; this
    /// ends that silent feed). A single-stream session drops these.
    OwnLine(Mid, Direction),
}

/// An m-line a session starts publishing on.
struct PublishedLine {
    mid: Mid,
    kind: MediaKind,
    /// Its direction from our side.
    direction: Direction,
    /// Simulcast layers (one `None` without simulcast).
    rids: Vec<Option<Rid>>,
    /// The msid stream id the publisher gave it.
    publisher_stream_id: String,
}

struct PendingOffer {
    pending: SdpPendingOffer,
    added: Vec<(Mid, TrackId)>,
    /// Direction changes it carries (`Change::Direction` or `OwnLine`).
    redirected: Vec<Change>,
    /// M-lines of a first offer of ours (we called the peer), which the peer
    /// publishes on. str0m announces m-lines it was offered, not those it
    /// offered, so these are published when the answer comes.
    own: Vec<(Mid, MediaKind)>,
    /// Idle m-lines of ours it takes over (see [`Session::idle`]).
    reused: Vec<IdleLine>,
}

struct Track {
    room: RoomId,
    publisher: SessionId,
    /// The publisher's m-line.
    mid: Mid,
    kind: MediaKind,
    /// Our msid stream id for it, shared by the tracks of one publisher stream.
    stream_id: String,
    publisher_stream_id: String,
    /// Fan-out list: who receives it, on which of their m-lines. Rebuilt only
    /// when someone subscribes or leaves.
    subscribers: Vec<(SessionId, Mid)>,
    /// Payload type → codec parameters of the publisher's session.
    codecs: Vec<(Pt, PayloadParams)>,
    last_keyframe_request: Option<Instant>,
    /// Smoothed audio level (audio tracks).
    level: speaker::LevelMeter,
    /// When this track next asks for its room's active-speaker check.
    next_speaker_check: Option<Instant>,
    /// Simulcast layers (one, without a rid, when the publisher does not simulcast).
    layers: Vec<simulcast::Layer>,
}

#[derive(Default)]
struct Room {
    sessions: Vec<SessionId>,
    tracks: Vec<TrackId>,
    speaker: Option<SessionId>,
    /// When the current speaker took the floor.
    speaker_since: Option<Instant>,
    next_speaker_check: Option<Instant>,
    /// The mixer of its single-stream listeners and recording.
    mix: Option<single_stream::RoomMix>,
    /// Someone published simulcast here: sessions opened from then on
    /// estimate their bandwidth (to choose layers).
    simulcast: bool,
}

/// The SFU core of one shard.
pub struct Sfu {
    config: SfuConfig,
    /// Boxed: a session (str0m's `Rtc`) is over 10 KiB, and a table of them
    /// inline would cost that for every spare slot and twice while it grows.
    sessions: FastMap<SessionId, Box<Session>>,
    rooms: HashMap<RoomId, Room>,
    tracks: FastMap<TrackId, Track>,
    by_addr: FastMap<SocketAddr, SessionId>,
    by_ufrag: FastMap<String, SessionId>,
    next_id: u64,
    events: VecDeque<SfuEvent>,
    /// Where draining sessions puts things (a field apart from `sessions`, so a
    /// session and the sinks can be borrowed together).
    out: Outputs,
    /// When subscribers' simulcast layers are next re-evaluated.
    next_layer_check: Option<Instant>,
    /// Sessions with written, unsent packets.
    dirty: Vec<SessionId>,
    /// The latest time an input brought.
    now: Option<Instant>,
    /// The earliest mixer tick of any room.
    next_mix: Option<Instant>,
}

impl fmt::Debug for Sfu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sfu")
            .field("advertised_addr", &self.config.advertised_addr)
            .field("sessions", &self.sessions.len())
            .field("rooms", &self.rooms.len())
            .finish_non_exhaustive()
    }
}

/// A session's WebRTC configuration. Sessions with `video` keep transport-wide
/// sequence numbers, so a publisher's browser estimates its uplink from our
/// feedback. We estimate our own sending bandwidth (`estimate`) only where it
/// has a use, choosing simulcast layers: with it str0m paces through a leaky
/// bucket that lets one packet out per `Rtc` timeout, so every forwarded video
/// packet costs a whole str0m timeout (half the CPU of a video room).
fn rtc_config(prefer_h264: bool, video: bool, estimate: bool) -> RtcConfig {
    // Our codec order is our preference in answers: VP8 unless the offer puts H.264 first.
    let config = RtcConfig::new()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false);
    let config = if prefer_h264 {
        config.enable_h264(true).enable_vp8(true)
    } else {
        config.enable_vp8(true).enable_h264(true)
    };
    let config = if estimate {
        config.enable_bwe(Some(Bitrate::kbps(600)))
    } else if video {
        config
    } else {
        // Without an estimator, transport-wide sequence numbers only make the
        // peer send feedback nobody reads: leave the extension out.
        let mut extensions = ExtensionMap::empty();
        for (id, extension) in ExtensionMap::standard().iter() {
            if *extension != Extension::TransportSequenceNumber {
                extensions.set(id, extension.clone());
            }
        }
        config.set_extension_map(extensions)
    };
    // Retransmission history per video stream: ~0.85 s at 300 packets a second
    // covers NACKs at any sane RTT (str0m's default keeps 1,000).
    config
        .set_stats_interval(Some(Duration::from_secs(1)))
        .set_send_buffer_video(VIDEO_SEND_BUFFER)
}

/// Packets of history kept per outgoing video stream for NACK/RTX.
const VIDEO_SEND_BUFFER: usize = 256;

/// Maps on the forwarding path, keyed by our own ids or by addresses and
/// SSRCs of sessions that passed ICE: no key is chosen by an unauthenticated
/// peer, so a fast non-keyed hash is safe.
type FastMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

/// Session timers run per [`Sfu::handle_timeout`]: when many sessions' timers
/// fall due together (sessions opened together keep their RTCP and stats
/// cadence together), the rest wait for the next call, and datagrams that
/// arrived meanwhile are not held behind all of them.
const TIMERS_PER_CALL: usize = 32;

/// How often subscribers' simulcast layers are re-evaluated.
const LAYER_CHECK_INTERVAL: Duration = Duration::from_millis(500);

impl Sfu {
    pub fn new(config: SfuConfig) -> Self {
        Self {
            config,
            sessions: FastMap::default(),
            rooms: HashMap::new(),
            tracks: FastMap::default(),
            by_addr: FastMap::default(),
            by_ufrag: FastMap::default(),
            next_id: 1,
            events: VecDeque::new(),
            out: Outputs::default(),
            next_layer_check: None,
            dirty: Vec::new(),
            now: None,
            next_mix: None,
        }
    }

    pub fn config(&self) -> &SfuConfig {
        &self.config
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // ---- the signalling side's API -------------------------------------------

    /// Opens a session for `participant` in `room` from the peer's SDP offer and
    /// returns the answer. The session subscribes to everything already
    /// published in the room (asking for renegotiation once connected);
    /// `own_lines` says whether we send on the offer's own m-lines.
    pub fn open_session(
        &mut self,
        now: Instant,
        room: RoomId,
        participant: Participant,
        offer: &str,
        own_lines: OwnLines,
    ) -> Result<(SessionId, String), SfuError> {
        self.advance(now);
        let (sdp, offer) = (offer, self.parse_offer(offer, own_lines, |_| false)?);
        let prefer_h264 = offer_prefers_h264(sdp);
        let has_video = sdp.lines().any(|l| l.starts_with("m=video"));
        // Layers to choose: its own (it sends simulcast: the room has layers
        // from now on, though its tracks appear only once it connects) or its room's.
        let sends_layers = sdp.lines().any(|l| l.starts_with("a=simulcast"));
        let estimate = has_video && (sends_layers || self.room_simulcasts(&room));
        let (mut rtc, keys) = srtp::build_rtc(rtc_config(prefer_h264, has_video, estimate), now);
        let sealer = srtp::Sealer::new(keys, !estimate);
        let candidate = Candidate::host(self.config.advertised_addr, "udp")
            .map_err(|e| SfuError::InvalidSdp(format!("advertised address: {e}")))?;
        rtc.add_local_candidate(candidate);
        // A panic here leaves only the new, unused `Rtc` half-made.
        let answer = refused_on_panic(|| rtc.sdp_api().accept_offer(offer))??;
        let answer = own_msid(&answer.to_sdp_string(), &session_stream(&participant), |_| false);
        let id = self.insert_session(now, room.clone(), participant, (rtc, sealer), None, own_lines);
        if sends_layers && let Some(room) = self.rooms.get_mut(&room) {
            room.simulcast = true;
        }
        Ok((id, answer))
    }

    /// Opens a session for `participant` in `room` with an offer of ours (we
    /// call them): one audio and one video m-line, both ways. The peer's answer
    /// goes to [`Sfu::accept_answer`]; from then on the session is like any
    /// other (what the peer sends on those m-lines is published, and the
    /// room's streams follow by renegotiation once connected).
    pub fn open_offer(
        &mut self,
        now: Instant,
        room: RoomId,
        participant: Participant,
    ) -> Result<(SessionId, String), SfuError> {
        self.advance(now);
        let estimate = self.room_simulcasts(&room);
        let (mut rtc, keys) = srtp::build_rtc(rtc_config(false, true, estimate), now);
        let sealer = srtp::Sealer::new(keys, !estimate);
        let candidate = Candidate::host(self.config.advertised_addr, "udp")
            .map_err(|e| SfuError::InvalidSdp(format!("advertised address: {e}")))?;
        rtc.add_local_candidate(candidate);
        let stream = session_stream(&participant);
        let mut api = rtc.sdp_api();
        let own = [MediaKind::Audio, MediaKind::Video].map(|kind| {
            (
                api.add_media(kind, Direction::SendRecv, Some(stream.clone()), None, None),
                kind,
            )
        });
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| SfuError::InvalidSdp("no offer to make".into()))?;
        let pending = PendingOffer {
            pending,
            added: Vec::new(),
            redirected: Vec::new(),
            own: own.to_vec(),
            reused: Vec::new(),
        };
        let offer = own_msid(&offer.to_sdp_string(), &stream, |_| false);
        let id = self.insert_session(now, room, participant, (rtc, sealer), Some(pending), OwnLines::BothWays);
        Ok((id, offer))
    }

    /// Adds a new session to its room; it will subscribe to everything already
    /// published there.
    fn insert_session(
        &mut self,
        now: Instant,
        room: RoomId,
        participant: Participant,
        (mut rtc, sealer): (Rtc, srtp::Sealer),
        pending: Option<PendingOffer>,
        own_lines: OwnLines,
    ) -> SessionId {
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let id = SessionId(self.next_id());
        let wanted = self
            .rooms
            .get(&room)
            .map(|r| r.tracks.iter().map(|t| Change::Subscribe(*t)).collect())
            .unwrap_or_default();
        let session = Session {
            room: room.clone(),
            participant,
            rtc,
            ufrag: ufrag.clone(),
            next_timeout: now,
            scheduled: None,
            dirty: false,
            single_stream: false,
            own_lines,
            connect_deadline: Some(now + self.config.connect_timeout),
            addrs: Vec::new(),
            published: FastMap::default(),
            ssrc_tracks: FastMap::default(),
            subscriptions: FastMap::default(),
            wanted,
            pending,
            stats: SessionStats::default(),
            sealer,
            ingress: ingress::Ingress::new(*Ssrc::new(), now),
            rtcp_at: None,
            lines: FastMap::default(),
            idle: Vec::new(),
            labels: FastMap::default(),
        };
        self.sessions.insert(id, Box::new(session));
        self.out
            .deadlines
            .push(Reverse((now + self.config.connect_timeout, id)));
        self.by_ufrag.insert(ufrag, id);
        self.rooms.entry(room).or_default().sessions.push(id);
        self.drain(id);
        self.process(now);
        id
    }

    /// A renegotiation offer for the session's pending subscription changes, or
    /// `None` if there are none or an offer is already waiting for its answer.
    pub fn create_offer(&mut self, now: Instant, id: SessionId) -> Result<Option<Offer>, SfuError> {
        self.advance(now);
        let session = self.sessions.get_mut(&id).ok_or(SfuError::UnknownSession)?;
        if session.pending.is_some() || session.wanted.is_empty() {
            return Ok(None);
        }
        let (subscribes, others): (Vec<Change>, Vec<Change>) = std::mem::take(&mut session.wanted)
            .into_iter()
            .partition(|change| matches!(change, Change::Subscribe(_)));
        // Each new track takes an idle m-line of its kind if there is one.
        let mut subscribe: Vec<(TrackId, Option<IdleLine>)> = Vec::new();
        for change in subscribes {
            let Change::Subscribe(track_id) = change else { continue };
            let Some(track) = self.tracks.get(&track_id) else {
                continue;
            };
            let already = session.subscriptions.values().any(|s| s.track == track_id)
                || subscribe.iter().any(|(t, _)| *t == track_id);
            if !already && track.publisher != id {
                subscribe.push((track_id, session.take_idle(track.kind)));
            }
        }
        let mut added = Vec::new();
        let mut reused = Vec::new();
        let mut api = session.rtc.sdp_api();
        for (track_id, idle) in subscribe {
            let Some(track) = self.tracks.get(&track_id) else {
                session.idle.extend(idle);
                continue;
            };
            let track_label = msid_token(&format!("{}-{}", track.stream_id, track.kind));
            let mid = match idle {
                Some(line) => {
                    tracing::debug!(session = %id, mid = %line.mid, stream = %track.stream_id, "taking over an idle m-line");
                    api.set_direction(line.mid, Direction::SendOnly);
                    session.labels.insert(line.mid, (track.stream_id.clone(), track_label));
                    let mid = line.mid;
                    reused.push(line);
                    mid
                }
                None => api.add_media(
                    track.kind,
                    Direction::SendOnly,
                    Some(track.stream_id.clone()),
                    Some(track_label),
                    None,
                ),
            };
            added.push((mid, track_id));
        }
        let mut redirected = Vec::new();
        for change in others {
            if let Change::Direction(mid, direction) | Change::OwnLine(mid, direction) = change {
                api.set_direction(mid, direction);
                redirected.push(change);
            }
        }
        let Some((offer, pending)) = api.apply() else {
            return Ok(None);
        };
        session.pending = Some(PendingOffer {
            pending,
            added,
            redirected,
            own: Vec::new(),
            reused,
        });
        let sdp = session.our_sdp(&offer.to_sdp_string());
        self.drain(id);
        self.process(now);
        Ok(Some(Offer {
            sdp,
            streams: self.streams_of(id),
        }))
    }

    /// Applies the peer's answer to our last offer.
    pub fn accept_answer(&mut self, now: Instant, id: SessionId, answer: &str) -> Result<(), SfuError> {
        self.advance(now);
        if answer.len() > self.config.max_sdp_bytes {
            return Err(SfuError::SdpTooLarge(self.config.max_sdp_bytes));
        }
        let answer = refused_on_panic(|| SdpAnswer::from_sdp_string(answer))?
            .map_err(|e| SfuError::InvalidSdp(e.to_string()))?;
        let session = self.sessions.get_mut(&id).ok_or(SfuError::UnknownSession)?;
        let pending = session.pending.take().ok_or(SfuError::NoPendingOffer)?;
        let PendingOffer {
            pending,
            added,
            redirected,
            own,
            mut reused,
        } = pending;
        let accepted = contained(id, &mut self.out, || {
            session.rtc.sdp_api().accept_answer(pending, answer)
        })
        .ok_or_else(stack_failed)?;
        if let Err(e) = accepted {
            // Our changes did not take: ask for them again in the next offer.
            // M-lines it took over go inactive first (the peer may have
            // taken the offer), then idle again.
            session.requeue(&added, &redirected);
            for mut line in reused {
                line.settled = false;
                session.wanted.push(Change::Direction(line.mid, Direction::Inactive));
                session.idle.push(line);
            }
            return Err(e.into());
        }
        session.settle_idle();
        // A callee's m-lines of our first offer carry nothing of ours unless
        // it becomes single-stream (which drops these changes); its own later
        // offers are then read as publish-only too.
        if !own.is_empty() && !session.single_stream {
            session.own_lines = OwnLines::PublishOnly;
        }
        // (Where it only receives, it answered receive-only: nothing either way then.)
        session.wanted.extend(
            own.iter()
                .filter_map(|(mid, _)| match session.rtc.media(*mid)?.direction() {
                    Direction::SendRecv => Some(Change::OwnLine(*mid, Direction::RecvOnly)),
                    Direction::SendOnly => Some(Change::OwnLine(*mid, Direction::Inactive)),
                    _ => None,
                }),
        );
        let publishes: Vec<(Mid, MediaKind, Direction)> = own
            .into_iter()
            .filter_map(|(mid, kind)| session.rtc.media(mid).map(|m| (mid, kind, m.direction())))
            .collect();
        for (mid, track_id) in added {
            // On an m-line taken over, the numbering goes on from its last track.
            let carried = reused
                .iter()
                .position(|line| line.mid == mid)
                .map(|i| reused.swap_remove(i).forwarder);
            let Some(track) = self.tracks.get_mut(&track_id) else {
                // Its track left before the answer: the m-line goes inactive
                // and is idle for the next one.
                session.wanted.push(Change::Direction(mid, Direction::Inactive));
                if let Some(kind) = session.rtc.media(mid).map(|m| m.kind()) {
                    session.idle.push(IdleLine {
                        mid,
                        kind,
                        forwarder: carried.unwrap_or_else(|| forwarder_for(kind)),
                        settled: false,
                    });
                }
                continue;
            };
            let forwarder = match carried {
                Some(mut forwarder) => {
                    forwarder.switch_source();
                    forwarder
                }
                None => forwarder_for(track.kind),
            };
            let target = simulcast::select(&track.layers, now, None, simulcast::Quality::High);
            session.subscriptions.insert(
                mid,
                Subscription {
                    track: track_id,
                    layer: None,
                    target,
                    max_quality: simulcast::Quality::High,
                    forwarder,
                    pt_map: Vec::new(),
                    direct: None,
                    our_mline: true,
                },
            );
            track.subscribers.push((id, mid));
            session.lines.entry(mid).or_insert_with(|| vec![None]);
            // Forwarded media goes out at once: an SFU relays what arrives as it
            // arrives (the publisher already paced it); bandwidth is managed by
            // choosing simulcast layers, not by queueing.
            if let Some(tx) = session.rtc.direct_api().stream_tx_by_mid(mid, None) {
                tx.set_unpaced(true);
            }
            self.out.stats.subscriptions += 1;
        }
        let renegotiate = !session.wanted.is_empty() && session.rtc.is_connected();
        self.drain(id);
        for (mid, kind, direction) in publishes {
            self.on_media_added(now, id, mid, kind, direction, vec![None]);
        }
        if renegotiate {
            self.events.push_back(SfuEvent::NegotiationNeeded(id));
        }
        self.process(now);
        Ok(())
    }

    /// Handles an offer from the peer (it renegotiates: ICE restart, new
    /// tracks) and returns our answer. An offer of ours still waiting is
    /// dropped and its changes are asked for again afterwards.
    pub fn accept_offer(&mut self, now: Instant, id: SessionId, sdp: &str) -> Result<String, SfuError> {
        self.advance(now);
        let session = self.sessions.get(&id).ok_or(SfuError::UnknownSession)?;
        // Publish-only: still nothing of ours on its own m-lines (new ones
        // included); the m-lines we send on stay as they are (not those a
        // pending offer of ours took over: that offer is about to be dropped).
        let offer = self.parse_offer(sdp, session.own_lines, |mid| {
            let mid = Mid::from(mid);
            !session.offer_takes_over(mid) && session.rtc.media(mid).is_some_and(|m| m.direction().is_sending())
        })?;
        let session = self.sessions.get_mut(&id).ok_or(SfuError::UnknownSession)?;
        if let Some(pending) = session.pending.take() {
            session.requeue(&pending.added, &pending.redirected);
            // The peer never took that offer: m-lines it took over are still
            // inactive there, and are so again here before we answer.
            for line in pending.reused {
                session.rtc.sdp_api().set_direction(line.mid, Direction::Inactive);
                session.idle.push(line);
            }
        }
        let answer =
            contained(id, &mut self.out, || session.rtc.sdp_api().accept_offer(offer)).ok_or_else(stack_failed)??;
        session.settle_idle();
        let answer = session.our_sdp(&answer.to_sdp_string());
        // A browser's addTrack reuses a transceiver that never sent, such as
        // one of ours it only receives on (matrix-js-sdk's screen share does
        // this): the peer now sends on that m-line too, a track of its own.
        // So does an m-line of its own it stopped sending on and sends on
        // again (a screen share restarted on the same transceiver). New
        // m-lines come as str0m's MediaAdded.
        let resumed: Vec<PublishedLine> = session
            .lines
            .iter()
            .filter(|(mid, _)| !session.published.contains_key(*mid))
            .filter_map(|(mid, rids)| {
                let media = session.rtc.media(*mid)?;
                if !media.direction().is_receiving() {
                    return None;
                }
                let publisher_stream_id = sdp::stream_of(sdp, mid).unwrap_or_else(|| media.stream_id().to_string());
                Some(PublishedLine {
                    mid: *mid,
                    kind: media.kind(),
                    direction: media.direction(),
                    rids: rids.clone(),
                    publisher_stream_id,
                })
            })
            .collect();
        // What renegotiated may have new SSRCs or extension ids (a resend
        // must be byte for byte the packet first sealed under its index: a
        // stream's header layout never changes, so it starts afresh).
        session.subscriptions.values_mut().for_each(|s| s.direct = None);
        let renegotiate = !session.wanted.is_empty() && session.rtc.is_connected();
        self.drain(id);
        for line in resumed {
            self.publish(now, id, line);
        }
        if renegotiate {
            self.events.push_back(SfuEvent::NegotiationNeeded(id));
        }
        self.process(now);
        Ok(answer)
    }

    /// Closes a session: its tracks leave every subscriber (who get a
    /// renegotiation), its subscriptions end, and DTLS is closed politely.
    pub fn close_session(&mut self, now: Instant, id: SessionId) {
        self.advance(now);
        self.remove_session(now, id);
        self.process(now);
    }

    /// Whether simulcast was published in `room` (see [`Room::simulcast`]).
    fn room_simulcasts(&self, room: &RoomId) -> bool {
        self.rooms.get(room).is_some_and(|r| r.simulcast)
    }

    /// The streams a session receives (including those of a pending offer).
    pub fn streams_of(&self, id: SessionId) -> Vec<StreamInfo> {
        let Some(session) = self.sessions.get(&id) else {
            return Vec::new();
        };
        let pending = session.pending.iter().flat_map(|p| p.added.iter().map(|(_, t)| *t));
        let mut streams: Vec<StreamInfo> = Vec::new();
        for track_id in session.subscriptions.values().map(|s| s.track).chain(pending) {
            let Some(track) = self.tracks.get(&track_id) else {
                continue;
            };
            let Some(publisher) = self.sessions.get(&track.publisher) else {
                continue;
            };
            let audio = track.kind == MediaKind::Audio;
            match streams.iter_mut().find(|s| s.stream_id == track.stream_id) {
                Some(s) => {
                    s.audio |= audio;
                    s.video |= !audio;
                }
                None => streams.push(StreamInfo {
                    stream_id: track.stream_id.clone(),
                    publisher: publisher.participant.clone(),
                    publisher_stream_id: track.publisher_stream_id.clone(),
                    audio,
                    video: !audio,
                }),
            }
        }
        streams.sort_by(|a, b| a.stream_id.cmp(&b.stream_id));
        streams
    }

    pub fn session_stats(&self, id: SessionId) -> Option<SessionStats> {
        self.sessions.get(&id).map(|s| s.stats.clone())
    }

    pub fn stats(&self) -> ShardStats {
        let mut stats = self.out.stats.clone();
        stats.sessions = self.sessions.len() as u64;
        stats.rooms = self.rooms.len() as u64;
        stats.tracks = self.tracks.len() as u64;
        self.add_mixer_stats(&mut stats);
        stats
    }

    /// The room's current dominant speaker, if anyone has spoken.
    pub fn active_speaker(&self, room: &RoomId) -> Option<SessionId> {
        self.rooms.get(room).and_then(|r| r.speaker)
    }

    pub fn is_connected(&self, id: SessionId) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.rtc.is_connected())
    }

    /// A peer's offer, size-checked before anything reads it, its own
    /// m-lines made send-only for a `PublishOnly` session (except those `keep`
    /// names, see [`publish_only`]).
    fn parse_offer(&self, offer: &str, own_lines: OwnLines, keep: impl Fn(&str) -> bool) -> Result<SdpOffer, SfuError> {
        if offer.len() > self.config.max_sdp_bytes {
            return Err(SfuError::SdpTooLarge(self.config.max_sdp_bytes));
        }
        let offer = match own_lines {
            OwnLines::PublishOnly => publish_only(offer, keep),
            OwnLines::BothWays => offer.to_owned(),
        };
        // The parser keeps no state: a panic in it is only this SDP's error.
        refused_on_panic(|| SdpOffer::from_sdp_string(&offer))?.map_err(|e| SfuError::InvalidSdp(e.to_string()))
    }

    // ---- the driver's API ----------------------------------------------------

    /// A datagram arrived on the shard's socket.
    pub fn handle_receive(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, data: &[u8]) {
        self.handle_receive_at(now, now, source, destination, data);
    }

    /// A datagram that arrived on the shard's socket at `arrived` (the
    /// kernel's time stamp), handled `now`. The arrival time is what the
    /// transport-wide feedback and jitter of the media we open are made of:
    /// a sender's bandwidth estimator must see the network's delays, not
    /// when the shard got round to the datagram.
    pub fn handle_receive_at(
        &mut self,
        now: Instant,
        arrived: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) {
        self.advance(now);
        self.out.stats.datagrams_in += 1;
        let known = self.by_addr.get(&source).copied();
        let id = match known {
            Some(id) => id,
            None => match self.session_for_stun(data) {
                Some(id) => id,
                None => return self.out.stats.drop(DropReason::UnknownSource),
            },
        };
        let Some(session) = self.sessions.get_mut(&id) else {
            return self.out.stats.drop(DropReason::UnknownSource);
        };
        if known.is_none() {
            // STUN from a new address: only a request that authenticates with
            // this session's ICE password binds the address to it.
            let Ok(receive) = Receive::new(Protocol::Udp, source, destination, data) else {
                return self.out.stats.drop(DropReason::Malformed);
            };
            if !session.rtc.accepts(&Input::Receive(now, receive)) {
                return self.out.stats.drop(DropReason::BadStun);
            }
            session.addrs.push(source);
            session.sealer.forget_route();
            self.by_addr.insert(source, id);
        }
        session.stats.datagrams_in += 1;
        session.stats.bytes_in += data.len() as u64;
        if nack::is_rtcp(data) {
            read_rtcp(now, session, data, &mut self.out);
        } else if is_rtp(data) && self.open_media(now, arrived.min(now), id, data) {
            return self.process(now);
        }
        // (Parsed for str0m only here: what we open never needs it.)
        let Ok(receive) = Receive::new(Protocol::Udp, source, destination, data) else {
            return self.out.stats.drop(DropReason::Malformed);
        };
        let input = Input::Receive(now, receive);
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if contained(id, &mut self.out, || session.rtc.handle_input(input)).is_some_and(|r| r.is_err()) {
            self.out.stats.drop(DropReason::Rejected);
        }
        self.drain(id);
        self.process(now);
    }

    /// An RTP datagram of session `id`, opened and forwarded here if the
    /// session's media is ours to open ([`ingress`]): `false` leaves it to str0m.
    fn open_media(&mut self, now: Instant, arrived: Instant, id: SessionId, data: &[u8]) -> bool {
        let Some(session) = self.sessions.get_mut(&id) else {
            return false;
        };
        // Sessions that estimate bandwidth (simulcast rooms) keep str0m's
        // path, as for what they receive; so do those without keys of ours.
        if !session.sealer.seals_video() || !session.sealer.opens() {
            return false;
        }
        let Some(header) = ingress::Header::parse(data) else {
            self.out.stats.drop(DropReason::Malformed);
            return true;
        };
        let at = match session.ingress.route(header.ssrc, now) {
            ingress::Route::Ours(at) => at,
            ingress::Route::New => {
                // Transport-wide sequence numbers, if negotiated on any m-line (BUNDLE:
                // one id for all; some peers negotiate them for video only).
                let rtc = &session.rtc;
                let twcc = session.published.keys().find_map(|mid| {
                    rtc.media(*mid)?
                        .remote_extmap()
                        .id_of(Extension::TransportSequenceNumber)
                });
                if let Some(id) = twcc {
                    session.ingress.set_twcc(id, now);
                }
                match session.ingress.add(header.ssrc, now) {
                    Some(at) => at,
                    None => {
                        self.out.stats.drop(DropReason::NoTrack);
                        return true;
                    }
                }
            }
            ingress::Route::Full => {
                self.out.stats.drop(DropReason::NoTrack);
                return true;
            }
        };
        let authentic = session
            .ingress
            .authenticate(at, &mut session.sealer, data, &header, now, arrived);
        // What an SSRC carries is learnt from an authentic packet only.
        let opening = match authentic {
            Ok(authentic) => {
                if matches!(session.ingress.role(at), Some(ingress::Role::Unknown)) {
                    let role = match role_of(session, &self.tracks, &header) {
                        ingress::Role::Unknown => {
                            session.ingress.forgotten(header.ssrc).unwrap_or(ingress::Role::Unknown)
                        }
                        role => role,
                    };
                    session.ingress.set_role(at, role);
                }
                session.ingress.take(at, &header, authentic, now, arrived)
            }
            Err(otherwise) => otherwise,
        };
        let packet = match opening {
            ingress::Opening::NoKeys => return false,
            ingress::Opening::Rejected => {
                self.out.stats.drop(DropReason::Rejected);
                None
            }
            ingress::Opening::Consumed => None,
            ingress::Opening::Opened(opened) => match session.published.get(&opened.mid) {
                // The track published on its m-line now (none while it stopped).
                None => {
                    self.out.stats.drop(DropReason::NoTrack);
                    None
                }
                Some(&track) => Some(Incoming {
                    ssrc: opened.ssrc.into(),
                    seq: opened.seq,
                    timestamp: header.timestamp,
                    pt: opened.pt.into(),
                    marker: header.marker,
                    ext: ExtensionValues {
                        audio_level: opened.level.map(|(level, _)| level),
                        voice_activity: opened.level.map(|(_, voice)| voice),
                        video_orientation: opened.orientation.map(|o| VideoOrientation::from(o & 0b11)),
                        ..Default::default()
                    },
                    payload: Arc::from(opened.payload),
                    arrival: now,
                    track: Some((track, opened.layer)),
                }),
            },
        };
        schedule_rtcp(id, session, &mut self.out);
        if let Some(packet) = packet {
            self.out.stats.packets_opened += 1;
            self.forward(now, id, packet);
        }
        true
    }

    /// Sends the RTCP of ours that is due: receiver reports, NACKs,
    /// transport-wide feedback and keyframe requests on the media we open.
    fn send_rtcp(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.out.rtcp.peek() {
            if at > now {
                break;
            }
            self.out.rtcp.pop();
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            if session.rtcp_at != Some(at) {
                continue; // superseded
            }
            session.rtcp_at = None;
            if !session.sealer.has_route() {
                // Where to is not known again yet: what is due waits.
                session.rtcp_at = Some(now + RTCP_RETRY);
                self.out.rtcp.push(Reverse((now + RTCP_RETRY, id)));
                continue;
            }
            let (compounds, loss) = session.ingress.poll_rtcp(now);
            if let Some(loss) = loss {
                session.stats.ingress_loss = Some(loss);
            }
            for transmit in compounds.iter().filter_map(|c| session.sealer.seal_rtcp(c)) {
                session.stats.datagrams_out += 1;
                session.stats.bytes_out += transmit.contents.len() as u64;
                self.out.stats.datagrams_out += 1;
                self.out.transmits.push_back(transmit);
            }
            schedule_rtcp(id, session, &mut self.out);
        }
    }

    fn session_for_stun(&self, data: &[u8]) -> Option<SessionId> {
        let message = str0m::ice::StunMessage::parse(data).ok()?;
        if !message.is_binding_request() {
            return None;
        }
        let (ours, _theirs) = message.split_username()?;
        self.by_ufrag.get(ours).copied()
    }

    /// Time passed: run sessions whose timer is due (up to [`TIMERS_PER_CALL`];
    /// [`Sfu::poll_timeout`] then says the rest are due), and close sessions
    /// that never connected.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut budget = TIMERS_PER_CALL;
        self.advance(now);
        self.flush();
        while let Some(&Reverse((at, id))) = self.out.deadlines.peek() {
            if at > now {
                break;
            }
            self.out.deadlines.pop();
            if self.sessions.get(&id).is_some_and(|s| s.connect_deadline == Some(at)) {
                self.events.push_back(SfuEvent::Closed(id, CloseReason::ConnectTimeout));
                self.remove_session(now, id);
            }
        }
        while let Some(&Reverse((at, id))) = self.out.timers.peek() {
            if at > now || budget == 0 {
                break;
            }
            self.out.timers.pop();
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            if session.scheduled != Some(at) {
                continue; // superseded by an earlier entry
            }
            session.scheduled = None;
            if session.next_timeout > now {
                // The timer moved later since this entry was queued.
                session.scheduled = Some(session.next_timeout);
                self.out.timers.push(Reverse((session.next_timeout, id)));
                continue;
            }
            self.out.stats.session_timeouts += 1;
            budget -= 1;
            let timeout = || session.rtc.handle_input(Input::Timeout(now));
            if contained(id, &mut self.out, timeout).is_some_and(|r| r.is_err()) {
                self.out.stats.drop(DropReason::Rejected);
            }
            self.drain(id);
        }
        self.send_rtcp(now);
        if self.next_layer_check.is_none_or(|at| at <= now) {
            self.next_layer_check = Some(now + LAYER_CHECK_INTERVAL);
            self.select_layers(now);
        }
        self.run_mixers(now);
        self.process(now);
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.flush();
        self.out.transmits.pop_front()
    }

    /// Hands back a datagram that was sent: its buffer carries a later one
    /// (nothing allocated per forwarded packet once the shard is warm).
    pub fn recycle(&mut self, transmit: Transmit) {
        let buffer = Vec::from(transmit.contents);
        if self.out.spare.len() < SPARE_BUFFERS && buffer.capacity() <= SPARE_CAPACITY {
            self.out.spare.push(buffer);
        }
    }

    /// Datagrams queued to send (those sealed by the SFU itself, and what
    /// str0m emitted since the last flush): the driver may send them before
    /// its read slice is over.
    pub fn transmits_ready(&self) -> usize {
        self.out.transmits.len()
    }

    pub fn poll_event(&mut self) -> Option<SfuEvent> {
        self.flush();
        self.events.pop_front()
    }

    /// Remembers the latest time an input brought (time never goes back).
    fn advance(&mut self, now: Instant) {
        self.now = Some(self.now.map_or(now, |t| t.max(now)));
    }

    /// Sends what was written to subscribers during the last inputs: one str0m
    /// timeout per written-to session (where it packetizes, encrypts and
    /// emits), instead of one per packet.
    fn flush(&mut self) {
        let Some(now) = self.now else { return };
        if self.dirty.is_empty() {
            return;
        }
        for id in std::mem::take(&mut self.dirty) {
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            session.dirty = false;
            let timeout = || session.rtc.handle_input(Input::Timeout(now));
            if contained(id, &mut self.out, timeout).is_some_and(|r| r.is_err()) {
                self.out.stats.drop(DropReason::Rejected);
            }
            drain_session(id, session, &mut self.out);
        }
        self.process(now);
    }

    /// When to call [`Sfu::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // The heap's top may be stale: then the caller wakes a little early, harmlessly.
        let timers = [self.out.timers.peek(), self.out.deadlines.peek(), self.out.rtcp.peek()]
            .into_iter()
            .flatten()
            .map(|Reverse((at, _))| *at)
            .min();
        let layers = if self.sessions.is_empty() {
            None
        } else {
            [self.next_layer_check, self.next_mix].into_iter().flatten().min()
        };
        match (timers, layers) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- internals -------------------------------------------------------------

    /// Drains one session's output: transmits are queued, events deferred.
    fn drain(&mut self, id: SessionId) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        drain_session(id, session, &mut self.out);
    }

    /// Acts on deferred str0m events until none are left.
    fn process(&mut self, now: Instant) {
        loop {
            // Failed sessions go first: nothing more is written to their stack
            // (their pending events find no session and are skipped).
            while let Some(id) = self.out.broken.pop() {
                if self.sessions.contains_key(&id) {
                    self.events.push_back(SfuEvent::Closed(id, CloseReason::Failed));
                    self.remove_session(now, id);
                }
            }
            let Some((id, event)) = self.out.deferred.pop_front() else {
                break;
            };
            self.on_event(now, id, event);
        }
    }

    fn on_event(&mut self, now: Instant, id: SessionId, event: Event) {
        match event {
            Event::RtpPacket(packet) => self.forward(now, id, packet.into()),
            Event::Connected => {
                let Some(session) = self.sessions.get_mut(&id) else {
                    return;
                };
                session.connect_deadline = None;
                self.events.push_back(SfuEvent::Connected(id));
                if !session.wanted.is_empty() {
                    self.events.push_back(SfuEvent::NegotiationNeeded(id));
                }
            }
            Event::MediaAdded(added) => {
                let rids = match &added.simulcast {
                    Some(simulcast) if !simulcast.recv.is_empty() => {
                        simulcast.recv.iter().map(|layer| Some(layer.rid)).collect()
                    }
                    _ => vec![None],
                };
                self.on_media_added(now, id, added.mid, added.kind, added.direction, rids)
            }
            Event::MediaChanged(changed) if !changed.direction.is_receiving() => {
                self.stop_publishing(now, id, changed.mid);
            }
            Event::KeyframeRequest(request) => {
                let Some(session) = self.sessions.get(&id) else { return };
                if let Some(track) = session.subscriptions.get(&request.mid).map(|s| s.track) {
                    let layer = session
                        .subscriptions
                        .get(&request.mid)
                        .map_or(0, |s| s.layer.unwrap_or(s.target));
                    self.request_keyframe(now, track, layer);
                }
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected)
                if self.sessions.get(&id).is_some_and(|s| s.connect_deadline.is_none()) =>
            {
                self.events.push_back(SfuEvent::Closed(id, CloseReason::Disconnected));
                self.remove_session(now, id);
            }
            Event::IceConnectionStateChange(_) => {
                if let Some(session) = self.sessions.get_mut(&id) {
                    session.sealer.forget_route();
                }
            }
            Event::Closed => {
                self.events.push_back(SfuEvent::Closed(id, CloseReason::PeerClosed));
                self.remove_session(now, id);
            }
            Event::MediaIngressStats(s) => {
                if let Some(session) = self.sessions.get_mut(&id) {
                    session.stats.ingress_loss = s.loss.or(session.stats.ingress_loss);
                    session.stats.rtt = s.rtt.or(session.stats.rtt);
                }
            }
            Event::MediaEgressStats(s) => {
                if let Some(session) = self.sessions.get_mut(&id) {
                    session.stats.egress_loss = s.loss.or(session.stats.egress_loss);
                    session.stats.rtt = s.rtt.or(session.stats.rtt);
                }
            }
            Event::PeerStats(peer) => {
                if let Some(session) = self.sessions.get_mut(&id) {
                    // Our counters: str0m's see none of what we seal ourselves.
                    let (bytes_in, bytes_out) = (session.stats.bytes_in, session.stats.bytes_out);
                    session.stats.update_rates(peer.timestamp, bytes_in, bytes_out);
                    session.stats.rtt = peer.rtt.or(session.stats.rtt);
                }
            }
            Event::EgressBitrateEstimate(estimate) => {
                if let (Some(session), str0m::bwe::BweKind::Twcc { estimate, .. }) =
                    (self.sessions.get_mut(&id), estimate)
                {
                    session.stats.egress_estimate_bps = Some(estimate.as_u64());
                }
            }
            _ => {}
        }
    }

    /// The peer sends on a new m-line: a new track, which everyone else in the room subscribes to.
    fn on_media_added(
        &mut self,
        now: Instant,
        id: SessionId,
        mid: Mid,
        kind: MediaKind,
        direction: Direction,
        rids: Vec<Option<Rid>>,
    ) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if !direction.is_receiving() || session.published.contains_key(&mid) || session.subscriptions.contains_key(&mid)
        {
            return;
        }
        if session
            .pending
            .as_ref()
            .is_some_and(|p| p.added.iter().any(|(m, _)| *m == mid))
        {
            return;
        }
        let Some(media) = session.rtc.media(mid) else { return };
        let publisher_stream_id = media.stream_id().to_string();
        let line = PublishedLine {
            mid,
            kind,
            direction,
            rids,
            publisher_stream_id,
        };
        self.publish(now, id, line);
    }

    /// A new track of session `id`: every other session in the room
    /// subscribes to it.
    fn publish(&mut self, now: Instant, id: SessionId, line: PublishedLine) {
        let PublishedLine {
            mid,
            kind,
            direction,
            rids,
            publisher_stream_id,
        } = line;
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        session.lines.insert(mid, rids.clone());
        let codecs = session
            .rtc
            .codec_config()
            .params()
            .iter()
            .map(|p| (p.pt(), *p))
            .collect();
        let track_id = TrackId(self.next_id);
        self.next_id += 1;
        let stream_id = msid_token(&format!("sb{}-{}", id.0, publisher_stream_id));
        tracing::debug!(session = %id, %mid, stream = %stream_id, "publishing a track");
        let room = session.room.clone();
        session.published.insert(mid, track_id);
        let own_line = session.single_stream && direction.is_sending();
        self.tracks.insert(
            track_id,
            Track {
                room: room.clone(),
                publisher: id,
                mid,
                kind,
                stream_id,
                publisher_stream_id,
                subscribers: Vec::new(),
                codecs,
                last_keyframe_request: None,
                level: speaker::LevelMeter::default(),
                next_speaker_check: None,
                layers: rids.into_iter().map(simulcast::Layer::new).collect(),
            },
        );
        if own_line {
            self.bind_single_stream(now, id, mid, kind);
        }
        let Some(room) = self.rooms.get_mut(&room) else { return };
        room.simulcast |= self.tracks.get(&track_id).is_some_and(|t| t.layers.len() > 1);
        room.tracks.push(track_id);
        for other in room.sessions.clone() {
            if other == id {
                continue;
            }
            let Some(session) = self.sessions.get_mut(&other) else {
                continue;
            };
            if session.single_stream {
                continue;
            }
            session.wanted.push(Change::Subscribe(track_id));
            if session.rtc.is_connected() && session.pending.is_none() {
                self.events.push_back(SfuEvent::NegotiationNeeded(other));
            }
        }
        let room_id = self.tracks.get(&track_id).map(|t| t.room.clone());
        if let Some(room_id) = room_id {
            self.retarget_single_stream(now, &room_id);
        }
    }

    /// Asks a track's publisher for a keyframe on `layer`, at most once per interval.
    fn request_keyframe(&mut self, now: Instant, track_id: TrackId, layer: usize) {
        let interval = self.config.keyframe_request_interval;
        let Some(track) = self.tracks.get_mut(&track_id) else {
            return;
        };
        if track.kind != MediaKind::Video || track.last_keyframe_request.is_some_and(|t| now < t + interval) {
            return;
        }
        let Some(publisher) = self.sessions.get_mut(&track.publisher) else {
            return;
        };
        let publisher_id = track.publisher;
        // A stream we open gets our PLI; str0m's its own.
        if publisher.ingress.request_keyframe(track.mid, layer) {
            track.last_keyframe_request = Some(now);
            self.out.stats.keyframe_requests += 1;
            schedule_rtcp(publisher_id, publisher, &mut self.out);
            return;
        }
        let mut api = publisher.rtc.direct_api();
        let rid = track.layers.get(layer).and_then(|l| l.rid);
        let Some(rx) = api.stream_rx_by_mid(track.mid, rid) else {
            return;
        };
        rx.request_keyframe(KeyframeRequestKind::Pli);
        track.last_keyframe_request = Some(now);
        self.out.stats.keyframe_requests += 1;
        self.drain(publisher_id);
    }

    /// The hot path: one RTP packet from a publisher to every subscriber of its track.
    fn forward(&mut self, now: Instant, from: SessionId, packet: Incoming) {
        let Some(publisher) = self.sessions.get_mut(&from) else {
            return;
        };
        publisher.stats.packets_in += 1;
        let ssrc = packet.ssrc;
        let known = packet.track.or_else(|| publisher.ssrc_tracks.get(&ssrc).copied());
        let (track_id, layer) = match known {
            Some(known) => known,
            None => {
                let stream = publisher
                    .rtc
                    .direct_api()
                    .stream_rx(&ssrc)
                    .map(|rx| (rx.mid(), rx.rid()));
                let Some((mid, rid)) = stream else {
                    return self.out.stats.drop(DropReason::NoTrack);
                };
                let Some(track_id) = publisher.published.get(&mid).copied() else {
                    return self.out.stats.drop(DropReason::NoTrack);
                };
                let Some(track) = self.tracks.get_mut(&track_id) else {
                    return self.out.stats.drop(DropReason::NoTrack);
                };
                let layer = match track.layers.iter().position(|l| l.rid == rid) {
                    Some(layer) => layer,
                    None => {
                        track.layers.push(simulcast::Layer::new(rid));
                        track.layers.len() - 1
                    }
                };
                publisher.ssrc_tracks.insert(ssrc, (track_id, layer));
                (track_id, layer)
            }
        };
        let speaker_check = {
            let Some(track) = self.tracks.get_mut(&track_id) else {
                return self.out.stats.drop(DropReason::NoTrack);
            };
            // Layers are measured to choose between them (a cache miss per
            // packet that a track without simulcast has no use for).
            if track.layers.len() > 1
                && let Some(meter) = track.layers.get_mut(layer)
            {
                meter.add(now, packet.payload.len());
            }
            match packet.ext.audio_level {
                Some(level) => {
                    track.level.add(now, level, packet.ext.voice_activity);
                    // The room's check runs at its own interval; a track asks
                    // for it at most as often (no room lookup per packet).
                    let due = track.next_speaker_check.is_none_or(|at| now >= at);
                    if due {
                        track.next_speaker_check = Some(now + speaker::CHECK_INTERVAL);
                    }
                    due.then(|| track.room.clone())
                }
                None => None,
            }
        };
        if let Some(room) = speaker_check {
            self.check_speaker(now, &room);
        }
        let Some(track) = self.tracks.get(&track_id) else {
            return self.out.stats.drop(DropReason::NoTrack);
        };
        let Some(params) = track.codecs.iter().find(|(pt, _)| *pt == packet.pt).map(|(_, p)| *p) else {
            return self.out.stats.drop(DropReason::UnknownPayloadType);
        };
        let codec = params.spec().codec;
        // (`next_mix` is set while any room mixes.)
        if codec == str0m::format::Codec::Opus
            && self.next_mix.is_some()
            && let Some(mix) = self.rooms.get_mut(&track.room).and_then(|r| r.mix.as_mut())
        {
            mix.feed(now, track_id, &packet);
        }
        let video = track.kind == MediaKind::Video;
        let keyframe = codec::starts_keyframe(codec, &packet.payload);
        let incoming = InPacket {
            seq: packet.seq,
            timestamp: packet.timestamp,
            arrival: packet.arrival,
            keyframe,
        };
        let ext = &packet.ext;
        let mut want_keyframe: Option<usize> = None;
        for &(sub_id, mid) in &track.subscribers {
            let Some(subscriber) = self.sessions.get_mut(&sub_id) else {
                continue;
            };
            let Some(subscription) = subscriber.subscriptions.get_mut(&mid) else {
                continue;
            };
            // Nothing can be written before DTLS-SRTP is up (a single-stream
            // subscription exists from the start, before the session connects).
            // (Our record of it: reading str0m's is a cache miss per packet.)
            if subscriber.connect_deadline.is_some() {
                self.out.stats.drop(DropReason::NotConnected);
                continue;
            }
            if subscription.layer != Some(layer) {
                if layer != subscription.target {
                    continue; // another layer than this subscriber's
                }
                if subscription.layer.is_some() {
                    // Moving to the target layer: only on one of its keyframes.
                    if !keyframe {
                        want_keyframe = Some(layer);
                        self.out.stats.drop(DropReason::WaitingForKeyframe);
                        continue;
                    }
                    subscription.forwarder.switch_source();
                }
            }
            let out = match subscription.forwarder.forward(incoming) {
                Ok(out) => {
                    subscription.layer = Some(layer);
                    out
                }
                Err(Skip::WaitingForKeyframe) => {
                    want_keyframe = Some(layer);
                    self.out.stats.drop(DropReason::WaitingForKeyframe);
                    continue;
                }
                Err(Skip::BeforeSwitch) => {
                    self.out.stats.drop(DropReason::BeforeSwitch);
                    continue;
                }
            };
            let pt = match subscription.pt_map.iter().find(|(src, _)| *src == params.pt()) {
                Some((_, dst)) => *dst,
                None => match subscriber.rtc.codec_config().match_params(params) {
                    Some(dst) => {
                        subscription.pt_map.push((params.pt(), dst.pt()));
                        dst.pt()
                    }
                    None => {
                        self.out.stats.drop(DropReason::CodecMismatch);
                        continue;
                    }
                },
            };
            if (!video || subscriber.sealer.seals_video())
                && let Some(stream) = direct_stream(now, &mut subscriber.rtc, &mut subscription.direct, mid, video)
            {
                let forwarded = srtp::Forwarded {
                    head: srtp::Head {
                        pt: *pt,
                        marker: packet.marker,
                        seq: out.seq,
                        timestamp: out.timestamp,
                        level: ext.audio_level.zip(ext.voice_activity).filter(|_| !video),
                        orientation: ext.video_orientation.map(|o| o as u8).filter(|_| video),
                    },
                    payload: &packet.payload,
                };
                if let Some(transmit) = subscriber.sealer.seal(now, stream, forwarded, &mut self.out.spare) {
                    subscriber.stats.packets_out += 1;
                    subscriber.stats.datagrams_out += 1;
                    subscriber.stats.bytes_out += transmit.contents.len() as u64;
                    self.out.stats.packets_forwarded += 1;
                    self.out.stats.packets_sealed += 1;
                    self.out.stats.datagrams_out += 1;
                    self.out.transmits.push_back(transmit);
                    continue;
                }
            }
            let mut api = subscriber.rtc.direct_api();
            let Some(tx) = api.stream_tx_by_mid(mid, None) else {
                self.out.stats.drop(DropReason::NoTrack);
                continue;
            };
            tx.write_rtp(
                RtpWrite::new(
                    pt,
                    out.seq.into(),
                    out.timestamp,
                    packet.arrival,
                    packet.payload.clone(),
                )
                .marker(packet.marker)
                .ext_vals(ext.clone())
                .nackable(video),
            );
            // str0m queues the packet and sends it on the session's next
            // timeout; `flush` runs that before the driver takes transmits, once
            // per subscriber however many packets it got in this batch.
            if !subscriber.dirty {
                subscriber.dirty = true;
                self.dirty.push(sub_id);
            }
            subscriber.stats.packets_out += 1;
            self.out.stats.packets_forwarded += 1;
        }
        if let Some(layer) = want_keyframe {
            self.request_keyframe(now, track_id, layer);
        }
    }

    /// Chooses each video subscription's simulcast layer from the bandwidth
    /// estimate towards its subscriber (shared equally among its video
    /// subscriptions) and the quality it asked for; a change asks the publisher
    /// for a keyframe on the new layer.
    fn select_layers(&mut self, now: Instant) {
        let mut keyframes = Vec::new();
        for session in self.sessions.values_mut() {
            let videos = session
                .subscriptions
                .values()
                .filter(|s| self.tracks.get(&s.track).is_some_and(|t| t.kind == MediaKind::Video))
                .count()
                .max(1) as u64;
            let budget = session.stats.egress_estimate_bps.map(|bps| bps / videos);
            for subscription in session.subscriptions.values_mut() {
                let Some(track) = self.tracks.get(&subscription.track) else {
                    continue;
                };
                if track.layers.len() < 2 {
                    continue;
                }
                let target = simulcast::select(&track.layers, now, budget, subscription.max_quality);
                if target != subscription.target {
                    subscription.target = target;
                    if subscription.layer.is_some_and(|l| l != target) {
                        keyframes.push((subscription.track, target));
                    }
                }
            }
        }
        for (track, layer) in keyframes {
            self.request_keyframe(now, track, layer);
        }
    }

    /// Caps the quality a session receives of a stream (by our stream id, as in
    /// [`Offer::streams`]): the signalling side's "requested size".
    pub fn set_max_quality(&mut self, now: Instant, id: SessionId, stream_id: &str, quality: simulcast::Quality) {
        self.advance(now);
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        for subscription in session.subscriptions.values_mut() {
            if self
                .tracks
                .get(&subscription.track)
                .is_some_and(|t| t.stream_id == stream_id)
            {
                subscription.max_quality = quality;
            }
        }
        self.select_layers(now);
        self.process(now);
    }

    /// Re-evaluates a room's dominant speaker, at most every [`speaker::CHECK_INTERVAL`].
    fn check_speaker(&mut self, now: Instant, room_id: &RoomId) {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        if room.next_speaker_check.is_some_and(|at| now < at) {
            return;
        }
        room.next_speaker_check = Some(now + speaker::CHECK_INTERVAL);
        let tracks = &self.tracks;
        let levels = room
            .tracks
            .iter()
            .filter_map(|t| tracks.get(t))
            .filter(|t| t.kind == MediaKind::Audio)
            .map(|t| (t.publisher, t.level.level(now)));
        if let Some(session) = speaker::choose(room.speaker, levels) {
            room.speaker = Some(session);
            room.speaker_since = Some(now);
            self.events.push_back(SfuEvent::ActiveSpeaker {
                room: room_id.clone(),
                session,
            });
        }
        // (Also after a hold-off expired without a change of speaker.)
        self.retarget_single_stream(now, room_id);
    }

    /// Makes a session receive one stream per kind on its own m-lines instead
    /// of one renegotiated stream per participant: the room's audio mixed
    /// without its own voice, and the active speaker's video (see
    /// `single_stream.rs`). For callers that cannot renegotiate (call protocol
    /// version 0) and those who ask for it.
    pub fn set_single_stream(&mut self, now: Instant, id: SessionId) {
        self.advance(now);
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        session.single_stream = true;
        session.own_lines = OwnLines::BothWays;
        // Nothing to subscribe to, and its own m-lines keep sending (the mix).
        session
            .wanted
            .retain(|c| !matches!(c, Change::Subscribe(_) | Change::OwnLine(..)));
        // Bind a subscription to each of its own m-lines we can send on.
        let own: Vec<(Mid, MediaKind)> = session
            .published
            .iter()
            .filter_map(|(mid, track)| self.tracks.get(track).map(|t| (*mid, t.kind)))
            .filter(|(mid, _)| session.rtc.media(*mid).is_some_and(|m| m.direction().is_sending()))
            .collect();
        let room = session.room.clone();
        for (mid, kind) in own {
            self.bind_single_stream(now, id, mid, kind);
        }
        self.drain(id);
        self.retarget_single_stream(now, &room);
        self.process(now);
    }

    /// Points the video of every single-stream session of a room at the
    /// current speaker once the speaker has held the floor for the hold-off
    /// (a session without a source gets one at once: the speaker, or before
    /// anyone spoke the first other publisher), never at its own. A switch
    /// keeps sequence numbers continuous and asks for a keyframe. (Audio is the
    /// room's mix: `single_stream.rs`.)
    fn retarget_single_stream(&mut self, now: Instant, room_id: &RoomId) {
        let Some(room) = self.rooms.get(room_id) else { return };
        let speaker = room.speaker;
        let settled = room
            .speaker_since
            .is_none_or(|since| now >= since + self.config.video_hold_off);
        let listeners: Vec<SessionId> = room
            .sessions
            .iter()
            .copied()
            .filter(|s| self.sessions.get(s).is_some_and(|s| s.single_stream))
            .collect();
        let mut keyframes = Vec::new();
        for listener in listeners {
            let fallback = speaker.filter(|s| *s != listener).or_else(|| {
                room.tracks
                    .iter()
                    .filter_map(|t| self.tracks.get(t))
                    .map(|t| t.publisher)
                    .find(|p| *p != listener)
            });
            let Some(session) = self.sessions.get_mut(&listener) else {
                continue;
            };
            for (mid, subscription) in session.subscriptions.iter_mut() {
                let Some(kind) = session.rtc.media(*mid).map(|m| m.kind()) else {
                    continue;
                };
                let current = self
                    .tracks
                    .get(&subscription.track)
                    .map(|t| t.publisher)
                    .filter(|p| *p != listener);
                let source = match (current, speaker) {
                    (Some(current), Some(speaker)) if settled && speaker != listener && speaker != current => speaker,
                    (Some(current), _) => current,
                    (None, _) => match fallback {
                        Some(source) => source,
                        None => continue,
                    },
                };
                let Some(new_track) = room.tracks.iter().copied().find(|t| {
                    self.tracks
                        .get(t)
                        .is_some_and(|t| t.publisher == source && t.kind == kind)
                }) else {
                    continue;
                };
                if subscription.track == new_track {
                    continue;
                }
                if let Some(old) = self.tracks.get_mut(&subscription.track) {
                    old.subscribers.retain(|(s, m)| !(*s == listener && m == mid));
                }
                if let Some(track) = self.tracks.get_mut(&new_track) {
                    track.subscribers.push((listener, *mid));
                    subscription.target = simulcast::select(&track.layers, now, None, subscription.max_quality);
                }
                subscription.track = new_track;
                subscription.layer = None;
                subscription.pt_map.clear();
                subscription.forwarder.switch_source();
                keyframes.push((new_track, subscription.target));
            }
        }
        for (track, layer) in keyframes {
            self.request_keyframe(now, track, layer);
        }
    }

    /// A track leaves its room: subscribers stop receiving it at once and
    /// renegotiate to deactivate its m-lines.
    fn unpublish(&mut self, track_id: TrackId) {
        let Some(track) = self.tracks.remove(&track_id) else {
            return;
        };
        if let Some(room) = self.rooms.get_mut(&track.room) {
            room.tracks.retain(|t| *t != track_id);
        }
        for (sub_id, mid) in track.subscribers {
            let Some(subscriber) = self.sessions.get_mut(&sub_id) else {
                continue;
            };
            if subscriber.single_stream {
                // Its own m-line stays; it gets another source.
                if let Some(subscription) = subscriber.subscriptions.get_mut(&mid) {
                    subscription.track = TrackId(0);
                }
                continue;
            }
            let subscription = subscriber.subscriptions.remove(&mid);
            // An m-line the subscriber reused to publish on stays open for that.
            let direction = if subscriber.published.contains_key(&mid) {
                Direction::RecvOnly
            } else {
                if let Some(subscription) = subscription.filter(|s| s.our_mline) {
                    subscriber.idle.push(IdleLine {
                        mid,
                        kind: track.kind,
                        forwarder: subscription.forwarder,
                        settled: false,
                    });
                }
                Direction::Inactive
            };
            subscriber.wanted.push(Change::Direction(mid, direction));
            self.out.stats.subscriptions = self.out.stats.subscriptions.saturating_sub(1);
            if subscriber.rtc.is_connected() && subscriber.pending.is_none() {
                self.events.push_back(SfuEvent::NegotiationNeeded(sub_id));
            }
        }
        for other in self.sessions.values_mut() {
            other.wanted.retain(|c| *c != Change::Subscribe(track_id));
        }
    }

    /// The publisher stopped sending on one of its m-lines (a screen share
    /// ended, a track removed): that track leaves the room.
    fn stop_publishing(&mut self, now: Instant, id: SessionId, mid: Mid) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        let Some(track_id) = session.published.remove(&mid) else {
            return;
        };
        session.ssrc_tracks.retain(|_, (track, _)| *track != track_id);
        let room_id = session.room.clone();
        self.unpublish(track_id);
        self.mix_drop_input(&room_id, track_id);
        self.retarget_single_stream(now, &room_id);
    }

    fn remove_session(&mut self, now: Instant, id: SessionId) {
        let Some(mut session) = self.sessions.remove(&id) else {
            return;
        };
        // Its tracks leave the room.
        for track_id in session.published.values() {
            self.unpublish(*track_id);
        }
        // Its subscriptions leave the fan-out lists.
        for (mid, subscription) in &session.subscriptions {
            if let Some(track) = self.tracks.get_mut(&subscription.track) {
                track.subscribers.retain(|(s, m)| !(*s == id && m == mid));
                self.out.stats.subscriptions = self.out.stats.subscriptions.saturating_sub(1);
            }
        }
        if let Some(room) = self.rooms.get_mut(&session.room) {
            room.sessions.retain(|s| *s != id);
            if room.speaker == Some(id) {
                room.speaker = None;
            }
        }
        self.mix_leave(id, &session.room, session.published.values().copied());
        if self.rooms.get(&session.room).is_some_and(|r| r.sessions.is_empty()) {
            self.rooms.remove(&session.room);
        }
        // Single-stream listeners that heard this session get another source.
        self.retarget_single_stream(now, &session.room);
        for addr in &session.addrs {
            self.by_addr.remove(addr);
        }
        self.by_ufrag.remove(&session.ufrag);
        // Say goodbye (RTCP BYE, DTLS close_notify) if we still can.
        if session.rtc.is_alive() && session.rtc.close().is_ok() {
            let deferred = self.out.deferred.len();
            drain_session(id, &mut session, &mut self.out);
            // Nothing it says now matters any more.
            self.out.deferred.truncate(deferred);
        }
    }
}

/// A publisher's RTP packet as forwarding reads it: opened by str0m (an
/// event) or by us ([`ingress`]).
struct Incoming {
    ssrc: Ssrc,
    /// Extended sequence number.
    seq: u64,
    timestamp: u32,
    pt: Pt,
    marker: bool,
    /// The extensions forwarded: audio level, voice activity, video orientation.
    ext: ExtensionValues,
    payload: Arc<[u8]>,
    arrival: Instant,
    /// Its track and layer, if whoever opened it knows them.
    track: Option<(TrackId, usize)>,
}

impl From<RtpPacket> for Incoming {
    fn from(packet: RtpPacket) -> Self {
        let ext = &packet.header.ext_vals;
        Self {
            ssrc: packet.header.ssrc,
            seq: *packet.seq_no,
            timestamp: packet.header.timestamp,
            pt: packet.header.payload_type,
            marker: packet.header.marker,
            ext: ExtensionValues {
                audio_level: ext.audio_level,
                voice_activity: ext.voice_activity,
                video_orientation: ext.video_orientation,
                ..Default::default()
            },
            payload: packet.payload,
            arrival: packet.timestamp,
            track: None,
        }
    }
}

/// The sinks sessions drain into.
#[derive(Default)]
struct Outputs {
    transmits: VecDeque<Transmit>,
    /// str0m events not yet acted upon (acting may touch other sessions).
    deferred: VecDeque<(SessionId, Event)>,
    stats: ShardStats,
    /// Session timers: (due, session), earliest first, at most one live entry
    /// per session (its `scheduled`). A session whose timer moves earlier gets
    /// a new entry (the old one turns stale and is skipped); one that moves
    /// later is re-queued when its old entry comes up. Finding the next timer
    /// costs O(log n), not a scan of every session.
    timers: BinaryHeap<Reverse<(Instant, SessionId)>>,
    /// Connect deadlines: (deadline, session).
    deadlines: BinaryHeap<Reverse<(Instant, SessionId)>>,
    /// Sessions whose WebRTC stack failed; closed on the next turn.
    broken: Vec<SessionId>,
    /// RTCP of ours due (see [`ingress`]): (due, session), as `timers`,
    /// the live entry being the session's `rtcp_at`.
    rtcp: BinaryHeap<Reverse<(Instant, SessionId)>>,
    /// Buffers of sent datagrams (see [`Sfu::recycle`]).
    spare: Vec<Vec<u8>>,
}

/// Buffers of sent datagrams a shard keeps for the next ones (a burst's
/// worth), and the largest it keeps (one MTU-sized datagram).
const SPARE_BUFFERS: usize = 512;
const SPARE_CAPACITY: usize = 2_048;

/// The peer's RTCP (an SRTCP datagram str0m reads as well), where it is
/// ours to read: sender reports on streams we open ([`ingress`]), and NACKs
/// for video we sealed, answered with those packets again, sealed by us
/// (str0m resends what it sent, where RTX is negotiated).
fn read_rtcp(now: Instant, session: &mut Session, datagram: &[u8], out: &mut Outputs) {
    let remembers = session
        .subscriptions
        .values()
        .any(|s| s.direct.as_ref().is_some_and(|d| d.remembers()));
    if !remembers && !session.ingress.has_streams() {
        return;
    }
    let Some(rtcp) = session.sealer.open_rtcp(datagram) else {
        return;
    };
    session.ingress.read_rtcp(rtcp, now);
    if !remembers {
        return;
    }
    let wanted: Vec<(u32, u16)> = nack::nacks(rtcp).take(nack::MAX_ASKED).collect();
    let mut stream: Option<&mut srtp::DirectStream> = None;
    for (ssrc, seq) in wanted {
        if stream.as_ref().is_none_or(|s| s.ssrc() != ssrc) {
            stream = session
                .subscriptions
                .values_mut()
                .find_map(|s| s.direct.as_mut().filter(|d| d.ssrc() == ssrc));
        }
        let Some(stream) = stream.as_deref_mut() else {
            continue;
        };
        if let Some(transmit) = session.sealer.resend(now, stream, seq, &mut out.spare) {
            session.stats.datagrams_out += 1;
            session.stats.bytes_out += transmit.contents.len() as u64;
            out.stats.datagrams_out += 1;
            out.stats.packets_resent += 1;
            out.transmits.push_back(transmit);
        }
    }
}

/// The subscription's directly sealed stream, made on first use (its SSRC
/// and header extensions are known once its m-line is negotiated).
fn direct_stream<'a>(
    now: Instant,
    rtc: &mut Rtc,
    direct: &'a mut Option<srtp::DirectStream>,
    mid: Mid,
    video: bool,
) -> Option<&'a mut srtp::DirectStream> {
    if direct.is_none() {
        let ssrc = *rtc.direct_api().stream_tx_by_mid(mid, None)?.ssrc();
        let extensions = rtc.media(mid)?.remote_extmap();
        *direct = Some(srtp::DirectStream::new(ssrc, mid, extensions, now, video));
    }
    direct.as_mut()
}

/// Whether a datagram is RTP (RFC 7983 demultiplexing, RFC 5761: RTCP's
/// packet types 192–223 apart).
fn is_rtp(datagram: &[u8]) -> bool {
    datagram.len() >= 12 && datagram[0] >> 6 == 2 && !(192..=223).contains(&datagram[1])
}

/// What the SSRC in `header` carries in `session`, whose media we open
/// ([`ingress`]): media of the track published on its m-line (see
/// [`mid_of`]) on one of its simulcast layers (see [`layer_of`]), or
/// retransmissions of such a stream (an RTX payload type of that m-line's
/// codecs); unknown before the m-line is known, before its media stream
/// came, or on a rid its m-line did not declare.
fn role_of(session: &mut Session, tracks: &FastMap<TrackId, Track>, header: &ingress::Header<'_>) -> ingress::Role {
    let unknown = ingress::Role::Unknown;
    let Some(mid) = mid_of(session, header) else {
        return unknown;
    };
    let (Some(track), Some(media)) = (
        session.published.get(&mid).and_then(|t| tracks.get(t)),
        session.rtc.media(mid),
    ) else {
        return unknown;
    };
    let extensions = media.remote_extmap();
    let [rid_id, repaired_id, level_id, orientation_id] = [
        Extension::RtpStreamId,
        Extension::RepairedRtpStreamId,
        Extension::AudioLevel,
        Extension::VideoOrientation,
    ]
    .map(|extension| extensions.id_of(extension));
    let rid = |id: Option<u8>| Some(Rid::from(std::str::from_utf8(header.extension(id?)?).ok()?));
    if let Some((_, main)) = track.codecs.iter().find(|(_, p)| p.resend() == Some(header.pt.into())) {
        let pt = *main.pt();
        let layer = layer_of(track, rid(repaired_id));
        return match layer.and_then(|layer| session.ingress.media_on(mid, layer)) {
            Some(main) => ingress::Role::Rtx { main, pt },
            None => unknown,
        };
    }
    let video = track.kind == MediaKind::Video;
    // (The clock of an unknown payload type's packets hardly matters: forwarding drops them.)
    let clock_rate = track
        .codecs
        .iter()
        .find(|(pt, _)| **pt == header.pt)
        .or_else(|| track.codecs.iter().find(|(_, p)| p.spec().codec.is_audio() != video))
        .map_or(if video { 90_000 } else { 48_000 }, |(_, p)| p.spec().clock_rate.get());
    // Its rid: the extension, else the `a=ssrc` stream str0m declared.
    let declared = || {
        session
            .rtc
            .direct_api()
            .stream_rx(&Ssrc::from(header.ssrc))
            .and_then(|rx| rx.rid())
    };
    let Some(layer) = layer_of(track, rid(rid_id).or_else(declared)) else {
        return unknown; // not a layer its m-line declared
    };
    ingress::Role::Media(ingress::Opens {
        mid,
        layer,
        clock_rate,
        level_id,
        orientation_id,
        nack: video,
    })
}

/// The index of the simulcast layer `rid` names among `track`'s layers (the
/// m-line's declared rids); the only one of a track without simulcast.
fn layer_of(track: &Track, rid: Option<Rid>) -> Option<usize> {
    if track.layers.len() < 2 {
        return Some(0);
    }
    track.layers.iter().position(|l| l.rid.is_some() && l.rid == rid)
}

/// The m-line a packet of `session` belongs to: its mid extension (RFC 8843
/// §15), else its SSRC's `a=ssrc` line in the peer's SDP (str0m declares a
/// stream for it), as a media SSRC or as the repair SSRC of one of ours.
fn mid_of(session: &mut Session, header: &ingress::Header<'_>) -> Option<Mid> {
    // BUNDLE: one extension map for the transport; any published m-line has it.
    let any = session.published.keys().next().copied();
    let mid_id = any
        .and_then(|mid| session.rtc.media(mid))
        .and_then(|media| media.remote_extmap().id_of(Extension::RtpMid));
    if let Some(mid) = mid_id
        .and_then(|id| header.extension(id))
        .and_then(|value| std::str::from_utf8(value).ok())
    {
        return Some(Mid::from(mid));
    }
    let ssrc = Ssrc::from(header.ssrc);
    let mut api = session.rtc.direct_api();
    if let Some(rx) = api.stream_rx(&ssrc) {
        return Some(rx.mid());
    }
    session.ingress.media_ssrcs().find_map(|main| {
        api.stream_rx(&Ssrc::from(main))
            .filter(|rx| rx.rtx() == Some(ssrc))
            .map(|rx| rx.mid())
    })
}

/// Queues the session's next RTCP of ours in the heap, if it moved earlier.
fn schedule_rtcp(id: SessionId, session: &mut Session, out: &mut Outputs) {
    if let Some(at) = session.ingress.next_rtcp()
        && session.rtcp_at.is_none_or(|scheduled| at < scheduled)
    {
        session.rtcp_at = Some(at);
        out.rtcp.push(Reverse((at, id)));
    }
}

/// How long RTCP that is due waits when the session has no route.
const RTCP_RETRY: Duration = Duration::from_millis(50);

/// Runs `f` on one session's WebRTC stack (str0m). A panic in there is a bug
/// of the stack that what a peer sent reached; it breaks that session alone:
/// it is counted, closed as failed on the next turn, and the shard with every
/// other session on it goes on. Only the session's `Rtc` can be half-updated
/// (`f` touches nothing else), and it is dropped unused.
fn contained<T>(id: SessionId, out: &mut Outputs, f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Some(value),
        Err(_) => {
            tracing::warn!(session = %id, "the WebRTC stack panicked on this session's input; closing it");
            out.stats.drop(DropReason::StackPanic);
            if !out.broken.contains(&id) {
                out.broken.push(id);
            }
            None
        }
    }
}

/// Runs `f` on what no session depends on yet (SDP text, a new session's own
/// `Rtc`): a panic in str0m there only refuses that input.
fn refused_on_panic<T>(f: impl FnOnce() -> T) -> Result<T, SfuError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| stack_failed())
}

/// The error for SDP the WebRTC stack panicked on.
fn stack_failed() -> SfuError {
    SfuError::InvalidSdp("the WebRTC stack failed on it".into())
}

/// A new subscription's forwarder: 48 kHz audio, or 90 kHz video that starts on a keyframe.
fn forwarder_for(kind: MediaKind) -> Forwarder {
    let video = kind == MediaKind::Video;
    Forwarder::new(if video { 90_000 } else { 48_000 }, video)
}

fn drain_session(id: SessionId, session: &mut Session, out: &mut Outputs) {
    if out.broken.contains(&id) {
        return; // its stack failed: it is closed, never polled again
    }
    loop {
        let Some(output) = contained(id, out, || session.rtc.poll_output()) else {
            return;
        };
        match output {
            Ok(Output::Timeout(at)) => {
                session.next_timeout = at;
                if session.scheduled.is_none_or(|scheduled| at < scheduled) {
                    session.scheduled = Some(at);
                    out.timers.push(Reverse((at, id)));
                }
                return;
            }
            Ok(Output::Transmit(transmit)) => {
                session.sealer.saw_transmit(&transmit);
                session.stats.datagrams_out += 1;
                session.stats.bytes_out += transmit.contents.len() as u64;
                out.stats.datagrams_out += 1;
                out.transmits.push_back(transmit);
            }
            Ok(Output::Event(event)) => out.deferred.push_back((id, event)),
            Err(e) => {
                tracing::debug!(session = %id, error = %e, "session failed");
                out.stats.drop(DropReason::Rejected);
                // A broken Rtc will not recover.
                out.broken.push(id);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{DropReason, Outputs, SessionId, contained};

    #[test]
    fn a_panic_in_the_stack_breaks_its_session_alone() {
        let mut out = Outputs::default();
        assert_eq!(contained(SessionId(1), &mut out, || 7), Some(7));
        assert!(out.broken.is_empty());
        let panicked: Option<()> = contained(SessionId(2), &mut out, || panic!("a bug in the stack"));
        assert_eq!(panicked, None);
        assert_eq!(out.broken, vec![SessionId(2)]);
        assert_eq!(out.stats.drops(DropReason::StackPanic), 1);
        // Once broken, it is closed once.
        let _ = contained(SessionId(2), &mut out, || panic!("again"));
        assert_eq!(out.broken, vec![SessionId(2)]);
        assert_eq!(out.stats.drops(DropReason::StackPanic), 2);
    }
}
