//! The Matrix call signalling core (sans-IO): the `m.call.*` events of call
//! protocol v1 (and v0) and, as the signalling issue lands, the call state
//! machines and the conference bot's policy.
//!
//! Today: [`events`], typed call event contents parsed at the edge, with the
//! tolerance real clients need (integer `version` values, the unstable
//! `org.matrix.msc3077.sdp_stream_metadata` key and
//! `org.matrix.call.sdp_stream_metadata_changed` type, unknown hangup reasons),
//! and builders for the events the bot sends.

pub mod call;
pub mod events;
