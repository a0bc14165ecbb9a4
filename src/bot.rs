//! The conference bot: a Matrix user whose calls are sessions on the SFU.
//!
//! Wiring only: the Matrix driver feeds sync batches to the sans-IO
//! [`Signalling`] core; its [`Action`]s become SFU shard commands and sent
//! events; SFU events (renegotiation needed, connected, closed) go back to it.
//! Each Matrix room is one conference (one SFU room), so every caller in a room
//! receives the others' streams, labelled in `sdp_stream_metadata` with their
//! user and device.
//!
//! Dial-in: clients that only call in two-member rooms (Element Web's legacy
//! calls) reach a group room's conference through a direct room of their own.
//! `!dialin` in the group room makes the bot create one, linked to the
//! conference by a state event ([`DIALIN_STATE`]), and call the user there once
//! they join; calls in that room, either way, join the group's conference.
//!
//! Single-stream callers (one mixed audio stream without their own voice, and
//! the active speaker's video, on their own m-lines): those who cannot
//! renegotiate (version 0) always; otherwise the call's own choice
//! ([`SINGLE_STREAM_FIELD`] in the invite), else the room's
//! ([`CONFERENCE_STATE`] `mode`), else the operator's (`bot.conference_mode`).
//!
//! Recording: `!record start` / `!record stop` in a room (or
//! `bot.record_conferences`) records the conference's audio mix to an
//! Ogg/Opus file in the data directory's `recordings/`, announced in the room.

use crate::config::ConferenceMode;
use crate::drivers::matrix::{MatrixClient, SyncBatch};
use crate::drivers::media::ShardSet;
use anyhow::Result;
use serde_json::{Value, json};
use sfu::{OwnLines, Participant, RoomId, SessionId, SfuError, SfuEvent, StreamInfo};
use signalling::call::{Action, Incoming, Signalling};
use signalling::events::{CallEvent, SdpStreamMetadata, StreamMetadata};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The state event that links a dial-in room to its conference room
/// (content: `conference`, the group room; `user`, who is dialled in).
pub const DIALIN_STATE: &str = "io.switchboard.dialin";
/// The room command that asks for a dial-in room.
pub const DIALIN_COMMAND: &str = "!dialin";
/// The room state event that sets how callers receive the conference
/// (content: `mode`, `single_stream` or `multi_stream`).
pub const CONFERENCE_STATE: &str = "io.switchboard.conference";
/// The field of an `m.call.invite` with which a caller asks for (true) or
/// against (false) a single mixed stream.
pub const SINGLE_STREAM_FIELD: &str = "io.switchboard.single_stream";
/// Room commands that start and stop recording the conference's audio.
pub const RECORD_START: &str = "!record start";
pub const RECORD_STOP: &str = "!record stop";

/// How long one `/sync` long-poll waits.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Backoff after a failed sync, doubling up to the maximum.
const SYNC_BACKOFF: Duration = Duration::from_millis(250);
const SYNC_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The SFU session a call lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MediaRef {
    shard: usize,
    session: SessionId,
}

/// Who may bring the bot into rooms, and what callers get.
#[derive(Debug, Clone)]
pub struct BotPolicy {
    /// User ids (`@a:hs`) or server names (`hs`) whose invites the bot accepts;
    /// empty: everyone's.
    pub allowed: Vec<String>,
    /// Where the last sync token is kept, so a restart resumes after it.
    pub sync_token_path: Option<PathBuf>,
    /// What callers get unless their call or room says otherwise.
    pub conference_mode: ConferenceMode,
    /// Record every conference.
    pub record_conferences: bool,
    /// Where recordings go (none: recording is refused).
    pub recordings_dir: Option<PathBuf>,
    /// Where the conferences a room asked to record (`!record start`) are
    /// kept, one per line, so a restarted bot records them again.
    pub record_wanted_path: Option<PathBuf>,
}

impl Default for BotPolicy {
    fn default() -> Self {
        Self {
            allowed: Vec::new(),
            sync_token_path: None,
            conference_mode: ConferenceMode::MultiStream,
            record_conferences: false,
            recordings_dir: None,
            record_wanted_path: None,
        }
    }
}

/// A conference's recording file, open while the SFU sends its bytes.
#[derive(Debug)]
struct RecordingFile {
    /// The path relative to the data directory, as announced.
    name: String,
    file: std::fs::File,
    /// Where to announce it.
    room: String,
}

