//! The bot's calls, as **callee** and as **caller**: call protocol v1 (and v0)
//! state machines, sans-IO.
//!
//! Inputs are `handle_*(now, …)`: room events (parsed [`CallEvent`]s with their
//! room, sender and age), what the media side reports (the SFU's answer or
//! offer, a renegotiation answer, connected, closed), timeouts, and the bot's
//! own decisions ([`Signalling::place_call`], [`Signalling::hangup`]). Outputs are
//! [`Action`]s from [`Signalling::poll_action`]: events to send, media sessions to
//! open, update or close. A call moves through
//!
//! ```text
//! callee: invite ──> AwaitingMedia ──(SFU answer)──> Answered ──(ICE+DTLS)──> Connected ──> Ended
//! caller: place_call ──> Preparing ──(SFU offer)──> InviteSent ──(answer)──> Answered ──> …
//! ```
//!
//! Rules (spec §"Voice over IP", `matrix-voip.md` §2): an invite is taken only
//! if it is live (`age` < `lifetime`), addressed to us (or to nobody), not our
//! own echo, and its `call_id` is new; a sync batch that also holds the call's
//! hangup or answer never rings. Only the peer's (user, party) may hang up,
//! select, renegotiate or change metadata; a `select_answer` naming another party
//! or an answer from another device of ours ends the call silently. As caller
//! the first answer or reject wins and is selected. Glare (both sides call in
//! one room): the smaller `call_id` survives, the other is hung up as
//! `replaced`. Ended calls are remembered so late events are ignored. The bot
//! is the polite side as callee, the impolite one as caller.

use crate::events::{
    CallEvent, CallHeader, Candidate, HangupReason, SdpStreamMetadata, SdpType, SessionDescription, Version,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How many ended call ids are remembered (oldest forgotten first).
const ENDED_MEMORY: usize = 10_000;
/// Longest an invite is taken to stay valid, whatever `lifetime` it claims.
pub const MAX_INVITE_LIFETIME: Duration = Duration::from_secs(3600);
/// Lifetime of our renegotiation offers.
pub const NEGOTIATE_LIFETIME: Duration = Duration::from_secs(10);
/// Lifetime of our invites (the spec asks for at least 90 s), and how long
/// preparing one may take.
pub const INVITE_LIFETIME: Duration = Duration::from_secs(90);

/// A room event as the driver hands it over.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub room_id: String,
    pub sender: String,
    /// `unsigned.age` in milliseconds, when the server sent it.
    pub age_ms: Option<u64>,
    pub event: CallEvent,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open a media session for the call from the caller's offer, then report
    /// the answer with [`Signalling::handle_media_answer`] (or a failure).
    OpenMedia {
        call_id: String,
        room_id: String,
        caller: String,
        /// The caller's party id (matrix-js-sdk uses its device id); absent for v0.
        caller_party: Option<String>,
        /// Whether the caller can renegotiate (version 1); a version-0 caller
        /// can only take streams on the m-lines of its own offer.
        renegotiates: bool,
        offer: String,
        metadata: Option<SdpStreamMetadata>,
    },
    /// The caller renegotiates: apply its offer to the media session and report
    /// the answer with [`Signalling::handle_media_renegotiated`].
    MediaOffer { call_id: String, offer: String },
    /// The caller answered our renegotiation offer: apply it to the media session.
    MediaAnswer { call_id: String, answer: String },
    /// The caller's streams changed (mute, purpose) without SDP.
    PeerMetadata {
        call_id: String,
        metadata: SdpStreamMetadata,
    },
    /// We call someone: open a media session that makes the offer, then report
    /// it with [`Signalling::handle_media_offer`] (or a failure).
    CreateOffer {
        call_id: String,
        room_id: String,
        callee: String,
    },
    /// The callee answered our invite: apply its answer to the media session.
    PeerAnswer {
        call_id: String,
        answer: String,
        /// The answering device's party id; absent for v0.
        callee_party: Option<String>,
        /// Whether the callee can renegotiate (it answered with version 1).
        renegotiates: bool,
        metadata: Option<SdpStreamMetadata>,
    },
    /// End the media session of a call.
    CloseMedia { call_id: String },
    /// Send a call event into a room.
    Send { room_id: String, event: CallEvent },
}

