//! Our own SRTP receiver for publishers' audio: the receive side's short cut
//! past str0m.
//!
//! str0m decrypts and parses each datagram it is given, runs a whole timeout
//! of the session after it (ICE, DTLS, RTCP, pacer) and hands the packet back
//! as an event: in two-party calls that was most of the SFU's CPU. An audio
//! packet needs none of that, so where the SFU seals forwarded media itself
//! (AEAD profiles, see [`crate::srtp`]) it opens publishers' audio itself too.
//!
//! - **Which streams.** Decided per SSRC at its first packet, and kept: audio
//!   on an m-line the participant publishes on, named by the packet's mid
//!   extension, on an m-line without transport-wide sequence numbers (their
//!   feedback is str0m's, which must see every such packet). Anything else
//!   (video, no mid, an SSRC str0m has already seen) stays with str0m, and
//!   str0m never sees a packet of a stream that is ours: one source is never
//!   reported on by both.
//! - **Opening.** The SRTP index is guessed from the highest so far (RFC 3711
//!   Appendix A), the packet decrypted with the peer's key (RFC 7714 §8), and
//!   only an authentic packet moves the 64-packet replay window and the
//!   statistics.
//! - **Reports.** What str0m would report for such a stream, we do: a
//!   receiver report (RFC 3550 §6.4.2: fraction and cumulative number lost,
//!   extended highest sequence number, interarrival jitter, and LSR/DLSR from
//!   the publisher's sender reports, read in its SRTCP) a second after the
//!   first packet and every five seconds after, as SRTCP under an SSRC of
//!   our own (str0m numbers the SRTCP of its own SSRCs under the same key:
//!   sharing one could reuse a nonce).

use crate::nack::rtcp_packets;
use crate::srtp::Sealer;
use std::time::{Duration, Instant};
use str0m::media::Mid;

/// How often a session reports on the streams it receives through us (str0m's
/// and libwebrtc's interval for audio).
pub(crate) const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// From a session's first stream of ours to its first report.
const FIRST_REPORT: Duration = Duration::from_secs(1);

/// SSRCs a session keeps a decision for (a caller sends from one or two);
/// past that, new ones go to str0m undecided.
const MAX_STREAMS: usize = 16;

/// The fixed RTP header, CSRCs and header extensions of a packet (RFC 3550
/// §5.1, RFC 8285), as it arrived: in the clear, SRTP's associated data.
pub(crate) struct Header<'a> {
    pub(crate) ssrc: u32,
    pub(crate) seq: u16,
    pub(crate) timestamp: u32,
    pub(crate) pt: u8,
    pub(crate) marker: bool,
    padded: bool,
    /// The header's length: where the (encrypted) payload starts.
    len: usize,
    /// The extension block: its profile (0xBEDE or 0x100X) and elements.
    extensions: Option<(u16, &'a [u8])>,
}

impl<'a> Header<'a> {
    pub(crate) fn parse(data: &'a [u8]) -> Option<Self> {
        if data.len() < 12 || data[0] >> 6 != 2 {
            return None;
        }
        let mut len = 12 + 4 * usize::from(data[0] & 0x0f);
        let mut extensions = None;
        if data[0] & 0x10 != 0 {
            let head = data.get(len..len + 4)?;
            let words = usize::from(u16::from_be_bytes([head[2], head[3]]));
            let block = data.get(len + 4..len + 4 + 4 * words)?;
            extensions = Some((u16::from_be_bytes([head[0], head[1]]), block));
            len += 4 + 4 * words;
        }
        if data.len() < len {
            return None;
        }
        Some(Header {
            ssrc: u32::from_be_bytes([data[8], data[9], data[10], data[11]]),
            seq: u16::from_be_bytes([data[2], data[3]]),
            timestamp: u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
            pt: data[1] & 0x7f,
            marker: data[1] & 0x80 != 0,
            padded: data[0] & 0x20 != 0,
            len,
            extensions,
        })
    }

