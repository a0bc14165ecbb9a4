//! Per-subscription rewriting of RTP sequence numbers and timestamps, so each
//! subscriber sees one continuous stream (the "munger" of LiveKit's SFU).
//!
//! Sequence numbers are extended (64-bit, no wrap) as str0m hands them out.
//! The output starts at a small base and stays contiguous across source
//! switches (a simulcast layer change, another speaker): on a switch the next
//! output number is `last + 1` and the timestamp advances by the wall-clock time
//! since the last packet, so a receiver's jitter buffer never sees a jump back.

use std::time::Instant;

/// What the forwarder needs to know of one incoming packet.
#[derive(Debug, Clone, Copy)]
pub struct InPacket {
    /// Extended sequence number of the source.
    pub seq: u64,
    /// RTP timestamp of the source.
    pub timestamp: u32,
    /// When the packet arrived.
    pub arrival: Instant,
    /// Whether it starts a keyframe (always true for audio).
    pub keyframe: bool,
}

/// The rewritten numbers for one outgoing packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutPacket {
    pub seq: u64,
    pub timestamp: u32,
}

/// Why a packet was not forwarded to this subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Video waits for a keyframe before the first packet of a (new) source.
    WaitingForKeyframe,
    /// A late packet from before the current source started.
    BeforeSwitch,
}

#[derive(Debug, Clone)]
pub struct Forwarder {
    clock_rate: u32,
    needs_keyframe: bool,
    /// The current source epoch: `seq_out = seq_in + seq_offset` for packets at or after `first_in`.
    epoch: Option<Epoch>,
    /// Highest output sequence number and its timestamp and arrival.
    last_out: Option<(u64, u32, Instant)>,
    /// A switch is pending: the next keyframe of the new source starts a new epoch.
    switching: bool,
}

#[derive(Debug, Clone, Copy)]
struct Epoch {
    first_in: u64,
    seq_offset: i64,
    ts_offset: u32,
}

/// First output sequence number: below 2^15 so the SRTP roll-over counter starts at 0.
const FIRST_SEQ: u64 = 1000;

impl Forwarder {
    /// A forwarder for a stream with `clock_rate` (48 kHz audio, 90 kHz video);
    /// video (`needs_keyframe`) starts only on a keyframe.
    pub fn new(clock_rate: u32, needs_keyframe: bool) -> Self {
        Self {
            clock_rate,
            needs_keyframe,
            epoch: None,
            last_out: None,
            switching: false,
        }
    }

    /// The next packet from the current source will be treated as a new source
    /// (after a keyframe, for video).
    pub fn switch_source(&mut self) {
        self.switching = true;
    }

    /// Whether the subscriber is waiting for a keyframe to (re)start.
    pub fn waiting_for_keyframe(&self) -> bool {
        self.needs_keyframe && (self.epoch.is_none() || self.switching)
    }

    pub fn forward(&mut self, pkt: InPacket) -> Result<OutPacket, Skip> {
        let starting = self.epoch.is_none() || self.switching;
        if starting {
            if self.needs_keyframe && !pkt.keyframe {
                return Err(Skip::WaitingForKeyframe);
            }
            let (seq_out, ts_out) = match self.last_out {
                None => (FIRST_SEQ, pkt.timestamp),
                Some((seq, ts, at)) => {
                    let elapsed = pkt.arrival.saturating_duration_since(at);
                    let ticks = (elapsed.as_secs_f64() * f64::from(self.clock_rate)).round().max(1.0) as u32;
                    (seq + 1, ts.wrapping_add(ticks))
                }
            };
            self.epoch = Some(Epoch {
                first_in: pkt.seq,
                seq_offset: seq_out as i64 - pkt.seq as i64,
                ts_offset: ts_out.wrapping_sub(pkt.timestamp),
            });
            self.switching = false;
        }
        let Some(epoch) = self.epoch else {
            return Err(Skip::WaitingForKeyframe);
        };
        if pkt.seq < epoch.first_in {
            return Err(Skip::BeforeSwitch);
        }
        let out = OutPacket {
            seq: (pkt.seq as i64 + epoch.seq_offset) as u64,
            timestamp: pkt.timestamp.wrapping_add(epoch.ts_offset),
        };
        if self.last_out.is_none_or(|(seq, _, _)| out.seq > seq) {
            self.last_out = Some((out.seq, out.timestamp, pkt.arrival));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pkt(seq: u64, timestamp: u32, at: Instant, keyframe: bool) -> InPacket {
        InPacket {
            seq,
            timestamp,
            arrival: at,
            keyframe,
        }
    }

    #[test]
    fn video_starts_on_keyframe_and_stays_continuous() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(90_000, true);
        assert_eq!(f.forward(pkt(50, 9000, t0, false)), Err(Skip::WaitingForKeyframe));
        let first = f.forward(pkt(51, 12000, t0, true)).expect("forwarded");
        assert_eq!(
            first,
            OutPacket {
                seq: FIRST_SEQ,
                timestamp: 12000
            }
        );
        assert_eq!(
            f.forward(pkt(52, 12000, t0, false)).expect("forwarded").seq,
            FIRST_SEQ + 1
        );
        // Reordered (e.g. recovered by NACK): same mapping, no gap created.
        assert_eq!(
            f.forward(pkt(54, 15000, t0, false)).expect("forwarded").seq,
            FIRST_SEQ + 3
        );
        assert_eq!(
            f.forward(pkt(53, 15000, t0, false)).expect("forwarded").seq,
            FIRST_SEQ + 2
        );
        assert_eq!(f.forward(pkt(50, 9000, t0, false)), Err(Skip::BeforeSwitch));

        // Switch to another source with unrelated numbering: continues at last + 1,
        // timestamp advanced by the elapsed time (100 ms = 9000 ticks).
        f.switch_source();
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(f.forward(pkt(7000, 500, t1, false)), Err(Skip::WaitingForKeyframe));
        let switched = f.forward(pkt(7001, 600, t1, true)).expect("forwarded");
        assert_eq!(
            switched,
            OutPacket {
                seq: FIRST_SEQ + 4,
                timestamp: 15000 + 9000
            }
        );
        let next = f.forward(pkt(7002, 3600, t1, false)).expect("forwarded");
        assert_eq!(
            next,
            OutPacket {
                seq: FIRST_SEQ + 5,
                timestamp: 15000 + 9000 + 3000
            }
        );
    }

    #[test]
    fn audio_needs_no_keyframe_and_wraps_timestamps() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(48_000, false);
        let a = f.forward(pkt(70_000, u32::MAX - 100, t0, false)).expect("forwarded");
        let b = f
            .forward(pkt(70_001, (u32::MAX - 100).wrapping_add(960), t0, false))
            .expect("forwarded");
        assert_eq!(b.seq, a.seq + 1);
        assert_eq!(b.timestamp, a.timestamp.wrapping_add(960));
        assert!(a.seq < 1 << 15, "first output seq keeps the SRTP ROC at 0");
    }
}
