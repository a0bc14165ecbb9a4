//! Switchboard's conference audio mixer: a sans-IO core, one per conference.
//!
//! Inputs are the participants' opus streams (one per audio track), outputs one
//! opus stream per **listener** (a participant who takes a single mixed stream):
//!
//! ```text
//! handle_packet(now, input, seq, level, payload) ─┐          ┌─> poll_frame()     -> MixFrame (send to a listener)
//! add_listener / remove_listener / remove_input ──┼─> Mixer ─┼─> poll_recording() -> Ogg/Opus bytes (append to a file)
//! handle_timeout(now) ────────────────────────────┘          └─> poll_timeout()   -> the next 20 ms tick
//! ```
//!
//! The model, every 20 ms **tick**:
//! 1. **Speakers**: every 100 ms the `max_speakers` loudest inputs are chosen from
//!    their RFC 6464 audio levels (smoothed; measured from the decoded audio
//!    for inputs that send no levels), a newcomer replacing the quietest only
//!    when louder by [`SWITCH_MARGIN_DB`]. Inputs quieter than [`MIN_DBOV`] are
//!    never mixed.
//! 2. **Decode** only the speakers: each input's [`jitter::JitterBuffer`] yields
//!    the next packet, a loss (concealed by opus PLC, or recovered from the next
//!    packet's in-band FEC) or nothing (late: concealed for a few frames, then
//!    silence). Inputs not mixed skip their packets undecoded. A speaker fades
//!    in and out over one frame.
//! 3. **Mix** at 48 kHz mono: the sum of the speakers (`All`), and for each
//!    speaker who is also a listener the sum without them (`Minus`: mix-minus).
//! 4. **Limit** each distinct mix ([`limiter::Limiter`]: no clipping) and
//!    **encode** it once; every listener who is not a speaker shares the `All`
//!    packet (the same `Arc<[u8]>`), so the cost grows with the speakers, not
//!    the listeners.
//! 5. Optionally, **record** the `All` mix to Ogg/Opus ([`ogg::OggOpusWriter`]).
//!
//! Added delay: the wait for the next tick (0–20 ms), what the jitter buffers
//! hold beyond that (nothing on a clean network), and the encoder's 6.5 ms
//! lookahead.
//!
//! Nothing here reads the clock or does I/O; a packet a peer sends can at worst
//! be dropped and counted ([`MixerStats`]).

pub mod analysis;
pub mod codec;
pub mod jitter;
pub mod limiter;
pub mod ogg;

use codec::{MAX_PACKET_BYTES, MAX_PACKET_SAMPLES, OpusDecoder, OpusEncoder};
use jitter::{JitterBuffer, Pull};
use limiter::Limiter;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Samples in one 20 ms frame at 48 kHz.
pub const FRAME_SAMPLES: usize = 960;
/// The mixer's tick.
pub const FRAME: Duration = Duration::from_millis(20);
/// Inputs quieter than this (dBov) are not mixed.
pub const MIN_DBOV: f32 = -70.0;
/// How much louder (dB) an input must be than the quietest speaker to replace it.
pub const SWITCH_MARGIN_DB: f32 = 3.0;
/// Speakers are re-chosen every this many ticks (100 ms).
const SELECT_EVERY: u64 = 5;
/// A late input is concealed for this many ticks, then silent.
const MAX_CONCEAL_TICKS: u32 = 5;
/// At most this many overdue ticks are run at once; beyond, the clock skips ahead.
const MAX_CATCH_UP: u32 = 5;
/// Inputs per conference.
pub const MAX_INPUTS: usize = 1024;
/// Weight of each level sample (≈ 200 ms time constant at 50 packets a second).
const LEVEL_SMOOTHING: f32 = 0.1;
/// An input not heard for this long is silent.
const LEVEL_STALE: Duration = Duration::from_secs(1);
const SILENCE_DBOV: f32 = -127.0;