    /// The value of header extension `id`, in the one-byte or the two-byte
    /// form (RFC 8285 §4).
    pub(crate) fn extension(&self, id: u8) -> Option<&'a [u8]> {
        let (profile, mut block) = self.extensions?;
        let two_byte = match profile {
            0xbede => false,
            p if p & 0xfff0 == 0x1000 => true,
            _ => return None,
        };
        loop {
            let (&first, rest) = block.split_first()?;
            if first == 0 {
                block = rest; // padding
                continue;
            }
            let (element, len, rest) = if two_byte {
                let (&len, rest) = rest.split_first()?;
                (first, usize::from(len), rest)
            } else if first >> 4 == 15 {
                return None; // reserved: stop reading (RFC 8285 §4.2)
            } else {
                (first >> 4, usize::from(first & 0x0f) + 1, rest)
            };
            let value = rest.get(..len)?;
            if element == id {
                return Some(value);
            }
            block = &rest[len..];
        }
    }

    /// The RFC 6464 audio level (−dBov) and voice activity flag in extension `id`.
    pub(crate) fn audio_level(&self, id: Option<u8>) -> Option<(i8, bool)> {
        let byte = *self.extension(id?)?.first()?;
        Some((-((byte & 0x7f) as i8), byte & 0x80 != 0))
    }
}

/// A stream we open: the m-line it came on (its track is whatever is
/// published there now), its clock rate and the id of its audio level
/// extension.
#[derive(Clone, Copy)]
pub(crate) struct Opens {
    pub(crate) mid: Mid,
    pub(crate) clock_rate: u32,
    pub(crate) level_id: Option<u8>,
}

/// An RTP packet we opened.
pub(crate) struct Opened<'a> {
    pub(crate) mid: Mid,
    /// The extended sequence number (the SRTP index).
    pub(crate) seq: u64,
    pub(crate) level: Option<(i8, bool)>,
    /// The payload, decrypted, without padding.
    pub(crate) payload: &'a [u8],
}

/// What became of a packet of one of our streams.
pub(crate) enum Opening<'a> {
    Opened(Opened<'a>),
    /// Not authentic, a replay, or badly padded: dropped.
    Rejected,
    /// Our keys are gone (the session rekeyed): str0m opens it.
    NoKeys,
}

/// Who opens an SSRC's packets.
pub(crate) enum Route {
    /// We do: the index of its receiver.
    Ours(usize),
    Stack,
    /// Not decided yet.
    New,
}

/// One session's streams opened here, and its reports on them.
pub(crate) struct Ingress {
    /// Every SSRC decided, with its receiver if it is ours.
    streams: Vec<(u32, Option<Receiver>)>,
    /// The SSRC our reports come from.
    ssrc: u32,
    /// RTP arrival times are counted from here (jitter).
    epoch: Instant,
    next_report: Option<Instant>,
    /// The last packet opened.
    plain: Vec<u8>,
}

impl Ingress {
    pub(crate) fn new(ssrc: u32, now: Instant) -> Self {
        Self {
            streams: Vec::new(),
            ssrc,
            epoch: now,
            next_report: None,
            plain: Vec::new(),
        }
    }

    pub(crate) fn route(&self, ssrc: u32) -> Route {
        match self.streams.iter().position(|(s, _)| *s == ssrc) {
            Some(at) if self.streams[at].1.is_some() => Route::Ours(at),
            Some(_) => Route::Stack,
            None => Route::New,
        }
    }

    /// Decides a new SSRC: ours if it `opens` and there is room. Returns its
    /// route, and when the session's first report is due if this scheduled it.
    pub(crate) fn decide(
        &mut self,
        header: &Header<'_>,
        opens: Option<Opens>,
        now: Instant,
    ) -> (Route, Option<Instant>) {
        if self.streams.len() == MAX_STREAMS {
            return (Route::Stack, None);
        }
        let receiver = opens.map(|opens| Receiver::new(header.seq, opens));
        let route = if receiver.is_some() {
            Route::Ours(self.streams.len())
        } else {
            Route::Stack
        };
        self.streams.push((header.ssrc, receiver));
        let scheduled = match (&route, self.next_report) {
            (Route::Ours(_), None) => {
                let at = now + FIRST_REPORT;
                self.next_report = Some(at);
                Some(at)
            }
            _ => None,
        };
        (route, scheduled)
    }

