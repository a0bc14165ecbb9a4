//! Transport-wide congestion control feedback (draft-holmer-rmcat-transport-
//! wide-cc-extensions-01 §3.1) on the media the SFU opens itself
//! ([`crate::ingress`]). A browser numbers every packet it sends on the
//! transport and estimates its own uplink from when each arrived (send-side
//! GCC): the receiver records (transport-wide sequence number, arrival) and
//! reports them every [`INTERVAL`].
//!
//! A feedback covers the sequence numbers from the end of the last one to the
//! highest arrived: received or not, and for each received one its arrival
//! relative to the previous (250 µs ticks; the first relative to the
//! reference time, in 64 ms units). Statuses go in two-bit status vector
//! chunks, seven to a chunk. Arrivals are kept a while after they were
//! reported: a packet that arrives after a feedback said it was lost (the
//! sender's audio and video threads can number packets in one order and send
//! them in the other) makes the next feedback start again from it, as
//! libwebrtc's receiver does; reported twice, a packet is still one packet.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How often a session sends feedback while packets arrive (libwebrtc's
/// default, and str0m's order of magnitude).
pub(crate) const INTERVAL: Duration = Duration::from_millis(100);

/// Sequence numbers one feedback covers at most (≤ ~2.3 bytes each: the
/// packet stays under 1,000 bytes); arrivals kept at most; how far behind
/// the next feedback's start a late arrival is still told.
const MAX_COVERED: u64 = 400;
const MAX_KEPT: usize = 4_096;
const LATE_WINDOW: u64 = 500;

/// Recv delta units and reference time units.
const TICK_US: i64 = 250;
const REFERENCE_US: u64 = 64_000;

pub(crate) struct TwccFeedback {
    /// Arrivals by extended sequence number: those not reported yet, and
    /// up to [`LATE_WINDOW`] reported ones before them.
    arrivals: BTreeMap<u64, Instant>,
    /// The highest sequence number seen (to extend the next).
    highest: Option<u64>,
    /// The first sequence number the next feedback covers.
    next: Option<u64>,
    /// Feedback packets sent (mod 256).
    count: u8,
    /// Reference times count from here.
    epoch: Instant,
}

/// Extends a 16-bit sequence number to the value nearest `highest` (RFC 3711 Appendix A).
pub(crate) fn extend(highest: Option<u64>, seq: u16) -> u64 {
    let Some(highest) = highest else {
        return u64::from(seq);
    };
    let guess = (highest & !0xffff) | u64::from(seq);
    if guess + 0x8000 < highest {
        guess + 0x1_0000
    } else if guess > highest + 0x8000 && guess >= 0x1_0000 {
        guess - 0x1_0000
    } else {
        guess
    }
}

impl TwccFeedback {
    pub(crate) fn new(epoch: Instant) -> Self {
        Self {
            arrivals: BTreeMap::new(),
            highest: None,
            next: None,
            count: 0,
            epoch,
        }
    }

    /// An authentic packet numbered `seq` arrived at `at`.
    pub(crate) fn record(&mut self, seq: u16, at: Instant) {
        let seq = extend(self.highest, seq);
        if self.arrivals.len() >= MAX_KEPT || self.arrivals.contains_key(&seq) {
            return; // a flood, or a duplicate (the first arrival counts)
        }
        if let Some(next) = self.next
            && seq < next
        {
            if seq + LATE_WINDOW < next {
                return; // too late to tell
            }
            self.next = Some(seq); // reported as lost: report again from here
        }
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
        self.arrivals.insert(seq, at);
    }

    /// Arrivals wait to be reported.
    pub(crate) fn pending(&self) -> bool {
        match self.next {
            Some(next) => self.arrivals.range(next..).next().is_some(),
            None => !self.arrivals.is_empty(),
        }
    }