/// Why a call ended, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The caller hung up (with this reason).
    Hangup(HangupReason),
    /// Another device answered, or the caller selected another answer.
    AnsweredElsewhere,
    /// The invite's lifetime passed before it was answered.
    InviteExpired,
    /// The media session could not be set up.
    MediaFailed,
    /// ICE never connected, or connectivity was lost.
    Ice(HangupReason),
    /// We hung up.
    Local(HangupReason),
    /// The peer left the room.
    PeerLeft,
    /// The callee declined our call.
    Rejected,
    /// Glare: this call gave way to the other side's call.
    Replaced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// Caller: waiting for the media session's offer (nothing sent yet).
    Preparing,
    /// Caller: invite sent, waiting for an answer or a reject.
    InviteSent,
    /// Callee: waiting for the media session's answer.
    AwaitingMedia,
    /// Answer sent (callee) or taken (caller); waiting for ICE/DTLS (and, from
    /// v1 callers, `select_answer`).
    Answered,
    Connected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Callee,
    Caller,
}

#[derive(Debug)]
struct Call {
    room_id: String,
    role: Role,
    /// The other side: the caller, or the callee we invited.
    peer: String,
    /// The peer's party id (matrix-js-sdk uses its device id): the caller's
    /// from its invite, the callee's from the answer we selected.
    peer_party: Option<String>,
    version: Version,
    state: CallState,
    /// Until answered: when the invite stops being valid.
    expires: Option<Instant>,
    /// Our renegotiation offer waiting for its answer, and when it lapses.
    negotiating: Option<Instant>,
    was_connected: bool,
}

impl Call {
    /// Whether the peer takes `m.call.negotiate` (and metadata changes): a v1
    /// call past its answer.
    fn renegotiates(&self) -> bool {
        self.version == Version::V1
            && self.peer_party.is_some()
            && matches!(self.state, CallState::Answered | CallState::Connected)
    }
}

/// Every call of one bot user and device.
#[derive(Debug)]
pub struct Signalling {
    user_id: String,
    party_id: String,
    calls: HashMap<String, Call>,
    ended: HashSet<String>,
    ended_order: VecDeque<String>,
    actions: VecDeque<Action>,
    ended_log: VecDeque<(String, EndReason)>,
}

impl Signalling {
    /// The signalling of `user_id`, whose device uses `party_id` in every call.
    pub fn new(user_id: impl Into<String>, party_id: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            party_id: party_id.into(),
            calls: HashMap::new(),
            ended: HashSet::new(),
            ended_order: VecDeque::new(),
            actions: VecDeque::new(),
            ended_log: VecDeque::new(),
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Calls that ended since the last call, and why.
    pub fn poll_ended(&mut self) -> Option<(String, EndReason)> {
        self.ended_log.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.calls
            .values()
            .filter_map(|c| match (c.expires, c.negotiating) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            })
            .min()
    }

    pub fn state(&self, call_id: &str) -> Option<CallState> {
        self.calls.get(call_id).map(|c| c.state)
    }

    pub fn is_ended(&self, call_id: &str) -> bool {
        self.ended.contains(call_id)
    }

    /// Handles one sync batch of call events, in order. Invites whose call is
    /// also answered or hung up within the batch are never taken.
    pub fn handle_batch(&mut self, now: Instant, batch: Vec<Incoming>) {
        let settled: HashSet<String> = batch
            .iter()
            .filter(|i| {
                matches!(
                    i.event,
                    CallEvent::Hangup { .. } | CallEvent::Answer { .. } | CallEvent::Reject { .. }
                )
            })
            .map(|i| i.event.header().call_id.clone())
            .collect();
        for incoming in batch {
            let call_id = &incoming.event.header().call_id;
            if matches!(incoming.event, CallEvent::Invite { .. }) && settled.contains(call_id) {
                self.remember_ended(call_id.clone());
                continue;
            }
            self.handle_event(now, incoming);
        }
    }

