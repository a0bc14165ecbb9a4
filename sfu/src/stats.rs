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
    /// The session's WebRTC stack panicked on its input (a bug there): that
    /// session is closed, the shard and every other session go on.
    StackPanic,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
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
        DropReason::StackPanic,
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
            DropReason::StackPanic => "stack_panic",
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
    /// Of those, packets the SFU sealed itself instead of str0m.
    pub packets_sealed: u64,
    /// Packets from publishers the SFU opened itself instead of str0m (audio).
    pub packets_opened: u64,
    /// Packets sealed again for a subscriber's NACK (str0m's own resends aside).
    pub packets_resent: u64,
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
    /// From each datagram's arrival in the kernel to the end of the shard's
    /// turn that handled it (what it caused sent): the delay the shard adds.
    /// Measured by the driver.
    pub forwarding_delay: DelayHistogram,
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

/// Buckets of a [`DelayHistogram`] per tenfold.
const PER_DECADE: f64 = 20.0;
/// Buckets of a [`DelayHistogram`]: 1 µs to 100 s.
const DELAY_BUCKETS: usize = 161;

/// A histogram of delays: twenty buckets per tenfold (each ~12 % wide) from
/// 1 µs up, so that round figures such as 1 ms are bucket edges; a quantile
/// reads as its bucket's upper bound (a p99 of "1 ms" is at most 1 ms). A
/// value, like the counters: take two and [`DelayHistogram::since`] gives
/// the window between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayHistogram {
    counts: [u64; DELAY_BUCKETS],
    /// The sum of the recorded delays, µs.
    sum_us: u64,
}

impl Default for DelayHistogram {
    fn default() -> Self {
        Self {
            counts: [0; DELAY_BUCKETS],
            sum_us: 0,
        }
    }
}

impl DelayHistogram {
    pub fn record(&mut self, delay: Duration) {
        let micros = delay.as_micros();
        self.sum_us = self.sum_us.saturating_add(u64::try_from(micros).unwrap_or(u64::MAX));
        let bucket = if micros == 0 {
            0
        } else {
            // ⌈20·log10(µs)⌉: bucket i holds (10^((i-1)/20), 10^(i/20)] µs; the
            // slack keeps an edge (1,000 µs) in its own bucket despite rounding.
            let exact = (micros as f64).log10() * PER_DECADE;
            ((exact - 1e-9).ceil() as usize).min(DELAY_BUCKETS - 1)
        };
        self.counts[bucket] += 1;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The delay `q` (0..=1) of the recorded ones are at or under, to a bucket.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        let bucket = self.counts.iter().position(|&n| {
            seen += n;
            seen >= rank
        })?;
        Some(Duration::from_secs_f64(10f64.powf(bucket as f64 / PER_DECADE) / 1e6))
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &DelayHistogram) -> DelayHistogram {
        let mut window = self.clone();
        for (now, then) in window.counts.iter_mut().zip(earlier.counts) {
            *now = now.saturating_sub(then);
        }
        window.sum_us = window.sum_us.saturating_sub(earlier.sum_us);
        window
    }

    pub fn merge(&mut self, other: &DelayHistogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// The sum of the recorded delays.
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_us)
    }

    /// The counts per bucket (for exporting).
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// A histogram from its [`DelayHistogram::counts`] and [`DelayHistogram::sum`];
    /// `None` if the number of counts differs.
    pub fn from_parts(counts: &[u64], sum: Duration) -> Option<DelayHistogram> {
        Some(DelayHistogram {
            counts: counts.try_into().ok()?,
            sum_us: u64::try_from(sum.as_micros()).unwrap_or(u64::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::DelayHistogram;
    use std::time::Duration;

    #[test]
    fn quantiles_read_bucket_upper_bounds() {
        let mut histogram = DelayHistogram::default();
        assert_eq!(histogram.quantile(0.5), None);
        for _ in 0..98 {
            histogram.record(Duration::from_micros(100));
        }
        histogram.record(Duration::from_millis(3));
        histogram.record(Duration::from_secs(600)); // beyond the last bucket: kept there
        assert_eq!(histogram.count(), 100);
        let p50 = histogram.quantile(0.5).expect("p50");
        assert!(
            p50 >= Duration::from_micros(100) && p50 < Duration::from_micros(120),
            "{p50:?}"
        );
        let p99 = histogram.quantile(0.99).expect("p99");
        assert!(
            p99 >= Duration::from_millis(3) && p99 < Duration::from_micros(3_600),
            "{p99:?}"
        );
        assert!(histogram.quantile(1.0).expect("max") > Duration::from_secs(60));
        // 1 ms is an edge: exactly 1 ms reads as 1 ms, a little more as the next bucket.
        let mut edge = DelayHistogram::default();
        edge.record(Duration::from_millis(1));
        let at = edge.quantile(1.0).expect("one");
        assert!(
            at.abs_diff(Duration::from_millis(1)) < Duration::from_nanos(10),
            "{at:?}"
        );
        edge.record(Duration::from_micros(1_001));
        assert!(edge.quantile(1.0).expect("two") > Duration::from_micros(1_100));
        let mut under = DelayHistogram::default();
        under.record(Duration::from_micros(950));
        assert!(under.quantile(1.0).expect("under") <= Duration::from_millis(1));

        let snapshot = histogram.clone();
        histogram.record(Duration::ZERO);
        let window = histogram.since(&snapshot);
        assert_eq!(window.count(), 1);
        assert_eq!(window.quantile(0.5), Some(Duration::from_micros(1)));
        assert_eq!(window.sum(), Duration::ZERO);
        assert_eq!(histogram.sum(), Duration::from_micros(98 * 100 + 3_000 + 600_000_000));
        assert_eq!(DelayHistogram::from_parts(window.counts(), window.sum()), Some(window));
    }
}