/// One participant's audio going into the mix (the SFU's audio track).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InputId(pub u64);

/// One participant receiving a mix (the SFU's session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub u64);

#[derive(Debug, Clone)]
pub struct MixerConfig {
    /// How many of the loudest inputs are mixed.
    pub max_speakers: usize,
    /// Opus bitrate of each encoded mix.
    pub bitrate_bps: u32,
    /// Opus encoder complexity (0–10).
    pub complexity: u8,
}

impl Default for MixerConfig {
    fn default() -> Self {
        Self {
            max_speakers: 3,
            bitrate_bps: 32_000,
            complexity: 5,
        }
    }
}

/// One 20 ms opus frame for one listener.
#[derive(Debug, Clone)]
pub struct MixFrame {
    pub listener: ListenerId,
    /// Shared by every listener who hears the same mix.
    pub payload: Arc<[u8]>,
    /// RTP timestamp at 48 kHz on the mixer's clock (continuous, 960 a tick).
    pub timestamp: u32,
    /// The mix's level as in RFC 6464 (−dBov, 0 loudest … −127).
    pub audio_level: i8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MixerStats {
    pub ticks: u64,
    /// Overdue ticks skipped after a stall.
    pub skipped_ticks: u64,
    pub packets_in: u64,
    /// Late, duplicate, oversize or empty packets, and packets for too many inputs.
    pub packets_dropped: u64,
    pub decoded: u64,
    /// Packets libopus could not decode (garbage): concealed instead.
    pub decode_errors: u64,
    /// Frames made up by packet-loss concealment.
    pub concealed: u64,
    /// Lost frames recovered from the next packet's FEC.
    pub recovered: u64,
    /// Distinct mixes encoded.
    pub encoded: u64,
    pub encode_errors: u64,
    pub frames_out: u64,
}

struct Input {
    id: InputId,
    jitter: JitterBuffer,
    decoder: Option<OpusDecoder>,
    /// Smoothed level (dBov) and when it was last fed.
    level: f32,
    level_at: Option<Instant>,
    /// It sends RFC 6464 levels (otherwise its level is measured, so it is always decoded).
    has_levels: bool,
    /// Decoded samples not played yet.
    pcm: Vec<f32>,
    pcm_len: usize,
    /// This tick's contribution (after its gain ramp).
    frame: Vec<f32>,
    /// Samples of its last packet (the size of a concealed frame).
    last_samples: usize,
    /// Ticks since its last packet.
    idle: u32,
    /// Decoded something since (re)starting, so concealment has something to go on.
    heard: bool,
    /// Samples of packets skipped beyond the last tick (inputs not mixed).
    skip_credit: usize,
    selected: bool,
    gain: f32,
    /// Its decoder followed the stream up to the last tick.
    decoding: bool,
    /// It contributed to this tick's mix.
    contributed: bool,
}

impl Input {
    fn new(id: InputId) -> Self {
        Self {
            id,
            jitter: JitterBuffer::new(),
            decoder: None,
            level: SILENCE_DBOV,
            level_at: None,
            has_levels: false,
            pcm: vec![0.0; MAX_PACKET_SAMPLES + 2 * FRAME_SAMPLES],
            pcm_len: 0,
            frame: vec![0.0; FRAME_SAMPLES],
            last_samples: FRAME_SAMPLES,
            idle: 0,
            heard: false,
            skip_credit: 0,
            selected: false,
            gain: 0.0,
            decoding: false,
            contributed: false,
        }
    }

    fn add_level(&mut self, now: Instant, dbov: f32) {
        if self.level(now) <= SILENCE_DBOV {
            // Starting from silence (or a stale level): take the first sample as it is.
            self.level = dbov;
        }
        self.level += LEVEL_SMOOTHING * (dbov - self.level);
        self.level_at = Some(now);
    }