    /// Opens a packet of our stream `at` (from [`Ingress::route`]).
    pub(crate) fn open<'s>(
        &'s mut self,
        at: usize,
        sealer: &mut Sealer,
        data: &[u8],
        header: &Header<'_>,
        now: Instant,
    ) -> Opening<'s> {
        let Some((_, Some(receiver))) = self.streams.get_mut(at) else {
            return Opening::NoKeys;
        };
        let index = receiver.index(header.seq);
        match sealer.open_rtp(data, header.len, header.ssrc, index, &mut self.plain) {
            None => return Opening::NoKeys,
            Some(false) => return Opening::Rejected,
            Some(true) => {}
        }
        let mut len = self.plain.len();
        if header.padded {
            // RFC 3550 §5.1: the last byte counts the padding, itself included.
            match self.plain.last().map(|&n| usize::from(n)) {
                Some(n) if n > 0 && n <= len => len -= n,
                _ => return Opening::Rejected,
            }
        }
        if !receiver.accept(index) {
            return Opening::Rejected;
        }
        let arrival = now.saturating_duration_since(self.epoch).as_secs_f64() * f64::from(receiver.opens.clock_rate);
        receiver.note_arrival(arrival as u64 as u32, header.timestamp);
        Opening::Opened(Opened {
            mid: receiver.opens.mid,
            seq: index,
            level: header.audio_level(receiver.opens.level_id),
            payload: &self.plain[..len],
        })
    }

    /// Notes the sender reports in the peer's (plain) compound RTCP, for our
    /// reports' LSR and DLSR.
    pub(crate) fn read_rtcp(&mut self, compound: &[u8], now: Instant) {
        // SR (200): header, sender SSRC, NTP timestamp (8), ...
        for sr in rtcp_packets(compound).filter(|p| p[1] == 200 && p.len() >= 28) {
            let ssrc = u32::from_be_bytes([sr[4], sr[5], sr[6], sr[7]]);
            let middle = u32::from_be_bytes([sr[10], sr[11], sr[12], sr[13]]);
            if let Some((_, Some(receiver))) = self.streams.iter_mut().find(|(s, _)| *s == ssrc) {
                receiver.sender_report = Some((middle, now));
            }
        }
    }

    /// When the next report is due, if any stream is ours.
    pub(crate) fn next_report(&self) -> Option<Instant> {
        self.next_report
    }

    /// Moves the next report (one that could not be sent waits a round).
    pub(crate) fn reschedule(&mut self, at: Instant) {
        self.next_report = Some(at);
    }

    /// The receiver report due now (RFC 3550 §6.4.2) on the streams heard
    /// since the last, and the highest fraction lost in it (0–1); the next
    /// is due [`REPORT_INTERVAL`] later.
    pub(crate) fn report(&mut self, now: Instant) -> Option<(Vec<u8>, f32)> {
        self.next_report = Some(now + REPORT_INTERVAL);
        let blocks: Vec<[u8; 24]> = self
            .streams
            .iter_mut()
            .filter_map(|(ssrc, receiver)| Some((*ssrc, receiver.as_mut().filter(|r| r.heard)?)))
            .take(31)
            .map(|(ssrc, receiver)| receiver.block(ssrc, now))
            .collect();
        if blocks.is_empty() {
            return None;
        }
        let words = 1 + 6 * blocks.len() as u16;
        let mut packet = Vec::with_capacity(8 + 24 * blocks.len());
        packet.push(0x80 | blocks.len() as u8);
        packet.push(201);
        packet.extend_from_slice(&words.to_be_bytes());
        packet.extend_from_slice(&self.ssrc.to_be_bytes());
        let mut worst = 0u8;
        for block in &blocks {
            worst = worst.max(block[4]);
            packet.extend_from_slice(block);
        }
        Some((packet, f32::from(worst) / 256.0))
    }
}