    /// Handles one call event.
    pub fn handle_event(&mut self, now: Instant, incoming: Incoming) {
        let Incoming {
            room_id,
            sender,
            age_ms,
            event,
        } = incoming;
        let header = event.header().clone();
        let own_echo = sender == self.user_id && header.party_id.as_deref() == Some(self.party_id.as_str());
        if own_echo || self.ended.contains(&header.call_id) {
            return;
        }
        if let CallEvent::Invite {
            offer,
            lifetime,
            invitee,
            metadata,
            ..
        } = event
        {
            return self.on_invite(now, room_id, sender, header, offer, lifetime, invitee, metadata, age_ms);
        }
        let Some(call) = self.calls.get_mut(&header.call_id) else {
            return; // candidates or others for a call we never took
        };
        if call.room_id != room_id {
            return;
        }
        let call_id = header.call_id.clone();
        // Before the callee's answer is chosen any of its devices may speak;
        // afterwards only the chosen one (a v0 peer has no party to check).
        let from_peer = sender == call.peer
            && (call.version == Version::V0
                || header.party_id.is_none()
                || call.peer_party.is_none()
                || header.party_id == call.peer_party);
        match event {
            // As caller the first answer wins; later ones are ignored.
            CallEvent::Answer { answer, metadata, .. }
                if call.role == Role::Caller && from_peer && call.state == CallState::InviteSent =>
            {
                self.on_answer(&call_id, header, answer.sdp, metadata);
            }
            CallEvent::Reject { .. }
                if call.role == Role::Caller && from_peer && call.state == CallState::InviteSent =>
            {
                let select = header
                    .party_id
                    .clone()
                    .map(|selected_party_id| CallEvent::SelectAnswer {
                        header: Self::header_for(&call_id, Version::V1, &self.party_id),
                        selected_party_id,
                    });
                let room_id = call.room_id.clone();
                self.end(&call_id, EndReason::Rejected, select.map(|e| (room_id, e)));
            }
            CallEvent::Hangup { reason, .. } if from_peer => {
                self.end(&call_id, EndReason::Hangup(reason), None);
            }
            CallEvent::SelectAnswer { selected_party_id, .. }
                if call.role == Role::Callee && from_peer && selected_party_id != self.party_id =>
            {
                self.end(&call_id, EndReason::AnsweredElsewhere, None);
            }
            // Another device of ours answered. (A version-0 answer carries no
            // party id: once we have answered, it is our own echo.)
            CallEvent::Answer { .. }
                if call.role == Role::Callee
                    && sender == self.user_id
                    && (header.party_id.is_some() || call.state == CallState::AwaitingMedia) =>
            {
                self.end(&call_id, EndReason::AnsweredElsewhere, None);
            }
            CallEvent::Negotiate {
                description, metadata, ..
            } if from_peer && call.version == Version::V1 && call.peer_party.is_some() => {
                // What its streams are (a screen share it adds comes with this
                // renegotiation), known before the media change is acted on.
                if let Some(metadata) = metadata {
                    self.actions.push_back(Action::PeerMetadata {
                        call_id: call_id.clone(),
                        metadata,
                    });
                }
                match description.kind {
                    // As callee we are polite: the peer's offer wins over ours.
                    // As caller we are impolite: while our offer is out, theirs
                    // is ignored (they roll back and answer ours).
                    SdpType::Offer if call.role == Role::Caller && call.negotiating.is_some() => {}
                    SdpType::Offer => {
                        call.negotiating = None;
                        self.actions.push_back(Action::MediaOffer {
                            call_id,
                            offer: description.sdp,
                        });
                    }
                    SdpType::Answer if call.negotiating.is_some() => {
                        call.negotiating = None;
                        self.actions.push_back(Action::MediaAnswer {
                            call_id,
                            answer: description.sdp,
                        });
                    }
                    SdpType::Answer => {}
                }
            }
            CallEvent::MetadataChanged { metadata, .. } if from_peer => {
                self.actions.push_back(Action::PeerMetadata { call_id, metadata });
            }
            // Candidates: our SFU is ICE-lite and learns the peer's addresses
            // from its connectivity checks, so trickled candidates need no action.
            _ => {}
        }
    }