impl BotPolicy {
    fn allows(&self, inviter: Option<&str>) -> bool {
        if self.allowed.is_empty() {
            return true;
        }
        let Some(inviter) = inviter else { return false };
        let server = inviter.split_once(':').map_or("", |(_, s)| s);
        self.allowed.iter().any(|a| a == inviter || a == server)
    }
}

pub struct Bot {
    matrix: MatrixClient,
    policy: BotPolicy,
    /// Joined members of each room the bot is in.
    members: HashMap<String, HashSet<String>>,
    media: ShardSet,
    signalling: Signalling,
    calls: HashMap<String, MediaRef>,
    by_session: HashMap<MediaRef, String>,
    /// The streams each call receives (for `sdp_stream_metadata`).
    streams: HashMap<String, Vec<StreamInfo>>,
    /// Who is on each call.
    participants: HashMap<String, Participant>,
    /// The latest `sdp_stream_metadata` each caller sent about its own streams (mute state).
    published: HashMap<String, SdpStreamMetadata>,
    /// Dial-in rooms: room → (conference room, the user dialled in there).
    dialins: HashMap<String, (String, String)>,
    /// Rooms' own conference mode (their [`CONFERENCE_STATE`]).
    room_modes: HashMap<String, ConferenceMode>,
    /// Calls that said whether they want a single stream; for calls the bot
    /// places, what the room or operator chose.
    single_stream_choice: HashMap<String, bool>,
    /// Conferences (SFU rooms) a `!record start` asked to record whenever
    /// they have calls (saved at `policy.record_wanted_path`).
    record_wanted: HashSet<String>,
    recordings: HashMap<String, RecordingFile>,
    txn_prefix: String,
    txn_counter: u64,
}

impl std::fmt::Debug for Bot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bot")
            .field("user_id", &self.matrix.user_id)
            .field("calls", &self.calls.len())
            .finish()
    }
}

/// The label of one stream a caller receives: its publisher's own metadata
/// (purpose, mute state) when known, plus whose stream it is.
fn label(stream: &StreamInfo, own: Option<&StreamMetadata>) -> StreamMetadata {
    let mut entry = own.cloned().unwrap_or(StreamMetadata {
        purpose: "m.usermedia".into(),
        audio_muted: false,
        video_muted: false,
        extra: serde_json::Map::new(),
    });
    entry
        .extra
        .insert("user_id".into(), stream.publisher.user_id.clone().into());
    if !stream.publisher.device_id.is_empty() {
        entry
            .extra
            .insert("device_id".into(), stream.publisher.device_id.clone().into());
    }
    entry
}

/// Labels for the streams our own SDP sends (`a=msid` of m-lines that send):
/// a single-stream session's mix, the m-lines of an offer we make. They are
/// the bot's, as clients take an unlabelled stream for the other party's;
/// matrix-js-sdk throws on a received stream that has no label at all.
fn own_stream_labels(sdp: &str, bot: &str) -> SdpStreamMetadata {
    let mut labels = SdpStreamMetadata::new();
    for section in sdp.split("\nm=").skip(1) {
        let lines = || section.lines().map(str::trim_end);
        if !lines().any(|l| l == "a=sendrecv" || l == "a=sendonly") {
            continue;
        }
        let Some(stream) = lines().find_map(|l| l.strip_prefix("a=msid:")?.split_whitespace().next()) else {
            continue;
        };
        let mut extra = serde_json::Map::new();
        extra.insert("user_id".into(), bot.into());
        labels.entry(stream.to_string()).or_insert(StreamMetadata {
            purpose: "m.usermedia".into(),
            audio_muted: false,
            video_muted: false,
            extra,
        });
    }
    labels
}

/// A publisher's own metadata entry for one of its streams. Someone the bot
/// called publishes on m-lines of the bot's offer, whose msid is ours: their
/// single stream's entry stands for it.
fn own_entry<'a>(metadata: &'a SdpStreamMetadata, stream_id: &str) -> Option<&'a StreamMetadata> {
    metadata
        .get(stream_id)
        .or_else(|| (metadata.len() == 1).then(|| metadata.values().next()).flatten())
}