/// One stream we open: its SRTP index and replay window, and what RFC 3550
/// Appendix A.3 and A.8 keep for its reports.
pub(crate) struct Receiver {
    opens: Opens,
    /// The first index accepted.
    base: u64,
    /// The highest index accepted, and which of the 64 up to it were (bit
    /// `i` for `highest - i`).
    highest: u64,
    seen: u64,
    received: u64,
    /// At the last report.
    expected_prior: u64,
    received_prior: u64,
    /// The last packet's relative transit time, in RTP units.
    transit: Option<u32>,
    /// Interarrival jitter estimate, in RTP units.
    jitter: f64,
    /// The middle 32 bits of the last sender report's NTP time, and when it came.
    sender_report: Option<(u32, Instant)>,
    /// Packets came since the last report.
    heard: bool,
}

impl Receiver {
    fn new(first_seq: u16, opens: Opens) -> Self {
        Self {
            opens,
            // A sender's first rollover counter is 0 (RFC 3711 §3.3.1).
            base: u64::from(first_seq),
            highest: u64::from(first_seq),
            seen: 0,
            received: 0,
            expected_prior: 0,
            received_prior: 0,
            transit: None,
            jitter: 0.0,
            sender_report: None,
            heard: false,
        }
    }

    /// The index of a packet numbered `seq`: the one nearest the highest so
    /// far (RFC 3711 Appendix A).
    fn index(&self, seq: u16) -> u64 {
        let guess = (self.highest & !0xffff) | u64::from(seq);
        if guess + 0x8000 < self.highest {
            guess + 0x1_0000
        } else if guess > self.highest + 0x8000 && guess >= 0x1_0000 {
            guess - 0x1_0000
        } else {
            guess
        }
    }

    /// Records an authentic packet's index: `false` for a replay, or one too
    /// old to tell (RFC 3711 §3.3.2).
    fn accept(&mut self, index: u64) -> bool {
        if index > self.highest {
            let ahead = index - self.highest;
            self.seen = if ahead >= 64 { 1 } else { (self.seen << ahead) | 1 };
            self.highest = index;
        } else {
            let behind = self.highest - index;
            if behind >= 64 || self.seen & (1 << behind) != 0 {
                return false;
            }
            self.seen |= 1 << behind;
            // A packet older than the first one widens what was expected.
            self.base = self.base.min(index);
        }
        self.received += 1;
        self.heard = true;
        true
    }

