//! `/sync`: initial and incremental sync with long-polling, filters, to-device.
//!
//! A sync token is a stream position P: the response holds every item in
//! `(since, P]` the user may see. With nothing to report the request waits on
//! the stream's watch channel until something is appended or `timeout` passes.
//! To-device messages are deleted only when the client comes back with a
//! `since` at or past the response that carried them (its acknowledgement).
//! See <https://spec.matrix.org/v1.13/client-server-api/#get_matrixclientv3sync>.

use super::{client_event, parse_token, stripped_event, token};
use crate::error::{ApiResult, MatrixError};
use crate::extract::{Auth, QueryParams};
use crate::store::{Event, Membership, Session, Store, StreamPos};
use crate::{Homeserver, Stats, now_ms};
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const DEFAULT_TIMELINE_LIMIT: usize = 10;
const MAX_TIMELINE_LIMIT: usize = 500;
/// To-device messages per response; the rest come in the next one.
const TO_DEVICE_LIMIT: usize = 100;
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// State types an invitee sees before joining.
const INVITE_STATE_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
];

/// A sync filter (<https://spec.matrix.org/v1.13/client-server-api/#filtering>).
/// Unknown fields are ignored, as the spec asks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Filter {
    pub room: RoomFilter,
    pub account_data: RoomEventFilter,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RoomFilter {
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub include_leave: bool,
    pub timeline: RoomEventFilter,
    pub state: RoomEventFilter,
    pub account_data: RoomEventFilter,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RoomEventFilter {
    pub limit: Option<usize>,
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
}

impl Filter {
    pub fn parse(value: &Value) -> ApiResult<Self> {
        serde_json::from_value(value.clone()).map_err(|e| MatrixError::bad_json(format!("Invalid filter: {e}")))
    }
}

impl RoomFilter {
    fn allows_room(&self, room_id: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|rooms| rooms.iter().any(|r| r == room_id))
            && !self.not_rooms.iter().any(|r| r == room_id)
    }
}

/// `*` matches any run of characters, as in filter type patterns.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

impl RoomEventFilter {
    pub fn parse_json(text: &str) -> ApiResult<Self> {
        serde_json::from_str(text).map_err(|e| MatrixError::invalid_param(format!("Invalid filter: {e}")))
    }

    fn allows_type(&self, kind: &str) -> bool {
        self.types
            .as_ref()
            .is_none_or(|types| types.iter().any(|t| glob(t, kind)))
            && !self.not_types.iter().any(|t| glob(t, kind))
    }

    fn allows(&self, event: &Event) -> bool {
        self.allows_type(&event.kind)
            && self.senders.as_ref().is_none_or(|s| s.contains(&event.sender))
            && !self.not_senders.contains(&event.sender)
    }

    fn is_trivial(&self) -> bool {
        self.types.is_none() && self.not_types.is_empty() && self.senders.is_none() && self.not_senders.is_empty()
    }
}

/// Up to `limit` events in `(after, upto]` passing `filter`, newest first when
/// `newest_first` (else oldest first), and whether more match beyond them.
pub(crate) fn filtered_events(
    store: &dyn Store,
    room_id: &str,
    after: StreamPos,
    upto: StreamPos,
    limit: usize,
    filter: &RoomEventFilter,
    newest_first: bool,
) -> ApiResult<(Vec<Event>, bool)> {
    let page = if filter.is_trivial() {
        limit + 1
    } else {
        (limit + 1).max(100)
    };
    let (mut low, mut high) = (after, upto);
    let mut out = Vec::new();
    loop {
        let batch = if newest_first {
            store.events_desc(room_id, low, high, page)?
        } else {
            store.events_asc(room_id, low, high, page)?
        };
        let exhausted = batch.len() < page;
        if let Some(last) = batch.last() {
            if newest_first {
                high = last.pos - 1;
            } else {
                low = last.pos;
            }
        }
        for event in batch {
            if filter.allows(&event) {
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(event);
            }
        }
        if exhausted {
            return Ok((out, false));
        }
    }
}

#[derive(Deserialize)]
pub struct SyncQuery {
    since: Option<String>,
    timeout: Option<u64>,
    filter: Option<String>,
    #[serde(default)]
    full_state: bool,
}

#[derive(Serialize, Default)]
pub struct EventList {
    events: Vec<Box<RawValue>>,
}

