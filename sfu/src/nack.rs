//! Retransmission of the video the SFU seals itself (see [`crate::srtp`]).
//!
//! Video we seal ourselves is remembered in a [`History`] per outgoing
//! stream: a ring of what went out under which sequence number, whose
//! payloads are the publisher's, shared (`Arc`) by every subscriber's ring;
//! ~50 bytes per packet and subscriber (str0m's resend cache keeps a whole
//! packet record, several hundred bytes). A subscriber's
//! generic NACK (RFC 4585 §6.2.1), read from its SRTCP by [`nacks`], is
//! answered by sealing the remembered packet again under the same sequence
//! number on the same SSRC (RFC 4588 §1 leaves RTX optional; str0m keeps
//! the RTX SSRC for what it sends itself, so the two never share SRTP
//! indices).

use crate::srtp::Head;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Packets remembered per outgoing video stream: ~0.85 s at 300 packets a
/// second, ~1.7 s at a webcam's 150 (NACKs come within a few round trips).
pub(crate) const HISTORY: usize = 256;

/// A packet is resent at most once in this long (a NACK repeated within it
/// asks for the copy already on its way).
const RESEND_INTERVAL: Duration = Duration::from_millis(10);

/// Sequence numbers read from one RTCP datagram at most.
pub(crate) const MAX_ASKED: usize = 256;

/// Resends are paid for by what was sent: each packet sent earns half a
/// resend, up to a burst of [`MAX_CREDIT`] halves. So a subscriber's NACKs can
/// make us send at most half again as much, whatever it asks for.
const MAX_CREDIT: u32 = 128;

/// One packet as it went out to the subscriber: everything its header was
/// built from, so a resend is that very packet again.
#[derive(Clone)]
pub(crate) struct Sent {
    pub(crate) head: Head,
    pub(crate) payload: Arc<[u8]>,
    resent_at: Option<Instant>,
}

impl Sent {
    pub(crate) fn new(head: Head, payload: Arc<[u8]>) -> Self {
        Self {
            head,
            payload,
            resent_at: None,
        }
    }
}

/// The last [`HISTORY`] packets of one outgoing stream, by sequence number.
pub(crate) struct History {
    ring: Box<[Option<Sent>]>,
    /// The highest sequence number remembered.
    latest: Option<u64>,
    /// Resends earned, in halves (see [`MAX_CREDIT`]).
    credit: u32,
}

impl History {
    pub(crate) fn new() -> Self {
        Self {
            ring: vec![None; HISTORY].into_boxed_slice(),
            latest: None,
            credit: 0,
        }
    }

    pub(crate) fn remember(&mut self, sent: Sent) {
        if self
            .latest
            .is_some_and(|latest| latest >= sent.head.seq + HISTORY as u64)
        {
            return; // older than the ring: it would evict a newer packet
        }
        self.credit = (self.credit + 1).min(MAX_CREDIT);
        self.latest = Some(self.latest.map_or(sent.head.seq, |l| l.max(sent.head.seq)));
        let slot = (sent.head.seq % HISTORY as u64) as usize;
        self.ring[slot] = Some(sent);
    }

    /// The packet a NACK names by its 16-bit sequence number, if it is
    /// still remembered, was not resent in the last [`RESEND_INTERVAL`] and
    /// the stream has credit left.
    pub(crate) fn resend(&mut self, now: Instant, seq16: u16) -> Option<&Sent> {
        let seq = extend(self.latest?, seq16)?;
        let slot = (seq % HISTORY as u64) as usize;
        let sent = self.ring[slot].as_mut().filter(|s| s.head.seq == seq)?;
        if sent.resent_at.is_some_and(|at| now < at + RESEND_INTERVAL) || self.credit < 2 {
            return None;
        }
        self.credit -= 2;
        sent.resent_at = Some(now);
        Some(sent)
    }
}