    /// The callee answered our invite: take the answer and select it.
    fn on_answer(&mut self, call_id: &str, header: CallHeader, answer: String, metadata: Option<SdpStreamMetadata>) {
        let Some(call) = self.calls.get_mut(call_id) else {
            return;
        };
        call.state = CallState::Answered;
        call.expires = None;
        call.version = header.version;
        call.peer_party = header.party_id.clone();
        let renegotiates = header.version == Version::V1 && header.party_id.is_some();
        let room_id = call.room_id.clone();
        self.actions.push_back(Action::PeerAnswer {
            call_id: call_id.to_string(),
            answer,
            callee_party: header.party_id.clone(),
            renegotiates,
            metadata,
        });
        // A v0 answer has no party to select.
        if let Some(selected_party_id) = header.party_id {
            self.actions.push_back(Action::Send {
                room_id,
                event: CallEvent::SelectAnswer {
                    header: Self::header_for(call_id, Version::V1, &self.party_id),
                    selected_party_id,
                },
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_invite(
        &mut self,
        now: Instant,
        room_id: String,
        sender: String,
        header: CallHeader,
        offer: SessionDescription,
        lifetime: u64,
        invitee: Option<String>,
        metadata: Option<SdpStreamMetadata>,
        age_ms: Option<u64>,
    ) {
        if invitee.as_ref().is_some_and(|i| *i != self.user_id) || sender == self.user_id {
            return;
        }
        if self.calls.contains_key(&header.call_id) {
            return; // a reused call_id
        }
        let age = age_ms.unwrap_or(0);
        if age >= lifetime {
            self.remember_ended(header.call_id.clone());
            return;
        }
        if !self.resolve_glare(&room_id, &sender, &header) {
            return;
        }
        // `lifetime` comes from the caller: cap it, so no value can overflow the clock.
        let expires = now + Duration::from_millis(lifetime - age).min(MAX_INVITE_LIFETIME);
        self.calls.insert(
            header.call_id.clone(),
            Call {
                room_id: room_id.clone(),
                role: Role::Callee,
                peer: sender.clone(),
                peer_party: header.party_id.clone(),
                version: header.version,
                state: CallState::AwaitingMedia,
                expires: Some(expires),
                negotiating: None,
                was_connected: false,
            },
        );
        self.actions.push_back(Action::OpenMedia {
            call_id: header.call_id,
            room_id,
            caller: sender,
            caller_party: header.party_id,
            renegotiates: header.version == Version::V1,
            offer: offer.sdp,
            metadata,
        });
    }

    /// An invite arrives in a room where we are calling its sender: glare. A
    /// call of ours still being prepared gives way; one already sent survives
    /// if its `call_id` is the smaller. Returns whether to take the invite.
    fn resolve_glare(&mut self, room_id: &str, sender: &str, theirs: &CallHeader) -> bool {
        let ours = self.calls.iter().find(|(_, c)| {
            c.role == Role::Caller
                && c.room_id == room_id
                && c.peer == sender
                && matches!(c.state, CallState::Preparing | CallState::InviteSent)
        });
        let Some((our_id, ours)) = ours else { return true };
        let our_id = our_id.clone();
        if ours.state == CallState::Preparing {
            self.end(&our_id, EndReason::Replaced, None);
            return true;
        }
        let room_id = room_id.to_string();
        if theirs.call_id < our_id {
            let hangup = CallEvent::Hangup {
                header: Self::header_for(&our_id, Version::V1, &self.party_id),
                reason: HangupReason::Replaced,
            };
            self.end(&our_id, EndReason::Replaced, Some((room_id, hangup)));
            true
        } else {
            let hangup = CallEvent::Hangup {
                header: Self::header_for(&theirs.call_id, theirs.version, &self.party_id),
                reason: HangupReason::Replaced,
            };
            self.actions.push_back(Action::Send { room_id, event: hangup });
            self.remember_ended(theirs.call_id.clone());
            false
        }
    }

    /// We call `callee` in `room_id` (as call `call_id`, which the driver makes
    /// unique): the media side is asked for an offer first.
    pub fn place_call(&mut self, now: Instant, call_id: &str, room_id: &str, callee: &str) {
        if self.calls.contains_key(call_id) || self.ended.contains(call_id) {
            return;
        }
        self.calls.insert(
            call_id.to_string(),
            Call {
                room_id: room_id.to_string(),
                role: Role::Caller,
                peer: callee.to_string(),
                peer_party: None,
                version: Version::V1,
                state: CallState::Preparing,
                expires: Some(now + INVITE_LIFETIME),
                negotiating: None,
                was_connected: false,
            },
        );
        self.actions.push_back(Action::CreateOffer {
            call_id: call_id.to_string(),
            room_id: room_id.to_string(),
            callee: callee.to_string(),
        });
    }

    /// The media session made our offer: send the invite (our candidates are
    /// in the SDP, so the end-of-candidates marker follows at once).
    pub fn handle_media_offer(&mut self, now: Instant, call_id: &str, offer: String, metadata: SdpStreamMetadata) {
        let party_id = self.party_id.clone();
        let Some(call) = self.calls.get_mut(call_id) else {
            return;
        };
        if call.state != CallState::Preparing {
            return;
        }
        call.state = CallState::InviteSent;
        call.expires = Some(now + INVITE_LIFETIME);
        let header = Self::header_for(call_id, Version::V1, &party_id);
        let room_id = call.room_id.clone();
        self.actions.push_back(Action::Send {
            room_id: room_id.clone(),
            event: CallEvent::Invite {
                header: header.clone(),
                offer: SessionDescription {
                    kind: SdpType::Offer,
                    sdp: offer,
                },
                lifetime: INVITE_LIFETIME.as_millis() as u64,
                invitee: Some(call.peer.clone()),
                metadata: Some(metadata),
            },
        });
        self.actions.push_back(Action::Send {
            room_id,
            event: CallEvent::Candidates {
                header,
                candidates: vec![Candidate::end()],
            },
        });
    }

    /// The media session answered the caller's offer: send `m.call.answer`
    /// (with our stream labels) and end our candidates (ours are in the SDP).
    pub fn handle_media_answer(&mut self, _now: Instant, call_id: &str, answer: String, metadata: SdpStreamMetadata) {
        let party_id = self.party_id.clone();
        let Some(call) = self.calls.get_mut(call_id) else {
            return;
        };
        if call.state != CallState::AwaitingMedia {
            return;
        }
        call.state = CallState::Answered;
        call.expires = None;
        let header = Self::header_for(call_id, call.version, &party_id);
        let room_id = call.room_id.clone();
        let v1 = call.version == Version::V1;
        self.actions.push_back(Action::Send {
            room_id: room_id.clone(),
            event: CallEvent::Answer {
                header: header.clone(),
                answer: SessionDescription {
                    kind: SdpType::Answer,
                    sdp: answer,
                },
                metadata: v1.then_some(metadata),
            },
        });
        self.actions.push_back(Action::Send {
            room_id,
            event: CallEvent::Candidates {
                header,
                candidates: vec![Candidate::end()],
            },
        });
    }

    /// The media session could not be opened: reject (v1) or hang up (v0); a
    /// call we were placing ends before anything was sent.
    pub fn handle_media_failed(&mut self, _now: Instant, call_id: &str) {
        let Some(call) = self.calls.get(call_id) else { return };
        let header = Self::header_for(call_id, call.version, &self.party_id);
        let event = match (call.state, call.version) {
            (CallState::Preparing, _) => None, // nothing was sent
            (CallState::AwaitingMedia, Version::V1) => Some(CallEvent::Reject { header }),
            _ => Some(CallEvent::Hangup {
                header,
                reason: HangupReason::UserMediaFailed,
            }),
        };
        let room_id = call.room_id.clone();
        self.end(call_id, EndReason::MediaFailed, event.map(|e| (room_id, e)));
    }

    /// ICE and DTLS are up.
    pub fn handle_media_connected(&mut self, _now: Instant, call_id: &str) {
        if let Some(call) = self.calls.get_mut(call_id) {
            call.state = CallState::Connected;
            call.was_connected = true;
        }
    }

    /// The media session ended by itself (ICE never completed, or was lost).
    pub fn handle_media_closed(&mut self, _now: Instant, call_id: &str) {
        let Some(call) = self.calls.get(call_id) else { return };
        let reason = if call.was_connected {
            HangupReason::IceTimeout
        } else {
            HangupReason::IceFailed
        };
        let room_id = call.room_id.clone();
        let header = Self::header_for(call_id, call.version, &self.party_id);
        let hangup = CallEvent::Hangup {
            header,
            reason: reason.clone(),
        };
        self.end(call_id, EndReason::Ice(reason), Some((room_id, hangup)));
    }

    /// We have new streams for the caller: send our offer as `m.call.negotiate`
    /// (v1 callers only; returns false for v0, which cannot renegotiate).
    pub fn renegotiate(&mut self, now: Instant, call_id: &str, offer: String, metadata: SdpStreamMetadata) -> bool {
        let party_id = self.party_id.clone();
        let Some(call) = self.calls.get_mut(call_id) else {
            return false;
        };
        if !call.renegotiates() {
            return false;
        }
        call.negotiating = Some(now + NEGOTIATE_LIFETIME);
        let room_id = call.room_id.clone();
        let header = Self::header_for(call_id, call.version, &party_id);
        self.actions.push_back(Action::Send {
            room_id,
            event: CallEvent::Negotiate {
                header,
                description: SessionDescription {
                    kind: SdpType::Offer,
                    sdp: offer,
                },
                lifetime: Some(NEGOTIATE_LIFETIME.as_millis() as u64),
                metadata: Some(metadata),
            },
        });
        true
    }

    /// Tells a (v1) caller that streams it receives changed without new SDP
    /// (another participant muted or unmuted). Returns false for v0 callers.
    pub fn send_metadata(&mut self, _now: Instant, call_id: &str, metadata: SdpStreamMetadata) -> bool {
        let Some(call) = self.calls.get(call_id) else {
            return false;
        };
        if !call.renegotiates() {
            return false;
        }
        let header = Self::header_for(call_id, call.version, &self.party_id);
        let room_id = call.room_id.clone();
        self.actions.push_back(Action::Send {
            room_id,
            event: CallEvent::MetadataChanged { header, metadata },
        });
        true
    }

    /// The media session answered the caller's renegotiation offer.
    pub fn handle_media_renegotiated(
        &mut self,
        _now: Instant,
        call_id: &str,
        answer: String,
        metadata: SdpStreamMetadata,
    ) {
        let Some(call) = self.calls.get(call_id) else { return };
        let room_id = call.room_id.clone();
        let header = Self::header_for(call_id, call.version, &self.party_id);
        self.actions.push_back(Action::Send {
            room_id,
            event: CallEvent::Negotiate {
                header,
                description: SessionDescription {
                    kind: SdpType::Answer,
                    sdp: answer,
                },
                lifetime: None,
                metadata: Some(metadata),
            },
        });
    }

    /// We hang up a call.
    pub fn hangup(&mut self, _now: Instant, call_id: &str, reason: HangupReason) {
        let Some(call) = self.calls.get(call_id) else { return };
        let room_id = call.room_id.clone();
        let header = Self::header_for(call_id, call.version, &self.party_id);
        let hangup = CallEvent::Hangup {
            header,
            reason: reason.clone(),
        };
        self.end(call_id, EndReason::Local(reason), Some((room_id, hangup)));
    }

    /// A member left a room: their calls there end.
    pub fn handle_member_left(&mut self, _now: Instant, room_id: &str, user_id: &str) {
        let gone: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| c.room_id == room_id && c.peer == user_id)
            .map(|(id, _)| id.clone())
            .collect();
        for call_id in gone {
            self.end(&call_id, EndReason::PeerLeft, None);
        }
    }

    /// Invites not answered within their lifetime end (ours with a hangup,
    /// `invite_timeout`); renegotiations whose offer lapsed are dropped (the
    /// SFU will ask again).
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| c.expires.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for call_id in expired {
            let Some(call) = self.calls.get(&call_id) else { continue };
            let hangup = (call.state == CallState::InviteSent).then(|| {
                let header = Self::header_for(&call_id, Version::V1, &self.party_id);
                let event = CallEvent::Hangup {
                    header,
                    reason: HangupReason::InviteTimeout,
                };
                (call.room_id.clone(), event)
            });
            self.end(&call_id, EndReason::InviteExpired, hangup);
        }
        for call in self.calls.values_mut() {
            if call.negotiating.is_some_and(|t| t <= now) {
                call.negotiating = None;
            }
        }
    }

    fn header_for(call_id: &str, version: Version, party_id: &str) -> CallHeader {
        CallHeader {
            call_id: call_id.to_string(),
            party_id: (version == Version::V1).then(|| party_id.to_string()),
            version,
        }
    }

    fn end(&mut self, call_id: &str, reason: EndReason, send: Option<(String, CallEvent)>) {
        if self.calls.remove(call_id).is_none() {
            return;
        }
        if let Some((room_id, event)) = send {
            self.actions.push_back(Action::Send { room_id, event });
        }
        self.actions.push_back(Action::CloseMedia {
            call_id: call_id.to_string(),
        });
        self.ended_log.push_back((call_id.to_string(), reason));
        self.remember_ended(call_id.to_string());
    }

    fn remember_ended(&mut self, call_id: String) {
        if self.ended.insert(call_id.clone()) {
            self.ended_order.push_back(call_id);
            while self.ended_order.len() > ENDED_MEMORY {
                if let Some(old) = self.ended_order.pop_front() {
                    self.ended.remove(&old);
                }
            }
        }
    }
}