impl EventList {
    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[derive(Serialize)]
pub struct Timeline {
    events: Vec<Box<RawValue>>,
    limited: bool,
    prev_batch: String,
}

#[derive(Serialize)]
pub struct JoinedRoom {
    timeline: Timeline,
    state: EventList,
    ephemeral: EventList,
    account_data: EventList,
    unread_notifications: Value,
}

#[derive(Serialize)]
pub struct InvitedRoom {
    invite_state: EventList,
}

#[derive(Serialize)]
pub struct LeftRoom {
    timeline: Timeline,
    state: EventList,
    account_data: EventList,
}

#[derive(Serialize, Default)]
pub struct Rooms {
    join: BTreeMap<String, JoinedRoom>,
    invite: BTreeMap<String, InvitedRoom>,
    leave: BTreeMap<String, LeftRoom>,
}

#[derive(Serialize)]
pub struct SyncResponse {
    next_batch: String,
    rooms: Rooms,
    account_data: EventList,
    to_device: EventList,
    presence: EventList,
    device_lists: Value,
    device_one_time_keys_count: Value,
}

impl SyncResponse {
    fn is_empty(&self) -> bool {
        self.rooms.join.is_empty()
            && self.rooms.invite.is_empty()
            && self.rooms.leave.is_empty()
            && self.account_data.is_empty()
            && self.to_device.is_empty()
    }
}

/// Decrements the waiting-syncs gauge when a long-poll ends, however it ends.
struct WaitingGuard<'a>(&'a Homeserver);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0
            .stats
            .syncs_waiting
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

pub async fn sync(
    State(hs): State<Arc<Homeserver>>,
    auth: Auth,
    QueryParams(query): QueryParams<SyncQuery>,
) -> ApiResult<Json<SyncResponse>> {
    Stats::inc(&hs.stats.syncs);
    let since = query.since.as_deref().map(parse_token).transpose()?;
    let filter = match query.filter.as_deref() {
        None => Filter::default(),
        Some(inline) if inline.trim_start().starts_with('{') => {
            let value: Value = serde_json::from_str(inline)
                .map_err(|e| MatrixError::invalid_param(format!("Inline filter is not JSON: {e}")))?;
            Filter::parse(&value)?
        }
        Some(id) => {
            let (user_id, id) = (auth.session.user_id.clone(), id.to_string());
            let text = hs.with_store(move |store| Ok(store.filter(&user_id, &id)?)).await?;
            let text = text.ok_or_else(|| MatrixError::not_found("Unknown filter id"))?;
            Filter::parse(&serde_json::from_str(&text).unwrap_or(Value::Null))?
        }
    };
    let timeout = Duration::from_millis(query.timeout.unwrap_or(0)).min(MAX_TIMEOUT);
    let deadline = tokio::time::Instant::now() + timeout;
    let session = auth.session;
    if let Some(since) = since {
        let session = session.clone();
        hs.with_store(move |store| Ok(store.ack_to_device(&session, since)?))
            .await?;
    }
    let filter = Arc::new(filter);
    let mut stream = hs.subscribe();
    let mut waiting: Option<WaitingGuard<'_>> = None;
    loop {
        let (session_, filter_) = (session.clone(), Arc::clone(&filter));
        let full_state = query.full_state;
        let (response, pos) = hs
            .with_store(move |store| build(store, &session_, since, &filter_, full_state, now_ms()))
            .await?;
        // An initial or full-state sync answers at once; so does one with news.
        if since.is_none() || query.full_state || !response.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(response));
        }
        if waiting.is_none() {
            hs.stats
                .syncs_waiting
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            waiting = Some(WaitingGuard(&hs));
        }
        // Wait until the stream moves past what this response covered.
        loop {
            if *stream.borrow_and_update() > pos {
                break;
            }
            match tokio::time::timeout_at(deadline, stream.changed()).await {
                Ok(Ok(())) => continue,
                // Timed out (or the server is shutting down): answer with no news.
                _ => return Ok(Json(response)),
            }
        }
    }
}