    fn level(&self, now: Instant) -> f32 {
        match self.level_at {
            Some(at) if now.saturating_duration_since(at) < LEVEL_STALE => self.level,
            _ => SILENCE_DBOV,
        }
    }

    /// Starts decoding afresh (the stream was skipped, so the old state is stale).
    fn restart_decoder(&mut self) -> bool {
        match &mut self.decoder {
            Some(decoder) => decoder.reset(),
            None => match OpusDecoder::new() {
                Ok(decoder) => self.decoder = Some(decoder),
                Err(_) => return false,
            },
        }
        self.pcm_len = 0;
        self.heard = false;
        true
    }

    /// Decodes this tick's frame into `frame`.
    fn produce(&mut self, stats: &mut MixerStats) {
        let Input {
            jitter,
            decoder,
            pcm,
            pcm_len,
            last_samples,
            idle,
            heard,
            ..
        } = self;
        let Some(decoder) = decoder.as_mut() else {
            self.frame.fill(0.0);
            return;
        };
        let mut got_packet = false;
        while *pcm_len < FRAME_SAMPLES {
            let room = &mut pcm[*pcm_len..*pcm_len + MAX_PACKET_SAMPLES];
            let conceal_len = (*last_samples).min(MAX_PACKET_SAMPLES);
            match jitter.pull() {
                Pull::Packet(packet) => {
                    got_packet = true;
                    match decoder.decode(packet, room) {
                        Ok(n) if n > 0 => {
                            stats.decoded += 1;
                            *pcm_len += n;
                            *last_samples = n;
                            *heard = true;
                        }
                        _ => {
                            // Garbage from the peer: conceal the frame instead.
                            stats.decode_errors += 1;
                            *pcm_len += conceal(decoder, &mut room[..conceal_len]);
                            stats.concealed += 1;
                        }
                    }
                }
                Pull::Lost { next } => {
                    let out = &mut room[..conceal_len];
                    let recovered = next.and_then(|next| decoder.recover(next, out).ok());
                    match recovered {
                        Some(n) if n > 0 => {
                            stats.recovered += 1;
                            *pcm_len += n;
                        }
                        _ => {
                            stats.concealed += 1;
                            *pcm_len += conceal(decoder, out);
                        }
                    }
                }
                Pull::Empty => break,
            }
        }
        if got_packet {
            *idle = 0;
        }
        if *pcm_len < FRAME_SAMPLES {
            // Late or silent: conceal for a while, then play silence.
            let room = &mut pcm[*pcm_len..*pcm_len + FRAME_SAMPLES];
            if *heard && *idle < MAX_CONCEAL_TICKS {
                stats.concealed += 1;
                *pcm_len += conceal(decoder, room);
            } else {
                room.fill(0.0);
                *pcm_len += FRAME_SAMPLES;
            }
            *idle += 1;
        }
        self.frame.copy_from_slice(&self.pcm[..FRAME_SAMPLES]);
        self.pcm.copy_within(FRAME_SAMPLES..self.pcm_len, 0);
        self.pcm_len -= FRAME_SAMPLES;
    }