    /// RFC 3550 A.8: the jitter estimate moves by 1/16 of each transit difference.
    fn note_arrival(&mut self, arrival: u32, timestamp: u32) {
        let transit = arrival.wrapping_sub(timestamp);
        if let Some(previous) = self.transit {
            let d = f64::from((transit.wrapping_sub(previous) as i32).unsigned_abs());
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.transit = Some(transit);
    }

    /// The report block on this stream (RFC 3550 §6.4.1, A.3).
    fn block(&mut self, ssrc: u32, now: Instant) -> [u8; 24] {
        let expected = self.highest - self.base + 1;
        let lost = (expected as i64 - self.received as i64).clamp(-0x80_0000, 0x7f_ffff);
        let expected_interval = expected - self.expected_prior;
        let received_interval = self.received - self.received_prior;
        let lost_interval = expected_interval as i64 - received_interval as i64;
        let fraction = if expected_interval == 0 || lost_interval <= 0 {
            0
        } else {
            ((lost_interval << 8) / expected_interval as i64).min(255) as u8
        };
        self.expected_prior = expected;
        self.received_prior = self.received;
        self.heard = false;
        let (lsr, dlsr) = self.sender_report.map_or((0, 0), |(lsr, at)| {
            let delay = now.saturating_duration_since(at);
            (lsr, (delay.as_micros() * 65_536 / 1_000_000) as u32)
        });
        let mut block = [0u8; 24];
        block[..4].copy_from_slice(&ssrc.to_be_bytes());
        block[4] = fraction;
        block[5..8].copy_from_slice(&(lost as i32).to_be_bytes()[1..]);
        block[8..12].copy_from_slice(&(self.highest as u32).to_be_bytes());
        block[12..16].copy_from_slice(&(self.jitter as u32).to_be_bytes());
        block[16..20].copy_from_slice(&lsr.to_be_bytes());
        block[20..24].copy_from_slice(&dlsr.to_be_bytes());
        block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opens(clock_rate: u32) -> Opens {
        Opens {
            mid: Mid::from("0"),
            clock_rate,
            level_id: None,
        }
    }

    fn packet(seq: u16, extensions: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 111];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0, 0, 3, 0xc0, 0xde, 0xad, 0xbe, 0xef]);
        if !extensions.is_empty() {
            p[0] |= 0x10;
            p.extend_from_slice(extensions);
        }
        p.extend_from_slice(&[1, 2, 3]);
        p
    }

    #[test]
    fn headers_and_their_extensions_are_read_in_both_forms() {
        // One-byte form: mid "0" (id 4), then padding, then the audio level (id 1).
        let one = packet(7, &[0xbe, 0xde, 0, 2, 0x40, b'0', 0, 0, 0x10, 0x80 | 40, 0, 0]);
        let header = Header::parse(&one).expect("a header");
        assert_eq!(
            (header.ssrc, header.seq, header.timestamp, header.pt),
            (0xdead_beef, 7, 960, 111)
        );
        assert_eq!(header.len, 24);
        assert_eq!(header.extension(4), Some(&b"0"[..]));
        assert_eq!(header.audio_level(Some(1)), Some((-40, true)));
        assert_eq!(header.extension(2), None);
        // Two-byte form: id 20 (mid "ab"), id 1 (level 10, no voice).
        let two = packet(8, &[0x10, 0x00, 0, 2, 20, 2, b'a', b'b', 1, 1, 10, 0]);
        let header = Header::parse(&two).expect("a header");
        assert_eq!(header.extension(20), Some(&b"ab"[..]));
        assert_eq!(header.audio_level(Some(1)), Some((-10, false)));
        // Truncated: an extension block longer than the packet; a length past its block.
        assert!(Header::parse(&one[..20]).is_none());
        let bad = packet(9, &[0xbe, 0xde, 0, 1, 0x4f, b'0', 0, 0]);
        assert_eq!(Header::parse(&bad).expect("a header").extension(4), None);
        assert!(Header::parse(&[0x40; 12]).is_none(), "not RTP version 2");
    }

    #[test]
    fn any_bytes_parse_or_not_without_a_panic() {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut parsed = 0;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 48) as usize;
            let mut data: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 * 5) as u8) ^ i as u8)
                .collect();
            if let Some(first) = data.first_mut() {
                // Version 2 and at most one CSRC, so more of them get past the first checks.
                *first = 0x80 | (*first & 0x31);
            }
            if let Some(header) = Header::parse(&data) {
                parsed += 1;
                assert!(header.len <= data.len());
                for id in 0..=255 {
                    let _ = header.extension(id);
                }
                let _ = header.audio_level(Some(1));
            }
        }
        assert!(parsed > 10_000, "{parsed} parsed");
    }

    #[test]
    fn the_index_follows_the_sequence_across_rollovers_and_reordering() {
        let mut r = Receiver::new(65_530, opens(48_000));
        assert_eq!(r.index(65_530), 65_530);
        assert!(r.accept(65_530));
        assert_eq!(r.index(5), 65_541, "past the rollover");
        assert!(r.accept(65_541));
        assert_eq!(r.index(65_535), 65_535, "late, from before the rollover");
        assert!(r.accept(65_535));
        assert!(!r.accept(65_535), "a replay");
        assert!(!r.accept(65_541 - 64), "too old to tell");
        assert_eq!(r.index(40_000), 40_000, "far behind: the roll before");
        let fresh = Receiver::new(3, opens(48_000));
        assert_eq!(fresh.index(65_000), 65_000, "no roll below zero");
    }

    #[test]
    fn a_report_counts_loss_since_the_last_and_overall() {
        let now = Instant::now();
        let mut ingress = Ingress::new(0x5eed, now);
        let first = packet(100, &[]);
        let header = Header::parse(&first).expect("a header");
        let (route, scheduled) = ingress.decide(&header, Some(opens(48_000)), now);
        assert!(matches!(route, Route::Ours(0)));
        assert_eq!(scheduled, Some(now + FIRST_REPORT));
        let Some((_, Some(receiver))) = ingress.streams.get_mut(0) else {
            panic!("ours")
        };
        // 100..=199 with every tenth lost; the next interval loses nothing.
        for seq in (100..200).filter(|s| s % 10 != 5) {
            assert!(receiver.accept(seq));
        }
        let (rr, worst) = ingress.report(now).expect("a report");
        assert_eq!(&rr[..8], &[0x81, 201, 0, 7, 0, 0, 0x5e, 0xed]);
        assert_eq!(&rr[8..12], &0xdead_beefu32.to_be_bytes());
        assert_eq!(rr[12], 25, "10 % of 256");
        assert_eq!(&rr[13..16], &[0, 0, 10]);
        assert_eq!(&rr[16..20], &199u32.to_be_bytes());
        assert!((worst - 25.0 / 256.0).abs() < 1e-6);
        assert!(ingress.report(now).is_none(), "nothing heard since");
        let Some((_, Some(receiver))) = ingress.streams.get_mut(0) else {
            panic!("ours")
        };
        for seq in 200..250 {
            assert!(receiver.accept(seq));
        }
        receiver.sender_report = Some((0x1234_5678, now));
        let later = now + Duration::from_millis(500);
        let (rr, _) = ingress.report(later).expect("a report");
        assert_eq!(rr[12], 0, "none lost in this interval");
        assert_eq!(&rr[13..16], &[0, 0, 10], "ten overall");
        assert_eq!(&rr[24..28], &0x1234_5678u32.to_be_bytes(), "LSR");
        assert_eq!(&rr[28..32], &32_768u32.to_be_bytes(), "DLSR: half a second");
        assert_eq!(ingress.next_report(), Some(later + REPORT_INTERVAL));
    }

    #[test]
    fn jitter_follows_rfc_3550_a8() {
        let mut r = Receiver::new(0, opens(8_000));
        r.note_arrival(1_000, 0);
        r.note_arrival(1_160 + 16, 160); // 16 units late
        assert!((r.jitter - 1.0).abs() < 1e-9);
        r.note_arrival(1_320 + 16, 320); // steady: decays
        assert!((r.jitter - 15.0 / 16.0).abs() < 1e-9);
        // Across the timestamp's wrap.
        let mut w = Receiver::new(0, opens(8_000));
        w.note_arrival(100, u32::MAX - 59);
        w.note_arrival(260 + 32, 100);
        assert!((w.jitter - 2.0).abs() < 1e-9);
    }

    #[test]
    fn any_compound_rtcp_is_read_or_not_without_a_panic() {
        let now = Instant::now();
        let mut ingress = Ingress::new(1, now);
        let first = packet(1, &[]);
        ingress.decide(&Header::parse(&first).expect("a header"), Some(opens(48_000)), now);
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 80) as usize;
            let mut data: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 * 3) as u8) ^ i as u8)
                .collect();
            // Mostly version 2 and small lengths, so packets get parsed past the first checks.
            for at in (0..data.len()).step_by(8) {
                data[at] = 0x80 | (data[at] & 0x3f);
                if let Some(len) = data.get_mut(at + 2) {
                    *len = 0;
                }
            }
            ingress.read_rtcp(&data, now);
            let _ = crate::nack::nacks(&data).count();
        }
    }

    #[test]
    fn sender_reports_are_noted_for_our_streams_only() {
        let now = Instant::now();
        let mut ingress = Ingress::new(1, now);
        let first = packet(1, &[]);
        let header = Header::parse(&first).expect("a header");
        ingress.decide(&header, Some(opens(48_000)), now);
        let mut sr = vec![
            0x80, 200, 0, 6, 0xde, 0xad, 0xbe, 0xef, 0xaa, 0xbb, 0x11, 0x22, 0x33, 0x44, 0xcc, 0xdd,
        ];
        sr.extend_from_slice(&[0; 12]);
        let mut other = sr.clone();
        other[7] = 0;
        ingress.read_rtcp(&[other, sr].concat(), now);
        let Some((_, Some(receiver))) = ingress.streams.first() else {
            panic!("ours")
        };
        assert_eq!(receiver.sender_report, Some((0x1122_3344, now)));
    }
}
