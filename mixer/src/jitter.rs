//! A small adaptive jitter buffer for one input, pulled once per mix tick.
//!
//! Packets are kept by their extended RTP sequence number in a ring of
//! [`CAPACITY`] slots (payload buffers reused, no allocation once warm). Each
//! tick the mixer pulls the next sequence number in order:
//! - it is there: play it;
//! - it is missing but later ones are there: it is **lost** (conceal it, or
//!   recover it from the next packet's FEC);
//! - nothing is there: the input is **late** (or silent); the mixer conceals
//!   and the buffer does not advance, so a late packet still plays next tick.
//!   The delay grows by one frame: that is how the buffer adapts to jitter.
//!
//! Delay shrinks again when, for a whole window of [`WINDOW_TICKS`] ticks, at
//! least one packet was always left over after the pull: the oldest is dropped.
//! So the buffer holds as little as the arrival jitter requires, from zero extra
//! frames on a clean network.
//!
//! A sequence number far ahead of the window, or [`LATE_RESTART`] late ones in
//! a row (the sender's numbering went back), restarts the buffer there.

/// Slots in the ring: 16 frames of 20 ms.
pub const CAPACITY: usize = 16;
/// Ticks over which the minimum depth is watched before shrinking.
pub const WINDOW_TICKS: u32 = 50;
/// Largest payload kept (bytes).
pub const MAX_PAYLOAD: usize = crate::codec::MAX_PACKET_BYTES;
/// This many late packets in a row mean the sender's numbering went back (a
/// new stream): the buffer restarts from them instead of dropping them all.
pub const LATE_RESTART: u32 = 8;

/// Why a packet was not buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JitterDrop {
    /// Its turn has passed.
    Late,
    /// Already buffered.
    Duplicate,
    /// Larger than any opus packet.
    Oversize,
    /// Empty.
    Empty,
}

