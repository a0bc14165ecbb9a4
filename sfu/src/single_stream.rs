//! Single-stream sessions: one stream per kind on the caller's own m-lines,
//! for callers that cannot (or choose not to) take one stream per participant.
//!
//! - **Audio** is the room's mix without the caller's own voice (mix-minus),
//!   made by a [`mixer::Mixer`] the room owns ([`RoomMix`]): created with the
//!   room's first single-stream listener or recording, dropped when neither is
//!   left. Every opus packet of the room's audio tracks feeds it (undecoded
//!   unless the track is among the loudest); every 20 ms it yields one frame per
//!   listener, written here with the listener's own continuous sequence numbers.
//! - **Video** is the active speaker's (never the caller's own), forwarded by
//!   the usual [`crate::forwarder::Forwarder`]: `retarget_single_stream` moves
//!   it to a new speaker only once that speaker has held the floor for
//!   [`crate::SfuConfig::video_hold_off`], asks for a keyframe, and the
//!   forwarder keeps SSRC, sequence numbers and timestamps continuous.
//! - **Recording**: the room's all-speakers mix as Ogg/Opus, handed out as
//!   [`crate::SfuEvent::Recording`] bytes for the driver to append to a file.
//!
//! Hooks in `lib.rs`: `forward` feeds opus packets to [`RoomMix::feed`],
//! `handle_timeout` runs [`Sfu::run_mixers`], `poll_timeout` includes
//! `next_mix`, `remove_session` calls [`Sfu::mix_leave`].

use crate::{DropReason, Incoming, RoomId, SessionId, Sfu, SfuError, SfuEvent, ShardStats, TrackId};
use mixer::{InputId, ListenerId, Mixer, MixerConfig, MixerStats};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use str0m::format::Codec;
use str0m::media::{MediaKind, Mid, Pt};
use str0m::rtp::{ExtensionValues, RtpWrite};

/// First sequence number of a mixed stream: below 2^15 so the SRTP roll-over counter starts at 0.
const FIRST_SEQ: u64 = 1000;

/// A room's mixer and where its frames go.
pub(crate) struct RoomMix {
    mixer: Mixer,
    listeners: HashMap<SessionId, MixListener>,
}

struct MixListener {
    /// The listener's own audio m-line.
    mid: Mid,
    /// Its opus payload type (looked up once).
    pt: Option<Pt>,
    next_seq: u64,
}

impl RoomMix {
    fn new(config: MixerConfig) -> Self {
        Self {
            mixer: Mixer::new(config),
            listeners: HashMap::new(),
        }
    }

    /// An opus packet of one of the room's audio tracks.
    pub(crate) fn feed(&mut self, now: Instant, track: TrackId, packet: &Incoming) {
        self.mixer.handle_packet(
            now,
            InputId(track.0),
            packet.seq,
            packet.ext.audio_level,
            packet.ext.voice_activity,
            &packet.payload,
        );
    }
}

impl Sfu {
    /// Binds one of a single-stream session's own send-capable m-lines: audio
    /// receives the room's mix, video the active speaker's.
    pub(crate) fn bind_single_stream(&mut self, now: Instant, id: SessionId, mid: Mid, kind: MediaKind) {
        if kind == MediaKind::Video {
            if let Some(session) = self.sessions.get_mut(&id) {
                session.bind_own_mline(mid, kind);
            }
            return;
        }
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if let Some(tx) = session.rtc.direct_api().stream_tx_by_mid(mid, None) {
            tx.set_unpaced(true);
        }
        // What it publishes itself stays out of what it hears.
        let own = session
            .published
            .values()
            .copied()
            .find(|t| self.tracks.get(t).is_some_and(|t| t.kind == MediaKind::Audio));
        let config = self.config.mixer.clone();
        let Some(room) = self.rooms.get_mut(&session.room) else {
            return;
        };
        let mix = room.mix.get_or_insert_with(|| RoomMix::new(config));
        mix.listeners.entry(id).or_insert(MixListener {
            mid,
            pt: None,
            next_seq: FIRST_SEQ,
        });
        mix.mixer.add_listener(now, ListenerId(id.0), own.map(|t| InputId(t.0)));
        self.update_next_mix();
    }

    /// Runs the mixers whose tick is due and writes their frames to the listeners.
    pub(crate) fn run_mixers(&mut self, now: Instant) {
        if self.next_mix.is_none_or(|at| at > now) {
            return;
        }
        for (room_id, room) in &mut self.rooms {
            let Some(mix) = room.mix.as_mut() else {
                continue;
            };
            if mix.mixer.poll_timeout().is_none_or(|at| at > now) {
                continue;
            }
            mix.mixer.handle_timeout(now);
            while let Some(frame) = mix.mixer.poll_frame() {
                let id = SessionId(frame.listener.0);
                let (Some(listener), Some(session)) = (mix.listeners.get_mut(&id), self.sessions.get_mut(&id)) else {
                    continue;
                };
                if !session.rtc.is_connected() {
                    self.out.stats.drop(DropReason::NotConnected);
                    continue;
                }
                if listener.pt.is_none() {
                    listener.pt = session
                        .rtc
                        .codec_config()
                        .params()
                        .iter()
                        .find(|p| p.spec().codec == Codec::Opus)
                        .map(|p| p.pt());
                }
                let Some(pt) = listener.pt else {
                    self.out.stats.drop(DropReason::CodecMismatch);
                    continue;
                };
                let mut api = session.rtc.direct_api();
                let Some(tx) = api.stream_tx_by_mid(listener.mid, None) else {
                    self.out.stats.drop(DropReason::NoTrack);
                    continue;
                };
                let ext = ExtensionValues {
                    audio_level: Some(frame.audio_level),
                    voice_activity: Some(frame.audio_level > -127),
                    ..Default::default()
                };
                tx.write_rtp(
                    RtpWrite::new(pt, listener.next_seq.into(), frame.timestamp, now, frame.payload).ext_vals(ext),
                );
                listener.next_seq += 1;
                if !session.dirty {
                    session.dirty = true;
                    self.dirty.push(id);
                }
                session.stats.packets_out += 1;
                self.out.stats.packets_forwarded += 1;
            }
            while let Some(bytes) = mix.mixer.poll_recording() {
                self.events.push_back(SfuEvent::Recording {
                    room: room_id.clone(),
                    bytes,
                    finished: false,
                });
            }
        }
        self.update_next_mix();
    }