    /// Drops one frame's worth of packets undecoded (the input is not mixed).
    fn skip(&mut self) {
        let mut got_packet = false;
        while self.skip_credit < FRAME_SAMPLES {
            match self.jitter.pull() {
                Pull::Packet(packet) => {
                    got_packet = true;
                    self.skip_credit += packet_samples(packet).unwrap_or(FRAME_SAMPLES);
                }
                Pull::Lost { .. } => self.skip_credit += self.last_samples,
                Pull::Empty => break,
            }
        }
        self.skip_credit = self.skip_credit.saturating_sub(FRAME_SAMPLES);
        self.idle = if got_packet { 0 } else { self.idle.saturating_add(1) };
    }
}

/// Conceals `out.len()` samples; silence if even that fails.
fn conceal(decoder: &mut OpusDecoder, out: &mut [f32]) -> usize {
    match decoder.conceal(out) {
        Ok(n) if n == out.len() => n,
        _ => {
            out.fill(0.0);
            out.len()
        }
    }
}

/// The duration of an opus packet in 48 kHz samples, from its TOC byte (RFC 6716 §3.1).
pub fn packet_samples(packet: &[u8]) -> Option<usize> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    let frame = match config {
        0..=11 => [480, 960, 1920, 2880][usize::from(config % 4)],
        12..=15 => [480, 960][usize::from(config % 2)],
        _ => [120, 240, 480, 960][usize::from(config % 4)],
    };
    let frames = match toc & 0x03 {
        0 => 1,
        1 | 2 => 2,
        _ => usize::from(*packet.get(1)? & 0x3f),
    };
    let samples = frame * frames;
    (samples > 0 && samples <= MAX_PACKET_SAMPLES).then_some(samples)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MixKey {
    /// Every speaker.
    All,
    /// Every speaker but this one (what that speaker hears).
    Minus(InputId),
}

struct Slot {
    key: MixKey,
    encoder: OpusEncoder,
    limiter: Limiter,
    payload: Option<Arc<[u8]>>,
    audio_level: i8,
}

struct Listener {
    id: ListenerId,
    /// What the listener itself sends, kept out of what it hears.
    own: Option<InputId>,
}

struct Recording {
    serial: u32,
    writer: Option<ogg::OggOpusWriter>,
}

/// The mixer of one conference.
pub struct Mixer {
    config: MixerConfig,
    /// In arrival order (speaker ties go to the earlier).
    inputs: Vec<Input>,
    /// Input → its index in `inputs`.
    index: HashMap<InputId, usize>,
    listeners: Vec<Listener>,
    slots: Vec<Slot>,
    /// Encoders of mixes no longer needed, kept for reuse.
    spare: Vec<Slot>,
    next_tick: Option<Instant>,
    tick: u64,
    mix: Vec<f32>,
    work: Vec<f32>,
    packet: Vec<u8>,
    keys: Vec<MixKey>,
    ranking: Vec<(f32, usize)>,
    frames: VecDeque<MixFrame>,
    recording: Option<Recording>,
    recorded: VecDeque<Vec<u8>>,
    stats: MixerStats,
}

impl std::fmt::Debug for Mixer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mixer")
            .field("inputs", &self.inputs.len())
            .field("listeners", &self.listeners.len())
            .field("tick", &self.tick)
            .finish_non_exhaustive()
    }
}

impl Mixer {
    pub fn new(config: MixerConfig) -> Self {
        Self {
            config,
            inputs: Vec::new(),
            index: HashMap::new(),
            listeners: Vec::new(),
            slots: Vec::new(),
            spare: Vec::new(),
            next_tick: None,
            tick: 0,
            mix: vec![0.0; FRAME_SAMPLES],
            work: vec![0.0; FRAME_SAMPLES],
            packet: vec![0; MAX_PACKET_BYTES],
            keys: Vec::new(),
            ranking: Vec::new(),
            frames: VecDeque::new(),
            recording: None,
            recorded: VecDeque::new(),
            stats: MixerStats::default(),
        }
    }

    pub fn stats(&self) -> MixerStats {
        self.stats
    }

    /// Nobody listens and nothing records: the mixer does nothing.
    pub fn is_idle(&self) -> bool {
        self.listeners.is_empty() && self.recording.is_none()
    }

    /// The inputs being mixed now.
    pub fn speakers(&self) -> Vec<InputId> {
        self.inputs.iter().filter(|i| i.selected).map(|i| i.id).collect()
    }

    /// Starts the clock when there is someone to mix for.
    fn wake(&mut self, now: Instant) {
        if !self.is_idle() && self.next_tick.is_none() {
            self.next_tick = Some(now + FRAME);
        }
    }

