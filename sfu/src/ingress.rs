//! Our own SRTP receiver for what participants send: the receive side's
//! short cut past str0m.
//!
//! str0m decrypts and parses each datagram it is given, runs a whole timeout
//! of the session after it (ICE, DTLS, RTCP, pacer) and hands the packet back
//! as an event: in calls that was most of the SFU's CPU. Forwarding needs none
//! of that, so in sessions whose forwarded media the SFU seals itself (AEAD
//! profiles, no bandwidth estimator: see [`crate::srtp`]) it opens all their
//! RTP itself, and sends the RTCP a receiver owes the sender. str0m then sees
//! none of their RTP (so no source is reported on, or fed back, twice), and
//! keeps ICE, DTLS, their RTCP and what the SFU sends through it.
//!
//! - **Streams.** Each SSRC gets a [`Receiver`] at its first packet, and a
//!   [`Role`]: media of the m-line its mid extension names (on the simulcast
//!   layer its rid names, RFC 8852), retransmissions of that media (an RTX
//!   payload type, RFC 4588), or unknown for now (no mid yet: opened, fed
//!   back, not forwarded).
//! - **Opening.** The SRTP index is guessed from the highest so far (RFC 3711
//!   Appendix A), the packet decrypted with the peer's key (RFC 7714 §8), and
//!   only an authentic packet moves the 64-packet replay window and the
//!   statistics (with its kernel arrival time: see `Sfu::handle_receive_at`).
//!   A retransmission is restored (its original sequence number
//!   taken from its payload) and forwarded if the media stream has not had
//!   it; padding-only packets (bandwidth probes) are only fed back.
//! - **RTCP of ours**, one compound SRTCP packet per due time, under an SSRC
//!   of its own (str0m numbers the SRTCP of its SSRCs under the same key:
//!   sharing one could reuse a nonce): receiver reports (RFC 3550 §6.4.2:
//!   fraction and cumulative lost, extended highest sequence number, jitter,
//!   LSR/DLSR from the sender's reports, read in its SRTCP) a second after
//!   the first packet, then every second with video and every five without;
//!   generic NACKs (RFC 4585) for lost video, every 30 ms while it stays
//!   lost, up to 8 times and 1 s; transport-wide feedback ([`crate::twcc`])
//!   every 100 ms while packets arrive; PLIs the SFU asks for. A compound
//!   stays under the MTU: what does not fit goes in another datagram.

use crate::nack::rtcp_packets;
use crate::srtp::Sealer;
use crate::twcc::{self, TwccFeedback};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use str0m::media::Mid;

/// How often a session reports on the audio it receives through us (str0m's
/// and libwebrtc's interval).
pub(crate) const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// From a session's first stream of ours to its first report.
const FIRST_REPORT: Duration = Duration::from_secs(1);

/// SSRCs a session keeps a decision for (a caller sends from a few: its
/// tracks, their retransmissions and simulcast layers). A new one takes the
/// place of one that never sent an authentic packet (forged, from a spoofed
/// source), else of one silent for [`IDLE_STREAM`] (streams replaced over a
/// long call), else is dropped.
const MAX_STREAMS: usize = 16;
const IDLE_STREAM: Duration = Duration::from_secs(30);

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

/// A media stream we open: the m-line it came on (its track is whatever is
/// published there now), its clock rate, and the ids of the extensions
/// forwarded from it.
#[derive(Clone, Copy)]
pub(crate) struct Opens {
    pub(crate) mid: Mid,
    /// The simulcast layer it carries (its index in the track's layers; 0
    /// without simulcast).
    pub(crate) layer: usize,
    pub(crate) clock_rate: u32,
    pub(crate) level_id: Option<u8>,
    pub(crate) orientation_id: Option<u8>,
    /// Video: losses are asked for again (generic NACK, RFC 4585 §6.2.1).
    pub(crate) nack: bool,
}

/// What an SSRC of the session carries.
#[derive(Clone, Copy)]
pub(crate) enum Role {
    Media(Opens),
    /// Retransmissions (RFC 4588) of the media stream at this index, whose
    /// payload type this is.
    Rtx {
        main: usize,
        pt: u8,
    },
    /// Not known yet (no mid, or its media stream not seen yet): opened for
    /// authentication and transport-wide feedback, not forwarded.
    Unknown,
}

/// An RTP packet we opened, as its media stream's (a retransmission restored).
pub(crate) struct Opened<'a> {
    pub(crate) ssrc: u32,
    pub(crate) mid: Mid,
    pub(crate) layer: usize,
    /// The extended sequence number.
    pub(crate) seq: u64,
    pub(crate) pt: u8,
    pub(crate) level: Option<(i8, bool)>,
    /// The video orientation extension's byte.
    pub(crate) orientation: Option<u8>,
    /// The payload, decrypted, without padding.
    pub(crate) payload: &'a [u8],
}

/// What became of a packet of one of our streams.
pub(crate) enum Opening<'a> {
    Opened(Opened<'a>),
    /// Authentic, but nothing to forward: padding, a retransmission of what
    /// came already, a stream of unknown role.
    Consumed,
    /// Not authentic, a replay, or badly padded: dropped.
    Rejected,
    /// Our keys are gone (the session rekeyed): str0m opens it.
    NoKeys,
}