/// What one pull yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Pull<'a> {
    /// The next packet in order.
    Packet(&'a [u8]),
    /// The next packet is missing while later ones arrived; `next` is the one
    /// after it, if present (for in-band FEC).
    Lost { next: Option<&'a [u8]> },
    /// Nothing to play.
    Empty,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JitterStats {
    pub late: u64,
    pub duplicate: u64,
    pub oversize: u64,
    pub lost: u64,
    /// Packets dropped to shrink the delay.
    pub shrunk: u64,
    /// Times the sequence jumped so far ahead that the buffer restarted.
    pub resets: u64,
}

#[derive(Debug, Clone)]
struct Slot {
    seq: Option<u64>,
    data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct JitterBuffer {
    slots: Vec<Slot>,
    /// The next sequence number to play (None until the first pull finds a packet).
    next: Option<u64>,
    min_depth: usize,
    window: u32,
    /// Late packets in a row.
    late_run: u32,
    pub stats: JitterStats,
}

impl Default for JitterBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl JitterBuffer {
    pub fn new() -> Self {
        Self {
            slots: (0..CAPACITY)
                .map(|_| Slot {
                    seq: None,
                    data: Vec::with_capacity(256),
                })
                .collect(),
            next: None,
            min_depth: usize::MAX,
            window: 0,
            late_run: 0,
            stats: JitterStats::default(),
        }
    }

    /// Buffers a packet with extended sequence number `seq`.
    pub fn push(&mut self, seq: u64, payload: &[u8]) -> Result<(), JitterDrop> {
        if payload.is_empty() {
            return Err(JitterDrop::Empty);
        }
        if payload.len() > MAX_PAYLOAD {
            self.stats.oversize += 1;
            return Err(JitterDrop::Oversize);
        }
        if let Some(next) = self.next {
            if seq < next {
                self.stats.late += 1;
                self.late_run += 1;
                if self.late_run < LATE_RESTART {
                    return Err(JitterDrop::Late);
                }
                // The numbering went back: start again from here.
                self.stats.resets += 1;
                self.clear();
                self.next = Some(seq);
            } else if seq >= next.saturating_add(CAPACITY as u64) {
                // Far ahead (the sender jumped, or we stalled): start again from here.
                self.stats.resets += 1;
                self.clear();
                self.next = Some(seq);
            }
        }
        self.late_run = 0;
        let slot = &mut self.slots[(seq % CAPACITY as u64) as usize];
        if slot.seq == Some(seq) {
            self.stats.duplicate += 1;
            return Err(JitterDrop::Duplicate);
        }
        slot.seq = Some(seq);
        slot.data.clear();
        slot.data.extend_from_slice(payload);
        Ok(())
    }

    /// Packets buffered (at or after the next to play).
    pub fn depth(&self) -> usize {
        let next = self.next.unwrap_or(0);
        self.slots.iter().filter(|s| s.seq.is_some_and(|q| q >= next)).count()
    }

    /// The next thing to play.
    pub fn pull(&mut self) -> Pull<'_> {
        let next = match self.next {
            Some(next) => next,
            None => match self.slots.iter().filter_map(|s| s.seq).min() {
                Some(first) => first,
                None => return Pull::Empty,
            },
        };
        self.next = Some(next);
        let index = (next % CAPACITY as u64) as usize;
        if self.slots[index].seq == Some(next) {
            self.next = Some(next.wrapping_add(1));
            let slot = &mut self.slots[index];
            slot.seq = None;
            return Pull::Packet(&slot.data);
        }
        if self.slots.iter().any(|s| s.seq.is_some_and(|q| q > next)) {
            self.stats.lost += 1;
            self.next = Some(next.wrapping_add(1));
            let after = &self.slots[(next.wrapping_add(1) % CAPACITY as u64) as usize];
            let next = (after.seq == Some(next.wrapping_add(1))).then_some(after.data.as_slice());
            return Pull::Lost { next };
        }
        Pull::Empty
    }

    /// Skips the next packet without playing it (the input is not being mixed).
    pub fn skip(&mut self) -> bool {
        !matches!(self.pull(), Pull::Empty)
    }

    /// Once per tick after the pulls: shrinks the delay when packets were
    /// always left over for a whole window.
    pub fn end_tick(&mut self) {
        let depth = self.depth();
        self.min_depth = self.min_depth.min(depth);
        self.window += 1;
        if self.window < WINDOW_TICKS {
            return;
        }
        if self.min_depth >= 1
            && let Some(next) = self.next
        {
            let slot = &mut self.slots[(next % CAPACITY as u64) as usize];
            if slot.seq == Some(next) {
                slot.seq = None;
            }
            self.next = Some(next.wrapping_add(1));
            self.stats.shrunk += 1;
        }
        self.window = 0;
        self.min_depth = usize::MAX;
    }

    fn clear(&mut self) {
        for slot in &mut self.slots {
            slot.seq = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(seq: u64) -> Vec<u8> {
        vec![seq as u8; 10]
    }

    #[test]
    fn in_order_loss_late_and_duplicates() {
        let mut jb = JitterBuffer::new();
        assert_eq!(jb.pull(), Pull::Empty);
        jb.push(100, &payload(100)).expect("first");
        assert_eq!(jb.push(100, &payload(100)), Err(JitterDrop::Duplicate));
        jb.push(102, &payload(102)).expect("third");
        jb.push(103, &payload(103)).expect("fourth");
        assert_eq!(jb.pull(), Pull::Packet(&payload(100)[..]));
        // 101 is missing while 102 is there: lost, with 102 offered for FEC.
        assert_eq!(
            jb.pull(),
            Pull::Lost {
                next: Some(&payload(102)[..])
            }
        );
        assert_eq!(jb.push(101, &payload(101)), Err(JitterDrop::Late));
        assert_eq!(jb.pull(), Pull::Packet(&payload(102)[..]));
        assert_eq!(jb.pull(), Pull::Packet(&payload(103)[..]));
        // Nothing there: wait (do not advance), so a late 104 still plays.
        assert_eq!(jb.pull(), Pull::Empty);
        jb.push(104, &payload(104)).expect("late but not too late");
        assert_eq!(jb.pull(), Pull::Packet(&payload(104)[..]));
        assert_eq!(jb.stats.lost, 1);
        assert_eq!(jb.stats.late, 1);
        assert_eq!(jb.push(105, &[]), Err(JitterDrop::Empty));
        assert_eq!(jb.push(105, &[0; MAX_PAYLOAD + 1]), Err(JitterDrop::Oversize));
    }

    /// Random arrival orders, duplicates, losses and jumps: it never panics,
    /// and plays every sequence number at most once and in increasing order
    /// (between restarts).
    #[test]
    fn random_arrivals_play_in_order_at_most_once() {
        let mut x = 0x9e37_79b9_u32;
        let mut rand = move |n: u32| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % n
        };
        for _ in 0..200 {
            let mut jb = JitterBuffer::new();
            let mut played: Vec<u64> = Vec::new();
            let mut next_send = 0u64;
            let mut in_flight: Vec<u64> = Vec::new();
            let mut resets = 0;
            for _tick in 0..300 {
                // Up to 3 packets arrive, some reordered, duplicated, dropped, or far ahead.
                for _ in 0..rand(4) {
                    match rand(20) {
                        0 => next_send += 1,                            // lost
                        1 => next_send += 1000 + u64::from(rand(5000)), // a jump
                        _ => {}
                    }
                    in_flight.push(next_send);
                    if rand(10) == 0 {
                        in_flight.push(next_send); // duplicate
                    }
                    next_send += 1;
                }
                while !in_flight.is_empty() && rand(3) != 0 {
                    let seq = in_flight.swap_remove(rand(in_flight.len() as u32) as usize);
                    let _ = jb.push(seq, &seq.to_le_bytes());
                }
                match jb.pull() {
                    Pull::Packet(p) => {
                        let seq = u64::from_le_bytes(p.try_into().expect("8 bytes"));
                        if jb.stats.resets == resets {
                            assert!(played.last().is_none_or(|last| seq > *last), "{seq} after {played:?}");
                        }
                        resets = jb.stats.resets;
                        played.push(seq);
                    }
                    Pull::Lost { next } => {
                        if let Some(p) = next {
                            assert_eq!(p.len(), 8);
                        }
                    }
                    Pull::Empty => {}
                }
                jb.end_tick();
                assert!(jb.depth() <= CAPACITY);
            }
        }
    }

    #[test]
    fn numbering_that_goes_back_restarts_after_a_few_packets() {
        let mut jb = JitterBuffer::new();
        for seq in 5000..5010 {
            jb.push(seq, &payload(seq)).expect("push");
            assert!(matches!(jb.pull(), Pull::Packet(_)));
        }
        for seq in 100..100 + u64::from(LATE_RESTART) - 1 {
            assert_eq!(jb.push(seq, &payload(seq)), Err(JitterDrop::Late));
        }
        let restart = 100 + u64::from(LATE_RESTART) - 1;
        jb.push(restart, &payload(restart)).expect("the new numbering is taken");
        assert_eq!(jb.pull(), Pull::Packet(&payload(restart)[..]));
        assert_eq!(jb.stats.resets, 1);
    }

    #[test]
    fn a_jump_far_ahead_restarts() {
        let mut jb = JitterBuffer::new();
        jb.push(5, &payload(5)).expect("push");
        assert!(matches!(jb.pull(), Pull::Packet(_)));
        jb.push(5 + 1000, &payload(9)).expect("jump");
        assert_eq!(jb.stats.resets, 1);
        assert!(matches!(jb.pull(), Pull::Packet(_)));
    }

    #[test]
    fn extra_delay_shrinks_after_a_window() {
        let mut jb = JitterBuffer::new();
        // One packet of extra delay: two arrive before the first tick, then one per tick.
        jb.push(0, &payload(0)).expect("push");
        jb.push(1, &payload(1)).expect("push");
        for seq in 2..2 + u64::from(WINDOW_TICKS) {
            assert!(matches!(jb.pull(), Pull::Packet(_)));
            jb.end_tick();
            jb.push(seq, &payload(seq)).expect("push");
        }
        assert_eq!(jb.stats.shrunk, 1, "the leftover frame was dropped");
        // Now it runs with no frame left over (pull, then the next one arrives).
        assert!(matches!(jb.pull(), Pull::Packet(_)));
        assert_eq!(jb.depth(), 0);
    }
}
