//! `m.call.*` event contents (<https://spec.matrix.org/v1.13/client-server-api/#voice-over-ip>):
//! parsed once, at the edge, into typed values; built for sending.
//!
//! Why not ruma's types: they reject the integer `version: 1` the spec says to
//! treat as `"1"`, and drop the unstable `org.matrix.msc3077.sdp_stream_metadata`
//! key older clients use. Unknown fields are ignored here, as the spec asks.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Largest SDP accepted in an event.
pub const MAX_SDP_BYTES: usize = 64 * 1024;
/// Most candidates accepted in one `m.call.candidates`.
pub const MAX_CANDIDATES: usize = 200;
const UNSTABLE_METADATA_KEY: &str = "org.matrix.msc3077.sdp_stream_metadata";

/// The call protocol version of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Integer `0`: no `party_id`, no `select_answer`, `reject` or `negotiate`.
    V0,
    /// `"1"` — and anything else, including integer `1` (spec: treat as `"1"`).
    V1,
}

impl Version {
    fn from_json(value: Option<&Value>) -> Self {
        match value {
            Some(Value::Number(n)) if n.as_u64() == Some(0) => Version::V0,
            Some(Value::String(s)) if s == "0" => Version::V0,
            _ => Version::V1,
        }
    }
}

/// Why an event is not a usable call event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a call event type: {0}")]
    NotACallEvent(String),
    #[error("content is not a JSON object")]
    NotAnObject,
    #[error("missing or invalid field `{0}`")]
    Field(&'static str),
    #[error("`{0}` is not a valid id (1-255 characters of [0-9A-Za-z._~-])")]
    BadId(&'static str),
    #[error("the SDP is larger than {MAX_SDP_BYTES} bytes")]
    SdpTooLarge,
    #[error("more than {MAX_CANDIDATES} candidates")]
    TooManyCandidates,
}

/// A call or party id: 1–255 characters of `[0-9A-Za-z._~-]`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=255).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
}

/// An SDP offer or answer (`RTCSessionDescriptionInit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDescription {
    #[serde(rename = "type")]
    pub kind: SdpType,
    pub sdp: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SdpType {
    Offer,
    Answer,
}

/// One entry of `sdp_stream_metadata`, keyed by msid stream id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamMetadata {
    /// `m.usermedia` or `m.screenshare` (others are ignored by clients).
    pub purpose: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audio_muted: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub video_muted: bool,
    /// Fields clients ignore; the bot labels streams with `user_id` and `device_id` here.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

pub type SdpStreamMetadata = BTreeMap<String, StreamMetadata>;

/// One ICE candidate (`RTCIceCandidateInit`); an empty `candidate` ends the list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub candidate: String,
    #[serde(rename = "sdpMid", default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex", default, skip_serializing_if = "Option::is_none")]
    pub sdp_m_line_index: Option<u32>,
}

impl Candidate {
    /// The end-of-candidates marker.
    pub fn end() -> Self {
        Self {
            candidate: String::new(),
            sdp_mid: None,
            sdp_m_line_index: None,
        }
    }

    pub fn is_end(&self) -> bool {
        self.candidate.trim().is_empty()
    }
}

/// Why a call was hung up; unknown reasons (e.g. js-sdk's `replaced`) are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HangupReason {
    IceFailed,
    IceTimeout,
    InviteTimeout,
    UserHangup,
    UserMediaFailed,
    UserBusy,
    UnknownError,
    /// Glare: the call gave way to the other side's (matrix-js-sdk's reason).
    Replaced,
    Other(String),
}

impl HangupReason {
    pub fn parse(s: &str) -> Self {
        match s {
            "ice_failed" => Self::IceFailed,
            "ice_timeout" => Self::IceTimeout,
            "invite_timeout" => Self::InviteTimeout,
            "user_hangup" => Self::UserHangup,
            "user_media_failed" => Self::UserMediaFailed,
            "user_busy" => Self::UserBusy,
            "unknown_error" => Self::UnknownError,
            "replaced" => Self::Replaced,
            other => Self::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::IceFailed => "ice_failed",
            Self::IceTimeout => "ice_timeout",
            Self::InviteTimeout => "invite_timeout",
            Self::UserHangup => "user_hangup",
            Self::UserMediaFailed => "user_media_failed",
            Self::UserBusy => "user_busy",
            Self::UnknownError => "unknown_error",
            Self::Replaced => "replaced",
            Self::Other(other) => other,
        }
    }
}