/// An authentic packet's SRTP index and payload length (see [`Ingress::authenticate`]).
#[derive(Clone, Copy)]
pub(crate) struct Authentic {
    index: u64,
    len: usize,
}

/// Who opens an SSRC's packets.
pub(crate) enum Route {
    /// We do: the index of its receiver.
    Ours(usize),
    /// Not decided yet.
    New,
    /// A session can decide only so many.
    Full,
}

/// One session's media opened here, and the RTCP it sends about it.
pub(crate) struct Ingress {
    streams: Vec<Stream>,
    /// The SSRC our RTCP comes from.
    ssrc: u32,
    /// RTP arrival times are counted from here (jitter).
    epoch: Instant,
    /// Transport-wide feedback, where negotiated: the extension's id.
    twcc: Option<(u8, TwccFeedback)>,
    next_report: Option<Instant>,
    next_twcc: Option<Instant>,
    /// Media streams to ask for a keyframe (PLI, RFC 4585 §6.3.1) now.
    keyframes: Vec<u32>,
    /// The last packet opened.
    plain: Vec<u8>,
    /// What media streams that gave their place up carried, latest last: a
    /// stream that comes back may carry no mid or rid any more (libwebrtc
    /// stops sending them once our reports acknowledged its SSRC).
    forgotten: VecDeque<(u32, Opens)>,
}

struct Stream {
    ssrc: u32,
    role: Role,
    receiver: Receiver,
    /// When its last authentic packet came (none yet: its place is free).
    last: Option<Instant>,
}

/// Losses asked for again every this long while they stay lost ...
const NACK_INTERVAL: Duration = Duration::from_millis(30);
/// ... this many times at most, for at most this long.
const NACK_TRIES: u8 = 8;
const NACK_GIVE_UP: Duration = Duration::from_millis(1_000);
/// Lost packets remembered per stream; a larger gap is not asked for (the
/// subscribers' keyframe requests recover it).
const MAX_MISSING: usize = 256;

impl Ingress {
    pub(crate) fn new(ssrc: u32, now: Instant) -> Self {
        Self {
            streams: Vec::new(),
            ssrc,
            epoch: now,
            twcc: None,
            next_report: None,
            next_twcc: None,
            keyframes: Vec::new(),
            plain: Vec::new(),
            forgotten: VecDeque::new(),
        }
    }

    /// Transport-wide feedback is negotiated, under extension id `id`.
    pub(crate) fn set_twcc(&mut self, id: u8, now: Instant) {
        if self.twcc.is_none() {
            self.twcc = Some((id, TwccFeedback::new(now)));
        }
    }

    pub(crate) fn route(&self, ssrc: u32, now: Instant) -> Route {
        match self.streams.iter().position(|s| s.ssrc == ssrc) {
            Some(at) => Route::Ours(at),
            None if self.streams.len() < MAX_STREAMS || self.idle(now).is_some() => Route::New,
            None => Route::Full,
        }
    }