    /// The feedback packet (RTPFB, FMT 15) on what arrived since the last,
    /// from `sender_ssrc` about the media of `media_ssrc`.
    pub(crate) fn feedback(&mut self, sender_ssrc: u32, media_ssrc: u32) -> Option<Vec<u8>> {
        let (&first, &first_at) = self.arrivals.range(self.next.unwrap_or(0)..).next()?;
        let base = self.next.unwrap_or(first);
        let highest = *self.arrivals.last_key_value()?.0;
        let mut last = highest.min(base + MAX_COVERED - 1);
        let reference = first_at.saturating_duration_since(self.epoch).as_micros() as u64 / REFERENCE_US;
        // Deltas run from the reference time over the ticks already told, so
        // rounding never accumulates.
        let mut told = self.epoch + Duration::from_micros(reference * REFERENCE_US);
        let mut symbols: Vec<u8> = Vec::with_capacity((last - base + 1) as usize);
        let mut deltas = Vec::new();
        for seq in base..=last {
            let Some(at) = self.arrivals.get(&seq).copied() else {
                symbols.push(0);
                continue;
            };
            let micros = if at >= told {
                at.duration_since(told).as_micros() as i64
            } else {
                -(told.duration_since(at).as_micros() as i64)
            };
            let ticks = micros.div_euclid(TICK_US);
            if let Ok(small) = u8::try_from(ticks) {
                symbols.push(1);
                deltas.push(small);
            } else if let Ok(large) = i16::try_from(ticks) {
                symbols.push(2);
                deltas.extend_from_slice(&large.to_be_bytes());
            } else {
                // Past what a delta can say: the next feedback starts here.
                last = seq - 1;
                break;
            }
            told = if ticks >= 0 {
                told + Duration::from_micros((ticks * TICK_US) as u64)
            } else {
                told - Duration::from_micros((-ticks * TICK_US) as u64)
            };
        }
        if symbols.is_empty() || last < base {
            return None;
        }
        symbols.truncate((last - base + 1) as usize);
        self.next = Some(last + 1);
        let keep_from = (last + 1).saturating_sub(LATE_WINDOW);
        self.arrivals = self.arrivals.split_off(&keep_from);
        let mut packet = Vec::with_capacity(20 + 2 * symbols.len().div_ceil(7) + deltas.len() + 4);
        packet.extend_from_slice(&[0x80 | 15, 205, 0, 0]);
        packet.extend_from_slice(&sender_ssrc.to_be_bytes());
        packet.extend_from_slice(&media_ssrc.to_be_bytes());
        packet.extend_from_slice(&(base as u16).to_be_bytes());
        packet.extend_from_slice(&(symbols.len() as u16).to_be_bytes());
        packet.extend_from_slice(&(reference as u32).to_be_bytes()[1..]);
        packet.push(self.count);
        self.count = self.count.wrapping_add(1);
        // Two-bit status vector chunks: 1 | 1 | seven symbols, first in the high bits.
        for seven in symbols.chunks(7) {
            let mut chunk = 0xc000u16;
            for (i, symbol) in seven.iter().enumerate() {
                chunk |= u16::from(*symbol) << (12 - 2 * i);
            }
            packet.extend_from_slice(&chunk.to_be_bytes());
        }
        packet.extend_from_slice(&deltas);
        // Padding to a 32-bit word; its last byte counts it (RFC 3550 §6.4.1).
        let pad = (4 - packet.len() % 4) % 4;
        if pad > 0 {
            packet.resize(packet.len() + pad, 0);
            let len = packet.len();
            packet[len - 1] = pad as u8;
            packet[0] |= 0x20;
        }
        let words = (packet.len() / 4 - 1) as u16;
        packet[2..4].copy_from_slice(&words.to_be_bytes());
        Some(packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::rtp::rtcp::Twcc;

    /// What str0m's parser reads from our feedback: (sequence number, arrival).
    fn parsed(packet: &[u8], epoch: Instant) -> Vec<(u64, Option<Instant>)> {
        assert_eq!(packet.len() % 4, 0);
        assert_eq!(
            usize::from(u16::from_be_bytes([packet[2], packet[3]])) * 4 + 4,
            packet.len()
        );
        let pad = if packet[0] & 0x20 != 0 {
            usize::from(packet[packet.len() - 1])
        } else {
            0
        };
        let twcc = Twcc::try_from(&packet[4..packet.len() - pad]).expect("str0m parses it");
        let base = u64::from(u16::from_be_bytes([packet[12], packet[13]]));
        twcc.into_iter(epoch, base.into())
            .map(|(seq, _, at)| (*seq, at))
            .collect()
    }

    #[test]
    fn feedback_says_what_arrived_when_as_str0m_reads_it() {
        let epoch = Instant::now();
        let mut twcc = TwccFeedback::new(epoch);
        let at = |ms: u64| epoch + Duration::from_micros(ms * 1_000 + 125);
        // 10..=19 arrive 1 ms apart, 13 and 14 lost, 17 late (after 18).
        for seq in 10..20u16 {
            match seq {
                13 | 14 | 17 => {}
                18 => {
                    twcc.record(18, at(100 + 18));
                    twcc.record(17, at(100 + 19));
                }
                _ => twcc.record(seq, at(100 + u64::from(seq))),
            }
        }
        twcc.record(19, at(500)); // a duplicate: the first arrival counts
        let packet = twcc.feedback(7, 9).expect("feedback");
        assert_eq!(&packet[4..12], &[0, 0, 0, 7, 0, 0, 0, 9]);
        let got = parsed(&packet, epoch);
        assert_eq!(got.len(), 10);
        for (seq, arrival) in got {
            let want = match seq {
                13 | 14 => None,
                17 => Some(at(119)),
                _ => Some(at(100 + seq)),
            };
            match (arrival, want) {
                (None, None) => {}
                (Some(got), Some(want)) => {
                    let error = if got > want { got - want } else { want - got };
                    assert!(error < Duration::from_micros(250), "{seq}: {got:?} vs {want:?}");
                }
                _ => panic!("{seq}: {arrival:?} vs {want:?}"),
            }
        }
        assert!(!twcc.pending());
        assert!(twcc.feedback(7, 9).is_none(), "nothing new");
        // A packet reported lost that comes late: the next feedback covers from it again.
        twcc.record(13, at(600));
        assert!(twcc.pending());
        twcc.record(22, at(601));
        let next = parsed(&twcc.feedback(7, 9).expect("feedback"), epoch);
        assert_eq!(next.first().map(|(s, a)| (*s, a.is_some())), Some((13, true)));
        assert_eq!(next.len(), 10, "13 to 22");
        assert!(twcc.feedback(7, 9).is_none(), "nothing new");
        twcc.record(25, at(700));
        let next = parsed(&twcc.feedback(7, 9).expect("feedback"), epoch);
        assert_eq!(
            next.iter().map(|(s, a)| (*s, a.is_some())).collect::<Vec<_>>(),
            vec![(23, false), (24, false), (25, true)]
        );
        assert_eq!(packet[19], 0, "the first feedback's count");
    }

    #[test]
    fn large_gaps_and_rollovers_are_reported() {
        let epoch = Instant::now();
        let mut twcc = TwccFeedback::new(epoch);
        let t = epoch + Duration::from_secs(3);
        twcc.record(65_534, t);
        twcc.record(65_535, t + Duration::from_millis(200)); // a large delta
        twcc.record(1, t + Duration::from_millis(201));
        let packet = twcc.feedback(1, 2).expect("feedback");
        let got = parsed(&packet, epoch);
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s & 0xffff).collect();
        assert_eq!(seqs, vec![65_534, 65_535, 0, 1]);
        assert!(got[2].1.is_none());
        let second = got[1].1.expect("arrived");
        let error = (second - (t + Duration::from_millis(200))).as_micros();
        assert!(error < 250, "{error} µs off");
        assert_eq!(extend(Some(65_535), 1), 65_537);
        assert_eq!(extend(Some(65_537), 65_535), 65_535);
    }

    #[test]
    fn arrivals_beyond_what_a_delta_says_go_in_the_next_feedback() {
        let epoch = Instant::now();
        let mut twcc = TwccFeedback::new(epoch);
        twcc.record(1, epoch + Duration::from_millis(10));
        twcc.record(2, epoch + Duration::from_secs(20)); // > 8.19 s later
        let first = parsed(&twcc.feedback(1, 2).expect("feedback"), epoch);
        assert_eq!(first.len(), 1);
        assert!(twcc.pending());
        let second = parsed(&twcc.feedback(1, 2).expect("feedback"), epoch);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].0, 2);
    }

    #[test]
    fn any_arrivals_give_feedback_that_str0m_reads_back() {
        let epoch = Instant::now();
        let mut twcc = TwccFeedback::new(epoch);
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut seq, mut at) = (65_000u16, epoch);
        let mut told: std::collections::HashMap<u64, Instant> = std::collections::HashMap::new();
        let mut highest = None;
        for round in 0..2_000 {
            // Mostly in order, sometimes lost, late, duplicated or after a long pause.
            for _ in 0..random() % 20 {
                let r = random();
                seq = match r % 16 {
                    0 => seq.wrapping_sub((r >> 8) as u16 % 40),
                    1 => seq.wrapping_add((r >> 8) as u16 % 300),
                    2 => seq,
                    _ => seq.wrapping_add(1),
                };
                at += Duration::from_micros(if r % 97 == 0 { 9_000_000 } else { (r >> 20) % 3_000 });
                twcc.record(seq, at);
            }
            if round % 3 == 0
                && let Some(packet) = twcc.feedback(1, 2)
            {
                let base = u64::from(u16::from_be_bytes([packet[12], packet[13]]));
                let extend_from = extend(highest, base as u16);
                let pad = if packet[0] & 0x20 != 0 {
                    usize::from(packet[packet.len() - 1])
                } else {
                    0
                };
                let feedback = Twcc::try_from(&packet[4..packet.len() - pad]).expect("str0m parses it");
                let count = usize::from(feedback.status_count);
                let got: Vec<_> = feedback.into_iter(epoch, extend_from.into()).collect();
                assert_eq!(got.len(), count, "every status read");
                for (seq, _, arrival) in got {
                    highest = Some(highest.map_or(*seq, |h: u64| h.max(*seq)));
                    if let Some(arrival) = arrival {
                        // A packet told twice is told the same.
                        let first = *told.entry(*seq).or_insert(arrival);
                        let error = if first > arrival {
                            first - arrival
                        } else {
                            arrival - first
                        };
                        assert!(error < Duration::from_millis(1), "{seq}: {first:?} then {arrival:?}");
                    }
                }
            }
        }
        assert!(told.len() > 1_000, "{} packets told", told.len());
    }

    #[test]
    fn a_burst_is_told_in_feedbacks_that_fit_a_datagram() {
        let epoch = Instant::now();
        let mut twcc = TwccFeedback::new(epoch);
        // 1,000 packets, every other one lost, spread so each delta is a large one.
        for seq in (0..2_000u16).step_by(2) {
            twcc.record(seq, epoch + Duration::from_millis(u64::from(seq) * 40));
        }
        let mut covered = 0;
        while let Some(packet) = twcc.feedback(1, 2) {
            assert!(packet.len() <= 1_000, "{} bytes", packet.len());
            covered += usize::from(u16::from_be_bytes([packet[14], packet[15]]));
        }
        assert_eq!(covered, 1_999, "0 to 1,998, each once");
    }
}