    /// Adds the live mixers' counters to the shard's (those of mixers gone are in already).
    pub(crate) fn add_mixer_stats(&self, stats: &mut ShardStats) {
        for mix in self.rooms.values().filter_map(|r| r.mix.as_ref()) {
            stats.mixers += 1;
            add_counters(stats, &mix.mixer.stats());
        }
    }

    /// Drops the room's mixer if it has nothing left to do, keeping its counters.
    fn drop_idle_mixer(&mut self, room_id: &RoomId) {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        if room.mix.as_ref().is_some_and(|m| m.mixer.is_idle())
            && let Some(mix) = room.mix.take()
        {
            add_counters(&mut self.out.stats, &mix.mixer.stats());
        }
    }

    fn update_next_mix(&mut self) {
        self.next_mix = self
            .rooms
            .values()
            .filter_map(|r| r.mix.as_ref().and_then(|m| m.mixer.poll_timeout()))
            .min();
    }

    /// A track that stopped is no longer mixed.
    pub(crate) fn mix_drop_input(&mut self, room_id: &RoomId, track: TrackId) {
        if let Some(mix) = self.rooms.get_mut(room_id).and_then(|r| r.mix.as_mut()) {
            mix.mixer.remove_input(InputId(track.0));
        }
    }

    /// A session is leaving (its room's session list no longer has it): it
    /// stops listening, its tracks stop being mixed; an emptied room's
    /// recording ends.
    pub(crate) fn mix_leave(&mut self, id: SessionId, room_id: &RoomId, published: impl Iterator<Item = TrackId>) {
        let Some(room) = self.rooms.get_mut(room_id) else {
            return;
        };
        let Some(mix) = room.mix.as_mut() else {
            return;
        };
        mix.listeners.remove(&id);
        mix.mixer.remove_listener(ListenerId(id.0));
        for track in published {
            mix.mixer.remove_input(InputId(track.0));
        }
        if room.sessions.is_empty() && mix.mixer.is_recording() {
            mix.mixer.stop_recording();
            self.drain_recording(room_id, true);
        }
        self.drop_idle_mixer(room_id);
        self.update_next_mix();
    }

    fn drain_recording(&mut self, room_id: &RoomId, finished: bool) {
        let Some(mix) = self.rooms.get_mut(room_id).and_then(|r| r.mix.as_mut()) else {
            return;
        };
        let mut chunks = Vec::new();
        while let Some(bytes) = mix.mixer.poll_recording() {
            chunks.push(bytes);
        }
        let bytes = chunks.concat();
        if finished || !bytes.is_empty() {
            self.events.push_back(SfuEvent::Recording {
                room: room_id.clone(),
                bytes,
                finished,
            });
        }
    }

    /// Starts recording the room's audio (the mix of its speakers) as Ogg/Opus:
    /// the file's bytes come as [`SfuEvent::Recording`].
    pub fn start_recording(&mut self, now: Instant, room_id: &RoomId) -> Result<(), SfuError> {
        self.advance(now);
        let serial = self.next_id() as u32;
        let config = self.config.mixer.clone();
        let room = self.rooms.get_mut(room_id).ok_or(SfuError::UnknownRoom)?;
        room.mix
            .get_or_insert_with(|| RoomMix::new(config))
            .mixer
            .start_recording(now, serial);
        self.update_next_mix();
        Ok(())
    }

    /// Stops the room's recording; the last bytes come as a finished
    /// [`SfuEvent::Recording`]. Returns the recorded duration, if it was recording.
    pub fn stop_recording(&mut self, now: Instant, room_id: &RoomId) -> Option<Duration> {
        self.advance(now);
        let mix = self.rooms.get_mut(room_id)?.mix.as_mut()?;
        if !mix.mixer.is_recording() {
            return None;
        }
        let duration = mix.mixer.stop_recording().unwrap_or_default();
        self.drain_recording(room_id, true);
        self.drop_idle_mixer(room_id);
        self.update_next_mix();
        Some(duration)
    }

    /// Whether the room's audio is being recorded.
    pub fn is_recording(&self, room_id: &RoomId) -> bool {
        self.rooms
            .get(room_id)
            .and_then(|r| r.mix.as_ref())
            .is_some_and(|m| m.mixer.is_recording())
    }

    /// The counters of the room's mixer, if it mixes.
    pub fn mixer_stats(&self, room_id: &RoomId) -> Option<MixerStats> {
        self.rooms
            .get(room_id)
            .and_then(|r| r.mix.as_ref())
            .map(|m| m.mixer.stats())
    }
}

fn add_counters(stats: &mut ShardStats, mixer: &MixerStats) {
    stats.mix_ticks += mixer.ticks;
    stats.mix_frames_out += mixer.frames_out;
    stats.mix_decode_errors += mixer.decode_errors;
    stats.mix_concealed += mixer.concealed;
}