/// What every call event carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallHeader {
    pub call_id: String,
    /// Absent for version 0.
    pub party_id: Option<String>,
    pub version: Version,
}

/// A parsed call event.
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    Invite {
        header: CallHeader,
        offer: SessionDescription,
        /// Milliseconds the invite stays valid after it was sent.
        lifetime: u64,
        invitee: Option<String>,
        metadata: Option<SdpStreamMetadata>,
    },
    Candidates {
        header: CallHeader,
        candidates: Vec<Candidate>,
    },
    Answer {
        header: CallHeader,
        answer: SessionDescription,
        metadata: Option<SdpStreamMetadata>,
    },
    SelectAnswer {
        header: CallHeader,
        selected_party_id: String,
    },
    Reject {
        header: CallHeader,
    },
    Negotiate {
        header: CallHeader,
        description: SessionDescription,
        lifetime: Option<u64>,
        metadata: Option<SdpStreamMetadata>,
    },
    MetadataChanged {
        header: CallHeader,
        metadata: SdpStreamMetadata,
    },
    Hangup {
        header: CallHeader,
        reason: HangupReason,
    },
}

impl CallEvent {
    pub fn header(&self) -> &CallHeader {
        match self {
            Self::Invite { header, .. }
            | Self::Candidates { header, .. }
            | Self::Answer { header, .. }
            | Self::SelectAnswer { header, .. }
            | Self::Reject { header }
            | Self::Negotiate { header, .. }
            | Self::MetadataChanged { header, .. }
            | Self::Hangup { header, .. } => header,
        }
    }