/// The extended sequence number nearest `latest` (not after it) with these low 16 bits.
fn extend(latest: u64, seq16: u16) -> Option<u64> {
    let candidate = (latest & !0xffff) | u64::from(seq16);
    if candidate <= latest {
        Some(candidate)
    } else {
        candidate.checked_sub(1 << 16)
    }
}

/// Whether a datagram is RTCP (RFC 5761 §4: version 2, packet type 192–223).
pub(crate) fn is_rtcp(datagram: &[u8]) -> bool {
    datagram.len() >= 8 && datagram[0] >> 6 == 2 && (192..=223).contains(&datagram[1])
}

/// The packets of a compound RTCP packet (RFC 3550 §6.1), without their
/// padding. Parsing stops at the first malformed packet.
pub(crate) fn rtcp_packets(compound: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    let mut rest = compound;
    std::iter::from_fn(move || {
        if rest.len() < 4 || rest[0] >> 6 != 2 {
            return None;
        }
        let len = (usize::from(u16::from_be_bytes([rest[2], rest[3]])) + 1) * 4;
        if len > rest.len() {
            return None;
        }
        let (mut packet, next) = rest.split_at(len);
        rest = next;
        if packet[0] & 0x20 != 0 {
            // Padding: its last byte counts the bytes to drop.
            let padding = usize::from(packet[len - 1]);
            packet = &packet[..len.saturating_sub(padding).max(4)];
        }
        Some(packet)
    })
}