impl Bot {
    pub fn new(matrix: MatrixClient, media: ShardSet, policy: BotPolicy) -> Self {
        let signalling = Signalling::new(matrix.user_id.clone(), matrix.device_id.clone());
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let record_wanted = policy
            .record_wanted_path
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .map(|text| {
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Self {
            matrix,
            policy,
            members: HashMap::new(),
            media,
            signalling,
            calls: HashMap::new(),
            by_session: HashMap::new(),
            streams: HashMap::new(),
            participants: HashMap::new(),
            published: HashMap::new(),
            dialins: HashMap::new(),
            room_modes: HashMap::new(),
            single_stream_choice: HashMap::new(),
            record_wanted,
            recordings: HashMap::new(),
            txn_prefix: format!("sb{started}"),
            txn_counter: 0,
        }
    }

    /// Runs until the media events end (the process shuts down).
    pub async fn run(mut self, mut media_events: mpsc::UnboundedReceiver<(usize, SfuEvent)>) -> Result<()> {
        let (batches_tx, mut batches) = mpsc::channel::<SyncBatch>(4);
        let syncer = self.matrix.clone();
        let resume = self
            .policy
            .sync_token_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok());
        let resume: Option<String> = resume.map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        if resume.is_some() {
            // Resuming after a restart: relearn who is in which room and the
            // dial-in links from a full sync, without acting on its old events.
            match self.matrix.sync(None, Duration::ZERO).await {
                Ok(full) => {
                    for (room_id, event) in &full.timeline {
                        self.learn(room_id, event);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not relearn room state after a restart"),
            }
        }
        tokio::spawn(async move {
            let mut since = resume;
            let mut backoff = SYNC_BACKOFF;
            loop {
                match syncer
                    .sync(
                        since.as_deref(),
                        if since.is_some() { SYNC_TIMEOUT } else { Duration::ZERO },
                    )
                    .await
                {
                    Ok(batch) => {
                        backoff = SYNC_BACKOFF;
                        since = Some(batch.next_batch.clone());
                        if batches_tx.send(batch).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bot sync failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(SYNC_BACKOFF_MAX);
                    }
                }
            }
        });
        tracing::info!(user_id = %self.matrix.user_id, "conference bot running");
        loop {
            self.execute_actions().await;
            let wake = self
                .signalling
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
            tokio::select! {
                batch = batches.recv() => match batch {
                    Some(batch) => self.on_sync(batch).await,
                    None => return Ok(()),
                },
                event = media_events.recv() => match event {
                    Some((shard, event)) => self.on_media(shard, event).await,
                    None => return Ok(()),
                },
                () = tokio::time::sleep_until(wake.into()) => self.signalling.handle_timeout(Instant::now()),
            }
        }
    }

    async fn on_sync(&mut self, batch: SyncBatch) {
        for (room, inviter) in &batch.invites {
            if !self.policy.allows(inviter.as_deref()) {
                tracing::info!("declining an invite from a user the bot does not serve");
                let _ = self.matrix.leave(room).await;
                continue;
            }
            let asked = Instant::now();
            match self.matrix.join(room).await {
                Ok(()) => tracing::info!(took_ms = asked.elapsed().as_millis() as u64, "joined a room on invite"),
                Err(e) => tracing::warn!(error = %e, "could not join a room"),
            }
        }
        for room in &batch.left {
            self.members.remove(room);
        }
        let mut calls = Vec::new();
        let mut dial = Vec::new();
        let mut dialin_requests = Vec::new();
        let mut left = Vec::new();
        let mut record_commands = Vec::new();
        for (room_id, event) in batch.timeline {
            let kind = event["type"].as_str().unwrap_or_default();
            let sender = event["sender"].as_str().unwrap_or_default().to_string();
            if kind == "m.room.member" || kind == DIALIN_STATE || kind == CONFERENCE_STATE {
                self.learn(&room_id, &event);
                let membership = event["content"]["membership"].as_str().unwrap_or_default();
                let target = event["state_key"].as_str().unwrap_or_default();
                if kind == "m.room.member" && target != self.matrix.user_id {
                    if matches!(membership, "leave" | "ban") {
                        left.push((room_id.clone(), target.to_string()));
                    }
                    // The user we dial in joined their dial-in room: call them.
                    if membership == "join" && self.dialins.get(&room_id).is_some_and(|(_, user)| user == target) {
                        dial.push((room_id.clone(), target.to_string()));
                    }
                }
                continue;
            }
            if kind == "m.room.message"
                && sender != self.matrix.user_id
                && event["content"]["body"].as_str().map(str::trim) == Some(DIALIN_COMMAND)
                && !self.dialins.contains_key(&room_id)
            {
                dialin_requests.push((room_id, sender));
                continue;
            }
            if kind == "m.room.message" && sender != self.matrix.user_id {
                let body = event["content"]["body"].as_str().map(str::trim);
                if body == Some(RECORD_START) || body == Some(RECORD_STOP) {
                    record_commands.push((room_id, body == Some(RECORD_START)));
                    continue;
                }
            }
            if !kind.starts_with("m.call.") && !kind.starts_with("org.matrix.call.") {
                continue;
            }
            if kind == "m.call.invite"
                && let (Some(call_id), Some(choice)) = (
                    event["content"]["call_id"].as_str(),
                    event["content"][SINGLE_STREAM_FIELD].as_bool(),
                )
            {
                self.single_stream_choice.insert(call_id.to_string(), choice);
            }
            match CallEvent::parse(kind, &event["content"]) {
                Ok(parsed) => {
                    calls.push(Incoming {
                        room_id,
                        sender,
                        age_ms: event["unsigned"]["age"].as_u64(),
                        event: parsed,
                    });
                }
                Err(e) => tracing::info!(kind, error = %e, "ignoring a malformed call event"),
            }
        }
        // Invites are judged by the room as it is after the batch.
        calls.retain(|call| {
            let CallEvent::Invite { invitee, .. } = &call.event else {
                return true;
            };
            let members = self.members.get(&call.room_id);
            // Only members of the room may call into its conference.
            if !members.is_some_and(|m| m.contains(&call.sender)) {
                tracing::info!("ignoring a call from someone who is not in the room");
                return false;
            }
            // An invite to nobody in particular is for the bot only in a
            // two-member room (a 1:1 call with it, as Element Web places them).
            invitee.is_some() || members.map_or(0, HashSet::len) == 2
        });
        let signalling = &mut self.signalling;
        contained("a sync batch's call events", || {
            signalling.handle_batch(Instant::now(), calls)
        });
        for (room_id, user) in left {
            contained("a member leaving", || {
                signalling.handle_member_left(Instant::now(), &room_id, &user);
            });
        }
        for (room_id, user) in dial {
            self.dial(&room_id, &user);
        }
        for (conference, user) in dialin_requests {
            self.open_dialin(&conference, &user).await;
        }
        for (room_id, start) in record_commands {
            self.record_command(&room_id, start).await;
        }
        // Leave rooms where nobody but the bot is left.
        let empty: Vec<String> = self
            .members
            .iter()
            // (A dial-in room waits for its user to join.)
            .filter(|(room, m)| m.len() == 1 && m.contains(&self.matrix.user_id) && !self.dialins.contains_key(*room))
            .map(|(room, _)| room.clone())
            .collect();
        for room in empty {
            tracing::info!("leaving a room where nobody else is left");
            let _ = self.matrix.leave(&room).await;
            self.members.remove(&room);
        }
        if let Some(path) = &self.policy.sync_token_path
            && let Err(e) = std::fs::write(path, &batch.next_batch)
        {
            tracing::warn!(error = %e, "could not save the sync token");
        }
    }

    /// Takes in a state event: room membership and dial-in links.
    fn learn(&mut self, room_id: &str, event: &Value) {
        match event["type"].as_str() {
            Some("m.room.member") => {
                let Some(target) = event["state_key"].as_str() else {
                    return;
                };
                let membership = event["content"]["membership"].as_str().unwrap_or_default();
                let members = self.members.entry(room_id.to_string()).or_default();
                if membership == "join" {
                    members.insert(target.to_string());
                } else {
                    members.remove(target);
                }
                // A dial-in room whose user is gone is an ordinary room again.
                if matches!(membership, "leave" | "ban")
                    && self.dialins.get(room_id).is_some_and(|(_, user)| user == target)
                {
                    self.dialins.remove(room_id);
                }
            }
            // Who may set it is the room's power levels' business (the homeserver checks).
            Some(CONFERENCE_STATE) => match event["content"]["mode"].as_str() {
                Some("single_stream") => {
                    self.room_modes
                        .insert(room_id.to_string(), ConferenceMode::SingleStream);
                }
                Some("multi_stream") => {
                    self.room_modes.insert(room_id.to_string(), ConferenceMode::MultiStream);
                }
                _ => {
                    self.room_modes.remove(room_id);
                }
            },
            // Only links the bot made itself count.
            Some(DIALIN_STATE) if event["sender"] == self.matrix.user_id.as_str() => {
                let content = &event["content"];
                if let (Some(conference), Some(user)) = (content["conference"].as_str(), content["user"].as_str()) {
                    self.dialins
                        .insert(room_id.to_string(), (conference.to_string(), user.to_string()));
                }
            }
            _ => {}
        }
    }

    /// The conference (SFU room) a call in `room_id` belongs to: the room's own,
    /// or for a dial-in room the group room it is linked to.
    fn conference_of(&self, room_id: &str) -> RoomId {
        RoomId(
            self.dialins
                .get(room_id)
                .map_or(room_id, |(conference, _)| conference.as_str())
                .to_string(),
        )
    }

    /// `!dialin` from `user` in `conference`: a direct room for them linked to
    /// the conference, where the bot calls them once they join (or where they
    /// call the bot). One that already exists is dialled again if they are in
    /// it, and otherwise left waiting for them to join.
    async fn open_dialin(&mut self, conference: &str, user: &str) {
        let existing = self
            .dialins
            .iter()
            .find(|(_, (c, u))| c == conference && u == user)
            .map(|(room, _)| room.clone());
        if let Some(room) = existing {
            // Still invited: that room waits for them (no new room per repeat).
            if self.members.get(&room).is_some_and(|m| m.contains(user)) {
                self.dial(&room, user);
            }
            return;
        }
        let body = json!({
            "preset": "trusted_private_chat",
            "is_direct": true,
            "invite": [user],
            "name": "Conference dial-in",
            "topic": format!("Calls here join the conference of {conference}"),
            "initial_state": [{"type": DIALIN_STATE, "state_key": "", "content": {"conference": conference, "user": user}}],
        });
        let room = match self.matrix.create_room(&body).await {
            Ok(room) => room,
            Err(e) => {
                tracing::warn!(error = %e, "could not create a dial-in room");
                return;
            }
        };
        tracing::info!("created a dial-in room");
        self.dialins
            .insert(room.clone(), (conference.to_string(), user.to_string()));
        let notice = json!({"msgtype": "m.notice",
            "body": format!("{user}: I have invited you to a direct room linked to this conference. \
                Join it and I will call you there; calling me there works too.")});
        self.send_raw(conference, "m.room.message", &notice).await;
    }

    /// Calls `user` in their dial-in room `room_id`.
    fn dial(&mut self, room_id: &str, user: &str) {
        self.txn_counter += 1;
        let call_id = format!("{}c{}", self.txn_prefix, self.txn_counter);
        tracing::info!("calling a user in their dial-in room");
        self.signalling.place_call(Instant::now(), &call_id, room_id, user);
    }

    async fn send_raw(&mut self, room_id: &str, event_type: &str, content: &Value) {
        self.txn_counter += 1;
        let txn = format!("{}-{}", self.txn_prefix, self.txn_counter);
        if let Err(e) = self.matrix.send(room_id, event_type, &txn, content).await {
            tracing::warn!(error = %e, event_type, "could not send an event");
        }
    }

    async fn on_media(&mut self, shard: usize, event: SfuEvent) {
        let now = Instant::now();
        let call = |session: SessionId| self.by_session.get(&MediaRef { shard, session }).cloned();
        match event {
            SfuEvent::NegotiationNeeded(session) => {
                let Some(call_id) = call(session) else { return };
                let Some(handle) = self.media.shard(shard) else { return };
                match handle.create_offer(session).await {
                    Ok(Some(offer)) => {
                        let metadata = self.metadata_for(&offer.streams);
                        self.streams.insert(call_id.clone(), offer.streams);
                        if !self.signalling.renegotiate(now, &call_id, offer.sdp, metadata) {
                            tracing::debug!("a renegotiation for a caller that cannot take one");
                        }
                    }
                    Ok(None) => {}
                    // The call ended after the SFU asked: nothing to renegotiate.
                    Err(e) if matches!(e.downcast_ref(), Some(SfuError::UnknownSession)) => {
                        tracing::debug!("a renegotiation for a session that has closed");
                    }
                    Err(e) => tracing::warn!(error = %e, "could not create a renegotiation offer"),
                }
            }
            SfuEvent::Connected(session) => {
                if let Some(call_id) = call(session) {
                    self.signalling.handle_media_connected(now, &call_id);
                }
            }
            SfuEvent::Closed(session, reason) => {
                if let Some(call_id) = call(session) {
                    tracing::info!(?reason, "media session closed");
                    self.signalling.handle_media_closed(now, &call_id);
                }
            }
            SfuEvent::ActiveSpeaker { .. } => {}
            SfuEvent::Recording { room, bytes, finished } => self.on_recording(room, &bytes, finished).await,
        }
    }

    /// Whether a call that can renegotiate gets a single stream: its own
    /// choice, else its room's, else the operator's.
    fn wants_single_stream(&mut self, call_id: &str, room_id: &str) -> bool {
        if let Some(choice) = self.single_stream_choice.remove(call_id) {
            return choice;
        }
        let conference = self.conference_of(room_id).0;
        let mode = self
            .room_modes
            .get(room_id)
            .or_else(|| self.room_modes.get(&conference))
            .copied()
            .unwrap_or(self.policy.conference_mode);
        mode == ConferenceMode::SingleStream
    }

    /// `!record start` / `!record stop` in `room_id`.
    async fn record_command(&mut self, room_id: &str, start: bool) {
        let conference = self.conference_of(room_id);
        let notice = if start {
            if self.policy.recordings_dir.is_none() {
                "Recording is not available here.".to_string()
            } else {
                if self.record_wanted.insert(conference.0.clone()) {
                    self.save_record_wanted();
                }
                match self.start_recording(&conference, room_id).await {
                    Some((name, true)) => format!("Recording this conference's audio to {name}."),
                    Some((name, false)) => format!("Already recording to {name}."),
                    None => "Recording will start when the first call connects.".to_string(),
                }
            }
        } else {
            if self.record_wanted.remove(&conference.0) {
                self.save_record_wanted();
            }
            let (_, handle) = self.media.shard_for(&conference);
            match handle.stop_recording(conference.clone()).await {
                Ok(Some(duration)) => format!("Recording stopped after {:.1} s.", duration.as_secs_f64()),
                _ => "Nothing is being recorded.".to_string(),
            }
        };
        let content = json!({"msgtype": "m.notice", "body": notice});
        self.send_raw(room_id, "m.room.message", &content).await;
    }

    /// Writes `record_wanted` to its file (whole, then renamed into place).
    fn save_record_wanted(&self) {
        let Some(path) = &self.policy.record_wanted_path else {
            return;
        };
        let mut rooms: Vec<&str> = self.record_wanted.iter().map(String::as_str).collect();
        rooms.sort_unstable();
        let text: String = rooms.iter().map(|room| format!("{room}\n")).collect();
        let partial = path.with_extension("partial");
        if let Err(e) = std::fs::write(&partial, text).and_then(|()| std::fs::rename(&partial, path)) {
            tracing::warn!(error = %e, "could not save the conferences to record");
        }
    }

    /// A call joined `conference`: record it if the operator or a room command
    /// asked for that, and say so in `room_id`.
    async fn record_if_wanted(&mut self, conference: &RoomId, room_id: &str) {
        if (self.policy.record_conferences || self.record_wanted.contains(&conference.0))
            && let Some((name, true)) = self.start_recording(conference, room_id).await
        {
            let content = json!({"msgtype": "m.notice",
                "body": format!("Recording this conference's audio to {name}.")});
            self.send_raw(room_id, "m.room.message", &content).await;
        }
    }

    /// Starts recording a conference that has calls; returns the file's name
    /// and whether it started now (false: it was recording already).
    async fn start_recording(&mut self, conference: &RoomId, announce_in: &str) -> Option<(String, bool)> {
        if let Some(recording) = self.recordings.get(&conference.0) {
            return Some((recording.name.clone(), false));
        }
        let dir = self.policy.recordings_dir.clone()?;
        let (_, handle) = self.media.shard_for(conference);
        handle.start_recording(conference.clone()).await.ok()?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let safe: String = conference
            .0
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(64)
            .collect();
        let file_name = format!("{safe}-{stamp}.opus");
        let opened = std::fs::create_dir_all(&dir).and_then(|()| std::fs::File::create(dir.join(&file_name)));
        match opened {
            Ok(file) => {
                let name = format!("recordings/{file_name}");
                tracing::info!(file = %name, "recording a conference");
                self.recordings.insert(
                    conference.0.clone(),
                    RecordingFile {
                        name: name.clone(),
                        file,
                        room: announce_in.to_string(),
                    },
                );
                Some((name, true))
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not create a recording file");
                let _ = handle.stop_recording(conference.clone()).await;
                None
            }
        }
    }

    /// Bytes of a conference's recording: appended to its file; the last close it.
    async fn on_recording(&mut self, room: RoomId, bytes: &[u8], finished: bool) {
        use std::io::Write;
        let Some(recording) = self.recordings.get_mut(&room.0) else {
            return;
        };
        if let Err(e) = recording.file.write_all(bytes) {
            tracing::warn!(error = %e, "could not write a recording");
        }
        if finished && let Some(recording) = self.recordings.remove(&room.0) {
            let _ = recording.file.sync_all();
            let content = json!({"msgtype": "m.notice", "body": format!("Recording saved: {}", recording.name)});
            self.send_raw(&recording.room, "m.room.message", &content).await;
        }
    }

    async fn execute_actions(&mut self) {
        while let Some(action) = self.signalling.poll_action() {
            let now = Instant::now();
            match action {
                Action::OpenMedia {
                    call_id,
                    room_id,
                    caller,
                    caller_party,
                    renegotiates,
                    offer,
                    metadata,
                } => {
                    let room = self.conference_of(&room_id);
                    let (shard, handle) = self.media.shard_for(&room);
                    let handle = handle.clone();
                    let participant = Participant {
                        user_id: caller,
                        device_id: caller_party.unwrap_or_default(),
                    };
                    self.participants.insert(call_id.clone(), participant.clone());
                    if let Some(own) = metadata {
                        self.published.insert(call_id.clone(), own);
                    }
                    let single_stream = !renegotiates || self.wants_single_stream(&call_id, &room_id);
                    let conference = room.clone();
                    // A multi-stream caller gets the others on m-lines of our
                    // offers; a single-stream one the mix on its own.
                    let own_lines = if single_stream {
                        OwnLines::BothWays
                    } else {
                        OwnLines::PublishOnly
                    };
                    match handle.open_session(room, participant, offer, own_lines).await {
                        Ok((session, answer)) => {
                            if single_stream {
                                // The mix and the active speaker, on the caller's own m-lines.
                                let _ = handle.set_single_stream(session).await;
                            }
                            self.record_if_wanted(&conference, &room_id).await;
                            let media = MediaRef { shard, session };
                            self.calls.insert(call_id.clone(), media);
                            self.by_session.insert(media, call_id.clone());
                            self.signalling.handle_media_answer(
                                now,
                                &call_id,
                                answer.clone(),
                                own_stream_labels(&answer, &self.matrix.user_id),
                            );
                        }
                        Err(e) => {
                            tracing::info!(error = %e, "could not open a media session for a call");
                            self.signalling.handle_media_failed(now, &call_id);
                        }
                    }
                }
                Action::CreateOffer {
                    call_id,
                    room_id,
                    callee,
                } => {
                    let room = self.conference_of(&room_id);
                    let (shard, handle) = self.media.shard_for(&room);
                    let handle = handle.clone();
                    let participant = Participant {
                        user_id: callee,
                        device_id: String::new(),
                    };
                    // Kept for the answer: whether the room or operator wants a single stream.
                    let single_stream = self.wants_single_stream(&call_id, &room_id);
                    self.single_stream_choice.insert(call_id.clone(), single_stream);
                    self.participants.insert(call_id.clone(), participant.clone());
                    match handle.open_offer(room, participant).await {
                        Ok((session, offer)) => {
                            let media = MediaRef { shard, session };
                            self.calls.insert(call_id.clone(), media);
                            self.by_session.insert(media, call_id.clone());
                            self.signalling.handle_media_offer(
                                now,
                                &call_id,
                                offer.clone(),
                                own_stream_labels(&offer, &self.matrix.user_id),
                            );
                            let conference = self.conference_of(&room_id);
                            self.record_if_wanted(&conference, &room_id).await;
                        }
                        Err(e) => {
                            tracing::info!(error = %e, "could not open a media session to call someone");
                            self.signalling.handle_media_failed(now, &call_id);
                        }
                    }
                }
                Action::PeerAnswer {
                    call_id,
                    answer,
                    renegotiates,
                    metadata,
                    ..
                } => {
                    let Some((media, handle)) = self.handle_of(&call_id) else {
                        continue;
                    };
                    if let Some(own) = metadata {
                        self.published.insert(call_id.clone(), own);
                    }
                    let wanted = self.single_stream_choice.remove(&call_id).unwrap_or(false);
                    match handle.accept_answer(media.session, answer).await {
                        Ok(()) if !renegotiates || wanted => {
                            // The mix and the active speaker, on the m-lines of our offer.
                            let _ = handle.set_single_stream(media.session).await;
                        }
                        Ok(()) => {}
                        Err(e) => {
                            tracing::info!(error = %e, "the callee's answer was refused");
                            self.signalling.handle_media_failed(now, &call_id);
                        }
                    }
                }
                Action::MediaOffer { call_id, offer } => {
                    let Some((media, handle)) = self.handle_of(&call_id) else {
                        continue;
                    };
                    match handle.accept_offer(media.session, offer).await {
                        Ok(answer) => {
                            let streams = self.streams.get(&call_id).cloned().unwrap_or_default();
                            let metadata = self.metadata_for(&streams);
                            self.signalling
                                .handle_media_renegotiated(now, &call_id, answer, metadata);
                        }
                        Err(e) => tracing::info!(error = %e, "the caller's renegotiation offer was refused"),
                    }
                }
                Action::MediaAnswer { call_id, answer } => {
                    let Some((media, handle)) = self.handle_of(&call_id) else {
                        continue;
                    };
                    if let Err(e) = handle.accept_answer(media.session, answer).await {
                        tracing::info!(error = %e, "the caller's renegotiation answer was refused");
                    }
                }
                Action::PeerMetadata { call_id, metadata } => self.relay_metadata(now, &call_id, metadata),
                Action::CloseMedia { call_id } => {
                    if let Some((media, handle)) = self.handle_of(&call_id) {
                        let _ = handle.close_session(media.session).await;
                        self.by_session.remove(&media);
                    }
                    self.calls.remove(&call_id);
                    self.single_stream_choice.remove(&call_id);
                    self.streams.remove(&call_id);
                    self.participants.remove(&call_id);
                    self.published.remove(&call_id);
                }
                Action::Send { room_id, event } => {
                    self.send_raw(&room_id, event.event_type(), &event.to_content()).await;
                }
            }
        }
    }

    /// Labels for every stream a caller receives.
    fn metadata_for(&self, streams: &[StreamInfo]) -> SdpStreamMetadata {
        streams
            .iter()
            .map(|stream| {
                let own = self
                    .participants
                    .iter()
                    .find(|(_, p)| **p == stream.publisher)
                    .and_then(|(call, _)| self.published.get(call))
                    .and_then(|m| own_entry(m, &stream.publisher_stream_id));
                (stream.stream_id.clone(), label(stream, own))
            })
            .collect()
    }

    /// A caller's streams changed (mute): tell everyone who receives them.
    fn relay_metadata(&mut self, now: Instant, call_id: &str, metadata: SdpStreamMetadata) {
        let Some(publisher) = self.participants.get(call_id).cloned() else {
            return;
        };
        let published = self.published.entry(call_id.to_string()).or_default();
        let before = published.clone();
        published.extend(metadata.clone());
        let mut updates = Vec::new();
        for (other_call, streams) in &self.streams {
            // Only what changed (renegotiations repeat the whole metadata).
            let changed: SdpStreamMetadata = streams
                .iter()
                .filter(|s| s.publisher == publisher)
                .filter_map(|s| {
                    let own = own_entry(&metadata, &s.publisher_stream_id)?;
                    let known = own_entry(&before, &s.publisher_stream_id);
                    (known != Some(own)).then(|| (s.stream_id.clone(), label(s, Some(own))))
                })
                .collect();
            if !changed.is_empty() {
                updates.push((other_call.clone(), changed));
            }
        }
        for (other_call, changed) in updates {
            self.signalling.send_metadata(now, &other_call, changed);
        }
    }

    fn handle_of(&self, call_id: &str) -> Option<(MediaRef, crate::drivers::media::ShardHandle)> {
        let media = *self.calls.get(call_id)?;
        Some((media, self.media.shard(media.shard)?.clone()))
    }
}

/// Runs the signalling core on what other users sent. A panic in there is a
/// bug that their events reached: it costs those events (logged), not the
/// bot's task with every call it serves. The core is fuzzed
/// (`fuzz/fuzz_targets/signalling.rs`); this is the second line.
fn contained(what: &str, f: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        tracing::error!(what, "the signalling core panicked on this input; dropped it");
    }
}

#[cfg(test)]
mod tests {
    use super::own_stream_labels;

    #[test]
    fn streams_our_sdp_sends_are_labelled_as_the_bots() {
        let sdp = "v=0\r\na=msid-semantic: WMS\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\na=msid:mix t1\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=msid:mix t2\r\na=sendonly\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=recvonly\r\na=msid:theirs t3\r\n";
        let labels = own_stream_labels(sdp, "@conference:hs");
        assert_eq!(labels.keys().collect::<Vec<_>>(), ["mix"]);
        assert_eq!(labels["mix"].purpose, "m.usermedia");
        assert_eq!(labels["mix"].extra["user_id"], "@conference:hs");
        assert!(own_stream_labels("v=0\r\nm=audio 9 RTP/AVP 0\r\na=recvonly\r\n", "@b:hs").is_empty());
    }

    #[test]
    fn a_panic_in_the_signalling_core_is_contained() {
        let mut after = false;
        super::contained("a test", || panic!("a bug in the core"));
        super::contained("a test", || after = true);
        assert!(after, "the bot goes on");
    }
}