    /// The event type this event is sent as.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::Invite { .. } => "m.call.invite",
            Self::Candidates { .. } => "m.call.candidates",
            Self::Answer { .. } => "m.call.answer",
            Self::SelectAnswer { .. } => "m.call.select_answer",
            Self::Reject { .. } => "m.call.reject",
            Self::Negotiate { .. } => "m.call.negotiate",
            Self::MetadataChanged { .. } => "m.call.sdp_stream_metadata_changed",
            Self::Hangup { .. } => "m.call.hangup",
        }
    }

    /// Parses the content of a room (or to-device) event of type `event_type`.
    pub fn parse(event_type: &str, content: &Value) -> Result<Self, ParseError> {
        let object = content.as_object().ok_or(ParseError::NotAnObject)?;
        let header = header(object)?;
        Ok(match event_type {
            "m.call.invite" => CallEvent::Invite {
                offer: description(object, "offer")?,
                lifetime: object
                    .get("lifetime")
                    .and_then(Value::as_u64)
                    .ok_or(ParseError::Field("lifetime"))?,
                invitee: optional_string(object, "invitee")?,
                metadata: metadata(object)?,
                header,
            },
            "m.call.candidates" => {
                let list = object
                    .get("candidates")
                    .and_then(Value::as_array)
                    .ok_or(ParseError::Field("candidates"))?;
                if list.len() > MAX_CANDIDATES {
                    return Err(ParseError::TooManyCandidates);
                }
                let candidates = list
                    .iter()
                    .map(|c| serde_json::from_value(c.clone()).map_err(|_| ParseError::Field("candidates")))
                    .collect::<Result<_, _>>()?;
                CallEvent::Candidates { header, candidates }
            }
            "m.call.answer" => CallEvent::Answer {
                answer: description(object, "answer")?,
                metadata: metadata(object)?,
                header,
            },
            "m.call.select_answer" => CallEvent::SelectAnswer {
                selected_party_id: id_field(object, "selected_party_id")?,
                header,
            },
            "m.call.reject" => CallEvent::Reject { header },
            "m.call.negotiate" => CallEvent::Negotiate {
                description: description(object, "description")?,
                lifetime: object.get("lifetime").and_then(Value::as_u64),
                metadata: metadata(object)?,
                header,
            },
            "m.call.sdp_stream_metadata_changed" | "org.matrix.call.sdp_stream_metadata_changed" => {
                CallEvent::MetadataChanged {
                    metadata: metadata(object)?.ok_or(ParseError::Field("sdp_stream_metadata"))?,
                    header,
                }
            }
            "m.call.hangup" => CallEvent::Hangup {
                // v0 made the reason optional: absent means user_hangup.
                reason: match object.get("reason") {
                    None | Some(Value::Null) => HangupReason::UserHangup,
                    Some(Value::String(s)) => HangupReason::parse(s),
                    Some(_) => return Err(ParseError::Field("reason")),
                },
                header,
            },
            other => return Err(ParseError::NotACallEvent(other.to_string())),
        })
    }

    /// The content to send for this event (version `"1"` for v1, integer `0` for v0).
    pub fn to_content(&self) -> Value {
        let header = self.header();
        let mut content = Map::new();
        content.insert("call_id".into(), header.call_id.clone().into());
        match header.version {
            Version::V0 => content.insert("version".into(), 0.into()),
            Version::V1 => content.insert("version".into(), "1".into()),
        };
        if let Some(party_id) = &header.party_id {
            content.insert("party_id".into(), party_id.clone().into());
        }
        match self {
            Self::Invite {
                offer,
                lifetime,
                invitee,
                metadata,
                ..
            } => {
                content.insert("offer".into(), to_value(offer));
                content.insert("lifetime".into(), (*lifetime).into());
                if let Some(invitee) = invitee {
                    content.insert("invitee".into(), invitee.clone().into());
                }
                insert_metadata(&mut content, metadata.as_ref());
            }
            Self::Candidates { candidates, .. } => {
                content.insert("candidates".into(), to_value(candidates));
            }
            Self::Answer { answer, metadata, .. } => {
                content.insert("answer".into(), to_value(answer));
                insert_metadata(&mut content, metadata.as_ref());
            }
            Self::SelectAnswer { selected_party_id, .. } => {
                content.insert("selected_party_id".into(), selected_party_id.clone().into());
            }
            Self::Reject { .. } => {}
            Self::Negotiate {
                description,
                lifetime,
                metadata,
                ..
            } => {
                content.insert("description".into(), to_value(description));
                if let Some(lifetime) = lifetime {
                    content.insert("lifetime".into(), (*lifetime).into());
                }
                insert_metadata(&mut content, metadata.as_ref());
            }
            Self::MetadataChanged { metadata, .. } => insert_metadata(&mut content, Some(metadata)),
            Self::Hangup { reason, .. } => {
                content.insert("reason".into(), reason.as_str().into());
            }
        }
        Value::Object(content)
    }
}

/// Our own plain data types as JSON (serializing them cannot fail).
fn to_value<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn insert_metadata(content: &mut Map<String, Value>, metadata: Option<&SdpStreamMetadata>) {
    if let Some(metadata) = metadata {
        content.insert("sdp_stream_metadata".into(), to_value(metadata));
    }
}

fn header(object: &Map<String, Value>) -> Result<CallHeader, ParseError> {
    let version = Version::from_json(object.get("version"));
    let call_id = id_field(object, "call_id")?;
    let party_id = match object.get("party_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if is_valid_id(id) => Some(id.clone()),
        Some(_) => return Err(ParseError::BadId("party_id")),
    };
    Ok(CallHeader {
        call_id,
        party_id,
        version,
    })
}

fn id_field(object: &Map<String, Value>, field: &'static str) -> Result<String, ParseError> {
    match object.get(field) {
        Some(Value::String(id)) if is_valid_id(id) => Ok(id.clone()),
        Some(Value::String(_)) => Err(ParseError::BadId(field)),
        _ => Err(ParseError::Field(field)),
    }
}

fn optional_string(object: &Map<String, Value>, field: &'static str) -> Result<Option<String>, ParseError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ParseError::Field(field)),
    }
}