fn build(
    store: &mut dyn Store,
    session: &Session,
    since: Option<StreamPos>,
    filter: &Filter,
    full_state: bool,
    now: u64,
) -> ApiResult<(SyncResponse, StreamPos)> {
    let after = since.unwrap_or(0);
    let mut upto = store.current_pos().max(after);

    // To-device first: if a page is full, the whole response stops at its last
    // message so that the acknowledgement never covers an undelivered one.
    let to_device = store.to_device(session, after, upto, TO_DEVICE_LIMIT)?;
    if to_device.len() == TO_DEVICE_LIMIT
        && let Some(last) = to_device.last()
    {
        upto = last.pos;
    }
    let to_device_events = to_device
        .iter()
        .map(|m| {
            #[derive(Serialize)]
            struct ToDevice<'a> {
                sender: &'a str,
                #[serde(rename = "type")]
                kind: &'a str,
                content: &'a RawValue,
            }
            serde_json::value::to_raw_value(&ToDevice {
                sender: &m.sender,
                kind: &m.kind,
                content: &m.content,
            })
            .expect("a to-device message serializes")
        })
        .collect();

    let account_changes = store.account_data_changes(&session.user_id, after, upto)?;
    let account_event = |kind: &str, content: &RawValue| {
        #[derive(Serialize)]
        struct AccountEvent<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            content: &'a RawValue,
        }
        serde_json::value::to_raw_value(&AccountEvent { kind, content }).expect("account data serializes")
    };
    let global_account_data = account_changes
        .iter()
        .filter(|a| a.room_id.is_none() && filter.account_data.allows_type(&a.kind))
        .map(|a| account_event(&a.kind, &a.content))
        .collect();
    let room_account_data = |room_id: &str| EventList {
        events: account_changes
            .iter()
            .filter(|a| a.room_id.as_deref() == Some(room_id) && filter.room.account_data.allows_type(&a.kind))
            .map(|a| account_event(&a.kind, &a.content))
            .collect(),
    };

    let limit = filter
        .room
        .timeline
        .limit
        .unwrap_or(DEFAULT_TIMELINE_LIMIT)
        .clamp(1, MAX_TIMELINE_LIMIT);
    let render =
        |events: &[Event]| -> Vec<Box<RawValue>> { events.iter().map(|e| client_event(e, session, now)).collect() };
    let mut rooms = Rooms::default();
    for membership in store.memberships_of(&session.user_id)? {
        let room_id = membership.room_id.as_str();
        if !filter.room.allows_room(room_id) || membership.pos > upto {
            continue;
        }
        let changed_since = since.is_none_or(|s| membership.pos > s);
        match membership.membership {
            Membership::Join => {
                // A room joined since the token is new to the client: send it whole.
                let initial = changed_since || full_state;
                let timeline_after = if changed_since { 0 } else { after };
                let (mut timeline, limited) =
                    filtered_events(store, room_id, timeline_after, upto, limit, &filter.room.timeline, true)?;
                timeline.reverse();
                let account_data = room_account_data(room_id);
                if !initial && timeline.is_empty() && account_data.is_empty() {
                    continue;
                }
                let first_pos = timeline.first().map_or(upto + 1, |e| e.pos);
                let state = if initial {
                    store
                        .state(room_id)?
                        .into_iter()
                        .filter(|e| e.pos < first_pos)
                        .collect()
                } else if limited {
                    store.state_changes(room_id, after, first_pos)?
                } else {
                    Vec::new()
                };
                let state: Vec<Event> = state.into_iter().filter(|e| filter.room.state.allows(e)).collect();
                rooms.join.insert(
                    room_id.to_string(),
                    JoinedRoom {
                        timeline: Timeline {
                            events: render(&timeline),
                            limited,
                            prev_batch: token(first_pos - 1),
                        },
                        state: EventList { events: render(&state) },
                        ephemeral: EventList::default(),
                        account_data,
                        unread_notifications: serde_json::json!({}),
                    },
                );
            }
            Membership::Invite if changed_since => {
                let mut invite_state: Vec<Box<RawValue>> = store
                    .state(room_id)?
                    .iter()
                    .filter(|e| INVITE_STATE_TYPES.contains(&e.kind.as_str()))
                    .map(stripped_event)
                    .collect();
                if let Some(invite) = store.state_event(room_id, "m.room.member", &session.user_id)? {
                    if let Some(inviter) = store.state_event(room_id, "m.room.member", &invite.sender)? {
                        invite_state.push(stripped_event(&inviter));
                    }
                    invite_state.push(client_event(&invite, session, now));
                }
                rooms.invite.insert(
                    room_id.to_string(),
                    InvitedRoom {
                        invite_state: EventList { events: invite_state },
                    },
                );
            }
            Membership::Leave | Membership::Ban if (since.is_some() && changed_since) || filter.room.include_leave => {
                // The timeline ends with the departure; later events are not theirs to see.
                let (mut timeline, limited) = filtered_events(
                    store,
                    room_id,
                    after,
                    membership.pos,
                    limit,
                    &filter.room.timeline,
                    true,
                )?;
                timeline.reverse();
                if since.is_none() && timeline.is_empty() {
                    continue;
                }
                let first_pos = timeline.first().map_or(membership.pos + 1, |e| e.pos);
                rooms.leave.insert(
                    room_id.to_string(),
                    LeftRoom {
                        timeline: Timeline {
                            events: render(&timeline),
                            limited,
                            prev_batch: token(first_pos - 1),
                        },
                        state: EventList::default(),
                        account_data: room_account_data(room_id),
                    },
                );
            }
            _ => {}
        }
    }

    let response = SyncResponse {
        next_batch: token(upto),
        rooms,
        account_data: EventList {
            events: global_account_data,
        },
        to_device: EventList {
            events: to_device_events,
        },
        presence: EventList::default(),
        device_lists: serde_json::json!({ "changed": [], "left": [] }),
        device_one_time_keys_count: serde_json::json!({}),
    };
    Ok((response, upto))
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn type_patterns() {
        assert!(glob("m.call.*", "m.call.invite"));
        assert!(glob("*", "anything"));
        assert!(glob("m.*.invite", "m.call.invite"));
        assert!(!glob("m.call.*", "m.room.message"));
        assert!(glob("m.room.message", "m.room.message"));
        assert!(!glob("m.room", "m.room.message"));
    }
}
