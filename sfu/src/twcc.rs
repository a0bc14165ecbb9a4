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

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often a session sends feedback while packets arrive (libwebrtc's
/// default, and str0m's order of magnitude).
pub(crate) const INTERVAL: Duration = Duration::from_millis(100);

/// Sequence numbers one feedback covers at most (≤ ~2.3 bytes each: the
/// packet stays under 1,000 bytes); the span of sequence numbers whose
/// arrivals are kept at most; how far behind the next feedback's start a late
/// arrival is still told.
const MAX_COVERED: u64 = 400;
const MAX_KEPT: usize = 4_096;
const LATE_WINDOW: u64 = 500;

/// Recv delta units and reference time units.
const TICK_US: i64 = 250;
const REFERENCE_US: u64 = 64_000;

pub(crate) struct TwccFeedback {
    /// Arrivals by extended sequence number: those not reported yet, and
    /// up to [`LATE_WINDOW`] reported ones before them.
    arrivals: Arrivals,
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

/// Arrival times by extended sequence number, for a span of sequence numbers
/// from `start`: a ring of slots (nothing allocated per packet once it has
/// grown to the span a session keeps), each the arrival in microseconds
/// after `origin` plus one, or 0 where nothing arrived.
struct Arrivals {
    slots: VecDeque<u64>,
    start: u64,
    origin: Instant,
}

impl Arrivals {
    fn new(epoch: Instant) -> Self {
        Self {
            slots: VecDeque::new(),
            start: 0,
            // (Kernel arrival times may come a little before the epoch.)
            origin: epoch.checked_sub(Duration::from_secs(60)).unwrap_or(epoch),
        }
    }

    fn get(&self, seq: u64) -> Option<Instant> {
        let slot = *self.slots.get(usize::try_from(seq.checked_sub(self.start)?).ok()?)?;
        (slot != 0).then(|| self.origin + Duration::from_micros(slot - 1))
    }

    /// Notes an arrival: `false` if one is noted for `seq` already. The span
    /// kept stays under [`MAX_KEPT`]: a later number drops the earliest
    /// arrivals, an earlier one is not noted.
    fn insert(&mut self, seq: u64, at: Instant) -> bool {
        let micros = at.saturating_duration_since(self.origin).as_micros() as u64 + 1;
        if self.slots.is_empty() {
            self.start = seq;
        }
        if seq < self.start {
            let before = self.start - seq;
            if before + self.slots.len() as u64 > MAX_KEPT as u64 {
                return false;
            }
            for _ in 0..before {
                self.slots.push_front(0);
            }
            self.start = seq;
        }
        let beyond = (seq - self.start + 1).saturating_sub(MAX_KEPT as u64);
        self.retain_from(self.start + beyond);
        if self.slots.is_empty() {
            self.start = seq;
        }
        let at = (seq - self.start) as usize;
        if at >= self.slots.len() {
            self.slots.resize(at + 1, 0);
        }
        if self.slots[at] != 0 {
            return false;
        }
        self.slots[at] = micros;
        true
    }

    /// The first arrival at or after `seq`.
    fn first_from(&self, seq: u64) -> Option<(u64, Instant)> {
        let from = seq.saturating_sub(self.start).min(self.slots.len() as u64);
        (from..self.slots.len() as u64)
            .find(|&at| self.slots[at as usize] != 0)
            .and_then(|at| Some((self.start + at, self.get(self.start + at)?)))
    }

    /// The highest sequence number noted (the last slot is always an arrival).
    fn last(&self) -> Option<u64> {
        (!self.slots.is_empty()).then(|| self.start + self.slots.len() as u64 - 1)
    }

    /// Forgets what came before `seq`.
    fn retain_from(&mut self, seq: u64) {
        while self.start < seq && self.slots.pop_front().is_some() {
            self.start += 1;
        }
    }
}

impl TwccFeedback {
    pub(crate) fn new(epoch: Instant) -> Self {
        Self {
            arrivals: Arrivals::new(epoch),
            highest: None,
            next: None,
            count: 0,
            epoch,
        }
    }

    /// An authentic packet numbered `seq` arrived at `at`.
    pub(crate) fn record(&mut self, seq: u16, at: Instant) {
        let seq = extend(self.highest, seq);
        if self.next.is_some_and(|next| seq + LATE_WINDOW < next) || !self.arrivals.insert(seq, at) {
            return; // too late to tell, or a duplicate (the first arrival counts)
        }
        if self.next.is_some_and(|next| seq < next) {
            self.next = Some(seq); // reported as lost: report again from here
        }
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
    }

    /// Arrivals wait to be reported.
    pub(crate) fn pending(&self) -> bool {
        self.arrivals.first_from(self.next.unwrap_or(0)).is_some()
    }

    /// The feedback packet (RTPFB, FMT 15) on what arrived since the last,
    /// from `sender_ssrc` about the media of `media_ssrc`.
    pub(crate) fn feedback(&mut self, sender_ssrc: u32, media_ssrc: u32) -> Option<Vec<u8>> {
        let (first, first_at) = self.arrivals.first_from(self.next.unwrap_or(0))?;
        let base = self.next.unwrap_or(first);
        let highest = self.arrivals.last()?;
        let mut last = highest.min(base + MAX_COVERED - 1);
        let reference = first_at.saturating_duration_since(self.epoch).as_micros() as u64 / REFERENCE_US;
        // Deltas run from the reference time over the ticks already told, so
        // rounding never accumulates.
        let mut told = self.epoch + Duration::from_micros(reference * REFERENCE_US);
        let mut symbols: Vec<u8> = Vec::with_capacity((last - base + 1) as usize);
        let mut deltas = Vec::new();
        for seq in base..=last {
            let Some(at) = self.arrivals.get(seq) else {
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
        self.arrivals.retain_from(keep_from);
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
    fn the_span_kept_is_bounded_and_the_latest_arrivals_win() {
        let epoch = Instant::now();
        let mut twcc = TwccFeedback::new(epoch);
        let at = |seq: u64| epoch + Duration::from_micros(seq * 100);
        for seq in 0..10u16 {
            twcc.record(seq, at(u64::from(seq)));
        }
        let mut told = parsed(&twcc.feedback(1, 2).expect("feedback"), epoch).len();
        twcc.record(10, at(10));
        // A jump far past the span: the earliest give way, the new one is kept.
        twcc.record(20_000, at(20_000));
        assert!(twcc.arrivals.slots.len() <= MAX_KEPT);
        assert_eq!(twcc.arrivals.get(20_000), Some(at(20_000)));
        assert_eq!(twcc.arrivals.get(10), None);
        // Feedback goes on from where it was, within what one packet may say.
        while let Some(packet) = twcc.feedback(1, 2) {
            let got = parsed(&packet, epoch);
            assert!(got.len() as u64 <= MAX_COVERED);
            told += got.len();
            assert!(told <= 20_001, "no end");
        }
        assert_eq!(told, 20_001, "every number from 0 to 20,000 told once");
        assert!(!twcc.pending());
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
