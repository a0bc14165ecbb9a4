//! Statistics as values: the driver turns them into metrics.

use std::time::Duration;

/// Why a datagram or packet was not processed or forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// From an address no session knows, and not a STUN request naming one.
    UnknownSource,
    /// Not a datagram WebRTC multiplexes (STUN, DTLS, RTP, RTCP).
    Malformed,
    /// A STUN request whose ufrag names a session but whose integrity fails.
    BadStun,
    /// The session's WebRTC stack refused the input (bad SRTP, replay, …).
    Rejected,
    /// RTP on an m-line we do not know as a track.
    NoTrack,
    /// A payload type the publisher's session did not negotiate.
    UnknownPayloadType,
    /// The subscriber has no matching codec.
    CodecMismatch,
    /// Video not forwarded to a subscriber until a keyframe starts it.
    WaitingForKeyframe,
    /// A late packet from before a source switch.
    BeforeSwitch,
    /// The subscriber's DTLS-SRTP is not up yet.
    NotConnected,
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
        DropReason::UnknownSource,
        DropReason::Malformed,
        DropReason::BadStun,
        DropReason::Rejected,
        DropReason::NoTrack,
        DropReason::UnknownPayloadType,
        DropReason::CodecMismatch,
        DropReason::WaitingForKeyframe,
        DropReason::BeforeSwitch,
        DropReason::NotConnected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownSource => "unknown_source",
            DropReason::Malformed => "malformed",
            DropReason::BadStun => "bad_stun",
            DropReason::Rejected => "rejected",
            DropReason::NoTrack => "no_track",
            DropReason::UnknownPayloadType => "unknown_payload_type",
            DropReason::CodecMismatch => "codec_mismatch",
            DropReason::WaitingForKeyframe => "waiting_for_keyframe",
            DropReason::BeforeSwitch => "before_switch",
            DropReason::NotConnected => "not_connected",
        }
    }
}

/// Counters of one shard.
#[derive(Debug, Clone, Default)]
pub struct ShardStats {
    pub sessions: u64,
    pub rooms: u64,
    pub tracks: u64,
    pub subscriptions: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub packets_forwarded: u64,
    pub keyframe_requests: u64,
    /// Session timers that fired (each runs one session's WebRTC clock).
    pub session_timeouts: u64,
    /// Rooms mixing audio for single-stream sessions or a recording.
    pub mixers: u64,
    /// Mixer ticks (20 ms each) run, over all mixers.
    pub mix_ticks: u64,
    /// Mixed frames written to single-stream sessions.
    pub mix_frames_out: u64,
    /// Opus packets from publishers the mixer could not decode (concealed instead).
    pub mix_decode_errors: u64,
    /// Frames the mixer concealed (lost, late or undecodable input).
    pub mix_concealed: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl ShardStats {
    pub(crate) fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }
}

/// Counters and measurements of one session.
#[derive(Debug, Clone, Default)]
pub struct SessionStats {
    /// Media bitrate received from the participant, bits per second (last interval).
    pub bitrate_in_bps: u64,
    /// Media bitrate sent to the participant, bits per second (last interval).
    pub bitrate_out_bps: u64,
    last_sample: Option<(std::time::Instant, u64, u64)>,
    pub datagrams_in: u64,
    pub bytes_in: u64,
    pub datagrams_out: u64,
    pub bytes_out: u64,
    /// RTP packets received from this participant.
    pub packets_in: u64,
    /// RTP packets forwarded to this participant.
    pub packets_out: u64,
    /// Fraction lost on what we receive from the participant (RTCP), 0..1.
    pub ingress_loss: Option<f32>,
    /// Fraction lost on what we send, as the participant reports it.
    pub egress_loss: Option<f32>,
    pub rtt: Option<Duration>,
    /// Bandwidth estimate towards the participant (TWCC), bits per second.
    pub egress_estimate_bps: Option<u64>,
}

impl SessionStats {
    /// Updates the bitrates from cumulative media byte counters sampled at `at`.
    pub(crate) fn update_rates(&mut self, at: std::time::Instant, bytes_in: u64, bytes_out: u64) {
        if let Some((then, prev_in, prev_out)) = self.last_sample {
            let secs = at.saturating_duration_since(then).as_secs_f64();
            if secs > 0.0 {
                self.bitrate_in_bps = (bytes_in.saturating_sub(prev_in) as f64 * 8.0 / secs) as u64;
                self.bitrate_out_bps = (bytes_out.saturating_sub(prev_out) as f64 * 8.0 / secs) as u64;
            }
        }
        self.last_sample = Some((at, bytes_in, bytes_out));
    }
}