    /// `listener` receives the mix without `own` (its own voice).
    pub fn add_listener(&mut self, now: Instant, listener: ListenerId, own: Option<InputId>) {
        match self.listeners.iter_mut().find(|l| l.id == listener) {
            Some(l) => l.own = own,
            None => self.listeners.push(Listener { id: listener, own }),
        }
        self.wake(now);
    }

    pub fn remove_listener(&mut self, listener: ListenerId) {
        self.listeners.retain(|l| l.id != listener);
        if self.is_idle() {
            self.next_tick = None;
        }
    }

    /// The input's track is gone.
    pub fn remove_input(&mut self, input: InputId) {
        if self.index.remove(&input).is_some() {
            self.inputs.retain(|i| i.id != input);
            self.index = self.inputs.iter().enumerate().map(|(n, i)| (i.id, n)).collect();
        }
    }

    /// A packet of `input` (extended sequence number `seq`, RFC 6464 `level`
    /// and voice activity if the sender put them in).
    pub fn handle_packet(
        &mut self,
        now: Instant,
        input: InputId,
        seq: u64,
        level: Option<i8>,
        voice_activity: Option<bool>,
        payload: &[u8],
    ) {
        if self.next_tick.is_none() {
            return; // not mixing: buffering would only add delay later
        }
        self.stats.packets_in += 1;
        let index = match self.index.get(&input) {
            Some(index) => *index,
            None if self.inputs.len() < MAX_INPUTS => {
                self.inputs.push(Input::new(input));
                self.index.insert(input, self.inputs.len() - 1);
                self.inputs.len() - 1
            }
            None => {
                self.stats.packets_dropped += 1;
                return;
            }
        };
        let input = &mut self.inputs[index];
        if let Some(level) = level {
            input.has_levels = true;
            let dbov = if voice_activity == Some(false) {
                SILENCE_DBOV
            } else {
                -f32::from(level.unsigned_abs())
            };
            input.add_level(now, dbov);
        }
        if input.jitter.push(seq, payload).is_err() {
            self.stats.packets_dropped += 1;
        }
    }