    /// A stream whose place a new one may take: one that never sent an
    /// authentic packet; else, of those silent for [`IDLE_STREAM`], first
    /// one of unknown role or of retransmissions, then media another stream
    /// of its m-line and layer replaced, then the media silent longest.
    fn idle(&self, now: Instant) -> Option<usize> {
        let rank = |stream: &Stream| match stream.role {
            Role::Unknown | Role::Rtx { .. } => 0,
            Role::Media(opens)
                if self
                    .media_on(opens.mid, opens.layer)
                    .is_some_and(|at| self.streams[at].ssrc != stream.ssrc) =>
            {
                1
            }
            Role::Media(_) => 2,
        };
        if let Some(free) = self.streams.iter().position(|s| s.last.is_none()) {
            return Some(free);
        }
        self.streams
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.last
                    .is_some_and(|last| now.saturating_duration_since(last) >= IDLE_STREAM)
            })
            .min_by_key(|(_, s)| (rank(s), s.last))
            .map(|(at, _)| at)
    }

    pub(crate) fn role(&self, at: usize) -> Option<Role> {
        self.streams.get(at).map(|s| s.role)
    }

    /// The index of the media stream on `mid`, if one was seen.
    pub(crate) fn media_on(&self, mid: Mid, layer: usize) -> Option<usize> {
        // The one that sent last (a stream that replaced another on its m-line).
        self.streams
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.role, Role::Media(opens) if opens.mid == mid && opens.layer == layer))
            .filter_map(|(at, s)| Some((s.last?, at)))
            .max()
            .map(|(_, at)| at)
    }

    /// The SSRCs of the media streams (not retransmissions) seen.
    pub(crate) fn media_ssrcs(&self) -> impl Iterator<Item = u32> + '_ {
        self.streams
            .iter()
            .filter(|s| matches!(s.role, Role::Media(_)))
            .map(|s| s.ssrc)
    }

    /// Whether any stream is ours (their RTCP is ours to read).
    pub(crate) fn has_streams(&self) -> bool {
        !self.streams.is_empty()
    }

    /// Asks for a keyframe of the media stream of `layer` on `mid` with the
    /// next RTCP; `false` if no such stream is ours.
    pub(crate) fn request_keyframe(&mut self, mid: Mid, layer: usize) -> bool {
        let Some(at) = self.media_on(mid, layer) else {
            return false;
        };
        let ssrc = self.streams[at].ssrc;
        if !self.keyframes.contains(&ssrc) {
            self.keyframes.push(ssrc);
        }
        true
    }

    /// A new SSRC (after [`Ingress::route`] said `New`), of a role learnt
    /// from its first authentic packet ([`Ingress::set_role`]); its index
    /// (`None` if there is no room for it).
    pub(crate) fn add(&mut self, ssrc: u32, now: Instant) -> Option<usize> {
        let stream = Stream {
            ssrc,
            role: Role::Unknown,
            receiver: Receiver::new(false),
            last: None,
        };
        let free = self.streams.iter().position(|s| s.last.is_none());
        let at = match free {
            None if self.streams.len() < MAX_STREAMS => {
                self.streams.push(stream);
                return Some(self.streams.len() - 1);
            }
            None => self.idle(now)?,
            Some(at) => at,
        };
        let gone = std::mem::replace(&mut self.streams[at], stream);
        if let (Role::Media(opens), Some(_)) = (gone.role, gone.last) {
            if self.forgotten.len() == MAX_STREAMS {
                self.forgotten.pop_front();
            }
            self.forgotten.push_back((gone.ssrc, opens));
        }
        // Retransmissions of what was there are to be learnt again.
        for other in &mut self.streams {
            if matches!(other.role, Role::Rtx { main, .. } if main == at) {
                other.role = Role::Unknown;
            }
        }
        Some(at)
    }

    /// What `ssrc` carried when it gave its place up, if it was media.
    pub(crate) fn forgotten(&self, ssrc: u32) -> Option<Role> {
        self.forgotten
            .iter()
            .rev()
            .find(|(s, _)| *s == ssrc)
            .map(|(_, opens)| Role::Media(*opens))
    }

    /// A stream's role, learnt later.
    pub(crate) fn set_role(&mut self, at: usize, role: Role) {
        if let Some(stream) = self.streams.get_mut(at) {
            stream.receiver.nack = matches!(role, Role::Media(opens) if opens.nack);
            stream.role = role;
        }
    }

    /// Opens a packet of our stream `at` (from [`Ingress::route`]) that
    /// arrived at `arrived` (the kernel's time stamp): its payload goes into
    /// the ingress's buffer for [`Ingress::take`], which forwards it as its
    /// stream's role says (learnt, if it is unknown, only from an authentic
    /// packet: nothing a forged one says sticks). The error is what happened
    /// to it otherwise.
    pub(crate) fn authenticate(
        &mut self,
        at: usize,
        sealer: &mut Sealer,
        data: &[u8],
        header: &Header<'_>,
        now: Instant,
        arrived: Instant,
    ) -> Result<Authentic, Opening<'static>> {
        let Some(stream) = self.streams.get_mut(at) else {
            return Err(Opening::Consumed);
        };
        let receiver = &mut stream.receiver;
        let index = receiver.index(header.seq);
        match sealer.open_rtp(data, header.len, header.ssrc, index, &mut self.plain) {
            None => return Err(Opening::NoKeys),
            Some(false) => return Err(Opening::Rejected),
            Some(true) => {}
        }
        let mut len = self.plain.len();
        if header.padded {
            // RFC 3550 §5.1: the last byte counts the padding, itself included.
            match self.plain.last().map(|&n| usize::from(n)) {
                Some(n) if n > 0 && n <= len => len -= n,
                _ => return Err(Opening::Rejected),
            }
        }
        if !receiver.accept(index, now) {
            return Err(Opening::Rejected);
        }
        stream.last = Some(now);
        if let Some((id, twcc)) = &mut self.twcc
            && let Some(&[a, b, ..]) = header.extension(*id)
        {
            twcc.record(u16::from_be_bytes([a, b]), arrived);
            if self.next_twcc.is_none() {
                self.next_twcc = Some(now + twcc::INTERVAL);
            }
        }
        Ok(Authentic { index, len })
    }

    /// What the authentic packet [`Ingress::authenticate`] opened carries, by
    /// its stream's role: media to forward (a retransmission restored), or
    /// nothing (padding, what came already, a stream of unknown role).
    pub(crate) fn take<'s>(
        &'s mut self,
        at: usize,
        header: &Header<'_>,
        Authentic { index, len }: Authentic,
        now: Instant,
        arrived: Instant,
    ) -> Opening<'s> {
        let Some(stream) = self.streams.get_mut(at) else {
            return Opening::Consumed;
        };
        let role = stream.role;
        let ssrc = stream.ssrc;
        match role {
            Role::Unknown => Opening::Consumed,
            Role::Media(opens) => {
                let arrival = arrived.saturating_duration_since(self.epoch).as_secs_f64() * f64::from(opens.clock_rate);
                stream.receiver.note_arrival(arrival as u64 as u32, header.timestamp);
                self.schedule_first_report(now);
                Opening::Opened(Opened {
                    ssrc,
                    mid: opens.mid,
                    layer: opens.layer,
                    seq: index,
                    pt: header.pt,
                    level: header.audio_level(opens.level_id),
                    orientation: opens
                        .orientation_id
                        .and_then(|id| header.extension(id)?.first().copied()),
                    payload: &self.plain[..len],
                })
            }
            Role::Rtx { main, pt } => {
                // RFC 4588 §4: the original sequence number, then the payload.
                // (Shorter: padding, a bandwidth probe.)
                if len < 2 {
                    return Opening::Consumed;
                }
                let (a, b) = (self.plain[0], self.plain[1]);
                let Some(Stream {
                    ssrc,
                    role: Role::Media(opens),
                    receiver,
                    last,
                }) = self.streams.get_mut(main)
                else {
                    return Opening::Consumed;
                };
                let seq = receiver.index(u16::from_be_bytes([a, b]));
                if !receiver.accept(seq, now) {
                    return Opening::Consumed; // came already, or too old
                }
                *last = Some(now);
                Opening::Opened(Opened {
                    ssrc: *ssrc,
                    mid: opens.mid,
                    layer: opens.layer,
                    seq,
                    pt,
                    level: None,
                    orientation: opens
                        .orientation_id
                        .and_then(|id| header.extension(id)?.first().copied()),
                    payload: &self.plain[2..len],
                })
            }
        }
    }

    fn schedule_first_report(&mut self, now: Instant) {
        if self.next_report.is_none() {
            self.next_report = Some(now + FIRST_REPORT);
        }
    }

    /// Notes the sender reports in the peer's (plain) compound RTCP, for our
    /// reports' LSR and DLSR.
    pub(crate) fn read_rtcp(&mut self, compound: &[u8], now: Instant) {
        // SR (200): header, sender SSRC, NTP timestamp (8), ...
        for sr in rtcp_packets(compound).filter(|p| p[1] == 200 && p.len() >= 28) {
            let ssrc = u32::from_be_bytes([sr[4], sr[5], sr[6], sr[7]]);
            let middle = u32::from_be_bytes([sr[10], sr[11], sr[12], sr[13]]);
            if let Some(stream) = self.streams.iter_mut().find(|s| s.ssrc == ssrc) {
                stream.receiver.sender_report = Some((middle, now));
            }
        }
    }

    /// When our next RTCP is due: a report, transport-wide feedback, or a
    /// loss to ask for again.
    pub(crate) fn next_rtcp(&self) -> Option<Instant> {
        let nack = self.streams.iter().filter_map(|s| s.receiver.next_nack()).min();
        let keyframes = (!self.keyframes.is_empty()).then_some(self.epoch);
        [self.next_report, self.next_twcc, nack, keyframes]
            .into_iter()
            .flatten()
            .min()
    }

    /// The compound RTCP due now, if anything is: a receiver report on the
    /// media streams heard since the last (RFC 3550 §6.4.2), NACKs, and
    /// transport-wide feedback; and the highest fraction lost reported (0–1).
    pub(crate) fn poll_rtcp(&mut self, now: Instant) -> (Vec<Vec<u8>>, Option<f32>) {
        let mut compounds = Vec::new();
        let mut worst = None;
        if self.next_report.is_some_and(|at| at <= now) {
            let video = self
                .streams
                .iter()
                .any(|s| matches!(s.role, Role::Media(opens) if opens.nack));
            self.next_report = Some(now + if video { VIDEO_REPORT_INTERVAL } else { REPORT_INTERVAL });
            if let Some((report, loss)) = self.report(now) {
                add_rtcp(&mut compounds, &report);
                worst = Some(loss);
            }
        }
        for media in std::mem::take(&mut self.keyframes) {
            let pli = [[0x81, 206, 0, 2], self.ssrc.to_be_bytes(), media.to_be_bytes()].concat();
            add_rtcp(&mut compounds, &pli);
        }
        for stream in &mut self.streams {
            let lost = stream.receiver.nacks_due(now);
            if !lost.is_empty() {
                add_rtcp(&mut compounds, &nack_packet(self.ssrc, stream.ssrc, &lost));
            }
        }
        if self.next_twcc.is_some_and(|at| at <= now) {
            self.next_twcc = None;
            let media = self.streams.first().map_or(0, |s| s.ssrc);
            if let Some((_, twcc)) = &mut self.twcc {
                // (A burst bigger than a few feedbacks is told over the next intervals.)
                for _ in 0..FEEDBACKS_PER_TICK {
                    let Some(feedback) = twcc.feedback(self.ssrc, media) else {
                        break;
                    };
                    add_rtcp(&mut compounds, &feedback);
                }
                if twcc.pending() {
                    self.next_twcc = Some(now + twcc::INTERVAL);
                }
            }
        }
        (compounds, worst)
    }

    /// The receiver report due now on the media streams heard since the last.
    fn report(&mut self, now: Instant) -> Option<(Vec<u8>, f32)> {
        let blocks: Vec<[u8; 24]> = self
            .streams
            .iter_mut()
            .filter(|s| matches!(s.role, Role::Media(_)) && s.receiver.heard)
            .take(31)
            .map(|s| s.receiver.block(s.ssrc, now))
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

/// Bytes of RTCP one datagram carries at most (a compound stays under the MTU).
const MAX_COMPOUND: usize = 1_100;

/// Transport-wide feedback packets sent at most per due time.
const FEEDBACKS_PER_TICK: usize = 4;

/// Appends an RTCP packet to the last compound, or starts another where it would not fit.
fn add_rtcp(compounds: &mut Vec<Vec<u8>>, packet: &[u8]) {
    match compounds.last_mut() {
        Some(last) if last.len() + packet.len() <= MAX_COMPOUND => last.extend_from_slice(packet),
        _ => compounds.push(packet.to_vec()),
    }
}

/// How often a session with video reports on it (str0m's and libwebrtc's interval).
const VIDEO_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// A generic NACK (RTPFB, FMT 1) for `lost` (ascending) of `media`: (PID,
/// BLP) pairs, each naming a packet and which of the 16 after it are lost too.
fn nack_packet(sender: u32, media: u32, lost: &[u16]) -> Vec<u8> {
    let mut fci: Vec<(u16, u16)> = Vec::new();
    for &seq in lost {
        match fci.last_mut() {
            Some((pid, blp)) if seq.wrapping_sub(*pid).wrapping_sub(1) < 16 && seq != *pid => {
                *blp |= 1 << seq.wrapping_sub(*pid).wrapping_sub(1);
            }
            _ => fci.push((seq, 0)),
        }
    }
    let mut packet = Vec::with_capacity(12 + 4 * fci.len());
    packet.extend_from_slice(&[0x81, 205]);
    packet.extend_from_slice(&(2 + fci.len() as u16).to_be_bytes());
    packet.extend_from_slice(&sender.to_be_bytes());
    packet.extend_from_slice(&media.to_be_bytes());
    for (pid, blp) in fci {
        packet.extend_from_slice(&pid.to_be_bytes());
        packet.extend_from_slice(&blp.to_be_bytes());
    }
    packet
}

/// A lost packet being asked for again.
struct Missing {
    index: u64,
    since: Instant,
    asked: Option<Instant>,
    tries: u8,
}

/// One stream we open: its SRTP index and replay window, what RFC 3550
/// Appendix A.3 and A.8 keep for its reports, and (video) its losses.
pub(crate) struct Receiver {
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
    /// Losses are asked for again.
    nack: bool,
    missing: VecDeque<Missing>,
    /// When one of `missing` is next due.
    nack_at: Option<Instant>,
}

impl Receiver {
    fn new(nack: bool) -> Self {
        Self {
            base: 0,
            highest: 0,
            seen: 0,
            received: 0,
            expected_prior: 0,
            received_prior: 0,
            transit: None,
            jitter: 0.0,
            sender_report: None,
            heard: false,
            nack,
            missing: VecDeque::new(),
            nack_at: None,
        }
    }

    /// The index of a packet numbered `seq`: the one nearest the highest so
    /// far (RFC 3711 Appendix A); before any packet authenticated, with a
    /// rollover counter of 0 (§3.3.1: a sender's first), so a forged first
    /// packet cannot set the stream's numbering.
    fn index(&self, seq: u16) -> u64 {
        if self.seen == 0 {
            return u64::from(seq);
        }
        twcc::extend(Some(self.highest), seq)
    }

    /// Records an authentic packet's index: `false` for a replay, or one too
    /// old to tell (RFC 3711 §3.3.2).
    fn accept(&mut self, index: u64, now: Instant) -> bool {
        if self.seen == 0 {
            self.base = index;
        }
        if index > self.highest || self.seen == 0 {
            let ahead = index.saturating_sub(self.highest);
            if self.nack && self.seen != 0 && ahead > 1 {
                if ahead as usize > MAX_MISSING {
                    self.missing.clear();
                } else {
                    for lost in self.highest + 1..index {
                        self.missing.push_back(Missing {
                            index: lost,
                            since: now,
                            asked: None,
                            tries: 0,
                        });
                    }
                    self.nack_at = Some(self.nack_at.map_or(now, |at| at.min(now)));
                    while self.missing.len() > MAX_MISSING {
                        self.missing.pop_front();
                    }
                }
            }
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
            if let Ok(at) = self.missing.binary_search_by_key(&index, |m| m.index) {
                self.missing.remove(at);
            }
        }
        self.received += 1;
        self.heard = true;
        true
    }

    /// When a loss is next to be asked for again (kept, not searched for:
    /// this is asked after every packet; a loss that came since may make it
    /// early, harmlessly).
    fn next_nack(&self) -> Option<Instant> {
        self.nack_at.filter(|_| !self.missing.is_empty())
    }

    /// The losses to ask for now (forgetting those asked for long enough).
    fn nacks_due(&mut self, now: Instant) -> Vec<u16> {
        self.missing
            .retain(|m| m.tries < NACK_TRIES && now.saturating_duration_since(m.since) < NACK_GIVE_UP);
        let mut due = Vec::new();
        for missing in &mut self.missing {
            if missing.asked.is_none_or(|at| now >= at + NACK_INTERVAL) {
                missing.asked = Some(now);
                missing.tries += 1;
                due.push(missing.index as u16);
            }
        }
        self.nack_at = self
            .missing
            .iter()
            .map(|m| m.asked.map_or(m.since, |at| at + NACK_INTERVAL))
            .min();
        due
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
            layer: 0,
            clock_rate,
            level_id: None,
            orientation_id: None,
            nack: false,
        }
    }

    /// A new stream of `header`'s SSRC in `role`.
    fn added(ingress: &mut Ingress, header: &Header<'_>, role: Role, now: Instant) -> Option<usize> {
        let at = ingress.add(header.ssrc, now)?;
        ingress.set_role(at, role);
        Some(at)
    }

    /// An ingress with one media stream (SSRC 0xdeadbeef, first seq `first`).
    fn one_stream(first: u16, now: Instant) -> Ingress {
        let mut ingress = Ingress::new(0x5eed, now);
        let packet = packet(first, &[]);
        let header = Header::parse(&packet).expect("a header");
        assert!(matches!(ingress.route(header.ssrc, now), Route::New));
        assert_eq!(added(&mut ingress, &header, Role::Media(opens(48_000)), now), Some(0));
        ingress.streams[0].last = Some(now); // (as if a packet was opened)
        assert!(matches!(ingress.route(header.ssrc, now), Route::Ours(0)));
        ingress
    }

    /// Deterministic noise: up to `max_len` bytes from xorshift state `x`
    /// (`spread` varies how they are drawn from it).
    fn noise(x: &mut u64, max_len: u64, spread: u32) -> Vec<u8> {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        let len = (*x % max_len) as usize;
        (0..len)
            .map(|i| (x.rotate_left(i as u32 * spread) as u8) ^ i as u8)
            .collect()
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
            let mut data = noise(&mut x, 48, 5);
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
        let now = Instant::now();
        let mut r = Receiver::new(false);
        assert_eq!(r.index(65_530), 65_530);
        assert!(r.accept(65_530, now));
        assert_eq!(r.index(5), 65_541, "past the rollover");
        assert!(r.accept(65_541, now));
        assert_eq!(r.index(65_535), 65_535, "late, from before the rollover");
        assert!(r.accept(65_535, now));
        assert!(!r.accept(65_535, now), "a replay");
        assert!(!r.accept(65_541 - 64, now), "too old to tell");
        assert_eq!(r.index(40_000), 40_000, "far behind: the roll before");
        let fresh = Receiver::new(false);
        assert_eq!(fresh.index(65_000), 65_000, "no roll below zero");
    }

    #[test]
    fn a_report_counts_loss_since_the_last_and_overall() {
        let now = Instant::now();
        let mut ingress = one_stream(100, now);
        let receiver = &mut ingress.streams[0].receiver;
        // 100..=199 with every tenth lost; the next interval loses nothing.
        for seq in (100..200).filter(|s| s % 10 != 5) {
            assert!(receiver.accept(seq, now));
        }
        let (rr, worst) = ingress.report(now).expect("a report");
        assert_eq!(&rr[..8], &[0x81, 201, 0, 7, 0, 0, 0x5e, 0xed]);
        assert_eq!(&rr[8..12], &0xdead_beefu32.to_be_bytes());
        assert_eq!(rr[12], 25, "10 % of 256");
        assert_eq!(&rr[13..16], &[0, 0, 10]);
        assert_eq!(&rr[16..20], &199u32.to_be_bytes());
        assert!((worst - 25.0 / 256.0).abs() < 1e-6);
        assert!(ingress.report(now).is_none(), "nothing heard since");
        let receiver = &mut ingress.streams[0].receiver;
        for seq in 200..250 {
            assert!(receiver.accept(seq, now));
        }
        receiver.sender_report = Some((0x1234_5678, now));
        let later = now + Duration::from_millis(500);
        let (rr, _) = ingress.report(later).expect("a report");
        assert_eq!(rr[12], 0, "none lost in this interval");
        assert_eq!(&rr[13..16], &[0, 0, 10], "ten overall");
        assert_eq!(&rr[24..28], &0x1234_5678u32.to_be_bytes(), "LSR");
        assert_eq!(&rr[28..32], &32_768u32.to_be_bytes(), "DLSR: half a second");
    }

    #[test]
    fn a_packet_that_fails_authentication_does_not_set_the_numbering() {
        let now = Instant::now();
        let r = Receiver::new(false);
        // A forged first packet numbered 40,000 is opened under index 40,000,
        // fails, and is never accepted: the real stream's 100 is still 100.
        assert_eq!(r.index(40_000), 40_000);
        assert_eq!(r.index(100), 100);
        let mut r = r;
        assert!(r.accept(100, now));
        assert_eq!((r.base, r.highest), (100, 100));
        assert_eq!(r.index(40_000), 40_000, "then relative to what was accepted");
    }

    #[test]
    fn jitter_follows_rfc_3550_a8() {
        let mut r = Receiver::new(false);
        r.note_arrival(1_000, 0);
        r.note_arrival(1_160 + 16, 160); // 16 units late
        assert!((r.jitter - 1.0).abs() < 1e-9);
        r.note_arrival(1_320 + 16, 320); // steady: decays
        assert!((r.jitter - 15.0 / 16.0).abs() < 1e-9);
        // Across the timestamp's wrap.
        let mut w = Receiver::new(false);
        w.note_arrival(100, u32::MAX - 59);
        w.note_arrival(260 + 32, 100);
        assert!((w.jitter - 2.0).abs() < 1e-9);
    }

    #[test]
    fn any_compound_rtcp_is_read_or_not_without_a_panic() {
        let now = Instant::now();
        let mut ingress = one_stream(1, now);
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            let mut data = noise(&mut x, 80, 3);
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
        let mut ingress = one_stream(1, now);
        let mut sr = vec![
            0x80, 200, 0, 6, 0xde, 0xad, 0xbe, 0xef, 0xaa, 0xbb, 0x11, 0x22, 0x33, 0x44, 0xcc, 0xdd,
        ];
        sr.extend_from_slice(&[0; 12]);
        let mut other = sr.clone();
        other[7] = 0;
        ingress.read_rtcp(&[other, sr].concat(), now);
        assert_eq!(ingress.streams[0].receiver.sender_report, Some((0x1122_3344, now)));
    }

    #[test]
    fn video_losses_are_asked_for_again_until_they_come_or_time_runs_out() {
        let now = Instant::now();
        let mut r = Receiver::new(true);
        assert!(r.accept(10, now));
        assert!(r.accept(14, now), "11, 12 and 13 lost");
        assert_eq!(r.next_nack(), Some(now));
        assert_eq!(r.nacks_due(now), vec![11, 12, 13]);
        assert!(r.nacks_due(now).is_empty(), "asked already");
        assert!(r.accept(12, now), "12 came again");
        let later = now + NACK_INTERVAL;
        assert_eq!(r.next_nack(), Some(later));
        assert_eq!(r.nacks_due(later), vec![11, 13]);
        let gone = now + NACK_GIVE_UP;
        assert!(r.nacks_due(gone).is_empty(), "given up");
        assert_eq!(r.next_nack(), None);
        // A gap too large to ask for is not.
        assert!(r.accept(14 + MAX_MISSING as u64 + 2, now));
        assert!(r.nacks_due(now).is_empty());
        // Audio is not asked for.
        let mut audio = Receiver::new(false);
        assert!(audio.accept(1, now) && audio.accept(5, now));
        assert!(audio.nacks_due(now).is_empty());
    }

    #[test]
    fn a_nack_packs_its_losses_into_pid_and_bitmask_pairs() {
        let packet = nack_packet(1, 2, &[100, 101, 116, 117, 65_535]);
        // 100 with 101 and 116 (bits 0 and 15), then 117, then 65535.
        assert_eq!(
            packet,
            [
                &[0x81, 205, 0, 5, 0, 0, 0, 1, 0, 0, 0, 2][..],
                &[0, 100, 0x80, 0x01],
                &[0, 117, 0, 0],
                &[0xff, 0xff, 0, 0],
            ]
            .concat()
        );
        let read: Vec<(u32, u16)> = crate::nack::nacks(&packet).collect();
        assert_eq!(read, vec![(2, 100), (2, 101), (2, 116), (2, 117), (2, 65_535)]);
    }

    #[test]
    fn keyframe_requests_go_out_with_the_next_rtcp() {
        let now = Instant::now();
        let mut ingress = one_stream(1, now);
        assert!(!ingress.request_keyframe(Mid::from("9"), 0), "no stream there");
        assert!(ingress.request_keyframe(Mid::from("0"), 0));
        assert!(ingress.next_rtcp().is_some_and(|at| at <= now));
        let (compounds, _) = ingress.poll_rtcp(now);
        assert_eq!(
            compounds,
            vec![vec![0x81, 206, 0, 2, 0, 0, 0x5e, 0xed, 0xde, 0xad, 0xbe, 0xef]]
        );
        assert_eq!(ingress.next_rtcp(), None, "nothing else due");
    }

    #[test]
    fn keyframe_requests_go_to_the_layers_newest_stream() {
        let now = Instant::now();
        let mut ingress = one_stream(1, now);
        let mut add = |ssrc: u32, layer: usize| {
            let mut data = packet(1, &[]);
            data[8..12].copy_from_slice(&ssrc.to_be_bytes());
            let header = Header::parse(&data).expect("a header");
            let opens = Opens { layer, ..opens(90_000) };
            let at = added(&mut ingress, &header, Role::Media(opens), now).expect("room");
            ingress.streams[at].last = Some(now);
        };
        add(0x0000_0001, 1); // another simulcast layer
        add(0x0000_0002, 0); // the first layer's stream, replaced
        let pli_for = |ingress: &mut Ingress, layer: usize| {
            assert!(ingress.request_keyframe(Mid::from("0"), layer));
            let (compounds, _) = ingress.poll_rtcp(now);
            compounds[0][8..12].to_vec()
        };
        assert_eq!(pli_for(&mut ingress, 0), [0, 0, 0, 2]);
        assert_eq!(pli_for(&mut ingress, 1), [0, 0, 0, 1]);
        assert!(!ingress.request_keyframe(Mid::from("0"), 2), "no such layer");
    }

    /// A header of a packet from `ssrc`.
    fn from_ssrc(ssrc: u32) -> Vec<u8> {
        let mut data = packet(1, &[]);
        data[8..12].copy_from_slice(&ssrc.to_be_bytes());
        data
    }

    #[test]
    fn a_stream_that_never_sent_an_authentic_packet_gives_its_place_up() {
        let now = Instant::now();
        let mut ingress = one_stream(1, now);
        // Forged SSRCs (from a spoofed source) take one place in turn, not a place each.
        for ssrc in 1..100u32 {
            let data = from_ssrc(ssrc);
            let header = Header::parse(&data).expect("a header");
            assert!(matches!(ingress.route(ssrc, now), Route::New));
            assert_eq!(added(&mut ingress, &header, Role::Unknown, now), Some(1));
        }
        assert_eq!(ingress.streams.len(), 2);
        assert!(
            matches!(ingress.route(0xdead_beef, now), Route::Ours(0)),
            "the real one stays"
        );
    }

    #[test]
    fn a_new_stream_takes_the_place_of_one_silent_for_a_while_when_all_are_taken() {
        let now = Instant::now();
        let mut ingress = one_stream(1, now);
        for ssrc in 1..MAX_STREAMS as u32 {
            let data = from_ssrc(ssrc);
            let header = Header::parse(&data).expect("a header");
            let role = if ssrc == 5 {
                Role::Rtx { main: 3, pt: 96 }
            } else {
                Role::Media(opens(90_000))
            };
            let at = added(&mut ingress, &header, role, now).expect("room");
            ingress.streams[at].last = Some(now);
        }
        let data = from_ssrc(1_000);
        let header = Header::parse(&data).expect("a header");
        let soon = now + Duration::from_secs(5);
        assert!(
            matches!(ingress.route(1_000, soon), Route::Full),
            "none silent for long"
        );
        assert_eq!(added(&mut ingress, &header, Role::Unknown, soon), None);
        // All but the stream at 3 go on sending.
        let later = now + IDLE_STREAM;
        for (at, stream) in ingress.streams.iter_mut().enumerate() {
            if at != 3 {
                stream.last = Some(later);
            }
        }
        assert!(matches!(ingress.route(1_000, later), Route::New));
        assert_eq!(added(&mut ingress, &header, Role::Media(opens(90_000)), later), Some(3));
        assert!(matches!(ingress.route(1_000, later), Route::Ours(3)));
        assert!(
            matches!(ingress.role(5), Some(Role::Unknown)),
            "what resent the replaced stream is learnt again"
        );
        // Should the replaced stream come back (without a mid by now), what it carried is known.
        assert!(matches!(ingress.forgotten(3), Some(Role::Media(opens)) if opens.mid == Mid::from("0")));
        assert!(ingress.forgotten(1_000).is_none());
    }

    #[test]
    fn the_stream_of_a_layer_is_the_one_that_sent_last_and_only_an_authentic_one() {
        let now = Instant::now();
        let mut ingress = one_stream(1, now); // 0xdeadbeef at slot 0, authentic at `now`
        let data = from_ssrc(2);
        let header = Header::parse(&data).expect("a header");
        let at = added(&mut ingress, &header, Role::Media(opens(48_000)), now).expect("room");
        assert_eq!(
            ingress.media_on(Mid::from("0"), 0),
            Some(0),
            "one that never sent: not it"
        );
        ingress.streams[at].last = Some(now + Duration::from_secs(1));
        assert_eq!(ingress.media_on(Mid::from("0"), 0), Some(at));
        ingress.streams[0].last = Some(now + Duration::from_secs(2));
        assert_eq!(
            ingress.media_on(Mid::from("0"), 0),
            Some(0),
            "a lower slot that sent later"
        );
    }

    #[test]
    fn of_the_silent_streams_retransmissions_and_replaced_media_give_way_first() {
        let now = Instant::now();
        let mut ingress = one_stream(1, now); // media on "0" at slot 0
        fn add(ingress: &mut Ingress, ssrc: u32, role: Role, last: Instant) -> usize {
            let data = from_ssrc(ssrc);
            let header = Header::parse(&data).expect("a header");
            let at = added(ingress, &header, role, last).expect("room");
            ingress.streams[at].last = Some(last);
            at
        }
        let media = |mid: &str| {
            Role::Media(Opens {
                mid: Mid::from(mid),
                ..opens(90_000)
            })
        };
        let early = now;
        let later = now + Duration::from_secs(5);
        let replaced = add(&mut ingress, 1, media("1"), early);
        let _replacement = add(&mut ingress, 2, media("1"), later);
        let rtx = add(&mut ingress, 3, Role::Rtx { main: 0, pt: 97 }, later);
        while ingress.streams.len() < MAX_STREAMS {
            let ssrc = 100 + ingress.streams.len() as u32;
            add(&mut ingress, ssrc, media("9"), later + Duration::from_secs(60));
        }
        let data = from_ssrc(1_000);
        let header = Header::parse(&data).expect("a header");
        let quiet = later + IDLE_STREAM;
        // Silent long enough: the media on "0" (the longest), the replaced one
        // on "1", the retransmissions. The last go first, then the replaced.
        assert_eq!(added(&mut ingress, &header, Role::Unknown, quiet), Some(rtx));
        ingress.streams[rtx].last = Some(quiet);
        let data = from_ssrc(1_001);
        let header = Header::parse(&data).expect("a header");
        assert_eq!(added(&mut ingress, &header, Role::Unknown, quiet), Some(replaced));
    }
}