/// The (media SSRC, sequence number) pairs the generic NACKs of a compound
/// RTCP packet ask for. Parsing stops at the first malformed packet.
pub(crate) fn nacks(compound: &[u8]) -> impl Iterator<Item = (u32, u16)> + '_ {
    rtcp_packets(compound)
        // RTPFB (205), FMT 1: sender SSRC, media SSRC, then (PID, BLP) pairs.
        .filter(|packet| packet[1] == 205 && packet[0] & 0x1f == 1 && packet.len() >= 12)
        .flat_map(|packet| {
            let media = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
            packet[12..].chunks_exact(4).flat_map(move |fci| {
                let pid = u16::from_be_bytes([fci[0], fci[1]]);
                let blp = u16::from_be_bytes([fci[2], fci[3]]);
                let lost = (0..16u16).filter(move |bit| blp & (1 << bit) != 0);
                std::iter::once(pid)
                    .chain(lost.map(move |bit| pid.wrapping_add(bit + 1)))
                    .map(move |seq| (media, seq))
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(seq: u64) -> Sent {
        let head = Head {
            pt: 96,
            marker: false,
            seq,
            timestamp: seq as u32 * 3000,
            level: None,
            orientation: None,
        };
        Sent::new(head, Arc::from(vec![seq as u8]))
    }

    /// A history that sent the packets numbered `seqs`.
    fn remembering(seqs: std::ops::Range<u64>) -> History {
        let mut history = History::new();
        for seq in seqs {
            history.remember(sent(seq));
        }
        history
    }

    #[test]
    fn sequence_numbers_extend_towards_the_latest() {
        assert_eq!(extend(70_000, (70_000u64 & 0xffff) as u16), Some(70_000));
        assert_eq!(extend(70_000, 65_535), Some(65_535));
        assert_eq!(extend(65_540, 65_530), Some(65_530));
        assert_eq!(extend(10, 11), None, "before the first packet");
    }

    #[test]
    fn the_history_resends_what_it_still_holds_once_per_interval() {
        let now = Instant::now();
        let mut history = remembering(65_000..66_000);
        let wanted = (65_990u64 & 0xffff) as u16;
        assert_eq!(history.resend(now, wanted).map(|s| s.head.seq), Some(65_990));
        assert!(history.resend(now, wanted).is_none(), "just resent");
        let later = now + RESEND_INTERVAL;
        assert_eq!(history.resend(later, wanted).map(|s| s.head.seq), Some(65_990));
        let forgotten = ((66_000 - HISTORY as u64 - 1) & 0xffff) as u16;
        assert!(history.resend(now, forgotten).is_none(), "overwritten");
        assert!(History::new().resend(now, 1).is_none());
    }

    #[test]
    fn resends_are_paid_for_by_what_was_sent() {
        let now = Instant::now();
        let mut history = remembering(0..10);
        // Ten sent: five resends, however often and for whatever it asks.
        let resent = (0..10).filter(|seq| history.resend(now, *seq).is_some()).count();
        assert_eq!(resent, 5);
        history.remember(sent(10));
        history.remember(sent(11));
        assert!(history.resend(now, 9).is_some(), "two more sent, one more resend");
        // A burst is capped however long the stream ran quietly.
        for seq in 12..1000 {
            history.remember(sent(seq));
        }
        let later = now + RESEND_INTERVAL;
        let resent = (744..1000).filter(|seq| history.resend(later, *seq).is_some()).count();
        assert_eq!(resent, MAX_CREDIT as usize / 2);
    }

    #[test]
    fn a_packet_older_than_the_ring_does_not_evict_a_newer_one() {
        let now = Instant::now();
        let mut history = remembering(300..400);
        // 100 shares its slot with 356, and is a whole ring behind the latest (399).
        history.remember(sent(356 - HISTORY as u64));
        assert_eq!(
            history.resend(now, 356).map(|s| s.head.seq),
            Some(356),
            "356 is still there"
        );
    }

    #[test]
    fn padding_is_not_read_as_nacks() {
        // P bit set: one FCI (PID 5) then four bytes of padding that would read as PID 0x0102.
        let packet = [0xa1, 205, 0, 4, 0, 0, 0, 9, 0, 0, 0, 7, 0, 5, 0, 0, 1, 2, 0, 4];
        assert_eq!(nacks(&packet).collect::<Vec<_>>(), vec![(7, 5)]);
    }

    #[test]
    fn generic_nacks_are_read_from_a_compound_packet() {
        // A receiver report (no blocks), then a NACK for media SSRC 0x0a0b0c0d:
        // PID 100 with BLP bits 0 and 15 (101 and 116), and PID 65535 with bit 0 (wraps to 0).
        let mut compound = vec![0x80, 201, 0, 1, 0, 0, 0, 9];
        compound.extend_from_slice(&[0x81, 205, 0, 4, 0, 0, 0, 9, 0x0a, 0x0b, 0x0c, 0x0d]);
        compound.extend_from_slice(&[0, 100, 0x80, 0x01, 0xff, 0xff, 0, 1]);
        let found: Vec<(u32, u16)> = nacks(&compound).collect();
        let media = 0x0a0b_0c0d;
        assert_eq!(
            found,
            vec![(media, 100), (media, 101), (media, 116), (media, 65_535), (media, 0)]
        );
    }

    #[test]
    fn malformed_rtcp_yields_what_came_before_it() {
        let mut compound = vec![0x81, 205, 0, 3, 0, 0, 0, 9, 0, 0, 0, 7, 0, 5, 0, 0];
        // Claims more words than there are.
        compound.extend_from_slice(&[0x81, 205, 0, 9, 0, 0, 0, 9]);
        assert_eq!(nacks(&compound).collect::<Vec<_>>(), vec![(7, 5)]);
        assert_eq!(nacks(&[0x81, 205]).count(), 0);
        assert_eq!(nacks(&[]).count(), 0);
        // A NACK too short for its media SSRC is skipped.
        assert_eq!(nacks(&[0x81, 205, 0, 1, 0, 0, 0, 9]).count(), 0);
        assert!(is_rtcp(&[0x81, 205, 0, 1, 0, 0, 0, 9]));
        assert!(!is_rtcp(&[0x80, 96, 0, 1, 0, 0, 0, 9]), "RTP");
    }
}