    /// When to call [`Mixer::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// Runs the ticks that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut ran = 0;
        while let Some(at) = self.next_tick {
            if at > now {
                break;
            }
            if ran == MAX_CATCH_UP {
                // A stall: do not burst; skip to the present.
                let behind = (now.saturating_duration_since(at).as_micros() / FRAME.as_micros()) as u64 + 1;
                self.stats.skipped_ticks += behind;
                self.tick = self.tick.wrapping_add(behind);
                self.next_tick = Some(now + FRAME);
                break;
            }
            self.run_tick(at);
            self.next_tick = Some(at + FRAME);
            ran += 1;
        }
    }

    /// The next frame for a listener.
    pub fn poll_frame(&mut self) -> Option<MixFrame> {
        self.frames.pop_front()
    }

    /// Records the mix of every speaker as Ogg/Opus; the bytes come out of
    /// [`Mixer::poll_recording`]. `serial` is the Ogg stream serial number.
    pub fn start_recording(&mut self, now: Instant, serial: u32) {
        if self.recording.is_none() {
            self.recording = Some(Recording { serial, writer: None });
            self.wake(now);
        }
    }

    /// Ends the recording (its last page comes out of `poll_recording`);
    /// returns the recorded duration.
    pub fn stop_recording(&mut self) -> Option<Duration> {
        let recording = self.recording.take()?;
        if self.is_idle() {
            self.next_tick = None;
        }
        let mut writer = recording.writer?;
        writer.finish();
        self.recorded.push_back(writer.take());
        Some(Duration::from_micros(writer.duration_samples() * 1_000_000 / 48_000))
    }

    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Recorded bytes to append to the file.
    pub fn poll_recording(&mut self) -> Option<Vec<u8>> {
        self.recorded.pop_front()
    }

    /// Whether `input` is in this tick's mix.
    fn contributed(&self, input: InputId) -> bool {
        self.index
            .get(&input)
            .and_then(|n| self.inputs.get(*n))
            .is_some_and(|i| i.contributed)
    }

    fn select_speakers(&mut self, now: Instant) {
        let max = self.config.max_speakers;
        self.ranking.clear();
        self.ranking.extend(
            self.inputs
                .iter()
                .enumerate()
                .map(|(i, input)| (input.level(now), i))
                .filter(|(level, _)| *level >= MIN_DBOV),
        );
        // Loudest first; ties by input order (deterministic).
        self.ranking.sort_by(|a, b| {
            b.0.partial_cmp(&a.0)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.1.cmp(&b.1))
        });
        let mut chosen: Vec<(f32, usize)> = self
            .ranking
            .iter()
            .copied()
            .filter(|(_, i)| self.inputs[*i].selected)
            .take(max)
            .collect();
        for &(level, i) in &self.ranking {
            if chosen.iter().any(|(_, c)| *c == i) {
                continue;
            }
            if chosen.len() < max {
                chosen.push((level, i));
                continue;
            }
            let weakest = chosen
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.0.partial_cmp(&b.1.0).unwrap_or(std::cmp::Ordering::Equal))
                .map(|(slot, (l, _))| (slot, *l));
            if let Some((slot, weakest_level)) = weakest
                && level > weakest_level + SWITCH_MARGIN_DB
            {
                chosen[slot] = (level, i);
            }
        }
        for (i, input) in self.inputs.iter_mut().enumerate() {
            input.selected = chosen.iter().any(|(_, c)| *c == i);
        }
    }

    fn run_tick(&mut self, now: Instant) {
        if self.tick.is_multiple_of(SELECT_EVERY) {
            self.select_speakers(now);
        }
        self.stats.ticks += 1;
        // Decode the speakers (and inputs whose level must be measured); sum.
        self.mix.fill(0.0);
        for input in &mut self.inputs {
            let target = if input.selected { 1.0 } else { 0.0 };
            let audible = target > 0.0 || input.gain > 0.0;
            input.contributed = false;
            if audible || !input.has_levels {
                if !input.decoding && !input.restart_decoder() {
                    input.skip();
                    input.jitter.end_tick();
                    continue;
                }
                input.decoding = true;
                input.produce(&mut self.stats);
                if !input.has_levels {
                    let power = input.frame.iter().map(|s| s * s).sum::<f32>() / FRAME_SAMPLES as f32;
                    let dbov = (10.0 * power.max(1e-13).log10()).max(SILENCE_DBOV);
                    if input.idle == 0 {
                        input.add_level(now, dbov);
                    }
                }
                if audible {
                    let step = (target - input.gain) / FRAME_SAMPLES as f32;
                    for (n, (sample, mixed)) in input.frame.iter_mut().zip(self.mix.iter_mut()).enumerate() {
                        *sample *= input.gain + step * (n + 1) as f32;
                        *mixed += *sample;
                    }
                    input.contributed = true;
                }
                input.gain = target;
            } else {
                input.decoding = false;
                input.skip();
            }
            input.jitter.end_tick();
        }
        // Which distinct mixes are needed.
        self.keys.clear();
        for listener in &self.listeners {
            let key = match listener.own {
                Some(own) if self.contributed(own) => MixKey::Minus(own),
                _ => MixKey::All,
            };
            if !self.keys.contains(&key) {
                self.keys.push(key);
            }
        }
        if self.recording.is_some() && !self.keys.contains(&MixKey::All) {
            self.keys.push(MixKey::All);
        }
        // Encoders of mixes not needed now go back to the spares.
        let mut i = 0;
        while i < self.slots.len() {
            if self.keys.contains(&self.slots[i].key) {
                i += 1;
            } else {
                let slot = self.slots.swap_remove(i);
                if self.spare.len() <= self.config.max_speakers {
                    self.spare.push(slot);
                }
            }
        }
        for k in 0..self.keys.len() {
            let key = self.keys[k];
            self.encode(key);
        }
        // One frame per listener.
        let timestamp = (self.tick.wrapping_mul(FRAME_SAMPLES as u64)) as u32;
        for listener in &self.listeners {
            let key = match listener.own {
                Some(own) if self.contributed(own) => MixKey::Minus(own),
                _ => MixKey::All,
            };
            let Some(slot) = self.slots.iter().find(|s| s.key == key) else {
                continue;
            };
            let Some(payload) = &slot.payload else { continue };
            self.frames.push_back(MixFrame {
                listener: listener.id,
                payload: payload.clone(),
                timestamp,
                audio_level: slot.audio_level,
            });
            self.stats.frames_out += 1;
        }
        if let Some(recording) = &mut self.recording
            && let Some(slot) = self.slots.iter_mut().find(|s| s.key == MixKey::All)
            && let Some(payload) = &slot.payload
        {
            let writer = recording.writer.get_or_insert_with(|| {
                let pre_skip = slot.encoder.lookahead().min(u32::from(u16::MAX)) as u16;
                ogg::OggOpusWriter::new(recording.serial, pre_skip, "switchboard")
            });
            writer.push(payload, FRAME_SAMPLES as u32);
            let bytes = writer.take();
            if !bytes.is_empty() {
                self.recorded.push_back(bytes);
            }
        }
        self.tick += 1;
    }

    /// Limits and encodes one distinct mix into its slot.
    fn encode(&mut self, key: MixKey) {
        let index = match self.slots.iter().position(|s| s.key == key) {
            Some(index) => index,
            None => {
                let slot = match self.spare.pop() {
                    Some(mut slot) => {
                        slot.encoder.reset();
                        slot.limiter = Limiter::default();
                        slot.key = key;
                        slot
                    }
                    None => match OpusEncoder::new(self.config.bitrate_bps, self.config.complexity) {
                        Ok(encoder) => Slot {
                            key,
                            encoder,
                            limiter: Limiter::default(),
                            payload: None,
                            audio_level: -127,
                        },
                        Err(_) => {
                            self.stats.encode_errors += 1;
                            return;
                        }
                    },
                };
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.work.copy_from_slice(&self.mix);
        if let MixKey::Minus(own) = key
            && let Some(input) = self.index.get(&own).and_then(|n| self.inputs.get(*n))
        {
            for (w, s) in self.work.iter_mut().zip(&input.frame) {
                *w -= *s;
            }
        }
        let slot = &mut self.slots[index];
        slot.limiter.process(&mut self.work);
        let power = self.work.iter().map(|s| s * s).sum::<f32>() / FRAME_SAMPLES as f32;
        slot.audio_level = -((-10.0 * power.max(1e-13).log10()).clamp(0.0, 127.0) as i8);
        match slot.encoder.encode(&self.work, &mut self.packet) {
            Ok(len) if len > 0 => {
                slot.payload = Some(Arc::from(&self.packet[..len]));
                self.stats.encoded += 1;
            }
            _ => {
                slot.payload = None;
                self.stats.encode_errors += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_durations_from_the_toc() {
        assert_eq!(packet_samples(&[0xfc, 0]), Some(960), "CELT FB 20 ms, one frame");
        assert_eq!(packet_samples(&[0x78]), Some(960), "hybrid FB 20 ms (config 15)");
        assert_eq!(packet_samples(&[0x09]), Some(1920), "SILK NB 20 ms, two frames");
        assert_eq!(packet_samples(&[0x1b, 0x02]), Some(2880 * 2), "SILK 60 ms × 2 = 120 ms");
        assert_eq!(packet_samples(&[0x1b, 0x03]), None, "more than 120 ms");
        assert_eq!(packet_samples(&[0x03]), None, "code 3 without a count");
        assert_eq!(packet_samples(&[]), None);
    }
}
