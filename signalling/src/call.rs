//! The bot's calls as **callee**: call protocol v1 (and v0) state machines,
//! sans-IO.
//!
//! Inputs are `handle_*(now, …)`: room events (parsed [`CallEvent`]s with their
//! room, sender and age), what the media side reports (the SFU's answer, a
//! renegotiation answer, connected, closed) and timeouts. Outputs are
//! [`Action`]s from [`Signalling::poll_action`]: events to send, media sessions to
//! open, update or close. Each call moves through
//!
//! ```text
//! invite ──> AwaitingMedia ──(SFU answer)──> Answered ──(ICE+DTLS)──> Connected ──> Ended
//!                │ lifetime passes / hangup / answered elsewhere ──────────────────────┘
//! ```
//!
//! Rules (spec §"Voice over IP", `matrix-voip.md` §2): an invite is taken only
//! if it is live (`age` < `lifetime`), addressed to us (or to nobody), not our
//! own echo, and its `call_id` is new; a sync batch that also holds the call's
//! hangup or answer never rings. Only the caller's (user, party) may hang up,
//! select, renegotiate or change metadata; a `select_answer` naming another party
//! or an answer from another device of ours ends the call silently. Ended calls
//! are remembered so late events are ignored. The bot is the polite side.

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
    /// The invite's lifetime passed before we answered.
    InviteExpired,
    /// The media session could not be set up.
    MediaFailed,
    /// ICE never connected, or connectivity was lost.
    Ice(HangupReason),
    /// We hung up.
    Local(HangupReason),
    /// The caller left the room.
    PeerLeft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// Waiting for the media session's answer.
    AwaitingMedia,
    /// Answer sent; waiting for ICE/DTLS (and, from v1 callers, `select_answer`).
    Answered,
    Connected,
}

#[derive(Debug)]
struct Call {
    room_id: String,
    caller: String,
    caller_party: Option<String>,
    version: Version,
    state: CallState,
    /// While awaiting media: when the invite stops being valid.
    expires: Option<Instant>,
    /// Our renegotiation offer waiting for its answer, and when it lapses.
    negotiating: Option<Instant>,
    was_connected: bool,
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
        let from_caller = sender == call.caller
            && (call.version == Version::V0 || header.party_id.is_none() || header.party_id == call.caller_party);
        match event {
            CallEvent::Hangup { reason, .. } if from_caller => {
                self.end(&header.call_id, EndReason::Hangup(reason), None);
            }
            CallEvent::SelectAnswer { selected_party_id, .. } if from_caller && selected_party_id != self.party_id => {
                self.end(&header.call_id, EndReason::AnsweredElsewhere, None);
            }
            // Another device of ours answered. (A version-0 answer carries no
            // party id: once we have answered, it is our own echo.)
            CallEvent::Answer { .. }
                if sender == self.user_id && (header.party_id.is_some() || call.state == CallState::AwaitingMedia) =>
            {
                self.end(&header.call_id, EndReason::AnsweredElsewhere, None);
            }
            CallEvent::Negotiate { description, .. } if from_caller && call.version == Version::V1 => {
                match description.kind {
                    SdpType::Offer => {
                        // We are the polite side: an offer of the caller wins over ours.
                        call.negotiating = None;
                        self.actions.push_back(Action::MediaOffer {
                            call_id: header.call_id,
                            offer: description.sdp,
                        });
                    }
                    SdpType::Answer if call.negotiating.is_some() => {
                        call.negotiating = None;
                        self.actions.push_back(Action::MediaAnswer {
                            call_id: header.call_id,
                            answer: description.sdp,
                        });
                    }
                    SdpType::Answer => {}
                }
            }
            CallEvent::MetadataChanged { metadata, .. } if from_caller => {
                self.actions.push_back(Action::PeerMetadata {
                    call_id: header.call_id,
                    metadata,
                });
            }
            // Candidates: our SFU is ICE-lite and learns the caller's addresses
            // from its connectivity checks, so trickled candidates need no action.
            _ => {}
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
        // `lifetime` comes from the caller: cap it, so no value can overflow the clock.
        let expires = now + Duration::from_millis(lifetime - age).min(MAX_INVITE_LIFETIME);
        self.calls.insert(
            header.call_id.clone(),
            Call {
                room_id: room_id.clone(),
                caller: sender.clone(),
                caller_party: header.party_id.clone(),
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

    /// The media session could not be opened: reject (v1) or hang up (v0).
    pub fn handle_media_failed(&mut self, _now: Instant, call_id: &str) {
        let Some(call) = self.calls.get(call_id) else { return };
        let header = Self::header_for(call_id, call.version, &self.party_id);
        let event = match call.version {
            Version::V1 if call.state == CallState::AwaitingMedia => CallEvent::Reject { header },
            _ => CallEvent::Hangup {
                header,
                reason: HangupReason::UserMediaFailed,
            },
        };
        let room_id = call.room_id.clone();
        self.end(call_id, EndReason::MediaFailed, Some((room_id, event)));
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
        if call.version != Version::V1 || call.state == CallState::AwaitingMedia {
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
        if call.version != Version::V1 || call.state == CallState::AwaitingMedia {
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
            .filter(|(_, c)| c.room_id == room_id && c.caller == user_id)
            .map(|(id, _)| id.clone())
            .collect();
        for call_id in gone {
            self.end(&call_id, EndReason::PeerLeft, None);
        }
    }

    /// Invites not answered within their lifetime end; renegotiations whose
    /// offer lapsed are dropped (the SFU will ask again).
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| c.expires.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for call_id in expired {
            self.end(&call_id, EndReason::InviteExpired, None);
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