fn description(object: &Map<String, Value>, field: &'static str) -> Result<SessionDescription, ParseError> {
    let value = object.get(field).ok_or(ParseError::Field(field))?;
    let sdp = value
        .get("sdp")
        .and_then(Value::as_str)
        .ok_or(ParseError::Field(field))?;
    if sdp.len() > MAX_SDP_BYTES {
        return Err(ParseError::SdpTooLarge);
    }
    // The spec says not to validate `type` strictly; take it when it is known,
    // else infer it from the field (`offer` / `answer`).
    let kind = match value.get("type").and_then(Value::as_str) {
        Some("answer") => SdpType::Answer,
        Some("offer") => SdpType::Offer,
        _ if field == "answer" => SdpType::Answer,
        _ => SdpType::Offer,
    };
    Ok(SessionDescription {
        kind,
        sdp: sdp.to_string(),
    })
}

/// `sdp_stream_metadata`, or the unstable key when the stable one is absent.
/// Entries that do not parse (no `purpose`) are dropped, as clients do.
fn metadata(object: &Map<String, Value>) -> Result<Option<SdpStreamMetadata>, ParseError> {
    let Some(raw) = object
        .get("sdp_stream_metadata")
        .or_else(|| object.get(UNSTABLE_METADATA_KEY))
    else {
        return Ok(None);
    };
    let map = raw.as_object().ok_or(ParseError::Field("sdp_stream_metadata"))?;
    Ok(Some(
        map.iter()
            .filter_map(|(stream, entry)| {
                serde_json::from_value::<StreamMetadata>(entry.clone())
                    .ok()
                    .map(|m| (stream.clone(), m))
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn invite(version: Value) -> Value {
        json!({
            "version": version, "call_id": "1767225600000aZ3kQp9LmN2xR7tY", "party_id": "ALICEPHONE",
            "lifetime": 90000, "invitee": "@bot:hs",
            "offer": {"type": "offer", "sdp": "v=0\r\n"},
            "sdp_stream_metadata": {"s1": {"purpose": "m.usermedia", "video_muted": true}},
            "capabilities": {"m.call.transferee": false}
        })
    }

    #[test]
    fn versions() {
        for (version, expected) in [
            (json!("1"), Version::V1),
            (json!(1), Version::V1),
            (json!(0), Version::V0),
            (json!("org.example.v2"), Version::V1),
            (Value::Null, Version::V1),
        ] {
            let event = CallEvent::parse("m.call.invite", &invite(version.clone())).expect("parses");
            assert_eq!(event.header().version, expected, "{version}");
        }
    }

    #[test]
    fn invite_fields_and_round_trip() {
        let event = CallEvent::parse("m.call.invite", &invite(json!("1"))).expect("parses");
        let CallEvent::Invite {
            header,
            offer,
            lifetime,
            invitee,
            metadata,
        } = &event
        else {
            panic!("an invite")
        };
        assert_eq!(header.party_id.as_deref(), Some("ALICEPHONE"));
        assert_eq!(
            (offer.kind, *lifetime, invitee.as_deref()),
            (SdpType::Offer, 90000, Some("@bot:hs"))
        );
        assert!(metadata.as_ref().expect("metadata")["s1"].video_muted);
        let again = CallEvent::parse("m.call.invite", &event.to_content()).expect("round trip");
        assert_eq!(again, event);
        assert_eq!(event.to_content()["version"], "1");
    }

    #[test]
    fn unstable_metadata_and_type() {
        let content = json!({"version": "1", "call_id": "c", "party_id": "p",
            "org.matrix.msc3077.sdp_stream_metadata": {"s": {"purpose": "m.screenshare", "user_id": "@a:hs"}, "bad": {}}});
        let event = CallEvent::parse("org.matrix.call.sdp_stream_metadata_changed", &content).expect("parses");
        let CallEvent::MetadataChanged { metadata, .. } = event else {
            panic!("metadata changed")
        };
        assert_eq!(metadata.len(), 1, "entries without a purpose are dropped");
        assert_eq!(metadata["s"].purpose, "m.screenshare");
        assert_eq!(metadata["s"].extra["user_id"], "@a:hs", "extra fields are kept");
    }

    #[test]
    fn v0_hangup_and_candidates() {
        let hangup = CallEvent::parse("m.call.hangup", &json!({"version": 0, "call_id": "c"})).expect("parses");
        assert_eq!(
            hangup,
            CallEvent::Hangup {
                header: CallHeader {
                    call_id: "c".into(),
                    party_id: None,
                    version: Version::V0
                },
                reason: HangupReason::UserHangup,
            }
        );
        assert_eq!(hangup.to_content()["version"], 0);
        let replaced = CallEvent::parse(
            "m.call.hangup",
            &json!({"version": "1", "call_id": "c", "party_id": "p", "reason": "replaced"}),
        )
        .expect("parses");
        assert!(matches!(
            replaced,
            CallEvent::Hangup {
                reason: HangupReason::Replaced,
                ..
            }
        ));
        let unknown = CallEvent::parse(
            "m.call.hangup",
            &json!({"version": "1", "call_id": "c", "party_id": "p", "reason": "out_of_coffee"}),
        )
        .expect("an unknown reason is accepted");
        assert!(
            matches!(unknown, CallEvent::Hangup { reason: HangupReason::Other(ref r), .. } if r == "out_of_coffee")
        );
        let candidates = CallEvent::parse("m.call.candidates", &json!({"version": "1", "call_id": "c", "party_id": "p",
            "candidates": [{"candidate": "candidate:1 1 udp 1 192.0.2.1 4000 typ host", "sdpMid": "0", "sdpMLineIndex": 0,
                            "usernameFragment": "x"}, {"candidate": ""}]})).expect("parses");
        let CallEvent::Candidates { candidates, .. } = candidates else {
            panic!("candidates")
        };
        assert_eq!(candidates.len(), 2);
        assert!(!candidates[0].is_end() && candidates[1].is_end());
        assert_eq!(candidates[0].sdp_m_line_index, Some(0));
    }

    #[test]
    fn bad_input_is_an_error() {
        let cases: Vec<(&str, Value, ParseError)> = vec![
            ("m.call.invite", json!([1]), ParseError::NotAnObject),
            (
                "m.call.invite",
                json!({"version": "1", "party_id": "p"}),
                ParseError::Field("call_id"),
            ),
            (
                "m.call.invite",
                json!({"version": "1", "call_id": "bad id!", "party_id": "p"}),
                ParseError::BadId("call_id"),
            ),
            (
                "m.call.invite",
                json!({"version": "1", "call_id": "c", "party_id": 5}),
                ParseError::BadId("party_id"),
            ),
            (
                "m.call.invite",
                json!({"version": "1", "call_id": "c", "lifetime": 1}),
                ParseError::Field("offer"),
            ),
            (
                "m.call.invite",
                json!({"version": "1", "call_id": "c", "offer": {"sdp": "v=0"}}),
                ParseError::Field("lifetime"),
            ),
            (
                "m.call.invite",
                json!({"version": "1", "call_id": "c", "lifetime": 1, "offer": {"sdp": "x".repeat(MAX_SDP_BYTES + 1)}}),
                ParseError::SdpTooLarge,
            ),
            (
                "m.call.candidates",
                json!({"version": "1", "call_id": "c", "candidates": [{"sdpMid": "0"}]}),
                ParseError::Field("candidates"),
            ),
            (
                "m.call.candidates",
                json!({"version": "1", "call_id": "c", "candidates": vec![json!({"candidate": ""}); MAX_CANDIDATES + 1]}),
                ParseError::TooManyCandidates,
            ),
            (
                "m.call.select_answer",
                json!({"version": "1", "call_id": "c"}),
                ParseError::Field("selected_party_id"),
            ),
            (
                "m.call.hangup",
                json!({"version": "1", "call_id": "c", "reason": 3}),
                ParseError::Field("reason"),
            ),
            (
                "m.room.message",
                json!({"call_id": "c"}),
                ParseError::NotACallEvent("m.room.message".into()),
            ),
            (
                "m.call.invite",
                json!({"version": "1", "call_id": "x".repeat(256)}),
                ParseError::BadId("call_id"),
            ),
        ];
        for (kind, content, expected) in cases {
            assert_eq!(
                CallEvent::parse(kind, &content),
                Err(expected.clone()),
                "{kind} {content}"
            );
        }
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("1767225600000aZ3kQp9LmN2xR7tY"));
        assert!(is_valid_id("a.b_c~d-e"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("ü"));
    }
}
